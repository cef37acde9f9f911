"""Fine-tuning: the JSONL data and its errors, the methods, the loop's accumulation and checkpointing, the outputs,
and resuming after SIGKILL to bit-identical weights. Runs on the shipped tiny-shapes model, fp32, CPU."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paligemma import PaliGemmaError, load_pretrained
from paligemma.io.safetensors import SafetensorsFile
from paligemma.training import resume, shapes
from paligemma.training.data import DataError, batch_indices, collate, read_examples
from paligemma.training.finetune import FinetuneSettings, finetune, prepare_run, step_loss
from paligemma.training.methods import count_parameters, select_trainable
from paligemma.training.scoring import answer_score

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-shapes"


def write_dataset(folder: Path, name: str, seed: int, count: int, two_images: bool = False) -> Path:
    """A JSONL file of shapes-world examples (the caption task; pairs of scenes for `two_images`), images beside it."""
    rng = random.Random(seed)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        first = shapes.make_example(rng, 112, task="caption")
        file = f"imgs/{name}_{i}.png"
        first.scene.image.save(folder / file)
        if two_images:
            second = shapes.make_scene(rng, 112)
            other = f"imgs/{name}_{i}_b.png"
            second.image.save(folder / other)
            same = len(first.scene.shapes) == len(second.shapes)
            lines.append({"images": [file, other], "prefix": "answer en same number of shapes?",
                          "suffix": "yes" if same else "no"})
        else:
            lines.append({"image": file, "prefix": first.prompt, "suffix": first.answer})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("finetune-data")
    return {"train": write_dataset(folder, "train", 0, 24), "eval": write_dataset(folder, "val", 1, 6),
            "pairs": write_dataset(folder, "pairs", 2, 8, two_images=True), "folder": folder}


@pytest.fixture(scope="module")
def processor():
    return load_pretrained(MODEL, accelerate=False)[1]


def small(**changes) -> FinetuneSettings:
    values = dict(method="lora", steps=4, batch_size=4, learning_rate=1e-3, eval_every=2, checkpoint_every=2)
    return FinetuneSettings(**{**values, **changes})


# --- data ------------------------------------------------------------------------------------------------------------


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prefix": "caption en", "suffix": "x"}', "give exactly one of 'image'"),
    ('{"image": "imgs/train_0.png", "images": ["imgs/train_0.png"], "prefix": "p", "suffix": "x"}',
     "give exactly one of 'image'"),
    ('{"images": [], "prefix": "p", "suffix": "x"}', "'images' must be a non-empty list"),
    ('{"image": "imgs/train_0.png", "suffix": "x"}', "missing field 'prefix'"),
    ('{"image": "imgs/train_0.png", "prefix": "p"}', "missing field 'suffix'"),
    ('{"image": "imgs/train_0.png", "prefix": 3, "suffix": "x"}', "'prefix' must be a string"),
    ('{"image": "imgs/train_0.png", "prefix": "p", "suffix": "  "}', "empty 'suffix'"),
    ('{"image": "imgs/nowhere.png", "prefix": "p", "suffix": "x"}', "image not found"),
    ('{"image": "broken.png", "prefix": "p", "suffix": "x"}', "not a readable image"),
    ('{"image": "imgs/train_0.png", "prefix": "' + "circle " * 300 + '", "suffix": "x"}',
     "longer than the model's context of 256"),
]


@pytest.mark.parametrize("line, problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_a_bad_line_is_named_with_its_number(data, processor, line, problem):
    (data["folder"] / "broken.png").write_bytes(b"\x89PNG not really")
    good = data["train"].read_text().splitlines()[:3]
    path = data["folder"] / "bad.jsonl"
    path.write_text("\n".join(good[:2] + [""] + [line] + good[2:]) + "\n")  # a blank line is skipped but counted
    with pytest.raises(DataError) as caught:
        read_examples(path, processor)
    message = str(caught.value)
    assert message.startswith("bad.jsonl:4: ") and problem in message and "\n" not in message


def test_examples_read_with_paths_relative_to_the_file(data, processor):
    examples = read_examples(data["pairs"], processor)
    assert len(examples) == 8 and all(len(e.images) == 2 and e.images[0].is_file() for e in examples)
    assert examples[0].line == 1


def test_every_example_is_seen_once_per_epoch_in_a_seeded_order():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]  # two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen == [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert seen != [i for step in range(5) for i in batch_indices(10, 4, step, seed=4)]


def test_the_batch_teaches_the_answer_only(data, processor):
    examples = read_examples(data["pairs"], processor)[:3]
    batch = collate(processor, examples)
    labelled = batch["labels"] != -100
    assert bool((labelled == (batch["token_type_ids"] == 1)).all())  # not the images, prompt or padding
    assert bool((batch["attention_mask"][labelled] == 1).all())
    assert batch["pixel_values"].shape[0] == 6  # two images each, in order


# --- methods -----------------------------------------------------------------------------------------------------


def trainable_names(method: str) -> set[str]:
    model, _ = load_pretrained(MODEL, accelerate=False)
    select_trainable(model, method)
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_each_method_trains_what_it_says():
    full, frozen_tower, attention, lora = (trainable_names(m) for m in ("full", "freeze-vision", "attention", "lora"))
    assert any(n.startswith("vision_tower.") for n in full)
    assert frozen_tower == {n for n in full if not n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert attention == {n for n in full if n.startswith("language_model.layers.") and
                         n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert all(n.startswith("language_model.") for n in lora)


def test_lora_trains_a_few_percent():
    model, _ = load_pretrained(MODEL, accelerate=False)
    select_trainable(model, "lora")
    trained, total = count_parameters(model)
    assert 0 < trained / total < 0.05


# --- the loop --------------------------------------------------------------------------------------------------------


def gradients(run) -> dict[str, torch.Tensor]:
    run.model.zero_grad(set_to_none=True)
    compute = step_loss(run, 0)
    for micro in range(run.settings.grad_accumulation):
        compute(micro).backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulated_micro_batches_give_the_whole_batch_gradient(data, method):
    """Answers differ in length, so the micro-batches' losses are weighted by their share of answer tokens."""
    torch.manual_seed(0)
    whole = gradients(prepare_run(MODEL, data["train"], small(method=method, batch_size=8)))
    split = gradients(prepare_run(MODEL, data["train"], small(method=method, batch_size=8, grad_accumulation=4)))
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_gives_the_same_gradients(data):
    plain = gradients(prepare_run(MODEL, data["train"], small(method="full")))
    run = prepare_run(MODEL, data["train"], small(method="full", activation_checkpointing=True))
    assert list(dict(run.model.named_parameters())) == list(dict(prepare_run(
        MODEL, data["train"], small(method="full")).model.named_parameters()))  # the names stay
    checkpointed = gradients(run)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_scores():
    assert answer_score("red", " red ") == 1.0 and answer_score("red", "blue") == 0.0
    box = "<loc0100><loc0100><loc0300><loc0300> circle"
    assert answer_score(box, box) == 1.0
    assert answer_score(box, "<loc0100><loc0100><loc0300><loc0500> circle") == pytest.approx(0.5)
    assert answer_score(box, "<loc0100><loc0100><loc0300><loc0300> square") == 0.0
    assert answer_score(box, "no box") == 0.0


