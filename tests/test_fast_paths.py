"""The fast paths of `paligemma.linear` and the checkpoint reader, each against a plain computation and the model
against transformers: the streaming kernel for decoding, widened fp32 products for bf16 prefill, mapped and
chunk-converted weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import ARCHITECTURE_VARIANTS
from paligemma import PaliGemmaError, bench, load_model
from paligemma.kernels import linear
from paligemma.models.config import PaliGemmaConfig
from paligemma.inference.generation import generate_ids
from paligemma.inference.sampling import GenerationSettings

needs_kernel = pytest.mark.skipif(linear.KERNEL.get() is None, reason=f"streaming kernel: {linear.kernel_status()}")


def runs(variant: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The variant, after skipping the test where this CPU cannot run it for `dtype` weights."""
    if variant not in linear.cpu_variants(dtype):
        pytest.skip(f"this CPU cannot run the {variant} variant ({linear.kernel_status()})")
    return variant


def exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float64 from the very same (rounded) inputs."""
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def bf16_interval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(low, high), bf16 [..., N]: every fp32 computation of x @ weight^T + bias from bf16 inputs, whatever the order
    of its sums, lies between these two once rounded to bf16.

    Products of two bf16 numbers are exact in fp32 (8-bit significands: 16-bit products), so such a computation sums
    the same n exact terms (K products and the bias), in fp32, in an order of its own: a tree of n - 1 additions or
    fused multiply-adds. Any such tree lands within gamma(n - 1) * sum |terms| of the exact sum S, where
    gamma(m) = m u / (1 - m u) and u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, section 4.2).
    Rounding to bf16 is monotone, so the rounded result lies in [bf16(S - E), bf16(S + E)]. S and sum |terms| are
    computed in float64, whose own errors (under 1e-13 of sum |terms| at these sizes) the factor 1 + 1e-6 covers;
    2^-126 a term covers kernels that flush subnormal sums to zero.
    """
    terms = x.shape[-1] + (bias is not None)
    gamma = (terms - 1) * 2.0**-24 / (1 - (terms - 1) * 2.0**-24)
    total = exact(x, weight, bias)
    magnitude = exact(x.abs(), weight.abs(), None if bias is None else bias.abs())
    bound = gamma * magnitude * (1 + 1e-6) + terms * 2.0**-126
    return (total - bound).to(torch.bfloat16), (total + bound).to(torch.bfloat16)


def assert_within(result: torch.Tensor, interval: tuple[torch.Tensor, torch.Tensor]) -> None:
    low, high = interval
    outside = ~((low <= result) & (result <= high))
    examples = [f"{r} not in [{a}, {b}]" for r, a, b in zip(*(t[outside][:3].tolist() for t in (result, low, high)))]
    assert not outside.any(), f"{int(outside.sum())} of {result.numel()} outside the bound, e.g. {examples}"


@needs_kernel
@pytest.mark.parametrize("variant", ARCHITECTURE_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("n, k", [(37, 64), (256, 100), (19, 1152), (8, 4130), (5, 13)])  # tails of rows and of K
def test_kernel_sums_like_float32(variant, dtype, rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    out = linear.KERNEL.get().few_rows_linear(x, weight, dtype=torch.float32, variant=runs(variant, dtype))
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # fp32 sums of exact products: within a few fp32 roundings of the float64 result
    torch.testing.assert_close(out.double(), exact(x, weight), atol=1e-5 * k**0.5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("variant", ARCHITECTURE_VARIANTS)
def test_few_rows_path_rounds_once_like_pytorch(variant):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 200, generator=generator).bfloat16()  # [b, s, K]: any leading shape, at most 8 rows in all
    weight = torch.randn(300, 200, generator=generator).bfloat16()
    bias = torch.randn(300, generator=generator).bfloat16()
    with torch.no_grad(), linear.fast_paths(variant=runs(variant)):
        assert linear.path_for(x, weight) == "few_rows" and linear.kernel_status().endswith(f"using {variant}")
        out = linear.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 300) and out.is_contiguous()
    assert_within(out, bf16_interval(x, weight, bias))  # fp32 sums of exact products, rounded once
    expected = exact(x, weight, bias).to(torch.bfloat16)  # the exact value, rounded once
    differs = (out != expected).float().mean().item()
    assert differs < 0.02  # only where fp32's order of summation lands across a rounding boundary
    step = 2**-7 * out.float().pow(2).mean().sqrt().item()  # one bf16 rounding step at the outputs' typical size
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), atol=step, rtol=2**-7)


