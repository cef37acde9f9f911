"""Loading and saving whole checkpoints: `load_pretrained` (a LoRA adapter too, if asked), `load_model`,
`save_pretrained`.

How weights are read decides how fast loading is and how much memory it takes. Tensors already in the wanted dtype
are views of the file mapped into memory (no copy: pages come in from the page cache when first used, and the model
takes exactly its weights' size). Tensors to convert (a float32 file loaded in bf16, say) are read a bounded chunk at
a time, on a few threads, straight into their final tensor, so loading never holds a second copy of the model. The
model is built on the meta device first (shapes, no memory) and takes the loaded tensors as its parameters.

On a Linux CPU, every tensor of 2 MB or more that loading makes rather than maps (quantized codes, a converted
dtype) is made in one block of memory that asks for 2 MB pages (`paligemma.kernels.huge_pages`): it costs nothing
there, and int8 decoding read its codes a few per cent faster from it. Mapped tensors stay mapped, and the mapping is
advised for 2 MB pages: where the page cache holds the file in 2 MB folios (a file this library wrote, or one read
cold, on kernels and file systems with large folios) they come at no cost. `huge_pages=True` copies mapped tensors
into 2 MB pages too, whatever the page cache holds (seconds of loading for a 3B model); `huge_pages=False` keeps
everything in 4 KB pages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PaliGemmaError
from ..kernels import accelerate as accelerate_model
from ..kernels.huge_pages import HugePageArena, huge_pages_unavailable, place_in_huge_pages, worth_huge_pages
from ..models.config import PaliGemmaConfig
from ..models.paligemma import PaliGemmaForConditionalGeneration
from ..training.lora import merge_lora
from .adapter import load_adapter
from .config_file import read_config
from .layout import CONFIG_FILE, TIED_HEAD, to_disk_name, to_library_name, weight_files
from .memory import return_free_memory
from .processor import PaliGemmaProcessor
from .safetensors import SafetensorsFile

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # models shipped inside the package, loadable by name

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the short names, as the command line offers them


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


READ_THREADS = min(4, os.cpu_count() or 1)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def _use_huge_pages(huge_pages: bool | None, device: torch.device) -> bool:
    """Whether weights may go into huge pages (`kernels.huge_pages`): wherever this system offers them and the
    model is on the CPU, unless `huge_pages=False`; `huge_pages=True` where they are not offered is an error."""
    if huge_pages is False:
        return False
    reason = "the model is not on the CPU" if device.type != "cpu" else huge_pages_unavailable()
    if reason is not None and huge_pages:
        raise PaliGemmaError(f"huge_pages=True, but {reason}")
    return reason is None


def _destinations(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], huge_pages: bool | None,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """An empty tensor in one huge-page arena for each (shape, dtype) of `specs` big enough to be worth it; {} where
    `_use_huge_pages` says no, or where the system refuses the mapping and huge pages were not asked for."""
    use = _use_huge_pages(huge_pages, device)  # first: huge_pages=True where there are none is an error
    big = {name: spec for name, spec in specs.items() if worth_huge_pages(*spec)}
    if not use or not big:
        return {}
    try:
        arena = HugePageArena.for_tensors(list(big.values()))
    except OSError as error:  # madvise refused (a sandbox, say): plain memory, unless huge pages were asked for
        if huge_pages:
            raise PaliGemmaError(f"huge_pages=True, but the system refused them: {error}") from None
        return {}
    return {name: arena.take(*spec) for name, spec in big.items()}


def _load_weights(
    directory: Path,
    config: PaliGemmaConfig,
    device: torch.device | str,
    dtype: torch.dtype | str | None,
    progress: bool,
    huge_pages: bool | None = None,
) -> PaliGemmaForConditionalGeneration:
    """A model of `config` on the meta device, then its tensors from the folder's safetensors, several at a time.

    A tensor already in `dtype` is a view of the mapped file, unless `huge_pages=True`; every large tensor that is
    read rather than mapped goes into one huge-page arena where `_use_huge_pages` allows.
    """
    files = [SafetensorsFile(path, huge_pages) for path in weight_files(directory)]
    device, dtype = parse_device(device), parse_dtype(dtype)

    model = empty_model(config)
    tied = config.text_config.tie_word_embeddings
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if not (tied and name == TIED_HEAD)}
    wanted: dict[str, tuple[SafetensorsFile, str]] = {}
    unexpected, wrong_shape = [], []
    for file in files:
        for disk_name in file.entries:
            name, shape = to_library_name(disk_name), file.shape(disk_name)
            if name == TIED_HEAD and tied:
                continue  # the head is the embedding table
            if name not in expected:
                unexpected.append(disk_name)
            elif shape != expected[name]:
                wrong_shape.append(f"{disk_name} {list(shape)} (expected {list(expected[name])}) in {file.path.name}")
            else:
                wanted[name] = (file, disk_name)
    if wrong_shape:
        raise PaliGemmaError(f"weights of the wrong shape for this config: {_describe(wrong_shape)}")
    if unexpected:
        raise PaliGemmaError(f"unexpected tensors in the checkpoint: {_describe(unexpected)}")
    missing = [to_disk_name(name) for name in expected if name not in wanted]
    if missing:
        raise PaliGemmaError(f"tensors missing from the checkpoint: {_describe(missing)}")

    stored = {file.dtype(disk_name) for file, disk_name in wanted.values()}
    if dtype is None and len(stored) > 1:  # a file of mixed precision loaded with dtype='auto': settle on the widest
        dtype = torch.float32 if torch.float32 in stored else next(iter(stored))
    destination = _destinations({name: (file.shape(disk_name), dtype or file.dtype(disk_name))
                                 for name, (file, disk_name) in wanted.items()
                                 if huge_pages or not file.mappable(disk_name, dtype, device)}, huge_pages, device)

    def read(name: str) -> torch.Tensor:
        file, disk_name = wanted[name]
        if name in destination:
            tensor = file.read(disk_name, dtype or file.dtype(disk_name), device, out=destination[name])
            if tensor.dtype != file.dtype(disk_name):
                # The conversion's chunk was freed into this thread's heap, where no later tensor of the arena
                # would reuse it (as tensors PyTorch allocates do): hand it back (io.memory), or each thread keeps one.
                return_free_memory()
            return tensor
        return file.tensor(disk_name, dtype, device)

    # Largest first, so the threads finish together; conversions run in parallel, mapped views cost nothing.
    order = sorted(wanted, key=lambda name: -wanted[name][0].nbytes(wanted[name][1]))
    total = sum(file.nbytes(disk_name) for file, disk_name in wanted.values())
    state: dict[str, torch.Tensor] = {}
    # No bar at all unless asked for: tqdm's first bar, even a disabled one, builds a process lock (3 ms).
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights") if progress else None
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for name, tensor in zip(order, pool.map(read, order)):
            state[name] = tensor
            if bar is not None:
                bar.update(wanted[name][0].nbytes(wanted[name][1]))
    if bar is not None:
        bar.close()
    state = {name: state[name] for name in wanted}  # the file's order
    if tied:
        state[TIED_HEAD] = state["language_model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.language_model.tie_weights()  # assignment gave the head a Parameter of its own: share the table again
    config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    return model.eval()


QUANTIZE_CHUNK_BYTES = 32 << 20  # wide weights read at a time when quantizing while loading


def _load_quantized(
    directory: Path,
    config: PaliGemmaConfig,
    device: torch.device | str,
    dtype: torch.dtype | str | None,
    scheme: str,
    group_size: int,
    huge_pages: bool | None = None,
) -> PaliGemmaForConditionalGeneration:
    """A quantized model, from a folder of quantized weights or from wide ones quantized as they are read.

    The model's structure is built on the meta device with empty quantized layers. From a quantized folder, every
    tensor is read as it is (codes keep their integer dtype, int8 scales their float32). From wide weights, each
    quantized layer's weight is read a few rows at a time (`QUANTIZE_CHUNK_BYTES`) with plain reads, quantized, and
    dropped, so the wide model never exists in memory: loading takes the quantized model's size plus one chunk.
    Where `_use_huge_pages` allows, every large buffer made here, and every large tensor read rather than mapped
    (all of them with `huge_pages=True`), is put in one huge-page arena.
    """
    from ..quantization.linear import QuantizedLinear
    from ..quantization.model import quantized_structure

    files = [SafetensorsFile(path, huge_pages) for path in weight_files(directory)]
    device, dtype = parse_device(device), parse_dtype(dtype)
    index = {}
    for file in files:
        for disk_name in file.entries:
            index[to_library_name(disk_name)] = (file, disk_name)
    from_file = config.quantization is not None
    if dtype is None:  # the file's own: read it off a tensor that is never quantized
        norm = index.get("language_model.norm.weight")
        if norm is None:
            raise PaliGemmaError("tensors missing from the checkpoint: language_model.model.norm.weight")
        dtype = norm[0].dtype(norm[1])
    model = empty_model(config)
    quantized_structure(model, scheme, group_size, dtype)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    quantized_buffers = {f"{name}.{b}" for name, layer in layers.items() for b, _ in layer.named_buffers()}
    head_kept_wide = config.text_config.tie_word_embeddings and TIED_HEAD in expected  # int4 can keep it

    def made_here(name: str) -> bool:  # the quantized buffers of wide weights, or a tensor read with a conversion
        if name in quantized_buffers and not from_file:
            return True
        file, disk_name = index.get(name, (None, None))
        wanted = expected[name].dtype if name in quantized_buffers else dtype
        return file is not None and not file.mappable(disk_name, wanted, device)

    destination = _destinations({name: (tuple(t.shape), t.dtype if name in quantized_buffers else dtype)
                                 for name, t in expected.items() if not (head_kept_wide and name == TIED_HEAD)
                                 and (huge_pages or made_here(name))}, huge_pages, device)
    state: dict[str, torch.Tensor] = {}
    used = set()
    if not from_file:  # wide weights: quantize each layer's as it is read
        tied = config.text_config.tie_word_embeddings
        for name, layer in layers.items():
            source = f"{name}.weight"
            if source not in index and tied and source == TIED_HEAD:
                source = "language_model.embed_tokens.weight"  # the head is the embedding table
            if source not in index:
                raise PaliGemmaError(f"tensors missing from the checkpoint: {to_disk_name(source)}")
            file, disk_name = index[source]
            if file.shape(disk_name) != (layer.out_features, layer.in_features):
                raise PaliGemmaError(f"weights of the wrong shape for this config: {disk_name} "
                                     f"{list(file.shape(disk_name))}")
            layer.to_empty(device=device)
            for buffer_name in layer._buffers:
                if f"{name}.{buffer_name}" in destination:
                    layer._buffers[buffer_name] = destination[f"{name}.{buffer_name}"]
            step = max(1, QUANTIZE_CHUNK_BYTES // (layer.in_features * 4))
            for start in range(0, layer.out_features, step):
                rows = (start, min(layer.out_features, start + step))
                layer.set_weight(file.read(disk_name, dtype, device, rows=rows), rows=slice(*rows))
                return_free_memory()  # the chunk and its temporaries, freed between codes that stay (io.memory)
            used.add(source)
            for buffer_name, buffer in layer.named_buffers():
                state[f"{name}.{buffer_name}"] = buffer
        if tied:
            used.add(TIED_HEAD)
    for name, tensor in expected.items():
        if name in state or (head_kept_wide and name == TIED_HEAD):
            continue
        if name not in index:
            raise PaliGemmaError(f"tensors missing from the checkpoint: {to_disk_name(name)}")
        file, disk_name = index[name]
        if file.shape(disk_name) != tuple(tensor.shape):
            raise PaliGemmaError(f"weights of the wrong shape for this config: {disk_name} "
                                 f"{list(file.shape(disk_name))} (expected {list(tensor.shape)})")
        # A quantized layer's buffers come as the structure made them (codes in their integer dtype, int8 scales
        # in float32, int4 scales and zeros in the model's dtype); everything else in the model's dtype.
        wanted = tensor.dtype if name in quantized_buffers else dtype
        if not wanted.is_floating_point and file.dtype(disk_name) != wanted:
            raise PaliGemmaError(f"{disk_name} holds {file.dtype(disk_name)} values where codes of {wanted} belong")
        if name in destination:
            state[name] = file.read(disk_name, wanted, device, out=destination[name])
        else:
            state[name] = file.tensor(disk_name, wanted, device)
        used.add(name)
    unexpected = [disk_name for name, (_, disk_name) in index.items() if name not in used]
    if unexpected:
        raise PaliGemmaError(f"unexpected tensors in the checkpoint: {_describe(unexpected)}")
    if head_kept_wide:  # the head is the embedding table, as in the wide model
        state[TIED_HEAD] = state["language_model.embed_tokens.weight"]
        used.add(TIED_HEAD)
    model.load_state_dict(state, assign=True, strict=True)
    if head_kept_wide:
        model.language_model.tie_weights()
    config.dtype = str(dtype).removeprefix("torch.")
    return model.eval()


def _accelerated(model: PaliGemmaForConditionalGeneration, accelerate: bool | None) -> PaliGemmaForConditionalGeneration:
    """Swap in the fast CPU products (`paligemma.kernels.accelerate`) unless told not to; on a GPU they do nothing."""
    if accelerate is None:
        accelerate = model.device.type == "cpu"
    return accelerate_model(model) if accelerate else model


def load_model(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    progress: bool = False,
    accelerate: bool | None = None,
    quantization: str | None = None,
    group_size: int = 128,
    huge_pages: bool | None = None,
) -> PaliGemmaForConditionalGeneration:
    """Build the model from a checkpoint folder's config and weights, converting each tensor to `dtype` on `device`.

    `accelerate` (default: on a CPU) swaps in `paligemma.kernels`' products; float32 models keep PyTorch's own
    unless `fast_paths(fp32=True)` says otherwise, so their numerics stay those of the reference. `quantization`
    ("int8", or "int4" in groups of `group_size`) quantizes the linear layers as the weights are read.
    `huge_pages`: where Linux offers them, on a CPU, every weight of 2 MB or more that loading makes (quantized
    codes, a converted dtype) goes into memory of 2 MB pages (`paligemma.kernels.huge_pages`), and those already in
    the wanted dtype stay views of the mapped file, advised for 2 MB pages; `True` reads those into huge pages too,
    `False` keeps everything in 4 KB pages.
    """
    directory = resolve_checkpoint(name_or_path)
    config = read_config(directory / CONFIG_FILE)
    stored = config.quantization
    if stored is not None and quantization is not None and (quantization, group_size if quantization == "int4"
                                                            else None) != (stored["scheme"], stored["group_size"]):
        raise PaliGemmaError(f"{directory} holds {stored['scheme']} weights already; load it without quantization= "
                             "(or with the same scheme)")
    if stored is not None or quantization is not None:
        scheme = stored["scheme"] if stored is not None else quantization
        group = (stored["group_size"] if stored is not None else group_size) or 128
        return _accelerated(_load_quantized(directory, config, device, dtype, scheme, group, huge_pages),
                            accelerate)
    return _accelerated(_load_weights(directory, config, device, dtype, progress, huge_pages), accelerate)


def load_pretrained(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    progress: bool = False,
    accelerate: bool | None = None,
    adapter: str | Path | None = None,
    merge: bool = False,
    quantization: str | None = None,
    group_size: int = 128,
    huge_pages: bool | None = None,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The model and its processor from a checkpoint folder (or the name of a model shipped with the package).

    `adapter`: a LoRA folder in peft's format (`load_adapter`), added frozen and unmerged; `merge` folds it in.
    `quantization`: "int8" or "int4" (in groups of `group_size`) quantizes the linear layers after loading
    (`paligemma.quantization.quantize`); an adapter must then be merged first. `huge_pages`: as `load_model`.
    """
    if merge and adapter is None:
        raise PaliGemmaError("merge=True needs an adapter folder to merge")
    if quantization is not None and adapter is not None and not merge:
        raise PaliGemmaError("a quantized model takes an adapter only merged (merge=True): its layers are not LoRA's")
    directory = resolve_checkpoint(name_or_path)
    config = read_config(directory / CONFIG_FILE)
    processor = PaliGemmaProcessor.from_pretrained(directory, config)  # fail fast on a missing tokenizer
    stored = config.quantization
    if stored is not None and adapter is not None:
        raise PaliGemmaError(f"{directory} holds quantized weights: merge the adapter into the wide model first")
    if stored is not None or (quantization is not None and adapter is None):
        model = load_model(directory, device, dtype, progress, accelerate, quantization, group_size, huge_pages)
        return model, processor
    model = _accelerated(_load_weights(directory, config, device, dtype, progress, huge_pages), accelerate)
    if adapter is not None:
        load_adapter(model, adapter)
        if merge:
            merge_lora(model)
    if quantization is not None:  # after merging the adapter into the wide weights
        from ..quantization import quantize

        quantize(model, quantization, group_size)
        if _use_huge_pages(huge_pages, parse_device(device)):
            place_in_huge_pages(model)  # the new codes; the weights read into huge pages stay where they are
    return model, processor


def save_pretrained(
    model: PaliGemmaForConditionalGeneration, directory: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json and the weights (sharded above `max_shard_size`), readable by transformers too."""
    model.save_pretrained(directory, max_shard_size)


