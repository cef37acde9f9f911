"""The benchmark (`python -m paligemma.bench`): it runs end to end on the tiny preset in seconds, its JSON has the
documented fields, both libraries hold the same weights and produce the same greedy tokens inside it, and the work
it counts for the bounds is the model's, and its load probe runs on its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paligemma import bench
from paligemma.cli import main
from paligemma.io.checkpoint import empty_model
from paligemma.models.config import PaliGemmaConfig

METRICS = {"load_s", "load_peak_rss_gb", "vision_s", "prefill_s", "decode_tokens_per_s", "generate_peak_extra_gb"}
ROW_FIELDS = {"dtype", "batch", "metric", "unit", "higher_is_better", "ours", "transformers", "samples",
              "ratio_to_transformers", "bound", "bound_note"}


@pytest.fixture(scope="module")
def tiny_report():
    torch.manual_seed(0)
    return bench.run("tiny", dtypes=("bf16", "fp32"), batches=(1, 2), new_tokens=6, repeats=1, load_repeats=1,
                     bandwidth_bytes=32 << 20, profile=True, ablation=True)


def test_report_has_the_documented_fields(tiny_report):
    report = json.loads(json.dumps(tiny_report))  # what --json writes
    assert report["schema"] == bench.SCHEMA and report["preset"] == "tiny"
    assert report["prompt_tokens"] == 256 + bench.PROMPT_TOKENS
    for field in ("cpu", "threads", "cpu_count", "amx", "torch", "transformers", "streaming_kernel"):
        assert field in report["machine"], field
    assert report["limits"]["bandwidth"]["gb_per_s"] > 0
    # measured at the start and after each (dtype, batch) group; the bound is the best of them
    samples = [sample["gb_per_s"] for sample in report["limits"]["bandwidth_samples"]]
    assert len(samples) == 1 + 2 * 2 and report["limits"]["bandwidth"]["gb_per_s"] == max(samples)
    for decode in (r for r in report["results"] if r["metric"] == "decode_tokens_per_s"):  # from the best of them all
        throughput = report["limits"]["matmul"]["gflop_per_s"] * 1e9
        fastest_step = max(decode["bytes_per_step"] / (max(samples) * 1e9), decode["flops_per_step"] / throughput)
        assert decode["bound"] == pytest.approx(decode["batch"] / fastest_step)
        assert decode["ours_fraction_of_bound"] == pytest.approx(decode["ours"] / decode["bound"])
    assert set(report["limits"]["matmul"]["all_gflop_per_s"]) == {"bf16", "fp32"}
    # the matrix throughput too: measured as often, every arithmetic bound (vision, prefill) from the best of them
    throughputs = [sample["gflop_per_s"] for sample in report["limits"]["matmul_samples"]]
    assert len(throughputs) == len(samples) and report["limits"]["matmul"]["gflop_per_s"] == max(throughputs)
    for row in (r for r in report["results"] if r["metric"] in ("vision_s", "prefill_s")):
        assert row["bound"] == pytest.approx(row["flops"] / (max(throughputs) * 1e9))
        assert row["ours_fraction_of_bound"] == pytest.approx(row["bound"] / row["ours"])
    rows = report["results"]
    assert {row["metric"] for row in rows} == METRICS
    for row in rows:
        assert ROW_FIELDS <= set(row), row["metric"]
        assert row["ours"] > 0 and row["transformers"] > 0 or row["metric"] == "generate_peak_extra_gb"
    # each (dtype, batch) measured once per metric, both dtypes and both batches present
    keys = [(r["dtype"], r["batch"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {(r["dtype"], r["batch"]) for r in rows if r["metric"] == "decode_tokens_per_s"} == {
        ("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 2)}
    decode = next(r for r in rows if r["metric"] == "decode_tokens_per_s" and r["batch"] == 1)
    assert 0 < decode["ours_fraction_of_bound"] and 0 < decode["transformers_fraction_of_bound"]
    assert math.isclose(decode["ratio_to_transformers"], decode["ours"] / decode["transformers"])
    variants = {row["variant"] for row in report["ablation"]}
    assert set(bench.VARIANTS) | {"transformers"} <= variants
    assert bench.PLAIN_STEPS not in variants and report["decode_cache"] == "dynamic"  # the default on a CPU
    assert set(report["profile"]["runs"]) == {"ours, PyTorch kernels only", "ours", "transformers"}
    for run in report["profile"]["runs"].values():
        assert set(run) == {"prefill", "decode"} and run["decode"]["wall_s"] > 0


def test_both_libraries_produce_the_same_greedy_tokens(tiny_report):
    assert len(tiny_report["checks"]) == 4
    for check in tiny_report["checks"]:
        assert check["same_greedy_tokens"], check
        assert len(check["ours_tokens"]) == check["batch"] and len(check["ours_tokens"][0]) == 6


def test_table_names_every_measurement(tiny_report):
    table = bench.format_table(tiny_report)
    for label in bench.LABELS.values():
        assert label in table
    assert "greedy tokens, bf16 batch 2: same" in table
    assert "optimisation record" in table and "where the time goes" in table


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["bench", "--preset", "tiny", "--dtype", "fp32", "--batch", "1", "--new-tokens", "3", "--repeats", "1",
                "--no-load", "--no-limits", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m paligemma.bench --preset tiny")
    assert report["checks"][0]["same_greedy_tokens"]
    assert "decode (tokens/s)" in capsys.readouterr().out


def test_a_bf16_run_is_held_to_the_faster_of_bf16_and_fp32_products():
    """bf16 weights are multiplied in fp32 where that is faster (widened products; on AVX2 PyTorch's bf16 products are
    emulated), so a bf16-only run measures both, and its prefill and vision bounds use the faster."""
    report = bench.run("tiny", dtypes=("bf16",), batches=(1,), new_tokens=3, repeats=1, measure_loading=False,
                       bandwidth_bytes=32 << 20)
    matmul = report["limits"]["matmul"]
    assert set(matmul["all_gflop_per_s"]) == {"bf16", "fp32"}
    assert matmul["gflop_per_s"] == max(matmul["all_gflop_per_s"].values())
    prefill = next(r for r in report["results"] if r["metric"] == "prefill_s")
    assert prefill["bound"] == pytest.approx(bench.prefill_flops(
        PaliGemmaConfig.from_dict(bench.PRESETS["tiny"]), 1, report["prompt_tokens"]) / (matmul["gflop_per_s"] * 1e9))


def test_compiled_decoding_is_timed_after_its_compilation(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["bench", "--preset", "tiny", "--dtype", "bf16", "--batch", "1", "--new-tokens", "4", "--repeats", "1",
                "--no-load", "--no-limits", "--ablation", "--decode-cache", "compiled", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["decode_cache"] == "compiled" and report["decode_warmup_s"]["bf16 batch 1"] > 0
    assert report["checks"][0]["same_greedy_tokens"]
    assert bench.PLAIN_STEPS in {row["variant"] for row in report["ablation"]}  # what the compiled steps bring
    assert "decodes with cache='compiled', compiled in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="decode_cache must be one of"):
        bench.run("tiny", decode_cache="fast")


def test_reference_holds_the_very_same_tensors(tmp_path):
    from paligemma import load_model

    config = PaliGemmaConfig.from_dict(bench.PRESETS["tiny"])
    bench.write_random_checkpoint(config, tmp_path, torch.float32)
    model = load_model(tmp_path)
    reference = bench.reference_sharing_weights(model, attn_implementation="eager")
    ours = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in reference.parameters()} == ours  # every weight shared, the head tied
    model.set_attention_implementation("eager")
    inputs = bench.make_inputs(config, 2, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_work_counted_for_the_bounds_is_the_models():
    """The bytes a decoding step reads are the decoder's and the head's weights; prefill FLOPs are twice the
    multiply-adds of every linear layer over every token (checked on the full-size model, on the meta device)."""
    config = PaliGemmaConfig.from_dict(bench.PRESETS["3b-224"])
    model = empty_model(config)
    language = sum(p.numel() for p in model.language_model.parameters())
    step = bench.decode_step(config, batch=1, context=0, dtype=torch.bfloat16)
    assert step["bytes"] == 2 * language  # every decoder weight, the norms and the tied head, once
    linear_vision = sum(m.weight.numel() for m in model.vision_tower.modules() if isinstance(m, torch.nn.Linear))
    patch = model.vision_tower.embeddings.patch_embedding.weight.numel()
    counted = bench.linear_params(config)
    assert counted["vision"] == linear_vision + patch
    assert counted["projector"] == model.multi_modal_projector.linear.weight.numel()
    assert counted["decoder"] == sum(
        m.weight.numel() for m in model.language_model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert 2.9e9 < model.num_parameters() < 2.95e9


PROBE_FIELDS = {"seconds", "peak_rss", "base_rss", "rss_anon", "rss_file", "weight_bytes", "library"}


def test_load_probe_runs_on_its_own(tmp_path):
    """`python -m paligemma.bench.load_probe ours DIR fp32`, from outside the checkout, prints one line of JSON."""
    config = PaliGemmaConfig.from_dict(bench.PRESETS["tiny"])
    written = bench.write_random_checkpoint(config, tmp_path / "tiny", torch.float32)
    checkout = Path(bench.__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "paligemma.bench.load_probe", "ours", str(tmp_path / "tiny"), "fp32"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    measured = json.loads(lines[0])
    assert set(measured) == PROBE_FIELDS
    assert measured["weight_bytes"] == written and measured["seconds"] > 0
    assert measured["peak_rss"] >= measured["base_rss"] > 0
    assert Path(measured["library"]).resolve() == checkout / "paligemma" / "__init__.py"
    wrong = subprocess.run([sys.executable, "-m", "paligemma.bench.load_probe", "ours"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr


def test_load_probe_by_path_for_an_earlier_library(tmp_path):
    """With a baseline library the probe measures that library's `load_model`, though it has no probe of its own:
    this checkout's probe file runs by its path while the earlier package comes first for `import paligemma`."""
    earlier = tmp_path / "earlier" / "paligemma"
    earlier.mkdir(parents=True)
    (earlier / "__init__.py").write_text(
        "import torch\n\n\ndef load_model(directory, dtype):\n    return torch.nn.Linear(4, 3).to(dtype)\n")
    measured = bench.measure_load("ours", tmp_path, torch.float32, library=str(tmp_path / "earlier"))
    assert set(measured) == PROBE_FIELDS
    assert measured["weight_bytes"] == (4 * 3 + 3) * 4  # the earlier library's model, not this one's
    assert Path(measured["library"]).resolve() == (earlier / "__init__.py").resolve()
