"""Text-to-image for a file of prompts, split across processes with 🤗 Accelerate: one PNG per prompt, a manifest,
resumable, and the same image for a prompt and seed whatever the number of processes.

    python examples/generate_distributed.py --prompts prompts.txt --output-dir out      # one process, tiny model
    accelerate launch --num_processes 8 examples/generate_distributed.py --model ./cheers-hf \\
        --prompts prompts.jsonl --output-dir out                                         # 8 GPUs, one process each
    accelerate launch --multi_gpu --num_processes 2 examples/generate_distributed.py --cpu \\
        --prompts prompts.txt --output-dir out                                           # 2 CPU processes (gloo)

Prompts: a .txt file (one prompt per line; blank lines are skipped) or a .jsonl file, one object per line:
{"prompt": "...", "seed": 7, "negative_prompt": "..."} ("seed" and "negative_prompt" are optional).

Seeds: a prompt's seed is its "seed" from the jsonl, else `--seed + index`, where index is the prompt's position in
the file (0-based, blank lines not counted). Each image is drawn alone (batch 1) with a generator on the process's
device seeded with that seed, so an image depends only on its prompt, seed and the settings, never on how the prompts
were split.

Output (in --output-dir):
  NNNNNN-HASH.png             one per prompt: the index, and a hash of (prompt, negative prompt, seed), so an edited
                              prompt file never mistakes an old image for a new prompt's.
  manifest.jsonl              one line per finished prompt, in file order: index, prompt, negative_prompt, seed, file,
                              seconds, process_index, finished_at. Written by the main process at the end.
  manifest-parts/process-N.jsonl  what process N finished (appended, one line per image; the manifest is built from
                              these, so no two processes ever write the same file).
  generation_settings.json    model, device type, dtype, steps, guidance, time shift and size of the first run; a
                              later run with others stops (its images would not match those already there).

Resuming: a prompt is done when its PNG exists. A PNG is written under a temporary name, its manifest-parts line is
appended, and only then is it renamed into place: a crash leaves no PNG that looks finished, and no finished PNG
without its line. Rerun the same command to finish the rest.

--model takes a converted Cheers folder (or Hub id) or a pipeline folder (with model_index.json). With no --model the
weights are random (transformers_cheers.tiny, the same on every process), so the pictures are noise: the point is
that the whole path runs anywhere, offline.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers.utils import logging as transformers_logging

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersPipeline,
)
from transformers_cheers.cpu_bf16 import preferred_dtype
from transformers_cheers.tiny import tiny_cheers


TINY_MODEL = "tiny-random"  # what generation_settings.json records for the built-in random model
JSONL_KEYS = {"prompt", "seed", "negative_prompt"}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
MANIFEST = "manifest.jsonl"
MANIFEST_PARTS = "manifest-parts"
SETTINGS = "generation_settings.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class InputError(ValueError):
    """Bad input the user can fix; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class PromptJob:
    index: int
    prompt: str
    seed: int
    negative_prompt: str | None = None

    @property
    def file(self) -> str:
        key = json.dumps([self.prompt, self.negative_prompt, self.seed], ensure_ascii=False)
        return f"{self.index:06d}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.png"


# ---- prompts ---------------------------------------------------------------------------------------------------------


def read_prompts(path: Path, base_seed: int, negative_prompt: str | None = None) -> list[PromptJob]:
    """The prompts of a .txt or .jsonl file, with their seeds (the jsonl's, else base_seed + index) and negative
    prompts (the jsonl's, else `negative_prompt`)."""
    if path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"{path}: use a .txt file (one prompt per line) or a .jsonl file (one JSON object per line).")
    if not path.is_file():
        raise InputError(f"prompt file {path} not found: pass an existing file with --prompts.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error.reason}): save it as UTF-8.") from None
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise InputError(f"prompt file {path} has no prompts: write one prompt per line.")
    if path.suffix == ".txt":
        entries = [{"prompt": line} for _, line in numbered]
    else:
        entries = [parse_jsonl_line(path, number, line) for number, line in numbered]
    jobs = []
    for index, entry in enumerate(entries):
        seed = entry["seed"] if entry.get("seed") is not None else base_seed + index
        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed {seed} of prompt {index} is outside [0, 2**64 - 1]: pass a smaller --seed.")
        jobs.append(PromptJob(index, entry["prompt"], seed, entry.get("negative_prompt") or negative_prompt))
    return jobs


