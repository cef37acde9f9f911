"""Boxes as PaliGemma writes them: four `<locNNNN>` tokens, y_min x_min y_max x_max, in 1024 bins of the image.

    "<loc0102><loc0256><loc0512><loc0700> circle ; <loc0010><loc0020><loc0300><loc0400> square"

A bin b stands for the coordinate b / 1024 of the image's height (y) or width (x).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PaliGemmaError

BINS = 1024
_OBJECT = re.compile(r"^\s*((?:<loc\d{4}>){4})\s*(.*?)\s*$")
_LOC = re.compile(r"<loc(\d{4})>")


@dataclass(frozen=True)
class DetectedObject:
    """A labelled box in pixels: (x_min, y_min, x_max, y_max) of the original image."""

    label: str
    box: tuple[float, float, float, float]


def to_bin(value: float, extent: float) -> int:
    """A pixel coordinate -> its bin in [0, 1023]."""
    return min(BINS - 1, max(0, int(round(value / extent * BINS))))


def encode_box(box: tuple[float, float, float, float], width: float, height: float) -> str:
    """(x_min, y_min, x_max, y_max) in pixels -> the four location tokens, in PaliGemma's y-first order."""
    x_min, y_min, x_max, y_max = box
    bins = (to_bin(y_min, height), to_bin(x_min, width), to_bin(y_max, height), to_bin(x_max, width))
    return "".join(f"<loc{b:04d}>" for b in bins)


def encode_objects(objects: list[DetectedObject], width: float, height: float) -> str:
    """Several objects, each "<loc…>×4 label", joined by " ; "."""
    return " ; ".join(f"{encode_box(o.box, width, height)} {o.label}" for o in objects)


def parse_locations(text: str, width: float, height: float) -> list[DetectedObject]:
    """Generated text -> labelled boxes in pixels. Raises PaliGemmaError on text that is not of that form."""
    objects = []
    if not text.strip():
        return objects
    for part in text.split(";"):
        match = _OBJECT.match(part)
        if match is None:
            raise PaliGemmaError(f"not a detection (four <locNNNN> tokens and a label): {part.strip()!r}")
        y_min, x_min, y_max, x_max = (int(b) for b in _LOC.findall(match.group(1)))
        if max(y_min, x_min, y_max, x_max) >= BINS:
            raise PaliGemmaError(f"location bin out of range 0-{BINS - 1}: {part.strip()!r}")
        box = (x_min / BINS * width, y_min / BINS * height, x_max / BINS * width, y_max / BINS * height)
        objects.append(DetectedObject(match.group(2), box))
    return objects


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x_min, y_min, x_max, y_max) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0
