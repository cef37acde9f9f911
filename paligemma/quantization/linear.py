"""The quantized layer: `nn.Linear`'s product with int8 or int4 weights, dequantized where they are used.

A `QuantizedLinear` holds the codes and their scales (and int4's zeros) as buffers, and the bias, if any, as it was.
Its product takes one of three paths:

- **a few rows on a CPU** (decoding): the streaming kernel for int8 or int4 weights (`kernels/csrc`), which widens
  each code in registers as it streams past, in the variant this CPU runs (`kernels.linear.kernel_variant`);
- **int8 on a GPU**: torchao's int8 weight-only tensor, built from these very codes and scales (the schemes are
  torchao's own, bit for bit, so nothing is quantized twice);
- **everything else** (prefill, the vision tower, int4 on a GPU, no kernel): the weights dequantized a slice of rows
  at a time into float32 and multiplied there, so memory never holds more than one slice (16 MB) of wide weights.

Activations stay in the model's dtype; sums are float32 and the result is rounded once, as in `kernels.linear`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PaliGemmaError
from ..kernels.linear import FEW_ROWS, KERNEL, SETTINGS, kernel_variant
from .schemes import Int4Weight, Int8Weight, dequantize_int4, dequantize_int8, int4_groups, quantize_int4, quantize_int8

SCHEMES = ("int8", "int4")
SLICE_ELEMENTS = 1 << 22  # weights dequantized at a time on the general path: 16 MB of float32


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as int8 (per row) or int4 (per group of `group_size` inputs).

    Buffers: int8 keeps `codes` int8 [out, in] and `scale` float32 [out]; int4 keeps `packed` uint8 [out, in / 2],
    `scale` and `zero` [out, in / group_size] in the model's dtype. `dtype` is the dtype of the layer's input and
    output (the model's).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise PaliGemmaError(f"unknown quantization {scheme!r}: choose {' or '.join(SCHEMES)}")
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        self.group_size = None
        if scheme == "int8":
            self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.group_size = 128 if group_size is None else group_size
            groups = int4_groups(in_features, self.group_size)
            # two codes a byte: every group size is a multiple of 32, so a row holds whole runs of 32
            packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            self.register_buffer("packed", packed)
            self.register_buffer("scale", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zero", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._torchao_weight: Any = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None) -> QuantizedLinear:
        """Quantize an `nn.Linear`'s weight (its bias is kept as it is)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, scheme, group_size, linear.bias is not None,
                    weight.dtype, weight.device)
        layer.set_weight(weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor, rows: slice = slice(None)) -> None:
        """Quantize `weight` [out, in], or the rows `rows` of it (a loader's chunk), into this layer's buffers.

        Every scale belongs to one row, so quantizing a chunk of rows gives what quantizing the whole would."""
        expected = len(range(self.out_features)[rows])
        if tuple(weight.shape) != (expected, self.in_features):
            raise PaliGemmaError(f"weight of shape {list(weight.shape)} for {expected} rows of a layer of "
                                 f"{[self.out_features, self.in_features]}")
        if self.scheme == "int8":
            quantized = quantize_int8(weight)
            self.codes[rows] = quantized.codes
            self.scale[rows] = quantized.scale
        else:
            quantized = quantize_int4(weight, self.group_size)
            self.packed[rows] = quantized.packed
            self.scale[rows] = quantized.scale
            self.zero[rows] = quantized.zero
        self._torchao_weight = None

    def quantized(self) -> Int8Weight | Int4Weight:
        """The stored weight as the scheme's record (views of the buffers)."""
        if self.scheme == "int8":
            return Int8Weight(self.codes, self.scale)
        return Int4Weight(self.packed, self.scale, self.zero, self.group_size)

    def dequantized(self, dtype: torch.dtype = torch.float32,
                    rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The weight [out, in] (or the rows `rows` of it: a slice, or indices as an embedding looks tokens up) as the
        codes say, in `dtype`."""
        quantized = self.quantized()
        if self.scheme == "int8":
            return dequantize_int8(Int8Weight(quantized.codes[rows], quantized.scale[rows]), dtype)
        return dequantize_int4(Int4Weight(quantized.packed[rows], quantized.scale[rows], quantized.zero[rows],
                                          self.group_size), dtype)

    def stored_bytes(self) -> int:
        """Bytes of the weight as stored: codes, scales and zeros (not the bias)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise PaliGemmaError(f"input of {x.shape[-1]} features for a layer of {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        path = self.path_for(rows)
        if path == "kernel":
            out = self._kernel(rows.contiguous(), kernel_variant(torch.float32))
        elif path == "torchao":
            out = F.linear(rows, self._torchao(), self.bias)
        else:
            out = self._sliced(rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    def path_for(self, rows: torch.Tensor) -> str:
        """'kernel', 'torchao' or 'sliced' for inputs `rows` [M, in]."""
        if rows.device.type == "cpu":
            few = 1 <= rows.shape[0] <= FEW_ROWS and rows.dtype in (torch.bfloat16, torch.float32)
            if few and SETTINGS.enabled and SETTINGS.few_rows and KERNEL.get() is not None \
                    and kernel_variant(torch.float32) is not None:
                return "kernel"
            return "sliced"
        return "torchao" if self.scheme == "int8" and rows.device.type == "cuda" else "sliced"

    def _kernel(self, rows: torch.Tensor, variant: str) -> torch.Tensor:
        ops = KERNEL.get()
        if self.scheme == "int8":
            return ops.int8_linear(rows, self.codes, self.scale, self.bias, variant=variant)
        return ops.int4_linear(rows, self.packed, self.scale, self.zero, self.group_size, self.bias, variant=variant)

    def _torchao(self) -> Any:
        """torchao's int8 weight-only tensor over this layer's own codes and scales (built once, on first use)."""
        if self._torchao_weight is None:
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

            self._torchao_weight = Int8Tensor(self.codes, self.scale[:, None], [1, self.in_features], self.dtype)
        return self._torchao_weight

    def _sliced(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] @ W^T, W dequantized a slice of output rows at a time, in float32; rounded once."""
        out = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype, device=rows.device)
        wide = rows.float()
        step = max(1, SLICE_ELEMENTS // self.in_features)
        for start in range(0, self.out_features, step):
            part = slice(start, min(self.out_features, start + step))
            sums = wide @ self.dequantized(torch.float32, part).t()  # [M, slice]
            if self.bias is not None:
                sums += self.bias[part].float()
            out[:, part] = sums
        return out
