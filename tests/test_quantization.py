"""int8 weight-only quantization (torchao through transformers' TorchAoConfig) of the LLM and the flow heads."""

import sys

import pytest
import torch
from conftest import official_t2i_final_latents, rel_l2, understanding_inputs
from torchao.quantization import Int8Tensor  # a dev dependency: without torchao the suite fails, it does not skip

from transformers_cheers import CheersForConditionalGeneration
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
    batch = understanding_inputs(golden, reference.config, "case2_understanding")
    with torch.no_grad():
        logits = [model(**batch).logits for model in models]
    assert rel_l2(logits[1], logits[0]) < 0.09
    latents = [official_t2i_final_latents(golden, model, "case4a_t2i_cfg") for model in models]
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
