"""What int8 and int4 weights cost in quality: the held-out scores of the shipped tiny-shapes model in each weight
format, on the same scenes, in one run:

    python -m paligemma.bench.quantized_quality --json book/data/quantized_quality.json
    python -m paligemma.bench.quantized_quality --examples 100 --formats bf16 int8

Each format loads the checkpoint afresh, quantizing as it loads (`load_pretrained(..., quantization=)`), and scores
`--examples` held-out scenes (`training.pretrain.evaluate_checkpoint`: the seed training never uses): caption exact
match, colour and count accuracy, and the mean IoU of detected boxes. fp32 is there as the unrounded reference; bf16
is what int8 and int4 are compared with, as their activations are bf16.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..training.pretrain import evaluate_checkpoint
from .command import progress, save_report
from .limits import machine_description

#: Each format: the weights' dtype, the quantization scheme and int4's group.
FORMATS = {"fp32": ("fp32", None, None), "bf16": ("bf16", None, None), "int8": ("bf16", "int8", None),
           "int4-g128": ("bf16", "int4", 128), "int4-g64": ("bf16", "int4", 64), "int4-g32": ("bf16", "int4", 32)}
#: What a run scores unless told otherwise: tiny-shapes' 192-wide decoder layers do not split into groups of 128, so
#: int4-g128 would leave them wide there (`--formats int4-g128` still runs it).
DEFAULT_FORMATS = ("fp32", "bf16", "int8", "int4-g64", "int4-g32")
#: The scores, as `evaluate` names them, and how the table heads them.
METRICS = {"caption_exact_match": "caption", "color_accuracy": "colour", "count_accuracy": "count",
           "detect_mean_iou": "detect IoU"}


def run(model: str = "tiny-shapes", examples: int = 500, formats: tuple[str, ...] = DEFAULT_FORMATS,
        log=progress) -> dict[str, Any]:
    """Score `model` in each format on the same held-out scenes; returns the report (see the module docstring)."""
    import torch

    report: dict[str, Any] = {"model": model, "examples": examples,
                              "machine": machine_description(torch.device("cpu")),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": {}}
    start = time.perf_counter()
    for name in formats:
        dtype, scheme, group = FORMATS[name]
        log(f"{name}: scoring {examples} held-out scenes")
        report["results"][name] = evaluate_checkpoint(model, examples, dtype=dtype, quantization=scheme,
                                                      group_size=group or 128)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    """One line per format: each score, and its difference from bf16's (when bf16 was scored)."""
    results = report["results"]
    base = results.get("bf16")
    lines = [f"{report['model']}, {report['examples']} held-out scenes "
             f"(scores, and in brackets the difference from bf16)",
             f"{'format':10}" + "".join(f"{head:>20}" for head in METRICS.values())]
    for name in sorted(results, key=lambda n: list(FORMATS).index(n) if n in FORMATS else len(FORMATS)):
        scores = results[name]
        cells = []
        for metric in METRICS:  # a task with no scene among a few examples has no score
            if metric not in scores:
                cells.append("-")
                continue
            compared = base is not None and name != "bf16" and metric in base
            delta = f" ({scores[metric] - base[metric]:+.4f})" if compared else ""
            cells.append(f"{scores[metric]:.4f}{delta}")
        lines.append(f"{name:10}" + "".join(f"{cell:>20}" for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.quantized_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes", help="checkpoint folder or shipped name")
    parser.add_argument("--examples", type=int, default=500, help="held-out scenes (default 500)")
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), choices=list(FORMATS))
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    report = run(args.model, args.examples, tuple(args.formats))
    print(format_table(report))
    save_report(report, args.json, "paligemma.bench.quantized_quality", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
