"""Cheers-Shapes, the model: the shipped folder draws, answers and edits (a small version of
`benchmarks/eval_shapes.py`, fixed seeds, thresholds well below the benchmark's targets), its tokenizer takes any
text, and the recipe's two training stages run (a few steps each), resume, and freeze what they should."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import load_script
from safetensors.torch import load_file

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersPipeline,
    CheersProcessor,
)
from transformers_cheers.layout import patchify_latents
from transformers_cheers.scratch import finish_vae_stage, latent_statistics, new_cheers, train_tokenizer
from transformers_cheers.shapes import (
    COLOURS,
    HELD_OUT,
    QUESTIONS,
    caption,
    draw_scene,
    edit_instruction,
    is_held_out,
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
# full evaluation (docs/shapes.md): text-to-image colour 100 % seen and held-out (chance 17 %), understanding colour
# 100 % and position 84 % (chance 33 %), edits reaching the requested colour 100 % (chance 17 %). It has not learnt
# shapes (chance when drawing, 40 % when answering) nor positions when drawing, so those are not asserted.


def test_draws_the_colour_it_is_asked(pipe, sampling):
    scenes = [(colour, shape, position) for colour in ("red", "blue", "orange") for shape, position in
              (("circle", "left"), ("square", "center"), ("triangle", "right"))]  # fmt: skip
    images = pipe([caption(*scene) for scene in scenes], generator=seeded(len(scenes)), **sampling).images
    colours = [read_scene(image)[0] for image in images]
    assert sum(got == want for got, (want, _, _) in zip(colours, scenes)) >= 7, colours


def test_draws_held_out_combinations_in_their_colour(pipe, sampling):
    prompts = [caption(colour, shape, "center") for colour, shape in HELD_OUT]
    images = pipe(prompts, generator=seeded(len(prompts), 100), **sampling).images
    colours = [read_scene(image)[0] for image in images]
    assert sum(got == want for got, (want, _) in zip(colours, HELD_OUT)) >= 3, colours


def test_answers_colour_and_position_of_fresh_images(pipe):
    rng = random.Random(2024)  # a stream apart from the training writer's
    scenes = [sample_scene(rng) for _ in range(8)]
    correct = {"colour": 0, "position": 0}
    for kind in correct:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[kind]}]}]
        prompt = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = pipe.processor(images=[draw_scene(scene) for scene in scenes], text=[prompt] * len(scenes))
        output = pipe.model.generate(**inputs, max_new_tokens=6, do_sample=False)  # a left-padded batch
        answers = pipe.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct[kind] = sum(answer.strip() == scene.answer(kind) for answer, scene in zip(answers, scenes))
    assert correct["colour"] >= 7 and correct["position"] >= 5, correct


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


def test_recipe_runs_resumes_and_freezes_the_vae(tmp_path):
    data = write_dataset(tmp_path / "data", num_generation=6, num_understanding=6, num_editing=4) / "train.jsonl"
    train_vae, train_lora = load_example("train_vae"), load_example("train_lora")
    vae_args = ["--data", data, "--output-dir", tmp_path / "vae", "--batch-size", 4, "--statistics-images", 8]
    run(train_vae, *vae_args, "--max-steps", 2, "--checkpoint-every", 1, "--quiet")
    resumed = run(train_vae, *vae_args, "--max-steps", 3, "--resume", "latest", "--quiet")
    assert set(resumed) == {"loss", "mse", "kl", "lr"}
    steps = [json.loads(line)["step"] for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    stage1 = tmp_path / "vae" / "final"
    history = run(
        train_lora, "--full", "--stage", "scratch", "--model", stage1, "--data", data, "--output-dir",
        tmp_path / "sft", "--max-steps", 2, "--batch-size", 4, "--learning-rate", 1e-3, "--lr-scheduler", "cosine",
        "--no-gradient-checkpointing", "--report-to", "none", "--quiet",
    )  # fmt: skip
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(step["loss"])) for step in history)
    before, after = (
        load_file(stage1 / "model.safetensors"),
        load_file(tmp_path / "sft" / "final" / "model.safetensors"),
    )
    frozen = [name for name in before if name.startswith(("model.vae.", "model.vae_decoder_projector."))]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    trained = [name for name in before if name.startswith("model.language_model.layers.")]
    assert any(not torch.equal(before[name], after[name]) for name in trained)
    # the projector starts as the VAE decoder, with the VAE's latent statistics
    for name in before:
        if name.startswith("model.vae_decoder_projector.") and "bn." not in name:
            assert torch.equal(before[name], before[name.replace("vae_decoder_projector.", "vae.")]), name
    assert torch.equal(before["model.vae.bn.running_var"], before["model.vae_decoder_projector.bn.running_var"])


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
