"""Where the time goes: torch.profiler's self time of each operator, gathered into a few kinds of work.

`profile_phases` profiles one prefill and one decoding step of "ours", a variant of it or "transformers";
`CATEGORIES` names the operators of each kind (matrix products, attention, copies), and whatever is left is
`OTHER_OPERATORS`, or `OUTSIDE` any operator (Python and dispatch).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from .harness import sync, variant

#: Operator names (as torch.profiler reports them, or parts of them) by kind, for "where the time goes".
CATEGORIES = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::addmv",
                        "aten::mv", "aten::baddbmm", "paligemma::few_rows_linear", "mkldnn", "aten::convolution",
                        "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::softmax", "aten::_softmax"),
    "copies and dtype conversions": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::clone",
                                     "aten::contiguous", "aten::index_put", "aten::masked_scatter", "aten::zeros",
                                     "aten::empty", "aten::fill_", "aten::zero_"),
}
#: The kind of every operator no pattern of `CATEGORIES` matches.
OTHER_OPERATORS = "norms, activations, other operators"
#: The wall time spent outside any operator (Python and dispatch).
OUTSIDE = "outside operators (Python, dispatch)"


def _category(name: str) -> str:
    for category, patterns in CATEGORIES.items():
        if any(name.startswith(p) or p in name for p in patterns):
            return category
    return OTHER_OPERATORS


def profile_phases(implementation: str, model: torch.nn.Module, reference: torch.nn.Module,
                   inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Where the time goes: torch.profiler's self time by kind of operator, in the prefill and in one decoding step.

    The wall time not spent inside any operator is Python and dispatch overhead. Profiling slows the run a little,
    so these are shares, not timings to compare with the table.
    """
    from torch.profiler import ProfilerActivity, profile

    from ..inference.kv_cache import DynamicCache

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's backend would log its start and stop on stderr

    def analyse(prof: Any, wall: float) -> dict[str, Any]:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        shares: dict[str, float] = {}
        for event in events:
            category = _category(event.key)
            shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total / 1e6
        shares[OUTSIDE] = max(0.0, wall - sum(shares.values()))
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        return {"wall_s": wall, "seconds": shares,
                "top": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top]}

    batch = inputs["input_ids"].shape[0]
    cache = DynamicCache()
    mask = inputs["attention_mask"]

    def forward(token: torch.Tensor | None, past: Any) -> Any:
        if token is None:  # the prefill
            if implementation == "transformers":
                return reference(**inputs, use_cache=True, logits_to_keep=1)
            return model(**inputs, kv_cache=cache, logits_to_keep=1)
        if implementation == "transformers":
            return reference(input_ids=token, attention_mask=mask, past_key_values=past, logits_to_keep=1)
        return model(token, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True), kv_cache=cache)

    result = {}
    with torch.no_grad(), variant(implementation):
        out, past = None, None
        for phase in ("prefill", "decode (first step)", "decode"):
            token = None if out is None else out.logits[:, -1].argmax(-1)[:, None]
            if token is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sync(device)
                start = time.perf_counter()
                out = forward(token, past)
                sync(device)
                wall = time.perf_counter() - start
            past = getattr(out, "past_key_values", None)
            if phase != "decode (first step)":  # the first step after a prefill may still pay one-time costs
                result[phase] = analyse(prof, wall)
    return result
