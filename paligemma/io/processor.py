"""The processor: images and prompts in, a batch of tensors out (and generated ids back to text).

Text: `<image>` * num_image_tokens for each of the prompt's images + `<bos>` + prompt + `\\n` (the prefix), then for
training suffix + `<eos>`. A prompt may come with several images (`images=[[im1, im2], [im3]]`, as in transformers):
their tokens follow one another in order, and pixel_values holds every image, row by row.
Batches are padded on the left, so every sequence ends where generation begins.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PaliGemmaError
from .config_file import read_config
from .images import ImageInput, preprocess_image
from .layout import CONFIG_FILE, TOKENIZER_FILE
from .tokenizer import IMAGE_TOKEN, GemmaTokenizer


def images_per_prompt(images: Any, num_prompts: int) -> list[list[ImageInput]]:
    """The images of each prompt: one image, a list of one image per prompt, or a list of lists (several each)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    rows = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
    if len(rows) != num_prompts:
        raise PaliGemmaError(f"got {len(rows)} images for {num_prompts} prompts; give one image, or one list of "
                             "images, per prompt")
    for i, row in enumerate(rows):
        if not row:
            raise PaliGemmaError(f"prompt {i} has an empty list of images; give it at least one image")
    return rows


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
        directory = Path(directory)
        if config is None:
            config = read_config(directory / CONFIG_FILE)
        tokenizer = GemmaTokenizer(directory / TOKENIZER_FILE, image_token_id=config.image_token_index)
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
        target = directory / TOKENIZER_FILE
        if self.tokenizer.model_file.resolve() != target.resolve():
            shutil.copyfile(self.tokenizer.model_file, target)

    def prefix_ids(self, prompt: str, num_images: int = 1) -> list[int]:
        """`<image>` * (N * num_images) + `<bos>` + prompt + `\\n`, as ids: N image tokens for each image, in order."""
        if num_images < 1:
            raise PaliGemmaError(f"a prompt needs at least one image, got {num_images}")
        markers = 0
        while prompt.startswith(IMAGE_TOKEN):  # accept transformers' habit: one <image> in front per image
            prompt, markers = prompt[len(IMAGE_TOKEN):], markers + 1
        if IMAGE_TOKEN in prompt or markers not in (0, num_images):
            raise PaliGemmaError(f"a prompt with {num_images} image(s) may hold <image> markers only at its start, "
                                 f"one per image or none; found {markers + prompt.count(IMAGE_TOKEN)}")
        tokenizer = self.tokenizer
        image_ids = [tokenizer.image_token_id] * (self.num_image_tokens * num_images)
        return image_ids + [tokenizer.bos_id] + tokenizer.encode(prompt + "\n")

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]],
        suffix: str | Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch: input_ids, attention_mask, token_type_ids, pixel_values, and labels when suffixes are given.

        `images` gives each prompt one image, or a list of images (`[[im1, im2], [im3]]`); pixel_values
        [all images, 3, H, W] holds them in order, row by row. token_type_ids are 0 on the prefix (and padding),
        1 on the suffix; labels copy the suffix ids (its `<eos>` included) and are -100 elsewhere.
        """
        prompts = [text] if isinstance(text, str) else list(text)
        suffixes = None if suffix is None else ([suffix] if isinstance(suffix, str) else list(suffix))
        if not prompts:
            raise PaliGemmaError("no prompts given")
        image_rows = images_per_prompt(images, len(prompts))  # pixel_values: [all images, 3, H, W], row by row
        if suffixes is not None and len(suffixes) != len(prompts):
            raise PaliGemmaError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts")
        for item in prompts + (suffixes or []):
            if not isinstance(item, str):
                raise PaliGemmaError(f"prompts and suffixes must be strings, got {type(item).__name__}")

        sequences, types = [], []
        for i, prompt in enumerate(prompts):
            ids = self.prefix_ids(prompt, len(image_rows[i]))
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
            "pixel_values": torch.stack([preprocess_image(im, self.image_size) for row in image_rows for im in row]),
        }
        if suffixes is not None:
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, strict: bool = False) -> str:
        """Generated ids -> text (see `GemmaTokenizer.decode`; `strict` rejects ids without a piece)."""
        return self.tokenizer.decode(ids, skip_special_tokens, strict)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True,
                     strict: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens, strict) for ids in batch]
