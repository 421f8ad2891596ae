"""The sampler's network evaluation (velocity) against the official T2I runs (cases 4a with CFG, 4b without)."""

import pytest
import torch
from conftest import PRECISIONS, assert_close_rel_l2, expand_official_ids, tolerance_for

from transformers_cheers.prompting import unconditional_input_ids


def prompt_batch(golden, model, case):
    """Official T2I prompt (dummy context image, ends with <im_start>); with CFG the <no_mean> prompt is row 2."""
    config = model.config
    inputs = golden.inputs(case)
    ids, mask, context = expand_official_ids(
        inputs["inputs/input_ids"][0], inputs["inputs/attention_mask"][0], 16, config.image_token_id, context=True
    )
    pixels = inputs["inputs/pixel_values"]
    if case == "case4a_t2i_cfg":
        kept = (config.image_start_token_id, config.image_end_token_id, config.image_token_id)
        unconditional = unconditional_input_ids(ids, mask, kept, config.null_token_id)
        ids, mask, context = torch.cat([ids, unconditional]), mask.repeat(2, 1), context.repeat(2, 1)
        pixels = pixels.repeat(2, 1, 1, 1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "context_image_mask": context}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["case4a_t2i_cfg", "case4b_t2i_nocfg"])
def test_velocity_matches_official_drift(golden, golden_models, case, precision):
    model = golden_models(precision).model
    expected = golden.outputs(case, precision)
    batch = prompt_batch(golden, model, case)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache
        prompt_length = cache.get_seq_length()
        velocities, gates = [], []
        for x_t, t in zip(expected["steps/x_t"], expected["steps/t"]):
            num_branches = batch["input_ids"].shape[0]  # one image, [conditional; unconditional] prompts
            output = model.compute_velocity(
                x_t.to(PRECISIONS[precision]), t, cache, batch["attention_mask"], num_branches=num_branches
            )
            assert cache.get_seq_length() == prompt_length  # the prompt cache is neither grown nor cropped
            velocities.append(output.velocity)
            gates.append(output.detail_gate[0])
    velocities = torch.stack(velocities)  # (steps, branches, C, h, w)
    for branch, name in enumerate(["steps/drift_cond", "steps/drift_uncond"][: velocities.shape[1]]):
        tolerance = tolerance_for(golden, case, name, precision)
        assert_close_rel_l2(velocities[:, branch : branch + 1], expected[name], tolerance, name)
    name = "steps/heat_map_cond"
    assert_close_rel_l2(torch.stack(gates), expected[name], tolerance_for(golden, case, name, precision), name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_step_intermediates_match_official(golden, golden_models, precision):
    case = "case4b_t2i_nocfg"
    model = golden_models(precision).model
    expected = golden.outputs(case, precision)
    with torch.no_grad():
        tokens = model.get_latent_features(expected["steps/x_t"][0].to(PRECISIONS[precision]))
    for name, value in (
        ("step0_cond/vae_decoder_projector", tokens.decoded_pixels),
        ("step0_cond/siglip", tokens.last_hidden_state),
        ("step0_cond/und_projector", tokens.pooler_output),
    ):
        assert_close_rel_l2(value, expected[name], tolerance_for(golden, case, name, precision), name)
