"""Attention maps for a web page: what the browser explorer (`viewer`) shows, in one compact JSON file.

`export_attention(maps)` turns one `AttentionMaps` into a JSON-ready record; `write_attention_export` writes a list of
them as one file, and `read_attention_export` reads it back, checking it. A record holds:

- the image as the model saw it (PNG), the prompt, the answer;
- each generated token with its text, its id, and the position whose query predicted it;
- per generated token, decoder layer and head, the attention over the image patches, [steps, layers, heads, P];
  the same for the prompt's tokens, [prompt tokens, layers, heads, P];
- SigLIP's attention rollout, [P, P] (row i: what output patch i draws from, through every layer);
- SigLIP's per-layer maps, the mean over heads, [layers, P, P] (row i: where patch i looked in that layer).

**Storage: 8 bits a value.** Every map is a row over the patches, stored as q = round(255 * value / m) where m is the
row's maximum, kept as a float32. The reader recovers q * m / 255, within m / 510 (half a step) of the true value;
a row of zeros stays zeros. Arrays travel as base64 (uint8 values, little-endian float32 maxima) beside their shape.
The mean over heads or layers is not stored: the viewer averages the stored rows.

Size, for one image and prompt with S generated and T prompt tokens, a decoder of L layers and H heads, and SigLIP of
V layers: (S + T) * L * H * P + (V + 1) * P^2 bytes, times 4/3 for base64. tiny-shapes (P = 64): about 40 KB;
PaliGemma 3B at 224 pixels (P = 256), S = 16, T = 10: 0.96 MB for the decoder and 1.8 MB for SigLIP; at 448 pixels
SigLIP's per-layer maps alone are 28 MB, so `siglip_layers=False` leaves them out (the rollout stays).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import PaliGemmaError
from .capture import AttentionMaps

FORMAT = "paligemma-attention/1"


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., P] (non-negative) -> (uint8 [..., P], float32 maxima [...]): q = round(255 * value / row max)."""
    rows = rows.detach().float().cpu()
    if rows.numel() and float(rows.min()) < 0:
        raise PaliGemmaError("attention weights must be non-negative to be stored as 8-bit rows")
    top = rows.amax(-1)  # [...]
    safe = torch.where(top > 0, top, torch.ones_like(top))  # a row of zeros divides by 1 and stays zeros
    values = (rows / safe.unsqueeze(-1) * 255).round().clamp(0, 255).to(torch.uint8)
    return values, top


