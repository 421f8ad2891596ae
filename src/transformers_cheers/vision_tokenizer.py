# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""The trained modules of the vision tokenizer: the decoder projector (latents -> pixels for SigLIP) and the token merger.

The frozen VAE is diffusers' `AutoencoderKLFlux2` and SigLIP is transformers' `SiglipVisionModel`; `CheersModel`
chains them: pixels -> VAE latent -> [x_t] -> `CheersDecoderProjector` -> SigLIP -> `CheersMultiModalProjector`.
"""

import torch
from diffusers.models.autoencoders.vae import AutoencoderMixin, Decoder
from torch import nn

from .configuration_cheers import CheersConfig
from .layout import merge_tokens, unpatchify_latents


def denormalize_latents(latents: torch.Tensor, batch_norm: nn.BatchNorm2d) -> torch.Tensor:
    """Inverse of an eval-mode affine-free BatchNorm, computed in the latents' dtype (as the official model)."""
    std = torch.sqrt(batch_norm.running_var.to(latents.dtype).view(1, -1, 1, 1) + batch_norm.eps)
    return latents * std + batch_norm.running_mean.to(latents.dtype).view(1, -1, 1, 1)


class CheersDecoderProjector(nn.Module, AutoencoderMixin):
    """The second VAE decoder: normalised patchified latents (clean or noisy) -> pixels for SigLIP.

    It runs on every sampling step (on x_t) and its full-resolution activations are the peak memory of text-to-image
    generation, which grows with the batch. `enable_slicing()` (diffusers' autoencoder API, as on the VAE) decodes
    one image at a time, so the peak stays at the one-image level; like the VAE's slicing it is off by default.
    """

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
        self.use_slicing = False

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and latents.shape[0] > 1:
            return torch.cat([self.decode_pixels(latent) for latent in latents.split(1)])
        return self.decode_pixels(latents)

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
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


__all__ = ["CheersDecoderProjector", "CheersMultiModalProjector", "denormalize_latents"]
