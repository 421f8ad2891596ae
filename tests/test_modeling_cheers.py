"""Contract tests of the native model on a tiny random configuration."""

import pytest
import torch
from conftest import expand_official_ids, run_python_without_the_package
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from transformers_cheers import CheersConfig, CheersForConditionalGeneration, CheersModel
from transformers_cheers.omni_attention import image_block_ids
from transformers_cheers.presets import preset_config


IMAGE = 151665


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CheersForConditionalGeneration(preset_config("tiny")).eval()
    # adaLN-Zero init makes the heads output zeros; random weights make the tests meaningful.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name or "detail_gate.gate.2" in name:
                parameter.normal_(0, 0.02)
    return model


def image_prompt(config, prefix=(11, 12, 13), suffix=(21, 22)):
    return (
        list(prefix)
        + [config.image_start_token_id]
        + [IMAGE] * config.num_image_tokens
        + [config.image_end_token_id]
        + list(suffix)
    )


def test_config_defaults_match_official_model():
    config = CheersConfig()
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.rope_parameters["rope_theta"]) == (28, 1536, 1e6)
    assert text.tie_word_embeddings and text.rms_norm_eps == 1e-6 and not text.use_sliding_window
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1152, 512)
    assert (config.num_image_tokens, config.latent_channels) == (256, 128)
    assert config.detail_head_num_key_value_heads == text.num_key_value_heads
    assert [config.image_token_id, config.image_gen_token_id, config.image_start_token_id] == [151665, 151666, 151667]
    assert [config.image_end_token_id, config.null_token_id] == [151668, 151669]


def test_config_rejects_inconsistent_geometry():
    with pytest.raises(ValueError, match="multiple of 32"):
        CheersConfig(vision_config={"image_size": 500})
    with pytest.raises(ValueError, match="patch"):
        CheersConfig(vae_config={"block_out_channels": [128, 256, 512]})


def test_save_and_load_with_auto_classes(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    expected = tiny(input_ids=ids, pixel_values=pixels).logits
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        reloaded = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, CheersForConditionalGeneration)
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, CheersModel)
    assert (tmp_path / "modeling_cheers.py").exists() and (tmp_path / "configuration_cheers.py").exists()


def test_lm_head_is_tied(tiny):
    assert tiny.lm_head.weight is tiny.get_input_embeddings().weight


