"""Reading checkpoints in the official Cheers layout (model_type "umm", remote code pinned to transformers 4.51).

One table of name templates (`KEY_PREFIXES`, refined by `HEAD_RENAMES` and `VAE_BLOCK_RENAMES`), read in both
directions, maps every official tensor name to ours; `DROPPED_TENSORS` lists the ones dropped on purpose. ONE reader
uses it: `convert_official_folder`, behind both the converter (`conversion/convert_cheers_to_hf.py`) and
`load_official_checkpoint`. The way back (`native_to_official_state_dict`, `official_config`) writes a native model in
the official layout; the tests use it to build official checkpoints with configurations the golden one does not have.
"""

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.initialization import no_init_weights
from transformers.utils import logging

from .configuration_cheers import CheersConfig


logger = logging.get_logger(__name__)


# One table, read in both directions: (official, native) name templates. KEY_PREFIXES: the first prefix that matches
# renames the start of the whole key. HEAD_RENAMES (inside both flow heads) and VAE_BLOCK_RENAMES (inside both VAE
# decoders and the encoder: BFL names <-> diffusers names) then rename every part that matches, in order. In a
# template, `{i}`/`{j}` stand for a number kept as is, `{level}` for a decoder level, which BFL numbers from the output
# side and diffusers from the input side (`levels - 1 - N`, its own inverse), `{proj}` for q, k or v. Official
# tensors without a native counterpart are not in the table: DROPPED_TENSORS lists them with the reason.
KEY_PREFIXES: list[tuple[str, str]] = [
    # LLM and vision tower: the reused transformers classes already use the official names.
    ("model.language_model.", "model.language_model."),
    ("model.vision_representation.", "model.vision_representation."),
    # Token merger + MLP ("und_projector").
    ("model.und_projector.layernorm.", "model.multi_modal_projector.layer_norm."),
    ("model.und_projector.mlp.0.", "model.multi_modal_projector.linear_1."),
    ("model.und_projector.mlp.2.", "model.multi_modal_projector.linear_2."),
    # Time embedder: mlp_1 conditions the semantic head, mlp_2 the detail head.
    ("model.time_embed.mlp_1.", "model.time_embedder.semantic_mlp."),
    ("model.time_embed.mlp_2.", "model.time_embedder.detail_mlp."),
    # Flow-matching heads: gen_projector = semantic head, hi_gate = detail gate, hi_projector = detail head.
    ("model.hi_gate.", "model.detail_gate."),
    ("model.gen_projector.", "model.semantic_head."),
    ("model.hi_projector.", "model.detail_head."),
    # FLUX.2 VAE -> diffusers AutoencoderKLFlux2: the 1x1 convs around the latent live at the top level there.
    ("model.vae_model.encoder.quant_conv.", "model.vae.quant_conv."),
    ("model.vae_model.decoder.post_quant_conv.", "model.vae.post_quant_conv."),
    ("model.vae_model.", "model.vae."),
    ("model.vae_decoder_projector.decoder.post_quant_conv.", "model.vae_decoder_projector.post_quant_conv."),
    ("model.vae_decoder_projector.", "model.vae_decoder_projector."),
]
HEAD_RENAMES: list[tuple[str, str]] = [
    (".diffusion_head_a.{i}.adaLN_modulation.1.", ".blocks.{i}.modulation."),
    (".diffusion_head_a.{i}.attn.", ".blocks.{i}.self_attn."),
    (".diffusion_head_a.", ".blocks."),
    (".diffusion_head_b.adaLN_modulation.1.", ".final_layer.modulation."),
    (".diffusion_head_b.norm_final.", ".final_layer.norm."),
    (".diffusion_head_b.linear.", ".final_layer.proj_out."),
]
VAE_BLOCK_RENAMES: list[tuple[str, str]] = [
    (".norm_out.", ".conv_norm_out."),
    (".encoder.down.{i}.block.{j}.", ".encoder.down_blocks.{i}.resnets.{j}."),
    (".encoder.down.{i}.downsample.conv.", ".encoder.down_blocks.{i}.downsamplers.0.conv."),
    (".decoder.up.{level}.block.{j}.", ".decoder.up_blocks.{level}.resnets.{j}."),
    (".decoder.up.{level}.upsample.conv.", ".decoder.up_blocks.{level}.upsamplers.0.conv."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.{proj}.", ".mid_block.attentions.0.to_{proj}."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
]
# Which inner table applies, by the key's (official, native) prefix after KEY_PREFIXES.
HEAD_PREFIXES = (("model.gen_projector.", "model.hi_projector."), ("model.semantic_head.", "model.detail_head."))
VAE_PREFIXES = (("model.vae_model.", "model.vae_decoder_projector."), ("model.vae.", "model.vae_decoder_projector."))
_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "level": r"\d+", "proj": "q|k|v"}
OFFICIAL, NATIVE = 0, 1  # which side of a template pair a name is written in

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
# Why each dropped official tensor may go (the converter lists every dropped tensor with its reason).
DROPPED_TENSORS: dict[str, str] = {
    r"^lm_head\.weight$": "tied to model.language_model.embed_tokens.weight (see the lm_head line)",
    r"^model\.vision_representation\.head\.": "SigLIP pooling head: computed by the official model, never used",
}
# Floating dtypes an official tensor may be stored in (cast to the target dtype when converting).
OFFICIAL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EMBEDDING_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
_TEXT_KEYS = (*OFFICIAL_TEXT_DEFAULTS, "hidden_size", "intermediate_size", "num_attention_heads")
# The VAE has no config fields for these; they are constants of the FLUX.2 autoencoder and of Cheers' code.
FLUX2_GROUP_NORM_GROUPS = 32
FLUX2_BATCH_NORM_EPS = 1e-4
FLUX2_LATENT_PATCH = [2, 2]


