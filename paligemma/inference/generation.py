"""Writing the answer one token at a time, through the KV cache.

The prefix (image, prompt) is run once and its keys and values cached; each later step feeds only the newest token.
Tokens are chosen greedily or sampled (`GenerationSettings`), and a sequence stops at `<eos>` while the others in
the batch go on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import PaliGemmaError
from ..io.images import ImageInput
from ..io.processor import PaliGemmaProcessor
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .decoders import make_decoder
from .kv_cache import KVCache
from .sampling import GenerationSettings, choose_next_token


@dataclass
class GenerationOutput:
    """Decoded answers and the new token ids of each (without padding; `<eos>` included when reached)."""

    texts: list[str]
    token_ids: list[list[int]]


@torch.no_grad()
def generate_ids(
    model: PaliGemmaForConditionalGeneration,
    batch: Mapping[str, torch.Tensor],
    settings: GenerationSettings = GenerationSettings(),
    cache: str | KVCache = "dynamic",
    on_token: Callable[[torch.Tensor], None] | None = None,
    all_finished: Callable[[torch.Tensor], bool] = lambda finished: bool(finished.all()),
) -> torch.Tensor:
    """New token ids [b, steps] for a processor batch; after its `<eos>` a sequence is filled with pad.

    `cache` picks the decoder (`decoders.CACHES`: "dynamic", "static", "graph", "compiled", or a KVCache).
    `on_token` is called with each step's tokens [b] as soon as they are chosen (to stream, or to time each step).
    Decoding stops early once `all_finished(finished)` holds for the [b] flags of sequences past their `<eos>`; under
    FSDP it must hold on every rank at once, since each step's forward is a collective.
    """
    text = model.config.text_config
    batch_size, prompt_length = batch["input_ids"].shape
    if prompt_length + settings.max_new_tokens > text.max_position_embeddings:
        raise PaliGemmaError(f"prompt of {prompt_length} tokens plus {settings.max_new_tokens} new ones exceeds the "
                             f"model's context of {text.max_position_embeddings}")
    if settings.max_new_tokens == 0:
        return batch["input_ids"].new_zeros((batch_size, 0))
    decoder = make_decoder(model, cache, batch_size, prompt_length + settings.max_new_tokens)
    generator = settings.generator(model.device)
    logits = decoder.prefill(batch)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=model.device)
    new_tokens = []
    for step in range(settings.max_new_tokens):
        token = choose_next_token(logits, settings, generator).masked_fill(finished, text.pad_token_id)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        finished |= token == text.eos_token_id
        if all_finished(finished) or step == settings.max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return torch.stack(new_tokens, dim=1)


def generate(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]],
    prompts: str | Sequence[str],
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    return_ids: bool = False,
    cache: str | KVCache = "dynamic",
    strict: bool = False,
) -> list[str] | GenerationOutput:
    """Answer each prompt about its image, or its images (`images=[[a, b], [c]]`: several per prompt, in order).
    Returns the decoded answers (or, with return_ids, ids as well).

    The decoding settings are those of `GenerationSettings`. A token id with no piece in the tokenizer (PaliGemma 1's
    embedding table is 64 rows larger than its tokenizer) decodes to nothing, as in transformers; `strict` raises.
    """
    settings = GenerationSettings(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    ids = generate_ids(model, processor(text=prompts, images=images), settings, cache=cache)
    eos = model.config.text_config.eos_token_id
    token_ids = []
    for row in ids.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)  # after <eos> there is only padding
        token_ids.append(row[:end])
    texts = [processor.decode(row, strict=strict) for row in token_ids]
    return GenerationOutput(texts, token_ids) if return_ids else texts