def test_bf16_load_keeps_batch_norm_statistics_in_fp32(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    model = CheersForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.vae.bn.running_var.dtype == torch.float32
    assert model.model.vae_decoder_projector.bn.running_mean.dtype == torch.float32
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([image_prompt(tiny.config)])
    assert torch.isfinite(model(input_ids=ids, pixel_values=torch.rand(1, 3, 64, 64)).logits).all()


def test_image_blocks_are_bidirectional_and_text_causal(tiny):
    """The omni mask, built with transformers' masking utilities, equals the official one (case2 of the fixtures)."""
    model = tiny.model
    ids = torch.tensor([image_prompt(tiny.config, prefix=(11,), suffix=(21,))])
    embeds = model.get_input_embeddings()(ids)
    blocks = image_block_ids(model.get_placeholder_mask(ids), tiny.config.num_image_tokens)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        mask = model.build_attention_mask(embeds, torch.ones_like(ids), None, positions, blocks)["full_attention"]
    mask = mask[0, 0].bool() if mask.dtype == torch.bool else (mask[0, 0] == 0)
    length, image = ids.shape[1], ids[0] == IMAGE
    expected = torch.tril(torch.ones(length, length, dtype=torch.bool)) | (image[:, None] & image[None, :])
    assert torch.equal(mask, expected)


def test_adjacent_images_are_separate_blocks(tiny):
    """Two images with no text between them: each attends bidirectionally to itself only (causally to the other)."""
    tokens = tiny.config.num_image_tokens
    ids = torch.tensor([[11] + [IMAGE] * (2 * tokens) + [21]])
    blocks = image_block_ids(tiny.model.get_placeholder_mask(ids), tokens)
    assert blocks[0].tolist() == [-1] + [0] * tokens + [1] * tokens + [-1]
    positions = torch.arange(ids.shape[1])[None]
    embeds = tiny.model.get_input_embeddings()(ids)
    mask = tiny.model.build_attention_mask(embeds, torch.ones_like(ids), None, positions, blocks)["full_attention"]
    mask = mask[0, 0].bool() if mask.dtype == torch.bool else (mask[0, 0] == 0)
    first, second = 1, 1 + tokens
    assert bool(mask[first, first + tokens - 1])  # inside the first image: bidirectional
    assert not bool(mask[first, second])  # the first image does not see the second one
    assert bool(mask[second, first])  # the second sees the first causally


@pytest.mark.parametrize("case", ["case2_understanding", "case3_text_only"])
def test_omni_mask_equals_official_mask(golden, golden_models, case):
    model = golden_models("fp32")
    inputs = golden.inputs(case)
    context = case == "case3_text_only"
    ids, attention, context_mask = expand_official_ids(
        inputs["inputs/input_ids"][0], inputs["inputs/attention_mask"][0], 16, model.config.image_token_id, context
    )
    core = model.model
    blocks = image_block_ids(core.get_placeholder_mask(ids) & ~context_mask, 16)
    embeds = core.get_input_embeddings()(ids)
    positions = torch.arange(ids.shape[1])[None]
    mask = core.build_attention_mask(embeds, attention, None, positions, blocks)["full_attention"]
    if mask is None:  # SDPA's is_causal fast path: a plain causal mask
        mask = torch.tril(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool))
    expected = golden.outputs(case, "fp32")["prefill/omni_attention_mask_head0"][0].bool()
    assert torch.equal(mask[0, 0].bool(), expected)


def test_attention_backends_agree(tiny):
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    outputs = {}
    for backend in ("sdpa", "eager"):
        tiny.set_attn_implementation(backend)
        with torch.no_grad():
            outputs[backend] = tiny(input_ids=ids, pixel_values=pixels).logits
    tiny.set_attn_implementation("sdpa")
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_like_single_prompts(tiny):
    config = tiny.config
    prompts = [image_prompt(config, prefix=(11, 12, 13, 14, 15)), image_prompt(config, prefix=(31,))]
    pixels = torch.rand(2, 3, 64, 64)
    singles = [
        tiny.generate(input_ids=torch.tensor([p]), pixel_values=pixels[i : i + 1], max_new_tokens=5, do_sample=False)
        for i, p in enumerate(prompts)
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = tiny.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    for row, single in enumerate(singles):
        assert batch[row, width:].tolist() == single[0, len(prompts[row]) :].tolist()


def test_static_cache_generates_like_the_dynamic_cache(tiny):
    """generate(cache_implementation="static") prebuilds a plain causal mask; the prompt still gets the omni mask."""
    config = tiny.config
    prompts = [image_prompt(config, prefix=(11, 12, 13, 14, 15)), image_prompt(config, prefix=(31,))]
    width = max(map(len, prompts))
    inputs = {
        "input_ids": torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
    }
    settings = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    dynamic = tiny.generate(**inputs, **settings)
    static = tiny.generate(**inputs, cache_implementation="static", **settings)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for step, (expected, actual) in enumerate(zip(dynamic.scores, static.scores)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    with torch.no_grad():  # the first step's scores are the omni-masked prefill's
        prefill = tiny(**inputs).logits[:, -1]
    torch.testing.assert_close(static.scores[0], prefill, rtol=1e-4, atol=1e-5)


def test_cache_matches_full_recomputation(tiny):
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    cached = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    uncached = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_generate_modes_sampling_beam_streamer_stopping(tiny):
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    torch.manual_seed(3)
    first = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(3)
    second = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_k=5)
    assert first.tolist() == second.tolist()
    beams = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (1, ids.shape[1] + 3)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    streamed = tiny.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 1 + 3  # prompt, 3 tokens, end
    assert streamed.shape[1] == ids.shape[1] + 3

    class StopAfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 2, dtype=torch.bool)

    stopped = tiny.generate(
        input_ids=ids,
        pixel_values=pixels,
        max_new_tokens=10,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([StopAfterTwo()]),
    )
    assert stopped.shape[1] == ids.shape[1] + 2


