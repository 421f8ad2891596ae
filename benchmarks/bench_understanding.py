"""Understanding benchmark: prefill time and peak memory of a long multimodal prompt, and decode tokens/s.

    python benchmarks/bench_understanding.py                               # tiny and bench-mid, bf16
    python benchmarks/bench_understanding.py --presets bench-mid --prompt-tokens 2048 --decode-tokens 64

Side by side with the official implementation (its remote code needs transformers 4.51.3, so it runs in another
interpreter; point --official-code at the folder holding its configuration_umm.py / modeling_umm.py):

    python benchmarks/bench_understanding.py --official-python /path/to/venv-4.51/bin/python \\
        --official-code /path/to/Cheers/Training/cheers_config

The official `generate` stops at once for prompts of more than 1024 text ids, so decode is measured on a
--decode-prompt-tokens prompt (default 1024) for both implementations.

Each measurement runs in a fresh process (so peak memory is not polluted by earlier runs) on randomly initialised
weights. Peak memory = highest resident set size sampled during the prefill minus the resident size just before it.
Decode tokens/s = (N - 1) / (time of an N-token generation - time of a 1-token one), which removes the prefill;
--decode-tokens 0 measures the prefill alone. --live-peak adds the exact peak of live tensor bytes of one extra,
untimed prefill (`live_memory.LiveTensorMemory`). Figures are medians over --repeats; machines are noisy, compare
ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


IMAGE_START, IMAGE_END = 151667, 151668


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def run_child(command: list[str]) -> subprocess.CompletedProcess:
    """Run one measurement in a fresh interpreter (clean peak memory) that finds the modules of benchmarks/."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def child_result(command: list[str], label: str) -> dict:
    """The JSON a measuring child prints on its last line; exits with the child's error if it failed."""
    result = run_child(command)
    if result.returncode:
        sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class PeakMemory:
    """Samples the resident set size in a thread; `.peak` is the highest value seen above the starting level."""

    def __enter__(self):
        self.start = resident_bytes()
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes() - self.start)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes() - self.start)


class Ours:
    """transformers-cheers on a random model of the preset."""

    def __init__(self, preset: str, dtype):
        import torch

        from transformers_cheers import CheersForConditionalGeneration
        from transformers_cheers.presets import preset_config

        self.config = preset_config(preset)
        self.model = CheersForConditionalGeneration(self.config).to(dtype).eval()
        # Random weights: never stop early, so both sides decode the same number of tokens (the official loop
        # ignores EOS only at max_length too). No min_new_tokens: its logits processor costs time per step.
        self.model.generation_config.eos_token_id = None
        self.size = self.config.vision_config.image_size
        self.image_tokens = self.config.num_image_tokens
        self.torch = torch

    def inputs(self, text):
        torch = self.torch
        image = torch.full((self.image_tokens,), self.config.image_token_id)
        ids = torch.cat([torch.tensor([IMAGE_START]), image, torch.tensor([IMAGE_END]), text])[None]
        return {"input_ids": ids, "pixel_values": torch.rand(1, 3, self.size, self.size)}

    def prefill(self, inputs):
        self.model(**inputs, use_cache=True, logits_to_keep=1)

    def generate(self, inputs, tokens: int) -> int:
        output = self.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        return output.shape[1] - inputs["input_ids"].shape[1]


class Official:
    """The official remote code (transformers 4.51.3) on a random model of the same preset."""

    def __init__(self, preset: str, dtype, code_dir: str):
        import torch
        from official_code import import_official
        from transformers_cheers_bench_presets import official_config

        configuration, modeling = import_official(code_dir, str(dtype).removeprefix("torch."))
        settings = official_config(preset)
        self.model = modeling.Cheers(configuration.UMMConfig(**settings)).to(dtype).eval()
        vision = settings["vision_representation_config"]
        self.size = vision["image_size"]
        self.grid = self.size // vision["patch_size"]
        self.image_tokens = self.grid * self.grid // 4
        self.torch = torch

    def inputs(self, text):
        torch = self.torch
        ids = torch.cat([torch.tensor([IMAGE_START, -200, IMAGE_END]), text])[None]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.rand(1, 3, self.size, self.size),
            "grid_hws": torch.tensor([[self.grid, self.grid]]),
            "t": torch.ones(1),
        }

    def prefill(self, inputs):
        self.model(**inputs, use_cache=True)

    def generate(self, inputs, tokens: int) -> int:
        # max_length counts new tokens and the official loop produces max_length + 1 of them.
        output = self.model.generate(**inputs, max_length=tokens - 1, temperature=0.0)
        return output["input_ids"].shape[1]


