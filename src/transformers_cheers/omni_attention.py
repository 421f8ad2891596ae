# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""How image tokens attend inside the LLM: image blocks (bidirectional within an image) and a read-only prompt cache."""

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.cache_utils import DynamicLayer


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


def image_block_ids(placeholder_mask: torch.BoolTensor, tokens_per_image: int | None) -> torch.LongTensor:
    """Id of the image each token belongs to (-1 for text): tokens of one image attend to each other bidirectionally.

    A run of placeholder tokens is split into images of `tokens_per_image` tokens, so two images with nothing between
    them are still two blocks (the processor refuses such prompts; precomputed inputs may still hold them).
    """
    starts = placeholder_mask & ~F.pad(placeholder_mask[:, :-1], (1, 0), value=False)
    if tokens_per_image:
        positions = torch.arange(placeholder_mask.shape[1], device=placeholder_mask.device)
        run_start = torch.cummax(torch.where(starts, positions, -1), dim=-1).values
        offset = positions - run_start
        starts = starts | (placeholder_mask & (offset % tokens_per_image == 0))
    return torch.where(placeholder_mask, starts.long().cumsum(-1) - 1, -1)


__all__ = ["PrefixCacheLayer", "image_block_ids", "read_only_view"]
