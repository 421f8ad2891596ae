# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""Cheers: one LLM that understands images (image -> text) and generates them (text -> image).

Data flows through this file top to bottom:

1. vision tokenizer: pixels -> frozen FLUX.2 VAE latent (2x2 patchified, BatchNorm-normalised) -> [x_t on the
   flow-matching path, during sampling and training] -> decoder projector (a second VAE decoder) -> SigLIP -> 2x2 token
   merge + MLP: 4x fewer tokens for the LLM;
2. LLM: Qwen2 with the "omni" attention pattern (causal text, bidirectional inside each image block);
3. flow head (`flow_head.py`): LLM hidden states of an image's tokens -> latent velocity.

Reused from the libraries: transformers' `Qwen2Model` and `SiglipVisionModel`, diffusers' `AutoencoderKLFlux2` and
`Decoder`. Cheers' own modules: `vision_tokenizer.py`, `omni_attention.py`, `flow_head.py` (and `layout.py` for the
tensor layouts, `vae_numerics.py` for the bit-parity VAE kernels). The flow-matching path and the training objective
live in `training.py`, the sampling loop in `transformers_cheers.pipelines.sampling`.
"""

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2
from torch import nn
from transformers import AutoModel, Cache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ModelOutput,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_cheers import CheersConfig
from .cpu_bf16 import use_fallback_bf16_convolutions
from .flow_head import (
    CheersDetailGate,
    CheersDiTBlock,
    CheersDiTFinalLayer,
    CheersDiTHead,
    CheersHeadRotaryEmbedding,
    CheersTimestepEmbedder,
    detail_head_positions,
    rope_cos_sin,
)
from .layout import patchify_latents, split_tokens, unpatchify_latents
from .omni_attention import image_block_ids, read_only_view
from .training import check_training_labels, compute_training_losses, flow_matching_path
from .vae_numerics import use_unfused_vae_kernels
from .vision_tokenizer import CheersDecoderProjector, CheersMultiModalProjector, denormalize_latents


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CheersImageOutput(BaseModelOutputWithPooling):
    r"""
    The vision tokenizer's output for a batch of images.

    last_hidden_state (`torch.FloatTensor` of shape `(num_images, grid_h * grid_w, vision_hidden_size)`):
        SigLIP's last hidden state (after its post LayerNorm).
    pooler_output (`torch.FloatTensor` of shape `(num_images, tokens_per_image, text_hidden_size)`):
        The LLM input embeddings of the images (after the 2x2 token merge and MLP).
    hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
        SigLIP's per-layer hidden states / attention maps, when requested.
    latents (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`):
        The normalised, patchified latents that were tokenized (clean, or x_t on the flow-matching path).
    decoded_pixels (`torch.FloatTensor` of shape `(num_images, 3, height, width)`):
        The decoder projector's output: the pixels SigLIP saw.
    patch_embeddings (`torch.FloatTensor` of shape `(num_images, grid_h * grid_w, vision_hidden_size)`):
        SigLIP's patch + position embeddings of `decoded_pixels`: the detail the detail gate injects.
    """

    latents: torch.FloatTensor | None = None
    decoded_pixels: torch.FloatTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None


@dataclass
class CheersModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    The LLM outputs; `image_outputs` is the [`CheersImageOutput`] of the images of this call (None without images).
    """


@dataclass
class CheersCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: the training objective `text_loss + image_loss` (see `transformers_cheers.training`).
    text_loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: next-token cross-entropy over the (shifted, rewritten) text targets.
    image_loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: flow-matching MSE between predicted and target latent velocities of the images.
    image_velocities (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`, *optional*):
        With `labels` and images: the predicted velocities the image loss compared.
    image_velocity_targets (`torch.FloatTensor`, *optional*):
        With `labels` and images: their targets x1 - x0 (zero where t == 1).
    """

    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    image_velocities: torch.FloatTensor | None = None
    image_velocity_targets: torch.FloatTensor | None = None


@dataclass
class CheersVelocityOutput(ModelOutput):
    r"""
    velocity (`torch.FloatTensor` of shape `(batch_size, latent_channels, grid_height, grid_width)`):
        Predicted dx/dt in the normalised, patchified latent space (t = 0 noise, t = 1 data).
    detail_gate (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`):
        How much SigLIP patch detail the detail gate injects at each patch (unbounded, signed).
    """

    velocity: torch.FloatTensor | None = None
    detail_gate: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# LLM glue (the vision tokenizer's trained modules are in vision_tokenizer.py, the flow head in flow_head.py)
# --------------------------------------------------------------------------------------------------------------------


class CheersTextRotaryEmbedding(Qwen2RotaryEmbedding):
    """Qwen2's RoPE, with the frequency table optionally rounded to the activation dtype (see `rope_cos_sin`)."""

    def __init__(self, config, round_to_compute_dtype: bool = True):
        super().__init__(config)
        self.round_to_compute_dtype = round_to_compute_dtype

    @torch.no_grad()
    @dynamic_rope_update  # keeps "dynamic" / "longrope" scaling working, as in Qwen2's own rotary embedding
    def forward(self, x, position_ids):
        return rope_cos_sin(
            self.inv_freq, position_ids, x.dtype, self.round_to_compute_dtype, scaling=self.attention_scaling
        )


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


# Every saved folder also loads with trust_remote_code for people without this package: transformers copies the code
# files (register_for_auto_class) and this auto_map names all the entry points.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_cheers.CheersConfig",
    "AutoModel": "modeling_cheers.CheersModel",
    "AutoModelForCausalLM": "modeling_cheers.CheersForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_cheers.CheersForConditionalGeneration",
}


class CheersPreTrainedModel(PreTrainedModel):
    config: CheersConfig
    config_class = CheersConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Qwen2DecoderLayer",
        "SiglipEncoderLayer",
        "CheersDiTBlock",
        "CheersDecoderProjector",
        "AutoencoderKLFlux2",
        "CheersMultiModalProjector",
    ]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The BatchNorm statistics of the VAE and the decoder projector are tiny and precision-sensitive (named down to
    # the buffers: the integer `num_batches_tracked` must stay an integer).
    _keep_in_fp32_modules_strict = ["bn.running_mean", "bn.running_var"]
    # Trainer must not hand `num_items_in_batch` to forward: the image loss is a per-batch mean, so Trainer's own
    # division by the accumulation steps is what keeps text and image losses weighted alike (see training.py).
    accepts_loss_kwargs = False

    def __init__(self, config: CheersConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(config, "auto_map", None) or {})}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Also takes an official Cheers folder or Hub repo (model_type "umm"): converted in memory, nothing written.

        See `official_checkpoint.load_official_pretrained`; native folders load as usual.
        """
        # Imported by name at call time: this file travels as remote code, where the package may be absent.
        try:
            official = importlib.import_module(".official_checkpoint", __package__)
        except ImportError:
            official = None
        if official is not None and official.is_official_checkpoint(pretrained_model_name_or_path, **kwargs):
            return official.load_official_pretrained(cls, pretrained_model_name_or_path, model_args, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CheersHeadRotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, CheersDiTBlock | CheersDiTFinalLayer):
            # adaLN-Zero: every block starts as the identity, the head's output starts at zero.
            nn.init.zeros_(module.modulation.weight)
            nn.init.zeros_(module.modulation.bias)
        elif isinstance(module, CheersDetailGate):
            nn.init.zeros_(module.gate[-1].weight)
            nn.init.zeros_(module.gate[-1].bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()


class CheersModel(CheersPreTrainedModel):
    """Cheers without the language-modeling head: vision tokenizer, LLM and the flow-matching head."""

    def __init__(self, config: CheersConfig):
        super().__init__(config)
        # 1. vision tokenizer
        self.vae = AutoencoderKLFlux2(**config.vae_config)
        self.vae.requires_grad_(False)  # frozen in every training stage (and so never a DDP "unused parameter")
        self.vae_decoder_projector = CheersDecoderProjector(config)
        for batch_norm in (self.vae.bn, self.vae_decoder_projector.bn):
            batch_norm.float()  # whatever the default dtype the model is built under
        if config.vae_unfused_kernels:
            use_unfused_vae_kernels(self.vae)
            use_unfused_vae_kernels(self.vae_decoder_projector)
        self.vision_representation = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = CheersMultiModalProjector(config)
        # 2. LLM
        self.language_model = AutoModel.from_config(config.text_config)
        self.language_model.rotary_emb = CheersTextRotaryEmbedding(
            config.text_config, config.round_rope_frequencies_to_compute_dtype
        )
        # 3. flow head
        self.time_embedder = CheersTimestepEmbedder(config)
        text, vision = config.text_config, config.vision_config
        self.semantic_head = CheersDiTHead(
            config,
            hidden_size=text.hidden_size,
            num_layers=config.semantic_head_num_layers,
            num_heads=config.semantic_head_num_attention_heads,
            num_key_value_heads=config.semantic_head_num_key_value_heads,
            out_features=config.token_merge_size**2 * vision.hidden_size,
        )
        self.detail_gate = CheersDetailGate(config)
        self.detail_head = CheersDiTHead(
            config,
            hidden_size=vision.hidden_size,
            num_layers=config.detail_head_num_layers,
            num_heads=config.detail_head_num_attention_heads,
            num_key_value_heads=config.detail_head_num_key_value_heads,
            out_features=config.latent_channels,
        )
        use_fallback_bf16_convolutions(self)  # VAE, decoder projector, SigLIP patches: usable bf16 on any CPU
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def vision_tower(self) -> nn.Module:
        """SigLIP, under the name transformers' composite-model utilities look for (the weights keep their names)."""
        return self.vision_representation

    # ---- 1. Vision tokenizer ----------------------------------------------------------------------------------------

    @property
    def latent_patch_size(self) -> tuple[int, int]:
        return tuple(self.config.vae_config["patch_size"])

    @torch.no_grad()  # the VAE is frozen in every training stage
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> normalised, patchified VAE latents x1 (N, latent_channels, H/16, W/16).

        The posterior mean is used (no sampling). Cheers feeds [0, 1] pixels to the FLUX.2 VAE (not [-1, 1]).
        """
        self.check_image_size(pixel_values)
        moments = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        latents = patchify_latents(moments.mean, self.latent_patch_size)
        return F.batch_norm(
            latents, self.vae.bn.running_mean, self.vae.bn.running_var, training=False, eps=self.vae.bn.eps
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised, patchified latents -> pixels (nominally [0, 1], not clamped)."""
        latents = latents.to(self.vae.dtype)
        latents = unpatchify_latents(denormalize_latents(latents, self.vae.bn), self.latent_patch_size)
        return self.vae.decode(latents).sample

    def check_image_size(self, pixel_values: torch.Tensor) -> None:
        channels = self.config.vision_config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (num_images, {channels}, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        multiple = self.config.image_size_multiple
        height, width = pixel_values.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of {multiple} (SigLIP patch x token merge); "
                f"resize the images, e.g. with CheersImageProcessor(resolution={self.config.vision_config.image_size})."
            )

    def check_image_grid(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> None:
        """A host-side check of the processor's grid against the pixels (only shapes; no device sync)."""
        patch = self.config.vision_config.patch_size
        grid = [pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch]
        if image_grid_hw.shape[0] != pixel_values.shape[0] or image_grid_hw.tolist() != [grid] * len(image_grid_hw):
            raise ValueError(
                f"image_grid_hw {image_grid_hw.tolist()} does not describe pixel_values of shape "
                f"{tuple(pixel_values.shape)} (expected {grid} per image); pass both from the same processor call."
            )

    @can_return_tuple
    def get_latent_features(self, latents: torch.Tensor, **kwargs) -> CheersImageOutput:
        """Latents (clean or x_t) -> decoder projector -> SigLIP -> merged LLM image tokens.

        `output_hidden_states` / `output_attentions` are passed to SigLIP; `return_dict=False` gives a tuple.
        """
        decoded_pixels = self.vae_decoder_projector(
            latents.to(self.vae_decoder_projector.post_quant_conv.weight.dtype)
        )
        return self.get_pixel_features(decoded_pixels, latents=latents, return_dict=True, **kwargs)

    @can_return_tuple
    def get_pixel_features(
        self, decoded_pixels: torch.Tensor, latents: torch.Tensor | None = None, **kwargs
    ) -> CheersImageOutput:
        """The decoder projector's pixels -> SigLIP -> merged LLM image tokens: `get_latent_features` after its
        first step, for callers that already hold the decoded pixels (e.g. a stage that trains SigLIP on a cache of
        them). `latents` is only passed through to the output; keyword arguments as in `get_latent_features`.
        """
        vision_config = self.config.vision_config
        height, width = decoded_pixels.shape[-2:]
        grid = (height // vision_config.patch_size, width // vision_config.patch_size)
        wants_hidden_states = kwargs.pop("output_hidden_states", None) or self.config.output_hidden_states
        vision_outputs = self.vision_representation(
            decoded_pixels.to(self.vision_representation.dtype),
            # any size other than the native one needs interpolated position embeddings
            interpolate_pos_encoding=(height, width) != (vision_config.image_size,) * 2,
            output_hidden_states=True,  # hidden_states[0] is the patch embedding the detail gate needs
            return_dict=True,
            **kwargs,
        )
        return CheersImageOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.multi_modal_projector(vision_outputs.last_hidden_state, grid),
            hidden_states=vision_outputs.hidden_states if wants_hidden_states else None,
            attentions=vision_outputs.attentions,
            latents=latents,
            decoded_pixels=decoded_pixels,
            patch_embeddings=vision_outputs.hidden_states[0],
        )

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor | None = None, **kwargs
    ) -> CheersImageOutput:
        """Clean images -> their LLM input embeddings (`pooler_output`), through the whole vision tokenizer.

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`): pixels in [0, 1].
            image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): the processor's SigLIP grid,
                checked against the pixels.
        """
        if image_grid_hw is not None:
            self.check_image_grid(pixel_values, image_grid_hw)
        return self.get_latent_features(self.encode_latents(pixel_values), return_dict=True, **kwargs)

    # ---- 2. LLM -----------------------------------------------------------------------------------------------------

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.BoolTensor:
        """Positions whose embeddings come from images (`<image>` and `<image_gen>` placeholders).

        Without `input_ids`, placeholders are found by comparing `inputs_embeds` with the placeholder embeddings.
        """
        placeholder_ids = (self.config.image_token_id, self.config.image_gen_token_id)
        if input_ids is not None:
            return (input_ids == placeholder_ids[0]) | (input_ids == placeholder_ids[1])
        ids = torch.tensor(placeholder_ids, device=inputs_embeds.device)
        placeholder_embeddings = self.get_input_embeddings()(ids).to(inputs_embeds.dtype)  # (2, D)
        return (inputs_embeds[:, :, None, :] == placeholder_embeddings).all(-1).any(-1)

    @staticmethod
    def insert_image_features(
        inputs_embeds: torch.Tensor, placeholder_mask: torch.BoolTensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        num_tokens = int(placeholder_mask.sum())
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {num_tokens} image placeholder tokens "
                f"but the images give {num_features} features ({image_features.shape[0]} images x "
                f"{image_features.shape[1]} tokens). Build inputs with CheersProcessor so each image placeholder is "
                "expanded to the right number of tokens, and pass exactly one image per placeholder."
            )
        mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    def build_attention_mask(self, inputs_embeds, attention_mask, cache, position_ids, block_ids):
        """The omni mask: causal, bidirectional inside image blocks, padding masked (any attention backend)."""
        if block_ids is not None and cache is not None and (past := cache.get_seq_length()) > 0:
            block_ids = F.pad(block_ids, (past, 0), value=-1)
        mask = create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            block_sequence_ids=block_ids,
        )
        return {"full_attention": mask}

    @staticmethod
    def default_position_ids(inputs_embeds, attention_mask, cache) -> torch.LongTensor:
        """Positions count real tokens only, so a left-padded prompt gets the same positions as the prompt alone."""
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if attention_mask is None or attention_mask.ndim != 2:
            return torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -length:].to(inputs_embeds.device)

    def encode_images(self, pixel_values, image_latents, mm_encoder_outputs, image_grid_hw, kwargs):
        """The one rule for image inputs: clean `pixel_values`, `image_latents` (e.g. x_t) or precomputed outputs."""
        given = [
            name
            for name, value in (("pixel_values", pixel_values), ("image_latents", image_latents))
            if value is not None
        ]
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            given.append("mm_encoder_outputs")
        if len(given) > 1:
            raise ValueError(
                f"Pass images once: got {' and '.join(given)}. Use pixel_values for images, image_latents for latents "
                "(e.g. noisy ones) or mm_encoder_outputs={'image': ...} for a vision tokenizer output computed earlier."
            )
        if pixel_values is not None:
            return self.get_image_features(pixel_values, image_grid_hw=image_grid_hw, **kwargs)
        if image_latents is not None:
            return self.get_latent_features(image_latents, return_dict=True, **kwargs)
        return mm_encoder_outputs.get("image") if mm_encoder_outputs is not None else None

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_latents: torch.FloatTensor | None = None,
        context_image_mask: torch.BoolTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, CheersImageOutput] | None = None,
        **kwargs,
    ) -> CheersModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
            Clean images in [0, 1], one per image placeholder, in order.
        image_latents (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`, *optional*):
            Normalised latents to tokenize instead of pixels, e.g. x_t on the flow-matching path (training).
        context_image_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            True at the tokens of a context image (the official model's dummy image prefix), which attend causally
            instead of bidirectionally. Produced by `CheersProcessor(..., context_image=...)`.
        image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            SigLIP patch grid of each image, as returned by the processor; checked against `pixel_values`.
        mm_encoder_outputs (`dict`, *optional*):
            `{"image": CheersImageOutput}` computed earlier (e.g. shared by several prompts), instead of images.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)

        vision_kwargs = {key: kwargs[key] for key in ("output_attentions",) if key in kwargs}
        image_outputs = self.encode_images(
            pixel_values, image_latents, mm_encoder_outputs, image_grid_hw, vision_kwargs
        )
        tokens_per_image = None
        if image_outputs is not None:
            inputs_embeds = self.insert_image_features(inputs_embeds, placeholder_mask, image_outputs.pooler_output)
            tokens_per_image = image_outputs.pooler_output.shape[1]

        if position_ids is None:
            position_ids = self.default_position_ids(inputs_embeds, attention_mask, cache)
        if isinstance(attention_mask, dict):
            mask_mapping = attention_mask  # built by generate() for a static cache (decode steps: plain causal)
        else:
            block_mask = (
                placeholder_mask if context_image_mask is None else placeholder_mask & ~context_image_mask.bool()
            )
            # no image block: the plain causal mask (and SDPA's is_causal fast path); a host sync at prefill only
            block_ids = image_block_ids(block_mask, tokens_per_image) if bool(block_mask.any()) else None
            mask_mapping = self.build_attention_mask(inputs_embeds, attention_mask, cache, position_ids, block_ids)

        outputs = self.language_model(
            attention_mask=mask_mapping,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return CheersModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )

    # ---- 3. Flow head -----------------------------------------------------------------------------------------------

    def predict_velocity(
        self,
        image_hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        patch_embeddings: torch.Tensor,
        grid: tuple[int, int],
    ) -> CheersVelocityOutput:
        """The cascaded head: LLM hidden states of an image's tokens -> latent velocity.

        Args:
            image_hidden_states (`(N, tokens, text_hidden)`): final LLM hidden states at the image tokens.
            timesteps (`(N,)`): flow time of each image, used as given.
            patch_embeddings (`(N, grid_h * grid_w, vision_hidden)`): SigLIP patch embeddings of the decoded x_t.
            grid (`(grid_h, grid_w)`): the latent / SigLIP patch grid.
        """
        semantic_condition, detail_condition = self.time_embedder(timesteps)
        num_tokens = image_hidden_states.shape[1]
        positions = torch.arange(num_tokens, device=image_hidden_states.device)[None]
        semantic = self.semantic_head(image_hidden_states, semantic_condition, positions)
        semantic = split_tokens(semantic, grid, self.config.token_merge_size)  # (N, grid_h * grid_w, vision_hidden)
        detailed, gate = self.detail_gate(semantic, patch_embeddings.to(semantic.dtype))
        velocity = self.detail_head(detailed, detail_condition, detail_head_positions(detailed))
        velocity = velocity.transpose(1, 2).reshape(velocity.shape[0], -1, *grid)  # (N, C, grid_h, grid_w)
        return CheersVelocityOutput(velocity=velocity, detail_gate=gate.view(gate.shape[0], *grid))

    def compute_velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        cache: Cache,
        attention_mask: torch.Tensor | None = None,
        num_branches: int = 1,
        store_in_cache: bool = False,
    ) -> CheersVelocityOutput:
        """One network evaluation of the sampler: the velocity of `latents` (x_t) at time t after a cached prompt.

        The vision tokenizer runs once on x_t and its tokens are shared by the `num_branches` prompts per image that
        the cache holds, stacked as [branch 0 rows; branch 1 rows; ...] (e.g. conditional and unconditional prompts
        for classifier-free guidance). The image tokens attend to their prompt (padding excluded) and to each other
        bidirectionally; the cache is left untouched unless `store_in_cache` (the official model keeps the tokens of
        its last evaluation before it continues the text).

        Args:
            latents (`(B, latent_channels, grid_h, grid_w)`): x_t in the normalised, patchified latent space.
            timesteps (`float` or `(B,)`): t in [0, 1]; rounded to the compute dtype as the official sampler does.
            cache (`Cache`): the prompts' key/values, `B * num_branches` rows.
            attention_mask (`(B * num_branches, prompt_length)`, *optional*): the prompts' padding mask.
            num_branches (`int`): prompts per image in the cache.
        Returns:
            [`CheersVelocityOutput`] with a velocity (and detail-gate map) per cache row.
        """
        rows = latents.shape[0] * num_branches
        tokens = self.get_latent_features(latents, return_dict=True)
        image_features = tokens.pooler_output.repeat(num_branches, 1, 1)
        hidden_states = self.image_hidden_states(image_features, cache, attention_mask, store_in_cache)
        timesteps = torch.as_tensor(timesteps, device=latents.device).to(self.language_model.dtype).reshape(-1)
        timesteps = timesteps.expand(rows) if timesteps.numel() == 1 else timesteps.repeat(num_branches)
        patch_embeddings = tokens.patch_embeddings.repeat(num_branches, 1, 1)
        return self.predict_velocity(hidden_states, timesteps, patch_embeddings, tuple(latents.shape[-2:]))

    def image_hidden_states(self, image_features, cache, attention_mask, store_in_cache: bool) -> torch.Tensor:
        """Run one image block through the LLM after a cached prompt (positions continue each row's prompt)."""
        batch, num_tokens = image_features.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, cache.get_seq_length(), dtype=torch.long, device=image_features.device)
        if attention_mask.shape[0] != batch:
            raise ValueError(
                f"The prompt mask has {attention_mask.shape[0]} rows for {batch} image rows (latents x num_branches); "
                "pass num_branches to match how the prompts were stacked in the cache."
            )
        full_mask = F.pad(attention_mask, (0, num_tokens), value=1)
        position_ids = attention_mask.sum(-1, keepdim=True) + torch.arange(num_tokens, device=full_mask.device)
        block_ids = torch.zeros(batch, num_tokens, dtype=torch.long, device=full_mask.device)
        run_cache = cache if store_in_cache else read_only_view(cache)
        mask_mapping = self.build_attention_mask(image_features, full_mask, run_cache, position_ids, block_ids)
        outputs = self.language_model(
            inputs_embeds=image_features,
            attention_mask=mask_mapping,
            position_ids=position_ids,
            cache=run_cache,
            use_cache=True,
        )
        return outputs.last_hidden_state


