"""The report's rows, and the report as text.

`add_row` records one measurement (each implementation's best sample, their ratio, each as a fraction of its
bound, `set_bound`); `format_table` prints the whole report, with the optimisation record (`format_ablation`) and
where the time goes (`format_profile`) after the table. `LABELS` names each metric as the table prints it.
"""

from __future__ import annotations

import math
from typing import Any

from .profiling import CATEGORIES, OTHER_OPERATORS, OUTSIDE

#: Each metric as the table names it.
LABELS = {
    "load_s": "load (s)", "load_peak_rss_gb": "load peak RSS (GB)", "vision_s": "vision (s)",
    "prefill_s": "prefill (s)",
    "decode_tokens_per_s": "decode (tokens/s)", "generate_peak_extra_gb": "generate: memory above weights (GB)",
}


# ---------------------------------------------------------------------------------------------------------------
# The rows


def add_row(results: list[dict[str, Any]], dtype: str, batch: int | None, metric: str, unit: str,
            higher_is_better: bool, samples: dict[str, list[float]], bound: float | None = None,
            bound_note: str = "") -> None:
    """Record one measurement: each implementation's best sample, their ratio, each as a fraction of the bound."""
    pick = max if higher_is_better else min
    ours, ref = pick(samples["ours"]), pick(samples["transformers"])
    row: dict[str, Any] = {
        "dtype": dtype, "batch": batch, "metric": metric, "unit": unit, "higher_is_better": higher_is_better,
        "ours": ours, "transformers": ref, "samples": samples,
        # > 1 means this library is better (faster, or less memory)
        "ratio_to_transformers": (ours / ref if higher_is_better else ref / ours) if ours and ref else None,
        "bound_note": bound_note,
    }
    set_bound(row, bound)
    results.append(row)


def set_bound(row: dict[str, Any], bound: float | None) -> None:
    """A row's bound, and each implementation's best as a fraction of it (time: bound / time; rate: rate / bound)."""
    row["bound"] = bound
    if bound:
        fraction = (lambda x: x / bound) if row["higher_is_better"] else (lambda x: bound / x)
        row["ours_fraction_of_bound"] = fraction(row["ours"])
        row["transformers_fraction_of_bound"] = fraction(row["transformers"])


# ---------------------------------------------------------------------------------------------------------------
# The table


