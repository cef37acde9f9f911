"""The processor against transformers' PaliGemmaProcessor with SiglipImageProcessorPil (exact, PIL-based)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_image, reference_processor
from paligemma import GemmaTokenizer, PaliGemmaError, PaliGemmaProcessor
from paligemma.io.images import preprocess_image, to_rgb


def reference_pixels(image, size):
    from transformers import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def palette_image(seed):
    return random_image(seed, 33, 21).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


def transparent_palette_image(seed):
    image = palette_image(seed)
    image.info["transparency"] = 3
    return image


IMAGES = {
    "rgb small": lambda: random_image(0, 17, 9),
    "rgb large wide": lambda: random_image(1, 500, 120),
    "rgb tall": lambda: random_image(2, 60, 300),
    "rgba": lambda: random_image(3, 64, 48, "RGBA"),
    "grey L": lambda: random_image(4, 50, 50, "L"),
    "grey with alpha LA": lambda: random_image(5, 40, 30, "RGBA").convert("LA"),
    "palette P": lambda: palette_image(6),
    "palette with transparency": lambda: transparent_palette_image(7),
    "cmyk": lambda: random_image(8, 45, 35, "CMYK"),
    "one-bit": lambda: random_image(9, 30, 30, "L").convert("1"),
    "single pixel": lambda: random_image(10, 1, 1),
}


@pytest.mark.parametrize("size", [56, 224])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_pixel_values_match_reference(kind, size):
    image = IMAGES[kind]()
    ours = preprocess_image(image, size)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_pixels(image, size), atol=0, rtol=0)
    assert ours.min() >= -1 and ours.max() <= 1


def test_sixteen_bit_images_are_rescaled_not_clipped():
    """PIL (and so the reference) clips 16-bit values to 255; ours maps 0..65535 onto 0..255."""
    values = np.random.RandomState(0).randint(0, 256, (24, 32)).astype(np.uint16)
    sixteen = Image.fromarray(values * 257)  # mode I;16, the same picture at 16-bit depth
    eight = Image.fromarray(values.astype(np.uint8))
    assert sixteen.mode == "I;16"
    torch.testing.assert_close(preprocess_image(sixteen, 56), preprocess_image(eight, 56), atol=0, rtol=0)
    assert to_rgb(sixteen).mode == "RGB"


def test_float_image():
    values = np.random.RandomState(1).rand(20, 20).astype(np.float32)
    as_float = Image.fromarray(values)  # mode F, values in [0, 1]
    as_bytes = Image.fromarray(np.round(values * 255).astype(np.uint8))
    torch.testing.assert_close(preprocess_image(as_float, 28), preprocess_image(as_bytes, 28), atol=0, rtol=0)


@pytest.fixture(params=["mqa", "gqa"])
def processors(request):
    directory, _ = request.getfixturevalue(f"{request.param}_checkpoint")
    return PaliGemmaProcessor.from_pretrained(directory), reference_processor(directory)


def test_prompt_layout_matches_reference(processors):
    ours, ref = processors
    images = [random_image(20), random_image(21, 90, 30)]
    prompts = ["caption en", "answer en how many shapes are there? <loc0012>"]
    batch = ours(text=prompts, images=images)
    expected = ref(text=prompts, images=images, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(batch[key], expected[key]), key
    n = ours.num_image_tokens
    row = batch["input_ids"][1].tolist()
    assert row[:n] == [ours.tokenizer.image_token_id] * n and row[n] == ours.tokenizer.bos_id
    assert ours.decode(row[n + 1:]) == "answer en how many shapes are there? <loc0012>\n"


def test_suffix_labels_match_reference(processors):
    ours, ref = processors
    images = [random_image(22), random_image(23)]
    prompts = ["detect circle", "caption en"]
    suffixes = ["<loc0100><loc0200><loc0300><loc0400> circle ; <loc0001><loc0002><loc0003><loc0004> circle",
                "a red circle"]
    batch = ours(text=prompts, images=images, suffix=suffixes)
    expected = ref(text=prompts, images=images, suffix=suffixes, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(batch[key], torch.as_tensor(expected[key])), key
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled[-1] == ours.tokenizer.eos_id
    assert ours.decode(labelled) == suffixes[0]


def test_leading_image_marker_is_accepted(processors):
    ours, _ = processors
    image = random_image(24)
    assert torch.equal(ours(text="<image>caption en", images=image)["input_ids"],
                       ours(text="caption en", images=image)["input_ids"])


def test_tokenizer_layout(tokenizer_file, tokenizer_file_without_image):
    tokenizer = GemmaTokenizer(tokenizer_file)
    sp = tokenizer.sp
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>"]
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.image_token_id) == (0, 1, 2, 5)
    assert sp.id_to_piece(6) == "<loc0000>" and sp.id_to_piece(6 + 1023) == "<loc1023>"
    assert sp.id_to_piece(6 + 1024) == "<seg000>" and sp.id_to_piece(6 + 1024 + 127) == "<seg127>"
    text = "detect cat <loc0001><loc1023> cat ; <seg005> 2024\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("\n") == [sp.piece_to_id("\n")]
    assert len(tokenizer.encode("12345")) == 5  # digits split
    without = GemmaTokenizer(tokenizer_file_without_image)
    assert without.image_token_id == without.vocab_size and not without.image_token_in_vocab
    assert without.decode([without.image_token_id, 2, *without.encode("hi"), 1]) == "hi"


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda p, tmp: p(text="caption en", images=tmp / "missing.png"), "not found"),
        (lambda p, tmp: p(text="caption en", images=_not_an_image(tmp)), "not a readable image"),
        (lambda p, tmp: p(text=["a", "b"], images=[random_image(0)]), "1 images for 2 prompts"),
        (lambda p, tmp: p(text="caption en", images=42), "expected a PIL image"),
        (lambda p, tmp: p(text="caption <image> en", images=random_image(0)), "<image>"),
        (lambda p, tmp: p(text=["a"], images=[random_image(0)], suffix=["x", "y"]), "suffixes"),
    ],
)
def test_bad_input_is_reported_in_one_line(processors, tmp_path, make_call, message):
    ours, _ = processors
    with pytest.raises(PaliGemmaError, match=message) as error:
        make_call(ours, tmp_path)
    assert "\n" not in str(error.value)


def _not_an_image(directory):
    path = directory / "notes.png"
    path.write_text("this is text, not pixels")
    return path


def test_truncated_image_file(tmp_path):
    path = tmp_path / "cut.png"
    random_image(0, 64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PaliGemmaError, match="not a readable image"):
        preprocess_image(path, 56)


def test_corrupt_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PaliGemmaError, match="not a sentencepiece model"):
        GemmaTokenizer(path)
