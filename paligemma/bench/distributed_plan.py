"""Fine-tuning past one GPU: bytes per GPU under DDP and FSDP, the batch that fits, and tokens per second.

    python -m paligemma.bench.distributed_plan --json book/data/distributed_plan.json
    python -m paligemma.bench.distributed_plan --check --json book/data/distributed_check.json

For PaliGemma (3B) and PaliGemma 2 (3B, 10B, 28B) at 224, 448 and 896 pixels, full fine-tuning and LoRA, the
memory of one GPU is split as::

    weights        trainable in fp32 (4 bytes), frozen in bf16 (2): the `--precision bf16` recipe
    gradients      fp32, trainable only (4 bytes)
    optimiser      AdamW's two moments, fp32 (8 bytes)
    gathered       FSDP only: the layers all-gathered at one time in bf16 (the one running and the one prefetched),
                   the root's weights (embeddings and the tied head, kept gathered all step), and one layer's
                   unsharded fp32 gradient before it is reduce-scattered
    casts          DDP only: autocast's bf16 copies of the fp32 weights, kept for the backward pass
    activations    per example, with and without activation checkpointing

DDP keeps all of weights, gradients and optimiser on every GPU; FSDP on N GPUs keeps 1/N of each. Activations do
not shrink with N: each GPU keeps those of its own examples. Parameter counts come from the real configs built on
the meta device; activation bytes are measured on real-width layers (`memory_fit`: saved-tensor hooks at three
small image sizes, extended as a parabola in the image tokens). What nobody can count from here: the CUDA context
(about 0.5-1 GB), NCCL's buffers and the allocator's fragmentation; `HEADROOM` sets that much aside.

Speed is estimated, not measured: training FLOPs per example over a stated share of the GPU's peak (`MFU`).
`--check` measures the one case this machine can run, the two-process CPU run (gloo) on tiny-shapes, and sets each
rank's tensors beside what this plan predicts for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from ..io.checkpoint import empty_model
from ..models.config import PaliGemmaConfig
from . import PRESETS
from .command import progress, save_report
from .memory_fit import SMALL_IMAGES, TEXT_TOKENS, extrapolate, layer_bytes, recipe, total

GIB = 1 << 30
GPU_GIB = 80  # A100-80 GB, H100 80 GB
HEADROOM_GIB = 4  # CUDA context, NCCL buffers, fragmentation: not counted, set aside
PEAK_TFLOPS = 989.4  # H100 SXM, dense bf16
MFU = 0.40  # the share of that peak a well-tuned FSDP run reaches: an assumption, stated, not measured here
METHODS = ("full", "lora")
RESOLUTIONS = (224, 448, 896)
LAYOUTS = {"DDP": 1, "FSDP 8 GPUs": 8, "FSDP 2 nodes x 8": 16}  # how many shards the weights are cut into

_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
               vision_use_head=False)
# PaliGemma 2's decoders are Gemma 2 2B, 9B and 27B, as transformers' conversion script builds them
# (its VARIANT_CONFIGS); the tests build their full-size PaliGemma 2 configs from these too.
GEMMA2_SIZES = {
    "3b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "10b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "28b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}


def model_config(name: str, resolution: int) -> PaliGemmaConfig:
    """The real config of "PaliGemma 3B" or "PaliGemma 2 3B|10B|28B" at `resolution` pixels."""
    if name == "PaliGemma 3B":
        values = json.loads(json.dumps(PRESETS["3b-224"]))
    else:
        text = GEMMA2_SIZES[name.removeprefix("PaliGemma 2 ").lower()]
        values = dict(vision_config={**_SO400M, "projection_dim": text["hidden_size"]},
                      text_config={**text, "model_type": "gemma2", "vocab_size": 257152},
                      image_token_index=257152, projection_dim=text["hidden_size"], vocab_size=257152)
    values["vision_config"]["image_size"] = resolution
    return PaliGemmaConfig.from_dict(values)


MODELS = ("PaliGemma 3B", "PaliGemma 2 3B", "PaliGemma 2 10B", "PaliGemma 2 28B")


@dataclass(frozen=True)
class Counts:
    """Parameters of a model under a method, from its structure on the meta device."""

    trainable: int
    frozen: int
    root: int  # outside the repeated layers: embeddings (tied head), patch embedding, norms, projector
    largest_layer: int  # the largest encoder or decoder layer
    largest_layer_trainable: int
    vision: int  # the tower, for the FLOPs of the image tokens
    decoder: int  # the decoder's layers and final norm (the embedding lookup costs no FLOPs)
    head: int  # the output head (the embedding table, tied): products only at the answer's positions


def count(config: PaliGemmaConfig, method: str) -> Counts:
    model = empty_model(config)
    recipe(model, method)  # what trains, LoRA's adapters added

    def numel(module: torch.nn.Module, trainable: bool | None = None) -> int:
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    layers = [*model.vision_tower.encoder.layers, *model.language_model.layers]
    largest = max(layers, key=numel)
    everything = numel(model)
    trainable = numel(model, True)
    embedding = model.language_model.embed_tokens.weight.numel()
    return Counts(trainable=trainable, frozen=everything - trainable, root=everything - sum(map(numel, layers)),
                  largest_layer=numel(largest), largest_layer_trainable=numel(largest, True),
                  vision=numel(model.vision_tower) + numel(model.multi_modal_projector),
                  decoder=numel(model.language_model) - embedding, head=embedding)


def static_bytes(counts: Counts, shards: int, precision: str = "bf16") -> dict[str, float]:
    """Weights, gradients and optimiser state on one GPU (1/shards of each under FSDP), and FSDP's gathered copies.

    `precision` "bf16" is the GPU recipe; "fp32" keeps frozen weights in fp32 and computes in fp32 (the CPU run)."""
    compute = 2 if precision == "bf16" else 4
    frozen = 2 if precision == "bf16" else 4
    parts = {"weights": (counts.trainable * 4 + counts.frozen * frozen) / shards,
             "gradients": counts.trainable * 4 / shards,
             "optimizer": counts.trainable * 8 / shards}
    if shards > 1:
        parts["gathered"] = (counts.root + 2 * counts.largest_layer) * compute + counts.largest_layer_trainable * 4
    return parts


def training_flops(config: PaliGemmaConfig, counts: Counts, method: str, checkpointing: bool) -> float:
    """FLOPs of one training example: 2 per parameter per token forward, twice that backward (gradients for the
    inputs and for the weights), the weights' half only where they train; attention's own products on top; one more
    forward of every layer with activation checkpointing. LoRA leaves the tower frozen: no backward there. The text
    is `TEXT_TOKENS` long, half of it the answer, whose positions alone go through the output head."""
    image, text = config.num_image_tokens, TEXT_TOKENS
    vision_c, text_c = config.vision_config, config.text_config
    vision_attention = 4 * image ** 2 * vision_c.hidden_size * vision_c.num_hidden_layers
    text_attention = (4 * (image + text) ** 2 * text_c.num_attention_heads * text_c.head_dim
                      * text_c.num_hidden_layers)
    vision_forward = 2 * counts.vision * image + vision_attention
    text_forward = 2 * counts.decoder * (image + text) + text_attention + 2 * counts.head * (text // 2)
    if method == "full":
        passes_vision, passes_text = 3, 3
    else:  # inputs' gradients through the decoder, adapters' own products negligible; nothing below the decoder
        passes_vision, passes_text = 1, 2
    if checkpointing:
        passes_text += 1
        passes_vision += 1 if method == "full" else 0
    return passes_vision * vision_forward + passes_text * text_forward


def activations(config: PaliGemmaConfig, method: str, small: dict, checkpointing: bool) -> dict[str, int]:
    """Bytes one example keeps for the backward pass, and autocast's weight copies, from the small measurements."""
    parts = extrapolate({s: v["activations"] for s, v in small[checkpointing].items()}, config,
                        config.num_image_tokens)
    per_example = total(parts, config)
    if checkpointing:  # the layer being recomputed holds its whole activations meanwhile
        whole = extrapolate({s: v["activations"] for s, v in small[False].items()}, config, config.num_image_tokens)
        per_example += max(whole["vision_layer"], whole["text_layer"])
    casts = total(extrapolate({s: v["casts"] for s, v in small[checkpointing].items()}, config,
                              config.num_image_tokens), config)
    return {"per_example": per_example, "casts": casts}


