"""Which folder layout `CheersPipeline.from_pretrained` was given, and its components built with the installed code.

Two layouts hold a Cheers pipeline:

* a converted model repo (the converter's output): `config.json` with `model_type` "cheers", the processor files and
  `scheduler_config.json` in the root. Its `model_index.json` names a remote-code entry file for diffusers users
  without this package (see diffusers_pipeline.py); here the components are built from the root directly;
* an official checkpoint (model_type "umm"): converted in memory, as `CheersForConditionalGeneration.from_pretrained`
  does (which logs the converter command for repeated use);
* a pipeline folder (`CheersPipeline.save_pretrained`): `model/`, `processor/`, `scheduler/` and a `model_index.json`
  naming this package's classes, which diffusers' own loader reads (dtype dicts, variants, device maps...).

Root components are built through the transformers Auto classes, which resolve to this package's registered classes:
code files that travel with a folder are never run here (no `trust_remote_code`).
"""

import importlib
import json
import logging
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor

from .scheduling_cheers import CheersFlowMatchScheduler


logger = logging.getLogger(__name__)

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
# What a Cheers folder needs; code files (*.py) are never downloaded: the installed package is the code.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# The library name a converted repo's model_index.json gives its components (registered by diffusers_pipeline.py).
COMPONENTS_LIBRARY = "cheers_repo_components"
COMPONENTS = ("model", "processor", "scheduler")


def locate_pipeline(pretrained_model_name_or_path, kwargs: dict) -> tuple[Path, str]:
    """`(local folder, layout)`, layout "model_repo", "official" or "pipeline_folder"; Hub options are taken out of
    `kwargs`."""
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    source = pretrained_model_name_or_path
    if os.path.isdir(source):
        folder = Path(source)
    else:
        folder = Path(snapshot_download(str(source), allow_patterns=DOWNLOAD_PATTERNS, **hub_kwargs))
    if (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type == "cheers":
            return folder, "model_repo"
        if model_type == "umm":
            return folder, "official"
        raise ValueError(
            f"{source} holds a model of type {model_type!r}, not a Cheers model ('cheers'): CheersPipeline loads "
            "converted Cheers repos and Cheers pipeline folders only."
        )
    if (folder / "model_index.json").is_file():
        return folder, "pipeline_folder"
    raise ValueError(
        f"{source} has no config.json (a converted Cheers model repo) and no model_index.json (a pipeline folder): "
        "pass the folder the converter or `CheersPipeline.save_pretrained` wrote."
    )


def load_root_components(folder: Path, official: bool = False, **kwargs) -> dict:
    """`model`, `processor` and `scheduler` of a converted model repo (or, `official`, of an official checkpoint,
    converted in memory as `CheersForConditionalGeneration.from_pretrained` does); passed components are kept.

    `dtype` may be one dtype or, as in diffusers, a dict by component name with a "default"; the other keyword
    arguments go to the model's `from_pretrained` (`device_map`, `attn_implementation`, `quantization_config`...).
    """
    components = {name: kwargs.pop(name) for name in COMPONENTS if name in kwargs}
    if "torch_dtype" in kwargs:  # the older diffusers spelling
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if isinstance(kwargs.get("dtype"), dict):
        kwargs["dtype"] = kwargs["dtype"].get("model", kwargs["dtype"].get("default"))
    kwargs.pop("trust_remote_code", None)  # never needed: the installed code is used
    if official:
        # An official folder's auto_map names the official code, so the classes are named here (by module path: this
        # file also travels as remote code, where the package is absent and never imported).
        package = importlib.import_module("transformers_cheers")
        if "model" not in components:
            components["model"] = package.CheersForConditionalGeneration.from_pretrained(folder, **kwargs)
        if "processor" not in components:
            components["processor"] = package.CheersProcessor.from_official_checkpoint(folder)
    if "model" not in components:
        components["model"] = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    if "processor" not in components:
        components["processor"] = AutoProcessor.from_pretrained(folder)
    if "scheduler" not in components:
        components["scheduler"] = load_scheduler(folder)
    for name, component in components.items():
        logger.info(f"Loaded {name} as {type(component).__name__} from the root of {folder}.")
    return components


def load_scheduler(folder: Path) -> CheersFlowMatchScheduler:
    # A model repo without scheduler_config.json samples with the official settings (the scheduler's defaults).
    if (folder / CheersFlowMatchScheduler.config_name).is_file():
        return CheersFlowMatchScheduler.from_pretrained(folder)
    return CheersFlowMatchScheduler()
