"""Training data for Cheers: the official jsonl conversation format, a `datasets` loader and a collator.

One sample per line, as in the official `Training/data/format.jsonl`:

```json
{"id": "01_understanding", "image": "cat.png", "conversations": [
    {"from": "human", "value": "<im_start><image><im_end>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
{"id": "02_generation", "image": "apple.png", "conversations": [
    {"from": "human", "value": "An apple.\\nBased on the above description, generate an image."},
    {"from": "gpt", "value": "<im_start><image_gen><im_end>"}]}
{"id": "03_text_only", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello!"}]}
```

`image` is one path, a comma-separated string of paths (`"source.png, target.png"` for editing) or a list, relative
to `image_root` (default: the jsonl's folder). There must be exactly one image per `<image>` / `<image_gen>`
placeholder, in order. Optional `resolution` (a multiple of 32) overrides the collator's for that sample.

What the collator reproduces from the official training (`train_cheers.process_sample` + `RAEQwenTemplate` +
`OmniDataCollatorWithPadding`):

* text: the default system prompt, then `<|im_start|>{role}\\n{content stripped}<|im_end|>\\n` per turn; a leading
  non-human turn is dropped;
* labels: assistant turns are targets in full (header included); system and user turns are not, except the
  structural tokens `\\n`, `<|im_start|>`, `<|im_end|>`, `<im_start>`, `<im_end>`, `<no_mean>`, which are targets
  everywhere; image tokens never are. (The model then shifts and rewrites them, see `transformers_cheers.training`.)
* images: `<image>` is letterboxed with t = 1; `<image_gen>` is centre-cropped with t ~ U(0, 1) clamped to
  [1e-6, 1 - 1e-6]; t is rounded to bf16 (the official pixel dtype), so draws above ~0.999 become 1 (target 0);
  `timestep_shift` (not official, off by default) warps the draw with the sampler's time shift instead;
* with `text_only_black_context_image=True` (off by default, like the processor and the pipelines), a sample
  without images gets a black context image at t = 0 in front of its text: the official dummy prefix, which
  reproduces the official training batches;
* guidance dropout: with probability `guidance_dropout` (official `cfg_data_rate`, 0.2) a sample containing
  `<image_gen>` has every input token except `<image>`, `<image_gen>`, `<im_start>`, `<im_end>` replaced by
  `<no_mean>`; its labels are kept;
* padding on the right (`padding_side="left"` works too: the model's positions and mask ignore padding).

Differences, deliberately: a missing or unreadable image file is an error (the official code silently trains on a
black image), so is a sample whose placeholders and images disagree (the official code crashes later or
mis-assigns images), so are two placeholders with nothing between them (`<image><image>`, which the model would
read as one image), and sequences are never truncated (the official code keeps the last 8192 tokens, which can cut
an image in half). Bad lines: `errors="raise"` (default) stops at the first bad line with its line number;
`errors="skip"` skips bad lines, counts them per reason and logs the count.

Randomness (t, noise x0, dropout) is drawn per sample from `(seed, epoch, sample index)`, so it does not depend on
batch composition, data-loader workers or processes, and a resumed run sees the same draws.
"""

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from transformers.utils import logging

from .image_processing_cheers import load_image_file
from .pipelines.scheduling_cheers import shift_time
from .prompting import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_GEN_TOKEN,
    IMAGE_TOKEN,
    TURN_END,
    TURN_START,
    adjacent_placeholder_pattern,
    adjacent_placeholders_message,
    find_placeholders,
    render_training_conversation,
    unconditional_input_ids,
)


logger = logging.get_logger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TIMESTEP_EPSILON = 1e-6