def plan(models: tuple[str, ...] = MODELS, resolutions: tuple[int, ...] = RESOLUTIONS,
         methods: tuple[str, ...] = METHODS, log=print) -> dict:
    """Every model, resolution and method under each layout, with and without activation checkpointing."""
    rows = []
    for name in models:
        base = model_config(name, resolutions[0])
        for method in methods:
            small = {c: {s: layer_bytes(base, method, c, s) for s in SMALL_IMAGES} for c in (False, True)}
            log(f"{name}, {method}: activations measured")
            for resolution in resolutions:
                config = model_config(name, resolution)
                counts = count(config, method)
                for checkpointing in (False, True):
                    kept = activations(config, method, small, checkpointing)
                    flops = training_flops(config, counts, method, checkpointing)
                    tokens = config.num_image_tokens + TEXT_TOKENS
                    layouts = {}
                    for layout, shards in LAYOUTS.items():
                        parts = static_bytes(counts, shards)
                        if shards == 1:
                            parts["casts"] = kept["casts"]
                        fixed = sum(parts.values())
                        room = (GPU_GIB - HEADROOM_GIB) * GIB - fixed
                        per_gpu = max(0, math.floor(room / kept["per_example"]))
                        layouts[layout] = {"bytes": {k: round(v) for k, v in parts.items()},
                                           "static_gib": round(fixed / GIB, 2), "batch_per_gpu": per_gpu,
                                           # DDP's memory per GPU is the same on any number: say 8
                                           "gpus": shards if shards > 1 else 8,
                                           "global_batch": per_gpu * (shards if shards > 1 else 8)}
                    rows.append({"model": name, "resolution": resolution, "method": method,
                                 "activation_checkpointing": checkpointing, "parameters": counts.trainable
                                 + counts.frozen, "trainable": counts.trainable,
                                 "activations_per_example_gib": round(kept["per_example"] / GIB, 3),
                                 "tokens_per_example": tokens, "flops_per_example": flops,
                                 "tokens_per_second_per_gpu": round(MFU * PEAK_TFLOPS * 1e12 / flops * tokens),
                                 "layouts": layouts})
    return {"gpu_gib": GPU_GIB, "headroom_gib": HEADROOM_GIB, "peak_tflops": PEAK_TFLOPS, "mfu": MFU,
            "text_tokens": TEXT_TOKENS, "rows": rows}


