"""What the fine-tuning studies' command lines share: timestamped progress on stderr, and the report as JSON."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..io.layout import write_json


def progress(message: str) -> None:
    """One line of progress, `[HH:MM:SS] message`, on stderr (stdout keeps the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_report(report: dict, path: str | None, program: str, argv: list[str] | None) -> None:
    """Record the command that made `report` in it, and write it to `path` (if given) atomically."""
    report["command"] = f"python -m {program} " + " ".join(sys.argv[1:] if argv is None else argv)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(path), report)
