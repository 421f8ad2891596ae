"""Cheers: one LLM that understands images (image -> text) and generates them (text -> image).

The reused parts come from the libraries: transformers' `Qwen2Model` (LLM) and `SiglipVisionModel` (vision encoder),
diffusers' `AutoencoderKLFlux2` (the frozen FLUX.2 VAE) and `Decoder` (the "decoder projector"). What is written here
is Cheers-specific:

* the vision tokenizer glue: pixels -> VAE latent (2x2 patchified, BatchNorm-normalised) -> optional noising at time t
  -> decoder projector -> SigLIP -> 2x2 token merge + MLP (4x fewer tokens for the LLM);
* the "omni" attention pattern: causal text, bidirectional attention inside each image block;
* the cascaded flow-matching head: time embedder, semantic DiT head, detail gate, detail DiT head.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2
from diffusers.models.autoencoders.vae import Decoder
from torch import nn
from transformers import AutoModel, Cache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging

from .configuration_cheers import CheersConfig
from .training import check_training_labels, compute_training_losses


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CheersModelOutputWithPast(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final LLM hidden states (after the last RMSNorm).
    cache (`Cache`, *optional*):
        The LLM key/value cache.
    hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
        Per-layer LLM hidden states / attention maps when requested.
    image_features (`torch.FloatTensor` of shape `(num_image_tokens_total, hidden_size)`, *optional*):
        The LLM input embeddings of the image tokens of this call.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_features: torch.FloatTensor | None = None


@dataclass
class CheersCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: the training objective `text_loss + image_loss` (see `transformers_cheers.training`).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Prediction scores of the language modeling head.
    cache, hidden_states, attentions, image_features:
        See [`CheersModelOutputWithPast`].
    text_loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: next-token cross-entropy over the (shifted, rewritten) text targets.
    image_loss (`torch.FloatTensor` of shape `()`, *optional*):
        With `labels`: flow-matching MSE between predicted and target latent velocities of the images.
    image_velocities (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`, *optional*):
        With `labels` and images: the predicted velocities the image loss compared.
    image_velocity_targets (`torch.FloatTensor`, *optional*):
        With `labels` and images: their targets x1 - x0 (zero where t == 1).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_features: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    image_velocities: torch.FloatTensor | None = None
    image_velocity_targets: torch.FloatTensor | None = None


@dataclass
class CheersVisionTokenizerOutput(ModelOutput):
    r"""
    image_features (`torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        LLM input embeddings of the images (after the 2x2 token merge).
    latents (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_height, grid_width)`):
        The clean normalised VAE latents x1 (only when pixels were encoded).
    noisy_latents (`torch.FloatTensor`):
        x_t = t * x1 + (1 - t) * x0, the latent actually decoded for SigLIP.
    velocity_targets (`torch.FloatTensor`):
        Flow-matching targets x1 - x0 (zero where t == 1), same layout as the latents.
    decoded_pixels (`torch.FloatTensor` of shape `(num_images, 3, height, width)`):
        The decoder projector's output, i.e. the pixels SigLIP sees.
    vision_last_hidden_state (`torch.FloatTensor` of shape `(num_images, grid_height * grid_width, vision_hidden_size)`):
        SigLIP's last hidden state (after its post LayerNorm).
    patch_embeddings (`torch.FloatTensor`, *optional*):
        SigLIP's patch + position embeddings of `decoded_pixels` (the detail injected by the detail gate).
    """

    image_features: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    noisy_latents: torch.FloatTensor | None = None
    velocity_targets: torch.FloatTensor | None = None
    decoded_pixels: torch.FloatTensor | None = None
    vision_last_hidden_state: torch.FloatTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None


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
# Small building blocks
# --------------------------------------------------------------------------------------------------------------------


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, round_to_dtype: bool, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables `(batch, positions, 2 * len(inv_freq))`, computed in fp32, returned in `dtype`.

    With `round_to_dtype`, the frequencies are first rounded to `dtype`: the official model ran (and was trained)
    with `inv_freq` buffers cast to bf16 by a blanket `.to(torch.bfloat16)`.
    """
    if round_to_dtype:
        inv_freq = inv_freq.to(dtype)
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class CheersTextRotaryEmbedding(Qwen2RotaryEmbedding):
    """Qwen2's RoPE, with the frequency table optionally rounded to the activation dtype (see `rope_cos_sin`)."""

    def __init__(self, config, round_to_compute_dtype: bool = True):
        super().__init__(config)
        self.round_to_compute_dtype = round_to_compute_dtype

    @torch.no_grad()
    def forward(self, x, position_ids):
        return rope_cos_sin(
            self.inv_freq, position_ids, x.dtype, self.round_to_compute_dtype, scaling=self.attention_scaling
        )


