# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""Image processor of VisCPM-Chat: the original evaluation transform, without torchvision.

The original (`VisCPM.utils.utils.build_transform(is_train=False, input_size=S)`) is

    transforms.Resize((S, S), interpolation=BICUBIC)   # on a PIL image: PIL `Image.resize((S, S), BICUBIC)`
    transforms.ToTensor()                              # uint8 HWC -> float32 CHW, `.div(255)`
    transforms.Normalize(mean=0.5, std=0.5)            # `.sub_(mean).div_(std)` per channel

applied to `Image.open(path).convert("RGB")`. torchvision's PIL resize calls `img.resize(size[::-1], interpolation)`
with no `reducing_gap`, so the aspect ratio is not kept and PIL's antialiased bicubic filter sees the whole image.
`transform_image` repeats those very operations (same PIL call, same float32 torch ops in the same order), so the
output is bit-identical to the original's on CPU.

Inputs are checked before any pixel is decoded, with errors that name the problem and the fix: `load_image` (path,
bytes, file object or PIL image to an RGB PIL image) and `check_pixel_values` (already-transformed `pixel_values`)
are public so a command line or server can reuse them. Both raise `InvalidImageError` (a `ValueError`);
images over the pixel limit raise its subclass `ImageTooLargeError`.

This file imports only numpy, PIL, torch, transformers and the standard library: it is copied into converted
checkpoints as Hub remote code.
"""

import io
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

# PIL's own default for `Image.MAX_IMAGE_PIXELS` (about 89.5 million pixels, e.g. 10000 x 8948), written out so the
# default does not depend on what other code has set PIL's global to before this module was imported.
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)

# The released VisCPM-Chat (BEiT-3 large, patch 16) takes 224 x 224 images.
VISCPM_CHAT_IMAGE_SIZE = 224
# `IMAGENET_INCEPTION_MEAN` / `IMAGENET_INCEPTION_STD` of the original.
VISCPM_CHAT_IMAGE_MEAN = [0.5, 0.5, 0.5]
VISCPM_CHAT_IMAGE_STD = [0.5, 0.5, 0.5]

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image


class InvalidImageError(ValueError):
    """An input that cannot be used as an image: not an image, truncated, unreadable, or of the wrong shape."""


class ImageTooLargeError(InvalidImageError):
    """An image with more pixels than the configured limit (a possible decompression bomb).

    `pixels` is its number of pixels (None where PIL refused it before telling), `limit` the limit it broke.
    """

    def __init__(self, message: str, pixels: int | None, limit: int | None):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


def check_image_pixels(width: int, height: int, max_image_pixels: int | None, name: str = "the image") -> None:
    """Raises `ImageTooLargeError` when `width * height` exceeds `max_image_pixels` (`None`: no limit)."""
    if max_image_pixels is None:
        return
    pixels = int(width) * int(height)
    if pixels > max_image_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {pixels} pixels, over the limit of max_image_pixels={max_image_pixels} "
            "(a guard against decompression bombs). If the image is trusted, raise the limit: "
            "VisCPMChatImageProcessor(max_image_pixels=...) or processor(images, max_image_pixels=...), or "
            "load_image(source, max_image_pixels=...); pass None to disable the check.",
            pixels,
            max_image_pixels,
        )


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image data ({len(source)} bytes)"
    name = getattr(source, "name", None)
    if isinstance(name, (str, bytes)):
        return f"image file object {name!r}"
    return f"image input of type {type(source).__name__}"


_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _decode(fp: Any, name: str, max_image_pixels: int | None, close: bool = True) -> Image.Image:
    """Opens, size-checks, then decodes an encoded image from a path or binary file object.

    `close=False` leaves a caller's file object open (closing the PIL image would close it).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; our own limit (checked below) decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as err:
        # PIL's hard limit is 2 * PIL.Image.MAX_IMAGE_PIXELS, applied inside Image.open before we see the size.
        match = _PIL_BOMB_PIXELS.search(str(err))
        pixels = int(match.group(1)) if match else None
        if max_image_pixels is not None and (pixels is None or pixels > max_image_pixels):
            size = f"{pixels} pixels" if pixels is not None else "larger than PIL's limit"
            raise ImageTooLargeError(
                f"{name} is {size}, over the limit of max_image_pixels={max_image_pixels} (a guard against "
                "decompression bombs). If the image is trusted, raise the limit: "
                "VisCPMChatImageProcessor(max_image_pixels=...) or load_image(source, max_image_pixels=...), "
                f"and PIL's own hard limit too (PIL: {err}).",
                pixels,
                max_image_pixels,
            ) from err
        raise ImageTooLargeError(
            f"{name} is {pixels} pixels: within max_image_pixels={max_image_pixels}, but over PIL's own hard limit "
            f"of 2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * Image.MAX_IMAGE_PIXELS} pixels, which PIL enforces while "
            "opening the file. If the image is trusted, also raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None).",
            pixels,
            2 * Image.MAX_IMAGE_PIXELS,
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidImageError(
            f"{name} is not an image PIL can read (unknown format, or cut off inside its header). "
            "Pass a PNG, JPEG, WebP, BMP, GIF or TIFF file, its bytes, or a PIL image."
        ) from err
    except FileNotFoundError as err:
        raise InvalidImageError(f"{name} does not exist: check the path.") from err
    except IsADirectoryError as err:
        raise InvalidImageError(f"{name} is a directory, not an image file: pass the path of an image.") from err
    except PermissionError as err:
        raise InvalidImageError(f"{name} cannot be opened (permission denied): check its permissions.") from err
    except (OSError, SyntaxError, EOFError) as err:
        raise InvalidImageError(
            f"{name} is truncated or corrupt and cannot be decoded ({type(err).__name__}: {err}). "
            "Re-download or re-export the image."
        ) from err

    try:
        check_image_pixels(image.width, image.height, max_image_pixels, name)
        return _to_rgb(image, name, copy=True)
    finally:
        if close:
            image.close()


def _to_rgb(image: Image.Image, name: str, copy: bool) -> Image.Image:
    """Decodes (if lazy) and converts to RGB like the original's `.convert("RGB")` (alpha is dropped, not blended).

    `copy=True` always returns a new image (needed when `image` is closed afterwards).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"{name} has a frame or tile over PIL's hard pixel limit ({err}). If the image is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None).",
            None,
            2 * Image.MAX_IMAGE_PIXELS,
        ) from err
    except (OSError, SyntaxError, EOFError) as err:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", "broken data stream")
        # and a few plugins as SyntaxError / EOFError.
        raise InvalidImageError(
            f"{name} is truncated or corrupt and cannot be decoded ({type(err).__name__}: {err}). "
            "Re-download or re-export the image."
        ) from err
    except ValueError as err:
        raise InvalidImageError(f"{name} cannot be read ({err}); pass an image that is not closed.") from err
    if image.mode == "RGB" and not copy:
        return image
    try:
        with warnings.catch_warnings():
            # Informational, and what the original's `.convert("RGB")` would print too; the result is the same.
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            return image.convert("RGB")
    except ValueError as err:
        raise InvalidImageError(
            f"{name} has PIL mode {image.mode!r}, which cannot be converted to RGB ({err}). "
            "Convert it to an 8-bit RGB image first."
        ) from err


def load_image(source: ImageSource, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Loads an image as a decoded RGB PIL image, the input of the original transform.

    Args:
        source: a path (`str` or `os.PathLike`), the encoded file's bytes (`bytes`, `bytearray`, `memoryview`), a
            binary file object, or a PIL image. Grayscale, palette, RGBA and other modes are converted with
            `.convert("RGB")` like the original (alpha is dropped). EXIF orientation is not applied (nor was it by
            the original). URLs are not fetched: download the file and pass its bytes or path.
        max_image_pixels: the most pixels (width * height) an image may have, checked from the header before the
            pixels are decoded; `None` disables the check. PIL's own `DecompressionBombWarning` is superseded by
            this limit, and its `DecompressionBombError` becomes `ImageTooLargeError`.

    Raises:
        ImageTooLargeError: the image has more than `max_image_pixels` pixels.
        InvalidImageError: the source is missing, not an image, truncated or corrupt.
        TypeError: `source` is of none of the types above.
    """
    if max_image_pixels is not None and max_image_pixels <= 0:
        raise ValueError(f"max_image_pixels must be a positive number of pixels or None, got {max_image_pixels}")
    name = _describe(source)
    if isinstance(source, Image.Image):
        check_image_pixels(source.width, source.height, max_image_pixels, "the PIL image")
        return _to_rgb(source, "the PIL image", copy=False)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
            raise InvalidImageError(
                f"{path!r} is a URL; images are not downloaded here. Download it first and pass its path or bytes."
            )
        return _decode(path, name, max_image_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidImageError("the image data is empty (0 bytes): pass the bytes of an encoded image file.")
        return _decode(io.BytesIO(bytes(source)), name, max_image_pixels)
    if hasattr(source, "read"):
        return _decode(source, name, max_image_pixels, close=False)
    raise TypeError(
        f"cannot load an image from {type(source).__name__}: pass a path, bytes, a binary file object, a PIL image "
        "(or, to the image processor, a uint8 array or already-transformed float pixel_values)."
    )


def transform_image(
    image: Image.Image,
    size: tuple[int, int] = (VISCPM_CHAT_IMAGE_SIZE, VISCPM_CHAT_IMAGE_SIZE),
    resample: int = PILImageResampling.BICUBIC,
    do_resize: bool = True,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean: Sequence[float] = tuple(VISCPM_CHAT_IMAGE_MEAN),
    image_std: Sequence[float] = tuple(VISCPM_CHAT_IMAGE_STD),
) -> torch.Tensor:
    """The original eval transform on one RGB PIL image: a float32 `(3, height, width)` tensor.

    With the defaults this is `build_transform(is_train=False, input_size=size)` operation for operation:
    `Resize((h, w), BICUBIC)` = `image.resize((w, h), BICUBIC)` (no `reducing_gap`), `ToTensor` = `.div(255)` in
    float32, `Normalize` = `.sub(mean).div(std)` with per-channel float32 tensors.
    """
    if do_resize:
        height, width = size
        image = image.resize((width, height), resample=PILImageResampling(resample))
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32)
    if do_rescale:
        # ToTensor divides by 255; `x * (1 / 255)` differs from `x / 255` in the last bit for some values.
        divisor = 1 / rescale_factor
        pixels = pixels.div(divisor) if divisor == round(divisor) else pixels.mul(rescale_factor)
    if do_normalize:
        mean = torch.as_tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
        pixels = pixels.sub(mean).div(std)
    return pixels


def check_pixel_values(pixel_values: Any, size: tuple[int, int]) -> torch.Tensor:
    """Checks already-transformed `pixel_values` of one image, `(3, height, width)` float, against `size`.

    Returns them as a float32 tensor. Raises `InvalidImageError` naming the shape found, the one expected and the fix.
    """
    tensor = torch.as_tensor(pixel_values)
    height, width = size
    if tuple(tensor.shape) != (3, height, width):
        raise InvalidImageError(
            f"got already-transformed pixel_values (a floating-point array) of shape {tuple(tensor.shape)}, but this "
            f"processor makes (3, {height}, {width}) (size={{'height': {height}, 'width': {width}}}). Pass the "
            "original image instead (a path, bytes, PIL image or uint8 array) so that it is resized, or use a "
            "processor whose size matches the pixel_values. Raw images given as arrays must be uint8 (0-255)."
        )
    return tensor.to(torch.float32)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """A uint8 image array, `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1, 3, 4, as a PIL image."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidImageError(
            f"a uint8 image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {array.shape}."
        )
    return Image.fromarray(np.ascontiguousarray(array))


class VisCPMChatImageProcessorKwargs(ImagesKwargs, total=False):
    """
    max_image_pixels (`int`, *optional*, defaults to `DEFAULT_MAX_IMAGE_PIXELS`, PIL's default limit):
        The most pixels (width * height) an input image may have; checked before decoding. `None` disables it.
    """

    max_image_pixels: int | None


class VisCPMChatImageProcessor(PilBackend):
    r"""
    Image processor of VisCPM-Chat: resize to `size` with PIL bicubic (aspect ratio not kept), scale to [0, 1],
    normalize with mean = std = 0.5, exactly like the original `build_transform(is_train=False)`.

    Args (all optional, defaults are the released VisCPM-Chat's):
        size (`int` or `dict`, defaults to `{"height": 224, "width": 224}`): output height and width; an int means a
            square.
        resample (`PILImageResampling`, defaults to `BICUBIC`): PIL filter of the resize.
        do_resize / do_rescale / do_normalize (`bool`, default `True`): the three steps of the transform.
        rescale_factor (`float`, defaults to `1/255`).
        image_mean / image_std (`list[float]`, default `[0.5, 0.5, 0.5]`).
        max_image_pixels (`int` or `None`, defaults to `DEFAULT_MAX_IMAGE_PIXELS`): decompression-bomb guard.

    Call it on one image or a list of images, each a path, bytes, binary file object, PIL image, uint8 array
    (`(H, W)`, `(H, W, C)` or `(C, H, W)`) or already-transformed float `pixel_values` `(3, h, w)` (a float array or
    tensor of 4 dimensions is a batch of those). Returns a `BatchFeature` with `pixel_values`: a `(batch, 3, h, w)`
    tensor for `return_tensors="pt"` (array for `"np"`), else a list of float32 `(3, h, w)` arrays.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = VISCPM_CHAT_IMAGE_MEAN
    image_std = VISCPM_CHAT_IMAGE_STD
    size = {"height": VISCPM_CHAT_IMAGE_SIZE, "width": VISCPM_CHAT_IMAGE_SIZE}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    valid_kwargs = VisCPMChatImageProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Unpack[VisCPMChatImageProcessorKwargs]):
        # `max_image_pixels=None` (no limit) survives: the mixin sets it before `_set_attributes` looks for defaults.
        super().__init__(**kwargs)
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be a positive number or None, got {self.max_image_pixels}")

    def preprocess(self, images: Any, **kwargs: Unpack[VisCPMChatImageProcessorKwargs]) -> BatchFeature:
        """Transforms one image or a list of images (see the class docstring) into `pixel_values`."""
        return super().preprocess(images, **kwargs)

    def load_image(self, source: ImageSource, max_image_pixels: int | None = None) -> Image.Image:
        """`load_image` with this processor's pixel limit (unless `max_image_pixels` is given)."""
        limit = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        return load_image(source, max_image_pixels=limit)

    def _preprocess_image_like_inputs(self, images: Any, *args, **kwargs) -> BatchFeature:
        # Our inputs include paths, bytes and file objects, which transformers' input flattening rejects.
        return self._preprocess(_flatten_images(images), *args, **kwargs)

    def _preprocess(
        self,
        images: list[Any],
        do_resize: bool,
        size: SizeDict,
        resample: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        return_tensors: str | None = None,
        do_convert_rgb: bool | None = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        do_center_crop: bool | None = None,
        do_pad: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_convert_rgb is False:
            raise ValueError("do_convert_rgb=False is not supported: VisCPM-Chat's vision encoder takes RGB images.")
        if do_center_crop or do_pad:
            raise ValueError("VisCPM-Chat's transform has no center crop or padding: leave do_center_crop/do_pad off.")
        if max_image_pixels is not None and max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be a positive number or None, got {max_image_pixels}")
        if not images:
            raise InvalidImageError("no images were given: pass an image or a non-empty list of images.")
        target = (size.height, size.width)
        if not (target[0] and target[1]):
            raise ValueError(f"size must give 'height' and 'width' (the original resizes to a square), got {size}")

        pixel_values = []
        for image in images:
            if _is_float_array(image):
                pixel_values.append(check_pixel_values(image, target))
                continue
            if isinstance(image, (np.ndarray, torch.Tensor)):
                array = image.numpy(force=True) if isinstance(image, torch.Tensor) else image
                if array.dtype != np.uint8:
                    raise InvalidImageError(
                        f"image arrays must be uint8 (0-255) raw images or floating-point already-transformed "
                        f"pixel_values; got dtype {array.dtype}. Convert with .astype(np.uint8) or pass a PIL image."
                    )
                image = _array_to_pil(array)
            image = load_image(image, max_image_pixels=max_image_pixels)
            pixel_values.append(
                transform_image(
                    image,
                    size=target,
                    resample=resample,
                    do_resize=do_resize,
                    do_rescale=do_rescale,
                    rescale_factor=rescale_factor,
                    do_normalize=do_normalize,
                    image_mean=image_mean,
                    image_std=image_std,
                )
            )

        if return_tensors is None:
            return BatchFeature(data={"pixel_values": [p.numpy() for p in pixel_values]})
        shapes = {tuple(p.shape) for p in pixel_values}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack images of different shapes {sorted(shapes)} into one tensor (do_resize=False?): "
                "keep do_resize=True or leave return_tensors unset to get a list."
            )
        stacked = torch.stack(pixel_values)
        return BatchFeature(data={"pixel_values": stacked}, tensor_type=return_tensors)


def _is_float_array(image: Any) -> bool:
    if isinstance(image, torch.Tensor):
        return image.is_floating_point()
    return isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)


def _flatten_images(images: Any) -> list[Any]:
    """One image, a (nested) list of images, or a 4-D array/tensor (a batch) as a flat list of single images."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLargeError",
    "InvalidImageError",
    "VisCPMChatImageProcessor",
    "check_image_pixels",
    "check_pixel_values",
    "load_image",
    "transform_image",
]