class SampleError(ValueError):
    """A training sample that cannot be used; the message names the sample and where it comes from."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def parse_image_field(value) -> list[str]:
    """The official `image` field: missing / None / "" / "null", one path, "a, b" (or "a; b"), or a list."""
    if value is None or value == "" or value == "null":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value]
    raise TypeError(f"'image' must be a path, a comma-separated string of paths or a list of paths, got {value!r}")


def placeholders_in(conversations: list[dict]) -> list[str]:
    """The image placeholders of a conversation, in order."""
    return [token for turn in conversations for token in find_placeholders(turn["value"])]


def adjacent_placeholders_in(conversations: list[dict]) -> str | None:
    """The first `<image><image>`-like pair of a conversation (two placeholders with nothing between them), if any."""
    pattern = adjacent_placeholder_pattern()
    matches = (pattern.search(turn["value"]) for turn in conversations)
    return next((match.group() for match in matches if match), None)


def normalize_sample(
    record, where: str, image_root: Path, check_images: bool, image_size_multiple: int, index: int
) -> dict:
    """Validate one parsed jsonl record and return it in the dataset's column layout."""
    if not isinstance(record, dict):
        raise SampleError(where, "malformed", f"expected a JSON object, got {type(record).__name__}.")
    sample_id = str(record.get("id", f"line {where.rsplit(':', 1)[-1]}"))
    where = f"{where} (sample {sample_id!r})"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(where, "malformed", "'conversations' must be a non-empty list of turns.")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise SampleError(
                where,
                "malformed",
                f"turn {number} must be {{'from': 'human' | 'gpt', 'value': str}}, got {turn!r}.",
            )
        turns.append({"from": ROLES[turn["from"]], "value": turn["value"]})
    if turns[0]["from"] != "user":  # the official preprocessing drops a leading non-human turn
        turns = turns[1:]
    if not turns or turns[0]["from"] != "user":
        raise SampleError(where, "malformed", "the conversation must start with a human turn.")
    try:
        images = parse_image_field(record.get("image"))
    except TypeError as error:
        raise SampleError(where, "malformed", str(error)) from None
    adjacent = adjacent_placeholders_in(turns)
    if adjacent:
        raise SampleError(where, "adjacent_placeholders", adjacent_placeholders_message("The sample", adjacent))
    placeholders = placeholders_in(turns)
    if len(placeholders) != len(images):
        raise SampleError(
            where,
            "image_mismatch",
            f"{len(placeholders)} image placeholder(s) ({', '.join(placeholders) or 'none'}) but {len(images)} "
            f"image(s) in 'image' ({record.get('image')!r}). Each <image> / <image_gen> needs exactly one image, "
            "in order.",
        )
    paths = [str(image_root / path) for path in images]
    if check_images:
        for path in paths:
            if not os.path.isfile(path):
                raise SampleError(where, "missing_image", f"image file {path!r} does not exist.")
    resolution = record.get("resolution")
    if resolution is not None and (
        not isinstance(resolution, int) or resolution <= 0 or resolution % image_size_multiple
    ):
        raise SampleError(
            where,
            "bad_resolution",
            f"resolution must be a positive multiple of {image_size_multiple} (SigLIP patch x token merge), got "
            f"{resolution!r}.",
        )
    return {
        "id": sample_id,
        "index": index,
        "source": where,
        "images": paths,
        "conversations": turns,
        "resolution": resolution,
    }


