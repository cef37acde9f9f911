"""Three tasks tiny-shapes never saw, for the fine-tuning chapter ("Teach it something new").

    relation  answer en what is left of the circle?                -> a blue square   (or: nothing)
    star      answer en what color is the star?                    -> red  (a kind pretraining never drew)
    pairs     answer en how many shapes are there in both images?  [two images] -> 4

`write_task(task, folder, count, seed)` writes a JSONL file and its images in the layout `paligemma finetune` reads.
Every example is drawn from its seed alone, so training and held-out sets made with different seeds never overlap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import ImageDraw

from . import shapes

TASKS = ("relation", "star", "pairs")
PAIRS_PROMPT = "answer en how many shapes are there in both images?"


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
    """One star (a kind pretraining never drew) and up to two other shapes, no other of the star's colour."""
    while True:
        image = shapes._background(rng, size)
        draw = ImageDraw.Draw(image)
        placed: list[shapes.Shape] = []
        for kind in ["star"] + [rng.choice(shapes.KINDS) for _ in range(rng.randint(0, 2))]:
            box = shapes._place(rng, size, [s.box for s in placed])
            if box is None:
                break
            taken = {s.color for s in placed}
            color = rng.choice([c for c in shapes.COLORS if c not in taken])
            shapes._draw_shape(draw, kind, box, shapes.COLORS[color])
            placed.append(shapes.Shape(kind, color, box))
        if placed:
            return shapes.Scene(image, placed)


def star_example(rng: random.Random, size: int) -> tuple[list[shapes.Scene], str, str]:
    """The colour of the scene's star: to answer, the model must tell a star from the shapes it knows."""
    scene = star_scene(rng, size)
    return [scene], "answer en what color is the star?", scene.shapes[0].color


def pairs_example(rng: random.Random, size: int) -> tuple[list[shapes.Scene], str, str]:
    """Two scenes and the number of shapes in both together (2 to 6): counting across a prompt's images."""
    first, second = shapes.make_scene(rng, size), shapes.make_scene(rng, size)
    return [first, second], PAIRS_PROMPT, str(len(first.shapes) + len(second.shapes))


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
