"""What transformers' and diffusers' common test suites check, encoded for Cheers.

Each test names the convention (ModelTesterMixin / PipelineTesterMixin check) it stands for.
"""

import inspect

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from transformers.modeling_outputs import BaseModelOutputWithPooling

from transformers_cheers import (
    CheersConfig,
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersModel,
    CheersPipeline,
)
from transformers_cheers.presets import preset_config
from transformers_cheers.tiny import tiny_cheers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_cheers()
    return model, processor


@pytest.fixture(scope="module")
def inputs(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    generator = torch.Generator().manual_seed(0)
    side = model.config.vision_config.image_size
    return dict(processor(images=[torch.rand(3, side, side, generator=generator)], text=prompt))


# ---- transformers ModelTesterMixin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [CheersModel, CheersForConditionalGeneration])
def test_return_dict_false_gives_the_same_values_as_a_tuple(tiny, inputs, model_class):
    """test_model_outputs_equivalence"""
    model = tiny[0] if model_class is CheersForConditionalGeneration else tiny[0].model
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    first = as_dict.logits if model_class is CheersForConditionalGeneration else as_dict.last_hidden_state
    assert torch.equal(as_tuple[0], first)


@pytest.mark.parametrize("model_class", [CheersModel, CheersForConditionalGeneration])
def test_past_key_values_is_the_deprecated_name_of_cache(tiny, inputs, model_class):
    """test_bc_cache_name_forward: the v4 name still reaches the cache (with a deprecation warning)."""
    model = tiny[0] if model_class is CheersForConditionalGeneration else tiny[0].model
    with torch.no_grad():
        prefix = model(**inputs, use_cache=True)
        step = {"input_ids": torch.tensor([[11]]), "use_cache": True}
        expected = model(**step, cache=prefix.cache)
        prefix = model(**inputs, use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_name = model(**step, past_key_values=prefix.cache)
    assert old_name.cache.get_seq_length() == inputs["input_ids"].shape[1] + 1
    first = "logits" if model_class is CheersForConditionalGeneration else "last_hidden_state"
    assert torch.equal(getattr(old_name, first), getattr(expected, first))


def test_get_image_features_is_a_pooling_output_honouring_the_output_flags(tiny, inputs):
    """test_get_image_features_output / _hidden_states / _attentions"""
    model = tiny[0]
    config = model.config
    pixels = inputs["pixel_values"]
    model.set_attn_implementation("eager")  # attention maps are only materialised by eager attention
    try:
        with torch.no_grad():
            plain = model.get_image_features(pixels)
            detailed = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
            as_tuple = model.get_image_features(pixels, return_dict=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert isinstance(plain, BaseModelOutputWithPooling)
    grid = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert plain.last_hidden_state.shape == (1, grid, config.vision_config.hidden_size)
    assert plain.pooler_output.shape == (1, config.num_image_tokens, config.text_config.hidden_size)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(detailed.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert len(detailed.attentions) == config.vision_config.num_hidden_layers
    assert torch.equal(detailed.patch_embeddings, detailed.hidden_states[0])
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.last_hidden_state)


def test_causal_lm_output_carries_the_image_outputs(tiny, inputs):
    """test_multimodal_outputs_are_returned"""
    model, processor = tiny
    with torch.no_grad():
        with_image = model(**inputs)
        text_only = model(**processor(text="Hello"))
    assert torch.equal(
        with_image.image_outputs.pooler_output, model.get_image_features(inputs["pixel_values"]).pooler_output
    )
    assert text_only.image_outputs is None


def test_inputs_embeds_with_pixel_values_finds_the_placeholders(tiny, inputs):
    """test_inputs_embeds: placeholders are found by their embedding when there are no input_ids."""
    model = tiny[0]
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    without_ids = {key: value for key, value in inputs.items() if key != "input_ids"}
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = model(inputs_embeds=embeds, **without_ids).logits
    assert torch.equal(actual, expected)


def test_batch_norm_statistics_stay_float32_and_counters_integer(tmp_path):
    """test_keep_in_fp32_modules(_strict): no overlap; fp32 under another default dtype and after a bf16 load."""
    assert not set(CheersModel._keep_in_fp32_modules or ()) & set(CheersModel._keep_in_fp32_modules_strict)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = CheersForConditionalGeneration(preset_config("tiny"))
    finally:
        torch.set_default_dtype(default)
    for batch_norm in (model.model.vae.bn, model.model.vae_decoder_projector.bn):
        assert batch_norm.running_mean.dtype == batch_norm.running_var.dtype == torch.float32
    model.save_pretrained(tmp_path)
    loaded = CheersForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.vae.bn.running_var.dtype == torch.float32
    assert loaded.model.vae.bn.num_batches_tracked.dtype == torch.int64
    assert loaded.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_save_pretrained_keeps_the_transformers_signature_and_writes_the_remote_code_map(tiny, tmp_path):
    """diffusers inspects save_pretrained for `variant` / `max_shard_size`; every saved folder loads as remote code."""
    model = tiny[0]
    parameters = inspect.signature(model.save_pretrained).parameters
    assert {"variant", "max_shard_size"} <= set(parameters)
    model.save_pretrained(tmp_path, variant="fp16")
    assert any(path.name.endswith(".fp16.safetensors") for path in tmp_path.iterdir())
    auto_map = CheersConfig.from_pretrained(tmp_path).auto_map
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"} <= set(auto_map)


def test_one_source_of_image_inputs(tiny, inputs):
    """Pixels, latents or a precomputed vision-tokenizer output: exactly one, the same features either way."""
    model = tiny[0]
    with torch.no_grad():
        image_outputs = model.get_image_features(inputs["pixel_values"])
        expected = model(**inputs).logits
        without_pixels = {key: value for key, value in inputs.items() if key != "pixel_values"}
        precomputed = model(**without_pixels, mm_encoder_outputs={"image": image_outputs}).logits
        latents = model.model.encode_latents(inputs["pixel_values"])
        from_latents = model(**without_pixels, image_latents=latents).logits
        for extra in ({"mm_encoder_outputs": {"image": image_outputs}}, {"image_latents": latents}):
            with pytest.raises(ValueError, match="Pass images once"):
                model(**inputs, **extra)
    assert torch.equal(precomputed, expected) and torch.equal(from_latents, expected)


def test_training_inputs_without_labels_are_refused(tiny, inputs):
    with pytest.raises(ValueError, match="training inputs: pass labels"):
        tiny[0](**inputs, image_timesteps=torch.tensor([0.5]))


# ---- diffusers APIs on the reused VAE -------------------------------------------------------------------------------


def test_vae_numerics_switch_keeps_weights_and_library_apis():
    """Bit-parity kernels: same state dict as a stock AutoencoderKLFlux2, and its attention APIs still work."""
    config = preset_config("tiny")
    assert config.vae_unfused_kernels
    torch.manual_seed(0)
    ours = CheersModel(config).vae.eval()
    stock = AutoencoderKLFlux2(**config.vae_config).eval()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(ours.state_dict())
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = stock.encode(pixels).latent_dist.mean
        results = {"unfused kernels": ours.encode(pixels).latent_dist.mean}
        ours.set_attn_processor(AttnProcessor2_0())
        results["set_attn_processor"] = ours.encode(pixels).latent_dist.mean
        ours.fuse_qkv_projections()
        results["fuse_qkv_projections"] = ours.encode(pixels).latent_dist.mean
        ours.unfuse_qkv_projections()
        ours.set_default_attn_processor()
        assert all(type(processor) is AttnProcessor for processor in ours.attn_processors.values())
        results["set_default_attn_processor"] = ours.encode(pixels).latent_dist.mean
    for name, latents in results.items():
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_unfused_vae_attention_returns_a_contiguous_channels_first_map():
    """As the reference's 1x1 convolution does: a channels-last map (what a plain token-layout output projection gives
    back through diffusers' processor) made the next GroupNorm round differently for batches of two or more."""
    vae = CheersModel(preset_config("tiny")).vae.eval()
    attention = vae.encoder.mid_block.attentions[0]
    feature_map = torch.randn(2, attention.to_q.in_features, 4, 4)
    with torch.no_grad():
        output = attention(feature_map)
    assert output.shape == feature_map.shape and output.is_contiguous()


def test_the_switch_keeps_its_old_name_in_saved_configs():
    assert CheersConfig(official_vae_kernels=False).vae_unfused_kernels is False


# ---- diffusers PipelineTesterMixin ----------------------------------------------------------------------------------


def test_pipeline_saves_and_loads_variants(tiny, tmp_path):
    """test_serialization_with_variants / test_loading_with_variants"""
    model, processor = tiny
    pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert any(path.name.endswith(".fp16.safetensors") for path in (tmp_path / "model").iterdir())
    loaded = CheersPipeline.from_pretrained(tmp_path, variant="fp16")
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_encode_prompt_works_with_keywords_alone(tiny):
    """test_encode_prompt_works_in_isolation: every argument but the prompt has a default."""
    model, processor = tiny
    pipe = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
    signature = inspect.signature(pipe.encode_prompt)
    assert all(
        p.default is not inspect.Parameter.empty for name, p in signature.parameters.items() if name != "prompt"
    )
    cache, mask, branches = pipe.encode_prompt(prompt="a red square", do_classifier_free_guidance=True)
    assert branches == 2 and mask.shape[0] == 2 and cache.get_seq_length() == mask.shape[1]


def test_the_frozen_vae_has_no_trainable_parameters(tiny):
    """test_training_gradient_checkpointing: every parameter that requires grad gets one (the VAE never does)."""
    assert not any(parameter.requires_grad for parameter in tiny[0].model.vae.parameters())
    assert all(parameter.requires_grad for parameter in tiny[0].model.vae_decoder_projector.parameters())