def parse_jsonl_line(path: Path, number: int, line: str) -> dict:
    where = f"{path}:{number}"
    example = '{"prompt": "A red apple.", "seed": 0}'
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{where}: not valid JSON ({error.msg}); write one object per line, e.g. {example}."
        ) from None
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a JSON object such as {example}, got {type(entry).__name__}.")
    unknown = set(entry) - JSONL_KEYS
    if unknown:
        raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; the keys are {sorted(JSONL_KEYS)}.")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise InputError(f'{where}: needs a non-empty "prompt" string, e.g. {example}.')
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InputError(f'{where}: "seed" must be an integer in [0, 2**64 - 1], got {seed!r}.')
    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InputError(f'{where}: "negative_prompt" must be a string, got {type(negative).__name__}.')
    return entry


# ---- output folder ---------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: Path) -> None:
    """Create the folder (and its manifest-parts folder) and check that files can be created in it."""
    try:
        (output_dir / MANIFEST_PARTS).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise InputError(
            f"output directory {output_dir} is not writable ({error.strerror or error}): pass another --output-dir "
            "or fix its permissions."
        ) from None


def check_settings(output_dir: Path, settings: dict) -> None:
    """Refuse to add images made with other settings to a folder (the skipped ones would not match them)."""
    path = output_dir / SETTINGS
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    changed = {key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key)}
    if changed:
        differences = ", ".join(
            f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now" for key in sorted(changed)
        )
        raise InputError(
            f"{output_dir} holds images made with other settings ({differences}): pass the same settings to resume, "
            "or another --output-dir."
        )


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_image(image, record: dict, output_dir: Path, part: Path) -> None:
    """PNG under a temporary name, then its manifest line, then the rename: the PNG's existence means 'done'."""
    final = output_dir / record["file"]
    temporary = final.with_name(f".{final.name}.partial")
    image.save(temporary, format="PNG")
    with part.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, final)