class OfficialCheckpointError(ValueError):
    """The folder is not a complete, readable official Cheers checkpoint."""


def template_pattern(template: str) -> re.Pattern:
    """A name template as a regex: its text literally, each `{name}` as a named group."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(
            f"(?P<{part}>{_PLACEHOLDERS[part]})" if index % 2 else re.escape(part) for index, part in enumerate(parts)
        )
    )


def fill_template(template: str, match: re.Match, num_up_blocks: int) -> str:
    values = dict(match.groupdict())
    if "level" in values:
        values["level"] = str(num_up_blocks - 1 - int(values["level"]))
    return template.format(**values)


def rename_key(key: str, source: int, num_up_blocks: int) -> str | None:
    """`key` written on side `source` (OFFICIAL or NATIVE) renamed to the other side; None if no prefix matches."""
    target = 1 - source
    prefix = next((pair for pair in KEY_PREFIXES if key.startswith(pair[source])), None)
    if prefix is None:
        return None
    new_key = prefix[target] + key[len(prefix[source]) :]
    inner = []
    if new_key.startswith(HEAD_PREFIXES[target]):
        inner = HEAD_RENAMES
    elif new_key.startswith(VAE_PREFIXES[target]):
        inner = VAE_BLOCK_RENAMES
    for pair in inner:
        new_key = template_pattern(pair[source]).sub(
            lambda match: fill_template(pair[target], match, num_up_blocks), new_key
        )
    return new_key


def convert_official_key(key: str, num_up_blocks: int) -> str | None:
    """Native name of an official tensor, or None when the tensor is deliberately dropped (see DROPPED_TENSORS)."""
    if any(re.search(pattern, key) for pattern in DROPPED_TENSORS):
        return None
    new_key = rename_key(key, OFFICIAL, num_up_blocks)
    if new_key is None:
        raise OfficialCheckpointError(f"Unexpected tensor {key!r}: not part of the official Cheers layout.")
    return new_key


def drop_reason(key: str) -> str:
    """Why the official tensor `key` (one that `convert_official_key` drops) is not carried over."""
    return next(reason for pattern, reason in DROPPED_TENSORS.items() if re.search(pattern, key))


def convert_official_tensor(new_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Reshape an official tensor for its native slot (BFL's 1x1 attention convs are diffusers' linears)."""
    if ".mid_block.attentions.0.to_" in new_key and new_key.endswith(".weight") and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    return tensor