def dequantize_rows(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_rows`, within half a step (top / 510) of the stored rows: float32 [..., P]."""
    return values.float() * (top.float() / 255).unsqueeze(-1)


def _pack(rows: torch.Tensor) -> dict[str, Any]:
    values, top = quantize_rows(rows)
    return {
        "shape": list(values.shape),
        "values": base64.b64encode(values.contiguous().numpy().tobytes()).decode("ascii"),
        "max": base64.b64encode(top.contiguous().numpy().astype("<f4").tobytes()).decode("ascii"),
    }


def _unpack(packed: dict[str, Any], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored array back to (uint8 values, float32 maxima), checking that the sizes agree with the shape."""
    import numpy as np

    try:
        shape = [int(n) for n in packed["shape"]]
        values = np.frombuffer(base64.b64decode(packed["values"], validate=True), dtype=np.uint8)
        top = np.frombuffer(base64.b64decode(packed["max"], validate=True), dtype="<f4")
    except (KeyError, TypeError, ValueError) as error:
        raise PaliGemmaError(f"{what}: not a stored attention array ({error})") from None
    count = 1
    for n in shape:
        count *= n
    if not shape or values.size != count or top.size * shape[-1] != count:
        raise PaliGemmaError(f"{what}: {values.size} values and {top.size} maxima do not fit the shape {shape}")
    return torch.from_numpy(values.copy()).reshape(shape), torch.from_numpy(top.astype(np.float32)).reshape(shape[:-1])


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def export_attention(maps: AttentionMaps, label: str | None = None, siglip_layers: bool = True) -> dict[str, Any]:
    """One capture as a JSON-ready record for the viewer (see the module docstring for what it holds and its size).

    `label` names the example in the viewer's chooser (default: the prompt); `siglip_layers=False` leaves out
    SigLIP's per-layer maps, which grow as P^2 per layer.
    """
    if not isinstance(maps, AttentionMaps):
        raise PaliGemmaError(f"export_attention takes the AttentionMaps of attention_maps, got {type(maps).__name__}")
    length = int(maps.prompt_positions[-1]) + 1  # the prefix: image tokens, <bos>, the prompt, \n
    # Step t's token is predicted by the query at position length - 1 + t: the \n for step 0, then token t - 1.
    predictors = [maps.prompt_tokens[-1]] + maps.tokens[:-1]
    vision_layers, vision_heads = maps.vision.shape[:2]
    vision: dict[str, Any] = {"layers": vision_layers, "heads": vision_heads, "rollout": _pack(maps.rollout())}
    if siglip_layers:
        vision["patch"] = _pack(maps.vision.mean(1))  # [layers, heads, P, P] -> [layers, P, P]: mean over heads
    layers, heads = maps.generated_rows.shape[1:3]
    return {
        "label": maps.prompt_text if label is None else str(label),
        "prompt": maps.prompt_text,
        "answer": maps.text,
        "image": _png(maps.image),
        "grid": maps.grid,
        "image_tokens": int(maps.image_positions.numel()),
        "tokens": [
            {"text": text, "id": int(token), "predicted_at": length - 1 + step, "predictor": predictor}
            for step, (text, token, predictor) in enumerate(zip(maps.tokens, maps.token_ids, predictors))
        ],
        "prompt_tokens": [
            {"text": text, "position": int(position)}
            for text, position in zip(maps.prompt_tokens, maps.prompt_positions.tolist())
        ],
        "decoder": {
            "layers": layers,
            "heads": heads,
            "generated": _pack(maps.generated),  # [steps, layers, heads, P]
            "prompt": _pack(maps.prompt),  # [prompt tokens, layers, heads, P]
        },
        "vision": vision,
    }


def attention_export(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The file's contents: the format's name and the records, in the viewer's order."""
    if not records:
        raise PaliGemmaError("an attention export needs at least one record")
    return {"format": FORMAT, "examples": list(records)}


def dumps(export: dict[str, Any]) -> str:
    """Compact JSON, the same text for the same contents (the book stores it, and nbval compares the page)."""
    return json.dumps(export, separators=(",", ":"), ensure_ascii=True)


def write_attention_export(path: str | Path, records: list[dict[str, Any]]) -> int:
    """Write the records as one JSON file (through a temporary file and a rename); returns its size in bytes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PaliGemmaError(f"cannot write {path}: the folder {path.parent} does not exist")
    text = dumps(attention_export(records))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="ascii")
    os.replace(partial, path)
    return len(text) + 1


def check_attention_export(export: Any, where: str = "the attention export") -> dict[str, Any]:
    """Check an export's structure and every array's size against its shape; returns it unchanged."""
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        raise PaliGemmaError(f"{where} is not a {FORMAT} file (its 'format' field is missing or different)")
    examples = export.get("examples")
    if not isinstance(examples, list) or not examples:
        raise PaliGemmaError(f"{where} has no examples")
    for index, example in enumerate(examples):
        decode_example(example, f"{where}, example {index}")
    return export


def read_attention_export(path: str | Path) -> dict[str, Any]:
    """Read and check an export written by `write_attention_export` (or `paligemma attention export`)."""
    path = Path(path)
    if not path.is_file():
        raise PaliGemmaError(f"no attention export at {path}")
    try:
        export = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PaliGemmaError(f"{path} is not valid JSON: {error}") from None
    return check_attention_export(export, str(path))


def decode_example(example: dict[str, Any], where: str = "example") -> dict[str, Any]:
    """A record's arrays as tensors: `generated` and `prompt` [.., layers, heads, P], `rollout` [P, P] and, when
    stored, `patch` [layers, P, P], each dequantized (float32); the raw uint8 values and maxima under `raw`."""
    try:
        grid, tokens = int(example["grid"]), example["tokens"]
        arrays = {"generated": example["decoder"]["generated"], "prompt": example["decoder"]["prompt"],
                  "rollout": example["vision"]["rollout"]}
        if "patch" in example["vision"]:
            arrays["patch"] = example["vision"]["patch"]
    except KeyError as error:
        raise PaliGemmaError(f"{where}: missing field {error}") from None
    except (TypeError, ValueError) as error:
        raise PaliGemmaError(f"{where}: not an attention record ({error})") from None
    raw = {name: _unpack(packed, f"{where}, {name}") for name, packed in arrays.items()}
    patches = grid * grid
    for name, (values, _top) in raw.items():
        if values.shape[-1] != patches:
            raise PaliGemmaError(f"{where}, {name}: rows of {values.shape[-1]} values for a {grid}x{grid} grid")
    if raw["generated"][0].shape[0] != len(tokens):
        raise PaliGemmaError(f"{where}: {len(tokens)} tokens but {raw['generated'][0].shape[0]} generated maps")
    decoded: dict[str, Any] = {name: dequantize_rows(*pair) for name, pair in raw.items()}
    decoded["raw"] = raw
    return decoded
