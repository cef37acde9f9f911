"""int8 and int4 weights: the schemes equal torchao's bit for bit, every kernel variant this CPU runs computes the
product of the dequantized weights, and a quantized tiny-shapes still reads its scenes."""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import ARCHITECTURE_VARIANTS
from paligemma import PaliGemmaError, generate, load_pretrained
from paligemma.kernels import linear
from paligemma.quantization import QuantizedEmbedding, QuantizedLinear, model_bytes, quantize
from paligemma.quantization.schemes import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

warnings.filterwarnings("ignore", module="torchao")
ROOT = Path(__file__).resolve().parent.parent


def weights(dtype: torch.dtype, rows: int = 96, columns: int = 384, seed: int = 0) -> torch.Tensor:
    """Gaussian weights at a trained model's scale, with the awkward rows: all zeros, constant, one outlier."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    weight[1] = 0.0
    weight[2] = 0.5
    weight[3, 7] = 3.0
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_equals_torchao(dtype):
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    weight = weights(dtype)
    ours = quantize_int8(weight)
    theirs = Int8Tensor.from_hp(weight, PerRow())
    assert torch.equal(ours.codes, theirs.qdata) and torch.equal(ours.scale, theirs.scale.reshape(-1))
    # W ~ codes * scale, within half a step (plus the weights' own rounding to bf16)
    error = (dequantize_int8(ours) - weight.float()).abs()
    assert (error <= ours.scale[:, None] * 0.5 + weight.float().abs() * 2**-8).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_equals_torchao(dtype, group_size):
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    weight = weights(dtype)
    ours = quantize_int4(weight, group_size)
    scale, zero = _choose_qparams_affine_tinygemm(weight, MappingType.ASYMMETRIC, (1, group_size), torch.int32, 0, 15,
                                                  scale_dtype=dtype, zero_point_dtype=dtype)
    codes = _quantize_affine_tinygemm(weight, [1, group_size], scale, zero, torch.int32, 0, 15)
    assert torch.equal(unpack_int4(ours.packed).long(), codes.long())
    assert torch.equal(ours.scale, scale.reshape(ours.scale.shape))
    assert torch.equal(ours.zero, zero.reshape(ours.zero.shape))
    # W ~ (codes - 8) * scale + zero, within one step of its group
    error = (dequantize_int4(ours) - weight.float()).reshape(weight.shape[0], -1, group_size).abs()
    assert (error <= ours.scale.float()[..., None]).all()


def test_int4_packing():
    codes = torch.randint(0, 16, (5, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 48) and torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)  # byte j of each 32: codes j and j + 16


def test_scheme_errors():
    with pytest.raises(PaliGemmaError, match="group size must be one of"):
        quantize_int4(weights(torch.float32), 48)
    with pytest.raises(PaliGemmaError, match="do not split into groups of 128"):
        quantize_int4(torch.zeros(4, 96), 128)
    with pytest.raises(PaliGemmaError, match="cannot quantize torch.int64"):
        quantize_int8(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(PaliGemmaError, match="matrix"):
        quantize_int8(torch.zeros(8))


def exact_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("variant", ARCHITECTURE_VARIANTS)
@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_multiply_the_dequantized_weights(variant, scheme, group_size, dtype):
    """Each variant's product, as float32 sums, is the float64 product of x and the dequantized weights within fp32
    rounding (1e-5 of sum |x w|); rounded to the model's dtype, within one rounding step."""
    if variant not in linear.cpu_variants(torch.float32):
        pytest.skip(f"this CPU cannot run the {variant} variant ({linear.kernel_status()})")
    generator = torch.Generator().manual_seed(7)
    layer = nn.Linear(384, 200, bias=True).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 384, generator=generator) * 0.02)
        layer.bias.copy_(torch.randn(200, generator=generator) * 0.1)
    quantized = QuantizedLinear.from_linear(layer, scheme, group_size)
    wide = quantized.dequantized(torch.float64)
    kernel = linear.KERNEL.get()
    for rows in range(1, 9):
        x = torch.randn(rows, 384, generator=generator).to(dtype)
        if scheme == "int8":
            sums = kernel.int8_linear(x, quantized.codes, quantized.scale, quantized.bias, dtype=torch.float32,
                                      variant=variant)
        else:
            sums = kernel.int4_linear(x, quantized.packed, quantized.scale, quantized.zero, group_size,
                                      quantized.bias, dtype=torch.float32, variant=variant)
        exact = exact_product(x, wide, quantized.bias)
        magnitude = x.double().abs() @ wide.abs().T + quantized.bias.double().abs()
        assert ((sums.double() - exact).abs() <= 1e-5 * magnitude).all()
        with torch.no_grad(), linear.fast_paths(variant=variant):
            assert quantized.path_for(x) == "kernel"
            out = quantized(x)
        assert out.dtype == dtype
        step = exact.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-23) + 1e-6 * magnitude
        assert ((out.double() - exact).abs() <= step).all()


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 64)])
def test_sliced_path_for_many_rows(scheme, group_size, monkeypatch):
    """Prefill's path: the weights dequantized a slice at a time (slices of 70 rows here), one rounding at the end."""
    from paligemma.quantization import linear as quantized_linear

    monkeypatch.setattr(quantized_linear, "SLICE_ELEMENTS", 70 * 256)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 300).to(torch.bfloat16), scheme, group_size)
    x = torch.randn(2, 40, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert layer.path_for(x.reshape(-1, 256)) == "sliced"
    with torch.no_grad():
        out = layer(x)
    exact = exact_product(x, layer.dequantized(torch.float64), layer.bias)
    assert out.shape == (2, 40, 300) and (out.double() - exact).abs().max() <= exact.abs().max() * 2**-8


def test_int8_matches_torchaos_own_linear():
    """torchao's int8 layer on the same weights: its product rounds the dequantized weights to the model's dtype
    first, ours widens them exactly; the two agree within that rounding (2^-8 of sum |x w|)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    generator = torch.Generator().manual_seed(5)
    layer = nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 512, generator=generator) * 0.02)
    ours = QuantizedLinear.from_linear(layer, "int8")
    theirs = nn.Sequential(nn.Linear(512, 256, bias=False).to(torch.bfloat16))
    theirs[0].weight.data.copy_(layer.weight.data)
    quantize_(theirs, Int8WeightOnlyConfig(set_inductor_config=False))
    x = torch.randn(3, 512, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        difference = (ours(x).float() - theirs(x).float()).abs()
    magnitude = x.float().abs() @ ours.dequantized().abs().T
    assert (difference <= 2**-8 * magnitude + 2**-8 * ours(x).float().abs()).all()


def test_layer_errors():
    with pytest.raises(PaliGemmaError, match="unknown quantization 'int2'"):
        QuantizedLinear(64, 8, "int2")
    with pytest.raises(PaliGemmaError, match="do not split into groups of 128"):
        QuantizedLinear(192, 8, "int4", group_size=128)
    layer = QuantizedLinear(64, 8, "int8")
    with pytest.raises(PaliGemmaError, match="input of 32 features"):
        layer(torch.zeros(1, 32))


@pytest.fixture(scope="module")
def scenes():
    from paligemma.training.shapes import make_scene
    import random

    return [make_scene(random.Random(seed)) for seed in range(6)]


@pytest.mark.parametrize("scheme, group_size", [("int8", 128), ("int4", 64)])
def test_quantized_tiny_shapes(scheme, group_size, scenes):
    """Every linear layer quantized (the tied head and the embeddings read from one quantized table), the model
    smaller, and its captions those of the full model on most scenes."""
    model, processor = load_pretrained("tiny-shapes")
    images, prompts = [s.image for s in scenes], ["caption en"] * len(scenes)
    full = generate(model, processor, images, prompts, max_new_tokens=24)
    size = model_bytes(model)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    report = quantize(model, scheme, group_size)
    assert len(report["layers"]) == linears and not report["kept"] and model.config.quantization["scheme"] == scheme
    assert not any(type(m) in (nn.Linear, linear.FastLinear) for m in model.modules())
    assert isinstance(model.language_model.embed_tokens, QuantizedEmbedding)
    assert model_bytes(model) < size * (0.3 if scheme == "int8" else 0.2)  # from float32
    answers = generate(model, processor, images, prompts, max_new_tokens=24)
    assert sum(a == b for a, b in zip(answers, full)) >= len(scenes) - 1, (answers, full)
    with pytest.raises(PaliGemmaError, match="quantized already"):
        quantize(model, scheme)


def test_load_pretrained_quantized():
    model, _ = load_pretrained("tiny-shapes", quantization="int4", group_size=32)
    assert model.quantization["scheme"] == "int4" and model.quantization["group_size"] == 32
    with pytest.raises(PaliGemmaError, match="int4 group size"):
        load_pretrained("tiny-shapes", quantization="int4", group_size=100)
    with pytest.raises(PaliGemmaError, match="merged"):
        load_pretrained("tiny-shapes", quantization="int8", adapter="some/adapter")


@pytest.mark.parametrize("scheme, group_size", [("int8", 128), ("int4", 64)])
def test_quantized_while_loading_and_saved(scheme, group_size, tmp_path):
    """Quantizing as the weights are read gives what quantizing the loaded model gives, bit for bit; the quantized
    model saves to a folder (config.json names the scheme) that loads back to the same tensors and answers."""
    import json
    import shutil

    after, processor = load_pretrained("tiny-shapes", dtype="bf16")
    quantize(after, scheme, group_size)
    during, _ = load_pretrained("tiny-shapes", dtype="bf16", quantization=scheme, group_size=group_size)
    expected = after.state_dict()
    assert during.state_dict().keys() == expected.keys()
    assert all(torch.equal(during.state_dict()[name], tensor) for name, tensor in expected.items())
    after.save_pretrained(tmp_path)
    shutil.copy(ROOT / "paligemma" / "checkpoints" / "tiny-shapes" / "tokenizer.model", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == scheme
    again, _ = load_pretrained(tmp_path, dtype="bf16")
    assert again.quantization["scheme"] == scheme
    assert all(torch.equal(again.state_dict()[name], tensor) and again.state_dict()[name].dtype == tensor.dtype
               for name, tensor in expected.items())
    image = ROOT / "images" / "shapes_3.png"
    assert generate(again, processor, [image], ["caption en"]) == generate(after, processor, [image], ["caption en"])
    other = "int4" if scheme == "int8" else "int8"
    with pytest.raises(PaliGemmaError, match=f"holds {scheme} weights already"):
        load_pretrained(tmp_path, quantization=other)
    with pytest.raises(PaliGemmaError, match="merge the adapter into the wide model first"):
        load_pretrained(tmp_path, adapter=tmp_path, merge=True)
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PaliGemmaError, match="quantized by 'bitsandbytes'"):
        load_pretrained(tmp_path)


def test_ask_quantized(capsys):
    from paligemma.cli import main

    image = str(ROOT / "images" / "shapes_4.png")
    assert main(["ask", "--image", image, "--prompt", "caption en", "--quantization", "int8", "--dtype", "bf16"]) == 0
    assert "triangle" in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["static", "compiled"])
def test_rewound_decoding_repeats_greedy_generation(cache):
    """The benchmark's `RewindableDecoder`, put back to its prefilled prompt before each run, decodes the very tokens
    greedy generation decodes, run after run, eager or compiled, plain or int4."""
    from paligemma.bench.quantized_decode import RewindableDecoder
    from paligemma.inference.generation import generate_ids
    from paligemma.inference.sampling import GenerationSettings

    model, processor = load_pretrained("tiny-shapes", dtype=torch.bfloat16, quantization="int4", group_size=32)
    batch = processor(text=["caption en", "detect circle"], images=[str(ROOT / "images" / "shapes_4.png")] * 2)
    expected = generate_ids(model, batch, GenerationSettings(6), cache="static")  # [2, 6]
    decoder = RewindableDecoder(model, dict(batch), 6, cache)
    for _ in range(2):
        assert decoder.seconds_per_step() > 0
        assert torch.equal(decoder.tokens, expected)


def test_quantized_decode_benchmark_runs():
    """The benchmark's whole path on the tiny preset: every format and variant measured against its own bound,
    torchao's int8 in transformers beside it, and the agreement of bf16 with itself exactly 1."""
    from paligemma.bench.quantized_decode import format_table, run

    report = run("tiny", batches=(1,), new_tokens=3, cycles=2, positions=16, decode_cache="static",
                 log=lambda message: None)
    formats = {(r["format"], r["variant"]) for r in report["results"]}
    for variant in linear.cpu_variants():
        assert {(name, variant) for name in ("bf16", "int8", "int4-g128", "int4-g32")} <= formats
    assert ("transformers + torchao int8", "-") in formats
    assert report["agreement"]["bf16"] == 1.0 and 0 <= report["agreement"]["int4-g32"] <= 1
    rows = {r["format"]: r for r in report["results"] if r["variant"] == linear.cpu_variants()[0]}
    assert rows["int8"]["bytes_per_step"] < rows["bf16"]["bytes_per_step"]
    assert rows["int4-g32"]["bytes_per_step"] < rows["int8"]["bytes_per_step"]
    # the tiny preset's 64-wide layers do not split into groups of 128: int4-g128 keeps them, and the head, wide
    assert rows["int4-g128"]["bytes_per_step"] <= rows["bf16"]["bytes_per_step"]
    assert all(r["decode_tokens_per_s"] > 0 and len(r["samples"]) == (2 if r["variant"] != "-" else 1)
               for r in report["results"])
    assert all(r["speedup_over_bf16"] == 1.0 for r in report["results"] if r["format"] == "bf16")
    timed = [r for r in report["results"] if r["variant"] != "-"]
    samples = report["run_bandwidths"]["1"]  # before the first run and after each run of each cycle
    assert len(samples) == 1 + 2 * len(timed)
    for r in timed:  # each run's bound is from the faster of the samples beside it, and its read rate its bytes
        assert len(r["bandwidth_beside_gb_per_s"]) == 2 and set(r["bandwidth_beside_gb_per_s"]) <= set(samples)
        assert r["read_gb_per_s"] == pytest.approx(statistics.median(r["samples"]) * r["bytes_per_step"] / 1e9, 1e-2)
        # the bound is the slower of the memory's and the arithmetic's, as python -m paligemma.bench has it
        memory, arithmetic = r["memory_bound_tokens_per_s"], r["arithmetic_bound_tokens_per_s"]
        assert arithmetic == pytest.approx(r["batch"] * report["matmul"]["gflop_per_s"] * 1e9 / r["flops_per_step"])
        assert r["bound_tokens_per_s"] <= min(memory, arithmetic) * (1 + 1e-9)
        assert r["bound_by"] == ("memory" if memory <= arithmetic else "arithmetic")
        assert r["fraction_of_bound"] >= r["fraction_of_memory_bound"] * (1 - 1e-9)
    assert "top-1 agreement with bf16" in format_table(report)
    loading = report["loading"]  # each format loaded in a fresh process, quantized as it loads
    assert set(loading) == {"bf16", "int8", "int4-g128", "int4-g32"}
    assert loading["int8"]["model_bytes"] < loading["bf16"]["model_bytes"]
    assert all(m["peak_above_base_bytes"] > 0 for m in loading.values())


def test_quantized_quality_study_scores_as_evaluate_does():
    """The quality study's scores are `evaluate_checkpoint`'s for the same format and scenes; its table gives each
    format's difference from bf16; a bad count of scenes is refused in one line."""
    from paligemma.bench.quantized_quality import format_table, main, run
    from paligemma.training.pretrain import evaluate_checkpoint

    report = run("tiny-shapes", examples=6, formats=("bf16", "int4-g32"), log=lambda message: None)
    assert report["results"]["bf16"] == evaluate_checkpoint("tiny-shapes", 6, dtype="bf16")
    assert report["results"]["int4-g32"] == evaluate_checkpoint("tiny-shapes", 6, dtype="bf16", quantization="int4",
                                                                group_size=32)
    table = format_table(report)
    scores, base = report["results"]["int4-g32"], report["results"]["bf16"]
    shown = [metric for metric in scores if metric.endswith(("_match", "_accuracy", "_iou"))]
    assert shown  # six scenes hold at least one task
    for metric in shown:
        assert f"{scores[metric]:.4f} ({scores[metric] - base[metric]:+.4f})" in table.splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["--examples", "0"])
