"""Three tasks tiny-shapes never saw, for the fine-tuning chapter ("Teach it something new").

    relation  answer en what is left of the circle?                -> a blue square   (or: nothing)
    star      detect star                                          -> <loc…><loc…><loc…><loc…> star  (a new kind)
    pairs     answer en do both images hold the same number of shapes?  [two images] -> yes / no

`write_task(task, folder, count, seed)` writes a JSONL file and its images in the layout `paligemma finetune` reads.
Every example is drawn from its seed alone, so training and held-out sets made with different seeds never overlap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import ImageDraw

from ..tasks.locations import DetectedObject, encode_objects
from . import shapes

TASKS = ("relation", "star", "pairs")
PAIRS_PROMPT = "answer en do both images hold the same number of shapes?"


def _centre_x(shape: shapes.Shape) -> int:
    return shape.box[0] + shape.box[2]


def relation_example(rng: random.Random, size: int) -> tuple[list[shapes.Scene], str, str]:
    """Asked of a shape whose kind is there once: the nearest shape to its left, by centres, or "nothing"."""
    while True:
        scene = shapes.make_scene(rng, size)
        single = [s for s in scene.shapes if [t.kind for t in scene.shapes].count(s.kind) == 1]
        if len(scene.shapes) >= 2 and single:
            break
    subject = rng.choice(single)
    left = [s for s in scene.shapes if _centre_x(s) < _centre_x(subject)]
    nearest = max(left, key=_centre_x) if left else None
    answer = f"a {nearest.color} {nearest.kind}" if nearest else "nothing"  # in the captions' words
    return [scene], f"answer en what is left of the {subject.kind}?", answer


def star_scene(rng: random.Random, size: int) -> shapes.Scene:
    """One to three shapes, at least one a star (a kind pretraining never drew), on the usual backgrounds."""
    image = shapes._background(rng, size)
    draw = ImageDraw.Draw(image)
    placed: list[shapes.Shape] = []
    count = rng.randint(1, 3)
    star_at = rng.randrange(count)
    for i in range(count):
        box = shapes._place(rng, size, [s.box for s in placed])
        if box is None:
            break
        kind = "star" if i == star_at else rng.choice((*shapes.KINDS, "star"))
        color = rng.choice(list(shapes.COLORS))
        shapes._draw_shape(draw, kind, box, shapes.COLORS[color])
        placed.append(shapes.Shape(kind, color, box))
    if not any(s.kind == "star" for s in placed):  # the star found no room: draw the scene again
        return star_scene(rng, size)
    return shapes.Scene(image, placed)


def drawn_box(shape: shapes.Shape) -> tuple[float, float, float, float]:
    """The extent of the drawn pixels, x_min, y_min, x_max, y_max (a star does not fill its square)."""
    x0, y0, x1, y1 = shape.box
    if shape.kind != "star":
        return float(x0), float(y0), float(x1 + 1), float(y1 + 1)
    corners = shapes.star_points(((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2)
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs) + 1, max(ys) + 1


def star_example(rng: random.Random, size: int) -> tuple[list[shapes.Scene], str, str]:
    scene = star_scene(rng, size)
    stars = sorted((s for s in scene.shapes if s.kind == "star"), key=lambda s: (s.box[1], s.box[0]))
    answer = encode_objects([DetectedObject("star", drawn_box(s)) for s in stars], size, size)
    return [scene], "detect star", answer


def pairs_example(rng: random.Random, size: int) -> tuple[list[shapes.Scene], str, str]:
    """Two scenes; half the time with the same number of shapes."""
    first = shapes.make_scene(rng, size)
    same = rng.random() < 0.5
    while True:
        second = shapes.make_scene(rng, size)
        if (len(second.shapes) == len(first.shapes)) == same:
            return [first, second], PAIRS_PROMPT, "yes" if same else "no"


MAKERS = {"relation": relation_example, "star": star_example, "pairs": pairs_example}


def write_task(task: str, folder: str | Path, count: int, seed: int, size: int = 112, name: str | None = None) -> Path:
    """`count` examples of `task` as `folder/NAME.jsonl` with PNG images in `folder/images/`; returns the file."""
    folder = Path(folder)
    name = name or f"{task}_{count}_{seed}"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        scenes, prompt, answer = MAKERS[task](rng, size)
        files = []
        for j, scene in enumerate(scenes):
            files.append(f"images/{name}_{i:05d}_{j}.png")
            scene.image.save(folder / files[-1])
        images = {"image": files[0]} if len(files) == 1 else {"images": files}
        lines.append(json.dumps({**images, "prefix": prompt, "suffix": answer}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
