"""The attention explorer as HTML: one viewer for the rendered book, a live notebook and a page of your own.

The viewer is plain JavaScript (`viewer.js`, shipped with the package) that draws an export of `export` on a canvas:
no library, no network, so it works from `file://` and offline. `viewer_html` gives the HTML to put in a page
(the data inline, in a JSON script element); `AttentionViewer` shows it as a notebook cell's output, in the
rendered book as in Jupyter; `write_viewer_page` writes a whole page to open in a browser.
"""

from __future__ import annotations

import hashlib
import html
import itertools
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import PaliGemmaError
from .capture import AttentionMaps
from .export import attention_export, check_attention_export, dumps, export_attention, read_attention_export

_mounted = itertools.count()  # viewers shown by this process: each mount point gets its own id


def viewer_script() -> str:
    """The viewer's JavaScript (about 20 KB), as shipped in the package."""
    return resources.files(__package__).joinpath("viewer.js").read_text(encoding="utf-8")


def _as_export(source: Any) -> dict[str, Any]:
    """An export from what a reader has at hand: AttentionMaps, a record, a list of either, an export, or a file."""
    if isinstance(source, AttentionMaps):
        return attention_export([export_attention(source)])
    if isinstance(source, (str, Path)):
        return read_attention_export(source)
    if isinstance(source, list):
        records = [export_attention(item) if isinstance(item, AttentionMaps) else item for item in source]
        return check_attention_export(attention_export(records))
    if isinstance(source, dict) and "examples" in source:
        return check_attention_export(source)
    if isinstance(source, dict) and "decoder" in source:
        return check_attention_export(attention_export([source]))
    raise PaliGemmaError(
        f"the viewer shows AttentionMaps, an attention export or its path, got {type(source).__name__}"
    )


def viewer_html(source: Any) -> str:
    """The viewer's HTML for a page: a mount point, the data as JSON, and the script that mounts it.

    `source` is an `AttentionMaps`, an export record or a list of them, an export, or the path of an export file.
    The same data gives the same HTML in a fresh process (the id is a hash of the data and a count of viewers).
    """
    text = dumps(_as_export(source)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    ident = f"pga-{hashlib.sha1(text.encode('ascii')).hexdigest()[:10]}-{next(_mounted)}"
    return (
        f'<div id="{ident}" class="pga-mount">The attention explorer needs JavaScript to draw.</div>\n'
        f'<script type="application/json" id="{ident}-data">{text}</script>\n'
        f"<script>\n{viewer_script()}\nPaliGemmaAttention.mount({ident!r});\n</script>\n"
    )


class AttentionViewer:
    """The explorer as a notebook output: leave it as a cell's last expression (see `viewer_html` for `source`)."""

    def __init__(self, source: Any) -> None:
        self.export = _as_export(source)
        self.html = viewer_html(self.export)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        labels = ", ".join(repr(example["label"]) for example in self.export["examples"])
        return f"AttentionViewer({len(self.export['examples'])} examples: {labels})"


def write_viewer_page(path: str | Path, source: Any, title: str = "Where does PaliGemma look?") -> int:
    """Write a self-contained HTML page with the viewer (open it from disk, offline); returns its size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PaliGemmaError(f"cannot write {path}: the folder {path.parent} does not exist")
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f'</head>\n<body style="max-width: 60em; margin: 2em auto; font-family: system-ui, sans-serif">\n'
        f"<h1>{html.escape(title)}</h1>\n{viewer_html(source)}</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return len(page.encode("utf-8"))
