"""Decoding with int8 and int4 weights against bf16, on one set of random weights, in one run:

    python -m paligemma.bench.quantized_decode --preset 3b-224 --json book/data/quantized_decode_cpu.json
    python -m paligemma.bench.quantized_decode --preset small --batches 1 --variants avx2

One random bf16 checkpoint is written, then loaded once per weight format: bf16, int8 (per row) and int4 in groups
of 128 and 32, each quantized as it loads. For each format and each kernel variant this CPU runs (or those named):

- decode tokens/s at each batch, measured in `--cycles` short cycles. Each format's prompt is prefilled once
  (`RewindableDecoder`); a cycle then runs `--new-tokens` greedy steps of every format and variant in turn from that
  same point (the fixed-shape step compiled, as `cache="compiled"` decodes, or with `--decode-cache static` eager
  steps through a static cache), and the memory bandwidth is measured before and after each of those runs. The
  memory of a shared machine speeds up and slows down by more than the differences measured here, so every ratio is
  taken within one cycle (a few seconds) and the report gives the median over the cycles: the speed-up over bf16,
  and the share of the bound;
- the bound for that format, as `python -m paligemma.bench` bounds decoding (`limits.decode_rate_bound`): a step
  takes at least the bytes it reads (its stored decoder and head, norms, the KV cache) over the memory bandwidth
  measured next to that run (the faster of the samples just before and just after it), so each format is held to
  its own byte count, and at least its multiply-adds over the machine's matrix throughput (the faster of fp32 and
  bf16 products, measured at the start), which is what binds at larger batches on a CPU with few or narrow
  multipliers. The memory's bound alone is reported beside it, and the rate at which the steps read their bytes;
- transformers with torchao's int8 weight-only layers on the same weights, in the same run (`--no-torchao` skips),
  timed as one `generate` call per batch (`harness.time_generation`);
- the top-1 agreement of next-token predictions with bf16, teacher-forced over `--positions` positions of one
  random token sequence after the image (the same sequence for every format);
- loading each format in a fresh process (`harness.measure_load`): its time, and its peak resident memory above
  the process's base against the loaded model's size (`--no-loading` skips).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import PaliGemmaError
from ..inference.decoders import CachedDecoder
from ..inference.fixed_shape import FixedShapeDecoder
from ..inference.kv_cache import StaticCache
from ..models.config import PaliGemmaConfig
from .command import progress, save_report
from .harness import make_inputs, measure_load, reference_sharing_weights, scratch_checkpoint, time_generation
from .limits import (
    decode_rate_bound,
    decode_step,
    linear_params,
    machine_description,
    measure_bandwidth,
    measure_matmul,
)

FORMATS = {"bf16": (None, None), "int8": ("int8", None), "int4-g128": ("int4", 128), "int4-g32": ("int4", 32)}


def step_bytes(model: torch.nn.Module, config: PaliGemmaConfig, batch: int, context: int) -> float:
    """Bytes one decoding step reads from `model` as stored: `limits.decode_step`'s count with the decoder's and the
    head's linear layers taken at their stored size (codes, scales, zeros) rather than bf16's."""
    from ..quantization import QuantizedLinear

    bf16 = decode_step(config, batch, context, torch.bfloat16)["bytes"]
    params = linear_params(config)
    wide = 2 * (params["decoder"] + params["head"])
    stored = 0
    for name, module in model.language_model.named_modules():
        if isinstance(module, QuantizedLinear):
            stored += module.stored_bytes()
        elif isinstance(module, torch.nn.Linear):
            stored += module.weight.numel() * module.weight.element_size()
    return bf16 - wide + stored


def bandwidth_sampler(report: dict[str, Any]) -> Callable[[], float]:
    """A function that measures the memory's read bandwidth now (GB/s) and records it in `report["bandwidth_samples"]`."""

    def bandwidth() -> float:
        measured = measure_bandwidth(torch.device("cpu"), repeats=3)["gb_per_s"]
        report["bandwidth_samples"].append(round(measured, 2))
        return measured

    return bandwidth


