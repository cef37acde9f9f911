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
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference.decoders import CACHES
from ..io.checkpoint import DTYPES, empty_model
from ..io.layout import TIED_HEAD, to_library_name, write_checkpoint
from ..models.config import PaliGemmaConfig

SCHEMA = 1
GB = 1e9

# Configurations in transformers' keyword layout. 224-pixel images and patch 14 give 256 image tokens in each.
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
PROMPT_TOKENS = 10  # <bos>, a few prompt tokens and "\n" after the 256 image tokens
IMPLEMENTATIONS = ("ours", "transformers")
# Variants of this library for the optimisation record: settings of `paligemma.linear.fast_paths` (see linear.py).
VARIANTS: dict[str, dict[str, bool]] = {
    "ours": {},  # as shipped
    "ours, PyTorch kernels only": {"enabled": False},  # every product through torch.nn.functional.linear
    "ours, + widened bf16 products": {"few_rows": False},  # prefill and vision in fp32 slices, decoding as PyTorch
}
# When "ours" decodes through fixed-shape steps (CUDA graphs on a GPU, or compiled), the record also decodes with
# plain steps (the dynamic cache) to show what those steps bring. On a GPU the CPU fast paths do not apply.
PLAIN_STEPS = "ours, plain steps (dynamic cache)"
GPU_VARIANTS = ("ours",)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of resident memory (VmHWM) at the current size, where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _return_free_memory() -> None:
    """Ask the C allocator (glibc) to hand freed memory back to the system, so that the resident set at the start of a
    measurement is what is in use, not what an earlier run freed: otherwise whoever runs first pays for both."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory while the block runs: the process's resident set (CPU) or allocated memory (CUDA), in bytes.

    Yields a dict filled on exit with `peak` (absolute) and `start` (at entry); `peak - start` is what the block added.
    """
    record: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["start"] = torch.cuda.memory_allocated(device)
        yield record
        record["peak"] = torch.cuda.max_memory_allocated(device)
        return
    gc.collect()
    _return_free_memory()
    reset = _reset_peak_rss()
    record["start"] = _status_bytes("VmRSS") or 0
    yield record
    peak = _status_bytes("VmHWM") or 0
    record["peak"] = peak if reset else max(peak, record["start"])


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds per call, `repeats` samples after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------------------------------------------------------
# The machine's limits


def measure_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Memory read bandwidth, GB/s: the best of several streaming reductions over a buffer far larger than the caches.

    Several kernels are tried (a float32 sum, a bfloat16 sum, a float32 matrix-vector product, and this library's
    own streaming kernel) and the fastest is taken as the bandwidth: the bound is what the machine can do, not
    what one kernel happens to reach.
    """
    from ..kernels.linear import KERNEL

    results: dict[str, float] = {}
    kernels = [("sum_fp32", torch.float32), ("sum_bf16", torch.bfloat16), ("gemv_fp32", torch.float32)]
    if device.type == "cpu" and KERNEL.get() is not None:
        kernels.append(("streaming_kernel_bf16", torch.bfloat16))  # this library's decoding kernel, one row of x
    for name, dtype in kernels:
        elements = size_bytes // torch.empty((), dtype=dtype).element_size()
        buffer = torch.ones(elements, dtype=dtype, device=device)
        if name == "gemv_fp32":
            matrix = buffer.view(-1, 4096)
            vector = torch.ones(4096, dtype=dtype, device=device)
            fn = lambda: torch.mv(matrix, vector)  # noqa: E731
        elif name == "streaming_kernel_bf16":
            matrix = buffer.view(-1, 2048)
            row = torch.ones(1, 2048, dtype=dtype)
            fn = lambda: KERNEL.get().few_rows_linear(row, matrix)  # noqa: E731
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
        results[_dtype_name(dtype)] = 2 * m * k * n / seconds / 1e9
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


def _linear_params(config: PaliGemmaConfig) -> dict[str, int]:
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
    v = config.vision_config
    n = v.num_patches
    linear = 2 * n * (_linear_params(config)["vision"] + _linear_params(config)["projector"])
    attention = v.num_hidden_layers * 4 * n * n * v.hidden_size  # q k^T and weights @ v over all patches
    return batch * (linear + attention)


def prefill_flops(config: PaliGemmaConfig, batch: int, length: int) -> float:
    """Vision, projector, the decoder over `length` tokens (prefix attention in full), logits of the last position."""
    t = config.text_config
    params = _linear_params(config)
    attention = t.num_hidden_layers * 4 * length * length * t.num_attention_heads * t.head_dim
    return vision_flops(config, batch) + batch * (2 * length * params["decoder"] + attention + 2 * params["head"])


def decode_step(config: PaliGemmaConfig, batch: int, context: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes read and operations done by one decoding step at `context` cached positions.

    Every decoder weight, the final norm and the output head (the embedding table) are read once per step,
    whatever the batch; each sequence also reads its cached keys and values.
    """
    t = config.text_config
    size = torch.empty((), dtype=dtype).element_size()
    params = _linear_params(config)
    norms = (2 * t.num_hidden_layers + 1) * t.hidden_size
    cache = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context * batch
    attention = t.num_hidden_layers * 4 * context * t.num_attention_heads * t.head_dim * batch
    return {
        "bytes": size * (params["decoder"] + params["head"] + norms + cache),
        "flops": batch * 2 * (params["decoder"] + params["head"]) + attention,
    }


