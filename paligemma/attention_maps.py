"""Attention maps: where PaliGemma looks while it reads an image and writes an answer.

`attention_maps` runs generation once with the attention weights kept, and returns them as an `AttentionMaps`:

- SigLIP's self-attention, patch to patch: `vision` [layers, heads, patches, patches];
- the decoder's attention from each generated token's query to every position: `generated_rows`
  [steps, layers, heads, positions], and to the image alone, `generated` [steps, layers, heads, patches];
- the same for the text of the prompt (`<bos>`, the prompt, `\\n`): `prompt_rows` and `prompt`.

Which query belongs to which token: step t's token is the one *predicted* at step t. Step 0's token is
predicted by the last prompt position (the `\\n`), step t > 0's by the position of the token of step t - 1,
fed back in. So `generated[t]` is where the model looked when it chose token t: "where it looked when it
said *red*".

Capture is a separate entry point: `generate` and the fused (sdpa) path are untouched and pay nothing. For the
time of the capture the model runs the eager softmax (the fused kernel cannot return weights), then gets its
own attention implementation back; the tokens are those `generate` gives (the tests hold it to that).

Then: `aggregate` (mean, max or one head; mean, max or one layer), `rollout` (residual-aware attention
rollout through SigLIP), and `localisation_score`, which measures whether the answer to "what color is the
circle?" looks at the circle. The plots are in `paligemma.attention_plots`.

    python -m paligemma.attention_maps score --scenes 200      # the localisation figure, on tiny-shapes
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import PaliGemmaError
from .generation import check_generation_settings, generate_ids
from .model import PaliGemmaForConditionalGeneration
from .processing import ImageInput, PaliGemmaProcessor

Reduction = str | int  # "mean", "max", or an index (negative counts from the end)
LOCALISATION_SEED = 5_000_011  # scenes for the localisation measurement; training draws from seed 0's stream


@contextlib.contextmanager
def eager_attention(model: PaliGemmaForConditionalGeneration) -> Iterator[None]:
    """Run every attention module eagerly inside the block, then restore each module's own implementation."""
    saved = {module: module.implementation for module in model.modules() if hasattr(module, "implementation")}
    try:
        model.set_attention_implementation("eager")
        yield
    finally:
        for module, implementation in saved.items():
            module.implementation = implementation


def _reduce(weights: torch.Tensor, how: Reduction, dim: int, what: str) -> torch.Tensor:
    """Mean, max or one index along `dim` (which is removed)."""
    count = weights.shape[dim]
    if isinstance(how, bool) or not isinstance(how, (int, str)):
        raise PaliGemmaError(f"{what} must be 'mean', 'max' or an index, got {how!r}")
    if isinstance(how, int):
        if not -count <= how < count:
            raise PaliGemmaError(
                f"{what} {how} is out of range: there are {count} (0 to {count - 1}, or -{count} to -1)"
            )
        return weights.select(dim, how)
    if how == "mean":
        return weights.mean(dim)
    if how == "max":
        return weights.amax(dim)
    raise PaliGemmaError(f"unknown {what} aggregation {how!r}: use 'mean', 'max' or an index")


def aggregate(weights: torch.Tensor, layers: Reduction = "mean", heads: Reduction = "mean") -> torch.Tensor:
    """weights [layers, heads, ...] -> [...]: heads reduced first (within each layer), then layers.

    Each of `layers` and `heads` is "mean", "max", or an index picking one (negative from the end: -1 is the last).
    """
    if weights.dim() < 2:
        raise PaliGemmaError(f"expected weights [layers, heads, ...], got shape {list(weights.shape)}")
    return _reduce(_reduce(weights, heads, 1, "head"), layers, 0, "layer")


def _mixing(layer: torch.Tensor, heads: Reduction, residual: float) -> torch.Tensor:
    """One SigLIP layer with its residual: [heads, P, P] -> residual * I + (1 - residual) * A, rows renormalised."""
    identity = torch.eye(layer.shape[-1], dtype=torch.float64, device=layer.device)
    mixing = residual * identity + (1 - residual) * _reduce(layer.double(), heads, 0, "head")
    return mixing / mixing.sum(-1, keepdim=True)


def _check_rollout(vision: torch.Tensor, residual: float) -> None:
    if vision.dim() != 4 or vision.shape[-1] != vision.shape[-2]:
        raise PaliGemmaError(f"rollout needs vision attention [layers, heads, P, P], got shape {list(vision.shape)}")
    if not 0 <= residual < 1:
        raise PaliGemmaError(f"residual must lie in [0, 1), got {residual!r}")