# --- a whole run -------------------------------------------------------------------------------------------------


def test_a_lora_run_writes_the_model_the_adapter_and_the_record(data, tmp_path):
    out = tmp_path / "run"
    record = finetune(MODEL, data["train"], out, small(), eval_file=data["eval"], log=None)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.model").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "record.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [h["step"] for h in saved["history"]] == [1, 2, 3, 4]
    assert [e["step"] for e in saved["evaluations"]] == [2, 4]
    assert 0 <= saved["evaluations"][-1]["score"] <= 1 and saved["evaluations"][-1]["examples"] == 6
    assert saved["settings"]["method"] == "lora" and saved["trainable_parameters"] < saved["parameters"]
    names = SafetensorsFile((out / "model" / "model.safetensors")).entries
    assert not any("lora" in name for name in names)  # merged
    model, _ = load_pretrained(out / "model")
    assert model.num_parameters() == saved["parameters"] - saved["trainable_parameters"]


def test_fine_tuning_learns_its_data(data, tmp_path):
    settings = small(steps=30, batch_size=8, learning_rate=1e-2, eval_every=30, checkpoint_every=30)
    record = finetune(MODEL, data["pairs"], tmp_path / "run", settings, eval_file=data["pairs"], log=None)
    losses = [h["loss"] for h in record["history"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert record["evaluations"][-1]["score"] == 1.0  # its own eight pairs, answered right


def test_two_images_per_example_train_and_generate(data, tmp_path):
    record = finetune(MODEL, data["pairs"], tmp_path / "run", small(), eval_file=data["pairs"], log=None)
    assert record["evaluations"][-1]["examples"] == 8


# --- refusals and faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, problem", [
    (dict(steps=0), "steps must be at least 1"),
    (dict(batch_size=3, grad_accumulation=4), "batch-size 3 with grad-accumulation 4 leaves a micro-batch empty"),
    (dict(method="prefix"), "unknown method"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(learning_rate=0.0), "learning rates must satisfy"),
    (dict(lora_rank=0), "at least 1"),
    (dict(warmup_fraction=1.0), "warmup-fraction"),
])
def test_impossible_settings_are_refused(changes, problem):
    with pytest.raises(PaliGemmaError, match=problem):
        small(**changes)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paligemma.finetune", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)


