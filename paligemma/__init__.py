"""PaliGemma from scratch in PyTorch: SigLIP + a linear projector + Gemma, checked against transformers.

    from paligemma import load_pretrained, generate
    model, processor = load_pretrained("path/to/checkpoint_dir")
    generate(model, processor, images=[image], prompts=["caption en"])
"""

from .checkpoint import load_model, load_pretrained, save_pretrained
from .config import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
from .errors import PaliGemmaError
from .generation import GenerationOutput, generate, generate_ids
from .kv_cache import DynamicCache, KVCache, StaticCache
from .model import PaliGemmaForConditionalGeneration, PaliGemmaOutput
from .processing import GemmaTokenizer, PaliGemmaProcessor, preprocess_image

__version__ = "0.1.0"

__all__ = [
    "DynamicCache",
    "Gemma2Config",
    "GemmaConfig",
    "GemmaTokenizer",
    "GenerationOutput",
    "KVCache",
    "PaliGemmaConfig",
    "PaliGemmaError",
    "PaliGemmaForConditionalGeneration",
    "PaliGemmaOutput",
    "PaliGemmaProcessor",
    "SiglipVisionConfig",
    "StaticCache",
    "generate",
    "generate_ids",
    "load_model",
    "load_pretrained",
    "preprocess_image",
    "save_pretrained",
]
