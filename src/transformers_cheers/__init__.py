"""transformers-cheers: the Hugging Face-native implementation of Cheers (arXiv 2603.12793)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_cheers import CheersConfig
from .image_processing_cheers import CheersImageProcessor
from .modeling_cheers import CheersForConditionalGeneration, CheersModel, CheersPreTrainedModel
from .pipelines import CheersFlowMatchScheduler, CheersPipeline, register_auto_pipelines
from .processing_cheers import CheersProcessor


__version__ = "0.1.0"

AutoConfig.register(CheersConfig.model_type, CheersConfig, exist_ok=True)
AutoModel.register(CheersConfig, CheersModel, exist_ok=True)
AutoModelForImageTextToText.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(CheersConfig, slow_image_processor_class=CheersImageProcessor, exist_ok=True)
AutoProcessor.register(CheersConfig, CheersProcessor, exist_ok=True)
register_auto_pipelines()

__all__ = [
    "CheersConfig",
    "CheersFlowMatchScheduler",
    "CheersForConditionalGeneration",
    "CheersImageProcessor",
    "CheersModel",
    "CheersPipeline",
    "CheersPreTrainedModel",
    "CheersProcessor",
]