class RewindableDecoder:
    """Greedy decoding steps from one prefilled prompt, run again and again from the same point.

    The prompt is prefilled once; before each run the decoder is put back where the prefill left it (how many
    positions its cache holds, and which are real tokens), so every run decodes the same steps over the same context
    and overwrites the previous run's keys and values. `cache` is "static" (eager steps through a `StaticCache`) or
    "compiled" (the fixed-shape step compiled by `torch.compile`, as `generate(..., cache="compiled")` decodes).
    """

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int,
                 cache: str = "static") -> None:
        batch, length = inputs["input_ids"].shape
        if cache == "static":
            self.decoder: CachedDecoder | FixedShapeDecoder = CachedDecoder(
                model, StaticCache.for_model(model, batch, length + steps))
        elif cache == "compiled":
            self.decoder = FixedShapeDecoder(model, batch, length + steps, compile=True)
        else:
            raise PaliGemmaError(f"cache must be 'static' or 'compiled', got {cache!r}")
        self.first = self.decoder.prefill(inputs).argmax(-1)  # [b]: the first new token
        self.start = self._state()
        self.steps = steps
        self.tokens: torch.Tensor | None = None

    def _state(self) -> tuple:
        decoder = self.decoder
        if isinstance(decoder, FixedShapeDecoder):
            return decoder.cache.length, decoder.seen.clone()
        return list(decoder.cache.lengths), decoder.attention_mask, decoder.position

    def _rewind(self) -> None:
        decoder = self.decoder
        if isinstance(decoder, FixedShapeDecoder):
            length, seen = self.start
            decoder.cache.length = length
            decoder.cache.write_at.fill_(length)
            decoder.seen.copy_(seen)
        else:
            lengths, decoder.attention_mask, decoder.position = self.start
            decoder.cache.lengths = list(lengths)

    @torch.no_grad()
    def seconds_per_step(self) -> float:
        """Run the steps again from the prefilled prompt; the mean time of a step, the first left out (it may still
        wait for what the previous run left in the caches, or compile)."""
        self._rewind()
        tokens = [self.first]
        stamps = [time.perf_counter()]
        for _ in range(self.steps):
            tokens.append(self.decoder.step(tokens[-1]).argmax(-1))  # [b]
            stamps.append(time.perf_counter())
        self.tokens = torch.stack(tokens[:-1], 1)  # [b, steps]: the tokens this run fed, the first new one first
        return (stamps[-1] - stamps[1]) / (self.steps - 1)


