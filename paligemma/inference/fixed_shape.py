"""Decoding steps of one fixed shape: a CUDA graph replayed on a GPU, run eagerly or compiled on a CPU.

On a GPU a decoding step of the 3B model reads its 6 GB of weights in a few milliseconds, but it is several hundred
small kernels, and each costs microseconds of Python and PyTorch on the CPU to launch: the launching, not the GPU,
sets the pace. A CUDA graph records every kernel of one step once; each later step replays them all with a single
launch. A replay can change nothing but the contents of tensors — not a shape, not an address — so this step:

- keeps every layer's keys and values in buffers of the final length (`WholeBufferCache`), writes the new position
  at an index held in a tensor (`write_at`, passed to the cache as the position to write), and attends over the
  whole buffer, positions not yet written masked out;
- computes its mask, position and rotary angles inside the step, from two tensors it owns: which positions hold
  real tokens (`seen`), and where the next token goes (`write_at`);
- reads its token from, and leaves its logits in, tensors of its own.

On a CPU the same step runs eagerly (launching costs little there): that is how the tests prove, on any machine,
that it computes what the ordinary step computes.

Because its shapes never change, the step can also be compiled once (`compile=True`, `torch.compile`): the dozens
of small operators between two weight products (norms, rotary angles, the gated activation, residual sums) become
a few fused loops, and the Python that called them one by one is gone. On a CPU that is what remains of a step
after the products, which read the weights at the memory's speed. The buffers' length is then rounded up to a
multiple of `COMPILE_LENGTH_STEP`, so that prompts of other lengths reuse the compiled step instead of compiling
another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import PaliGemmaError
from ..models.attention import additive_mask
from ..models.config import FULL, SLIDING
from ..models.paligemma import PaliGemmaForConditionalGeneration
from .kv_cache import DynamicCache, KVCache

COMPILE_LENGTH_STEP = 256  # compiled steps: buffer lengths are multiples of this, one compiled step serves them all


class WholeBufferCache(KVCache):
    """Keys and values of every layer in buffers of `max_length` positions, for the fixed-shape step.

    `update` writes the new position at `cache_position` (a tensor: the step's `write_at`) and returns the whole
    buffers; the step's mask hides the positions not written yet (a sliding layer's mask also hides those beyond its
    window, so every layer keeps the full length here). The prompt is copied in by `fill`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)  # where the next step's position goes
        self.length = 0  # positions written so far (kept on the host: reading write_at would wait for the GPU)
        self.max_length = max_length

    def fill(self, prompt: DynamicCache, length: int) -> None:
        """Copy a prompt's cache in: `length` positions, of which a sliding layer may hold only the most recent."""
        for keys, values, held_keys, held_values in zip(self.keys, self.values, prompt.keys, prompt.values):
            held = held_keys.shape[2]  # the last `held` positions of the prompt
            keys[:, :, length - held:length] = held_keys
            values[:, :, length - held:length] = held_values
        self.length = length
        self.write_at.fill_(length)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor,
               sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, cache_position, key)  # key, value [b, kv, 1, d] at position write_at
        values.index_copy_(2, cache_position, value)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length


