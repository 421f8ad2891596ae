"""bf16 convolutions on CPUs without native bf16 kernels: same module, same weights, bf16-rounded fp32 results."""

import torch
from conftest import rel_l2
from torch import nn

from transformers_cheers import CheersModel
from transformers_cheers.cpu_bf16 import FallbackBF16Conv2d, cpu_has_native_bf16_kernels
from transformers_cheers.presets import preset_config


def test_every_model_convolution_uses_the_fallback_class_with_unchanged_weights():
    model = CheersModel(preset_config("tiny"))
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert convolutions and all(type(module) is FallbackBF16Conv2d for module in convolutions)
    assert model.vision_representation.embeddings.patch_embedding in convolutions  # SigLIP's patches too


def test_bf16_result_is_the_rounded_fp32_convolution_or_the_native_kernel():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    fallback = nn.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    fallback.load_state_dict(plain.state_dict())
    fallback.__class__ = FallbackBF16Conv2d
    inputs = torch.randn(2, 8, 12, 12).to(torch.bfloat16)
    with torch.no_grad():
        actual, native = fallback(inputs), plain(inputs)
        upcast = nn.functional.conv2d(inputs.float(), plain.weight.float(), plain.bias.float(), padding=1)
    assert actual.dtype == torch.bfloat16
    if cpu_has_native_bf16_kernels():
        assert torch.equal(actual, native)
    else:
        assert torch.equal(actual, upcast.to(torch.bfloat16))
        assert rel_l2(actual, native) < 1e-2  # PyTorch's own (slow) bf16 path agrees to bf16 rounding
    fallback.float()
    with torch.no_grad():  # fp32 is untouched
        assert torch.equal(fallback(inputs.float()), nn.Conv2d.forward(fallback, inputs.float()))
