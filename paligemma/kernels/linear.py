"""How the model multiplies by its weights, y = x W^T + b, chosen by the work's shape and the machine.

Every projection in the model is one of these products, and they are nearly all of its time. Two regimes:

- **Decoding** multiplies one row per sequence (a handful) by each weight matrix: each weight is used once per
  step, so the step's time is the time to read the weights from memory. PyTorch's bf16 kernel (oneDNN), given
  plain row-major weights at every call, reads them at about half the memory's speed for such shapes (measured:
  `python -m paligemma.bench`). For at most `FEW_ROWS` rows, a small C++ kernel (`csrc/stream_kernels.h`,
  compiled on first use) streams each weight row once instead, in the best variant this CPU runs: AVX-512 with
  bf16 instructions, AVX2 with FMA (any x86-64 CPU since 2013), or NEON (ARM64). `fast_paths(variant="avx2")`
  forces one, `PALIGEMMA_KERNEL_VARIANT` sets the default, and `kernel_status()` says which run here.
- **Prefill** and the vision tower multiply hundreds of rows, and the work is arithmetic. On CPUs without AMX,
  PyTorch's bf16 matrix products (VDPBF16PS) run well below its fp32 ones (60% on the machine of the book's
  benchmark); so for at least `MANY_ROWS` rows the bf16 weights are widened to fp32 a slice at a time and
  multiplied by fp32 kernels. Only a slice is ever widened, into work buffers kept between calls (tens of MB),
  so memory stays that of the bf16 weights plus those buffers (`release_buffers` frees them).

Both paths compute what the plain product computes: products of bf16 numbers are exact in fp32, sums are in
fp32, and the result is rounded to bf16 once, as in PyTorch's own bf16 kernels; only the order of the sums
differs. float32 models take `torch.nn.functional.linear` unless `fast_paths(fp32=True)`: their default numerics
stay those of the reference, operation for operation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PaliGemmaError
from .cpu import has_amx, is_arm64, is_x86_64

FEW_ROWS = 8  # up to this many rows: the streaming kernel (decoding, batch up to 8)
MANY_ROWS = 64  # from this many rows: bf16 weights widened to fp32 slices (prefill, vision); measured crossover
SLICE_ELEMENTS = 1 << 22  # weights widened per fp32 matrix product: 16 MB


VARIANTS = ("avx512", "avx2", "neon")  # the streaming kernel's variants, fastest first


@dataclass
class FastPaths:
    """Which fast paths are on. `fp32` extends the streaming kernel to float32 weights (off: reference numerics);
    `variant` picks the streaming kernel's variant: "auto" (the best this CPU runs), "avx512", "avx2" or "neon"."""

    enabled: bool = True
    few_rows: bool = True
    widen: bool = True
    fp32: bool = False
    variant: str = "auto"


SETTINGS = FastPaths(enabled=os.environ.get("PALIGEMMA_FAST_PATHS", "1") != "0",
                     variant=os.environ.get("PALIGEMMA_KERNEL_VARIANT", "auto") or "auto")


@contextlib.contextmanager
def fast_paths(**changes: bool) -> Iterator[FastPaths]:
    """Switch fast paths on or off inside a block: `with fast_paths(enabled=False): ...` for PyTorch's kernels only."""
    unknown = [name for name in changes if not hasattr(SETTINGS, name)]
    if unknown:
        raise ValueError(f"unknown fast path setting {unknown[0]!r}")
    if "variant" in changes and changes["variant"] not in ("auto", *VARIANTS):
        raise PaliGemmaError(f"unknown kernel variant {changes['variant']!r}: choose auto, {', '.join(VARIANTS)}")
    saved = {name: getattr(SETTINGS, name) for name in changes}
    for name, value in changes.items():
        setattr(SETTINGS, name, value)
    try:
        yield SETTINGS
    finally:
        for name, value in saved.items():
            setattr(SETTINGS, name, value)


class _Kernel:
    """The compiled streaming kernel, built once per machine (cached by torch's extension builder), or why not."""

    def __init__(self) -> None:
        self.module = None
        self.error: str | None = None
        self.tried = False
        self.lock = threading.Lock()

    def get(self):
        if self.tried:
            return self.module
        with self.lock:
            if not self.tried:
                self.module = self._build()
                self.tried = True
        return self.module

    def _build(self):
        if not (is_x86_64() or is_arm64()):
            self.error = "the streaming kernel has variants for x86-64 and ARM64 CPUs only"
            return None
        if os.environ.get("PALIGEMMA_NO_KERNEL"):
            self.error = "PALIGEMMA_NO_KERNEL is set"
            return None
        path = os.environ.get("PATH", "")
        try:
            from torch.utils import cpp_extension

            source = Path(__file__).parent / "csrc" / "linear_cpu.cpp"
            # ninja installed by pip sits beside this Python, which is not on PATH unless the environment is active
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # No -m flags: each variant names its instruction set itself, so one build runs on any CPU of
                # its architecture, and the variant is picked (and checked) at each call.
                cpp_extension.load(
                    name="paligemma_stream_cpu", sources=[str(source)], verbose=False, is_python_module=False,
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                )
            _register_fake()
            return torch.ops.paligemma
        except Exception as error:  # no compiler, no ninja, no headers: PyTorch's kernels still work
            self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            return None
        finally:
            os.environ["PATH"] = path


KERNEL = _Kernel()


