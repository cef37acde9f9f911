"""Weights in 2 MB pages, so that reading them does not wait on the page tables.

Decoding reads every weight once a step, gigabytes in a stream. With the usual 4 KB pages, that stream crosses a page
every 4 KB, and each page's address translation must be looked up (the TLB holds a few thousand). Linux can back
memory with 2 MB pages instead (transparent huge pages); by default (`/sys/kernel/mm/transparent_hugepage/enabled`
set to `madvise`) only where a program asks, with `madvise(MADV_HUGEPAGE)`. A mapped checkpoint file and PyTorch's
allocations never ask.

`HugePageArena` is one anonymous mapping that asks, cut into tensors. The loaders make every tensor of at least
`MIN_BYTES` they allocate in one (quantized codes, converted weights; `load_model(..., huge_pages=True)` copies the
mapped ones too), and `place_in_huge_pages(model)` moves the weights of a model built another way.

A mapped checkpoint can be in 2 MB pages too, with no copy: where the kernel and the file system keep files in the
page cache in large pieces (folios; Linux 6.x with ext4 or xfs, for example), a 2 MB-aligned piece of the file held
as one folio is mapped as one 2 MB page, and more so when the mapping asks (`io.safetensors` asks, and writes its
files in whole 2 MB pieces so that a fresh one is cached that way). What the page cache holds is the kernel's to
decide: a file written in small pieces by another program stays in small folios until it leaves the cache.
`huge_page_bytes` counts both kinds (`AnonHugePages` and `FilePmdMapped`).

What it buys was measured twice on an AMD EPYC with AVX-512 and 2 cores, whose memory is shared with other work:

- the streaming kernel over 660 MB of 3B-shaped bf16 matrices, 5 alternating rounds: one row of x took 13.2-20.0 ms
  from 2 MB pages against 15.2-22.4 ms from 4 KB pages, eight rows 21.9-24.1 ms against 25.9-29.3;
- whole compiled 3B decoding steps (`python -m paligemma.bench.page_sizes`, `book/data/page_sizes_cpu.json`), each
  copy in turn within 5 cycles: int8 codes 1.04x as fast at batch 1 (faster in 4 cycles of 5) and 1.09x at batch 8
  (5 of 5); bf16 weights 1.02x at batch 1 (3 of 5) and 0.94x at batch 8 (0 of 5) against the mapped file, which took
  8 s longer to load into huge pages.

On an AMD EPYC with AVX2 only (Zen 3, 2 cores), the same command: bf16 weights 1.16x as fast at batch 1 (faster in 5
of 5 cycles), 0.99x at batch 8; int8 codes 0.99x and 0.97x. (That run's mapped copy was not yet advised against
huge pages, and may have been partly in them: another file written the same way, before the writer wrote whole
pieces, was mapped 2.2 of 5.7 GB in 2 MB pages.) Hence the loaders' default: huge pages for what they allocate
anyway, and the file mapped, asking for huge pages, for the rest.

Each tensor cut from the arena has a storage of its own (its own bytes, as `torch.save` sees them); the mapping is
unmapped when the last of them is freed.
"""

from __future__ import annotations

import math
import mmap
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # smaller tensors stay where they are: they would fill a fraction of one page
ALIGN = 64  # every tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_unavailable() -> str | None:
    """Why weights cannot be put in huge pages here, or None where they can (Linux with transparent huge pages
    set to `always` or `madvise`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this system has no transparent huge pages (madvise(MADV_HUGEPAGE) is Linux's)"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return f"{THP_SETTING} cannot be read: this kernel has no transparent huge pages"
    if "[never]" in setting:
        return f"transparent huge pages are switched off ({THP_SETTING} says never)"
    return None


def _aligned(nbytes: int, to: int = ALIGN) -> int:
    return -(-nbytes // to) * to


def tensor_bytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class HugePageArena:
    """`capacity` bytes of anonymous memory advised for huge pages, handed out as tensors by `take`, in order.

    The mapping starts on a 2 MB boundary, so that every whole 2 MB of it can be one page. Memory is taken from the
    system only as it is written, so an arena sized for a model costs nothing until the weights arrive.
    """

    def __init__(self, capacity: int) -> None:
        reason = huge_pages_unavailable()
        if reason is not None:
            raise OSError(reason)
        self.capacity = capacity
        self.map = mmap.mmap(-1, capacity + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE)  # OSError where refused
        address = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()
        self.start = -address % HUGE_PAGE  # the first 2 MB boundary in the mapping
        _LIVE_MAPPINGS.append((weakref.ref(self.map), address, address + capacity + HUGE_PAGE))
        self.used = 0

    @classmethod
    def for_tensors(cls, specs: list[tuple[tuple[int, ...] | torch.Size, torch.dtype]]) -> HugePageArena:
        """An arena just large enough for tensors of these (shape, dtype), taken in any order."""
        return cls(sum(_aligned(tensor_bytes(shape, dtype)) for shape, dtype in specs))

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of this shape and dtype from the next free bytes; a storage of its own."""
        nbytes = tensor_bytes(shape, dtype)
        if self.used + nbytes > self.capacity:
            raise MemoryError(f"the huge-page arena has {self.capacity - self.used} bytes left, not {nbytes}")
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.start + self.used)
        self.used += _aligned(nbytes)
        return flat.view(shape)


