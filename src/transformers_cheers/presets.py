"""Named model sizes, as data. `tiny` is the random-weight model of the tests (seconds on a CPU); `shapes` is the
Cheers-Shapes model trained from scratch on 64 px synthetic shapes (`docs/shapes.md`; its vocabulary size and token
ids come from the tokenizer trained on the data); `bench-mid` is the mid-size benchmark model of the project (real
vocabulary and widths of a small model); `full` is the released model (Qwen2.5-1.5B, SigLIP2 so400m at 512 px, the
FLUX.2 VAE), for `benchmarks/bench_gpu.py`."""

from .configuration_cheers import CheersConfig


PRESETS: dict[str, dict] = {
    # The CheersConfig defaults are the released model: `config_from_official` of the official release's
    # Training/cheers_config/config.json gives exactly them (tests/test_bench_gpu.py checks it), so nothing to override.
    "full": {},
    "tiny": {
        "text_config": {
            "vocab_size": 151680,  # covers the Cheers special tokens (151665-151669) of the real tokenizer
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
        },
        "vae_config": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
        "semantic_head_num_layers": 2,
        "detail_head_num_layers": 1,
    },
    "shapes": {
        # 64 px images, 8 px patches: an 8x8 SigLIP / latent grid, 2x2-merged into 16 LLM tokens per image.
        "text_config": {
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        },
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        # 3 levels (4x down) + the 2x2 patchify = 8 px, SigLIP's patch; 4 channels -> 16 latent channels. Few
        # channels at full resolution: there the convolutions dominate the CPU time of a training step.
        "vae_config": {
            "block_out_channels": [8, 16, 32],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4,
        },
        "time_embedding_dim": 64,
        "semantic_head_num_layers": 2,
        "detail_head_num_layers": 2,
        # diffusers' fused SiLU / attention: faster on a CPU; the unfused kernels only matter for official bf16 parity
        "vae_unfused_kernels": False,
    },
    "bench-mid": {
        "text_config": {
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        },
        "vision_config": {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "image_size": 256,
        },
    },
}


def preset_config(name: str, **overrides) -> CheersConfig:
    """A CheersConfig for a named size; keyword arguments override top-level fields."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return CheersConfig(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "preset_config"]
