"""Loading one checkpoint in a fresh process: its time and peak resident memory, printed as one line of JSON.

    python -m paligemma.bench.load_probe ours|transformers DIRECTORY bf16|fp32

`harness.measure_load` runs this in a subprocess, from a working folder outside the checkout, so that the
`paligemma` imported is the first one on its PYTHONPATH. "ours" loads with `paligemma.load_model`, "transformers"
with `PaliGemmaForConditionalGeneration.from_pretrained`. After torch's one-time setup, the resident set is noted
and its high-water mark restarted (Linux); the load follows, then every page of every weight is touched, so that a
loader mapping the file lazily pays for reading it here rather than in its first forward pass. The line printed
holds:

- `seconds`: the load and the touch of every weight;
- `peak_rss`: the high-water mark of the resident set since the restart (bytes, absolute);
- `base_rss`: the resident set before loading; `rss_anon` and `rss_file`: its anonymous and file-backed parts after;
- `weight_bytes`: the bytes of the loaded parameters (and of a quantized model's codes, scales and zeros, when a
  fourth argument, "int8" or "int4-g128", quantizes the weights as they load);
- `library`: the `paligemma/__init__.py` that was imported (the caller checks it is the one it meant).

Run with `-m`, Python imports the packages `paligemma` and `paligemma.bench` before this module, for both
implementations: their modules are resident before `base_rss` is noted, so the peak includes them (a few megabytes
beside torch's). With `--baseline-library` the `paligemma` first on the path is an earlier version of the package,
which may have no such module, so `measure_load` runs this file by its path (`runpy.run_path`) instead. That is why
it imports nothing from this package at the top: only the standard library and torch, then inside `main` the
`paligemma` the path finds first, or transformers.
"""

from __future__ import annotations

import json
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
USAGE = "usage: python -m paligemma.bench.load_probe ours|transformers DIRECTORY bf16|fp32 [int8|int4-gG]"


def status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status, in bytes (None if the field is absent)."""
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def reset_peak() -> None:
    """Restart the kernel's high-water mark of resident memory (VmHWM) at the current size, where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint named by `argv` (implementation, directory, dtype) and print the measurement."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (3, 4) or argv[0] not in ("ours", "transformers") or argv[2] not in DTYPES:
        print(USAGE, file=sys.stderr)
        return 2
    implementation, directory, dtype = argv[0], argv[1], DTYPES[argv[2]]
    # A fourth argument quantizes as the weights load (this library only): "int8", or "int4-g128" with its group.
    scheme, _, group = (argv[3] if len(argv) == 4 else "").partition("-g")
    if scheme and (implementation != "ours" or scheme not in ("int8", "int4")):
        print(USAGE, file=sys.stderr)
        return 2
    if implementation == "ours":
        from paligemma import load_model

        options = {"quantization": scheme, "group_size": int(group or 128)} if scheme else {}
        load = lambda: load_model(directory, dtype=dtype, **options)  # noqa: E731
    else:
        import transformers
        from transformers import PaliGemmaForConditionalGeneration

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        load = lambda: PaliGemmaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()  # noqa: E731
    torch.ones(1000, 1000).to(torch.bfloat16)  # what torch sets up once per process is not loading
    base = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    model = load()
    # Touch every page of every weight: a loader that maps the file lazily pays for reading it here, as its first
    # forward pass would otherwise.
    tensors = list(model.parameters()) + (list(model.buffers()) if scheme else [])  # a quantized model's codes too
    sum(float(p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum())  # [numel], one element a page
        for p in tensors)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in tensors)
    print(json.dumps({"seconds": seconds, "peak_rss": status("VmHWM"), "base_rss": base, "rss_anon": status("RssAnon"),
                      "rss_file": status("RssFile"), "weight_bytes": weights,
                      "library": __import__("paligemma").__file__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
