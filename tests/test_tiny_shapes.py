"""The shapes world, the training loop, and the shipped `tiny-shapes` model held to its quality bars."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import strip_after_eos
from paligemma import generate, load_pretrained
from paligemma.training import shapes
from paligemma.io.checkpoint import resolve_checkpoint
from paligemma.errors import PaliGemmaError
from paligemma.tasks.locations import DetectedObject, box_iou, encode_objects, parse_locations
from paligemma.training.pretrain import HELD_OUT_SEED, TrainSettings, build_optimizer, evaluate, init_weights, learning_rate_at
from paligemma.training.pretrain import training_batch

ROOT = Path(__file__).resolve().parent.parent
BARS = {"caption_exact_match": 0.90, "color_accuracy": 0.95, "count_accuracy": 0.95, "detect_mean_iou": 0.60}
# The shipped model does not yet meet every bar (issue 4 stays open until it does). The tests that hold it to the
# bars are strict expected failures meanwhile: the day they pass, they fail, and this line must change.
BARS_MET = True
expected_below_bars = pytest.mark.xfail(not BARS_MET, strict=True, reason="tiny-shapes is below its quality bars")
CAPTION = re.compile(r"^an? (red|green|blue|yellow|purple) (circle|square|triangle)"
                     r"((, an? \w+ \w+)* and an? (red|green|blue|yellow|purple) (circle|square|triangle))?$")


def test_scenes_are_deterministic_and_tasks_well_formed():
    first, again = shapes.make_dataset(5, 40), shapes.make_dataset(5, 40)
    assert [(e.prompt, e.answer) for e in first] == [(e.prompt, e.answer) for e in again]
    assert first[0].scene.image.tobytes() == again[0].scene.image.tobytes()
    for example in shapes.make_dataset(6, 200):
        scene = example.scene
        assert 1 <= len(scene.shapes) <= 3 and scene.image.size == (112, 112)
        if example.task == "count":
            assert example.answer == str(len(scene.shapes))
        elif example.task == "color":
            assert [s.kind for s in scene.shapes].count(example.subject) == 1
            assert example.answer in shapes.COLORS
        elif example.task == "detect":
            objects = parse_locations(example.answer, 112, 112)
            truth = [s for s in scene.shapes if s.kind == example.subject]
            assert len(objects) == len(truth) and all(o.label == example.subject for o in objects)
        else:
            assert example.answer.count(" and ") == (len(scene.shapes) > 1)
    # boxes never overlap, and no two centres are so close left to right that the caption's order is a toss-up
    for example in shapes.make_dataset(7, 100):
        boxes = [s.box for s in example.scene.shapes]
        assert all(box_iou(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
        centres = sorted((box[0] + box[2]) / 2 for box in boxes)
        assert all(right - left >= 112 // 10 for left, right in zip(centres, centres[1:])), boxes


def test_location_round_trip_and_errors():
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(20, 2000), rng.randint(20, 2000)
        x0, y0 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
        box = (x0, y0, rng.uniform(x0 + 5, width), rng.uniform(y0 + 5, height))
        (parsed,) = parse_locations(encode_objects([DetectedObject("cat", box)], width, height), width, height)
        assert parsed.label == "cat"
        # within half a bin, or one bin at the far edge where bin 1024 is clipped to 1023
        assert all(abs(a - b) <= extent / 1024 + 1e-9 for a, b, extent in zip(parsed.box, box, (width, height) * 2))
    two = parse_locations("<loc0000><loc0000><loc0512><loc0512> a ; <loc0512><loc0512><loc1023><loc1023> b", 100, 200)
    assert [o.label for o in two] == ["a", "b"] and two[0].box == (0.0, 0.0, 50.0, 100.0)
    assert parse_locations("", 10, 10) == []
    for bad in ("<loc0001><loc0002> cat", "a cat", "<loc0001><loc0002><loc0003><locXXXX> cat"):
        with pytest.raises(PaliGemmaError, match="not a detection"):
            parse_locations(bad, 100, 100)


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-5)
    rates = [learning_rate_at(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # cosine decay never rises
    assert rates[-1] == pytest.approx(1e-5, rel=0.05)


def test_a_few_training_steps_lower_the_loss():
    """From scratch, on a model smaller than tiny-shapes: 60 steps must cut the answer loss by more than half."""
    model, processor = load_pretrained("tiny-shapes")
    small_config = type(model.config).from_dict({
        **model.config.to_dict(),
        "vision_config": {**model.config.vision_config.to_dict(), "num_hidden_layers": 1, "hidden_size": 32,
                          "intermediate_size": 64},
        "text_config": {**model.config.text_config.to_dict(), "num_hidden_layers": 1, "hidden_size": 64,
                        "intermediate_size": 128, "head_dim": 16},
        "projection_dim": 64,
    })
    small = type(model)(small_config)
    init_weights(small, seed=0)
    settings = TrainSettings(steps=60, batch_size=8, learning_rate=3e-3, warmup_steps=5)
    optimizer = build_optimizer(small, settings)
    rng, losses = random.Random(0), []
    torch.manual_seed(0)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        batch = training_batch(processor, [shapes.make_example(rng) for _ in range(settings.batch_size)], "cpu")
        loss = small(**batch, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_the_vision_stage_trains_the_vision_tower_alone():
    """Stage 0 lowers its per-patch loss and leaves every weight outside the vision tower as it was."""
    from paligemma.training.pretrain import pretrain_vision, prepare

    model, _ = prepare(Path(resolve_checkpoint("tiny-shapes")), seed=0)  # a fresh model; reads the shipped tokenizer
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(0)
    history = pretrain_vision(model, TrainSettings(vision_steps=30, vision_batch_size=16, warmup_steps=5), log=lambda *_: None)
    assert len(history) == 30
    assert sum(h["loss"] for h in history[-5:]) < 0.7 * sum(h["loss"] for h in history[:5]), history
    for name, tensor in model.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == name.startswith("vision_tower."), name


def test_patch_targets_say_what_each_patch_shows():
    """Shares of background and of each (kind, colour) pair sum to one per patch, follow the drawn pixels, and a
    patch mostly inside a shape carries that shape's box."""
    import random

    from paligemma.training import shapes
    from paligemma.training.pretrain import PAIRS, patch_targets

    scenes = [shapes.make_scene(random.Random(seed)) for seed in range(6)]
    shares, boxes, has_box = patch_targets(scenes, patch_size=14)
    assert shares.shape == (6, 64, 16) and boxes.shape == (6, 64, 4) and has_box.shape == (6, 64)
    torch.testing.assert_close(shares.sum(dim=-1), torch.ones(6, 64))
    for i, scene in enumerate(scenes):
        pixels = torch.tensor(list(shapes.label_map(scene).tobytes())).reshape(112, 112)
        for j, shape in enumerate(scene.shapes):
            same_pair = [k + 1 for k, other in enumerate(scene.shapes) if (other.kind, other.color) == (shape.kind, shape.color)]
            pair_pixels = sum((pixels == k).float() for k in same_pair)  # [112, 112]
            expected_share = pair_pixels.reshape(8, 14, 8, 14).mean(dim=(1, 3)).flatten()  # [64]
            torch.testing.assert_close(shares[i, :, 1 + PAIRS.index((shape.kind, shape.color))], expected_share)
            share = (pixels == j + 1).float().reshape(8, 14, 8, 14).mean(dim=(1, 3)).flatten()  # [64]: this shape's
            mostly = share > 0.5
            assert mostly.any()
            x0, y0, x1, y1 = shape.box
            expected = torch.tensor([x0, y0, x1 + 1, y1 + 1]) / 112
            torch.testing.assert_close(boxes[i, mostly], expected.expand(int(mostly.sum()), 4))
            assert has_box[i, mostly].all()
        assert not has_box[i, shares[i, :, 0] == 1].any()  # background-only patches have no box


