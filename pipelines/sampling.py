"""How Cheers samples an image: the math in one place, used by `CheersPipeline` and by interleaved generation.

    x = noise (or the editing source noised to t0)
    for t in scheduler.timesteps:                      # shifted grid from t0 to 1, plus a tail step at t = 1
        v_cond, v_uncond = model(x, t | prompt), model(x, t | null prompt)     # ONE batched network evaluation
        v = v_uncond + guidance_scale * (v_cond - v_uncond)                     # classifier-free guidance
        x = x + v * dt                                                           # Euler step (the scheduler)

The network evaluation is `CheersModel.compute_velocity` (vision tokenizer on x_t, image tokens after the cached
prompts, flow head); the step sizes and the official rounding of the update are the scheduler's.
"""

from collections.abc import Callable

import torch


def guided_velocity(velocity: torch.Tensor, num_branches: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities stacked as [conditional; unconditional] (kept in their dtype)."""
    if num_branches == 1:
        return velocity
    if num_branches != 2:
        raise ValueError(f"Guidance combines 2 branches (conditional, unconditional), got {num_branches}.")
    conditional, unconditional = velocity.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def denoise(
    model,
    scheduler,
    latents: torch.Tensor,
    prompt_cache,
    prompt_mask: torch.Tensor,
    num_branches: int,
    guidance_scale: float,
    keep_last_image_in_cache: bool = False,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate x_t along `scheduler.timesteps` (set beforehand) to t = 1.

    Args:
        model: a `CheersModel` (or a model whose `.model` is one).
        latents (`(B, C, h, w)`): the starting x_t.
        prompt_cache (`Cache`): the prompts, `B * num_branches` rows stacked as [conditional; unconditional]. It is
            not modified, except that with `keep_last_image_in_cache` the image tokens of the last evaluation are
            appended (the official model keeps them before it continues the text).
        prompt_mask (`(B * num_branches, prompt_length)`): the prompts' padding mask.
        num_branches (`int`): 1 without guidance, 2 with it.
        on_step_end (`callable`, *optional*): `on_step_end(index, t, latents)` may return replacement latents.
        interrupted (`callable`, *optional*): checked before each step; True stops the loop.
    Returns:
        The final latents and the detail-gate map `(B, h, w)` of the last conditional evaluation.
    """
    core = getattr(model, "model", model)
    gate = None
    for index, t in enumerate(scheduler.timesteps):
        if interrupted():
            break
        last = index == len(scheduler.timesteps) - 1
        output = core.compute_velocity(
            latents, t, prompt_cache, prompt_mask, num_branches, store_in_cache=keep_last_image_in_cache and last
        )
        velocity = guided_velocity(output.velocity.to(latents.dtype), num_branches, guidance_scale)
        gate = output.detail_gate[: latents.shape[0]]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if on_step_end is not None:
            replaced = on_step_end(index, t, latents)
            latents = latents if replaced is None else replaced
    return latents, gate


__all__ = ["denoise", "guided_velocity"]