def rollout(vision: torch.Tensor, heads: Reduction = "mean", residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through the vision tower: vision [layers, heads, P, P] -> [P, P], each row summing to 1.

    Each layer adds its input back (x + attention(x)), so a layer's mixing is modelled as
    residual * I + (1 - residual) * A, rows renormalised; the layers compose by matrix product, the last on the
    left. Row i of the result says how much output patch i draws, through every layer, from each input patch
    (Abnar and Zuidema, 2020).
    """
    _check_rollout(vision, residual)
    result = torch.eye(vision.shape[-1], dtype=torch.float64, device=vision.device)
    for layer in vision:  # [heads, P, P]
        result = _mixing(layer, heads, residual) @ result  # [P, P]: this layer after all the earlier ones
    return result.float()


def rollout_rows(
    vision: torch.Tensor, rows: torch.Tensor, heads: Reduction = "mean", residual: float = 0.5
) -> torch.Tensor:
    """rows [..., P] @ rollout(vision): weights on SigLIP's output patches carried back to its input patches.

    The same numbers as multiplying by the rollout, but one vector-matrix product per layer (from the last layer
    down) instead of matrix products: P^2 work per layer instead of P^3, which matters at 4096 patches.
    """
    _check_rollout(vision, residual)
    result = rows.double()
    for layer in vision.flip(0):  # the last layer first: rows @ A_L @ ... @ A_1
        result = result @ _mixing(layer, heads, residual)
    return result.float()


def attention_distance(vision: torch.Tensor) -> torch.Tensor:
    """Mean attention distance, in patches: vision [layers, heads, P, P] -> [layers, heads].

    For each query patch, the distance to every key patch (between centres) weighted by the attention it gets,
    averaged over queries: small for heads that look around themselves, large for heads that look far
    (the measure of Dosovitskiy et al., 2021, for ViT).
    """
    if vision.dim() != 4 or vision.shape[-1] != vision.shape[-2]:
        raise PaliGemmaError(f"expected vision attention [layers, heads, P, P], got shape {list(vision.shape)}")
    side = grid_side(vision.shape[-1])
    rows, columns = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    centres = torch.stack([rows, columns], -1).double()  # [P, 2]
    distance = torch.cdist(centres, centres)  # [P, P]
    return (vision.double().cpu() * distance).sum(-1).mean(-1).float()  # [layers, heads]


def grid_side(patches: int) -> int:
    """The side of the square patch grid: 64 patches -> 8."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise PaliGemmaError(f"{patches} patches do not make a square grid")
    return side


def as_grid(values: torch.Tensor) -> torch.Tensor:
    """[..., patches] -> [..., side, side], row by row from the top left (the order of SigLIP's patches)."""
    side = grid_side(values.shape[-1])
    return values.reshape(*values.shape[:-1], side, side)  # [..., P] -> [..., side, side]


@dataclass
class AttentionMaps:
    """Attention weights of one generation run, on the CPU in float32 (see the module docstring for the layout).

    Positions count the whole sequence, image tokens first: `image_positions` says where the patches sit, and
    `prompt_positions` where the prompt's text tokens sit. A position that a query may not see has weight 0.
    """

    prompt_text: str
    token_ids: list[int]  # generated, `<eos>` included when reached
    tokens: list[str]  # the text piece of each generated token
    prompt_tokens: list[str]  # the text pieces of the prompt: <bos>, the prompt, \n
    vision: torch.Tensor  # [layers, heads, patches, patches]
    generated_rows: torch.Tensor  # [steps, layers, heads, positions]: query of the position that predicted token t
    prompt_rows: torch.Tensor  # [prompt tokens, layers, heads, prefix length]
    image_positions: torch.Tensor  # [patches], positions of the image tokens in the sequence
    prompt_positions: torch.Tensor  # [prompt tokens]
    image: Image.Image  # the image as the model saw it: square, at the model's resolution
    text: str = ""  # the decoded answer

    @property
    def generated(self) -> torch.Tensor:
        """Each generated token's attention to the image, [steps, layers, heads, patches] (the predicting query's)."""
        return self.generated_rows[..., self.image_positions]

    @property
    def prompt(self) -> torch.Tensor:
        """Each prompt token's attention to the image, [prompt tokens, layers, heads, patches]."""
        return self.prompt_rows[..., self.image_positions]

    @property
    def grid(self) -> int:
        """Patches per side (8 for tiny-shapes; 16, 32 or 64 for PaliGemma at 224, 448 or 896 pixels)."""
        return grid_side(self.vision.shape[-1])

    @property
    def patch_size(self) -> float:
        """Pixels per patch side, in the image as the model saw it."""
        return self.image.width / self.grid

    def _index(self, index: int, count: int, what: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise PaliGemmaError(f"{what} {index!r} is out of range: there are {count} (0 to {count - 1})")
        return index % count

    def token_map(self, step: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: where the query that chose generated token `step` looked in the image."""
        step = self._index(step, len(self.token_ids), "generated token")
        return as_grid(aggregate(self.generated[step], layers, heads))

    def prompt_map(self, index: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: where prompt token `index` (0 is `<bos>`) looked in the image."""
        index = self._index(index, len(self.prompt_tokens), "prompt token")
        return as_grid(aggregate(self.prompt[index], layers, heads))

    def _patch(self, patch: int | tuple[int, int]) -> int:
        """A patch given as an index (row by row from the top left) or as (row, column) -> its index."""
        if isinstance(patch, tuple) and len(patch) == 2:
            row = self._index(patch[0], self.grid, "patch row")
            patch = row * self.grid + self._index(patch[1], self.grid, "patch column")
        return self._index(patch, self.grid**2, "patch")

    def patch_map(
        self, patch: int | tuple[int, int], layers: Reduction = -1, heads: Reduction = "mean"
    ) -> torch.Tensor:
        """[grid, grid]: where one SigLIP patch (an index, or (row, column)) looked, in the chosen layers."""
        return as_grid(aggregate(self.vision[:, :, self._patch(patch)], layers, heads))

    def rollout(self, heads: Reduction = "mean", residual: float = 0.5) -> torch.Tensor:
        """Attention rollout through SigLIP, [patches, patches] (see `rollout`)."""
        return rollout(self.vision, heads, residual)

    def rollout_map(self, patch: int | tuple[int, int] | None = None, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: which input patches an output patch draws from, through all layers; with no patch,
        the mean over output patches (what the image tokens handed to Gemma are made of, on average)."""
        patches = self.grid**2
        if patch is None:
            row = torch.full((patches,), 1 / patches)
        else:
            row = torch.zeros(patches)
            row[self._patch(patch)] = 1.0
        return as_grid(rollout_rows(self.vision, row, heads))

    def token_map_through_vision(self, step: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: the token's attention to image tokens, carried back to input patches by the rollout."""
        step = self._index(step, len(self.token_ids), "generated token")
        on_tokens = aggregate(self.generated[step], layers, heads)  # [P] over image tokens
        return as_grid(rollout_rows(self.vision, on_tokens))

    def image_share(self) -> torch.Tensor:
        """[steps, layers, heads]: the part of each generated token's attention that went to the image."""
        return self.generated.sum(-1)


def _image_as_seen(pixel_values: torch.Tensor) -> Image.Image:
    """Pixels [3, S, S] in [-1, 1] back to the RGB image SigLIP saw (the resized input)."""
    array = ((pixel_values.float().cpu() * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())  # [3, S, S] -> [S, S, 3]


def _piece(processor: PaliGemmaProcessor, token: int) -> str:
    """A token as text for a label: special tokens by name, `<loc…>` kept, sentencepiece's '▁' as a space."""
    tokenizer = processor.tokenizer
    if token == tokenizer.image_token_id:
        return "<image>"
    return tokenizer.sp.id_to_piece(token).replace("\u2581", " ")


def _rows(weights: torch.Tensor, positions: int) -> torch.Tensor:
    """weights [heads, q, keys] -> [q, heads, positions]: the keys are the most recent `keys` positions (a
    sliding-window cache may have forgotten older ones, which this query could not see anyway): left-pad with 0."""
    heads, queries, keys = weights.shape
    rows = weights.new_zeros((heads, queries, positions))
    rows[..., positions - keys:] = weights
    return rows.permute(1, 0, 2)  # [heads, q, positions] -> [q, heads, positions]


@torch.no_grad()
def attention_maps(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    image: ImageInput,
    prompt: str,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
) -> AttentionMaps:
    """Answer `prompt` about `image` as `generate` does, keeping every attention weight along the way.

    The decoding settings are `generate`'s, and so are the tokens. Memory: SigLIP's weights are
    layers x heads x patches^2 floats, kept in float32 on the CPU: 65 k for tiny-shapes, 28 M (113 MB) for
    PaliGemma at 224 pixels, 453 M (1.8 GB) at 448, 7.2 G (29 GB) at 896, where capture needs a large machine.
    """
    check_generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise PaliGemmaError("max_new_tokens must be at least 1: attention maps need a generated token")
    if not isinstance(prompt, str):
        raise PaliGemmaError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(image, (list, tuple)):
        raise PaliGemmaError("attention_maps takes one image and one prompt")
    batch = processor(text=prompt, images=image)
    device = model.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    length = input_ids.shape[1]
    image_positions = (input_ids[0] == model.config.image_token_index).nonzero().squeeze(-1).cpu()  # [P]
    prompt_positions = torch.arange(int(image_positions.max()) + 1, length)  # the text after the image
    vision_rows: list[torch.Tensor] = []
    prompt_rows: list[torch.Tensor] = []
    step_rows: list[torch.Tensor] = []  # each [layers, heads, positions seen]

    def keep(out) -> None:
        """Each forward pass's weights: the prompt's pass first (vision and prompt rows), then one per token."""
        if not step_rows:
            vision_rows.extend(w[0] for w in out.vision_attentions)
            # The prefix's rows for the prompt text: [layers] of [heads, q, keys] -> [T, layers, heads, prefix]
            rows = [_rows(w[0][:, prompt_positions.to(device)], length) for w in out.text_attentions]
            prompt_rows.append(torch.stack(rows, 1))
        total = length + len(step_rows)  # positions this pass's last query sees
        step_rows.append(torch.stack([_rows(w[0][:, -1:], total)[0] for w in out.text_attentions]))

    with eager_attention(model):
        ids = generate_ids(
            model, input_ids, attention_mask, batch["pixel_values"], batch["token_type_ids"],
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, return_attentions=True, on_forward=keep,
        )
    tokens = ids[0].tolist()
    vision = torch.stack(vision_rows).float().cpu()  # [layers, heads, P, P]

    positions = length + len(tokens) - 1  # step t's query sees length + t positions; the last sees them all
    generated_rows = torch.stack([
        torch.nn.functional.pad(rows.float().cpu(), (0, positions - rows.shape[-1])) for rows in step_rows
    ])  # [steps, layers, heads, positions]
    return AttentionMaps(
        prompt_text=prompt,
        token_ids=tokens,
        tokens=[_piece(processor, t) for t in tokens],
        prompt_tokens=[_piece(processor, int(t)) for t in input_ids[0, prompt_positions.to(device)].tolist()],
        vision=vision,
        generated_rows=generated_rows,
        prompt_rows=prompt_rows[0].float().cpu(),
        image_positions=image_positions,
        prompt_positions=prompt_positions,
        image=_image_as_seen(batch["pixel_values"][0]),
        text=processor.decode(tokens),
    )


# --- Does the answer look at the right shape? ------------------------------------------------------------------


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


def localisation_scenes(n_scenes: int, seed: int = LOCALISATION_SEED, size: int = 112) -> list:
    """`n_scenes` colour questions ("answer en what color is the circle?") about one shape in scenes of 2 or 3."""
    from .shapes import make_example

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


def _reduction(text: str) -> Reduction:
    return int(text) if text.lstrip("-").isdigit() else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.attention_maps", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="measure whether the answer looks at the asked shape (tiny-shapes world)")
    score.add_argument("--model", default="tiny-shapes", help="checkpoint folder or shipped name (default tiny-shapes)")
    score.add_argument("--scenes", type=int, default=200, help="colour questions to ask (default 200)")
    score.add_argument("--seed", type=int, default=LOCALISATION_SEED, help="seed of the scenes")
    score.add_argument("--layers", default="-1", help="'mean', 'max' or a decoder layer (default -1, the last)")
    score.add_argument("--heads", default="mean", help="'mean', 'max' or a head (default mean)")
    score.add_argument("--device", default="cpu")
    plot = commands.add_parser("plot", help="draw the maps of one image and prompt into a PNG file")
    plot.add_argument("--image", required=True)
    plot.add_argument("--prompt", required=True)
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--model", default="tiny-shapes")
    plot.add_argument("--max-new-tokens", type=int, default=8)
    plot.add_argument("--layers", default="-1")
    plot.add_argument("--heads", default="mean")
    plot.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from .checkpoint import load_pretrained

        model, processor = load_pretrained(args.model, device=args.device)
        layers, heads = _reduction(args.layers), _reduction(args.heads)
        if args.command == "score":
            print(localisation_score(model, processor, args.scenes, args.seed, layers, heads).summary())
        else:
            import matplotlib

            matplotlib.use("Agg")
            from .attention_plots import plot_tokens

            maps = attention_maps(model, processor, args.image, args.prompt, max_new_tokens=args.max_new_tokens)
            plot_tokens(maps, layers=layers, heads=heads).savefig(args.out, dpi=120, bbox_inches="tight")
            print(f"{maps.text!r}: {len(maps.tokens)} maps written to {args.out}")
    except PaliGemmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
