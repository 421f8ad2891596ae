"""Text-to-image benchmark: seconds per image (median) and peak memory, optionally side by side with the official code.

    python benchmarks/bench_t2i.py                                    # bench-mid preset, 256 px, 8 steps, CFG 9.5
    python benchmarks/bench_t2i.py --preset tiny --size 64 --steps 4 --batch 2

Side by side on the SAME random weights and the same initial noise (the official model is built first and exported in
its own layout, which ours loads through the official-checkpoint mapping), reporting the relative L2 distance of the
decoded images:

    python benchmarks/bench_t2i.py --official-python /path/to/venv-4.51/bin/python \\
        --official-code /path/to/Cheers/Training/cheers_config

In float32 the official side runs with its two hard-coded bfloat16 activation casts following the dtype (measurement
only, `official_code.py`); as shipped it cannot run in float32. `--fast-decoders` adds a row of ours with fused
kernels, channels-last activations and both decoders compiled, beside the default row.

The official `generate` handles one prompt at a time, so the official side always runs batch 1. Both sides get the
official dummy context image (the official code cannot run without it). Each side runs in a fresh process. Two
memory figures: RSS peak, the highest resident set size during a generation minus the size before it (what the
process holds, allocator caches included; noisy), and live peak, the exact maximum of live tensor bytes counted in one
extra untimed run (`live_memory.LiveTensorMemory`, the CPU analogue of `torch.cuda.max_memory_allocated`).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_understanding import PeakMemory, child_result
from live_memory import LiveTensorMemory
from machine import machine_description


PROMPT = "A red apple on a wooden table."
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "checkpoint"
FAST = "ours-fast"  # the row of --fast-decoders
FAST_DESCRIPTION = "fused kernels (no bf16 parity), channels-last and torch.compile on both VAE decoders"


def draw_official_noise(shape, dtype, guided: bool):
    """The official generate draws x0 for every prefill (unused at t = 1) before the initial noise."""
    import torch

    for _ in range(2 if guided else 1):
        torch.randn(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype)


def compile_decoders(model) -> None:
    """diffusers' speed recipe for VAE decoders, applied to both of ours (the decoder projector runs at every step):
    channels-last activations and `torch.compile` with weight freezing (inductor pre-packs the convolution weights)."""
    import torch
    import torch._inductor.config

    torch._inductor.config.freezing = True  # inference only: the weights become constants
    for module in (model.model.vae_decoder_projector, model.model.vae):
        module.decoder.to(memory_format=torch.channels_last)
        module.decoder = torch.compile(module.decoder)


def run_ours(args, work: Path) -> dict:
    import torch

    from transformers_cheers import (
        CheersFlowMatchScheduler,
        CheersForConditionalGeneration,
        CheersPipeline,
        CheersProcessor,
    )
    from transformers_cheers.official_checkpoint import load_official_checkpoint
    from transformers_cheers.presets import preset_config
    from transformers_cheers.processing_cheers import official_dummy_image

    dtype = getattr(torch, args.dtype)
    fast = args.implementation == FAST
    if (work / "config.json").exists():
        model = load_official_checkpoint(work, dtype=dtype, vae_unfused_kernels=not fast)
    else:
        torch.manual_seed(0)
        config = preset_config(args.preset, vae_unfused_kernels=not fast)
        model = CheersForConditionalGeneration(config).to(dtype).eval()
    processor = CheersProcessor.from_official_checkpoint(TOKENIZER_DIR)
    processor.image_processor.resolution = args.size
    pipe = CheersPipeline(
        model=model, processor=processor, scheduler=CheersFlowMatchScheduler(time_shift=args.time_shift)
    )
    pipe.set_progress_bar_config(disable=True)
    if fast:
        compile_decoders(model)
    if args.vae_slicing:  # diffusers' autoencoder API on both decoders: one image at a time
        model.model.vae.enable_slicing()
        model.model.vae_decoder_projector.enable_slicing()
    grid = args.size // model.config.vision_config.patch_size
    shape = (1, model.config.latent_channels, grid, grid)
    kwargs = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.size,
        "width": args.size,
        "output_type": "latent",
        "context_image": official_dummy_image(0),
    }
    seconds, peaks = [], []
    for repeat in range(args.repeats + 1):  # the first run warms up
        torch.manual_seed(repeat)
        noise = torch.cat([draw_official_noise(shape, dtype, args.guidance != 1.0) for _ in range(args.batch)])
        with PeakMemory() as memory:
            start = time.perf_counter()
            latents = pipe([PROMPT] * args.batch, latents=noise, **kwargs).images
            pixels = model.model.decode_latents(latents)
            elapsed = time.perf_counter() - start
        if repeat:
            seconds.append(elapsed / args.batch)
            peaks.append(memory.peak)
    torch.save(latents[:1].float(), work / f"{args.implementation}_latent.pt")
    del pixels, latents
    with LiveTensorMemory() as live:  # a run of its own: counting every operator slows it down
        latents = pipe([PROMPT] * args.batch, latents=noise, **kwargs).images
        model.model.decode_latents(latents)
    return {
        "seconds_per_image": statistics.median(seconds),
        "peak_mib": statistics.median(peaks) / 2**20,
        "live_peak_mib": live.peak / 2**20,
    }


def run_official(args, work: Path) -> dict:
    import torch
    from official_code import import_official
    from safetensors.torch import save_file
    from transformers_cheers_bench_presets import official_config

    configuration, modeling = import_official(args.official_code, args.dtype, work)
    settings = official_config(args.preset)
    torch.manual_seed(0)
    model = modeling.Cheers(configuration.UMMConfig(**settings))
    state = {
        key: value.to(torch.bfloat16) if value.is_floating_point() else value
        for key, value in model.state_dict().items()
    }
    save_file({key: value.contiguous() for key, value in state.items()}, work / "model.safetensors")
    (work / "config.json").write_text(json.dumps({**settings, "model_type": "umm"}))
    model = model.to(getattr(torch, args.dtype)).eval()
    # Same weights on both sides: the export is bf16, so load those values back into the official model too.
    model.load_state_dict({key: value.to(getattr(torch, args.dtype)) for key, value in state.items()}, strict=False)
    inputs = torch.load(work / "official_inputs.pt")
    dtype = getattr(torch, args.dtype)
    image_tokens = (args.size // 32) ** 2

    def generate():
        return model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(dtype),
            grid_hws=inputs["grid_hws"],
            max_length=image_tokens - 1,  # stop right after the image
            cfg_scale=args.guidance,
            temperature=0.0,
            num_inference_steps=args.steps,
            alpha=args.time_shift,
            edit_image=False,
        )

    seconds, peaks = [], []
    for repeat in range(args.repeats + 1):  # the first run warms up
        torch.manual_seed(repeat)
        with PeakMemory() as memory, torch.no_grad():
            start = time.perf_counter()
            output = generate()
            elapsed = time.perf_counter() - start
        if repeat:
            seconds.append(elapsed)
            peaks.append(memory.peak)
    torch.save(output["images"][0].float(), work / "official_image.pt")
    del output
    torch.manual_seed(args.repeats)
    with LiveTensorMemory() as live, torch.no_grad():  # a run of its own: counting every operator slows it down
        generate()
    return {
        "seconds_per_image": statistics.median(seconds),
        "peak_mib": statistics.median(peaks) / 2**20,
        "live_peak_mib": live.peak / 2**20,
    }


def official_inputs(args, work: Path) -> None:
    """The official prompt ids (template + <im_start>) and its dummy image pixels, built with our processor
    (parity-tested against the official processor)."""
    import torch

    from transformers_cheers import CheersProcessor
    from transformers_cheers.processing_cheers import official_dummy_image

    processor = CheersProcessor.from_official_checkpoint(TOKENIZER_DIR)
    text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = processor(text=text, generation_mode="image")
    pixels = processor.image_processor(official_dummy_image(0), resolution=args.size)
    grid = args.size // 16
    torch.save(
        {
            "input_ids": ids["input_ids"],
            "attention_mask": ids["attention_mask"],
            "pixel_values": pixels["pixel_values"],
            "grid_hws": torch.tensor([[grid, grid]]),
        },
        work / "official_inputs.pt",
    )


def child(args) -> None:
    work = Path(args.work)
    result = run_official(args, work) if args.implementation == "official" else run_ours(args, work)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--time-shift", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--fast-decoders",
        action="store_true",
        help=f"also a row of ours with {FAST_DESCRIPTION}",
    )
    parser.add_argument(
        "--vae-slicing", action="store_true", help="ours: decoder projector and VAE decode one image at a time"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-python", help="interpreter with transformers 4.51.3 for the official side")
    parser.add_argument("--official-code", help="folder with the official configuration_umm.py / modeling_umm.py")
    parser.add_argument("--implementation", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.implementation:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_t2i_"))
    passed = [
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if v is not None and v is not False and k not in ("official_python",)
    ]
    rows = {}
    sides = [("official", args.official_python or sys.executable)] if args.official_code else []
    sides.append(("ours", sys.executable))
    if args.fast_decoders:
        sides.append((FAST, sys.executable))
    if args.official_code:
        official_inputs(args, work)
    for implementation, python in sides:
        extra = ["--batch=1"] if implementation == "official" else []
        command = [python, __file__, *passed, *extra, f"--implementation={implementation}", f"--work={work}"]
        rows[implementation] = child_result(command, implementation)
    print_report(args, rows, work)


def print_report(args, rows, work: Path) -> None:
    print(
        f"preset {args.preset}, {args.size} px, {args.steps} steps, guidance {args.guidance}, {args.dtype}, "
        f"batch {args.batch} (official: 1), median of {args.repeats}"
        + (", ours with VAE slicing" if args.vae_slicing else "")
    )
    print(machine_description())
    print(f"{'impl':<10} {'s/image':>9} {'RSS peak MiB':>13} {'live peak MiB':>14}")
    for name, row in rows.items():
        print(f"{name:<10} {row['seconds_per_image']:>9.2f} {row['peak_mib']:>13.1f} {row['live_peak_mib']:>14.1f}")
    if FAST in rows:
        print(f"{FAST}: {FAST_DESCRIPTION}")
    if "official" in rows:
        import torch

        from transformers_cheers.official_checkpoint import load_official_checkpoint

        model = load_official_checkpoint(work, dtype=getattr(torch, args.dtype))
        official = torch.load(work / "official_image.pt")
        for name in [name for name in rows if name != "official"]:
            ours = model.model.decode_latents(torch.load(work / f"{name}_latent.pt").to(model.dtype)).float()
            distance = ((ours - official).norm() / official.norm()).item()
            speed = rows["official"]["seconds_per_image"] / rows[name]["seconds_per_image"]
            print(
                f"{name}: speed-up {speed:.2f}x; decoded images: relative L2 {distance:.2e} (same weights and noise)"
            )


if __name__ == "__main__":
    main()