def test_the_command_stops_on_a_bad_line_and_writes_nothing(data, tmp_path):
    path = data["folder"] / "bad_cli.jsonl"
    lines = data["train"].read_text().splitlines()
    path.write_text("\n".join(lines[:16] + ['{"image": "imgs/train_0.png", "prefix": "caption en"}']) + "\n")
    out = tmp_path / "never"
    result = run_cli("--model", MODEL, "--train", str(path), "--out", str(out), "--steps", "2")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: bad_cli.jsonl:17: missing field 'suffix'"
    assert not out.exists()


def test_an_unwritable_out_is_named_in_one_line(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("--model", MODEL, "--train", str(data["train"]), "--out", str(blocker / "run"), "--steps", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot write to --out {blocker / 'run'}")


def test_a_full_disk_is_named_in_one_line(data, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # what DCP's file writer writes each tensor with
    with pytest.raises(PaliGemmaError, match="^no space left on the device while writing .*checkpoint.partial$"):
        finetune(MODEL, data["train"], tmp_path / "run", small(), log=None)


def test_a_kill_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, saves = resume.dcp.save, []

    def dies_while_writing_the_second(state, checkpoint_id, **kwargs):
        saves.append(Path(checkpoint_id))
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if len(saves) == 2:
            shard = next(Path(checkpoint_id).glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[:1000])  # cut short mid-write
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.dcp, "save", dies_while_writing_the_second)
    with pytest.raises(KeyboardInterrupt):
        finetune(MODEL, data["train"], out, small(steps=4), log=None)
    assert saves[1].name == "checkpoint.partial"
    assert resume.latest_checkpoint(out) == out / "checkpoint"
    assert resume.read_progress(out / "checkpoint")["step"] == 2  # the previous checkpoint, whole
    monkeypatch.setattr(resume.dcp, "save", real_save)
    record = finetune(MODEL, data["train"], out, small(steps=4), log=None, resume=True)
    assert [h["step"] for h in record["history"]] == [1, 2, 3, 4]


def test_a_kill_between_the_renames_resumes_from_the_previous_checkpoint(data, tmp_path, monkeypatch):
    """Saving moves the old checkpoint aside before renaming the new one in: dying between the two leaves only
    checkpoint.previous/, and resuming starts from it."""
    out = tmp_path / "run"
    real_rename, renames = Path.rename, []

    def dies_after_moving_the_old_one_aside(self, target):
        if Path(target).name.startswith("checkpoint"):  # not DCP's own renames inside the folder
            renames.append(Path(target).name)
        result = real_rename(self, target)
        if Path(target).name == "checkpoint.previous":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", dies_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        finetune(MODEL, data["train"], out, small(steps=4), log=None)
    assert renames == ["checkpoint", "checkpoint.previous"]  # the first save, then the second's move aside
    assert not (out / "checkpoint").exists() and (out / "checkpoint.partial").exists()
    assert resume.latest_checkpoint(out) == out / "checkpoint.previous"
    monkeypatch.setattr(Path, "rename", real_rename)
    whole = finetune(MODEL, data["train"], tmp_path / "whole", small(steps=4), log=None)
    again = finetune(MODEL, data["train"], out, small(steps=4), log=None, resume=True)
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in whole["history"]]
    assert final_weights(out).keys() == final_weights(tmp_path / "whole").keys()
    assert all(torch.equal(a, b) for a, b in zip(final_weights(out).values(), final_weights(tmp_path / "whole").values()))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(out / "model" / "model.safetensors")
    return {name: file.tensor(name) for name in file.entries}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_sigkill_reaches_the_same_weights(data, tmp_path, method):
    args = ["--model", MODEL, "--train", str(data["train"]), "--eval", str(data["eval"]), "--method", method,
            "--steps", "8", "--batch-size", "4", "--learning-rate", "1e-3", "--lora-dropout", "0.1",
            "--eval-every", "3", "--checkpoint-every", "2"]
    assert run_cli(*args, "--out", str(tmp_path / "whole")).returncode == 0

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "paligemma.finetune", *args, "--out", str(out)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it once a checkpoint past the first is on disk
        record = out / "record.json"
        if record.is_file() and json.loads(record.read_text())["history"][-1]["step"] >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists()  # it did not finish
    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    whole, again = final_weights(tmp_path / "whole"), final_weights(out)
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[name], again[name]) for name in whole)  # bit for bit
    records = [json.loads((folder / "record.json").read_text()) for folder in (tmp_path / "whole", out)]
    assert [h["loss"] for h in records[0]["history"]] == [h["loss"] for h in records[1]["history"]]


