"""Decoding from weights in 4 KB pages against the same weights in 2 MB pages, in one run:

    python -m paligemma.bench.page_sizes --preset 3b-224 --json book/data/page_sizes_cpu.json
    python -m paligemma.bench.page_sizes --preset small --formats bf16 --batches 1

One random bf16 checkpoint is written, then each weight format is loaded twice: with `huge_pages=False` (bf16 as
views of the mapped file advised against huge pages, quantized codes in PyTorch's allocations: 4 KB pages) and with
`huge_pages=True` (every tensor of 2 MB or more in one arena of 2 MB pages, `paligemma.kernels.huge_pages`). Both
copies decode in turn within each cycle, as `quantized_decode` times its formats (`_time_cycles`: the compiled step,
the bandwidth measured beside every run), so the ratio of each cycle compares two runs a few seconds apart. Also
reported: how much of each copy the kernel actually backs with huge pages (`AnonHugePages`, and a mapped file's
`FilePmdMapped`), and the seconds each load took in this process.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from ..kernels.huge_pages import Mapping, huge_pages_unavailable, in_an_arena, mapping_holding, mappings
from ..models.config import PaliGemmaConfig
from .command import progress, save_report
from .harness import scratch_checkpoint
from .limits import machine_description, measure_matmul
from .quantized_decode import FORMATS, _time_cycles, bandwidth_sampler

PAGES = {"4 KB pages": False, "2 MB pages": True}


def _weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the model's tensors, bytes of them the kernel backs with huge pages now)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied weight once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    every = mappings()
    held: dict[Mapping, int] = {}  # the model's own mappings -> the bytes of its tensors in each
    for t in tensors.values():
        mapping = mapping_holding(t, every)
        # its own: an arena made for weights, or the checkpoint's file mapped (not the allocator's memory)
        if mapping is not None and (in_an_arena(t) or mapping.path.endswith(".safetensors")):
            held[mapping] = held.get(mapping, 0) + t.numel() * t.element_size()
    # a mapping's huge pages, but no more than the model's bytes in it (a mapped file may hold other tensors too)
    return total, sum(min(mapping.huge_bytes, nbytes) for mapping, nbytes in held.items())


def run(preset: str = "3b-224", formats: tuple[str, ...] = ("bf16", "int8"), batches: tuple[int, ...] = (1, 8),
        new_tokens: int = 16, cycles: int = 5, variant: str | None = None, workdir: str | None = None,
        decode_cache: str = "compiled", log=progress) -> dict[str, Any]:
    """Run the comparison; returns the report (see the module docstring)."""
    from ..bench import PRESETS
    from ..io.checkpoint import load_model
    from ..kernels.linear import cpu_variants, kernel_status

    reason = huge_pages_unavailable()
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    config = PaliGemmaConfig.from_dict(PRESETS[preset])
    device = torch.device("cpu")
    available = cpu_variants(torch.bfloat16)
    variant = variant or available[0]
    if variant not in available:
        raise SystemExit(f"error: this CPU cannot run the {variant} variant (it runs {', '.join(available)})")
    report: dict[str, Any] = {"preset": preset, "machine": machine_description(device), "kernel": kernel_status(),
                              "variant": variant, "new_tokens": new_tokens, "cycles": cycles, "decode_cache": decode_cache,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [], "models": {},
                              "bandwidth_samples": [], "run_bandwidths": {}}
    start = time.perf_counter()
    bandwidth = bandwidth_sampler(report)
    report["matmul"] = measure_matmul(device, [torch.float32, torch.bfloat16])  # for the bounds (`_time_cycles`)
    with scratch_checkpoint(config, preset, torch.bfloat16, workdir, log) as directory:
        models = {}
        for name in formats:
            scheme, group = FORMATS[name]
            for pages, huge in PAGES.items():
                log(f"loading {name} into {pages}")
                began = time.perf_counter()
                model = load_model(directory, dtype="bf16", quantization=scheme, group_size=group or 128,
                                   huge_pages=huge)
                seconds = time.perf_counter() - began
                total, huge_bytes = _weight_bytes(model)
                models[f"{name}, {pages}"] = model
                report["models"][f"{name}, {pages}"] = {"load_seconds": round(seconds, 2), "bytes": total,
                                                        "huge_page_bytes": huge_bytes}
        for batch in batches:
            results = _time_cycles(models, config, batch, new_tokens, cycles, (variant,), decode_cache, bandwidth,
                                   report, log)
            by_name = {r["format"]: r for r in results}
            for name in formats:
                small, huge = by_name[f"{name}, 4 KB pages"], by_name[f"{name}, 2 MB pages"]
                ratios = [h / s for h, s in zip(huge["samples"], small["samples"])]  # within each cycle
                report["results"].append({
                    "format": name, "batch": batch,
                    "tokens_per_s": {"4 KB pages": small["decode_tokens_per_s"],
                                     "2 MB pages": huge["decode_tokens_per_s"]},
                    "samples": {"4 KB pages": small["samples"], "2 MB pages": huge["samples"]},
                    "read_gb_per_s": {"4 KB pages": small["read_gb_per_s"], "2 MB pages": huge["read_gb_per_s"]},
                    "fraction_of_bound": {"4 KB pages": small["fraction_of_bound"],
                                          "2 MB pages": huge["fraction_of_bound"]},
                    "speedup": statistics.median(ratios), "faster_cycles": sum(r > 1 for r in ratios),
                })
        del models
        gc.collect()
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per format and batch, tokens/s in each page size (medians over the cycles), and
    the median of the cycles' ratios."""
    samples = report["bandwidth_samples"]
    lines = [(f"{report['preset']}, {report['machine'].get('cpu', '')}, {report['variant']} kernel, bandwidth "
              f"{min(samples):.1f} to {max(samples):.1f} GB/s ({len(samples)} samples)"),
             f"{'format':10} {'batch':>5} {'4 KB pages':>11} {'2 MB pages':>11} {'speed-up':>9} {'faster in':>10}"]
    for r in report["results"]:
        rates = r["tokens_per_s"]
        lines.append(f"{r['format']:10} {r['batch']:>5} {rates['4 KB pages']:11.2f} {rates['2 MB pages']:11.2f} "
                     f"{r['speedup']:8.2f}x {r['faster_cycles']:>4} of {len(r['samples']['4 KB pages'])}")
    for name, measured in report["models"].items():
        lines.append(f"{name}: loaded in {measured['load_seconds']:.1f} s, {measured['bytes'] / 1e9:.2f} GB, "
                     f"{measured['huge_page_bytes'] / 1e9:.2f} GB of it in huge pages")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.page_sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="3b-224", choices=["tiny", "small", "3b-224"])
    parser.add_argument("--formats", nargs="+", default=["bf16", "int8"], choices=list(FORMATS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16, help="decoding steps of each copy in a cycle")
    parser.add_argument("--cycles", type=int, default=5, help="cycles through every format and page size")
    parser.add_argument("--variant", help="the kernel variant (default: the fastest this CPU runs)")
    parser.add_argument("--workdir", help="where to write the random checkpoint (default: the temporary folder)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.cycles < 1 or min(args.batches) < 1:
        parser.error("--new-tokens must be at least 2, --cycles and --batches at least 1")
    report = run(args.preset, tuple(args.formats), tuple(args.batches), args.new_tokens, args.cycles, args.variant,
                 args.workdir)
    print(format_table(report))
    save_report(report, args.json, "paligemma.bench.page_sizes", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
