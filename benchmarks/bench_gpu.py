"""Full-size benchmark on a GPU: the released Cheers architecture with random weights, built on the device in bf16.

    python benchmarks/bench_gpu.py                                   # full size, 512 px, 50 steps, guidance 9.5
    python benchmarks/bench_gpu.py --json gpu.json --repeats 5
    python benchmarks/bench_gpu.py --device cpu --preset tiny --resolution 64 --steps 1 --repeats 1 --no-compile

Nothing is downloaded: the "full" preset is the official release's `Training/cheers_config/config.json` mapped to
CheersConfig (Qwen2.5-1.5B, SigLIP2 so400m at 512 px, the FLUX.2 VAE; see `transformers_cheers.presets`), and the
model is built directly on the device in the benchmark dtype (bf16 on CUDA), never in fp32 on the CPU first. The
tokenizer is the official one vendored in tests/fixtures/golden/checkpoint.

Rows (each guarded: a failing variant prints its error in its row and the others still run):

* text-to-image through `CheersPipeline` (one prompt, classifier-free guidance batched as the pipeline does, final
  VAE decode included): seconds per image, peak memory, achieved TFLOP/s and its fraction of the GPU's bf16 dense
  peak; eager, with `torch.compile` on the velocity function (`model.model.compute_velocity`, one graph), and with
  `mode="reduce-overhead"` (CUDA graphs on a GPU);
* understanding: prefill of one image and a short prompt; decode tokens/s (greedy `generate`) with the dynamic cache,
  the static cache, and the static cache compiled by `generate` itself (its `CompileConfig`, "reduce-overhead": CUDA
  graphs on a GPU).

Achieved TFLOP/s = the analytic FLOP count of the call (`flop_count.py`: matrix work of every component, documented
there and in docs/benchmarks.md) / its median time. `--verify-flops` also counts one text-to-image call with
`torch.utils.flop_counter.FlopCounterMode` and prints counted / analytic. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA (weights included) and the resident-set growth during the call on a CPU.
Decode tokens/s = (N - 1) / (time of an N-token generation - time of a 1-token one), which removes the prefill.
Times are medians over --repeats after one warm-up call (whose time, compilation included, is the "first call").
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # flop_count, machine, bench_understanding

from bench_understanding import PeakMemory  # noqa: E402
from flop_count import prefill_flops, text_to_image_flops  # noqa: E402
from machine import machine_description  # noqa: E402


GOAL = "target: <= 1.5 s per 512 px image at 50 steps with guidance on an H200-class GPU"
PROMPT = "A red apple on a wooden table."
QUESTION = "Describe this image."
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "checkpoint"
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; matched as substrings of
# torch.cuda.get_device_name(), the longest name first ("H100 PCIe" before "H100", "L40S" before "L4").
BF16_DENSE_PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
# --rows key: the label printed in the table.
ROWS = {
    "t2i": "text-to-image, eager",
    "t2i-compiled": "text-to-image, compiled velocity",
    "t2i-cudagraphs": "text-to-image, compiled velocity, reduce-overhead",
    "prefill": "understanding prefill, eager",
    "decode": "decode, dynamic cache",
    "decode-static": "decode, static cache",
    "decode-compiled": "decode, static cache, compiled (reduce-overhead)",
}
COMPILED_ROWS = {"t2i-compiled", "t2i-cudagraphs", "decode-compiled"}


def bf16_peak_tflops(device_name: str) -> float | None:
    for name in sorted(BF16_DENSE_PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            return BF16_DENSE_PEAK_TFLOPS[name]
    return None


# ---- building the model ---------------------------------------------------------------------------------------------


def build(preset: str, device: torch.device, dtype: torch.dtype, resolution: int):
    """(model, processor, pipeline) with random weights, created on `device` in `dtype` (BatchNorm stats in fp32)."""
    from transformers_cheers import (
        CheersFlowMatchScheduler,
        CheersForConditionalGeneration,
        CheersPipeline,
        CheersProcessor,
    )
    from transformers_cheers.official_checkpoint import cast_like_from_pretrained, default_dtype
    from transformers_cheers.presets import preset_config
    from transformers_cheers.tiny import randomize_zero_initialised

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = CheersForConditionalGeneration(preset_config(preset))
    cast_like_from_pretrained(model, dtype)
    randomize_zero_initialised(model)  # adaLN-Zero heads would otherwise output exact zeros
    model.generation_config.eos_token_id = None  # random weights: decode exactly the tokens asked for
    processor = CheersProcessor.from_official_checkpoint(TOKENIZER_DIR)
    processor.image_processor.resolution = resolution
    pipe = CheersPipeline(model=model.eval(), processor=processor, scheduler=CheersFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return model, processor, pipe


# ---- measuring ------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is set on exit: max_memory_allocated on CUDA, resident growth on a CPU."""
    result = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        with PeakMemory() as memory:
            yield result
        result["bytes"] = memory.peak


