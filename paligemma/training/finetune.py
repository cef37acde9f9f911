"""Fine-tuning a pretrained PaliGemma on your own data: the run behind `python -m paligemma.finetune`.

    finetune("tiny-shapes", "data/train.jsonl", "runs/relations", FinetuneSettings(method="lora"),
             eval_file="data/val.jsonl")

writes into the output folder

    model/          the fine-tuned model, adapters merged, in the Hugging Face layout with its tokenizer
    adapter/        (LoRA) the adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors
    record.json     the settings, the loss of every step, every evaluation, parameter counts, time and memory
    checkpoint/     what `resume=True` continues from, one shard per rank, on any number of processes (`resume`)

The data is checked whole before anything is written. The loss is the prefix-LM loss on the answers only; the
batches of each step follow from the seed and the step (`data.batch_indices`), and so do the random draws of
dropout, so a run resumed after a kill reaches the same weights as one never stopped.

Under torchrun with `distributed=DistributedSettings(...)` the same run spreads over several processes
(`distributed.py`): each rank takes its share of every global batch, and the step is the one process's step.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PaliGemmaError
from ..io.adapter import save_adapter
from ..io.checkpoint import empty_model, load_pretrained, parse_device, parse_dtype, resolve_checkpoint
from ..io.config_file import read_config
from ..io.layout import CONFIG_FILE, write_json
from ..io.processor import PaliGemmaProcessor
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .data import FinetuneExample, batch_indices, collate, read_examples
from .distributed import DistributedSettings, World, layers_of, rank_share, replicate, shard, sync_gradients
from .lora import LoraSettings, merge_lora
from .loop import cosine_schedule, optimisation_steps
from .methods import METHODS, count_parameters, select_trainable
from .resume import latest_checkpoint, load_checkpoint, read_progress, save_checkpoint
from .scoring import evaluate_examples

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
RECORD_FILE = "record.json"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a run's result; a resumed run must have the same."""

    method: str = "lora"
    steps: int = 300
    batch_size: int = 16  # examples per optimiser step
    grad_accumulation: int = 1  # micro-batches per step (per process): about batch_size / grad_accumulation at once
    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0  # where the cosine ends
    warmup_fraction: float = 0.1  # of the steps, a linear warm-up (big_vision's colab: 10%)
    optimizer: str = "adamw"
    weight_decay: float = 0.0  # AdamW's, on matrices only
    momentum: float = 0.0  # SGD's (big_vision's colab: plain SGD)
    grad_clip: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = LoraSettings().alpha  # 8: a scale alpha / rank of 1, as peft's default and the HF guide
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LoraSettings().target_modules
    lora_parts: tuple[str, ...] = LoraSettings().parts  # add "vision_tower" to adapt SigLIP's projections too
    precision: str = "fp32"  # "bf16": products under bf16 autocast, frozen weights stored in bf16
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    from_scratch: bool = False  # start from random weights instead of the checkpoint's (a baseline)
    eval_every: int = 50
    eval_examples: int = 0  # 0: every held-out example
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accumulation", "lora_rank", "eval_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise PaliGemmaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_micro_batches(self, World())
        if self.method not in METHODS:
            raise PaliGemmaError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise PaliGemmaError(f"unknown optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise PaliGemmaError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.learning_rate > 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise PaliGemmaError(f"learning rates must satisfy 0 <= min-learning-rate <= learning-rate and "
                                 f"learning-rate > 0, got {self.min_learning_rate} and {self.learning_rate}")
        checks = {"warmup-fraction": 0 <= self.warmup_fraction < 1, "weight-decay": self.weight_decay >= 0,
                  "momentum": 0 <= self.momentum < 1, "grad-clip": self.grad_clip > 0,
                  "eval-examples": self.eval_examples >= 0}
        for name, ok in checks.items():
            if not ok:
                raise PaliGemmaError(f"{name} is out of range: {getattr(self, name.replace('-', '_'))}")
        self.lora_settings()  # refuses a bad rank, alpha, dropout or target

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            target_modules=tuple(self.lora_targets), parts=tuple(self.lora_parts))

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)

    def learning_rate_at(self, step: int) -> float:
        return cosine_schedule(step, self.learning_rate, self.warmup_steps, self.steps, self.min_learning_rate)

    def to_dict(self) -> dict:
        return {**asdict(self), "lora_targets": list(self.lora_targets), "lora_parts": list(self.lora_parts)}


