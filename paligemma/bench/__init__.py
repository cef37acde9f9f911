"""The benchmark: this library against `transformers` on the same weights, and the machine's own limits.

    python -m paligemma.bench                              # PaliGemma-3B-224, random weights, bf16 and fp32
    python -m paligemma.bench --preset small --json out.json
    python -m paligemma.bench --preset tiny --dtype fp32 --batch 1 --new-tokens 8

One run builds random weights once (no download) and writes them to a safetensors file; both libraries
then hold the very same tensors (transformers' modules are given this library's weights, storage shared),
and are measured in turn, alternating, on:

- vision: the SigLIP tower and projector on a batch of images;
- prefill: the first forward pass of generation (vision, projector, the decoder over 256 image tokens and
  a short prompt, filling the KV cache), timed inside each library's own `generate` up to its first token;
- decode: the tokens per second of the same `generate` call after its first token, over `--new-tokens`;
- peak memory: the resident set during generation, above the weights both share;
- loading: time and peak resident memory to load the safetensors file, each in a fresh process.

It also measures what the machine allows, in the same run: memory read bandwidth, which bounds decoding
(every step reads every decoder weight once: bytes per step / bandwidth), and matrix-multiply throughput,
which bounds vision and prefill (their floating-point operations / throughput). Each figure is printed as a
fraction of its bound and as a ratio to transformers; `--json` writes everything, samples included.

The package, one concern a module:

- `limits`: what the machine allows (bandwidth, matrix throughput, its description) and how much work the model is
  (weights, FLOPs and bytes counted from the config);
- `harness`: timing and memory, the random weights both libraries share, the inputs, one measurement each;
- `profiling`: where the time goes, by kind of operator;
- `load_probe`: the program each loading measurement runs in a fresh process;
- `report`: the report's rows and the report as text (`format_table`);
- here: the presets and `run`, which puts it all together into the report.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..inference.decoders import CACHES
from ..io.checkpoint import DTYPES, empty_model
from ..models.config import PaliGemmaConfig
from .harness import (
    GPU_VARIANTS,
    IMPLEMENTATIONS,
    PLAIN_STEPS,
    PROMPT_TOKENS,
    VARIANTS,
    StepClock,
    best_time,
    dtype_name,
    make_inputs,
    measure_load,
    never_stop,
    peak_memory,
    read_through,
    reference_sharing_weights,
    sync,
    time_generation,
    time_vision,
    variant,
    write_random_checkpoint,
)
from .limits import (
    GB,
    decode_rate_bound,
    decode_step,
    linear_params,
    machine_description,
    measure_bandwidth,
    measure_matmul,
    prefill_flops,
    vision_flops,
)
from .profiling import CATEGORIES, OTHER_OPERATORS, OUTSIDE, profile_phases
from .report import LABELS, add_row, format_ablation, format_profile, format_table, set_bound

#: The version of the report's layout, written into every report.
SCHEMA = 1

#: The model sizes the benchmark can run, by name, as configurations in transformers' keyword layout.
#: 224-pixel images and patch 14 give 256 image tokens in each.
#:
#: :meta hide-value:
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # the test models' size: the whole benchmark runs in seconds
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14, vision_use_head=False),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=16, vocab_size=1664),
        image_token_index=1600, projection_dim=64, vocab_size=1664,
    ),
    "small": dict(  # about 30 M parameters: big enough for the matrix products to matter, small enough for a book
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=14, vision_use_head=False),
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=64, vocab_size=16384),
        image_token_index=16000, projection_dim=512, vocab_size=16384,
    ),
    "3b-224": dict(  # google/paligemma-3b-pt-224: SigLIP So400m/14 and Gemma 2B, 2.92 B parameters
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=224, patch_size=14, vision_use_head=False, projection_dim=2048),
        text_config=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=256, vocab_size=257216),
        image_token_index=257152, projection_dim=2048, vocab_size=257216,
    ),
}


def run(preset: str = "3b-224", dtypes: tuple[str, ...] = ("bf16", "fp32"), batches: tuple[int, ...] = (1, 8),
        new_tokens: int = 32, repeats: int = 2, large_batch_repeats: int = 1, load_repeats: int = 2,
        device: str = "cpu", workdir: str | None = None, measure_loading: bool = True, limits: bool = True,
        bandwidth_bytes: int = 1 << 30, profile: bool = False, ablation: bool = False,
        baseline_library: str | None = None, decode_cache: str | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its report (the JSON document; `format_table` prints it).

    `repeats` alternating runs at batch 1, `large_batch_repeats` at larger batches (they take longer).
    `profile`: where the time goes at the first dtype, batch 1. `ablation`: the optimisation record, each fast path
    of this library off and on at the first dtype, batch 1, and (with `baseline_library`, the folder holding an
    earlier version of the package) that version's loading. `decode_cache`: how this library decodes (default
    "graph" on a GPU, fixed-shape steps replayed as CUDA graphs, and "dynamic" on a CPU); "compiled" is compiled in
    a warm-up generation first, whose time the report keeps (`decode_warmup_s`).
    """
    from ..io.checkpoint import load_model
    from ..kernels.linear import kernel_status

    log = log or (lambda message: None)
    device = torch.device(device)
    decode_cache = decode_cache or ("graph" if device.type == "cuda" else "dynamic")
    if decode_cache not in CACHES:
        raise ValueError(f"decode_cache must be one of {CACHES}, got {decode_cache!r}")
    config = PaliGemmaConfig.from_dict(PRESETS[preset])
    report: dict[str, Any] = {
        "schema": SCHEMA, "preset": preset, "new_tokens": new_tokens, "repeats": repeats,
        "large_batch_repeats": large_batch_repeats, "prompt_tokens": config.num_image_tokens + PROMPT_TOKENS,
        "machine": machine_description(device), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [], "checks": [], "ablation": [], "decode_cache": decode_cache, "decode_warmup_s": {},
        "model": {"parameters": sum(p.numel() for p in empty_model(config).parameters())},
    }
    start_all = time.perf_counter()
    report["machine"]["streaming_kernel"] = kernel_status()  # compiles it on first use: before any timing
    # fp32 always: bf16 weights are multiplied in fp32 where that is faster (widened products), so the machine's
    # arithmetic limit for them is the faster of the two (on AVX2, PyTorch's bf16 is emulated)
    matmul_dtypes = list(dict.fromkeys([*(DTYPES[d] for d in dtypes), torch.float32]))
    if limits:
        log("measuring the machine: memory bandwidth, matrix-multiply throughput")
        report["limits"] = {
            "bandwidth": measure_bandwidth(device, bandwidth_bytes),
            "matmul": measure_matmul(device, matmul_dtypes),
        }
        report["limits"]["bandwidth_samples"] = [{"when": "start",
                                                  "gb_per_s": report["limits"]["bandwidth"]["gb_per_s"]}]
        report["limits"]["matmul_samples"] = [{"when": "start",
                                               "gflop_per_s": report["limits"]["matmul"]["gflop_per_s"]}]

    def remeasure_limits(when: str) -> None:
        """Memory bandwidth and matrix throughput again, right after a group of runs: on a shared machine both move,
        and every bound is from the best measurement of the whole run (so no slow moment can flatter a ratio)."""
        if not limits:
            return
        for name, key, measure in (("bandwidth", "gb_per_s", lambda: measure_bandwidth(device, bandwidth_bytes)),
                                   ("matmul", "gflop_per_s", lambda: measure_matmul(device, matmul_dtypes))):
            again = measure()
            report["limits"][f"{name}_samples"].append({"when": when, key: again[key]})
            if again[key] > report["limits"][name][key]:
                report["limits"][name] = again
    results, ablation_rows = report["results"], report["ablation"]

    def record_variants(dtype_name: str, batch: int | None, metric: str, samples: dict[str, list[float]],
                        higher_is_better: bool) -> None:
        pick = max if higher_is_better else min
        for name, values in samples.items():
            ablation_rows.append({"dtype": dtype_name, "batch": batch, "metric": metric, "variant": name,
                                  "value": pick(values), "samples": values, "higher_is_better": higher_is_better})

    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        directory = Path(scratch) / preset
        # bf16 weights on disk: the fp32 runs load the same values, exactly widened.
        log(f"writing random {preset} weights to {directory}")
        file_dtype_name = "bf16" if "bf16" in dtypes else "fp32"
        file_dtype = DTYPES[file_dtype_name]
        report["model"]["file_bytes"] = write_random_checkpoint(config, directory, file_dtype)
        report["model"]["file_dtype"] = file_dtype_name
        for dtype_index, dtype_name in enumerate(dtypes):
            dtype = DTYPES[dtype_name]
            first = dtype_index == 0
            if measure_loading:
                loaders = list(IMPLEMENTATIONS)
                if ablation and first and baseline_library:
                    loaders.append("ours, previous version")
                samples: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
                read_through(directory / "model.safetensors")
                for repeat in range(load_repeats):
                    for name in loaders[repeat % len(loaders):] + loaders[: repeat % len(loaders)]:
                        log(f"{dtype_name}: loading with {name}")
                        library = baseline_library if name == "ours, previous version" else None
                        samples[name].append(measure_load("transformers" if name == "transformers" else "ours",
                                                          directory, dtype, library))
                weights = samples["ours"][0]["weight_bytes"]
                seconds = {k: [s["seconds"] for s in v] for k, v in samples.items()}
                peaks = {k: [s["peak_rss"] / GB for s in v] for k, v in samples.items()}
                add_row(results, dtype_name, None, "load_s", "s", False, {k: seconds[k] for k in IMPLEMENTATIONS})
                add_row(results, dtype_name, None, "load_peak_rss_gb", "GB", False,
                        {k: peaks[k] for k in IMPLEMENTATIONS}, bound=weights / GB, bound_note="the weights' size")
                results[-1]["detail"] = samples
                if len(loaders) > 2:
                    record_variants(dtype_name, None, "load_s", seconds, False)
                    record_variants(dtype_name, None, "load_peak_rss_gb", peaks, False)
            log(f"{dtype_name}: loading the weights into both libraries")
            model = load_model(directory, device=device, dtype=dtype)
            reference = reference_sharing_weights(model)
            for param in model.parameters():  # bring mapped weights in now, not in whichever run comes first
                param.detach().reshape(-1)[:: max(1, 4096 // param.element_size())].float().sum()  # [numel]
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            report["model"][f"weight_bytes_{dtype_name}"] = weight_bytes
            for batch in batches:
                inputs = make_inputs(config, batch, device)
                names = list(IMPLEMENTATIONS)
                if ablation and first and batch == batches[0]:
                    variants = list(GPU_VARIANTS if device.type == "cuda" else VARIANTS)
                    if decode_cache != "dynamic":
                        variants.append(PLAIN_STEPS)
                    names += [name for name in variants if name not in names]
                vision: dict[str, list[float]] = {name: [] for name in names}
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for name in names:  # warm-up: first calls pay for one-time setup
                    time_vision(name, model, reference, inputs["pixel_values"], device)
                if decode_cache == "compiled":  # compiling the step is paid once, here, and recorded
                    log(f"{dtype_name} batch {batch}: compiling the decoding step")
                    start = time.perf_counter()
                    time_generation("ours", model, reference, inputs, 2, device, decode_cache)
                    report["decode_warmup_s"][f"{dtype_name} batch {batch}"] = time.perf_counter() - start
                for repeat in range(repeats if batch == 1 else large_batch_repeats):
                    order = names[repeat % len(names):] + names[: repeat % len(names)]  # who goes first rotates
                    for name in order:
                        vision[name].append(time_vision(name, model, reference, inputs["pixel_values"], device))
                    for name in order:
                        log(f"{dtype_name} batch {batch}: generating {new_tokens} tokens with {name}")
                        runs[name].append(time_generation(name, model, reference, inputs, new_tokens, device,
                                                          decode_cache))
                remeasure_limits(f"after {dtype_name} batch {batch}")
                length = report["prompt_tokens"]
                main = lambda samples: {k: samples[k] for k in IMPLEMENTATIONS}  # noqa: E731
                prefill = {k: [r["prefill_s"] for r in v] for k, v in runs.items()}
                decode = {k: [r["decode_tokens_per_s"] for r in v] for k, v in runs.items()}
                add_row(results, dtype_name, batch, "vision_s", "s", False, main(vision),
                        bound_note="FLOPs / matmul throughput")  # bound: after all runs, as decoding's
                results[-1]["flops"] = vision_flops(config, batch)
                add_row(results, dtype_name, batch, "prefill_s", "s", False, main(prefill),
                        bound_note="FLOPs / matmul throughput")
                results[-1]["flops"] = prefill_flops(config, batch, length)
                step = decode_step(config, batch, length + new_tokens // 2, dtype)
                add_row(results, dtype_name, batch, "decode_tokens_per_s", "tokens/s", True, main(decode),
                        bound_note="bytes read per step / bandwidth (or FLOPs / throughput)")  # bound: after all runs
                results[-1]["bytes_per_step"], results[-1]["flops_per_step"] = step["bytes"], step["flops"]
                add_row(results, dtype_name, batch, "generate_peak_extra_gb", "GB", False,
                        main({k: [r["extra_bytes"] / GB for r in v] for k, v in runs.items()}))
                if len(names) > 2:
                    record_variants(dtype_name, batch, "vision_s", vision, False)
                    record_variants(dtype_name, batch, "prefill_s", prefill, False)
                    record_variants(dtype_name, batch, "decode_tokens_per_s", decode, True)
                ours_tokens, ref_tokens = runs["ours"][0]["tokens"], runs["transformers"][0]["tokens"]
                first_difference = None
                if ours_tokens != ref_tokens:
                    first_difference = min(
                        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                        for x, y in zip(ours_tokens, ref_tokens)
                    )
                report["checks"].append({
                    "dtype": dtype_name, "batch": batch, "same_greedy_tokens": ours_tokens == ref_tokens,
                    "first_difference": first_difference, "tokens_compared": batch * new_tokens,
                    "ours_tokens": ours_tokens, "transformers_tokens": ref_tokens,
                })
                if profile and first and batch == batches[0]:
                    log(f"{dtype_name} batch {batch}: profiling")
                    report["profile"] = {
                        "dtype": dtype_name, "batch": batch,
                        "runs": {name: profile_phases(name, model, reference, inputs, device)
                                 for name in ("ours, PyTorch kernels only", "ours", "transformers")},
                    }
            del model, reference
            gc.collect()
    if limits:  # every bound from the best bandwidth and throughput of the whole run (remeasured after each group)
        best, throughput = report["limits"]["bandwidth"]["gb_per_s"], report["limits"]["matmul"]["gflop_per_s"]
        for row in results:
            if "flops" in row:  # vision and prefill: bound by arithmetic
                set_bound(row, row["flops"] / (throughput * 1e9))
            if row["metric"] == "decode_tokens_per_s":
                step = {"bytes": row["bytes_per_step"], "flops": row["flops_per_step"]}
                set_bound(row, decode_rate_bound(row["batch"], step, best, throughput))
    report["seconds"] = time.perf_counter() - start_all
    return report


__all__ = [
    "CATEGORIES", "GB", "GPU_VARIANTS", "IMPLEMENTATIONS", "LABELS", "OTHER_OPERATORS", "OUTSIDE", "PLAIN_STEPS",
    "PRESETS", "PROMPT_TOKENS", "SCHEMA", "VARIANTS", "StepClock", "add_row", "best_time", "decode_rate_bound",
    "decode_step", "dtype_name", "format_ablation", "format_profile", "format_table", "linear_params",
    "machine_description", "make_inputs", "measure_bandwidth", "measure_load", "measure_matmul", "never_stop",
    "peak_memory", "prefill_flops", "profile_phases", "read_through", "reference_sharing_weights", "run",
    "set_bound", "sync", "time_generation", "time_vision", "variant", "vision_flops", "write_random_checkpoint",
]
