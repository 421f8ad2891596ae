"""The official layout both ways: from_pretrained on an official folder or Hub repo (converted in memory), and
`convert_cheers_to_hf.py --to-official` (native -> official, e.g. to serve a fine-tuned model with vLLM).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fake_hub_snapshot, load_script
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.testing_utils import CaptureLogger

from transformers_cheers import CheersForConditionalGeneration, CheersModel, CheersProcessor
from transformers_cheers.conversion import (
    ConversionError,
    architecture,
    compare_outputs,
    convert_official_checkpoint,
    logits_and_velocity,
    tensor_fingerprints,
    verification_inputs,
)
from transformers_cheers.export_official import export_official_checkpoint
from transformers_cheers.official_checkpoint import (
    OFFICIAL_TEXT_DEFAULTS,
    OFFICIAL_VAE_DEFAULTS,
    OFFICIAL_VISION_DEFAULTS,
    config_from_official,
)
from transformers_cheers.official_checkpoint import logger as official_logger


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "conversion" / "convert_cheers_to_hf.py"
POOLING_HEAD = "model.vision_representation.head."


convert_cli = load_script(SCRIPT)


@pytest.fixture(scope="module")
def native(golden, tmp_path_factory):
    """The golden official checkpoint converted by the converter (bfloat16, as stored), without verification."""
    folder = tmp_path_factory.mktemp("native") / "cheers-hf"
    convert_official_checkpoint(golden.checkpoint, folder, dtype="bfloat16", verify=False)
    return folder


@pytest.fixture(scope="module")
def exported(native, tmp_path_factory):
    """`native` written back in the official layout by the CLI; returns (folder, printed report)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("exported") / "official"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = convert_cli.main(["--to-official", "--input", str(native), "--output", str(folder)])
    assert code == 0
    return folder, stdout.getvalue()


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name.startswith(f".{folder.name}."))


# --------------------------------------------------------------------------------------------------------------------
# from_pretrained on the official layout
# --------------------------------------------------------------------------------------------------------------------


def test_from_pretrained_on_an_official_folder_equals_the_converter_output(golden, native):
    before = sorted(path.name for path in golden.checkpoint.iterdir())
    with CaptureLogger(official_logger) as captured:
        model = CheersForConditionalGeneration.from_pretrained(golden.checkpoint)  # dtype "auto": torch_dtype
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1 and "converted in memory (nothing written)" in lines[0]
    assert f"python conversion/convert_cheers_to_hf.py --input {golden.checkpoint} --output" in lines[0]
    assert sorted(path.name for path in golden.checkpoint.iterdir()) == before
    assert model.dtype == torch.bfloat16 and not model.training

    reference = CheersForConditionalGeneration.from_pretrained(native)
    assert tensor_fingerprints(model) == tensor_fingerprints(reference)  # every tensor bit-identical (490)
    assert architecture(model.config) == architecture(reference.config)
    inputs = verification_inputs(model.config)
    numbers = compare_outputs(
        logits_and_velocity(model, inputs), logits_and_velocity(reference, inputs), torch.bfloat16
    )
    print(numbers)  # the same logits and velocity (max abs diff 0 on this machine)


def test_cheers_model_from_an_official_folder_is_the_base_model(golden, native):
    with CaptureLogger(official_logger):
        base = CheersModel.from_pretrained(golden.checkpoint, dtype=torch.float32)
    reference = CheersModel.from_pretrained(native, dtype=torch.float32)
    assert type(base) is CheersModel and base.dtype == torch.float32
    assert tensor_fingerprints(base) == tensor_fingerprints(reference)


