"""Reading checkpoints in the official Cheers layout (model_type "umm", remote code pinned to transformers 4.51).

One table (`NAME_RULES`, refined by `HEAD_RULES` and `VAE_BLOCK_RULES`) maps every official tensor name to ours (or drops it). The converter in
`conversion/convert_cheers_to_hf.py` and `load_official_checkpoint` both use it.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .configuration_cheers import CheersConfig


# One table in two parts. NAME_RULES: the first matching (regex, replacement) renames the whole key; None drops the
# tensor. VAE_BLOCK_RULES then rename the inside of both VAE decoders/encoders (BFL names -> diffusers names).
# `<REVERSED:N>` becomes `levels - 1 - N`: BFL numbers the decoder's up levels from the output side, diffusers from
# the input side.
NAME_RULES: list[tuple[str, str | None]] = [
    # LLM and vision tower: the reused transformers classes already use the official names.
    (r"^lm_head\.weight$", None),  # tied to the token embedding; checked equal before it is dropped
    (r"^model\.vision_representation\.head\..*", None),  # SigLIP pooling head: computed, never used officially
    (r"^model\.(language_model|vision_representation)\.", r"model.\1."),
    # Token merger + MLP ("und_projector").
    (r"^model\.und_projector\.layernorm\.", "model.multi_modal_projector.layer_norm."),
    (r"^model\.und_projector\.mlp\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.und_projector\.mlp\.2\.", "model.multi_modal_projector.linear_2."),
    # Time embedder: mlp_1 conditions the semantic head, mlp_2 the detail head.
    (r"^model\.time_embed\.mlp_1\.", "model.time_embedder.semantic_mlp."),
    (r"^model\.time_embed\.mlp_2\.", "model.time_embedder.detail_mlp."),
    # Flow-matching heads: gen_projector = semantic head, hi_gate = detail gate, hi_projector = detail head.
    (r"^model\.hi_gate\.", "model.detail_gate."),
    (r"^model\.gen_projector\.", "model.semantic_head."),
    (r"^model\.hi_projector\.", "model.detail_head."),
    # FLUX.2 VAE -> diffusers AutoencoderKLFlux2: the 1x1 convs around the latent live at the top level there.
    (r"^model\.vae_model\.encoder\.quant_conv\.", "model.vae.quant_conv."),
    (r"^model\.vae_model\.decoder\.post_quant_conv\.", "model.vae.post_quant_conv."),
    (r"^model\.vae_model\.", "model.vae."),
    (r"^model\.vae_decoder_projector\.decoder\.post_quant_conv\.", "model.vae_decoder_projector.post_quant_conv."),
    (r"^model\.vae_decoder_projector\.", "model.vae_decoder_projector."),
]
HEAD_RULES: list[tuple[str, str]] = [
    (r"\.diffusion_head_a\.(\d+)\.adaLN_modulation\.1\.", r".blocks.\1.modulation."),
    (r"\.diffusion_head_a\.(\d+)\.attn\.", r".blocks.\1.self_attn."),
    (r"\.diffusion_head_a\.", ".blocks."),
    (r"\.diffusion_head_b\.adaLN_modulation\.1\.", ".final_layer.modulation."),
    (r"\.diffusion_head_b\.norm_final\.", ".final_layer.norm."),
    (r"\.diffusion_head_b\.linear\.", ".final_layer.proj_out."),
]
VAE_BLOCK_RULES: list[tuple[str, str]] = [
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.encoder\.down\.(\d+)\.block\.(\d+)\.", r".encoder.down_blocks.\1.resnets.\2."),
    (r"\.encoder\.down\.(\d+)\.downsample\.conv\.", r".encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"\.decoder\.up\.(\d+)\.block\.(\d+)\.", r".decoder.up_blocks.<REVERSED:\1>.resnets.\2."),
    (r"\.decoder\.up\.(\d+)\.upsample\.conv\.", r".decoder.up_blocks.<REVERSED:\1>.upsamplers.0.conv."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]

# Official remote-code class defaults for fields its config.json leaves out (configuration_umm.py).
OFFICIAL_TEXT_DEFAULTS = {
    "vocab_size": 152064,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
OFFICIAL_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 256,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}
OFFICIAL_VAE_DEFAULTS = {
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 32,
}
_TEXT_KEYS = (*OFFICIAL_TEXT_DEFAULTS, "hidden_size", "intermediate_size", "num_attention_heads")
# The VAE has no config fields for these; they are constants of the FLUX.2 autoencoder and of Cheers' code.
FLUX2_GROUP_NORM_GROUPS = 32
FLUX2_BATCH_NORM_EPS = 1e-4
FLUX2_LATENT_PATCH = [2, 2]


class OfficialCheckpointError(ValueError):
    """The folder is not a complete, readable official Cheers checkpoint."""


def convert_official_key(key: str, num_up_blocks: int) -> str | None:
    """Native name of an official tensor, or None when the tensor is deliberately dropped."""
    for pattern, replacement in NAME_RULES:
        if re.search(pattern, key):
            break
    else:
        raise OfficialCheckpointError(f"Unexpected tensor {key!r}: not part of the official Cheers layout.")
    if replacement is None:
        return None
    new_key = re.sub(pattern, replacement, key)
    inner_rules = HEAD_RULES if new_key.startswith(("model.semantic_head.", "model.detail_head.")) else []
    if new_key.startswith(("model.vae.", "model.vae_decoder_projector.")):
        inner_rules = VAE_BLOCK_RULES
    for pattern, replacement in inner_rules:
        new_key = re.sub(pattern, replacement, new_key)
    return re.sub(r"<REVERSED:(\d+)>", lambda m: str(num_up_blocks - 1 - int(m.group(1))), new_key)


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor], config: CheersConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename (and reshape) official tensors to the native layout. Returns (native state dict, dropped keys)."""
    num_up_blocks = len(config.vae_config["block_out_channels"])
    converted, dropped = {}, []
    for key, tensor in state_dict.items():
        new_key = convert_official_key(key, num_up_blocks)
        if new_key is None:
            dropped.append(key)
            continue
        if ".mid_block.attentions.0.to_" in new_key and new_key.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # BFL's 1x1 convs are diffusers' linear projections
        converted[new_key] = tensor
    check_tied_embeddings(state_dict)
    return converted, dropped


