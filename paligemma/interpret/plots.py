"""Drawing attention maps with matplotlib.

A map is one value per patch, [grid, grid]. `upsample` turns it into one value per pixel, each patch a block of
exactly the pixels it was cut from, so the heat lies on the image with the patch grid aligned to the pixels.
The figures work for any grid: 8 x 8 for tiny-shapes, 16, 32 or 64 a side for PaliGemma at 224, 448, 896 pixels.

- `show_map`: one map over the image;
- `plot_heads`: a layers x heads grid of maps;
- `plot_tokens`: a strip with one map per generated token ("where it looked when it said *red*").

The interactive view is the browser viewer in `viewer` (and `explorer` for new prompts with a kernel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import PaliGemmaError
from .capture import AttentionMaps
from .rollout import Reduction, as_grid, grid_side, rollout_rows

CMAP = "inferno"


def _as_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if array.ndim == 1:
        array = array.reshape(grid_side(array.shape[0]), -1)  # [P] -> [grid, grid]
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise PaliGemmaError(f"a map must be [grid, grid] or [patches], got shape {list(array.shape)}")
    return array


def upsample(values: torch.Tensor | np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """[grid, grid] -> [height, width]: pixel (y, x) takes the value of the patch it lies in.

    Pixel row y lies in patch row floor(y * grid / height), and likewise for columns: with height = grid * patch
    size, each patch becomes exactly the block of pixels it was cut from.
    """
    array = _as_array(values)
    width = height if width is None else width
    grid = array.shape[0]
    rows = np.arange(height) * grid // height  # [height]: the patch row of each pixel row
    columns = np.arange(width) * grid // width
    return array[rows[:, None], columns[None, :]]


def _image_array(image: Image.Image | np.ndarray | None, size: int) -> np.ndarray:
    if image is None:  # no image: a neutral grey square
        return np.full((size, size, 3), 0.5)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def show_map(
    values: torch.Tensor | np.ndarray,
    image: Image.Image | np.ndarray | None = None,
    ax: Any = None,
    title: str | None = None,
    style: str = "spotlight",
    alpha: float = 0.8,
    cmap: str = CMAP,
    vmax: float | None = None,
    grid_lines: bool = False,
    mark: int | tuple[int, int] | None = None,
) -> Any:
    """Draw a map over an image; returns the matplotlib axes.

    The map is upsampled to the image's pixels, so each patch covers exactly its own pixels. `style` "spotlight"
    darkens the image where the model does not look, keeping the colours where it does; "heat" lays the colour
    map over the image, more opaque where the attention is higher (up to `alpha`). `vmax` fixes
    the top of the scale (default: this map's maximum; the bottom is 0); `grid_lines` draws the patch
    boundaries; `mark` outlines one patch (an index, or (row, column)), e.g. the query of a SigLIP map.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if style not in ("heat", "spotlight"):
        raise PaliGemmaError(f"unknown style {style!r}: use 'heat' or 'spotlight'")
    array = _as_array(values)
    grid = array.shape[0]
    picture = _image_array(image, grid * 14)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)  # grey -> RGB
    picture = picture[..., :3].astype(float) / (255.0 if picture.dtype == np.uint8 else 1.0)
    height, width = picture.shape[:2]
    if ax is None:
        ax = plt.subplots(figsize=(4, 4))[1]
    top = float(array.max()) if vmax is None else vmax
    level = np.clip(upsample(array, height, width) / (top if top > 0 else 1.0), 0.0, 1.0)  # [H, W] in [0, 1]
    extent = (0, width, height, 0)
    if style == "spotlight":
        ax.imshow(picture * (0.12 + 0.88 * level[..., None]), extent=extent, interpolation="nearest")
    else:
        ax.imshow(picture, extent=extent, interpolation="nearest")
        heat = plt.get_cmap(cmap)(level)  # [H, W, 4]
        heat[..., 3] = alpha * level
        ax.imshow(heat, extent=extent, interpolation="nearest")
    if grid_lines:
        for k in range(1, grid):
            ax.axhline(k * height / grid, color="white", lw=0.3, alpha=0.5)
            ax.axvline(k * width / grid, color="white", lw=0.3, alpha=0.5)
    if mark is not None:
        row, column = divmod(mark, grid) if isinstance(mark, int) else mark
        ax.add_patch(Rectangle((column * width / grid, row * height / grid), width / grid, height / grid,
                               fill=False, edgecolor="cyan", lw=1.5))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_heads(
    weights: torch.Tensor,
    image: Image.Image | np.ndarray | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    shared_scale: bool = False,
    cell: float = 1.3,
    style: str = "spotlight",
    mark: int | tuple[int, int] | None = None,
) -> Any:
    """A grid of maps, one row per layer and one column per head: weights [layers, heads, patches] (or
    [layers, heads, grid, grid]). `layers` picks rows (default all); `shared_scale` puts every map on one colour
    scale (so weak heads look weak) instead of each on its own; `mark` outlines one patch in every map."""
    import matplotlib.pyplot as plt

    if weights.dim() == 4:
        weights = weights.flatten(2)  # [layers, heads, grid, grid] -> [layers, heads, P]
    if weights.dim() != 3:
        raise PaliGemmaError(f"plot_heads needs weights [layers, heads, patches], got shape {list(weights.shape)}")
    count, heads = weights.shape[:2]
    rows = list(range(count)) if layers is None else list(layers)
    for layer in rows:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise PaliGemmaError(f"layer {layer!r} is out of range: there are {count} (0 to {count - 1})")
    vmax = float(weights[rows].max()) if shared_scale else None
    fig, axes = plt.subplots(len(rows), heads, figsize=(cell * heads + 0.6, cell * len(rows) + 0.5), squeeze=False)
    for r, layer in enumerate(rows):
        for head in range(heads):
            ax = axes[r, head]
            show_map(weights[layer, head], image, ax=ax, vmax=vmax, style=style, mark=mark)
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer % count}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_tokens(
    maps: AttentionMaps,
    layers: Reduction = -1,
    heads: Reduction = "mean",
    steps: Sequence[int] | None = None,
    source: str = "generated",
    through_vision: bool = False,
    columns: int = 6,
    cell: float = 1.6,
    style: str = "spotlight",
) -> Any:
    """One map per generated token, titled by the token: where the model looked when it said each word.

    Map t is the attention of the query that predicted token t (see `attention_maps`), `layers` and `heads`
    aggregated; `through_vision` carries it back through SigLIP to input patches (rollout). With
    source="prompt", one map per prompt token instead (`<bos>`, the prompt, `\\n`): where each word of the
    question looks in the image. `steps` picks which tokens (default all)."""
    import matplotlib.pyplot as plt

    if source not in ("generated", "prompt"):
        raise PaliGemmaError(f"unknown source {source!r}: use 'generated' or 'prompt'")
    tokens = maps.tokens if source == "generated" else maps.prompt_tokens
    steps = list(range(len(tokens))) if steps is None else list(steps)
    if not steps:
        raise PaliGemmaError("no generated tokens to draw")
    columns = min(columns, len(steps))
    rows = math.ceil(len(steps) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(cell * columns, (cell + 0.35) * rows), squeeze=False)
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax, step in zip(axes.flat, steps):
        if source == "prompt":
            values = maps.prompt_map(step, layers, heads)
            if through_vision:
                values = as_grid(rollout_rows(maps.vision, values.flatten()))
        else:
            draw = maps.token_map_through_vision if through_vision else maps.token_map
            values = draw(step, layers, heads)
        show_map(values, maps.image, ax=ax, title=repr(tokens[step]), style=style)
    fig.suptitle(f"{maps.prompt_text!r} -> {maps.text!r}   (layer {layers}, heads {heads})", fontsize=10)
    fig.tight_layout()
    return fig
