"""From `<seg>` tokens to masks: the VQ-VAE decoder PaliGemma's segmentation answers are written for.

A `segment cat` answer is a box and 16 codes, "<loc…>×4 <seg…>×16 cat". Each code (0–127) picks a vector of
a learned codebook; the 16 vectors, laid out as a 4 x 4 grid, are decoded by a small convolutional network
into a 64 x 64 mask, which is resized to the box and pasted into the image. The codebook and decoder come
from a VQ-VAE trained on Open Images masks, released as `vae-oid.npz`::

    codes [b, 16] -> codebook rows [b, 16, 512] -> grid [b, 512, 4, 4]
      -> 1x1 conv, ReLU -> [b, 128, 4, 4]                       decoder.0
      -> 2 residual blocks (3x3, ReLU, 3x3, ReLU, 1x1, + x)     decoder.2, decoder.3
      -> 4 transposed convs (4x4, stride 2), each with ReLU:    decoder.4, .6, .8, .10
         [b, 128, 8, 8] -> [b, 64, 16, 16] -> [b, 32, 32, 32] -> [b, 16, 64, 64]
      -> 1x1 conv -> [b, 1, 64, 64], values in about [-1, 1]    decoder.12

The module names follow the keys of `vae-oid.npz` (PyTorch layouts: conv [out, in, kh, kw], transposed
conv [in, out, kh, kw]; the codebook is `_vq_vae._embedding`), so loading is name for name. A mask pixel
belongs to the object where the decoded value is above 0.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import PaliGemmaError
from .locations import SEG_CODES, SEG_TOKENS, DetectedObject

CODEBOOK_KEY = "_vq_vae._embedding"
MASK_SIZE = 64  # decoded masks are 64 x 64
GRID = 4  # the 16 codes form a 4 x 4 grid


class ResidualBlock(nn.Module):
    """x + (3x3 conv, ReLU, 3x3 conv, ReLU, 1x1 conv)(x), at a constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskDecoder(nn.Module):
    """16 codes -> one 64 x 64 mask: codebook lookup, then upsampling convolutions."""

    def __init__(self, codebook_size: int = SEG_CODES, embedding_dim: int = 512, channels: int = 128) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(codebook_size, embedding_dim))
        widths = [channels, channels, channels // 2, channels // 4, channels // 8]  # 128, 128, 64, 32, 16
        layers: list[nn.Module] = [nn.Conv2d(embedding_dim, channels, kernel_size=1), nn.ReLU()]
        layers += [ResidualBlock(channels), ResidualBlock(channels)]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            # kernel 4, stride 2, padding 1: each one doubles the side, 4 -> 8 -> 16 -> 32 -> 64
            layers += [nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=1))  # one channel: the mask
        self.decoder = nn.Sequential(*layers)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [b, 16] -> the codebook vectors as an image [b, embedding_dim, 4, 4] (codes fill rows first)."""
        codes = torch.as_tensor(codes, device=self.codebook.device)
        if codes.dim() != 2 or codes.shape[1] != SEG_TOKENS:
            raise PaliGemmaError(f"segmentation codes must have shape [batch, {SEG_TOKENS}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook.shape[0]):
            raise PaliGemmaError(f"segmentation codes must lie in 0-{self.codebook.shape[0] - 1}")
        vectors = self.codebook[codes.long()]  # [b, 16, e]
        return vectors.view(codes.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)  # [b, 4, 4, e] -> [b, e, 4, 4]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [b, 16] -> masks [b, 64, 64], about -1 (background) to 1 (object)."""
        return self.decoder(self.embed(codes))[:, 0]

    def stages(self, codes: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Every intermediate result, named by its npz key, for looking inside (see the chapter)."""
        x = self.embed(codes)
        out = [("codebook vectors", x)]
        for index, layer in enumerate(self.decoder):
            x = layer(x)
            if not isinstance(layer, nn.ReLU):
                out.append((f"decoder.{index}", x))
        return out


def decoder_state_to_npz(decoder: MaskDecoder) -> dict[str, np.ndarray]:
    """The decoder's weights under the key names and layouts of `vae-oid.npz`, as float32 arrays."""
    arrays = {CODEBOOK_KEY: decoder.codebook}
    arrays.update({f"decoder.{name}": t for name, t in decoder.decoder.state_dict().items()})
    return {name: t.detach().to("cpu", torch.float32).numpy() for name, t in arrays.items()}


def save_mask_decoder(decoder: MaskDecoder, path: str | Path) -> None:
    """Write the decoder as an .npz file of `vae-oid.npz`'s layout."""
    np.savez(Path(path), **decoder_state_to_npz(decoder))


def load_mask_decoder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MaskDecoder:
    """A MaskDecoder from an .npz file in the layout of PaliGemma's `vae-oid.npz`.

    The codebook's shape sets the number of codes and the vector size. Keys of other parts of the VQ-VAE
    (its encoder) are ignored; a missing decoder key, an unknown one or a wrong shape is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PaliGemmaError(f"mask decoder file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise PaliGemmaError(f"{path} is not a readable .npz file: {error}") from None
    if CODEBOOK_KEY not in arrays:
        raise PaliGemmaError(f"{path} has no codebook ({CODEBOOK_KEY}); is it PaliGemma's vae-oid.npz?")
    codebook = arrays[CODEBOOK_KEY]
    if codebook.ndim != 2:
        raise PaliGemmaError(f"{CODEBOOK_KEY} in {path} must be [codes, dim], got shape {list(codebook.shape)}")
    with torch.device("meta"):
        decoder = MaskDecoder(codebook_size=codebook.shape[0], embedding_dim=codebook.shape[1])
    expected = {f"decoder.{n}": tuple(t.shape) for n, t in decoder.decoder.state_dict().items()}
    expected[CODEBOOK_KEY] = tuple(codebook.shape)
    present = {n: a for n, a in arrays.items() if n == CODEBOOK_KEY or n.startswith("decoder.")}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = [f"{n} {list(a.shape)} (expected {list(expected[n])})" for n, a in sorted(present.items())
             if n in expected and tuple(a.shape) != expected[n]]
    for problem, names in (("missing from", missing), ("unexpected in", unexpected), ("of the wrong shape in", wrong)):
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise PaliGemmaError(f"mask decoder tensors {problem} {path}: {shown}")
    state = {n[len("decoder."):]: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device, dtype)
             for n, a in present.items() if n != CODEBOOK_KEY}
    decoder.decoder.load_state_dict(state, assign=True, strict=True)
    decoder.codebook = nn.Parameter(torch.from_numpy(np.asarray(codebook, dtype=np.float32)).to(device, dtype))
    return decoder.eval()


def paste_mask(
    mask64: torch.Tensor | np.ndarray,
    box: tuple[float, float, float, float],
    width: int,
    height: int,
    threshold: float = 0.0,
) -> np.ndarray:
    """A decoded 64 x 64 mask -> a boolean mask [height, width] of the whole image, True inside the object.

    The mask is resized bilinearly to the box (corners rounded to pixels, clipped to the image) and
    thresholded, as PaliGemma's segmentation evaluator does; outside the box nothing belongs to the object.
    """
    from PIL import Image

    values = mask64.detach().float().cpu().numpy() if isinstance(mask64, torch.Tensor) else np.asarray(mask64)
    if values.shape != (MASK_SIZE, MASK_SIZE):
        raise PaliGemmaError(f"a decoded mask is {MASK_SIZE} x {MASK_SIZE}, got shape {list(values.shape)}")
    full = np.zeros((height, width), dtype=bool)
    x_min, y_min, x_max, y_max = (int(round(v)) for v in box)
    x_min, x_max = sorted((min(max(x_min, 0), width), min(max(x_max, 0), width)))
    y_min, y_max = sorted((min(max(y_min, 0), height), min(max(y_max, 0), height)))
    if x_max <= x_min or y_max <= y_min:
        return full  # an empty box holds no pixels
    as_image = Image.fromarray(values.astype(np.float32))  # a float32 image, mode "F"
    resized = as_image.resize((x_max - x_min, y_max - y_min), resample=Image.Resampling.BILINEAR)
    full[y_min:y_max, x_min:x_max] = np.asarray(resized) > threshold
    return full


@torch.no_grad()
def decode_objects(
    decoder: MaskDecoder, objects: list[DetectedObject], width: int, height: int, threshold: float = 0.0
) -> list[np.ndarray | None]:
    """One full-image boolean mask per object (None for an object without segmentation codes)."""
    with_codes = [obj for obj in objects if obj.seg_codes is not None]
    masks64 = decoder(torch.tensor([obj.seg_codes for obj in with_codes])) if with_codes else []
    decoded = iter(masks64)
    return [paste_mask(next(decoded), obj.box, width, height, threshold) if obj.seg_codes is not None else None
            for obj in objects]