def test_resuming_continues_where_training_stopped(tmp_path):
    from paligemma.training.pretrain import train

    settings = TrainSettings(steps=4, vision_steps=2, batch_size=2, eval_every=1000, eval_examples=4,
                             checkpoint_every=2)
    train(tmp_path / "a", TrainSettings(**{**settings.__dict__, "steps": 2}), log=lambda *_: None)
    resumed = train(tmp_path / "a", settings, log=lambda *_: None)
    straight = train(tmp_path / "b", settings, log=lambda *_: None)
    assert resumed["step"] == straight["step"] == 4
    a, _ = load_pretrained(tmp_path / "a")
    b, _ = load_pretrained(tmp_path / "b")
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b.state_dict()[name], atol=1e-5, rtol=1e-4)


def test_shipped_checkpoint_is_small_and_complete():
    folder = resolve_checkpoint("tiny-shapes")
    assert {"config.json", "model.safetensors", "tokenizer.model", "training_log.json", "evaluation.json"} <= {
        p.name for p in folder.iterdir()}
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20
    recorded = json.loads((folder / "evaluation.json").read_text())
    assert recorded["examples"] >= 500 and recorded["seed"] == HELD_OUT_SEED


def test_recorded_evaluation_is_reproducible():
    """The shipped evaluation.json is what scoring the shipped model on the same held-out scenes gives."""
    from paligemma.training.pretrain import evaluate_checkpoint

    recorded = json.loads((resolve_checkpoint("tiny-shapes") / "evaluation.json").read_text())
    again = evaluate_checkpoint("tiny-shapes", recorded["examples"], recorded["seed"])
    for key in BARS:
        assert abs(again[key] - recorded[key]) <= 0.01, (key, again[key], recorded[key])


