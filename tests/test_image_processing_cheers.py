"""CheersImageProcessor: official pixel parity, input formats and modes, bad inputs, postprocess."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from transformers_cheers.image_processing_cheers import CheersImageProcessor
from transformers_cheers.processing_cheers import official_dummy_image


RESOLUTION = 128  # the tiny golden fixtures; the released model uses the default 512


@pytest.fixture(scope="module")
def processor():
    return CheersImageProcessor(resolution=RESOLUTION)


@pytest.fixture(scope="module")
def photo():
    """A smooth non-square RGB picture (no golden files needed)."""
    y, x = np.mgrid[0:60, 0:100]
    return PIL.Image.fromarray(np.stack([x * 2, y * 4, (x + y)], axis=-1).astype(np.uint8))


def pixels(processor, image, **kwargs) -> torch.Tensor:
    return processor(image, **kwargs)["pixel_values"]


# ---- parity with the recorded official processor outputs ----


def test_letterbox_matches_official(golden, processor):
    image = PIL.Image.open(golden.root / "inputs" / "image.png")
    expected = golden.inputs("case2_understanding")["inputs/pixel_values"]
    torch.testing.assert_close(pixels(processor, image), expected, rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, image), golden.inputs("case1_vision_tokenizer")["pixel_values"])


def test_center_crop_matches_official(golden, processor):
    path = golden.root / "inputs" / "image.png"  # 200x120: the crop path cuts the width
    expected = golden.inputs("case6a_vae")["pixel_values_gen"]
    torch.testing.assert_close(pixels(processor, path, resize_mode="center_crop"), expected, rtol=0, atol=0)


def test_dummy_image_pixels_match_official(golden, processor):
    for case, seed in [("case3_text_only", 16), ("case4a_t2i_cfg", 17), ("case4b_t2i_nocfg", 18)]:
        recorded = golden.inputs(case)
        assert golden.manifest["cases"][case]["runs"]["bf16"]["info"]["numpy_seed"] == seed
        dummy = official_dummy_image(seed)
        assert torch.equal(torch.from_numpy(np.array(dummy)), recorded["inputs/dummy_image_uint8"])
        torch.testing.assert_close(pixels(processor, dummy), recorded["inputs/pixel_values"], rtol=0, atol=0)


def test_training_batches_match_after_bf16_cast(golden, processor):
    """case5 stores bf16 pixel values of both paths (und letterbox, gen crop) as the official trainer casts them."""
    recorded = golden.inputs("case5_training")
    image = PIL.Image.open(golden.root / "inputs" / "image.png")
    understanding = pixels(processor, image)
    generation = pixels(processor, image, resize_mode="center_crop")
    assert torch.equal(understanding.bfloat16(), recorded["a_und/batch/pixel_values"])
    assert torch.equal(generation.bfloat16(), recorded["b_gen/batch/pixel_values"])
    assert torch.equal(
        torch.cat([understanding, generation]).bfloat16(), recorded["d_batch_und_gen/batch/pixel_values"]
    )


# ---- outputs, geometry, configuration ----


def test_outputs_and_grid(processor, photo):
    out = processor([photo, photo])
    assert out["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_grid_hw"].tolist() == [[RESOLUTION // 16] * 2] * 2
    assert 0 <= out["pixel_values"].min() and out["pixel_values"].max() <= 1
    assert processor.model_input_names == ["pixel_values", "image_grid_hw"]


def test_letterbox_is_centred_black_padding(processor):
    image = PIL.Image.new("RGB", (128, 61), (255, 255, 255))  # pad 67 rows: 33 on top, 34 at the bottom
    out = pixels(processor, image)[0]
    rows_white = (out == 1).all(dim=(0, 2))
    assert rows_white.nonzero().flatten().tolist() == list(range(33, 33 + 61))
    assert (out[:, :33] == 0).all() and (out[:, 33 + 61 :] == 0).all()


def test_default_resolution_and_save_load(tmp_path):
    default = CheersImageProcessor()
    assert default.resolution == 512 and default.patch_size == 16 and default.merge_size == 2
    CheersImageProcessor(resolution=256, resize_mode="center_crop").save_pretrained(tmp_path)
    loaded = CheersImageProcessor.from_pretrained(tmp_path)
    assert (loaded.resolution, loaded.resize_mode) == (256, "center_crop")


def test_resolution_override_per_call(processor, photo):
    out = processor(photo, resolution=64)
    assert out["pixel_values"].shape[-1] == 64 and out["image_grid_hw"].tolist() == [[4, 4]]


# ---- input formats ----


def test_array_and_tensor_layouts_equal_pil(processor, photo):
    reference = pixels(processor, photo)
    array = np.array(photo)  # writable, so torch.from_numpy does not warn
    variants = [
        array,  # HWC uint8
        array.transpose(2, 0, 1),  # CHW uint8
        array / 255.0,  # HWC float64 in [0, 1]
        torch.from_numpy(array).permute(2, 0, 1),  # CHW uint8 tensor
        torch.from_numpy(array / 255.0).permute(2, 0, 1).float(),  # CHW float tensor
        torch.from_numpy(array),  # HWC tensor (first axis is not a channel count)
    ]
    for variant in variants:
        torch.testing.assert_close(pixels(processor, variant), reference, rtol=0, atol=0)


def test_batches_and_nested_lists(processor, photo):
    reference = pixels(processor, photo)
    batch = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    assert pixels(processor, batch).shape[0] == 2
    nested = pixels(processor, [[photo], [photo, np.asarray(photo)]])
    assert nested.shape[0] == 3
    torch.testing.assert_close(nested[2:], reference)


def test_modes_without_alpha_use_pillow_conversion(processor, photo):
    grey, palette, cmyk = photo.convert("L"), photo.convert("P"), photo.convert("CMYK")
    pairs = [
        (grey, grey.convert("RGB")),
        (np.asarray(grey), grey.convert("RGB")),
        (np.asarray(grey)[..., None], grey.convert("RGB")),
        (palette, palette.convert("RGB")),
        (cmyk, cmyk.convert("RGB")),
    ]
    for image, rgb in pairs:
        torch.testing.assert_close(pixels(processor, image), pixels(processor, rgb), rtol=0, atol=0)


def test_alpha_is_composited_on_black(processor, photo):
    opaque = photo.convert("RGBA")
    torch.testing.assert_close(pixels(processor, opaque), pixels(processor, photo), rtol=0, atol=0)
    transparent = PIL.Image.new("RGBA", (100, 60), (255, 255, 255, 0))
    assert (pixels(processor, transparent) == 0).all()
    half = PIL.Image.new("LA", (100, 60), (255, 128))
    assert torch.allclose(pixels(processor, half).max(), torch.tensor(128 / 255))


def test_sixteen_bit_and_float_modes(processor):
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    sixteen = PIL.Image.fromarray(values)
    assert sixteen.mode == "I;16"
    as_eight_bit = PIL.Image.fromarray(np.array([[0, 100], [255, 200]], dtype=np.uint8))
    torch.testing.assert_close(pixels(processor, sixteen), pixels(processor, as_eight_bit), rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, sixteen.convert("I")), pixels(processor, as_eight_bit))
    floats = PIL.Image.fromarray(np.array([[0, 100], [255, 200]], dtype=np.float32) / 255)
    torch.testing.assert_close(pixels(processor, floats), pixels(processor, as_eight_bit), rtol=0, atol=0)


def test_one_by_one_image_is_handled(processor):
    dot = PIL.Image.new("RGB", (1, 1), (10, 20, 30))
    for mode in ["letterbox", "center_crop"]:
        out = pixels(processor, dot, resize_mode=mode)
        assert out.shape == (1, 3, RESOLUTION, RESOLUTION)
        torch.testing.assert_close(out[0, :, 64, 64] * 255, torch.tensor([10.0, 20.0, 30.0]))


def test_extreme_aspect_ratio_keeps_one_pixel(processor):
    line = PIL.Image.new("RGB", (1, 1000), (255, 0, 0))  # letterboxed width rounds to 0 without the floor of 1
    out = pixels(processor, line)
    assert out[0, 0].sum(dim=0).count_nonzero() == 1


# ---- bad inputs ----


def test_resolution_must_be_multiple_of_32(processor, photo):
    with pytest.raises(ValueError, match=r"multiple of patch_size \* merge_size = 32, got 100; use e.g. 96"):
        CheersImageProcessor(resolution=100)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        processor(photo, resolution=48)


def test_unsupported_array_shapes(processor):
    for shape in [(5, 5, 5), (10,), (1, 2, 3, 4, 5)]:
        with pytest.raises(ValueError, match="Unsupported image array shape"):
            processor(np.zeros(shape, dtype=np.uint8))


def test_unsupported_values_dtypes_and_types(processor):
    with pytest.raises(ValueError, match=r"Float images must hold values in \[0, 1\]"):
        processor(np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match=r"Float images must hold values in \[0, 1\]"):
        processor(np.full((8, 8, 3), np.nan))
    with pytest.raises(ValueError, match="Unsupported image dtype int32"):
        processor(np.zeros((8, 8, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="Unsupported image type int"):
        processor(5)
    with pytest.raises(ValueError, match="zero width or height"):
        processor(np.zeros((0, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="No images were passed"):
        processor([])


def test_truncated_and_missing_files(processor, photo, tmp_path):
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="Could not read the image file .*truncated.png.*re-export"):
        processor(str(truncated))
    with pytest.raises(ValueError, match="Could not read the image file .*missing.png"):
        processor(tmp_path / "missing.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        processor(not_an_image)


def test_decompression_bomb_guard_still_applies(processor, photo, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    photo.save(path)  # 6000 pixels, more than twice the lowered limit
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PIL.Image.DecompressionBombError):
        processor(str(path))


# ---- postprocess ----


def test_postprocess_outputs(processor):
    generated = torch.linspace(-0.5, 1.5, 3 * 4 * 4).reshape(1, 3, 4, 4).bfloat16()
    tensor = processor.postprocess(generated, output_type="pt")
    assert tensor.dtype == torch.float32 and tensor.min() == 0 and tensor.max() == 1
    array = processor.postprocess(generated[0], output_type="np")
    assert array.shape == (1, 4, 4, 3)
    (image,) = processor.postprocess(generated, output_type="pil")
    assert image.size == (4, 4) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.round(array[0] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="output_type must be"):
        processor.postprocess(generated, output_type="latent")
