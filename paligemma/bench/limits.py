"""What the machine allows, and how much work the model is: together, the fastest each measurement could be.

- the machine: `measure_bandwidth` (memory read bandwidth, which bounds decoding), `measure_matmul` (matrix-multiply
  throughput, which bounds vision and prefill) and `machine_description`;
- the work, counted from the config: `linear_params` (weights multiplied per token), `vision_flops`,
  `prefill_flops` and `decode_step` (bytes read and operations of one decoding step);
- `decode_rate_bound`: the decode rate a step's bytes and operations allow on this machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..models.config import PaliGemmaConfig
from .harness import best_time, dtype_name

#: Bytes in a gigabyte, as bandwidths and memory are given (10^9, not 2^30).
GB = 1e9


# ---------------------------------------------------------------------------------------------------------------
# The machine's limits


def measure_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Memory read bandwidth, GB/s: the best of several streaming reductions over a buffer far larger than the caches.

    Several kernels are tried (a float32 sum, a bfloat16 sum, a float32 matrix-vector product, and this library's
    own streaming kernel) and the fastest is taken as the bandwidth: the bound is what the machine can do, not
    what one kernel happens to reach.
    """
    from ..kernels.linear import KERNEL, kernel_variant

    results: dict[str, float] = {}
    kernels = [("sum_fp32", torch.float32), ("sum_bf16", torch.bfloat16), ("gemv_fp32", torch.float32)]
    variant = kernel_variant(torch.bfloat16) if device.type == "cpu" else None
    if variant is not None:
        kernels.append(("streaming_kernel_bf16", torch.bfloat16))  # this library's decoding kernel, one row of x
    for name, dtype in kernels:
        elements = size_bytes // torch.empty((), dtype=dtype).element_size()
        buffer = torch.ones(elements, dtype=dtype, device=device)
        if name == "gemv_fp32":
            matrix = buffer.view(-1, 4096)  # [elements / 4096, 4096]
            vector = torch.ones(4096, dtype=dtype, device=device)
            fn = lambda: torch.mv(matrix, vector)  # noqa: E731
        elif name == "streaming_kernel_bf16":
            matrix = buffer.view(-1, 2048)  # [elements / 2048, 2048]
            row = torch.ones(1, 2048, dtype=dtype)
            fn = lambda: KERNEL.get().few_rows_linear(row, matrix, variant=variant)  # noqa: E731
        else:
            fn = lambda: buffer.sum()  # noqa: E731
        seconds = min(best_time(fn, repeats, device))
        results[name] = size_bytes / seconds / GB
        del buffer
    best = max(results, key=results.get)
    return {"gb_per_s": results[best], "kernel": best, "all_gb_per_s": results, "buffer_bytes": size_bytes}


def measure_matmul(device: torch.device, dtypes: list[torch.dtype], repeats: int = 3,
                   shape: tuple[int, int, int] = (512, 2048, 8192)) -> dict[str, Any]:
    """Matrix-multiply throughput, GFLOP/s, per dtype: x [m, k] times weight [n, k] transposed, as a linear layer does.

    The shape is that of a decoder projection over a prefill's worth of tokens.
    """
    m, k, n = shape
    results = {}
    for dtype in dtypes:
        x = torch.randn(m, k, device=device).to(dtype)
        weight = torch.randn(n, k, device=device).to(dtype)
        seconds = min(best_time(lambda: torch.nn.functional.linear(x, weight), repeats, device))
        results[dtype_name(dtype)] = 2 * m * k * n / seconds / 1e9
    best = max(results, key=results.get)
    return {"gflop_per_s": results[best], "dtype": best, "all_gflop_per_s": results, "shape_mkn": list(shape)}


def machine_description(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: processor, cores, threads, instruction-set extensions, versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        info["cpu"] = platform.processor()
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512f", "amx", "avx2", "avx_vnni")))
    info["amx"] = any(f.startswith("amx") for f in flags)
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Work and bounds, counted from the config


def linear_params(config: PaliGemmaConfig) -> dict[str, int]:
    """Weights multiplied per token in each part (biases and norms left out: they add no matrix products)."""
    v, t = config.vision_config, config.text_config
    vision_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    attention_width = t.num_attention_heads * t.head_dim
    kv_width = t.num_key_value_heads * t.head_dim
    text_layer = (2 * t.hidden_size * attention_width + 2 * t.hidden_size * kv_width
                  + 3 * t.hidden_size * t.intermediate_size)
    return {
        "vision": v.num_hidden_layers * vision_layer + v.num_channels * v.patch_size**2 * v.hidden_size,
        "projector": v.hidden_size * config.projection_dim,
        "decoder": t.num_hidden_layers * text_layer,
        "head": t.hidden_size * t.vocab_size,
    }


def vision_flops(config: PaliGemmaConfig, batch: int) -> float:
    """Floating-point operations of the vision tower and projector on `batch` images (two per multiply-add)."""
    v = config.vision_config
    n = v.num_patches
    linear = 2 * n * (linear_params(config)["vision"] + linear_params(config)["projector"])
    attention = v.num_hidden_layers * 4 * n * n * v.hidden_size  # q k^T and weights @ v over all patches
    return batch * (linear + attention)


def prefill_flops(config: PaliGemmaConfig, batch: int, length: int) -> float:
    """Vision, projector, the decoder over `length` tokens (prefix attention in full), logits of the last position."""
    t = config.text_config
    params = linear_params(config)
    attention = t.num_hidden_layers * 4 * length * length * t.num_attention_heads * t.head_dim
    return vision_flops(config, batch) + batch * (2 * length * params["decoder"] + attention + 2 * params["head"])


def decode_step(config: PaliGemmaConfig, batch: int, context: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes read and operations done by one decoding step at `context` cached positions.

    Every decoder weight, the final norm and the output head (the embedding table) are read once per step,
    whatever the batch; each sequence also reads its cached keys and values.
    """
    t = config.text_config
    size = torch.empty((), dtype=dtype).element_size()
    params = linear_params(config)
    norms = (2 * t.num_hidden_layers + 1) * t.hidden_size
    cache = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context * batch
    attention = t.num_hidden_layers * 4 * context * t.num_attention_heads * t.head_dim * batch
    return {
        "bytes": size * (params["decoder"] + params["head"] + norms + cache),
        "flops": batch * 2 * (params["decoder"] + params["head"]) + attention,
    }


def decode_rate_bound(batch: int, step: dict[str, float], gb_per_s: float, gflop_per_s: float) -> float:
    """Tokens/s at most: a step takes at least its bytes over the bandwidth, and its FLOPs over the throughput."""
    return batch / max(step["bytes"] / (gb_per_s * GB), step["flops"] / (gflop_per_s * 1e9))