def read_conversation_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    errors: str = "raise",
    check_images: bool = True,
    image_size_multiple: int = 32,
) -> tuple[list[dict], Counter]:
    """Read and validate an official-format jsonl file.

    Returns the samples and a `Counter` of skipped lines per reason (`malformed`, `image_mismatch`,
    `missing_image`, `bad_resolution`, `adjacent_placeholders`; empty with `errors="raise"`). Blank lines are ignored.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}.")
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    samples, skipped = [], Counter()
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SampleError(where, "malformed", f"malformed JSON ({error.msg} at column {error.colno}).")
                samples.append(
                    normalize_sample(record, where, image_root, check_images, image_size_multiple, len(samples))
                )
            except SampleError as error:
                if errors == "raise":
                    raise
                skipped[error.reason] += 1
    if skipped:
        details = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        logger.warning(f"{path}: skipped {sum(skipped.values())} bad line(s) ({details}).")
    return samples, skipped


def load_conversation_dataset(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    errors: str = "raise",
    check_images: bool = True,
    image_size_multiple: int = 32,
):
    """A `datasets.Dataset` of validated samples from an official-format jsonl file (see the module docstring).

    Columns: `id`, `index` (row number, keys the per-sample randomness), `source` (file:line and id, for error
    messages), `images` (resolved paths), `conversations` (`[{"from": "user" | "assistant", "value": str}]`),
    `resolution` (or None). The skipped-line counts (with `errors="skip"`) are logged and stored in
    `dataset.info.description`.
    """
    import datasets

    samples, skipped = read_conversation_jsonl(path, image_root, errors, check_images, image_size_multiple)
    if not samples:
        raise ValueError(f"{path}: no usable sample (skipped: {dict(skipped) or 'none'}).")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "source": datasets.Value("string"),
            "images": datasets.List(datasets.Value("string")),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
            "resolution": datasets.Value("int64"),
        }
    )
    info = datasets.DatasetInfo(description=json.dumps({"skipped_lines": dict(skipped)}), features=features)
    return datasets.Dataset.from_list(samples, features=features, info=info)


# --------------------------------------------------------------------------------------------------------------------
# Collating
# --------------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


@dataclass
class CheersTrainingCollator:
    r"""
    Turns samples of `load_conversation_dataset` into a training batch for `CheersForConditionalGeneration`:
    `input_ids`, `attention_mask`, `labels`, `pixel_values`, `image_grid_hw`, `image_timesteps`,
    `context_image_mask` and, with `config`, `image_noise`. See the module docstring for the rules.

    Args:
        processor ([`CheersProcessor`]): tokenizer, image preprocessing and placeholder expansion.
        config ([`CheersConfig`], *optional*): when given, the noise x0 of every image is drawn here (per sample,
            reproducible); otherwise the model draws it from the global RNG.
        resolution (`int`, *optional*): image side (a multiple of 32); defaults to the image processor's.
        guidance_dropout (`float`, defaults to 0.2): the official `cfg_data_rate`.
        timestep_shift (`float`, *optional*): draw t as `shift_time(u, timestep_shift)` with u ~ U(0, 1): the warp of
            the sampler's time grid (`CheersFlowMatchScheduler(time_shift=...)`), so that training visits each t as
            often as sampling with that shift does (0.5 puts a third of the draws below t = 0.2, against a fifth).
            Default None: t ~ U(0, 1), as the official training.
        timestep_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): t is rounded to this dtype, as
            the official training (bf16 pixel values) does; None keeps fp32.
        pixel_dtype (`torch.dtype`, *optional*): the official training stores pixels as bf16; default fp32.
        text_only_black_context_image (`bool`, defaults to False): reproduces the official training batches: a
            sample without images gets a black context image at t = 0 in front of its text (the official dummy
            prefix), which also enters the image loss. Off by default, so that text-only samples are trained as
            the processor and the pipelines prompt them at inference (no context image).
        padding_side (`str`, defaults to `"right"`): as the official collator.
        seed (`int`): base of the per-sample randomness; `set_epoch` changes the draws every epoch.
        max_length (`int`, *optional*): longest accepted sequence (after image expansion); longer samples raise.
    """

    processor: object
    config: object = None
    resolution: int | None = None
    guidance_dropout: float = 0.2
    timestep_shift: float | None = None
    timestep_dtype: torch.dtype | None = torch.bfloat16
    pixel_dtype: torch.dtype | None = None
    text_only_black_context_image: bool = False
    padding_side: str = "right"
    seed: int = 0
    max_length: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    epoch: int = field(default=0, init=False)

    def __post_init__(self):
        image_processor = self.processor.image_processor
        self.image_size_multiple = image_processor.patch_size * image_processor.merge_size
        self.resolution = self.check_resolution(self.resolution or image_processor.resolution, "the collator")
        if not 0.0 <= self.guidance_dropout <= 1.0:
            raise ValueError(f"guidance_dropout must be in [0, 1], got {self.guidance_dropout}.")
        if self.timestep_shift is not None and not self.timestep_shift > 0:  # also rejects NaN
            raise ValueError(
                f"timestep_shift must be > 0 (e.g. 0.5, the sampler's default), got {self.timestep_shift}; "
                "None draws t uniformly."
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        tokenizer = self.processor.tokenizer
        self.turn_start_id = tokenizer.convert_tokens_to_ids(TURN_START)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        structural = [
            self.turn_start_id,
            tokenizer.convert_tokens_to_ids(TURN_END),
            self.processor.image_start_token_id,
            self.processor.image_end_token_id,
            self.processor.null_token_id,
        ] + (newline if len(newline) == 1 else [])
        self.structural_ids = torch.tensor(structural)
        self.image_ids = torch.tensor([self.processor.image_token_id, self.processor.image_gen_token_id])
        self.dropout_kept_ids = self.processor.unconditional_kept_token_ids

    def set_epoch(self, epoch: int) -> None:
        """New random draws (t, noise, dropout) for every epoch; call before iterating the data loader."""
        self.epoch = epoch

    def check_resolution(self, resolution, where: str) -> int:
        if not isinstance(resolution, int) or resolution <= 0 or resolution % self.image_size_multiple:
            raise ValueError(
                f"{where}: resolution must be a positive multiple of {self.image_size_multiple} (SigLIP patch x "
                f"token merge), got {resolution!r}."
            )
        return resolution

    def render(self, conversations: list[dict]) -> str:
        return render_training_conversation(conversations, self.system_prompt)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        resolutions = {sample.get("resolution") or self.resolution for sample in samples}
        if len(resolutions) > 1:
            names = ", ".join(
                f"{sample['source']} -> {sample.get('resolution') or self.resolution}" for sample in samples
            )
            raise ValueError(
                f"A batch must share one image resolution, got {sorted(resolutions)} ({names}). Batch samples of "
                "different resolutions separately (e.g. group them by resolution)."
            )
        resolution = self.check_resolution(resolutions.pop(), samples[0]["source"])
        texts, images, contexts, timesteps, dropped, generators = [], [], [], [], [], []
        for sample in samples:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, sample["index"]))
            generators.append(generator)
            conversations = sample["conversations"]
            texts.append(self.render(conversations))
            images.append([self.load_image(path, sample) for path in sample["images"]])
            sample_timesteps = []
            for token in placeholders_in(conversations):
                if token == IMAGE_TOKEN:
                    sample_timesteps.append(1.0)
                else:
                    draw = self.draw_timestep(generator)
                    sample_timesteps.append(min(max(draw, TIMESTEP_EPSILON), 1 - TIMESTEP_EPSILON))
            context = None
            if not sample_timesteps and self.text_only_black_context_image:
                context = PIL.Image.new("RGB", (512, 512))  # the official black dummy (letterboxed to resolution)
                sample_timesteps.append(0.0)
            contexts.append(context)
            timesteps.extend(sample_timesteps)
            has_generation = IMAGE_GEN_TOKEN in placeholders_in(conversations)
            dropped.append(has_generation and float(torch.rand(1, generator=generator)) < self.guidance_dropout)

        kwargs = {"padding_side": self.padding_side, "resolution": resolution}
        if self.max_length is not None:
            kwargs["max_length"] = self.max_length
        try:
            batch = self.processor(
                images=images,
                text=texts,
                context_image=contexts if any(context is not None for context in contexts) else None,
                **kwargs,
            )
        except ValueError as error:
            raise ValueError(f"Batch of {[sample['source'] for sample in samples]}: {error}") from error

        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"].bool()
        labels = torch.stack(
            [self.labels_for(row, mask, sample) for row, mask, sample in zip(input_ids, attention_mask, samples)]
        )
        for row, drop in enumerate(dropped):
            if drop:  # the sample becomes its own unconditional prompt, as at inference with guidance
                input_ids[row] = unconditional_input_ids(
                    input_ids[row], attention_mask[row], self.dropout_kept_ids, self.processor.null_token_id
                )

        output = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "labels": labels}
        context_mask = batch.get("context_image_mask")
        output["context_image_mask"] = (
            torch.as_tensor(context_mask).bool() if context_mask is not None else torch.zeros_like(attention_mask)
        )
        if "pixel_values" in batch:
            pixel_values = batch["pixel_values"]
            output["pixel_values"] = pixel_values.to(self.pixel_dtype) if self.pixel_dtype else pixel_values
            output["image_grid_hw"] = batch["image_grid_hw"]
            image_timesteps = torch.tensor(timesteps, dtype=torch.float32)
            if self.timestep_dtype is not None:
                image_timesteps = image_timesteps.to(self.timestep_dtype).float()
            output["image_timesteps"] = image_timesteps
            if self.config is not None:
                output["image_noise"] = self.draw_noise(samples, generators, resolution)
        return output

    def draw_timestep(self, generator: torch.Generator) -> float:
        """t of one generation target: U(0, 1) (official), or warped by the sampler's time shift."""
        draw = torch.rand(1, generator=generator)
        if self.timestep_shift is not None:
            draw = shift_time(draw, self.timestep_shift)
        return float(draw)

    def draw_noise(self, samples, generators, resolution: int) -> torch.Tensor:
        """x0 for every image of the batch, in `pixel_values` order, each sample from its own generator."""
        grid = resolution // self.config.vision_config.patch_size
        noise = []
        for sample, generator in zip(samples, generators):
            count = max(len(sample["images"]), 1 if self.text_only_black_context_image else 0)
            noise.append(torch.randn(count, self.config.latent_channels, grid, grid, generator=generator))
        return torch.cat(noise)

    def load_image(self, path: str, sample: dict) -> PIL.Image.Image:
        try:
            return load_image_file(path)
        except ValueError as error:
            raise ValueError(f"{sample['source']}: {error}") from None

    def labels_for(self, ids: torch.Tensor, mask: torch.Tensor, sample: dict) -> torch.Tensor:
        """Official labels of one tokenised row: assistant turns in full, structural tokens everywhere."""
        roles = ["system"] + [turn["from"] for turn in sample["conversations"]]
        starts = ((ids == self.turn_start_id) & mask).nonzero().flatten().tolist()
        if len(starts) != len(roles):
            raise ValueError(
                f"{sample['source']}: expected {len(roles)} '<|im_start|>' tokens (system + {len(roles) - 1} turns), "
                f"found {len(starts)}; the text itself must not contain chat-template tokens."
            )
        end = int(mask.nonzero().max()) + 1
        labels = torch.full_like(ids, -100)
        for role, start, stop in zip(roles, starts, starts[1:] + [end]):
            if role == "assistant":
                labels[start:stop] = ids[start:stop]
        structural = torch.isin(ids, self.structural_ids) & mask
        labels = torch.where(structural, ids, labels)
        labels[torch.isin(ids, self.image_ids) | ~mask] = -100
        return labels


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 30)}


