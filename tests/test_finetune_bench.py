"""The fine-tuning measurements: one LoRA step against transformers + peft (`bench.finetune_step`), the memory each
method needs (`bench.memory_fit`), and the chapter's new tasks (`training.new_tasks`)."""

from __future__ import annotations

import json
import random

import pytest

from paligemma.bench import PRESETS, finetune_step, memory_fit, transfer_study
from paligemma.models.config import PaliGemmaConfig
from paligemma.training import new_tasks, shapes


def test_one_lora_step_runs_the_same_step_in_both_libraries(tmp_path):
    """The tiny preset end to end: both processes train the same adapters on the same batch; B = 0 at the start, so
    the first losses are the base model's, the same in both up to bf16 rounding."""
    report = finetune_step.run("tiny", text_tokens=16, steps=1, warmup=1, repeats=1, workdir=str(tmp_path),
                               log=lambda message: None)
    ours, theirs = report["summary"]["ours"], report["summary"]["transformers+peft"]
    assert ours["trainable_parameters"] == theirs["trainable_parameters"] > 0
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=2e-2)
    assert all(row["median_seconds_per_step"] > 0 and row["peak_rss_gb"] > 0 for row in report["summary"].values())
    assert "ours is" in finetune_step.format_summary(json.loads(json.dumps(report)))


def test_bytes_per_parameter_are_those_of_the_bf16_recipe():
    """Measured after an AdamW step: trainable weights, gradients and two moments in fp32; frozen weights in bf16."""
    for method in ("full", "lora"):
        measured = memory_fit.bytes_per_parameter(method)
        assert measured["trainable"] == 16.0
        assert measured["frozen"] == (0.0 if method == "full" else 2.0)


def test_saved_activations_shrink_with_lora_and_with_checkpointing():
    config = memory_fit.with_depths(PaliGemmaConfig.from_dict(PRESETS["tiny"]), 2, 2, 56)
    full = memory_fit.saved_bytes(config, "full", False)
    lora = memory_fit.saved_bytes(config, "lora", False)
    checkpointed = memory_fit.saved_bytes(config, "full", True)
    assert 0 < lora["activations"] < full["activations"] and 0 < checkpointed["activations"] < full["activations"]
    assert lora["casts"] < full["casts"]  # autocast copies only of what trains in fp32


def test_a_parabola_through_three_points_is_exact_on_one():
    small = {56: {"part": 1 + 2 * 16 + 3 * 16**2}, 112: {"part": 1 + 2 * 64 + 3 * 64**2},
             168: {"part": 1 + 2 * 144 + 3 * 144**2}}
    config = PaliGemmaConfig.from_dict(PRESETS["tiny"])
    assert memory_fit.extrapolate(small, config, 4096) == {"part": 1 + 2 * 4096 + 3 * 4096**2}
    assert memory_fit.max_batch(10.0, 3.0, 20.0) == 3 and memory_fit.max_batch(30.0, 3.0, 20.0) == 0


# --- the chapter's new tasks ------------------------------------------------------------------------------------


def test_relation_answers_name_the_nearest_shape_to_the_left():
    for seed in range(30):
        (scene,), prompt, answer = new_tasks.relation_example(random.Random(seed), 112)
        kind = prompt.removeprefix("answer en what is left of the ").removesuffix("?")
        subject = next(s for s in scene.shapes if s.kind == kind)
        left = [s for s in scene.shapes if s.box[0] + s.box[2] < subject.box[0] + subject.box[2]]
        if not left:
            assert answer == "nothing"
        else:
            nearest = max(left, key=lambda s: s.box[0] + s.box[2])
            assert answer == f"a {nearest.color} {nearest.kind}"


def test_the_star_is_the_only_shape_of_its_colour_and_is_drawn():
    for seed in range(20):
        (scene,), prompt, answer = new_tasks.star_example(random.Random(seed), 112)
        star = [s for s in scene.shapes if s.kind == "star"]
        assert len(star) == 1 and answer == star[0].color
        assert [s.color for s in scene.shapes].count(answer) == 1
        x0, y0, x1, y1 = star[0].box
        assert scene.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == shapes.COLORS[answer]  # its centre is filled


def test_pairs_answer_the_count_over_both_images():
    for seed in range(20):
        scenes, prompt, answer = new_tasks.pairs_example(random.Random(seed), 112)
        assert len(scenes) == 2 and int(answer) == sum(len(s.shapes) for s in scenes)


@pytest.mark.parametrize("task", new_tasks.TASKS)
def test_written_tasks_read_back_as_fine_tuning_data(task, tmp_path):
    from paligemma import load_pretrained
    from paligemma.training.data import read_examples

    path = new_tasks.write_task(task, tmp_path, 12, seed=1)
    examples = read_examples(path, load_pretrained("tiny-shapes", accelerate=False)[1])
    assert len(examples) == 12 and {len(e.images) for e in examples} == {2 if task == "pairs" else 1}
    assert path.read_text() == new_tasks.write_task(task, tmp_path / "again", 12, seed=1).read_text()


def test_the_transfer_study_scores_forgetting_and_resumes(tmp_path, monkeypatch):
    """Two tiny runs through the command line: each record holds the held-out score, the drop on the original tasks
    (the base's score minus the run's) and the costs; started again, the study reuses the finished runs."""
    monkeypatch.setattr(transfer_study, "HELD_OUT", 6)
    monkeypatch.setattr(transfer_study, "ORIGINAL_SCENES", 3)
    arguments = (tmp_path, ("star",), ("lora", "scratch"), (8,), 2, 1)
    report = transfer_study.study(*arguments, log=lambda message: None)
    assert [(r["method"], r["train_examples"]) for r in report["runs"]] == [("lora", 8), ("scratch", 8)]
    for row in report["runs"]:
        assert 0 <= row["score"] <= 1 and row["trainable_parameters"] > 0 and row["train_seconds"] > 0
        assert row["forgetting"] == {k: round(report["baseline_original_tasks"][k] - v, 4)
                                     for k, v in row["original_tasks"].items()}
    lora, scratch = report["runs"]
    assert lora["trainable_parameters"] < scratch["trainable_parameters"] == scratch["parameters"]
    record = tmp_path / "star" / "lora-8" / "record.json"
    written = record.stat().st_mtime_ns
    assert transfer_study.study(*arguments, log=lambda message: None)["runs"] == report["runs"]
    assert record.stat().st_mtime_ns == written  # not trained again
    table = transfer_study.format_table(report)
    assert "| star | lora | " in table and "| star | scratch | " in table


def test_a_report_is_saved_with_the_command_that_made_it(tmp_path):
    from paligemma.bench.command import save_report

    report = {"rows": [1, 2]}
    save_report(report, str(tmp_path / "new" / "report.json"), "paligemma.bench.memory_fit", ["--preset", "tiny"])
    saved = json.loads((tmp_path / "new" / "report.json").read_text())
    assert saved == {"rows": [1, 2], "command": "python -m paligemma.bench.memory_fit --preset tiny"}
    assert not list((tmp_path / "new").glob("*.partial"))  # written through a temporary file and a rename