@dataclass
class Run:
    """A model being fine-tuned, with its data, optimiser and record so far, on this rank of `world`."""

    model: PaliGemmaForConditionalGeneration  # under FSDP, sharded in place
    processor: PaliGemmaProcessor
    settings: FinetuneSettings
    train: list[FinetuneExample]
    held_out: list[FinetuneExample]
    optimizer: torch.optim.Optimizer
    world: World = field(default_factory=World)
    distributed: DistributedSettings | None = None
    forward: nn.Module | None = None  # what a training forward goes through: DDP's wrapper, else the model
    record: dict = field(default_factory=dict)
    step: int = 0

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]


# --- building a run --------------------------------------------------------------------------------------------------


def _reinitialise(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor, seed: int) -> None:
    """Random weights, as tiny-shapes' pretraining starts from (`pretrain.init_weights`)."""
    from .pretrain import init_weights

    pieces = processor.tokenizer.sp
    locations = [pieces.piece_to_id(f"<loc{b:04d}>") for b in range(1024)]
    known = all(pieces.id_to_piece(i) == f"<loc{b:04d}>" for b, i in enumerate(locations))
    init_weights(model, seed, locations if known else None)


def _build_optimizer(trainable: list[nn.Parameter], settings: FinetuneSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=settings.learning_rate, momentum=settings.momentum)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.learning_rate)


def _checkpoint_layers(model: PaliGemmaForConditionalGeneration) -> None:
    """Activation checkpointing on every encoder and decoder layer, keeping the parameters' names."""
    from torch.distributed._composable import checkpoint

    for layer in layers_of(model):
        checkpoint(layer)


def check_micro_batches(settings: FinetuneSettings, world: World) -> None:
    """Every rank runs every micro-batch (FSDP's collectives must match), so none may be empty. Micro-batches may
    differ in size: each one's loss is weighted by its share of the step's answer tokens."""
    if settings.batch_size // world.size < settings.grad_accumulation:
        where = f" over {world.size} processes" if world.size > 1 else ""
        raise PaliGemmaError(f"batch-size {settings.batch_size}{where} with grad-accumulation "
                             f"{settings.grad_accumulation} leaves a micro-batch empty: batch-size must be at least "
                             f"{world.size * settings.grad_accumulation}")


def prepare_run(model_path: str | Path, train_file: str | Path, settings: FinetuneSettings,
                eval_file: str | Path | None = None, device: str = "cpu", world: World = World(),
                distributed: DistributedSettings | None = None) -> Run:
    """Load the model and check all the data; then freeze, add adapters, checkpoint activations, shard or
    replicate it over `world` (with `distributed`), and build the optimiser. Writes nothing."""
    check_micro_batches(settings, world)
    device = parse_device(device)
    if distributed is not None and distributed.cpu_offload and device.type != "cuda":
        raise PaliGemmaError("--cpu-offload keeps the shards in CPU memory while a GPU computes: it needs "
                             "--device cuda")
    saved_dtype = read_config(resolve_checkpoint(model_path) / CONFIG_FILE).dtype or "float32"  # saved in it again
    model, processor = load_pretrained(model_path, device=device, dtype=torch.float32, accelerate=False)
    train = read_examples(train_file, processor)
    held_out = read_examples(eval_file, processor) if eval_file is not None else []
    if settings.eval_examples:
        held_out = held_out[:settings.eval_examples]
    if settings.from_scratch:
        _reinitialise(model, processor, settings.seed)
    select_trainable(model, settings.method, settings.lora_settings(), seed=settings.seed)
    if settings.precision == "bf16":  # frozen weights in half precision, trainable ones in fp32 (big_vision)
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    if settings.activation_checkpointing:  # before sharding, so FSDP wraps the checkpointed layers
        _checkpoint_layers(model)
    trained, total = count_parameters(model)  # before sharding: a sharded parameter counts only this rank's part
    forward: nn.Module = model
    if distributed is not None and distributed.strategy == "fsdp":
        shard(model, distributed, bf16=settings.precision == "bf16")
    elif distributed is not None:
        forward = replicate(model, str(device))
    model.train()
    optimizer = _build_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    record = {"model": str(model_path), "train": str(train_file), "eval": None if eval_file is None else str(eval_file),
              "settings": settings.to_dict(), "device": str(device), "train_examples": len(train),
              "eval_examples": len(held_out), "trainable_parameters": trained, "parameters": total,
              "saved_dtype": saved_dtype,
              "distributed": None if distributed is None else {**asdict(distributed), "processes": world.size,
                                                                "backend": world.backend},
              "history": [], "evaluations": []}
    return Run(model, processor, settings, train, held_out, optimizer, world, distributed, forward, record)


