"""Stage 1 of a Cheers trained from scratch: the VAE trained as an autoencoder and frozen, then the decoder projector,
then SigLIP.

    python examples/train_vae.py --data shapes/train.jsonl --output-dir runs/shapes-vae --max-steps 600
    python examples/train_vae.py --part projector --model runs/shapes-vae/final --data shapes/train.jsonl \
        --output-dir runs/shapes-projector --max-steps 800
    python examples/train_vae.py --part vision --model runs/shapes-projector/final --data shapes/train.jsonl \
        --output-dir runs/shapes-vision --max-steps 2000 --batch-size 64

`--part vae` (1a) builds a Cheers of a preset size (`--preset`, default `shapes`) with a tokenizer trained on the
dataset's own text (`transformers_cheers.scratch`), trains its VAE (diffusers' `AutoencoderKLFlux2` inside the model)
on the images of the jsonl (L1 + MSE of the decoded posterior mean, object pixels weighted up, + a small KL term),
computes the latent BatchNorm statistics over all the images, initialises the decoder projector from the trained
decoder, and saves a model folder with its processor to `OUTPUT/final`.

`--part projector` (1b) tunes that decoder projector, the only window Cheers has on x_t, so that its decoding of x_t
shows the noise the denoiser must remove (`scratch.decoder_projector_losses`: its decoding of clean latents stays the
VAE's, and x_t is recovered linearly from each decoded pixel patch by a probe that is then discarded). Its
`OUTPUT/final` is the `--model` of the next part.

`--part vision` (1c) trains SigLIP and the token merger on the image-caption pairs of the data (its text-to-image
samples) with SigLIP's sigmoid image-text loss (`scratch.caption_alignment_loss`), as Cheers starts from a SigLIP2
pretrained that way. SigLIP's input is the decoder projector's decoding of each image's latent; both are frozen by
now, so the first `--caption-images` pairs are decoded once and the steps reuse them. Its `OUTPUT/final` is the
`--model` of stage 2 (`examples/train_lora.py --full`, which keeps the VAE and, with `--stage scratch`, the projector
frozen).

Like `train_lora.py`: 🤗 Accelerate, AdamW with warm-up and cosine decay, clipping, `metrics.jsonl` (the losses and
lr), `--checkpoint-every N` -> `OUTPUT/checkpoint-N` (`accelerator.save_state`), `--resume latest|FOLDER` with the
same data order. Part 1a saves the untrained model (tokenizer and random weights) first to `OUTPUT/init`, so a resumed
run starts from the same model.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm
from train_lora import JsonlTracker, add_checkpoint_arguments, resume_state, save_checkpoint
from transformers import get_scheduler

from transformers_cheers import CheersForConditionalGeneration, CheersProcessor
from transformers_cheers.data import load_conversation_dataset
from transformers_cheers.image_processing_cheers import load_image_file
from transformers_cheers.presets import PRESETS
from transformers_cheers.scratch import (
    CaptionAlignment,
    caption_alignment_loss,
    conversation_texts,
    decoder_projector_losses,
    finish_vae_stage,
    latent_statistics,
    new_cheers,
    text_to_image_pairs,
    train_tokenizer,
    visibility_probe,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part", choices=["vae", "projector", "vision"], default="vae", help="what this run trains (see above)"
    )
    parser.add_argument(
        "--model", default=None, help="--part projector / vision: the OUTPUT/final folder of the part before"
    )
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
    parser.add_argument(
        "--visibility-weight", type=float, default=1.0, help="--part projector: weight of the x_t visibility term"
    )
    parser.add_argument(
        "--timestep-shift",
        type=float,
        default=1.0,
        help="--part projector: t of x_t drawn as shift_time(u, shift), like stage 2's --timestep-shift",
    )
    parser.add_argument("--statistics-images", type=int, default=2048, help="images the latent statistics use")
    parser.add_argument(
        "--caption-images", type=int, default=4096, help="--part vision: image-caption pairs used (the first N)"
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    parser.add_argument("--save-rank-state", action="store_true", help="debug: each rank saves its trained weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.part != "vae" and not args.model:
        parser.error(f"--part {args.part} needs --model: the OUTPUT/final folder of the part before it")
    if args.part == "vae" and args.model:
        parser.error("--model is for --part projector / vision; --part vae builds a new model from the data")
    return args


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


@torch.no_grad()
def caption_pairs(args, dataset, model, processor, device) -> tuple[TensorDataset, torch.Tensor]:
    """--part vision: (SigLIP's input pixels, caption index) of the first `--caption-images` image-caption pairs,
    and the table of the distinct captions' token ids (padded). The frozen VAE and decoder projector turn each
    image into those pixels once."""
    pairs = text_to_image_pairs(dataset["conversations"], dataset["images"])[: args.caption_images]
    if not pairs:
        raise ValueError(
            f"{args.data} has no text-to-image samples: --part vision trains on their image-caption pairs."
        )
    captions = sorted({caption for _, caption in pairs})
    index_of = {caption: index for index, caption in enumerate(captions)}
    caption_index = torch.tensor([index_of[caption] for _, caption in pairs])
    tokenizer = processor.tokenizer
    caption_ids = tokenizer(captions, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
    images = DataLoader(ImageFiles([path for path, _ in pairs], processor.image_processor), batch_size=256)
    inner = model.model.to(device)
    decoded = torch.cat(
        [inner.vae_decoder_projector(inner.encode_latents(batch.to(device))).cpu() for batch in images]
    )
    return TensorDataset(decoded, caption_index), caption_ids


def trained_module(args, model) -> nn.Module:
    """What this part trains: the VAE; the decoder projector with its visibility probe; or SigLIP and the token
    merger with the caption side of their objective."""
    if args.part == "vae":
        return model.model.vae.requires_grad_(True).train()
    model.requires_grad_(False)
    if args.part == "vision":
        inner = model.model
        return nn.ModuleDict(
            {
                "siglip": inner.vision_representation.requires_grad_(True).train(),
                "merger": inner.multi_modal_projector.requires_grad_(True).train(),
                "alignment": CaptionAlignment(model),
            }
        )
    projector = model.model.vae_decoder_projector.requires_grad_(True).train()
    projector.bn.eval()  # it normalises with the VAE's latent statistics; train mode would use batch statistics
    return nn.ModuleDict({"projector": projector, "probe": visibility_probe(model)})


def part_losses(args, model, trained: nn.Module, batch, caption_ids: torch.Tensor | None) -> dict:
    if args.part == "vision":
        decoded_pixels, caption_index = batch
        ids = caption_ids.to(decoded_pixels.device)[caption_index]
        return {"loss": caption_alignment_loss(model, trained["alignment"], decoded_pixels, ids, caption_index)}
    pixel_values = batch
    if args.part == "vae":
        return autoencoder_losses(trained, pixel_values, args.kl_weight, args.foreground_weight)
    with torch.no_grad():
        latents = model.model.encode_latents(pixel_values)
    losses = decoder_projector_losses(model, trained["probe"], latents, args.timestep_shift)
    return {"loss": losses["clean"] + args.visibility_weight * losses["visibility"], **losses}


class PartObjective(nn.Module):
    """The modules one part trains, with its objective as `forward(batch) -> losses`.

    The training loop calls it through the module Accelerate prepared: under DDP (several processes) that forward is
    what averages the gradients over the processes; calling the objective on the unwrapped modules would skip it,
    and every process would train its own copy.
    """

    def __init__(self, args, model, caption_ids: torch.Tensor | None):
        super().__init__()
        self.trained = trained_module(args, model)
        self.args, self.caption_ids = args, caption_ids
        self.__dict__["model"] = model  # outside the module tree: DDP syncs the trained modules only

    def forward(self, batch) -> dict:
        return part_losses(self.args, self.model, self.trained, batch, self.caption_ids)


def finish_part(args, model, trained: nn.Module, images: Dataset, device) -> str:
    """Hand the part over to the next stage; returns a line to print."""
    if args.part == "projector":
        trained["projector"].eval().requires_grad_(False)
        return "decoder projector tuned"
    if args.part == "vision":
        model.eval().requires_grad_(False)
        return "SigLIP and the token merger aligned with the captions"
    vae = trained.eval()
    subset = torch.utils.data.Subset(images, range(0, len(images), max(len(images) // args.statistics_images, 1)))
    ordered = DataLoader(subset, batch_size=args.batch_size)
    mean, variance = latent_statistics(vae, (batch.to(device) for batch in ordered))
    finish_vae_stage(model, mean, variance)
    return f"latent variance {variance.min():.3g}-{variance.max():.3g}"


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
    if args.part == "vae":
        model, processor = initial_model(args, dataset, output_dir, accelerator)
    else:
        model, processor = (
            CheersForConditionalGeneration.from_pretrained(args.model),
            CheersProcessor.from_pretrained(args.model),
        )
    paths = sorted({path for images in dataset["images"] for path in images})
    images, caption_ids = ImageFiles(paths, processor.image_processor), None
    if args.part == "vision":
        images, caption_ids = caption_pairs(args, dataset, model, processor, accelerator.device)
    if len(images) < args.batch_size:
        raise ValueError(
            f"--part {args.part} has {len(images)} training examples in {args.data}, fewer than --batch-size "
            f"{args.batch_size} (batches are never partial): lower --batch-size or add data."
        )
    dataloader = DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model.to(accelerator.device)  # the frozen rest too: the objective holds it outside the prepared module
    objective = PartObjective(args, model, caption_ids)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=args.learning_rate)
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps) * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    objective, optimizer, dataloader, scheduler = accelerator.prepare(objective, optimizer, dataloader, scheduler)

    global_step = resume_state(accelerator, output_dir, args.resume)

    accelerator.init_trackers(f"cheers-{args.part}", config={key: str(value) for key, value in vars(args).items()})
    progress = tqdm(total=args.max_steps, initial=global_step, desc=f"{args.part} steps", disable=args.quiet)
    metrics, epoch = {}, global_step // len(dataloader)
    while global_step < args.max_steps:
        dataloader.set_epoch(epoch)
        skip = global_step - epoch * len(dataloader)
        for batch in accelerator.skip_first_batches(dataloader, skip) if skip else dataloader:
            losses = objective(batch)
            accelerator.backward(losses["loss"])
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            reduced = accelerator.reduce(torch.stack(list(losses.values())).detach(), reduction="mean").tolist()
            metrics = {**dict(zip(losses, reduced)), "lr": scheduler.get_last_lr()[0]}
            accelerator.log(metrics, step=global_step)
            progress.update(1)
            progress.set_postfix({name: f"{value:.4g}" for name, value in metrics.items() if name != "lr"})
            if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(objective).trained
    if args.save_rank_state:
        save_file(trained.state_dict(), output_dir / f"rank{accelerator.process_index}_trained.safetensors")
    if accelerator.is_main_process:
        summary = finish_part(args, model, trained, images, accelerator.device)
        model.save_pretrained(output_dir / "final")
        processor.save_pretrained(output_dir / "final")
        accelerator.print(f"Saved {output_dir / 'final'} ({summary})")
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