@expected_below_bars
def test_recorded_evaluation_meets_the_bars():
    recorded = json.loads((resolve_checkpoint("tiny-shapes") / "evaluation.json").read_text())
    for key, bar in BARS.items():
        assert recorded[key] >= bar, (key, recorded[key])


@expected_below_bars
def test_shipped_checkpoint_meets_the_bars_on_fresh_scenes():
    """A sample small enough for CI, made with a seed neither training nor the recorded evaluation used."""
    model, processor = load_pretrained("tiny-shapes")
    examples = [e for task in shapes.TASKS for e in shapes.make_dataset(HELD_OUT_SEED + 17, 40, task=task)]
    metrics = evaluate(model, processor, examples)
    for key, bar in BARS.items():
        assert metrics[key] >= bar, metrics


def test_transformers_generates_the_same_answers_from_the_shipped_folder():
    from paligemma.book import load_reference

    model, processor = load_pretrained("tiny-shapes")
    reference = load_reference("tiny-shapes")
    examples = shapes.make_dataset(HELD_OUT_SEED + 1, 8)
    prompts, images = [e.prompt for e in examples], [e.scene.image for e in examples]
    batch = processor(text=prompts, images=images)
    with torch.no_grad():
        generated = reference.generate(**batch, max_new_tokens=24, do_sample=False)[:, batch["input_ids"].shape[1]:]
    expected = strip_after_eos(generated.tolist(), model.config.text_config.eos_token_id)
    assert generate(model, processor, images, prompts, max_new_tokens=24, return_ids=True).token_ids == expected


SAMPLE_SCENES = [(1, 101), (2, 202), (3, 303), (4, 404)]


def default_cli_caption(number: int) -> str:
    env = {key: value for key, value in os.environ.items() if key != "PALIGEMMA_MODEL"}
    image = ROOT / "images" / f"shapes_{number}.png"
    result = subprocess.run([sys.executable, "-m", "paligemma", "--image", str(image), "--prompt", "caption en"],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_sample_scene_files_are_the_seeded_scenes():
    for number, seed in SAMPLE_SCENES:
        on_disk = Image.open(ROOT / "images" / f"shapes_{number}.png").convert("RGB")
        assert on_disk.tobytes() == shapes.make_scene(random.Random(seed)).image.tobytes()


def test_default_cli_run_writes_a_caption():
    """With no --model, the CLI answers with the shipped tiny-shapes, in the captions' grammar."""
    assert CAPTION.match(default_cli_caption(3)), "not a caption of the shapes world"


@expected_below_bars
def test_default_cli_run_captions_every_sample_scene_correctly():
    got = [default_cli_caption(number) for number, _ in SAMPLE_SCENES]
    assert got == [shapes.caption(shapes.make_scene(random.Random(seed))) for _, seed in SAMPLE_SCENES]
