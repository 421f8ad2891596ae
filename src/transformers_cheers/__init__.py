"""transformers-cheers: the Hugging Face-native implementation of Cheers (arXiv 2603.12793)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_cheers import CheersConfig
from .modeling_cheers import CheersForConditionalGeneration, CheersModel, CheersPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(CheersConfig.model_type, CheersConfig, exist_ok=True)
AutoModel.register(CheersConfig, CheersModel, exist_ok=True)
AutoModelForImageTextToText.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)

__all__ = ["CheersConfig", "CheersForConditionalGeneration", "CheersModel", "CheersPreTrainedModel"]
