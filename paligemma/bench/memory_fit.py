"""What fits on a GPU: each fine-tuning method, image size and batch, from bytes measured on real-width layers.

    python -m paligemma.bench.memory_fit --json book/data/memory_fit.json

Memory in training is the weights, their gradients and the optimiser's state, plus the activations kept for the
backward pass. None of it is typed in by hand here:

- parameter counts come from the real config, built on the meta device, with each method's choice of trainable
  parameters (`training.methods.select_trainable`, LoRA included);
- bytes per trainable and per frozen parameter are measured on a small model after one optimiser step, in the
  fine-tuning recipe (`--precision bf16`: frozen weights in bf16, trainable ones, their gradients and AdamW's two
  moments in fp32), by adding up the tensors that exist;
- activations are measured with autograd's saved-tensor hooks, on the real model's widths with one and with two
  layers in each tower at the real sequence length: the difference is one layer's share, the rest is what the
  embeddings, projector and loss keep. Batch 1; activations grow in proportion to the batch.

Not measured here (no GPU): the CUDA context and the allocator's fragmentation, which come on top.
"""

from __future__ import annotations

import argparse
import multiprocessing
import json
import math
import time
from dataclasses import replace

import torch
from torch import nn

from ..io.checkpoint import empty_model
from ..models.config import PaliGemmaConfig
from ..models.paligemma import PaliGemmaForConditionalGeneration
from . import PRESETS
from .command import progress, save_report

GIB = 1 << 30
GPUS = {"16 GB (T4, V100-16)": 16, "24 GB (L4, A10, RTX 4090)": 24, "80 GB (A100-80, H100)": 80}
METHODS = ("full", "freeze-vision", "attention", "lora")
RESOLUTIONS = (224, 448, 896)
TEXT_TOKENS = 32  # after the image's: half prompt, half answer


def at_resolution(preset: str, resolution: int) -> PaliGemmaConfig:
    """The preset's config with `resolution`-pixel images (PaliGemma's 448 and 896 checkpoints differ only so)."""
    values = json.loads(json.dumps(PRESETS[preset]))
    values["vision_config"]["image_size"] = resolution
    return PaliGemmaConfig.from_dict(values)


def recipe(model: nn.Module, method: str, precision: str = "bf16") -> None:
    """The fine-tuning recipe: choose what trains; at bf16 precision, keep the frozen weights in bf16."""
    from ..training.methods import select_trainable

    select_trainable(model, method)
    for parameter in model.parameters():
        if not parameter.requires_grad and precision == "bf16":
            parameter.data = parameter.data.to(torch.bfloat16)


def parameter_counts(config: PaliGemmaConfig, method: str) -> dict[str, int]:
    """Trainable and frozen parameters of the whole model under `method`, counted on the meta device."""
    model = empty_model(config)
    from ..training.methods import count_parameters, select_trainable

    select_trainable(model, method)
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "frozen": total - trainable}


