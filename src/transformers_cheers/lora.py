"""LoRA presets for Cheers, and the full fine-tuning stages of the official recipe.

Each preset is a function returning a `peft.LoraConfig` whose `target_modules` is a regular expression over module
names (PEFT matches it against the whole name), so only the intended layers are adapted. The SigLIP encoder
(`model.vision_representation`), the VAE (`model.vae`) and the decoder projector (`model.vae_decoder_projector`)
are never targeted by any preset, although they contain layers with the same short names (`q_proj`, `fc1`, convs).

| preset | adapted layers |
|---|---|
| `llm` (`lora_config_llm`) | LLM attention (q, k, v, o) and MLP (gate, up, down) projections: understanding and the text side |
| `llm_heads` (`lora_config_llm_and_heads`) | the above + the semantic and detail flow heads' attention, MLP and adaLN modulations |
| `heads` (`lora_config_heads`) | the flow heads only: image generation quality, the LLM untouched |

Typical use (gradient checkpointing on, adapters saved as small safetensors):

```python
>>> from transformers_cheers.lora import apply_lora
>>> model = apply_lora(model, "llm_heads", r=16)  # a peft.PeftModel; only LoRA weights train
>>> model.save_pretrained("adapter")  # adapter_model.safetensors + adapter_config.json
>>> model = PeftModel.from_pretrained(fresh_base, "adapter").merge_and_unload()
```
"""

from peft import LoraConfig, PeftModel, get_peft_model


LLM_PATTERN = r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
HEADS_PATTERN = (
    r"model\.(?:semantic|detail)_head\.(?:blocks\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
    r"|modulation)|final_layer\.modulation)"
)
# Modules no preset may touch (checked by `lora_target_names` users and the tests).
FROZEN_PREFIXES = ("model.vision_representation.", "model.vae.", "model.vae_decoder_projector.")


def _config(pattern: str, r: int, lora_alpha: int | None, lora_dropout: float, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        lora_dropout=lora_dropout,
        target_modules=pattern,
        bias="none",
        **kwargs,
    )


def lora_config_llm(r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs) -> LoraConfig:
    """LoRA on the LLM's attention and MLP projections only (`lora_alpha` defaults to 2 r)."""
    return _config(LLM_PATTERN, r, lora_alpha, lora_dropout, **kwargs)


def lora_config_llm_and_heads(
    r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs
) -> LoraConfig:
    """LoRA on the LLM (as `lora_config_llm`) and on the semantic and detail flow-matching heads."""
    return _config(f"(?:{LLM_PATTERN})|(?:{HEADS_PATTERN})", r, lora_alpha, lora_dropout, **kwargs)


def lora_config_heads(r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs) -> LoraConfig:
    """LoRA on the semantic and detail flow-matching heads only (attention, MLP, adaLN modulations)."""
    return _config(HEADS_PATTERN, r, lora_alpha, lora_dropout, **kwargs)


LORA_PRESETS = {"llm": lora_config_llm, "llm_heads": lora_config_llm_and_heads, "heads": lora_config_heads}


def lora_config(preset: str, **kwargs) -> LoraConfig:
    """The `LoraConfig` of a named preset (`llm`, `llm_heads`, `heads`); kwargs go to the preset function."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"Unknown LoRA preset {preset!r}; choose one of {sorted(LORA_PRESETS)}.")
    return LORA_PRESETS[preset](**kwargs)


def apply_lora(model, config: LoraConfig | str, gradient_checkpointing: bool = True, **kwargs) -> PeftModel:
    """Wrap a `CheersForConditionalGeneration` with LoRA (a preset name or a `LoraConfig`), checkpointing on."""
    if isinstance(config, str):
        config = lora_config(config, **kwargs)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    peft_model = get_peft_model(model, config)
    touched = [name for name, _ in peft_model.named_modules() if "lora_A" in name and _is_frozen_part(name)]
    if touched:
        raise ValueError(f"LoRA must not adapt SigLIP or the VAE, but these were targeted: {touched[:5]}")
    return peft_model


def _is_frozen_part(name: str) -> bool:
    name = name.removeprefix("base_model.model.")
    return name.startswith(FROZEN_PREFIXES)


# --------------------------------------------------------------------------------------------------------------------
# Full fine-tuning stages (official recipe)
# --------------------------------------------------------------------------------------------------------------------

# Official module names -> ours: und_projector -> multi_modal_projector, gen_projector -> semantic_head,
# hi_gate -> detail_gate, hi_projector -> detail_head, time_embed -> time_embedder.
STAGES = {
    # align.yaml: projectors + flow head + gate + time embedder + token embeddings (tied with lm_head)
    "align": (
        "model.multi_modal_projector.",
        "model.semantic_head.",
        "model.detail_gate.",
        "model.detail_head.",
        "model.time_embedder.",
        "model.language_model.embed_tokens.",
        "lm_head.",
    ),
    # sft.yaml: everything but the VAE
    "sft": (
        "model.multi_modal_projector.",
        "model.semantic_head.",
        "model.detail_gate.",
        "model.detail_head.",
        "model.time_embedder.",
        "model.language_model.",
        "model.vision_representation.",
        "model.vae_decoder_projector.",
        "lm_head.",
    ),
}
# From scratch (docs/shapes.md): the earlier stages trained the VAE, the decoder projector and SigLIP, and all three
# stay frozen here. Training the projector from the first step cost a third more time per step and gave a model that
# ignores its prompt (it denoised through the detail path alone); training SigLIP here erased the shape it had learnt
# from the captions (a linear read-out of shape from the image tokens fell from 93 to 70 %).
TRAINED_BEFORE_SCRATCH = ("model.vae_decoder_projector.", "model.vision_representation.")
STAGES["scratch"] = tuple(prefix for prefix in STAGES["sft"] if prefix not in TRAINED_BEFORE_SCRATCH)


def set_trainable_stage(model, stage: str = "sft") -> int:
    """Freeze everything except the modules `stage` trains (official `align` or `sft`, or `scratch`: `sft` without
    the decoder projector and SigLIP); returns #trainable."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {sorted(STAGES)}.")
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(STAGES[stage]))
        count += parameter.numel() if parameter.requires_grad else 0
    return count


__all__ = [
    "LORA_PRESETS",
    "apply_lora",
    "lora_config",
    "lora_config_heads",
    "lora_config_llm",
    "lora_config_llm_and_heads",
    "set_trainable_stage",
]
