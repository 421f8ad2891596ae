"""The converter: official layout -> native folder. Report, parity, the three ways to load, on-disk contract, faults.

One CLI conversion of the golden checkpoint (module fixture, in a subprocess) is shared by most tests.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, assert_close_rel_l2, expand_official_ids, load_script, tolerance_for
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from transformers_cheers import CheersConfig, CheersForConditionalGeneration
from transformers_cheers.conversion import (
    FLOAT32_REORDERING_ULPS,
    ROUNDING_FLIP_ULPS,
    ConversionError,
    VerificationError,
    compare_outputs,
    convert_official_checkpoint,
    logits_and_velocity,
    max_abs_diff,
    output_tolerance,
    tensor_fingerprints,
    verification_inputs,
)
from transformers_cheers.official_checkpoint import (
    DROPPED_TENSORS,
    OfficialCheckpointError,
    convert_official_folder,
    load_official_checkpoint,
    native_to_official_state_dict,
    official_config,
    write_official_config,
)


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "conversion" / "convert_cheers_to_hf.py"
SHARD_SIZE = "20MB"  # the golden model is ~30 MB in bf16 -> 2 shards
# What the remote-code files may import: these packages and the standard library.
ALLOWED_IMPORTS = {"transformers", "diffusers", "torch", "PIL", "numpy", "huggingface_hub"}


convert_cli = load_script(SCRIPT)


# What the `converted` fixture's conversion asked of the system temp dir (filled by the fixture).
SYSTEM_TEMP_USE: dict[str, list] = {}


@contextlib.contextmanager
def watched_system_temp_dir(folder: Path):
    """Point the system temp dir (tempfile and $TMPDIR) at `folder` and record every caller that asks for it."""
    import tempfile
    import traceback

    folder.mkdir()
    callers = []

    def gettempdir():
        callers.append("".join(traceback.format_stack(limit=6)))
        return str(folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setattr(tempfile, "tempdir", str(folder))
        patch.setattr(tempfile, "gettempdir", gettempdir)
        yield callers


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    """The golden official checkpoint converted by the CLI (bf16, 2 shards, verification on; the folder is also a
    diffusers pipeline), with the system temp dir watched. Returns (folder, printed report).
    """
    root = tmp_path_factory.mktemp("converted")
    output = root / "cheers-hf"
    stdout, stderr = io.StringIO(), io.StringIO()
    args = ["--input", golden.checkpoint, "--output", output, "--max-shard-size", SHARD_SIZE, "--quiet"]
    with watched_system_temp_dir(root.parent / f"{root.name}-system-temp") as callers:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = convert_cli.main([str(arg) for arg in args])
    system_temp = root.parent / f"{root.name}-system-temp"
    files = [str(path) for path in system_temp.rglob("*") if not is_empty_torch_cache_dir(path)]
    SYSTEM_TEMP_USE.update(callers=callers, files=files)
    assert code == 0, stderr.getvalue()[-3000:]
    return output, stdout.getvalue()


@pytest.fixture(scope="module")
def sharded_official(golden, tmp_path_factory):
    """The golden official checkpoint split into 3 shards with an index (the layout of the real release)."""
    folder = tmp_path_factory.mktemp("sharded") / "official"
    shutil.copytree(golden.checkpoint, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    split_into_shards(load_file(golden.checkpoint / "model.safetensors"), folder, 3)
    return folder


@pytest.fixture(scope="module")
def reference(converted):
    """The converted folder loaded natively in bf16, the verification inputs and its (logits, velocity)."""
    model = CheersForConditionalGeneration.from_pretrained(converted[0], dtype=torch.bfloat16).eval()
    inputs = verification_inputs(model.config)
    return model, inputs, logits_and_velocity(model, inputs)


def split_into_shards(tensors: dict, folder: Path, count: int) -> None:
    keys = list(tensors)
    weight_map = {}
    for index in range(count):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        part = {key: tensors[key] for key in keys[index::count]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


def stored_tensors(folder: Path) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, safetensors dtype)} from the headers of every shard of a folder."""
    result = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                result[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return result


# --------------------------------------------------------------------------------------------------------------------
# The report, the written folder and the on-disk contract
# --------------------------------------------------------------------------------------------------------------------


def test_cli_report_on_the_golden_checkpoint(converted, golden):
    folder, report = converted
    official = load_file(golden.checkpoint / "model.safetensors")
    head_keys = sorted(key for key in official if key.startswith("model.vision_representation.head."))
    assert (
        f"official tensors: {len(official)} read (499 bfloat16, 2 int64): {len(official) - 12} mapped, 12 dropped"
        in (report)
    )
    for key in ["lm_head.weight", *head_keys]:
        assert f"dropped {key}: " in report
    assert len(head_keys) == 11
    assert "lm_head: equal to model.language_model.embed_tokens.weight bit for bit" in report
    assert "2 shard(s)" in report and "model-00001-of-00002.safetensors" in report
    assert "kept in float32: model.vae.bn.running_mean, model.vae.bn.running_var, " in report
    assert "temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05" in report
    verification = re.search(
        r"verification \(bfloat16, (.*)\): 490 tensors bit-identical, config equal; (.*): OK", report
    )
    assert verification, report
    assert (
        verification.group(1) == "converted folder vs the same weights loaded from the official layout by this package"
    )
    errors = [float(value) for value in re.findall(r"relative L2 ([0-9.e+-]+)", verification.group(2))]
    assert len(errors) == 3 and errors[2] == pytest.approx(output_tolerance(torch.bfloat16), rel=1e-2)
    assert max(errors[:2]) <= errors[2]
    assert (
        "diffusers: model_index.json, pipeline code and scheduler_config.json written (image max abs diff 0)" in report
    )
    assert sorted(path.name for path in folder.parent.iterdir()) == ["cheers-hf"]  # no staging left


def test_written_folder_contents(converted):
    folder, _ = converted
    names = sorted(path.name for path in folder.iterdir())
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "configuration_cheers.py",
        "modeling_cheers.py",
        "processing_cheers.py",
        "image_processing_cheers.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model_index.json",
        "scheduler_config.json",
        "diffusers_pipeline.py",
        "pipeline_cheers.py",
    }
    assert expected <= set(names)
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    extra = set(names) - expected
    assert all(name.endswith(".py") for name in extra), (
        extra
    )  # modules imported by modeling_cheers.py / pipeline_cheers.py
    for shard in folder.glob("*.safetensors"):
        assert shard.stat().st_size <= 20_000_000 + 100_000  # max shard size + header
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")} == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
    }
    assert generation["eos_token_id"] == [151645, 151643]


