# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""Cheers model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Qwen2.5-1.5B as used by Cheers. Every field is written out: the official config.json omits
# `rope_theta` (1e6) and the layer count, and transformers' own Qwen2 defaults differ (rope_theta 1e4).
DEFAULT_TEXT_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
}

# SigLIP2 so400m-patch16-512 in the fixed-resolution (SiglipVisionModel) layout. The pooling head is
# never used by Cheers, so it is not built.
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 512,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}

# diffusers `AutoencoderKLFlux2` arguments: the FLUX.2 autoencoder (frozen in Cheers).
DEFAULT_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}

# The second, trained VAE decoder that turns (noisy) latents back into pixels for SigLIP.
# Keys follow diffusers' `Decoder`; missing keys are taken from `vae_config`.
DECODER_PROJECTOR_KEYS = (
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
)


def _with_defaults(config: dict, defaults: dict) -> dict:
    merged = {**defaults, **config}
    if "rope_theta" in config:  # legacy spelling: it must win over the default rope_parameters
        merged["rope_parameters"] = {"rope_type": "default", "rope_theta": merged.pop("rope_theta")}
    return merged


@strict
class CheersConfig(PreTrainedConfig):
    r"""
    Configuration of a Cheers model: a Qwen2 language model, a SigLIP vision encoder, the FLUX.2 VAE, a second VAE
    decoder (the "decoder projector") and the cascaded flow-matching head (semantic head, detail gate, detail head).

    text_config (`dict` or `Qwen2Config`, *optional*):
        The language model. Defaults to Qwen2.5-1.5B with `rope_theta=1e6`.
    vision_config (`dict` or `SiglipVisionConfig`, *optional*):
        The vision encoder. Defaults to SigLIP2 so400m-patch16-512. Its `image_size` is the native resolution.
    vae_config (`dict`, *optional*):
        Arguments of diffusers' `AutoencoderKLFlux2` (latent channels, 2x2 patch, BatchNorm eps).
    decoder_projector_config (`dict`, *optional*):
        Arguments of the decoder projector (`block_out_channels`, `layers_per_block`, `latent_channels`,
        `norm_num_groups`, `out_channels`); anything left out is taken from `vae_config`.
    token_merge_size (`int`, *optional*, defaults to 2):
        Side of the block of SigLIP tokens merged into one LLM token (2 -> 4x fewer tokens).
    time_embedding_dim (`int`, *optional*, defaults to 256):
        Size of the sinusoidal embedding of the flow-matching time t.
    semantic_head_num_layers (`int`, *optional*, defaults to 7):
        adaLN DiT blocks of the semantic head (runs at the LLM width on merged tokens).
    detail_head_num_layers (`int`, *optional*, defaults to 3):
        adaLN DiT blocks of the detail head (runs at the vision width on SigLIP-grid tokens).
    semantic_head_num_attention_heads, semantic_head_num_key_value_heads (`int`, *optional*):
        Default to the text config's heads.
    detail_head_num_attention_heads (`int`, *optional*):
        Defaults to the vision config's heads.
    detail_head_num_key_value_heads (`int`, *optional*):
        Defaults to the TEXT config's key-value heads, as in the official model.
    head_mlp_ratio (`int`, *optional*, defaults to 4):
        Hidden size of the heads' SwiGLU MLP, as a multiple of their width.
    head_rope_theta (`float`, *optional*, defaults to 10000.0):
        RoPE base of the heads' attention.
    head_rms_norm_eps (`float`, *optional*, defaults to 1e-6):
        Epsilon of the heads' RMSNorms.
    projector_layer_norm_eps (`float`, *optional*, defaults to 1e-5):
        Epsilon of the LayerNorms of the token merger and of the detail gate.
    round_rope_frequencies_to_compute_dtype (`bool`, *optional*, defaults to `True`):
        Round the RoPE frequency tables (LLM and heads) to the activation dtype before use, as happens in the official
        model (trained and evaluated after a blanket `.to(torch.bfloat16)`, which rounds the `inv_freq` buffers).
        Without it bf16 logits drift from the official ones at long positions.
    vae_unfused_kernels (`bool`, *optional*, defaults to `True`):
        Compute the VAE's SiLU as `x * sigmoid(x)` and its attention projections as 1x1 convolutions (same weights,
        diffusers' attention processors kept; see `vae_numerics.py`). Bit-parity only: this is how the official
        FLUX.2 autoencoder code rounds in bf16, ~1e-2 (relative) away from diffusers' fused kernels. Called
        `official_vae_kernels` in earlier versions (still accepted).
    image_token_id, image_gen_token_id, image_start_token_id, image_end_token_id, null_token_id (`int`):
        `<image>` (understanding image placeholder), `<image_gen>` (generation-target placeholder used in training),
        `<im_start>`, `<im_end>`, and `<no_mean>` (the null token of classifier-free guidance).

    Example:

    ```python
    >>> from transformers_cheers import CheersConfig, CheersForConditionalGeneration
    >>> config = CheersConfig()
    >>> config.text_config.rope_parameters["rope_theta"], config.num_image_tokens, config.latent_channels
    (1000000.0, 256, 128)
    ```
    """

    # Our own model_type: the official "umm" belongs to the remote-code classes, whose config layout
    # (vae_encoder_config / vae_decoder_config in BFL terms, no token ids) differs from this one. Registering
    # "cheers" keeps AutoConfig from confusing the two; the converter turns "umm" folders into "cheers" ones.
    model_type = "cheers"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=DEFAULT_TEXT_CONFIG),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=DEFAULT_VISION_CONFIG
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    decoder_projector_config: dict | None = None
    token_merge_size: int = 2
    time_embedding_dim: int = 256
    time_embedding_max_period: float = 10000.0
    semantic_head_num_layers: int = 7
    semantic_head_num_attention_heads: int | None = None
    semantic_head_num_key_value_heads: int | None = None
    detail_head_num_layers: int = 3
    detail_head_num_attention_heads: int | None = None
    detail_head_num_key_value_heads: int | None = None
    head_mlp_ratio: int = 4
    head_rope_theta: float = 10000.0
    head_rms_norm_eps: float = 1e-6
    projector_layer_norm_eps: float = 1e-5
    round_rope_frequencies_to_compute_dtype: bool = True
    vae_unfused_kernels: bool = True
    image_token_id: int = 151665
    image_gen_token_id: int = 151666
    image_start_token_id: int = 151667
    image_end_token_id: int = 151668
    null_token_id: int = 151669
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = 151643
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if "official_vae_kernels" in kwargs:  # the name of this switch in configs saved by version 0.1
            self.vae_unfused_kernels = kwargs.pop("official_vae_kernels")
        # A partial dict (e.g. a tiny test model) keeps the Cheers defaults for everything it does not set;
        # transformers would otherwise fill the gaps with stock Qwen2/SigLIP defaults (rope_theta 1e4!).
        if isinstance(self.text_config, dict):
            self.text_config = _with_defaults(self.text_config, DEFAULT_TEXT_CONFIG)
        if isinstance(self.vision_config, dict):
            self.vision_config = _with_defaults(self.vision_config, DEFAULT_VISION_CONFIG)
        super().__post_init__(**kwargs)
        self.vae_config = {**DEFAULT_VAE_CONFIG, **(self.vae_config or {})}
        num_blocks = len(self.vae_config["block_out_channels"])  # one down/up block per level, whatever the depth
        self.vae_config.setdefault("down_block_types", ["DownEncoderBlock2D"] * num_blocks)
        self.vae_config.setdefault("up_block_types", ["UpDecoderBlock2D"] * num_blocks)
        projector = {key: self.vae_config[key] for key in DECODER_PROJECTOR_KEYS}
        self.decoder_projector_config = {**projector, **(self.decoder_projector_config or {})}
        if self.semantic_head_num_attention_heads is None:
            self.semantic_head_num_attention_heads = self.text_config.num_attention_heads
        if self.semantic_head_num_key_value_heads is None:
            self.semantic_head_num_key_value_heads = self.text_config.num_key_value_heads
        if self.detail_head_num_attention_heads is None:
            self.detail_head_num_attention_heads = self.vision_config.num_attention_heads
        if self.detail_head_num_key_value_heads is None:
            self.detail_head_num_key_value_heads = self.text_config.num_key_value_heads
        self._validate_geometry()

    def _validate_geometry(self):
        vae_downsample = 2 ** (len(self.vae_config["block_out_channels"]) - 1) * self.vae_config["patch_size"][0]
        if vae_downsample != self.vision_config.patch_size:
            raise ValueError(
                f"The VAE maps {vae_downsample}x{vae_downsample} pixels to one patchified latent but SigLIP's patch is "
                f"{self.vision_config.patch_size}; Cheers needs both grids to coincide (adjust vae_config or patch_size)."
            )
        if self.vision_config.image_size % self.image_size_multiple:
            raise ValueError(
                f"vision_config.image_size={self.vision_config.image_size} must be a multiple of "
                f"{self.image_size_multiple} (patch_size x token_merge_size)."
            )
        for name, width, heads in (
            ("semantic", self.text_config.hidden_size, self.semantic_head_num_attention_heads),
            ("detail", self.vision_config.hidden_size, self.detail_head_num_attention_heads),
        ):
            if width % heads:
                raise ValueError(f"The {name} head width {width} is not divisible by its {heads} attention heads.")

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified, BatchNorm-normalised VAE latent (the space the sampler works in)."""
        patch_height, patch_width = self.vae_config["patch_size"]
        return self.vae_config["latent_channels"] * patch_height * patch_width

    @property
    def image_size_multiple(self) -> int:
        """Image sides must be multiples of this (one LLM token covers this many pixels per side)."""
        return self.vision_config.patch_size * self.token_merge_size

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens for one image at the native resolution."""
        return (self.vision_config.image_size // self.image_size_multiple) ** 2


__all__ = ["CheersConfig"]
