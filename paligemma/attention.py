"""Scaled dot-product attention, shared by the SigLIP encoder and the Gemma decoder.

Two paths compute the same thing: `eager` spells the softmax out (and can hand the weights back,
for attention maps), `sdpa` calls PyTorch's fused kernel. The tests hold both to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    implementation: str = "sdpa",
    return_weights: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + mask) v, with the softmax in float32.

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, k_len, head_dim], where kv_heads
    divides heads (grouped-query attention); mask: additive, broadcastable to [batch, heads, q_len, k_len].
    With `softcap` (Gemma 2), the scaled scores are squashed to (-softcap, softcap) before the mask is added;
    PyTorch's fused kernel cannot do that, so soft-capped attention always takes the eager path.
    Returns the output [batch, q_len, heads, head_dim] and, when asked, the weights [batch, heads, q_len, k_len].
    """
    groups = query.shape[1] // key.shape[1]
    if implementation == "sdpa" and not return_weights and softcap is None:
        # The fused kernel shares each key/value head among its query heads itself (no copies of the cache).
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
        return output.transpose(1, 2), None  # [b, q_len, heads, d]
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"unknown attention implementation {implementation!r}: use 'sdpa' or 'eager'")
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # [b, heads, q_len, k_len]
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2)  # [b, heads, q_len, d] -> [b, q_len, heads, d]
    return output, (weights if return_weights else None)
