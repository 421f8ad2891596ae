"""Cheers-Shapes: a tiny synthetic world (one coloured shape on a gray background) that a small Cheers learns to draw,
describe and edit, with its dataset writer, a rule-based reader of its images and the world card a model carries.

The world, exactly: 64x64 RGB images, background RGB (200, 200, 200); one filled shape without outline (a circle, an
axis-aligned square or an upward isosceles triangle with its base at the bottom) in one of six palette colours; its
bounding box is a square of 16-28 px, its centre's y anywhere in 20-44 px, its centre's x in the left, middle or
right third of the width (at least `POSITION_MARGIN` px from the inner third boundaries, so the label is never a
matter of one pixel). Shapes are drawn without antialiasing: a pixel belongs to the shape when its centre does, so
colours are exact and the bounding box is exactly the drawn size.

Samples, in the official jsonl conversation format (`transformers_cheers.data` reads them unchanged):

* generation: "a {colour} {shape} on the {position}" (or the shorter "a {colour} {shape}", position free) ->
  `<im_start><image_gen><im_end>`; the user text is the bare caption, exactly what `CheersPipeline(prompt)` sends;
* understanding: the image + "What colour is the shape?" / "What shape is it?" / "Where is the shape?" -> one word,
  or + "Describe the image." -> "a {colour} {shape} on the {position}";
* editing: the image + "Make the shape {colour}." -> the same scene in another colour.

`HELD_OUT` (colour, shape) combinations never appear in generation or editing samples (neither as source nor as
target), so text-to-image on them measures composition. Understanding samples do show them by default: the issue
holds them out of generation and editing only, and the understanding evaluation draws all 54 scenes, so hiding
them there would turn that benchmark into a second composition test; `hold_out_understanding=True` hides them too.

`read_scene(image)` reads (colour, shape, position) back from a drawn or generated image (see its docstring).
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter

from .prompting import IMAGE_END_TOKEN, IMAGE_GEN_TOKEN, IMAGE_ITEM_TEXT, IMAGE_START_TOKEN


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------

WORLD_NAME = "cheers-shapes"
WORLD_VERSION = 1
IMAGE_SIZE = 64
BACKGROUND = (200, 200, 200)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "center", "right")
SIZE_RANGE = (16, 28)  # side of the shape's (square) bounding box, px, inclusive
CENTER_Y_RANGE = (20, 44)  # the shape's vertical centre, px, inclusive
POSITION_MARGIN = 2  # px between a drawn centre and an inner third boundary
# One per shape plus one more, four different colours: every colour and shape stays in training with other partners.
HELD_OUT = (("green", "circle"), ("blue", "triangle"), ("yellow", "square"), ("purple", "circle"))

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "describe": "Describe the image.",
}
EDIT_INSTRUCTION = "Make the shape {colour}."
GENERATION_ANSWER = f"{IMAGE_START_TOKEN}{IMAGE_GEN_TOKEN}{IMAGE_END_TOKEN}"
WORLD_CARD_NAME = "cheers_shapes.json"


def caption(colour: str, shape: str, position: str | None = None) -> str:
    """The caption "a red circle on the left", or "a red circle" without a position."""
    return f"a {colour} {shape}" + (f" on the {position}" if position else "")


def edit_instruction(colour: str) -> str:
    return EDIT_INSTRUCTION.format(colour=colour)


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape: its colour, its shape and its bounding box (`left`, `top`, `size` in px; the box is `size` x `size`)."""

    colour: str
    shape: str
    left: int
    top: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return self.left + self.size / 2, self.top + self.size / 2

    @property
    def position(self) -> str:
        return position_of(self.center[0], IMAGE_SIZE)

    def answer(self, question_kind: str) -> str:
        """The expected answer to `QUESTIONS[question_kind]`."""
        if question_kind == "describe":
            return caption(self.colour, self.shape, self.position)
        if question_kind not in QUESTIONS:
            raise ValueError(f"Unknown question kind {question_kind!r}; use one of {sorted(QUESTIONS)}.")
        return {"colour": self.colour, "shape": self.shape, "position": self.position}[question_kind]

    def recoloured(self, colour: str) -> "Scene":
        return dataclasses.replace(self, colour=colour)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "position": self.position}


