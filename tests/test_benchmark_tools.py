"""The measuring tools of benchmarks/: exact live-tensor memory, and the per-pass decoder benchmark (our side)."""

import json
import subprocess
import sys
from pathlib import Path

import torch


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from live_memory import LiveTensorMemory  # noqa: E402


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
