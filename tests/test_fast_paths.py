"""The fast paths of `paligemma.linear` and the checkpoint reader, each against a plain computation and the model
against transformers: the streaming kernel for decoding, widened fp32 products for bf16 prefill, mapped and
chunk-converted weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paligemma import bench, load_model
from paligemma.kernels import linear
from paligemma.models.config import PaliGemmaConfig
from paligemma.inference.generation import generate_ids
from paligemma.inference.sampling import GenerationSettings
from paligemma.kernels.cpu import has_amx

needs_kernel = pytest.mark.skipif(linear.KERNEL.get() is None, reason=f"streaming kernel: {linear.kernel_status()}")


def exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float64 from the very same (rounded) inputs."""
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("n, k", [(37, 64), (256, 100), (19, 1152), (8, 4130)])  # tails of rows and of K
def test_kernel_sums_like_float32(dtype, rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    out = linear.KERNEL.get().few_rows_linear(x, weight, dtype=torch.float32)  # the sums, not rounded
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # fp32 sums of exact products: within a few fp32 roundings of the float64 result
    torch.testing.assert_close(out.double(), exact(x, weight), atol=1e-5 * k**0.5, rtol=1e-5)


@needs_kernel
def test_few_rows_path_rounds_once_like_pytorch():
    x = torch.randn(2, 3, 200).bfloat16()  # [b, s, K]: any leading shape, at most 8 rows in all
    weight, bias = torch.randn(300, 200).bfloat16(), torch.randn(300).bfloat16()
    assert linear.path_for(x, weight) == "few_rows"
    with torch.no_grad():
        out = linear.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 300) and out.is_contiguous()
    expected = exact(x, weight, bias).to(torch.bfloat16)  # the exact value, rounded once
    differs = (out != expected).float().mean().item()
    assert differs < 0.02  # only where fp32's order of summation lands across a rounding boundary
    step = 2**-7 * out.float().pow(2).mean().sqrt().item()  # one bf16 rounding step at the outputs' typical size
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), atol=step, rtol=2**-7)


@needs_kernel
def test_kernel_rounds_its_sums_once_as_pytorch_does():
    x, weight, bias = torch.randn(3, 300).bfloat16(), torch.randn(1000, 300).bfloat16(), torch.randn(1000).bfloat16()
    kernel = linear.KERNEL.get()
    sums = kernel.few_rows_linear(x, weight, bias, dtype=torch.float32)
    torch.testing.assert_close(sums.double(), exact(x, weight, bias), atol=1e-4, rtol=1e-5)
    rounded = kernel.few_rows_linear(x, weight, bias)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, sums.to(torch.bfloat16))
    # The rounding on its own: zero sums plus a float32 bias are the bias, rounded. Ties, subnormals, infinities and
    # NaNs, then every kind of bit pattern, must round bit for bit as PyTorch rounds.
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 3 * 2**-8), 1e-39, -1e-39, 3e38, float("inf"), float("nan")])
    special = special.repeat(3)  # 24 values: 16 through the vectorised rounding, 8 through its scalar tail
    patterns = torch.randint(-2**31, 2**31 - 1, (4099,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    for bias32 in (special, patterns.view(torch.float32)):
        n = bias32.numel()
        out = kernel.few_rows_linear(torch.zeros(1, 32).bfloat16(), torch.zeros(n, 32).bfloat16(), bias32)
        assert torch.equal(out.view(torch.int16), bias32.to(torch.bfloat16).view(torch.int16)[None])
    assert out.view(torch.int16).unique().numel() > 3500  # the patterns were varied (4099 draws of 65536)


@pytest.mark.skipif(has_amx(), reason="with AMX, bf16 products stay in bf16")
def test_widened_path_is_as_exact_as_float32():
    x = torch.randn(300, 256).bfloat16()  # 300 rows: widened
    weight, bias = torch.randn(5000, 256).bfloat16(), torch.randn(5000).bfloat16()
    assert linear.path_for(x, weight) == "widen"
    with torch.no_grad():
        out = linear.linear(x, weight, bias)
    assert out.is_contiguous()
    in_fp32 = F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, in_fp32, atol=0, rtol=0)
    step = 2**-7 * out.float().pow(2).mean().sqrt().item()  # PyTorch's bf16 kernel: sums in another order
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), atol=step, rtol=2**-7)


def test_float32_and_switched_off_paths_are_pytorch_bit_for_bit():
    x32, w32 = torch.randn(1, 64), torch.randn(48, 64)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    with torch.no_grad():
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
    layer = linear.FastLinear(16, 4).bfloat16()
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
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
    with bench._never_stop(model, reference), torch.no_grad():
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
