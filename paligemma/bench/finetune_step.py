"""One LoRA training step of the full-size model: this library against transformers + peft, in one run.

    python -m paligemma.bench.finetune_step                      # 3B-224, bf16, batch 1, 256 image + 32 text tokens
    python -m paligemma.bench.finetune_step --preset small --steps 3 --json step.json

Random weights are written once in bf16 (the layout of a real checkpoint); then each implementation, in a fresh
process of its own and alternating, loads them, adds rank-8 adapters to the decoder's q, k, v, o, gate, up and down
projections (float32 adapters on bf16 weights, as peft keeps them), and takes warm-up and timed steps: forward with
the loss on the answer tokens, backward, AdamW. Each process reports its seconds per step, its peak resident memory
(the weights included) and its first loss, which must agree between the two: same weights, same batch, B = 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..models.config import PaliGemmaConfig
from . import PRESETS
from .command import progress, save_report
from .harness import _status_bytes, make_inputs, write_random_checkpoint
from .limits import machine_description

IMPLEMENTATIONS = ("ours", "transformers+peft")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def training_batch(config: PaliGemmaConfig, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch 1: the image tokens, then `text_tokens` text tokens, the second half of them the answer (labelled)."""
    prompt = make_inputs(config, 1, torch.device("cpu"), seed)  # image tokens, <bos>, prompt tokens
    generator = torch.Generator().manual_seed(seed + 1)
    answer_length = text_tokens // 2
    extra = text_tokens - (prompt["input_ids"].shape[1] - config.num_image_tokens) - answer_length
    vocab = min(config.image_token_index, config.text_config.vocab_size)
    more_prompt = torch.randint(3, vocab, (1, max(extra, 0)), generator=generator)
    answer = torch.randint(3, vocab, (1, answer_length), generator=generator)
    input_ids = torch.cat([prompt["input_ids"], more_prompt, answer], dim=1)
    token_type_ids = torch.cat([torch.zeros_like(prompt["input_ids"]), torch.zeros_like(more_prompt),
                                torch.ones_like(answer)], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_type_ids,
            "pixel_values": prompt["pixel_values"].to(torch.bfloat16),
            "labels": input_ids.masked_fill(token_type_ids == 0, -100)}


def _ours(directory: Path) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    from ..io.checkpoint import load_model
    from ..training.lora import LoraSettings, apply_lora, lora_parameters

    model = load_model(directory, dtype=torch.bfloat16, accelerate=False)  # training: PyTorch's own products
    apply_lora(model, LoraSettings(rank=8, alpha=8, target_modules=TARGETS))
    return model.train(), lora_parameters(model)


def _theirs(directory: Path) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    import peft
    import transformers
    from transformers import PaliGemmaForConditionalGeneration as Reference

    transformers.logging.set_verbosity_error()
    model = Reference.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa")
    pattern = r"(?:.*\.)?language_model\.(?:.*\.)?layers\.\d+\.[^.]+\.(?:" + "|".join(TARGETS) + ")"
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=pattern)
    model = peft.get_peft_model(model, config)  # float32 adapters on the bf16 model (peft's default)
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def probe(implementation: str, directory: Path, text_tokens: int, steps: int, warmup: int) -> dict:
    """In this process: load, add adapters, and time `steps` optimiser steps after `warmup` untimed ones."""
    started = time.perf_counter()
    model, trainable = (_ours if implementation == "ours" else _theirs)(directory)
    load_seconds = time.perf_counter() - started
    after_load = _status_bytes("VmRSS") or 0
    config = PaliGemmaConfig.from_dict(json.loads((directory / "config.json").read_text()))
    batch = training_batch(config, text_tokens)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if implementation != "ours":
        batch["position_ids"] = batch["attention_mask"].cumsum(-1)  # ours starts at 1 after padding: the same
    losses, samples = [], []
    options = {"return_logits": False} if implementation == "ours" else {}  # ours: logits only where labelled
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(**batch, **options).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if step >= warmup:
            samples.append(elapsed)
    return {"implementation": implementation, "seconds_per_step": samples, "first_loss": losses[0],
            "losses": losses, "trainable_parameters": sum(p.numel() for p in trainable), "load_seconds": load_seconds,
            "rss_after_load_gb": after_load / 1e9, "peak_rss_gb": (_status_bytes("VmHWM") or 0) / 1e9,
            "sequence_length": int(batch["input_ids"].shape[1])}


