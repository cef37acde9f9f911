"""Smaller weights: int8 and int4 weight-only quantization (schemes, the quantized layer, whole models)."""
