"""The fine-tuning chapter's study: three new tasks, five ways to learn each, three amounts of data.

    python -m paligemma.bench.transfer_study --out runs/transfer --json book/data/transfer_study.json

For each task of `new_tasks` and each training-set size, every method fine-tunes the shipped tiny-shapes model
through the command line (`python -m paligemma.finetune`, one fresh process per run, so each run's peak memory is
its own), and "scratch" trains the same architecture from random weights. Each run is then scored on the original
four tasks, against the shipped model on the same held-out scenes: what it forgot. Finished runs are kept in `--out`
and skipped when the study is started again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..io.checkpoint import load_pretrained
from ..training import new_tasks, shapes
from ..training.pretrain import HELD_OUT_SEED, evaluate
from ..training.resume import latest_checkpoint
from .command import progress, save_report
from .limits import machine_description

MODEL = "tiny-shapes"
METHODS = ("full", "freeze-vision", "attention", "lora", "scratch")
LEARNING_RATES = {"full": 3e-4, "freeze-vision": 3e-4, "attention": 1e-3, "lora": 3e-3, "scratch": 1e-3}
SIZES = (64, 512, 4096)
HELD_OUT = 200  # examples of each new task
ORIGINAL_SCENES = 120  # held-out scenes of the original four tasks, for what a run forgot
TRAIN_SEEDS = {"relation": 101, "star": 102, "pairs": 103}
EVAL_SEED = 9_000_001  # never used for training sets


def write_data(out: Path, tasks: tuple[str, ...], sizes: tuple[int, ...]) -> dict[str, dict[str, Path]]:
    """Per task: the largest training set, its first-n subsets (smaller sets are nested), and a held-out set."""
    files: dict[str, dict[str, Path]] = {}
    for task in tasks:
        folder = out / "data" / task
        largest = folder / f"train_{max(sizes)}.jsonl"
        if not largest.exists():
            new_tasks.write_task(task, folder, max(sizes), TRAIN_SEEDS[task], name=f"train_{max(sizes)}")
            new_tasks.write_task(task, folder, HELD_OUT, EVAL_SEED, name="held_out")
        lines = largest.read_text().splitlines()
        files[task] = {"held_out": folder / "held_out.jsonl"}
        for size in sizes:
            subset = folder / f"train_{size}.jsonl"
            if not subset.exists():
                subset.write_text("\n".join(lines[:size]) + "\n")
            files[task][str(size)] = subset
    return files


def original_scores(model_dir: str | Path, examples: list[shapes.Example]) -> dict[str, float]:
    model, processor = load_pretrained(model_dir)
    return {k: round(v, 4) for k, v in evaluate(model, processor, examples).items() if not k.endswith("_examples")}


def run_one(task: str, method: str, size: int, files: dict[str, Path], out: Path, steps: int, threads: int) -> dict:
    """One fine-tuning run through the command line; returns its record."""
    run_dir = out / task / f"{method}-{size}"
    if (run_dir / "record.json").exists() and (run_dir / "model").exists():
        return json.loads((run_dir / "record.json").read_text())
    command = [sys.executable, "-m", "paligemma.finetune", "--model", MODEL, "--train", str(files[str(size)]),
               "--eval", str(files["held_out"]), "--method", "full" if method == "scratch" else method,
               "--steps", str(steps), "--batch-size", "16", "--learning-rate", str(LEARNING_RATES[method]),
               "--eval-every", str(max(1, steps // 4)), "--checkpoint-every", str(steps), "--threads", str(threads),
               "--out", str(run_dir)]
    if method == "scratch":
        command.append("--from-scratch")
    if latest_checkpoint(run_dir) is not None:
        command.append("--resume")
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task}/{method}-{size} failed: {done.stderr.strip()[-2000:]}")
    record = json.loads((run_dir / "record.json").read_text())
    record["process_seconds"] = round(time.monotonic() - started, 1)
    return record


def study(out: Path, tasks: tuple[str, ...], methods: tuple[str, ...], sizes: tuple[int, ...], steps: int,
          threads: int, log=print) -> dict:
    files = write_data(out, tasks, sizes)
    original = shapes.make_dataset(HELD_OUT_SEED, ORIGINAL_SCENES, 112)
    baseline = original_scores(MODEL, original)
    log(f"shipped model on the original tasks: {baseline}")
    runs = []
    for task in tasks:
        for size in sizes:
            for method in methods:
                record = run_one(task, method, size, files[task], out, steps, threads)
                after = original_scores(out / task / f"{method}-{size}" / "model", original)
                final = record["evaluations"][-1]
                runs.append({
                    "task": task, "method": method, "train_examples": size, "steps": steps,
                    "learning_rate": LEARNING_RATES[method], "score": final["score"],
                    "held_out_loss": final["held_out_loss"], "trainable_parameters": record["trainable_parameters"],
                    "parameters": record["parameters"], "train_seconds": record["train_seconds"],
                    "peak_memory_gb": record["peak_memory"]["gb"], "original_tasks": after,
                    "forgetting": {k: round(baseline[k] - v, 4) for k, v in after.items()},
                    "curve": [{"step": e["step"], "score": e["score"], "held_out_loss": e["held_out_loss"]}
                              for e in record["evaluations"]],
                    "loss": [h["loss"] for h in record["history"]]})
                log(f"{task:9} {method:14} {size:5}: score {final['score']:.3f}, "
                    f"{record['train_seconds']:.0f} s, forgot {sum(runs[-1]['forgetting'].values()) / 4:+.3f}")
    return {"model": MODEL, "held_out": HELD_OUT, "original_scenes": ORIGINAL_SCENES, "steps": steps,
            "batch_size": 16, "threads": threads, "baseline_original_tasks": baseline, "runs": runs}


def format_table(report: dict) -> str:
    """The study as a Markdown table: held-out score per size, forgetting, trainable parameters, time and memory."""
    sizes = sorted({r["train_examples"] for r in report["runs"]})
    largest = sizes[-1]
    lines = ["| task | method | " + " | ".join(f"score @{s}" for s in sizes)
             + f" | forgot @{largest} | trainable | train s | peak GB |",
             "|---|---|" + "---:|" * (len(sizes) + 4)]
    for task in dict.fromkeys(r["task"] for r in report["runs"]):
        for method in dict.fromkeys(r["method"] for r in report["runs"]):
            mine = {r["train_examples"]: r for r in report["runs"] if (r["task"], r["method"]) == (task, method)}
            last = mine[largest]
            forgot = sum(last["forgetting"].values()) / len(last["forgetting"])
            lines.append(f"| {task} | {method} | " + " | ".join(f"{mine[s]['score']:.3f}" for s in sizes)
                         + f" | {forgot:.3f} | {last['trainable_parameters']:,} | {last['train_seconds']:.0f} "
                         f"| {last['peak_memory_gb']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.transfer_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/transfer", help="folder for the data and every run")
    parser.add_argument("--json", default=None, help="write the study's results here")
    parser.add_argument("--tasks", nargs="+", choices=new_tasks.TASKS, default=list(new_tasks.TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = study(Path(args.out), tuple(args.tasks), tuple(args.methods), tuple(args.sizes), args.steps,
                   args.threads, log=progress)
    report["machine"] = machine_description(torch.device("cpu"))
    report["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    save_report(report, args.json, "paligemma.bench.transfer_study", argv)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