# --- the steps -------------------------------------------------------------------------------------------------------


def autocast_for(run: Run) -> torch.autocast:
    return torch.autocast(run.model.device.type, dtype=torch.bfloat16, enabled=run.settings.precision == "bf16")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The random seed of one step on one rank: dropout's draws follow from the step, not from the run's history."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def rank_batches(run: Run, step: int) -> list[list[int]]:
    """This rank's micro-batches of step `step`, as example indices: its share of the global batch, in
    `grad_accumulation` parts. Over the ranks the shares are disjoint and make up the global batch."""
    settings, world = run.settings, run.world
    mine = rank_share(batch_indices(len(run.train), settings.batch_size, step, settings.seed), world.rank, world.size)
    return [rank_share(mine, micro, settings.grad_accumulation) for micro in range(settings.grad_accumulation)]


def step_loss(run: Run, step: int) -> Callable[[int], torch.Tensor]:
    """compute_loss(micro) for the training loop: each micro-batch's loss weighted by its share of the answer
    tokens of the whole global batch (counted over all ranks), so the shares add up to the mean over every answer
    token of the step, however the batch is split over ranks and micro-batches. DDP and FSDP average the ranks'
    gradients, so each rank's share is scaled by the number of ranks to make that average a sum."""
    world = run.world
    batches = [collate(run.processor, [run.train[i] for i in micro]) for micro in rank_batches(run, step)]
    tokens = world.sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
    torch.manual_seed(step_seed(run.settings.seed, step, world.rank))

    def compute_loss(micro: int) -> torch.Tensor:
        batch = {k: v.to(run.model.device) for k, v in batches[micro].items()}
        share = int((batch["labels"][:, 1:] != -100).sum()) / tokens * world.size
        sync_gradients(run.model, micro == len(batches) - 1)
        with autocast_for(run):
            return run.forward(**batch, return_logits=False).loss * share
    return compute_loss


def evaluate_run(run: Run) -> dict:
    started = time.monotonic()
    evaluation = evaluate_examples(run.model, run.processor, run.held_out, autocast=autocast_for(run),
                                   world=run.world)
    return {"step": run.step, **evaluation.summary(), "seconds": round(time.monotonic() - started, 2)}


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """The peak of this process: CUDA memory allocated on a GPU, resident memory (max RSS) on a CPU."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 1e9
    return "max_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# --- saving and resuming ---------------------------------------------------------------------------------------------


def save_state(run: Run, out: Path) -> None:
    """The checkpoint to resume from (`resume.save_checkpoint`): each rank's shard, plus step, settings, record."""
    progress = {"step": run.step, "settings": run.settings.to_dict(), "record": run.record}
    save_checkpoint(out, run.model, run.optimizer, progress, run.world)


def load_state(run: Run, out: Path) -> None:
    """Continue from the last checkpoint in `out`, written by any number of processes: the same settings, then
    weights, optimiser state, step and record."""
    folder = latest_checkpoint(out)
    if folder is None:
        raise PaliGemmaError(f"nothing to resume: no checkpoint in {out}")
    progress = read_progress(folder)
    if progress.get("settings") != run.settings.to_dict():
        changed = sorted(k for k, v in run.settings.to_dict().items() if progress.get("settings", {}).get(k) != v)
        raise PaliGemmaError(f"cannot resume {folder} with different settings: {', '.join(changed)}")
    load_checkpoint(folder, run.model, run.optimizer)
    run.step, saved = progress["step"], progress["record"]
    run.record = {**saved, "distributed": run.record["distributed"], "device": run.record["device"]}


