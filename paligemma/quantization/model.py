"""Quantizing a whole model: every linear layer of the vision tower, the projector and the decoder, and the output
head, whose table the token embeddings then read too.

    quantize(model, "int8")                  # per-row int8
    quantize(model, "int4", group_size=64)   # int4 in groups of 64

Layers are replaced one at a time, each wide weight freed as soon as its codes exist, so quantizing needs memory for
the model as it was plus one layer. The embedding table is the output head's weight (tied, as Gemma ties them), so
after quantizing the head, `QuantizedEmbedding` looks token rows up in the head's codes: one quantized table serves
both, and the wide one goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import PaliGemmaError
from .linear import SCHEMES, QuantizedLinear
from .schemes import INT4_GROUP_SIZES


class QuantizedEmbedding(nn.Module):
    """Token embeddings read from a quantized output head (the tied table): rows dequantized as they are looked up."""

    def __init__(self, head: QuantizedLinear) -> None:
        super().__init__()
        self.head = [head]  # a list, so the head is not registered twice (it lives in the language model)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.head[0].dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Checked eagerly only: a compiled decoding step feeds back the model's own argmax, always a valid id, and
        # reading the ids' range back to Python would break its graph.
        if not torch.compiler.is_compiling() and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.num_embeddings):
            raise PaliGemmaError(f"token ids must lie in 0..{self.num_embeddings - 1}")
        flat = input_ids.reshape(-1)
        rows = self.head[0].dequantized(self.dtype, flat)  # [n, d]
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, read from the quantized output head"


def _check(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise PaliGemmaError(f"unknown quantization {scheme!r}: choose {' or '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise PaliGemmaError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def _replace_linears(model: nn.Module, scheme: str, group_size: int,
                     make: Callable[[nn.Linear], QuantizedLinear]) -> dict[str, Any]:
    """Put `make(layer)` in place of every linear layer the scheme can take; tie the embeddings to a quantized head;
    record the result on the model and its config. Returns the record."""
    if getattr(model, "quantization", None):
        raise PaliGemmaError(f"this model is quantized already ({model.quantization['scheme']})")
    language = model.language_model
    tied = language.lm_head.weight is language.embed_tokens.weight
    quantized, kept = [], []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            if scheme == "int4" and child.in_features % group_size:  # every group size is a multiple of 32
                kept.append(full)
                continue
            setattr(parent, name, make(child))
            quantized.append(full)
            del child  # its weight goes with it, unless something else holds it (the tied embedding table)
    head = language.lm_head
    if tied and isinstance(head, QuantizedLinear):
        language.embed_tokens = QuantizedEmbedding(head)  # the wide table goes: the head's codes serve both
    model.quantization = {"quant_method": "paligemma", "scheme": scheme,
                          "group_size": group_size if scheme == "int4" else None, "kept": kept}
    model.config.quantization = dict(model.quantization)
    return {**model.quantization, "layers": quantized}


def quantize(model: nn.Module, scheme: str = "int8", group_size: int = 128) -> dict[str, Any]:
    """Replace the linear layers of `model` (a PaliGemma) by `QuantizedLinear` layers, in place; returns what
    was done.

    int4 quantizes a layer only where its inputs split into groups of `group_size` (SigLIP's 4304-wide MLP output,
    for one, does not): such a layer keeps its weights as they were and is listed under "kept". Norms, the patch
    embedding and SigLIP's position embeddings stay as they are. The returned record (and `model.quantization`,
    which `save_pretrained` writes into config.json) names the scheme; "layers" lists the quantized layers.
    """
    _check(scheme, group_size)
    return _replace_linears(model, scheme, group_size, lambda layer: QuantizedLinear.from_linear(layer, scheme,
                                                                                                 group_size))


def quantized_structure(model: nn.Module, scheme: str, group_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The same replacement on a model on the meta device, with empty layers of `dtype`: what a loader fills."""
    _check(scheme, group_size)

    def empty(layer: nn.Linear) -> QuantizedLinear:
        return QuantizedLinear(layer.in_features, layer.out_features, scheme, group_size, layer.bias is not None,
                               dtype, "meta")

    return _replace_linears(model, scheme, group_size, empty)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, a tensor shared by two modules counted once: the model's size."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