class FixedShapeDecoder:
    """Prefill once, then decoding steps of one shape for a batch: `logits = decoder.step(tokens)`.

    On CUDA the first step is captured as a CUDA graph and every step replays it; elsewhere each step runs eagerly.
    With `compile`, the step is compiled by `torch.compile` on its first call (and, on CUDA, the compiled step is
    what the graph records). `max_length` bounds prompt plus new tokens. The returned logits [b, vocab] are the
    step's own output tensor, overwritten by the next step: choose from them (or copy them) before stepping again.
    """

    def __init__(self, model: PaliGemmaForConditionalGeneration, batch_size: int, max_length: int,
                 compile: bool = False) -> None:
        text = model.config.text_config
        self.model = model
        self.device = model.device
        if compile:  # one compiled step for every length up to the next multiple (within the model's context)
            rounded = -(-max_length // COMPILE_LENGTH_STEP) * COMPILE_LENGTH_STEP
            max_length = max(max_length, min(rounded, text.max_position_embeddings))
        self._run_step: Callable[[], torch.Tensor] = _compiled(self._step) if compile else self._step
        self.cache = WholeBufferCache(text.num_hidden_layers, batch_size, text.num_key_value_heads, text.head_dim,
                                      max_length, model.dtype, self.device)
        self.seen = torch.zeros(batch_size, max_length, dtype=torch.long, device=self.device)  # 1: a real token
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.key_positions = torch.arange(max_length, device=self.device)  # [L]
        self.window = text.sliding_layers_window  # Gemma 2's sliding layers; None in Gemma
        self.use_graph = self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the prompt (a processor batch) through the model, filling the cache; last logits [b, vocab]."""
        input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        size, length = input_ids.shape
        if size != self.seen.shape[0]:
            raise PaliGemmaError(f"a batch of {size} prompts for a decoder built for {self.seen.shape[0]}")
        if length >= self.cache.max_length:
            raise PaliGemmaError(f"a prompt of {length} tokens leaves no room in a cache of {self.cache.max_length}")
        prompt_cache = DynamicCache()
        token_type_ids = batch.get("token_type_ids")
        out = self.model(input_ids, pixel_values=batch["pixel_values"].to(self.device), attention_mask=attention_mask,
                         token_type_ids=None if token_type_ids is None else token_type_ids.to(self.device),
                         kv_cache=prompt_cache, logits_to_keep=1)
        self.cache.fill(prompt_cache, length)
        self.seen[:, :length] = attention_mask
        return out.logits[:, -1]

    def _masks(self, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive masks [b, 1, 1, L] of the new token: real tokens so far (the window's, for sliding layers)."""
        allowed = self.seen.bool()[:, None, None, :]  # positions after write_at are not seen yet
        full = additive_mask(allowed, dtype)
        if self.window is None:
            return full
        recent = self.key_positions > self.cache.write_at - self.window  # [L]: within the window of the new token
        return {FULL: full, SLIDING: additive_mask(allowed & recent, dtype)}

    def _step(self) -> torch.Tensor:
        """One decoding step on the tensors this decoder owns (what the CUDA graph records)."""
        language_model = self.model.language_model
        self.seen.index_fill_(1, self.cache.write_at, 1)
        position = self.seen.sum(-1, keepdim=True)  # [b, 1]: real tokens so far, the new one included
        embeds = language_model.embed(self.token)  # [b, 1, d]
        hidden = language_model(embeds, position, self._masks(embeds.dtype), self.cache, self.cache.write_at)
        return language_model.logits(hidden)[:, -1]  # [b, vocab]

    def _capture(self) -> None:
        """Record one step as a CUDA graph, after a run outside it (which writes exactly what the real step will)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run_step()  # first calls set up cuBLAS handles and workspaces (and compile), not to be captured
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run_step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [b] at the next position; the logits [b, vocab] that follow them."""
        if self.cache.length >= self.cache.max_length:
            raise PaliGemmaError(f"the fixed-shape cache is full: all {self.cache.max_length} positions are used")
        self.token.copy_(tokens.reshape(-1, 1))
        if not self.use_graph:
            logits = self._run_step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.cache.write_at += 1
        self.cache.length += 1
        return logits


def _compiled(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`step` compiled by `torch.compile` on its first call, for fixed shapes; a failure to compile is one clear error.

    Inductor's fused loops round bf16 intermediates where eager PyTorch does (`emulate_precision_casts`), so a
    compiled step computes what the eager one does, up to the order of some fp32 sums. The streaming kernel of
    `paligemma.kernels` tells the compiler its result's shape when it is built, so compiled steps call it too.
    """
    compiled = torch.compile(step, dynamic=False, options={"emulate_precision_casts": True})
    compiled_once = False

    def run() -> torch.Tensor:
        nonlocal compiled_once
        if compiled_once:
            return compiled()
        try:
            logits = compiled()
        except Exception as error:  # no C++ compiler, an unsupported platform, ...: say so in one line
            cause = error
            while cause.__cause__ is not None:  # the compiler's own error, under torch.compile's wrappers
                cause = cause.__cause__
            detail = str(cause).strip().splitlines()
            reason = f"{type(cause).__name__}: {detail[0]}" if detail else type(cause).__name__
            raise PaliGemmaError(f"cache='compiled': torch.compile could not compile the decoding step ({reason}); "
                                 "use cache='graph' or 'dynamic'") from error
        compiled_once = True
        return logits

    return run
