"""Why does a Cheers-Shapes model draw what it draws? Nine measurements behind the diagnosis in docs/shapes.md.

    python benchmarks/diagnose_shapes.py examples/cheers-shapes
    python benchmarks/diagnose_shapes.py MODEL_DIR --times 0.02 0.1 0.3 0.5 0.9 --guidance 1 3 --num-noise 600

1. Latent channels: the variance of each VAE latent channel over the data (the BatchNorm statistics, before
   normalisation). The decoder projector sees x_t de-normalised, i.e. scaled by that channel's standard deviation,
   so a channel the VAE left unused (variance ~0) carries its noise, and with it a part of the velocity target,
   unseen.
2. Visibility of x_t: the sampler's network sees x_t only through the decoder projector and SigLIP. On pure-noise
   latents (t = 0), a least-squares fit (half the tokens to fit, half to score) from each token's decoded pixel patch,
   and from its SigLIP patch embedding (what the detail gate adds), back to its latent values: R^2 per latent
   channel. The velocity at small t is mostly -x0, so what is not visible here cannot be predicted.
3. The denoiser along t: fresh drawings of every seen (colour, shape, position), encoded, noised to t with fixed
   noise, one network evaluation with their caption: the velocity MSE against the target x1 - x0, and the reader's
   accuracy on the one-step estimate x1_hat = x_t + (1 - t) v (decoded). Beside it, the floor at t = 0: the mean
   variance of the latents of one caption's drawings, the least MSE any model can reach there (v = E[x1 | caption]
   - x0, with x0 = x_t known).
4. Does the prompt reach the velocity? The relative difference between the conditional and the unconditional
   velocity, and the mean magnitude of the detail gate (how much of x_t's patch embedding the detail head gets
   directly), per t. A model that draws well-formed shapes of random colours, the same with and without guidance,
   shows ~0 here: it denoises through the detail path alone and ignores its prompt.
5. What the sampler leaves: the seen captions sampled with the world card's settings; the variance (per latent
   element, across the samples) of the final latents beside that of the same scenes' own latents (~1, normalised).
   Noise the network could not see is never removed, so it stays in the samples: an excess of ~1 is all of it.
6. What the words do: per seen caption, x1_hat at a small t averaged over many noise draws. The noise averages
   out and leaves the model's own picture of the caption, E[x1 | caption]; the reader reads it. A word the model
   draws moves that picture (the shape to the left third for "on the left"); a word it ignores does not, and its
   accuracy sits at chance (a third for shape and position).
7. What the image tokens hold: a linear classifier (multinomial logistic regression) of colour, shape and position
   from the LLM input tokens of fresh drawings of all 54 scenes (the 16 tokens of a 64 px image, concatenated), fitted
   on `--probe-images` drawings and scored on half as many others. What it reads, the LLM can read; what it cannot,
   the LLM must compute first (understanding), and the denoiser cannot use directly when it sees x_t.
8. Does a word steer the drawing? x_t of the fresh drawings of 3. at a few t, with captions in which one word
   (colour, shape or position) is replaced by the next one of its kind: the share of x1_hat read as the caption's
   word and as the drawing's. A model that draws a word follows the caption once x_t leaves the choice open; one
   that ignores it keeps reading the drawing's.
9. What a word is worth to the loss: the MSE per latent element between a drawing's latent and the same box drawn
   with one word changed (the next colour or shape). With everything else known, that is what the word can lower the
   velocity MSE by; beside it, the velocity MSE itself (3.), most of which is noise the network cannot see.
"""

import argparse
import dataclasses
import itertools
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_shapes import cpu_line, load, print_markdown_table
from transformers.utils import logging

from transformers_cheers import shapes
from transformers_cheers.pipelines.sampling import guided_velocity
from transformers_cheers.training import flow_matching_path


def latent_channel_variances(model) -> list[float]:
    """Variance of each VAE latent channel over the data (the patchified BatchNorm entries of a channel, averaged)."""
    height, width = model.model.latent_patch_size
    per_entry = model.model.vae.bn.running_var.float().view(-1, height * width)
    return per_entry.mean(dim=1).tolist()


