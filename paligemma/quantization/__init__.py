"""Smaller weights: int8 and int4 weight-only quantization.

Read in the book's order: `schemes` (what quantization does to a weight matrix, as torchao does it), `linear` (the
quantized layer and its kernels), then `model` (`quantize`, a whole PaliGemma at once).
"""

from .linear import QuantizedLinear
from .model import QuantizedEmbedding, model_bytes, quantize
from .schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "dequantize_int4", "dequantize_int8", "model_bytes", "quantize",
           "quantize_int4", "quantize_int8"]
