"""The one training loop every stage uses: scheduled learning rate, loss, backward, clipping, an optimiser step.
A stage drives it so::

    for step, loss, lr in optimisation_steps(optimizer, parameters, schedule, compute_loss, total, clip,
                                             start=resumed_step):
        ...  # log, evaluate, checkpoint

`compute_loss(micro)` builds micro-batch `micro` of the next step and returns its share of the step's loss (the
shares add up to the loss of the whole batch); the caller decides what happens between steps.
Checkpoints go through `save_atomically`, so a run killed while writing one keeps the previous one whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def cosine_schedule(step: int, peak: float, warmup_steps: int, total_steps: int, minimum: float) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to `minimum` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return minimum + (peak - minimum) * cosine


def optimisation_steps(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    schedule: Callable[[int], float],
    compute_loss: Callable[[int], torch.Tensor],
    total_steps: int,
    grad_clip: float,
    start: int = 0,
    description: str = "training",
    accumulation: int = 1,
    progress: bool | None = None,
    combine: Callable[[float], float] = float,
) -> Iterator[tuple[int, float, float]]:
    """Steps `start` .. `total_steps - 1`; yields (steps done, loss, learning rate) after each optimiser step.

    Each step sets every parameter group's learning rate to `schedule(step)`, clears the old gradients, and for
    each of its `accumulation` micro-batches computes that share of the loss and backpropagates it, so gradients
    add up to those of the whole batch; then it clips their norm over `parameters` to `grad_clip` and steps the
    optimiser. A progress bar (tqdm; by default only when stderr is a terminal) shows the loss and learning rate.
    `combine` turns this process's loss into the step's (on several processes, the mean over them).
    """
    parameters = list(parameters)
    with tqdm(total=total_steps, initial=start, desc=description, disable=None if progress is None else not progress,
              leave=False) as bar:
        for step in range(start, total_steps):
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for micro in range(accumulation):
                share = compute_loss(micro)
                share.backward()
                loss = loss + share.detach().float().cpu()
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)  # under FSDP, the norm over every rank's shard
            optimizer.step()
            value = combine(loss.item())
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            yield step + 1, value, lr


def save_atomically(state: dict[str, Any], path: str | Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename: the old file stays whole until the new one is."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