def held_out_r2(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R^2 of each target column, from a least-squares fit (with bias) on the first half, scored on the second."""
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    targets = targets.double()
    half = len(features) // 2
    weights = torch.linalg.lstsq(features[:half], targets[:half]).solution
    residual = targets[half:] - features[half:] @ weights
    return 1 - residual.var(dim=0) / targets[half:].var(dim=0)


def latent_shape(model) -> tuple[int, int, int]:
    """(channels, height, width) of one image's normalised, patchified latent at the native resolution."""
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return model.config.latent_channels, grid, grid


def noised(clean: torch.Tensor, t: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t on the training objective's flow-matching path."""
    return flow_matching_path(clean, torch.full((len(clean),), t), noise).noisy_latents


def one_step_estimate(noisy: torch.Tensor, velocity: torch.Tensor, t: float) -> torch.Tensor:
    """x1_hat = x_t + (1 - t) v: where one Euler step to t = 1 would land."""
    return noisy + (1 - t) * velocity


@torch.no_grad()
def noise_visibility(model, num_images: int, seed: int) -> dict[str, list[float]]:
    """R^2 per latent channel of pure-noise latents, from the decoded pixel patch and from the patch embedding."""
    config = model.config
    patch = config.vision_config.patch_size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_images, *latent_shape(model), generator=generator)
    tokens = model.model.get_latent_features(noise.to(model.dtype), return_dict=True)
    targets = noise.flatten(2).transpose(1, 2).reshape(-1, config.latent_channels)
    pixel_patches = F.unfold(tokens.decoded_pixels.float(), patch, stride=patch).transpose(1, 2)
    sources = {
        "decoded pixel patch": pixel_patches.reshape(len(targets), -1),
        "SigLIP patch embedding": tokens.patch_embeddings.float().reshape(len(targets), -1),
    }
    height, width = model.model.latent_patch_size
    return {
        name: held_out_r2(features, targets).view(-1, height * width).mean(dim=1).tolist()
        for name, features in sources.items()
    }


def seen_scenes(seed: int, per_combination: int = 1) -> list[shapes.Scene]:
    rng = random.Random(f"diagnose_shapes/{seed}")
    scenes = []
    for colour, shape, position in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS):
        if not shapes.is_held_out(colour, shape):
            scenes += [shapes.sample_scene(rng, colour, shape, position) for _ in range(per_combination)]
    return scenes


@torch.no_grad()
def encode(pipe, scenes: list[shapes.Scene]) -> torch.Tensor:
    pixels = pipe.processor.image_processor([shapes.draw_scene(scene) for scene in scenes])["pixel_values"]
    return pipe.model.model.encode_latents(pixels.to(pipe.model.dtype)).float()


@torch.no_grad()
def caption_floor(pipe, seed: int, per_caption: int) -> float:
    """Mean over captions of the latents' variance across drawings of that caption: the least MSE at t = 0."""
    scenes = seen_scenes(seed + 1, per_caption)
    latents = encode(pipe, scenes)
    latents = latents.view(-1, per_caption, *latents.shape[1:])
    return float(latents.var(dim=1).mean())


