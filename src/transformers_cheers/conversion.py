"""Official Cheers checkpoint folder -> native transformers folder, checked, verified and written atomically.

`convert_official_checkpoint` is the library entry point of `conversion/convert_cheers_to_hf.py` (the model card and
the Hub upload live in `conversion/push_to_hub.py`). See docs/conversion.md.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.utils import logging

from .official_checkpoint import (
    OfficialCheckpointError,
    TensorSpec,
    convert_official_folder,
    load_official_checkpoint,
    native_tensor_specs,
)


logger = logging.get_logger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "2GB"
# What is fetched when the input is a Hub repo id: weights, configs, tokenizer data. Never code or pickles.
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt"]
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
MODEL_CODE_FILES = ("configuration_cheers.py", "modeling_cheers.py")
PROCESSOR_CODE_FILES = ("processing_cheers.py", "image_processing_cheers.py")
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConversionError(RuntimeError):
    """The conversion cannot proceed; nothing was written."""


class VerificationError(ConversionError):
    """The converted folder does not reproduce the official weights; nothing was written."""


@dataclass
class ConversionReport:
    """What the converter did (printed by the CLI)."""

    input_dir: Path
    output_dir: Path
    dtype: str
    official_tensors: int = 0
    source_dtypes: dict[str, int] = field(default_factory=dict)
    mapped: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    native_tensors: int = 0
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    float32_tensors: list[str] = field(default_factory=list)
    lm_head: str = ""
    generation_config: str = ""
    processor: str = ""
    verification: dict[str, float] | None = None
    diffusers: str = ""
    diffusers_verification: dict[str, float] | None = None
    leftovers: list[str] = field(default_factory=list)

    def format(self) -> str:
        sources = ", ".join(f"{count} {name}" for name, count in sorted(self.source_dtypes.items()))
        lines = [
            "Cheers conversion report",
            f"  input:  {self.input_dir} (official layout, model_type 'umm')",
            f"  output: {self.output_dir} (model_type 'cheers', {self.dtype})",
            f"  official tensors: {self.official_tensors} read ({sources}): {self.mapped} mapped, "
            f"{len(self.dropped)} dropped",
            *(f"    dropped {key}: {reason}" for key, reason in self.dropped.items()),
            f"  native tensors: {self.native_tensors} written, all filled, shapes and dtypes as expected; "
            f"{len(self.shards)} shard(s), {self.total_bytes / 1e6:.1f} MB: {', '.join(self.shards)}",
            f"  kept in float32: {', '.join(self.float32_tensors) or 'none'}",
            f"  lm_head: {self.lm_head}",
            f"  generation config: {self.generation_config}",
            f"  processor: {self.processor}",
            *(f"  leftover of an interrupted run: {line}" for line in self.leftovers),
        ]
        if self.verification is None:
            lines.append("  verification: skipped (--no-verify)")
        else:
            lines.append(self.format_verification())
        numbers = ", ".join(f"{k} {v:.3g}" for k, v in (self.diffusers_verification or {}).items())
        lines.append(f"  diffusers: {self.diffusers}" + (f" ({numbers})" if numbers else ""))
        return "\n".join(lines)

    def format_verification(self) -> str:
        numbers = "; ".join(
            f"{name} relative L2 {self.verification[f'{name} relative L2']:.3g}, max abs diff "
            f"{self.verification[f'{name} max abs diff']:.3g}"
            for name in ("logits", "velocity")
        )
        return (
            f"  verification ({self.dtype}, converted folder vs the same weights loaded from the official layout by "
            f"this package): {self.verification['tensors identical']} tensors bit-identical, config equal; {numbers} "
            f"(allowed relative L2 {output_tolerance(DTYPES[self.dtype]):.3g}): OK"
        )


def official_generation_config(input_dir: Path, config) -> GenerationConfig:
    """The official sampling defaults (generation_config.json), or Cheers' ids with greedy decoding if absent."""
    path = input_dir / "generation_config.json"
    if path.exists():
        settings = json.loads(path.read_text())
        settings.pop("transformers_version", None)
        return GenerationConfig(**settings)
    return GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


def describe_generation_config(generation_config: GenerationConfig, official: bool) -> str:
    names = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id")
    diff = generation_config.to_diff_dict()
    settings = ", ".join(f"{name}={diff[name]}" for name in names if name in diff)
    return f"{settings} ({'official generation_config.json' if official else 'no official file: greedy defaults'})"


