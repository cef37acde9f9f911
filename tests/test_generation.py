"""Generation against transformers' `generate`, and the sampling rules on their own."""

from __future__ import annotations

import pytest
import torch

from helpers import random_image, reference_processor, strip_after_eos
from paligemma import PaliGemmaError, generate, load_pretrained
from paligemma.inference.sampling import GenerationSettings, choose_next_token, sampling_distribution

NEW_TOKENS = 24


def reference_generate(ref, batch, max_new_tokens):
    with torch.no_grad():
        out = ref.generate(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", ["mqa", "gqa"])
@pytest.mark.parametrize("cache", ["dynamic", "static", "graph"])
def test_greedy_matches_reference_single_prompt(request, name, cache):
    directory, ref = request.getfixturevalue(f"{name}_checkpoint")
    model, processor = load_pretrained(directory)
    image = random_image(10)
    result = generate(model, processor, images=[image], prompts=["caption en"], max_new_tokens=NEW_TOKENS,
                      return_ids=True, cache=cache)
    batch = reference_processor(directory)(text=["caption en"], images=[image], return_tensors="pt")
    expected = strip_after_eos(reference_generate(ref, batch, NEW_TOKENS).tolist())
    assert result.token_ids == expected
    assert len(result.token_ids[0]) >= 20, "the comparison must cover at least 20 tokens"


@pytest.mark.parametrize("name", ["mqa", "gqa"])
@pytest.mark.parametrize("cache", ["dynamic", "graph", "compiled"])
def test_greedy_matches_reference_padded_batch(request, name, cache):
    directory, ref = request.getfixturevalue(f"{name}_checkpoint")
    model, processor = load_pretrained(directory)
    images = [random_image(11), random_image(12, 80, 20), random_image(13, 20, 80)]
    prompts = ["caption en", "answer en what color is the big circle on the left?", "detect cat ; dog"]
    result = generate(model, processor, images=images, prompts=prompts, max_new_tokens=NEW_TOKENS, return_ids=True,
                      cache=cache)
    batch = reference_processor(directory)(text=prompts, images=images, return_tensors="pt", padding="longest")
    expected = strip_after_eos(reference_generate(ref, batch, NEW_TOKENS).tolist())
    assert result.token_ids == expected
    assert min(len(ids) for ids in result.token_ids) >= 20
    assert result.texts == [processor.decode(ids) for ids in expected]


def test_sampling_is_reproducible_with_a_seed(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    kwargs = dict(images=[random_image(14)] * 2, prompts=["caption en"] * 2, max_new_tokens=12, do_sample=True,
                  temperature=1.5, top_k=50, top_p=0.9)
    first = generate(model, processor, seed=7, return_ids=True, **kwargs)
    again = generate(model, processor, seed=7, return_ids=True, **kwargs)
    other = generate(model, processor, seed=8, return_ids=True, **kwargs)
    greedy = generate(model, processor, images=[random_image(14)], prompts=["caption en"], max_new_tokens=12,
                      return_ids=True)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids[0] != greedy.token_ids[0]


def test_sampling_distribution_rules():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    full = sampling_distribution(logits)
    torch.testing.assert_close(full, logits.softmax(-1))
    # Temperature flattens (>1) or sharpens (<1).
    assert sampling_distribution(logits, temperature=2.0)[0, 0] < full[0, 0] < sampling_distribution(logits, 0.5)[0, 0]
    # Top-k keeps exactly k tokens.
    assert (sampling_distribution(logits, top_k=2)[0] > 0).tolist() == [True, True, False, False, False]
    # Top-p keeps the smallest head of the distribution whose mass reaches p.
    p_two = float(full[0, :2].sum())
    assert (sampling_distribution(logits, top_p=p_two - 1e-4)[0] > 0).sum() == 2
    assert (sampling_distribution(logits, top_p=p_two + 1e-4)[0] > 0).sum() == 3
    assert (sampling_distribution(logits, top_p=1e-6)[0] > 0).sum() == 1  # the most likely token always stays
    for probabilities in (sampling_distribution(logits, 0.7, 3, 0.8), sampling_distribution(logits, top_p=0.5)):
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(1))
    # Greedy is the arg-max; sampling with a seed is repeatable.
    assert choose_next_token(logits, GenerationSettings()).item() == 0
    sampling = GenerationSettings(do_sample=True)
    draws = [choose_next_token(logits, sampling, torch.Generator().manual_seed(3)).item() for _ in range(2)]
    assert draws[0] == draws[1]


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(20000, 1)
    settings = GenerationSettings(do_sample=True, temperature=1.0, top_p=0.9)
    draws = choose_next_token(logits, settings, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = sampling_distribution(logits[:1], top_p=0.9)[0]
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=-3), "top_k"),
    ],
)
def test_bad_generation_settings(mqa_checkpoint, settings, message):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    with pytest.raises(PaliGemmaError, match=message) as error:
        generate(model, processor, images=[random_image(0)], prompts=["caption en"], **settings)
    assert "\n" not in str(error.value)


def test_prompt_longer_than_context(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    processor.max_length = 64
    with pytest.raises(PaliGemmaError, match="context"):
        generate(model, processor, images=[random_image(0)], prompts=["caption en " * 40])
    processor.max_length = model.config.text_config.max_position_embeddings
    with pytest.raises(PaliGemmaError, match="context"):
        generate(model, processor, images=[random_image(0)], prompts=["caption en"], max_new_tokens=9000)


def test_zero_new_tokens_gives_empty_answers(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    assert generate(model, processor, images=[random_image(0)], prompts=["caption en"], max_new_tokens=0) == [""]
