"""What this CPU can do, read from /proc/cpuinfo once, on first use (never at import)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports (empty where /proc/cpuinfo is missing: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def has_amx() -> bool:
    """bf16 matrix tiles (Sapphire Rapids and later): oneDNN's bf16 products then beat fp32 ones."""
    return "amx_bf16" in cpu_flags()