def format_table(report: dict, checkpointing: bool | None = None) -> str:
    """One line per model, resolution and method: GiB per GPU (static) and the batch per GPU for each layout."""
    lines = [f"GiB per GPU for weights + gradients + AdamW (+ FSDP's gathered layers); batch per {report['gpu_gib']} "
             f"GB GPU; tokens/s per GPU at {report['mfu']:.0%} of {report['peak_tflops']:.0f} TFLOP/s"]
    layouts = list(report["rows"][0]["layouts"])
    lines.append(f"{'model':16} {'px':>4} {'method':6} {'ckpt':>4} {'act GiB/ex':>10} "
                 + " ".join(f"{layout:>22}" for layout in layouts) + f" {'tok/s/GPU':>10}")
    for row in report["rows"]:
        if checkpointing is not None and row["activation_checkpointing"] != checkpointing:
            continue
        cells = [f"{row['layouts'][layout]['static_gib']:7.1f} GiB, batch {row['layouts'][layout]['batch_per_gpu']:>3}"
                 for layout in layouts]
        lines.append(f"{row['model']:16} {row['resolution']:>4} {row['method']:6} "
                     f"{'yes' if row['activation_checkpointing'] else 'no':>4} "
                     f"{row['activations_per_example_gib']:10.3f} " + " ".join(f"{c:>22}" for c in cells)
                     + f" {row['tokens_per_second_per_gpu']:>10,}")
    return "\n".join(lines)


# --- the measured check: two CPU processes on tiny-shapes --------------------------------------------------------


CHECK_BATCH = 4  # global: 2 examples per rank


def activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward pass of one training forward, weights aside. Under FSDP the weights
    saved are the all-gathered layers, freed after each layer's forward and gathered again for its backward (the
    plan's "gathered" part); they are told apart by their shapes."""
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) not in shapes:
            storage = tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch, return_logits=False).loss
    loss.backward()
    return sum(kept.values())


