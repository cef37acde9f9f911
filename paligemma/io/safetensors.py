"""The safetensors file format, read and written by hand.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range; an optional
`__metadata__`) and the tensors' raw bytes, one after another. Reading maps the file into memory, so a tensor in the
wanted dtype is a view of the page cache (no copy); a tensor to convert is read a bounded chunk at a time. Writing
takes one tensor at a time, so a checkpoint larger than memory can be written (the benchmark's random 3B weights),
into a temporary file renamed at the end: a killed writer leaves the old file or none, never half of one.

Page sizes: decoding streams every mapped weight once a step, and on some CPUs it reads them markedly faster from 2 MB
pages than from 4 KB ones (`paligemma.kernels.huge_pages`). A mapped file gets 2 MB pages where the page cache holds
it in 2 MB pieces (folios), which Linux's newer kernels do for file systems with large folios (ext4, xfs) when the
file was read or written in whole, aligned 2 MB pieces. So the writer writes in such pieces
(`HugePageAlignedWriter`), and the reader advises its mapping for huge pages (or against them, `huge_pages=False`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import PaliGemmaError

DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
CONVERT_CHUNK_BYTES = 8 << 20  # read at a time when a tensor changes dtype: all a conversion holds extra
MAX_HEADER_BYTES = 100 << 20
PIECE_BYTES = 2 << 20  # the writer's piece: one 2 MB page (this file format depends on nothing else of the package)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """One safetensors file: its header, checked here, and the file mapped (copy on write, so never modified).

    `huge_pages`: the mapping is advised for 2 MB pages (None, True) or against them (False), where the system
    takes such advice (Linux); the page cache decides whether there are any (see the module docstring).
    """

    def __init__(self, path: Path, huge_pages: bool | None = None) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8 or length > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {length} does not fit in a file of {size} bytes")
                header = json.loads(handle.read(length))
                self.data_start = 8 + length
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
                self.entries = {name: info for name, info in header.items() if name != "__metadata__"}
                for name, info in self.entries.items():
                    begin, end = info["data_offsets"]
                    nbytes = math.prod(info["shape"]) * _itemsize(DTYPE_CODES[info["dtype"]])
                    if end - begin != nbytes or self.data_start + end > size:
                        raise ValueError(f"tensor {name} has {end - begin} bytes for shape {info['shape']}")
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
            if self.map is not None:
                _advise_page_size(self.map, huge_pages is not False)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise PaliGemmaError(f"{path} is not a valid safetensors file: {error}") from None
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8) if self.map is not None else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPE_CODES[self.entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def view(self, name: str) -> torch.Tensor | None:
        """The tensor as a view of the mapped file (no copy), or None where its bytes are not aligned for its dtype."""
        if not self.mappable(name):
            return None
        begin, end = (self.data_start + offset for offset in self.entries[name]["data_offsets"])
        return self.bytes[begin:end].view(self.dtype(name)).view(self.shape(name))

    def read(self, name: str, dtype: torch.dtype, device: torch.device, rows: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or its rows [start, stop) along the first dimension) converted to `dtype` on `device`, read
        `CONVERT_CHUNK_BYTES` at a time with plain reads: nothing of the file is mapped into this process.

        `out`: a contiguous CPU tensor of the right shape and dtype to read into, rather than a new one (a tensor
        of the stored dtype is then read straight into it, with no copy in between)."""
        stored = self.dtype(name)
        item = _itemsize(stored)
        shape = list(self.shape(name))
        begin = self.data_start + self.entries[name]["data_offsets"][0]
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise PaliGemmaError(f"rows {start}:{stop} of tensor {name} of shape {shape}")
            row_elements = math.prod(shape[1:])
            begin += start * row_elements * item
            shape[0] = stop - start
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        elif (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise PaliGemmaError(f"cannot read tensor {name} ({shape}, {dtype}) into a tensor of "
                                 f"{list(out.shape)}, {out.dtype} on {out.device}")
        flat = out.view(-1)
        per_chunk = max(1, CONVERT_CHUNK_BYTES // item)
        direct = dtype == stored and out.device.type == "cpu"  # the file's bytes are the tensor's: read in place
        scratch = flat.view(torch.uint8) if direct else torch.empty(min(per_chunk, max(1, flat.numel())) * item,
                                                                    dtype=torch.uint8)
        buffer = memoryview(scratch.numpy()) if scratch.numel() else memoryview(b"")
        with open(self.path, "rb", buffering=0) as handle:
            for first in range(0, flat.numel(), per_chunk):
                count = min(per_chunk, flat.numel() - first)
                at = first * item if direct else 0  # where this chunk's bytes go in `buffer`
                wanted, done = count * item, 0
                while done < wanted:
                    got = os.preadv(handle.fileno(), [buffer[at + done:at + wanted]], begin + first * item + done)
                    if got <= 0:
                        raise PaliGemmaError(f"cannot read tensor {name} from {self.path}: the file ends early")
                    done += got
                if not direct:
                    flat[first:first + count].copy_(scratch[:wanted].view(stored))
        return out

    def mappable(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> bool:
        """Whether `tensor(name, dtype, device)` is a view of the mapped file (no copy): on the CPU, in the stored
        dtype, with its bytes aligned for it."""
        begin = self.data_start + self.entries[name]["data_offsets"][0]
        stored = self.dtype(name)
        return torch.device(device).type == "cpu" and (dtype or stored) == stored and begin % _itemsize(stored) == 0

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mapped without a copy when it is already what is wanted (on the CPU); else read and converted."""
        if self.mappable(name, dtype, device):
            return self.view(name)
        return self.read(name, dtype or self.dtype(name), torch.device(device))


def _advise_page_size(mapping: mmap.mmap, huge: bool) -> None:
    """madvise(MADV_HUGEPAGE) or (MADV_NOHUGEPAGE) on a mapping, where the system has that advice; it is only advice,
    so a refusal changes nothing here."""
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:
            pass


class HugePageAlignedWriter:
    """Writes to a binary file in pieces that start on a 2 MB boundary of the file and are whole multiples of 2 MB
    (but the last), holding back at most one partial piece: the page cache then holds each piece as one 2 MB folio
    where the kernel can, and mapping the file later gets 2 MB pages without copying it."""

    def __init__(self, file, piece: int = PIECE_BYTES) -> None:
        self.file, self.piece, self.pending = file, piece, bytearray()

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        if len(self.pending) + len(data) < self.piece:
            self.pending += data
            return
        fill = self.piece - len(self.pending)  # bytes of data that complete the piece held back
        self.pending += data[:fill]
        self.file.write(self.pending)
        rest = data[fill:]
        whole = len(rest) // self.piece * self.piece
        if whole:
            self.file.write(rest[:whole])  # [whole] bytes from a boundary: whole pieces, no copy
        self.pending = bytearray(rest[whole:])

    def flush(self) -> None:
        """Write what is held back (the file's last, partial piece)."""
        self.file.write(self.pending)
        self.pending = bytearray()


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `tensors` (name -> tensor, in this order) to `path`; returns the bytes of tensor data.

    Only shapes and dtypes are read from `tensors` until a tensor's bytes are due, so they may be meta tensors
    whose contents `values(name, tensor)` makes one at a time (then only one tensor is ever in memory).
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in CODE_OF_DTYPE:
            raise PaliGemmaError(f"safetensors cannot store {name} of dtype {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": CODE_OF_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        file = HugePageAlignedWriter(handle)
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, tensor in tensors.items():
            data = values(name, tensor) if values is not None else tensor
            if tuple(data.shape) != tuple(tensor.shape) or data.dtype != tensor.dtype:
                raise PaliGemmaError(f"tensor {name} changed from {list(tensor.shape)} {tensor.dtype} "
                                     f"to {list(data.shape)} {data.dtype} while being written")
            data = data.detach().to("cpu").contiguous()
            file.write(data.reshape(-1).view(torch.uint8).numpy().data)  # the raw little-endian bytes
        file.flush()
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return offset