def position_of(center_x: float, width: int) -> str:
    """The third of the width that holds `center_x`."""
    return POSITIONS[min(max(int(center_x * 3 // width), 0), 2)]


def sample_scene(
    rng: random.Random, colour: str | None = None, shape: str | None = None, position: str | None = None
) -> Scene:
    """A random scene obeying the world's rules; `colour`, `shape` and `position` are drawn uniformly unless given."""
    colour = colour or rng.choice(COLOURS)
    shape = shape or rng.choice(SHAPES)
    position = position or rng.choice(POSITIONS)
    for name, value, allowed in (
        ("colour", colour, COLOURS),
        ("shape", shape, SHAPES),
        ("position", position, POSITIONS),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {name} {value!r}; the world has {', '.join(allowed)}.")
    size = rng.randint(*SIZE_RANGE)
    third = IMAGE_SIZE / 3
    index = POSITIONS.index(position)
    # The centre is left + size / 2: keep it inside its third (margin at inner boundaries) and the box in the image.
    low_x = max(index * third + (POSITION_MARGIN if index > 0 else 0), size / 2)
    high_x = min((index + 1) * third - (POSITION_MARGIN if index < 2 else 0), IMAGE_SIZE - size / 2)
    left = rng.randint(math.ceil(low_x - size / 2), math.floor(high_x - size / 2))
    top = rng.randint(math.ceil(CENTER_Y_RANGE[0] - size / 2), math.floor(CENTER_Y_RANGE[1] - size / 2))
    return Scene(colour, shape, left, top, size)


def shape_mask(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool: the pixels whose centre lies inside the shape (no antialiasing)."""
    return outline_mask(scene.shape, scene.left, scene.top, scene.size, image_size)


def outline_mask(shape: str, left: float, top: float, size: float, image_size: int) -> np.ndarray:
    """The pixels whose centre lies inside `shape` drawn in the box (left, top, size); the box may be fractional."""
    rows, cols = np.mgrid[0:image_size, 0:image_size]
    x, y = cols + 0.5, rows + 0.5  # pixel centres
    inside_box = (x > left) & (x < left + size) & (y > top) & (y < top + size)
    center_x, center_y, half = left + size / 2, top + size / 2, size / 2
    if shape == "square":
        return inside_box
    if shape == "circle":
        return (x - center_x) ** 2 + (y - center_y) ** 2 <= half**2
    if shape == "triangle":
        # Apex at the top middle, base along the bottom. A row's half-width is taken at its lower edge, so the top
        # row holds the apex pixel(s) and the bottom row the full base: the bounding box is exactly size x size.
        half_width = (y + 0.5 - top) / size * half
        return inside_box & (np.abs(x - center_x) <= half_width)
    raise ValueError(f"Unknown shape {shape!r}; the world has {', '.join(SHAPES)}.")


def draw_scene(scene: Scene, image_size: int = IMAGE_SIZE) -> PIL.Image.Image:
    """The scene as an RGB image: the shape in its exact palette colour on the background."""
    if scene.colour not in PALETTE:
        raise ValueError(f"Unknown colour {scene.colour!r}; the world has {', '.join(COLOURS)}.")
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[...] = BACKGROUND
    pixels[shape_mask(scene, image_size)] = PALETTE[scene.colour]
    return PIL.Image.fromarray(pixels, mode="RGB")


def degrade(
    image: PIL.Image.Image, blur_radius: float = 0.0, noise_std: float = 0.0, seed: int = 0
) -> PIL.Image.Image:
    """A drawn image as a small generative model might render it: Gaussian blur, then Gaussian pixel noise."""
    if blur_radius > 0:
        image = image.filter(PIL.ImageFilter.GaussianBlur(blur_radius))
    pixels = np.asarray(image, dtype=np.float32)
    if noise_std > 0:
        pixels = pixels + np.random.default_rng(seed).normal(0.0, noise_std, pixels.shape)
    return PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------------------------

ROUGH_THRESHOLD = 60.0  # RGB distance from the background that surely is shape (palette entries are 163-229 away)
MIN_SHAPE_PIXELS = 64  # a quarter of the smallest shape's area (16 x 16 triangle ~ 136 px): less is no shape
MIN_SATURATION = 0.5  # a shape's colour is at least half-way from the background to its palette entry
COLOUR_TOLERANCE = 60.0  # farther than this from every palette colour (however washed out): not a palette colour
MIN_SHAPE_IOU = 0.6  # overlap with the best-fitting ideal shape below this: no shape of the world
# Area of each shape as a fraction of its bounding box, and its centroid's height in the box (from the top).
AREA_FRACTION = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
CENTROID_HEIGHT = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (label propagation: each pixel takes its neighbours' max)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.stack(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours.max(axis=0), 0)
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest to `rgb` and the RGB distance, allowing each colour to be washed out towards the
    background (a blurred small shape never reaches its full colour): distance to the segment from the colour to
    `MIN_SATURATION` of the way, rather than to the palette point."""
    background = np.asarray(BACKGROUND, dtype=np.float32)
    distances = {}
    for name, value in PALETTE.items():
        direction = np.asarray(value, dtype=np.float32) - background
        saturation = np.clip((rgb - background) @ direction / (direction @ direction), MIN_SATURATION, 1.0)
        distances[name] = float(np.linalg.norm(rgb - background - saturation * direction))
    name = min(distances, key=distances.get)
    return name, distances[name]


def intersection_over_union(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The shape whose ideal outline, with the mask's area and centroid, overlaps the mask best, and that overlap
    (IoU); None when even the best overlaps less than `MIN_SHAPE_IOU`.

    Matching whole outlines rather than measuring the bounding box keeps a stray pixel or a blurred corner from
    deciding: both move the fit by a fraction of a pixel.
    """
    rows, cols = np.nonzero(mask)
    center_x, center_y = cols.mean() + 0.5, rows.mean() + 0.5
    overlaps = {}
    for shape in SHAPES:
        size = math.sqrt(mask.sum() / AREA_FRACTION[shape])
        ideal = outline_mask(shape, center_x - size / 2, center_y - CENTROID_HEIGHT[shape] * size, size, mask.shape[0])
        overlaps[shape] = intersection_over_union(mask, ideal)
    shape = max(overlaps, key=overlaps.get)
    return (shape if overlaps[shape] >= MIN_SHAPE_IOU else None), overlaps[shape]


def read_scene(image) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, position) of a Cheers-Shapes image (PIL image or HxWx3 uint8 array), None where unreadable.

    1. rough mask: pixels far from the background; fewer than `MIN_SHAPE_PIXELS` -> (None, None, None);
    2. colour: the median colour of the rough mask's inner pixels (the quarter farthest from the background, away
       from blurred edges) -> the nearest palette colour, allowing for a wash towards the background (None if
       farther than `COLOUR_TOLERANCE` from all);
    3. mask: pixels more than half-way from the background to that median colour (projected on the line between
       them, which averages the channels' noise), largest connected component: a blurred edge is cut at its middle;
    4. shape: the ideal circle, square or triangle of the mask's area and centroid that overlaps it best;
    5. position: the third of the width holding the mask's centroid.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"read_scene expects a square RGB image, got an array of shape {pixels.shape}.")
    offset = pixels - np.asarray(BACKGROUND, dtype=np.float32)
    distance = np.linalg.norm(offset, axis=-1)
    rough = distance > ROUGH_THRESHOLD
    if rough.sum() < MIN_SHAPE_PIXELS:
        return None, None, None
    inner = rough & (distance >= np.percentile(distance[rough], 75))
    median_rgb = np.median(pixels[inner], axis=0)
    colour, colour_distance = nearest_colour(median_rgb)
    direction = median_rgb - np.asarray(BACKGROUND, dtype=np.float32)
    mask = largest_component(offset @ direction / (direction @ direction) > 0.5)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return None, None, None
    position = position_of(np.nonzero(mask)[1].mean() + 0.5, mask.shape[1])
    return (colour if colour_distance <= COLOUR_TOLERANCE else None), classify_shape(mask)[0], position


# --------------------------------------------------------------------------------------------------------------------
# The world card
# --------------------------------------------------------------------------------------------------------------------


def world_description() -> dict:
    """What `cheers_shapes.json` holds: the world a model was trained on."""
    return {
        "world": WORLD_NAME,
        "version": WORLD_VERSION,
        "image_size": IMAGE_SIZE,
        "background": list(BACKGROUND),
        "palette": {name: list(value) for name, value in PALETTE.items()},
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "size_range": list(SIZE_RANGE),
        "center_y_range": list(CENTER_Y_RANGE),
        "held_out": [list(pair) for pair in HELD_OUT],
        "questions": dict(QUESTIONS),
        "edit_instruction": EDIT_INSTRUCTION,
    }


def write_world_card(folder: str | os.PathLike, sampling: dict | None = None) -> Path:
    """Mark `folder` (a saved model) as a Cheers-Shapes model: write `cheers_shapes.json` into it.

    `sampling` (optional), e.g. `{"num_inference_steps": 20, "guidance_scale": 4.0}`: the settings the model is
    meant to be sampled with; `benchmarks/eval_shapes.py` uses them as its defaults.
    """
    card = world_description()
    if sampling:
        unknown = set(sampling) - {"num_inference_steps", "guidance_scale", "time_shift"}
        if unknown:
            raise ValueError(
                f"Unknown sampling setting(s) {sorted(unknown)}; use num_inference_steps, guidance_scale, time_shift."
            )
        card["sampling"] = dict(sampling)
    path = Path(folder) / WORLD_CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def read_world_card(folder: str | os.PathLike) -> dict:
    """The world card of a model folder; raises if the folder is not a Cheers-Shapes model of this world version."""
    folder = Path(folder)
    path = folder / WORLD_CARD_NAME
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. Pass a saved Cheers-Shapes model, e.g. examples/cheers-shapes."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a Cheers-Shapes model: it has no {WORLD_CARD_NAME}. Only a model trained on the "
            "Cheers-Shapes world can be evaluated on it; pass such a folder (e.g. examples/cheers-shapes), or, if "
            "this model was trained on data from `python -m transformers_cheers.shapes`, mark it with "
            "`transformers_cheers.shapes.write_world_card(folder)`."
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}); rewrite it with write_world_card."
        )
    expected = world_description()
    different = sorted(key for key in expected if not isinstance(card, dict) or card.get(key) != expected[key])
    if different:
        raise ValueError(
            f"{path} describes another world than this code ({WORLD_NAME} version {WORLD_VERSION}): "
            f"{', '.join(different)} differ. Evaluate it with the version of transformers_cheers it was trained with."
        )
    return card


# --------------------------------------------------------------------------------------------------------------------
# The dataset writer
# --------------------------------------------------------------------------------------------------------------------

KINDS = ("generation", "understanding", "editing")
ID_PREFIX = {"generation": "gen", "understanding": "und", "editing": "edit"}
TRAIN_FILE = "train.jsonl"
DATASET_INFO_FILE = "dataset.json"


def allowed_combinations(hold_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if not (hold_out and is_held_out(c, s))]


def user_turn(text: str, with_image: bool) -> dict:
    return {"from": "human", "value": (IMAGE_ITEM_TEXT if with_image else "") + text}


def record(kind: str, index: int, images: list[str], question: str, answer: str, with_image: bool, scene: Scene):
    return {
        "id": f"{ID_PREFIX[kind]}_{index:05d}",
        "image": ", ".join(images),
        "conversations": [user_turn(question, with_image), {"from": "gpt", "value": answer}],
        "kind": kind,
        "scene": scene.to_dict(),  # of the first image (the edit's source); extra keys are ignored by the loader
    }


def generation_records(rng: random.Random, count: int, short_caption_fraction: float):
    combinations = allowed_combinations(hold_out=True)
    for index in range(count):
        scene = sample_scene(rng, *rng.choice(combinations))
        short = rng.random() < short_caption_fraction
        text = caption(scene.colour, scene.shape, None if short else scene.position)
        name = f"images/gen_{index:05d}.png"
        yield record("generation", index, [name], text, GENERATION_ANSWER, False, scene), {name: scene}


def understanding_records(rng: random.Random, count: int, hold_out: bool):
    combinations = allowed_combinations(hold_out)
    kinds = list(QUESTIONS)
    for index in range(count):
        scene = sample_scene(rng, *rng.choice(combinations))
        kind = kinds[index % len(kinds)]  # balanced question kinds
        name = f"images/und_{index:05d}.png"
        yield record("understanding", index, [name], QUESTIONS[kind], scene.answer(kind), True, scene), {name: scene}


def editing_records(rng: random.Random, count: int):
    combinations = allowed_combinations(hold_out=True)
    for index in range(count):
        source = sample_scene(rng, *rng.choice(combinations))
        targets = [c for c in COLOURS if c != source.colour and not is_held_out(c, source.shape)]
        target = source.recoloured(rng.choice(targets))
        names = [f"images/edit_{index:05d}_source.png", f"images/edit_{index:05d}_target.png"]
        text = edit_instruction(target.colour)
        yield (
            record("editing", index, names, text, GENERATION_ANSWER, True, source),
            dict(zip(names, (source, target))),
        )


def kind_rng(seed: int, kind: str) -> random.Random:
    """One stream per kind, so changing one kind's count leaves the other kinds' samples unchanged."""
    return random.Random(f"{WORLD_NAME}/{WORLD_VERSION}/{seed}/{kind}")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in records), encoding="utf-8")


def write_dataset(
    output_dir: str | os.PathLike,
    seed: int = 0,
    num_generation: int = 1000,
    num_understanding: int = 1000,
    num_editing: int = 500,
    short_caption_fraction: float = 0.25,
    hold_out_understanding: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a Cheers-Shapes training set (deterministic in `seed`: the same arguments give the same bytes).

    The folder holds `images/*.png`, one `{kind}.jsonl` per kind with samples, `train.jsonl` (all of them:
    generation, understanding, editing), `dataset.json` (arguments and counts) and the world card. Read it with
    `load_shapes_dataset(folder)` or `transformers_cheers.data.load_conversation_dataset(folder / "train.jsonl")`.
    The folder is built next to `output_dir` and renamed at the end, so a failure leaves nothing half written.
    Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    counts = {"generation": num_generation, "understanding": num_understanding, "editing": num_editing}
    for kind, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"num_{kind} must be an integer >= 0, got {count!r}.")
    if not sum(counts.values()):
        raise ValueError("All sample counts are 0; ask for at least one sample.")
    if not 0.0 <= short_caption_fraction <= 1.0:
        raise ValueError(f"short_caption_fraction must be in [0, 1], got {short_caption_fraction}.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass another folder or overwrite=True (--overwrite)."
        )

    streams = {
        "generation": generation_records(kind_rng(seed, "generation"), num_generation, short_caption_fraction),
        "understanding": understanding_records(
            kind_rng(seed, "understanding"), num_understanding, hold_out_understanding
        ),
        "editing": editing_records(kind_rng(seed, "editing"), num_editing),
    }
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    try:
        everything = []
        for kind, stream in streams.items():
            records = []
            for item, images in stream:
                for name, scene in images.items():
                    draw_scene(scene).save(staging / name)
                records.append(item)
            if records:
                write_jsonl(staging / f"{kind}.jsonl", records)
            everything += records
        write_jsonl(staging / TRAIN_FILE, everything)
        info = {
            "world": WORLD_NAME,
            "version": WORLD_VERSION,
            "seed": seed,
            "counts": counts,
            "short_caption_fraction": short_caption_fraction,
            "hold_out_understanding": hold_out_understanding,
            "held_out": [list(pair) for pair in HELD_OUT],
        }
        (staging / DATASET_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        write_world_card(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def load_shapes_dataset(folder: str | os.PathLike, kind: str = "train"):
    """A written Cheers-Shapes set as the project's training `datasets.Dataset` (`load_conversation_dataset`).

    `kind`: "train" (all samples) or one of "generation", "understanding", "editing".
    """
    from .data import load_conversation_dataset

    if kind != "train" and kind not in KINDS:
        raise ValueError(f"kind must be 'train' or one of {', '.join(KINDS)}, got {kind!r}.")
    path = Path(folder) / f"{kind}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; write the set with write_dataset (kinds with 0 samples have no file)."
        )
    return load_conversation_dataset(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transformers_cheers.shapes", description="Write a Cheers-Shapes training set."
    )
    parser.add_argument("--output", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-generation", type=int, default=1000)
    parser.add_argument("--num-understanding", type=int, default=1000)
    parser.add_argument("--num-editing", type=int, default=500)
    parser.add_argument(
        "--short-caption-fraction", type=float, default=0.25, help="generation captions without position"
    )
    parser.add_argument("--hold-out-understanding", action="store_true", help="also hide HELD_OUT from understanding")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    args = parser.parse_args(argv)
    try:
        folder = write_dataset(
            args.output,
            seed=args.seed,
            num_generation=args.num_generation,
            num_understanding=args.num_understanding,
            num_editing=args.num_editing,
            short_caption_fraction=args.short_caption_fraction,
            hold_out_understanding=args.hold_out_understanding,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    counts = json.loads((folder / DATASET_INFO_FILE).read_text())["counts"]
    print(f"Wrote {sum(counts.values())} samples ({', '.join(f'{n} {k}' for k, n in counts.items())}) to {folder}")
    print(f"Held out of generation and editing: {', '.join(caption(c, s)[2:] for c, s in HELD_OUT)}")
    print(f"Train with: --data {folder / TRAIN_FILE}")


__all__ = [
    "BACKGROUND",
    "COLOURS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "PALETTE",
    "POSITIONS",
    "QUESTIONS",
    "SHAPES",
    "Scene",
    "caption",
    "degrade",
    "draw_scene",
    "edit_instruction",
    "load_shapes_dataset",
    "read_scene",
    "read_world_card",
    "sample_scene",
    "write_dataset",
    "write_world_card",
]


if __name__ == "__main__":
    main()
