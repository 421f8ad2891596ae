"""Entry point of a converted Cheers repo for `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`.

Not imported by this package: the converter copies this file to the root of a converted model repo, next to the
model, processor and pipeline code files, where its relative imports resolve. The repo's `model_index.json` names
this file as the pipeline and `folders.COMPONENTS_LIBRARY` as the library of every component.

diffusers loads a component's class from a library it finds in `sys.modules` (it never imports a name a repository
gives), and reads the base classes it knows (`PreTrainedModel`, ...) from that library to pick the loading method.
The components of a converted repo live in its root, not in component subfolders, so this module makes itself that
library: it holds the component classes and those base classes, and registers itself under `COMPONENTS_LIBRARY`
when diffusers imports it (before any component loads). With no `model/` subfolder, diffusers then loads every
component from the root, the same files transformers reads.
"""

import sys

from diffusers import SchedulerMixin
from transformers import PreTrainedModel, ProcessorMixin

from .folders import COMPONENTS_LIBRARY
from .modeling_cheers import CheersForConditionalGeneration
from .pipeline_cheers import CheersPipeline
from .processing_cheers import CheersProcessor
from .scheduling_cheers import CheersFlowMatchScheduler


sys.modules[COMPONENTS_LIBRARY] = sys.modules[__name__]

__all__ = [
    "CheersFlowMatchScheduler",
    "CheersForConditionalGeneration",
    "CheersPipeline",
    "CheersProcessor",
    "PreTrainedModel",
    "ProcessorMixin",
    "SchedulerMixin",
]