def _number(value: float | None) -> str:
    """Three significant digits (at most four decimals); "-" for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    digits = max(0, 3 - int(math.floor(math.log10(abs(value)))) - 1)
    return f"{value:.{min(digits, 4)}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per measurement, with the bound and each library's fraction of it."""
    machine = report["machine"]
    lines = [
        f"PaliGemma benchmark, preset {report['preset']} ({report['model']['parameters'] / 1e9:.3f} B parameters), "
        f"{report['new_tokens']} new tokens, best of {report['repeats']}; this library decodes with "
        f"cache={report.get('decode_cache', 'dynamic')!r}"
        + "".join(f", compiled in {seconds:.0f} s ({when})"
                  for when, seconds in report.get("decode_warmup_s", {}).items()),
        f"machine: {machine.get('cpu', '?')}, {machine['cpu_count']} cores, {machine['threads']} threads, "
        f"AMX {'yes' if machine['amx'] else 'no'}, device {machine['device']}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}",
    ]
    limits = report.get("limits")
    if limits:
        bw, mm = limits["bandwidth"], limits["matmul"]
        samples = limits.get("bandwidth_samples", [])
        spread = f", best of {len(samples)} measurements through the run: " + ", ".join(
            f"{sample['gb_per_s']:.1f}" for sample in samples) if len(samples) > 1 else ""
        matmuls = limits.get("matmul_samples", [])
        matmul_spread = f" ({mm['dtype']}, best of {len(matmuls)}: " + ", ".join(
            f"{sample['gflop_per_s']:.0f}" for sample in matmuls) + ")" if len(matmuls) > 1 else ""
        lines.append(
            f"limits: memory read bandwidth {bw['gb_per_s']:.1f} GB/s ({bw['kernel']}{spread}); matmul "
            + ", ".join(f"{k} {v:.0f}" for k, v in mm["all_gflop_per_s"].items()) + f" GFLOP/s{matmul_spread}"
        )
    header = (f"{'dtype':5} {'batch':>5}  {'measure':38} {'ours':>9} {'transf.':>9} {'ratio':>7} {'bound':>9} "
              f"{'ours/bd':>8} {'tf/bd':>7}")
    lines += ["", header, "-" * len(header)]
    for row in report["results"]:
        ratio = row["ratio_to_transformers"]
        bound_ours, bound_ref = row.get("ours_fraction_of_bound"), row.get("transformers_fraction_of_bound")
        if row["metric"] == "load_peak_rss_gb":  # memory against the weights' size: a multiple, not a fraction
            bound_ours = f"{row['ours'] / row['bound']:.2f}x" if row["bound"] else "-"
            bound_ref = f"{row['transformers'] / row['bound']:.2f}x" if row["bound"] else "-"
        else:
            bound_ours = f"{bound_ours:.0%}" if bound_ours is not None else "-"
            bound_ref = f"{bound_ref:.0%}" if bound_ref is not None else "-"
        lines.append(
            f"{row['dtype']:5} {row['batch'] if row['batch'] is not None else '-':>5}  {LABELS[row['metric']]:38} "
            f"{_number(row['ours']):>9} {_number(row['transformers']):>9} "
            f"{(f'{ratio:.2f}x' if ratio else '-'):>7} {_number(row['bound']):>9} {bound_ours:>8} {bound_ref:>7}"
        )
    lines.append("")
    lines.append("ratio: transformers' time / ours, or our rate / transformers' (above 1: this library is better); "
                 "bound: fastest time or rate the machine allows (memory: the weights' size)")
    for check in report["checks"]:
        verdict = "same" if check["same_greedy_tokens"] else f"differ from token {check['first_difference']}"
        lines.append(f"greedy tokens, {check['dtype']} batch {check['batch']}: {verdict} "
                     f"({check['tokens_compared']} compared)")
    lines += format_ablation(report) + format_profile(report)
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def format_ablation(report: dict[str, Any]) -> list[str]:
    """The optimisation record: each variant's best figure, per measurement."""
    rows = report.get("ablation") or []
    if not rows:
        return []
    lines = ["", "optimisation record (each fast path off and on, same run):"]
    for key in dict.fromkeys((r["dtype"], r["batch"], r["metric"]) for r in rows):
        dtype, batch, metric = key
        lines.append(f"  {dtype} {'batch ' + str(batch) if batch else ''} {LABELS[metric]}:")
        for row in rows:
            if (row["dtype"], row["batch"], row["metric"]) == key:
                lines.append(f"    {row['variant']:34} {_number(row['value']):>9}")
    return lines


def format_profile(report: dict[str, Any]) -> list[str]:
    """Where the time goes: each kind of work's share of the prefill and of one decoding step."""
    profile = report.get("profile")
    if not profile:
        return []
    kinds = list(CATEGORIES) + [OTHER_OPERATORS, OUTSIDE]
    short = ["matmul", "attention", "copies", "other ops", "outside"]
    lines = ["",
             f"where the time goes ({profile['dtype']}, batch {profile['batch']}; torch.profiler, share of wall time):",
             f"  {'phase':8} {'implementation':34} {'wall s':>8} " + " ".join(f"{k:>9}" for k in short)]
    for phase in ("prefill", "decode"):
        for name, run in profile["runs"].items():
            part = run[phase]
            shares = " ".join(f"{part['seconds'].get(k, 0) / part['wall_s']:>9.0%}" for k in kinds)
            lines.append(f"  {phase:8} {name:34} {_number(part['wall_s']):>8} {shares}")
    return lines
