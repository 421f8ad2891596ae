"""Cheers-Shapes, the model: the shipped folder draws, answers and edits (a small version of
`benchmarks/eval_shapes.py`, fixed seeds, thresholds well below the benchmark's targets), its tokenizer takes any
text, and the recipe's two training stages run (a few steps each), resume, and freeze what they should."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
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


def test_draws_the_colour_shape_and_position_it_is_asked(pipe, sampling):
    scenes = [(colour, shape, position) for colour in ("red", "blue", "orange") for shape, position in
              (("circle", "left"), ("square", "center"), ("triangle", "right"))]  # fmt: skip
    scenes = [scene for scene in scenes if not is_held_out(*scene[:2])]
    images = pipe([caption(*scene) for scene in scenes], generator=seeded(len(scenes)), **sampling).images
    read = [read_scene(image) for image in images]
    colour = sum(got[0] == want[0] for got, want in zip(read, scenes)) / len(scenes)
    position = sum(got[2] == want[2] for got, want in zip(read, scenes)) / len(scenes)
    shape = sum(got[1] == want[1] for got, want in zip(read, scenes)) / len(scenes)
    assert colour >= 0.7 and position >= 0.6 and shape >= 0.4, (read, scenes)


def test_draws_a_held_out_combination_in_its_colour(pipe, sampling):
    prompts = [caption(colour, shape, "center") for colour, shape in HELD_OUT]
    images = pipe(prompts, generator=seeded(len(prompts), 100), **sampling).images
    colours = [read_scene(image)[0] for image in images]
    assert sum(got == want for got, (want, _) in zip(colours, HELD_OUT)) >= 2, colours


def test_answers_questions_about_fresh_images(pipe):
    rng = random.Random(2024)  # a stream apart from the training writer's
    correct = total = 0
    for _ in range(4):
        scene = sample_scene(rng)
        image = draw_scene(scene)
        for kind in ("colour", "shape", "position"):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[kind]}]}]
            prompt = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = pipe.processor(images=[image], text=prompt)
            output = pipe.model.generate(**inputs, max_new_tokens=6, do_sample=False)
            answer = pipe.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += answer.strip() == scene.answer(kind)
            total += 1
    assert correct / total >= 0.75, f"{correct}/{total}"


def test_edits_recolour_the_shape(pipe, sampling):
    rng = random.Random(7)
    sources = [sample_scene(rng, "red", "square"), sample_scene(rng, "blue", "circle")]
    targets = ["green", "orange"]
    edited = [
        pipe(
            edit_instruction(colour), image=draw_scene(scene), generator=seeded(1, 200 + index)[0], **sampling
        ).images[0]
        for index, (scene, colour) in enumerate(zip(sources, targets))
    ]
    assert sum(read_scene(image)[0] == colour for image, colour in zip(edited, targets)) >= 1


def test_unknown_words_still_tokenize_and_run(pipe):
    tokenizer = pipe.processor.tokenizer
    known = tokenizer.tokenize(" red circle")
    assert known == ["Ġred", "Ġcircle"]  # a word of the world is one token
    pieces = tokenizer.tokenize("a turquoise hexagon 🙂")
    assert pieces and tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)  # byte-level fallback
    image = pipe("a turquoise hexagon on the left", num_inference_steps=2, generator=seeded(1)).images[0]
    assert image.size == (64, 64)


# ---- the recipe ----------------------------------------------------------------------------------------------------


def load_script(name: str):
    sys.path.insert(0, str(EXAMPLES))  # train_vae imports train_lora's helpers, as when run from examples/
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def run(script, *args):
    try:
        return script.main([str(arg) for arg in args])
    finally:
        AcceleratorState._reset_state(True)  # one Accelerator per run in this process


def test_recipe_runs_resumes_and_freezes_the_vae(tmp_path):
    data = write_dataset(tmp_path / "data", num_generation=6, num_understanding=6, num_editing=4) / "train.jsonl"
    train_vae, train_lora = load_script("train_vae"), load_script("train_lora")
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