def _register_fake() -> None:
    """Tell `torch.compile` the shape and dtype of each kernel's result, so a compiled graph can call it."""

    def rows_by_outputs(x: torch.Tensor, outputs: int, dtype: torch.dtype | None) -> torch.Tensor:
        return x.new_empty((x.shape[0], outputs), dtype=dtype or x.dtype)

    @torch.library.register_fake("paligemma::few_rows_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
          dtype: torch.dtype | None = None, variant: str = "auto") -> torch.Tensor:
        return rows_by_outputs(x, weight.shape[0], dtype)

    @torch.library.register_fake("paligemma::int8_linear")
    def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
          dtype: torch.dtype | None = None, variant: str = "auto") -> torch.Tensor:
        return rows_by_outputs(x, codes.shape[0], dtype)

    @torch.library.register_fake("paligemma::int4_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
          bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, variant: str = "auto") -> torch.Tensor:
        return rows_by_outputs(x, packed.shape[0], dtype)


#: The variants this CPU runs, by "bf16 weights?": asked of the kernel once, then read from here. A plain dict,
#: not `functools.cache`, so that `torch.compile` reads it as a constant instead of breaking its graph on the call.
_VARIANTS: dict[bool, tuple[str, ...]] = {}


def cpu_variants(dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """The streaming kernel's variants this CPU runs for weights of `dtype`, fastest first (none without the kernel).

    AVX-512 counts for bf16 weights only with its bf16 instructions (Zen 4, Sapphire Rapids); AVX2 needs FMA too.
    Asked once per dtype (every product asks, and a decoding step makes hundreds).
    """
    bf16 = dtype == torch.bfloat16
    if bf16 not in _VARIANTS:
        module = KERNEL.get()
        names = module.cpu_variants(bf16).split(",") if module is not None else []
        _VARIANTS[bf16] = tuple(name for name in names if name)
    return _VARIANTS[bf16]


def kernel_variant(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """The variant products of `dtype` take: the one `fast_paths(variant=...)` names, or the best this CPU runs."""
    available = cpu_variants(dtype)
    if SETTINGS.variant == "auto":
        return available[0] if available else None
    if SETTINGS.variant not in available:
        raise PaliGemmaError(f"this CPU cannot run the {SETTINGS.variant!r} kernel variant for "
                             f"{str(dtype).removeprefix('torch.')} weights (it runs: {', '.join(available) or 'none'})")
    return SETTINGS.variant


def kernel_status() -> str:
    """The variants this CPU runs and the one in use (e.g. 'compiled: avx512, avx2; using avx512'), or why the
    streaming kernel is not used on this machine."""
    if KERNEL.get() is None:
        return f"not available ({KERNEL.error})"
    available = cpu_variants(torch.bfloat16)
    if not available:
        return "compiled, but this CPU runs none of its variants (it needs AVX2 and FMA, or ARM64)"
    using = SETTINGS.variant if SETTINGS.variant != "auto" else available[0]
    return f"compiled: {', '.join(available)}; using {using}"


def path_for(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which path a product takes: 'few_rows', 'widen' or 'torch'."""
    if not SETTINGS.enabled or x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype:
        return "torch"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "torch"  # training: autograd needs PyTorch's own kernels
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return "torch"
    if x.dtype == torch.bfloat16:
        if rows <= FEW_ROWS and SETTINGS.few_rows and kernel_variant(x.dtype) is not None:
            return "few_rows"
        if rows >= MANY_ROWS and SETTINGS.widen and not has_amx():
            return "widen"
    elif x.dtype == torch.float32 and SETTINGS.fp32 and rows <= FEW_ROWS and SETTINGS.few_rows:
        if kernel_variant(x.dtype) is not None:
            return "few_rows"
    return "torch"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], in x's dtype, by the path `path_for` picks."""
    path = path_for(x, weight)
    if path == "torch":
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if path == "widen":
        return widened_product(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    out = KERNEL.get().few_rows_linear(rows.contiguous(), weight.contiguous(), bias,  # fp32 sums, rounded once
                                       variant=kernel_variant(x.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[0])


_BUFFERS = threading.local()


def _buffer(name: str, numel: int) -> torch.Tensor:
    """A float32 work buffer kept from call to call (per thread), grown when too small.

    A prefill widens about a gigabyte of temporaries; fresh allocations that large come from the operating system
    page by page, zero-filled, which cost the full-size prefill most of a second before buffers were kept.
    """
    held = getattr(_BUFFERS, name, None)
    if held is None or held.numel() < numel:
        held = None  # let the old one go before the larger one is made
        held = torch.empty(numel, dtype=torch.float32)
        setattr(_BUFFERS, name, held)
    return held[:numel]


def release_buffers() -> None:
    """Free the work buffers of the widened products (they are made again when next needed)."""
    _BUFFERS.__dict__.clear()


def widened_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] @ weight [N, K]^T (+ bias) with fp32 arithmetic, widening `SLICE_ELEMENTS` weights at a time.

    Each slice of weight rows is widened into a work buffer, multiplied in fp32, the bias added to the fp32 sums,
    and the slice of output columns rounded once into the result [M, N] (rows' dtype).
    """
    n, k = weight.shape
    m = rows.shape[0]
    step = min(n, max(1, SLICE_ELEMENTS // k))
    result = torch.empty(m, n, dtype=rows.dtype)
    x32 = _buffer("rows", m * k).view(m, k).copy_(rows)
    bias32 = None if bias is None else bias.float()
    for start in range(0, n, step):
        end = min(n, start + step)
        widened = _buffer("weights", (end - start) * k).view(end - start, k).copy_(weight[start:end])  # exact
        sums = torch.mm(x32, widened.t(), out=_buffer("sums", m * (end - start)).view(m, end - start))
        if bias32 is not None:
            sums += bias32[start:end]  # added to the fp32 sums, rounded once below, as PyTorch's bf16 kernels do
        result[:, start:end].copy_(sums)
    return result


class FastLinear(nn.Linear):
    """`nn.Linear` whose product goes through `linear`: the same parameters and state-dict names, faster on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
