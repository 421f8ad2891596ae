"""Which folder layout `CheersPipeline.from_pretrained` was given, and its components built with the installed code.

Two layouts hold a Cheers pipeline:

* a converted model repo (the converter's output): `config.json` with `model_type` "cheers", the processor files and
  `scheduler_config.json` in the root. Its `model_index.json` (written by the converter for diffusers' remote code)
  names the root for every component;
* a pipeline folder (`CheersPipeline.save_pretrained`, older converter outputs): `model/`, `processor/`, `scheduler/`.

Components are built through the transformers Auto classes, which resolve to this package's registered classes: code
files that travel with a folder are never run here (no `trust_remote_code`).
"""

import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor

from .scheduling_cheers import CheersFlowMatchScheduler


HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
# What a Cheers folder needs; code files (*.py) are never downloaded: the installed package is the code.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# The library name a converted repo's model_index.json gives its components (registered by diffusers_pipeline.py).
COMPONENTS_LIBRARY = "cheers_repo_components"
CONVERTER_COMMAND = "python conversion/convert_cheers_to_hf.py --input {source} --output ./cheers-hf"


def load_pipeline_components(pretrained_model_name_or_path, **kwargs) -> dict:
    """`model`, `processor` and `scheduler` for `CheersPipeline(**components)`; passed components are kept."""
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    passed = {name: kwargs.pop(name) for name in ("model", "processor", "scheduler") if name in kwargs}
    if "torch_dtype" in kwargs:  # the diffusers spelling; transformers says dtype
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    kwargs.pop("trust_remote_code", None)  # never needed: the installed code is used
    folder = local_folder(pretrained_model_name_or_path, hub_kwargs)
    roots = component_folders(folder, pretrained_model_name_or_path)
    components = dict(passed)
    if "model" not in components:
        components["model"] = AutoModelForImageTextToText.from_pretrained(roots["model"], **kwargs)
    if "processor" not in components:
        components["processor"] = AutoProcessor.from_pretrained(roots["processor"])
    if "scheduler" not in components:
        components["scheduler"] = load_scheduler(roots["scheduler"])
    return components


def local_folder(name_or_path, hub_kwargs: dict) -> Path:
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    return Path(snapshot_download(str(name_or_path), allow_patterns=DOWNLOAD_PATTERNS, **hub_kwargs))


def component_folders(folder: Path, source) -> dict[str, Path]:
    """The folder each component loads from, after checking that `folder` holds a Cheers pipeline."""
    if (folder / "model" / "config.json").is_file():
        model_type = read_model_type(folder / "model" / "config.json")
        if model_type == "cheers":
            return {name: folder / name for name in ("model", "processor", "scheduler")}
    elif (folder / "config.json").is_file():
        model_type = read_model_type(folder / "config.json")
        if model_type == "cheers":
            return dict.fromkeys(("model", "processor", "scheduler"), folder)
        if model_type == "umm":
            raise ValueError(
                f"{source} is an official Cheers checkpoint (model_type 'umm'): convert it once to the native layout "
                f"and load the result: {CONVERTER_COMMAND.format(source=source)}"
            )
    else:
        raise ValueError(
            f"{source} has no config.json (a converted Cheers model repo) and no model/config.json (a pipeline "
            "folder): pass the folder the converter or `CheersPipeline.save_pretrained` wrote."
        )
    raise ValueError(
        f"{source} holds a model of type {model_type!r}, not a Cheers model ('cheers'): CheersPipeline loads converted "
        "Cheers repos and Cheers pipeline folders only."
    )


def read_model_type(config_file: Path):
    return json.loads(config_file.read_text()).get("model_type")


def load_scheduler(folder: Path) -> CheersFlowMatchScheduler:
    # A model repo without scheduler_config.json samples with the official settings (the scheduler's defaults).
    if (folder / CheersFlowMatchScheduler.config_name).is_file():
        return CheersFlowMatchScheduler.from_pretrained(folder)
    return CheersFlowMatchScheduler()
