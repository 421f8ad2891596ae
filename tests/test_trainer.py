"""transformers' Trainer on Cheers: gradient accumulation weights text and image losses like one bigger batch."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from transformers_cheers.tiny import tiny_cheers


pytestmark = pytest.mark.usefixtures("one_thread")


def samples(model, count: int) -> list[dict]:
    """Samples of identical structure (same number of text targets and images), different images, t and noise."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    tokens = config.num_image_tokens
    ids = (
        [11, 12, config.image_start_token_id] + [config.image_token_id] * tokens + [config.image_end_token_id, 21, 22]
    )
    ids = torch.tensor(ids)
    labels = torch.where(ids == config.image_token_id, -100, ids)
    side = config.vision_config.image_size
    grid = side // config.vision_config.patch_size
    return [
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": torch.rand(1, 3, side, side, generator=generator),
            "image_timesteps": torch.rand(1, generator=generator),
            "image_noise": torch.randn(1, config.latent_channels, grid, grid, generator=generator),
        }
        for _ in range(count)
    ]


def collate(batch: list[dict]) -> dict:
    stacked = {
        key: torch.stack([sample[key] for sample in batch]) for key in ("input_ids", "attention_mask", "labels")
    }
    for key in ("pixel_values", "image_timesteps", "image_noise"):
        stacked[key] = torch.cat([sample[key] for sample in batch])
    return stacked


def one_sgd_step(tmp_path, dataset, batch_size: int, accumulation: int) -> tuple[dict, Trainer]:
    model, _ = tiny_cheers(seed=0)
    model.train()
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_drop_last=False,
        remove_unused_columns=False,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collate, optimizers=(optimizer, None)
    )
    trainer.train()
    return {name: value.detach().clone() for name, value in model.named_parameters()}, trainer


def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(tmp_path):
    reference, _ = tiny_cheers(seed=0)
    dataset = samples(reference, 2)
    whole, _ = one_sgd_step(tmp_path / "whole", dataset, batch_size=2, accumulation=1)
    accumulated, trainer = one_sgd_step(tmp_path / "accumulated", dataset, batch_size=1, accumulation=2)
    assert trainer.model_accepts_loss_kwargs is False  # Trainer divides by the accumulation steps itself
    moved = 0
    for name, value in whole.items():
        before = reference.state_dict()[name]
        moved += int(not torch.equal(value, before))
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # both the LLM (text loss) and the flow head (image loss only) were trained by the step
    assert not torch.equal(whole["model.detail_head.final_layer.proj_out.weight"],
                           reference.state_dict()["model.detail_head.final_layer.proj_out.weight"])  # fmt: skip
    assert moved > 10
