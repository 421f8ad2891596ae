"""A Cheers trained from scratch on a dataset of its own (the Cheers-Shapes recipe, `docs/shapes.md`).

* `train_tokenizer`: a byte-level BPE tokenizer (the Qwen2 tokenizer class, so `CheersProcessor` loads it as usual)
  whose merges are learnt from the dataset's own rendered conversations, plus the Qwen2 chat tokens and the five
  Cheers tokens. Every word of the data becomes one token; any other text still encodes (byte-level: a word the data
  never had falls back to smaller pieces, down to single bytes), so no input can fail to tokenize and there is no
  unknown token. The model never saw those pieces in training, so it reads them as noise.
* `new_cheers`: a randomly initialised model of a preset size whose vocabulary and token ids are the tokenizer's.
* `latent_statistics` / `finish_vae_stage`: the hand-over from the autoencoder stage: the latent BatchNorm
  statistics of both the VAE and the decoder projector, and the decoder projector initialised from the trained VAE
  decoder (as Cheers initialises it from the FLUX.2 decoder).
* `decoder_projector_losses`: the objective of the stage that tunes the decoder projector to show x_t to SigLIP
  (a small decoder trained on clean drawings hides the noise of x_t, so the denoiser cannot remove it).
* `text_to_image_pairs` / `CaptionAlignment` / `caption_alignment_loss`: the vision stage, SigLIP and the token merger
  trained on image-caption pairs with SigLIP's own sigmoid loss, as Cheers starts from a SigLIP2 pretrained that way
  (in the mixed stage a small SigLIP learns colour and position but hardly shape).
"""

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from transformers import Qwen2Tokenizer

from .image_processing_cheers import CheersImageProcessor
from .layout import patchify_latents
from .modeling_cheers import CheersForConditionalGeneration
from .pipelines.scheduling_cheers import shift_time
from .presets import PRESETS, preset_config
from .processing_cheers import CheersProcessor
from .prompting import DEFAULT_SYSTEM_PROMPT, IMAGE_GEN_TOKEN, find_placeholders, render_training_conversation
from .tiny import special_token_ids, tiny_tokenizer
from .training import flow_matching_path


