"""PaliGemma from scratch in PyTorch: SigLIP + a linear projector + Gemma, checked against transformers.

    from paligemma import load_pretrained, generate
    model, processor = load_pretrained("path/to/checkpoint_dir")
    generate(model, processor, images=[image], prompts=["caption en"])

The package has one folder per part of the book: `models` (the model itself), `inference` (caches, decoders,
generation), `io` (images, tokenizer, processor, checkpoints), `tasks` (boxes and masks), `interpret` (attention
maps), `training` (the shapes world, pretraining, LoRA), `kernels` (fast CPU products), `quantization` (int8 and
int4 weights) and `bench` (the benchmarks).
"""

from .errors import PaliGemmaError
from .inference import (
    DynamicCache,
    GenerationOutput,
    GenerationSettings,
    KVCache,
    StaticCache,
    generate,
    generate_ids,
)
from .io.adapter import load_adapter, save_adapter
from .io.checkpoint import load_model, load_pretrained, save_pretrained
from .io.images import preprocess_image
from .io.processor import PaliGemmaProcessor
from .io.tokenizer import GemmaTokenizer
from .kernels import accelerate
from .models import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaOutput,
    SiglipVisionConfig,
)
from .training.lora import LoraSettings, apply_lora, lora_parameters, merge_lora

__version__ = "0.2.0"

__all__ = [
    "DynamicCache",
    "Gemma2Config",
    "GemmaConfig",
    "GemmaTokenizer",
    "GenerationOutput",
    "GenerationSettings",
    "KVCache",
    "LoraSettings",
    "PaliGemmaConfig",
    "PaliGemmaError",
    "PaliGemmaForConditionalGeneration",
    "PaliGemmaOutput",
    "PaliGemmaProcessor",
    "SiglipVisionConfig",
    "StaticCache",
    "accelerate",
    "apply_lora",
    "generate",
    "generate_ids",
    "load_adapter",
    "load_model",
    "load_pretrained",
    "lora_parameters",
    "merge_lora",
    "preprocess_image",
    "save_adapter",
    "save_pretrained",
]
