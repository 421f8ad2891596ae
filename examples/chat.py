"""Image understanding and text chat with Cheers.

    python examples/chat.py                                   # tiny random model built locally (no download)
    python examples/chat.py --model ./cheers-hf --image cat.png --question "What is in this picture?"

With no --model, the weights are random: the pipeline runs end to end but the words are noise.
"""

import argparse

import numpy as np
import PIL.Image
import torch

from transformers_cheers import CheersForConditionalGeneration, CheersProcessor
from transformers_cheers.cpu_bf16 import preferred_dtype
from transformers_cheers.tiny import tiny_cheers


def load(model_path: str | None, dtype: str = "auto"):
    """(model, processor) on CUDA if there is one, in `dtype` ("auto": bf16 where the device computes it natively,
    else fp32; on an AVX2-only CPU bf16 is tens of times slower)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = preferred_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if model_path is None:
        model, processor = tiny_cheers(dtype=dtype)
        return model.to(device), processor
    model = CheersForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return model, CheersProcessor.from_pretrained(model_path)


def synthetic_image(height: int = 120, width: int = 200) -> PIL.Image.Image:
    """A colour gradient with a square, so the demo needs no image file."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[30:90, 60:120] = (220, 40, 40)
    return PIL.Image.fromarray(pixels)


def reply(model, processor, messages, images=None, max_new_tokens=32) -> str:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=prompt).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="converted Cheers folder or Hub id (default: tiny random model)")
    parser.add_argument("--image", help="image file (default: a synthetic picture)")
    parser.add_argument("--question", default="Describe this image.")
    parser.add_argument("--chat", default="Please introduce yourself briefly.", help="a text-only turn")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs",
    )
    args = parser.parse_args()

    model, processor = load(args.model, args.dtype)
    print(f"model: {args.model or 'tiny random'} ({model.dtype}, {model.device})")
    image = PIL.Image.open(args.image) if args.image else synthetic_image()
    understanding = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    print("[image understanding]", args.question)
    print(">>", repr(reply(model, processor, understanding, images=[image], max_new_tokens=args.max_new_tokens)))
    chat = [{"role": "user", "content": args.chat}]
    print("[text chat]", args.chat)
    print(">>", repr(reply(model, processor, chat, max_new_tokens=args.max_new_tokens)))


if __name__ == "__main__":
    main()
