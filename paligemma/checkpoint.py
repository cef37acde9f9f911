"""Reading and writing checkpoints in the Hugging Face layout.

A checkpoint folder holds `config.json`, the weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) and `tokenizer.model`. Tensor names on disk differ from this
library's by two levels that carry no meaning here:

    disk (transformers)                      this library
    language_model.model.layers.0.…          language_model.layers.0.…
    vision_tower.vision_model.encoder.…      vision_tower.encoder.…
    multi_modal_projector.linear.…           multi_modal_projector.linear.…

Files from newer `transformers` versions may drop the `vision_model.` level or add a leading
`model.`; both are read.

How weights are read decides how fast loading is and how much memory it takes. A safetensors file is
an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the raw bytes. Tensors
already in the wanted dtype are views of the file mapped into memory (no copy: pages come in from the
page cache when first used, and the model takes exactly its weights' size). Tensors to convert (a
float32 file loaded in bf16, say) are read with plain reads a bounded chunk at a time, on a few threads,
straight into their final tensor, so loading never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .config import PaliGemmaConfig
from .errors import PaliGemmaError
from .model import PaliGemmaForConditionalGeneration
from .processing import PaliGemmaProcessor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BUNDLED_DIR = Path(__file__).parent / "checkpoints"  # models shipped inside the package, loadable by name

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtypes or their short names ('bf16', 'fp32', ...); None or 'auto' keeps the file's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise PaliGemmaError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise PaliGemmaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'") from None


def parse_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise PaliGemmaError(f"unknown device {str(device)!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PaliGemmaError("device 'cuda' was asked for but CUDA is not available on this machine")
    return device


def to_library_name(name: str) -> str:
    """A tensor name as written by any transformers version -> the name in this library's modules."""
    if name.startswith("model."):  # the in-memory layout of transformers 5
        name = name[len("model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    name = name.replace("language_model.model.", "language_model.", 1)
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def to_disk_name(name: str) -> str:
    """This library's name -> the layout of the released checkpoints (which every transformers version reads)."""
    if name.startswith("language_model.") and not name.startswith("language_model.lm_head."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A folder path, or the name of a model shipped with the package."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    bundled = BUNDLED_DIR / str(name_or_path)
    if bundled.is_dir():
        return bundled
    if path.exists():
        raise PaliGemmaError(f"{path} is a file; a checkpoint is a folder with config.json, weights and tokenizer.model")
    raise PaliGemmaError(f"checkpoint folder not found: {path}")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PaliGemmaError(f"{index} is not a valid safetensors index: {error}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise PaliGemmaError(f"shard {file.name} named in {INDEX_FILE} is missing from {directory}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")):
        raise PaliGemmaError(f"{directory} holds PyTorch .bin weights; only safetensors are read (convert them first)")
    raise PaliGemmaError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")


class _Progress:
    """A one-line progress bar on stderr, by bytes loaded."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.last = max(total, 1), 0, enabled, 0.0

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            fraction = self.done / self.total
            bar = "#" * int(30 * fraction)
            sys.stderr.write(f"\rloading weights [{bar:<30}] {fraction:4.0%} {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


_DTYPES_ON_DISK = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CONVERT_CHUNK_BYTES = 8 << 20  # read at a time per thread when a tensor changes dtype: all a conversion holds extra
READ_THREADS = min(4, os.cpu_count() or 1)


class _SafetensorsFile:
    """One safetensors file: its header, parsed here, and the file mapped read-only-in-effect (copy on write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8 or length > 100 << 20:
                    raise ValueError(f"header length {length} does not fit in a file of {size} bytes")
                header = json.loads(handle.read(length))
                self.data_start = 8 + length
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
                self.entries = {name: info for name, info in header.items() if name != "__metadata__"}
                for name, info in self.entries.items():
                    begin, end = info["data_offsets"]
                    dtype = _DTYPES_ON_DISK[info["dtype"]]
                    nbytes = math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size()
                    if end - begin != nbytes or self.data_start + end > size:
                        raise ValueError(f"tensor {name} has {end - begin} bytes for shape {info['shape']}")
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise PaliGemmaError(f"{path} is not a valid safetensors file: {error}") from None
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8) if self.map is not None else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES_ON_DISK[self.entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def view(self, name: str) -> torch.Tensor | None:
        """The tensor as a view of the mapped file (no copy), or None where its bytes are not aligned for its dtype."""
        begin, end = (self.data_start + offset for offset in self.entries[name]["data_offsets"])
        dtype = self.dtype(name)
        if begin % torch.empty((), dtype=dtype).element_size():
            return None
        return self.bytes[begin:end].view(dtype).view(self.shape(name))

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor converted to `dtype` on `device`, read `CONVERT_CHUNK_BYTES` at a time (plain reads, no map)."""
        stored = self.dtype(name)
        item = torch.empty((), dtype=stored).element_size()
        out = torch.empty(self.shape(name), dtype=dtype, device=device)
        flat = out.view(-1)
        begin = self.data_start + self.entries[name]["data_offsets"][0]
        per_chunk = max(1, CONVERT_CHUNK_BYTES // item)
        scratch = torch.empty(min(per_chunk, max(1, flat.numel())) * item, dtype=torch.uint8)
        buffer = memoryview(scratch.numpy())
        with open(self.path, "rb", buffering=0) as handle:
            for first in range(0, flat.numel(), per_chunk):
                count = min(per_chunk, flat.numel() - first)
                wanted, done = count * item, 0
                while done < wanted:
                    got = os.preadv(handle.fileno(), [buffer[done:wanted]], begin + first * item + done)
                    if got <= 0:
                        raise PaliGemmaError(f"cannot read tensor {name} from {self.path}: the file ends early")
                    done += got
                flat[first:first + count].copy_(scratch[:wanted].view(stored))
        return out


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, str, tuple[int, ...], int, "_LazyTensor"]]:
    """(file name, tensor name, shape, bytes, lazy tensor) for every tensor of every file."""
    for file in files:
        opened = _SafetensorsFile(file)
        for name in opened.entries:
            yield file.name, name, opened.shape(name), opened.nbytes(name), _LazyTensor(opened, name)


class _LazyTensor:
    """One tensor of a checkpoint file, read only when asked for."""

    def __init__(self, file: _SafetensorsFile, name: str) -> None:
        self.file, self.name = file, name

    def read(self, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """Mapped without a copy when it is already what is wanted (on the CPU); else read and converted."""
        dtype = dtype or self.file.dtype(self.name)
        if dtype == self.file.dtype(self.name) and device.type == "cpu":
            view = self.file.view(self.name)
            if view is not None:
                return view
        return self.file.read(self.name, dtype, device)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_model(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    progress: bool = False,
) -> PaliGemmaForConditionalGeneration:
    """Build the model from a checkpoint folder's config and weights, converting each tensor to `dtype` on `device`."""
    directory = resolve_checkpoint(name_or_path)
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    return _load_weights(directory, config, device, dtype, progress)


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _no_initialisation() -> Iterator[None]:
    """Make `torch.nn.init` do nothing: weights about to be replaced need no random values (and drawing them on the
    meta device imports PyTorch's compiler stack, a second or more of a first load)."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def empty_model(config: PaliGemmaConfig) -> PaliGemmaForConditionalGeneration:
    """The model's structure on the meta device: shapes and names, no memory, no initial values."""
    with _no_initialisation(), torch.device("meta"):
        return PaliGemmaForConditionalGeneration(config)


def _load_weights(
    directory: Path,
    config: PaliGemmaConfig,
    device: torch.device | str,
    dtype: torch.dtype | str | None,
    progress: bool,
) -> PaliGemmaForConditionalGeneration:
    """A model of `config` on the meta device, then its tensors from the folder's safetensors, one at a time."""
    files = weight_files(directory)
    device, dtype = parse_device(device), parse_dtype(dtype)

    model = empty_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = config.text_config.tie_word_embeddings

    entries = list(_read_tensors(files))
    bar = _Progress(sum(nbytes for *_, nbytes, _ in entries), progress)
    wanted: dict[str, tuple[_LazyTensor, int]] = {}
    unexpected, wrong_shape = [], []
    for file_name, disk_name, shape, nbytes, lazy in entries:
        name = to_library_name(disk_name)
        if name == "language_model.lm_head.weight" and tied:
            bar.advance(nbytes)
            continue  # the head is the embedding table
        if name not in expected:
            unexpected.append(disk_name)
            continue
        if shape != expected[name]:
            wrong_shape.append(f"{disk_name} {list(shape)} (expected {list(expected[name])}) in {file_name}")
            continue
        wanted[name] = (lazy, nbytes)
    state: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def read(name: str) -> None:
        lazy, nbytes = wanted[name]
        tensor = lazy.read(dtype, device)
        with lock:
            state[name] = tensor
            bar.advance(nbytes)

    if not wrong_shape and not unexpected:
        # Largest first, so the threads finish together; conversions run in parallel, mapped views cost nothing.
        order = sorted(wanted, key=lambda name: -wanted[name][1])
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for _ in pool.map(read, order):
                pass
        state = {name: state[name] for name in wanted}  # the file's order
    if wrong_shape:
        raise PaliGemmaError(f"weights of the wrong shape for this config: {_describe(wrong_shape)}")
    if unexpected:
        raise PaliGemmaError(f"unexpected tensors in the checkpoint: {_describe(unexpected)}")
    missing = [to_disk_name(name) for name in expected if name not in state]
    if missing:
        raise PaliGemmaError(f"tensors missing from the checkpoint: {_describe(missing)}")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # a file of mixed precision loaded with dtype='auto': settle on the widest
        widest = torch.float32 if torch.float32 in dtypes else next(iter(dtypes))
        state = {name: t.to(widest) for name, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    return model.eval()


def load_pretrained(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    progress: bool = False,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The model and its processor from a checkpoint folder (or the name of a model shipped with the package)."""
    directory = resolve_checkpoint(name_or_path)
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    processor = PaliGemmaProcessor.from_pretrained(directory, config)  # fail fast on a missing tokenizer
    return _load_weights(directory, config, device, dtype, progress), processor


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_pretrained(
    model: PaliGemmaForConditionalGeneration, directory: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json and the weights (sharded above `max_shard_size`), readable by transformers too."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.to_json_file(directory / "config.json")

    tensors = {to_disk_name(name): t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