# The way back reads the same tables. The two dropped kinds: lm_head is written back as a copy of the embedding (the
# official file stores it); the SigLIP pooling head does not exist natively, so it is left out (the official code
# builds it but never uses it).
_OFFICIAL_CONV_ATTENTION = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def native_to_official_key(key: str, num_up_blocks: int) -> str:
    """Official name of a native tensor (inverse of `convert_official_key` for every tensor it keeps)."""
    new_key = rename_key(key, NATIVE, num_up_blocks)
    if new_key is None:
        raise OfficialCheckpointError(f"Native tensor {key!r} has no official name.")
    return new_key


def native_to_official_state_dict(
    state_dict: dict[str, torch.Tensor], config: CheersConfig
) -> dict[str, torch.Tensor]:
    """A native state dict in the official layout: the inverse of `convert_official_folder`'s renaming.

    Tensors are renamed (and the VAE attention's linears turned back into BFL's 1x1 convolutions as views), never
    cast. `lm_head.weight` is stored as the embedding, as the official file does; the SigLIP pooling head, which the
    native model does not have, is absent. Converting the result back gives `state_dict` bit for bit.
    """
    num_up_blocks = len(config.vae_config["block_out_channels"])
    official = {}
    for key, tensor in state_dict.items():
        if key == LM_HEAD_KEY:  # tied: written below as the embedding
            continue
        new_key = native_to_official_key(key, num_up_blocks)
        if new_key in official:
            raise OfficialCheckpointError(f"Two native tensors map to the official name {new_key!r}.")
        official[new_key] = tensor[:, :, None, None] if _OFFICIAL_CONV_ATTENTION.search(new_key) else tensor
    official[LM_HEAD_KEY] = state_dict[EMBEDDING_KEY].clone()  # its own copy: safetensors refuses shared tensors
    return official


def check_tied_embeddings(
    head: torch.Tensor | None, embedding: torch.Tensor | None, official_ties: bool = True
) -> str:
    """Decide what happens to a stored lm_head, as the official model would; returns a summary for the report.

    Cheers ties lm_head to the token embedding. A stored lm_head equal to the embedding is dropped. When the
    official config ties them (`text_config.tie_word_embeddings: true`, as released), transformers overwrites the
    stored head with the embedding when it loads the official model, so a differing copy is dropped too, and the
    report says so. If the official config does not tie them and the two differ, the official model would use its own
    head, which this tied model cannot reproduce: that is an error.
    """
    if head is None:
        return "absent from the checkpoint; tied to model.language_model.embed_tokens.weight"
    if embedding is None:
        return "present, but the checkpoint has no token embedding to compare it with"  # reported as missing
    if head.shape == embedding.shape and head.dtype == embedding.dtype and torch.equal(head, embedding):
        return (
            f"equal to model.language_model.embed_tokens.weight bit for bit ({tuple(head.shape)}, "
            f"{str(head.dtype).removeprefix('torch.')}): tied, not stored"
        )
    difference = (
        f"max abs diff {(head.float() - embedding.float()).abs().max().item():.3g}"
        if head.shape == embedding.shape
        else f"shapes {tuple(head.shape)} vs {tuple(embedding.shape)}"
    )
    if official_ties and head.shape == embedding.shape:
        return (
            f"DIFFERS from model.language_model.embed_tokens.weight ({difference}), but the official config ties "
            "them, so the official model replaces it with the embedding when it loads: dropped, tied"
        )
    raise OfficialCheckpointError(
        f"lm_head.weight differs from the token embedding ({difference}), and the official config does not tie "
        "them (text_config.tie_word_embeddings is false), but Cheers ties them; this checkpoint cannot be converted "
        "to a tied model without changing its outputs."
    )


