"""Gemma, the language model: a decoder-only transformer with RMSNorm, rotary positions and a gated MLP.

embeddings * sqrt(d) -> decoder layers (RMSNorm, attention with RoPE and shared key/value heads,
RMSNorm, gated GELU MLP) -> RMSNorm -> logits through the embedding matrix (tied head).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .activations import get_activation
from .attention import DotProductAttention
from .config import FULL, GemmaConfig


class LayerCache(Protocol):
    """What a decoder layer asks of a KV cache (`paligemma.inference.kv_cache` has the implementations)."""

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor,
               sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values [b, kv_heads, new, d] at `cache_position` [new]; return all that is held."""
        ...

    def get_seq_length(self) -> int:
        """How many positions the cache has seen."""
        ...


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), computed in float32. The stored weight is centred on zero, hence the `1 +`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GemmaRotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles position * base^(-2i/head_dim), in float32, for each position."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def inverse_frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """One frequency per pair of dimensions: [head_dim / 2]."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin [b, s, head_dim], each angle repeated for both halves."""
        angles = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)  # [b, s, d/2]
        angles = torch.cat([angles, angles], dim=-1)  # [b, s, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90-degree turn of each pair (x1[i], x2[i])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, s, d] by the angles of its positions (cos, sin [b, s, d])."""
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d]: the same rotation for every head
    return x * cos + rotate_half(x) * sin


class GemmaAttention(nn.Module):
    """Self-attention whose key/value heads are shared by groups of query heads (multi-query when there is one)."""

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.sliding_window: int | None = None  # Gemma 2 limits every other layer to a window; Gemma does not
        self.attend = DotProductAttention(self.head_dim**-0.5)  # Gemma 2 changes the scale and soft-caps

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kv, s, d]
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # now every position held: [b, kv, held, d]
            k, v = cache.update(self.layer_idx, k, v, cache_position, self.sliding_window)
        if mask is not None and mask.shape[-1] > k.shape[2]:
            mask = mask[..., -k.shape[2]:]  # a sliding layer's cache holds only the most recent positions
        out = self.attend(q, k, v, mask).reshape(batch, length, -1)  # [b, s, h, d] -> [b, s, h * d]
        return self.o_proj(out)


class GemmaMLP(nn.Module):
    """down(gelu(gate(x)) * up(x)): a GELU-gated linear unit."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """x + attention(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    attention_class: type[GemmaAttention] = GemmaAttention

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_type = FULL  # which mask the layer takes when the model builds one per kind of layer
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GemmaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaLanguageModel(nn.Module):
    """The decoder stack with its embedding table, which doubles as the output head (weights tied)."""

    layer_class: type[nn.Module] = GemmaDecoderLayer

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = GemmaRotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output head use the embedding table itself (one Parameter, as nanoGPT ties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden_size), the scale rounded to the weights' dtype as Gemma does."""
        table = self.embed_tokens  # an nn.Embedding, or a quantized model's view of its output head's codes
        dtype = table.weight.dtype if isinstance(table, nn.Embedding) else table.dtype
        return table(input_ids) * torch.tensor(self.config.hidden_size**0.5, dtype=dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        cache: LayerCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [b, s, d] -> final normalised hidden states [b, s, d].

        `mask` is one additive mask for every layer, or a dict with one per kind of layer (`FULL`, `SLIDING`), as
        Gemma 2 needs. `cache_position` [s]: where the new positions go in the cache.
        """
        rotary = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            layer_mask = mask[layer.attention_type] if isinstance(mask, dict) else mask
            x = layer(x, rotary, layer_mask, cache, cache_position)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary: hidden [b, s, d] @ embedding^T -> [b, s, vocab]."""
        return self.lm_head(hidden)
