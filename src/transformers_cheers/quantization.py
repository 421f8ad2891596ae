"""Low-memory inference: int8 weight-only quantization of the LLM and the flow heads, through transformers' TorchAo
integration.

    from transformers_cheers.quantization import int8_weight_only_config

    model = CheersForConditionalGeneration.from_pretrained("cheers-hf", quantization_config=int8_weight_only_config())

The language model and the flow heads hold nearly all of Cheers' linear weights (Qwen2-1.5B: 1.5 of ~2.4 B
parameters); their weights are stored in int8 with one scale per output channel (torchao `Int8WeightOnlyConfig`) and
dequantized in the matmul, activations stay in the model's dtype. Left as they are: the VAE and the decoder
projector (convolutions, and the latent statistics), SigLIP and the small projector and time embedder in front of
the LLM (their inputs are pixels and timesteps, where int8 error is least welcome and the memory gain is small), and
`lm_head`, which shares its weight with the token embedding. The drift this causes is measured on the golden fixtures
by `benchmarks/bench_quantization.py` (docs/benchmarks.md).
"""

import torch
from transformers import TorchAoConfig


# Module-name prefixes (transformers matches them at module boundaries) that keep their original weights.
NOT_QUANTIZED = (
    "model.vae",
    "model.vae_decoder_projector",
    "model.vision_representation",
    "model.multi_modal_projector",
    "model.time_embedder",
    "lm_head",
)


def int8_weight_only_config(**kwargs) -> TorchAoConfig:
    """A `TorchAoConfig` for `from_pretrained(quantization_config=...)`: int8 weights in the LLM and flow heads.

    Needs `torchao` (`pip install "transformers-cheers[quant]"`). `kwargs` go to `Int8WeightOnlyConfig`.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError(
            "int8 weight-only quantization needs torchao: pip install torchao (or transformers-cheers[quant])."
        ) from error
    return TorchAoConfig(Int8WeightOnlyConfig(**kwargs), modules_to_not_convert=list(NOT_QUANTIZED))


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, counting the int8 data and scales of quantized weights."""
    return sum(tensor_bytes(tensor) for tensor in [*module.parameters(), *module.buffers()])


def tensor_bytes(tensor: torch.Tensor) -> int:
    # torchao's quantized weights are tensor subclasses; their storage is the inner tensors they flatten to.
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


__all__ = ["NOT_QUANTIZED", "int8_weight_only_config", "weight_bytes"]
