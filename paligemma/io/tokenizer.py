"""The Gemma tokenizer: sentencepiece with PaliGemma's special ids, text -> ids -> text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import PaliGemmaError

IMAGE_TOKEN = "<image>"


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

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, strict: bool = False) -> str:
        """Ids -> text. `<loc>`/`<seg>` tokens are kept; pad, bos, eos and `<image>` are dropped when skipping.

        An id with no piece (the embedding tables of PaliGemma 1 have 64 rows past the tokenizer's 257,152 pieces,
        and a model may emit one) decodes to nothing, as transformers' tokenizer does; `strict` raises instead.
        """
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
            elif strict:
                raise PaliGemmaError(f"token id {token} is outside the tokenizer's {self.vocab_size} pieces")
        pieces.append(self.sp.decode(plain))
        return "".join(pieces)
