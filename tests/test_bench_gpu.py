"""benchmarks/bench_gpu.py on a CPU: the full-size preset, the analytic FLOP count and a tiny end-to-end smoke run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from transformers_cheers import CheersFlowMatchScheduler, CheersForConditionalGeneration, CheersPipeline
from transformers_cheers.official_checkpoint import config_from_official
from transformers_cheers.presets import preset_config
from transformers_cheers.tiny import randomize_zero_initialised, special_token_ids, tiny_processor


BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
# The sizes in the official release's Training/cheers_config/config.json (AI9Stars/Cheers); the official remote-code
# class defaults fill what it leaves out (28 LLM layers, the FLUX.2 VAE channels).
OFFICIAL_RELEASE_CONFIG = {
    "vae_encoder_config": {"resolution": 512},
    "vae_decoder_config": {"resolution": 512},
    "vision_representation_config": {
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 512,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 27,
        "patch_size": 16,
    },
    "text_config": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "max_window_layers": 21,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
    },
    "model_type": "umm",
}
SMOKE_ARGS = ["--device", "cpu", "--preset", "tiny", "--resolution", "64", "--steps", "1", "--repeats", "1"]
SMOKE_ARGS += ["--decode-tokens", "32"]  # enough decode steps to time above the noise of a shared CPU


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH_SCRIPT)


def test_full_preset_is_the_official_release():
    architecture = {"dtype", "transformers_version", "architectures", "auto_map"}
    expected = {
        k: v for k, v in config_from_official(OFFICIAL_RELEASE_CONFIG).to_dict().items() if k not in architecture
    }
    actual = {k: v for k, v in preset_config("full").to_dict().items() if k not in architecture}
    assert actual == expected
    text = preset_config("full").text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (28, 1536, 2)  # Qwen2.5-1.5B


def test_bf16_peak_table_matches_device_names(bench):
    assert bench.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert bench.bf16_peak_tflops("NVIDIA L4") == 121.0
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.bf16_peak_tflops("Some Future GPU") is None


def module_flops(counter: FlopCounterMode, *modules: str) -> int:
    """FLOPs counted inside the named modules (FlopCounterMode names them by the outermost module called)."""
    counts = counter.get_flop_counts()
    return sum(sum(counts.get(module, {}).values()) for module in modules)


def test_analytic_flops_match_flop_counter_mode_per_component(bench):
    """The FLOP formulas against what torch counts on a real run, component by component (exact at this size).

    The model varies what the tiny preset keeps equal (VAE widths per level, two resnets per level, so shortcut
    convolutions; a resolution other than SigLIP's native one) so that each term of the formulas is exercised."""
    processor = tiny_processor()
    text_config = {**preset_config("tiny").text_config.to_dict(), "vocab_size": len(processor.tokenizer)}
    vae = {"block_out_channels": [16, 32, 32, 48], "layers_per_block": 2, "norm_num_groups": 8}
    config = preset_config("tiny", text_config=text_config, vae_config=vae, **special_token_ids(processor))
    torch.manual_seed(0)
    model = CheersForConditionalGeneration(config).eval()
    randomize_zero_initialised(model)
    pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    resolution, steps = 96, 2
    text = processor.apply_chat_template([{"role": "user", "content": "A cat."}], add_generation_prompt=True)
    prompt_length = processor(text=text, generation_mode="image")["input_ids"].shape[1]

    # CPU SDPA's fused kernel is unknown to FlopCounterMode; its math form is counted as matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe("A cat.", height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=3.0)
    analytic = bench.text_to_image_flops(config, resolution, steps, True, prompt_length)
    by_module = {
        "decoder projector": module_flops(counter, "CheersModel.vae_decoder_projector"),
        "SigLIP": module_flops(counter, "CheersModel.vision_representation"),
        "token merger": module_flops(counter, "CheersModel.multi_modal_projector"),
        "LLM": module_flops(counter, "CheersModel.language_model") - analytic["prompt prefill"],
        "flow head": module_flops(
            counter,
            "CheersModel.time_embedder",
            "CheersModel.semantic_head",
            "CheersModel.detail_gate",
            "CheersModel.detail_head",
        ),
        "final VAE decode": module_flops(counter, "CheersModel.vae.decoder", "CheersModel.vae.post_quant_conv"),
    }
    for component, counted in by_module.items():
        assert analytic[component] == pytest.approx(counted, rel=0.01), component
    assert sum(analytic.values()) == pytest.approx(counter.get_total_flops(), rel=0.01)

    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=[torch.rand(3, resolution, resolution)], resolution=resolution)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    analytic = bench.prefill_flops(config, resolution, inputs["input_ids"].shape[1])
    core = "CheersForConditionalGeneration.model"
    encoder = module_flops(counter, f"{core}.vae.encoder", f"{core}.vae.quant_conv")
    assert analytic["VAE encoder"] == pytest.approx(encoder, rel=0.01)
    assert analytic["LLM"] == pytest.approx(module_flops(counter, f"{core}.language_model"), rel=0.01)
    assert analytic["LM head"] == module_flops(counter, "CheersForConditionalGeneration.lm_head")
    assert sum(analytic.values()) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_smoke_run_prints_every_row_and_writes_finite_json(bench, tmp_path):
    """The script end to end at the tiny size on a CPU (a smoke test, not a timing), as CI runs it."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(BENCH_SCRIPT), *SMOKE_ARGS, "--no-compile", "--verify-flops", "--json", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.stdout.split(bench.GOAL)[-1]  # the closing report, after the progress rows
    assert "device: CPU" in report and "torch " in report and "transformers " in report
    for name in bench.ROWS.values():
        assert name in report, name
    result = json.loads(out.read_text())
    rows = dict(zip(bench.ROWS, result["rows"]))
    assert [row["name"] for row in rows.values()] == list(bench.ROWS.values())
    for key, row in rows.items():
        if key in bench.COMPILED_ROWS:
            assert row["status"] == "skipped (--no-compile)"
            continue
        assert row["status"] == "ok", row
        numbers = [value for key, value in row.items() if isinstance(value, float)]
        assert numbers and all(math.isfinite(value) and value >= 0 for value in numbers), row
        assert row["seconds"] > 0
    analytic = sum(result["text_to_image_flops"].values())
    assert result["counted_text_to_image_flops"] == pytest.approx(analytic, rel=0.01)


def test_a_failing_compile_prints_its_error_in_its_row(bench, monkeypatch, capsys, tmp_path):
    """Every compiled variant is guarded: here torch.compile itself fails, and the eager rows still run."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "result.json"
    selected = ["t2i", *sorted(bench.COMPILED_ROWS)]
    bench.main([*SMOKE_ARGS, "--rows", *selected, "--json", str(out)])
    printed = capsys.readouterr().out
    rows = dict(zip(bench.ROWS, json.loads(out.read_text())["rows"]))
    for key, name in bench.ROWS.items():
        if key not in selected:
            assert rows[key] == {"name": name, "status": "skipped (not in --rows)"}
        elif key in bench.COMPILED_ROWS:
            assert rows[key] == {
                "name": name,
                "status": "error",
                "error": "RuntimeError: no compiler on this machine",
            }
            assert f"{name:<50} error: RuntimeError: no compiler on this machine" in printed
        else:
            assert rows[key]["status"] == "ok", rows[key]


def test_compiled_velocity_is_given_back(bench):
    """The compiled velocity function replaces the method on the instance only while its rows run."""

    class Core:
        def compute_velocity(self, latents):
            return latents + 1

    core = Core()
    with bench.compiled_velocity(core, None):
        assert "compute_velocity" in vars(core)
    assert "compute_velocity" not in vars(core)
    assert core.compute_velocity(torch.zeros(1)).item() == 1


def test_cuda_device_without_cuda_is_a_clear_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "CUDA is not available here" in capsys.readouterr().err
