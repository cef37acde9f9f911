"""Fast CPU products, applied to a model from outside.

The model's files use plain `nn.Linear`. `accelerate(model)` swaps each of them (the tied output head included) for
a `FastLinear` holding the very same Parameters, so the state dict, its names and any tied weights are unchanged and
only the product differs: a streaming C++ kernel for the few rows of decoding, bf16 weights widened to fp32 for the
many rows of prefill (see `linear`). `load_pretrained` and `load_model` do this by default on a CPU.

    model = accelerate(PaliGemmaForConditionalGeneration(config))
    with fast_paths(enabled=False): ...      # PyTorch's kernels only, for a comparison
"""

from __future__ import annotations

from torch import nn

from .linear import FastLinear, FastPaths, fast_paths, kernel_status, path_for, release_buffers


def accelerate(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` by a `FastLinear` sharing its Parameters, in place; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, FastLinear.from_linear(child))
    return model


__all__ = ["FastLinear", "FastPaths", "accelerate", "fast_paths", "kernel_status", "path_for",
           "release_buffers"]
