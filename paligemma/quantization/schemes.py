"""Weight-only quantization schemes: int8 per output channel and int4 in groups, computed as torchao computes them.

**int8**, symmetric, one float32 scale per output row n (torchao's `Int8WeightOnlyConfig`, per row)::

    scale[n] = max(max_k |W[n, k]|, eps) / 127.5          in the weight's dtype, then float32
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -128, 127)  so W ~ q * scale

**int4**, asymmetric, a scale and a zero per group of G consecutive inputs, G = 32, 64 or 128 (torchao's
`Int4WeightOnlyConfig` with the tinygemm parameters; the zero lives in the weights' domain, not the integers')::

    scale = max((max_g - min_g) / 15, smallest normal)     zero = min_g + 8 * scale     in the weight's dtype
    q     = clamp(round((W - (zero - 8 * scale)) / scale), 0, 15)                        so W ~ (q - 8) * scale + zero

Every step runs in the same dtype and order as torchao's, so the codes, scales and zeros equal its own bit for bit
(tests/test_quantization.py holds them to it). int4 codes are packed two to a byte, a layout of this library's:
in each run of 32 codes, byte j holds code j in its low four bits and code j + 16 in its high four, so one 16-byte
load unpacks into two registers of consecutive inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PaliGemmaError

INT4_GROUP_SIZES = (32, 64, 128)
INT8_EPS = torch.finfo(torch.float32).eps  # torchao's floor on int8 scales, whatever the weight's dtype


@dataclass
class Int8Weight:
    """codes int8 [N, K] and scale float32 [N]: W ~ codes * scale[:, None]."""

    codes: torch.Tensor
    scale: torch.Tensor


@dataclass
class Int4Weight:
    """packed uint8 [N, K / 2], scale and zero [N, K / G] in the weight's dtype, and G: see the module docstring."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise PaliGemmaError(f"a weight to quantize is a matrix [out, in], got shape {list(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PaliGemmaError(f"cannot quantize {weight.dtype} weights: float32, bfloat16 or float16 only")


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] -> int8 codes and one scale per row (torchao's per-row symmetric int8, bit for bit)."""
    _check_weight(weight)
    low = torch.minimum(weight.amin(-1, keepdim=True), torch.zeros((), dtype=weight.dtype, device=weight.device))
    high = torch.maximum(weight.amax(-1, keepdim=True), torch.zeros((), dtype=weight.dtype, device=weight.device))
    scale = torch.maximum(-low, high) / 127.5  # in the weight's dtype: (127 - (-128)) / 2
    scale = torch.clamp(scale, min=INT8_EPS).to(torch.float32)
    codes = torch.clamp(torch.round(weight * (1.0 / scale)), -128, 127).to(torch.int8)  # [N, K], products in fp32
    return Int8Weight(codes, scale.squeeze(-1))


def dequantize_int8(quantized: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale, [N, K] in `dtype` (computed in float32, rounded once)."""
    return (quantized.codes.float() * quantized.scale[:, None]).to(dtype)


def int4_groups(in_features: int, group_size: int) -> int:
    """How many groups a row of `in_features` inputs makes, or the reason it cannot be split into them."""
    if group_size not in INT4_GROUP_SIZES:
        raise PaliGemmaError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise PaliGemmaError(f"{in_features} inputs do not split into groups of {group_size}")
    return in_features // group_size


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """weight [N, K] -> packed int4 codes, with a scale and a zero per group (torchao's tinygemm int4, bit for bit)."""
    _check_weight(weight)
    rows, columns = weight.shape
    groups = weight.reshape(rows, int4_groups(columns, group_size), group_size)  # [N, K] -> [N, K/G, G]
    low, high = groups.amin(-1), groups.amax(-1)  # [N, K/G], in the weight's dtype
    scale = torch.clamp((high - low) / 15.0, min=torch.finfo(weight.dtype).smallest_normal)
    zero = low + scale * 8.0
    lowest = (zero - scale * 8.0)[..., None]  # the value code 0 stands for, recomputed as torchao does
    codes = torch.clamp(torch.round((groups - lowest) / scale[..., None]), 0, 15).to(torch.uint8)
    return Int4Weight(pack_int4(codes.reshape(rows, columns)), scale, zero, group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..15, K a multiple of 32 -> [N, K / 2]: byte j of each 32 holds codes j and j + 16."""
    rows, columns = codes.shape
    runs = codes.reshape(rows, columns // 32, 2, 16)  # [N, K] -> [N, K/32, 2, 16]: the low and the high halves
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(rows, columns // 2)  # [N, K/32, 16] -> [N, K/2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: [N, K / 2] -> codes uint8 [N, K]."""
    rows, half = packed.shape
    runs = packed.reshape(rows, half // 16, 1, 16)  # [N, K/2] -> [N, K/32, 1, 16]
    return torch.cat([runs & 0xF, runs >> 4], dim=2).reshape(rows, half * 2)  # [N, K/32, 2, 16] -> [N, K]


def dequantize_int4(quantized: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - 8) * scale + zero, [N, K] in `dtype` (computed in float32 from the stored scale and zero)."""
    codes = unpack_int4(quantized.packed)
    rows, columns = codes.shape
    groups = codes.reshape(rows, columns // quantized.group_size, quantized.group_size).float() - 8.0
    weight = groups * quantized.scale.float()[..., None] + quantized.zero.float()[..., None]
    return weight.reshape(rows, columns).to(dtype)