def resolve_input(source, revision: str | None = None) -> Path:
    """A local official folder, or a Hub repo id downloaded with snapshot_download (safetensors/json/txt only)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is not a folder.")
        return path
    if not REPO_ID_PATTERN.match(str(source)):
        raise ConversionError(f"{path} is not a folder.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as error:  # offline, unknown repo, no access, ...
        raise ConversionError(
            f"{source} is not a local folder, and downloading it from the Hub failed: {type(error).__name__}: {error}"
        ) from error


def convert_official_checkpoint(
    input_dir,
    output_dir,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = True,
    progress: bool = False,
    revision: str | None = None,
) -> ConversionReport:
    """Convert `input_dir` (an official-layout folder, or a Hub repo id) into a native folder at `output_dir`.

    Strict: every official tensor is mapped or explicitly dropped (reported), every native tensor filled with the
    expected shape; floating weights are cast to `dtype`, BatchNorm statistics kept in float32, the tied lm_head
    checked against the embeddings. The weights are written as safetensors shards of at most `max_shard_size`
    (with an index when there are several), next to config.json, generation_config.json (official sampling
    defaults), the processor files and the code files that make the folder load with trust_remote_code. When the
    official folder has tokenizer files, the folder is also a diffusers pipeline (model_index.json, the pipeline
    code, scheduler_config.json; see `write_diffusers_files`). With `verify`, the written folder is re-read (names,
    shapes, dtypes) and loaded, and its logits and one velocity step are compared with the same computation on the
    unconverted weights; any difference is an error.

    The folder is assembled in a hidden sibling (`.NAME.partial-PID-XXXX`) and renamed into place at the end, so a
    failed or interrupted run leaves nothing behind and an existing folder is replaced only once the new one is
    complete. Nothing goes to the system temp dir. A sibling left by a killed run (SIGKILL cannot be caught) is
    recognised by its name and dead process id, and removed by the next run (listed in the report).
    """
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    check_shard_size(max_shard_size)
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it.")
    input_dir = resolve_input(input_dir, revision)
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise ConversionError(f"The output {output_dir} must not be inside the input folder {input_dir}.")
    leftovers = clean_leftovers(output_dir)
    with progress_bars(progress):
        report = _convert(input_dir, output_dir, DTYPES[dtype], max_shard_size, verify, progress)
    report.leftovers = leftovers
    return report


def _convert(input_dir, output_dir, torch_dtype, max_shard_size, verify, progress):
    dtype = str(torch_dtype).removeprefix("torch.")
    try:
        converted = convert_official_folder(input_dir, torch_dtype, progress=progress)
    except OfficialCheckpointError as error:
        raise ConversionError(str(error)) from error
    report = ConversionReport(
        input_dir=input_dir,
        output_dir=output_dir,
        dtype=dtype,
        official_tensors=len(converted.official_keys),
        source_dtypes=converted.source_dtypes,
        mapped=len(converted.state_dict),
        dropped=converted.dropped,
        lm_head=converted.lm_head,
    )
    generation_config = official_generation_config(input_dir, converted.config)
    report.generation_config = describe_generation_config(
        generation_config, (input_dir / "generation_config.json").exists()
    )
    specs = native_tensor_specs(converted.config, torch_dtype)

    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(staging_folder(output_dir))
        write_native_weights(staging, converted, generation_config, torch_dtype, max_shard_size)
        del converted  # the tensors now live in the shards
        report.processor = save_processor_if_available(input_dir, staging)
        report.shards, report.total_bytes = check_written_folder(staging, specs)
        report.native_tensors = len(specs)
        report.float32_tensors = sorted(
            key for key, spec in specs.items() if spec.dtype == torch.float32 and torch_dtype != torch.float32
        )
        if verify:
            report.verification = verify_against_official(staging, input_dir, torch_dtype)
        if (staging / "processor_config.json").is_file():
            write_diffusers_files(staging)
            normalise_permissions(staging)
            report.diffusers = "model_index.json, pipeline code and scheduler_config.json written"
            if verify:
                report.diffusers_verification = verify_diffusers_files(staging, torch_dtype)
        else:
            report.diffusers = "not written (the diffusers pipeline needs the processor)"
        # Everything is written and checked: only the rename is left.
        normalise_permissions(staging)
        replace_folder(staging, output_dir)
    return report


def check_shard_size(max_shard_size) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Invalid --max-shard-size {max_shard_size!r}: {error}") from error
    if size <= 0:
        raise ConversionError(f"Invalid --max-shard-size {max_shard_size!r}: must be positive.")


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Progress bars of transformers and diffusers (shard writing, loading) on or off for the block, then restored."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (transformers_logging, diffusers_logging)]
    for module, _ in states:
        (module.enable_progress_bar if enabled else module.disable_progress_bar)()
    try:
        yield
    finally:
        for module, was_enabled in states:
            (module.enable_progress_bar if was_enabled else module.disable_progress_bar)()


@contextlib.contextmanager
def staging_folder(target: Path):
    """A fresh hidden sibling of `target`, removed again if the block fails or is interrupted.

    Its name, `.NAME.partial-PID-XXXX`, carries this process's id, so that a folder left by a killed run can be
    told apart from one a running conversion is still filling (see `clean_leftovers`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)  # renamed away on success; this only cleans an unused one


