"""Images in: any PIL image, path or array -> RGB -> the pixels SigLIP was trained on.

RGB, bicubic resize to the model's square size, [0, 255] -> [0, 1] -> [-1, 1] (mean 0.5, std 0.5), channels first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import PaliGemmaError

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]


def load_image(source: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, a file path or a uint8 array [H, W] or [H, W, C]."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        try:
            return Image.fromarray(source)
        except (TypeError, ValueError) as error:
            raise PaliGemmaError(f"cannot make an image of an array of shape {source.shape} and dtype {source.dtype}: {error}") from None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise PaliGemmaError(f"image file not found: {path}")
        try:
            image = Image.open(path)
            image.load()  # decode now, so a truncated file fails here and not later
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise PaliGemmaError(f"{path} is not a readable image: {error}") from None
        return image
    raise PaliGemmaError(f"expected a PIL image, a path or an array, got {type(source).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited onto white; 16-bit and float images are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # floats in [0, 1] or [0, 255]
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        eight_bit = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: ImageInput, size: int) -> torch.Tensor:
    """One image -> pixel values [3, size, size] in [-1, 1], as SigLIP was trained on."""
    rgb = to_rgb(load_image(image))
    if rgb.width == 0 or rgb.height == 0:
        raise PaliGemmaError(f"image has no pixels: {rgb.width}x{rgb.height}")
    resized = rgb.resize((size, size), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3] in [0, 1]
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)  # mean 0.5, std 0.5 -> [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
