"""Fine-tuning data: a JSONL file of examples, checked whole before training, and a seeded order of batches.

One example a line, image paths relative to the file (the format of big_vision's colab and the Hugging Face guides):

    {"image": "imgs/0001.jpg", "prefix": "caption en", "suffix": "a red circle and a blue square"}
    {"images": ["a.png", "b.png"], "prefix": "answer en do both images hold a circle?", "suffix": "yes"}

`read_examples` refuses the first bad line with `train.jsonl:17: <what is wrong>`, so a run stops before its first
step, not an hour into it. `batch_indices` gives the examples of each step from the seed and the step alone: a
resumed run sees exactly the batches the uninterrupted run would have seen, with no data state to restore.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PaliGemmaError
from ..io.images import load_image
from ..io.processor import PaliGemmaProcessor


class DataError(PaliGemmaError):
    """A bad line in a data file; the message starts with `file:line:`."""


@dataclass(frozen=True)
class FinetuneExample:
    """One line of a JSONL file: its images (in prompt order), the prompt (prefix) and the answer (suffix)."""

    images: tuple[Path, ...]
    prefix: str
    suffix: str
    line: int  # 1-based line number in its file, for messages


def _fail(path: Path, line: int, problem: str) -> DataError:
    return DataError(f"{path.name}:{line}: {problem}")


def _parse_line(path: Path, number: int, text: str) -> FinetuneExample:
    """One JSON object -> an example; every problem raised as `file:line: problem`."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise _fail(path, number, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise _fail(path, number, f"expected a JSON object, got {type(record).__name__}")
    if ("image" in record) == ("images" in record):
        raise _fail(path, number, "give exactly one of 'image' (a path) or 'images' (a list of paths)")
    names = [record["image"]] if "image" in record else record["images"]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise _fail(path, number, "'images' must be a non-empty list of paths" if "images" in record
                    else "'image' must be a path")
    for field in ("prefix", "suffix"):
        if field not in record:
            raise _fail(path, number, f"missing field '{field}'")
        if not isinstance(record[field], str):
            raise _fail(path, number, f"'{field}' must be a string, got {type(record[field]).__name__}")
    if not record["suffix"].strip():
        raise _fail(path, number, "empty 'suffix': there would be no answer to learn")
    images = tuple((path.parent / name) for name in names)
    for image in images:
        if not image.is_file():
            raise _fail(path, number, f"image not found: {image}")
        try:
            load_image(image)
        except PaliGemmaError:
            raise _fail(path, number, f"not a readable image: {image}") from None
    return FinetuneExample(images, record["prefix"], record["suffix"], number)


def example_length(processor: PaliGemmaProcessor, example: FinetuneExample) -> int:
    """Tokens of the whole training sequence: images, `<bos>`, prompt, `\\n`, answer and `<eos>`."""
    prefix = processor.num_image_tokens * len(example.images) + 1 + len(processor.tokenizer.encode(example.prefix + "\n"))
    return prefix + len(processor.tokenizer.encode(example.suffix)) + 1


def read_examples(path: str | Path, processor: PaliGemmaProcessor) -> list[FinetuneExample]:
    """Every example of a JSONL file, each checked (fields, images, length against the model's context).

    Blank lines are skipped. The first bad line raises a `DataError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path.name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    examples = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        example = _parse_line(path, number, text)
        length = example_length(processor, example)
        if length > processor.max_length:
            raise _fail(path, number, f"example is {length} tokens long, longer than the model's context of "
                        f"{processor.max_length}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path.name}: no examples")
    return examples


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of optimiser step `step`: positions step*B .. step*B + B - 1 of a stream of epochs.

    Each epoch is a permutation of range(count) drawn from (seed, epoch), so every example is seen once per epoch
    and the batches of any step follow from the seed alone.
    """
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, within = divmod(position, count)
        indices.append(int(_epoch_order(count, seed, epoch)[within]))
    return indices


_ORDERS: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    key = (count, seed, epoch)
    if key not in _ORDERS:
        if len(_ORDERS) > 4:  # a run needs the current epoch and the next one
            _ORDERS.clear()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDERS[key] = torch.randperm(count, generator=generator)
    return _ORDERS[key]


def collate(processor: PaliGemmaProcessor, examples: Sequence[FinetuneExample], with_suffix: bool = True
            ) -> dict[str, torch.Tensor]:
    """A processor batch of examples: with suffixes (labels on the answer only) for training and the held-out loss,
    without them for generating answers."""
    images = [[load_image(image) for image in example.images] for example in examples]
    prompts = [example.prefix for example in examples]
    suffixes = [example.suffix for example in examples] if with_suffix else None
    return processor(text=prompts, images=images, suffix=suffixes)
