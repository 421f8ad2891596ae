"""Native transformers-cheers folder -> the official Cheers layout (model_type "umm"), e.g. to serve with vLLM.

`export_official_checkpoint` is the library entry point of `conversion/convert_cheers_to_hf.py --to-official`: a
model fine-tuned with this package (a LoRA merged with `merge_and_unload`, saved with `save_pretrained`) goes back to
the layout of the official release, which vLLM's Cheers loader and the official code read. The names come from the
same table as the converter (`official_checkpoint.native_to_official_state_dict`); the written folder is read back
with the converter's reader and must give the native tensors bit for bit. Staged and renamed into place like the
converter's output (`conversion.staging_folder` / `replace_folder`): a failed export leaves nothing behind.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conversion import (
    DEFAULT_MAX_SHARD_SIZE,
    ConversionError,
    check_shard_size,
    clean_leftovers,
    normalise_permissions,
    replace_folder,
    staging_folder,
)
from .official_checkpoint import (
    EMBEDDING_KEY,
    LM_HEAD_KEY,
    OfficialCheckpointError,
    convert_official_folder,
    iter_official_tensors,
    native_tensor_specs,
    native_to_official_state_dict,
    official_config,
    official_tensor_index,
)


# What an official preprocessor_config.json names besides its two settings (the release's remote-code classes).
OFFICIAL_PREPROCESSOR_HEADER = {
    "image_processor_type": "UMMImageProcessor",
    "auto_map": {
        "AutoProcessor": "processing_umm.UMMProcessor",
        "AutoImageProcessor": "image_processing_umm.UMMImageProcessor",
    },
    "processor_class": "UMMProcessor",
}
# Image-processor fields that name classes rather than settings.
PROCESSOR_METADATA = {"auto_map", "image_processor_type", "processor_class"}
# Tokenizer-config fields that name this package's processor classes (code an official folder does not carry).
TOKENIZER_CLASS_POINTERS = ("auto_map", "processor_class")
POOLING_HEAD_PREFIX = "model.vision_representation.head."
# vLLM's Cheers loader sets the LLM's rope_theta to this value whatever config.json says (see docs/conversion.md).
VLLM_FIXED_ROPE_THETA = 1_000_000.0


@dataclass
class ExportReport:
    """What the export did (printed by the CLI)."""

    input_dir: Path
    output_dir: Path
    native_tensors: int = 0
    official_tensors: int = 0
    pooling_head: list[str] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    generation_config: str = ""
    processor: str = ""
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    def format(self) -> str:
        dtypes = ", ".join(f"{count} {name}" for name, count in sorted(self.dtypes.items()))
        return "\n".join(
            [
                "Cheers export report (native -> official layout)",
                f"  input:  {self.input_dir} (model_type 'cheers')",
                f"  output: {self.output_dir} (model_type 'umm')",
                f"  official tensors: {self.official_tensors} written ({dtypes}) from {self.native_tensors} native "
                f"ones: lm_head.weight stored as a copy of the tied embedding, {len(self.pooling_head)} SigLIP "
                "pooling-head tensors written as zeros (no native counterpart; never used by the official code or "
                f"vLLM, which expect them); {len(self.shards)} shard(s), {self.total_bytes / 1e6:.1f} MB",
                f"  generation config: {self.generation_config}",
                f"  tokenizer and processor: {self.processor}",
                "  verification: the written folder, read back with the converter's reader, gives every native "
                f"tensor bit for bit ({self.native_tensors} tensors) and the same config: OK",
                *(f"  note: {note}" for note in self.notes),
                *(f"  leftover of an interrupted run: {line}" for line in self.leftovers),
            ]
        )


def export_official_checkpoint(
    input_dir, output_dir, overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> ExportReport:
    """Write the native folder `input_dir` (from save_pretrained or the converter) in the official layout.

    `output_dir` gets config.json (model_type "umm", the official field names, torch_dtype), model.safetensors (or
    shards and an index) with the official tensor names in the stored dtype, generation_config.json, and, when the
    native folder has a processor, vocab.json, merges.txt, the tokenizer files and the official
    preprocessor_config.json. A configuration or processor setting the official format cannot express is an error.
    """
    check_shard_size(max_shard_size)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"{input_dir} is not a folder.")
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it.")
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise ConversionError(f"The output {output_dir} must not be inside the input folder {input_dir}.")
    config = read_native_config(input_dir)
    native = read_native_weights(input_dir, config)
    try:
        official = official_tensors(native, config)
        config_json = {**official_config(config), "torch_dtype": weight_dtype_name(native)}
    except OfficialCheckpointError as error:
        raise ConversionError(str(error)) from error
    report = ExportReport(input_dir, output_dir, native_tensors=len(native), official_tensors=len(official))
    report.pooling_head = [key for key in official if key.startswith(POOLING_HEAD_PREFIX)]
    for tensor in official.values():
        name = str(tensor.dtype).removeprefix("torch.")
        report.dtypes[name] = report.dtypes.get(name, 0) + 1
    report.notes = vllm_notes(config)
    report.leftovers = clean_leftovers(output_dir)
    with staging_folder(output_dir) as staging:
        report.shards, report.total_bytes = write_weights(staging, official, max_shard_size)
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        report.generation_config = write_generation_config(input_dir, staging)
        report.processor = write_official_processor(input_dir, staging)
        verify_export(staging, native, config)
        normalise_permissions(staging)
        replace_folder(staging, output_dir)
    return report


def read_native_config(folder: Path):
    from .configuration_cheers import CheersConfig

    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"No config.json in {folder}: not a saved transformers-cheers model.")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if model_type == "umm":
        raise ConversionError(f"{folder} is already in the official layout (model_type 'umm'); nothing to export.")
    if model_type != "cheers":
        raise ConversionError(
            f"{path} has model_type {model_type!r}, expected 'cheers' (a folder written by save_pretrained of this "
            "package or by the converter)."
        )
    return CheersConfig.from_pretrained(folder)


def read_native_weights(folder: Path, config) -> dict[str, torch.Tensor]:
    """Every stored tensor of a native folder, checked against the model: names, shapes, nothing missing or extra.

    A stored lm_head must equal the token embedding (Cheers ties them); it is dropped here and written back as the
    embedding's copy, as the official file has it. Pickled weights are refused.
    """
    try:
        located = official_tensor_index(folder)  # format-agnostic: safetensors index/shards, consistency checks
        tensors = dict(iter_official_tensors(folder, located))
    except OfficialCheckpointError as error:
        raise ConversionError(str(error)) from error
    head = tensors.pop(LM_HEAD_KEY, None)
    embedding = tensors.get(EMBEDDING_KEY)
    if head is not None and (embedding is None or not torch.equal(head, embedding)):
        raise ConversionError(
            "lm_head.weight differs from the token embedding, but Cheers ties them (the official model, and vLLM, "
            "use the embedding as the head): save the model with its tied head (save_pretrained does), not untied."
        )
    if embedding is None:
        raise ConversionError(f"{folder} has no {EMBEDDING_KEY}: not a complete Cheers model.")
    specs = native_tensor_specs(config, embedding.dtype)
    missing, extra = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
    wrong = sorted(key for key in set(specs) & set(tensors) if tuple(tensors[key].shape) != specs[key].shape)
    if missing or extra or wrong:
        raise ConversionError(
            f"The weights in {folder} do not match its config.json: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {[(key, tuple(tensors[key].shape), specs[key].shape) for key in wrong[:5]]}. A PEFT "
            "adapter folder must be merged first: model.merge_and_unload().save_pretrained(folder)."
        )
    return {key: tensors[key] for key in specs}


def official_tensors(native: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The official tensors: renamed by the converter's table, plus the pooling head, floats in the weights' dtype.

    The official file stores every floating tensor in one dtype; a tensor stored otherwise natively (the float32
    BatchNorm statistics) is cast to it when that is exact, and kept as it is when not (a loader casts it anyway).
    """
    dtype = native[EMBEDDING_KEY].dtype
    official = native_to_official_state_dict(native, config)
    for key, tensor in official.items():
        if (
            tensor.is_floating_point()
            and tensor.dtype != dtype
            and torch.equal(tensor.to(dtype).to(tensor.dtype), tensor)
        ):
            official[key] = tensor.to(dtype)
    official.update(zero_pooling_head(config, dtype))
    return official


