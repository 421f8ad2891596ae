"""Evaluate a Cheers-Shapes model: does it draw what it is asked, answer what it sees, and edit as told?

    python benchmarks/eval_shapes.py examples/cheers-shapes
    python benchmarks/eval_shapes.py MODEL_DIR --num-t2i 216 --num-understanding 300 --num-edit 120 --steps 20

MODEL_DIR is a saved model folder (config, weights, processor; `scheduler_config.json` if its sampler settings
differ from the defaults) that carries the world card `cheers_shapes.json`; any other folder is refused.

Every image is judged by `transformers_cheers.shapes.read_scene`, a rule-based reader, so the table starts with the
reader's own accuracy on freshly drawn ground truth (clean, and blurred + noisy as a generator might draw): if that
is below 99 %, the other rows mean little. Rows:

* text-to-image: the prompts "a {colour} {shape} on the {position}" go round all 54 scenes (216 = 4 rounds, each
  in a seeded order); the read colour, shape and position are compared with the prompt's, separately for the
  combinations seen in training and the held-out ones, at the default steps and guidance and again at guidance 1
  (same seeds: the difference is the effect of guidance);
* understanding: freshly drawn images (a random stream apart from the training writer's), each asked the three
  questions and "Describe the image."; the answer (greedy, whitespace stripped) must equal the expected one exactly;
* editing: "Make the shape {colour}." on freshly drawn images; success = the edited image reads as the requested
  colour with the source's shape and position. Rows split by whether the source or target combination is held out.

The default steps and guidance are the world card's `sampling` entry when the model carries one, else the
pipeline's defaults. Randomness is fixed by --seed (one generator per image, so batching does not change results).
"""

import argparse
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from transformers.utils import logging

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersPipeline,
    CheersProcessor,
    shapes,
)
from transformers_cheers.pipelines.pipeline_cheers import DEFAULT_GUIDANCE, DEFAULT_STEPS


COLUMNS = ("colour", "shape", "position", "all")
READER_DEGRADATION = {"blur_radius": 1.5, "noise_std": 16.0}  # stronger than the blur of a well-trained small model


def cpu_line() -> str:
    """The CPU model and the instruction set torch dispatches to, since both change the timings."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        name = models[0] if models else name
    isa = torch.backends.cpu.get_cpu_capability()
    return f"CPU: {name}; torch CPU capability {isa}, {torch.get_num_threads()} threads"


@dataclass
class Tally:
    """Correct counts per column: colour, shape, position, all (see the table's notes for what each means per task)."""

    total: int = 0
    correct: dict = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))

    def add_hits(self, hits: list[bool]) -> None:
        self.total += 1
        for name, hit in zip(COLUMNS, hits):
            self.correct[name] += hit

    def add(self, expected: tuple, got: tuple) -> None:
        """A read scene against the expected one: each field, then all three at once."""
        hits = [e == g for e, g in zip(expected, got)]
        self.add_hits([*hits, all(hits)])

    def cells(self) -> list[str]:
        return [f"{100 * self.correct[name] / self.total:.1f}" if self.total else "-" for name in COLUMNS]


def load(folder: Path, dtype: str):
    card = shapes.read_world_card(folder)  # refuses a folder that is not a Cheers-Shapes model
    model = CheersForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    processor = CheersProcessor.from_pretrained(folder)
    has_scheduler = (folder / "scheduler_config.json").is_file()
    scheduler = CheersFlowMatchScheduler.from_pretrained(folder) if has_scheduler else CheersFlowMatchScheduler()
    pipe = CheersPipeline(model=model, processor=processor, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, card


def fresh_scenes(seed: int, stream: str, count: int, combinations=None) -> list[shapes.Scene]:
    """Scenes from a random stream of their own (the training writer's streams are named differently)."""
    rng = random.Random(f"eval_shapes/{seed}/{stream}")
    return [shapes.sample_scene(rng, *(rng.choice(combinations) if combinations else ())) for _ in range(count)]


def generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in range(start, start + count)]


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def evaluate_reader(seed: int, count: int) -> dict[str, Tally]:
    tallies = {"clean": Tally(), "blurred + noisy": Tally()}
    for index, scene in enumerate(fresh_scenes(seed, "reader", count)):
        image = shapes.draw_scene(scene)
        expected = (scene.colour, scene.shape, scene.position)
        tallies["clean"].add(expected, shapes.read_scene(image))
        tallies["blurred + noisy"].add(
            expected, shapes.read_scene(shapes.degrade(image, seed=index, **READER_DEGRADATION))
        )
    return tallies