@torch.no_grad()
def denoiser_by_time(pipe, scenes, clean, times, guidances, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Along t, for the scenes (latents `clean`) and their captions: per (guidance, t) the velocity MSE and the
    reader's accuracy on x1_hat; per t how much the prompt moves the velocity (|v_cond - v_uncond| / |v_cond|) and
    the mean |detail gate|."""
    core = pipe.model.model
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    captions = [shapes.caption(scene.colour, scene.shape, scene.position) for scene in scenes]
    cache, mask, branches = pipe.encode_prompt(captions, do_classifier_free_guidance=True)
    denoiser_rows, prompt_rows = [], []
    for t in times:
        noisy = noised(clean, t, noise)
        output = core.compute_velocity(noisy.to(pipe.model.dtype), t, cache, mask, branches)
        velocities = output.velocity.float()
        conditional, unconditional = velocities.chunk(2)
        prompt_effect = float((conditional - unconditional).norm() / conditional.norm())
        gate = float(output.detail_gate[: len(scenes)].float().abs().mean())
        prompt_rows.append((f"{t:g}", f"{prompt_effect:.3f}", f"{gate:.2f}"))
        for guidance in guidances:
            velocity = guided_velocity(velocities, branches, guidance)
            pixels = core.decode_latents(one_step_estimate(noisy, velocity, t).to(pipe.model.dtype))
            reads = [shapes.read_scene(image) for image in pipe.processor.postprocess(pixels, output_type="pil")]
            accuracy = [
                100.0 * sum(read[index] == getattr(scene, field) for read, scene in zip(reads, scenes)) / len(scenes)
                for index, field in enumerate(("colour", "shape", "position"))
            ]
            error = float(((velocity - (clean - noise)) ** 2).mean())
            denoiser_rows.append((f"{guidance:g}", f"{t:g}", f"{error:.3f}", *(f"{value:.1f}" for value in accuracy)))
    return sorted(denoiser_rows, key=lambda row: float(row[0])), prompt_rows


@torch.no_grad()
def sampled_latent_variance(pipe, scenes, clean, sampling: dict, seed: int) -> tuple[float, float]:
    """(variance of the sampled latents, variance of the scenes' own latents `clean`), per element across them."""
    captions = [shapes.caption(scene.colour, scene.shape, scene.position) for scene in scenes]
    generator = torch.Generator().manual_seed(seed)
    sampled = pipe(captions, output_type="latent", generator=generator, **sampling).images.float()
    return float(sampled.var(dim=0).mean()), float(clean.var(dim=0).mean())


@torch.no_grad()
def caption_pictures(pipe, scenes, t: float, guidances, num_draws: int, seed: int) -> list[tuple]:
    """Per guidance: the reader's accuracy (colour, shape, position) on each caption's mean x1_hat at time t."""
    core = pipe.model.model
    noise = torch.randn(num_draws, *latent_shape(pipe.model), generator=torch.Generator().manual_seed(seed))
    hits = {guidance: [0, 0, 0] for guidance in guidances}
    for scene in scenes:
        caption = shapes.caption(scene.colour, scene.shape, scene.position)
        cache, mask, branches = pipe.encode_prompt([caption] * num_draws, do_classifier_free_guidance=True)
        noisy = noised(torch.zeros_like(noise), t, noise)  # x_t of a mean-zero x1: no drawing in it, only noise
        velocities = core.compute_velocity(noisy.to(pipe.model.dtype), t, cache, mask, branches).velocity.float()
        for guidance in guidances:
            picture = one_step_estimate(noisy, guided_velocity(velocities, branches, guidance), t).mean(
                0, keepdim=True
            )
            pixels = core.decode_latents(picture.to(pipe.model.dtype))
            read = shapes.read_scene(pipe.processor.postprocess(pixels, output_type="pil")[0])
            for index, field in enumerate(("colour", "shape", "position")):
                hits[guidance][index] += read[index] == getattr(scene, field)
    return [(f"{g:g}", *(f"{100.0 * count / len(scenes):.1f}" for count in hits[g])) for g in guidances]


# The three kinds of words of a caption, in the order `shapes.read_scene` returns them.
WORDS = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "position": shapes.POSITIONS}


def with_next_word(scene: shapes.Scene, field: str) -> dict[str, str]:
    """The scene's (colour, shape, position) words with `field` replaced by the next word of its kind."""
    words = {name: getattr(scene, name) for name in WORDS}
    values = WORDS[field]
    words[field] = values[(values.index(words[field]) + 1) % len(values)]
    return words


@torch.no_grad()
def word_steering(pipe, scenes, clean, times, seed: int) -> list[tuple]:
    """Per (word, t): % of x1_hat (guidance 1) read as the swapped caption's word, and as the drawing's own."""
    core = pipe.model.model
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for field in WORDS:
        captioned = [with_next_word(scene, field) for scene in scenes]
        captions = [shapes.caption(words["colour"], words["shape"], words["position"]) for words in captioned]
        cache, mask, branches = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
        index = tuple(WORDS).index(field)
        for t in times:
            noisy = noised(clean, t, noise)
            velocity = core.compute_velocity(noisy.to(pipe.model.dtype), t, cache, mask, branches).velocity.float()
            pixels = core.decode_latents(one_step_estimate(noisy, velocity, t).to(pipe.model.dtype))
            reads = [
                shapes.read_scene(image)[index] for image in pipe.processor.postprocess(pixels, output_type="pil")
            ]
            follows = sum(read == words[field] for read, words in zip(reads, captioned))
            keeps = sum(read == getattr(scene, field) for read, scene in zip(reads, scenes))
            rows.append(
                (field, f"{t:g}", f"{100.0 * follows / len(scenes):.1f}", f"{100.0 * keeps / len(scenes):.1f}")
            )
    return rows


@torch.no_grad()
def word_worth(pipe, scenes, clean) -> dict[str, float]:
    """Per word kind (colour, shape): the MSE per latent element between each scene's latent and its box drawn with
    the next word of that kind."""
    worth = {}
    for field in ("colour", "shape"):
        changed = [dataclasses.replace(scene, **{field: with_next_word(scene, field)[field]}) for scene in scenes]
        worth[field] = float(((encode(pipe, changed) - clean) ** 2).mean())
    return worth


def random_scenes(rng: random.Random, count: int) -> list[shapes.Scene]:
    return [
        shapes.sample_scene(rng, rng.choice(shapes.COLOURS), rng.choice(shapes.SHAPES), rng.choice(shapes.POSITIONS))
        for _ in range(count)
    ]


def held_out_accuracy(features: torch.Tensor, labels: torch.Tensor, num_fit: int, weight_decay: float = 1e-3) -> float:
    """% of the rows after `num_fit` classified right by a multinomial logistic regression (standardised features,
    L2 penalty, L-BFGS) fitted on the rows before."""
    features = features.double()
    mean, std = features[:num_fit].mean(0), features[:num_fit].std(0) + 1e-6
    features = (features - mean) / std
    weights = torch.zeros(features.shape[1], int(labels.max()) + 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(weights.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = features[:num_fit] @ weights + bias
        loss = F.cross_entropy(logits, labels[:num_fit]) + weight_decay * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (features[num_fit:] @ weights + bias).argmax(1)
    return float((predicted == labels[num_fit:]).double().mean() * 100)


@torch.no_grad()
def image_token_probe(pipe, num_fit: int, seed: int) -> dict[str, float]:
    """Held-out accuracy (%) of a linear read-out of each attribute from the LLM input tokens of fresh drawings."""
    scenes = random_scenes(random.Random(f"diagnose_shapes/probe/{seed}"), num_fit + num_fit // 2)
    pixels = pipe.processor.image_processor([shapes.draw_scene(scene) for scene in scenes])["pixel_values"]
    features = torch.cat(
        [
            pipe.model.model.get_image_features(chunk.to(pipe.model.dtype)).pooler_output.float().flatten(1)
            for chunk in pixels.split(100)
        ]
    )
    return {
        name: held_out_accuracy(
            features, torch.tensor([vocabulary.index(getattr(scene, name)) for scene in scenes]), num_fit
        )
        for name, vocabulary in WORDS.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Cheers-Shapes model folder (with cheers_shapes.json)")
    parser.add_argument("--times", type=float, nargs="+", default=[0.02, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance scales of the x1_hat rows")
    parser.add_argument("--num-noise", type=int, default=600, help="pure-noise latents for the visibility fit")
    parser.add_argument("--per-caption", type=int, default=20, help="drawings per caption for the t = 0 floor")
    parser.add_argument("--word-time", type=float, default=0.02, help="t of the caption pictures (measurement 6)")
    parser.add_argument("--word-draws", type=int, default=48, help="noise draws averaged per caption picture")
    parser.add_argument("--probe-images", type=int, default=1200, help="drawings the token probe is fitted on")
    parser.add_argument(
        "--steer-times", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5], help="t of the word swaps (8.)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable_progress_bar()
    for name in ("times", "steer_times"):
        if any(not 0 <= t < 1 for t in getattr(args, name)):
            parser.error(
                f"--{name.replace('_', '-')} must lie in [0, 1) (t = 1 is the clean image), got {getattr(args, name)}."
            )
    if not 0 <= args.word_time < 1:
        parser.error(f"--word-time must lie in [0, 1), got {args.word_time}.")
    if args.num_noise < 2 or args.per_caption < 2 or args.word_draws < 1 or args.probe_images < 2:
        parser.error(
            "--num-noise, --per-caption and --probe-images must be at least 2 (a fit and a variance need two "
            "samples), --word-draws at least 1."
        )
    try:
        pipe, card = load(Path(args.model), "float32")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    model = pipe.model
    print(f"Cheers-Shapes diagnosis of {args.model} ({card['world']} v{card['version']}), seed {args.seed}")
    print(cpu_line())

    variances = latent_channel_variances(model)
    visibility = noise_visibility(model, args.num_noise, args.seed)
    print("\n1-2. latent channels: data variance, and R^2 of pure noise recovered from what the network sees\n")
    header = ("latent channel", "data variance", *(f"R^2 from {name}" for name in visibility))
    lines = [header]
    for channel, variance in enumerate(variances):
        lines.append((str(channel), f"{variance:.4f}", *(f"{values[channel]:.2f}" for values in visibility.values())))
    print_markdown_table(lines)

    scenes = seen_scenes(args.seed)
    floor = caption_floor(pipe, args.seed, args.per_caption)
    print(f"\n3. the denoiser along t ({len(scenes)} seen scenes; floor of the velocity MSE at t = 0: {floor:.3f})\n")
    clean = encode(pipe, scenes)
    denoiser_rows, prompt_rows = denoiser_by_time(pipe, scenes, clean, args.times, args.guidance, args.seed)
    print_markdown_table(
        [("guidance", "t", "velocity MSE", "x1_hat colour %", "x1_hat shape %", "x1_hat position %"), *denoiser_rows]
    )
    print("\n4. does the prompt reach the velocity? (~0: the model ignores it and draws unconditionally)\n")
    print_markdown_table(
        [("t", "prompt effect: norm(v_cond - v_uncond) / norm(v_cond)", "mean abs detail gate"), *prompt_rows]
    )
    sampling = card.get("sampling", {})  # the pipeline's defaults where the card names none
    sampled, data = sampled_latent_variance(pipe, scenes, clean, sampling, args.seed)
    print(f"\n5. what the sampler leaves ({len(scenes)} seen captions, sampling {sampling or 'defaults'})\n")
    print_markdown_table(
        [("latents", "variance per element"), ("sampled", f"{sampled:.3f}"), ("the scenes' own", f"{data:.3f}")]
    )
    pictures = caption_pictures(pipe, scenes, args.word_time, args.guidance, args.word_draws, args.seed)
    print(
        f"\n6. what the words do: each caption's mean x1_hat at t = {args.word_time:g} over {args.word_draws} noise "
        f"draws, read (chance: colour 17 %, shape and position 33 %)\n"
    )
    print_markdown_table([("guidance", "colour %", "shape %", "position %"), *pictures])
    probe = image_token_probe(pipe, args.probe_images, args.seed)
    print(
        f"\n7. what the image tokens hold: held-out accuracy of a linear read-out from the LLM input tokens "
        f"({args.probe_images} fresh drawings to fit, {args.probe_images // 2} to score; chance 17 / 33 / 33 %)\n"
    )
    print_markdown_table([("colour %", "shape %", "position %"), tuple(f"{probe[name]:.1f}" for name in probe)])
    steering = word_steering(pipe, scenes, clean, args.steer_times, args.seed)
    print(
        "\n8. does a word steer the drawing? x_t of the drawings of 3., captions with one word replaced by the next "
        "of its kind, guidance 1: x1_hat read as\n"
    )
    print_markdown_table([("word replaced", "t", "the caption's word %", "the drawing's word %"), *steering])
    worth = word_worth(pipe, scenes, clean)
    print(
        "\n9. what a word is worth to the loss: MSE per latent element between a drawing's latent and the same box "
        "with the next colour / shape (the velocity MSE of 3. beside it is mostly unseen noise)\n"
    )
    print_markdown_table(
        [("word changed", "latent MSE"), *((field, f"{value:.4f}") for field, value in worth.items())]
    )


if __name__ == "__main__":
    main()
