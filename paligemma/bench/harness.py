"""The measurements themselves: timing and memory, the inputs, the weights both libraries share, one run each.

- `best_time` and `peak_memory`: seconds per call, and the peak memory of a block (resident set on a CPU,
  allocated memory on CUDA);
- `write_random_checkpoint` (`scratch_checkpoint`: in a temporary folder), `reference_sharing_weights`,
  `make_inputs`: random weights written once, transformers' model holding this library's very tensors, and inputs
  laid out as the processor lays them out;
- `time_generation` and `time_vision`: one `generate` call (prefill, then the decode rate) and one vision pass, for
  "ours", a variant of it (`VARIANTS`) or "transformers";
- `measure_load`: loading, each time in a fresh process (`paligemma.bench.load_probe`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.checkpoint import empty_model
from ..io.layout import TIED_HEAD, to_library_name, write_checkpoint
from ..io.memory import return_free_memory
from ..models.config import PaliGemmaConfig

#: Text tokens after the image tokens (`<bos>`, a few prompt tokens and "\n").
PROMPT_TOKENS = 10
#: The two libraries every measurement compares.
IMPLEMENTATIONS = ("ours", "transformers")
#: Variants of this library for the optimisation record, by name, as settings of
#: `paligemma.kernels.linear.fast_paths`.
VARIANTS: dict[str, dict[str, bool]] = {
    "ours": {},  # as shipped
    "ours, PyTorch kernels only": {"enabled": False},  # every product through torch.nn.functional.linear
    "ours, + widened bf16 products": {"few_rows": False},  # prefill and vision in fp32 slices, decoding as PyTorch
}
#: When "ours" decodes through fixed-shape steps (CUDA graphs on a GPU, or compiled), the record also decodes
#: with plain steps (the dynamic cache) under this name, to show what those steps bring.
PLAIN_STEPS = "ours, plain steps (dynamic cache)"
#: The variants recorded on a GPU, where the CPU fast paths do not apply.
GPU_VARIANTS = ("ours",)
CHECKOUT = Path(__file__).resolve().parent.parent.parent  # the folder holding this `paligemma` package
LOAD_PROBE_FILE = Path(__file__).resolve().with_name("load_probe.py")


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read afterwards includes it; nothing on a CPU."""
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
    return_free_memory()  # the resident set at the start is what is in use, not what an earlier run freed
    reset = _reset_peak_rss()
    record["start"] = _status_bytes("VmRSS") or 0
    yield record
    peak = _status_bytes("VmHWM") or 0
    record["peak"] = peak if reset else max(peak, record["start"])


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds per call, `repeats` samples after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Random weights, written once


def dtype_name(dtype: torch.dtype) -> str:
    """The short name the command line and the report use for a dtype: "fp32", "bf16" or "fp16"."""
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


@contextlib.contextmanager
def scratch_checkpoint(config: PaliGemmaConfig, name: str, dtype: torch.dtype, workdir: str | None = None,
                       log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Random weights of `config` (`write_random_checkpoint`) in a temporary folder `name`, removed afterwards."""
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        directory = Path(scratch) / name
        if log is not None:
            log(f"writing random {name} weights ({str(dtype).removeprefix('torch.')}) to {directory}")
        write_random_checkpoint(config, directory, dtype)
        yield directory


def read_through(path: Path) -> None:
    """Read a file once so it sits in the page cache: every load then starts from the same warm state."""
    with open(path, "rb") as file:
        while file.read(1 << 26):
            pass


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


class StepClock:
    """Timestamps of each new token: our `on_token` callback and transformers' streamer both land here."""

    def __init__(self, device: torch.device, skip_first_put: bool) -> None:
        self.device, self.skip, self.times, self.tokens = device, skip_first_put, [], []

    def __call__(self, token: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())
        self.tokens.append(token.reshape(-1).tolist())  # [b] or [b, 1] -> [b]

    def put(self, value: torch.Tensor) -> None:  # transformers' streamer interface; its first put is the prompt
        if self.skip:
            self.skip = False
            return
        self(value)

    def end(self) -> None:
        pass


@contextlib.contextmanager
def never_stop(model: torch.nn.Module, reference: torch.nn.Module) -> Iterator[None]:
    """Both libraries decode exactly `max_new_tokens`: `<eos>` is switched off (random weights may produce it)."""
    text_config = model.config.text_config
    eos, ref_eos = text_config.eos_token_id, reference.generation_config.eos_token_id
    text_config.eos_token_id, reference.generation_config.eos_token_id = -1, None
    try:
        yield
    finally:
        text_config.eos_token_id, reference.generation_config.eos_token_id = eos, ref_eos


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
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

    clock = StepClock(device, skip_first_put=implementation == "transformers")
    with peak_memory(device) as memory, never_stop(model, reference), variant(implementation), torch.no_grad():
        sync(device)
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
    with torch.no_grad(), variant(implementation):
        sync(device)
        start = time.perf_counter()
        if implementation == "transformers":
            reference.get_image_features(pixel_values=pixels.to(reference.dtype))
        else:
            model.get_image_features(pixels)
        sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Loading, each in a fresh process


def measure_load(implementation: str, directory: Path, dtype: torch.dtype,
                 library: str | None = None, quantization: str | None = None) -> dict[str, Any]:
    """Load time and memory in a fresh process (`paligemma.bench.load_probe`); `library` puts another copy of this
    package first on the path (the library before an optimisation, to measure the optimisation); `quantization`
    ("int8", "int4-g128", ...) quantizes this library's weights as they load.

    The probe runs outside the checkout, or the package found in the working folder would be imported first. As
    `python -m paligemma.bench.load_probe` when it measures this package or transformers; with `library`, whose
    package may be older than the probe, this checkout's probe file is run by its path (`runpy.run_path`, which adds
    nothing to the path) while `library` comes first on the path, so that its `import paligemma` is the earlier one.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    here = str(CHECKOUT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [library, here, os.environ.get("PYTHONPATH")]))
    if library is None:
        probe = ["-m", "paligemma.bench.load_probe"]
    else:  # the earlier package may have no load_probe module: this one's, by path; sys.argv[1:] are then its own
        probe = ["-c", "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')", str(LOAD_PROBE_FILE)]
    result = subprocess.run(
        [sys.executable, *probe, implementation, str(Path(directory).resolve()), dtype_name(dtype),
         *([quantization] if quantization else [])],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"loading with {implementation} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    expected = Path(library or here).resolve() / "paligemma" / "__init__.py"
    if implementation == "ours" and Path(measured["library"]).resolve() != expected:
        raise RuntimeError(f"the load probe imported {measured['library']}, not {expected}")
    return measured