def test_placeholder_count_mismatch_names_both_counts(tiny):
    ids = torch.tensor([image_prompt(tiny.config)])
    with pytest.raises(ValueError, match=r"4 image placeholder tokens but the images give 8 features"):
        tiny(input_ids=ids, pixel_values=torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 48)])
def test_image_size_not_multiple_of_grid_is_rejected(tiny, shape):
    with pytest.raises(ValueError, match="not a multiple of 32"):
        tiny.model.get_image_features(torch.rand(*shape))


def test_pixel_values_with_wrong_channels_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"shape \(num_images, 3, height, width\)"):
        tiny.model.get_image_features(torch.rand(1, 4, 64, 64))


def test_gradient_checkpointing_gives_same_gradients(tiny):
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    model = CheersForConditionalGeneration(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.train()
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        gradients.append(model.model.multi_modal_projector.linear_1.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


@pytest.mark.slow
def test_flex_attention_agrees_with_sdpa(tiny):
    """flex_attention compiles its kernels (~50 s on 2 CPU cores), so it runs with `pytest -m slow`."""
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny(input_ids=ids, pixel_values=pixels).logits
        tiny.set_attn_implementation("flex_attention")
        try:
            actual = tiny(input_ids=ids, pixel_values=pixels).logits
        finally:
            tiny.set_attn_implementation("sdpa")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_saved_folder_loads_with_remote_code_without_the_package(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "model")
    ids = torch.tensor([image_prompt(tiny.config)])
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny(input_ids=ids, pixel_values=pixels).logits
    torch.save((ids, pixels, expected), tmp_path / "io.pt")
    code = (
        "import torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)\n"
        f"ids, pixels, expected = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model.eval()(input_ids=ids, pixel_values=pixels).logits, expected)\n"
        "print(type(model).__module__)\n"
    )
    run = run_python_without_the_package(code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith("transformers_modules.")


def test_velocity_function_traces_without_graph_breaks(tiny):
    """One sampling step compiles as one graph: no host sync (`.item()`, `bool(tensor)`) in the per-step path."""
    core = tiny.model
    ids = torch.tensor([[11, 12, 13, tiny.config.image_start_token_id]])
    with torch.no_grad():
        cache = core(input_ids=ids, use_cache=True).cache
        latents = torch.randn(1, tiny.config.latent_channels, 2, 2, generator=torch.Generator().manual_seed(0))
        core.get_latent_features(latents)  # transformers installs its output-capturing hooks once, under a lock
        explanation = torch._dynamo.explain(core.compute_velocity)(latents, torch.tensor(0.3), cache)
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]


def test_decoder_projector_slicing_keeps_pixels_and_caps_the_batch_peak(tiny):
    """diffusers' autoencoder slicing API on the per-step decoder pass: same pixels, the one-image memory peak."""
    from pathlib import Path

    from conftest import load_script

    live_memory = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "live_memory.py")
    projector = tiny.model.vae_decoder_projector
    torch.manual_seed(1)
    latents = torch.randn(4, tiny.config.latent_channels, 8, 8)

    def decode():
        with torch.no_grad(), live_memory.LiveTensorMemory() as memory:
            pixels = projector(latents)
        return pixels, memory.peak

    whole, whole_peak = decode()
    projector.enable_slicing()
    try:
        sliced, sliced_peak = decode()
    finally:
        projector.disable_slicing()
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert sliced.shape == (4, 3, 128, 128)
    # four images at once hold four images' activations; one at a time holds one (plus the growing output)
    assert sliced_peak < 0.5 * whole_peak, (sliced_peak, whole_peak)
    assert projector.use_slicing is False