# ---------------------------------------------------------------------------------------------------------------
# Random weights, written once


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def write_random_checkpoint(config: PaliGemmaConfig, directory: Path, dtype: torch.dtype, seed: int = 0) -> int:
    """config.json and model.safetensors with random weights, one tensor at a time (memory: one tensor).

    Matrices are drawn with standard deviation fan_in^-0.5 and vectors (norms, biases) with 0.3, so activations
    stay of order one through all layers. Returns the bytes of weights written.
    """
    skeleton = {name: t.to(dtype) for name, t in empty_model(config).state_dict().items()}  # meta: shapes only
    generator = torch.Generator().manual_seed(seed)

    def draw(_name: str, tensor: torch.Tensor) -> torch.Tensor:
        scale = 0.3 if tensor.dim() == 1 else math.prod(tensor.shape[1:]) ** -0.5
        return (torch.randn(tensor.shape, generator=generator) * scale).to(dtype)

    config.dtype = str(dtype).removeprefix("torch.")
    tied = [TIED_HEAD] if config.text_config.tie_word_embeddings else []
    return write_checkpoint(directory, config.to_dict(), skeleton, max_shard_size=1 << 62, skip=tied, values=draw)


# ---------------------------------------------------------------------------------------------------------------
# transformers, holding this library's tensors


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory) while buffers are made for real."""
    register = nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def reference_sharing_weights(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' PaliGemmaForConditionalGeneration whose every parameter IS this library's tensor (shared)."""
    import transformers
    from transformers import PaliGemmaConfig as ReferenceConfig
    from transformers import PaliGemmaForConditionalGeneration as Reference

    transformers.logging.set_verbosity_error()
    config = ReferenceConfig(**model.config.to_dict())
    with _parameters_on_meta():
        reference = Reference(config)
    ours = model.state_dict()
    state = {}
    for name, param in reference.state_dict().items():
        library_name = to_library_name(name)
        if library_name in ours:
            state[name] = ours[library_name]
        elif param.is_meta:
            raise RuntimeError(f"no weight of this library for transformers' {name}")
    reference.load_state_dict(state, assign=True, strict=False)
    reference.tie_weights()
    left = [name for name, p in reference.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"transformers parameters left without weights: {left[:5]}")
    reference.set_attn_implementation(attn_implementation)
    return reference.eval()


# ---------------------------------------------------------------------------------------------------------------
# One measurement each


def make_inputs(config: PaliGemmaConfig, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """256 `<image>` tokens, `<bos>`, random prompt tokens, as the processor lays them out; random pixels in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    v = config.vision_config
    text = torch.randint(3, min(config.image_token_index, config.text_config.vocab_size), (batch, PROMPT_TOKENS - 1),
                         generator=generator)
    image = torch.full((batch, config.num_image_tokens), config.image_token_index)
    bos = torch.full((batch, 1), config.text_config.bos_token_id)
    input_ids = torch.cat([image, bos, text], dim=1)
    pixels = torch.rand(batch, v.num_channels, v.image_size, v.image_size, generator=generator) * 2 - 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "token_type_ids": torch.zeros_like(input_ids).to(device),
        "pixel_values": pixels.to(device),
    }


class _StepClock:
    """Timestamps of each new token: our `on_token` callback and transformers' streamer both land here."""

    def __init__(self, device: torch.device, skip_first_put: bool) -> None:
        self.device, self.skip, self.times, self.tokens = device, skip_first_put, [], []

    def __call__(self, token: torch.Tensor) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())
        self.tokens.append(token.reshape(-1).tolist())

    def put(self, value: torch.Tensor) -> None:  # transformers' streamer interface; its first put is the prompt
        if self.skip:
            self.skip = False
            return
        self(value)

    def end(self) -> None:
        pass