def test_from_pretrained_on_an_official_hub_repo_through_the_offline_cache(golden, native, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    fake_hub_snapshot(cache, "AI9Stars/Cheers", golden.checkpoint)
    with CaptureLogger(official_logger) as captured:
        model = CheersForConditionalGeneration.from_pretrained("AI9Stars/Cheers", cache_dir=cache, revision="main")
    assert "--input AI9Stars/Cheers --output" in captured.out
    reference = CheersForConditionalGeneration.from_pretrained(native)
    assert tensor_fingerprints(model) == tensor_fingerprints(reference)


def test_arguments_the_in_memory_path_cannot_honour_say_convert_first(golden):
    with pytest.raises(ValueError, match=r"not \['device_map'\]\. Convert it once \(python conversion/convert"):
        CheersForConditionalGeneration.from_pretrained(golden.checkpoint, device_map="auto")


def test_a_broken_official_folder_gets_the_converter_error(golden, tmp_path):
    folder = tmp_path / "official"
    shutil.copytree(golden.checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.hi_gate.layer_norm.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.detail_gate.layer_norm.bias'\]"):
        CheersForConditionalGeneration.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# --to-official: the round trip
# --------------------------------------------------------------------------------------------------------------------


def test_export_round_trip_gives_the_official_tensors_bit_for_bit(golden, exported):
    folder, report = exported
    print(report)
    official, written = load_file(golden.checkpoint / "model.safetensors"), load_file(folder / "model.safetensors")
    assert sorted(written) == sorted(official)  # 501 tensors, lm_head and the pooling head included
    identical = [key for key in official if not key.startswith(POOLING_HEAD)]
    for key in identical:
        assert written[key].dtype == official[key].dtype and torch.equal(written[key], official[key]), key
    assert len(identical) == 490
    for key in set(official) - set(identical):  # no native counterpart: zeros of the official shape and dtype
        assert written[key].shape == official[key].shape and written[key].dtype == official[key].dtype
        assert not written[key].any(), key
    assert "501 written (499 bfloat16, 2 int64) from 489 native ones" in report
    assert "every native tensor bit for bit (489 tensors)" in report


# Fields of the release's config.json that no loader needs: the sliding window is off (use_sliding_window false),
# num_patches follows from image_size and patch_size, and the sub-config model_type and transformers_version are labels.
GOLDEN_ONLY_CONFIG_FIELDS = {
    "text_config": {"max_window_layers", "sliding_window"},
    "vision_representation_config": {"model_type", "num_patches"},
    "": {"transformers_version"},
}

OFFICIAL_DEFAULTS = {
    "text_config": OFFICIAL_TEXT_DEFAULTS,
    "vision_representation_config": OFFICIAL_VISION_DEFAULTS,
    "vae_encoder_config": OFFICIAL_VAE_DEFAULTS,
    "vae_decoder_config": OFFICIAL_VAE_DEFAULTS,
}


def test_export_round_trip_gives_the_official_config_fields(golden, exported):
    folder, _ = exported
    original = json.loads((golden.checkpoint / "config.json").read_text())
    written = json.loads((folder / "config.json").read_text())
    for section in ("", "text_config", "vision_representation_config", "vae_encoder_config", "vae_decoder_config"):
        ours, theirs = (written[section], original[section]) if section else (written, original)
        plain = {key for key, value in theirs.items() if not isinstance(value, dict)}
        assert {key: ours[key] for key in ours if key in plain} == {key: theirs[key] for key in plain if key in ours}
        assert plain - set(ours) == GOLDEN_ONLY_CONFIG_FIELDS.get(section, set()), section
        # written beyond the release's file: official fields at the official code's defaults (the release omits them)
        defaults = OFFICIAL_DEFAULTS.get(section, {})
        assert {key: ours[key] for key in set(ours) - set(theirs)} == {
            key: defaults.get(key) for key in set(ours) - set(theirs)
        }, section
    assert config_from_official(written).to_dict() == config_from_official(original).to_dict()


def test_export_writes_the_official_tokenizer_and_processor_files(golden, exported):
    folder, _ = exported
    assert json.loads((folder / "vocab.json").read_text()) == json.loads(
        (golden.checkpoint / "vocab.json").read_text()
    )
    assert (folder / "merges.txt").read_text() == (golden.checkpoint / "merges.txt").read_text()
    for name in ("preprocessor_config.json", "generation_config.json"):
        ours, theirs = (json.loads((path / name).read_text()) for path in (folder, golden.checkpoint))
        ours.pop("transformers_version", None), theirs.pop("transformers_version", None)
        assert ours == theirs, name
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())  # no code of this package

    text = "<|im_start|>user\n<im_start><image><im_end> What is this?<|im_end|>\n<|image_pad|>"
    ours, theirs = (CheersProcessor.from_official_checkpoint(path) for path in (folder, golden.checkpoint))
    assert ours.tokenizer(text).input_ids == theirs.tokenizer(text).input_ids
    assert ours.image_processor.to_dict() == theirs.image_processor.to_dict()
    # what vLLM calls; the official files lack the five Cheers tokens (its processor adds them), so none in this text
    auto_ours, auto_theirs = (AutoTokenizer.from_pretrained(path) for path in (folder, golden.checkpoint))
    text = "<|im_start|>user\nWhat is in <|vision_start|><|image_pad|><|vision_end|>?<|im_end|>"
    assert auto_ours(text).input_ids == auto_theirs(text).input_ids


def test_a_merged_lora_fine_tune_exports_and_loads_back(native, tmp_path):
    """The intended use: LoRA fine-tune, merge_and_unload, save_pretrained, --to-official, load the official folder."""
    from peft import LoraConfig, get_peft_model

    model = CheersForConditionalGeneration.from_pretrained(native, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)  # as if trained: the merge changes the weights
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    report = export_official_checkpoint(tmp_path / "merged", tmp_path / "official")
    assert "tokenizer and processor: none written" in report.format()
    with CaptureLogger(official_logger):
        loaded = CheersForConditionalGeneration.from_pretrained(tmp_path / "official")
    assert loaded.dtype == torch.float32
    assert tensor_fingerprints(loaded) == tensor_fingerprints(merged)


# --------------------------------------------------------------------------------------------------------------------
# --to-official: the contract of vLLM's Cheers loader
# --------------------------------------------------------------------------------------------------------------------

# What vLLM's Cheers model reads, from vllm-project/vllm vllm/model_executor/models/cheers.py at commit
# ac4277f67476373f64d37acbebe335a391928ef3 (same content at 06dc3c1187cee2ef05fba195fb0464a0f5600c50), with its
# config class vllm/transformers_utils/configs/cheers.py (model_type "umm") and its model registry entries.
VLLM_CHEERS = {
    "model_type": "umm",
    "architectures": {"Cheers", "CheersForConditionalGeneration"},  # registry keys -> models.cheers
    # config.json fields its modules are built from (the VAE ones fall back to the full-size release's defaults
    # when absent, which would be wrong for any other size, so they must be written)
    "config_fields": {
        "text_config": {
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
        },
        "vision_representation_config": {
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "layer_norm_eps",
            "hidden_act",
        },
        "vae_encoder_config": {"in_channels", "ch", "ch_mult", "num_res_blocks", "z_channels"},
        "vae_decoder_config": {"out_ch", "ch", "ch_mult", "num_res_blocks", "z_channels"},
    },
    "rope_theta": 1_000_000.0,  # forced onto text_config whatever the file says
    # load_weights: these are skipped (image generation is not served) ...
    "skip_prefixes": (
        "model.time_embed.",
        "model.gen_projector.",
        "model.hi_gate.",
        "model.hi_projector.",
        "model.vae_model.decoder.",
    ),
    # ... and every other tensor must start with a prefix of hf_to_vllm_mapper
    "mapper_prefixes": {
        "model.language_model.": "language_model.model.",
        "model.vision_representation.": "vision_representation.vision_model.",
        "model.und_projector.": "und_projector.",
        "model.vae_model.": "vae_model.",
        "model.vae_decoder_projector.": "vae_decoder_projector.",
        "lm_head.": "language_model.lm_head.",
    },
    "image_placeholder": "<|image_pad|>",
}


def vllm_vae_tensor_names(encoder: dict, decoder: dict) -> set[str]:
    """The tensors of vLLM's CheersVAEModel (encoder + bn) and CheersVAEDecoderProjector (decoder + bn), by its
    construction rules: BFL names, up levels numbered from the output side, 1x1-conv attention."""

    def resnet(prefix: str, channels_in: int, channels_out: int) -> set[str]:
        names = {
            f"{prefix}.{layer}.{kind}" for layer in ("norm1", "conv1", "norm2", "conv2") for kind in ("weight", "bias")
        }
        if channels_in != channels_out:
            names |= {f"{prefix}.nin_shortcut.weight", f"{prefix}.nin_shortcut.bias"}
        return names

    def middle(prefix: str, channels: int) -> set[str]:
        names = resnet(f"{prefix}.mid.block_1", channels, channels) | resnet(
            f"{prefix}.mid.block_2", channels, channels
        )
        return names | {
            f"{prefix}.mid.attn_1.{p}.{k}" for p in ("norm", "q", "k", "v", "proj_out") for k in ("weight", "bias")
        }

    def weight_and_bias(*prefixes: str) -> set[str]:
        return {f"{prefix}.{kind}" for prefix in prefixes for kind in ("weight", "bias")}

    bn = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    ch, mult, blocks = encoder["ch"], encoder["ch_mult"], encoder["num_res_blocks"]
    names = {f"model.vae_model.{name}" for name in bn}
    names |= weight_and_bias("model.vae_model.encoder.quant_conv", "model.vae_model.encoder.conv_in")
    channels = ch
    for level, factor in enumerate(mult):
        for block in range(blocks):
            names |= resnet(f"model.vae_model.encoder.down.{level}.block.{block}", channels, ch * factor)
            channels = ch * factor
        if level != len(mult) - 1:
            names |= weight_and_bias(f"model.vae_model.encoder.down.{level}.downsample.conv")
    names |= middle("model.vae_model.encoder", channels)
    names |= weight_and_bias("model.vae_model.encoder.norm_out", "model.vae_model.encoder.conv_out")

    prefix = "model.vae_decoder_projector.decoder"
    ch, mult, blocks = decoder["ch"], decoder["ch_mult"], decoder["num_res_blocks"]
    names |= {f"model.vae_decoder_projector.{name}" for name in bn}
    names |= weight_and_bias(
        f"{prefix}.post_quant_conv", f"{prefix}.conv_in", f"{prefix}.norm_out", f"{prefix}.conv_out"
    )
    channels = ch * mult[-1]
    names |= middle(prefix, channels)
    for level in reversed(range(len(mult))):
        for block in range(blocks + 1):
            names |= resnet(f"{prefix}.up.{level}.block.{block}", channels, ch * mult[level])
            channels = ch * mult[level]
        if level != 0:
            names |= weight_and_bias(f"{prefix}.up.{level}.upsample.conv")
    return names


def test_export_matches_the_vllm_cheers_loader_contract(exported):
    folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == VLLM_CHEERS["model_type"]
    assert set(config["architectures"]) & VLLM_CHEERS["architectures"]
    for section, fields in VLLM_CHEERS["config_fields"].items():
        assert fields <= set(config[section]), (section, fields - set(config[section]))
    assert config["text_config"]["rope_theta"] == VLLM_CHEERS["rope_theta"]
    assert config["torch_dtype"] == "bfloat16"  # what vLLM's dtype="auto" reads

    tensors = load_file(folder / "model.safetensors")
    served = {key: value for key, value in tensors.items() if not key.startswith(VLLM_CHEERS["skip_prefixes"])}
    assert all(key.startswith(tuple(VLLM_CHEERS["mapper_prefixes"])) for key in served), [
        key for key in served if not key.startswith(tuple(VLLM_CHEERS["mapper_prefixes"]))
    ]
    # the VAE tensors vLLM builds (encoder, decoder projector, both BatchNorms), by name, and nothing else there
    expected = vllm_vae_tensor_names(config["vae_encoder_config"], config["vae_decoder_config"])
    vae = {key for key in served if key.startswith(("model.vae_model.", "model.vae_decoder_projector."))}
    assert vae == expected, (sorted(vae - expected)[:5], sorted(expected - vae)[:5])
    for key in vae:
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            assert tensors[key].ndim == 4 and tensors[key].shape[2:] == (1, 1), key  # Conv2d 1x1
    # SigLIP with its pooling head (vision_use_head unset: vLLM builds it and needs its weights)
    head = {key.removeprefix(POOLING_HEAD) for key in served if key.startswith(POOLING_HEAD)}
    assert head == {
        "probe",
        "attention.in_proj_weight",
        "attention.in_proj_bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
        "layernorm.weight",
        "layernorm.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    }
    vision, text = config["vision_representation_config"], config["text_config"]
    merged = vision["hidden_size"] * 4  # vLLM's und_projector: 2x2 token merge, then the MLP
    assert tensors["model.und_projector.mlp.0.weight"].shape == (merged, merged)
    assert tensors["model.und_projector.mlp.2.weight"].shape == (text["hidden_size"], merged)
    layers = {int(key.split(".")[3]) for key in served if key.startswith("model.language_model.layers.")}
    assert layers == set(range(text["num_hidden_layers"]))
    assert tensors["lm_head.weight"].shape == (text["vocab_size"], text["hidden_size"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert VLLM_CHEERS["image_placeholder"] in tokenizer.get_vocab()


# --------------------------------------------------------------------------------------------------------------------
# --to-official: bad input, nothing left behind
# --------------------------------------------------------------------------------------------------------------------


def drop_a_weight(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.detail_gate.layer_norm.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def untie_the_head(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"] + 1
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def change_the_resize_mode(folder: Path) -> None:
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["resize_mode"] = "center_crop"
    (folder / "processor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (None, "is not a folder"),
        (drop_a_weight, r"do not match its config.json: missing \['model.detail_gate.layer_norm.bias'\]"),
        (untie_the_head, "lm_head.weight differs from the token embedding"),
        (change_the_resize_mode, r"sets \['resize_mode'\] differently from the official processor"),
    ],
)
def test_bad_native_input_exits_1_and_writes_nothing(native, tmp_path, capsys, fault, message):
    source = tmp_path / "native"
    if fault is not None:
        shutil.copytree(native, source)
        fault(source)
    output = tmp_path / "official"
    assert convert_cli.main(["--to-official", "--input", str(source), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert re.search(message, error), error
    assert not output.exists() and not leftovers(output)


def test_an_official_folder_is_not_exported_again(golden, tmp_path):
    with pytest.raises(ConversionError, match="already in the official layout"):
        export_official_checkpoint(golden.checkpoint, tmp_path / "official")


def test_failure_while_writing_keeps_the_previous_output(native, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    output = tmp_path / "official"
    output.mkdir()
    (output / "previous.txt").write_text("kept")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    code = convert_cli.main(["--to-official", "--input", str(native), "--output", str(output), "--overwrite"])
    assert code == 1 and "No space left on device; nothing was written" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["previous.txt"] and not leftovers(output)


@pytest.mark.parametrize("extra", [["--dtype", "float32"], ["--revision", "v1"], ["--no-verify"]])
def test_to_official_refuses_conversion_only_arguments(native, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--to-official", "--input", str(native), "--output", str(tmp_path / "o"), *extra])
    assert exit_info.value.code == 2 and "--to-official does not take" in capsys.readouterr().err


def test_a_configuration_without_official_form_is_refused_by_name(tmp_path):
    """The tiny demo model has its own token ids; the official format fixes them in code."""
    from transformers_cheers.tiny import tiny_cheers

    model, processor = tiny_cheers()
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ConversionError, match=r"no official form: .*cannot express \[.*'image_token_id'"):
        export_official_checkpoint(tmp_path / "tiny", tmp_path / "official")
    assert not (tmp_path / "official").exists() and not leftovers(tmp_path / "official")


def test_a_rope_theta_vllm_would_override_is_reported(native, tmp_path):
    source = tmp_path / "native"
    shutil.copytree(native, source)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["rope_parameters"]["rope_theta"] = 1e4
    (source / "config.json").write_text(json.dumps(config))
    report = export_official_checkpoint(source, tmp_path / "official").format()
    assert "note: text rope_theta is 10000; vLLM's Cheers loader replaces it with 1e+06" in report
    assert json.loads((tmp_path / "official" / "config.json").read_text())["text_config"]["rope_theta"] == 1e4
