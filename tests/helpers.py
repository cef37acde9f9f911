"""Plain helpers the tests import (`from helpers import ...`): constants, configs, random models and images, and
comparisons that record how far apart two results were. Fixtures and pytest hooks live in conftest.py.

pytest puts this folder on sys.path before it imports conftest.py or a test file here (its default "prepend"
import mode, as there is no tests/__init__.py), so `helpers` is found however pytest is started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.testing import assert_close

from paligemma.bench.distributed_plan import GEMMA2_SIZES
from paligemma.kernels.cpu import is_arm64

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 against transformers, or one computation against another in float32

TOKENIZER_VOCAB = 1600
TEXT_VOCAB = 1664  # padded past the tokenizer, as PaliGemma 1 pads 257152 pieces to 257216 rows
WINDOW = 6  # the tiny PaliGemma 2's sliding window: much shorter than its sequences
PROMPTS = ["caption en", "answer en what color is the big circle on the left?"]
# The streaming kernel's variants for this CPU's architecture: a test of one is skipped only where the CPU lacks its
# instructions (AVX-512 on an AVX2-only x86 machine).
ARCHITECTURE_VARIANTS = ("neon",) if is_arm64() else ("avx512", "avx2")

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


# ---------------------------------------------------------------------------------------------------------------
# Configs, in transformers' keyword layout


def tiny_config_dict(
    image_size: int = 56, num_key_value_heads: int = 1, num_attention_heads: int = 4, image_token_index: int = 5
) -> dict:
    """A PaliGemma config small enough for CPU tests."""
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


def gemma2_config_dict(softcap: bool = True, window: int | None = WINDOW, image_size: int = 56) -> dict:
    """A tiny PaliGemma 2: grouped-query heads (4 query, 2 key/value), small soft-caps (attention 2, logits 3),
    a query_pre_attn_scalar unlike head_dim, sliding layers with a short window, `<image>` past the table."""
    return dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=14, vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=TOKENIZER_VOCAB, query_pre_attn_scalar=24,
            sliding_window=window,
            attn_logit_softcapping=2.0 if softcap else None, final_logit_softcapping=3.0 if softcap else None,
        ),
        image_token_index=TOKENIZER_VOCAB,  # past the table: PaliGemma 2 has exactly the tokenizer's rows
        projection_dim=64,
        vocab_size=TOKENIZER_VOCAB,
    )


def real_paligemma_3b_224() -> dict:
    """The sparse config.json of google/paligemma-3b-pt-224, as published (older field names included)."""
    return {
        "_name_or_path": "final_hf_model",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,
        "ignore_index": -100,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": 2048,
        "text_config": {
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "model_type": "gemma",
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_image_tokens": 256,
            "num_key_value_heads": 1,
            "torch_dtype": "float32",
            "vocab_size": 257216,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "vision_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "num_image_tokens": 256,
            "patch_size": 14,
            "projection_dim": 2048,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    }


def real_paligemma2_config(size: str, resolution: int) -> dict:
    """A config.json in the layout of the released PaliGemma 2 checkpoints (sparse, older field names)."""
    text = {
        "model_type": "gemma2", "vocab_size": 257152, "hidden_activation": "gelu_pytorch_tanh", "hidden_act":
        "gelu_pytorch_tanh", "torch_dtype": "bfloat16", "num_image_tokens": (resolution // 14) ** 2,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 4096,
        "sliding_window_size": 4096, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
        "architectures": ["Gemma2ForCausalLM"], "is_encoder_decoder": False, **GEMMA2_SIZES[size],
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma", "_vocab_size": 257152,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048,
        "image_token_index": 257152, "num_hidden_layers": text["num_hidden_layers"],
        "projection_dim": text["hidden_size"], "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": resolution,
            "num_image_tokens": (resolution // 14) ** 2, "num_positions": (resolution // 14) ** 2,
            "projection_dim": text["hidden_size"], "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
            "torch_dtype": "bfloat16",
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Random models, checkpoints and images, all from seeds


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


def write_reference_checkpoint(directory: Path, config_dict: dict, tokenizer: Path, seed: int = 0, **save_kwargs):
    """Save a random transformers model with its own `save_pretrained`, plus the tokenizer."""
    model = random_reference_model(config_dict, seed)
    model.save_pretrained(directory, **save_kwargs)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return model


def reference_processor(checkpoint_dir: Path):
    """transformers' PaliGemmaProcessor over the same tokenizer.model, with the exact PIL image processor."""
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


# ---------------------------------------------------------------------------------------------------------------
# Running the models, and comparing what they give


def reference_logits(ref, batch: dict, labels: torch.Tensor | None = None):
    """transformers' forward on our batch (its whole output: logits, and the loss given labels), with our position
    ids (first real token at 1) and token types."""
    with torch.no_grad():
        return ref(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], position_ids=batch["attention_mask"].cumsum(-1), labels=labels,
        )


def strip_after_eos(rows, eos: int = 1) -> list[list[int]]:
    """Each row of token ids up to and including its first `eos` (the whole row where there is none)."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in (list(r) for r in rows)]


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


# The largest difference each numeric check saw (against transformers, or cached against uncached), printed at the
# end of the run by conftest's pytest_terminal_summary.
MEASURED: dict[str, float] = {}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = TOL["atol"],
                   rtol: float = TOL["rtol"]) -> None:
    """`assert_close`, also recording max |actual - expected| under the current test's name."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0].split("::", 1)[-1]
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    MEASURED[test] = max(MEASURED.get(test, 0.0), diff)
    assert_close(actual, expected, atol=atol, rtol=rtol)
