"""Held-out scores for fine-tuning: the loss on the answers, and how often the generated answer is right.

An answer made of `<loc>` boxes is scored by IoU with the true boxes (matched in order, label by label, as the
shapes world's detection score does); any other answer by exact match, ignoring surrounding spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..inference.generation import generate_ids
from ..inference.sampling import GenerationSettings
from ..io.processor import PaliGemmaProcessor
from ..models.paligemma import PaliGemmaForConditionalGeneration
from ..tasks.locations import BINS, box_iou, parse_locations
from .data import FinetuneExample, collate
from .distributed import World, rank_share


def is_box_answer(answer: str) -> bool:
    return "<loc" in answer


def answer_score(reference: str, generated: str) -> float:
    """IoU for `<loc>` answers (mean over objects, 0 for unparsable output), else 1.0 for an exact match."""
    if not is_box_answer(reference):
        return float(generated.strip() == reference.strip())
    truth = parse_locations(reference, BINS, BINS)
    try:
        predicted = parse_locations(generated, BINS, BINS)
    except ValueError:
        return 0.0
    scores = [box_iou(t.box, p.box) if t.label == p.label else 0.0 for t, p in zip(truth, predicted)]
    return sum(scores) / max(len(truth), len(predicted), 1)


@dataclass
class Evaluation:
    """Scores on a held-out set: `score` averages every example (exact match or IoU, as each answer is)."""

    loss: float
    score: float
    exact_match: float | None  # over the text answers, None if there are none
    mean_iou: float | None  # over the box answers, None if there are none
    examples: int
    answers: list[str]

    def summary(self) -> dict[str, float | int | None]:
        values = dict(held_out_loss=self.loss, score=self.score, exact_match=self.exact_match, mean_iou=self.mean_iou)
        return {k: (None if v is None else round(v, 5)) for k, v in values.items()} | {"examples": self.examples}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rank_chunks(examples: Sequence[FinetuneExample], batch_size: int, world: World
                 ) -> list[tuple[list[FinetuneExample], list[int]]]:
    """This rank's batches, each with the positions (in `examples`) of the examples that count: every rank takes its
    share of each run of `batch_size x ranks` examples, so all ranks run the same number of batches; a rank whose
    share of the last run is empty repeats an example there and counts none of it (under FSDP every rank must join
    every forward)."""
    chunks = []
    for start in range(0, len(examples), batch_size * world.size):
        positions = rank_share(range(start, min(start + batch_size * world.size, len(examples))), world.rank,
                               world.size)
        chunks.append(([examples[i] for i in positions], positions) if positions else ([examples[start]], []))
    return chunks


@torch.no_grad()
def evaluate_examples(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    examples: Sequence[FinetuneExample],
    batch_size: int = 16,
    autocast: torch.autocast | None = None,
    world: World = World(),
) -> Evaluation:
    """The held-out loss (mean over answer tokens) and greedy answers scored against the suffixes.

    On several processes each rank scores its share of the examples and every rank returns the whole evaluation.
    """
    was_training = model.training
    model.eval()
    device = model.device
    loss_sum, tokens, texts = 0.0, 0, []
    longest = max(len(processor.tokenizer.encode(e.suffix)) for e in examples) + 1  # the answer and its <eos>
    for chunk, positions in _rank_chunks(examples, batch_size, world):
        counted = len(positions)
        with autocast or torch.autocast(device.type, enabled=False):
            batch = {k: v.to(device) for k, v in collate(processor, chunk).items()}
            count = int((batch["labels"][:, 1:] != -100).sum()) if counted else 0
            loss_sum += float(model(**batch, return_logits=False).loss) * count
            tokens += count
            prompts = {k: v.to(device) for k, v in collate(processor, chunk, with_suffix=False).items()}
            room = world.min(model.config.text_config.max_position_embeddings - prompts["input_ids"].shape[1])
            ids = generate_ids(model, prompts, GenerationSettings(max_new_tokens=min(longest, room)),
                               all_finished=lambda finished: world.all(bool(finished.all())))
        eos = processor.tokenizer.eos_id
        texts += [(position, processor.decode(row[:row.index(eos)] if eos in row else row))
                  for position, row in zip(positions, ids.tolist())]
    model.train(was_training)
    loss_sum, tokens = world.sum(loss_sum), world.sum(tokens)
    texts = [text for _, text in sorted(pair for part in world.gather(texts) for pair in part)]  # examples' order
    scores = [answer_score(example.suffix, text) for example, text in zip(examples, texts)]
    boxes = [is_box_answer(e.suffix) for e in examples]
    return Evaluation(
        loss=loss_sum / max(tokens, 1),
        score=sum(scores) / len(scores),
        exact_match=_mean([s for s, b in zip(scores, boxes) if not b]),
        mean_iou=_mean([s for s, b in zip(scores, boxes) if b]),
        examples=len(examples),
        answers=texts,
    )
