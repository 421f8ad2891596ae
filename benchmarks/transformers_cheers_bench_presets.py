"""Official-layout (umm) configs matching `transformers_cheers.presets`, for running the official code side by side.

Kept free of transformers_cheers imports: it is imported by the official-side benchmark process, which runs under
transformers 4.51.3 where our package cannot be imported.
"""

import json
from pathlib import Path


BENCH_CONFIG = (
    Path(__file__).resolve().parent / "bench_config.json"
)  # the bench-mid configuration and the official timings

# The official code sizes its detail head output by the VAE decoder `ch` (128 in the real model), so the official-side
# tiny model keeps ch 128 (like the golden fixtures); it is bigger than our own "tiny" preset.
TINY = {
    "vae_encoder_config": {"ch": 128, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "vae_decoder_config": {"ch": 128, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32, "out_ch": 3},
    "vision_representation_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 16,
    },
    "text_config": {
        "vocab_size": 151680,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
}


def official_config(preset: str) -> dict:
    if preset == "tiny":
        return TINY
    if preset == "bench-mid":
        return json.loads(BENCH_CONFIG.read_text())["config.json"]
    raise ValueError(f"No official config for preset {preset!r}")
