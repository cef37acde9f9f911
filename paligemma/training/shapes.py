"""A synthetic world of coloured shapes, with tasks in PaliGemma's own prompt conventions.

Each scene holds one to three shapes (circle, square, triangle) in five colours, of varied size and
position, on a varied background. From a scene come four kinds of examples:

    caption en                          -> a red circle and a blue square      (shapes left to right)
    answer en what color is the circle? -> red                                 (asked of a shape that is there once)
    answer en how many shapes are there? -> 2
    detect triangle                     -> <loc…><loc…><loc…><loc…> triangle  (several joined by " ; ")

Everything is deterministic given a seed, so a training stream and a held-out set never overlap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..tasks.locations import DetectedObject, box_iou, encode_objects, parse_locations

COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 175),
}
KINDS = ("circle", "square", "triangle")
TASKS = ("caption", "color", "count", "detect")
TASK_WEIGHTS = (0.3, 0.2, 0.15, 0.35)  # detection, the hardest to learn, is asked most often


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max in pixels, inclusive of the drawn area


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]

    @property
    def size(self) -> int:
        return self.image.width


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: a scene, a prompt and the answer the model should give."""

    scene: Scene
    task: str
    prompt: str
    answer: str
    subject: str | None = None  # the shape kind a color or detect question is about


def _background(rng: random.Random, size: int) -> Image.Image:
    """A two-colour gradient, horizontal or vertical, in muted tones that every shape colour stands out from."""
    def muted() -> tuple[int, int, int]:
        base = rng.choice([(235, 235, 230), (200, 200, 200), (120, 120, 125), (60, 60, 70), (215, 225, 235),
                           (230, 220, 200), (190, 210, 190)])
        return tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in base)

    start, end = muted(), muted()
    gradient = Image.linear_gradient("L").resize((size, size))
    if rng.random() < 0.5:
        gradient = gradient.rotate(90)
    return Image.composite(Image.new("RGB", (size, size), end), Image.new("RGB", (size, size), start), gradient)


def _place(rng: random.Random, size: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A square box of random side that keeps a 3-pixel gap from the boxes already placed, or None.

    Its centre also lies at least a tenth of the image away, left or right, from every placed box's centre, so
    that the caption's "left to right" order is never a coin toss between two shapes stacked one above the other.
    """
    for _ in range(50):
        side = rng.randint(int(size * 0.2), int(size * 0.36))
        x, y = rng.randint(1, size - side - 2), rng.randint(1, size - side - 2)
        box = (x, y, x + side, y + side)
        apart = all(box[2] + 3 < t[0] or t[2] + 3 < box[0] or box[3] + 3 < t[1] or t[3] + 3 < box[1] for t in taken)
        distinct_order = all(abs((box[0] + box[2]) - (t[0] + t[2])) >= 2 * (size // 10) for t in taken)
        if apart and distinct_order:
            return box
    return None


def make_scene(rng: random.Random, size: int = 112) -> Scene:
    """One to three shapes, each of a random kind and colour, on a random background."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    shapes: list[Shape] = []
    for _ in range(rng.randint(1, 3)):
        box = _place(rng, size, [s.box for s in shapes])
        if box is None:
            break
        kind, color = rng.choice(KINDS), rng.choice(list(COLORS))
        _draw_shape(draw, kind, box, COLORS[color])
        shapes.append(Shape(kind, color, box))
    return Scene(image, shapes)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw one shape filling `box`; "star" (five points) is not in KINDS: the fine-tuning chapter teaches it."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "star":
        centre, radius = ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2
        draw.polygon(star_points(centre, radius), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def star_points(centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star, its top point up, inner radius 0.45 of the outer."""
    corners = []
    for i in range(10):
        angle = math.pi * i / 5 - math.pi / 2
        r = radius if i % 2 == 0 else 0.45 * radius
        corners.append((centre[0] + r * math.cos(angle), centre[1] + r * math.sin(angle)))
    return corners


def label_map(scene: Scene) -> Image.Image:
    """A mode-"L" image of the scene's size: 0 on the background, i + 1 on the pixels of `scene.shapes[i]`."""
    labels = Image.new("L", scene.image.size, 0)
    draw = ImageDraw.Draw(labels)
    for index, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape.kind, shape.box, index + 1)
    return labels


def caption(scene: Scene) -> str:
    """"a red circle", "a red circle and a blue square", "a red circle, a blue square and a green triangle"."""
    ordered = sorted(scene.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1]))
    names = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}" for s in ordered]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def detection_answer(scene: Scene, kind: str) -> str:
    """The boxes of every shape of `kind`, top to bottom then left to right, as location tokens."""
    found = sorted((s for s in scene.shapes if s.kind == kind), key=lambda s: (s.box[1], s.box[0]))
    objects = [DetectedObject(kind, tuple(float(v) for v in (s.box[0], s.box[1], s.box[2] + 1, s.box[3] + 1)))
               for s in found]
    return encode_objects(objects, scene.size, scene.size)


def make_example(rng: random.Random, size: int = 112, task: str | None = None) -> Example:
    """A scene and one question about it (a random task unless one is named)."""
    scene = make_scene(rng, size)
    task = task or rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
    kinds = [s.kind for s in scene.shapes]
    if task == "caption":
        return Example(scene, task, "caption en", caption(scene))
    if task == "count":
        return Example(scene, task, "answer en how many shapes are there?", str(len(scene.shapes)))
    if task == "color":
        single = [k for k in KINDS if kinds.count(k) == 1]
        if not single:  # every kind present appears twice or more: ask something else about this scene
            return Example(scene, "count", "answer en how many shapes are there?", str(len(scene.shapes)))
        kind = rng.choice(single)
        color = next(s.color for s in scene.shapes if s.kind == kind)
        return Example(scene, task, f"answer en what color is the {kind}?", color, subject=kind)
    if task == "detect":
        kind = rng.choice(sorted(set(kinds)))
        return Example(scene, task, f"detect {kind}", detection_answer(scene, kind), subject=kind)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def make_dataset(seed: int, count: int, size: int = 112, task: str | None = None) -> list[Example]:
    """`count` examples from a seed (e.g. a held-out set made with a seed training never uses)."""
    rng = random.Random(seed)
    return [make_example(rng, size, task) for _ in range(count)]


def corpus(seed: int = 0, count: int = 20000) -> list[str]:
    """Prompts and answers of many examples: the text a tokenizer for this world is trained on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        example = make_example(rng, 32)
        lines += [example.prompt, example.answer]
    return lines


def detection_iou(example: Example, generated: str) -> float:
    """Mean IoU of the predicted boxes against the true ones, matched in order; 0 for unparsable output."""
    truth = parse_locations(example.answer, example.scene.size, example.scene.size)
    try:
        predicted = parse_locations(generated, example.scene.size, example.scene.size)
    except ValueError:
        return 0.0
    scores = [box_iou(t.box, p.box) if p.label == t.label else 0.0 for t, p in zip(truth, predicted)]
    return sum(scores) / max(len(truth), len(predicted))
