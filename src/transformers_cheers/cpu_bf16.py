# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""bf16 convolutions on CPUs without native bf16 kernels (AVX2-only machines, many laptops and cloud CPUs).

There PyTorch runs a bf16 `conv2d` through its slow reference path: a 3x3, 128-channel convolution at 128x128 took
60 s instead of 0.3 s in fp32 on a 2-core AVX2 machine, which makes the VAE (and so every bf16 image path) unusable.
`FallbackBF16Conv2d` computes such a convolution in fp32 on the upcast values and rounds the result to bf16, as a
native bf16 kernel does (bf16 products are exact in fp32; only the fp32 accumulation order can differ). On GPUs and
on CPUs with native bf16 (AVX512-BF16, AMX) nothing changes.
"""

from functools import cache

import torch
from torch import nn


@cache
def cpu_has_native_bf16_kernels() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def preferred_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype to run Cheers in on `device`: bf16 where it is computed natively, else fp32.

    bf16 on CUDA devices that support it, and on CPUs with native bf16 kernels (AVX512-BF16, AMX); fp32 elsewhere.
    On an AVX2-only CPU a bf16 matmul runs through slow reference kernels: understanding one 128 px image took 262 s
    in bf16 against 3.7 s in fp32 on a 2-core AMD EPYC (issue 12), so bf16 there would be a silent 70x slowdown.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16_kernels() else torch.float32
    return torch.float32


class FallbackBF16Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same weights) that avoids PyTorch's slow bf16 CPU fallback; see the module docstring."""

    def _conv_forward(self, input, weight, bias):
        if input.dtype == torch.bfloat16 and input.device.type == "cpu" and not cpu_has_native_bf16_kernels():
            bias = None if bias is None else bias.float()
            return super()._conv_forward(input.float(), weight.float(), bias).to(torch.bfloat16)
        return super()._conv_forward(input, weight, bias)


def use_fallback_bf16_convolutions(module: nn.Module) -> nn.Module:
    """Swap the class of every plain `nn.Conv2d` in `module` (in place; parameters and names unchanged)."""
    for submodule in module.modules():
        if type(submodule) is nn.Conv2d:
            submodule.__class__ = FallbackBF16Conv2d
    return module


__all__ = ["FallbackBF16Conv2d", "cpu_has_native_bf16_kernels", "preferred_dtype", "use_fallback_bf16_convolutions"]
