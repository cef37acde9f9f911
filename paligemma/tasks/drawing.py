"""Drawing what PaliGemma found: labelled boxes, and masks, on the original image.

    from paligemma.tasks.locations import parse_locations
    from paligemma.tasks.drawing import draw_objects
    objects = parse_locations(answer, image.width, image.height)
    draw_objects(image, objects).show()
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import PaliGemmaError
from ..io.images import ImageInput, load_image, to_rgb
from .locations import DetectedObject

# Distinct, saturated colours, one per label in order of first appearance.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128)]


def label_colors(objects: Sequence[DetectedObject]) -> dict[str, tuple[int, int, int]]:
    """One palette colour per distinct label, in order of first appearance."""
    colors: dict[str, tuple[int, int, int]] = {}
    for obj in objects:
        colors.setdefault(obj.label, PALETTE[len(colors) % len(PALETTE)])
    return colors


def draw_objects(
    image: ImageInput,
    objects: Sequence[DetectedObject],
    masks: Sequence[np.ndarray | None] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
    mask_opacity: float = 0.45,
) -> Image.Image:
    """A copy of the image with each object's box and label drawn, and its mask (boolean [H, W]) tinted in.

    Boxes whose corners come out of order are drawn between their smaller and larger coordinates; line
    width and font size scale with the image unless given.
    """
    base = to_rgb(load_image(image)).copy()
    width, height = base.size
    if masks is not None and len(masks) != len(objects):
        raise PaliGemmaError(f"got {len(masks)} masks for {len(objects)} objects")
    colors = label_colors(objects)
    if masks is not None:
        tinted = np.asarray(base, dtype=np.float32)
        for obj, mask in zip(objects, masks):
            if mask is None:
                continue
            mask = np.asarray(mask)
            if mask.shape != (height, width):
                raise PaliGemmaError(f"mask of shape {list(mask.shape)} for an image of {height} x {width} pixels")
            alpha = mask_opacity * mask.astype(np.float32)[..., None]  # [H, W, 1]
            tinted = tinted * (1 - alpha) + np.array(colors[obj.label], dtype=np.float32) * alpha
        base = Image.fromarray(np.clip(np.round(tinted), 0, 255).astype(np.uint8))
    line_width = line_width or max(1, round(min(width, height) / 150))
    font = ImageFont.load_default(size=font_size or max(10, min(width, height) // 28))
    draw = ImageDraw.Draw(base)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        color = colors[obj.label]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line_width)
        if obj.label:
            left, top, right, bottom = draw.textbbox((0, 0), obj.label, font=font)
            text_w, text_h = right - left, bottom - top
            pad = max(1, line_width)
            y_text = y0 - text_h - 2 * pad if y0 - text_h - 2 * pad >= 0 else y0  # above the box, or inside it
            draw.rectangle((x0, y_text, x0 + text_w + 2 * pad, y_text + text_h + 2 * pad), fill=color)
            draw.text((x0 + pad - left, y_text + pad - top), obj.label, fill=(255, 255, 255), font=font)
    return base
