# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""The cascaded flow-matching head of Cheers: LLM hidden states of an image's tokens -> latent velocity.

semantic head (adaLN DiT blocks at the LLM width on the merged tokens) -> split each token back into its 2x2 SigLIP
patches -> detail gate (adds SigLIP patch-embedding detail of x_t) -> detail head (adaLN DiT blocks at the vision
width) -> velocity in the normalised, patchified latent space. Both heads are conditioned on t by one time embedder.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb, eager_attention_forward

from .configuration_cheers import CheersConfig


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


def detail_head_positions(tokens: torch.Tensor) -> torch.LongTensor:
    """RoPE positions of the detail head: k mod (L / 2) for its L tokens, i.e. restarting halfway through the grid.

    This is how the official head was trained (its weights depend on it), not a mistake to fix here.
    """
    length = tokens.shape[1]
    return (torch.arange(length, device=tokens.device) % max(length // 2, 1))[None]


__all__ = [
    "CheersDetailGate",
    "CheersDiTBlock",
    "CheersDiTFinalLayer",
    "CheersDiTHead",
    "CheersHeadRotaryEmbedding",
    "CheersTimestepEmbedder",
    "detail_head_positions",
    "rope_cos_sin",
]
