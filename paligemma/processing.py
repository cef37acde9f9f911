"""Turning images and prompts into model inputs, and generated ids back into text.

- Image: any PIL image -> RGB -> bicubic resize to the model's square size -> [0, 1] -> [-1, 1], channels first.
- Text: `<image>` * num_image_tokens + `<bos>` + prompt + `\\n` (the prefix), then for training suffix + `<eos>`.
  Batches are padded on the left, so every sequence ends where generation begins.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import PaliGemmaError

IMAGE_TOKEN = "<image>"
ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]


def load_image(source: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, a file path or a uint8 array [H, W] or [H, W, C]."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        try:
            return Image.fromarray(source)
        except (TypeError, ValueError) as error:
            raise PaliGemmaError(f"cannot make an image of an array of shape {source.shape} and dtype {source.dtype}: {error}") from None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise PaliGemmaError(f"image file not found: {path}")
        try:
            image = Image.open(path)
            image.load()  # decode now, so a truncated file fails here and not later
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise PaliGemmaError(f"{path} is not a readable image: {error}") from None
        return image
    raise PaliGemmaError(f"expected a PIL image, a path or an array, got {type(source).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited onto white; 16-bit and float images are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # floats in [0, 1] or [0, 255]
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        eight_bit = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: ImageInput, size: int) -> torch.Tensor:
    """One image -> pixel values [3, size, size] in [-1, 1], as SigLIP was trained on."""
    rgb = to_rgb(load_image(image))
    if rgb.width == 0 or rgb.height == 0:
        raise PaliGemmaError(f"image has no pixels: {rgb.width}x{rgb.height}")
    resized = rgb.resize((size, size), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3] in [0, 1]
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)  # mean 0.5, std 0.5 -> [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


class GemmaTokenizer:
    """The sentencepiece tokenizer with PaliGemma's special ids.

    pad 0, eos 1, bos 2; `<loc0000>`…`<loc1023>` and `<seg000>`…`<seg127>` are ordinary pieces. The real
    `tokenizer.model` has no `<image>` piece: its id is the first past the vocabulary (the config's
    `image_token_index`). A model that does contain `<image>` works too.
    """

    def __init__(self, model_file: str | Path, image_token_id: int | None = None) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise PaliGemmaError(f"tokenizer file not found: {self.model_file}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.model_file))
        except (OSError, RuntimeError) as error:
            raise PaliGemmaError(f"{self.model_file} is not a sentencepiece model: {error}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self._special_id("<pad>", self.sp.pad_id())
        self.eos_id = self._special_id("<eos>", self.sp.eos_id())
        self.bos_id = self._special_id("<bos>", self.sp.bos_id())
        piece_id = self.sp.piece_to_id(IMAGE_TOKEN)
        in_vocab = self.sp.id_to_piece(piece_id) == IMAGE_TOKEN
        if in_vocab:
            self.image_token_id = piece_id
        else:
            self.image_token_id = image_token_id if image_token_id is not None else self.vocab_size
        self.image_token_in_vocab = in_vocab
        self.special_ids = {self.pad_id, self.eos_id, self.bos_id, self.image_token_id}

    def _special_id(self, piece: str, declared: int) -> int:
        if declared >= 0:
            return declared
        found = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(found) != piece:
            raise PaliGemmaError(f"tokenizer {self.model_file} has no {piece} token")
        return found

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added."""
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids -> text. `<loc>`/`<seg>` tokens are kept; pad, bos, eos and `<image>` are dropped when skipping."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces: list[str] = []
        plain: list[int] = []
        for token in ids:
            if token in self.special_ids:
                if skip_special_tokens:
                    continue
                pieces.append(self.sp.decode(plain))
                plain = []
                pieces.append(IMAGE_TOKEN if token == self.image_token_id else self.sp.id_to_piece(token))
            elif 0 <= token < self.vocab_size:
                plain.append(token)
            else:
                raise PaliGemmaError(f"token id {token} is outside the tokenizer's {self.vocab_size} pieces")
        pieces.append(self.sp.decode(plain))
        return "".join(pieces)


