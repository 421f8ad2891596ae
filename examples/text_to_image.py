"""Text-to-image with CheersPipeline.

    python examples/text_to_image.py                                  # tiny random model built locally -> cheers.png
    python examples/text_to_image.py --model ./cheers-hf --prompt "A red apple on a wooden table." --steps 80

--model takes a converted Cheers folder (or Hub id). With no --model the weights are random, so the picture is noise:
the point is that the whole path runs (prompt caches, guidance, sampler, VAE decode, PNG).
"""

import argparse

import torch

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersPipeline,
    CheersProcessor,
)
from transformers_cheers.tiny import tiny_cheers


def load_pipeline(model_path: str | None) -> CheersPipeline:
    if model_path is None:
        model, processor = tiny_cheers()
    else:
        model = CheersForConditionalGeneration.from_pretrained(model_path, dtype="auto").eval()
        processor = CheersProcessor.from_pretrained(model_path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="converted Cheers folder or Hub id (default: tiny random model)")
    parser.add_argument("--prompt", default="A red apple on a wooden table.")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: 80 (official), 8 for the tiny model")
    parser.add_argument("--guidance", type=float, default=9.5)
    parser.add_argument("--time-shift", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=None, help="height = width, multiple of 32 (default: native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="cheers.png")
    parser.add_argument("--heatmap", help="also save the detail-gate heat map here")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    steps = args.steps or (80 if args.model else 8)
    output = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        time_shift=args.time_shift,
        height=args.size,
        width=args.size,
        generator=torch.Generator().manual_seed(args.seed),
        return_detail_gate=args.heatmap is not None,
    )
    output.images[0].save(args.output)
    print(f"saved {args.output} ({output.images[0].size[0]}x{output.images[0].size[1]}, {steps} steps)")
    if args.heatmap:
        output.detail_gate_maps[0].save(args.heatmap)
        print(f"saved {args.heatmap}")


if __name__ == "__main__":
    main()
