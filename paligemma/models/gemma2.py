"""Gemma 2, the language model of PaliGemma 2: Gemma with five changes.

1. Four RMSNorms per layer instead of two: the attention and MLP outputs are normalised too, before they
   join the residual stream (x + norm(attention(norm(x))), then x + norm(MLP(norm(x)))).
2. Attention scores are soft-capped, cap * tanh(score / cap) with cap 50, before the mask is added.
3. Output logits are soft-capped the same way, with cap 30.
4. Scores are scaled by query_pre_attn_scalar^-0.5 (equal to head_dim^-0.5 for 2B and 9B, not for 27B).
5. Every other layer, starting with the first, attends only to the last `sliding_window` positions (4096);
   the prefix of PaliGemma still sees itself whole. Those layers' caches keep only what they can still see.

Everything else (embeddings, rotary positions, grouped-query heads, the gated MLP, the tied head) is Gemma's.
"""

from __future__ import annotations

import torch

from .attention import soft_cap
from .config import SLIDING, Gemma2Config, GemmaConfig
from .gemma import GemmaAttention, GemmaDecoderLayer, GemmaLanguageModel, GemmaRMSNorm, LayerCache


class Gemma2Attention(GemmaAttention):
    """Gemma's attention with Gemma 2's scale, soft-capped scores and, on sliding layers, a window."""

    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.attend.scale = config.query_pre_attn_scalar**-0.5
        self.attend.softcap = config.attn_logit_softcapping
        self.sliding_window = config.layer_sliding_windows[layer_idx]


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """x + norm(attention(norm(x))), then x + norm(MLP(norm(x))): a norm before and after each block."""

    attention_class = Gemma2Attention

    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.attention_type = config.layer_types[layer_idx]
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), rotary, mask, cache, cache_position)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2LanguageModel(GemmaLanguageModel):
    """The Gemma 2 stack. Give `forward` a dict of masks, one per kind of layer: {FULL: …, SLIDING: …}."""

    layer_class = Gemma2DecoderLayer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary, soft-capped to (-final_logit_softcapping, final_logit_softcapping)."""
        logits = super().logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else soft_cap(logits, cap)


def build_language_model(config: GemmaConfig) -> GemmaLanguageModel:
    """Gemma or Gemma 2, as the text config says."""
    return Gemma2LanguageModel(config) if isinstance(config, Gemma2Config) else GemmaLanguageModel(config)