def make_synthetic_dataset(
    folder: str | os.PathLike,
    num_understanding: int = 8,
    num_generation: int = 8,
    num_text: int = 4,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny learnable dataset (coloured squares) in the official jsonl format; returns the jsonl path.

    Understanding: "What colour is this?" -> the colour name. Generation: "A {colour} square." -> the image.
    Text-only: a greeting. Images are PNGs of a solid background with a square of the named colour.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    records = []

    def draw(index: int, colour: str) -> str:
        image = PIL.Image.new("RGB", (image_size, image_size), (128, 128, 128))
        side = image_size // 2 + rng.randrange(image_size // 4)
        left, top = rng.randrange(image_size - side + 1), rng.randrange(image_size - side + 1)
        image.paste(COLOURS[colour], (left, top, left + side, top + side))
        name = f"images/{index:04d}_{colour}.png"
        image.save(folder / name)
        return name

    for index in range(num_understanding):
        colour = names[index % len(names)]
        records.append(
            {
                "id": f"und_{index}",
                "image": draw(len(records), colour),
                "conversations": [
                    {"from": "human", "value": "<im_start><image><im_end>\nWhat colour is this?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    for index in range(num_generation):
        colour = names[index % len(names)]
        records.append(
            {
                "id": f"gen_{index}",
                "image": draw(len(records), colour),
                "conversations": [
                    {
                        "from": "human",
                        "value": f"A {colour} square.\nBased on the above description, generate an image.",
                    },
                    {"from": "gpt", "value": "<im_start><image_gen><im_end>"},
                ],
            }
        )
    for index in range(num_text):
        records.append(
            {
                "id": f"text_{index}",
                "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}],
            }
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


__all__ = [
    "CheersTrainingCollator",
    "SampleError",
    "load_conversation_dataset",
    "make_synthetic_dataset",
    "read_conversation_jsonl",
]