class PaliGemmaProcessor:
    """Images and prompts in, a batch of tensors out (and generated ids back to text)."""

    def __init__(self, tokenizer: GemmaTokenizer, image_size: int, num_image_tokens: int, max_length: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: Any = None) -> "PaliGemmaProcessor":
        """Build from a checkpoint folder: its `tokenizer.model` and, for sizes and ids, its config."""
        from .config import PaliGemmaConfig

        directory = Path(directory)
        if config is None:
            config = PaliGemmaConfig.from_json_file(directory / "config.json")
        tokenizer = GemmaTokenizer(directory / "tokenizer.model", image_token_id=config.image_token_index)
        if tokenizer.image_token_id != config.image_token_index:
            raise PaliGemmaError(
                f"tokenizer's <image> id {tokenizer.image_token_id} differs from the config's "
                f"image_token_index {config.image_token_index}"
            )
        return cls(
            tokenizer,
            image_size=config.vision_config.image_size,
            num_image_tokens=config.num_image_tokens,
            max_length=config.text_config.max_position_embeddings,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Copy `tokenizer.model` into the folder (the model's `save_pretrained` writes the rest)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "tokenizer.model"
        if self.tokenizer.model_file.resolve() != target.resolve():
            shutil.copyfile(self.tokenizer.model_file, target)

    def prefix_ids(self, prompt: str) -> list[int]:
        """`<image>` * N + `<bos>` + prompt + `\\n`, as ids."""
        if prompt.startswith(IMAGE_TOKEN):  # accept the transformers habit of writing one <image> in front
            prompt = prompt[len(IMAGE_TOKEN):]
        if IMAGE_TOKEN in prompt:
            raise PaliGemmaError("a prompt may hold at most one <image> marker, at its start")
        tokenizer = self.tokenizer
        return [tokenizer.image_token_id] * self.num_image_tokens + [tokenizer.bos_id] + tokenizer.encode(prompt + "\n")

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput],
        suffix: str | Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch: input_ids, attention_mask, token_type_ids, pixel_values, and labels when suffixes are given.

        token_type_ids are 0 on the prefix (and padding), 1 on the suffix; labels copy the suffix ids
        (its `<eos>` included) and are -100 elsewhere, so the loss only teaches the answer.
        """
        prompts = [text] if isinstance(text, str) else list(text)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        suffixes = None if suffix is None else ([suffix] if isinstance(suffix, str) else list(suffix))
        if not prompts:
            raise PaliGemmaError("no prompts given")
        if len(image_list) != len(prompts):
            raise PaliGemmaError(f"got {len(image_list)} images for {len(prompts)} prompts; give one image per prompt")
        if suffixes is not None and len(suffixes) != len(prompts):
            raise PaliGemmaError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts")
        for item in prompts + (suffixes or []):
            if not isinstance(item, str):
                raise PaliGemmaError(f"prompts and suffixes must be strings, got {type(item).__name__}")

        sequences, types = [], []
        for i, prompt in enumerate(prompts):
            ids = self.prefix_ids(prompt)
            kinds = [0] * len(ids)
            if suffixes is not None:
                answer = self.tokenizer.encode(suffixes[i]) + [self.tokenizer.eos_id]
                ids, kinds = ids + answer, kinds + [1] * len(answer)
            if len(ids) > self.max_length:
                raise PaliGemmaError(
                    f"prompt {i} is {len(ids)} tokens long, which exceeds the model's context of {self.max_length}"
                )
            sequences.append(ids)
            types.append(kinds)

        length = max(len(ids) for ids in sequences)
        batch = len(sequences)
        input_ids = torch.full((batch, length), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        token_type_ids = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, kinds) in enumerate(zip(sequences, types)):
            start = length - len(ids)  # left padding
            input_ids[row, start:] = torch.tensor(ids)
            attention_mask[row, start:] = 1
            token_type_ids[row, start:] = torch.tensor(kinds)

        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "pixel_values": torch.stack([preprocess_image(image, self.image_size) for image in image_list]),
        }
        if suffixes is not None:
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]