@torch.no_grad()
def next_token_predictions(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The argmax of the logits at every text position of one teacher-forced forward pass: [positions]."""
    logits = model(**inputs).logits[0]  # [length, vocab]
    first_text = model.config.num_image_tokens
    return logits[first_text:].argmax(-1)


def teacher_forced_inputs(config: PaliGemmaConfig, positions: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """The image tokens, <bos> and `positions` random tokens, all in the prefix (one forward pass)."""
    inputs = make_inputs(config, 1, torch.device("cpu"), seed)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(config.image_token_index, config.text_config.vocab_size), (1, positions),
                         generator=generator)
    ids = torch.cat([inputs["input_ids"][:, : config.num_image_tokens + 1], text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "pixel_values": inputs["pixel_values"]}


def run(preset: str = "3b-224", batches: tuple[int, ...] = (1, 8), new_tokens: int = 32, cycles: int = 5,
        variants: tuple[str, ...] | None = None, formats: tuple[str, ...] = tuple(FORMATS), positions: int = 256,
        torchao: bool = True, workdir: str | None = None, loading: bool = True, decode_cache: str = "compiled",
        log=progress) -> dict[str, Any]:
    """Run the comparison; returns the report (see the module docstring)."""
    from ..bench import PRESETS
    from ..io.checkpoint import load_model
    from ..kernels.linear import cpu_variants, fast_paths, kernel_status

    config = PaliGemmaConfig.from_dict(PRESETS[preset])
    device = torch.device("cpu")
    available = cpu_variants(torch.bfloat16)
    variants = tuple(variants or available)
    missing = [v for v in variants if v not in available]
    if missing:
        raise SystemExit(f"error: this CPU cannot run the {', '.join(missing)} variant "
                         f"(it runs {', '.join(available)})")
    report: dict[str, Any] = {"preset": preset, "machine": machine_description(device), "kernel": kernel_status(),
                              "new_tokens": new_tokens, "cycles": cycles, "positions": positions,
                              "decode_cache": decode_cache,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [], "agreement": {},
                              "loading": {}, "bandwidth_samples": [], "run_bandwidths": {}}
    start = time.perf_counter()
    bandwidth = bandwidth_sampler(report)
    log("matrix throughput (fp32 and bf16 products)")
    report["matmul"] = measure_matmul(device, [torch.float32, torch.bfloat16])
    with scratch_checkpoint(config, preset, torch.bfloat16, workdir, log) as directory:
        if loading:  # each in a fresh process, before this one holds any model
            for name in formats:
                log(f"loading {name} in a fresh process: time and peak memory")
                quantization = None if name == "bf16" else name
                measured = measure_load("ours", directory, torch.bfloat16, quantization=quantization)
                peak, size = measured["peak_rss"] - measured["base_rss"], measured["weight_bytes"]
                report["loading"][name] = {"seconds": round(measured["seconds"], 2), "model_bytes": size,
                                           "peak_above_base_bytes": peak, "peak_over_model": round(peak / size, 3)}
        models = {}
        for name in formats:
            scheme, group = FORMATS[name]
            log(f"loading {name}")
            models[name] = load_model(directory, dtype="bf16", quantization=scheme, group_size=group or 128)
        reference = reference_sharing_weights(models["bf16"]) if "bf16" in models else None
        if torchao and reference is not None:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            log("transformers: torchao int8 weight-only layers on the same weights")
            quantize_(reference, Int8WeightOnlyConfig(set_inductor_config=False))
        forced = teacher_forced_inputs(config, positions)
        with fast_paths(variant=variants[0]):
            predictions = {name: next_token_predictions(model, forced) for name, model in models.items()}
        if "bf16" in predictions:
            for name, tokens in predictions.items():
                report["agreement"][name] = round(float((tokens == predictions["bf16"]).float().mean()), 4)
        for batch in batches:
            report["results"] += _time_cycles(models, config, batch, new_tokens, cycles, variants, decode_cache,
                                              bandwidth, report, log)
            if torchao and reference is not None:
                log(f"batch {batch}: transformers with torchao's int8 weights, {new_tokens} tokens")
                inputs = make_inputs(config, batch, device)
                with fast_paths(variant=variants[0]):
                    rate = time_generation("transformers", models["bf16"], reference, inputs, new_tokens,
                                           device)["decode_tokens_per_s"]
                bf16 = next(r for r in report["results"] if r["format"] == "bf16" and r["batch"] == batch)
                report["results"].append({
                    "format": "transformers + torchao int8", "variant": "-", "batch": batch,
                    "decode_tokens_per_s": rate, "samples": [rate], "best_tokens_per_s": rate, "bytes_per_step": None,
                    "bound_tokens_per_s": None, "fraction_of_bound": None,
                    "speedup_over_bf16": rate / bf16["decode_tokens_per_s"],  # against bf16's median (one call)
                })
        del models, reference
        gc.collect()
    report["bandwidth_gb_per_s"] = max(report["bandwidth_samples"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _time_cycles(models: dict[str, torch.nn.Module], config: PaliGemmaConfig, batch: int, new_tokens: int,
                 cycles: int, variants: tuple[str, ...], decode_cache: str, bandwidth, report: dict[str, Any],
                 log) -> list[dict]:
    """Every format and variant at one batch size, in `cycles` cycles, the bandwidth measured before the first run
    and after every run; one result per format and variant, its figures the medians over the cycles.

    Compiled, each format and variant is a graph of its own (the variant is read while tracing): the compiler may
    keep as many as this batch needs, and they are compiled in a first, untimed pass.
    """
    from ..kernels.linear import fast_paths

    inputs = make_inputs(config, batch, torch.device("cpu"))
    context = inputs["input_ids"].shape[1] + new_tokens // 2  # the mean context of a run's steps
    names = [(name, variant) for variant in variants for name in models]
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in names}
    beside: dict[tuple[str, str], list[float]] = {key: [] for key in names}  # each run's bandwidth, GB/s
    torch._dynamo.reset()  # the previous batch's compiled steps
    with torch._dynamo.config.patch(recompile_limit=max(8, len(names))):
        decoders = {}
        for name, model in models.items():
            log(f"batch {batch}: prefilling the prompt for {name}, once")
            with fast_paths(variant=variants[0]):
                decoders[name] = RewindableDecoder(model, inputs, new_tokens, decode_cache)
        if decode_cache == "compiled":
            log(f"batch {batch}: compiling the step of every format and variant (untimed)")
            for name, variant in names:
                with fast_paths(variant=variant):
                    decoders[name].seconds_per_step()
        measured = [bandwidth()]
        for cycle in range(cycles):
            log(f"batch {batch}: cycle {cycle + 1} of {cycles}, {new_tokens} steps of each format and variant")
            for key in names[cycle % len(names):] + names[: cycle % len(names)]:  # a new order each cycle
                with fast_paths(variant=key[1]):
                    rates[key].append(batch / decoders[key[0]].seconds_per_step())
                measured.append(bandwidth())
                beside[key].append(max(measured[-2:]))  # the faster of the samples before and after this run
    del decoders
    gc.collect()
    report["run_bandwidths"][str(batch)] = [round(b, 2) for b in measured]
    results = []
    gflop_per_s = report["matmul"]["gflop_per_s"]
    flops = decode_step(config, batch, context, torch.bfloat16)["flops"]  # the same multiply-adds in every format
    for name, variant in names:
        nbytes = step_bytes(models[name], config, batch, context)
        samples = rates[(name, variant)]
        step = {"bytes": nbytes, "flops": flops}
        bounds = [decode_rate_bound(batch, step, gb_per_s, gflop_per_s) for gb_per_s in beside[(name, variant)]]
        memory = [batch * gb_per_s * 1e9 / nbytes for gb_per_s in beside[(name, variant)]]
        arithmetic = batch * gflop_per_s * 1e9 / flops
        result = {"format": name, "variant": variant, "batch": batch,
                  "decode_tokens_per_s": statistics.median(samples), "samples": [round(r, 3) for r in samples],
                  "best_tokens_per_s": max(samples), "bytes_per_step": nbytes, "flops_per_step": flops,
                  "read_gb_per_s": statistics.median(r / batch * nbytes / 1e9 for r in samples),
                  "bandwidth_beside_gb_per_s": [round(b, 2) for b in beside[(name, variant)]],
                  "bound_tokens_per_s": statistics.median(bounds),
                  "bound_by": "memory" if statistics.median(memory) <= arithmetic else "arithmetic",
                  "fraction_of_bound": statistics.median(r / b for r, b in zip(samples, bounds)),
                  "memory_bound_tokens_per_s": statistics.median(memory), "arithmetic_bound_tokens_per_s": arithmetic,
                  "fraction_of_memory_bound": statistics.median(r / b for r, b in zip(samples, memory))}
        if ("bf16", variant) in rates:
            result["speedup_over_bf16"] = statistics.median(r / b for r, b in zip(samples, rates[("bf16", variant)]))
        results.append(result)
    return results


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per format, variant and batch; tokens/s, the GB/s its steps read, bound, share of
    the bound and speed-up over bf16 (same variant) are medians over the cycles, each ratio taken within a cycle."""
    samples = report["bandwidth_samples"]
    lines = [(f"{report['preset']}, {report['machine'].get('cpu', '')}, bandwidth {min(samples):.1f} to "
              f"{max(samples):.1f} GB/s ({len(samples)} samples), {report['kernel']}"),
             (f"{'format':28} {'variant':7} {'batch':>5} {'tokens/s':>9} {'best':>7} {'reads':>6} {'bound':>7} "
              f"{'by':>10} {'of bound':>8} {'of memory':>9} {'vs bf16':>8}")]
    for r in report["results"]:
        best = f"{r['best_tokens_per_s']:7.2f}" if r.get("best_tokens_per_s") else ""
        bound = f"{r['bound_tokens_per_s']:7.2f}" if r["bound_tokens_per_s"] else ""
        share = f"{r['fraction_of_bound']:7.0%}" if r["fraction_of_bound"] else ""
        of_memory = f"{r['fraction_of_memory_bound']:8.0%}" if r.get("fraction_of_memory_bound") else ""
        ratio = f"{r['speedup_over_bf16']:7.2f}x" if r.get("speedup_over_bf16") else ""
        reads = f"{r['read_gb_per_s']:6.1f}" if r.get("read_gb_per_s") else ""  # GB/s its steps read
        lines.append(f"{r['format']:28} {r['variant']:7} {r['batch']:>5} {r['decode_tokens_per_s']:9.2f} {best:>7} "
                     f"{reads:>6} {bound:>7} {r.get('bound_by', ''):>10} {share:>8} {of_memory:>9} {ratio:>8}")
    if "matmul" in report:
        lines.append(f"matrix throughput {report['matmul']['gflop_per_s']:.0f} GFLOP/s ({report['matmul']['dtype']}); "
                     f"bound: the slower of bytes / bandwidth and FLOPs / throughput")
    for name, measured in report.get("loading", {}).items():
        peak = measured["peak_above_base_bytes"] / 1e9
        lines.append(f"loading {name}: {measured['seconds']:.1f} s, peak {peak:.2f} GB "
                     f"above the base for a {measured['model_bytes'] / 1e9:.2f} GB model "
                     f"({measured['peak_over_model']:.2f}x)")
    if report["agreement"]:
        agreement = ", ".join(f"{k} {v:.1%}" for k, v in report["agreement"].items())
        lines.append(f"top-1 agreement with bf16 over {report['positions']} positions: {agreement}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.bench.quantized_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="3b-224", choices=["tiny", "small", "3b-224"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32, help="decoding steps of each format in a cycle")
    parser.add_argument("--cycles", type=int, default=5, help="cycles through every format and variant")
    parser.add_argument("--variants", nargs="+", help="kernel variants to run (default: every one this CPU runs)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--positions", type=int, default=256, help="positions for the top-1 agreement")
    parser.add_argument("--no-torchao", action="store_true", help="skip transformers with torchao's int8")
    parser.add_argument("--no-loading", action="store_true", help="skip the loading measurements")
    parser.add_argument("--decode-cache", default="compiled", choices=["static", "compiled"],
                        help="how this library decodes: eager steps, or the fixed-shape step compiled (default)")
    parser.add_argument("--workdir", help="where to write the random checkpoint (default: the temporary folder)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.cycles < 1 or args.positions < 1 or min(args.batches) < 1:
        parser.error("--new-tokens must be at least 2, --cycles, --positions and --batches at least 1")
    report = run(args.preset, tuple(args.batches), args.new_tokens, args.cycles,
                 tuple(args.variants) if args.variants else None, tuple(args.formats), args.positions,
                 not args.no_torchao, args.workdir, not args.no_loading, args.decode_cache)
    print(format_table(report))
    save_report(report, args.json, "paligemma.bench.quantized_decode", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
