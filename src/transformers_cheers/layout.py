# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""Tensor layouts shared by the vision tokenizer and the flow head (pure reshapes; the checkpoint depends on them)."""

import torch


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


__all__ = ["merge_tokens", "patchify_latents", "split_tokens", "unpatchify_latents"]