def measure(args, preset: str) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    runner = Official(preset, dtype, args.official_code) if args.implementation == "official" else Ours(preset, dtype)

    def text(total):
        if total <= runner.image_tokens + 2:
            raise ValueError(
                f"A {total}-token prompt is too short: the image alone takes {runner.image_tokens + 2} tokens of "
                f"preset {preset}; ask for more prompt tokens."
            )
        return torch.randint(0, 150000, (total - runner.image_tokens - 2,))

    prefill_inputs, decode_inputs = (
        runner.inputs(text(args.prompt_tokens)),
        runner.inputs(text(args.decode_prompt_tokens)),
    )
    prefill_seconds, decode_rates, peaks = [], [], []
    with torch.inference_mode():
        runner.prefill(prefill_inputs)  # warm-up
        for _ in range(args.repeats):
            with PeakMemory() as memory:
                start = time.perf_counter()
                runner.prefill(prefill_inputs)
                prefill_seconds.append(time.perf_counter() - start)
            peaks.append(memory.peak)
            if not args.decode_tokens:
                continue
            # Decode rate = extra tokens / extra time of a long generation over a one-token one (same prompt).
            start = time.perf_counter()
            runner.generate(decode_inputs, 1)
            one_token = time.perf_counter() - start
            start = time.perf_counter()
            generated = runner.generate(decode_inputs, args.decode_tokens)
            decode_rates.append((generated - 1) / (time.perf_counter() - start - one_token))
        live_peak = live_prefill_peak(runner, prefill_inputs) if args.live_peak else None
    return {
        "implementation": args.implementation,
        "preset": preset,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "prefill_s": statistics.median(prefill_seconds),
        "prefill_peak_mib": statistics.median(peaks) / 2**20,
        "prefill_live_peak_mib": live_peak,
        "decode_tok_s": statistics.median(decode_rates) if decode_rates else None,
    }


def live_prefill_peak(runner, inputs) -> float:
    """MiB of live tensors at the peak of one prefill, in a run of its own: counting every operator slows it."""
    from live_memory import LiveTensorMemory

    with LiveTensorMemory() as live:
        runner.prefill(inputs)
    return live.peak / 2**20


def print_table(rows):
    header = f"{'impl':<9} {'preset':<10} {'dtype':<9} {'prompt':>7} {'prefill(s)':>10} {'peak(MiB)':>10} "
    header += f"{'live(MiB)':>10} {'decode tok/s':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['implementation']:<9} {row['preset']:<10} {row['dtype']:<9} {row['prompt_tokens']:>7} "
            f"{row['prefill_s']:>10.3f} {row['prefill_peak_mib']:>10.1f} "
            f"{row['prefill_live_peak_mib'] or float('nan'):>10.1f} {row['decode_tok_s'] or float('nan'):>12.1f}"
        )
    by_preset = {}
    for row in rows:
        by_preset.setdefault(row["preset"], {})[row["implementation"]] = row
    for preset, pair in by_preset.items():
        if "official" in pair and pair["ours"]["decode_tok_s"]:
            ours, official = pair["ours"], pair["official"]
            print(
                f"{preset}: decode speed-up {ours['decode_tok_s'] / official['decode_tok_s']:.2f}x, "
                f"prefill time ratio {ours['prefill_s'] / official['prefill_s']:.2f}, "
                f"prefill peak-memory ratio {ours['prefill_peak_mib'] / max(official['prefill_peak_mib'], 1e-9):.2f}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench-mid"])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decode-prompt-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--live-peak", action="store_true", help="also count the exact live-tensor peak of a prefill")
    parser.add_argument("--official-python", help="interpreter with transformers 4.51.3 for the official side")
    parser.add_argument("--official-code", help="folder with the official configuration_umm.py / modeling_umm.py")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    sides = [("ours", sys.executable)]
    if args.official_code:
        sides.append(("official", args.official_python or sys.executable))
    rows = []
    for preset in args.presets:
        for implementation, python in sides:
            command = [python, __file__, "--child", preset, "--implementation", implementation]
            for name in (
                "prompt_tokens",
                "decode_prompt_tokens",
                "decode_tokens",
                "dtype",
                "repeats",
                "official_code",
            ):
                if getattr(args, name) is not None:
                    command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if args.live_peak:
                command.append("--live-peak")
            rows.append(child_result(command, f"{implementation} {preset}"))
    print_table(rows)


if __name__ == "__main__":
    main()
