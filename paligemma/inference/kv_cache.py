"""The key/value cache: what makes decoding one token cost one token's work instead of the whole sequence's.

Each decoder layer hands the keys and values of its new tokens to `update`, with the positions they take
(`cache_position`, chosen by the caller: the model counts on from the cached length, a fixed-shape step passes an
index it keeps in a tensor), and gets back the keys and values of every token so far, to attend over. Kinds:

- `DynamicCache` grows by concatenation: simple, no size to choose in advance.
- `StaticCache` writes into buffers allocated once for a maximum length, so tensor shapes and addresses
  stay fixed from step to step (what CUDA graphs and `torch.compile` need).
- `WholeBufferCache` (in `fixed_shape`) hands back whole buffers, for decoding steps of one shape.

Gemma 2's sliding-window layers only ever look at the last `window` positions, so for those layers both
caches keep only what a later token can still see: `window - 1` positions (dynamic) or a buffer of
`window` (static). `update` always returns the keys and values of the most recent positions, oldest
first, and the decoder drops the matching columns from the front of its mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import PaliGemmaError


class KVCache:
    """The interface the decoder relies on; `keys` and `values` hold one tensor per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [batch, kv_heads, new, head_dim] of `layer_idx` at `cache_position` [new]; return all so far.

        With `sliding_window`, the layer attends to the last `sliding_window` positions only: the cache may
        forget older ones, and returns at least the last `sliding_window - 1` cached positions plus the new ones.
        """
        raise NotImplementedError

    def get_seq_length(self) -> int:
        """How many positions have gone through the cache (in layer 0, which is updated first)."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class DynamicCache(KVCache):
    """A cache that grows by one concatenation per layer per step (new positions always follow the cached ones,
    so appending is writing at `cache_position`)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.seen: list[int] = []  # positions that went through each layer (more than it keeps when sliding)

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # first call for this layer
            self.keys.append(key)
            self.values.append(value)
            self.seen.append(key.shape[2])
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)  # along the sequence
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
            self.seen[layer_idx] += key.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if sliding_window is not None and keys.shape[2] > sliding_window - 1:
            # The next token sees itself and the window - 1 before it: keep only those.
            start = keys.shape[2] - (sliding_window - 1)
            self.keys[layer_idx], self.values[layer_idx] = keys[:, :, start:], values[:, :, start:]
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen[0] if self.seen else 0


class StaticCache(KVCache):
    """A cache of fixed capacity `max_length`, allocated up front.

    `sliding_windows` (one entry per layer, None for a global layer) sizes a sliding layer's buffers to its
    window instead of `max_length`; once full, such a buffer holds the last `window` positions, oldest first.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sliding_windows: Sequence[int | None] | None = None,
    ) -> None:
        windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise PaliGemmaError(f"sliding_windows has {len(windows)} entries for {num_layers} layers")
        self.capacity = [min(w, max_length) if w is not None else max_length for w in windows]
        self.keys = [torch.zeros(batch_size, num_kv_heads, c, head_dim, dtype=dtype, device=device) for c in self.capacity]
        self.values = [torch.zeros(batch_size, num_kv_heads, c, head_dim, dtype=dtype, device=device) for c in self.capacity]
        self.lengths = [0] * num_layers  # positions that went through each layer
        self.max_length = max_length

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int) -> "StaticCache":
        """A cache shaped for `model`'s decoder (its layers, key/value heads, dtype, device and windows)."""
        text = model.config.text_config
        return cls(text.num_hidden_layers, batch_size, text.num_key_value_heads, text.head_dim, max_length,
                   dtype=model.dtype, device=model.device, sliding_windows=text.layer_sliding_windows)

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        new = key.shape[2]
        end = start + new
        if end > self.max_length:
            raise PaliGemmaError(f"static cache is full: {end} positions needed, {self.max_length} allocated")
        capacity = self.capacity[layer_idx]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        self.lengths[layer_idx] = end
        if end <= capacity:  # room left: write in place at the given positions (every global layer does)
            keys.index_copy_(2, cache_position, key)
            values.index_copy_(2, cache_position, value)
            return keys[:, :, :end], values[:, :, :end]
        if sliding_window is None or sliding_window > capacity:
            raise PaliGemmaError(
                f"layer {layer_idx} was allocated for a sliding window of {capacity}, "
                f"but is updated with sliding_window={sliding_window}"
            )
        if new == 1 and start >= capacity:  # one decoding step: shift by one, in place, and append
            keys[:, :, :-1] = keys[:, :, 1:].clone()
            values[:, :, :-1] = values[:, :, 1:].clone()
            keys[:, :, -1:] = key
            values[:, :, -1:] = value
            return keys, values
        held = min(start, capacity)  # the most recent positions, at the front of the buffer
        all_keys = torch.cat([keys[:, :, :held], key], dim=2)
        all_values = torch.cat([values[:, :, :held], value], dim=2)
        keys.copy_(all_keys[:, :, -capacity:])
        values.copy_(all_values[:, :, -capacity:])
        return all_keys, all_values

    def get_seq_length(self) -> int:
        return self.lengths[0]