def config_from_official(official: dict, **overrides) -> CheersConfig:
    """CheersConfig from an official config.json dict (class defaults of the remote code fill its gaps)."""
    for field_name in ("text_config", "vision_representation_config"):
        if field_name not in official:
            raise OfficialCheckpointError(f"config.json has no {field_name!r}: not an official Cheers (umm) config.")
    text = {**OFFICIAL_TEXT_DEFAULTS, **official["text_config"]}
    text = {key: text[key] for key in _TEXT_KEYS if key in text}
    vision = {**OFFICIAL_VISION_DEFAULTS, **official["vision_representation_config"]}
    vision = {key: vision[key] for key in OFFICIAL_VISION_DEFAULTS}
    vision["vision_use_head"] = False
    vae, projector = vae_configs_from_official(official.get("vae_encoder_config"), official.get("vae_decoder_config"))
    try:
        return CheersConfig(
            text_config=text, vision_config=vision, vae_config=vae, decoder_projector_config=projector, **overrides
        )
    except (TypeError, ValueError) as error:
        raise OfficialCheckpointError(f"config.json does not describe a valid Cheers model: {error}") from error


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


# What an official config.json names besides the sub-configs (copied from the release; the code is not shipped).
OFFICIAL_CONFIG_HEADER = {
    "architectures": ["Cheers"],
    "auto_map": {
        "AutoConfig": "configuration_umm.UMMConfig",
        "AutoModel": "modeling_umm.UMMModel",
        "AutoModelForCausalLM": "modeling_umm.Cheers",
    },
    "model_type": "umm",
}


def official_config(config: CheersConfig) -> dict:
    """The official config.json (model_type "umm") of a native config: the inverse of `config_from_official`.

    The official layout has fields only for the sub-models' sizes; everything else (head sizes, token ids, FLUX.2
    constants) is fixed in its code. A native config that sets any of those differently has no official form: the
    result is read back with `config_from_official` and must give the same config, otherwise this is an error.
    """
    text, vision = config.text_config, config.vision_config
    text_fields = [key for key in _TEXT_KEYS if key != "rope_theta"]
    official_text = {key: getattr(text, key) for key in text_fields}
    official_text["rope_theta"] = text.rope_parameters["rope_theta"]
    vae, projector = config.vae_config, config.decoder_projector_config
    official = {
        **OFFICIAL_CONFIG_HEADER,
        "text_config": official_text,
        "vision_representation_config": {key: getattr(vision, key) for key in OFFICIAL_VISION_DEFAULTS},
        "vae_encoder_config": {
            "resolution": vision.image_size,
            "in_channels": vae["in_channels"],
            **bfl_channels(vae["block_out_channels"]),
            "num_res_blocks": vae["layers_per_block"],
            "z_channels": vae["latent_channels"],
        },
        "vae_decoder_config": {
            "resolution": vision.image_size,
            "in_channels": vae["in_channels"],
            "out_ch": projector["out_channels"],
            **bfl_channels(projector["block_out_channels"]),
            "num_res_blocks": projector["layers_per_block"],
            "z_channels": projector["latent_channels"],
        },
    }
    check_official_config_round_trip(config, official)
    return official


