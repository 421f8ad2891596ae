"""int8 weight-only quantization (torchao through transformers' TorchAoConfig) of the LLM and the flow heads."""

import sys

import pytest
import torch
from conftest import expand_official_ids, rel_l2
from torchao.quantization import Int8Tensor  # a dev dependency: without torchao the suite fails, it does not skip

from transformers_cheers import (
    CheersFlowMatchScheduler,
    CheersForConditionalGeneration,
    CheersPipeline,
    CheersProcessor,
)
from transformers_cheers.processing_cheers import official_dummy_image
from transformers_cheers.quantization import NOT_QUANTIZED, int8_weight_only_config, weight_bytes


@pytest.fixture(scope="module")
def models(golden, golden_models, tmp_path_factory):
    """(fp32, int8) golden models; the int8 one loaded through from_pretrained(quantization_config=...)."""
    folder = tmp_path_factory.mktemp("golden-native")
    golden_models("fp32").save_pretrained(folder)
    reference = CheersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    quantized = CheersForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, quantization_config=int8_weight_only_config()
    ).eval()
    return reference, quantized


def is_kept(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_QUANTIZED)


def test_only_the_llm_and_flow_heads_are_quantized(models):
    reference, quantized = models
    linears = {name: module for name, module in quantized.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized_names = {name for name, module in linears.items() if isinstance(module.weight, Int8Tensor)}
    assert quantized_names == {name for name in linears if not is_kept(name)}
    heads = ("model.language_model.", "model.semantic_head.", "model.detail_head.")
    assert all(any(name.startswith(head) for name in quantized_names) for head in heads)
    assert quantized.lm_head.weight is quantized.model.language_model.embed_tokens.weight  # still tied
    assert quantized.model.vae.bn.running_mean.dtype == torch.float32
    llm_bytes = weight_bytes(quantized.model.language_model.layers)
    assert llm_bytes < 0.3 * weight_bytes(reference.model.language_model.layers)  # int8 + per-channel scales


def test_drift_on_the_golden_fixtures(golden, models):
    """Logits of case2 and the final latent of a guided text-to-image run stay close to fp32 (measured: 0.045 and
    0.14 relative L2; bf16 weights give 0.040 and 0.21). The bounds are twice the measured drift."""
    reference, quantized = models
    inputs = golden.inputs("case2_understanding")
    ids, mask, _ = expand_official_ids(
        inputs["inputs/input_ids"][0],
        inputs["inputs/attention_mask"][0],
        reference.config.num_image_tokens,
        reference.config.image_token_id,
        context=False,
    )
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["inputs/pixel_values"]}
    with torch.no_grad():
        logits = [model(**batch).logits for model in models]
    assert rel_l2(logits[1], logits[0]) < 0.09

    case = "case4a_t2i_cfg"
    info, noise = golden.case_info(case, "fp32"), golden.outputs(case, "fp32")["z0"]
    settings = info["generate"]["kwargs"]
    prompt = info["prompt_text"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    latents = []
    for model in models:
        pipe = CheersPipeline(
            model=model,
            processor=CheersProcessor.from_official_checkpoint(golden.checkpoint),
            scheduler=CheersFlowMatchScheduler(time_shift=settings["alpha"]),
        )
        pipe.set_progress_bar_config(disable=True)
        output = pipe(
            prompt,
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["cfg_scale"],
            latents=noise,
            context_image=official_dummy_image(info["numpy_seed"]),
            height=noise.shape[-1] * model.config.vision_config.patch_size,
            width=noise.shape[-1] * model.config.vision_config.patch_size,
            output_type="latent",
        )
        latents.append(output.images)
    assert rel_l2(latents[1], latents[0]) < 0.28
    assert not torch.equal(latents[1], latents[0])  # the quantized weights are really used


def test_a_quantized_model_generates_text(models):
    _, quantized = models
    ids = torch.tensor([[100, 101, 102, 103]])
    output = quantized.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 8)


def test_missing_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match="int8 weight-only quantization needs torchao: pip install torchao"):
        int8_weight_only_config()
