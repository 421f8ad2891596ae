"""Plot training curves from the `metrics.jsonl` files of `train_vae.py` / `train_lora.py` as one PNG (PIL only).

    python examples/plot_metrics.py runs/cheers-shapes/vae/metrics.jsonl:mse \\
        runs/cheers-shapes/sft/metrics.jsonl:text_loss runs/cheers-shapes/sft/metrics.jsonl:image_loss -o losses.png

Each `FILE:KEY` becomes a panel: the logged value per step (light) and its running mean over `--smooth` steps
(dark), on a log scale.
"""

import argparse
import json
import math
from pathlib import Path

import PIL.Image
import PIL.ImageDraw


WIDTH, HEIGHT, MARGIN = 420, 260, 46


def read_series(spec: str) -> tuple[str, list[int], list[float]]:
    path, _, key = spec.rpartition(":")
    if not path or not key:
        raise ValueError(f"{spec!r}: write FILE:KEY, e.g. runs/sft/metrics.jsonl:text_loss.")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if key in row and row[key] is not None and row[key] > 0]
    if not rows:
        raise ValueError(f"{path} has no positive values of {key!r}.")
    name = Path(path).parent.name if Path(path).name == "metrics.jsonl" else Path(path).stem
    return f"{name}: {key}", [row["step"] for row in rows], [row[key] for row in rows]


def running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def panel(title: str, steps: list[int], values: list[float], window: int) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = PIL.ImageDraw.Draw(image)
    low, high = math.log10(min(values)), math.log10(max(values))
    high = high if high > low else low + 1
    last = max(steps[-1], 1)

    def point(step, value):
        x = MARGIN + (WIDTH - MARGIN - 10) * step / last
        y = 20 + (HEIGHT - 20 - 30) * (high - math.log10(value)) / (high - low)
        return x, y

    draw.rectangle([MARGIN, 20, WIDTH - 10, HEIGHT - 30], outline="gray")
    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(170, 190, 230))
    draw.line([point(s, v) for s, v in zip(steps, running_mean(values, window))], fill=(20, 50, 160), width=2)
    smoothed = running_mean(values, window)[-1]
    draw.text((MARGIN, 4), f"{title} (last {window}-step mean {smoothed:.4g})", fill="black")
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        if low <= exponent <= high:
            y = point(0, 10.0**exponent)[1]
            draw.text((4, y - 6), f"1e{exponent}", fill="gray")
    draw.text((MARGIN, HEIGHT - 26), "step 0", fill="gray")
    draw.text((WIDTH - 70, HEIGHT - 26), f"step {last}", fill="gray")
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", help="FILE:KEY")
    parser.add_argument("-o", "--output", default="losses.png")
    parser.add_argument("--smooth", type=int, default=25, help="steps of the running mean")
    args = parser.parse_args(argv)
    panels = [panel(*read_series(spec), args.smooth) for spec in args.series]
    figure = PIL.Image.new("RGB", (WIDTH * len(panels), HEIGHT), "white")
    for index, image in enumerate(panels):
        figure.paste(image, (index * WIDTH, 0))
    figure.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
