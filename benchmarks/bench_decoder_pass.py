"""One decoder-projector pass (latent -> pixels, a full VAE decoder), ours against the official code's, in fp32.

    python benchmarks/bench_decoder_pass.py --official-python /path/to/venv-4.51/bin/python \\
        --official-code /path/to/Cheers/Training/cheers_config

Text-to-image spends most of its time in this pass (the vision tokenizer runs it on x_t at every step, and the final
decode is the same decoder), so this isolates the module both sides share, in fp32 (on CPUs without native bf16 the
official bf16 convolutions run through PyTorch's slow reference kernels; `bench_t2i.py` gives the end-to-end ratio,
with the official file's bf16 casts following fp32 as `official_code.py` explains). Each side runs in its own
interpreter on random weights (speed and memory do not depend on the values; numerical parity of the pass is what the
test suite checks). Variants of ours: the default (parity kernels: SiLU as x*sigmoid(x), 1x1-convolution attention
projections), fused kernels (`vae_unfused_kernels=False`), and fused kernels with channels-last activations, and with
`--compile` that last variant under `torch.compile` (inductor with weight freezing, the inference setting that
pre-packs convolution weights for oneDNN on a CPU; its first call, which compiles, is printed apart). Prints the median
seconds and the exact live-tensor peak of one pass.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from live_memory import LiveTensorMemory


HERE = Path(__file__).resolve().parent


def time_and_memory(module, latents, repeats: int) -> dict:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        module(latents)  # warm-up (compilation, for a compiled module)
        first_call = time.perf_counter() - start
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(latents)
            seconds.append(time.perf_counter() - start)
        with LiveTensorMemory() as live:
            module(latents)
    return {"seconds": statistics.median(seconds), "live_peak_mib": live.peak / 2**20, "first_call": first_call}


def run_ours(args) -> dict:
    import torch

    from transformers_cheers.presets import preset_config
    from transformers_cheers.vision_tokenizer import CheersDecoderProjector

    variants = [
        ("ours, parity kernels (default)", True, False, False),
        ("ours, fused kernels", False, False, False),
        ("ours, fused kernels + channels_last", False, True, False),
    ]
    if args.compile:
        variants.append(("ours, fused + channels_last, compiled", False, True, True))
    results = {}
    for name, unfused, channels_last, compiled in variants:
        torch.manual_seed(0)
        config = preset_config(args.preset, vae_unfused_kernels=unfused)
        module = CheersDecoderProjector(config).eval()
        if unfused:
            from transformers_cheers.vae_numerics import use_unfused_vae_kernels

            use_unfused_vae_kernels(module)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        latents = torch.randn(1, config.latent_channels, grid, grid)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
            latents = latents.to(memory_format=torch.channels_last)
        if compiled:
            import torch._inductor.config

            torch._inductor.config.freezing = True  # inference only: weights become constants, pre-packed
            module = torch.compile(module)
        results[name] = time_and_memory(module, latents, args.repeats)
    return results


def run_official(args) -> dict:
    import torch
    from official_code import import_official
    from transformers_cheers_bench_presets import official_config

    configuration, modeling = import_official(args.official_code)
    config = configuration.UMMConfig(**official_config(args.preset))
    torch.manual_seed(0)
    module = modeling.VAEDecoderProjector(config).eval()
    vision = config.vision_representation_config
    grid = vision.image_size // vision.patch_size
    latents = torch.randn(1, 4 * config.vae_encoder_config.z_channels, grid, grid)
    return {"official": time_and_memory(module, latents, args.repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile variant (minutes to compile)")
    parser.add_argument("--official-python", help="interpreter with transformers 4.51.3 for the official side")
    parser.add_argument("--official-code", help="folder with the official configuration_umm.py / modeling_umm.py")
    parser.add_argument("--side", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_ours(args) if args.side == "ours" else run_official(args)))
        return
    from machine import machine_description

    sides = [("ours", sys.executable)]
    if args.official_code:
        sides.insert(0, ("official", args.official_python or sys.executable))
    rows = {}
    for side, python in sides:
        command = [python, __file__, f"--preset={args.preset}", f"--repeats={args.repeats}", f"--side={side}"]
        if args.compile and side == "ours":
            command.append("--compile")
        if args.official_code:
            command.append(f"--official-code={args.official_code}")
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
        if result.returncode:
            sys.exit(f"{side} failed:\n{result.stderr[-3000:]}")
        rows.update(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"one decoder-projector pass, preset {args.preset}, fp32, batch 1, median of {args.repeats}")
    print(machine_description())
    reference = rows.get("official")
    print(f"| {'implementation':<40} | s/pass | live peak MiB | speed vs official | first call s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = f"{reference['seconds'] / row['seconds']:.2f}x" if reference else "n/a"
        print(
            f"| {name:<40} | {row['seconds']:.2f} | {row['live_peak_mib']:.0f} | {ratio} | {row['first_call']:.1f} |"
        )


if __name__ == "__main__":
    main()
