"""Training a small PaliGemma on the shapes world, on CPU or CUDA.

    paligemma train --out runs/tiny-shapes          # or: python -m paligemma.train

The loss is PaliGemma's prefix-LM loss: the batch comes from the same processor as inference, with the
answer as suffix, so only the answer's tokens (and its `<eos>`) are learned. AdamW with linear warm-up
and cosine decay, gradient clipping, a held-out evaluation, and a checkpoint to resume from.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import PaliGemmaError
from ..inference.generation import generate
from ..io.checkpoint import load_pretrained
from ..io.images import preprocess_image
from ..io.processor import PaliGemmaProcessor
from ..io.tokenizer import GemmaTokenizer
from ..models.config import PaliGemmaConfig
from ..models.paligemma import PaliGemmaForConditionalGeneration
from . import shapes
from .loop import cosine_schedule, optimisation_steps, save_atomically
from .tokenizer_training import train_tokenizer

HELD_OUT_SEED = 1_000_003  # never used for training data


def tiny_shapes_config(vocab_size: int, image_size: int = 112) -> PaliGemmaConfig:
    """112-pixel images in 14-pixel patches (64 image tokens), a 4-layer SigLIP and a 4-layer multi-query Gemma."""
    return PaliGemmaConfig(
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=14),
        text_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=48, vocab_size=vocab_size, max_position_embeddings=256),
        projection_dim=192,
        image_token_index=5,
        vocab_size=vocab_size,
    )


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainSettings:
    steps: int = 1800
    vision_steps: int = 6400  # stage 0: the vision tower alone learns what each patch shows and where its shape lies
    vision_batch_size: int = 8  # stage 0 gains more from many small steps than from few large ones
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_learning_rate: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 450
    eval_examples: int = 96
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": matrix products in bfloat16 under autocast (weights and optimiser stay fp32)
    image_size: int = 112  # scenes are drawn at the model's input size

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "vision_batch_size", "eval_every", "eval_examples", "checkpoint_every",
                     "image_size"):
            if getattr(self, name) < 1:
                raise PaliGemmaError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vision_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise PaliGemmaError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise PaliGemmaError(f"learning rates must satisfy 0 <= min_learning_rate <= learning_rate and "
                                 f"learning_rate > 0, got {self.min_learning_rate} and {self.learning_rate}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise PaliGemmaError(f"weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay} and "
                                 f"{self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise PaliGemmaError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def init_weights(model: nn.Module, seed: int, location_ids: list[int] | None = None) -> None:
    """Fan-in scaled normal weights, zero biases; LayerNorm scales 1 and RMSNorm weights 0 (both "no change").

    Matrices get std 1/sqrt(fan_in), so signals keep their size through narrow layers (a fixed 0.02, right for
    wide models, starves these narrow ones: attention stays uniform and every patch looks the same). Projections
    that write into a residual stream are further scaled by 1/sqrt(2 * layers), as in GPT-2. Token embeddings
    get std 1/sqrt(width): times Gemma's sqrt(width) scale, each entry starts at unit size. The 1024 `<loc>`
    tokens (given by `location_ids`, in bin order) start from a smooth code of their bin, so that neighbouring
    bins begin alike and what is learnt about one bin carries over to its neighbours.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "layer_norm" in name or "post_layernorm" in name:
                param.fill_(1.0)
            elif param.dim() == 1:  # RMSNorm weights, stored centred on zero
                param.zero_()
            else:
                fan_in = param[0].numel()
                std = fan_in**-0.5
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    std /= (2 * config.vision_config.num_hidden_layers) ** 0.5
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= (2 * config.text_config.num_hidden_layers) ** 0.5
                elif "position_embedding" in name or "embed_tokens" in name:
                    std = param.shape[-1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        if location_ids:
            table = model.language_model.embed_tokens.weight
            table[location_ids] = location_code(len(location_ids), table.shape[1], generator)
        positions = model.vision_tower.embeddings.position_embedding.weight
        positions.copy_(grid_code(int(positions.shape[0] ** 0.5), positions.shape[1]))


def grid_code(side: int, width: int) -> torch.Tensor:
    """[side * side, width]: 2-D sine-cosine codes of the patch grid (half the width for rows, half for columns).

    Learned position embeddings start from these rather than from noise: patch contents would drown small random
    positions, and without knowing where a patch is, the model cannot say what is left of what, or draw a box.
    """
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # [width / 4]
    coordinate = torch.arange(side, dtype=torch.float32)
    rows, columns = torch.meshgrid(coordinate, coordinate, indexing="ij")  # [side, side] each, row by row
    def code(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * frequencies  # [side * side, width / 4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([code(rows), code(columns)], dim=1)  # [side * side, width], entries of unit size


def location_code(bins: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[bins, width]: sines and cosines of the bin at geometric frequencies, plus a little noise, std 1/sqrt(width)."""
    positions = torch.arange(bins, dtype=torch.float32)[:, None] / bins  # [bins, 1] in [0, 1)
    frequencies = torch.pi * 2.0 ** torch.linspace(0, 6, width // 2)  # from half a turn to 32 turns over the image
    code = torch.cat([torch.sin(positions * frequencies), torch.cos(positions * frequencies)], dim=1)
    code = code + 0.3 * torch.randn(code.shape, generator=generator)
    return code / code.std() * width**-0.5


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to the peak, then cosine decay to the minimum at the last step (`loop.learning_rate_at`)."""
    return cosine_schedule(step, settings.learning_rate, settings.warmup_steps, settings.steps,
                           settings.min_learning_rate)


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norms) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95))


