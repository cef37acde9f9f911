"""One interface for every way of decoding: `prefill(batch) -> logits`, then `step(tokens) -> logits`.

- `CachedDecoder` runs the model through a KV cache it fills: a `DynamicCache` (grows step by step) or a
  `StaticCache` (allocated once);
- `FixedShapeDecoder` (in `fixed_shape`) runs steps of one fixed shape: replayed as CUDA graphs on a GPU, or
  compiled by `torch.compile`.

`make_decoder` picks one from a name in `CACHES`, and `generate_ids` only ever calls the two methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from ..errors import PaliGemmaError
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .fixed_shape import FixedShapeDecoder
from .kv_cache import DynamicCache, KVCache, StaticCache

CACHES = ("dynamic", "static", "graph", "compiled")  # what `cache=` names (or a KVCache)


class Decoder(Protocol):
    """Prefill the prompt once, then one step per new token; each returns the next token's logits [b, vocab]."""

    def prefill(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


class CachedDecoder:
    """Decoding through a KV cache that the model's forward pass fills: the loop chapter 10 builds."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.attention_mask: torch.Tensor | None = None
        self.position: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.device
        inputs = {name: tensor.to(device) for name, tensor in batch.items() if name != "labels"}
        out = self.model(**inputs, kv_cache=self.cache, logits_to_keep=1)
        self.attention_mask = inputs["attention_mask"]
        self.position = self.attention_mask.sum(-1, keepdim=True)  # [b, 1]: the last real token's (first is 1)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None or self.position is None:
            raise PaliGemmaError("step() before prefill(): the decoder has no prompt yet")
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], -1)
        self.position = self.position + 1
        out = self.model(tokens[:, None], attention_mask=self.attention_mask, position_ids=self.position,
                         kv_cache=self.cache)
        return out.logits[:, -1]


def make_decoder(
    model: PaliGemmaForConditionalGeneration, cache: str | KVCache, batch_size: int, max_length: int
) -> Decoder:
    """The decoder a `cache` name (one of `CACHES`) or a ready KVCache stands for, sized for prompt + new tokens."""
    if isinstance(cache, KVCache):
        return CachedDecoder(model, cache)
    if cache == "dynamic":
        return CachedDecoder(model, DynamicCache())
    if cache == "static":
        return CachedDecoder(model, StaticCache.for_model(model, batch_size, max_length))
    if cache in ("graph", "compiled"):
        return FixedShapeDecoder(model, batch_size, max_length, compile=cache == "compiled")
    names = ", ".join(repr(name) for name in CACHES)
    raise PaliGemmaError(f"cache must be one of {names} or a KVCache, got {cache!r}")
