"""The arithmetic ceiling of each streaming kernel, with the memory out of the way:

    python -m paligemma.bench.kernel_throughput --json book/data/kernel_throughput_cpu.json

Compiles `kernel_throughput.cpp` (the kernels' header, no PyTorch) with g++ and runs it: one thread, a 128 x 2048
weight matrix that stays in the core's L2 cache, 1 to 8 rows of x, every variant and format this CPU runs. Each
figure is weights (and multiply-adds) a second, the best of `--samples` rounds; a round times `--calls` calls of every
kernel and number of rows in turn, so that a busy moment on the cores slows one timing of each, not all of one.

Decoding reads its weights from memory, so a format whose ceiling, times the cores, is below the memory's bandwidth
(in weights a second) is bound by its arithmetic, not by its bytes. On a shared machine whose memory speed moves, these
figures are far steadier than decoding's, though a neighbour busy on the same cores still lowers them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import PaliGemmaError
from .command import save_report
from .limits import machine_description

SOURCE = Path(__file__).with_suffix(".cpp")
KERNELS = Path(__file__).resolve().parent.parent / "kernels" / "csrc"


def run(samples: int = 15, calls: int = 100) -> dict[str, Any]:
    """Build and run the C++ timing loop; returns the report (machine, and one result per kernel, format and rows)."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise PaliGemmaError("kernel_throughput needs g++ to build its timing loop (install g++)")
    with tempfile.TemporaryDirectory() as scratch:
        binary = Path(scratch) / "kernel_throughput"
        built = subprocess.run([compiler, "-O3", "-std=c++17", f"-I{KERNELS}", "-o", str(binary), str(SOURCE)],
                               check=False, capture_output=True, text=True)
        if built.returncode != 0:
            raise PaliGemmaError(f"g++ could not build {SOURCE.name}: {built.stderr.strip().splitlines()[-1]}")
        ran = subprocess.run([str(binary), str(samples), str(calls)], capture_output=True, text=True, check=True)
    results = [json.loads(line) for line in ran.stdout.splitlines()]
    machine = machine_description(torch.device("cpu"))
    machine["threads"] = 1  # the loop runs on one thread, whatever PyTorch would use
    return {"machine": machine, "samples": samples, "calls": calls, "weights_shape": [128, 2048], "results": results}


def format_table(report: dict[str, Any]) -> str:
    """Billions of weights a second, one line per kernel and format, one column per number of rows of x."""
    results = report["results"]
    rows = sorted({r["rows"] for r in results})
    title = (f"{report['machine'].get('cpu', '')}, one thread, {report['weights_shape'][0]} x "
             f"{report['weights_shape'][1]} weights in L2: billions of weights a second (multiply-adds: times rows)")
    lines = [title, f"{'variant':8} {'format':15}" + "".join(f"{f'{m} rows' if m > 1 else '1 row':>9}" for m in rows)]
    kernels = list(dict.fromkeys((r["variant"], r["format"]) for r in results))
    for variant, name in kernels:
        rate = {r["rows"]: r["weights_per_s"] for r in results if (r["variant"], r["format"]) == (variant, name)}
        lines.append(f"{variant:8} {name:15}" + "".join(f"{rate[m] / 1e9:9.2f}" for m in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.kernel_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=15, help="rounds over every kernel and rows (the best is kept)")
    parser.add_argument("--calls", type=int, default=100, help="calls of the kernel per timing")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.calls < 1:
        parser.error("--samples and --calls must be at least 1")
    try:
        report = run(args.samples, args.calls)
    except PaliGemmaError as error:
        raise SystemExit(f"error: {error}") from None
    print(format_table(report))
    save_report(report, args.json, "paligemma.bench.kernel_throughput", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
