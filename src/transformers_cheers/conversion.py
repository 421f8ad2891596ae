"""Official Cheers checkpoint folder -> native transformers folder, written atomically."""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig

from .official_checkpoint import OfficialCheckpointError, load_official_checkpoint


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(RuntimeError):
    """The conversion cannot proceed; nothing was written."""


def official_generation_config(input_dir: Path, config) -> GenerationConfig:
    """The official sampling defaults (generation_config.json), or Cheers' ids with greedy decoding if absent."""
    path = input_dir / "generation_config.json"
    if path.exists():
        settings = json.loads(path.read_text())
        settings.pop("transformers_version", None)
        return GenerationConfig(**settings)
    return GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


def convert_official_checkpoint(input_dir, output_dir, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Convert `input_dir` (official layout) into a native folder at `output_dir`.

    The folder is assembled in a temporary sibling and renamed into place at the end, so a failed or interrupted
    run leaves nothing behind and an existing folder is replaced only once the new one is complete.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it.")
    try:
        model = load_official_checkpoint(input_dir, dtype=DTYPES[dtype])
    except OfficialCheckpointError as error:
        raise ConversionError(str(error)) from error
    model.generation_config = official_generation_config(input_dir, model.config)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        save_processor_if_available(input_dir, staging)
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def save_processor_if_available(input_dir: Path, output_dir: Path) -> bool:
    """Write processor + tokenizer + chat template when the official folder carries tokenizer files."""
    if not (input_dir / "vocab.json").exists():
        return False
    from .processing_cheers import CheersProcessor

    CheersProcessor.from_official_checkpoint(input_dir).save_pretrained(output_dir)
    return True


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is removed only after the move succeeded."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{new.name.rsplit('-', 1)[-1]}")
        target.rename(backup)
    new.rename(target)
    if backup is not None:
        shutil.rmtree(backup)


__all__ = ["ConversionError", "convert_official_checkpoint"]