def _unsharded_copy(run: Run) -> PaliGemmaForConditionalGeneration | None:
    """The whole model on rank 0 (None elsewhere). Under FSDP every rank sends its shards to rank 0's CPU memory,
    where they are assigned into an empty model of the same structure; otherwise the model is already whole."""
    if run.distributed is None or run.distributed.strategy != "fsdp":
        return run.model if run.world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.world.is_main:
        return None
    model = empty_model(run.model.config)
    select_trainable(model, run.settings.method, run.settings.lora_settings(), seed=run.settings.seed)
    model.load_state_dict(state, assign=True, strict=True)
    if model.config.text_config.tie_word_embeddings:
        model.language_model.tie_weights()
    return model


def save_results(run: Run, out: Path) -> None:
    """The adapter (LoRA), then the merged model in the base checkpoint's layout, with its tokenizer; one folder,
    written by rank 0."""
    model = _unsharded_copy(run)
    if model is None:
        return
    if run.settings.method == "lora":
        save_adapter(model, out / "adapter", base_model_name_or_path=run.record["model"])
        merge_lora(model)
    model.to(parse_dtype(run.record["saved_dtype"]))
    model.save_pretrained(out / "model")
    run.processor.save_pretrained(out / "model")


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PaliGemmaError(f"cannot write to --out {out}: {error.strerror}") from None


# --- the whole run ---------------------------------------------------------------------------------------------------


def finetune(model_path: str | Path, train_file: str | Path, out: str | Path, settings: FinetuneSettings,
             eval_file: str | Path | None = None, device: str = "cpu", resume: bool = False,
             log: Callable[[str], None] | None = print, progress: bool | None = None,
             world: World = World(), distributed: DistributedSettings | None = None) -> dict:
    """Fine-tune `model_path` on `train_file`, evaluating on `eval_file`, into `out`; returns the record.

    On several processes pass this rank's `world` (`distributed.join_group`) and `distributed`; messages and the
    progress bar then come from rank 0 only.
    """
    out = Path(out)
    resolve_checkpoint(model_path)  # a missing model is named before the data is read
    if not resume and latest_checkpoint(out) is not None:
        raise PaliGemmaError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    run = prepare_run(model_path, train_file, settings, eval_file, device, world, distributed)
    _writable(out)
    say = (log or (lambda message: None)) if world.is_main else (lambda message: None)
    try:
        if resume:
            load_state(run, out)
            say(f"resuming from step {run.step}")
        _train(run, out, say, progress if world.is_main else False)
        save_results(run, out)
        if world.is_main:
            write_json(out / RECORD_FILE, run.record)
        world.barrier()
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise PaliGemmaError(f"no space left on the device while writing {error.filename or out}") from None
        raise PaliGemmaError(f"cannot write {error.filename or out}: {error.strerror}") from None
    return run.record


def _train(run: Run, out: Path, say: Callable[[str], None], progress: bool | None) -> None:
    settings, record, world = run.settings, run.record, run.world
    started = time.monotonic() - record.get("train_seconds", 0.0)
    losses = {}

    def compute_loss(micro: int) -> torch.Tensor:
        if micro == 0:
            losses["step"] = step_loss(run, run.step)
        return losses["step"](micro)

    steps = optimisation_steps(run.optimizer, run.trainable, settings.learning_rate_at, compute_loss, settings.steps,
                               settings.grad_clip, start=run.step, description=f"fine-tuning ({settings.method})",
                               accumulation=settings.grad_accumulation, progress=progress,
                               combine=lambda loss: world.sum(loss) / world.size)
    for run.step, loss, lr in steps:
        record["history"].append({"step": run.step, "loss": round(loss, 5), "lr": lr})
        if run.held_out and (run.step % settings.eval_every == 0 or run.step == settings.steps):
            paused = time.monotonic()
            evaluation = evaluate_run(run)
            started += time.monotonic() - paused  # training time leaves the evaluations out
            record["evaluations"].append(evaluation)
            say(f"step {run.step}: loss {loss:.4f}, held-out loss {evaluation['held_out_loss']:.4f}, "
                f"score {evaluation['score']:.3f}")
        record["train_seconds"] = round(time.monotonic() - started, 2)
        kind, peak = peak_memory_gb(run.model.device)
        peaks = world.gather(round(peak, 3))
        record["peak_memory"] = {"kind": kind, "gb": max(peaks)} | ({"per_rank_gb": peaks} if world.size > 1 else {})
        if run.step % settings.checkpoint_every == 0 or run.step == settings.steps:
            save_state(run, out)
            if world.is_main:
                write_json(out / RECORD_FILE, record)
