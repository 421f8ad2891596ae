"""Vision tokenizer and VAE against the official implementation (golden fixtures, cases 1, 6a, 6b)."""

import json

import pytest
import torch
from conftest import PRECISIONS, assert_close_rel_l2, tolerance_for
from diffusers import AutoencoderKLFlux2
from safetensors.torch import load_file

from transformers_cheers.modeling_cheers import patchify_latents
from transformers_cheers.official_checkpoint import (
    convert_official_key,
    convert_official_tensor,
    vae_configs_from_official,
)
from transformers_cheers.training import flow_matching_path


CASE1 = "case1_vision_tokenizer"
STAGES = {  # official name -> our CheersImageOutput field
    "xt": "latents",
    "image_pixel_hat": "decoded_pixels",
    "siglip_last_hidden_state": "last_hidden_state",
    "und_projector_out": "pooler_output",
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("run,t", [("t1", 1.0), ("t0p5", 0.5)])
def test_vision_tokenizer_matches_official(golden, golden_models, precision, run, t):
    model = golden_models(precision)
    inputs, expected = golden.inputs(CASE1), golden.outputs(CASE1, precision)
    noise = expected[f"{run}/x0"].to(PRECISIONS[precision])
    with torch.no_grad():
        latents = model.model.encode_latents(inputs["pixel_values"])
        path = flow_matching_path(latents, timesteps=torch.tensor([t]), noise=noise)
        outputs = model.model.get_latent_features(path.noisy_latents)
    name = f"{run}/latent"
    assert_close_rel_l2(latents, expected[name], tolerance_for(golden, CASE1, name, precision), name)
    for official_name, our_name in STAGES.items():
        name = f"{run}/{official_name}"
        assert_close_rel_l2(
            getattr(outputs, our_name), expected[name], tolerance_for(golden, CASE1, name, precision), name
        )
    targets = path.velocity_targets.flatten(2).transpose(1, 2)  # (N, tokens, channels) as recorded
    name = f"{run}/image_target"
    assert_close_rel_l2(targets, expected[name], tolerance_for(golden, CASE1, name, precision), name)


def test_clean_image_features_are_the_t1_path(golden, golden_models):
    """get_image_features (understanding) is the vision tokenizer on the clean latents: the t = 1 fixture."""
    model = golden_models("fp32")
    inputs, expected = golden.inputs(CASE1), golden.outputs(CASE1, "fp32")
    with torch.no_grad():
        outputs = model.get_image_features(inputs["pixel_values"])
    assert_close_rel_l2(outputs.pooler_output, expected["t1/und_projector_out"], 1e-4, "pooler_output")


def test_pixel_features_are_the_latent_path_after_the_decoder_projector(golden, golden_models):
    """get_pixel_features (SigLIP and the merger on already decoded pixels) gives the recorded official tokens."""
    model = golden_models("fp32")
    inputs, expected = golden.inputs(CASE1), golden.outputs(CASE1, "fp32")
    with torch.no_grad():
        decoded = model.model.get_latent_features(model.model.encode_latents(inputs["pixel_values"])).decoded_pixels
        outputs = model.model.get_pixel_features(decoded)
        as_tuple = model.model.get_pixel_features(decoded, return_dict=False)
    assert_close_rel_l2(outputs.pooler_output, expected["t1/und_projector_out"], 1e-4, "pooler_output")
    assert outputs.latents is None and outputs.decoded_pixels is decoded
    torch.testing.assert_close(as_tuple[1], outputs.pooler_output)  # (last_hidden_state, pooler_output, ...)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vae_round_trip_matches_official(golden, golden_models, precision):
    model = golden_models(precision).model
    pixels = golden.inputs("case6a_vae")["pixel_values_gen"]
    expected = golden.outputs("case6a_vae", precision)
    with torch.no_grad():
        moments = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist.parameters
        latents = model.encode_latents(pixels)
        decoded = model.decode_latents(latents)
    for name, value in (("vae_moments", moments), ("latent", latents), ("decoded", decoded)):
        assert_close_rel_l2(value, expected[name], tolerance_for(golden, "case6a_vae", name, precision), name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vae_with_channel_changes_matches_official(golden, precision):
    """case6b: ch_mult (1,1,1,2) exercises the shortcut convolutions the tiny model lacks."""
    case = "case6b_vae_only_chmult"
    official = json.loads((golden.root / "vae_only" / "config.json").read_text())
    vae_config, _ = vae_configs_from_official(official["vae_encoder_config"], official["vae_decoder_config"])
    vae = AutoencoderKLFlux2(**vae_config).eval()
    state_dict = load_file(golden.root / "vae_only" / "model.safetensors")
    num_up_blocks = len(vae_config["block_out_channels"])
    native = {}
    for key, tensor in state_dict.items():  # the converter's per-tensor rules (this piece is no whole checkpoint)
        new_key = convert_official_key(key, num_up_blocks)
        native[new_key.removeprefix("model.vae.")] = convert_official_tensor(new_key, tensor)
    vae.load_state_dict(native, strict=True)
    vae = vae.to(PRECISIONS[precision])
    pixels = golden.inputs(case)["pixel_values"]
    expected = golden.outputs(case, precision)
    with torch.no_grad():
        mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        latents = torch.nn.functional.batch_norm(
            patchify_latents(mean, (2, 2)), vae.bn.running_mean, vae.bn.running_var, training=False, eps=vae.bn.eps
        )
    assert_close_rel_l2(latents, expected["latent"], tolerance_for(golden, case, "latent", precision), "latent")
