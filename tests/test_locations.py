"""Location tokens: round trips for images of any size and aspect ratio, malformed text, drawing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from paligemma import PaliGemmaError
from paligemma.tasks.drawing import PALETTE, draw_objects
from paligemma.tasks.locations import (
    BINS,
    DetectedObject,
    bins_to_box,
    box_iou,
    box_to_bins,
    encode_objects,
    parse_locations,
)

SIZES = [(224, 224), (640, 480), (480, 640), (1920, 1080), (37, 1000), (4000, 3), (1, 1), (257, 129)]


@pytest.mark.parametrize("width, height", SIZES)
def test_every_bin_survives_text_to_box_to_text(width, height):
    """Parsing then encoding gives back the very same tokens, for all 1024 bins, at any aspect ratio."""
    rng = random.Random(width * 7919 + height)
    for start in range(0, BINS, 4):
        bins = tuple((start + i) % BINS for i in range(4))
        text = "".join(f"<loc{b:04d}>" for b in bins) + " thing"
        (obj,) = parse_locations(text, width, height)
        assert box_to_bins(obj.box, width, height) == bins
        assert encode_objects([obj], width, height) == text
    objects = [DetectedObject(f"object {i}", bins_to_box(tuple(rng.randrange(BINS) for _ in range(4)), width, height))
               for i in range(5)]
    text = encode_objects(objects, width, height)
    assert text.count(" ; ") == 4
    assert parse_locations(text, width, height) == objects


@pytest.mark.parametrize("width, height", SIZES)
def test_pixel_boxes_survive_box_to_text_to_box(width, height):
    """A box in pixels comes back within half a bin of each side (a whole bin at the far edge, bin 1023)."""
    rng = random.Random(width + height)
    for _ in range(300):
        x0, x1 = sorted(rng.uniform(0, width) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, height) for _ in range(2))
        (parsed,) = parse_locations(encode_objects([DetectedObject("cat", (x0, y0, x1, y1))], width, height),
                                    width, height)
        for got, want, extent in zip(parsed.box, (x0, y0, x1, y1), (width, height, width, height)):
            tolerance = extent / BINS if want > extent * (BINS - 0.5) / BINS else extent / (2 * BINS)
            assert abs(got - want) <= tolerance + 1e-9


def test_known_box_on_a_landscape_image():
    """y first: <loc0256> is a quarter of the height, <loc0512> half the width, in the original 640 x 480 image."""
    (obj,) = parse_locations("<loc0256><loc0512><loc0768><loc1023> red car", 640, 480)
    assert obj.label == "red car"
    assert obj.box == (320.0, 120.0, 1023 / 1024 * 640, 360.0)
    assert obj.seg_codes is None


def test_segmentation_answers_keep_their_codes():
    codes = tuple(range(0, 128, 8))
    text = "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat ; " \
           "<loc0000><loc0000><loc1023><loc1023> dog"
    cat, dog = parse_locations(text, 1024, 512)
    assert cat.seg_codes == codes and cat.label == "cat" and cat.box == (200.0, 50.0, 400.0, 150.0)
    assert dog.seg_codes is None
    assert encode_objects([cat, dog], 1024, 512) == text


def test_old_api_still_works():
    """shapes.py builds DetectedObject(label, box) positionally and compares boxes and labels."""
    obj = DetectedObject("square", (10.0, 20.0, 30.0, 40.0))
    assert parse_locations(encode_objects([obj], 112, 112), 112, 112)[0].label == "square"
    assert parse_locations("", 10, 10) == [] and parse_locations("  \n", 10, 10) == []
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


MALFORMED = [
    ("<loc0001><loc0002> cat", "not a detection"),                                  # cut off by max_new_tokens
    ("a cat", "not a detection"),                                                   # no boxes at all
    ("<loc0001><loc0002><loc0003><locXXXX> cat", "not a detection"),
    ("<loc12><loc0002><loc0003><loc0004> cat", "not a detection"),                  # three digits
    ("<loc0001><loc0002><loc0003><loc1024> cat", "out of range 0-1023"),
    ("<loc0001><loc0002><loc0003><loc9999> cat", "out of range 0-1023"),
    ("<loc0001><loc0002><loc0003><loc0004><seg001><seg002> cat", "16 <segNNN> tokens, found 2"),
    ("<loc0001><loc0002><loc0003><loc0004>" + "<seg128>" * 16 + " cat", "segmentation code out of range"),
    ("<loc0001><loc0002><loc0003><loc0004> cat <loc0005><loc0006><loc0007><loc0008> dog", "separated by ' ; '"),
    ("<loc0001><loc0002><loc0003><loc0004> cat <seg001>", "separated by ' ; '"),
    ("<loc0001><loc0002><loc0003><loc0004> cat ; ; <loc0001><loc0002><loc0003><loc0004> dog", "empty object"),
    ("<loc0001><loc0002><loc0003><loc0004> cat ;", "empty object"),
    ("; <loc0001><loc0002><loc0003><loc0004> cat", "empty object"),
    ("caption: <loc0001><loc0002><loc0003><loc0004> cat", "not a detection"),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_malformed_text_is_one_clear_error(text, message):
    with pytest.raises(PaliGemmaError, match=message) as error:
        parse_locations(text, 640, 480)
    assert "\n" not in str(error.value)


def test_lenient_parsing_keeps_the_good_objects():
    text = "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0001><loc0002> dog ; ; <loc0512><loc0512><loc1023><loc1023> cow"
    assert [o.label for o in parse_locations(text, 100, 100, strict=False)] == ["cat", "cow"]
    assert parse_locations("not a detection at all", 100, 100, strict=False) == []


@pytest.mark.parametrize("args, message", [
    ((None, 10, 10), "expected generated text"),
    ((b"<loc0001>", 10, 10), "expected generated text"),
    (("", 0, 10), "width must be a positive"),
    (("", 10, -3), "height must be a positive"),
    (("", 10, float("nan")), "height must be a positive"),
    (("", True, 10), "width must be a positive"),
])
def test_bad_arguments(args, message):
    with pytest.raises(PaliGemmaError, match=message):
        parse_locations(*args)


def test_random_text_never_crashes():
    """Strings made of the pieces a model emits: a PaliGemmaError at worst, never another exception."""
    pieces = ["<loc0000>", "<loc1023>", "<loc0512>", "<loc2000>", "<loc12>", "<seg000>", "<seg127>", "<seg200>",
              " ; ", ";", " ", "cat", "red car", "<", ">", "<loc", "seg>", "\n", "é", "<eos>", "0123"]
    rng = random.Random(0)
    parsed = failed = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.3:
            text = "".join(rng.choice(pieces[:3]) for _ in range(4)) + " cat" + text
        try:
            objects = parse_locations(text, 300, 200)
            parsed += 1
            assert all(isinstance(o, DetectedObject) for o in objects)
        except PaliGemmaError as error:
            failed += 1
            assert "\n" not in str(error)
        assert all(isinstance(o, DetectedObject) for o in parse_locations(text, 300, 200, strict=False))
    assert parsed > 100 and failed > 100


def test_draw_objects():
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    objects = parse_locations("<loc0256><loc0256><loc0768><loc0768> cat ; <loc0900><loc0100><loc0100><loc0200> dog",
                              200, 100)
    drawn = draw_objects(image, objects, line_width=2)
    pixels = np.asarray(drawn)
    assert drawn.size == image.size and np.asarray(image).mean() == 128  # a copy; the original is untouched
    assert tuple(pixels[75, 100]) == PALETTE[0]  # the bottom edge of the first box, in the first colour
    assert tuple(pixels[50, 100]) == (128, 128, 128)  # inside the box, without a mask, nothing changes
    assert (pixels == PALETTE[1]).all(-1).any()  # the second label (corners out of order) is drawn too
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 90:110] = True
    tinted = np.asarray(draw_objects(image, objects, masks=[mask, None], mask_opacity=0.5))
    assert tuple(tinted[50, 100]) == tuple(round(0.5 * 128 + 0.5 * c) for c in PALETTE[0])
    assert tuple(tinted[90, 10]) == (128, 128, 128)
    assert draw_objects(image, []).tobytes() == image.tobytes()
    with pytest.raises(PaliGemmaError, match="2 masks for 1 objects"):
        draw_objects(image, objects[:1], masks=[mask, mask])
    with pytest.raises(PaliGemmaError, match="mask of shape"):
        draw_objects(image, objects[:1], masks=[np.zeros((10, 10), bool)])
