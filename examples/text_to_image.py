"""Text-to-image with CheersPipeline.

    python examples/text_to_image.py                                  # tiny random model built locally -> cheers.png
    python examples/text_to_image.py --model ./cheers-hf --prompt "A red apple on a wooden table." --steps 80

--model takes a converted Cheers folder (or Hub id). With no --model the weights are random, so the picture is noise:
the point is that the whole path runs (prompt caches, guidance, sampler, VAE decode, PNG).
"""

import argparse

import torch

from transformers_cheers import CheersFlowMatchScheduler, CheersPipeline
from transformers_cheers.cpu_bf16 import preferred_dtype
from transformers_cheers.tiny import tiny_cheers


def load_pipeline(model_path: str | None, dtype: str = "auto") -> CheersPipeline:
    """The pipeline on CUDA if there is one, in `dtype` ("auto": bf16 where the device computes it natively, else
    fp32; see `preferred_dtype`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = preferred_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if model_path is None:
        model, processor = tiny_cheers(dtype=dtype)
        pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    else:
        pipe = CheersPipeline.from_pretrained(model_path, dtype=dtype)
    return pipe.to(device)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs",
    )


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
    add_dtype_argument(parser)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, args.dtype)
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
    size = output.images[0].size
    print(f"saved {args.output} ({size[0]}x{size[1]}, {steps} steps, {pipe.model.dtype}, {pipe.device})")
    if args.heatmap:
        output.detail_gate_maps[0].save(args.heatmap)
        print(f"saved {args.heatmap}")


if __name__ == "__main__":
    main()