def bytes_per_parameter(method: str) -> dict[str, float]:
    """Bytes held per trainable and per frozen parameter after one AdamW step, on a small model in the recipe."""
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(PRESETS["tiny"]))
    recipe(model, method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    held = sum(p.nbytes + p.grad.nbytes for p in trainable) + state
    return {"trainable": held / sum(p.numel() for p in trainable),
            "frozen": sum(p.nbytes for p in frozen) / max(1, sum(p.numel() for p in frozen))}


SMALL_IMAGES = (56, 112, 168)  # measured at these image sizes (16, 64, 144 image tokens), real widths and vocabulary
CHECK_IMAGE = 224  # and once at a real one, to check the extrapolation


def saved_bytes(config: PaliGemmaConfig, method: str, checkpointing: bool, precision: str = "bf16"
                ) -> dict[str, int]:
    """`measure_saved_bytes` in a process of its own, so that each model's memory goes back with it."""
    context = multiprocessing.get_context("spawn")  # a fork would inherit OpenMP threads that are gone
    with context.Pool(1) as pool:
        return pool.apply(measure_saved_bytes, (config, method, checkpointing, precision))


def measure_saved_bytes(config: PaliGemmaConfig, method: str, checkpointing: bool, precision: str = "bf16"
                        ) -> dict[str, int]:
    """What autograd keeps for the backward pass of one forward at batch 1, in bytes: `activations`, and `casts`
    (the bf16 copies of fp32 weights that autocast makes once per forward, whatever the batch). Parameters aside.
    `precision` "fp32" measures the fp32 run instead: no autocast, frozen weights in fp32."""
    from .finetune_step import training_batch

    model = empty_model(config).to_empty(device="cpu")  # the values do not change the bytes: skip initialising
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.01)
    model.language_model.tie_weights()
    recipe(model, method, precision)
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    # Each storage counted once, and held until the count: a storage freed meanwhile could otherwise hand its address
    # to another, which would then be taken for it (how many are freed depends on the allocator, not on the model).
    kept: dict[str, dict[int, torch.UntypedStorage]] = {"activations": {}, "casts": {}}
    if checkpointing:  # a checkpointed layer keeps only its input (its own hooks hide the rest from ours)
        from torch.distributed._composable import checkpoint

        def keep_input(module: nn.Module, args: tuple) -> None:
            if args[0].requires_grad or any(p.requires_grad for p in module.parameters()):  # else nothing to redo
                kept["activations"][args[0].untyped_storage().data_ptr()] = args[0].untyped_storage()

        for layer in [*model.vision_tower.encoder.layers, *model.language_model.layers]:
            layer.register_forward_pre_hook(keep_input)
            checkpoint(layer)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kind = "casts" if tuple(tensor.shape) in weight_shapes else "activations"
            kept[kind][storage.data_ptr()] = storage
        return tensor

    batch = training_batch(config, TEXT_TOKENS)
    if precision == "fp32":
        batch["pixel_values"] = batch["pixel_values"].float()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            # the loss holds the graph: no saved storage is freed, reused and counted twice before the count
            loss = model(**batch, return_logits=False).loss
    del loss
    return {kind: sum(storage.nbytes() for storage in values.values()) for kind, values in kept.items()}


def with_depths(config: PaliGemmaConfig, vision: int, text: int, image_size: int) -> PaliGemmaConfig:
    """The config with `vision` and `text` layers (Gemma 2's kinds of layer laid out again for that depth)."""
    depth = {"num_hidden_layers": text} | ({"layer_types": None} if hasattr(config.text_config, "layer_types") else {})
    return replace(config, vision_config=replace(config.vision_config, num_hidden_layers=vision,
                                                 image_size=image_size),
                   text_config=replace(config.text_config, **depth))


def layer_bytes(config: PaliGemmaConfig, method: str, checkpointing: bool, image_size: int,
                precision: str = "bf16") -> dict[str, dict]:
    """One vision layer's and one text layer's share, and the rest, from one-layer towers and a second layer in each."""
    one = saved_bytes(with_depths(config, 1, 1, image_size), method, checkpointing, precision)
    two_vision = saved_bytes(with_depths(config, 2, 1, image_size), method, checkpointing, precision)
    two_text = saved_bytes(with_depths(config, 1, 2, image_size), method, checkpointing, precision)
    parts = {}
    for kind in one:
        vision, text = two_vision[kind] - one[kind], two_text[kind] - one[kind]
        parts[kind] = {"vision_layer": vision, "text_layer": text, "rest": one[kind] - vision - text}
    return parts


def total(parts: dict[str, int], config: PaliGemmaConfig) -> int:
    return (parts["rest"] + config.vision_config.num_hidden_layers * parts["vision_layer"]
            + config.text_config.num_hidden_layers * parts["text_layer"])


