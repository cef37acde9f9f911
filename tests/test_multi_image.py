"""Several images per prompt (`images=[[im1, im2], [im3]]`): the processor, logits, loss and greedy generation
against transformers, the errors, and the command line's repeated `--image`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TOL, assert_matches, random_image, reference_logits, reference_processor, strip_after_eos
from paligemma import PaliGemmaError, PaliGemmaProcessor, generate, load_pretrained
from paligemma.cli import main

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 24
PROMPTS = ["caption en", "answer en what color is the big circle on the left?"]
SUFFIXES = ["a red circle and a blue square", "red"]


def two_and_one():
    return [[random_image(40), random_image(41, 70, 30)], [random_image(42, 20, 60)]]


def one_and_three():
    return [[random_image(43, 50, 50)], [random_image(44), random_image(45, 30, 90), random_image(46, 64, 64, "RGBA")]]


LAYOUTS = {"two and one": two_and_one, "one and three": one_and_three}


@pytest.fixture(scope="module", params=["mqa", "gqa"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_processor_matches_reference(checkpoint, layout):
    directory, _ = checkpoint
    ours, ref = PaliGemmaProcessor.from_pretrained(directory), reference_processor(directory)
    images = LAYOUTS[layout]()
    batch = ours(text=PROMPTS, images=images, suffix=SUFFIXES)
    expected = ref(text=PROMPTS, images=images, suffix=SUFFIXES, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"):
        assert torch.equal(batch[key], torch.as_tensor(expected[key])), key
    counts = [len(row) for row in images]
    assert batch["pixel_values"].shape[0] == sum(counts)
    image_tokens = (batch["input_ids"] == ours.tokenizer.image_token_id).sum(-1)
    assert image_tokens.tolist() == [ours.num_image_tokens * count for count in counts]
    # Without suffixes too, and the transformers habit of one leading <image> per image gives the same ids.
    bare = ours(text=PROMPTS, images=images)
    marked_prompts = ["<image>" * count + prompt for count, prompt in zip(counts, PROMPTS)]
    marked = ours(text=marked_prompts, images=images)
    reference_marked = ref(text=marked_prompts, images=images, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(bare[key], marked[key]), key
        assert torch.equal(bare[key], torch.as_tensor(reference_marked[key])), key


def test_logits_and_loss_match_reference(checkpoint):
    directory, ref = checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=two_and_one(), suffix=SUFFIXES)
    with torch.no_grad():
        ours = model(**batch)
    expected = reference_logits(ref, batch, labels=batch["labels"])
    real = batch["attention_mask"].bool()
    assert (~real).any(), "rows of different image counts must be left padded"
    assert_matches(ours.logits[real], expected.logits[real], **TOL)
    assert_matches(ours.loss, expected.loss, **TOL)


def test_images_of_a_row_are_not_interchangeable(mqa_checkpoint):
    """Each image's features land on its own tokens: swapping the two images of a prompt changes the logits."""
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    first, second = random_image(47), random_image(48, 30, 70)
    with torch.no_grad():
        forward = model(**processor(text="caption en", images=[[first, second]])).logits
        swapped = model(**processor(text="caption en", images=[[second, first]])).logits
    assert not torch.allclose(forward, swapped, atol=1e-3)


def reference_generate(ref, batch, max_new_tokens):
    with torch.no_grad():
        out = ref.generate(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], max_new_tokens=max_new_tokens, do_sample=False,
        )
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", ["mqa", "gqa"])
@pytest.mark.parametrize("cache", ["dynamic", "static", "graph"])
def test_greedy_generation_matches_reference(request, name, cache):
    directory, ref = request.getfixturevalue(f"{name}_checkpoint")
    model, processor = load_pretrained(directory)
    images = two_and_one()
    result = generate(model, processor, images=images, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, return_ids=True,
                      cache=cache)
    batch = reference_processor(directory)(text=PROMPTS, images=images, return_tensors="pt", padding="longest")
    assert batch["pixel_values"].shape[0] == 3 and (batch["attention_mask"] == 0).any()
    expected = strip_after_eos(reference_generate(ref, batch, NEW_TOKENS).tolist())
    assert result.token_ids == expected
    assert min(len(ids) for ids in result.token_ids) >= 20, "the comparison must cover at least 20 tokens"
    assert result.texts == [processor.decode(ids) for ids in expected]