def check_batch(config: PaliGemmaConfig, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of the check's global batch: CHECK_BATCH // 2 examples of `training_batch`'s shape."""
    from .finetune_step import training_batch

    examples = [training_batch(config, TEXT_TOKENS, seed=rank * 10 + i) for i in range(CHECK_BATCH // 2)]
    batch = {name: torch.cat([example[name] for example in examples]) for name in examples[0]}
    batch["pixel_values"] = batch["pixel_values"].float()  # the fp32 run
    return batch


def _measure_rank() -> None:
    """One rank of the check (run under torchrun): FSDP on tiny-shapes, fp32, full fine-tuning, one AdamW step on
    its 2 examples; prints this rank's tensor bytes as JSON."""
    from ..io.checkpoint import load_pretrained
    from ..training.distributed import DistributedSettings, join_group, shard
    from ..training.methods import select_trainable

    world, _ = join_group("cpu")
    model, _ = load_pretrained("tiny-shapes", accelerate=False, dtype=torch.float32)
    select_trainable(model, "full")
    shard(model, DistributedSettings("fsdp"), bf16=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    saved = activation_bytes(model, check_batch(model.config, world.rank))
    optimizer.step()

    def local(tensors) -> int:  # this rank's shard of each (DTensor), or the tensor itself
        return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

    measured = {"rank": world.rank, "weights": local(model.parameters()),
                "gradients": local(p.grad for p in model.parameters() if p.grad is not None),
                "optimizer": local(t for state in optimizer.state.values() for t in state.values()
                                   if isinstance(t, torch.Tensor) and t.dim() > 0),
                "activations": saved}
    print("MEASURED " + json.dumps(measured), flush=True)
    torch.distributed.destroy_process_group()


def check(log=print) -> dict:
    """Run `_measure_rank` on two CPU processes and set each rank's bytes beside the plan's prediction."""
    from ..io.checkpoint import resolve_checkpoint
    from ..io.config_file import read_config
    from ..io.layout import CONFIG_FILE

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "paligemma.bench.distributed_plan", "--measure-rank"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the two-process check failed: {done.stderr[-2000:]}")
    ranks = sorted((json.loads(line.removeprefix("MEASURED ")) for line in done.stdout.splitlines()
                    if line.startswith("MEASURED ")), key=lambda r: r["rank"])
    config = read_config(resolve_checkpoint("tiny-shapes") / CONFIG_FILE)
    counts = count(config, "full")
    predicted = static_bytes(counts, 2, precision="fp32")
    predicted.pop("gathered")  # transient, freed before the step: not in the tensors counted after it
    small = {s: layer_bytes(config, "full", False, s, precision="fp32") for s in SMALL_IMAGES}
    per_example = total(extrapolate({s: v["activations"] for s, v in small.items()}, config,
                                    config.num_image_tokens), config)
    predicted["activations"] = per_example * CHECK_BATCH // 2
    from ..io.checkpoint import load_pretrained
    from ..training.methods import select_trainable

    alone, _ = load_pretrained("tiny-shapes", accelerate=False, dtype=torch.float32)
    select_trainable(alone, "full")
    alone.train()
    one_process = activation_bytes(alone, check_batch(config, 0))
    log("measured on two processes; predicted from the plan")
    return {"model": "tiny-shapes", "method": "full", "precision": "fp32", "processes": 2,
            "global_batch": CHECK_BATCH, "predicted_per_rank": {k: round(v) for k, v in predicted.items()},
            "measured": ranks, "one_process_activations_at_the_same_batch": one_process,
            "activations_per_example_at_batch_1": per_example}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.distributed_plan",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="measure the two-process CPU run against the plan")
    parser.add_argument("--measure-rank", action="store_true", help=argparse.SUPPRESS)  # one rank of --check
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.measure_rank:
        _measure_rank()
        return 0
    if args.check:
        report = check(log=progress)
        save_report(report, args.json, "paligemma.bench.distributed_plan", argv)
        print(json.dumps(report, indent=1))
        return 0
    report = plan(tuple(args.models), tuple(args.resolutions), log=progress)
    save_report(report, args.json, "paligemma.bench.distributed_plan", argv)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
