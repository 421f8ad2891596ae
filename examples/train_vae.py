"""Stage 1 of a Cheers trained from scratch: a new model, its VAE trained as an autoencoder, then frozen.

    python examples/train_vae.py --data shapes/train.jsonl --output-dir runs/shapes-vae --max-steps 600

Builds a Cheers of a preset size (`--preset`, default `shapes`) with a tokenizer trained on the dataset's own text
(`transformers_cheers.scratch`), trains its VAE (diffusers' `AutoencoderKLFlux2` inside the model) on the images of
the jsonl (L1 + MSE of the decoded posterior mean, object pixels weighted up, + a small KL term), computes the
latent BatchNorm statistics over all the images, initialises the decoder projector from the trained decoder, and saves a model folder with its processor to
`OUTPUT/final`: the `--model` of stage 2 (`examples/train_lora.py --full`, which keeps the VAE frozen).

Like `train_lora.py`: 🤗 Accelerate, AdamW with warm-up and cosine decay, clipping, `metrics.jsonl` (loss, mse, kl,
lr), `--checkpoint-every N` -> `OUTPUT/checkpoint-N` (`accelerator.save_state`), `--resume latest|FOLDER` with the same
data order. The untrained model (tokenizer and random weights) is saved first to `OUTPUT/init`, so a resumed run
starts from the same model.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from train_lora import JsonlTracker, add_checkpoint_arguments, resume_state, save_checkpoint
from transformers import get_scheduler

from transformers_cheers import CheersForConditionalGeneration, CheersProcessor
from transformers_cheers.data import load_conversation_dataset
from transformers_cheers.image_processing_cheers import load_image_file
from transformers_cheers.presets import PRESETS
from transformers_cheers.scratch import (
    conversation_texts,
    finish_vae_stage,
    latent_statistics,
    new_cheers,
    train_tokenizer,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="official-format jsonl (its images and its text are used)")
    parser.add_argument("--image-root", default=None, help="folder of the image paths (default: the jsonl's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size")
    parser.add_argument("--output-dir", default="cheers-vae")
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="per latent element, next to the pixel loss")
    parser.add_argument(
        "--foreground-weight", type=float, default=20.0, help="loss weight of pixels unlike the image's background"
    )
    parser.add_argument("--statistics-images", type=int, default=2048, help="images the latent statistics use")
    add_checkpoint_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


class ImageFiles(Dataset):
    """The distinct images of a conversation dataset as [0, 1] pixel tensors, through the model's image processor."""

    def __init__(self, paths: list[str], image_processor):
        self.paths, self.image_processor = paths, image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_image_file(self.paths[index])
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def initial_model(args, dataset, output_dir: Path, accelerator) -> tuple[CheersForConditionalGeneration, object]:
    """The untrained model: built once (tokenizer trained on the data's text) and saved, then always read back."""
    init = output_dir / "init"
    if accelerator.is_main_process and not (init / "config.json").exists():
        tokenizer = train_tokenizer(conversation_texts(dataset["conversations"]))
        model, processor = new_cheers(tokenizer, args.preset, seed=args.seed)
        model.save_pretrained(init)
        processor.save_pretrained(init)
        accelerator.print(f"New {args.preset} model ({model.num_parameters():,} parameters, {len(tokenizer)} tokens)")
    accelerator.wait_for_everyone()
    return CheersForConditionalGeneration.from_pretrained(init), CheersProcessor.from_pretrained(init)


def foreground_weights(pixel_values: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """(N, 1, H, W): `weight` where a pixel differs from its image's median colour (the background), else 1.

    On images that are mostly plain background an unweighted loss learns the background first and the objects'
    colours last (after 300 steps the shapes of the world were all one brownish average colour); weighting the
    object's pixels makes the colours come first.
    """
    background = pixel_values.flatten(2).median(-1).values[:, :, None, None]
    foreground = (pixel_values - background).abs().sum(1, keepdim=True) > threshold
    return 1 + (weight - 1) * foreground.to(pixel_values.dtype)


def autoencoder_losses(vae, pixel_values: torch.Tensor, kl_weight: float, foreground_weight: float) -> dict:
    posterior = vae.encode(pixel_values).latent_dist
    # The posterior mean is decoded: Cheers encodes with it, and sampling at the initial unit variance would drown
    # what a young encoder puts in the latent. The KL term still bounds the means.
    reconstruction = vae.decode(posterior.mean).sample
    error = reconstruction - pixel_values
    weights = foreground_weights(pixel_values, foreground_weight)
    reconstruction_loss = (weights * (error.abs() + error.square())).mean() / weights.mean()  # weighted L1 + MSE
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return {"loss": reconstruction_loss + kl_weight * kl, "mse": error.square().mean(), "kl": kl}


def main(argv=None) -> dict:
    """Train; returns the last step's metrics."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        log_with=[JsonlTracker(output_dir / "metrics.jsonl")],
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_conversation_dataset(args.data, image_root=args.image_root)
    model, processor = initial_model(args, dataset, output_dir, accelerator)
    paths = sorted({path for images in dataset["images"] for path in images})
    images = ImageFiles(paths, processor.image_processor)
    dataloader = DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
    vae = model.model.vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps) * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    vae, optimizer, dataloader, scheduler = accelerator.prepare(vae, optimizer, dataloader, scheduler)

    global_step = resume_state(accelerator, output_dir, args.resume)

    accelerator.init_trackers("cheers-vae", config={key: str(value) for key, value in vars(args).items()})
    progress = tqdm(total=args.max_steps, initial=global_step, desc="vae steps", disable=args.quiet)
    metrics, epoch = {}, global_step // len(dataloader)
    while global_step < args.max_steps:
        dataloader.set_epoch(epoch)
        skip = global_step - epoch * len(dataloader)
        for pixel_values in accelerator.skip_first_batches(dataloader, skip) if skip else dataloader:
            losses = autoencoder_losses(
                accelerator.unwrap_model(vae), pixel_values, args.kl_weight, args.foreground_weight
            )
            accelerator.backward(losses["loss"])
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            reduced = accelerator.reduce(torch.stack(list(losses.values())).detach(), reduction="mean").tolist()
            metrics = {**dict(zip(losses, reduced)), "lr": scheduler.get_last_lr()[0]}
            accelerator.log(metrics, step=global_step)
            progress.update(1)
            progress.set_postfix(mse=f"{metrics['mse']:.5f}", kl=f"{metrics['kl']:.3f}")
            if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(vae).eval()
        subset = torch.utils.data.Subset(images, range(0, len(images), max(len(images) // args.statistics_images, 1)))
        ordered = DataLoader(subset, batch_size=args.batch_size)
        mean, variance = latent_statistics(vae, (batch.to(accelerator.device) for batch in ordered))
        finish_vae_stage(model, mean, variance)
        model.save_pretrained(output_dir / "final")
        processor.save_pretrained(output_dir / "final")
        accelerator.print(f"Saved {output_dir / 'final'} (latent variance {variance.min():.3g}-{variance.max():.3g})")
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