def leftover_pattern(target: Path) -> re.Pattern:
    """Names of the siblings a run of this converter makes next to `target`: staging and backup folders."""
    return re.compile(rf"^\.{re.escape(target.name)}\.(partial|old)-(\d+)-\w+$")


def clean_leftovers(target: Path) -> list[str]:
    """Remove the staging folders that killed runs left next to `target`; returns what was done, for the report.

    Only folders whose process is gone are touched. A staging folder (`partial`) is an incomplete output: removed.
    A backup (`old`) is the previous output, moved aside just before the new one was renamed into place: removed if
    `target` exists (the rename happened), otherwise kept and reported, since it is then the only copy.
    """
    if not target.parent.is_dir():
        return []
    pattern, actions = leftover_pattern(target), []
    for path in sorted(target.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or process_is_running(int(match.group(2))):
            continue
        if match.group(1) == "partial" or target.exists():
            shutil.rmtree(path)
            actions.append(f"removed {path} (left by an interrupted run, process {match.group(2)})")
        else:
            actions.append(
                f"kept {path}: the previous {target.name}, moved aside by an interrupted run; rename it back to "
                f"{target.name} or delete it"
            )
        logger.warning(actions[-1])
    return actions


def process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def normalise_permissions(folder: Path) -> None:
    """Ordinary file modes (some writers create private files), as if the files had been written with open()."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_native_weights(staging: Path, converted, generation_config, dtype, max_shard_size) -> None:
    """config.json, generation_config.json, code files and the weight shards (+ index), via save_pretrained.

    The model is built on the meta device, so only the converted tensors take memory; save_pretrained writes them
    (without the tied lm_head) in shards with its progress bar ("Writing model shards") and copies the code files
    named in auto_map. Only safetensors are written.
    """
    from .modeling_cheers import CheersForConditionalGeneration
    from .official_checkpoint import cast_like_from_pretrained

    with torch.device("meta"):
        skeleton = CheersForConditionalGeneration(converted.config)
    cast_like_from_pretrained(skeleton, dtype)
    skeleton.generation_config = generation_config
    skeleton.save_pretrained(staging, state_dict=dict(converted.state_dict), max_shard_size=max_shard_size)


def save_processor_if_available(input_dir: Path, output_dir: Path) -> str:
    """Write processor + tokenizer + chat template when the official folder carries tokenizer files."""
    if not (input_dir / "vocab.json").exists():
        return "none written (no vocab.json in the official folder)"
    from .processing_cheers import CheersProcessor

    processor = CheersProcessor.from_official_checkpoint(input_dir)
    config = json.loads((output_dir / "config.json").read_text())
    for name in ("image_token", "image_gen_token", "image_start_token", "image_end_token", "null_token"):
        token_id, expected = getattr(processor, f"{name}_id"), config[f"{name}_id"]
        if token_id != expected:
            raise ConversionError(
                f"The tokenizer gives {getattr(processor, name)!r} id {token_id}, but the model config expects "
                f"{expected}; the tokenizer files do not belong to this checkpoint."
            )
    processor.save_pretrained(output_dir)
    return (
        f"tokenizer ({len(processor.tokenizer)} tokens, Cheers tokens {processor.image_token_id}.."
        f"{processor.null_token_id}), chat template, image processor (resolution "
        f"{processor.image_processor.resolution}, patch {processor.image_processor.patch_size})"
    )


def check_written_folder(folder: Path, specs: dict[str, TensorSpec]) -> tuple[list[str], int]:
    """Re-read the written folder: every native tensor stored once with its shape and dtype, code files present.

    Returns (shard file names, total bytes of the shards).
    """
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, shards = None, ["model.safetensors"]
    stored: dict[str, TensorSpec] = {}
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as handle:
            for key in handle.keys():
                if key in stored or (weight_map is not None and weight_map.get(key) != shard):
                    raise ConversionError(f"Written shard {shard} holds {key!r} unexpectedly (duplicate/unindexed).")
                piece = handle.get_slice(key)
                stored[key] = TensorSpec(tuple(piece.get_shape()), piece.get_dtype())
    expected = {key: TensorSpec(spec.shape, SAFETENSORS_DTYPES[spec.dtype]) for key, spec in specs.items()}
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        wrong = sorted(key for key in set(stored) & set(expected) if stored[key] != expected[key])
        raise ConversionError(
            f"The written weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape/dtype {[(key, stored[key], expected[key]) for key in wrong[:5]]}"
        )
    check_remote_code_files(folder)
    return shards, sum((folder / shard).stat().st_size for shard in shards)


def check_remote_code_files(folder: Path) -> list[str]:
    """Every code file an auto_map names is in the folder, with all its relative imports. Returns their names."""
    from transformers.dynamic_module_utils import get_relative_import_files

    entries = []
    for name in ("config.json", "processor_config.json"):
        if (folder / name).is_file():
            entries += json.loads((folder / name).read_text()).get("auto_map", {}).values()
    named = {entry.split(".")[0] + ".py" for entry in entries} | set(MODEL_CODE_FILES)
    absent = sorted(name for name in named if not (folder / name).is_file())
    if absent:
        raise ConversionError(f"The written folder lacks the remote-code files {absent}.")
    files = set(named)
    for name in named:
        files |= {Path(path).name for path in get_relative_import_files(str(folder / name))}
    return sorted(files)


def verification_inputs(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small fixed prompt with one image (and a latent for one velocity step), the same for both sides."""
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    text = torch.randint(
        0, min(config.text_config.vocab_size, config.pad_token_id or 151643), (8,), generator=generator
    )
    ids = [
        *text[:5].tolist(),
        config.image_start_token_id,
        *[config.image_token_id] * config.num_image_tokens,
        config.image_end_token_id,
        *text[5:].tolist(),
    ]
    grid = vision.image_size // vision.patch_size
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.rand(1, 3, vision.image_size, vision.image_size, generator=generator),
        "latents": torch.randn(1, config.latent_channels, grid, grid, generator=generator),
        "timestep": torch.tensor(0.5),
    }


