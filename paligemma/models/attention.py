"""Scaled dot-product attention, shared by the SigLIP encoder and the Gemma decoder.

Two paths compute the same thing: `eager` spells the softmax out, `sdpa` calls PyTorch's fused kernel. The tests
hold both to the reference. `DotProductAttention` is the module every attention layer calls for the product itself:
the one place where attention weights exist, so a forward hook there can read them (`paligemma.interpret`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PaliGemmaError

IMPLEMENTATIONS = ("sdpa", "eager")


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Share each key/value head with `groups` query heads: [b, kv_heads, s, d] -> [b, kv_heads * groups, s, d]."""
    if groups == 1:
        return states
    batch, kv_heads, length, head_dim = states.shape
    states = states[:, :, None].expand(batch, kv_heads, groups, length, head_dim)  # [b, kv, groups, s, d]
    return states.reshape(batch, kv_heads * groups, length, head_dim)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean "may attend" mask into one added to the scores: 0 where allowed, the dtype's minimum elsewhere.

    A large finite value rather than -inf keeps a row that may see nothing (a padding query) from becoming NaN.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): close to x for x small against cap, never beyond -cap or cap (Gemma 2)."""
    return torch.tanh(x / cap) * cap


def attention_weights(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask), the softmax in float32, in the query's dtype: [b, heads, q_len, k_len].

    query: [b, heads, q_len, d]; key: [b, kv_heads, k_len, d] (kv_heads divides heads); mask: additive, broadcastable.
    With `softcap` (Gemma 2), the scaled scores are squashed to (-softcap, softcap) before the mask is added.
    """
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # [b, heads, q_len, k_len]
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


#: Up to this many queries per sequence (a decoding step), bf16 and fp16 attention on a CPU takes
#: `grouped_attention_fp32`: PyTorch's fused CPU kernel spends about 0.6 ms per sequence on one query against a
#: few hundred keys in bf16 (an eighth of that in fp32), which at batch 8 was a third of a 3B decoding step.
FEW_QUERIES = 8


def few_queries_on_cpu(query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `query` [b, heads, q_len, d] is a decoding step's, in bf16 or fp16, on a CPU (an additive 4-d mask, if
    any)."""
    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[2] <= FEW_QUERIES and (mask is None or (mask.dim() == 4 and mask.is_floating_point())))


def grouped_attention_fp32(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float32, rounded once to the query's dtype -> [batch, q_len, heads, d].

    As the fused kernel computes it (fp32 products, sums and softmax), in plain matrix products. The query heads that
    share a key/value head are stacked as rows of one product, so the cache is neither repeated nor copied per head.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = query.float().reshape(batch, kv_heads, groups * length, head_dim)  # [b, heads, q, d] -> [b, kv, g*q, d]
    scores = torch.matmul(rows, key.float().transpose(2, 3)) * scale  # [b, kv, g*q, k_len]
    if mask is not None:
        scores = scores.view(batch, kv_heads, groups, length, keys)  # [b, kv, g*q, k] -> [b, kv, g, q, k]
        mask = mask.float()
        if mask.shape[1] == 1:  # one mask for every head: [b, 1, q, k] -> [b, 1, 1, q, k]
            mask = mask[:, :, None]
        else:  # a mask per head: [b, heads, q, k] -> [b, kv, g, q, k]
            mask = mask.reshape(mask.shape[0], kv_heads, groups, length, keys)
        scores = (scores + mask).view(batch, kv_heads, groups * length, keys)  # [b, kv, g, q, k] -> [b, kv, g*q, k]
    weights = torch.softmax(scores, dim=-1)
    output = torch.matmul(weights, value.float())  # [b, kv, g*q, d]
    output = output.view(batch, heads, length, head_dim).to(query.dtype)  # [b, kv, g*q, d] -> [b, heads, q, d]
    return output.transpose(1, 2)  # [b, heads, q_len, d] -> [b, q_len, heads, d]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    implementation: str = "sdpa",
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v -> [batch, q_len, heads, head_dim].

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, k_len, head_dim] (grouped-query attention
    when kv_heads < heads). PyTorch's fused kernel cannot soft-cap, so soft-capped attention takes the eager path.
    """
    groups = query.shape[1] // key.shape[1]
    if implementation == "sdpa" and softcap is None and few_queries_on_cpu(query, mask):
        return grouped_attention_fp32(query, key, value, mask, scale)
    if implementation == "sdpa" and softcap is None:
        # The fused kernel shares each key/value head among its query heads itself (no copies of the cache).
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
        return output.transpose(1, 2)  # [b, heads, q_len, d] -> [b, q_len, heads, d]
    if implementation not in IMPLEMENTATIONS:
        raise PaliGemmaError(f"unknown attention implementation {implementation!r}: use 'sdpa' or 'eager'")
    weights = attention_weights(query, key, mask, scale, softcap)
    return torch.matmul(weights, repeat_kv(value, groups)).transpose(1, 2)  # [b, q_len, heads, d]


class DotProductAttention(nn.Module):
    """The attention product of one layer, as a module of its own (no parameters).

    Its inputs are the rotated queries and the keys, values and mask the layer attends over, so a forward hook here
    sees everything the weights are made of: `weights(query, key, mask)` recomputes them as the eager path does.
    """

    def __init__(self, scale: float, softcap: float | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.softcap = softcap
        self.implementation = "sdpa"

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return attention(query, key, value, mask, self.scale, self.implementation, self.softcap)

    def weights(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights of this call, [b, heads, q_len, k_len]."""
        return attention_weights(query, key, mask, self.scale, self.softcap)
