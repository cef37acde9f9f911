"""Fast CPU products, applied to a model from outside.

The model's files use plain `nn.Linear`. `accelerate(model)` turns each of them (the tied output head included) into
a `FastLinear`, in place, with the very same Parameters, so the state dict, its names and any tied weights are
unchanged and only the product differs: a streaming C++ kernel for the few rows of decoding, bf16 weights widened to fp32 for the
many rows of prefill (see `linear`). `load_pretrained` and `load_model` do this by default on a CPU.

    model = accelerate(PaliGemmaForConditionalGeneration(config))
    with fast_paths(enabled=False): ...      # PyTorch's kernels only, for a comparison

The weights they read can live in 2 MB pages (`huge_pages`): the loaders put what they allocate there, and
`place_in_huge_pages(model)` moves the weights of a model built another way.
"""

from __future__ import annotations

from torch import nn

from .huge_pages import HugePageArena, huge_pages_unavailable, place_in_huge_pages
from .linear import FastLinear, FastPaths, fast_paths, kernel_status, path_for, release_buffers


def accelerate(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` of `model` a `FastLinear`, in place; returns the model.

    Each layer keeps its identity, its Parameters (tied weights stay tied) and its hooks: only its class changes, to
    the subclass whose `forward` calls `linear`. That costs a microsecond a layer, where building new modules cost
    about 16 (5 ms over the 3B model's 290 layers, a fortieth of its loading time).
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    return model


__all__ = ["FastLinear", "FastPaths", "HugePageArena", "accelerate", "fast_paths", "huge_pages_unavailable",
           "kernel_status", "path_for", "place_in_huge_pages", "release_buffers"]
