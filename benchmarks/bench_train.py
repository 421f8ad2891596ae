"""Training benchmark: samples/s and peak memory of one optimizer step, per preset, with and without gradient
checkpointing.

    python benchmarks/bench_train.py                                   # tiny and bench-mid, LoRA, fp32, CPU
    python benchmarks/bench_train.py --modes lora full --batch-size 4 --steps 5
    python benchmarks/bench_train.py --presets bench-mid --device cuda --dtype bfloat16

Each measurement runs in a fresh process on randomly initialised weights, with a fixed batch mixing understanding,
generation and text-only samples (built by the training collator at the preset's resolution). A step is
forward (official objective) + backward + AdamW. Modes: `lora` = the `llm_heads` preset (r 16), `full` = the
official "sft" stage (everything but the VAE). Peak memory: on CUDA `torch.cuda.max_memory_allocated` during the
timed steps; on CPU the highest resident set size sampled during them minus the resident size just before (it
includes the activations, gradients and optimizer state created by the first timed step only if no warm-up ran,
so it is mostly activations + gradients). Figures are medians over --repeats; machines are noisy, compare ratios.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_understanding import PeakMemory  # noqa: E402


def child(settings: dict) -> dict:
    import torch

    from transformers_cheers import CheersForConditionalGeneration
    from transformers_cheers.data import CheersTrainingCollator, load_conversation_dataset, make_synthetic_dataset
    from transformers_cheers.lora import apply_lora, set_trainable_stage
    from transformers_cheers.presets import PRESETS, preset_config
    from transformers_cheers.tiny import special_token_ids, tiny_processor

    torch.manual_seed(0)
    processor = tiny_processor()  # byte-level tokenizer; the config takes its special-token ids
    resolution = PRESETS[settings["preset"]].get("vision_config", {}).get("image_size", 512)
    processor.image_processor.resolution = resolution
    ids = special_token_ids(processor)
    device = torch.device(settings["device"])
    dtype = getattr(torch, settings["dtype"])
    model = CheersForConditionalGeneration(preset_config(settings["preset"], **ids)).to(device=device, dtype=dtype)
    if settings["mode"] == "lora":
        model = apply_lora(model, "llm_heads", gradient_checkpointing=settings["checkpointing"])
    else:
        set_trainable_stage(model, "sft")
        if settings["checkpointing"]:
            model.activation_checkpointing_enable()
    model.train()
    with tempfile.TemporaryDirectory() as folder:
        batch_size = settings["batch_size"]
        counts = (batch_size - 2 * (batch_size // 3), batch_size // 3, batch_size // 3)  # und, gen, text
        dataset = load_conversation_dataset(make_synthetic_dataset(folder, *counts, image_size=resolution))
        collator = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0)
        batch = collator([dataset[index] for index in range(len(dataset))])
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step():
        output = model(**batch, use_cache=False)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(settings["warmup"]):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    with PeakMemory() as memory:
        start = time.perf_counter()
        for _ in range(settings["steps"]):
            loss = step()
        synchronize()
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - start_memory if device.type == "cuda" else memory.peak
    return {
        "samples_per_second": batch_size * settings["steps"] / elapsed,
        "seconds_per_step": elapsed / settings["steps"],
        "peak_memory_mb": peak / 2**20,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "trainable_parameters": sum(parameter.numel() for parameter in parameters),
        "loss": float(loss),
    }


def measure(settings: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(settings)], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"{settings} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench-mid"])
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora"])
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows = []
    for preset in args.presets:
        for mode in args.modes:
            for checkpointing in (False, True):
                settings = {
                    "preset": preset,
                    "mode": mode,
                    "checkpointing": checkpointing,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "device": args.device,
                    "dtype": args.dtype,
                }
                runs = [measure(settings) for _ in range(args.repeats)]
                row = {**settings, **{key: statistics.median(run[key] for run in runs) for key in runs[0]}}
                rows.append(row)
                print(f"  measured {preset} {mode} checkpointing={checkpointing}", file=sys.stderr, flush=True)

    header = "| preset | mode | grad. checkpointing | seq. len | samples/s | s/step | peak memory (MiB) | trainable |"
    print(
        f"\nbatch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, {args.device} {args.dtype}"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(
            f"| {row['preset']} | {row['mode']} | {'on' if row['checkpointing'] else 'off'} | "
            f"{row['sequence_length']:.0f} | {row['samples_per_second']:.2f} | {row['seconds_per_step']:.3f} | "
            f"{row['peak_memory_mb']:.0f} | {row['trainable_parameters']:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
