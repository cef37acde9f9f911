"""Ids with no tokenizer piece: PaliGemma 1's embedding table has 257,216 rows for 257,152 pieces, so a model can
emit an id the tokenizer cannot spell. Generation must still finish and return text for every sequence, as
transformers does (its tokenizer drops such ids); `strict=True` says which id it was instead."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import TOKENIZER_VOCAB, random_image, reference_processor
from paligemma import PaliGemmaError, generate, load_pretrained

PADDED_ID = TOKENIZER_VOCAB + 20  # a row of the embedding table past the tokenizer's pieces
PROMPTS = ["caption en", "answer en what is this?"]


@pytest.fixture(scope="module")
def emitting_checkpoint(mqa_checkpoint, tmp_path_factory):
    """The mqa checkpoint with embedding row PADDED_ID turned towards the first answer position's hidden state, so
    greedy decoding picks it first (the head is tied: that row is also its logit weight)."""
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(30), random_image(31)])
    captured = {}
    handle = model.language_model.norm.register_forward_hook(lambda _m, _i, out: captured.update(hidden=out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    last = captured["hidden"][:, -1]  # [b, d]: what predicts each first token
    direction = last.sum(0) / last.sum(0).norm()
    with torch.no_grad():
        model.language_model.embed_tokens.weight[PADDED_ID] = 60.0 * direction
    target = tmp_path_factory.mktemp("emits_padded_id")
    model.save_pretrained(target)
    shutil.copyfile(directory / "tokenizer.model", target / "tokenizer.model")
    return target


def test_generation_finishes_and_matches_transformers(emitting_checkpoint):
    from transformers import PaliGemmaForConditionalGeneration as Reference

    model, processor = load_pretrained(emitting_checkpoint)
    images = [random_image(30), random_image(31)]
    out = generate(model, processor, images, PROMPTS, max_new_tokens=8, return_ids=True)
    assert all(row[0] == PADDED_ID for row in out.token_ids), "the model must emit the id the tokenizer lacks"
    assert processor.tokenizer.vocab_size <= PADDED_ID < model.config.text_config.vocab_size

    reference = Reference.from_pretrained(emitting_checkpoint, attn_implementation="eager").eval()
    reference_processor_ = reference_processor(emitting_checkpoint)
    batch = reference_processor_(text=PROMPTS, images=images, return_tensors="pt", padding="longest")
    with torch.no_grad():
        ids = reference.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    rows = [row[: row.index(1) + 1] if 1 in row else row for row in ids.tolist()]
    assert rows == out.token_ids
    assert out.texts == reference_processor_.batch_decode(rows, skip_special_tokens=True)


def test_strict_decoding_names_the_id(emitting_checkpoint):
    model, processor = load_pretrained(emitting_checkpoint)
    with pytest.raises(PaliGemmaError, match=f"token id {PADDED_ID} is outside the tokenizer's {TOKENIZER_VOCAB}"):
        generate(model, processor, [random_image(30)], ["caption en"], max_new_tokens=4, strict=True)
    assert processor.decode([PADDED_ID, 1]) == ""
