"""Fine-tuning a pretrained PaliGemma on your own data: the run behind `python -m paligemma.finetune`.

    finetune("tiny-shapes", "data/train.jsonl", "runs/relations", FinetuneSettings(method="lora"),
             eval_file="data/val.jsonl")

writes into the output folder

    model/          the fine-tuned model, adapters merged, in the Hugging Face layout with its tokenizer
    adapter/        (LoRA) the adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors
    record.json     the settings, the loss of every step, every evaluation, parameter counts, time and memory
    checkpoint.pt   what `resume=True` continues from: trainable weights, optimiser, step, random state

The data is checked whole before anything is written. The loss is the prefix-LM loss on the answers only; the
batches of each step follow from the seed and the step (`data.batch_indices`), and the checkpoint holds the random
state, so a run resumed after a kill reaches the same weights as one never stopped.
"""

from __future__ import annotations

import errno
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PaliGemmaError
from ..io.adapter import save_adapter
from ..io.checkpoint import load_pretrained, parse_device, parse_dtype, resolve_checkpoint
from ..io.config_file import read_config
from ..io.layout import CONFIG_FILE, write_json
from ..io.processor import PaliGemmaProcessor
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .data import FinetuneExample, batch_indices, collate, read_examples
from .lora import LoraSettings, merge_lora
from .loop import cosine_schedule, optimisation_steps, save_atomically
from .methods import METHODS, count_parameters, select_trainable
from .scoring import evaluate_examples

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "record.json"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a run's result; a resumed run must have the same."""

    method: str = "lora"
    steps: int = 300
    batch_size: int = 16  # examples per optimiser step
    grad_accumulation: int = 1  # micro-batches per step: batch_size / grad_accumulation examples in memory at once
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
        if self.batch_size % self.grad_accumulation:
            raise PaliGemmaError(f"batch-size {self.batch_size} is not a multiple of grad-accumulation "
                                 f"{self.grad_accumulation}")
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
    """A model being fine-tuned, with its data, optimiser and record so far."""

    model: PaliGemmaForConditionalGeneration
    processor: PaliGemmaProcessor
    settings: FinetuneSettings
    train: list[FinetuneExample]
    held_out: list[FinetuneExample]
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    record: dict = field(default_factory=dict)
    step: int = 0


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

    for layer in [*model.vision_tower.encoder.layers, *model.language_model.layers]:
        checkpoint(layer)


def prepare_run(model_path: str | Path, train_file: str | Path, settings: FinetuneSettings,
                eval_file: str | Path | None = None, device: str = "cpu") -> Run:
    """Load the model and check all the data; then freeze, add adapters and build the optimiser. Writes nothing."""
    device = parse_device(device)
    saved_dtype = read_config(resolve_checkpoint(model_path) / CONFIG_FILE).dtype or "float32"  # saved in it again
    model, processor = load_pretrained(model_path, device=device, dtype=torch.float32, accelerate=False)
    train = read_examples(train_file, processor)
    held_out = read_examples(eval_file, processor) if eval_file is not None else []
    if settings.eval_examples:
        held_out = held_out[:settings.eval_examples]
    if settings.from_scratch:
        _reinitialise(model, processor, settings.seed)
    trainable = select_trainable(model, settings.method, settings.lora_settings(), seed=settings.seed)
    if settings.precision == "bf16":  # frozen weights in half precision, trainable ones in fp32 (big_vision)
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    if settings.activation_checkpointing:
        _checkpoint_layers(model)
    model.train()
    optimizer = _build_optimizer(trainable, settings)
    trained, total = count_parameters(model)
    record = {"model": str(model_path), "train": str(train_file), "eval": None if eval_file is None else str(eval_file),
              "settings": settings.to_dict(), "device": str(device), "train_examples": len(train),
              "eval_examples": len(held_out), "trainable_parameters": trained, "parameters": total,
              "saved_dtype": saved_dtype,
              "history": [], "evaluations": []}
    return Run(model, processor, settings, train, held_out, trainable, optimizer, record)


# --- the steps -------------------------------------------------------------------------------------------------------


def autocast_for(run: Run) -> torch.autocast:
    return torch.autocast(run.model.device.type, dtype=torch.bfloat16, enabled=run.settings.precision == "bf16")


def step_loss(run: Run, step: int) -> Callable[[int], torch.Tensor]:
    """compute_loss(micro) for the training loop: each micro-batch's loss weighted by its share of answer tokens,
    so the shares add up to the mean over every answer token of the step's batch, however it is split."""
    settings = run.settings
    indices = batch_indices(len(run.train), settings.batch_size, step, settings.seed)
    size = settings.batch_size // settings.grad_accumulation
    batches = [collate(run.processor, [run.train[i] for i in indices[start:start + size]])
               for start in range(0, len(indices), size)]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def compute_loss(micro: int) -> torch.Tensor:
        batch = {k: v.to(run.model.device) for k, v in batches[micro].items()}
        share = int((batch["labels"][:, 1:] != -100).sum()) / tokens
        with autocast_for(run):
            return run.model(**batch, return_logits=False).loss * share
    return compute_loss


