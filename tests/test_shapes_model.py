"""Cheers-Shapes, the model: the shipped folder draws, answers and edits (a small version of
`benchmarks/eval_shapes.py`, fixed seeds, thresholds well below the benchmark's targets), its tokenizer takes any
text, and the recipe's training stages run (a few steps each), resume, and freeze what they should."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import load_script, run_two_cpu_processes
from safetensors.torch import load_file

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersPipeline,
    CheersProcessor,
)
from transformers_cheers.layout import patchify_latents
from transformers_cheers.scratch import (
    CaptionAlignment,
    caption_alignment_loss,
    decoder_projector_losses,
    finish_vae_stage,
    latent_statistics,
    new_cheers,
    text_to_image_pairs,
    train_tokenizer,
    visibility_probe,
)
from transformers_cheers.shapes import (
    COLOURS,
    HELD_OUT,
    QUESTIONS,
    caption,
    draw_scene,
    edit_instruction,
    is_held_out,
    load_shapes_dataset,
    read_scene,
    read_world_card,
    sample_scene,
    write_dataset,
)


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "cheers-shapes"
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    model = CheersForConditionalGeneration.from_pretrained(SHIPPED).eval()
    pipe = CheersPipeline(
        model=model, processor=CheersProcessor.from_pretrained(SHIPPED), scheduler=CheersFlowMatchScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sampling():
    return read_world_card(SHIPPED)["sampling"]


def seeded(count: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + offset + index) for index in range(count)]


def test_shipped_folder_is_small_and_complete():
    weights = sum(path.stat().st_size for path in SHIPPED.glob("*.safetensors"))
    assert 0 < weights <= 30 * 2**20
    for name in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json"):
        assert (SHIPPED / name).is_file(), name
    assert not list(SHIPPED.glob("*.py"))  # the package's classes load it; no stale remote-code copies


# Thresholds: well below the benchmark's targets and above chance, set from what the shipped model reaches on the
# full evaluation (docs/shapes.md): text-to-image colour 98 % seen and held-out (chance 17 %) and position 88-91 %
# (chance 33 %), understanding colour 99-100 %, shape 80-95 % and position 100 % (chance 17 / 33 / 33 %), edits
# reaching the requested colour 94-98 % (chance 17 %). It has not learnt to draw shapes (chance), so drawn shapes are
# not asserted.


def test_draws_the_colour_and_position_it_is_asked(pipe, sampling):
    scenes = [(colour, shape, position) for colour in ("red", "blue", "orange") for shape, position in
              (("circle", "left"), ("square", "center"), ("triangle", "right"))]  # fmt: skip
    images = pipe([caption(*scene) for scene in scenes], generator=seeded(len(scenes)), **sampling).images
    reads = [read_scene(image) for image in images]
    assert sum(got[0] == want[0] for got, want in zip(reads, scenes)) >= 7, reads
    assert sum(got[2] == want[2] for got, want in zip(reads, scenes)) >= 6, reads  # chance: 3 of 9


def test_draws_held_out_combinations_in_their_colour(pipe, sampling):
    prompts = [caption(colour, shape, "center") for colour, shape in HELD_OUT]
    images = pipe(prompts, generator=seeded(len(prompts), 100), **sampling).images
    colours = [read_scene(image)[0] for image in images]
    assert sum(got == want for got, (want, _) in zip(colours, HELD_OUT)) >= 3, colours


def test_answers_colour_shape_and_position_of_fresh_images(pipe):
    rng = random.Random(2024)  # a stream apart from the training writer's
    scenes = [sample_scene(rng) for _ in range(8)]
    correct = {"colour": 0, "shape": 0, "position": 0}
    for kind in correct:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[kind]}]}]
        prompt = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = pipe.processor(images=[draw_scene(scene) for scene in scenes], text=[prompt] * len(scenes))
        output = pipe.model.generate(**inputs, max_new_tokens=6, do_sample=False)  # a left-padded batch
        answers = pipe.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct[kind] = sum(answer.strip() == scene.answer(kind) for answer, scene in zip(answers, scenes))
    assert correct["colour"] >= 7 and correct["shape"] >= 6 and correct["position"] >= 6, correct  # chance 1.3/2.7


def test_edits_reach_the_requested_colour(pipe, sampling):
    rng = random.Random(7)
    sources = [sample_scene(rng, colour, shape) for colour in ("red", "blue", "orange", "yellow")
               for shape in ("circle", "triangle") if not is_held_out(colour, shape)]  # fmt: skip
    targets = [rng.choice([colour for colour in COLOURS if colour != scene.colour]) for scene in sources]
    edited = pipe(
        [edit_instruction(colour) for colour in targets],
        image=[draw_scene(scene) for scene in sources],
        generator=seeded(len(sources), 200),
        **sampling,
    ).images
    colours = [read_scene(image)[0] for image in edited]
    assert sum(got == want for got, want in zip(colours, targets)) >= 5, (colours, targets)  # chance: 1.2 of 7


def test_unknown_words_still_tokenize_and_run(pipe):
    tokenizer = pipe.processor.tokenizer
    known = tokenizer.tokenize(" red circle")
    assert known == ["Ġred", "Ġcircle"]  # a word of the world is one token
    pieces = tokenizer.tokenize("a turquoise hexagon 🙂")
    assert pieces and tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)  # byte-level fallback
    image = pipe("a turquoise hexagon on the left", num_inference_steps=2, generator=seeded(1)).images[0]
    assert image.size == (64, 64)


# ---- the recipe ----------------------------------------------------------------------------------------------------


def load_example(name: str):
    sys.path.insert(0, str(EXAMPLES))  # train_vae imports train_lora's helpers, as when run from examples/
    try:
        return load_script(EXAMPLES / f"{name}.py")
    finally:
        sys.path.remove(str(EXAMPLES))


def run(script, *args):
    try:
        return script.main([str(arg) for arg in args])
    finally:
        AcceleratorState._reset_state(True)  # one Accelerator per run in this process


def changed(before: dict, after: dict, prefix: str) -> list[bool]:
    return [not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix)]


def test_recipe_runs_resumes_and_freezes_what_it_should(tmp_path):
    data = write_dataset(tmp_path / "data", num_generation=6, num_understanding=6, num_editing=4) / "train.jsonl"
    train_vae, train_lora = load_example("train_vae"), load_example("train_lora")
    vae_args = ["--data", data, "--output-dir", tmp_path / "vae", "--batch-size", 4, "--statistics-images", 8]
    run(train_vae, *vae_args, "--max-steps", 2, "--checkpoint-every", 1, "--quiet")
    resumed = run(train_vae, *vae_args, "--max-steps", 3, "--resume", "latest", "--quiet")
    assert set(resumed) == {"loss", "mse", "kl", "lr"}
    steps = [json.loads(line)["step"] for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    vae_stage = tmp_path / "vae" / "final"
    with pytest.raises(SystemExit):  # the projector part tunes an existing stage-1 model
        train_vae.parse_args(["--part", "projector", "--data", str(data)])
    projector_metrics = run(
        train_vae, "--part", "projector", "--model", vae_stage, "--data", data, "--output-dir", tmp_path / "projector",
        "--max-steps", 2, "--batch-size", 4, "--timestep-shift", 0.5, "--quiet",
    )  # fmt: skip
    assert set(projector_metrics) == {"loss", "clean", "visibility", "lr"}
    stage1 = tmp_path / "projector" / "final"
    first, before = load_file(vae_stage / "model.safetensors"), load_file(stage1 / "model.safetensors")
    assert not any(changed(first, before, "model.vae.")) and any(
        changed(first, before, "model.vae_decoder_projector.")
    )
    assert not any(changed(first, before, "model.language_model."))  # the probe is not saved, nothing else moves
    assert set(first) == set(before)

    with pytest.raises(ValueError, match="fewer than --batch-size 64"):
        run(train_vae, "--part", "vision", "--model", stage1, "--data", data, "--batch-size", 64, "--quiet")
    vision_metrics = run(
        train_vae, "--part", "vision", "--model", stage1, "--data", data, "--output-dir", tmp_path / "vision",
        "--max-steps", 2, "--batch-size", 4, "--caption-images", 5, "--quiet",
    )  # fmt: skip
    assert set(vision_metrics) == {"loss", "lr"} and vision_metrics["loss"] > 0
    vision = load_file(tmp_path / "vision" / "final" / "model.safetensors")
    assert set(vision) == set(before)  # the caption side of the objective is not saved
    moved = {name.split(".")[1] for name in before if not torch.equal(before[name], vision[name])}
    assert moved == {"vision_representation", "multi_modal_projector"}  # SigLIP and the token merger, nothing else
    before = vision

    history = run(
        train_lora, "--full", "--stage", "scratch", "--model", tmp_path / "vision" / "final", "--data", data,
        "--output-dir", tmp_path / "sft", "--max-steps", 2, "--batch-size", 4, "--learning-rate", 1e-3,
        "--lr-scheduler", "cosine", "--no-gradient-checkpointing", "--report-to", "none", "--quiet",
    )  # fmt: skip
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(step["loss"])) for step in history)
    after = load_file(tmp_path / "sft" / "final" / "model.safetensors")
    frozen = ("model.vae.", "model.vae_decoder_projector.", "model.vision_representation.")  # earlier stages' parts
    assert not any(changed(before, after, frozen))
    assert any(changed(before, after, "model.language_model.layers."))
    # the projector started as the VAE decoder, with the VAE's latent statistics
    for name in first:
        if name.startswith("model.vae_decoder_projector.") and "bn." not in name:
            assert torch.equal(first[name], first[name.replace("vae_decoder_projector.", "vae.")]), name
    for bn in ("running_mean", "running_var"):
        assert torch.equal(before[f"model.vae.bn.{bn}"], before[f"model.vae_decoder_projector.bn.{bn}"])


def test_decoder_projector_losses_target_x_t_token_by_token():
    tokenizer = train_tokenizer(["<|im_start|>user\na red circle<|im_end|>\n"] * 2)
    model, _ = new_cheers(tokenizer, "shapes", seed=0)
    pixels = torch.rand(4, 3, 64, 64)
    mean, variance = latent_statistics(model.model.vae, [pixels])
    finish_vae_stage(model, mean, variance)
    with torch.no_grad():
        latents = model.model.encode_latents(pixels)
    probe = visibility_probe(model)
    losses = decoder_projector_losses(
        model, probe, latents, timestep_shift=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert losses["clean"].item() == 0.0  # at the hand-over the projector decodes exactly as the VAE
    losses["visibility"].backward()
    assert probe.weight.grad.abs().sum() > 0
    assert next(model.model.vae_decoder_projector.parameters()).grad is not None
    assert all(parameter.grad is None for parameter in model.model.vae.parameters())

    class ShowFirstChannel(torch.nn.Module):  # a projector painting each token's channel 0 over its pixel patch
        def forward(self, latents):
            patch = model.config.vision_config.patch_size
            return latents[:, :1].repeat_interleave(patch, 2).repeat_interleave(patch, 3).expand(-1, 3, -1, -1)

    model.model.vae_decoder_projector = ShowFirstChannel()
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    with torch.no_grad():
        blind = decoder_projector_losses(
            model, probe, latents, timestep_shift=0.5, generator=torch.Generator().manual_seed(3)
        )
        probe.weight[0, 0] = 1.0  # read channel 0 back from the patch's first pixel
        reading = decoder_projector_losses(
            model, probe, latents, timestep_shift=0.5, generator=torch.Generator().manual_seed(3)
        )
    # with the same draws, x_t is the same: reading channel 0 back removes exactly its share of the error
    generator = torch.Generator().manual_seed(3)
    t = torch.rand(len(latents), generator=generator).view(-1, 1, 1, 1)
    t = 0.5 * t / (1 - 0.5 * t)
    x_t = t * latents + (1 - t) * torch.randn(latents.shape, generator=generator)
    torch.testing.assert_close(blind["visibility"], x_t.square().mean())
    torch.testing.assert_close(reading["visibility"], x_t[:, 1:].square().sum(1).mean() / x_t.shape[1])


def test_two_process_vae_stage_ends_with_identical_weights(tmp_path):
    """The stage-1 script under a real 2-process DDP run: the objective runs through the prepared module, so both
    ranks see averaged gradients (each rank gets other images) and end with the same weights."""
    data = write_dataset(tmp_path / "data", num_generation=8, num_understanding=8, num_editing=0) / "train.jsonl"
    output = tmp_path / "vae"
    run_two_cpu_processes(
        EXAMPLES / "train_vae.py", "--data", data, "--output-dir", output, "--max-steps", 2, "--batch-size", 2,
        "--statistics-images", 4, "--save-rank-state", "--quiet",
    )  # fmt: skip
    ranks = [load_file(output / f"rank{rank}_trained.safetensors") for rank in (0, 1)]
    initial = load_file(output / "init" / "model.safetensors")
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert any(not torch.equal(ranks[0][name], initial[f"model.vae.{name}"]) for name in ranks[0])  # it trained


def test_text_to_image_pairs_are_the_generation_samples(tmp_path):
    folder = write_dataset(tmp_path / "data", num_generation=5, num_understanding=4, num_editing=3)
    dataset = load_shapes_dataset(folder)
    pairs = text_to_image_pairs(dataset["conversations"], dataset["images"])
    expected = [json.loads(line) for line in (folder / "generation.jsonl").read_text().splitlines()]
    assert [caption for _, caption in pairs] == [record["conversations"][0]["value"] for record in expected]
    assert [Path(path).name for path, _ in pairs] == [Path(record["image"]).name for record in expected]


def test_caption_alignment_loss_is_siglips_with_repeated_captions_as_positives():
    tokenizer = train_tokenizer([f"<|im_start|>user\n{caption('red', 'circle', 'left')}<|im_end|>\n"] * 2)
    model, _ = new_cheers(tokenizer, "shapes", seed=0)
    alignment = CaptionAlignment(model)
    latents = torch.randn(3, model.config.latent_channels, 8, 8)
    with torch.no_grad():
        decoded = model.model.vae_decoder_projector(latents)
    captions = [caption("red", "circle", "left"), caption("red", "circle"), caption("red", "circle", "left")]
    ids = tokenizer(captions, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
    index = torch.tensor([0, 1, 0])  # images 0 and 2 have the same caption
    loss = caption_alignment_loss(model, alignment, decoded, ids, index)

    # by hand: the LLM image tokens of those pixels, mean-pooled; each caption the mean of its word embeddings
    tokens = model.model.get_latent_features(latents).pooler_output
    image = torch.nn.functional.normalize(alignment.image(tokens.mean(1)), dim=-1)
    words = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in captions]
    text = torch.stack([alignment.text.weight[word].mean(0) for word in words])
    logits = image @ torch.nn.functional.normalize(text, dim=-1).T * 10 - 10
    positive = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    by_hand = -torch.where(positive, logits, -logits).sigmoid().log().sum() / 3
    torch.testing.assert_close(loss, by_hand)

    loss.backward()
    for module in (model.model.vision_representation, model.model.multi_modal_projector, alignment):
        assert all(parameter.grad is not None for parameter in module.parameters() if parameter.requires_grad)
    for module in (model.model.vae_decoder_projector, model.model.language_model):
        assert all(parameter.grad is None for parameter in module.parameters())


def test_latent_statistics_normalise_the_latents():
    tokenizer = train_tokenizer(["<|im_start|>user\na red circle<|im_end|>\n"] * 2)
    model, _ = new_cheers(tokenizer, "shapes", seed=0)
    pixels = torch.rand(6, 3, 64, 64)
    mean, variance = latent_statistics(model.model.vae, [pixels[:4], pixels[4:]])
    with torch.no_grad():
        latents = patchify_latents(model.model.vae.encode(pixels).latent_dist.mean, (2, 2))
    torch.testing.assert_close(mean, latents.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(variance, latents.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-8)
    finish_vae_stage(model, mean, variance)
    with torch.no_grad():
        normalised = model.model.encode_latents(pixels)
        # the decoder projector (a copy of the decoder, same statistics) turns latents into the VAE's reconstruction
        torch.testing.assert_close(
            model.model.vae_decoder_projector(normalised), model.model.decode_latents(normalised)
        )
    assert normalised.mean((0, 2, 3)).abs().max() < 1e-3
    assert not any(parameter.requires_grad for parameter in model.model.vae.parameters())
