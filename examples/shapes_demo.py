"""Cheers-Shapes: the small Cheers shipped in `examples/cheers-shapes/`, trained from scratch on 64 px shapes.

    python examples/shapes_demo.py                      # draws 6 prompts, answers 3 questions, does 1 edit

Writes `shapes_grid.png` (6 prompts, one of them a (colour, shape) combination held out of training) and
`shapes_edit.png` (source | edit), and prints what the model did; `transformers_cheers.shapes.read_scene` (the
rule-based reader of the evaluation) says what each generated picture shows. Nothing is downloaded or trained.
"""

import argparse
import random
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from transformers_cheers import CheersPipeline
from transformers_cheers.shapes import (
    HELD_OUT,
    QUESTIONS,
    caption,
    draw_scene,
    edit_instruction,
    read_scene,
    read_world_card,
    sample_scene,
)


SHIPPED_MODEL = Path(__file__).resolve().parent / "cheers-shapes"
ASKED = [  # (colour, shape, position) of each prompt
    ("red", "circle", "left"),
    ("blue", "square", "center"),
    ("yellow", "triangle", "right"),
    ("orange", "square", "left"),
    ("purple", "triangle", None),  # the short caption: position free
    (*HELD_OUT[0], "right"),  # a held-out combination, never drawn in training: composition
]
PROMPTS = [caption(*asked) for asked in ASKED]


def load(folder: Path) -> tuple[CheersPipeline, dict]:
    card = read_world_card(folder)  # refuses a folder that is not a Cheers-Shapes model
    pipe = CheersPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, card.get("sampling", {})


def labelled_grid(images: list[PIL.Image.Image], labels: list[str], scale: int = 3) -> PIL.Image.Image:
    """Images side by side, each scaled up (nearest) with its label underneath."""
    side = images[0].width * scale
    grid = PIL.Image.new("RGB", (side * len(images), side + 30), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.resize((side, side), PIL.Image.NEAREST), (index * side, 0))
        for line, text in enumerate((label[:30], label[30:])):
            draw.text((index * side + 4, side + 2 + 13 * line), text, fill="black")
    return grid


def answer(pipe: CheersPipeline, image: PIL.Image.Image, question: str) -> str:
    processor, model = pipe.processor, pipe.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def describe(reading: tuple, asked: tuple | None = None) -> str:
    """What the reader saw, e.g. "a blue circle on the center (shape wrong)"; parts it could not read are named."""
    colour, shape, position = reading
    if colour is None and shape is None:
        return "nothing the reader recognises as one shape"
    text = f"a {colour or 'off-palette'} {shape or 'shapeless blob'} on the {position or '?'}"
    if asked is not None:
        wrong = [
            part for part, want, got in zip(("colour", "shape", "position"), asked, reading) if want and want != got
        ]
        text += f" ({', '.join(wrong)} wrong)" if wrong else " (as asked)"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="a Cheers-Shapes model folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("."))
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe, sampling = load(args.model)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    # 1. text-to-image: 6 prompts in one batch
    generator = [torch.Generator().manual_seed(args.seed + index) for index in range(len(PROMPTS))]
    images = pipe(PROMPTS, generator=generator, **sampling).images
    print(f"[text-to-image] {sampling or 'pipeline defaults'}")
    for prompt, asked, image in zip(PROMPTS, ASKED, images):
        held_out = " (held out of training)" if prompt == PROMPTS[-1] else ""
        print(f"  {prompt!r}{held_out} -> drew {describe(read_scene(image), asked)}")
    grid_path = args.output_dir / "shapes_grid.png"
    labelled_grid(images, PROMPTS).save(grid_path)
    print(f"  saved {grid_path}")

    # 2. understanding: a freshly drawn picture
    scene = sample_scene(random.Random(args.seed))
    source = draw_scene(scene)
    print(f"[understanding] a freshly drawn picture of {caption(scene.colour, scene.shape, scene.position)}")
    for kind in ("colour", "shape", "position"):
        print(f"  {QUESTIONS[kind]!r} -> {answer(pipe, source, QUESTIONS[kind])!r} (truth: {scene.answer(kind)!r})")

    # 3. editing: recolour it
    colour = next(name for name in ("blue", "red", "yellow") if name != scene.colour)
    instruction = edit_instruction(colour)
    edited = pipe(instruction, image=source, generator=torch.Generator().manual_seed(args.seed), **sampling).images[0]
    edit_path = args.output_dir / "shapes_edit.png"
    labelled_grid([source, edited], ["source", instruction]).save(edit_path)
    kept = (colour, scene.shape, scene.position)
    print(f"[editing] {instruction!r} -> {describe(read_scene(edited), kept)}; saved {edit_path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