def evaluate_run(run: Run) -> dict:
    started = time.monotonic()
    evaluation = evaluate_examples(run.model, run.processor, run.held_out, autocast=autocast_for(run))
    return {"step": run.step, **evaluation.summary(), "seconds": round(time.monotonic() - started, 2)}


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """The peak of this process: CUDA memory allocated on a GPU, resident memory (max RSS) on a CPU."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 1e9
    return "max_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# --- saving and resuming ---------------------------------------------------------------------------------------------


def _trainable_state(run: Run) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in run.model.named_parameters() if p.requires_grad}


def save_state(run: Run, out: Path) -> None:
    """Everything a resumed run needs, written atomically (a kill mid-write keeps the previous checkpoint)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_atomically({"step": run.step, "settings": run.settings.to_dict(), "trainable": _trainable_state(run),
                     "optimizer": run.optimizer.state_dict(), "rng": rng, "record": run.record}, out / CHECKPOINT_FILE)


def load_state(run: Run, out: Path) -> None:
    """Continue from `out/checkpoint.pt`: the same settings, then weights, optimiser, step, record, random state."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise PaliGemmaError(f"nothing to resume: {path} not found")
    try:
        state = torch.load(path, map_location=run.model.device, weights_only=False)
    except Exception as error:  # a truncated or foreign file: name it rather than show pickle's traceback
        raise PaliGemmaError(f"{path} is not a readable checkpoint: {type(error).__name__}: {error}") from None
    if state.get("settings") != run.settings.to_dict():
        changed = sorted(k for k, v in run.settings.to_dict().items() if state.get("settings", {}).get(k) != v)
        raise PaliGemmaError(f"cannot resume {path} with different settings: {', '.join(changed)}")
    parameters = dict(run.model.named_parameters())
    if set(state["trainable"]) != {n for n, p in parameters.items() if p.requires_grad}:
        raise PaliGemmaError(f"{path} holds other trainable weights than this run's model")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            parameters[name].copy_(tensor)
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.record = state["step"], state["record"]
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def save_results(run: Run, out: Path) -> None:
    """The adapter (LoRA), then the merged model in the base checkpoint's layout, with its tokenizer."""
    model = run.model
    if run.settings.method == "lora":
        save_adapter(model, out / "adapter", base_model_name_or_path=run.record["model"])
        merge_lora(model)
    model.to(parse_dtype(run.record["saved_dtype"]))
    model.save_pretrained(out / "model")
    run.processor.save_pretrained(out / "model")


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PaliGemmaError(f"cannot write to --out {out}: {error.strerror}") from None


# --- the whole run ---------------------------------------------------------------------------------------------------


def finetune(model_path: str | Path, train_file: str | Path, out: str | Path, settings: FinetuneSettings,
             eval_file: str | Path | None = None, device: str = "cpu", resume: bool = False,
             log: Callable[[str], None] | None = print, progress: bool | None = None) -> dict:
    """Fine-tune `model_path` on `train_file`, evaluating on `eval_file`, into `out`; returns the record."""
    out = Path(out)
    resolve_checkpoint(model_path)  # a missing model is named before the data is read
    if not resume and (out / CHECKPOINT_FILE).exists():
        raise PaliGemmaError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    run = prepare_run(model_path, train_file, settings, eval_file, device)
    _writable(out)
    say = log or (lambda message: None)
    try:
        if resume:
            load_state(run, out)
            say(f"resuming from step {run.step}")
        else:
            torch.manual_seed(settings.seed)  # dropout's draws: the same run gives the same weights in any process
        _train(run, out, say, progress)
        save_results(run, out)
        write_json(out / RECORD_FILE, run.record)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise PaliGemmaError(f"no space left on the device while writing {error.filename or out}") from None
        raise PaliGemmaError(f"cannot write {error.filename or out}: {error.strerror}") from None
    return run.record


def _train(run: Run, out: Path, say: Callable[[str], None], progress: bool | None) -> None:
    settings, record = run.settings, run.record
    started = time.monotonic() - record.get("train_seconds", 0.0)
    losses = {}

    def compute_loss(micro: int) -> torch.Tensor:
        if micro == 0:
            losses["step"] = step_loss(run, run.step)
        return losses["step"](micro)

    steps = optimisation_steps(run.optimizer, run.trainable, settings.learning_rate_at, compute_loss, settings.steps,
                               settings.grad_clip, start=run.step, description=f"fine-tuning ({settings.method})",
                               accumulation=settings.grad_accumulation, progress=progress)
    for run.step, loss, lr in steps:
        record["history"].append({"step": run.step, "loss": round(loss.item(), 5), "lr": lr})
        if run.held_out and (run.step % settings.eval_every == 0 or run.step == settings.steps):
            paused = time.monotonic()
            evaluation = evaluate_run(run)
            started += time.monotonic() - paused  # training time leaves the evaluations out
            record["evaluations"].append(evaluation)
            say(f"step {run.step}: loss {loss.item():.4f}, held-out loss {evaluation['held_out_loss']:.4f}, "
                f"score {evaluation['score']:.3f}")
        record["train_seconds"] = round(time.monotonic() - started, 2)
        kind, peak = peak_memory_gb(run.model.device)
        record["peak_memory"] = {"kind": kind, "gb": round(peak, 3)}
        if run.step % settings.checkpoint_every == 0 or run.step == settings.steps:
            save_state(run, out)
            write_json(out / RECORD_FILE, record)