def bfl_channels(block_out_channels: list[int]) -> dict:
    """BFL's (ch, ch_mult) for diffusers' block_out_channels (every level a multiple of the first)."""
    ch = block_out_channels[0]
    if any(channels % ch for channels in block_out_channels):
        raise OfficialCheckpointError(f"block_out_channels {block_out_channels} are not multiples of the first level.")
    return {"ch": ch, "ch_mult": [channels // ch for channels in block_out_channels]}


# Fields that are metadata, not architecture: they may differ after a round trip through the official config.
_CONFIG_METADATA = {"dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "auto_map"}


def check_official_config_round_trip(config: CheersConfig, official: dict) -> None:
    def architecture(cheers_config: CheersConfig) -> dict:
        # sub-configs carry metadata too (a model loaded with dtype=... records it in text_config and vision_config)
        def strip(fields: dict) -> dict:
            return {k: strip(v) if isinstance(v, dict) else v for k, v in fields.items() if k not in _CONFIG_METADATA}

        return strip(cheers_config.to_dict())

    expected, actual = architecture(config), architecture(config_from_official(official))
    differing = sorted(key for key in expected.keys() | actual.keys() if expected.get(key) != actual.get(key))
    if differing:
        raise OfficialCheckpointError(
            f"This configuration has no official form: the official config.json cannot express {differing} "
            "(the official code fixes them); use the official defaults for these fields."
        )


def write_official_config(config: CheersConfig, folder) -> Path:
    """Write `official_config(config)` as `folder`/config.json; returns its path."""
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(official_config(config), indent=2) + "\n")
    return path


def official_tensor_index(folder: Path) -> dict[str, str]:
    """{tensor name: shard file} of an official folder (one model.safetensors, or shards listed by an index).

    Reads only the safetensors headers. The index and the shards must agree: a listed shard that is absent or
    unreadable, a tensor the index places in a shard that lacks it, or a tensor stored in two shards is an error.
    Only safetensors are read (a folder with only pickled weights is refused).
    """
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise OfficialCheckpointError(f"{index_file} is not a valid safetensors index: {error}") from error
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        weight_map, shards = None, ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found only {', '.join(pickled)}: pickled weights are never read)" if pickled else ""
        raise OfficialCheckpointError(f"No model.safetensors or model.safetensors.index.json in {folder}{hint}.")
    located: dict[str, str] = {}
    for shard in shards:
        for key in shard_keys(folder, shard):
            if key in located:
                raise OfficialCheckpointError(f"Tensor {key!r} is stored in both {located[key]} and {shard}.")
            located[key] = shard
    if weight_map is not None:
        misplaced = sorted(key for key, shard in weight_map.items() if located.get(key) != shard)
        if misplaced:
            raise OfficialCheckpointError(
                f"The index places {len(misplaced)} tensor(s) in shards that do not hold them, e.g. {misplaced[0]!r} "
                f"in {weight_map[misplaced[0]]}."
            )
        unlisted = sorted(set(located) - set(weight_map))
        if unlisted:
            raise OfficialCheckpointError(f"Tensor {unlisted[0]!r} ({located[unlisted[0]]}) is not in the index.")
    return located


def shard_keys(folder: Path, shard: str) -> list[str]:
    path = folder / shard
    if not path.is_file():
        raise OfficialCheckpointError(f"Shard {shard} is listed in the index but missing from {folder}.")
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise OfficialCheckpointError(f"Cannot read {path} (truncated or corrupt?): {error}") from error


def iter_official_tensors(folder: Path, located: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `located` (see `official_tensor_index`), one shard open at a time."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in located.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        path = folder / shard
        try:
            with safe_open(path, framework="pt") as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise OfficialCheckpointError(f"Cannot read {path} (truncated or corrupt?): {error}") from error


def read_official_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise OfficialCheckpointError(f"No config.json in {folder}.")
    try:
        official = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise OfficialCheckpointError(f"{config_file} is not valid JSON: {error}") from error
    if official.get("model_type") != "umm":
        raise OfficialCheckpointError(
            f"{config_file} has model_type {official.get('model_type')!r}, expected the official 'umm'."
        )
    return official


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def native_tensor_specs(config: CheersConfig, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Every tensor a native checkpoint stores, with its shape and dtype (as from_pretrained(dtype=...) expects).

    Floating tensors are in `dtype` except the BatchNorm statistics (float32, `_keep_in_fp32_modules_strict`);
    `lm_head.weight` is tied to the token embedding and not stored. Built on the meta device: costs no memory.
    """
    from .modeling_cheers import CheersForConditionalGeneration

    with torch.device("meta"):
        model = CheersForConditionalGeneration(config)
    cast_like_from_pretrained(model, dtype)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {
        key: TensorSpec(tuple(tensor.shape), tensor.dtype)
        for key, tensor in model.state_dict().items()
        if key not in tied
    }


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_like_from_pretrained(model, dtype: torch.dtype):
    """`model.to(dtype)` with the BatchNorm modules kept in float32, as from_pretrained does."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.float()
    return model


@dataclass
class OfficialConversion:
    """The native tensors of an official folder, with what happened to every official tensor."""

    config: CheersConfig
    state_dict: dict[str, torch.Tensor]
    official_keys: list[str]
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> reason
    source_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of official tensors
    lm_head: str = ""


def convert_official_folder(
    folder, dtype: torch.dtype, progress: bool = False, **config_overrides
) -> OfficialConversion:
    """Read an official folder strictly and return its tensors in the native layout, cast to `dtype`.

    Every official tensor must be mapped or deliberately dropped (DROPPED_TENSORS), every native tensor filled
    exactly once, with the native shape; floating tensors must be stored in a floating dtype
    (OFFICIAL_FLOAT_DTYPES) and integer ones (BatchNorm's num_batches_tracked) in an integer dtype. Tensors are read
    one at a time (with a progress bar when `progress`) and cast as they arrive, so the peak memory is one copy of
    the model in `dtype`.
    """
    from huggingface_hub.utils import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise OfficialCheckpointError(f"{folder} is not a folder.")
    official = read_official_config(folder)
    config = config_from_official(official, **config_overrides)
    official_ties = bool(
        official["text_config"].get("tie_word_embeddings", OFFICIAL_TEXT_DEFAULTS["tie_word_embeddings"])
    )
    located = official_tensor_index(folder)
    specs = native_tensor_specs(config, dtype)
    num_up_blocks = len(config.vae_config["block_out_channels"])
    result = OfficialConversion(config=config, state_dict={}, official_keys=list(located))
    head = embedding = None
    tensors = iter_official_tensors(folder, located)
    for key, tensor in tqdm(
        tensors, total=len(located), desc="Converting tensors", unit="tensor", disable=not progress
    ):
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        result.source_dtypes[dtype_name] = result.source_dtypes.get(dtype_name, 0) + 1
        new_key = convert_official_key(key, num_up_blocks)
        if key == "lm_head.weight":
            head = tensor
        elif key == EMBEDDING_KEY:
            embedding = tensor
        if new_key is None:
            result.dropped[key] = drop_reason(key)
            continue
        if new_key not in specs:
            raise OfficialCheckpointError(
                f"Unexpected tensor {key!r} (native name {new_key!r}): the model described by config.json has no "
                "such tensor."
            )
        tensor = convert_official_tensor(new_key, tensor)
        check_official_tensor(key, new_key, tensor, specs[new_key])
        result.state_dict[new_key] = tensor.to(specs[new_key].dtype)
    missing = sorted(set(specs) - set(result.state_dict))
    if missing:
        shown = missing if len(missing) <= 5 else [*missing[:5], f"... {len(missing) - 5} more"]
        raise OfficialCheckpointError(f"Checkpoint does not match the model: missing {shown}")
    result.lm_head = check_tied_embeddings(head, embedding, official_ties)
    # the model's own order, so the output (and its sharding) does not depend on how the input was sharded
    result.state_dict = {key: result.state_dict[key] for key in specs}
    return result


def check_official_tensor(key: str, new_key: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
    if tuple(tensor.shape) != spec.shape:
        raise OfficialCheckpointError(
            f"{new_key}: checkpoint shape {tuple(tensor.shape)} != model shape {spec.shape} (official name {key!r})"
        )
    if spec.dtype.is_floating_point:
        ok = tensor.dtype in OFFICIAL_FLOAT_DTYPES
        expected = "a floating dtype (" + ", ".join(str(d).removeprefix("torch.") for d in OFFICIAL_FLOAT_DTYPES) + ")"
    else:
        ok = not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool
        expected = "an integer dtype"
    if not ok:
        raise OfficialCheckpointError(
            f"{key}: stored as {str(tensor.dtype).removeprefix('torch.')}, expected {expected}; the file is not an "
            "official Cheers checkpoint or was altered."
        )


def load_official_checkpoint(folder, dtype: torch.dtype = torch.float32, **config_overrides):
    """Build a native `CheersForConditionalGeneration` from an official-layout folder, strictly.

    Every official tensor must be mapped or deliberately dropped, and every native tensor filled (see
    `convert_official_folder`). The weights end up in `dtype`, the BatchNorm statistics in float32.
    """
    from .modeling_cheers import CheersForConditionalGeneration

    converted = convert_official_folder(folder, dtype, **config_overrides)
    # Every stored tensor is overwritten below: skip the random init and build the weights in `dtype` directly
    # (a real checkpoint would otherwise need an fp32 copy, ~9 GB, and a minute of initialisation).
    with no_init_weights(), default_dtype(dtype):
        model = CheersForConditionalGeneration(converted.config)
    cast_like_from_pretrained(model, dtype)
    model.load_state_dict(with_tied_head(converted.state_dict), strict=True)
    model.tie_weights()
    return model.eval()


def with_tied_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` plus the tied lm_head (the embedding itself), so that a strict load accepts it.

    The native files do not store the head (it is the embedding); naming it explicitly lets `load_state_dict` run
    strictly, so any other missing or unexpected tensor is an error instead of a silently random weight.
    """
    return {**state_dict, LM_HEAD_KEY: state_dict[EMBEDDING_KEY]}


# --------------------------------------------------------------------------------------------------------------------
# from_pretrained on an official folder or Hub repo: converted in memory (the hook in modeling_cheers.py)
# --------------------------------------------------------------------------------------------------------------------

CONVERTER_COMMAND = "python conversion/convert_cheers_to_hf.py --input {source} --output cheers-hf"
# The from_pretrained arguments the in-memory path honours; the Hub ones go to hf_hub_download/snapshot_download.
OFFICIAL_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
OFFICIAL_LOAD_KWARGS = ("dtype", "torch_dtype", *OFFICIAL_HUB_KWARGS)


def is_official_checkpoint(source, **hub_kwargs) -> bool:
    """Whether `source` (folder or Hub id) has a config.json with the official model_type "umm".

    Only config.json is read (from the Hub cache, or downloaded when online). Anything that goes wrong here (no such
    repo, offline, no config.json) answers False: the regular from_pretrained then reports it in its own words.
    """
    from transformers.utils import cached_file

    if source is None:
        return False
    try:
        path = cached_file(
            str(source),
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: value for key, value in hub_kwargs.items() if key in OFFICIAL_HUB_KWARGS},
        )
        return path is not None and json.loads(Path(path).read_text()).get("model_type") == "umm"
    except Exception:  # noqa: BLE001 - any failure: not recognisably official; from_pretrained explains
        return False


def load_official_pretrained(model_class, source, model_args: tuple, kwargs: dict):
    """`model_class.from_pretrained(source)` for an official folder or Hub id: converted in memory, nothing written.

    The same reader and checks as the converter (`load_official_checkpoint`). `dtype` works as in from_pretrained
    ("auto" or absent: the official config's torch_dtype); the Hub arguments in OFFICIAL_HUB_KWARGS are honoured.
    Anything else (device_map, quantization, ...) needs the converted folder, and says so. A `CheersModel` (or any
    class that is not the full model) gets the base model of the converted full model.
    """
    from .modeling_cheers import CheersForConditionalGeneration

    command = CONVERTER_COMMAND.format(source=source)
    unsupported = sorted(key for key in kwargs if key not in OFFICIAL_LOAD_KWARGS)
    if model_args or unsupported:
        shown = unsupported or ["positional model arguments"]
        raise ValueError(
            f"{source} is an official Cheers checkpoint (model_type 'umm'), which from_pretrained converts in memory "
            f"with dtype and the Hub arguments only, not {shown}. Convert it once ({command}), then call "
            "from_pretrained('cheers-hf', ...) with these arguments."
        )
    folder = official_folder(source, {key: kwargs[key] for key in OFFICIAL_HUB_KWARGS if key in kwargs})
    dtype = official_load_dtype(folder, kwargs.get("dtype", kwargs.get("torch_dtype")))
    model = load_official_checkpoint(folder, dtype)
    logger.warning(
        f"{source} is in the official Cheers layout: converted in memory (nothing written). For repeated use, "
        f"convert it once: {command}"
    )
    if issubclass(model_class, CheersForConditionalGeneration):
        return model
    return model.model


def official_folder(source, hub_kwargs: dict) -> Path:
    """The local folder of an official checkpoint: `source` itself, or its Hub snapshot (weights, configs, text)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    from .conversion import HUB_ALLOW_PATTERNS

    return Path(snapshot_download(str(source), allow_patterns=HUB_ALLOW_PATTERNS, **hub_kwargs))


def official_load_dtype(folder: Path, dtype) -> torch.dtype:
    """from_pretrained's dtype for an official folder: "auto" (or None) reads its config's torch_dtype."""
    if dtype is None or dtype == "auto":
        dtype = read_official_config(folder).get("torch_dtype", "float32")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, its name or 'auto'; got {dtype!r}.")
    return dtype
