"""Fixed-shape decoding steps (`paligemma.graph_decoding`): the same logits as recomputing the whole sequence, on
the CPU where they run eagerly or compiled, and on a GPU (when there is one) the replayed CUDA graph gives what eager
steps give."""

from __future__ import annotations

import pytest
import torch

from helpers import PROMPTS, assert_matches, cached_and_recomputed_logits, fixed_shape_logits, random_image
from paligemma import DynamicCache, PaliGemmaError, load_pretrained
from paligemma.inference.generation import generate_ids
from paligemma.inference.sampling import GenerationSettings
from paligemma.inference.fixed_shape import FixedShapeDecoder

SUFFIXES = ["red circle and blue square", "two small cats and a big dog"]


def padded_prompt_and_suffix(processor):
    prompt = processor(text=PROMPTS, images=[random_image(5), random_image(6)])
    ids = [processor.tokenizer.encode(s) for s in SUFFIXES]
    steps = min(len(i) for i in ids)
    return prompt, torch.tensor([i[:steps] for i in ids])


@pytest.mark.parametrize("name", ["mqa", "gqa"])
def test_fixed_shape_steps_equal_recomputation(request, name):
    directory, _ = request.getfixturevalue(f"{name}_checkpoint")
    model, processor = load_pretrained(directory)
    prompt, new_tokens = padded_prompt_and_suffix(processor)
    assert prompt["attention_mask"].min() == 0, "one prompt is padded"
    _, recomputed = cached_and_recomputed_logits(model, prompt, new_tokens, DynamicCache())
    assert_matches(fixed_shape_logits(model, prompt, new_tokens), recomputed)


def test_compiled_steps_equal_recomputation_and_compile_once(mqa_checkpoint):
    from paligemma.inference import fixed_shape as graph_decoding

    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    prompt, new_tokens = padded_prompt_and_suffix(processor)
    _, recomputed = cached_and_recomputed_logits(model, prompt, new_tokens, DynamicCache())
    torch._dynamo.reset()
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert_matches(fixed_shape_logits(model, prompt, new_tokens, compile=True), recomputed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiles, "the step was compiled"
    # A shorter prompt fits the same rounded buffers: the compiled step is reused, not compiled again.
    shorter = processor(text=["caption en", "caption en"], images=[random_image(5), random_image(6)])
    assert shorter["input_ids"].shape[1] < prompt["input_ids"].shape[1]
    decoder = FixedShapeDecoder(model, 2, shorter["input_ids"].shape[1] + 3, compile=True)
    assert decoder.cache.max_length % graph_decoding.COMPILE_LENGTH_STEP == 0
    decoder.prefill(shorter)
    with torch._dynamo.config.patch(error_on_recompile=True):
        decoder.step(new_tokens[:, 0])


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_compiled_steps_call_the_cpu_kernels_in_one_graph(mqa_checkpoint, quantization):
    """In bf16, plain or quantized, a compiled step is one graph that calls the streaming kernels (no graph break
    falls back to eager Python), and it gives the eager fixed-shape step's logits."""
    from torch.profiler import ProfilerActivity, profile

    from paligemma.kernels import linear

    if not linear.cpu_variants():
        pytest.skip(f"no streaming kernel variant runs here: {linear.kernel_status()}")
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory, dtype=torch.bfloat16, quantization=quantization, group_size=32)
    prompt, new_tokens = padded_prompt_and_suffix(processor)
    eager = fixed_shape_logits(model, prompt, new_tokens)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    batch, steps = new_tokens.shape
    decoder = FixedShapeDecoder(model, batch, prompt["input_ids"].shape[1] + steps, compile=True)
    compiled = [decoder.prefill(prompt)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(steps - 2):
            compiled.append(decoder.step(new_tokens[:, step]).clone())
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            compiled.append(decoder.step(new_tokens[:, steps - 2]).clone())
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    kernel = f"paligemma::{'few_rows' if quantization is None else quantization}_linear"
    assert kernel in {event.key for event in profiled.key_averages()}, f"the compiled step calls {kernel}"
    torch.testing.assert_close(torch.stack(compiled, 1).float(), eager.float(), atol=2e-2, rtol=2e-2)


def test_a_step_that_cannot_compile_says_so(mqa_checkpoint, monkeypatch):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=["caption en"], images=[random_image(7)])

    class InvalidCxxCompiler(RuntimeError):
        pass

    def no_compiler(function, **options):
        def fails():  # as torch.compile reports it: the compiler's error under a wrapper of its own
            try:
                raise InvalidCxxCompiler("No working C++ compiler found in cpp.cxx\nmore detail")
            except InvalidCxxCompiler as error:
                raise RuntimeError("backend='inductor' raised:\n(see above)") from error
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(PaliGemmaError, match=r"could not compile the decoding step \(InvalidCxxCompiler: No working "
                                             r"C\+\+ compiler found in cpp.cxx\); use"):
        generate_ids(model, batch, GenerationSettings(3), cache="compiled")


def test_steps_write_where_they_should(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    prompt, new_tokens = padded_prompt_and_suffix(processor)
    length, steps = prompt["input_ids"].shape[1], 3
    decoder = FixedShapeDecoder(model, 2, length + steps)
    decoder.prefill(prompt)
    for step in range(steps):
        decoder.step(new_tokens[:, step])
    assert decoder.cache.get_seq_length() == length + steps and int(decoder.cache.write_at) == length + steps
    assert torch.equal(decoder.seen, torch.cat([prompt["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1))
    assert all(k.shape[2] == length + steps for k in decoder.cache.keys), "every buffer has the final length"
    with pytest.raises(PaliGemmaError, match="cache is full"):
        decoder.step(new_tokens[:, 0])


def test_graph_cache_refuses_what_it_cannot_do(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=["caption en"], images=[random_image(7)])
    with pytest.raises(PaliGemmaError, match="'graph', 'compiled'"):
        generate_ids(model, batch, GenerationSettings(4), cache="fast")
    with pytest.raises(PaliGemmaError, match="a batch of 1 prompts for a decoder built for 2"):
        FixedShapeDecoder(model, 2, 500).prefill(batch)
    with pytest.raises(PaliGemmaError, match="no room"):
        FixedShapeDecoder(model, 1, batch["input_ids"].shape[1]).prefill(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replays_equal_eager_steps(mqa_checkpoint, compile):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory, device="cuda")
    prompt, new_tokens = padded_prompt_and_suffix(processor)
    prompt = {k: v.cuda() for k, v in prompt.items()}
    logits = {}
    for use_graph in (False, True):  # the graph records the compiled step when compiling
        decoder = FixedShapeDecoder(model, 2, prompt["input_ids"].shape[1] + new_tokens.shape[1],
                                    compile=compile and use_graph)
        decoder.use_graph = use_graph
        decoder.prefill(prompt)
        logits[use_graph] = torch.stack([decoder.step(t.cuda()).clone() for t in new_tokens.T], dim=1)
    assert decoder.graph is not None, "the graph path was taken"
    assert_matches(logits[True], logits[False], atol=1e-5, rtol=1e-5)