def measure(run, device: torch.device, repeats: int) -> dict:
    """One warm-up call (compilation happens there), then the median of `repeats` calls and their peak memory."""
    first = timed(run, device)
    with peak_memory(device) as peak:
        seconds = [timed(run, device) for _ in range(repeats)]
    return {"seconds": statistics.median(seconds), "first_call_s": first, "peak_gib": peak["bytes"] / 2**30}


def with_throughput(result: dict, flops: int, peak_tflops: float | None) -> dict:
    tflops = flops / result["seconds"] / 1e12
    return {**result, "tflops": tflops, "peak_fraction": tflops / peak_tflops if peak_tflops else None}


@contextlib.contextmanager
def compiled_velocity(core, mode: str | None):
    """The pipeline's denoise loop calls `core.compute_velocity`: replace it by its compiled version for a while."""
    compiled = torch.compile(core.compute_velocity, mode=mode)

    def velocity(*args, **kwargs):
        if mode == "reduce-overhead":  # each step is a new iteration: earlier CUDA-graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    core.compute_velocity = velocity
    try:
        yield
    finally:
        del core.compute_velocity  # back to the class's method
        torch._dynamo.reset()


class Benchmark:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.model, self.processor, self.pipe = build(args.preset, device, dtype, args.resolution)
        self.config = self.model.config
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        self.peak_tflops = bf16_peak_tflops(self.device_name) if device.type == "cuda" else None
        text = self.processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        self.prompt_length = self.processor(text=text, generation_mode="image")["input_ids"].shape[1]
        self.t2i_flops = text_to_image_flops(
            self.config, args.resolution, args.steps, args.guidance != 1.0, self.prompt_length
        )

    # -- text-to-image

    def text_to_image(self):
        return self.pipe(
            PROMPT,
            height=self.args.resolution,
            width=self.args.resolution,
            num_inference_steps=self.args.steps,
            guidance_scale=self.args.guidance,
            generator=torch.Generator(self.device).manual_seed(0),
            output_type="pt",
        ).images

    def text_to_image_row(self, compile_mode: str | None = None, compiled: bool = False) -> dict:
        context = compiled_velocity(self.model.model, compile_mode) if compiled else contextlib.nullcontext()
        with context:
            result = measure(self.text_to_image, self.device, self.args.repeats)
        return {**with_throughput(result, sum(self.t2i_flops.values()), self.peak_tflops), "unit": "s/image"}

    def counted_text_to_image_flops(self) -> int:
        """FLOPs of one text-to-image call as FlopCounterMode counts them (SDPA as its math form on CPUs, whose
        fused SDPA kernel the counter does not know)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        math_sdpa = sdpa_kernel(SDPBackend.MATH) if self.device.type == "cpu" else contextlib.nullcontext()
        with math_sdpa, FlopCounterMode(display=False) as counter:
            self.text_to_image()
        return counter.get_total_flops()

    # -- understanding

    def understanding_inputs(self) -> dict:
        side = self.args.resolution
        image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))
        content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(text=text, images=[image], resolution=side, return_tensors="pt")
        return {key: value.to(self.device) for key, value in inputs.items()}

    def prefill_row(self) -> dict:
        inputs = self.understanding_inputs()
        flops = prefill_flops(self.config, self.args.resolution, inputs["input_ids"].shape[1])

        def prefill():
            with torch.inference_mode():
                self.model(**inputs, use_cache=True, logits_to_keep=1)

        result = measure(prefill, self.device, self.args.repeats)
        return {**with_throughput(result, sum(flops.values()), self.peak_tflops), "unit": "s"}

    def decode_row(self, **generate_kwargs) -> dict:
        inputs = self.understanding_inputs()
        tokens = self.args.decode_tokens

        def generate(max_new_tokens: int):
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs
                )
            if output.shape[1] - inputs["input_ids"].shape[1] != max_new_tokens:
                raise RuntimeError(f"generate stopped early: {output.shape[1]} tokens")

        first = timed(lambda: generate(tokens), self.device)  # warm-up: compiles where asked
        rates = []
        with peak_memory(self.device) as peak:
            for _ in range(self.args.repeats):
                one_token = timed(lambda: generate(1), self.device)
                extra = timed(lambda: generate(tokens), self.device) - one_token
                if extra <= 0:
                    raise RuntimeError(
                        f"a {tokens}-token generation was not slower than a 1-token one (timing noise): raise "
                        "--decode-tokens"
                    )
                rates.append((tokens - 1) / extra)
        rate = statistics.median(rates)
        return {
            "seconds": 1 / rate,
            "unit": "s/token",
            "tokens_per_s": rate,
            "first_call_s": first,
            "peak_gib": peak["bytes"] / 2**30,
        }

    def static_compile_config(self):
        from transformers import CompileConfig

        config = CompileConfig()  # mode "reduce-overhead": CUDA graphs on a GPU
        config._compile_all_devices = True  # generate compiles on CUDA by itself; let it on a CPU too
        return config

    # -- all rows

    def measurements(self) -> dict:
        return {
            "t2i": lambda: self.text_to_image_row(),
            "t2i-compiled": lambda: self.text_to_image_row(None, compiled=True),
            "t2i-cudagraphs": lambda: self.text_to_image_row("reduce-overhead", compiled=True),
            "prefill": self.prefill_row,
            "decode": lambda: self.decode_row(),
            "decode-static": lambda: self.decode_row(cache_implementation="static", disable_compile=True),
            "decode-compiled": lambda: self.decode_row(
                cache_implementation="static", compile_config=self.static_compile_config()
            ),
        }

    def run(self) -> list[dict]:
        rows = []
        for key, measurement in self.measurements().items():
            row = {"name": ROWS[key]}
            if key not in self.args.rows:
                row["status"] = "skipped (not in --rows)"
            elif self.args.no_compile and key in COMPILED_ROWS:
                row["status"] = "skipped (--no-compile)"
            else:
                row.update(guarded(measurement, self.device))
            rows.append(row)
            print_row(row, flush=True)
        return rows


def guarded(measurement, device: torch.device) -> dict:
    """Run one variant; any failure (a compiler error, out of memory...) becomes its row, so the others still run."""
    try:
        return {"status": "ok", **measurement()}
    except Exception as error:  # noqa: BLE001 - deliberately broad: one broken variant must not end the benchmark
        traceback.print_exc(file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "status": "error",
            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        }


# ---- reporting ------------------------------------------------------------------------------------------------------


def machine(bench: Benchmark) -> dict:
    import diffusers
    import transformers

    return {
        "device": bench.device_name,
        "machine": machine_description(),
        "bf16_dense_peak_tflops": bench.peak_tflops,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }


def format_row(row: dict) -> str:
    name = f"{row['name']:<50}"
    if row["status"] != "ok":
        return f"{name} {row['status']}{': ' + row['error'] if 'error' in row else ''}"
    if row["unit"] == "s/token":
        value = f"{row['seconds'] * 1e3:9.2f} ms/token ({row['tokens_per_s']:.1f} tok/s)"
    else:
        value = f"{row['seconds']:9.3f} {row['unit']}"
    tflops = f"{row['tflops']:8.1f}" if "tflops" in row else f"{'-':>8}"
    fraction = row.get("peak_fraction")
    fraction = f"{fraction:9.1%}" if fraction is not None else f"{'n/a':>9}"
    return f"{name} {value:<34} {row['peak_gib']:8.2f} {tflops} {fraction} {row['first_call_s']:9.1f}"


def header() -> str:
    return f"{'row':<50} {'time':<34} {'peak GiB':>8} {'TFLOP/s':>8} {'% peak':>9} {'first (s)':>9}"


def print_row(row: dict, flush: bool = False) -> None:
    print(format_row(row), flush=flush)


def print_report(bench: Benchmark, rows: list[dict], counted_flops: int | None) -> None:
    args, info = bench.args, machine(bench)
    params = sum(p.numel() for p in bench.model.parameters()) / 1e9
    print()
    print(GOAL)
    print(
        f"device: {info['device']} (bf16 dense peak: {info['bf16_dense_peak_tflops'] or 'n/a'} TFLOP/s); "
        f"{info['machine']} (CUDA {info['cuda']}), transformers {info['transformers']}, diffusers {info['diffusers']}"
    )
    print(
        f"preset {args.preset} ({params:.2f} B parameters, {args.dtype}), {args.resolution} px, {args.steps} steps, "
        f"guidance {args.guidance}, prompt {bench.prompt_length} tokens, decode {args.decode_tokens} tokens, "
        f"median of {args.repeats}"
    )
    total = sum(bench.t2i_flops.values())
    parts = ", ".join(f"{name} {flops / total:.1%}" for name, flops in bench.t2i_flops.items())
    print(f"text-to-image FLOPs per image: {total / 1e12:.2f} TFLOP ({parts})")
    if counted_flops is not None:
        print(
            f"FlopCounterMode counted {counted_flops / 1e12:.4f} TFLOP: counted / analytic = {counted_flops / total:.4f}"
        )
    print(header())
    for row in rows:
        print_row(row)


def write_json(path: str, bench: Benchmark, rows: list[dict], counted_flops: int | None) -> None:
    args = bench.args
    report = {
        "goal": GOAL,
        "machine": machine(bench),
        "settings": {
            "preset": args.preset,
            "dtype": args.dtype,
            "resolution": args.resolution,
            "steps": args.steps,
            "guidance": args.guidance,
            "repeats": args.repeats,
            "decode_tokens": args.decode_tokens,
            "prompt_tokens": bench.prompt_length,
            "compile": not args.no_compile,
        },
        "text_to_image_flops": bench.t2i_flops,
        "counted_text_to_image_flops": counted_flops,
        "rows": rows,
    }
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


# ---- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="full", choices=["full", "bench-mid", "tiny"])
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bf16 where the device computes it natively, else fp32 (transformers_cheers.cpu_bf16.preferred_dtype)",
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="measure these rows only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--verify-flops", action="store_true", help="count one text-to-image call with FlopCounterMode"
    )
    parser.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}). Run on a machine with an NVIDIA GPU, or pass --device cpu --preset tiny for a "
            "smoke run."
        )
    if args.resolution <= 0 or args.resolution % 32:
        parser.error(
            f"--resolution must be a positive multiple of 32 (SigLIP patch x token merge), got {args.resolution}."
        )
    if args.steps < 1 or args.repeats < 1 or args.decode_tokens < 2:
        parser.error(
            "--steps and --repeats must be >= 1, --decode-tokens >= 2 (decode rate = extra tokens / extra time)."
        )
    if args.dtype == "auto":
        from transformers_cheers.cpu_bf16 import preferred_dtype

        args.dtype = str(preferred_dtype(device)).removeprefix("torch.")
    return args, device


def main(argv=None) -> list[dict]:
    args, device = parse_args(argv)
    print(GOAL, flush=True)
    bench = Benchmark(args, device, getattr(torch, args.dtype))
    print(header(), flush=True)
    rows = bench.run()
    counted = bench.counted_text_to_image_flops() if args.verify_flops else None
    for row in rows:  # JSON has no NaN / infinity: a non-finite figure means a broken measurement
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row.update(status="error", error=f"non-finite {key}: {value}")
    print_report(bench, rows, counted)
    if args.json:
        write_json(args.json, bench, rows, counted)
    return rows


if __name__ == "__main__":
    main()