ALL_SCENES = [(c, s, p) for c in shapes.COLOURS for s in shapes.SHAPES for p in shapes.POSITIONS]


def text_to_image_requests(seed: int, count: int) -> list[tuple[str, str, str]]:
    """(colour, shape, position) per prompt: rounds through all 54 scenes, each round in a seeded random order, so
    that a short run still mixes colours, shapes and held-out combinations."""
    rng = random.Random(f"eval_shapes/{seed}/text-to-image")
    rounds = [rng.sample(ALL_SCENES, len(ALL_SCENES)) for _ in range(-(-count // len(ALL_SCENES)))]
    return [request for round_ in rounds for request in round_][:count]


def evaluate_text_to_image(
    pipe, requests, steps, guidance, time_shift, seed, batch_size
) -> tuple[dict[str, Tally], list]:
    tallies, images = {"seen": Tally(), "held-out": Tally()}, []
    for start, chunk in batches(requests, batch_size):
        output = pipe(
            [shapes.caption(*request) for request in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            time_shift=time_shift,
            generator=generators(seed, start, len(chunk)),
        ).images
        for request, image in zip(chunk, output):
            tallies["held-out" if shapes.is_held_out(*request[:2]) else "seen"].add(request, shapes.read_scene(image))
        images += output
    return tallies, images


def evaluate_understanding(pipe, count, seed, batch_size, max_new_tokens) -> dict[str, Tally]:
    """Each image gets the four questions; its tally row holds the colour / shape / position questions, then
    "Describe the image." in the "all" column."""
    model, processor = pipe.model, pipe.processor
    scenes = fresh_scenes(seed, "understanding", count)
    questions = [(index, kind) for index in range(len(scenes)) for kind in shapes.QUESTIONS]
    correct = {}
    for _, chunk in batches(questions, batch_size):
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": shapes.QUESTIONS[kind]}]}]
            for _, kind in chunk
        ]
        prompts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        images = [shapes.draw_scene(scenes[index]) for index, _ in chunk]
        inputs = processor(images=images, text=prompts).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for (index, kind), reply in zip(chunk, replies):
            correct[index, kind] = reply.strip() == scenes[index].answer(kind)
    tallies = {"seen": Tally(), "held-out": Tally()}
    for index, scene in enumerate(scenes):
        subset = "held-out" if shapes.is_held_out(scene.colour, scene.shape) else "seen"
        tallies[subset].add_hits([correct[index, kind] for kind in shapes.QUESTIONS])
    return tallies


def evaluate_editing(pipe, count, steps, guidance, time_shift, seed, batch_size) -> dict[str, Tally]:
    rng = random.Random(f"eval_shapes/{seed}/edit-targets")
    sources = fresh_scenes(seed, "editing", count)
    targets = [rng.choice([c for c in shapes.COLOURS if c != source.colour]) for source in sources]
    tallies = {"seen": Tally(), "held-out": Tally()}
    for start, chunk in batches(list(zip(sources, targets)), batch_size):
        output = pipe(
            [shapes.edit_instruction(target) for _, target in chunk],
            image=[shapes.draw_scene(source) for source, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            time_shift=time_shift,
            generator=generators(seed, start, len(chunk)),
        ).images
        for (source, target), image in zip(chunk, output):
            held_out = shapes.is_held_out(source.colour, source.shape) or shapes.is_held_out(target, source.shape)
            tallies["held-out" if held_out else "seen"].add(
                (target, source.shape, source.position), shapes.read_scene(image)
            )
    return tallies


def save_grid(requests: list[tuple], images: list[PIL.Image.Image], path: Path) -> None:
    """The first text-to-image result of each scene on one PNG: a row per colour (palette order), a column per
    shape and position (circle left, circle center, ..., triangle right); empty cells stay background."""
    width, height = images[0].size
    columns = [(shape, position) for shape in shapes.SHAPES for position in shapes.POSITIONS]
    grid = PIL.Image.new("RGB", (len(columns) * width, len(shapes.COLOURS) * height), (255, 255, 255))
    placed = set()
    for (colour, shape, position), image in zip(requests, images):
        if (colour, shape, position) not in placed:
            placed.add((colour, shape, position))
            column, row = columns.index((shape, position)), shapes.COLOURS.index(colour)
            grid.paste(image, (column * width, row * height))
    grid.save(path)


def print_table(rows: list[tuple[str, str, Tally]]) -> None:
    header = ("task", "subset", "n", "colour %", "shape %", "position %", "all %")
    print_markdown_table([header] + [(task, subset, str(tally.total), *tally.cells()) for task, subset, tally in rows])


def print_markdown_table(lines: list[tuple[str, ...]]) -> None:
    """The first line is the header; columns padded to their widest cell."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    for number, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if number == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Cheers-Shapes model folder (with cheers_shapes.json)")
    parser.add_argument("--num-t2i", type=int, default=216, help="text-to-image prompts per guidance setting")
    parser.add_argument("--num-understanding", type=int, default=300, help="fresh images, 4 questions each")
    parser.add_argument("--num-edit", type=int, default=120)
    parser.add_argument("--num-reader", type=int, default=1000, help="fresh drawings to check the reader on")
    parser.add_argument("--steps", type=int, default=None, help="default: the world card's, else the pipeline's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the world card's, else the pipeline's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--save-grid", help="PNG: one text-to-image result (default guidance) per scene")
    args = parser.parse_args()
    logging.disable_progress_bar()
    for name in ("num_t2i", "num_understanding", "num_edit", "num_reader", "batch_size"):
        if getattr(args, name) < (1 if name == "batch_size" else 0):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'batch_size' else 0}.")

    folder = Path(args.model)
    try:
        pipe, card = load(folder, args.dtype)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    sampling = card.get("sampling", {})
    steps = args.steps if args.steps is not None else sampling.get("num_inference_steps", DEFAULT_STEPS)
    guidance = args.guidance if args.guidance is not None else sampling.get("guidance_scale", DEFAULT_GUIDANCE)
    time_shift = sampling.get("time_shift")  # None: the scheduler's own
    print(f"Cheers-Shapes evaluation of {folder} ({card['world']} v{card['version']}), seed {args.seed}, {args.dtype}")
    print(cpu_line())
    print(f"held out of generation/editing training: {', '.join(' '.join(pair) for pair in card['held_out'])}")

    rows, seconds = [], {}
    start = time.perf_counter()
    reader = evaluate_reader(args.seed, args.num_reader)
    degradation = f"blur {READER_DEGRADATION['blur_radius']} + noise {READER_DEGRADATION['noise_std']:g}"
    rows += [("reader (fresh drawings)", "clean", reader["clean"])]
    rows += [("reader (fresh drawings)", degradation, reader["blurred + noisy"])]
    seconds["reader"] = time.perf_counter() - start
    requests = text_to_image_requests(args.seed, args.num_t2i)
    for scale in dict.fromkeys((guidance, 1.0)):
        start = time.perf_counter()
        tallies, images = evaluate_text_to_image(pipe, requests, steps, scale, time_shift, args.seed, args.batch_size)
        for subset, tally in tallies.items():
            rows.append(("text-to-image", f"{subset}, {steps} steps, guidance {scale:g}", tally))
        if args.save_grid and scale == guidance and images:
            save_grid(requests, images, Path(args.save_grid))
        seconds[f"text-to-image, guidance {scale:g}"] = time.perf_counter() - start
    start = time.perf_counter()
    understanding = evaluate_understanding(
        pipe, args.num_understanding, args.seed, args.batch_size, args.max_new_tokens
    )
    for subset, tally in understanding.items():
        rows.append(("understanding (exact match)", f"{subset} combinations", tally))
    seconds["understanding"] = time.perf_counter() - start
    start = time.perf_counter()
    editing = evaluate_editing(pipe, args.num_edit, steps, guidance, time_shift, args.seed, args.batch_size)
    for subset, tally in editing.items():
        rows.append(("editing", f"{subset}, {steps} steps, guidance {guidance:g}", tally))
    seconds["editing"] = time.perf_counter() - start

    print()
    print_table(rows)
    print()
    print("understanding: colour / shape / position = the one-word questions, all = 'Describe the image.'")
    print("editing: colour = requested colour reached, shape / position = kept, all = success")
    print("time: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))
    if reader["clean"].total and reader["clean"].correct["all"] < 0.99 * reader["clean"].total:
        print("WARNING: the reader is below 99 % on clean drawings; the other rows are not trustworthy.")


if __name__ == "__main__":
    main()
