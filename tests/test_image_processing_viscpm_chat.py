"""Tests of VisCPMChatImageProcessor: parity with the original eval transform (golden fixtures) and clear errors."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import load_json
from viscpm.modeling.image_processing_viscpm_chat import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    InvalidImageError,
    VisCPMChatImageProcessor,
    check_pixel_values,
    load_image,
    transform_image,
)
from viscpm.training.data import png_bytes

# `pixel_values_224` of the fixture is documented as build_transform(is_train=False, input_size=224).
RELEASED_IMAGE_SIZE = 224


def reference_transform(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision's Resize((s, s), BICUBIC) + ToTensor + Normalize(0.5, 0.5), spelled out (no torchvision here)."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    half = torch.tensor([0.5, 0.5, 0.5]).view(-1, 1, 1)
    return pixels.sub(half).div(half)


def noise_image(width, height, mode="RGB", seed=0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def golden_images(golden_dir):
    paths = sorted(p for p in (golden_dir / "chat" / "images").iterdir() if p.is_file())
    assert paths, "no images in chat/images"
    return paths


@pytest.fixture(scope="module")
def golden_transform(golden_dir):
    return load_file(golden_dir / "chat" / "image_transform.safetensors")


@pytest.fixture(scope="module")
def tiny_image_size(golden_dir):
    return load_json(golden_dir / "chat" / "config.json")["image_size"]


# ---------------------------------------------------------------- golden parity


@pytest.mark.golden
@pytest.mark.parametrize("key", ["pixel_values", "pixel_values_224"])
def test_golden_parity(key, golden_images, golden_transform, tiny_image_size):
    size = RELEASED_IMAGE_SIZE if key == "pixel_values_224" else tiny_image_size
    processor = VisCPMChatImageProcessor() if key == "pixel_values_224" else VisCPMChatImageProcessor(size=size)
    expected = golden_transform[key]

    actual = processor([str(path) for path in golden_images], return_tensors="pt")["pixel_values"]

    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == (len(golden_images), 3, size, size) == tuple(expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    # Same PIL call and float32 ops as torchvision: bit-identical in practice.
    assert torch.equal(actual, expected), f"max abs diff {(actual - expected).abs().max().item()}"


@pytest.mark.golden
def test_golden_parity_every_input_kind(golden_images, golden_transform, tiny_image_size):
    processor = VisCPMChatImageProcessor(size=tiny_image_size)
    expected = golden_transform["pixel_values"]
    for index, path in enumerate(golden_images):
        data = path.read_bytes()
        with open(path, "rb") as file:
            from_file = processor(file, return_tensors="pt")["pixel_values"][0]
        rgb = Image.open(path).convert("RGB")
        sources = {
            "path": path,
            "bytes": data,
            "bytearray": bytearray(data),
            "PIL": Image.open(path),
            "uint8 HWC": np.array(rgb),
            "uint8 CHW tensor": torch.from_numpy(np.array(rgb)).permute(2, 0, 1),
        }
        assert torch.equal(from_file, expected[index]), "file object"
        for kind, source in sources.items():
            assert torch.equal(processor(source, return_tensors="pt")["pixel_values"][0], expected[index]), kind


@pytest.mark.golden
def test_golden_already_transformed_pixel_values_pass_through(golden_transform, tiny_image_size):
    expected = golden_transform["pixel_values"]
    processor = VisCPMChatImageProcessor(size=tiny_image_size)
    assert torch.equal(processor(expected, return_tensors="pt")["pixel_values"], expected)
    assert torch.equal(processor(list(expected.numpy()), return_tensors="pt")["pixel_values"], expected)


# ---------------------------------------------------------------- the transform itself


def test_resize_is_plain_pil_bicubic_without_reducing_gap():
    # A strong downscale, where PIL's reducing_gap (box-reduce first) would give different values.
    image = noise_image(997, 613)
    actual = VisCPMChatImageProcessor(size=32)(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(actual, reference_transform(image, 32))
    with_gap = np.array(image.resize((32, 32), Image.BICUBIC, reducing_gap=2.0))
    assert not np.array_equal(with_gap, np.array(image.resize((32, 32), Image.BICUBIC))), "test lost its power"


def test_aspect_ratio_is_not_kept():
    image = noise_image(300, 50)
    out = VisCPMChatImageProcessor(size=48)(image, return_tensors="pt")["pixel_values"]
    assert tuple(out.shape) == (1, 3, 48, 48)
    assert torch.equal(out[0], reference_transform(image, 48))


def test_rescale_divides_by_255_in_float32_like_to_tensor():
    # Every uint8 value; x * (1/255) in float32 differs from x / 255 for about half of them.
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1), "RGB")
    actual = transform_image(image, do_resize=False)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32).div(255).sub(0.5).div(0.5)
    assert torch.equal(actual, expected)
    assert actual.min().item() == -1.0 and actual.max().item() == 1.0


def test_defaults_are_the_released_viscpm_chat():
    processor = VisCPMChatImageProcessor()
    assert (processor.size.height, processor.size.width) == (224, 224)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]
    assert int(processor.resample) == int(Image.BICUBIC)
    assert processor.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    out = processor(noise_image(50, 40), return_tensors="pt")["pixel_values"]
    assert tuple(out.shape) == (1, 3, 224, 224)


def test_batches_and_return_types():
    processor = VisCPMChatImageProcessor(size=16)
    images = [noise_image(30, 20, seed=seed) for seed in range(3)]
    batch = processor(images, return_tensors="pt")["pixel_values"]
    assert tuple(batch.shape) == (3, 3, 16, 16)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], processor(image, return_tensors="pt")["pixel_values"][0])
    as_np = processor(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32 and np.array_equal(as_np, batch.numpy())
    as_list = processor(images)["pixel_values"]
    assert isinstance(as_list, list) and len(as_list) == 3 and as_list[0].shape == (3, 16, 16)
    nested = processor([[images[0]], [images[1], images[2]]], return_tensors="pt")["pixel_values"]
    assert torch.equal(nested, batch)
    uint8_batch = np.stack([np.array(image) for image in images])
    assert torch.equal(processor(uint8_batch, return_tensors="pt")["pixel_values"], batch)


def test_call_kwargs_override_config():
    processor = VisCPMChatImageProcessor(size=16)
    image = noise_image(30, 20)
    out = processor(image, size=24, return_tensors="pt")["pixel_values"]
    assert torch.equal(out[0], reference_transform(image, 24))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16"])
def test_other_modes_are_converted_to_rgb_like_the_original(mode):
    image = noise_image(40, 30).convert(mode)
    out = VisCPMChatImageProcessor(size=16)(image, return_tensors="pt")["pixel_values"]
    assert tuple(out.shape) == (1, 3, 16, 16)
    assert torch.equal(out[0], reference_transform(image.convert("RGB"), 16))
    # The same through a file.
    if mode not in ("CMYK", "I;16"):
        assert torch.equal(
            VisCPMChatImageProcessor(size=16)(png_bytes(image), return_tensors="pt")["pixel_values"][0], out[0]
        )


def test_rgba_alpha_is_dropped_not_blended():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    loaded = load_image(png_bytes(rgba))
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 0, 0)


def test_palette_with_transparency_is_quiet():
    image = Image.new("P", (8, 8))
    image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.info["transparency"] = bytes(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(png_bytes(image)).mode == "RGB"


def test_load_image_leaves_a_callers_file_open(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(noise_image(10, 10)))
    with open(path, "rb") as file:
        image = load_image(file)
        assert not file.closed
    assert image.mode == "RGB" and image.size == (10, 10)
    np.asarray(image)  # decoded data is still usable after the file is closed


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("max_image_pixels", [12345, None])
def test_save_pretrained_round_trip(tmp_path, max_image_pixels):
    processor = VisCPMChatImageProcessor(size=48, max_image_pixels=max_image_pixels)
    assert processor.max_image_pixels == max_image_pixels
    processor.save_pretrained(tmp_path)
    saved = load_json(tmp_path / "preprocessor_config.json")
    assert saved["size"] == {"height": 48, "width": 48}
    assert saved["max_image_pixels"] == max_image_pixels
    assert saved["image_processor_type"] == "VisCPMChatImageProcessor"

    reloaded = VisCPMChatImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert reloaded.max_image_pixels == max_image_pixels
    image = noise_image(70, 50)
    assert torch.equal(
        reloaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


# ---------------------------------------------------------------- clear errors


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n", encoding="utf-8")
    with pytest.raises(InvalidImageError, match="is not an image") as info:
        VisCPMChatImageProcessor()(str(path))
    assert "notes.txt" in str(info.value)
    with pytest.raises(ValueError, match="is not an image"):
        load_image(path.read_bytes())


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png(tmp_path, keep):
    data = png_bytes(noise_image(64, 48))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InvalidImageError, match="truncated or corrupt") as info:
        VisCPMChatImageProcessor()(path)
    assert "cut.png" in str(info.value)


def test_png_cut_inside_its_header_is_reported(tmp_path):
    data = png_bytes(noise_image(64, 48))
    for cut in (8, 20, 40):
        with pytest.raises(InvalidImageError, match="truncated or corrupt|cut off inside its header"):
            load_image(data[:cut])


def test_image_over_the_pixel_limit():
    data = png_bytes(noise_image(100, 80))
    with pytest.raises(ImageTooLargeError) as info:
        VisCPMChatImageProcessor(max_image_pixels=5000)(data)
    message = str(info.value)
    assert "100x80" in message and "8000 pixels" in message and "max_image_pixels=5000" in message
    assert "raise the limit" in message
    # The limit as a call argument, on PIL images and arrays too; ImageTooLargeError is a ValueError.
    processor = VisCPMChatImageProcessor()
    for source in (data, Image.open(io.BytesIO(data)), np.zeros((80, 100, 3), np.uint8)):
        with pytest.raises(ValueError, match="max_image_pixels=7999"):
            processor(source, max_image_pixels=7999)
    # At the limit it is accepted.
    assert processor(data, max_image_pixels=8000, return_tensors="pt")["pixel_values"].shape[0] == 1
    assert load_image(data, max_image_pixels=None).size == (100, 80)


def test_pil_decompression_bomb_error_becomes_our_error(monkeypatch):
    data = png_bytes(noise_image(100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises over 2000 pixels
    with pytest.raises(ImageTooLargeError, match="max_image_pixels=5000") as info:
        load_image(data, max_image_pixels=5000)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
    # Our limit allows it, PIL's does not: the message says which knob to turn.
    with pytest.raises(ImageTooLargeError, match="PIL.Image.MAX_IMAGE_PIXELS") as info:
        load_image(data, max_image_pixels=10**6)
    assert "8000 pixels" in str(info.value)


def test_pil_decompression_bomb_warning_is_superseded_by_our_limit(monkeypatch):
    data = png_bytes(noise_image(100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL warns between 5000 and 10000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(data, max_image_pixels=10**6).size == (100, 80)
        with pytest.raises(ImageTooLargeError, match="max_image_pixels=7000"):
            load_image(data, max_image_pixels=7000)


def test_preprocessed_pixel_values_of_the_wrong_size():
    processor = VisCPMChatImageProcessor()  # 224
    wrong = torch.zeros(2, 3, 64, 64)
    with pytest.raises(InvalidImageError, match=r"\(3, 64, 64\)") as info:
        processor(wrong, return_tensors="pt")
    assert "(3, 224, 224)" in str(info.value) and "original image" in str(info.value)
    with pytest.raises(InvalidImageError, match="uint8"):
        processor(np.zeros((224, 224, 3), np.float32))  # a float HWC array is not a raw image
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        check_pixel_values(torch.zeros(3, 16, 16), (32, 32))
    right = torch.randn(2, 3, 224, 224)
    assert torch.equal(processor(right, return_tensors="pt")["pixel_values"], right)


def test_other_bad_inputs():
    processor = VisCPMChatImageProcessor(size=16)
    with pytest.raises(InvalidImageError, match="does not exist"):
        processor("/definitely/not/here.png")
    with pytest.raises(InvalidImageError, match="URL"):
        processor("https://example.com/cat.png")
    with pytest.raises(InvalidImageError, match="empty"):
        processor(b"")
    with pytest.raises(InvalidImageError, match="no images"):
        processor([])
    with pytest.raises(InvalidImageError, match="dtype int64"):
        processor(np.zeros((8, 8, 3), np.int64))
    with pytest.raises(TypeError, match="cannot load an image from int"):
        processor(42)
    with pytest.raises(ValueError, match="max_image_pixels must be"):
        VisCPMChatImageProcessor(max_image_pixels=0)
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        processor(noise_image(8, 8), do_convert_rgb=False)
