# Copyright 2026 The transformers-cheers authors. Licensed under the Apache License, Version 2.0.
"""The Cheers training objective, as the official `Cheers.forward(labels=...)` computes it.

    loss = text_loss + image_loss

* `text_loss`: next-token cross-entropy, summed over the targets and divided by their number. The labels are first
  shifted by one and then rewritten like the official code does (`rewrite_shifted_labels`): the position right after
  an `<im_start>` target gets no target, and `<im_end>` is never a target (the model is only taught to *open* an
  image; the sampler closes it).
* `image_loss`: flow-matching MSE (mean over every element) between the velocity predicted from the LLM hidden states
  of each image's tokens and the target `x1 - x0` (zero where t == 1), where `x_t = t * x1 + (1 - t) * x0`, x1 is the
  clean latent and x0 the noise. Every image of the batch is decoded, as in the official code: generation targets
  (t ~ U(0, 1)), understanding inputs (t = 1, target 0) and context images (the official text-only prefix is a black
  image at t = 0). `image_loss_mask` restricts the loss to some images.

The velocity comes from `CheersModel.predict_velocity`, the very head the sampler uses.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100


@dataclass
class CheersTrainingLosses:
    """Losses of one training forward, plus what they were computed from (for logging and tests)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_labels: torch.LongTensor  # (B, L - 1): the shifted, rewritten targets the cross-entropy used
    image_velocities: torch.Tensor | None = None  # (num_images, C, h, w) predicted dx/dt
    image_velocity_targets: torch.Tensor | None = None  # (num_images, C, h, w) x1 - x0, zero where t == 1


def check_training_labels(
    labels: torch.LongTensor, placeholder_mask: torch.BoolTensor, placeholder_ids: tuple[int, ...]
) -> None:
    """Labels must have the shape of the inputs, and no target at an image token.

    An image token's label must be -100, or a placeholder id itself (so `labels = input_ids.clone()` works; those
    positions are ignored, as the official code ignores the `<image_gen>` id its template leaves there).
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (batch_size, sequence_length), got {tuple(labels.shape)}.")
    if labels.shape != placeholder_mask.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and the inputs {tuple(placeholder_mask.shape)} must have the same shape: "
            "labels are given unshifted, one per input token, with -100 where there is no target."
        )
    allowed = labels == IGNORE_INDEX
    for token_id in placeholder_ids:
        allowed = allowed | (labels == token_id)
    bad = placeholder_mask.to(labels.device) & ~allowed
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        positions = bad[row].nonzero().flatten().tolist()
        raise ValueError(
            f"Sample {row} of the batch has {len(positions)} text target(s) at image-token positions (first at "
            f"position {positions[0]}, label {int(labels[row, positions[0]])}). Image tokens are predicted by the "
            "flow-matching head, never by the language-model head: set their labels to -100 (the training collator "
            "does)."
        )


@dataclass
class FlowMatchingPath:
    """Points x_t = t * x1 + (1 - t) * x0 on the straight path from noise x0 (t = 0) to the clean latents x1 (t = 1)."""

    noisy_latents: torch.Tensor  # x_t, what the vision tokenizer encodes for the LLM
    velocity_targets: torch.Tensor  # dx/dt = x1 - x0, zero where t == 1 (a clean image has nothing to denoise)


def flow_matching_path(
    latents: torch.Tensor, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None
) -> FlowMatchingPath:
    """x_t and its velocity target for clean latents x1 `(N, C, h, w)` at times `timesteps` `(N,)` (default 1).

    x_t is computed in the dtype of t and cast to the latents' dtype, as the official training does. The noise is
    drawn from the global RNG only when some t < 1 and none is given.
    """
    if timesteps is None or not bool((timesteps < 1).any()):
        return FlowMatchingPath(noisy_latents=latents, velocity_targets=torch.zeros_like(latents))
    if noise is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    t = timesteps.to(latents.device).view(-1, 1, 1, 1)
    noise = noise.to(latents.device, latents.dtype)
    noisy_latents = (t * latents + (1 - t) * noise).to(latents.dtype)
    return FlowMatchingPath(noisy_latents, velocity_targets=(latents - noise) * (t < 1).to(latents.dtype))


def rewrite_shifted_labels(
    labels: torch.LongTensor, image_start_token_id: int, image_end_token_id: int
) -> torch.LongTensor:
    """Next-token targets `(B, L - 1)` for hidden states `[:, :-1]`, rewritten like the official training forward.

    After the shift, every `<im_start>` target is followed by an inserted -100 and every `<im_end>` target is
    removed, so the length is unchanged when the two counts match. For the usual `<im_start> image <im_end>` layout
    this means: the last text token before an image learns to emit `<im_start>`, nothing is learnt inside the image
    block, and `<im_end>` is never a target.
    """
    shifted = labels[:, 1:]
    is_start, is_end = shifted == image_start_token_id, shifted == image_end_token_id
    starts, ends = is_start.sum(-1), is_end.sum(-1)
    if bool((starts != ends).any()):
        row = int((starts != ends).nonzero()[0])
        raise ValueError(
            f"Sample {row} of the batch has {int(starts[row])} <im_start> target(s) but {int(ends[row])} <im_end> "
            "target(s) (after the shift by one). The training objective pairs them (each image block is "
            "<im_start> image <im_end>, both labelled); was the sample truncated, or one of them masked?"
        )
    # new index of each kept label: its index, plus one per earlier <im_start>, minus one per earlier <im_end>
    starts_before = is_start.long().cumsum(-1) - is_start.long()
    ends_before = is_end.long().cumsum(-1) - is_end.long()
    positions = torch.arange(shifted.shape[1], device=labels.device) + starts_before - ends_before
    rewritten = torch.full_like(shifted, IGNORE_INDEX)
    kept = ~is_end
    rows = torch.arange(shifted.shape[0], device=labels.device)[:, None].expand_as(shifted)
    rewritten[rows[kept], positions[kept]] = shifted[kept]
    return rewritten


def text_cross_entropy(logits: torch.Tensor, text_labels: torch.LongTensor) -> torch.Tensor:
    """Sum of the per-target cross-entropies (computed in fp32) divided by the number of targets.

    `logits` `(B, L - 1, V)` are aligned with `text_labels` (already shifted).
    """
    valid = text_labels != IGNORE_INDEX
    count = int(valid.sum())
    if count == 0:
        return logits.sum() * 0.0  # keeps the graph connected (no target in this batch)
    return F.cross_entropy(logits[valid].float(), text_labels[valid], reduction="sum") / count


def flow_matching_loss(velocities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (batch, channels, grid), in fp32."""
    return F.mse_loss(velocities.float(), targets.float())