def merge_manifest(output_dir: Path, jobs: list[PromptJob]) -> list[dict]:
    """manifest.jsonl: one line per prompt whose PNG exists, in file order, from every process's manifest part."""
    timings = {}
    for part in sorted((output_dir / MANIFEST_PARTS).glob("process-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its PNG was never renamed into place
            previous = timings.get(record["file"])
            if previous is None or record["finished_at"] > previous["finished_at"]:  # a regenerated image wins
                timings[record["file"]] = record
    records = []
    for job in jobs:
        if not (output_dir / job.file).is_file():
            continue
        timing = timings.get(job.file, {})  # empty only if manifest-parts was deleted by hand
        records.append(
            {
                **job_fields(job),
                "seconds": timing.get("seconds"),
                "process_index": timing.get("process_index"),
                "finished_at": timing.get("finished_at"),
            }
        )
    write_atomically(output_dir / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def job_fields(job: PromptJob) -> dict:
    return {
        "index": job.index,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "file": job.file,
    }


# ---- model -----------------------------------------------------------------------------------------------------------


def load_pipeline(model_path: str | None, dtype: torch.dtype, device: torch.device) -> CheersPipeline:
    """A pipeline on `device` from a converted model folder, a pipeline folder or Hub id, or the tiny random model
    (seeded: the same on every process)."""
    if model_path is None:
        model, processor = tiny_cheers(dtype=dtype)
        pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    else:
        pipe = CheersPipeline.from_pretrained(model_path, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: CheersPipeline, job: PromptJob, args, device: torch.device):
    return pipe(
        job.prompt,
        negative_prompt=job.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        time_shift=args.time_shift,
        height=args.size,
        width=args.size,
        generator=torch.Generator(device=device).manual_seed(job.seed),
    ).images[0]


# ---- run -------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, required=True, help=".txt (one prompt per line) or .jsonl file")
    parser.add_argument("--output-dir", type=Path, required=True, help="PNGs, manifest.jsonl and the run's state")
    parser.add_argument("--model", help="converted Cheers folder, Hub id or pipeline folder (default: tiny random)")
    parser.add_argument("--negative-prompt", default=None, help="for prompts without their own negative_prompt")
    parser.add_argument("--steps", type=int, default=None, help="default: 80 (official), 8 for the tiny model")
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--time-shift", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=None, help="height = width, multiple of 32 (default: native)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: prompt i without a seed gets seed + i")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bf16 on CUDA and on CPUs with native bf16, else fp32",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if GPUs are visible")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 80 if args.model else 8
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}.")
    return args


def run_settings(args, device: torch.device, dtype: torch.dtype) -> dict:
    """What changes an image without changing its file name (prompt, negative prompt and seed are in the name)."""
    model = args.model or TINY_MODEL
    if args.model and Path(args.model).exists():
        model = str(Path(args.model).resolve())
    return {
        "model": model,
        "device_type": device.type,  # a CUDA generator draws other noise than a CPU one for the same seed
        "dtype": str(dtype).removeprefix("torch."),
        "steps": args.steps,
        "guidance": args.guidance,
        "time_shift": args.time_shift,
        "size": args.size,
    }


def warn_if_launch_fell_back(state: PartialState) -> None:
    """Accelerate 1.x's plain launcher (`--cpu`, or one visible GPU) starts ONE process for `--num_processes N`
    (N with MPI only); it still sets MASTER_ADDR, torchrun's launcher also sets WORLD_SIZE."""
    if state.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        warnings.warn(
            "This run uses ONE process although `accelerate launch --num_processes N` was asked for: without "
            "`--multi_gpu` (or MPI for `--cpu`), Accelerate starts a single process. Use `accelerate launch "
            "--multi_gpu --num_processes N examples/generate_distributed.py ...` (add `--cpu` after the script for "
            "N CPU processes over gloo).",
            stacklevel=2,
        )


def main(argv=None) -> list[dict]:
    """Generate what is missing; returns the manifest records (on the main process; [] on the others)."""
    args = parse_args(argv)
    state = PartialState(cpu=args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    warn_if_launch_fell_back(state)
    dtype = DTYPES[args.dtype] if args.dtype else preferred_dtype(state.device)
    settings = run_settings(args, state.device, dtype)
    try:  # every process checks the same inputs, so all of them stop together on bad input
        jobs = read_prompts(args.prompts, args.seed, args.negative_prompt)
        prepare_output_dir(args.output_dir)
        check_settings(args.output_dir, settings)
    except InputError as error:
        if state.is_main_process:
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    pending = [job for job in jobs if not (args.output_dir / job.file).is_file()]
    state.wait_for_everyone()  # everyone has listed what is left before anyone writes a PNG
    if state.is_main_process:
        write_atomically(args.output_dir / SETTINGS, json.dumps(settings, indent=2) + "\n")
        done = len(jobs) - len(pending)
        print(
            f"{len(jobs)} prompts: {done} done, {len(pending)} to generate on {state.num_processes} process(es)",
            flush=True,
        )

    with state.split_between_processes(pending) as mine:
        if mine:
            run_jobs(mine, args, state, dtype)
    state.wait_for_everyone()
    records = []
    if state.is_main_process:
        records = merge_manifest(args.output_dir, jobs)
        print(f"{len(records)}/{len(jobs)} prompts done; manifest: {args.output_dir / MANIFEST}", flush=True)
    state.destroy_process_group()
    return records


def run_jobs(jobs: list[PromptJob], args, state: PartialState, dtype: torch.dtype) -> None:
    transformers_logging.disable_progress_bar()  # one weight-loading bar per process is noise; one line per image
    pipe = load_pipeline(args.model, dtype, state.device)
    part = args.output_dir / MANIFEST_PARTS / f"process-{state.process_index}.jsonl"
    for job in jobs:
        start = time.perf_counter()
        image = generate(pipe, job, args, state.device)
        seconds = round(time.perf_counter() - start, 3)
        finished_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        record = {
            **job_fields(job),
            "seconds": seconds,
            "process_index": state.process_index,
            "finished_at": finished_at,
        }
        save_image(image, record, args.output_dir, part)
        print(f"[process {state.process_index}] {job.file} ({seconds:.2f}s): {job.prompt[:60]}", flush=True)


if __name__ == "__main__":
    main()
