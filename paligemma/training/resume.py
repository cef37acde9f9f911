"""A fine-tuning run saved so that it can go on: on any number of processes, after a kill at any moment.

    out/checkpoint/          the last complete checkpoint, in torch.distributed.checkpoint (DCP)'s format
        .metadata            every tensor's global shape, and which file holds which slice of it
        __0_0.distcp ...     one file per rank: that rank's trainable weights and optimiser state (its shard)
        run.json             the step, the settings and the record so far (rank 0 writes it)

Only the trainable weights are saved; the frozen ones are the base checkpoint's. Each rank writes its own shard and
nothing is gathered on one rank. Since the metadata gives global shapes and offsets, a checkpoint written by two
ranks under FSDP loads into one process, and one written by one process loads into two (each rank reads the slices
its shard needs). Optimiser state is keyed by parameter name, so the same holds for it.

Every save goes to `checkpoint.partial/`; once all ranks have finished it, rank 0 moves the old checkpoint aside,
renames the new one into place and deletes the old. A kill at any point leaves one whole checkpoint: the new one,
or the old one (under `checkpoint/` or, between the two renames, `checkpoint.previous/`). Across several machines
`out` must be a shared filesystem, as DCP's file writer needs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import PaliGemmaError
from ..io.layout import write_json
from .distributed import World

CHECKPOINT_DIR = "checkpoint"
PROGRESS_FILE = "run.json"
_TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


def _folders(out: Path) -> tuple[Path, Path, Path]:
    return out / CHECKPOINT_DIR, out / f"{CHECKPOINT_DIR}.partial", out / f"{CHECKPOINT_DIR}.previous"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The folder of the last complete checkpoint in `out`, or None."""
    final, _, previous = _folders(Path(out))
    for folder in (final, previous):
        if (folder / PROGRESS_FILE).is_file():
            return folder
    return None


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict,
                    world: World) -> None:
    """Every rank writes its shard of the trainable weights and optimiser state; rank 0 adds `progress` and puts
    the checkpoint in place (see the module's docstring for why a kill never leaves it half written)."""
    final, partial, previous = _folders(out)
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    world.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
    try:
        with _quiet_dcp():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
    except dcp.api.CheckpointException as error:  # DCP gathers each rank's failure: raise a disk's error as such
        raise _disk_error(error, partial) from None
    if world.is_main:
        write_json(partial / PROGRESS_FILE, progress)
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        partial.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    world.barrier()


def _disk_error(error: dcp.api.CheckpointException, folder: Path) -> Exception:
    """The first OSError behind a failed DCP save (a full disk, a lost permission), naming the folder."""
    for failure in error.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return OSError(cause.errno, cause.strerror, cause.filename or str(folder))
    return error


def read_progress(folder: Path) -> dict:
    try:
        return json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PaliGemmaError(f"{folder / PROGRESS_FILE} is not readable: {error}") from None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill this rank's shard of the trainable weights and optimiser state from a checkpoint written by any
    number of ranks. Refuses a checkpoint of other trainable weights, or an unreadable one, in one line."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
    try:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    except Exception as error:
        raise PaliGemmaError(f"{folder} is not a readable checkpoint: {type(error).__name__}: {error}") from None
    saved_weights = {key.removeprefix("model.") for key in saved if key.startswith("model.")}
    if saved_weights != set(model_state):
        difference = sorted(saved_weights ^ set(model_state))
        raise PaliGemmaError(f"{folder} holds other trainable weights than this run's model "
                             f"({len(difference)} differ, first {difference[0]})")
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=folder)
    except Exception as error:  # a truncated shard, a missing file: name the folder, not DCP's internals
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise PaliGemmaError(f"{folder} is not a readable checkpoint: {message}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
