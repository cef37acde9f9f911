"""Decoding with int8 and int4 weights against bf16, on one set of random weights, in one run:

    python -m paligemma.bench.quantized_decode --preset 3b-224 --json book/data/quantized_decode.json
    python -m paligemma.bench.quantized_decode --preset small --batches 1 --variants avx2

One random bf16 checkpoint is written, then loaded once per weight format: bf16, int8 (per row) and int4 in groups
of 128 and 32, each quantized as it loads. For each format and each kernel variant this CPU runs (or those named):

- decode tokens/s at each batch (`harness.time_generation`, the formats taking turns, the best of `--repeats`);
- the bound for that format: the bytes one decoding step reads (its stored decoder and head, norms, the KV cache)
  over the best memory bandwidth measured in the run, so each format is held to its own byte count;
- transformers with torchao's int8 weight-only layers on the same weights, in the same run (`--no-torchao` skips);
- the top-1 agreement of next-token predictions with bf16, teacher-forced over `--positions` positions of one
  random token sequence after the image (the same sequence for every format);
- loading each format in a fresh process (`harness.measure_load`): its time, and its peak resident memory above
  the process's base against the loaded model's size (`--no-loading` skips).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..models.config import PaliGemmaConfig
from .command import progress, save_report
from .harness import make_inputs, measure_load, reference_sharing_weights, time_generation, write_random_checkpoint
from .limits import decode_step, linear_params, machine_description, measure_bandwidth

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


def run(preset: str = "3b-224", batches: tuple[int, ...] = (1, 8), new_tokens: int = 32, repeats: int = 2,
        variants: tuple[str, ...] | None = None, formats: tuple[str, ...] = tuple(FORMATS), positions: int = 256,
        torchao: bool = True, workdir: str | None = None, loading: bool = True, log=progress) -> dict[str, Any]:
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
                              "new_tokens": new_tokens, "repeats": repeats, "positions": positions,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [], "agreement": {},
                              "loading": {},
                              "bandwidth_samples": []}
    start = time.perf_counter()

    def bandwidth() -> float:
        measured = measure_bandwidth(device)["gb_per_s"]
        report["bandwidth_samples"].append(round(measured, 2))
        return measured

    bandwidth()
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        directory = Path(scratch) / preset
        log(f"writing random {preset} weights (bf16) to {directory}")
        write_random_checkpoint(config, directory, torch.bfloat16)
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
            inputs = make_inputs(config, batch, device)
            context = config.num_image_tokens + inputs["input_ids"].shape[1] + new_tokens // 2
            runs: dict[tuple[str, str], list[float]] = {}
            names = [(name, variant) for variant in variants for name in models]
            if reference is not None and torchao:
                names.append(("transformers + torchao int8", "-"))
            for repeat in range(repeats):
                order = names[repeat % len(names):] + names[: repeat % len(names)]
                for name, variant in order:
                    log(f"batch {batch}: {name} ({variant}), {new_tokens} tokens")
                    implementation = "transformers" if name.startswith("transformers") else "ours"
                    model = models.get(name, models.get("bf16"))
                    with fast_paths(variant=variant if variant != "-" else variants[0]):
                        measured = time_generation(implementation, model, reference, inputs, new_tokens, device)
                    runs.setdefault((name, variant), []).append(measured["decode_tokens_per_s"])
            best_bandwidth = max(report["bandwidth_samples"] + [bandwidth()])
            for (name, variant), rates in runs.items():
                nbytes = step_bytes(models[name], config, batch, context) if name in models else None
                bound = batch * best_bandwidth * 1e9 / nbytes if nbytes else None
                report["results"].append({
                    "format": name, "variant": variant, "batch": batch, "decode_tokens_per_s": max(rates),
                    "samples": rates, "bytes_per_step": nbytes, "bound_tokens_per_s": bound,
                    "fraction_of_bound": max(rates) / bound if bound else None,
                })
        del models, reference
        gc.collect()
    report["bandwidth_gb_per_s"] = max(report["bandwidth_samples"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per format, variant and batch, with its speed-up over bf16 (same variant)."""
    lines = [f"{report['preset']}, {report['machine'].get('cpu', '')}, bandwidth {report['bandwidth_gb_per_s']:.1f} "
             f"GB/s (best of {len(report['bandwidth_samples'])}), {report['kernel']}",
             f"{'format':28} {'variant':7} {'batch':>5} {'tokens/s':>9} {'bound':>7} {'of bound':>8} {'vs bf16':>8}"]
    base = {(r["variant"], r["batch"]): r["decode_tokens_per_s"] for r in report["results"] if r["format"] == "bf16"}
    for r in report["results"]:
        first_variant = next(iter(base))[0] if base else None
        reference = base.get((r["variant"], r["batch"])) or base.get((first_variant, r["batch"]))
        ratio = f"{r['decode_tokens_per_s'] / reference:7.2f}x" if reference else ""
        bound = f"{r['bound_tokens_per_s']:7.2f}" if r["bound_tokens_per_s"] else ""
        share = f"{r['fraction_of_bound']:7.0%}" if r["fraction_of_bound"] else ""
        lines.append(f"{r['format']:28} {r['variant']:7} {r['batch']:>5} {r['decode_tokens_per_s']:9.2f} {bound:>7} "
                     f"{share:>8} {ratio:>8}")
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
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", help="kernel variants to run (default: every one this CPU runs)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--positions", type=int, default=256, help="positions for the top-1 agreement")
    parser.add_argument("--no-torchao", action="store_true", help="skip transformers with torchao's int8")
    parser.add_argument("--no-loading", action="store_true", help="skip the loading measurements")
    parser.add_argument("--workdir", help="where to write the random checkpoint (default: the temporary folder)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.positions < 1 or min(args.batches) < 1:
        parser.error("--new-tokens must be at least 2, --repeats, --positions and --batches at least 1")
    report = run(args.preset, tuple(args.batches), args.new_tokens, args.repeats,
                 tuple(args.variants) if args.variants else None, tuple(args.formats), args.positions,
                 not args.no_torchao, args.workdir, not args.no_loading)
    print(format_table(report))
    save_report(report, args.json, "paligemma.bench.quantized_decode", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