# --- what the run writes, in transformers and peft ------------------------------------------------------------------


def test_the_fine_tuned_model_and_adapter_load_in_transformers_and_peft(data, tmp_path):
    """out/model in transformers gives the logits of out/model here, and out/adapter on the base in peft those of
    the same adapter on the base here: to 1e-5, in fp32 with eager attention on both sides."""
    peft = pytest.importorskip("peft")
    from transformers import PaliGemmaForConditionalGeneration as Reference

    from helpers import reference_logits
    from paligemma.io.checkpoint import resolve_checkpoint

    out = tmp_path / "run"
    finetune(MODEL, data["pairs"], out, small(steps=6, learning_rate=1e-2), log=None)

    def our_logits(path, **kwargs):
        model, processor = load_pretrained(path, accelerate=False, **kwargs)
        model.set_attention_implementation("eager")
        batch = collate(processor, read_examples(data["pairs"], processor)[:3])
        with torch.no_grad():
            return model(**batch, position_ids=batch["attention_mask"].cumsum(-1)).logits, batch

    merged_ours, batch = our_logits(out / "model")
    merged = Reference.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="eager").eval()
    assert (reference_logits(merged, batch, labels=batch["labels"]).logits - merged_ours).abs().max() < 1e-5
    adapted_ours, _ = our_logits(MODEL, adapter=out / "adapter")
    base = Reference.from_pretrained(resolve_checkpoint(MODEL), dtype=torch.float32, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(base.eval(), out / "adapter").eval()
    assert (reference_logits(adapted, batch).logits - adapted_ours).abs().max() < 1e-5
    assert (merged_ours - adapted_ours).abs().max() < 1e-4  # merging changes only the rounding
    with adapted.disable_adapter():  # the base model itself, without a second load
        base_logits = reference_logits(adapted, batch).logits
    assert (base_logits - adapted_ours).abs().max() > 1e-2  # the adapter changed something


def test_sgd_bf16_and_checkpointing_run_together(data, tmp_path):
    """The other settings, together: plain SGD with momentum, bf16 autocast with frozen weights kept in bf16, and
    activation checkpointing; the saved model is in the checkpoint's own dtype again."""
    settings = small(method="freeze-vision", optimizer="sgd", momentum=0.9, learning_rate=1e-2, precision="bf16",
                     activation_checkpointing=True)
    record = finetune(MODEL, data["train"], tmp_path / "run", settings, eval_file=data["eval"], log=None)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in record["history"])
    file = SafetensorsFile(tmp_path / "run" / "model" / "model.safetensors")
    assert {file.dtype(name) for name in file.entries} == {torch.float32}
