"""LoRA presets: scoped targets (never SigLIP or the VAE), gradient checkpointing, small safetensors adapters that load
onto a fresh base, merge_and_unload with identical outputs, and a LoRA-tuned model in CheersPipeline."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from transformers_cheers import CheersFlowMatchScheduler, CheersPipeline
from transformers_cheers.data import CheersTrainingCollator, load_conversation_dataset, make_synthetic_dataset
from transformers_cheers.lora import LORA_PRESETS, apply_lora, lora_config, set_trainable_stage
from transformers_cheers.tiny import tiny_cheers


EXPECTED_PARTS = {
    "llm": {"language_model"},
    "llm_heads": {"language_model", "semantic_head", "detail_head"},
    "heads": {"semantic_head", "detail_head"},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    model, processor = tiny_cheers()
    dataset = load_conversation_dataset(make_synthetic_dataset(tmp_path_factory.mktemp("data"), 1, 1, 1))
    collator = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0)
    return collator([dataset[index] for index in range(3)])


def adapted_modules(peft_model) -> list[str]:
    return sorted(name.removesuffix(".lora_A") for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))


def randomize_lora(peft_model, seed: int = 0) -> None:
    """LoRA B starts at zero (no effect); give it values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("preset", sorted(LORA_PRESETS))
def test_presets_adapt_only_their_modules(preset):
    model, _ = tiny_cheers()
    peft_model = apply_lora(model, preset, r=4)
    names = adapted_modules(peft_model)
    parts = {name.removeprefix("base_model.model.model.").split(".")[0] for name in names}
    assert parts == EXPECTED_PARTS[preset]
    assert not any(part in name for name in names for part in ("vision_representation", "vae"))
    # every attention and MLP projection of the targeted stacks is adapted
    layers = model.config.text_config.num_hidden_layers
    expected_llm = 7 * layers if "language_model" in parts else 0
    assert sum("language_model" in name for name in names) == expected_llm
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert peft_model.get_base_model().is_activation_checkpointing
    assert lora_config(preset).target_modules == LORA_PRESETS[preset]().target_modules


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="Unknown LoRA preset 'vision'"):
        lora_config("vision")


@pytest.mark.parametrize("preset", ["llm", "llm_heads"])
def test_adapter_round_trip_and_merge(preset, batch, tmp_path):
    base, _ = tiny_cheers(seed=0)
    peft_model = apply_lora(base, preset, r=4)
    randomize_lora(peft_model)
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(**batch)
        plain = tiny_cheers(seed=0)[0](**batch)
    assert not torch.allclose(reference.logits, plain.logits)  # the adapter does something

    peft_model.save_pretrained(tmp_path / "adapter")
    files = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in name for name in weights)
    adapter_size = sum(tensor.numel() for tensor in weights.values())
    assert adapter_size < 0.1 * sum(parameter.numel() for parameter in base.parameters())

    loaded = PeftModel.from_pretrained(tiny_cheers(seed=0)[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        output = loaded(**batch)
    torch.testing.assert_close(output.logits, reference.logits)
    torch.testing.assert_close(output.image_velocities, reference.image_velocities)

    merged = loaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        output = merged(**batch)
    torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.image_velocities, reference.image_velocities, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_lora_tuned_model_in_pipeline():
    """A LoRA-tuned model (adapter active, or merged) drives CheersPipeline; the adapter changes the image."""

    def generate(model, processor):
        pipeline = CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            "A red square.", num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent"
        ).images

    base, processor = tiny_cheers(seed=0)
    peft_model = apply_lora(base, "llm_heads", r=4, gradient_checkpointing=False)
    randomize_lora(peft_model)
    peft_model.eval()
    with_adapter = generate(peft_model.get_base_model(), processor)  # LoRA layers live in the base modules
    merged = generate(peft_model.merge_and_unload(), processor)
    plain = generate(tiny_cheers(seed=0)[0], processor)
    assert torch.isfinite(with_adapter).all()
    torch.testing.assert_close(with_adapter, merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(with_adapter, plain, atol=1e-3)


def test_full_fine_tuning_stages_freeze_the_vae():
    model, _ = tiny_cheers()
    for stage in ("align", "sft"):
        set_trainable_stage(model, stage)
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert not any(name.startswith("model.vae.") for name in trainable)
        assert any(name.startswith("model.detail_head.") for name in trainable)
        assert any(name.startswith("model.language_model.layers.") for name in trainable) == (stage == "sft")
        assert any(name.startswith("model.vision_representation.") for name in trainable) == (stage == "sft")
    with pytest.raises(ValueError, match="Unknown stage"):
        set_trainable_stage(model, "pretrain")
