"""Fine-tune Cheers with LoRA (default) or fully, on the official jsonl conversation format, with 🤗 Accelerate.

    python examples/train_lora.py                                  # tiny random model + synthetic data, CPU is fine
    python examples/train_lora.py --model ./cheers-hf --data train.jsonl --lora-preset llm_heads --mixed-precision bf16
    python examples/train_lora.py --model ./cheers-hf --data train.jsonl --full          # official "sft" stage
    accelerate launch --multi_gpu --num_processes 2 examples/train_lora.py --cpu       # 2-process DDP over gloo, CPU
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_lora.py --model ... --full

On a machine without GPUs, `accelerate launch --num_processes 2 --cpu` starts ONE process unless MPI (`mpirun`) is
installed (that is how Accelerate 1.x launches multi-CPU jobs); the script warns when it detects this. Use
`--multi_gpu --num_processes 2 ... --cpu` (torchrun processes, gloo backend) as above, or
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/train_lora.py`.

The objective is the official one (`model(**batch).loss` = text cross-entropy + flow-matching MSE, see
`transformers_cheers.training`); batches come from `transformers_cheers.data` (guidance dropout, t sampling; text-only
samples get no context image, as at inference). Every `--checkpoint-every` optimizer steps the full training state is
saved (`accelerator.save_state`: LoRA weights or the model, optimizer, scheduler, RNG, step) under
`OUTPUT/checkpoint-STEP`; `--resume latest` (or a folder) continues from it with the same data order and random draws.
Losses (total, text, image) and the learning rate go to Accelerate's trackers: TensorBoard when installed, plus a
`metrics.jsonl` file in OUTPUT. The result is saved to `OUTPUT/final` (LoRA: a small adapter folder; `--full`: a
model folder with its processor).
"""

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from transformers_cheers import CheersForConditionalGeneration, CheersProcessor
from transformers_cheers.data import CheersTrainingCollator, load_conversation_dataset, make_synthetic_dataset
from transformers_cheers.lora import LORA_PRESETS, STAGES, apply_lora, set_trainable_stage
from transformers_cheers.tiny import tiny_cheers


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint-every, --checkpoints-total-limit, --resume: shared with train_vae.py."""
    parser.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps; 0 = only at the end")
    parser.add_argument("--checkpoints-total-limit", type=int, default=None)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="native Cheers folder; default: the tiny random model")
    parser.add_argument("--data", default=None, help="official-format jsonl; default: a synthetic dataset")
    parser.add_argument("--image-root", default=None, help="folder of the image paths (default: the jsonl's)")
    parser.add_argument("--data-errors", choices=["raise", "skip"], default="raise", help="bad jsonl lines")
    parser.add_argument("--output-dir", default="cheers-lora")
    parser.add_argument("--full", action="store_true", help="full fine-tuning of everything but the VAE (sft)")
    parser.add_argument("--stage", choices=sorted(STAGES), default="sft", help="modules trained with --full")
    parser.add_argument("--lora-preset", choices=sorted(LORA_PRESETS), default="llm_heads")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=None, help="default: 2 x rank")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.02, help="linear warm-up, then constant (official)")
    parser.add_argument(
        "--lr-scheduler",
        choices=["constant_with_warmup", "cosine", "linear"],
        default="constant_with_warmup",
        help="after the warm-up: constant (official) or a decay to 0 at --max-steps (short from-scratch runs)",
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
    add_checkpoint_arguments(parser)
    parser.add_argument("--image-loss-weight", type=float, default=1.0, help="official: 1.0")
    parser.add_argument("--und-only", action="store_true", help="text loss only (official und_only)")
    parser.add_argument("--guidance-dropout", type=float, default=0.2, help="official cfg_data_rate")
    parser.add_argument(
        "--timestep-shift",
        type=float,
        default=None,
        help="draw t on the sampler's shifted grid (e.g. 0.5) instead of uniformly (official)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="image side; default: the processor's")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-to", default="auto", help="'auto' (TensorBoard if installed), 'none', or a tracker")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present (gloo DDP)")
    parser.add_argument("--find-unused-parameters", action="store_true", help="DDP: batches without any image")
    parser.add_argument("--save-rank-state", action="store_true", help="debug: each rank saves its trainable weights")
    parser.add_argument("--synthetic-size", type=int, nargs=3, default=[8, 8, 4], metavar=("UND", "GEN", "TEXT"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker appending every logged step to OUTPUT/metrics.jsonl (main process only)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")


def trackers(args, output_dir: Path) -> list:
    result = [JsonlTracker(output_dir / "metrics.jsonl")]
    if args.report_to == "auto":
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            result.append("tensorboard")
    elif args.report_to != "none":
        result.append(args.report_to)
    return result


def load_model_and_processor(args):
    if args.model is None:
        return tiny_cheers(seed=args.seed)
    model = CheersForConditionalGeneration.from_pretrained(args.model)
    return model, CheersProcessor.from_pretrained(args.model)


def prepare_model(model, args):
    if args.full:
        set_trainable_stage(model, args.stage)
        if not args.no_gradient_checkpointing:
            model.activation_checkpointing_enable()
        return model
    return apply_lora(
        model,
        args.lora_preset,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
    )


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().cpu().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def warn_if_multi_cpu_launch_fell_back(accelerator) -> None:
    """`accelerate launch --cpu --num_processes N` (N > 1) without mpirun runs a single, non-distributed process."""
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if (
        cpu_launch
        and accelerator.num_processes == 1
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        warnings.warn(
            "This run is NOT distributed: `accelerate launch --cpu --num_processes N` needs MPI (mpirun) to start N "
            "processes. For DDP over gloo on CPUs use `accelerate launch --multi_gpu --num_processes N "
            "examples/train_lora.py --cpu ...` instead.",
            stacklevel=2,
        )


def checkpoint_folders(output_dir: Path) -> list[Path]:
    folders = [path for path in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", path.name)]
    return sorted(folders, key=lambda path: int(path.name.split("-")[1]))


def main(argv=None) -> list[dict]:
    """Train; returns the logged metrics of every optimizer step (on every process)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers(args, output_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the sampler's shuffling is seeded per epoch, so a resumed run sees the same order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    warn_if_multi_cpu_launch_fell_back(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    model, processor = load_model_and_processor(args)
    model = prepare_model(model, args)
    model.train()

    data_path = args.data
    if data_path is None:
        data_path = output_dir / "synthetic" / "data.jsonl"
        with accelerator.main_process_first():
            if accelerator.is_main_process and not data_path.exists():
                make_synthetic_dataset(
                    data_path.parent, *args.synthetic_size, image_size=processor.image_processor.resolution
                )
    dataset = load_conversation_dataset(data_path, image_root=args.image_root, errors=args.data_errors)
    collator = CheersTrainingCollator(
        processor,
        config=model.config,
        resolution=args.resolution,
        guidance_dropout=args.guidance_dropout,
        timestep_shift=args.timestep_shift,
        seed=args.seed,
    )
    dataloader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.num_workers,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
    )
    warmup_steps = math.ceil(args.warmup_ratio * args.max_steps)
    # Accelerate's scheduler wrapper steps once per process per optimizer step
    scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)

    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if not args.full and not is_fsdp:  # checkpoints hold the LoRA weights only, not a copy of the frozen base model

        def save_hook(models, weights, folder):
            if accelerator.is_main_process:
                save_file(trainable_state(accelerator.unwrap_model(models[0])), Path(folder) / "trainable.safetensors")
            weights.clear()

        def load_hook(models, folder):
            target = accelerator.unwrap_model(models[0])
            state = load_file(Path(folder) / "trainable.safetensors")
            missing = set(trainable_state(target)) - set(state)
            if missing:
                raise ValueError(f"{folder} lacks trainable weights {sorted(missing)[:3]}...")
            target.load_state_dict(state, strict=False)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    global_step = resume_state(accelerator, output_dir, args.resume)

    batches_per_epoch = len(dataloader)
    steps_per_epoch = max(batches_per_epoch // args.gradient_accumulation_steps, 1)
    accelerator.init_trackers("cheers-finetune", config={k: str(v) for k, v in vars(args).items()})
    progress = tqdm(
        total=args.max_steps,
        initial=global_step,
        desc="steps",
        disable=args.quiet or not accelerator.is_local_main_process,
    )
    history, sums = [], torch.zeros(3, device=accelerator.device)
    epoch = global_step // steps_per_epoch
    while global_step < args.max_steps:
        collator.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        loader = dataloader
        skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip:
            loader = accelerator.skip_first_batches(dataloader, skip)
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch, use_cache=False)
                image_loss = outputs.image_loss * (0.0 if args.und_only else args.image_loss_weight)
                loss = outputs.text_loss + image_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            sums += torch.stack([loss, outputs.text_loss, outputs.image_loss]).detach().float()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            means = accelerator.reduce(sums / args.gradient_accumulation_steps, reduction="mean").tolist()
            sums.zero_()
            metrics = {
                "loss": means[0],
                "text_loss": means[1],
                "image_loss": means[2],
                "lr": scheduler.get_last_lr()[0],
            }
            history.append({"step": global_step, **metrics})
            accelerator.log(metrics, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{means[0]:.4f}", text=f"{means[1]:.4f}", image=f"{means[2]:.4f}")
            if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if args.save_rank_state:
        save_file(trainable_state(unwrapped), output_dir / f"rank{accelerator.process_index}_trainable.safetensors")
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every rank takes part
    if accelerator.is_main_process:
        final = output_dir / "final"
        unwrapped.save_pretrained(final, state_dict=state_dict)  # LoRA: PEFT keeps the adapter weights only
        if args.full:
            processor.save_pretrained(final)
    accelerator.end_training()
    return history


def resume_state(accelerator, output_dir: Path, resume: str | None) -> int:
    """Load `--resume` ('latest' or a checkpoint folder) into the prepared objects; returns its step (0 without)."""
    if not resume:
        return 0
    folder = Path(resume)
    if resume == "latest":
        folders = checkpoint_folders(output_dir)
        if not folders:
            raise FileNotFoundError(f"--resume latest: no checkpoint-N folder in {output_dir}")
        folder = folders[-1]
    accelerator.load_state(str(folder))
    step = json.loads((folder / "step.json").read_text())["step"]
    accelerator.print(f"Resumed from {folder} at step {step}")
    return step


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> None:
    folder = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / "step.json").write_text(json.dumps({"step": step}))
        if total_limit:
            for old in checkpoint_folders(output_dir)[:-total_limit]:
                for path in sorted(old.rglob("*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
                old.rmdir()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