def zero_pooling_head(config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SigLIP's attention-pooling head as zeros, named and shaped by transformers' own class.

    The official model builds the head (SigLIP's default `vision_use_head`) and computes it without using it; vLLM's
    Cheers loader builds it too and needs its weights. The native model has none, so zeros stand in.
    """
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    with torch.device("meta"):
        head = SiglipMultiheadAttentionPoolingHead(config.vision_config)
    return {
        f"{POOLING_HEAD_PREFIX}{name}": torch.zeros(tensor.shape, dtype=dtype)
        for name, tensor in head.state_dict().items()
    }


def weight_dtype_name(native: dict[str, torch.Tensor]) -> str:
    return str(native[EMBEDDING_KEY].dtype).removeprefix("torch.")


def vllm_notes(config) -> list[str]:
    """What vLLM's Cheers loader would serve differently from this model (see docs/conversion.md)."""
    theta = config.text_config.rope_parameters["rope_theta"]
    if theta == VLLM_FIXED_ROPE_THETA:
        return []
    return [
        f"text rope_theta is {theta:g}; vLLM's Cheers loader replaces it with {VLLM_FIXED_ROPE_THETA:g}, so vLLM "
        "would not serve this model faithfully (the official code reads config.json and is unaffected)."
    ]


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size) -> tuple[list[str], int]:
    """safetensors shards of at most `max_shard_size` (one model.safetensors when it fits), with an index if split."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: tensors[key].contiguous() for key in keys}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shards = sorted(split.filename_to_tensors)
    return shards, sum((folder / shard).stat().st_size for shard in shards)


def write_generation_config(input_dir: Path, folder: Path) -> str:
    from transformers import GenerationConfig

    if not (input_dir / "generation_config.json").is_file():
        return "none written (the native folder has no generation_config.json)"
    GenerationConfig.from_pretrained(input_dir).save_pretrained(folder)
    return "generation_config.json copied"


def write_official_processor(input_dir: Path, folder: Path) -> str:
    """vocab.json, merges.txt, the tokenizer files and the official preprocessor_config.json, if there is a processor.

    vocab.json and merges.txt are what the official code's tokenizer reads; tokenizer.json, tokenizer_config.json and
    the chat template (transformers' own files) come along, so that AutoTokenizer, which vLLM calls, reads the same
    tokenizer. The five Cheers tokens stay in it with their ids (the official processor adds them when missing).
    """
    from .image_processing_cheers import CheersImageProcessor
    from .processing_cheers import CheersProcessor, official_image_settings

    if not (input_dir / "processor_config.json").is_file():
        return "none written (the native folder has no processor_config.json)"
    processor = CheersProcessor.from_pretrained(input_dir)
    image_processor = processor.image_processor
    settings = {"scale_resolution": image_processor.resolution, "patch_size": image_processor.patch_size}
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**OFFICIAL_PREPROCESSOR_HEADER, **settings}, indent=2) + "\n"
    )
    expressed = CheersImageProcessor(**official_image_settings(folder)).to_dict()
    differing = sorted(
        key
        for key, value in image_processor.to_dict().items()
        if key not in PROCESSOR_METADATA and expressed.get(key) != value
    )
    if differing:
        raise ConversionError(
            f"The image processor sets {differing} differently from the official processor, and the official "
            "preprocessor_config.json can express only scale_resolution and patch_size; use the defaults for these."
        )
    processor.tokenizer.save_pretrained(folder)
    processor.tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    # The native tokenizer config points at this package's processor code, which the official folder does not have.
    path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    for key in TOKENIZER_CLASS_POINTERS:
        tokenizer_config.pop(key, None)
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return (
        f"vocab.json, merges.txt, tokenizer files ({len(processor.tokenizer)} tokens), preprocessor_config.json "
        f"(scale_resolution {settings['scale_resolution']}, patch_size {settings['patch_size']})"
    )


def verify_export(folder: Path, native: dict[str, torch.Tensor], config) -> None:
    """Read the written folder back with the converter's reader: the same tensors, bit for bit, and config."""
    from .conversion import architecture

    try:
        converted = convert_official_folder(folder, native[EMBEDDING_KEY].dtype)
    except OfficialCheckpointError as error:
        raise ConversionError(
            f"The written official folder does not read back: {error}. Nothing was written."
        ) from error
    differing = sorted(
        key
        for key in native.keys() | converted.state_dict.keys()
        if key not in native
        or key not in converted.state_dict
        or native[key].dtype != converted.state_dict[key].dtype
        or not torch.equal(native[key], converted.state_dict[key])
    )
    if differing:
        raise ConversionError(
            f"The written official folder reads back {len(differing)} tensor(s) differently, e.g. {differing[:5]}. "
            "Nothing was written."
        )
    if architecture(converted.config) != architecture(config):
        raise ConversionError("The written config.json reads back as another configuration. Nothing was written.")


__all__ = ["ExportReport", "export_official_checkpoint"]
