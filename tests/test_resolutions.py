"""Every resolution from the config alone: image tokens, position embeddings, preprocessing, logits.

PaliGemma comes at 224, 448 and 896 pixels (256, 1024 and 4096 image tokens of 14-pixel patches). Nothing in
the library names a resolution: the vision config's image_size and patch_size decide everything.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import (
    TEXT_VOCAB,
    TOKENIZER_VOCAB,
    TOL,
    assert_matches,
    gemma2_config_dict,
    random_image,
    real_paligemma2_config,
    reference_processor,
    tiny_config_dict,
    write_reference_checkpoint,
)
from paligemma import PaliGemmaError, PaliGemmaProcessor, load_pretrained


@pytest.mark.parametrize("resolution", [224, 448, 896])
def test_processor_at_full_resolutions(workdir, tokenizer_file_without_image, resolution):
    """A PaliGemma 2 config.json is all the processor needs: sizes, token counts, and the reference's exact pixels."""
    directory = workdir / f"processor_{resolution}"
    directory.mkdir()
    values = real_paligemma2_config("3b", resolution)
    values["image_token_index"] = TOKENIZER_VOCAB  # the small tokenizer's first id past its pieces
    (directory / "config.json").write_text(json.dumps(values))
    shutil.copyfile(tokenizer_file_without_image, directory / "tokenizer.model")
    processor = PaliGemmaProcessor.from_pretrained(directory)
    tokens = (resolution // 14) ** 2
    assert (processor.image_size, processor.num_image_tokens) == (resolution, tokens)
    images = [random_image(1, 300, 200), random_image(2, 90, 160, mode="RGBA")]
    prompts = ["caption en", "detect cat ; dog"]
    batch = processor(text=prompts, images=images)
    assert batch["pixel_values"].shape == (2, 3, resolution, resolution)
    assert ((batch["input_ids"] == TOKENIZER_VOCAB).sum(-1) == tokens).all()
    expected = reference_processor(directory)(text=prompts, images=images, return_tensors="pt", padding="longest")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert_matches(batch["pixel_values"], expected["pixel_values"], atol=0, rtol=0)


@pytest.mark.parametrize("image_size", [28, 56, 112])
@pytest.mark.parametrize("decoder", ["gemma", "gemma2"])
def test_logits_at_several_resolutions(workdir, tokenizer_file, tokenizer_file_without_image, image_size, decoder):
    """Tiny models at 28, 56 and 112 pixels (4, 16 and 64 image tokens), both decoders, against transformers."""
    directory = workdir / f"resolution_{decoder}_{image_size}"
    if decoder == "gemma":
        config = tiny_config_dict(image_size=image_size, num_key_value_heads=2)
        tokenizer = tokenizer_file
    else:
        config = gemma2_config_dict(image_size=image_size)
        tokenizer = tokenizer_file_without_image
    ref = write_reference_checkpoint(directory, config, tokenizer, seed=image_size)
    model, processor = load_pretrained(directory)
    tokens = (image_size // 14) ** 2
    assert model.config.num_image_tokens == processor.num_image_tokens == tokens
    assert model.vision_tower.embeddings.position_embedding.weight.shape[0] == tokens
    batch = processor(text=["caption en", "answer en how many shapes are there?"],
                      images=[random_image(3, 50, 70), random_image(4, 120, 40)])
    assert batch["pixel_values"].shape[-2:] == (image_size, image_size)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = ref(**batch, position_ids=batch["attention_mask"].cumsum(-1)).logits
    real = batch["attention_mask"].bool()
    assert_matches(ours[real], theirs[real], **TOL)
    assert ours.shape[-1] == (TEXT_VOCAB if decoder == "gemma" else TOKENIZER_VOCAB)


def test_pixels_of_another_resolution_are_refused(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=["caption en"], images=[random_image(0)])
    batch["pixel_values"] = torch.zeros(1, 3, 112, 112)
    with pytest.raises(PaliGemmaError, match=r"pixel_values must have shape \[batch, 3, 56, 56\]"):
        model(**batch)
