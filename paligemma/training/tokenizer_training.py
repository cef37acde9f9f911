"""Training a sentencepiece tokenizer with the real PaliGemma layout of special tokens.

The real Gemma tokenizer cannot be downloaded here, so the project trains small ones of the same kind:
BPE with byte fallback, no normalisation, no dummy prefix, digits split, `\\n` a piece of its own, and

    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 <mask>   then <image> (optional), <loc0000>…<loc1023>, <seg000>…<seg127>

followed by the learned pieces.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]


def train_tokenizer(
    sentences: Iterable[str], output: str | Path, vocab_size: int = 2000, include_image_token: bool = True
) -> Path:
    """Train on `sentences` and write a sentencepiece model to `output` (e.g. `tokenizer.model`)."""
    import sentencepiece as spm

    symbols = ["<mask>"] + (["<image>"] if include_image_token else []) + LOC_TOKENS + SEG_TOKENS + ["\n"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=symbols,
        hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces: take what it has
        num_threads=1,
        minloglevel=2,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.getvalue())
    return output
