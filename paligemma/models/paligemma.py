"""PaliGemma: SigLIP's patch features, projected into Gemma's embedding space, take the places of the `<image>` tokens.

::

    image -> SigLIP -> linear projector ─┐
                                         ├─> [img_1 … img_N, <bos>, prompt…, \\n | suffix…] -> Gemma -> logits
    text  -> token embeddings * sqrt(d) ─┘

The prefix (image, `<bos>`, prompt, `\\n`) attends to itself in both directions; the suffix (the answer) is causal.
The language model is Gemma (PaliGemma) or Gemma 2 (PaliGemma 2), as the config's `text_config` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PaliGemmaError
from ..io.layout import write_checkpoint
from .attention import IMPLEMENTATIONS, DotProductAttention, additive_mask
from .config import FULL, SLIDING, PaliGemmaConfig
from .gemma import LayerCache
from .gemma2 import build_language_model
from .siglip import SiglipVisionModel


@dataclass
class PaliGemmaOutput:
    """What the forward pass returns; readable as `out.logits` or `out["logits"]`."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    kv_cache: LayerCache | None = None
    image_features: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None


class PaliGemmaMultiModalProjector(nn.Module):
    """One linear layer from SigLIP's width to Gemma's."""

    def __init__(self, config: PaliGemmaConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


def prefix_lm_mask(
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    past_length: int = 0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Which positions each new token may attend to: bool [b, 1, new, past + new].

    attention_mask [b, past + new]: 1 for real tokens, 0 for padding, which nobody attends to.
    token_type_ids [b, new]: 0 for the prefix, whose tokens all see one another, 1 for the suffix, which is causal.
    They only apply to a first pass (past_length 0); tokens decoded later are suffix tokens.
    sliding_window (Gemma 2's sliding layers): a causal look-back reaches only the last `sliding_window`
    positions, the token's own included; the prefix still sees the whole prefix, as in the reference.
    """
    batch, total = attention_mask.shape
    new = total - past_length
    device = attention_mask.device
    query_pos = torch.arange(past_length, total, device=device)[:, None]  # [new, 1]
    key_pos = torch.arange(total, device=device)[None, :]  # [1, total]
    causal = key_pos <= query_pos
    if sliding_window is not None:
        causal = causal & (key_pos > query_pos - sliding_window)
    allowed = causal[None].expand(batch, new, total)  # [b, new, total]
    if token_type_ids is not None and past_length == 0:
        prefix = token_type_ids == 0  # [b, new]
        allowed = allowed | (prefix[:, :, None] & prefix[:, None, :])  # prefix tokens see the whole prefix
    allowed = allowed & attention_mask.bool()[:, None, :]  # never attend to padding
    return allowed[:, None]  # [b, 1, new, total], broadcast over heads


class PaliGemmaForConditionalGeneration(nn.Module):
    """The whole model: `model(**processor(...))` gives logits, and a loss when the batch has labels."""

    def __init__(self, config: PaliGemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config)
        self.language_model = build_language_model(config.text_config)

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device  # never quantized, unlike the linear layers

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    def set_attention_implementation(self, implementation: str) -> None:
        """'sdpa' (fused, the default) or 'eager' (the softmax spelled out), in every attention layer."""
        if implementation not in IMPLEMENTATIONS:
            raise PaliGemmaError(f"unknown attention implementation {implementation!r}: use 'sdpa' or 'eager'")
        for module in self.modules():
            if isinstance(module, DotProductAttention):
                module.implementation = implementation

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [images, 3, H, W] -> image tokens in Gemma's space [images, num_patches, text hidden].

        `images` counts every image of the batch (several per prompt are allowed), not the prompts."""
        expected = (self.config.vision_config.num_channels, self.config.vision_config.image_size)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != expected[0] or pixel_values.shape[2:] != (expected[1],) * 2:
            raise PaliGemmaError(
                f"pixel_values must have shape [batch, {expected[0]}, {expected[1]}, {expected[1]}], "
                f"got {list(pixel_values.shape)}"
            )
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(self.dtype)))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written, unscaled and in order, over the `<image>` positions.

        image_features [images, patches, d] fill the `<image>` positions row by row (as transformers' masked_scatter),
        so each sequence holds whole images (a multiple of `patches` tokens) and the batch holds all of them."""
        image_positions = input_ids == self.config.image_token_index  # [b, s]
        token_ids = input_ids
        if not self.config.image_token_in_vocab:  # PaliGemma 2: the id has no row; embed id 0, overwritten below
            token_ids = input_ids.masked_fill(image_positions, 0)  # 0 (pad) as the reference does
        embeds = self.language_model.embed(token_ids)  # [b, s, d]
        if image_features is None:
            if image_positions.any():
                raise PaliGemmaError("input_ids contain <image> tokens but no pixel_values were given")
            return embeds
        images, patches = image_features.shape[:2]
        per_row = image_positions.sum(-1)  # [b]
        if bool((per_row % patches != 0).any()) or int(per_row.sum()) != images * patches:
            raise PaliGemmaError(
                f"each sequence needs {patches} <image> tokens (one per patch) for each of its images, "
                f"{images * patches} in all for {images} images; found {per_row.tolist()}"
            )
        embeds = embeds.clone()
        # [images, patches, d] -> [images * patches, d]: image after image, in the order of the positions
        embeds[image_positions] = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: LayerCache | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        **unused: Any,
    ) -> PaliGemmaOutput:
        """Run the model on a batch from the processor.

        attention_mask covers the cached positions too ([b, past + new]); position_ids default to the count of
        real tokens so far, so the first real token sits at 1 whatever the left padding. token_type_ids default
        to all prefix. With labels (-100 where no loss is wanted), the loss is the mean cross-entropy of
        predicting each labelled token from the one before it. logits_to_keep > 0 keeps only the last positions;
        return_logits=False (training) computes logits only where a label needs them, and returns none.
        cache_position [new]: where the new positions go in `kv_cache` (by default right after the cached ones).
        """
        past_length = kv_cache.get_seq_length() if kv_cache is not None else 0
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (batch, past_length + length):
            raise PaliGemmaError(
                f"attention_mask must cover cached and new tokens, shape [{batch}, {past_length + length}], "
                f"got {list(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = attention_mask.long().cumsum(-1)[:, past_length:]  # [b, new]
        if token_type_ids is None and past_length == 0:
            token_type_ids = torch.zeros_like(input_ids)
        if past_length + length > self.config.text_config.max_position_embeddings:
            raise PaliGemmaError(
                f"sequence of {past_length + length} tokens exceeds the model's context of "
                f"{self.config.text_config.max_position_embeddings}"
            )

        if kv_cache is not None and cache_position is None:
            cache_position = torch.arange(past_length, past_length + length, device=input_ids.device)

        image_features = None if pixel_values is None else self.get_image_features(pixel_values)
        embeds = self.embed_inputs(input_ids, image_features)
        mask = self.attention_masks(attention_mask, token_type_ids, past_length, embeds.dtype)
        hidden = self.language_model(embeds, position_ids, mask, kv_cache, cache_position)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits, loss = self._logits_and_loss(hidden, labels, return_logits)
        return PaliGemmaOutput(logits=logits, loss=loss, kv_cache=kv_cache, image_features=image_features)

    def _logits_and_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """hidden [b, s, d] -> logits [b, s, vocab] (None when not return_logits) and, with labels [b, s], the loss."""
        if labels is None:
            return (self.language_model.logits(hidden) if return_logits else None), None
        # Position t predicts token t + 1: drop the last prediction and the first label.
        targets = labels[:, 1:].to(hidden.device)
        logits = None
        if return_logits:
            logits = self.language_model.logits(hidden)
            predictions = logits[:, :-1]
        else:  # only the positions that predict a label: the vocabulary projection dominates otherwise
            wanted = targets != -100
            predictions, targets = self.language_model.logits(hidden[:, :-1][wanted]), targets[wanted]
        loss = F.cross_entropy(
            predictions.float().reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        return logits, loss

    def attention_masks(
        self, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None, past_length: int, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The additive prefix-LM mask; for a decoder with sliding layers (Gemma 2), one per kind of layer."""
        full = additive_mask(prefix_lm_mask(attention_mask, token_type_ids, past_length), dtype)
        window = self.config.text_config.sliding_layers_window
        if window is None:
            return full
        sliding = prefix_lm_mask(attention_mask, token_type_ids, past_length, sliding_window=window)
        return {FULL: full, SLIDING: additive_mask(sliding, dtype)}

    def num_parameters(self) -> int:
        """Parameters counted once each (the tied output head shares the embedding table)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors weights in the Hugging Face layout (transformers loads the folder)."""
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        tied = ["language_model.lm_head.weight"] if self.config.text_config.tie_word_embeddings else []
        write_checkpoint(directory, self.config.to_dict(), self.state_dict(), max_shard_size, skip=tied)
