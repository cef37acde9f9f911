"""What every chapter of the book shares: choosing the device, the versions cell, and the verdict line.

Outputs printed through these helpers are the same on every machine (rounded, or booleans), so the
notebooks can be stored with their outputs and checked by nbval on CPU and GPU alike.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

# torchao, a reference of the tests that transformers imports whenever it is installed, logs at every import on a
# CPU-only torch that its CUDA extensions do not load, and torch then logs that torchao registers an Enum the old way.
# Neither concerns a chapter; quieted here, they stay out of the notebooks' stored outputs (nbval compares stderr too).
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from .errors import PaliGemmaError

REAL_WEIGHTS_ENV = "PALIGEMMA_REAL_WEIGHTS"
VAE_WEIGHTS_ENV = "PALIGEMMA_VAE_WEIGHTS"
REPOSITORY_ENV = "PALIGEMMA_REPOSITORY"


def repository() -> Path:
    """The book's checkout (the folder with `images/` and `book/`): $PALIGEMMA_REPOSITORY, the folder this package
    was installed from in editable mode, or the working directory or one above it (where notebooks run)."""
    candidates = [os.environ.get(REPOSITORY_ENV), Path(__file__).resolve().parent.parent, Path.cwd(), Path.cwd().parent]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir() and (Path(candidate) / "book").is_dir():
            return Path(candidate)
    raise PaliGemmaError("the book's files (images/, book/) were not found: run from a checkout of the repository, "
                         f"or set ${REPOSITORY_ENV} to one")


def __getattr__(name: str) -> Path:
    """`REPOSITORY` and `IMAGES`, found when first asked for (a pip-installed package has no checkout beside it)."""
    if name == "REPOSITORY":
        return repository()
    if name == "IMAGES":
        return repository() / "images"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pick_device() -> torch.device:
    """CUDA when present (or `PALIGEMMA_DEVICE` says otherwise), else the CPU; float32 math stays exact on both."""
    name = os.environ.get("PALIGEMMA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        # The reference checks compare float32 results: keep TF32 off so the GPU computes in full float32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def versions() -> str:
    """One line naming the versions a notebook ran with (its output varies by machine, so nbval ignores it)."""
    import paligemma

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"paligemma {paligemma.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("transformers not installed (reference checks will be skipped)")
    parts.append(f"device {pick_device()}")
    return ", ".join(parts)


def max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours.detach().double().cpu() - reference.detach().double().cpu()).abs().max().item()


def check(name: str, ours: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> None:
    """Print the device-independent verdict "name: max abs diff < atol: True" (nbval fails the notebook on False)."""
    same_shape = tuple(ours.shape) == tuple(reference.shape)
    ok = same_shape and max_diff(ours, reference) < atol
    print(f"{name}: max |diff| < {atol:g}: {ok}")


def real_weights() -> Path | None:
    """The folder of a real PaliGemma checkpoint named by $PALIGEMMA_REAL_WEIGHTS, if the reader has one."""
    value = os.environ.get(REAL_WEIGHTS_ENV)
    return Path(value) if value and Path(value).is_dir() else None


def vae_weights() -> Path | None:
    """The real `vae-oid.npz` (PaliGemma's mask decoder) named by $PALIGEMMA_VAE_WEIGHTS, if the reader has it."""
    value = os.environ.get(VAE_WEIGHTS_ENV)
    return Path(value) if value and Path(value).is_file() else None


def load_reference(name_or_path: str | Path = "tiny-shapes", device: torch.device | str = "cpu"):
    """The same checkpoint in transformers' PaliGemma (eager attention, so attention weights are exact), quietly."""
    import transformers
    from transformers import PaliGemmaForConditionalGeneration

    from .io.checkpoint import resolve_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = PaliGemmaForConditionalGeneration.from_pretrained(resolve_checkpoint(name_or_path),
                                                              attn_implementation="eager")
    return model.to(device).eval()


def shapes_scene(seed: int):
    """A scene of the shapes world (the tiny-shapes model's training distribution), made from a seed."""
    import random

    from .training.shapes import make_scene

    return make_scene(random.Random(seed))
