"""The Hugging Face checkpoint folder: tensor names on disk, weight files and shards, config.json.

A folder holds `config.json`, the weights (`model.safetensors`, or shards listed in `model.safetensors.index.json`)
and `tokenizer.model`. Tensor names on disk differ from this library's by two levels that carry no meaning here:

    disk (transformers)                      this library
    language_model.model.layers.0.…          language_model.layers.0.…
    vision_tower.vision_model.encoder.…      vision_tower.encoder.…
    multi_modal_projector.linear.…           multi_modal_projector.linear.…

Files from newer `transformers` versions may drop the `vision_model.` level or add a leading `model.`; both are read.
This module knows the layout, not the model: it works on names, dicts and tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import PaliGemmaError
from .safetensors import write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
TIED_HEAD = "language_model.lm_head.weight"  # absent from files when the head is the embedding table


def to_library_name(name: str) -> str:
    """A tensor name as written by any transformers version -> the name in this library's modules."""
    if name.startswith("model."):  # the in-memory layout of transformers 5
        name = name[len("model."):]
    if name == "lm_head.weight":
        return TIED_HEAD
    name = name.replace("language_model.model.", "language_model.", 1)
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def to_disk_name(name: str) -> str:
    """This library's name -> the layout of the released checkpoints (which every transformers version reads)."""
    if name.startswith("language_model.") and not name.startswith("language_model.lm_head."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


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


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or text such as '5GB', '50KB', '2GiB'."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    try:
        for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * factor)
        return int(text)
    except ValueError:
        raise PaliGemmaError(f"cannot read the shard size {size!r}: use bytes or a size such as '5GB'") from None


def write_json(path: Path, values: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def write_checkpoint(
    directory: str | Path,
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    max_shard_size: int | str = "5GB",
    skip: Iterable[str] = (),
    values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Write config.json and the weights (library names -> disk names), sharded above `max_shard_size`.

    `skip` names tensors not to write (the tied head). `values`, as in `write_safetensors`, makes each tensor's
    contents when it is due, so `tensors` may be meta tensors. Returns the bytes of weights written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skipped = set(skip)
    named = {to_disk_name(name): tensor for name, tensor in tensors.items() if name not in skipped}
    library_name = {to_disk_name(name): name for name in tensors}
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    make = None if values is None else (lambda disk_name, tensor: values(library_name[disk_name], tensor))
    total = 0
    if len(shards) == 1:
        total = write_safetensors(directory / SINGLE_FILE, shards[0], make)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(directory / file_name, shard, make)
            weight_map.update({name: file_name for name in shard})
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / CONFIG_FILE, config)
    return total
