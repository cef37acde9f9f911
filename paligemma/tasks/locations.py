"""Boxes as PaliGemma writes them: four `<locNNNN>` tokens, y_min x_min y_max x_max, in 1024 bins of the image.

    "<loc0102><loc0256><loc0512><loc0700> circle ; <loc0010><loc0020><loc0300><loc0400> square"

A bin b stands for the coordinate b / 1024 of the image's height (y) or width (x). The model sees a square,
resized image, but since the bins are fractions of each side, the same tokens give a box in the original
image of any size and aspect ratio: x = b / 1024 * width, y = b / 1024 * height.

Answers to `segment …` prompts put 16 `<segNNN>` tokens (codes 0–127 of a VQ-VAE, see `paligemma.tasks.segmentation`)
between the box and the label:

    "<loc0102><loc0256><loc0512><loc0700><seg063><seg012>…(16 in all) cat"
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field

from ..errors import PaliGemmaError

BINS = 1024
SEG_CODES = 128  # <seg000> … <seg127>
SEG_TOKENS = 16  # per object: a 4 x 4 grid of codes

_LOC = re.compile(r"<loc(\d{4})>")
_SEG = re.compile(r"<seg(\d{3})>")
_OBJECT = re.compile(r"^((?:<loc\d{4}>){4})((?:\s*<seg\d{3}>)*)\s*(.*?)\s*$", re.S)


@dataclass(frozen=True)
class DetectedObject:
    """A labelled box in pixels: (x_min, y_min, x_max, y_max) of the original image.

    `seg_codes` holds the 16 segmentation codes of a `segment` answer (None for a detection).
    """

    label: str
    box: tuple[float, float, float, float]
    seg_codes: tuple[int, ...] | None = field(default=None)


def _check_extent(width: float, height: float) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise PaliGemmaError(f"image {name} must be a positive number, got {value!r}")


def to_bin(value: float, extent: float) -> int:
    """A pixel coordinate -> its bin in [0, 1023]."""
    return min(BINS - 1, max(0, int(round(value / extent * BINS))))


def box_to_bins(box: tuple[float, float, float, float], width: float, height: float) -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max) in pixels -> (y_min, x_min, y_max, x_max) bins, PaliGemma's order."""
    x_min, y_min, x_max, y_max = box
    return to_bin(y_min, height), to_bin(x_min, width), to_bin(y_max, height), to_bin(x_max, width)


def bins_to_box(bins: tuple[int, int, int, int], width: float, height: float) -> tuple[float, float, float, float]:
    """(y_min, x_min, y_max, x_max) bins -> (x_min, y_min, x_max, y_max) in pixels of a width x height image."""
    y_min, x_min, y_max, x_max = bins
    return x_min / BINS * width, y_min / BINS * height, x_max / BINS * width, y_max / BINS * height


def encode_box(box: tuple[float, float, float, float], width: float, height: float) -> str:
    """(x_min, y_min, x_max, y_max) in pixels -> the four location tokens, in PaliGemma's y-first order."""
    _check_extent(width, height)
    return "".join(f"<loc{b:04d}>" for b in box_to_bins(box, width, height))


def encode_objects(objects: list[DetectedObject], width: float, height: float) -> str:
    """Several objects, each "<loc…>×4 label" (with its <seg…>×16 before the label if it has codes), joined by " ; "."""
    parts = []
    for obj in objects:
        codes = ""
        if obj.seg_codes is not None:
            _check_codes(obj.seg_codes, repr(obj.label))
            codes = "".join(f"<seg{c:03d}>" for c in obj.seg_codes)
        parts.append(f"{encode_box(obj.box, width, height)}{codes} {obj.label}")
    return " ; ".join(parts)


def _check_codes(codes: tuple[int, ...], where: str) -> None:
    if len(codes) != SEG_TOKENS:
        raise PaliGemmaError(f"a mask is {SEG_TOKENS} <segNNN> tokens, found {len(codes)} in {where}")
    if not all(0 <= c < SEG_CODES for c in codes):
        raise PaliGemmaError(f"segmentation code out of range 0-{SEG_CODES - 1} in {where}")


def _parse_object(part: str, width: float, height: float) -> DetectedObject:
    """One "<loc…>×4 [<seg…>×16] label" -> a DetectedObject, or PaliGemmaError saying what is wrong."""
    shown = repr(part if len(part) <= 120 else part[:117] + "...")
    match = _OBJECT.match(part)
    if match is None:
        raise PaliGemmaError(f"not a detection (four <locNNNN> tokens and a label): {shown}")
    bins = tuple(int(b) for b in _LOC.findall(match.group(1)))
    if max(bins) >= BINS:
        raise PaliGemmaError(f"location bin out of range 0-{BINS - 1}: {shown}")
    codes = None
    if match.group(2):
        codes = tuple(int(c) for c in _SEG.findall(match.group(2)))
        _check_codes(codes, shown)
    label = match.group(3)
    if "<loc" in label or "<seg" in label:
        raise PaliGemmaError(f"not a detection: its label holds more location or segmentation tokens "
                             f"(objects are separated by ' ; '): {shown}")
    return DetectedObject(label, bins_to_box(bins, width, height), codes)


def parse_locations(text: str, width: float, height: float, strict: bool = True) -> list[DetectedObject]:
    """Generated text -> labelled boxes in pixels of the original width x height image.

    Objects are separated by ";". With `strict` (the default), text that is not of that form raises a
    PaliGemmaError naming the offending part; with strict=False such parts are skipped, so that a model's
    half-right answer still yields the objects it got right. Empty text means no objects. The label may be
    empty and the corners out of order (a model's mistake, not a format error): check the box if that matters.
    """
    if not isinstance(text, str):
        raise PaliGemmaError(f"expected generated text (a str), got {type(text).__name__}")
    _check_extent(width, height)
    objects = []
    if not text.strip():
        return objects
    for part in text.split(";"):
        part = part.strip()
        try:
            if not part:
                raise PaliGemmaError(f"empty object between ';' separators in {text.strip()[:120]!r}")
            objects.append(_parse_object(part, width, height))
        except PaliGemmaError:
            if strict:
                raise
    return objects


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x_min, y_min, x_max, y_max) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0
