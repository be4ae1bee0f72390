"""Conversion of the image types users pass (PIL in any mode, arrays, tensors, file paths) to RGB PIL images."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


def _array_to_pil(array: np.ndarray, source: str) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"The {source} image must have shape (height, width), (height, width, channels) or (channels, height, "
            f"width) with 1, 3 or 4 channels; got shape {tuple(array.shape)}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"The {source} image contains NaN or infinite values.")
    array = array.astype(np.float32)
    # Floating-point images in [0, 1] are scaled; anything with a larger maximum is read as [0, 255].
    if array.max() <= 1.0 and array.min() >= 0.0:
        array = array * 255.0
    elif array.min() < 0.0 or array.max() > 255.0:
        raise ValueError(
            f"The {source} image must hold values in [0, 1] or [0, 255]; got the range [{array.min()}, {array.max()}]."
        )
    array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return _pil_to_rgb(PIL.Image.fromarray(array))


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit greyscale: scale the used range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, not black.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb_image(image, source: str = "input") -> PIL.Image.Image:
    """Return `image` (PIL image, file path, numpy array or torch tensor) as an upright RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The {source} image file {path!r} does not exist.")
        with PIL.Image.open(path) as opened:
            opened.load()
            return _pil_to_rgb(opened)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        return _array_to_pil(tensor.float().numpy(), source)
    if isinstance(image, np.ndarray):
        array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        return _array_to_pil(array, source)
    raise TypeError(
        f"The {source} image must be a PIL image, a file path, a numpy array or a torch tensor; got {type(image).__name__}."
    )


def size_keeping_aspect_ratio(width: int, height: int, max_area: int, multiple: int) -> tuple[int, int]:
    """Return (height, width) with the aspect ratio of `width` x `height`, sides multiples of `multiple`."""
    area = min(width * height, max_area)
    aspect_ratio = width / height
    new_width = max(multiple, int(round((area * aspect_ratio) ** 0.5 / multiple)) * multiple)
    new_height = max(multiple, int(round((area / aspect_ratio) ** 0.5 / multiple)) * multiple)
    return new_height, new_width
