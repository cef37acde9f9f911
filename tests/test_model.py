"""The whole model against transformers: logits, loss, the KV cache, and the full-size architecture."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    PROMPTS,
    TEXT_VOCAB,
    TOL,
    assert_matches,
    cached_and_recomputed_logits,
    random_image,
    real_paligemma_3b_224,
    reference_logits,
)
from paligemma import DynamicCache, PaliGemmaConfig, PaliGemmaForConditionalGeneration, StaticCache, load_pretrained
from paligemma.io.layout import to_library_name


@pytest.fixture(scope="module", params=["mqa", "gqa"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_logits_single_prompt(checkpoint, implementation):
    directory, ref = checkpoint
    model, processor = load_pretrained(directory)
    model.set_attention_implementation(implementation)
    batch = processor(text=["caption en"], images=[random_image(0)])
    with torch.no_grad():
        ours = model(**batch).logits
    assert_matches(ours, reference_logits(ref, batch).logits, **TOL)


def test_logits_padded_batch(checkpoint):
    directory, ref = checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(1), random_image(2, 64, 64)])
    assert (batch["attention_mask"][0] == 0).any(), "the shorter prompt must be left padded"
    with torch.no_grad():
        ours = model(**batch).logits
    expected = reference_logits(ref, batch).logits
    real = batch["attention_mask"].bool()
    assert_matches(ours[real], expected[real], **TOL)


def test_loss_with_suffixes(checkpoint):
    directory, ref = checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(3), random_image(4)], suffix=["a red circle", "red"])
    with torch.no_grad():
        ours = model(**batch)
    expected = reference_logits(ref, batch, labels=batch["labels"])
    real = batch["attention_mask"].bool()
    assert_matches(ours.logits[real], expected.logits[real], **TOL)
    assert_matches(ours.loss, expected.loss, **TOL)
    # Only the suffix is learned: changing the prompt's labels to anything else changes nothing.
    assert (batch["labels"][batch["token_type_ids"] == 0] == -100).all()


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_kv_cache_decoding_equals_recomputation(mqa_checkpoint, cache_kind):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    # Run the prompts once, then feed answer tokens one at a time, as generation does.
    prompt = processor(text=PROMPTS, images=[random_image(5), random_image(6)])
    suffix_ids = [processor.tokenizer.encode(s) for s in ["red circle", "two small cats"]]
    steps = min(len(ids) for ids in suffix_ids)
    new_tokens = torch.tensor([ids[:steps] for ids in suffix_ids])  # [b, steps]
    config = model.config.text_config
    if cache_kind == "dynamic":
        cache = DynamicCache()
    else:
        cache = StaticCache(config.num_hidden_layers, 2, config.num_key_value_heads, config.head_dim,
                            prompt["input_ids"].shape[1] + steps)
    cached, recomputed = cached_and_recomputed_logits(model, prompt, new_tokens, cache)
    length = prompt["input_ids"].shape[1]
    assert_matches(cached, recomputed, **TOL)
    assert cache.get_seq_length() == length + steps - 1


def test_image_token_outside_embedding_table_is_embedded_as_pad(mqa_checkpoint):
    """PaliGemma 2 puts <image> past the table; the reference embeds pad there before overwriting it."""
    directory, _ = mqa_checkpoint
    model, _ = load_pretrained(directory)
    model.config.image_token_index = TEXT_VOCAB + 10
    try:
        ids = torch.tensor([[TEXT_VOCAB + 10] * 16 + [2, 5, 6]])
        features = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
        embeds = model.embed_inputs(ids, features)
        assert_matches(embeds[0, :16], features[0], atol=0, rtol=0)
        assert_matches(embeds[0, 16:], model.language_model.embed(ids[:, 16:])[0], atol=0, rtol=0)
    finally:
        model.config.image_token_index = 5


def test_full_size_architecture_matches_reference():
    from transformers import PaliGemmaConfig as ReferenceConfig
    from transformers import PaliGemmaForConditionalGeneration as Reference

    values = real_paligemma_3b_224()
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(values))
        ref = Reference(ReferenceConfig(**values))
    assert ours.num_parameters() == 2_923_466_480
    assert sum(p.numel() for p in ref.parameters()) == 2_923_466_480
    ours_shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    ref_shapes = {to_library_name(name): tuple(t.shape) for name, t in ref.state_dict().items()}  # tied head too
    assert ours_shapes == ref_shapes
    assert ours.config.num_image_tokens == 256


def test_loss_without_full_logits_is_the_same(mqa_checkpoint):
    """Training may skip the vocabulary projection where no label needs it; the loss must not change."""
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(7), random_image(8)], suffix=["a red circle", "red"])
    full = model(**batch)
    lean = model(**batch, return_logits=False)
    assert lean.logits is None
    assert_matches(lean.loss, full.loss, atol=1e-6, rtol=1e-6)
