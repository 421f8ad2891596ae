"""Named model sizes, as data. `tiny` is the embedded default of the demo and the tests (random weights, seconds on
a CPU); `bench-mid` is the mid-size benchmark model of the project (real vocabulary and widths of a small model);
`full` is the released model (Qwen2.5-1.5B, SigLIP2 so400m at 512 px, the FLUX.2 VAE), for `benchmarks/bench_gpu.py`."""

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
