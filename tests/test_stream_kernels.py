"""The streaming kernels' variants without PyTorch, as C++ (tests/csrc/check_kernels.cpp against a float64 reference):
natively, every variant this CPU runs; for ARM64 from an x86 machine, NEON cross-compiled and run under qemu, and
the PyTorch extension's source compiled for ARM64 too. CI installs the cross-compiler and qemu (.ci/run)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from paligemma.bench import kernel_throughput
from paligemma.kernels.cpu import cpu_flags, is_arm64, is_x86_64

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "csrc" / "check_kernels.cpp"
EXTENSION = ROOT / "paligemma" / "kernels" / "csrc" / "linear_cpu.cpp"


def _compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} must be installed in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def _run_check(command: list[str]) -> set[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.split(":")[0] for line in result.stdout.splitlines()}


def test_each_variant_this_cpu_runs(tmp_path):
    """Every variant the CPU has instructions for runs and sums like float64 (within fp32 rounding)."""
    compiler = _compiler("g++")
    binary = tmp_path / "check_kernels"
    subprocess.run([compiler, "-O2", "-std=c++17", "-o", str(binary), str(CHECK)], check=True, capture_output=True,
                   timeout=300)
    ran = _run_check([str(binary)])
    flags = cpu_flags()
    expected = set()
    formats = {"fp32", "int8", "int4", "int4 fp32 scales"}  # and bf16 where the variant has it
    if is_x86_64():
        if {"avx2", "fma"} <= flags:
            expected |= {f"avx2 {kind}" for kind in formats | {"bf16"}}
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            expected |= {f"avx512 {kind}" for kind in formats}
            if "avx512_bf16" in flags:
                expected |= {"avx512 bf16", "avx512 int4 bf16 x", "avx512 int8 bf16 x"}
    elif is_arm64():
        expected = {f"neon {kind}" for kind in formats | {"bf16"}}
    assert ran == expected


@pytest.mark.skipif(is_arm64(), reason="on ARM64 the native test runs the NEON variant itself")
def test_neon_variant_under_emulation(tmp_path):
    """NEON, cross-compiled for ARM64 and run under qemu: the variant every ARM64 CPU (Apple Silicon, Graviton) takes."""
    compiler = _compiler("aarch64-linux-gnu-g++")
    emulator = _compiler("qemu-aarch64")
    binary = tmp_path / "check_kernels_arm64"
    subprocess.run([compiler, "-O2", "-std=c++17", "-static", "-o", str(binary), str(CHECK)], check=True,
                   capture_output=True, timeout=300)
    ran = _run_check([emulator, str(binary)])
    assert ran == {f"neon {kind}" for kind in ("bf16", "fp32", "int8", "int4", "int4 fp32 scales")}


@pytest.mark.skipif(is_arm64(), reason="on ARM64 the extension is built natively by the other tests")
def test_extension_compiles_for_arm64():
    """The PyTorch operator's source, NEON branch included, compiles for ARM64 (syntax and types; no ARM64 torch to
    link against here)."""
    compiler = _compiler("aarch64-linux-gnu-g++")
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", *includes, str(EXTENSION)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_kernel_throughput_times_every_kernel_this_cpu_runs():
    """`python -m paligemma.bench.kernel_throughput`: each kernel the CPU has instructions for, at 1 to 8 rows of x."""
    _compiler("g++")
    report = kernel_throughput.run(samples=1, calls=1)
    timed = {(r["variant"], r["format"]) for r in report["results"]}
    flags = cpu_flags()
    expected = set()
    if is_x86_64() and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        expected |= {("avx512", "fp32"), ("avx512", "int8 (fp32 x)")}
        if "avx512_bf16" in flags:
            expected |= {("avx512", name) for name in ("bf16", "int8 (bf16 x)", "int4-g128", "int4-g32")}
    if is_x86_64() and {"avx2", "fma"} <= flags:
        expected |= {("avx2", name) for name in ("bf16", "int8", "int4-g128", "int4-g32")}
    if is_arm64():
        expected = {("neon", name) for name in ("bf16", "int8", "int4-g128", "int4-g32")}
    assert timed == expected
    for variant, name in timed:
        rows = sorted(r["rows"] for r in report["results"] if (r["variant"], r["format"]) == (variant, name))
        assert rows == list(range(1, 9))
    for r in report["results"]:
        assert math.isfinite(r["weights_per_s"]) and r["weights_per_s"] > 0
        assert r["multiply_adds_per_s"] == pytest.approx(r["rows"] * r["weights_per_s"], rel=1e-3)
    assert len(kernel_throughput.format_table(report).splitlines()) == 2 + len(expected)
