# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""Bit-parity only: compute the diffusers VAE the way the FLUX.2 reference autoencoder rounds in bf16.

Nothing here changes a weight or an output beyond bf16 rounding noise; it exists so that bf16 outputs are identical to
the official implementation's (`CheersConfig.vae_unfused_kernels`, on by default). Two operations round differently:

* SiLU: the reference computes `x * sigmoid(x)` (two roundings); `F.silu` rounds once.
* the attention projections: the reference applies them as 1x1 convolutions on the (N, C, H, W) map, whose GEMM
  accumulates in another order than `nn.Linear` on (N, H*W, C) tokens.

Both are done by swapping module classes in place (same parameters, same names, still module calls so that
accelerate's offload hooks fire). The attention modules keep diffusers' own processors, so `set_attn_processor`,
`set_default_attn_processor` and `fuse_qkv_projections` work as usual (a fused projection is a plain `nn.Linear` and
rounds like diffusers).
"""

import torch
import torch.nn.functional as F
from torch import nn


class ProductSiLU(nn.SiLU):
    """SiLU as `x * sigmoid(x)`: two rounded operations, like the reference autoencoder code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(x)
        # Inference: the product overwrites the sigmoid (the same rounding: IEEE products commute), so one full-size
        # temporary fewer is alive; at 256 px that is 32 MiB of a decoder pass in fp32.
        return torch.sigmoid(x).mul_(x)


class ConvolutionOrderLinear(nn.Linear):
    """`nn.Linear` on (..., tokens, C) computed as a 1x1 convolution, i.e. with a convolution's accumulation order."""

    def convolve(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., tokens, C) -> the 1x1 convolution's (N, C_out, tokens) map."""
        length, channels = tokens.shape[-2:]
        feature_map = tokens.reshape(-1, length, channels).transpose(1, 2).unsqueeze(-1)  # (N, C, tokens, 1)
        return F.conv2d(feature_map, self.weight[:, :, None, None], self.bias).squeeze(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # contiguous tokens, as the reference feeds them to attention: SDPA rounds differently on strided bf16 inputs
        return self.convolve(tokens).transpose(1, 2).reshape(*tokens.shape[:-1], -1).contiguous()


class ConvolutionOrderOutputLinear(ConvolutionOrderLinear):
    """The output projection: its tokens are a view of the channels-first map, so that diffusers' processor turns
    them back into a contiguous (N, C, H, W) map, as the reference's convolution returns (a channels-last map would
    make the next GroupNorm round differently)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.convolve(tokens).transpose(1, 2).reshape(*tokens.shape[:-1], -1)


def use_unfused_vae_kernels(module: nn.Module) -> nn.Module:
    """Make a diffusers VAE encoder/decoder round like the reference code (see the module docstring). In place."""
    for submodule in module.modules():
        for name, child in submodule.named_children():
            if type(child) is nn.SiLU:
                setattr(submodule, name, ProductSiLU())
        if hasattr(submodule, "set_processor") and getattr(submodule, "group_norm", None) is not None:
            for projection in (submodule.to_q, submodule.to_k, submodule.to_v):
                if type(projection) is nn.Linear:
                    projection.__class__ = ConvolutionOrderLinear
            if type(submodule.to_out[0]) is nn.Linear:
                submodule.to_out[0].__class__ = ConvolutionOrderOutputLinear
    return module


__all__ = ["ConvolutionOrderLinear", "ConvolutionOrderOutputLinear", "ProductSiLU", "use_unfused_vae_kernels"]
