"""Reading a checkpoint's `config.json` into a `PaliGemmaConfig`, with one-line errors for broken files."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PaliGemmaError
from ..models.config import PaliGemmaConfig


def read_config(path: str | Path) -> PaliGemmaConfig:
    """A `config.json` file -> PaliGemmaConfig (sparse files get transformers' defaults; see `PaliGemmaConfig`)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise PaliGemmaError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PaliGemmaError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise PaliGemmaError(f"config file {path} does not hold a JSON object")
    try:
        return PaliGemmaConfig.from_dict(values)
    except TypeError as error:
        raise PaliGemmaError(f"config file {path} has a field of the wrong type: {error}") from None
