"""transformers-cheers: the Hugging Face-native implementation of Cheers (arXiv 2603.12793)."""

from diffusers.pipelines import auto_pipeline
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
from .pipelines import CheersFlowMatchScheduler, CheersPipeline
from .processing_cheers import CheersProcessor


__version__ = "0.1.0"

AutoConfig.register(CheersConfig.model_type, CheersConfig, exist_ok=True)
AutoModel.register(CheersConfig, CheersModel, exist_ok=True)
AutoModelForImageTextToText.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(CheersConfig, CheersForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(CheersConfig, slow_image_processor_class=CheersImageProcessor, exist_ok=True)
AutoProcessor.register(CheersConfig, CheersProcessor, exist_ok=True)
# diffusers has no registration API for out-of-tree pipelines: its AutoPipeline classes find a pipeline by class name
# in these tables, so Cheers is listed in them (text-to-image, and image-to-image for editing).
for _mapping in (auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING):
    _mapping.setdefault("cheers", CheersPipeline)

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
