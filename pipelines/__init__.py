from .pipeline_cheers import CheersPipeline, CheersPipelineOutput
from .sampling import denoise, guided_velocity
from .scheduling_cheers import CheersFlowMatchScheduler


def register_auto_pipelines() -> None:
    """List CheersPipeline in diffusers' AutoPipeline tables (text-to-image, and image-to-image for editing).

    diffusers has no registration API for out-of-tree pipelines: its AutoPipeline classes find a pipeline by class
    name in these tables. Importing them imports every diffusers pipeline module, whose transformers imports warn
    about backends unrelated to Cheers (e.g. torchvision for CLIP); those warnings are silenced for this import only.
    """
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        from diffusers.pipelines import auto_pipeline
    finally:
        logging.set_verbosity(verbosity)
    for mapping in (auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING):
        mapping.setdefault("cheers", CheersPipeline)