@contextlib.contextmanager
def _never_stop(model: torch.nn.Module, reference: torch.nn.Module) -> Iterator[None]:
    """Both libraries decode exactly `max_new_tokens`: `<eos>` is switched off (random weights may produce it)."""
    text_config = model.config.text_config
    eos, ref_eos = text_config.eos_token_id, reference.generation_config.eos_token_id
    text_config.eos_token_id, reference.generation_config.eos_token_id = -1, None
    try:
        yield
    finally:
        text_config.eos_token_id, reference.generation_config.eos_token_id = eos, ref_eos


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """The fast-path settings a variant of this library runs with (transformers runs as it is)."""
    from ..kernels.linear import fast_paths

    with fast_paths(**VARIANTS.get(name, {})):
        yield


def time_generation(implementation: str, model: torch.nn.Module, reference: torch.nn.Module,
                    inputs: dict[str, torch.Tensor], new_tokens: int, device: torch.device,
                    decode_cache: str = "dynamic") -> dict[str, Any]:
    """One `generate` call: seconds to the first token (prefill), decode rate after it, tokens, peak memory.

    "ours" decodes with `decode_cache` (see `generate_ids`); the record's other variants, the plain-steps one among
    them, with the dynamic cache, so that each adds one change to the one before.
    """
    from ..inference.generation import generate_ids
    from ..inference.sampling import GenerationSettings

    clock = _StepClock(device, skip_first_put=implementation == "transformers")
    with peak_memory(device) as memory, _never_stop(model, reference), _variant(implementation), torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        if implementation == "transformers":
            reference.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock,
                               pad_token_id=model.config.text_config.pad_token_id)
        else:
            cache = decode_cache if implementation == "ours" else "dynamic"
            generate_ids(model, inputs, GenerationSettings(new_tokens), cache=cache, on_token=clock)
    times = clock.times
    steps = len(times) - 1
    batch = inputs["input_ids"].shape[0]
    return {
        "prefill_s": times[0] - start,
        "decode_steps_per_s": steps / (times[-1] - times[0]) if steps > 0 else float("nan"),
        "decode_tokens_per_s": batch * steps / (times[-1] - times[0]) if steps > 0 else float("nan"),
        "tokens": [list(row) for row in zip(*clock.tokens)],  # [b][steps]
        "peak_bytes": memory["peak"],
        "extra_bytes": memory["peak"] - memory["start"],
    }


def time_vision(implementation: str, model: torch.nn.Module, reference: torch.nn.Module, pixels: torch.Tensor,
                device: torch.device) -> float:
    """Seconds for the vision tower and projector on a batch of images."""
    with torch.no_grad(), _variant(implementation):
        _sync(device)
        start = time.perf_counter()
        if implementation == "transformers":
            reference.get_image_features(pixel_values=pixels.to(reference.dtype))
        else:
            model.get_image_features(pixels)
        _sync(device)
    return time.perf_counter() - start


# Operator names (as torch.profiler reports them) by kind, for "where the time goes".
CATEGORIES = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::addmv",
                        "aten::mv", "aten::baddbmm", "paligemma::few_rows_linear", "mkldnn", "aten::convolution",
                        "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::softmax", "aten::_softmax"),
    "copies and dtype conversions": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::clone",
                                     "aten::contiguous", "aten::index_put", "aten::masked_scatter", "aten::zeros",
                                     "aten::empty", "aten::fill_", "aten::zero_"),
}
OTHER_OPERATORS = "norms, activations, other operators"
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
    with torch.no_grad(), _variant(implementation):
        out, past = None, None
        for phase in ("prefill", "decode (first step)", "decode"):
            token = None if out is None else out.logits[:, -1].argmax(-1)[:, None]
            if token is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _sync(device)
                start = time.perf_counter()
                out = forward(token, past)
                _sync(device)
                wall = time.perf_counter() - start
            past = getattr(out, "past_key_values", None)
            if phase != "decode (first step)":  # the first step after a prefill may still pay one-time costs
                result[phase] = analyse(prof, wall)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Loading, each in a fresh process