def check_tied_embeddings(state_dict: dict[str, torch.Tensor]) -> None:
    head, embedding = state_dict.get("lm_head.weight"), state_dict.get("model.language_model.embed_tokens.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise OfficialCheckpointError(
            "lm_head.weight differs from the token embedding, but Cheers ties them; this checkpoint cannot be "
            "converted to a tied model without changing its outputs."
        )


def config_from_official(official: dict, **overrides) -> CheersConfig:
    """CheersConfig from an official config.json dict (class defaults of the remote code fill its gaps)."""
    for field in ("text_config", "vision_representation_config"):
        if field not in official:
            raise OfficialCheckpointError(f"config.json has no {field!r}: not an official Cheers (umm) config.")
    text = {**OFFICIAL_TEXT_DEFAULTS, **official["text_config"]}
    text = {key: text[key] for key in _TEXT_KEYS if key in text}
    vision = {**OFFICIAL_VISION_DEFAULTS, **official["vision_representation_config"]}
    vision = {key: vision[key] for key in OFFICIAL_VISION_DEFAULTS}
    vision["vision_use_head"] = False
    vae, projector = vae_configs_from_official(official.get("vae_encoder_config"), official.get("vae_decoder_config"))
    return CheersConfig(
        text_config=text, vision_config=vision, vae_config=vae, decoder_projector_config=projector, **overrides
    )


def vae_configs_from_official(encoder: dict | None, decoder: dict | None) -> tuple[dict, dict]:
    """(AutoencoderKLFlux2 kwargs, decoder-projector kwargs) from the official BFL-style VAE configs."""
    encoder = {**OFFICIAL_VAE_DEFAULTS, **(encoder or {})}
    decoder = {**OFFICIAL_VAE_DEFAULTS, **(decoder or {})}
    if decoder["num_res_blocks"] != encoder["num_res_blocks"]:
        raise OfficialCheckpointError("Encoder and decoder with different num_res_blocks are not supported.")
    vae = {
        "in_channels": encoder["in_channels"],
        "out_channels": decoder["out_ch"],
        "block_out_channels": [encoder["ch"] * m for m in encoder["ch_mult"]],
        "layers_per_block": encoder["num_res_blocks"],
        "latent_channels": encoder["z_channels"],
        "norm_num_groups": FLUX2_GROUP_NORM_GROUPS,
        "batch_norm_eps": FLUX2_BATCH_NORM_EPS,
        "patch_size": FLUX2_LATENT_PATCH,
    }
    decoder_channels = [decoder["ch"] * m for m in decoder["ch_mult"]]
    if decoder_channels != vae["block_out_channels"]:
        vae["decoder_block_out_channels"] = decoder_channels
    projector = {
        "out_channels": decoder["out_ch"],
        "block_out_channels": decoder_channels,
        "layers_per_block": decoder["num_res_blocks"],
        "latent_channels": decoder["z_channels"],
        "norm_num_groups": FLUX2_GROUP_NORM_GROUPS,
    }
    return vae, projector


def read_official_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an official folder (single file or sharded with an index); only safetensors are read."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise OfficialCheckpointError(f"No model.safetensors or model.safetensors.index.json in {folder}.")
    state_dict = {}
    for shard in shards:
        path = folder / shard
        if not path.exists():
            raise OfficialCheckpointError(f"Shard {shard} is listed in the index but missing from {folder}.")
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    state_dict[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise OfficialCheckpointError(f"Cannot read {path} (truncated or corrupt?): {error}") from error
    return state_dict


def read_official_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise OfficialCheckpointError(f"No config.json in {folder}.")
    official = json.loads(config_file.read_text())
    if official.get("model_type") != "umm":
        raise OfficialCheckpointError(
            f"{config_file} has model_type {official.get('model_type')!r}, expected the official 'umm'."
        )
    return official


def load_official_checkpoint(folder, dtype: torch.dtype = torch.float32, **config_overrides):
    """Build a native `CheersForConditionalGeneration` from an official-layout folder, strictly.

    Every official tensor must be mapped or deliberately dropped, and every native tensor filled.
    """
    from .modeling_cheers import CheersForConditionalGeneration

    folder = Path(folder)
    if not folder.is_dir():
        raise OfficialCheckpointError(f"{folder} is not a folder.")
    config = config_from_official(read_official_config(folder), **config_overrides)
    state_dict, _ = convert_official_state_dict(read_official_state_dict(folder), config)
    model = CheersForConditionalGeneration(config)
    expected = set(model.state_dict()) - {"lm_head.weight"}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"Checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in model.state_dict().items():
        if key in state_dict and state_dict[key].shape != tensor.shape:
            raise OfficialCheckpointError(
                f"{key}: checkpoint shape {tuple(state_dict[key].shape)} != model shape {tuple(tensor.shape)}"
            )
    model.load_state_dict(state_dict, strict=False)  # lm_head is tied, the only key not in the file
    model.tie_weights()
    model = model.to(dtype).eval()
    for module in model.modules():  # as from_pretrained does (_keep_in_fp32_modules_strict)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.float()
    return model
