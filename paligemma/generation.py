"""Writing the answer one token at a time, through the KV cache.

The prefix (image, prompt) is run once and its keys and values cached; each later step feeds only
the newest token. Tokens are chosen greedily or sampled (temperature, then top-k, then top-p), and a
sequence stops at `<eos>` while the others in the batch go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import PaliGemmaError
from .graph_decoding import FixedShapeDecoder
from .kv_cache import DynamicCache, KVCache, StaticCache
from .model import PaliGemmaForConditionalGeneration, PaliGemmaOutput
from .processing import ImageInput, PaliGemmaProcessor

CACHES = ("dynamic", "static", "graph", "compiled")  # what `cache=` names (or a KVCache)


@dataclass
class GenerationOutput:
    """Decoded answers and the new token ids of each (without padding; `<eos>` included when reached)."""

    texts: list[str]
    token_ids: list[list[int]]


def check_generation_settings(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float
) -> None:
    """Reject settings that cannot mean anything, with a message that says which."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise PaliGemmaError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise PaliGemmaError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise PaliGemmaError(f"top_p must lie in (0, 1] when sampling, got {top_p!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise PaliGemmaError(f"top_k must be a non-negative integer (0 for no limit), got {top_k!r}")


def sampling_distribution(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """The probabilities sampling draws from: logits [b, vocab] -> probabilities [b, vocab].

    Temperature divides the logits; top-k keeps the k largest; top-p keeps the smallest set of most
    likely tokens whose probability reaches p. Everything removed gets probability 0.
    """
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach p; the most likely one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def choose_next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [b, vocab] -> next token ids [b]: the arg-max, or a draw from `sampling_distribution`."""
    if not do_sample:
        return logits.argmax(-1)
    probabilities = sampling_distribution(logits, temperature, top_k, top_p)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: PaliGemmaForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    cache: str | KVCache = "dynamic",
    on_token: Callable[[torch.Tensor], None] | None = None,
    return_attentions: bool = False,
    on_forward: Callable[[PaliGemmaOutput], None] | None = None,
) -> torch.Tensor:
    """New token ids [b, steps] for a processed batch; after its `<eos>` a sequence is filled with pad.

    `on_token`, if given, is called with each step's tokens [b] as soon as they are chosen (to stream the
    answer, or to time each step as the benchmark does). `on_forward` sees each forward pass's output (the
    prompt's, then one per new token but the last), with attention weights when `return_attentions`.
    `cache`: "dynamic" (grows step by step), "static" (allocated once), "graph" (fixed-shape steps, replayed as
    one CUDA graph each on a GPU: the fast way to decode there; `paligemma.graph_decoding`), "compiled" (the same
    steps compiled by `torch.compile` on first use, tens of seconds, then faster on a CPU too), or a KVCache.
    """
    check_generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
    text_config = model.config.text_config
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_length = input_ids.shape
    if prompt_length + max_new_tokens > text_config.max_position_embeddings:
        raise PaliGemmaError(
            f"prompt of {prompt_length} tokens plus {max_new_tokens} new ones exceeds the model's context of "
            f"{text_config.max_position_embeddings}"
        )
    if max_new_tokens == 0:
        return input_ids.new_zeros((batch, 0))
    generator = None
    if do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    pixel_values = pixel_values.to(device)
    token_type_ids = None if token_type_ids is None else token_type_ids.to(device)

    if cache in ("graph", "compiled"):  # fixed-shape steps: a CUDA graph replayed per step on a GPU; or compiled
        if return_attentions or on_forward is not None:
            raise PaliGemmaError(f"cache={cache!r} steps return logits only: use another cache for attentions or "
                                 "on_forward")
        decoder = FixedShapeDecoder(model, batch, prompt_length + max_new_tokens, compile=cache == "compiled")
        logits = decoder.prefill(input_ids, attention_mask, pixel_values, token_type_ids)
        next_logits = decoder.step
    else:
        if cache == "dynamic":
            cache = DynamicCache()
        elif cache == "static":
            cache = StaticCache(
                text_config.num_hidden_layers, batch, text_config.num_key_value_heads, text_config.head_dim,
                prompt_length + max_new_tokens, dtype=model.dtype, device=device,
                sliding_windows=text_config.layer_sliding_windows,
            )
        elif not isinstance(cache, KVCache):
            names = ", ".join(repr(name) for name in CACHES)
            raise PaliGemmaError(f"cache must be one of {names} or a KVCache, got {cache!r}")
        out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    kv_cache=cache, logits_to_keep=1, return_attentions=return_attentions)
        if on_forward is not None:
            on_forward(out)
        logits = out.logits[:, -1]
        position = attention_mask.sum(-1, keepdim=True)  # [b, 1]: the last real token's position (first is 1)

        def next_logits(token: torch.Tensor) -> torch.Tensor:
            nonlocal attention_mask, position
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            position = position + 1
            out = model(token[:, None], attention_mask=attention_mask, position_ids=position, kv_cache=cache,
                        return_attentions=return_attentions)
            if on_forward is not None:
                on_forward(out)
            return out.logits[:, -1]

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = choose_next_token(logits, do_sample, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, text_config.pad_token_id)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        finished |= token == text_config.eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = next_logits(token)
    return torch.stack(new_tokens, dim=1)


def generate(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    images: ImageInput | Sequence[ImageInput],
    prompts: str | Sequence[str],
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    return_ids: bool = False,
    cache: str | KVCache = "dynamic",
) -> list[str] | GenerationOutput:
    """Answer each prompt about its image. Returns the decoded answers (or, with return_ids, ids as well)."""
    batch = processor(text=prompts, images=images)
    ids = generate_ids(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["token_type_ids"],
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, cache=cache,
    )
    eos = model.config.text_config.eos_token_id
    token_ids = []
    for row in ids.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)  # after <eos> there is only padding
        token_ids.append(row[:end])
    texts = [processor.decode(row) for row in token_ids]
    return GenerationOutput(texts, token_ids) if return_ids else texts
