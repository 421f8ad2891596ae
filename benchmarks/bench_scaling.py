"""Scaling table: how the cost of text-to-image grows with the batch and the resolution, and how the cost of an
understanding prefill grows with the prompt, with the exponent of that growth measured between consecutive points.

    python benchmarks/bench_scaling.py                       # bench-mid, float32: batch 1 2 4, 128/256/512 px, prompts
    python benchmarks/bench_scaling.py --preset tiny --batches 1 2 --sizes 64 128 --prompt-tokens 256 512
    python benchmarks/bench_scaling.py --official-python /path/to/venv-4.51/bin/python \\
        --official-code /path/to/Cheers/Training/cheers_config --json scaling.json

It measures nothing itself: every point is one fresh child process of `bench_t2i.py` (seconds per image, RSS peak
growth, exact live-tensor peak; the first generation warms up) or of `bench_understanding.py` (prefill seconds, RSS
peak growth, exact live-tensor peak), so peak memory is clean and the figures mean what they mean there.

Growth is the exponent k of cost ~ size^k fitted on a log-log scale between a row and the row above it:
log(cost ratio) / log(size ratio). The sizes are the batch, the pixel count (not the side) and the prompt tokens,
so 1 means linear and 2 quadratic in every table. Text-to-image time is taken per call (seconds per image x batch),
since that is the cost that grows with the batch.

The official prefill runs in --dtype too: in float32 its two hard-coded bfloat16 activation casts follow the dtype
(see `official_code.py`), since without that it cannot run in float32 at all.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from bench_understanding import child_result


HERE = Path(__file__).resolve().parent
T2I, UNDERSTANDING = HERE / "bench_t2i.py", HERE / "bench_understanding.py"
GROWTH_NOTE = (
    "growth: exponent k of cost ~ size^k between a row and the row above (log-log; 1 = linear, 2 = quadratic); "
    "sizes are the batch, the pixel count and the prompt tokens"
)


def growth(size: float, cost: float, previous_size: float, previous_cost: float) -> float | None:
    """The log-log slope between two points; None where a cost is not positive (no slope exists)."""
    if min(cost, previous_cost) <= 0 or size == previous_size:
        return None
    return math.log(cost / previous_cost) / math.log(size / previous_size)


def add_growth(rows: list[dict], size_key: str, costs: dict[str, str]) -> list[dict]:
    """Sets row[growth_key] for each cost column named in `costs` ({cost key: growth key}); None on the first row."""
    for index, row in enumerate(rows):
        for cost, key in costs.items():
            row[key] = (
                growth(row[size_key], row[cost], rows[index - 1][size_key], rows[index - 1][cost]) if index else None
            )
    return rows


def text_to_image_point(args, batch: int, size: int) -> dict:
    command = [
        sys.executable,
        str(T2I),
        f"--preset={args.preset}",
        f"--size={size}",
        f"--batch={batch}",
        f"--steps={args.steps}",
        f"--guidance={args.guidance}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
        "--implementation=ours",
        f"--work={tempfile.mkdtemp(prefix='bench_scaling_')}",  # empty: ours builds a random model of the preset
    ]
    result = child_result(command, f"text-to-image, batch {batch}, {size} px")
    return {
        "batch": batch,
        "size": size,
        "pixels": size * size,
        "seconds_per_image": result["seconds_per_image"],
        "seconds_per_call": result["seconds_per_image"] * batch,
        "rss_peak_mib": result["peak_mib"],
        "live_peak_mib": result["live_peak_mib"],
    }


def text_to_image_series(args) -> tuple[list[dict], list[dict]]:
    """(rows vs batch, rows vs resolution); a point both series share is measured once."""
    measured = {}

    def point(batch, size):
        if (batch, size) not in measured:
            measured[batch, size] = text_to_image_point(args, batch, size)
        return dict(measured[batch, size])

    by_batch = [point(batch, args.batch_resolution) for batch in args.batches]
    by_size = [point(1, size) for size in args.sizes]
    costs = {"seconds_per_call": "time_growth", "live_peak_mib": "live_growth"}
    return add_growth(by_batch, "batch", costs), add_growth(by_size, "pixels", costs)


def prefill_command(args, python: str, implementation: str, tokens: int) -> list[str]:
    command = [python, str(UNDERSTANDING), "--child", args.preset, "--implementation", implementation]
    command += ["--prompt-tokens", str(tokens), "--decode-tokens", "0", "--dtype", args.dtype]
    command += ["--repeats", str(args.repeats), "--live-peak"]
    return command + (["--official-code", args.official_code] if args.official_code else [])


def prefill_series(args, implementation: str, python: str) -> list[dict]:
    """Rows vs prompt tokens."""
    rows = [
        child_result(
            prefill_command(args, python, implementation, tokens), f"{implementation} prefill, {tokens} tokens"
        )
        for tokens in args.prompt_tokens
    ]
    rows = [
        {
            "implementation": implementation,
            "dtype": row["dtype"],
            "tokens": row["prompt_tokens"],
            "seconds": row["prefill_s"],
            "rss_peak_mib": row["prefill_peak_mib"],
            "live_peak_mib": row["prefill_live_peak_mib"],
        }
        for row in rows
    ]
    return add_growth(rows, "tokens", {"seconds": "time_growth", "live_peak_mib": "live_growth"})


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_tables(args, report: dict) -> None:
    print(report["machine"])
    runs = f"median of {args.repeats} after a warm-up"
    settings = f"preset {args.preset}, {args.dtype}, {args.steps} steps, guidance {args.guidance}, {runs}"
    if "text-to-image" in args.series:
        print_text_to_image_tables(args, report, settings)
    if "prefill" in args.series:
        print_prefill_table(args, report, runs)
    print(f"\n{GROWTH_NOTE}")


def print_text_to_image_tables(args, report: dict, settings: str) -> None:
    print(f"\nText-to-image vs batch ({args.batch_resolution} px; {settings}; ours)\n")
    header = ["batch", "s/image", "s/call", "time growth", "RSS peak MiB", "live peak MiB", "live growth"]
    rows = [
        [str(row["batch"]), number(row["seconds_per_image"]), number(row["seconds_per_call"])]
        + [number(row["time_growth"]), number(row["rss_peak_mib"], 1), number(row["live_peak_mib"], 1)]
        + [number(row["live_growth"])]
        for row in report["text_to_image_vs_batch"]
    ]
    print(markdown_table(header, rows))
    print(f"\nText-to-image vs resolution (batch 1; {settings}; ours)\n")
    header = ["px", "s/image", "time growth", "RSS peak MiB", "live peak MiB", "live growth"]
    rows = [
        [str(row["size"]), number(row["seconds_per_image"]), number(row["time_growth"])]
        + [number(row["rss_peak_mib"], 1), number(row["live_peak_mib"], 1), number(row["live_growth"])]
        for row in report["text_to_image_vs_resolution"]
    ]
    print(markdown_table(header, rows))


def print_prefill_table(args, report: dict, runs: str) -> None:
    print(f"\nUnderstanding prefill vs prompt tokens (preset {args.preset}, one image in the prompt, {runs})\n")
    header = ["impl", "dtype", "tokens", "prefill s", "time growth", "RSS peak MiB", "live peak MiB", "live growth"]
    rows = [
        [row["implementation"], row["dtype"], str(row["tokens"]), number(row["seconds"], 3)]
        + [number(row["time_growth"]), number(row["rss_peak_mib"], 1), number(row["live_peak_mib"], 1)]
        + [number(row["live_growth"])]
        for series in report["prefill_vs_tokens"].values()
        for row in series
    ]
    print(markdown_table(header, rows))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-mid", help="a preset of transformers_cheers.presets")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-resolution", type=int, default=256, help="image side of the batch series, px")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="image sides, px (batch 1)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point, after one warm-up")
    parser.add_argument("--official-python", help="interpreter with transformers 4.51.3 for the official prefill")
    parser.add_argument("--official-code", help="folder with the official configuration_umm.py / modeling_umm.py")
    parser.add_argument(
        "--series",
        nargs="+",
        choices=["text-to-image", "prefill"],
        default=["text-to-image", "prefill"],
        help="which tables to measure (default: both)",
    )
    parser.add_argument("--json", type=Path, help="also write the tables, as JSON, to this file")
    args = parser.parse_args()
    for name in ("batches", "sizes", "prompt_tokens"):
        values = getattr(args, name)
        if min(values) <= 0 or len(set(values)) != len(values):
            parser.error(f"--{name.replace('_', '-')} needs distinct positive values, got {values}")
    if args.official_python and not args.official_code:
        parser.error("--official-python needs --official-code, the folder of the official modeling_umm.py")
    return args


def main():
    args = parse_args()
    from machine import machine_description  # imports torch: not before the arguments are checked

    by_batch, by_size = text_to_image_series(args) if "text-to-image" in args.series else ([], [])
    prefill = {}
    sides = [("ours", sys.executable)]
    if args.official_code:
        sides.append(("official", args.official_python or sys.executable))
    for implementation, python in sides if "prefill" in args.series else []:
        prefill[implementation] = prefill_series(args, implementation, python)
    report = {
        "machine": machine_description(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "text_to_image_vs_batch": by_batch,
        "text_to_image_vs_resolution": by_size,
        "prefill_vs_tokens": prefill,
        "growth": GROWTH_NOTE,
    }
    print_tables(args, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
