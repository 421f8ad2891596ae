"""The measuring tools of benchmarks/: exact live-tensor memory, the per-pass decoder benchmark (our side), the
scaling table and the official-code import used by the side-by-side runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from live_memory import LiveTensorMemory  # noqa: E402
from official_code import cast_to  # noqa: E402


def test_live_tensor_memory_counts_the_peak_of_live_storages():
    megabyte = 2**20
    with LiveTensorMemory() as memory:
        first = torch.ones(megabyte // 4)  # 1 MiB of float32
        view = first[:10]  # a view: no new storage
        second = torch.ones(2 * megabyte // 4)
        del first, view, second  # 3 MiB were alive together
        third = torch.ones(megabyte // 4)
    assert memory.peak == 3 * megabyte
    assert memory.live == megabyte  # `third` is still alive
    del third
    assert memory.live == 0


def test_views_and_in_place_results_of_earlier_tensors_are_not_allocations():
    weight = torch.ones(512, 512)  # made before the mode, like a model's weights
    with LiveTensorMemory() as memory:
        transposed = weight.t()
        weight.mul_(1.0)
        product = torch.ones(4, 512) @ transposed  # 8 KiB of input and 8 KiB of result
    assert memory.peak == 2 * 4 * 512 * 4
    del transposed, product


def test_the_official_bf16_casts_follow_the_benchmark_dtype_and_nothing_else_changes():
    source = (
        "def forward(self, x):\n    x = x.to(torch.bfloat16)\n    return self.layernorm(x)\n"
        "def get_image_features(self, xt):\n    xt = xt.to(torch.bfloat16)\n    dtype = torch.bfloat16\n"
    )
    rewritten = cast_to(source, "float32")
    assert rewritten.count(".to(torch.float32)") == 2
    assert ".to(torch.bfloat16)" not in rewritten
    assert "dtype = torch.bfloat16" in rewritten  # only the activation casts change
    assert rewritten.replace(".to(torch.float32)", ".to(torch.bfloat16)") == source


def test_another_version_of_the_official_code_is_refused_by_name():
    with pytest.raises(RuntimeError, match="Expected 2 hard-coded .* found 1: this is a different version"):
        cast_to("x = x.to(torch.bfloat16)\n", "float32")


def test_decoder_pass_benchmark_runs_our_variants():
    command = [sys.executable, "bench_decoder_pass.py", "--preset=tiny", "--repeats=1", "--side=ours"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(rows) == {
        "ours, parity kernels (default)",
        "ours, fused kernels",
        "ours, fused kernels + channels_last",
    }
    assert all(row["seconds"] > 0 and row["live_peak_mib"] > 0 for row in rows.values())


def test_scaling_table_on_the_tiny_preset(tmp_path):
    """bench_scaling.py end to end on a tiny grid: every point is a fresh child of bench_t2i / bench_understanding."""
    out = tmp_path / "scaling.json"
    grid = "--preset tiny --steps 2 --repeats 1 --batches 1 2 --batch-resolution 64 --sizes 64 128".split()
    command = [sys.executable, "bench_scaling.py", *grid, "--prompt-tokens", "256", "512", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("CPU: ")  # the machine line above the tables
    for header in ("| batch | s/image | s/call | time growth |", "| px | s/image |", "| impl | dtype | tokens |"):
        assert header in result.stdout
    report = json.loads(out.read_text())
    series = {
        ("batch", "seconds_per_call"): report["text_to_image_vs_batch"],
        ("pixels", "seconds_per_image"): report["text_to_image_vs_resolution"],
        ("tokens", "seconds"): report["prefill_vs_tokens"]["ours"],
    }
    assert [row["batch"] for row in series["batch", "seconds_per_call"]] == [1, 2]
    assert [row["size"] for row in series["pixels", "seconds_per_image"]] == [64, 128]
    assert [row["tokens"] for row in series["tokens", "seconds"]] == [256, 512]
    for (size, seconds), rows in series.items():
        assert all(row[seconds] > 0 and row["live_peak_mib"] > 0 and row["rss_peak_mib"] >= 0 for row in rows)
        first, second = rows
        assert first["time_growth"] is None and first["live_growth"] is None
        expected = math.log(second[seconds] / first[seconds]) / math.log(second[size] / first[size])
        assert math.isfinite(second["time_growth"]) and second["time_growth"] == pytest.approx(expected)
        assert math.isfinite(second["live_growth"])
    # The decoder projector runs on the whole batch at once, so its activations (the live peak) double with it.
    assert report["text_to_image_vs_batch"][1]["live_growth"] == pytest.approx(1.0, abs=0.05)