def conversation_texts(
    conversations: Iterable[list[dict]], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> Iterator[str]:
    """The training text of each conversation (what the collator tokenizes), for training the tokenizer."""
    for turns in conversations:
        yield render_training_conversation(turns, system_prompt)


def train_tokenizer(texts: Iterable[str], max_vocab_size: int = 2048) -> Qwen2Tokenizer:
    """A Qwen2 (byte-level BPE) tokenizer whose merges are learnt from `texts`; chat and Cheers tokens included.

    Training stops when no pair occurs twice or at `max_vocab_size`: the vocabulary is the 256 bytes, the special
    tokens and one entry per frequent word (piece). Deterministic for the same texts in the same order.
    """
    tokenizer = tiny_tokenizer().train_new_from_iterator(texts, vocab_size=max_vocab_size, min_frequency=2)
    # Training leaves right padding configured in the backend, and a saved tokenizer's padding side wins over the
    # processor's left-padding default: batched generation would then append new tokens after the padding.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer


def new_cheers(
    tokenizer: Qwen2Tokenizer, preset: str = "shapes", seed: int = 0
) -> tuple[CheersForConditionalGeneration, CheersProcessor]:
    """(model, processor): a randomly initialised Cheers of a preset size with the tokenizer's vocabulary and ids."""
    vision = PRESETS[preset]["vision_config"]
    image_processor = CheersImageProcessor(resolution=vision["image_size"], patch_size=vision.get("patch_size", 16))
    processor = CheersProcessor(image_processor, tokenizer)
    ids = special_token_ids(processor)
    text_config = {**PRESETS[preset]["text_config"], "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    model = CheersForConditionalGeneration(preset_config(preset, text_config=text_config, **ids))
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model, processor


@torch.no_grad()
def latent_statistics(vae, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the patchified posterior means of the images (`batches` of [0, 1] pixels).

    These are the BatchNorm statistics Cheers normalises its latents with (computed exactly over the data, not as
    BatchNorm's running average).
    """
    count, total, total_squares = 0, 0.0, 0.0
    for pixel_values in batches:
        latents = patchify_latents(vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean, vae.config.patch_size)
        latents = latents.double().transpose(0, 1).flatten(1)  # (channels, values)
        count += latents.shape[1]
        total = total + latents.sum(1)
        total_squares = total_squares + latents.square().sum(1)
    if count == 0:
        raise ValueError("latent_statistics got no images.")
    mean = total / count
    return mean.float(), (total_squares / count - mean.square()).clamp(min=0).float()


@torch.no_grad()
def finish_vae_stage(model: CheersForConditionalGeneration, mean: torch.Tensor, variance: torch.Tensor) -> None:
    """Freeze the trained VAE, store its latent statistics in both BatchNorms and copy its decoder into the decoder
    projector (which must have the VAE decoder's architecture: leave `decoder_projector_config` at its default)."""
    inner = model.model
    for batch_norm in (inner.vae.bn, inner.vae_decoder_projector.bn):
        batch_norm.running_mean.copy_(mean)
        batch_norm.running_var.copy_(variance)
        batch_norm.num_batches_tracked.fill_(1)
    projector = inner.vae_decoder_projector
    try:
        projector.decoder.load_state_dict(inner.vae.decoder.state_dict())
        projector.post_quant_conv.load_state_dict(inner.vae.post_quant_conv.state_dict())
    except RuntimeError as error:
        raise ValueError(
            "The decoder projector cannot start from the VAE decoder: their architectures differ. Leave "
            "decoder_projector_config unset (it then copies the VAE's) to use this recipe."
        ) from error
    inner.vae.requires_grad_(False)


def visibility_probe(model: CheersForConditionalGeneration) -> torch.nn.Linear:
    """A linear read-out of one latent token from the decoded pixel patch SigLIP embeds for it (a training device,
    not part of the model): what it recovers, SigLIP's linear patch embedding can recover too."""
    patch = model.config.vision_config.patch_size
    return torch.nn.Linear(model.config.vision_config.num_channels * patch * patch, model.config.latent_channels)


def decoder_projector_losses(
    model: CheersForConditionalGeneration,
    probe: torch.nn.Linear,
    latents: torch.Tensor,
    timestep_shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The objective that tunes the decoder projector, on normalised, patchified clean latents `(N, C, h, w)`.

    Cheers sees x_t only through the decoder projector and SigLIP; there is no skip from x_t to the velocity, so the
    noise of x_t can be removed only as far as the projector's decoding shows it. A small decoder trained on clean
    drawings alone snaps a noisy latent back onto a clean drawing and hides the noise (docs/shapes.md), and samples
    keep their starting noise. Two terms:

    * `clean`: the projector's decoding of clean latents stays the VAE's (the pixels understanding sees);
    * `visibility`: x_t (on the flow-matching path of the training objective, t drawn as
      `shift_time(u, timestep_shift)`) is recovered by `probe` from each decoded pixel patch (normalised latent
      units, so every latent channel counts alike).
    """
    inner = model.model
    x1 = latents.detach()
    t = shift_time(torch.rand(len(x1), generator=generator, device=x1.device, dtype=x1.dtype), timestep_shift)
    noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x_t = flow_matching_path(x1, t, noise).noisy_latents
    with torch.no_grad():
        reference = inner.decode_latents(x1)
    decoded = inner.vae_decoder_projector(torch.cat([x1, x_t]))
    clean, noisy = decoded.split(len(x1))
    patch = model.config.vision_config.patch_size
    patches = F.unfold(noisy, patch, stride=patch).transpose(1, 2)  # (N, tokens, channels * patch * patch)
    tokens = x_t.flatten(2).transpose(1, 2)  # (N, tokens, latent channels), same row-major grid order
    return {"clean": (clean - reference).square().mean(), "visibility": (probe(patches) - tokens).square().mean()}


def text_to_image_pairs(conversations: Iterable[list[dict]], images: Iterable[list[str]]) -> list[tuple[str, str]]:
    """(image path, caption) of every text-to-image sample: a user turn without images asking for the one image
    the assistant turn generates. Those are the image-caption pairs of a Cheers dataset."""
    pairs = []
    for turns, paths in zip(conversations, images):
        if len(turns) != 2 or len(paths) != 1 or find_placeholders(turns[0]["value"]):
            continue
        if find_placeholders(turns[1]["value"]) == [IMAGE_GEN_TOKEN]:
            pairs.append((paths[0], turns[0]["value"].strip()))
    return pairs


class CaptionAlignment(torch.nn.Module):
    """The training devices of the vision stage (not part of the model): a text side that embeds a caption as the
    mean of its token embeddings, a projection of the pooled image tokens, and SigLIP's learnt logit scale and bias
    (initialised as in Zhai et al., 2023: scale 10, bias -10)."""

    def __init__(self, model: CheersForConditionalGeneration, width: int = 64):
        super().__init__()
        config = model.config.text_config
        self.text = torch.nn.EmbeddingBag(config.vocab_size, width, mode="mean", padding_idx=model.config.pad_token_id)
        self.image = torch.nn.Linear(config.hidden_size, width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))


def caption_alignment_loss(
    model: CheersForConditionalGeneration,
    alignment: CaptionAlignment,
    decoded_pixels: torch.Tensor,
    caption_ids: torch.LongTensor,
    caption_index: torch.LongTensor,
) -> torch.Tensor:
    """SigLIP's sigmoid image-text loss on the LLM image tokens of `decoded_pixels` (the decoder projector's
    output, SigLIP's input) mean-pooled, against the captions `caption_ids` (padded with the pad token).

    Every pair of the batch is a binary match / no-match decision. A synthetic dataset repeats its captions, so
    the positives are all pairs with the same caption (`caption_index` equal), not only the diagonal.
    """
    tokens = model.model.get_pixel_features(decoded_pixels).pooler_output
    image = F.normalize(alignment.image(tokens.mean(1)), dim=-1)
    text = F.normalize(alignment.text(caption_ids), dim=-1)
    logits = image @ text.T * alignment.logit_scale.exp() + alignment.logit_bias
    signs = 2 * (caption_index[:, None] == caption_index[None, :]).to(logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


__all__ = [
    "CaptionAlignment",
    "caption_alignment_loss",
    "conversation_texts",
    "decoder_projector_losses",
    "finish_vae_stage",
    "latent_statistics",
    "new_cheers",
    "text_to_image_pairs",
    "train_tokenizer",
    "visibility_probe",
]
