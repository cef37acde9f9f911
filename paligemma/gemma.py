"""Gemma, the language model: a decoder-only transformer with RMSNorm, rotary positions and a gated MLP.

embeddings * sqrt(d) -> decoder layers (RMSNorm, attention with RoPE and shared key/value heads,
RMSNorm, gated GELU MLP) -> RMSNorm -> logits through the embedding matrix (tied head).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation
from .attention import attention
from .config import GemmaConfig
from .kv_cache import KVCache
from .linear import Linear, linear


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.implementation = "sdpa"
        self.softcap: float | None = None  # Gemma 2 soft-caps the scores; Gemma does not
        self.sliding_window: int | None = None  # Gemma 2 limits every other layer to a window; Gemma does not

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kv, s, d]
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if self.sliding_window is None:
                k, v = cache.update(self.layer_idx, k, v)  # now [b, kv, past + s, d]
            else:  # a sliding layer's cache may hand back only the most recent positions
                k, v = cache.update(self.layer_idx, k, v, sliding_window=self.sliding_window)
        if mask is not None and mask.shape[-1] > k.shape[2]:
            mask = mask[..., -k.shape[2]:]  # the mask covers every position so far; keep those of the keys we have
        out, weights = attention(q, k, v, mask, self.scale, self.implementation, return_weights, self.softcap)
        out = out.reshape(batch, length, -1)  # [b, s, h, d] -> [b, s, h * d]
        return self.o_proj(out), weights


class GemmaMLP(nn.Module):
    """down(gelu(gate(x)) * up(x)): a GELU-gated linear unit."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """x + attention(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    attention_type = "full_attention"  # which mask the layer takes when the model builds one per kind of layer
    attention_class: type[GemmaAttention] = GemmaAttention

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GemmaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.self_attn(self.input_layernorm(x), rotary, mask, cache, return_weights)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


class GemmaLanguageModel(nn.Module):
    """The decoder stack with its embedding table, which doubles as the output head."""

    layer_class: type[nn.Module] = GemmaDecoderLayer

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = GemmaRotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden_size), the scale rounded to the weights' dtype as Gemma does."""
        weight = self.embed_tokens.weight
        return self.embed_tokens(input_ids) * torch.tensor(self.config.hidden_size**0.5, dtype=weight.dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        cache: KVCache | None = None,
        return_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """inputs_embeds [b, s, d] -> final normalised hidden states [b, s, d] (and per-layer attention weights).

        `mask` is one additive mask for every layer, or a dict with one per kind of layer ("full_attention",
        "sliding_attention"), as Gemma 2 needs.
        """
        rotary = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        attentions = []
        for layer in self.layers:
            layer_mask = mask[layer.attention_type] if isinstance(mask, dict) else mask
            x, weights = layer(x, rotary, layer_mask, cache, return_attentions)
            attentions.append(weights)
        return self.norm(x), attentions

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary: hidden [b, s, d] @ embedding^T -> [b, s, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight)