@torch.no_grad()
def logits_and_velocity(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt and one velocity step of the flow head after it (the prompt cache)."""
    model = model.eval()
    output = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        use_cache=True,
    )
    velocity = model.model.compute_velocity(
        inputs["latents"].to(model.dtype), inputs["timestep"], output.cache, inputs["attention_mask"]
    ).velocity
    return output.logits.float(), velocity.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (inf for a shape mismatch, NaN for non-finite values)."""
    if actual.shape != expected.shape:
        return float("inf")
    difference = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


# How far the outputs of two loaders of the same tensors may drift apart, as a relative L2 error. Bit-identical
# weights do not give bit-identical outputs: from_pretrained memory-maps the file, and a weight whose address is not
# 64-byte aligned can take another GEMM kernel, i.e. another summation order. GEMMs accumulate in float32 in every
# dtype, so that reordering is float32 rounding amplified by the network: at most 23 float32 eps (relative L2) on
# the tiny checkpoints with oneDNN switched off entirely, the largest reordering we could provoke; 64 eps leaves a
# 3x margin. In bfloat16/float16 such a perturbation shows only where it flips the rounding of an activation by one
# ulp of the dtype, so 4 ulps of the dtype are added. A wrong weight, config field or code path gives errors of
# order 1e-1 to 1 instead.
FLOAT32_REORDERING_ULPS = 64
ROUNDING_FLIP_ULPS = 4


def output_tolerance(dtype: torch.dtype) -> float:
    """The relative L2 error allowed between two loaders' outputs in `dtype` (see FLOAT32_REORDERING_ULPS)."""
    tolerance = FLOAT32_REORDERING_ULPS * torch.finfo(torch.float32).eps
    if dtype != torch.float32:
        tolerance += ROUNDING_FLIP_ULPS * torch.finfo(dtype).eps
    return tolerance


def tensor_fingerprints(model) -> dict[str, tuple]:
    """{name: (dtype, shape, sha256 of the bytes)} of every tensor of the state dict (tied lm_head included).

    Counters (BatchNorm's num_batches_tracked) are compared by value: from_pretrained loads them as float32
    together with the rest of the `_keep_in_fp32_modules_strict` BatchNorm, the file stores them as int64.
    Non-persistent buffers (RoPE tables) are computed from the config, not loaded, and are covered by the outputs.
    """
    result = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        tensor = tensor.detach().cpu().contiguous()
        if name.endswith("num_batches_tracked") or not tensor.is_floating_point():
            result[name] = ("counter", tuple(tensor.shape), tuple(tensor.reshape(-1).long().tolist()))
        else:
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            result[name] = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(data.tobytes()).hexdigest())
    return result


