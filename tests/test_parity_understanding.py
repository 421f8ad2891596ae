"""Understanding and text-only prefill + greedy decoding against the official implementation (cases 2, 3)."""

import pytest
import torch
from conftest import assert_close_rel_l2, expand_official_ids, tolerance_for


CASES = {"case2_understanding": False, "case3_text_only": True}  # case -> uses the official dummy context image


def prepare(golden, model, case):
    inputs = golden.inputs(case)
    ids, mask, context = expand_official_ids(
        inputs["inputs/input_ids"][0],
        inputs["inputs/attention_mask"][0],
        model.config.num_image_tokens,
        model.config.image_token_id,
        context=CASES[case],
    )
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": inputs["inputs/pixel_values"],
        "context_image_mask": context if CASES[case] else None,
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_official(golden, golden_models, case, precision):
    model = golden_models(precision)
    expected = golden.outputs(case, precision)
    with torch.no_grad():
        outputs = model(**prepare(golden, model, case), output_hidden_states=True)
    name = "prefill/hidden_states"
    assert_close_rel_l2(outputs.hidden_states[-1], expected[name], tolerance_for(golden, case, name, precision), name)
    top5 = outputs.logits.float().topk(5, dim=-1)
    name = "prefill/top5_values_all"
    assert_close_rel_l2(top5.values, expected[name], tolerance_for(golden, case, name, precision), name)
    last = next(key for key in expected if key.startswith("prefill/logits_last"))
    # case2's bf16 run records logits without an fp32 counterpart, so the fixture gives no bf16 tolerance for them.
    if precision == "fp32" or last in golden.manifest["cases"][case]["bf16_recommended_rel_l2"]:
        count = expected[last].shape[1]
        assert_close_rel_l2(
            outputs.logits[:, -count:], expected[last], tolerance_for(golden, case, last, precision), last
        )
    if precision == "fp32":
        assert torch.equal(top5.indices, expected["prefill/top5_ids_all"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_official(golden, golden_models, case, precision):
    model = golden_models(precision)
    inputs = prepare(golden, model, case)
    expected = golden.outputs(case, precision)["generate/generated_ids"][0]
    clear = golden.case_info(case, precision)["generate"]["n_sampled_tokens_with_clear_margin"]
    generated = model.generate(**inputs, max_new_tokens=len(expected), do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert new_tokens[:clear].tolist() == expected[:clear].tolist()