PAIRS = [(kind, color) for kind in shapes.KINDS for color in shapes.COLORS]  # the 15 things a patch can show


def patch_targets(scenes: list[shapes.Scene], patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each patch shows, for stage 0: class shares, the box of its main shape, and where that box counts.

    Returns `shares` [b, patches, 16] (the fraction of the patch's pixels that are background, class 0, or each
    (kind, colour) pair, classes 1-15), `boxes` [b, patches, 4] (x_min, y_min, x_max, y_max of the shape covering
    most of the patch, in fractions of the image) and `has_box` [b, patches] (that shape covers at least 15%).
    """
    size = scenes[0].size
    slots = 1 + max(len(scene.shapes) for scene in scenes)  # background and up to three shapes
    labels = torch.stack([torch.as_tensor(bytearray(shapes.label_map(scene).tobytes()), dtype=torch.long)
                          for scene in scenes]).reshape(len(scenes), size, size)  # [b, H, W] slot per pixel
    side = size // patch_size
    coverage = nn.functional.one_hot(labels, slots).float()  # [b, H, W, slots]
    coverage = coverage.reshape(len(scenes), side, patch_size, side, patch_size, slots).mean(dim=(2, 4))
    coverage = coverage.reshape(len(scenes), side * side, slots)  # [b, patches, slots]: share of each slot
    slot_class = torch.zeros(len(scenes), slots, dtype=torch.long)  # [b, slots]: background stays class 0
    slot_box = torch.zeros(len(scenes), slots, 4)  # [b, slots, 4]
    for i, scene in enumerate(scenes):
        for j, shape in enumerate(scene.shapes):
            slot_class[i, j + 1] = 1 + PAIRS.index((shape.kind, shape.color))
            x0, y0, x1, y1 = shape.box
            slot_box[i, j + 1] = torch.tensor([x0, y0, x1 + 1, y1 + 1]) / size
    shares = torch.zeros(len(scenes), side * side, 1 + len(PAIRS))
    shares.scatter_add_(2, slot_class[:, None, :].expand(-1, side * side, -1), coverage)  # [b, patches, 16]
    main_share, main_slot = coverage[..., 1:].max(dim=-1)  # [b, patches]: the shape covering most of each patch
    boxes = torch.gather(slot_box, 1, (main_slot + 1)[..., None].expand(-1, -1, 4))  # [b, patches, 4]
    return shares, boxes, main_share >= 0.15


def pretrain_vision(model: PaliGemmaForConditionalGeneration, settings: TrainSettings, log=print) -> list[dict]:
    """Stage 0: train the vision tower alone to say, patch by patch, what it shows and where that shape lies.

    PaliGemma starts from a SigLIP encoder that was trained on its own first; this is the shapes world's
    version. A linear head reads every patch's output: 16 scores (background or one of the 15 (kind, colour)
    pairs, learnt against the shares of the patch's pixels) and the box of the shape that covers most of it.
    Every patch must come to encode what it shows and where that thing's edges are, which is what the
    language model later reads through the projector. The head is thrown away after.
    """
    tower, device = model.vision_tower, settings.device
    patch_size = model.config.vision_config.patch_size
    head = nn.Linear(model.config.vision_config.hidden_size, 1 + len(PAIRS) + 4).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=settings.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    schedule = replace(settings, steps=settings.vision_steps, warmup_steps=min(settings.warmup_steps,
                                                                                settings.vision_steps // 4))
    rng = random.Random(settings.seed + 1)  # its own scenes: stage 1's stream stays the same
    history = []
    measured: dict[str, torch.Tensor] = {}

    def compute_loss(_micro: int) -> torch.Tensor:
        scenes = [shapes.make_scene(rng, settings.image_size) for _ in range(settings.vision_batch_size)]
        pixels = torch.stack([preprocess_image(scene.image, settings.image_size) for scene in scenes]).to(device)
        shares, boxes, has_box = (t.to(device) for t in patch_targets(scenes, patch_size))
        output = head(tower(pixels))  # [b, patches, 16 + 4]
        scores, predicted_boxes = output[..., : 1 + len(PAIRS)], output[..., 1 + len(PAIRS) :]
        class_loss = nn.functional.cross_entropy(scores.flatten(0, 1), shares.flatten(0, 1))
        box_error = (predicted_boxes - boxes).abs().sum(dim=-1)  # [b, patches]: L1 over the four edges
        box_loss = (box_error * has_box).sum() / has_box.sum().clamp(min=1)
        main = shares[..., 1:].amax(dim=-1) >= 0.5  # patches mostly covered by one shape
        measured.update(right=(scores.argmax(dim=-1) == shares.argmax(dim=-1))[main].float().mean(), box=box_loss)
        return class_loss + box_loss

    for step, loss, lr in optimisation_steps(optimizer, tower.parameters(), lambda s: learning_rate_at(s, schedule),
                                             compute_loss, settings.vision_steps, settings.grad_clip,
                                             description="vision stage"):
        history.append({"step": step, "loss": round(loss, 5), "lr": lr,
                        "patch_accuracy": round(measured["right"].item(), 4),
                        "box_error": round(measured["box"].item() / 4 * settings.image_size, 3)})  # px per edge
    if settings.vision_steps:
        last = history[-1]
        log(f"vision stage: {settings.vision_steps} steps, loss {last['loss']:.4f}, "
            f"patch accuracy {last['patch_accuracy']:.3f}, box edges off by {last['box_error']:.1f} px")
    return history


def training_batch(processor: PaliGemmaProcessor, examples: list[shapes.Example], device: str) -> dict:
    batch = processor(text=[e.prompt for e in examples], images=[e.scene.image for e in examples],
                      suffix=[e.answer for e in examples])
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def held_out_loss(model, processor, examples, device, batch_size=32) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        total += model(**training_batch(processor, chunk, device), return_logits=False).loss.item() * len(chunk)
        count += len(chunk)
    model.train()
    return total / count


@torch.no_grad()
def evaluate(model, processor, examples: list[shapes.Example], batch_size: int = 64, max_new_tokens: int = 24) -> dict:
    """Greedy answers scored per task: caption exact match, colour and count accuracy, detection mean IoU."""
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {task: [] for task in shapes.TASKS}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        answers = generate(model, processor, images=[e.scene.image for e in chunk], prompts=[e.prompt for e in chunk],
                           max_new_tokens=max_new_tokens)
        for example, answer in zip(chunk, answers):
            if example.task == "detect":
                scores["detect"].append(shapes.detection_iou(example, answer))
            else:
                scores[example.task].append(float(answer.strip() == example.answer))
    model.train(was_training)
    names = {"caption": "caption_exact_match", "color": "color_accuracy", "count": "count_accuracy",
             "detect": "detect_mean_iou"}
    result = {names[task]: sum(v) / len(v) for task, v in scores.items() if v}
    result.update({f"{task}_examples": len(v) for task, v in scores.items()})
    return result


def prepare(out: Path, seed: int, image_size: int = 112) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The tokenizer (trained once) and a freshly initialised model for the shapes world."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = out / "tokenizer.model"
    if not tokenizer_file.exists():
        train_tokenizer(shapes.corpus(seed), tokenizer_file, vocab_size=1600)
    pieces = GemmaTokenizer(tokenizer_file).vocab_size
    config = tiny_shapes_config(64 * math.ceil(pieces / 64), image_size)  # pad the table, as PaliGemma does
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    tokenizer = GemmaTokenizer(tokenizer_file, config.image_token_index)
    init_weights(model, seed, [tokenizer.sp.piece_to_id(f"<loc{b:04d}>") for b in range(1024)])
    processor = PaliGemmaProcessor(tokenizer,
                                   config.vision_config.image_size, config.num_image_tokens,
                                   config.text_config.max_position_embeddings)
    return model, processor


def train(out: str | Path, settings: TrainSettings, log=print) -> dict:
    """Train (resuming from `out/train_state.pt` when present), save the model to `out`, return the metrics."""
    out = Path(out)
    run_started = time.monotonic()
    model, processor = prepare(out, settings.seed, settings.image_size)
    model.to(settings.device).train()
    optimizer = build_optimizer(model, settings)
    rng = random.Random(settings.seed)
    step, history, vision_history = 0, [], []
    state_file = out / "train_state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location=settings.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["data_rng"])
        step, history = state["step"], state["history"]
        vision_history = state.get("vision_history", [])
        log(f"resuming from step {step}")
    if step == 0:
        vision_history = pretrain_vision(model, settings, log)
    held_out = shapes.make_dataset(HELD_OUT_SEED, settings.eval_examples, settings.image_size)
    started = time.monotonic()
    autocast = dict(device_type=torch.device(settings.device).type, dtype=torch.bfloat16,
                    enabled=settings.precision == "bf16")

    def compute_loss(_micro: int) -> torch.Tensor:
        examples = [shapes.make_example(rng, settings.image_size) for _ in range(settings.batch_size)]
        with torch.autocast(**autocast):
            return model(**training_batch(processor, examples, settings.device), return_logits=False).loss

    for step, loss, lr in optimisation_steps(optimizer, model.parameters(), lambda s: learning_rate_at(s, settings),
                                             compute_loss, settings.steps, settings.grad_clip, start=step):
        history.append({"step": step, "loss": round(loss, 5), "lr": lr})
        if step % settings.eval_every == 0 or step == settings.steps:
            evaluation_started = time.monotonic()
            held = held_out_loss(model, processor, held_out, settings.device)
            metrics = evaluate(model, processor, held_out)
            started += time.monotonic() - evaluation_started  # report training time without the evaluations
            history[-1].update(held_out_loss=round(held, 5), minutes=round((time.monotonic() - started) / 60, 2),
                               **{k: round(v, 4) for k, v in metrics.items() if not k.endswith("_examples")})
            log(f"step {step}: train loss {loss:.4f}, held-out loss {held:.4f}, "
                + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not k.endswith("_examples")))
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "data_rng": rng.getstate(), "step": step, "history": history,
                             "vision_history": vision_history, "settings": asdict(settings)}, state_file)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"settings": asdict(settings),
                                                         "wall_minutes": round((time.monotonic() - run_started) / 60, 2),
                                                         "vision_history": vision_history,
                                                         "history": history}) + "\n")
    return {"step": step, "final_loss": history[-1]["loss"] if history else None}


def evaluate_checkpoint(name_or_path: str | Path, examples: int, seed: int = HELD_OUT_SEED, device: str = "cpu",
                        dtype: str = "fp32", quantization: str | None = None, group_size: int = 128) -> dict:
    """Score a checkpoint on `examples` held-out scenes (made with a seed training never uses), in `dtype`, its
    linear layers quantized if asked ("int8", or "int4" in groups of `group_size`)."""
    model, processor = load_pretrained(name_or_path, device=device, dtype=dtype, quantization=quantization,
                                       group_size=group_size)
    size = model.config.vision_config.image_size
    metrics = evaluate(model, processor, shapes.make_dataset(seed, examples, size))
    weights = {"dtype": dtype, "quantization": quantization,
               "group_size": group_size if quantization == "int4" else None}
    return {"examples": examples, "seed": seed, **weights, **{k: round(v, 4) for k, v in metrics.items()}}