def run(preset: str, text_tokens: int, steps: int, warmup: int, repeats: int, workdir: str | None,
        log=print) -> dict:
    """Write the random checkpoint, then `repeats` alternating fresh processes of each implementation."""
    config = PaliGemmaConfig.from_dict(PRESETS[preset])
    with tempfile.TemporaryDirectory(dir=workdir) as temporary:
        directory = Path(temporary) / "checkpoint"
        log(f"writing random {preset} weights (bf16) to {directory}")
        written = write_random_checkpoint(config, directory, torch.bfloat16)
        runs = []
        for repeat in range(repeats):
            for implementation in IMPLEMENTATIONS:
                log(f"{implementation}, run {repeat + 1} of {repeats}")
                command = [sys.executable, "-m", "paligemma.bench.finetune_step", "--probe", implementation,
                           str(directory), "--text-tokens", str(text_tokens), "--steps", str(steps),
                           "--warmup", str(warmup)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{implementation} failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for implementation in IMPLEMENTATIONS:
        mine = [r for r in runs if r["implementation"] == implementation]
        summary[implementation] = {
            "median_seconds_per_step": statistics.median(s for r in mine for s in r["seconds_per_step"]),
            "best_seconds_per_step": min(s for r in mine for s in r["seconds_per_step"]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
            "first_loss": mine[0]["first_loss"], "trainable_parameters": mine[0]["trainable_parameters"]}
    ours, theirs = summary["ours"], summary["transformers+peft"]
    return {"preset": preset, "weights_gb": written / 1e9, "text_tokens": text_tokens,
            "image_tokens": config.num_image_tokens, "steps": steps, "warmup": warmup, "repeats": repeats,
            "machine": machine_description(torch.device("cpu")), "runs": runs, "summary": summary,
            "speedup": theirs["median_seconds_per_step"] / ours["median_seconds_per_step"],
            "memory_ratio": ours["peak_rss_gb"] / theirs["peak_rss_gb"]}


def format_summary(report: dict) -> str:
    lines = [f"one LoRA step, {report['preset']}, bf16, batch 1, {report['image_tokens']} image + "
             f"{report['text_tokens']} text tokens ({report['machine'].get('cpu')}, {report['machine']['threads']} "
             "threads)", f"{'':20} {'s/step (median)':>16} {'best':>8} {'peak RSS GB':>12} {'first loss':>11}"]
    for name, row in report["summary"].items():
        lines.append(f"{name:20} {row['median_seconds_per_step']:16.3f} {row['best_seconds_per_step']:8.3f} "
                     f"{row['peak_rss_gb']:12.2f} {row['first_loss']:11.4f}")
    lines.append(f"ours is {report['speedup']:.2f}x as fast, at {report['memory_ratio']:.2f}x the peak memory")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.finetune_step", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b-224")
    parser.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image's (half of them "
                        "the answer)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes of each implementation, alternating")
    parser.add_argument("--workdir", default=None, help="where to write the temporary checkpoint")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--probe", nargs=2, metavar=("IMPLEMENTATION", "DIRECTORY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.text_tokens < 4:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0, --text-tokens at least 4")
    if args.probe:
        print(json.dumps(probe(args.probe[0], Path(args.probe[1]), args.text_tokens, args.steps, args.warmup)))
        return 0
    report = run(args.preset, args.text_tokens, args.steps, args.warmup, args.repeats, args.workdir, log=progress)
    save_report(report, args.json, "paligemma.bench.finetune_step", argv)
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
