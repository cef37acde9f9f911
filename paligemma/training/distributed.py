"""Fine-tuning on several processes: torchrun starts them, PyTorch's distributed engine joins them into one run.

    torchrun --nproc_per_node 8 -m paligemma.finetune --model ... --train ... --distributed fsdp --out runs/big

Each process (a *rank*) holds the model and reads its own share of every global batch; after each backward pass
the ranks' gradients are combined, so every rank takes the same optimiser step. Two ways to hold the model:

    ddp    DistributedDataParallel: every rank keeps all the weights and the optimiser state, and gradients are
           all-reduced (summed, then averaged). For models that fit on one device.
    fsdp   FSDP2's `fully_shard`: each encoder and decoder layer, then the rest of the model, is split into
           1/N shards, one per rank. A layer's weights are all-gathered just before it runs and freed after;
           gradients are reduce-scattered, so each rank keeps and updates only its shard of the weights, gradients
           and optimiser state.

`World` is what the rest of fine-tuning needs to know about the group (rank, size, and the few collectives it
uses); a run on one process gets `World()`, whose collectives return their input, so one code path serves both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PaliGemmaError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistributedSettings:
    """How the model is spread over the ranks. None of it changes what the run computes, only where."""

    strategy: str = "fsdp"  # "ddp" or "fsdp"
    reshard_after_forward: bool = True  # fsdp: free each layer's gathered weights after its forward (ZeRO-3)
    cpu_offload: bool = False  # fsdp: keep the sharded weights, gradients and optimiser state in CPU memory

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PaliGemmaError(f"unknown --distributed {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.strategy == "ddp" and (self.cpu_offload or not self.reshard_after_forward):
            raise PaliGemmaError("--cpu-offload and --no-reshard-after-forward are FSDP's: use --distributed fsdp")


@dataclass(frozen=True)
class World:
    """This process's place in the group, and the collectives fine-tuning needs. `World()` is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo"; None without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def sum(self, value: float) -> float:
        """The sum over ranks of one number from each."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def min(self, value: int) -> int:
        """The smallest over ranks of one integer from each."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a rank that is done must keep stepping until all are)."""
        return self.min(int(flag)) == 1

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @property
    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.elastic) sets these for every worker it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def restarted_by_torchrun() -> bool:
    """Whether torchrun has restarted the group (`--max-restarts`) after a worker failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def join_group(device: str) -> tuple[World, str]:
    """Join the process group torchrun set up: NCCL on GPUs, gloo on CPUs. Returns the world and this rank's device.

    On a GPU each rank takes the GPU of its local rank (`cuda:LOCAL_RANK`).
    """
    if not launched_by_torchrun():
        raise PaliGemmaError("--distributed needs several processes started by torchrun, e.g. "
                             "torchrun --nproc_per_node 2 -m paligemma.finetune ... --distributed fsdp")
    rank, size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise PaliGemmaError(f"rank {rank} has local rank {local_rank} but this machine has "
                                 f"{torch.cuda.device_count()} GPUs: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if on_gpu else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=_store_of_this_start(size), rank=rank, world_size=size,
                                             device_id=torch.device(device) if on_gpu else None)
    return World(rank, size, local_rank, backend), device


def _store_of_this_start(size: int) -> torch.distributed.Store:
    """torchrun's key-value store, under a prefix of its own for this start of the group.

    torchrun keeps one store for all its restarts (`--max-restarts`), and a process group started again in it finds
    the previous start's keys: a rank may read a dead peer's address and fail to connect. Every rank adds 1 to a
    counter as it joins, so start k (counting from 0) reads values k*size+1 .. (k+1)*size, the same k on every rank
    and every node (torchrun's own restart count is kept per node and can differ between them).
    """
    store, _, _ = next(torch.distributed.rendezvous("env://"))
    start = (store.add("paligemma/joined", 1) - 1) // size
    return torch.distributed.PrefixStore(f"paligemma/start-{start}/", store)


def leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def refuse_lone_torchrun_workers() -> None:
    """Several processes without --distributed would be N separate runs writing one folder: say so instead."""
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise PaliGemmaError(f"started by torchrun as {os.environ['WORLD_SIZE']} processes without --distributed: "
                             "pass --distributed ddp or --distributed fsdp")


def rank_share(items: Sequence[Any], rank: int, size: int) -> list[Any]:
    """Rank `rank`'s contiguous part of `items`: the parts are disjoint, cover `items`, and differ by at most one
    (the first `len(items) % size` ranks take one more)."""
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: every SigLIP encoder layer, then every Gemma decoder layer."""
    return [*model.vision_tower.encoder.layers, *model.language_model.layers]


def shard(model: nn.Module, settings: DistributedSettings, bf16: bool) -> None:
    """FSDP2: `fully_shard` each layer, then the root (embeddings, tower's head, projector, final norm), in place.

    Under `bf16`, weights are all-gathered in bf16 for compute and gradients reduced in fp32 (the sharded master
    weights stay as they are). Activation checkpointing, if wanted, must already be on the layers.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    for layer in layers_of(model):
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, mp_policy=precision,
                    offload_policy=offload)
    # The root's parameters (embeddings, tied to the head) are used again at the end of the forward: keep them.
    fully_shard(model, reshard_after_forward=False, mp_policy=precision, offload_policy=offload)


def replicate(model: nn.Module, device: str) -> nn.Module:
    """DDP: a wrapper whose forward also registers the gradient all-reduce; the model itself stays as it was."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)  # no second copy


def sync_gradients(model: nn.Module, now: bool) -> None:
    """FSDP: skip the reduce-scatter on all but the last micro-batch of a step (the gradients accumulate locally
    in full size until then); a no-op for other models."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(now)


def on_every_rank(world: World, work: Callable[[], Any]) -> Any:
    """Run `work`; a failure on this rank is reported once, naming the rank, and ends this process with status 2
    (torchrun then stops the other ranks rather than leave them waiting in a collective)."""
    try:
        return work()
    except PaliGemmaError as error:
        print(f"error: rank {world.rank} of {world.size}: {error}", file=sys.stderr, flush=True)
    except Exception as error:  # a peer that died mid-collective, out of memory, ...: one line, not a traceback
        print(f"error: rank {world.rank} of {world.size}: {type(error).__name__}: {str(error).splitlines()[0]}",
              file=sys.stderr, flush=True)
    os._exit(2)  # at once: a clean exit would wait on the process group's collectives and threads
