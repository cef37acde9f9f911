"""Attention maps: where PaliGemma looks while it reads an image and writes an answer.

`attention_maps` runs generation once with forward hooks on every attention product (`record_attention`), and
returns the weights as an `AttentionMaps`:

- SigLIP's self-attention, patch to patch: `vision` [layers, heads, patches, patches];
- the decoder's attention from each generated token's query to every position: `generated_rows`
  [steps, layers, heads, positions], and to the image alone, `generated` [steps, layers, heads, patches];
- the same for the text of the prompt (`<bos>`, the prompt, `\\n`): `prompt_rows` and `prompt`.

Which query belongs to which token: step t's token is the one *predicted* at step t. Step 0's token is
predicted by the last prompt position (the `\\n`), step t > 0's by the position of the token of step t - 1,
fed back in. So `generated[t]` is where the model looked when it chose token t: "where it looked when it
said *red*".

Capture changes nothing in the model: a hook on each `DotProductAttention` sees its queries, keys and mask and
recomputes the weights as the eager path does, while the model itself runs as it is (the fused kernel included).
Generation carries no parameter for it, and its tokens are those `generate` gives (the tests hold it to that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from ..errors import PaliGemmaError
from ..inference.generation import generate_ids
from ..inference.sampling import GenerationSettings
from ..io.images import ImageInput
from ..io.processor import PaliGemmaProcessor
from ..models.attention import DotProductAttention
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .rollout import Reduction, aggregate, as_grid, grid_side, rollout, rollout_rows


@contextlib.contextmanager
def record_attention(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every attention product run in `module` appends its weights [b, heads, q, k] to the list.

    The weights are those the eager path computes (softmax in float32, in the queries' dtype), whichever path the
    layer itself takes; the layers append in the order they run, so one forward pass adds one entry per layer.
    """
    records: list[torch.Tensor] = []

    def keep(attend: DotProductAttention, args: tuple, _output: torch.Tensor) -> None:
        query, key, _value, *rest = args
        records.append(attend.weights(query, key, rest[0] if rest else None))

    handles = [sub.register_forward_hook(keep) for sub in module.modules() if isinstance(sub, DotProductAttention)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AttentionMaps:
    """Attention weights of one generation run, on the CPU in float32 (see the module docstring for the layout).

    Positions count the whole sequence, image tokens first: `image_positions` says where the patches sit, and
    `prompt_positions` where the prompt's text tokens sit. A position that a query may not see has weight 0.
    """

    prompt_text: str
    token_ids: list[int]  # generated, `<eos>` included when reached
    tokens: list[str]  # the text piece of each generated token
    prompt_tokens: list[str]  # the text pieces of the prompt: <bos>, the prompt, \n
    vision: torch.Tensor  # [layers, heads, patches, patches]
    generated_rows: torch.Tensor  # [steps, layers, heads, positions]: query of the position that predicted token t
    prompt_rows: torch.Tensor  # [prompt tokens, layers, heads, prefix length]
    image_positions: torch.Tensor  # [patches], positions of the image tokens in the sequence
    prompt_positions: torch.Tensor  # [prompt tokens]
    image: Image.Image  # the image as the model saw it: square, at the model's resolution
    text: str = ""  # the decoded answer

    @property
    def generated(self) -> torch.Tensor:
        """Each generated token's attention to the image, [steps, layers, heads, patches] (the predicting query's)."""
        return self.generated_rows[..., self.image_positions]

    @property
    def prompt(self) -> torch.Tensor:
        """Each prompt token's attention to the image, [prompt tokens, layers, heads, patches]."""
        return self.prompt_rows[..., self.image_positions]

    @property
    def grid(self) -> int:
        """Patches per side (8 for tiny-shapes; 16, 32 or 64 for PaliGemma at 224, 448 or 896 pixels)."""
        return grid_side(self.vision.shape[-1])

    @property
    def patch_size(self) -> float:
        """Pixels per patch side, in the image as the model saw it."""
        return self.image.width / self.grid

    def _index(self, index: int, count: int, what: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise PaliGemmaError(f"{what} {index!r} is out of range: there are {count} (0 to {count - 1})")
        return index % count

    def token_map(self, step: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: where the query that chose generated token `step` looked in the image."""
        step = self._index(step, len(self.token_ids), "generated token")
        return as_grid(aggregate(self.generated[step], layers, heads))

    def prompt_map(self, index: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: where prompt token `index` (0 is `<bos>`) looked in the image."""
        index = self._index(index, len(self.prompt_tokens), "prompt token")
        return as_grid(aggregate(self.prompt[index], layers, heads))

    def _patch(self, patch: int | tuple[int, int]) -> int:
        """A patch given as an index (row by row from the top left) or as (row, column) -> its index."""
        if isinstance(patch, tuple) and len(patch) == 2:
            row = self._index(patch[0], self.grid, "patch row")
            patch = row * self.grid + self._index(patch[1], self.grid, "patch column")
        return self._index(patch, self.grid**2, "patch")

    def patch_map(
        self, patch: int | tuple[int, int], layers: Reduction = -1, heads: Reduction = "mean"
    ) -> torch.Tensor:
        """[grid, grid]: where one SigLIP patch (an index, or (row, column)) looked, in the chosen layers."""
        return as_grid(aggregate(self.vision[:, :, self._patch(patch)], layers, heads))

    def rollout(self, heads: Reduction = "mean", residual: float = 0.5) -> torch.Tensor:
        """Attention rollout through SigLIP, [patches, patches] (see `rollout`)."""
        return rollout(self.vision, heads, residual)

    def rollout_map(self, patch: int | tuple[int, int] | None = None, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: which input patches an output patch draws from, through all layers; with no patch,
        the mean over output patches (what the image tokens handed to Gemma are made of, on average)."""
        patches = self.grid**2
        if patch is None:
            row = torch.full((patches,), 1 / patches)
        else:
            row = torch.zeros(patches)
            row[self._patch(patch)] = 1.0
        return as_grid(rollout_rows(self.vision, row, heads))

    def token_map_through_vision(self, step: int, layers: Reduction = -1, heads: Reduction = "mean") -> torch.Tensor:
        """[grid, grid]: the token's attention to image tokens, carried back to input patches by the rollout."""
        step = self._index(step, len(self.token_ids), "generated token")
        on_tokens = aggregate(self.generated[step], layers, heads)  # [P] over image tokens
        return as_grid(rollout_rows(self.vision, on_tokens))

    def image_share(self) -> torch.Tensor:
        """[steps, layers, heads]: the part of each generated token's attention that went to the image."""
        return self.generated.sum(-1)


def _image_as_seen(pixel_values: torch.Tensor) -> Image.Image:
    """Pixels [3, S, S] in [-1, 1] back to the RGB image SigLIP saw (the resized input)."""
    array = ((pixel_values.float().cpu() * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())  # [3, S, S] -> [S, S, 3]


def _piece(processor: PaliGemmaProcessor, token: int) -> str:
    """A token as text for a label: special tokens by name, `<loc…>` kept, sentencepiece's '▁' as a space."""
    tokenizer = processor.tokenizer
    if token == tokenizer.image_token_id:
        return "<image>"
    if not 0 <= token < tokenizer.vocab_size:
        return f"<id {token}>"  # a row of the embedding table with no piece
    return tokenizer.sp.id_to_piece(token).replace("\u2581", " ")


def _rows(weights: torch.Tensor, positions: int) -> torch.Tensor:
    """weights [heads, q, keys] -> [q, heads, positions]: the keys are the most recent `keys` positions (a
    sliding-window cache may have forgotten older ones, which this query could not see anyway): left-pad with 0."""
    heads, queries, keys = weights.shape
    rows = weights.new_zeros((heads, queries, positions))
    rows[..., positions - keys:] = weights
    return rows.permute(1, 0, 2)  # [heads, q, positions] -> [q, heads, positions]


@torch.no_grad()
def attention_maps(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    image: ImageInput,
    prompt: str,
    max_new_tokens: int = 16,
    **sampling: object,
) -> AttentionMaps:
    """Answer `prompt` about `image` as `generate` does, keeping every attention weight along the way.

    `sampling` takes the other fields of `GenerationSettings` (do_sample, temperature, top_k, top_p, seed), and the
    tokens are those `generate` gives. Memory: SigLIP's weights are layers x heads x patches^2 floats, kept in
    float32 on the CPU: 65 k for tiny-shapes, 28 M (113 MB) for PaliGemma at 224 pixels, 453 M (1.8 GB) at 448,
    7.2 G (29 GB) at 896, where capture needs a large machine.
    """
    try:
        settings = GenerationSettings(max_new_tokens, **sampling)
    except TypeError as error:
        raise PaliGemmaError(f"attention_maps: {error}") from None
    if max_new_tokens < 1:
        raise PaliGemmaError("max_new_tokens must be at least 1: attention maps need a generated token")
    if not isinstance(prompt, str):
        raise PaliGemmaError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(image, (list, tuple)):
        raise PaliGemmaError("attention_maps takes one image and one prompt (not a list, nor several images)")
    batch = processor(text=prompt, images=image)
    input_ids = batch["input_ids"][0]
    length = len(input_ids)
    image_positions = (input_ids == model.config.image_token_index).nonzero().squeeze(-1)  # [P]
    prompt_positions = torch.arange(int(image_positions.max()) + 1, length)  # the text after the image
    with record_attention(model.vision_tower) as vision, record_attention(model.language_model) as text:
        tokens = generate_ids(model, batch, settings)[0].tolist()
    layers = model.config.text_config.num_hidden_layers
    passes = [text[i:i + layers] for i in range(0, len(text), layers)]  # the prompt's pass, then one per token
    # The prefix's rows for the prompt text: [layers] of [heads, q, keys] -> [T, layers, heads, prefix]
    prompt_rows = torch.stack([_rows(w[0][:, prompt_positions.to(w.device)], length) for w in passes[0]], 1)
    steps = [torch.stack([_rows(w[0][:, -1:], length + t)[0] for w in weights]) for t, weights in enumerate(passes)]
    positions = length + len(tokens) - 1  # step t's query sees length + t positions; the last sees them all
    generated_rows = torch.stack([
        torch.nn.functional.pad(rows.float().cpu(), (0, positions - rows.shape[-1])) for rows in steps
    ])  # [steps, layers, heads, positions]
    return AttentionMaps(
        prompt_text=prompt,
        token_ids=tokens,
        tokens=[_piece(processor, t) for t in tokens],
        prompt_tokens=[_piece(processor, int(t)) for t in input_ids[prompt_positions].tolist()],
        vision=torch.stack([w[0] for w in vision]).float().cpu(),  # [layers, heads, P, P]
        generated_rows=generated_rows,
        prompt_rows=prompt_rows.float().cpu(),
        image_positions=image_positions,
        prompt_positions=prompt_positions,
        image=_image_as_seen(batch["pixel_values"][0]),  # [images, 3, S, S]: the first image, here the only one
        text=processor.decode(tokens),
    )
