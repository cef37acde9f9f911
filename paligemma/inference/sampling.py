"""Choosing the next token: greedily, or by sampling with temperature, top-k and top-p; the settings in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PaliGemmaError


@dataclass(frozen=True)
class GenerationSettings:
    """How many tokens to write and how to choose each. Impossible values are refused when the settings are made.

    Greedy (`do_sample=False`) takes the arg-max; sampling divides the logits by `temperature`, keeps the `top_k`
    most likely tokens (0 or None: all), then the smallest set whose probability reaches `top_p`, and draws from
    what is left with a generator seeded by `seed` (None: a fresh seed).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        count = self.max_new_tokens
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise PaliGemmaError(f"max_new_tokens must be a non-negative integer, got {count!r}")
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise PaliGemmaError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise PaliGemmaError(f"top_p must lie in (0, 1] when sampling, got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise PaliGemmaError(f"top_k must be a non-negative integer (0 for no limit), got {self.top_k!r}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded random source of one generation run (None when decoding greedily)."""
        if not self.do_sample:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


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
    logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [b, vocab] -> next token ids [b]: the arg-max, or a draw from `sampling_distribution`."""
    if not settings.do_sample:
        return logits.argmax(-1)
    probabilities = sampling_distribution(logits, settings.temperature, settings.top_k, settings.top_p)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
