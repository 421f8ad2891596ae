"""Image editing with CheersPipeline: the source image is shown to the model and its latent, noised to the start
time, is where sampling begins (strength 0.9 = the official start time t0 = 0.1).

    python examples/edit_image.py                                     # tiny random model, synthetic source
    python examples/edit_image.py --model ./cheers-hf --image photo.jpg --prompt "Make the sky purple."
"""

import argparse

import numpy as np
import PIL.Image
import torch
from text_to_image import add_dtype_argument, load_pipeline


def synthetic_source(size: int = 128) -> PIL.Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="converted Cheers folder or Hub id (default: tiny random model)")
    parser.add_argument("--image", help="source image (default: a synthetic gradient)")
    parser.add_argument("--prompt", default="Make it look like winter.")
    parser.add_argument("--strength", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=None, help="default: 80 (official), 8 for the tiny model")
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="cheers_edit.png")
    add_dtype_argument(parser)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, args.dtype)
    source = PIL.Image.open(args.image) if args.image else synthetic_source()
    steps = args.steps or (80 if args.model else 8)
    image = pipe(
        args.prompt,
        image=source,
        strength=args.strength,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    image.save(args.output)
    print(f"saved {args.output} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