def test_on_disk_contract(converted, golden):
    """What other loaders may rely on, read from the files themselves (not through our classes)."""
    folder, _ = converted
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cheers" and config["architectures"] == ["CheersForConditionalGeneration"]
    assert config["auto_map"]["AutoConfig"] == "configuration_cheers.CheersConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_cheers.CheersModel"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_cheers.CheersForConditionalGeneration"
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert {"text_config", "vision_config", "vae_config", "decoder_projector_config"} <= set(config)
    assert (
        config["text_config"]["model_type"] == "qwen2"
        and config["vision_config"]["model_type"] == "siglip_vision_model"
    )
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    assert config["vae_config"]["latent_channels"] == 32 and config["vae_config"]["patch_size"] == [2, 2]
    ids = {
        name: config[f"{name}_id"] for name in ("image_token", "image_start_token", "image_end_token", "null_token")
    }
    assert ids == {"image_token": 151665, "image_start_token": 151667, "image_end_token": 151668, "null_token": 151669}
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"] == "processing_cheers.CheersProcessor"
    assert (
        processor["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "image_processing_cheers.CheersImageProcessor"
    )

    stored = stored_tensors(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)
    official = load_file(golden.checkpoint / "model.safetensors")
    for prefix in ("model.language_model.", "model.vision_representation."):  # official names unchanged
        ours = {key for key in stored if key.startswith(prefix)}
        assert ours == {key for key in official if key.startswith(prefix) and ".head." not in key}
    assert "lm_head.weight" not in stored  # tied
    assert "model.vae.decoder.up_blocks.0.resnets.0.conv1.weight" in stored  # diffusers names for the VAE
    for key, (shape, dtype) in stored.items():
        if key.endswith(("bn.running_mean", "bn.running_var")):
            assert dtype == "F32", key
        elif key.endswith("num_batches_tracked"):
            assert dtype == "I64", key
        else:
            assert dtype == "BF16", key


def test_code_files_are_self_contained(converted):
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    folder, _ = converted
    for code in folder.glob("*.py"):
        for relative in get_relative_import_files(str(code)):
            assert Path(relative).parent == folder
        outside = {name for name in get_imports(str(code)) if name not in sys.stdlib_module_names}
        assert outside <= ALLOWED_IMPORTS, (code.name, outside - ALLOWED_IMPORTS)
        assert not re.search(r"^\s*(from|import)\s+transformers_cheers", code.read_text(), re.MULTILINE), code.name


# --------------------------------------------------------------------------------------------------------------------
# Loading: natively, with trust_remote_code, with device_map
# --------------------------------------------------------------------------------------------------------------------


def test_loads_natively_as_the_unconverted_model(reference, golden_models):
    """from_pretrained gives the model load_official_checkpoint builds from the official folder, tensor for tensor
    (their logits and velocity are compared in the converter's verification, see the report test)."""
    model, _, _ = reference
    assert model.model.vae.bn.running_var.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tensor_fingerprints(model) == tensor_fingerprints(golden_models("bf16"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_converted_folder_reproduces_official_prefill(golden, converted, tmp_path, precision):
    if precision == "bf16":
        output = converted[0]
    else:
        output = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", dtype="float32", verify=False)
        output = output.output_dir
    model = CheersForConditionalGeneration.from_pretrained(output, dtype=PRECISIONS[precision]).eval()
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


WITHOUT_THE_PACKAGE = """
import json, sys, torch
from PIL import Image
from safetensors.torch import load_file
sys.modules["transformers_cheers"] = None  # importing our package fails from here on
from diffusers import DiffusionPipeline
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

folder, io, prompt_text, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
expected = load_file(f"{io}/expected.safetensors")
diffs = {}

# 2b. transformers with trust_remote_code: processor, image processor, base model, model with the LM head
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules.")
assert type(image_processor).__name__ == "CheersImageProcessor"
messages = json.loads(open(f"{io}/messages.json").read())
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
batch = processor(images=[Image.open(f"{io}/image.png")], text=prompt)
for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_hw"):
    assert torch.equal(batch[key], expected[f"processed/{key}"]), key

inputs = {key: expected[key] for key in ("input_ids", "attention_mask", "pixel_values")}
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
assert type(model).__module__.startswith("transformers_modules.") and type(model).__name__ == "CheersModel"
lm = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
assert type(lm).__name__ == "CheersForConditionalGeneration"
assert lm.lm_head.weight.data_ptr() == lm.model.language_model.embed_tokens.weight.data_ptr()  # tied
lm_state = lm.model.state_dict()
assert all(torch.equal(tensor, lm_state[name]) for name, tensor in model.state_dict().items())
with torch.no_grad():
    out = model(**inputs, use_cache=True)
    velocity = model.compute_velocity(expected["latents"], expected["timestep"], out.cache, inputs["attention_mask"])
    logits = lm.lm_head(out.last_hidden_state)  # = lm(**inputs).logits: the same weights, checked above
diffs["logits"] = (logits.float() - expected["logits"]).abs().max().item()
diffs["velocity"] = (velocity.velocity.float() - expected["velocity"]).abs().max().item()
del model, lm

# 2c. diffusers with trust_remote_code: the same folder, same image as the native pipeline for a fixed seed
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
for component in (pipe, pipe.model, pipe.processor, pipe.scheduler):
    assert not type(component).__module__.startswith("transformers_cheers"), type(component)
assert type(pipe).__name__ == "CheersPipeline" and pipe.model.dtype == torch.bfloat16
pipe.set_progress_bar_config(disable=True)
kwargs = {"num_inference_steps": steps, "height": 64, "width": 64, "output_type": "pt"}
image = pipe(prompt_text, generator=torch.manual_seed(7), **kwargs).images
diffs["image"] = (image.float() - expected["image"]).abs().max().item()
print(diffs)
assert max(diffs.values()) == 0, diffs
"""
PROMPT, STEPS = "A red apple on a wooden table.", 2


def test_loads_with_remote_code_and_as_a_diffusers_pipeline_without_the_package(converted, reference, tmp_path):
    """In a fresh process where transformers_cheers is unimportable: AutoModel / AutoModelForImageTextToText /
    AutoProcessor / AutoImageProcessor and DiffusionPipeline from the converted folder, all with trust_remote_code,
    give exactly what the package gives."""
    from PIL import Image

    from transformers_cheers import CheersFlowMatchScheduler, CheersPipeline, CheersProcessor

    folder, _ = converted
    model, inputs, (logits, velocity) = reference
    processor = CheersProcessor.from_pretrained(folder)
    Image.new("RGB", (96, 64), (200, 30, 60)).save(tmp_path / "image.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    (tmp_path / "messages.json").write_text(json.dumps(messages))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    processed = processor(images=[Image.open(tmp_path / "image.png")], text=prompt)
    prompt_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        kwargs = {"num_inference_steps": STEPS, "height": 64, "width": 64, "output_type": "pt"}
        image = pipe(PROMPT, generator=torch.manual_seed(7), **kwargs).images
    expected = {
        **prompt_inputs,
        "latents": inputs["latents"].to(torch.bfloat16),
        "timestep": inputs["timestep"],
        **{f"processed/{key}": value for key, value in processed.items()},
        "velocity": velocity,
        "logits": logits,
        "image": image.float(),
    }
    save_file({key: value.contiguous() for key, value in expected.items()}, tmp_path / "expected.safetensors")

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_pipeline", "CheersPipeline"]
    assert index["model"] == ["cheers_repo_components", "CheersForConditionalGeneration"]
    assert not any(path.is_dir() for path in folder.iterdir())  # every component loads from the root
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_PACKAGE, folder, tmp_path, PROMPT, str(STEPS)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "{'logits': 0.0, 'velocity': 0.0, 'image': 0.0}" in run.stdout


def module_sizes(model) -> dict[str, int]:
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model)


def assert_no_split_modules_whole(model, device_map: dict[str, str]) -> None:
    """No entry of the device map lies strictly inside a module of a `_no_split_modules` class."""
    whole = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    for name in device_map:
        assert not any(name.startswith(f"{unit}.") for unit in whole), f"{name} splits a no-split module"


def test_device_map_auto_on_cpu_and_with_disk_offload(converted, reference, tmp_path):
    folder, _ = converted
    reference, inputs, expected = reference

    on_cpu = CheersForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto")
    assert {parameter.device.type for parameter in on_cpu.parameters()} == {"cpu"}
    assert tensor_fingerprints(on_cpu) == tensor_fingerprints(reference)  # no hooks on CPU: same model, same outputs

    # A CPU budget a little under the model's size: the last modules (flow heads) are offloaded to disk, block by
    # block, never inside a _no_split_modules unit. (The VAE side is offloaded in the test below.)
    sizes = module_sizes(reference)
    budget = sizes[""] - sizes["model.detail_head"] - sizes["model.semantic_head"] // 2
    offloaded = CheersForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off"
    )
    device_map = offloaded.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    assert device_map["model.vae"] == device_map["model.vae_decoder_projector"] == "cpu", device_map
    assert device_map["model.detail_head"] == "disk", device_map
    assert_no_split_modules_whole(offloaded, device_map)
    result = logits_and_velocity(offloaded, inputs)
    assert max_abs_diff(result[0], expected[0]) == 0 and max_abs_diff(result[1], expected[1]) == 0


def test_disk_offload_of_the_decoder_projector(converted, reference, tmp_path):
    folder, _ = converted
    reference = reference[0]
    sizes = module_sizes(reference)
    # room for the VAE, plus the largest unit accelerate reserves for loading offloaded weights
    budget = sizes["model.vae"] + sizes["model.language_model"] + 2_000_000
    offloaded = CheersForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off"
    )
    device_map = offloaded.hf_device_map
    assert device_map["model.vae"] == "cpu" and device_map["model.vae_decoder_projector"] == "disk", device_map
    latents = torch.randn(1, reference.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the offloaded module alone: the same code path as in the vision tokenizer, but cheap
        pixels = offloaded.model.vae_decoder_projector(latents.to(torch.bfloat16))
        expected_pixels = reference.model.vae_decoder_projector(latents.to(torch.bfloat16))
    assert max_abs_diff(pixels, expected_pixels) == 0


# --------------------------------------------------------------------------------------------------------------------
# Inputs: sharded official folders, Hub ids
# --------------------------------------------------------------------------------------------------------------------


def test_sharded_official_input_gives_the_same_folder(sharded_official, converted, tmp_path):
    report = convert_official_checkpoint(
        sharded_official, tmp_path / "native", max_shard_size=SHARD_SIZE, verify=False
    )
    assert report.official_tensors == 501 and report.mapped == 489
    ours, reference = report.output_dir, converted[0]
    assert stored_tensors(ours) == stored_tensors(reference)
    for shard in sorted(ours.glob("*.safetensors")):
        a, b = load_file(shard), load_file(reference / shard.name)
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_hub_id_input_downloads_only_safetensors_json_and_txt(golden, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(golden.checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    report = convert_official_checkpoint("AI9Stars/Cheers", tmp_path / "native", revision="main", verify=False)
    assert calls == [("AI9Stars/Cheers", "main", ["*.safetensors", "*.json", "*.txt"])]
    assert report.input_dir == golden.checkpoint


def test_hub_id_input_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConversionError, match="is not a local folder, and downloading it from the Hub failed"):
        convert_official_checkpoint("someone/not-cached", tmp_path / "native")
    assert not (tmp_path / "native").exists()


# --------------------------------------------------------------------------------------------------------------------
# Faults: CLI exit code, message, nothing written
# --------------------------------------------------------------------------------------------------------------------


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


def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = convert_cli.main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


def left_behind(tmp_path) -> list[str]:
    return sorted(path.name for path in tmp_path.iterdir() if path.name not in ("official", "previous"))


def make_sharded(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    split_into_shards(tensors, folder, 3)


def break_input(fault: str, folder: Path, rewrite) -> Path:
    if fault == "missing_folder":
        return folder.parent / "nowhere"
    if fault == "missing_config":
        (folder / "config.json").unlink()
    elif fault == "invalid_config":
        (folder / "config.json").write_text("{not json")
    elif fault == "wrong_model_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif fault == "missing_weights":
        (folder / "model.safetensors").unlink()
    elif fault == "pickled_weights_only":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif fault == "truncated_file":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    elif fault == "shard_missing":
        make_sharded(folder)
        (folder / "model-00002-of-00003.safetensors").unlink()
    elif fault == "shard_truncated":
        make_sharded(folder)
        shard = folder / "model-00003-of-00003.safetensors"
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif fault == "index_misplaces_tensor":
        make_sharded(folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = (
            "model-00003-of-00003.safetensors"
            if "00001" in index["weight_map"][key]
            else ("model-00001-of-00003.safetensors")
        )
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fault == "unexpected_key":
        rewrite(lambda t: t.update({"model.extra.weight": torch.zeros(1)}))
    elif fault == "missing_key":
        rewrite(lambda t: t.pop("model.hi_gate.layer_norm.bias"))
    elif fault == "wrong_shape":
        rewrite(lambda t: t.update({"model.und_projector.mlp.2.bias": torch.zeros(7)}))
    elif fault == "wrong_dtype":
        rewrite(lambda t: t.update({"model.und_projector.mlp.2.bias": t["model.und_projector.mlp.2.bias"].int()}))
    elif fault == "untied_lm_head":
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
        rewrite(lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    return folder


INPUT_FAULTS = {
    "missing_folder": "nowhere is not a folder",
    "missing_config": "No config.json in",
    "invalid_config": "config.json is not valid JSON",
    "wrong_model_type": "has model_type 'llama', expected the official 'umm'",
    "missing_weights": "No model.safetensors or model.safetensors.index.json in",
    "pickled_weights_only": "found only pytorch_model.bin: pickled weights are never read",
    "truncated_file": "model.safetensors (truncated or corrupt?)",
    "shard_missing": "Shard model-00002-of-00003.safetensors is listed in the index but missing",
    "shard_truncated": "model-00003-of-00003.safetensors (truncated or corrupt?)",
    "index_misplaces_tensor": "The index places 1 tensor(s) in shards that do not hold them",
    "unexpected_key": "Unexpected tensor 'model.extra.weight'",
    "missing_key": "missing ['model.detail_gate.layer_norm.bias']",
    "wrong_shape": "model.multi_modal_projector.linear_2.bias: checkpoint shape (7,) != model shape (32,)",
    "wrong_dtype": "model.und_projector.mlp.2.bias: stored as int32, expected a floating dtype",
    "untied_lm_head": "lm_head.weight differs from the token embedding (max abs diff 1.0",  # and the config unties
}


@pytest.mark.parametrize("fault", sorted(INPUT_FAULTS))
def test_bad_input_exits_1_with_a_clear_message_and_writes_nothing(official_copy, tmp_path, capsys, fault):
    folder, rewrite = official_copy
    folder = break_input(fault, folder, rewrite)
    code, err = run_cli(capsys, "--input", folder, "--output", tmp_path / "native", "--quiet")
    assert code == 1, err
    assert err.startswith("error: ") and INPUT_FAULTS[fault] in err, err
    assert left_behind(tmp_path) == []


def test_a_differing_lm_head_is_dropped_when_the_official_config_ties(official_copy, tmp_path, capsys):
    """As released (text_config.tie_word_embeddings: true), the official model replaces a stored lm_head with the
    embedding when it loads, so a differing copy is dead weight: dropped, reported, and the outputs still agree."""
    folder, rewrite = official_copy
    rewrite(lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    code = convert_cli.main(["--input", str(folder), "--output", str(tmp_path / "native"), "--quiet", "--no-verify"])
    report = capsys.readouterr().out
    assert code == 0
    assert "lm_head: DIFFERS from model.language_model.embed_tokens.weight (max abs diff 1.0" in report
    assert "the official config ties them, so the official model replaces it with the embedding" in report
    assert "lm_head.weight" not in stored_tensors(tmp_path / "native")


def test_existing_output_needs_overwrite(golden, tmp_path, capsys):
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--input", golden.checkpoint, "--output", tmp_path / "native")
    assert code == 1 and "native already exists; pass --overwrite to replace it" in err
    assert (tmp_path / "native" / "keep.txt").read_text() == "mine"
    assert left_behind(tmp_path) == ["native"]


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--dtype", "int8"], 2, "invalid choice: 'int8'"),
        (["--max-shard-size", "lots"], 1, "Invalid --max-shard-size 'lots'"),
    ],
)
def test_bad_arguments(golden, tmp_path, capsys, args, code, message):
    result, err = run_cli(capsys, "--input", golden.checkpoint, "--output", tmp_path / "native", *args)
    assert result == code and message in err
    assert left_behind(tmp_path) == []


def test_output_inside_the_input_is_refused(official_copy, capsys):
    folder, _ = official_copy
    code, err = run_cli(capsys, "--input", folder, "--output", folder / "native")
    assert code == 1 and "must not be inside the input folder" in err
    assert not (folder / "native").exists()


@pytest.mark.parametrize(
    "exception,code,message",
    [
        (KeyboardInterrupt(), 130, "error: interrupted; nothing was written"),
        (OSError(28, "No space left on device"), 1, "error: conversion failed: OSError: [Errno 28] No space left"),
    ],
)
def test_failure_while_writing_shards_leaves_nothing_and_keeps_the_previous_output(
    golden, tmp_path, capsys, monkeypatch, exception, code, message
):
    """The second shard fails mid-save; with --overwrite the previous folder must survive untouched."""
    import transformers.modeling_utils

    previous = tmp_path / "native"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    real_save = transformers.modeling_utils.safe_save_file
    written = []

    def save_then_fail(tensors, filename, metadata=None):
        if written:
            raise exception
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_then_fail)
    result, err = run_cli(
        capsys, "--input", golden.checkpoint, "--output", previous, "--overwrite", "--max-shard-size", SHARD_SIZE
    )
    assert result == code and message in err, err
    assert len(written) == 1 and Path(written[0]).parent.name.startswith(".native.partial-")
    assert left_behind(tmp_path) == ["native"]
    assert [path.name for path in previous.iterdir()] == ["config.json"]


@pytest.mark.parametrize("broken", ["weights", "outputs"])
def test_verification_mismatch_exits_3_and_writes_nothing(golden, tmp_path, capsys, monkeypatch, broken):
    """If the converted folder loads other tensors, or computes other numbers, than the unconverted weights, the
    conversion fails. (The real comparison runs in the `converted` fixture; the forwards are faked here for speed.)"""
    import transformers_cheers.conversion as conversion

    calls = []

    def outputs(model, inputs):
        calls.append(type(model).__name__)
        differs = broken == "outputs" and len(calls) == 2
        return torch.ones(1, 3), torch.full((1, 4), 1.5 if differs else 1.0)

    original = conversion.load_official_checkpoint

    def official(folder, dtype):
        model = original(folder, dtype)
        if broken == "weights":
            with torch.no_grad():
                model.model.detail_head.final_layer.proj_out.bias[0] += 1
        return model

    monkeypatch.setattr(conversion, "logits_and_velocity", outputs)
    monkeypatch.setattr(conversion, "load_official_checkpoint", official)
    code, err = run_cli(capsys, "--input", golden.checkpoint, "--output", tmp_path / "native", "--quiet")
    assert code == 3, err
    if broken == "weights":
        assert "loads 1 tensor(s) that differ from the unconverted weights (value, dtype or presence), e.g. " in err
        assert "model.detail_head.final_layer.proj_out.bias" in err and calls == ["CheersForConditionalGeneration"]
    else:
        assert "does not reproduce the unconverted weights: logits relative L2 0, logits max abs diff 0, " in err
        assert "velocity relative L2 0.333, velocity max abs diff 0.5 (allowed relative L2 0.0313 in bfloat16)" in err
        assert calls == ["CheersForConditionalGeneration"] * 2
    assert left_behind(tmp_path) == []


def test_drop_table_lists_only_the_tied_head_and_the_pooling_head():
    assert len(DROPPED_TENSORS) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_tolerance_passes_reordering_noise_and_refuses_more(dtype):
    """64 float32 eps, plus 4 eps of a half dtype: within it passes, twice it fails (see output_tolerance)."""
    tolerance = output_tolerance(dtype)
    expected = FLOAT32_REORDERING_ULPS * torch.finfo(torch.float32).eps
    if dtype != torch.float32:
        expected += ROUNDING_FLIP_ULPS * torch.finfo(dtype).eps
    assert tolerance == pytest.approx(expected)
    reference = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction *= reference.norm() / direction.norm()
    near = reference + 0.5 * tolerance * direction
    result = compare_outputs((near, near), (reference, reference), dtype)
    assert result["logits relative L2"] == pytest.approx(0.5 * tolerance)
    far = reference + 2 * tolerance * direction
    with pytest.raises(VerificationError, match=r"logits relative L2 .* \(allowed relative L2 "):
        compare_outputs((far, reference), (reference, reference), dtype)
    with pytest.raises(VerificationError, match="non-finite outputs"):
        compare_outputs((reference, reference * float("nan")), (reference, reference * float("nan")), dtype)


def test_a_config_field_lost_in_config_json_fails_verification(golden, tmp_path, capsys, monkeypatch):
    import transformers_cheers.conversion as conversion

    original = conversion.load_official_checkpoint

    def official(folder, dtype):
        model = original(folder, dtype)
        model.config.head_rope_theta = 123.0  # as if config.json had lost the official value
        return model

    monkeypatch.setattr(conversion, "load_official_checkpoint", official)
    code, err = run_cli(capsys, "--input", golden.checkpoint, "--output", tmp_path / "native", "--quiet")
    assert code == 3 and "config.json differs from the official config in ['head_rope_theta']" in err, err
    assert left_behind(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# Another configuration: an official checkpoint written from a random native model (inverse key mapping)
# --------------------------------------------------------------------------------------------------------------------

OTHER_CONFIG = {  # unlike the golden one: 3 layers, multi-query attention, rope_theta 1e4, 96 px, VAE channel changes
    "text_config": {
        "vocab_size": 151680,  # the official token ids (151665..151669) must exist
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rope_theta": 1e4,
        "max_position_embeddings": 4096,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 96,
        "patch_size": 16,
    },
    "vae_config": {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "latent_channels": 8},
}


def random_native_model(config: CheersConfig, seed: int) -> CheersForConditionalGeneration:
    """Random weights everywhere, the zero-initialised modulations and the BatchNorm statistics included."""
    torch.manual_seed(seed)
    model = CheersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modulation." in name or "detail_gate.gate.2." in name:
                parameter.normal_(0.0, 0.02)
        for norm in (model.model.vae.bn, model.model.vae_decoder_projector.bn):
            norm.running_mean.normal_(0.0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def other_official(golden, tmp_path_factory):
    """(official folder, the native model it was written from): float32 weights, the golden tokenizer files."""
    folder = tmp_path_factory.mktemp("other") / "official"
    folder.mkdir()
    model = random_native_model(CheersConfig(**OTHER_CONFIG), seed=1)
    official = native_to_official_state_dict(model.state_dict(), model.config)
    save_file(official, folder / "model.safetensors", metadata={"format": "pt"})
    write_official_config(model.config, folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(golden.checkpoint / name, folder / name)
    preprocessor = json.loads((golden.checkpoint / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "scale_resolution": 96}))
    return folder, model


def test_official_config_writer_uses_the_official_field_names(other_official):
    folder, model = other_official
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "umm"
    assert written["text_config"]["num_key_value_heads"] == 1 and written["text_config"]["rope_theta"] == 1e4
    assert written["vision_representation_config"]["image_size"] == 96
    assert written["vae_encoder_config"] == {
        "resolution": 96,
        "in_channels": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "z_channels": 8,
    }
    assert written["vae_decoder_config"]["out_ch"] == 3 and written["vae_decoder_config"]["ch_mult"] == [1, 2, 2, 2]


def test_a_config_without_official_form_is_refused():
    config = CheersConfig(**OTHER_CONFIG, head_rope_theta=500.0)
    with pytest.raises(OfficialCheckpointError, match=r"no official form: .*cannot express \['head_rope_theta'\]"):
        official_config(config)


def test_native_to_official_round_trips_bit_for_bit(other_official):
    """official -> native (the converter's one reader) of the written checkpoint gives the native tensors back."""
    folder, model = other_official
    converted = convert_official_folder(folder, torch.float32)
    expected = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    assert list(converted.state_dict) == list(expected)
    for key, tensor in expected.items():
        assert converted.state_dict[key].dtype == tensor.dtype and torch.equal(converted.state_dict[key], tensor), key
    assert converted.dropped == {"lm_head.weight": DROPPED_TENSORS[r"^lm_head\.weight$"]}
    assert tensor_fingerprints(load_official_checkpoint(folder)) == tensor_fingerprints(model)


def test_native_to_official_gives_the_golden_file_back(golden):
    """The inverse mapping against real official names: every golden tensor but the unused pooling head."""
    converted = convert_official_folder(golden.checkpoint, torch.bfloat16)
    official = load_file(golden.checkpoint / "model.safetensors")
    expected = {
        key: value for key, value in official.items() if not key.startswith("model.vision_representation.head.")
    }
    written = native_to_official_state_dict(converted.state_dict, converted.config)
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        # the native model keeps the BatchNorm statistics in float32 (exact for the stored bfloat16 values)
        dtype = torch.float32 if key.endswith(("bn.running_mean", "bn.running_var")) else tensor.dtype
        assert written[key].dtype == dtype and torch.equal(written[key], tensor.to(dtype)), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_converts_another_configuration_with_verification(other_official, tmp_path, capsys, dtype):
    folder, model = other_official
    code = convert_cli.main(
        ["--input", str(folder), "--output", str(tmp_path / "native"), "--dtype", dtype, "--quiet"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    print(captured.out)  # the report, visible with pytest -s
    assert re.search(rf"verification \({dtype}, .*\): 508 tensors bit-identical, config equal; .*: OK", captured.out)
    assert "image processor (resolution 96, patch 16)" in captured.out
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    text = config["text_config"]
    assert (text["num_hidden_layers"], text["num_key_value_heads"], text["rope_parameters"]["rope_theta"]) == (
        3,
        1,
        1e4,
    )
    assert config["vision_config"]["image_size"] == 96


def test_load_official_checkpoint_is_strict(golden, monkeypatch):
    """Only the tied lm_head may be absent from the converted tensors; anything else missing is an error."""
    import transformers_cheers.official_checkpoint as official_checkpoint

    original = official_checkpoint.convert_official_folder

    def incomplete(folder, dtype, **kwargs):
        result = original(folder, dtype, **kwargs)
        del result.state_dict["model.detail_gate.layer_norm.bias"]
        return result

    monkeypatch.setattr(official_checkpoint, "convert_official_folder", incomplete)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"model.detail_gate.layer_norm.bias\""):
        load_official_checkpoint(golden.checkpoint)


# --------------------------------------------------------------------------------------------------------------------
# Staging: next to the output only, leftovers of killed runs cleaned up
# --------------------------------------------------------------------------------------------------------------------


def test_nothing_is_written_to_the_system_temp_dir(converted):
    """The fixture's full conversion (verification and the diffusers check included) ran with the temp dir watched."""
    assert SYSTEM_TEMP_USE["files"] == [] and SYSTEM_TEMP_USE["callers"] == [], SYSTEM_TEMP_USE


def is_empty_torch_cache_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith("torchinductor_") and not any(path.iterdir())


def dead_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(golden, tmp_path):
    dead = dead_process_id()
    partial = tmp_path / f".native.partial-{dead}-abcd1234"
    running = tmp_path / f".native.partial-{os.getpid()}-efgh5678"  # a conversion still in progress: untouched
    backup = tmp_path / f".native.old-{dead}-abcd1234"  # the previous output, while native does not exist: kept
    for folder in (partial, running, backup):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    report = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", verify=False)
    assert report.leftovers == [
        f"kept {backup}: the previous native, moved aside by an interrupted run; rename it back to native or delete it",
        f"removed {partial} (left by an interrupted run, process {dead})",
    ]
    assert f"leftover of an interrupted run: removed {partial}" in report.format()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([backup.name, running.name, "native"])
    report = convert_official_checkpoint(golden.checkpoint, tmp_path / "native", overwrite=True, verify=False)
    assert report.leftovers == [f"removed {backup} (left by an interrupted run, process {dead})"]  # native exists now


def test_sigkill_leaves_the_staging_folder_next_to_the_output_only(golden, tmp_path):
    """A killed run cannot clean up: what it leaves is next to --output, named for its process, and the next run
    removes it. Nothing lands in the system temp dir."""
    import signal
    import time

    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    output = tmp_path / "out" / "native"
    env = {**os.environ, "TMPDIR": str(system_temp), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, str(SCRIPT), "--input", str(golden.checkpoint), "--output", str(output), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(output.parent.glob(".native.partial-*/*.safetensors")) and process.poll() is None:
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.05)
        assert process.poll() is None, "the conversion finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    [staging] = output.parent.glob(".native.partial-*")
    assert staging.name.startswith(f".native.partial-{process.pid}-") and not output.exists()
    # torch creates its compile-cache folder (torchinductor_USER) there when torch._dynamo is imported: empty
    written = [path for path in system_temp.rglob("*") if not is_empty_torch_cache_dir(path)]
    assert written == []
    report = convert_official_checkpoint(golden.checkpoint, output, verify=False)
    assert report.leftovers == [f"removed {staging} (left by an interrupted run, process {process.pid})"]
    assert [path.name for path in output.parent.iterdir()] == ["native"]
