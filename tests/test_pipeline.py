"""CheersPipeline: official parity of whole text-to-image runs, and the diffusers pipeline contract."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close_rel_l2, official_t2i_final_latents, tolerance_for

from transformers_cheers import CheersFlowMatchScheduler, CheersPipeline
from transformers_cheers.tiny import tiny_cheers


PROMPT = "A red apple on a wooden table."


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_cheers()
    pipeline = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def fp32_pipe():
    model, processor = tiny_cheers()
    pipeline = CheersPipeline(model=model.float(), processor=processor, scheduler=CheersFlowMatchScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["case4a_t2i_cfg", "case4b_t2i_nocfg"])
def test_text_to_image_matches_official(golden, golden_models, case, precision):
    """Whole runs: official prompt + dummy context image + recorded initial noise -> final latent and image."""
    model = golden_models(precision)
    expected = golden.outputs(case, precision)
    latents = official_t2i_final_latents(golden, model, case, precision)
    name = "final_latent"
    assert_close_rel_l2(latents, expected[name], tolerance_for(golden, case, name, precision, chain=True), name)
    with torch.no_grad():
        decoded = model.model.decode_latents(latents)
    name = "decoded_image"
    assert_close_rel_l2(decoded, expected[name], tolerance_for(golden, case, name, precision, chain=True), name)


def test_same_seed_same_image_and_seeds_matter(pipe):
    first = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(1), output_type="pt").images
    second = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(1), output_type="pt").images
    other = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(2), output_type="pt").images
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_batch_of_prompts_equals_prompts_one_by_one(fp32_pipe):
    """Different prompt lengths are left-padded in one batch; guidance rows share it too."""
    prompts = ["A red apple on a wooden table, in soft morning light.", "A cat."]
    kwargs = {"num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent"}
    batch = fp32_pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    for index, prompt in enumerate(prompts):
        single = fp32_pipe(prompt, generator=[torch.Generator().manual_seed(index)], **kwargs).images
        torch.testing.assert_close(batch[index : index + 1], single, rtol=1e-4, atol=1e-5)


def test_output_types_and_tuple_output(pipe):
    kwargs = {"num_inference_steps": 2, "generator": torch.manual_seed(0)}
    pil = pipe(PROMPT, **kwargs).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    kwargs["generator"] = torch.manual_seed(0)
    array = pipe(PROMPT, output_type="np", **kwargs).images
    assert array.shape == (1, 64, 64, 3) and array.min() >= 0 and array.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), np.round(array[0] * 255).astype(np.uint8))
    kwargs["generator"] = torch.manual_seed(0)
    latents = pipe(PROMPT, output_type="latent", return_dict=False, **kwargs)
    config = pipe.model.config
    assert isinstance(latents, tuple) and latents[0].shape == (1, config.latent_channels, 4, 4)


def test_num_images_per_prompt_and_non_square_size(pipe):
    images = pipe(["one", "two"], num_images_per_prompt=2, num_inference_steps=1, height=64, width=96).images
    assert len(images) == 4 and all(image.size == (96, 64) for image in images)


def test_detail_gate_heat_map(pipe):
    output = pipe(PROMPT, num_inference_steps=2, return_detail_gate=True)
    assert output.detail_gate_maps[0].size == (64, 64) and output.detail_gate_maps[0].mode == "L"
    raw = pipe(PROMPT, num_inference_steps=2, return_detail_gate=True, output_type="pt").detail_gate_maps
    assert raw.shape == (1, 4, 4) and torch.isfinite(raw).all()


def test_callback_sees_and_replaces_latents_and_can_interrupt(pipe):
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, float(timestep)))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    latents = pipe(PROMPT, num_inference_steps=3, output_type="latent", callback_on_step_end=callback).images
    assert [step for step, _ in seen] == [0, 1, 2] and seen[-1][1] == 1.0
    assert torch.equal(latents, torch.zeros_like(latents))

    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return {}

    calls = []
    pipe(PROMPT, num_inference_steps=5, callback_on_step_end=lambda *a: calls.append(1) or stop(*a))
    assert len(calls) == 1


def test_editing_runs_from_the_source_image(pipe):
    source = PIL.Image.new("RGB", (80, 50), (200, 30, 30))
    steps = []
    output = pipe(
        "Make it blue.",
        image=source,
        num_inference_steps=10,
        strength=0.9,
        output_type="np",
        callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {},
    )
    assert len(steps) == 9 and output.images.shape == (1, 50, 80, 3)  # the source's size (height, width)


def test_editing_keeps_the_source_size_unless_a_size_is_given(pipe):
    """As diffusers' image-to-image pipelines: the output has the source's size, or `height` x `width`."""
    wide, tall = PIL.Image.new("RGB", (160, 96), (200, 30, 30)), PIL.Image.new("RGB", (40, 70), (30, 30, 200))
    kwargs = {"num_inference_steps": 2, "generator": torch.manual_seed(0)}
    assert pipe("Make it blue.", image=wide, **kwargs).images[0].size == (160, 96)
    both = pipe(["Make it blue.", "Make it red."], image=[wide, tall], **kwargs).images
    assert [image.size for image in both] == [(160, 96), (40, 70)]
    assert pipe("Make it blue.", image=wide, height=64, width=128, **kwargs).images[0].size == (128, 64)
    with pytest.raises(ValueError, match=r"different output sizes .* pass `height` and `width`, or output_type='pil'"):
        pipe(["a", "b"], image=[wide, tall], output_type="np", **kwargs)


def test_editing_a_square_source_at_the_canvas_size_is_the_whole_canvas(fp32_pipe):
    """The official editing path is unchanged: a square source fills the canvas, nothing is cut or resized."""
    source = PIL.Image.new("RGB", (64, 64), (200, 30, 30))
    kwargs = {"image": source, "num_inference_steps": 2, "height": 64, "width": 64}
    latents = fp32_pipe("Make it blue.", generator=torch.manual_seed(0), output_type="latent", **kwargs).images
    pixels = fp32_pipe("Make it blue.", generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    with torch.no_grad():
        expected = fp32_pipe.model.model.decode_latents(latents).float().clamp(0, 1)
    assert torch.equal(pixels, expected)


def test_model_cpu_offload_hooks_run_and_are_released():
    model, processor = tiny_cheers()
    pipeline = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    pipeline.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipeline.model, "_hf_hook")
    offloaded = pipeline(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    torch.testing.assert_close(offloaded, expected)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reloaded = CheersPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "latent"}
    expected = pipe(PROMPT, generator=torch.manual_seed(0), **kwargs).images
    assert torch.equal(reloaded(PROMPT, generator=torch.manual_seed(0), **kwargs).images, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_inference_steps": 0}, "num_inference_steps` must be an integer >= 1"),
        ({"height": 50}, "multiples of 32"),
        ({"guidance_scale": -1.0}, "guidance_scale` must be >= 0"),
        ({"latents": torch.zeros(1, 128, 3, 3)}, "`latents` must have shape (1, 128, 4, 4)"),
        ({"latents": torch.zeros(1, 128, 4, 4, dtype=torch.long)}, "floating-point"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators for 1 images"),
        ({"negative_prompt": ["a", "b"]}, "`negative_prompt` has 2 entries but `prompt` has 1"),
        ({"image": PIL.Image.new("RGB", (8, 8)), "strength": 1.5}, "`strength` must be in [0, 1]"),
        ({"image": "not-an-image.png"}, "`image` must be a PIL image"),
        (
            {"strength": 0.5},
            "no `image` was passed: pass the source as `image=` to edit it, or leave `strength` unset",
        ),
        ({"num_images_per_prompt": 0}, "`num_images_per_prompt` must be >= 1, got 0"),
        ({"num_images_per_prompt": 1.5}, "`num_images_per_prompt` must be an integer >= 1"),
        ({"output_type": "tensor"}, "`output_type` must be one of 'pil', 'np', 'pt', 'latent'; got 'tensor'"),
    ],
)
def test_bad_input_is_rejected(pipe, kwargs, message):
    with pytest.raises(ValueError) as error:
        pipe(PROMPT, **kwargs)
    assert message in str(error.value)