def extrapolate(small: dict[int, dict], config: PaliGemmaConfig, image_tokens: int) -> dict[str, int]:
    """Each part as a + b n + c n^2 in the image tokens n, through the three small measurements, at `image_tokens`.

    Activations grow with the sequence, and the prefix-LM mask the attention keeps for its backward pass with its
    square: a parabola through three measured points (Lagrange's form) holds both."""
    sizes = sorted(small)
    tokens = [(size // config.vision_config.patch_size) ** 2 for size in sizes]
    weights = []
    for i, n_i in enumerate(tokens):
        others = [n_j for j, n_j in enumerate(tokens) if j != i]
        weights.append(math.prod(image_tokens - n_j for n_j in others) / math.prod(n_i - n_j for n_j in others))
    return {part: round(sum(w * small[size][part] for w, size in zip(weights, sizes))) for part in small[sizes[0]]}


def max_batch(static: float, per_example: float, capacity: float) -> int:
    """The largest batch whose weights, optimiser state and activations fit in `capacity` bytes (0: none)."""
    return max(0, math.floor((capacity - static) / per_example)) if per_example > 0 else 0


def study(preset: str = "3b-224", resolutions: tuple[int, ...] = RESOLUTIONS, log=print) -> dict:
    """Every method at every resolution, with and without activation checkpointing, against each GPU size.

    Each part is measured at three small image sizes and extended as a parabola in the number of image tokens;
    one measurement at 224 pixels checks the extension (`checks`)."""
    per_parameter = {method: bytes_per_parameter(method) for method in METHODS}
    base = PaliGemmaConfig.from_dict(PRESETS[preset])
    rows, checks = [], []
    for method in METHODS:
        counts = parameter_counts(base, method)
        static_weights = (counts["trainable"] * per_parameter[method]["trainable"]
                          + counts["frozen"] * per_parameter[method]["frozen"])
        whole_layers: dict[int, int] = {}
        for checkpointing in (False, True):
            started = time.monotonic()
            small = {size: layer_bytes(base, method, checkpointing, size) for size in SMALL_IMAGES}
            if method in ("full", "lora"):  # the check: predicted and measured at 224 pixels
                tokens = (CHECK_IMAGE // base.vision_config.patch_size) ** 2
                predicted = extrapolate({s: v["activations"] for s, v in small.items()}, base, tokens)
                measured = layer_bytes(base, method, checkpointing, CHECK_IMAGE)["activations"]
                checks.append({"method": method, "activation_checkpointing": checkpointing,
                               "predicted": predicted, "measured": measured})
            log(f"{method}, checkpointing {checkpointing}: measured in {time.monotonic() - started:.0f} s")
            for resolution in resolutions:
                config = at_resolution(preset, resolution)
                activations = extrapolate({s: v["activations"] for s, v in small.items()}, config,
                                          config.num_image_tokens)
                casts = extrapolate({s: v["casts"] for s, v in small.items()}, config, config.num_image_tokens)
                per_example = total(activations, config)
                if checkpointing:  # the backward pass recomputes one layer at a time: its activations come on top
                    per_example += whole_layers[resolution]
                else:
                    whole_layers[resolution] = max(activations["vision_layer"], activations["text_layer"])
                static = static_weights + total(casts, config)
                rows.append({"resolution": resolution, "image_tokens": config.num_image_tokens, "method": method,
                             "activation_checkpointing": checkpointing, **counts, "weights_and_optimizer_bytes":
                             static_weights, "autocast_copies_bytes": total(casts, config),
                             "activation_parts": activations, "activations_per_example": per_example,
                             "max_batch": {gpu: max_batch(static, per_example, size * GIB)
                                           for gpu, size in GPUS.items()}})
    rows.sort(key=lambda row: (row["resolution"], METHODS.index(row["method"]), row["activation_checkpointing"]))
    return {"preset": preset, "text_tokens": TEXT_TOKENS, "bytes_per_parameter": per_parameter, "gpus_gib": GPUS,
            "measured_image_sizes": list(SMALL_IMAGES), "checks": checks, "rows": rows}


def format_table(report: dict) -> str:
    gpus = list(report["gpus_gib"])
    lines = ["largest batch that fits (0: none), weights + gradients + AdamW + activations; CUDA context not included",
             f"{'px':>4} {'method':14} {'ckpt':>5} {'trainable':>12} {'static GiB':>10} {'act GiB/ex':>10} "
             + " ".join(f"{g.split(' ')[0] + ' GB':>7}" for g in gpus)]
    for row in report["rows"]:
        lines.append(f"{row['resolution']:>4} {row['method']:14} {'yes' if row['activation_checkpointing'] else 'no':>5} "
                     f"{row['trainable']:>12,} "
                     f"{(row['weights_and_optimizer_bytes'] + row['autocast_copies_bytes']) / GIB:10.2f} "
                     f"{row['activations_per_example'] / GIB:10.3f} "
                     + " ".join(f"{row['max_batch'][g]:>7}" for g in gpus))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.memory_fit", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b-224")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    report = study(args.preset, tuple(args.resolutions), log=progress)
    save_report(report, args.json, "paligemma.bench.memory_fit", argv)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