def image_hidden_states(
    hidden_states: torch.Tensor, placeholder_mask: torch.BoolTensor, num_images: int
) -> torch.Tensor:
    """The final hidden states at each image's own tokens `(num_images, tokens_per_image, hidden)`, in image order.

    Images are numbered row by row, left to right, like `pixel_values` (and like the official training forward,
    which decodes the tokens right after each `<im_start>`, and the first tokens of a row without one: its prefix).
    """
    selected = hidden_states[placeholder_mask]
    if num_images == 0 or selected.shape[0] % num_images:
        raise ValueError(f"{selected.shape[0]} image-token positions cannot be split into {num_images} images.")
    return selected.view(num_images, selected.shape[0] // num_images, hidden_states.shape[-1])


def compute_training_losses(
    model,
    outputs,
    logits: torch.Tensor,
    labels: torch.LongTensor,
    placeholder_mask: torch.BoolTensor,
    path: FlowMatchingPath | None = None,
    image_timesteps: torch.Tensor | None = None,
    image_loss_mask: torch.BoolTensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> CheersTrainingLosses:
    """The official objective from one forward's outputs.

    Args:
        model: the `CheersModel` (its config and `predict_velocity`).
        outputs (`CheersModelOutputWithPast`): the LLM's final hidden states `(B, L, D)` and the vision tokenizer's
            output for the batch's images (x_t, with their patch embeddings); `logits` `(B, L, V)` their logits.
        labels (`(B, L)`): unshifted targets, -100 where none (see `check_training_labels`).
        placeholder_mask (`(B, L)`): image-token positions (context images included).
        path (`FlowMatchingPath`, *optional*): the images' x_t and velocity targets; None without images.
        image_timesteps (`(num_images,)`, *optional*): t of each image (default 1), used as given.
        image_loss_mask (`(num_images,)` bool, *optional*): which images count in the image loss (default all).
        attention_mask (`(B, L)`, *optional*): padding positions are never the source of a text target.

    Gradient accumulation (e.g. transformers' Trainer, which divides each micro-batch loss by the number of steps):
    both terms are means over their micro-batch, so accumulated steps equal one step on the concatenated batch when
    the micro-batches hold the same number of text targets and of images.
    """
    config = model.config
    hidden_states = outputs.last_hidden_state
    labels = labels.to(hidden_states.device)
    text_labels = rewrite_shifted_labels(labels, config.image_start_token_id, config.image_end_token_id)
    if attention_mask is not None and attention_mask.ndim == 2:
        # a padding position predicts nothing (with left padding it would otherwise "predict" the first token)
        text_labels = text_labels.masked_fill(attention_mask[:, :-1].to(text_labels.device) == 0, IGNORE_INDEX)
    text_loss = text_cross_entropy(logits[:, :-1], text_labels.to(logits.device))

    velocities = targets = None
    image_loss = hidden_states.sum() * 0.0  # no image in the batch: a zero that keeps the graph connected
    if path is not None:
        targets = path.velocity_targets
        num_images, grid = targets.shape[0], tuple(targets.shape[-2:])
        if image_timesteps is None:
            image_timesteps = torch.ones(num_images, device=hidden_states.device)
        image_timesteps = image_timesteps.reshape(-1).to(hidden_states.device)
        states = image_hidden_states(hidden_states, placeholder_mask.to(hidden_states.device), num_images)
        patch_embeddings = outputs.image_outputs.patch_embeddings
        if image_loss_mask is not None:
            image_loss_mask = image_loss_mask.reshape(-1).to(device=hidden_states.device, dtype=torch.bool)
            if image_loss_mask.shape[0] != num_images:
                raise ValueError(f"image_loss_mask has {image_loss_mask.shape[0]} entries for {num_images} images.")
            states, image_timesteps = states[image_loss_mask], image_timesteps[image_loss_mask]
            patch_embeddings, targets = patch_embeddings[image_loss_mask], targets[image_loss_mask]
        if states.shape[0] > 0:
            velocities = model.predict_velocity(states, image_timesteps, patch_embeddings, grid).velocity
            image_loss = flow_matching_loss(velocities, targets)
    return CheersTrainingLosses(
        loss=text_loss + image_loss,
        text_loss=text_loss,
        image_loss=image_loss,
        text_labels=text_labels,
        image_velocities=velocities,
        image_velocity_targets=targets,
    )


__all__ = [
    "IGNORE_INDEX",
    "CheersTrainingLosses",
    "FlowMatchingPath",
    "check_training_labels",
    "compute_training_losses",
    "flow_matching_path",
    "flow_matching_loss",
    "image_hidden_states",
    "rewrite_shifted_labels",
    "text_cross_entropy",
]
