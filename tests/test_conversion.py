"""The first converter: official layout -> native folder, parity of the converted weights, and its faults."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, assert_close_rel_l2, expand_official_ids, tolerance_for
from safetensors.torch import load_file, save_file

from transformers_cheers import CheersForConditionalGeneration
from transformers_cheers.conversion import ConversionError, convert_official_checkpoint


SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_cheers_to_hf.py"


@pytest.fixture
def official_copy(golden, tmp_path):
    """A writable copy of the golden official folder, and a helper to rewrite its tensors."""
    folder = tmp_path / "official"
    shutil.copytree(golden.checkpoint, folder)

    def rewrite(edit):
        path = folder / "model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    return folder, rewrite


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_converted_folder_reproduces_official_prefill(golden, tmp_path, precision):
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    output = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", dtype=dtype)
    model = CheersForConditionalGeneration.from_pretrained(output, dtype=PRECISIONS[precision]).eval()
    assert model.model.vae.bn.running_var.dtype == torch.float32
    inputs = golden.inputs("case2_understanding")
    ids, mask, _ = expand_official_ids(
        inputs["inputs/input_ids"][0], inputs["inputs/attention_mask"][0], 16, model.config.image_token_id, False
    )
    with torch.no_grad():
        hidden = model(
            input_ids=ids, attention_mask=mask, pixel_values=inputs["inputs/pixel_values"], output_hidden_states=True
        ).hidden_states[-1]
    name = "prefill/hidden_states"
    expected = golden.outputs("case2_understanding", precision)[name]
    assert_close_rel_l2(hidden, expected, tolerance_for(golden, "case2_understanding", name, precision), name)


def test_converted_folder_keeps_official_names_where_classes_match(golden, tmp_path):
    output = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", dtype="bfloat16")
    keys = set(load_file(output / "model.safetensors"))
    official = set(load_file(golden.checkpoint / "model.safetensors"))
    for prefix in ("model.language_model.", "model.vision_representation."):
        ours = {key for key in keys if key.startswith(prefix)}
        theirs = {key for key in official if key.startswith(prefix) and ".head." not in key}
        assert ours == theirs
    assert "lm_head.weight" not in keys  # tied
    assert not any(".head." in key for key in keys if key.startswith("model.vision_representation."))
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "cheers" and config["text_config"]["rope_parameters"]["rope_theta"] == 1e6


def test_cli_converts_and_refuses_existing_output(golden, tmp_path):
    output = tmp_path / "native"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--input", golden.checkpoint, "--output", output, "--dtype", "float32"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    again = subprocess.run(
        [sys.executable, SCRIPT, "--input", golden.checkpoint, "--output", output], capture_output=True, text=True
    )
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr
    bad_dtype = subprocess.run(
        [sys.executable, SCRIPT, "--input", golden.checkpoint, "--output", tmp_path / "x", "--dtype", "int8"],
        capture_output=True,
        text=True,
    )
    assert bad_dtype.returncode != 0 and "invalid choice: 'int8'" in bad_dtype.stderr


def assert_nothing_written(tmp_path):
    assert [p.name for p in tmp_path.iterdir() if p.name != "official"] == []


@pytest.mark.parametrize(
    "fault,message",
    [
        ("missing_folder", "is not a folder"),
        ("missing_config", "No config.json"),
        ("missing_weights", "No model.safetensors"),
        ("truncated_weights", "truncated or corrupt"),
        ("unexpected_key", "Unexpected tensor 'model.extra.weight'"),
        ("missing_key", "missing ['model.detail_gate.layer_norm.bias']"),
        ("wrong_shape", "model.multi_modal_projector.linear_2.bias: checkpoint shape (7,)"),
        ("untied_lm_head", "lm_head.weight differs from the token embedding"),
        ("wrong_model_type", "expected the official 'umm'"),
    ],
)
def test_faults_give_clear_errors_and_write_nothing(official_copy, tmp_path, fault, message):
    folder, rewrite = official_copy
    if fault == "missing_folder":
        folder = tmp_path / "nowhere"
    elif fault == "missing_config":
        (folder / "config.json").unlink()
    elif fault == "missing_weights":
        (folder / "model.safetensors").unlink()
    elif fault == "truncated_weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif fault == "unexpected_key":
        rewrite(lambda t: t.update({"model.extra.weight": torch.zeros(1)}))
    elif fault == "missing_key":
        rewrite(lambda t: t.pop("model.hi_gate.layer_norm.bias"))
    elif fault == "wrong_shape":
        rewrite(lambda t: t.update({"model.und_projector.mlp.2.bias": torch.zeros(7)}))
    elif fault == "untied_lm_head":
        rewrite(lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    elif fault == "wrong_model_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConversionError) as error:
        convert_official_checkpoint(folder, tmp_path / "native")
    assert message in str(error.value)
    assert_nothing_written(tmp_path)


def test_interrupted_write_leaves_nothing_and_keeps_previous_output(golden, tmp_path, monkeypatch):
    previous = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", dtype="float32")
    before = sorted(p.name for p in previous.iterdir())

    def explode(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing")

    monkeypatch.setattr("transformers_cheers.conversion.save_processor_if_available", explode)
    with pytest.raises(KeyboardInterrupt):
        convert_official_checkpoint(golden.checkpoint, tmp_path / "native", overwrite=True)
    assert sorted(p.name for p in previous.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["native"]