class CheersHeadRotaryEmbedding(nn.Module):
    """1-D RoPE (rotate-half) of the DiT heads, over their own token positions."""

    def __init__(self, head_dim: int, theta: float, round_to_compute_dtype: bool):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.round_to_compute_dtype = round_to_compute_dtype
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, position_ids, x.dtype, self.round_to_compute_dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, computed in fp32 (as the official model) and returned in x's dtype."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (used as is, not scaled by 1000), cosines first, computed in fp32."""
    half = dim // 2
    exponent = -torch.log(torch.tensor(max_period)) * torch.arange(half, dtype=torch.float32) / half
    args = t[..., None].float() * torch.exp(exponent).to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CheersTimestepEmbedder(nn.Module):
    """Two MLPs on one sinusoidal embedding of t: one conditions the semantic head, one the detail head."""

    def __init__(self, config: CheersConfig):
        super().__init__()
        self.embedding_dim = config.time_embedding_dim
        self.max_period = config.time_embedding_max_period
        self.semantic_mlp = self._mlp(config.time_embedding_dim, config.text_config.hidden_size)
        self.detail_mlp = self._mlp(config.time_embedding_dim, config.vision_config.hidden_size)

    @staticmethod
    def _mlp(in_features: int, out_features: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_features, out_features), nn.SiLU(), nn.Linear(out_features, out_features))

    def forward(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`timesteps` (N,) -> conditionings (N, 1, text_hidden) and (N, 1, vision_hidden)."""
        dtype = self.semantic_mlp[0].weight.dtype
        embedding = timestep_embedding(timesteps[:, None], self.embedding_dim, self.max_period).to(dtype)
        return self.semantic_mlp(embedding), self.detail_mlp(embedding)


class CheersDiTAttention(nn.Module):
    """Bidirectional, unmasked multi-head attention with grouped key/values and RoPE."""

    def __init__(self, config: CheersConfig, hidden_size: int, num_heads: int, num_key_value_heads: int):
        super().__init__()
        self.config = config
        self.head_dim = hidden_size // num_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = 0.0
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(self, query, key, value, None, dropout=0.0, scaling=self.scaling)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous())


class CheersSwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CheersDiTBlock(GradientCheckpointingLayer):
    """adaLN-modulated transformer block: RMSNorm -> modulate -> attention (gated), RMSNorm -> modulate -> MLP (gated)."""

    def __init__(self, config: CheersConfig, hidden_size: int, num_heads: int, num_key_value_heads: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(hidden_size, eps=config.head_rms_norm_eps)
        self.self_attn = CheersDiTAttention(config, hidden_size, num_heads, num_key_value_heads)
        self.post_attention_layernorm = Qwen2RMSNorm(hidden_size, eps=config.head_rms_norm_eps)
        self.mlp = CheersSwiGLU(hidden_size, config.head_mlp_ratio * hidden_size)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, hidden_states, conditioning, position_embeddings):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(
            F.silu(conditioning)
        ).chunk(6, dim=-1)
        attn_input = modulate(self.input_layernorm(hidden_states), shift_attn, scale_attn)
        hidden_states = hidden_states + gate_attn * self.self_attn(attn_input, position_embeddings)
        mlp_input = modulate(self.post_attention_layernorm(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.mlp(mlp_input)


class CheersDiTFinalLayer(nn.Module):
    def __init__(self, config: CheersConfig, hidden_size: int, out_features: int):
        super().__init__()
        self.norm = Qwen2RMSNorm(hidden_size, eps=config.head_rms_norm_eps)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, out_features)

    def forward(self, hidden_states, conditioning):
        shift, scale = self.modulation(F.silu(conditioning)).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm(hidden_states), shift, scale))


class CheersDiTHead(nn.Module):
    """A stack of adaLN DiT blocks with its own RoPE and a final modulated projection."""

    def __init__(
        self,
        config: CheersConfig,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_key_value_heads: int,
        out_features: int,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [CheersDiTBlock(config, hidden_size, num_heads, num_key_value_heads) for _ in range(num_layers)]
        )
        self.final_layer = CheersDiTFinalLayer(config, hidden_size, out_features)
        self.rotary_emb = CheersHeadRotaryEmbedding(
            hidden_size // num_heads, config.head_rope_theta, config.round_rope_frequencies_to_compute_dtype
        )

    def forward(self, hidden_states, conditioning, position_ids):
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for block in self.blocks:
            hidden_states = block(hidden_states, conditioning, position_embeddings)
        return self.final_layer(hidden_states, conditioning)


class CheersDetailGate(nn.Module):
    """Injects SigLIP patch-embedding detail into the semantic head's output: LayerNorm(x + gate(x) * detail).

    The gate is an unbounded scalar per token (no sigmoid), as in the official model.
    """

    def __init__(self, config: CheersConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.layer_norm = nn.LayerNorm(width, eps=config.projector_layer_norm_eps)

    def forward(self, semantic_features, patch_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gate(semantic_features)
        return self.layer_norm(semantic_features + gate * patch_embeddings), gate


def merge_tokens(features: torch.Tensor, grid: tuple[int, int], merge_size: int) -> torch.Tensor:
    """(N, H*W, C) row-major tokens -> (N, H*W/m^2, m*m*C): each m x m block concatenated in (row, col, channel) order.

    This (pi, pj, c) order differs from torch's pixel_unshuffle (c, pi, pj); the checkpoint depends on it.
    """
    batch, _, channels = features.shape
    height, width = grid
    blocks = features.view(batch, height // merge_size, merge_size, width // merge_size, merge_size, channels)
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, (height // merge_size) * (width // merge_size), merge_size * merge_size * channels)


def split_tokens(features: torch.Tensor, grid: tuple[int, int], merge_size: int) -> torch.Tensor:
    """Exact inverse of `merge_tokens`: (N, H*W/m^2, m*m*C) -> (N, H*W, C)."""
    batch = features.shape[0]
    height, width = grid
    channels = features.shape[-1] // (merge_size * merge_size)
    blocks = features.view(batch, height // merge_size, width // merge_size, merge_size, merge_size, channels)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * width, channels)


def patchify_latents(latents: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C*ph*pw, H/ph, W/pw) with channel index c*ph*pw + pi*pw + pj (FLUX.2's layout)."""
    batch, channels, height, width = latents.shape
    ph, pw = patch_size
    latents = latents.view(batch, channels, height // ph, ph, width // pw, pw).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch, channels * ph * pw, height // ph, width // pw)


def unpatchify_latents(latents: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of `patchify_latents`."""
    batch, channels, height, width = latents.shape
    ph, pw = patch_size
    latents = latents.view(batch, channels // (ph * pw), ph, pw, height, width).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // (ph * pw), height * ph, width * pw)


class ProductSiLU(nn.Module):
    """x * sigmoid(x) as two rounded operations, like the FLUX.2 autoencoder code Cheers was trained with.

    `F.silu` rounds once; in bf16 the two differ enough to move the VAE's latents by ~1e-2 (relative).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class PointwiseConvolution(nn.Linear):
    """A diffusers attention projection applied as a 1x1 convolution to an (N, C, H, W) map, as the FLUX.2 code does.

    Same weights and names as the `nn.Linear` it replaces; being a module call, offload hooks still fire.
    """

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return F.conv2d(feature_map, self.weight[:, :, None, None], self.bias)


class ConvolutionalVAEAttnProcessor:
    """diffusers attention processor for the VAE's single-head spatial attention, computed like the FLUX.2 code
    (projections as 1x1 convolutions on the feature map, which the official bf16 numbers depend on)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, channels, height, width = hidden_states.shape
        normed = attn.group_norm(hidden_states)

        def tokens(feature_map):  # (N, C, H, W) -> (N, 1, H*W, C)
            return feature_map.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        query, key, value = (tokens(projection(normed)) for projection in (attn.to_q, attn.to_k, attn.to_v))
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return hidden_states + attn.to_out[0](attended)


def use_official_vae_kernels(module: nn.Module) -> None:
    """Make a diffusers VAE encoder/decoder compute its activations and attention as the official code does."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.SiLU):
                setattr(parent, name, ProductSiLU())
        if hasattr(parent, "set_processor") and getattr(parent, "group_norm", None) is not None:
            for projection in (parent.to_q, parent.to_k, parent.to_v, parent.to_out[0]):
                projection.__class__ = PointwiseConvolution
            parent.set_processor(ConvolutionalVAEAttnProcessor())


def denormalize_latents(latents: torch.Tensor, batch_norm: nn.BatchNorm2d) -> torch.Tensor:
    """Inverse of an eval-mode affine-free BatchNorm, computed in the latents' dtype (as the official model)."""
    std = torch.sqrt(batch_norm.running_var.to(latents.dtype).view(1, -1, 1, 1) + batch_norm.eps)
    return latents * std + batch_norm.running_mean.to(latents.dtype).view(1, -1, 1, 1)


class CheersDecoderProjector(nn.Module):
    """The second VAE decoder: normalised patchified latents (clean or noisy) -> pixels for SigLIP."""

    def __init__(self, config: CheersConfig):
        super().__init__()
        projector = config.decoder_projector_config
        self.patch_size = tuple(config.vae_config["patch_size"])
        latent_channels = projector["latent_channels"]
        # Its own statistics: they are stored separately from the VAE's and may differ.
        self.bn = nn.BatchNorm2d(
            latent_channels * self.patch_size[0] * self.patch_size[1],
            eps=config.vae_config["batch_norm_eps"],
            affine=False,
            track_running_stats=True,
        )
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=projector["out_channels"],
            up_block_types=("UpDecoderBlock2D",) * len(projector["block_out_channels"]),
            block_out_channels=tuple(projector["block_out_channels"]),
            layers_per_block=projector["layers_per_block"],
            norm_num_groups=projector["norm_num_groups"],
            act_fn="silu",
            mid_block_add_attention=True,
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = unpatchify_latents(denormalize_latents(latents, self.bn), self.patch_size)
        return self.decoder(self.post_quant_conv(latents))


class CheersMultiModalProjector(nn.Module):
    """LayerNorm on SigLIP tokens, merge each 2x2 block into one token, MLP to the LLM width."""

    def __init__(self, config: CheersConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        merged_width = vision_width * config.token_merge_size**2
        self.merge_size = config.token_merge_size
        self.layer_norm = nn.LayerNorm(vision_width, eps=config.projector_layer_norm_eps)
        self.linear_1 = nn.Linear(merged_width, merged_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(merged_width, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        vision_features = self.layer_norm(vision_features.to(self.layer_norm.weight.dtype))
        merged = merge_tokens(vision_features, grid, self.merge_size)
        return self.linear_2(self.act(self.linear_1(merged)))


class PrefixCacheLayer(DynamicLayer):
    """A cache layer over a fixed prefix: new keys/values are attended to in this call but never stored."""

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_view(cache: Cache) -> Cache:
    """A cache that attends to `cache`'s contents without growing it (no copy: the tensors are shared)."""
    layers = []
    for layer in cache.layers:
        view = PrefixCacheLayer()
        view.keys, view.values, view.device, view.is_initialized = layer.keys, layer.values, layer.keys.device, True
        layers.append(view)
    return Cache(layers=layers)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


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
    # BatchNorm statistics of the VAE and the decoder projector are tiny and precision-sensitive.
    _keep_in_fp32_modules = ["bn"]
    _keep_in_fp32_modules_strict = ["bn"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every saved folder also loads with trust_remote_code for people without this package: the code files are
        # copied by transformers (register_for_auto_class) and the auto_map names all the entry points.
        self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        self.vae = AutoencoderKLFlux2(**config.vae_config)
        self.vae_decoder_projector = CheersDecoderProjector(config)
        if config.official_vae_kernels:
            use_official_vae_kernels(self.vae)
            use_official_vae_kernels(self.vae_decoder_projector)
        self.vision_representation = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = CheersMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.language_model.rotary_emb = CheersTextRotaryEmbedding(
            config.text_config, config.round_rope_frequencies_to_compute_dtype
        )
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
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ---- VAE ------------------------------------------------------------------------------------------------------

    @property
    def latent_patch_size(self) -> tuple[int, int]:
        return tuple(self.config.vae_config["patch_size"])

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> normalised, patchified VAE latents (N, latent_channels, H/16, W/16).

        The posterior mean is used (no sampling). Cheers feeds [0, 1] pixels to the FLUX.2 VAE (not [-1, 1]).
        """
        self.check_image_size(pixel_values)
        moments = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        latents = patchify_latents(moments.mean, self.latent_patch_size)
        # The BatchNorm module itself, in eval mode, reproduces the official normalisation bit for bit.
        return F.batch_norm(
            latents, self.vae.bn.running_mean, self.vae.bn.running_var, training=False, eps=self.vae.bn.eps
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised, patchified latents -> pixels (nominally [0, 1], not clamped)."""
        latents = latents.to(self.vae.dtype)
        latents = unpatchify_latents(denormalize_latents(latents, self.vae.bn), self.latent_patch_size)
        return self.vae.decode(latents).sample

    def check_image_size(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision_config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (num_images, {self.config.vision_config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        multiple = self.config.image_size_multiple
        height, width = pixel_values.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of {multiple} (SigLIP patch x token merge); "
                f"resize the images, e.g. with CheersImageProcessor(resolution={self.config.vision_config.image_size})."
            )

    def check_image_grid(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> None:
        patch = self.config.vision_config.patch_size
        grid = [pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch]
        if image_grid_hw.shape[0] != pixel_values.shape[0] or bool(
            (image_grid_hw != image_grid_hw.new_tensor(grid)).any()
        ):
            raise ValueError(
                f"image_grid_hw {image_grid_hw.tolist()} does not describe pixel_values of shape "
                f"{tuple(pixel_values.shape)} (expected {grid} per image); pass both from the same processor call."
            )

    # ---- Vision tokenizer -----------------------------------------------------------------------------------------

    def tokenize_latents(self, latents: torch.Tensor, with_patch_embeddings: bool = False):
        """Noisy or clean latents -> decoder projector -> SigLIP -> merged LLM image tokens."""
        dtype = self.vae_decoder_projector.post_quant_conv.weight.dtype
        decoded_pixels = self.vae_decoder_projector(latents.to(dtype))
        height, width = decoded_pixels.shape[-2:]
        grid = (height // self.config.vision_config.patch_size, width // self.config.vision_config.patch_size)
        # Any size other than the native one needs interpolated position embeddings.
        interpolate = (height, width) != (self.config.vision_config.image_size,) * 2
        vision_dtype = self.vision_representation.dtype
        vision_outputs = self.vision_representation(
            decoded_pixels.to(vision_dtype), interpolate_pos_encoding=interpolate
        )
        patch_embeddings = None
        if with_patch_embeddings:
            patch_embeddings = self.vision_representation.embeddings(
                decoded_pixels.to(vision_dtype), interpolate_pos_encoding=interpolate
            )
        image_features = self.multi_modal_projector(vision_outputs.last_hidden_state, grid)
        return CheersVisionTokenizerOutput(
            image_features=image_features,
            decoded_pixels=decoded_pixels,
            vision_last_hidden_state=vision_outputs.last_hidden_state,
            patch_embeddings=patch_embeddings,
        )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_patch_embeddings: bool = False,
    ) -> CheersVisionTokenizerOutput:
        """The vision tokenizer on pixels: encode, optionally noise to time t, re-decode, SigLIP, merge.

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`): pixels in [0, 1].
            timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*): flow time per image (1 = clean, the
                default; 0 = pure noise). Understanding images use 1.
            noise (`torch.Tensor`, *optional*): x0 for the noisy path (drawn with `generator` when needed).
            with_patch_embeddings (`bool`): also return SigLIP's patch embeddings of the decoded pixels (the detail
                gate's input, needed to predict velocities).
        """
        with torch.no_grad():  # the VAE is frozen in every training stage
            latents = self.encode_latents(pixel_values)
        noisy_latents, targets = latents, torch.zeros_like(latents)
        if timesteps is not None and bool((timesteps < 1).any()):
            if noise is None:
                noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            t = timesteps.view(-1, 1, 1, 1)
            noisy_latents = (t * latents + (1 - t) * noise).to(latents.dtype)  # computed in t's dtype, as official
            targets = (latents - noise) * (t < 1).to(latents.dtype)
        outputs = self.tokenize_latents(noisy_latents, with_patch_embeddings=with_patch_embeddings)
        outputs.latents, outputs.noisy_latents, outputs.velocity_targets = latents, noisy_latents, targets
        return outputs

    # ---- Flow-matching head ----------------------------------------------------------------------------------------

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
            timesteps (`(N,)`): flow time of each image, used as given (round it to the compute dtype first to match
                the official sampler).
            patch_embeddings (`(N, grid_h * grid_w, vision_hidden)`): SigLIP patch embeddings of the decoded x_t.
            grid (`(grid_h, grid_w)`): the latent / SigLIP patch grid.
        """
        semantic_condition, detail_condition = self.time_embedder(timesteps)
        num_tokens = image_hidden_states.shape[1]
        positions = torch.arange(num_tokens, device=image_hidden_states.device)[None]
        semantic = self.semantic_head(image_hidden_states, semantic_condition, positions)
        semantic = split_tokens(semantic, grid, self.config.token_merge_size)  # (N, grid_h * grid_w, vision_hidden)
        detailed, gate = self.detail_gate(semantic, patch_embeddings.to(semantic.dtype))
        # Official quirk: the detail head's RoPE positions restart halfway through the grid (k mod L/2).
        length = detailed.shape[1]
        positions = (torch.arange(length, device=detailed.device) % max(length // 2, 1))[None]
        velocity = self.detail_head(detailed, detail_condition, positions)  # (N, grid_h * grid_w, C)
        velocity = velocity.transpose(1, 2).reshape(velocity.shape[0], -1, *grid)
        return CheersVelocityOutput(velocity=velocity, detail_gate=gate.view(gate.shape[0], *grid))

    def compute_velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        cache: Cache,
        attention_mask: torch.Tensor | None = None,
        store_in_cache: bool = False,
    ) -> CheersVelocityOutput:
        """One network evaluation of the sampler: velocity of `latents` (x_t) at time t given a prompt cache.

        The vision tokenizer runs once on x_t; if the cache holds several branches per image (e.g. conditional and
        unconditional prompts for classifier-free guidance, stacked as [branch 0 rows; branch 1 rows; ...]), the
        image tokens are shared by all of them. The image tokens attend to their prompt (padding excluded) and to each
        other bidirectionally; the prompt cache is left untouched unless `store_in_cache` (the official model keeps
        the tokens of its last evaluation before continuing the text).

        Args:
            latents (`(B, latent_channels, grid_h, grid_w)`): x_t in the normalised, patchified latent space.
            timesteps (`float` or `(B,)`): t in [0, 1]; rounded to the compute dtype as in the official sampler.
            cache (`Cache`): the prompt's key/values, batch `B * branches`.
            attention_mask (`(B * branches, prompt_length)`, *optional*): the prompt's padding mask.
        Returns:
            [`CheersVelocityOutput`] with a velocity (and detail-gate map) per cache row.
        """
        dtype = self.language_model.dtype
        rows = cache.layers[0].keys.shape[0]
        if rows % latents.shape[0]:
            raise ValueError(f"The cache holds {rows} rows, not a multiple of the {latents.shape[0]} latents.")
        branches = rows // latents.shape[0]
        grid = tuple(latents.shape[-2:])
        tokens = self.tokenize_latents(latents, with_patch_embeddings=True)
        image_features = tokens.image_features.repeat(branches, 1, 1)
        patch_embeddings = tokens.patch_embeddings.repeat(branches, 1, 1)
        hidden_states = self.image_hidden_states(image_features, cache, attention_mask, store_in_cache)
        timesteps = torch.as_tensor(timesteps, device=latents.device).to(dtype).reshape(-1)
        timesteps = timesteps.expand(rows) if timesteps.numel() == 1 else timesteps.repeat(branches)
        return self.predict_velocity(hidden_states, timesteps, patch_embeddings, grid)

    def image_hidden_states(self, image_features, cache, attention_mask, store_in_cache: bool) -> torch.Tensor:
        """Run an image block through the LLM after a cached prompt (positions continue each row's prompt)."""
        batch, num_tokens = image_features.shape[:2]
        past = cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past, dtype=torch.long, device=image_features.device)
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

    # ---- LLM ------------------------------------------------------------------------------------------------------

    def get_placeholder_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Positions whose embeddings come from images: understanding (`<image>`) and generation (`<image_gen>`)."""
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.image_gen_token_id)

    def image_block_ids(
        self, placeholder_mask: torch.BoolTensor, context_image_mask: torch.BoolTensor | None
    ) -> torch.LongTensor:
        """Id of the contiguous image block each token belongs to (-1 for text and context images).

        Tokens of one block attend to each other bidirectionally. Context images (the official dummy prefix) are
        plain causal, as in the official model.
        """
        blocks = placeholder_mask
        if context_image_mask is not None:
            blocks = blocks & ~context_image_mask.bool()
        starts = blocks & ~F.pad(blocks[:, :-1], (1, 0), value=False)
        return torch.where(blocks, starts.cumsum(-1) - 1, -1)

    def build_attention_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor,
        block_ids: torch.LongTensor | None,
    ):
        """The omni mask: causal, bidirectional inside image blocks, padding masked (any attention backend)."""
        text_config = self.language_model.config
        if block_ids is not None and cache is not None and (past := cache.get_seq_length()) > 0:
            block_ids = F.pad(block_ids, (past, 0), value=-1)
        if block_ids is not None and bool((block_ids < 0).all()):
            block_ids = None
        mask = create_causal_mask(
            config=text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            block_sequence_ids=block_ids,
        )
        return {"full_attention": mask}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_timesteps: torch.Tensor | None = None,
        context_image_mask: torch.BoolTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        **kwargs,
    ) -> CheersModelOutputWithPast:
        r"""
        image_timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            Flow time of each image in `pixel_values` (1 = clean, the default for understanding).
        context_image_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            True at the tokens of a context image (the official model's dummy image prefix), which attend causally
            instead of bidirectionally. Produced by `CheersProcessor(..., context_image=...)`.
        image_features (`torch.FloatTensor`, *optional*):
            Precomputed image embeddings (num_images, tokens_per_image, hidden) to use instead of `pixel_values`.
        image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            SigLIP patch grid of each image, as returned by the processor; checked against `pixel_values`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        placeholder_mask = self.get_placeholder_mask(input_ids) if input_ids is not None else None
        if pixel_values is not None and image_grid_hw is not None:
            self.check_image_grid(pixel_values, image_grid_hw)
        if pixel_values is not None and image_features is None:
            image_features = self.get_image_features(pixel_values, timesteps=image_timesteps).image_features
        if image_features is not None:
            if placeholder_mask is None:
                raise ValueError("Images need `input_ids` to locate their placeholder tokens.")
            inputs_embeds = self.insert_image_features(inputs_embeds, placeholder_mask, image_features)

        if position_ids is None:
            position_ids = self.default_position_ids(inputs_embeds, attention_mask, cache)
        block_ids = (
            self.image_block_ids(placeholder_mask, context_image_mask) if placeholder_mask is not None else None
        )
        mask_mapping = self.build_attention_mask(inputs_embeds, attention_mask, cache, position_ids, block_ids)

        outputs = self.language_model(
            attention_mask=mask_mapping,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return CheersModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )

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

    @staticmethod
    def default_position_ids(inputs_embeds, attention_mask, cache) -> torch.LongTensor:
        """Positions count real tokens only, so a left-padded prompt gets the same positions as the prompt alone."""
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if attention_mask is None or attention_mask.ndim != 2:
            return torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -length:].to(inputs_embeds.device)


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

    def get_image_features(self, pixel_values, **kwargs) -> CheersVisionTokenizerOutput:
        return self.model.get_image_features(pixel_values, **kwargs)

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
        image_timesteps: torch.Tensor | None = None,
        context_image_mask: torch.BoolTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        image_noise: torch.FloatTensor | None = None,
        image_loss_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> CheersCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Unshifted text targets, one per input token, -100 where there is none; image tokens must be -100 (or
            their own placeholder id). With labels the output holds the official training objective: `loss` =
            `text_loss` (next-token cross-entropy) + `image_loss` (flow-matching MSE at every image's tokens); see
            `transformers_cheers.training`. Build batches with `transformers_cheers.data.CheersTrainingCollator`.
        image_timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            Flow time t of each image (1 = clean, the default). Used as given: the official training rounds t to
            bf16 (its pixel dtype), which the collator reproduces.
        image_noise (`torch.FloatTensor` of shape `(num_images, latent_channels, grid_h, grid_w)`, *optional*):
            The noise x0 of x_t = t * x1 + (1 - t) * x0; drawn from the global RNG when omitted. Pass it (and the
            timesteps) for a reproducible training step.
        image_loss_mask (`torch.BoolTensor` of shape `(num_images,)`, *optional*):
            Which images count in `image_loss` (default: all, as the official training, which includes
            understanding images at t = 1 with target 0 and the text-only context image).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        placeholder_mask = None
        if labels is not None:
            placeholder_mask = self.model.get_placeholder_mask(input_ids) if input_ids is not None else None
            check_training_labels(labels, input_ids, placeholder_mask)  # before the expensive part
        vision = None
        if pixel_values is not None and (labels is not None or image_noise is not None):
            if kwargs.get("image_features") is not None:
                raise ValueError("Pass either pixel_values or image_features, not both.")
            if image_grid_hw is not None:
                self.model.check_image_grid(pixel_values, image_grid_hw)
            # one vision-tokenizer pass serves both the LLM inputs and the flow head (patch embeddings, targets)
            vision = self.model.get_image_features(
                pixel_values, timesteps=image_timesteps, noise=image_noise, with_patch_embeddings=labels is not None
            )
            kwargs["image_features"] = vision.image_features
        elif labels is not None and kwargs.get("image_features") is not None:
            raise ValueError(
                "Training with labels needs pixel_values (the image loss needs the latents and their targets), "
                "not precomputed image_features."
            )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_timesteps=image_timesteps,
            context_image_mask=context_image_mask,
            image_grid_hw=image_grid_hw,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None:
            logits_to_keep = 0  # the objective needs every position
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        losses = None
        if labels is not None:
            if placeholder_mask is not None and not bool(placeholder_mask.any()):
                placeholder_mask = None
            losses = compute_training_losses(
                self.model,
                hidden_states,
                logits,
                labels.to(hidden_states.device),
                placeholder_mask,
                vision=vision,
                image_timesteps=image_timesteps,
                image_loss_mask=image_loss_mask,
                num_items_in_batch=num_items_in_batch,
                attention_mask=attention_mask,
            )
        return CheersCausalLMOutputWithPast(
            loss=losses.loss if losses is not None else None,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
            text_loss=losses.text_loss if losses is not None else None,
            image_loss=losses.image_loss if losses is not None else None,
            image_velocities=losses.image_velocities if losses is not None else None,
            image_velocity_targets=losses.image_velocity_targets if losses is not None else None,
        )

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        # Image-only inputs matter for the prompt (prefill) only; later steps feed text tokens through the cache.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("image_timesteps", "context_image_mask", "image_features", "image_grid_hw"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)


CheersConfig.register_for_auto_class()
CheersModel.register_for_auto_class("AutoModel")
CheersForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CheersForConditionalGeneration", "CheersModel", "CheersPreTrainedModel"]
