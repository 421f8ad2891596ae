"""Interleaved generation: text that may contain images, as the official `generate` does.

Text is decoded token by token; whenever the model emits `<im_start>` (or the prompt ends with it), an image is
sampled with the same `denoise` loop as `CheersPipeline`, its tokens stay in the cache (those of the last network
evaluation, as in the official model), `<im_end>` is fed, and the text continues.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import ModelOutput

from .pipeline_cheers import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .sampling import denoise
from .scheduling_cheers import CheersFlowMatchScheduler


@dataclass
class InterleavedOutput(ModelOutput):
    r"""
    sequences (`torch.LongTensor` of shape `(1, new_tokens)`):
        The generated tokens; each image appears as `<im_start>` followed by `<im_end>` (its image tokens live in
        `image_latents`, not in the text).
    image_latents (`list[torch.Tensor]`):
        The latents of every generated image, in order (decode with `model.model.decode_latents`).
    """

    sequences: torch.LongTensor | None = None
    image_latents: list[torch.Tensor] | None = None


@torch.no_grad()
def generate_interleaved(
    model,
    processor,
    inputs,
    scheduler: CheersFlowMatchScheduler | None = None,
    max_new_tokens: int = 256,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    image_size: int | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 0.0,
    latents: list[torch.Tensor] | None = None,
) -> InterleavedOutput:
    """Generate text and images for ONE prompt (`inputs` from `CheersProcessor`, batch 1).

    Guidance (`guidance_scale != 1`) runs a second, unconditional row (the official `<no_mean>` prompt) in the same
    batch; its text tokens are `<no_mean>` too (the official code samples separate tokens for it).
    Text is greedy with `temperature=0`, else sampled from softmax(logits / temperature) with `generator`.
    `latents` optionally gives the initial noise of the successive images (else drawn with `generator`). One
    generator serves both draws wherever it lives: text is sampled on its device, image noise drawn there and moved.
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("generate_interleaved handles one prompt at a time; loop over prompts or use CheersPipeline.")
    config, core = model.config, model.model
    scheduler = scheduler or CheersFlowMatchScheduler()
    size = image_size or config.vision_config.image_size
    rows = [inputs] + ([processor.build_unconditional_inputs(inputs)] if guidance_scale != 1.0 else [])
    model_inputs = {
        key: torch.cat([row[key] for row in rows]).to(model.device)
        for key in ("input_ids", "attention_mask", "pixel_values", "context_image_mask")
        if inputs.get(key) is not None
    }
    output = model(**model_inputs, use_cache=True, logits_to_keep=1)
    cache, mask = output.cache, model_inputs["attention_mask"]
    noises = list(latents or [])
    generated, images = [], []
    pending_image = int(inputs["input_ids"][0, -1]) == config.image_start_token_id
    token = None if pending_image else next_token(output.logits[0, -1], temperature, generator)
    while len(generated) < max_new_tokens:
        if pending_image:
            noise = noises.pop(0) if noises else None
            image, mask = sample_image(
                core, scheduler, cache, mask, len(rows), size, num_inference_steps, guidance_scale, generator, noise
            )
            images.append(image)
            token, pending_image = config.image_end_token_id, False
        generated.append(token)
        if token == config.eos_token_id or len(generated) == max_new_tokens:
            break
        logits, mask = feed(model, token, config.null_token_id, cache, mask, len(rows))
        pending_image = token == config.image_start_token_id
        if not pending_image:
            token = next_token(logits, temperature, generator)
    return InterleavedOutput(sequences=torch.tensor([generated]), image_latents=images)


def sample_image(
    core, scheduler, cache, mask, num_branches, size, num_inference_steps, guidance_scale, generator, noise=None
):
    """One image after the cached prompt; its tokens (last evaluation) are appended to the cache."""
    config = core.config
    grid = size // config.vision_config.patch_size
    if noise is None:
        shape = (1, config.latent_channels, grid, grid)
        noise = randn_tensor(shape, generator=generator, device=core.device, dtype=core.dtype)
    scheduler.set_timesteps(num_inference_steps, device=core.device)
    latents, _ = denoise(
        core, scheduler, noise, cache, mask, num_branches, guidance_scale, keep_last_image_in_cache=True
    )
    return latents, F.pad(mask, (0, (grid // config.token_merge_size) ** 2), value=1)


def feed(model, token: int, unconditional_token: int, cache, mask, rows: int):
    """Run one text token through the LLM (the unconditional row gets `unconditional_token`)."""
    ids = torch.tensor([[token], [unconditional_token]][:rows], device=mask.device)
    mask = F.pad(mask, (0, 1), value=1)
    logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    return logits[0, -1], mask


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if generator is not None:
        probabilities = probabilities.to(generator.device)
    return int(torch.multinomial(probabilities, 1, generator=generator))


__all__ = ["InterleavedOutput", "generate_interleaved"]