# --- errors ------------------------------------------------------------------------------------------------------


def test_a_prompt_without_images_is_refused(mqa_checkpoint):
    processor = PaliGemmaProcessor.from_pretrained(mqa_checkpoint[0])
    with pytest.raises(PaliGemmaError, match="prompt 1 has an empty list of images") as error:
        processor(text=PROMPTS, images=[[random_image(50)], []])
    assert "\n" not in str(error.value)
    with pytest.raises(PaliGemmaError, match="got 3 images for 2 prompts"):
        processor(text=PROMPTS, images=[[random_image(50)], [random_image(51)], [random_image(52)]])


def test_image_markers_must_match_the_images(mqa_checkpoint):
    processor = PaliGemmaProcessor.from_pretrained(mqa_checkpoint[0])
    images = [[random_image(53), random_image(54)]]
    with pytest.raises(PaliGemmaError, match=r"a prompt with 2 image\(s\) may hold <image> markers only at its start"):
        processor(text="<image>caption en", images=images)
    with pytest.raises(PaliGemmaError, match="one per image or none; found 2"):
        processor(text="caption <image><image>en", images=images)


def test_image_tokens_that_are_not_whole_images_are_refused(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=["caption en"], images=[[random_image(55), random_image(56)]])
    patches = processor.num_image_tokens
    torn = dict(batch, input_ids=batch["input_ids"].clone())
    torn["input_ids"][0, :3] = processor.tokenizer.bos_id  # 2 * patches - 3 image tokens: not a multiple
    with torch.no_grad(), pytest.raises(PaliGemmaError) as error:
        model(**torn)
    message = str(error.value)
    assert f"each sequence needs {patches} <image> tokens (one per patch) for each of its images" in message
    assert f"found [{2 * patches - 3}]" in message and "\n" not in message
    one_image = dict(batch, pixel_values=batch["pixel_values"][:1])  # whole images, but one image for two
    with torch.no_grad(), pytest.raises(PaliGemmaError) as error:
        model(**one_image)
    assert f"{patches} in all for 1 images; found [{2 * patches}]" in str(error.value)


def test_a_prompt_too_long_for_the_context_is_refused(mqa_checkpoint):
    base = PaliGemmaProcessor.from_pretrained(mqa_checkpoint[0])
    processor = PaliGemmaProcessor(base.tokenizer, base.image_size, base.num_image_tokens, max_length=40)
    length = len(processor.prefix_ids("caption en", num_images=3))
    assert length == 3 * base.num_image_tokens + 1 + len(base.tokenizer.encode("caption en\n")) > 40
    fits = processor(text="caption en", images=[random_image(57)])
    assert fits["input_ids"].shape[1] <= 40
    three = [random_image(57), random_image(58), random_image(59)]
    with pytest.raises(PaliGemmaError) as error:
        processor(text=["caption en", "caption en"], images=[[random_image(60)], three])
    assert str(error.value) == f"prompt 1 is {length} tokens long, which exceeds the model's context of 40"


# --- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_image_cli")
    paths = [folder / "first.png", folder / "second.jpg"]
    random_image(61, 64, 48).save(paths[0])
    random_image(62, 40, 80).save(paths[1])
    return paths


def test_cli_with_two_images_answers_as_the_api(mqa_checkpoint, image_files):
    directory, _ = mqa_checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--image", image_files[0], "--image", image_files[1], "--prompt", "caption en", "--model", directory,
            "--max-new-tokens", 8]
    result = subprocess.run([sys.executable, "-m", "paligemma", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    model, processor = load_pretrained(directory)
    expected = generate(model, processor, images=[image_files], prompts=["caption en"], max_new_tokens=8)[0]
    assert result.stdout == expected + "\n"
    assert "Traceback" not in result.stderr


def test_cli_missing_second_image(mqa_checkpoint, image_files, tmp_path, capsys):
    directory, _ = mqa_checkpoint
    missing = tmp_path / "absent.png"
    args = ["--image", str(image_files[0]), "--image", str(missing), "--prompt", "caption en", "--model",
            str(directory), "--device", "cpu"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"error: image file not found: {missing}"