class CheersForConditionalGeneration(CheersPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: CheersConfig):
        super().__init__(config)
        self.model = CheersModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values, **kwargs) -> CheersImageOutput:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_latents: torch.FloatTensor | None = None,
        context_image_mask: torch.BoolTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, CheersImageOutput] | None = None,
        image_timesteps: torch.Tensor | None = None,
        image_noise: torch.FloatTensor | None = None,
        image_loss_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> CheersCausalLMOutputWithPast:
        r"""
        image_latents, context_image_mask, image_grid_hw, mm_encoder_outputs: see [`CheersModel.forward`].

        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Unshifted text targets, one per input token, -100 where there is none; image tokens must be -100 (or
            their own placeholder id). With labels the output holds the official training objective: `loss` =
            `text_loss` (next-token cross-entropy) + `image_loss` (flow-matching MSE at every image's tokens), and
            the images enter the LLM as x_t on the flow-matching path; see `transformers_cheers.training`. Build
            batches with `transformers_cheers.data.CheersTrainingCollator`.
        image_timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            With labels: flow time t of each image (1 = clean, the default), used as given.
        image_noise (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`, *optional*):
            With labels: the noise x0 of x_t = t * x1 + (1 - t) * x0 (drawn from the global RNG when omitted).
        image_loss_mask (`torch.BoolTensor` of shape `(num_images,)`, *optional*):
            With labels: which images count in `image_loss` (default: all, as the official training).
        """
        path = placeholder_mask = None
        if labels is not None:
            placeholder_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds)
            placeholder_ids = (self.config.image_token_id, self.config.image_gen_token_id)
            check_training_labels(labels, placeholder_mask, placeholder_ids)  # before the expensive part
            if pixel_values is not None:
                if image_grid_hw is not None:
                    self.model.check_image_grid(pixel_values, image_grid_hw)
                path = flow_matching_path(self.model.encode_latents(pixel_values), image_timesteps, image_noise)
                pixel_values, image_latents = None, path.noisy_latents
            logits_to_keep = 0  # the objective needs every position
        elif image_timesteps is not None or image_noise is not None or image_loss_mask is not None:
            raise ValueError("image_timesteps, image_noise and image_loss_mask are training inputs: pass labels too.")

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_latents=image_latents,
            context_image_mask=context_image_mask,
            image_grid_hw=image_grid_hw if pixel_values is not None else None,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])

        losses = None
        if labels is not None:
            losses = compute_training_losses(
                self.model,
                outputs,
                logits,
                labels,
                placeholder_mask,
                path,
                image_timesteps,
                image_loss_mask,
                attention_mask,
            )
        return CheersCausalLMOutputWithPast(
            loss=losses.loss if losses is not None else None,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            text_loss=losses.text_loss if losses is not None else None,
            image_loss=losses.image_loss if losses is not None else None,
            image_velocities=losses.image_velocities if losses is not None else None,
            image_velocity_targets=losses.image_velocity_targets if losses is not None else None,
        )

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, is_first_iteration=False, **kwargs):
        # Image inputs matter for the prompt (prefill) only; later steps feed text tokens through the cache.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("image_latents", "context_image_mask", "mm_encoder_outputs", "image_grid_hw"):
                kwargs.pop(key, None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration and isinstance(model_inputs.get("attention_mask"), dict):
            # With a static cache generate() prebuilds a plain causal mask; the prompt needs the omni mask (image
            # blocks bidirectional), which forward builds from the 2-D padding mask.
            model_inputs["attention_mask"] = kwargs.get("attention_mask")
        return model_inputs


CheersConfig.register_for_auto_class()
CheersModel.register_for_auto_class("AutoModel")
CheersForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CheersForConditionalGeneration", "CheersImageOutput", "CheersModel", "CheersPreTrainedModel"]
