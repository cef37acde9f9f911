"""Shared fixtures: a tokenizer the project trains, and small random checkpoints written by transformers.

Everything is built once per test session in a temporary folder, from seeds, on the CPU, in float32.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.training.tokenizer_training import train_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")

TOKENIZER_VOCAB = 1600
TEXT_VOCAB = 1664  # padded past the tokenizer, as PaliGemma 1 pads 257152 pieces to 257216 rows

WORDS = (
    "a an the red green blue yellow purple orange black white circle square triangle shape shapes cat dog car "
    "tree house person on in of with and is are what color how many there caption answer detect segment en fr "
    "photo image picture small large big left right top bottom middle near far above below one two three yes no "
    "sky grass water road sitting standing running looking at next to behind front this that"
).split()


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Sentences in the style of PaliGemma prompts and answers, for training the test tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        out.append(sentence + rng.choice(["", "?", ".", " 12", " 3.5"]))
    return out


def tiny_config_dict(
    image_size: int = 56, num_key_value_heads: int = 1, num_attention_heads: int = 4, image_token_index: int = 5
) -> dict:
    """A PaliGemma config small enough for CPU tests, in transformers' keyword layout."""
    return dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=14, vision_use_head=False,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=16, vocab_size=TEXT_VOCAB,
        ),
        image_token_index=image_token_index,
        projection_dim=64,
        vocab_size=TEXT_VOCAB,
    )


def random_reference_model(config_dict: dict, seed: int = 0, attn: str = "eager"):
    """A transformers PaliGemma with every weight random (norm weights too, so that `1 + w` is exercised)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**config_dict)).eval()
    model.set_attn_implementation(attn)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            scale = 0.3 if param.dim() == 1 else fan_in**-0.5  # activations of order one throughout
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paligemma")


@pytest.fixture(scope="session")
def tokenizer_file(workdir) -> Path:
    """A tokenizer with an `<image>` piece (id 5, after `<mask>` at 4 as in Gemma's)."""
    return train_tokenizer(corpus(), workdir / "tokenizer" / "tokenizer.model", vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def tokenizer_file_without_image(workdir) -> Path:
    """A tokenizer laid out like the real one: no `<image>` piece, so its id is the vocabulary size."""
    return train_tokenizer(
        corpus(), workdir / "tokenizer_no_image" / "tokenizer.model", vocab_size=TOKENIZER_VOCAB,
        include_image_token=False,
    )


def write_reference_checkpoint(directory: Path, config_dict: dict, tokenizer: Path, seed: int = 0, **save_kwargs):
    """Save a random transformers model with its own `save_pretrained`, plus the tokenizer."""
    model = random_reference_model(config_dict, seed)
    model.save_pretrained(directory, **save_kwargs)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return model


@pytest.fixture(scope="session")
def mqa_checkpoint(workdir, tokenizer_file):
    """(folder, transformers model): multi-query attention, 56-pixel images (16 image tokens)."""
    directory = workdir / "mqa"
    return directory, write_reference_checkpoint(directory, tiny_config_dict(), tokenizer_file, seed=1)


@pytest.fixture(scope="session")
def gqa_checkpoint(workdir, tokenizer_file_without_image):
    """(folder, transformers model): grouped-query attention, 84-pixel images, `<image>` id past the tokenizer."""
    directory = workdir / "gqa"
    config = tiny_config_dict(image_size=84, num_key_value_heads=2, image_token_index=TOKENIZER_VOCAB)
    return directory, write_reference_checkpoint(directory, config, tokenizer_file_without_image, seed=2)


def reference_processor(checkpoint_dir: Path):
    """transformers' PaliGemmaProcessor over the same tokenizer.model, with the exact PIL image processor."""
    import json

    from transformers import GemmaTokenizer, PaliGemmaProcessor, SiglipImageProcessorPil

    config = json.loads((checkpoint_dir / "config.json").read_text())
    size = config["vision_config"]["image_size"]
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    image_processor.image_seq_length = (size // config["vision_config"]["patch_size"]) ** 2
    tokenizer = GemmaTokenizer.from_pretrained(str(checkpoint_dir))
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def random_image(seed: int, width: int = 40, height: int = 30, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    array = rng.randint(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), array.tobytes())


# The largest difference each numeric check saw (against transformers, or cached against uncached), printed at the end.
MEASURED: dict[str, float] = {}


@torch.no_grad()
def cached_and_recomputed_logits(model, prompt: dict, new_tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `new_tokens` [b, steps] one at a time through `cache` after the prompt, and the same sequence in one
    uncached pass; both as logits [b, steps, vocab] for the positions that predict each new token."""
    batch, steps = new_tokens.shape
    out = model(**prompt, kv_cache=cache)
    cached = [out.logits[:, -1]]
    mask = prompt["attention_mask"]
    for step in range(steps - 1):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1)
        out = model(new_tokens[:, step : step + 1], attention_mask=mask, kv_cache=cache)
        cached.append(out.logits[:, -1])
    # The same sequence in one pass, without a cache: prompt then the suffix tokens, causal.
    suffix = torch.ones_like(new_tokens[:, :-1])
    recomputed = model(
        torch.cat([prompt["input_ids"], new_tokens[:, :-1]], dim=-1), pixel_values=prompt["pixel_values"],
        attention_mask=torch.cat([prompt["attention_mask"], suffix], dim=-1),
        token_type_ids=torch.cat([prompt["token_type_ids"], suffix], dim=-1),
    ).logits
    length = prompt["input_ids"].shape[1]
    return torch.stack(cached, dim=1), recomputed[:, length - 1 :]


def fixed_shape_logits(model, prompt: dict, new_tokens: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """Decode `new_tokens` [b, steps] through `FixedShapeDecoder` after the prompt: logits [b, steps, vocab], as
    `cached_and_recomputed_logits` gives them (its recomputed half is what these must equal)."""
    from paligemma.inference.fixed_shape import FixedShapeDecoder

    batch, steps = new_tokens.shape
    decoder = FixedShapeDecoder(model, batch, prompt["input_ids"].shape[1] + steps, compile=compile)
    logits = [decoder.prefill(prompt)]
    for step in range(steps - 1):
        logits.append(decoder.step(new_tokens[:, step]).clone())  # the step's output tensor is reused
    return torch.stack(logits, dim=1)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """`assert_close`, also recording max |actual - expected| under the current test's name."""
    import os

    from torch.testing import assert_close

    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0].split("::", 1)[-1]
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    MEASURED[test] = max(MEASURED.get(test, 0.0), diff)
    assert_close(actual, expected, atol=atol, rtol=rtol)


def pytest_terminal_summary(terminalreporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("largest |difference| per numeric check (float32)")
    for name, diff in sorted(MEASURED.items()):
        terminalreporter.write_line(f"{diff:10.3e}  {name}")
