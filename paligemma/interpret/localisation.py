"""Does the answer look at the right shape? The localisation study of chapter 14, on the shapes world.

On colour questions about one shape among two or three ("answer en what color is the circle?"), the answer token's
attention (the query that predicts the colour) is scored against the shapes' boxes: how often its peak patch lies
inside the asked shape, and how much of it lands there, each against what uniform attention would give.

    paligemma attention score --scenes 200      # the localisation figure, on tiny-shapes
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import PaliGemmaError
from ..io.processor import PaliGemmaProcessor
from ..models.paligemma import PaliGemmaForConditionalGeneration
from ..training.shapes import Example, make_example
from .capture import attention_maps
from .rollout import Reduction, aggregate, as_grid

LOCALISATION_SEED = 5_000_011  # scenes for the localisation measurement; training draws from seed 0's stream


def box_coverage(box: Sequence[float], grid: int, image_size: int) -> torch.Tensor:
    """[grid, grid]: the fraction of each patch's pixels inside a box (x_min, y_min, x_max, y_max, inclusive pixels)."""
    patch = image_size / grid
    edges = torch.arange(grid + 1, dtype=torch.float64) * patch  # patch boundaries in pixels

    def overlap(low: float, high: float) -> torch.Tensor:  # [grid]: pixels of [low, high + 1) in each patch
        return (edges[1:].clamp(max=high + 1.0) - edges[:-1].clamp(min=float(low))).clamp(min=0)

    x_min, y_min, x_max, y_max = box
    return (overlap(y_min, y_max)[:, None] * overlap(x_min, x_max)[None, :] / patch**2).float()  # [rows, columns]

def centres_inside(box: Sequence[float], grid: int, image_size: int) -> torch.Tensor:
    """[grid, grid] bool: whether each patch's centre lies inside the box."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * image_size / grid
    x_min, y_min, x_max, y_max = box
    rows = (centres >= y_min) & (centres <= y_max + 1)
    columns = (centres >= x_min) & (centres <= x_max + 1)
    return rows[:, None] & columns[None, :]

@dataclass
class LocalisationCase:
    """One scene of the measurement: the answer token's attention to the image, and the shapes' boxes in the
    pixels of the image as the model saw it."""

    prompt: str
    answer: str  # the true answer
    generated: str  # what the model said
    weights: torch.Tensor  # [layers, heads, patches]: the answer token's query (the prompt's last position)
    boxes: list[tuple[float, float, float, float]]  # every shape's box: x_min, y_min, x_max, y_max, inclusive
    colors: list[str]  # every shape's colour
    asked: int  # which shape the question is about
    image_size: int
    image: Image.Image | None = None  # the scene as the model saw it

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.boxes[self.asked]

    @property
    def other_boxes(self) -> list[tuple[float, float, float, float]]:
        return self.boxes[: self.asked] + self.boxes[self.asked + 1:]

@dataclass
class LocalisationScore:
    """How often the answer token's attention lands on the shape the question is about, against chance."""

    scenes: int
    layers: Reduction
    heads: Reduction
    hit_rate: float  # the patch with the most attention has its centre inside the asked shape's box
    hit_baseline: float  # the same for a patch drawn uniformly at random: mean share of patch centres in the box
    mass_inside: float  # mean share of the image attention inside the box (patches split by pixel overlap)
    area_baseline: float  # mean share of the image area the box covers (the mass of uniform attention)
    mass_other: float  # mean share inside the other shapes' boxes
    area_other: float  # mean share of the image area those boxes cover
    right_shape_rate: float  # the asked box gets more attention per pixel than every other box
    answer_accuracy: float  # the generated answer was the true colour
    said_scenes: int  # scenes where a shape has the colour the model said (right or wrong)
    said_hit_rate: float  # among those, the peak patch lies in the box of a shape of that colour
    said_hit_baseline: float  # the same for a patch drawn at random

    def summary(self) -> str:
        aggregation = f"layer {self.layers}, heads {self.heads}"
        return (
            f"{self.scenes} scenes ({aggregation}): argmax patch inside the asked shape's box "
            f"{self.hit_rate:.1%} (chance {self.hit_baseline:.1%}); attention mass inside it {self.mass_inside:.1%} "
            f"(its area {self.area_baseline:.1%}); inside the other shapes' boxes {self.mass_other:.1%} "
            f"(their area {self.area_other:.1%}); more attention per pixel on the asked shape than on every other: "
            f"{self.right_shape_rate:.1%}; argmax on a shape of the colour the model said {self.said_hit_rate:.1%} "
            f"(chance {self.said_hit_baseline:.1%}, {self.said_scenes} scenes); "
            f"answers right: {self.answer_accuracy:.1%}"
        )