LOAD_PROBE = """
import json, sys, time, torch
implementation, directory = sys.argv[1], sys.argv[2]
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[3]]

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass

if implementation == "ours":
    from paligemma import load_model
    load = lambda: load_model(directory, dtype=dtype)
else:
    import transformers
    from transformers import PaliGemmaForConditionalGeneration
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load = lambda: PaliGemmaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
torch.ones(1000, 1000).to(torch.bfloat16)  # what torch sets up once per process is not loading
base = status("VmRSS")
reset_peak()
start = time.perf_counter()
model = load()
# Touch every page of every weight: a loader that maps the file lazily pays for reading it here, as its first
# forward pass would otherwise.
checksum = sum(float(p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()) for p in model.parameters())
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_rss": status("VmHWM"), "base_rss": base, "rss_anon": status("RssAnon"),
                  "rss_file": status("RssFile"), "weight_bytes": weights, "library": __import__("paligemma").__file__}))
"""


def _read_through(path: Path) -> None:
    """Read a file once so it sits in the page cache: every load then starts from the same warm state."""
    with open(path, "rb") as file:
        while file.read(1 << 26):
            pass


def measure_load(implementation: str, directory: Path, dtype: torch.dtype,
                 library: str | None = None) -> dict[str, Any]:
    """Load time and memory in a fresh process; `library` puts another copy of this package first on the path
    (the library before an optimisation, to measure the optimisation)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    here = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [library, here, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(  # run outside the checkout, or `python -c` would import the package found there first
        [sys.executable, "-c", LOAD_PROBE, implementation, str(Path(directory).resolve()), _dtype_name(dtype)],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"loading with {implementation} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    expected = Path(library or here).resolve() / "paligemma" / "__init__.py"
    if implementation == "ours" and Path(measured["library"]).resolve() != expected:
        raise RuntimeError(f"the load probe imported {measured['library']}, not {expected}")
    return measured


# ---------------------------------------------------------------------------------------------------------------
# The run


def _row(results: list[dict[str, Any]], dtype: str, batch: int | None, metric: str, unit: str, higher_is_better: bool,
         samples: dict[str, list[float]], bound: float | None = None, bound_note: str = "") -> None:
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
    _set_bound(row, bound)
    results.append(row)


def _set_bound(row: dict[str, Any], bound: float | None) -> None:
    """A row's bound, and each implementation's best as a fraction of it (time: bound / time; rate: rate / bound)."""
    row["bound"] = bound
    if bound:
        fraction = (lambda x: x / bound) if row["higher_is_better"] else (lambda x: bound / x)
        row["ours_fraction_of_bound"] = fraction(row["ours"])
        row["transformers_fraction_of_bound"] = fraction(row["transformers"])


def _decode_rate_bound(batch: int, step: dict[str, float], gb_per_s: float, gflop_per_s: float) -> float:
    """Tokens/s at most: a step takes at least its bytes over the bandwidth, and its FLOPs over the throughput."""
    return batch / max(step["bytes"] / (gb_per_s * GB), step["flops"] / (gflop_per_s * 1e9))


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
    if limits:
        log("measuring the machine: memory bandwidth, matrix-multiply throughput")
        report["limits"] = {
            "bandwidth": measure_bandwidth(device, bandwidth_bytes),
            "matmul": measure_matmul(device, [DTYPES[d] for d in dtypes]),
        }
        report["limits"]["bandwidth_samples"] = [{"when": "start", "gb_per_s": report["limits"]["bandwidth"]["gb_per_s"]}]

    def remeasure_bandwidth(when: str) -> None:
        """Memory bandwidth again, right after a group of runs: on a machine whose memory is shared it moves, and
        the decode bound is the best measurement of the whole run (so no slow moment can flatter the ratio)."""
        if not limits:
            return
        again = measure_bandwidth(device, bandwidth_bytes)
        report["limits"]["bandwidth_samples"].append({"when": when, "gb_per_s": again["gb_per_s"]})
        if again["gb_per_s"] > report["limits"]["bandwidth"]["gb_per_s"]:
            report["limits"]["bandwidth"] = again
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
        file_dtype = torch.bfloat16 if "bf16" in dtypes else torch.float32
        report["model"]["file_bytes"] = write_random_checkpoint(config, directory, file_dtype)
        report["model"]["file_dtype"] = _dtype_name(file_dtype)
        for dtype_index, dtype_name in enumerate(dtypes):
            dtype = DTYPES[dtype_name]
            first = dtype_index == 0
            if measure_loading:
                loaders = list(IMPLEMENTATIONS)
                if ablation and first and baseline_library:
                    loaders.append("ours, previous version")
                samples: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
                _read_through(directory / "model.safetensors")
                for repeat in range(load_repeats):
                    for name in loaders[repeat % len(loaders):] + loaders[: repeat % len(loaders)]:
                        log(f"{dtype_name}: loading with {name}")
                        library = baseline_library if name == "ours, previous version" else None
                        samples[name].append(measure_load("transformers" if name == "transformers" else "ours",
                                                          directory, dtype, library))
                weights = samples["ours"][0]["weight_bytes"]
                seconds = {k: [s["seconds"] for s in v] for k, v in samples.items()}
                peaks = {k: [s["peak_rss"] / GB for s in v] for k, v in samples.items()}
                _row(results, dtype_name, None, "load_s", "s", False, {k: seconds[k] for k in IMPLEMENTATIONS})
                _row(results, dtype_name, None, "load_peak_rss_gb", "GB", False, {k: peaks[k] for k in IMPLEMENTATIONS},
                     bound=weights / GB, bound_note="the weights' size")
                results[-1]["detail"] = samples
                if len(loaders) > 2:
                    record_variants(dtype_name, None, "load_s", seconds, False)
                    record_variants(dtype_name, None, "load_peak_rss_gb", peaks, False)
            log(f"{dtype_name}: loading the weights into both libraries")
            model = load_model(directory, device=device, dtype=dtype)
            reference = reference_sharing_weights(model)
            for param in model.parameters():  # bring mapped weights in now, not in whichever run comes first
                param.detach().reshape(-1)[:: max(1, 4096 // param.element_size())].float().sum()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            report["model"][f"weight_bytes_{dtype_name}"] = weight_bytes
            matmul = report.get("limits", {}).get("matmul", {}).get("gflop_per_s")
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
                remeasure_bandwidth(f"after {dtype_name} batch {batch}")
                length = report["prompt_tokens"]
                compute = lambda flops: flops / (matmul * 1e9) if matmul else None  # noqa: E731
                main = lambda samples: {k: samples[k] for k in IMPLEMENTATIONS}  # noqa: E731
                prefill = {k: [r["prefill_s"] for r in v] for k, v in runs.items()}
                decode = {k: [r["decode_tokens_per_s"] for r in v] for k, v in runs.items()}
                _row(results, dtype_name, batch, "vision_s", "s", False, main(vision),
                     bound=compute(vision_flops(config, batch)), bound_note="FLOPs / matmul throughput")
                _row(results, dtype_name, batch, "prefill_s", "s", False, main(prefill),
                     bound=compute(prefill_flops(config, batch, length)), bound_note="FLOPs / matmul throughput")
                step = decode_step(config, batch, length + new_tokens // 2, dtype)
                _row(results, dtype_name, batch, "decode_tokens_per_s", "tokens/s", True, main(decode),
                     bound_note="bytes read per step / bandwidth (or FLOPs / throughput)")  # bound: after all runs
                results[-1]["bytes_per_step"], results[-1]["flops_per_step"] = step["bytes"], step["flops"]
                _row(results, dtype_name, batch, "generate_peak_extra_gb", "GB", False,
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
    if limits:  # every decode bound from the best bandwidth of the whole run (remeasured after each group)
        best, throughput = report["limits"]["bandwidth"]["gb_per_s"], report["limits"]["matmul"]["gflop_per_s"]
        for row in results:
            if row["metric"] == "decode_tokens_per_s":
                step = {"bytes": row["bytes_per_step"], "flops": row["flops_per_step"]}
                _set_bound(row, _decode_rate_bound(row["batch"], step, best, throughput))
    report["seconds"] = time.perf_counter() - start_all
    return report


# ---------------------------------------------------------------------------------------------------------------
# The table

_LABELS = {
    "load_s": "load (s)", "load_peak_rss_gb": "load peak RSS (GB)", "vision_s": "vision (s)",
    "prefill_s": "prefill (s)",
    "decode_tokens_per_s": "decode (tokens/s)", "generate_peak_extra_gb": "generate: memory above weights (GB)",
}


def _number(value: float | None) -> str:
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
        + "".join(f", compiled in {seconds:.0f} s ({when})" for when, seconds in report.get("decode_warmup_s", {}).items()),
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
        lines.append(
            f"limits: memory read bandwidth {bw['gb_per_s']:.1f} GB/s ({bw['kernel']}{spread}); matmul "
            + ", ".join(f"{k} {v:.0f}" for k, v in mm["all_gflop_per_s"].items()) + " GFLOP/s"
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
            f"{row['dtype']:5} {row['batch'] if row['batch'] is not None else '-':>5}  {_LABELS[row['metric']]:38} "
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
        lines.append(f"  {dtype} {'batch ' + str(batch) if batch else ''} {_LABELS[metric]}:")
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