class Mapping(NamedTuple):
    """One mapping of this process, as /proc/self/smaps describes it."""

    low: int  # first address
    high: int  # end address
    huge_bytes: int  # bytes in huge pages now: `AnonHugePages` plus `FilePmdMapped`
    path: str  # the file it maps; "" for memory of its own


def mappings() -> list[Mapping]:
    """Every mapping of this process, with its bytes in huge pages now: its `AnonHugePages` (memory of its own, as an
    arena's) plus its `FilePmdMapped` (a mapped file's page cache in 2 MB pages), from /proc/self/smaps; [] where that
    file is missing (not Linux)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    found: list[Mapping] = []
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:  # a mapping's header: "low-high perms offset device inode [path]"
            fields = line.split(None, 5)
            low, high = (int(part, 16) for part in first.split("-"))
            found.append(Mapping(low, high, 0, fields[5] if len(fields) > 5 else ""))
        elif found and line.startswith(("AnonHugePages:", "FilePmdMapped:")):
            found[-1] = found[-1]._replace(huge_bytes=found[-1].huge_bytes + int(line.split()[1]) * 1024)
    return found


def mapping_holding(tensor: torch.Tensor, among: list[Mapping] | None = None) -> Mapping | None:
    """The entry of `mappings()` (or of `among`, read once for many tensors) that holds the tensor's memory."""
    address = tensor.untyped_storage().data_ptr()
    return next((m for m in (mappings() if among is None else among) if m.low <= address < m.high), None)


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """How many bytes of the mapping that holds `tensor` are in huge pages now, anonymous or a mapped file's; 0 where
    that cannot be read (not Linux)."""
    mapping = mapping_holding(tensor)
    return 0 if mapping is None else mapping.huge_bytes


def worth_huge_pages(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, min_bytes: int | None = None) -> bool:
    """Whether a tensor of this shape and dtype is worth a place in huge pages: `min_bytes` (`MIN_BYTES`) or more."""
    return tensor_bytes(shape, dtype) >= (MIN_BYTES if min_bytes is None else min_bytes)


def place_in_huge_pages(model: nn.Module, min_bytes: int | None = None) -> int:
    """Move every CPU parameter and buffer of `min_bytes` (`MIN_BYTES`) or more into one arena of huge pages, in
    place; returns the bytes moved (0 where huge pages are unavailable, `huge_pages_unavailable`, or the system
    refuses them).

    Parameters keep their identity (their `.data` changes), so tied weights stay tied and an optimizer's references
    stay valid; a tensor held under two names is moved once. Weights are copied one at a time, and each old one is
    freed as soon as nothing else holds it, so the move needs one tensor's memory beyond the model's.
    """
    if huge_pages_unavailable() is not None:
        return 0
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # id of the tensor -> every (module, name) that holds it
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for kind in (module._parameters, module._buffers):
            for name, tensor in kind.items():
                if (tensor is not None and tensor.device.type == "cpu"
                        and worth_huge_pages(tensor.shape, tensor.dtype, min_bytes) and not in_an_arena(tensor)):
                    slots.setdefault(id(tensor), []).append((module, name))
                    tensors[id(tensor)] = tensor
    if not tensors:
        return 0
    try:
        arena = HugePageArena.for_tensors([(t.shape, t.dtype) for t in tensors.values()])
    except OSError:  # the system refused the mapping or the advice (a sandbox, say): the weights stay where they are
        return 0
    moved = 0
    for key, old in list(tensors.items()):
        new = arena.take(old.shape, old.dtype)
        new.copy_(old)
        if isinstance(old, nn.Parameter):
            old.data = new  # every holder has this very Parameter
        else:
            for module, name in slots[key]:
                module._buffers[name] = new
        moved += new.numel() * new.element_size()
        del tensors[key], old
    return moved


def mapping_of(tensor: torch.Tensor) -> int | None:
    """The first address of the live `HugePageArena` mapping that holds the tensor's memory, or None."""
    address = tensor.untyped_storage().data_ptr()
    _LIVE_MAPPINGS[:] = [entry for entry in _LIVE_MAPPINGS if entry[0]() is not None]
    return next((low for _, low, high in _LIVE_MAPPINGS if low <= address < high), None)


def in_an_arena(tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory lies in a live `HugePageArena`'s mapping already."""
    return mapping_of(tensor) is not None


_LIVE_MAPPINGS: list[tuple[weakref.ref, int, int]] = []  # every arena's mapping while it lives, with its addresses