def localisation_scenes(n_scenes: int, seed: int = LOCALISATION_SEED, size: int = 112) -> list[Example]:
    """`n_scenes` colour questions ("answer en what color is the circle?") about one shape in scenes of 2 or 3."""
    if not isinstance(n_scenes, int) or n_scenes < 1:
        raise PaliGemmaError(f"n_scenes must be a positive integer, got {n_scenes!r}")
    rng = random.Random(seed)
    examples = []
    while len(examples) < n_scenes:
        example = make_example(rng, size, task="color")
        if example.task == "color" and len(example.scene.shapes) >= 2:
            examples.append(example)
    return examples

def collect_localisation(
    model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor, n_scenes: int = 200,
    seed: int = LOCALISATION_SEED,
) -> list[LocalisationCase]:
    """Capture the answer token's attention on `n_scenes` colour questions (scenes drawn at the model's size)."""
    cases = []
    size = processor.image_size
    for example in localisation_scenes(n_scenes, seed, size):
        maps = attention_maps(model, processor, example.scene.image, example.prompt, max_new_tokens=1)
        scale = size / example.scene.size
        shapes = example.scene.shapes
        cases.append(LocalisationCase(
            prompt=example.prompt, answer=example.answer, generated=maps.text, weights=maps.generated[0],
            boxes=[tuple(v * scale for v in shape.box) for shape in shapes], colors=[shape.color for shape in shapes],
            asked=next(i for i, shape in enumerate(shapes) if shape.kind == example.subject), image_size=size,
            image=maps.image,
        ))
    return cases

def score_localisation(
    cases: Sequence[LocalisationCase], layers: Reduction = -1, heads: Reduction = "mean"
) -> LocalisationScore:
    """Score captured cases with one aggregation of layers and heads (see `LocalisationScore` for the measures)."""
    if not cases:
        raise PaliGemmaError("no cases to score")
    totals = dict(hit=0.0, hit_base=0.0, mass=0.0, area=0.0, other=0.0, other_area=0.0, right=0.0, correct=0.0,
                  said=0.0, said_hit=0.0, said_base=0.0)
    for case in cases:
        attention = as_grid(aggregate(case.weights, layers, heads))  # [grid, grid]
        attention = attention / attention.sum()  # shares of the attention the image gets
        grid = attention.shape[-1]
        peak = attention.flatten().argmax()
        inside = centres_inside(case.box, grid, case.image_size)
        coverage = box_coverage(case.box, grid, case.image_size)
        totals["hit"] += float(inside.flatten()[peak])
        totals["hit_base"] += float(inside.float().mean())
        totals["mass"] += float((attention * coverage).sum())
        totals["area"] += float(coverage.mean())
        density = float((attention * coverage).sum() / coverage.sum())  # attention per unit area in the box
        others = [box_coverage(b, grid, case.image_size) for b in case.other_boxes]
        totals["other"] += sum(float((attention * c).sum()) for c in others)
        totals["other_area"] += sum(float(c.mean()) for c in others)
        totals["right"] += float(all(density > float((attention * c).sum() / c.sum()) for c in others))
        said = case.generated.strip()
        totals["correct"] += float(said == case.answer)
        said_boxes = [box for box, color in zip(case.boxes, case.colors) if color == said]
        if said_boxes:  # the colour it said belongs to a shape in the scene: does it look at that shape?
            on_said = torch.stack([centres_inside(box, grid, case.image_size) for box in said_boxes]).any(0)
            totals["said"] += 1
            totals["said_hit"] += float(on_said.flatten()[peak])
            totals["said_base"] += float(on_said.float().mean())
    n = len(cases)
    mean = {k: v / n for k, v in totals.items()}
    said_n = max(totals["said"], 1.0)
    return LocalisationScore(
        scenes=n, layers=layers, heads=heads, hit_rate=mean["hit"], hit_baseline=mean["hit_base"],
        mass_inside=mean["mass"], area_baseline=mean["area"], mass_other=mean["other"], area_other=mean["other_area"],
        right_shape_rate=mean["right"], answer_accuracy=mean["correct"], said_scenes=int(totals["said"]),
        said_hit_rate=totals["said_hit"] / said_n, said_hit_baseline=totals["said_base"] / said_n,
    )

def localisation_score(
    model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor, n_scenes: int = 200,
    seed: int = LOCALISATION_SEED, layers: Reduction = -1, heads: Reduction = "mean",
) -> LocalisationScore:
    """The localisation figure: on `n_scenes` colour questions about one shape among two or three, how often the
    answer token's attention (the query that predicts the colour; `layers` and `heads` aggregated as `aggregate`
    does) peaks inside that shape's box, and how much of it lands there, against the box's share of the image."""
    return score_localisation(collect_localisation(model, processor, n_scenes, seed), layers, heads)