@needs_kernel
@pytest.mark.parametrize("variant", ARCHITECTURE_VARIANTS)
def test_kernel_rounds_its_sums_once_as_pytorch_does(variant):
    generator = torch.Generator().manual_seed(2)
    x, weight, bias = (torch.randn(shape, generator=generator).bfloat16() for shape in ((3, 300), (1000, 300), (1000,)))
    kernel = linear.KERNEL.get()
    variant = runs(variant)
    sums = kernel.few_rows_linear(x, weight, bias, dtype=torch.float32, variant=variant)
    torch.testing.assert_close(sums.double(), exact(x, weight, bias), atol=1e-4, rtol=1e-5)
    rounded = kernel.few_rows_linear(x, weight, bias, variant=variant)
    # Bit for bit: the same kernel, the same shapes, so the very same sums in the very same order (each output is
    # summed by one thread, over the same chunks of K, whatever the dtype asked for); only the final rounding differs.
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, sums.to(torch.bfloat16))
    # The rounding on its own: zero sums plus a float32 bias are the bias, rounded. Ties, subnormals, infinities and
    # NaNs, then every kind of bit pattern, must round bit for bit as PyTorch rounds.
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 3 * 2**-8), 1e-39, -1e-39, 3e38, float("inf"), float("nan")])
    special = special.repeat(3)  # 24 values
    patterns = torch.randint(-2**31, 2**31 - 1, (4099,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    for bias32 in (special, patterns.view(torch.float32)):
        n = bias32.numel()
        out = kernel.few_rows_linear(torch.zeros(1, 32).bfloat16(), torch.zeros(n, 32).bfloat16(), bias32,
                                     variant=variant)
        assert torch.equal(out.view(torch.int16), bias32.to(torch.bfloat16).view(torch.int16)[None])
    assert out.view(torch.int16).unique().numel() > 3500  # the patterns were varied (4099 draws of 65536)


@needs_kernel
def test_variant_switch_names_what_it_cannot_do():
    """`fast_paths(variant=...)` forces a variant; an unknown name, or one this CPU lacks, is refused in one line."""
    x, weight = torch.ones(1, 64).bfloat16(), torch.ones(4, 64).bfloat16()
    with pytest.raises(PaliGemmaError, match="unknown kernel variant 'sse2'"):
        with linear.fast_paths(variant="sse2"):
            pass
    missing = next((v for v in linear.VARIANTS if v not in linear.cpu_variants()), None)
    if missing is not None:  # on x86, "neon"; on ARM64, the x86 variants
        with linear.fast_paths(variant=missing), pytest.raises(PaliGemmaError, match=f"cannot run the '{missing}'"):
            linear.linear(x, weight)
        with pytest.raises(RuntimeError, match=f"cannot run the '{missing}' kernel variant"):
            linear.KERNEL.get().few_rows_linear(x, weight, variant=missing)  # the operator checks too: no SIGILL
    assert linear.kernel_status().startswith("compiled: ")
    best = linear.cpu_variants()[0]  # the operator's default, "auto", is the best this CPU runs
    kernel = linear.KERNEL.get()
    assert torch.equal(kernel.few_rows_linear(x, weight), kernel.few_rows_linear(x, weight, variant=best))


def test_widened_path_is_as_exact_as_float32(monkeypatch):
    """The widened path (fp32 products of weight slices, the bias added to the sums, one rounding) is as exact as
    one fp32 product rounded once, but not bit for bit the same: the two sum the same exact terms in different
    orders (the bias added to the rounded fp32 sums or inside the product, slices of N, whatever blocking the fp32
    kernel picks for each shape). Both therefore lie in the
    interval of `bf16_interval`. Where that interval is a single bf16 value, nearly everywhere since the fp32 error
    bound is far below a bf16 step, both equal it; where a rounding boundary falls inside it, the two may differ by
    one bf16 step (1 output in 1.5 million did on an AMD EPYC, Zen 3, with AVX2, where this test once demanded
    bit-equality everywhere)."""
    monkeypatch.setattr(linear, "has_amx", lambda: False)  # AMX machines skip this path; its numerics are the same
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 256, generator=generator).bfloat16()  # 300 rows: widened
    weight = torch.randn(5000, 256, generator=generator).bfloat16()
    bias = torch.randn(5000, generator=generator).bfloat16()
    monkeypatch.setattr(linear, "SLICE_ELEMENTS", 1200 * 256)  # slices of 1200 weight rows: 4 whole, 1 of 200
    assert linear.path_for(x, weight) == "widen"
    with torch.no_grad():
        out = linear.linear(x, weight, bias)
    assert out.is_contiguous() and out.dtype == torch.bfloat16 and out.shape == (300, 5000)
    in_fp32 = F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    low, high = interval = bf16_interval(x, weight, bias)
    assert_within(out, interval)
    assert_within(in_fp32, interval)
    # The bound is a worst case (about 100 times the fp32 errors seen); it still pins most outputs (82% at these
    # sizes) to a single bf16 value, which both results must then equal bit for bit.
    assert (low == high).float().mean() > 0.75, "the bound must pin most outputs to one bf16 value to mean anything"
    # Not a bound but what two fp32 orders give: their sums differ by a few fp32 roundings, a small part of the
    # interval's width, so they round to different bf16 values only where a boundary falls between them.
    assert (out != in_fp32).float().mean() < 1e-3
    step = 2**-7 * out.float().pow(2).mean().sqrt().item()  # PyTorch's bf16 kernel: sums in another order
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), atol=step, rtol=2**-7)


