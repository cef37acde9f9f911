"""The key/value cache: what makes decoding one token cost one token's work instead of the whole sequence's.

Each decoder layer hands the keys and values of its new tokens to `update`, and gets back the keys and
values of every token so far, to attend over. Two kinds:

- `DynamicCache` grows by concatenation: simple, no size to choose in advance.
- `StaticCache` writes into buffers allocated once for a maximum length, so tensor shapes and addresses
  stay fixed from step to step (what CUDA graphs and `torch.compile` need).
"""

from __future__ import annotations

import torch


class KVCache:
    """The interface the decoder relies on."""

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [batch, kv_heads, new, head_dim] for `layer_idx`; return all of them so far."""
        raise NotImplementedError

    def get_seq_length(self) -> int:
        """How many positions are cached (in layer 0, which is updated first)."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        raise NotImplementedError


class DynamicCache(KVCache):
    """A cache that grows by one concatenation per layer per step."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # first call for this layer
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)  # along the sequence
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StaticCache(KVCache):
    """A cache of fixed capacity `max_length`, allocated up front."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_length = max_length

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"static cache is full: {end} positions needed, {self.max_length} allocated")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self) -> int:
        return self.lengths[0]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