# Config fields that describe the files rather than the model (the two loaders fill them differently).
CONFIG_METADATA = {"dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "auto_map"}


def architecture(config) -> dict:
    """The config as a dict without metadata, also inside the sub-configs."""

    def strip(fields: dict) -> dict:
        return {
            key: strip(value) if isinstance(value, dict) else value
            for key, value in fields.items()
            if key not in CONFIG_METADATA
        }

    return strip(config.to_dict())


def verify_against_official(folder: Path, input_dir: Path, dtype: torch.dtype) -> dict[str, float]:
    """Load the converted folder and the unconverted weights in `dtype`; they must be the same model.

    Exact: every tensor of the state dict (tied lm_head and BatchNorm statistics included) bit-identical, and the
    two configs equal field for field. Within `output_tolerance(dtype)`: the logits of a small prompt with an image
    and one velocity step after it (relative L2 error; outputs of two loaders may differ by summation order only).
    The models are loaded one after the other, so only one is in memory at a time.
    """
    from .modeling_cheers import CheersForConditionalGeneration

    converted = CheersForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    inputs = verification_inputs(converted.config)
    ours, our_tensors = logits_and_velocity(converted, inputs), tensor_fingerprints(converted)
    our_config = architecture(converted.config)
    del converted
    official = load_official_checkpoint(input_dir, dtype)
    check_same_model(our_tensors, tensor_fingerprints(official), our_config, architecture(official.config))
    theirs = logits_and_velocity(official, inputs)
    del official
    return {"tensors identical": len(our_tensors), **compare_outputs(ours, theirs, dtype)}


def check_same_model(our_tensors: dict, their_tensors: dict, our_config: dict, their_config: dict) -> None:
    differing = sorted(
        name for name in our_tensors.keys() | their_tensors.keys() if our_tensors.get(name) != their_tensors.get(name)
    )
    if differing:
        raise VerificationError(
            f"The converted folder loads {len(differing)} tensor(s) that differ from the unconverted weights (value, "
            f"dtype or presence), e.g. {differing[:5]}. Nothing was written."
        )
    fields = sorted(
        key for key in our_config.keys() | their_config.keys() if our_config.get(key) != their_config.get(key)
    )
    if fields:
        raise VerificationError(
            f"The converted folder's config.json differs from the official config in {fields}: config.json was not "
            "written faithfully. Nothing was written."
        )


def compare_outputs(ours: tuple, theirs: tuple, dtype: torch.dtype) -> dict[str, float]:
    """Relative L2 error and max abs diff of (logits, velocity); a VerificationError beyond `output_tolerance`."""
    tolerance = output_tolerance(dtype)
    result = {}
    for name, actual, expected in (("logits", ours[0], theirs[0]), ("velocity", ours[1], theirs[1])):
        result[f"{name} relative L2"] = relative_l2(actual, expected)
        result[f"{name} max abs diff"] = max_abs_diff(actual, expected)
    errors = [value for key, value in result.items() if key.endswith("relative L2")]
    finite = all(torch.isfinite(tensor).all() for tensor in (*ours, *theirs))
    if not finite or not all(error <= tolerance for error in errors):  # NaN fails too
        shown = ", ".join(f"{key} {value:.3g}" for key, value in result.items())
        raise VerificationError(
            f"The converted folder does not reproduce the unconverted weights: {shown} (allowed relative L2 "
            f"{tolerance:.3g} in {str(dtype).removeprefix('torch.')}){'' if finite else ', non-finite outputs'}. "
            "The tensors are identical, so the difference comes from loading or code, not from the conversion of "
            "the weights; please report it. Nothing was written."
        )
    return result


# A converted folder is also a diffusers pipeline: model_index.json names the remote-code entry file as the pipeline
# and, for every component, the library that entry file registers; with no component subfolders, diffusers loads each
# component from the root (see pipelines/diffusers_pipeline.py). The pipeline code sits next to the model code.
DIFFUSERS_ENTRY = "diffusers_pipeline"
DIFFUSERS_COMPONENTS = {
    "model": "CheersForConditionalGeneration",
    "processor": "CheersProcessor",
    "scheduler": "CheersFlowMatchScheduler",
}
PIPELINE_CHECK_STEPS = 1


def write_diffusers_files(folder: Path) -> None:
    """model_index.json, the pipeline code files and scheduler_config.json (official sampler settings)."""
    import diffusers

    from .pipelines import CheersFlowMatchScheduler, pipeline_cheers
    from .pipelines.folders import COMPONENTS_LIBRARY

    # The entry file is not importable inside the package (its relative imports name the model code), so it is
    # copied by path, next to pipeline_cheers.py.
    copy_code(Path(pipeline_cheers.__file__), folder)
    shutil.copy2(Path(pipeline_cheers.__file__).with_name(f"{DIFFUSERS_ENTRY}.py"), folder / f"{DIFFUSERS_ENTRY}.py")
    CheersFlowMatchScheduler().save_pretrained(folder)
    library = COMPONENTS_LIBRARY
    index = {"_class_name": [DIFFUSERS_ENTRY, "CheersPipeline"], "_diffusers_version": diffusers.__version__}
    index.update({name: [library, class_name] for name, class_name in DIFFUSERS_COMPONENTS.items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    check_relative_imports(folder / f"{DIFFUSERS_ENTRY}.py")


def check_relative_imports(module_file: Path) -> None:
    """Every module `module_file` imports relatively, recursively, is a file next to it."""
    from transformers.dynamic_module_utils import get_relative_imports

    pending, seen = [module_file], set()
    while pending:
        current = pending.pop()
        seen.add(current.name)
        for name in get_relative_imports(str(current)):
            path = module_file.parent / f"{name}.py"
            if not path.is_file():
                raise ConversionError(f"{current.name} imports .{name}, which is not in the written folder.")
            if path.name not in seen:
                pending.append(path)


def copy_code(module_file: Path, folder: Path) -> None:
    """Copy a code file and, recursively, the files of its relative imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    for path in [str(module_file), *get_relative_import_files(str(module_file))]:
        shutil.copy2(path, folder / Path(path).name)


@torch.no_grad()
def verify_diffusers_files(folder: Path, dtype: torch.dtype) -> dict[str, float]:
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs the folder's own code and gives the
    same image as `CheersPipeline.from_pretrained(folder)` (installed code) for a fixed seed."""
    from diffusers import DiffusionPipeline

    from .pipelines import CheersPipeline

    def run(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        side = 2 * pipe.model.config.image_size_multiple  # small: an identity check, not a quality check
        kwargs = {"num_inference_steps": PIPELINE_CHECK_STEPS, "output_type": "pt", "height": side, "width": side}
        return pipe("A red apple on a wooden table.", generator=torch.manual_seed(0), **kwargs).images.float()

    expected = run(CheersPipeline.from_pretrained(folder, dtype=dtype))
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    if any(type(part).__module__.startswith("transformers_cheers") for part in (loaded, loaded.model)):
        raise VerificationError("diffusers loaded the installed package instead of the folder's own code files.")
    result = {"image max abs diff": max_abs_diff(run(loaded), expected)}
    if not result["image max abs diff"] == 0:
        raise VerificationError(f"diffusers' remote-code pipeline does not reproduce CheersPipeline: {result}.")
    return result


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is removed only after the move succeeded."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{new.name.split('.partial-', 1)[1]}")  # same PID-XXXX
        target.rename(backup)
    try:
        new.rename(target)
    except BaseException:
        if backup is not None:
            backup.rename(target)
        raise
    if backup is not None:
        shutil.rmtree(backup)


__all__ = [
    "ConversionError",
    "ConversionReport",
    "VerificationError",
    "convert_official_checkpoint",
]
