"""Processor for Cheers: chat template, image placeholders, generation prompts and CFG unconditional prompts."""

import json
import os
from collections.abc import Iterator

import numpy as np
import PIL.Image
import torch
from transformers import Qwen2Tokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_cheers import CheersImageProcessor, flatten_images
from .prompting import (
    CHAT_TEMPLATE,
    CHEERS_SPECIAL_TOKENS,
    IMAGE_END_TOKEN,
    IMAGE_GEN_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
    NULL_TOKEN,
    adjacent_placeholder_pattern,
    adjacent_placeholders_message,
    find_placeholders,
    placeholder_pattern,
    unconditional_input_ids,
)


PLACEHOLDER_FIX = (
    "Every image placeholder needs exactly one image, in order: write `<im_start><image><im_end>` in the text for "
    "each image (apply_chat_template does it for every {'type': 'image'} item) or remove the extra placeholders. "
    "An image meant only as a prefix without a placeholder goes in context_image=."
)


class CheersProcessor(ProcessorMixin):
    r"""
    Prepares Cheers inputs: renders chats, expands every image placeholder into one token per language-model image
    token, preprocesses the images in placeholder order and tokenises with left padding.

    `<image>` marks an image the model reads (letterboxed), `<image_gen>` an image it is trained to generate
    (centre-cropped). Each becomes `(resolution / patch_size / merge_size) ** 2` copies of itself.

    Args:
        image_processor ([`CheersImageProcessor`]): Preprocesses the images.
        tokenizer ([`Qwen2Tokenizer`]): Must already contain the five Cheers tokens; see `from_official_checkpoint`
            and `add_cheers_special_tokens`.
        chat_template (`str`, *optional*): Jinja template; defaults to `CHAT_TEMPLATE`.
        image_token, image_gen_token, image_start_token, image_end_token, null_token (`str`, *optional*):
            The token strings; their ids are always read from the tokenizer.

    Example:

    ```python
    >>> processor = CheersProcessor.from_official_checkpoint("path/to/official/checkpoint")
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(images=[image], text=prompt)
    ```
    """

    text_kwargs = {"padding": True, "padding_side": "left", "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        image_gen_token: str = IMAGE_GEN_TOKEN,
        image_start_token: str = IMAGE_START_TOKEN,
        image_end_token: str = IMAGE_END_TOKEN,
        null_token: str = NULL_TOKEN,
    ):
        self.image_token = image_token
        self.image_gen_token = image_gen_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.null_token = null_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token_id, self.image_gen_token_id, self.image_start_token_id, self.image_end_token_id = (
            self._token_id(token) for token in (image_token, image_gen_token, image_start_token, image_end_token)
        )
        self.null_token_id = self._token_id(null_token)
        self.resize_modes = {image_token: "letterbox", image_gen_token: "center_crop"}
        self.placeholder_pattern = placeholder_pattern(image_token, image_gen_token)
        self.adjacent_placeholder_pattern = adjacent_placeholder_pattern(image_token, image_gen_token)

    @classmethod
    def from_official_checkpoint(cls, folder: str | os.PathLike, **kwargs) -> "CheersProcessor":
        """
        Build the processor from an official Cheers folder (vocab.json, merges.txt, tokenizer_config.json and
        optionally preprocessor_config.json): loads the Qwen2 tokenizer, adds the five Cheers tokens when missing
        and takes `scale_resolution` / `patch_size` from the official preprocessor config. `kwargs` go to `__init__`.
        """
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
        add_cheers_special_tokens(tokenizer)
        image_processor = CheersImageProcessor(**official_image_settings(folder))
        return cls(image_processor, tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor lives outside transformers, so load it by class rather than via AutoImageProcessor
        # (which only knows registered classes); the tokenizer is a plain Qwen2 tokenizer.
        kwargs.pop("subfolder", None)
        image_processor = CheersImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, Qwen2Tokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)]

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {token!r} token. Build the processor with "
                "CheersProcessor.from_official_checkpoint(folder), or call add_cheers_special_tokens(tokenizer) first."
            )
        return token_id

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["context_image_mask"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        context_image=None,
        generation_mode: str = "text",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: Images for the placeholders, consumed in order across the batch (row-major): one image, a flat
                list, or one list per prompt. PIL images, numpy arrays, torch tensors or file paths.
            text (`str` or `list[str]`): Prompts, usually from `apply_chat_template`.
            context_image: Off by default. An image (or one image / `None` per prompt) whose tokens are prepended at
                the very start of the row with no `<im_start>`/`<im_end>` and no placeholder, as the official model
                does with its random "dummy" image for text-only and text-to-image prompts (see
                `official_dummy_image`). Its pixels come first among the row's images; `context_image_mask` marks
                its tokens.
            generation_mode (`str`, defaults to `"text"`): `"image"` appends `<im_start>` to each prompt, so the
                model starts generating an image (the official `add_im_start_id=True`).
            kwargs: Tokenizer / image-processor options, e.g. `padding_side="right"`, `resolution=...`,
                `max_length=...`, `return_tensors="np"`. Truncation is refused (it could cut an image).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, and when there are images `pixel_values`
            `(num_images, 3, R, R)` in [0, 1], `image_grid_hw` `(num_images, 2)`, plus `context_image_mask` (bool,
            shape of `input_ids`) when `context_image` is given.
        """
        texts = self._prompt_texts(text, generation_mode)
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        self._check_placeholders_apart(texts)
        placeholders = [find_placeholders(sample, self.placeholder_pattern) for sample in texts]
        row_images = self._images_per_prompt(placeholders, images)
        contexts = self._contexts_per_prompt(context_image, len(texts))

        jobs = []  # (image, resize mode), row by row: the context image first, then the placeholders in order
        for context, row, row_placeholders in zip(contexts, row_images, placeholders):
            jobs += [(context, "letterbox")] if context is not None else []
            jobs += [(image, self.resize_modes[token]) for image, token in zip(row, row_placeholders)]
        image_inputs = self._preprocess_images(jobs, output_kwargs["images_kwargs"])

        counts = iter(self._tokens_per_image(image_inputs, output_kwargs["images_kwargs"]))
        expanded, context_sizes = [], []
        for context, sample in zip(contexts, texts):
            context_sizes.append(next(counts) if context is not None else 0)
            expanded.append(self.image_token * context_sizes[-1] + self._expand(sample, counts))
        text_inputs = self._tokenize(expanded, output_kwargs["text_kwargs"])
        if context_image is not None:
            text_inputs["context_image_mask"] = self._context_mask(text_inputs["input_ids"], context_sizes)
        return_tensors = output_kwargs["text_kwargs"].get("return_tensors")
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def _prompt_texts(self, text, generation_mode: str) -> list[str]:
        if isinstance(text, str):
            text = [text]
        if not text or not all(isinstance(sample, str) and sample for sample in text):
            raise ValueError(
                "text must be a non-empty string or a non-empty list of non-empty strings; build prompts with "
                "processor.apply_chat_template(messages, add_generation_prompt=True). To preprocess images alone, "
                "call processor.image_processor."
            )
        if generation_mode not in ("text", "image"):
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        # the official text-to-image prompt ends with <im_start> right after "<|im_start|>assistant\n"
        return [sample + self.image_start_token for sample in text] if generation_mode == "image" else list(text)

    def _check_placeholders_apart(self, texts: list[str]) -> None:
        """Refuse `<image><image>`: expanded, two adjacent images are one run of image tokens, i.e. one image block."""
        for index, sample in enumerate(texts):
            match = self.adjacent_placeholder_pattern.search(sample)
            if match:
                raise ValueError(adjacent_placeholders_message(f"Prompt {index}", match.group()))

    def _images_per_prompt(self, placeholders: list[list[str]], images) -> list[list]:
        """Split `images` into one list per prompt, one image per placeholder, checking the counts."""
        expected = [len(row) for row in placeholders]
        images = [] if images is None else images
        is_nested = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
        if is_nested:
            return self._check_nested_images(expected, images)
        flat = flatten_images(images)
        check_no_none(flat)
        if len(flat) != sum(expected):
            raise ValueError(
                f"The prompts contain {sum(expected)} image placeholder(s) ({self.image_token} / "
                f"{self.image_gen_token}) in total, but {len(flat)} image(s) were passed. {PLACEHOLDER_FIX}"
            )
        starts = np.cumsum([0] + expected)
        return [flat[start:end] for start, end in zip(starts[:-1], starts[1:])]

    def _check_nested_images(self, expected: list[int], images) -> list[list]:
        if not all(isinstance(row, (list, tuple)) for row in images) or len(images) != len(expected):
            raise ValueError(
                f"Got {len(images)} entries in images but {len(expected)} prompts. Pass either a flat list of images "
                "or one list per prompt (an empty list for a prompt without images)."
            )
        rows = [flatten_images(row) for row in images]
        for index, (row, count) in enumerate(zip(rows, expected)):
            check_no_none(row)
            if len(row) != count:
                raise ValueError(
                    f"Prompt {index} contains {count} image placeholder(s) ({self.image_token} / "
                    f"{self.image_gen_token}), but {len(row)} image(s) were given for it. {PLACEHOLDER_FIX}"
                )
        return rows

    @staticmethod
    def _contexts_per_prompt(context_image, batch_size: int) -> list:
        if not isinstance(context_image, (list, tuple)):
            return [context_image] * batch_size
        if len(context_image) != batch_size:
            raise ValueError(
                f"context_image has {len(context_image)} entries but there are {batch_size} prompts; pass one "
                "image (or None) per prompt, or a single image for all of them."
            )
        return list(context_image)

    def _preprocess_images(self, jobs: list[tuple], images_kwargs: dict) -> dict:
        if not jobs:
            return {}
        outputs = [
            self.image_processor(image, **{**images_kwargs, "resize_mode": mode, "return_tensors": "pt"})
            for image, mode in jobs
        ]
        return {key: torch.cat([output[key] for output in outputs]) for key in outputs[0]}

    def _tokens_per_image(self, image_inputs: dict, images_kwargs: dict) -> list[int]:
        """Language-model tokens per image: its SigLIP patch grid merged `merge_size` x `merge_size`."""
        if not image_inputs:
            return []
        merge = images_kwargs.get("merge_size", self.image_processor.merge_size)
        grid = image_inputs["image_grid_hw"]
        return ((grid[:, 0] // merge) * (grid[:, 1] // merge)).tolist()

    def _expand(self, text: str, counts: Iterator[int]) -> str:
        """Repeat every placeholder once per language-model token of its image (images taken from `counts`)."""
        return self.placeholder_pattern.sub(lambda match: match.group() * next(counts), text)

    def _tokenize(self, texts: list[str], text_kwargs: dict) -> BatchFeature:
        if text_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
            raise ValueError(
                "CheersProcessor does not truncate, because a cut could split an image's tokens. Leave truncation "
                "off, and shorten the prompt or raise max_length instead."
            )
        tokenizer_kwargs = {**text_kwargs, "truncation": False}
        if text_kwargs.get("padding") != "max_length":
            tokenizer_kwargs.pop("max_length", None)  # here it only bounds the length; the tokenizer would warn
        text_inputs = self.tokenizer(texts, **tokenizer_kwargs)
        self._check_length(text_inputs["attention_mask"], text_kwargs.get("max_length"))
        # catches a tokenizer that splits the placeholder tokens instead of keeping them whole
        self._check_special_mm_tokens(texts, text_inputs, modalities=["image", "image_gen"])
        return text_inputs

    def _check_length(self, attention_mask, max_length: int | None) -> None:
        limit = max_length or self.tokenizer.model_max_length
        for index, row in enumerate(attention_mask):
            if int(sum(row)) > limit:
                raise ValueError(
                    f"Prompt {index} is {int(sum(row))} tokens long after expanding its image placeholders, more than "
                    f"max_length={limit}. The processor never truncates (a cut could split an image's tokens): "
                    "shorten the text, pass fewer images or a lower resolution, or raise max_length."
                )

    def _context_mask(self, input_ids, context_sizes: list[int]) -> list[np.ndarray]:
        """True at the first `size` image tokens of each row: the prepended context image."""
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        masks = []
        for row, size in zip(rows, context_sizes):
            is_image = np.asarray(row) == self.image_token_id
            masks.append(is_image & (np.cumsum(is_image) <= size))
        return masks

    @property
    def unconditional_kept_token_ids(self) -> tuple[int, ...]:
        """The tokens an unconditional prompt keeps: both image placeholders, `<im_start>` and `<im_end>`."""
        return (self.image_token_id, self.image_gen_token_id, self.image_start_token_id, self.image_end_token_id)

    def build_unconditional_inputs(self, inputs) -> BatchFeature:
        """
        The classifier-free-guidance counterpart of `inputs` (a processor output): same length, attention mask and
        images, with every attended token replaced by `null_token` (`<no_mean>`) except `<im_start>`, `<im_end>`
        and the image placeholders, as the official generate does. Kept images mean an edit keeps its source image
        and the context image is shared by both branches; padding stays padding. Unlike the official code, which
        never sees `<image_gen>` at inference, `<image_gen>` tokens are kept too so images and placeholders stay
        matched.
        """
        kept = self.unconditional_kept_token_ids
        input_ids = unconditional_input_ids(inputs["input_ids"], inputs["attention_mask"], kept, self.null_token_id)
        return BatchFeature({**inputs, "input_ids": input_ids})

    def postprocess(self, images, output_type: str = "pil"):
        """Generated images in [0, 1] to PIL / numpy / torch; see `CheersImageProcessor.postprocess`."""
        return self.image_processor.postprocess(images, output_type=output_type)


def check_no_none(images: list) -> None:
    if any(image is None for image in images):
        raise ValueError(
            "images contains None. The official processor turned None into a random dummy image; here pass that "
            "image explicitly as context_image=official_dummy_image(seed) instead."
        )


def add_cheers_special_tokens(tokenizer) -> int:
    """Add the missing Cheers tokens as special tokens, in the official order; returns how many were added."""
    vocabulary = tokenizer.get_vocab()
    return tokenizer.add_tokens(
        [token for token in CHEERS_SPECIAL_TOKENS if token not in vocabulary], special_tokens=True
    )


def official_image_settings(folder: str | os.PathLike) -> dict:
    """CheersImageProcessor kwargs from an official preprocessor_config.json (resolution, patch size), if any."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    names = {"scale_resolution": "resolution", "patch_size": "patch_size"}
    return {ours: config[theirs] for theirs, ours in names.items() if theirs in config}


def official_dummy_image(seed: int | None = None, size: int = 256) -> PIL.Image.Image:
    """
    The uniform-noise RGB image the official processor substitutes for `images=[None]` (text-only and text-to-image
    prompts): `np.random.randint(0, 256, (size, size, 3), dtype=np.uint8)`. With `seed` it equals the official draw
    after `np.random.seed(seed)`, using a private RandomState so the global numpy RNG is left alone; without `seed`
    it draws from the global RNG, as the official code does.
    """
    rng = np.random if seed is None else np.random.RandomState(seed)
    return PIL.Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


# A saved folder carries this file and its relative imports (image_processing_cheers.py, prompting.py; save_pretrained
# copies them) plus an auto_map entry, so AutoProcessor loads it with trust_remote_code without this package.
CheersProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CheersProcessor", "add_cheers_special_tokens", "official_dummy_image"]
