"""A tiny random Cheers with a tiny tokenizer, built locally in a second: the embedded default of the examples.

Nothing is downloaded. The tokenizer is byte-level (one token per byte, no merges) with the Qwen2 chat tokens and
the five Cheers tokens appended, so its ids are small and the model's config carries them (no id is hard-coded).
"""

import torch
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer

from .image_processing_cheers import CheersImageProcessor
from .modeling_cheers import CheersForConditionalGeneration
from .presets import PRESETS, preset_config
from .processing_cheers import CHEERS_SPECIAL_TOKENS, CheersProcessor


CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer() -> Qwen2Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(list(CHAT_TOKENS), special_tokens=True)
    tokenizer.add_tokens(list(CHEERS_SPECIAL_TOKENS), special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def tiny_processor() -> CheersProcessor:
    resolution = PRESETS["tiny"]["vision_config"]["image_size"]
    return CheersProcessor(CheersImageProcessor(resolution=resolution), tiny_tokenizer())


def special_token_ids(processor: CheersProcessor) -> dict[str, int]:
    """The CheersConfig token-id fields, read from a processor's tokenizer."""
    return {
        "image_token_id": processor.image_token_id,
        "image_gen_token_id": processor.image_gen_token_id,
        "image_start_token_id": processor.image_start_token_id,
        "image_end_token_id": processor.image_end_token_id,
        "null_token_id": processor.null_token_id,
        "eos_token_id": processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": processor.tokenizer.pad_token_id,
    }


def tiny_cheers(
    seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[CheersForConditionalGeneration, CheersProcessor]:
    """(model, processor): a randomly initialised tiny Cheers whose token ids match the tiny tokenizer.

    With `dtype`, the weights are cast as `from_pretrained(dtype=...)` casts a checkpoint: the fp32-only buffers
    (`_keep_in_fp32_modules_strict`, the BatchNorm statistics) stay fp32, which a plain `.to(dtype)` would not do.
    """
    processor = tiny_processor()
    ids = special_token_ids(processor)
    text_config = {**PRESETS["tiny"]["text_config"], "vocab_size": len(processor.tokenizer)}
    torch.manual_seed(seed)
    model = CheersForConditionalGeneration(preset_config("tiny", text_config=text_config, **ids))
    randomize_zero_initialised(model)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    if dtype is not None:
        generation_config = model.generation_config
        model = CheersForConditionalGeneration.from_pretrained(
            None, config=model.config, state_dict=model.state_dict(), dtype=dtype
        )
        model.generation_config = generation_config
    return model.eval(), processor


@torch.no_grad()
def randomize_zero_initialised(model, std: float = 0.02) -> None:
    """adaLN-Zero starts the heads at exactly zero; a random demo model is more telling with small random values."""
    for name, parameter in model.named_parameters():
        if ".modulation." in name or "detail_gate.gate.2." in name:
            parameter.normal_(0.0, std)


__all__ = ["special_token_ids", "tiny_cheers", "tiny_processor", "tiny_tokenizer"]
