"""Reducing attention weights to maps: aggregation over layers and heads, the patch grid, and attention rollout.

`aggregate` takes the mean, the max or one head, then one layer; `rollout` follows attention through SigLIP's
residual layers back to the input patches (Abnar and Zuidema, 2020); `attention_distance` measures how far each head
looks (Dosovitskiy et al., 2021).
"""

from __future__ import annotations

import math

import torch

from ..errors import PaliGemmaError

Reduction = str | int  # "mean", "max", or an index (negative counts from the end)


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
