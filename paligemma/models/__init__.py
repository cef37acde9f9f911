"""The model itself, in plain PyTorch: configs, attention, SigLIP, Gemma, Gemma 2 and PaliGemma.

Read in the book's order: `config`, `attention`, `siglip`, `gemma`, `gemma2`, then `paligemma` (the projector,
the merging of image and text, the prefix-LM mask and the loss). No kernels, no file formats, no CPU probing:
`paligemma.kernels` speeds a model up from outside, and `paligemma.io` reads and writes it.
"""

from .config import FULL, SLIDING, Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
from .paligemma import PaliGemmaForConditionalGeneration, PaliGemmaOutput, prefix_lm_mask

__all__ = [
    "FULL",
    "SLIDING",
    "Gemma2Config",
    "GemmaConfig",
    "PaliGemmaConfig",
    "PaliGemmaForConditionalGeneration",
    "PaliGemmaOutput",
    "SiglipVisionConfig",
    "prefix_lm_mask",
]