def test_float32_and_switched_off_paths_are_pytorch_bit_for_bit():
    generator = torch.Generator().manual_seed(4)
    x32, w32 = torch.randn(1, 64, generator=generator), torch.randn(48, 64, generator=generator)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    with torch.no_grad():  # bit for bit: the "torch" path is the very call F.linear(x, weight, bias), same inputs
        assert linear.path_for(x32, w32) == "torch"  # float32: the reference's own kernels unless asked
        assert torch.equal(linear.linear(x32, w32), F.linear(x32, w32))
        with linear.fast_paths(enabled=False):
            assert linear.path_for(x16, w16) == "torch"
            assert torch.equal(linear.linear(x16, w16), F.linear(x16, w16))
    assert linear.SETTINGS.enabled
    with pytest.raises(ValueError, match="unknown fast path"):
        with linear.fast_paths(turbo=True):
            pass


def test_autograd_takes_pytorch_kernels():
    torch.manual_seed(0)  # the layer's initial weights
    layer = linear.FastLinear(16, 4).bfloat16()
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_()
    assert linear.path_for(x, layer.weight) == "torch"
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """The tiny preset's random weights in bf16, in this library (fast paths) and in transformers (same tensors),
    and the same weights in float32 as the truth both are held to."""
    directory = tmp_path_factory.mktemp("fast")
    config = PaliGemmaConfig.from_dict(bench.PRESETS["tiny"])
    bench.write_random_checkpoint(config, directory, torch.bfloat16)
    model = load_model(directory, dtype=torch.bfloat16)
    truth = load_model(directory, dtype=torch.float32)
    return config, model, bench.reference_sharing_weights(model), truth


def test_bf16_prefill_and_decoding_no_further_from_float32_than_transformers(bf16_models):
    """Prefill (266 rows: widened products) and one decoding step (1 row: the kernel): this library's bf16 logits are
    no further from the float32 model's than transformers' bf16 logits are."""
    from paligemma import DynamicCache

    config, model, reference, truth = bf16_models
    inputs = bench.make_inputs(config, 2, torch.device("cpu"), seed=3)
    with torch.no_grad():
        cache, truth_cache = DynamicCache(), DynamicCache()
        ours = model(**inputs, kv_cache=cache).logits.float()
        expected = truth(**{**inputs}, kv_cache=truth_cache).logits
        theirs_out = reference(**inputs, use_cache=True)
        theirs = theirs_out.logits.float()
        ours_error, theirs_error = (ours - expected).abs().max(), (theirs - expected).abs().max()
        assert ours_error <= 1.25 * theirs_error + 1e-3, (ours_error, theirs_error)

        token = expected[:, -1].argmax(-1)[:, None]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        position = mask.sum(-1, keepdim=True)
        step = model(token, attention_mask=mask, position_ids=position, kv_cache=cache).logits.float()
        step_truth = truth(token, attention_mask=mask, position_ids=position, kv_cache=truth_cache).logits
        step_theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs_out.past_key_values).logits
        ours_error, theirs_error = (step - step_truth).abs().max(), (step_theirs.float() - step_truth).abs().max()
        assert ours_error <= 1.25 * theirs_error + 1e-3, (ours_error, theirs_error)


def test_bf16_greedy_generation_matches_transformers(bf16_models):
    config, model, reference, _ = bf16_models
    inputs = bench.make_inputs(config, 3, torch.device("cpu"), seed=4)
    with bench.never_stop(model, reference), torch.no_grad():
        ours = generate_ids(model, inputs, GenerationSettings(16))
        theirs = reference.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs[:, inputs["input_ids"].shape[1]:].tolist()


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint reader


def test_same_dtype_weights_are_mapped_not_copied(tmp_path):
    from safetensors.torch import load_file

    config = PaliGemmaConfig.from_dict(bench.PRESETS["tiny"])
    bench.write_random_checkpoint(config, tmp_path, torch.bfloat16)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "model.safetensors"))
    weight = model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, stored["language_model.model.layers.0.mlp.up_proj.weight"])
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert weight.untyped_storage().nbytes() == file_bytes  # a view into the whole mapped file
    widened = load_model(tmp_path, dtype=torch.float32)
    for name, tensor in widened.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].float()), name


def test_conversion_in_small_chunks_and_unaligned_tensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from paligemma.io import safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, generator=generator).bfloat16(), "b": torch.randn(5, 7, generator=generator),
               "c": torch.randn(1001, generator=generator).half()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    opened = safetensors.SafetensorsFile(tmp_path / "x.safetensors")
    monkeypatch.setattr(safetensors, "CONVERT_CHUNK_BYTES", 6)  # several reads per tensor, a partial one last
    for name, tensor in tensors.items():
        assert torch.equal(opened.tensor(name), tensor)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(opened.tensor(name, dtype), tensor.to(dtype)), (name, dtype)
