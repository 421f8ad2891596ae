"""Image processor for Cheers (PIL backend, no torchvision).

Two square layouts of side `resolution` (R), both with pixel values in [0, 1] and no mean/std normalisation:

* `resize_mode="letterbox"` (understanding inputs, context images): resize the longest side to R with PIL bicubic,
  then centre the image on a black R x R canvas.
* `resize_mode="center_crop"` (generation / editing targets): resize the shortest side to R, then centre-crop R x R.

Inputs become RGB before any resizing. Rules, by input:

* RGB PIL images are used as they are, so their pixels match the official processor bit for bit.
* Images with transparency (RGBA, LA, PA, or a palette/grey image with a transparent colour) are composited onto
  black, which is also the letterbox colour. For opaque images this is the same as dropping alpha. The official
  processor instead resizes in RGBA and then drops alpha, so only semi-transparent edges can differ from it.
* 16-bit greyscale ("I;16*", and "I", which is how older Pillow opens 16-bit PNGs) is mapped from 0..65535 to 0..255.
* "F" images and float arrays/tensors must lie in [0, 1] and are quantised to uint8 as round(x * 255).
* Every other mode (L, 1, P, CMYK, YCbCr, ...) goes through Pillow's `convert("RGB")`.
* numpy arrays: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, uint8 or float. numpy is read channels-last when
  the last axis could be a channel axis, torch tensors channels-first when the first axis could be one. A 4-D
  array or tensor is read as a batch of images.
* File paths are opened with Pillow (its decompression-bomb guard `PIL.Image.MAX_IMAGE_PIXELS` applies) and
  rotated according to their EXIF orientation.
"""

import os
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack


CHANNEL_COUNTS = (1, 3, 4)
SIXTEEN_BIT_MAX = 65535


class CheersImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    resolution (`int`, *optional*, defaults to 512):
        Side of the square output. Must be a multiple of `patch_size * merge_size`.
    patch_size (`int`, *optional*, defaults to 16):
        Side of a SigLIP patch; `image_grid_hw` counts patches per side.
    merge_size (`int`, *optional*, defaults to 2):
        Side of the block of patches merged into one language-model token.
    resize_mode (`str`, *optional*, defaults to `"letterbox"`):
        `"letterbox"` for images the model reads, `"center_crop"` for images it generates or edits.
    """

    resolution: int
    patch_size: int
    merge_size: int
    resize_mode: Literal["letterbox", "center_crop"]


class CheersImageProcessor(PilBackend):
    r"""
    Letterboxes (understanding) or centre-crops (generation) images to `resolution` x `resolution`, in [0, 1].

    Returns `pixel_values` `(num_images, 3, R, R)` float32 and `image_grid_hw` `(num_images, 2)`, the SigLIP patch
    grid `(R / patch_size, R / patch_size)`. See the module docstring for how inputs are converted to RGB.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = CheersImageProcessor(resolution=128)
    >>> out = processor(Image.new("RGB", (200, 120)))
    >>> out["pixel_values"].shape, out["image_grid_hw"].tolist()
    (torch.Size([1, 3, 128, 128]), [[8, 8]])
    ```
    """

    model_input_names = ["pixel_values", "image_grid_hw"]
    valid_kwargs = CheersImageProcessorKwargs
    resample = PILImageResampling.BICUBIC
    do_rescale = True
    rescale_factor = 1 / 255
    return_tensors = "pt"
    resolution = 512
    patch_size = 16
    merge_size = 2
    resize_mode = "letterbox"

    def __init__(self, **kwargs: Unpack[CheersImageProcessorKwargs]):
        super().__init__(**kwargs)
        check_resolution(self.resolution, self.patch_size * self.merge_size)

    def fetch_images(self, images):
        """Open the file paths found anywhere in a (nested) list of images; leave other inputs as they are."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if isinstance(images, (str, os.PathLike)):
            return load_image_file(images)
        return images

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        return flatten_images(self.fetch_images(images))

    def process_image(self, image, **kwargs) -> np.ndarray:
        """One input image as a channels-first uint8 RGB array (the PIL backend's working format)."""
        image = to_rgb_image(image)
        if min(image.size) == 0:
            raise ValueError(f"Image has zero width or height (size {image.size}); pass a non-empty image.")
        return np.asarray(image).transpose(2, 0, 1)

    def _validate_preprocess_kwargs(self, resolution=None, patch_size=None, merge_size=None, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        check_resolution(resolution, patch_size * merge_size)

    def _preprocess(
        self,
        images: list[np.ndarray],
        resolution: int,
        patch_size: int,
        resize_mode: str,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        if not images:
            raise ValueError("No images were passed; pass at least one image.")
        fit = self.letterbox if resize_mode == "letterbox" else self.resize_and_crop
        pixel_values = []
        for image in images:
            image = fit(image, resolution, resample)
            # float64 multiply then float32, as the official processor does, so values match bit for bit
            pixel_values.append(self.rescale(image, rescale_factor) if do_rescale else image.astype(np.float32))
        grid = [[resolution // patch_size, resolution // patch_size]] * len(pixel_values)
        return BatchFeature({"pixel_values": pixel_values, "image_grid_hw": grid}, tensor_type=return_tensors)

    @staticmethod
    def letterbox_region(height: int, width: int, resolution: int) -> tuple[int, int, int, int]:
        """`(top, left, height, width)` of a `height` x `width` image inside its letterboxed `resolution` square."""
        size = scaled_size(height, width, min(resolution / height, resolution / width))
        return (resolution - size.height) // 2, (resolution - size.width) // 2, size.height, size.width

    def image_sizes(self, images) -> list[tuple[int, int]]:
        """`(height, width)` of each image (PIL, numpy channels-last, torch channels-first, or a file path)."""
        return [(image.height, image.width) for image in map(to_rgb_image, self._prepare_images_structure(images))]

    def letterbox(self, image: np.ndarray, resolution: int, resample: PILImageResampling) -> np.ndarray:
        """Resize the longest side to `resolution` and centre the result on a black square."""
        height, width = image.shape[-2:]
        scale = min(resolution / height, resolution / width)
        image = self.resize(image, scaled_size(height, width, scale), resample=resample)
        return pad_to_square(image, resolution)

    def resize_and_crop(self, image: np.ndarray, resolution: int, resample: PILImageResampling) -> np.ndarray:
        """Resize the shortest side to `resolution` and cut the central square."""
        height, width = image.shape[-2:]
        image = self.resize(image, scaled_size(height, width, resolution / min(height, width)), resample=resample)
        return self.center_crop(image, SizeDict(height=resolution, width=resolution))

    def postprocess(self, images, output_type: str = "pil"):
        """
        Turn generated images in [0, 1] (`(B, 3, H, W)` or `(3, H, W)`, torch or numpy, any float dtype) into
        a list of PIL images (`"pil"`), a float32 `(B, H, W, 3)` numpy array (`"np"`) or a float32 `(B, 3, H, W)`
        tensor (`"pt"`). Values are clamped to [0, 1] first: decoders overshoot slightly.
        """
        images = torch.as_tensor(images).detach().cpu().float().clamp(0, 1)
        images = images[None] if images.ndim == 3 else images
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        if output_type == "pil":
            return [PIL.Image.fromarray(np.round(frame * 255).astype(np.uint8)) for frame in array]
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")


def check_resolution(resolution: int, unit: int) -> None:
    """The image must split into whole blocks of merged patches, or the token grid would be fractional."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % unit:
        nearest = max(unit, round(resolution / unit) * unit) if isinstance(resolution, (int, float)) else unit
        raise ValueError(
            f"resolution must be a positive multiple of patch_size * merge_size = {unit}, got {resolution!r}; "
            f"use e.g. {nearest}."
        )


def scaled_size(height: int, width: int, scale: float) -> SizeDict:
    # Python's round(), as the official processor; at least 1 pixel so extreme aspect ratios still resize
    return SizeDict(height=max(1, round(height * scale)), width=max(1, round(width * scale)))


def pad_to_square(image: np.ndarray, side: int) -> np.ndarray:
    """Centre a channels-first image on a black `side` x `side` canvas; odd padding goes right/bottom."""
    pad_height, pad_width = side - image.shape[-2], side - image.shape[-1]
    padding = ((0, 0), (pad_height // 2, pad_height - pad_height // 2), (pad_width // 2, pad_width - pad_width // 2))
    return np.pad(image, padding)


def load_image_file(path) -> PIL.Image.Image:
    """Open and fully decode an image file, so a broken file fails here with its name in the message."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError and truncation are OSErrors
        raise ValueError(
            f"Could not read the image file {os.fspath(path)!r} ({error}). The file is missing, truncated or not an "
            "image: check the path, or re-download / re-export the file."
        ) from error


def flatten_images(images) -> list:
    """Images from any nesting of lists, with 4-D arrays/tensors split into single images, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def to_rgb_image(image) -> PIL.Image.Image:
    """One PIL image, numpy array or torch tensor as an RGB PIL image (rules in the module docstring)."""
    if isinstance(image, torch.Tensor):
        image = array_to_pil(
            image.detach().cpu().float().numpy() if image.is_floating_point() else image.numpy(), True
        )
    elif isinstance(image, np.ndarray):
        image = array_to_pil(image, False)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass a PIL image, a numpy array, a torch tensor or a "
            "file path."
        )
    return pil_to_rgb(image)


def pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        return pil_to_rgb(array_to_pil(np.asarray(image), False))
    if image.mode.startswith("I"):
        return sixteen_bit_to_rgb(image)
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        return composite_on_black(image)
    return image.convert("RGB")


def sixteen_bit_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    grey = np.clip(np.asarray(image, dtype=np.float64), 0, SIXTEEN_BIT_MAX) * (255 / SIXTEEN_BIT_MAX)
    return PIL.Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")


def composite_on_black(image: PIL.Image.Image) -> PIL.Image.Image:
    # black, like the letterbox fill, so transparent areas and padding look the same to the model
    rgba = image.convert("RGBA")
    black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return PIL.Image.alpha_composite(black, rgba).convert("RGB")


def array_to_pil(array: np.ndarray, channels_first: bool) -> PIL.Image.Image:
    """A (H, W), (H, W, C) or (C, H, W) uint8/float array as a PIL image (L, RGB or RGBA)."""
    array = to_uint8(to_channels_last(array, channels_first))
    return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_channels_last(array: np.ndarray, channels_first: bool) -> np.ndarray:
    """Find the channel axis; `channels_first` says which end wins when both could be one (tiny images)."""
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        first, last = array.shape[0] in CHANNEL_COUNTS, array.shape[-1] in CHANNEL_COUNTS
        if first and (channels_first or not last):
            return np.moveaxis(array, 0, -1)
        if last:
            return array
    raise ValueError(
        f"Unsupported image array shape {tuple(array.shape)}: expected (H, W), (H, W, C) or (C, H, W) with C in "
        f"{CHANNEL_COUNTS}, or a 4-D batch of those."
    )


def to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        # written as "inside [0, 1]" so that NaN fails too
        if not (np.all(array >= 0) and np.all(array <= 1)):
            raise ValueError(
                f"Float images must hold values in [0, 1], got [{array.min()}, {array.max()}]; clip or "
                "rescale them first (uint8 data is read as 0-255)."
            )
        return np.round(array * 255).astype(np.uint8)
    raise ValueError(f"Unsupported image dtype {array.dtype}: pass uint8 (0-255) or float (0-1) data.")


# A saved folder carries this file and an auto_map entry, so AutoImageProcessor loads it with trust_remote_code.
CheersImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CheersImageProcessor"]
