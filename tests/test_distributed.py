"""Fine-tuning on two processes under torchrun (gloo on the CPU) against one process, on tiny-shapes in fp32.

The tolerances, and why they are what they are. Two ranks and one process add the same numbers in another order:
each rank sums its share of the batch, then the ranks' gradients are summed, so gradients agree to fp32 rounding
(~1e-7 relative), not bit for bit. Plain gradient steps keep such differences at that size. AdamW does not
everywhere: it divides each gradient by its own running size, so an entry whose true gradient is exactly zero
(the vision keys' biases: a bias added to every key shifts a query's scores by a constant, which softmax ignores)
is pure rounding noise, and AdamW turns noise of 1e-10 into a step of about the learning rate, of either sign.
So the losses must agree to 1e-4; LoRA's weights (no such biases train) entry by entry to 1e-6; and for full
fine-tuning the difference of the two runs' updates must be under 0.2% of the update itself.

On the same number of processes the order is the same, and a run restarted after a kill is equal bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from paligemma import PaliGemmaError, load_pretrained
from paligemma.training import new_tasks
from paligemma.training.data import batch_indices
from paligemma.training.distributed import World, rank_share
from paligemma.training.finetune import FinetuneSettings, check_micro_batches, rank_batches

ROOT = Path(__file__).resolve().parent.parent
FAULTY = Path(__file__).resolve().parent / "finetune_with_a_fault.py"
STEPS = 6
# An uneven global batch (5 over 2 ranks: 3 + 2), two micro-batches per rank, and a held-out set of 3 (2 + 1).
SETTINGS = ["--steps", str(STEPS), "--batch-size", "5", "--grad-accumulation", "2", "--learning-rate", "1e-3",
            "--eval-every", "3", "--checkpoint-every", "2", "--threads", "1"]
LOSS_TOLERANCE = 1e-4
LORA_TOLERANCE = 1e-6
FULL_RELATIVE_TOLERANCE = 2e-3


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(out: Path, data: dict[str, Path], method: str, processes: int, *extra: str, script: Path | None = None,
           fault: dict[str, str] | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    """One fine-tuning run: `python -m paligemma.finetune` alone, or under torchrun on `processes` ranks."""
    program = [str(script)] if script else ["-m", "paligemma.finetune"]
    if processes == 1:
        command = [sys.executable, *program]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "--max-restarts", str(restarts), *program]
    command += ["--model", "tiny-shapes", "--train", str(data["train"]), "--eval", str(data["eval"]),
                "--method", method, *SETTINGS, "--out", str(out), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**environment(), **(fault or {})}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: stop torchrun and every worker it started, then fail
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the run did not finish in 300 s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The relation task (new to tiny-shapes, so the loss starts high and moves): 20 to train on, 3 held out."""
    folder = tmp_path_factory.mktemp("relation")
    return {"train": new_tasks.write_task("relation", folder / "train", 20, seed=0),
            "eval": new_tasks.write_task("relation", folder / "eval", 3, seed=1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Finished runs by (method, strategy or 'one'), each made once and shared by the tests that compare with it."""
    folder, made = tmp_path_factory.mktemp("runs"), {}

    def get(method: str, strategy: str) -> Path:
        if (method, strategy) not in made:
            out = folder / f"{method}-{strategy}"
            extra = () if strategy == "one" else ("--distributed", strategy)
            succeeded(launch(out, data, method, 1 if strategy == "one" else 2, *extra))
            made[method, strategy] = out
        return made[method, strategy]
    return get


def weights(out: Path | str) -> dict[str, torch.Tensor]:
    """A run's fine-tuned model (`out/model`), or a model by name, as fp32 tensors by name."""
    folder = out / "model" if isinstance(out, Path) else out
    return {name: tensor.float() for name, tensor in load_pretrained(folder, accelerate=False)[0].state_dict().items()}


def record(out: Path) -> dict:
    return json.loads((out / "record.json").read_text())


def assert_same_run(method: str, ours: Path, reference: Path) -> None:
    """Loss curve, held-out results and final weights within the tolerances of the module's docstring."""
    losses = [h["loss"] for h in record(ours)["history"]]
    expected = [h["loss"] for h in record(reference)["history"]]
    assert len(losses) == len(expected) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, expected)) <= LOSS_TOLERANCE, (losses, expected)
    for mine, theirs in zip(record(ours)["evaluations"], record(reference)["evaluations"]):
        assert mine["examples"] == theirs["examples"] == 3 and mine["score"] == theirs["score"]
        assert abs(mine["held_out_loss"] - theirs["held_out_loss"]) <= LOSS_TOLERANCE
    after, expected_after = weights(ours), weights(reference)
    assert after.keys() == expected_after.keys()
    if method == "lora":
        worst = max((after[n] - expected_after[n]).abs().max().item() for n in after)
        assert worst <= LORA_TOLERANCE, worst
    else:
        before = weights("tiny-shapes")
        difference = sum(((after[n] - expected_after[n]) ** 2).sum() for n in after).sqrt()
        update = sum(((expected_after[n] - before[n]) ** 2).sum() for n in after).sqrt()
        assert difference / update <= FULL_RELATIVE_TOLERANCE, (difference / update).item()


# --- the data each rank reads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count, batch, ranks, micro", [(20, 5, 2, 2), (20, 8, 3, 2), (7, 7, 2, 1), (10, 6, 4, 1)])
def test_each_rank_reads_a_disjoint_share_and_together_the_whole_batch(count, batch, ranks, micro):
    settings = FinetuneSettings(batch_size=batch, grad_accumulation=micro, seed=3)
    epochs = 3
    seen = []
    for step in range(epochs * count // batch + 1):
        shares = [rank_batches(SimpleNamespace(settings=settings, world=World(rank, ranks), train=range(count)),
                               step) for rank in range(ranks)]
        sizes = [len(index) for share in shares for index in share]
        assert min(sizes) >= 1 and max(len(sum(s, [])) for s in shares) - min(len(sum(s, [])) for s in shares) <= 1
        together = [index for share in shares for micro_batch in share for index in micro_batch]
        assert together == batch_indices(count, batch, step, seed=3)  # disjoint positions, the whole global batch
        seen += together
    for epoch in range(epochs):  # the global stream: each example exactly once per epoch
        assert sorted(seen[epoch * count:(epoch + 1) * count]) == list(range(count))


def test_the_shares_differ_by_at_most_one_and_cover_everything():
    for length in range(12):
        for ranks in range(1, 5):
            parts = [rank_share(list(range(length)), rank, ranks) for rank in range(ranks)]
            assert sum(parts, []) == list(range(length))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_batch_too_small_for_every_rank_and_micro_batch_is_refused():
    with pytest.raises(PaliGemmaError, match="batch-size 6 over 4 processes with grad-accumulation 2 leaves a "
                                             "micro-batch empty: batch-size must be at least 8"):
        check_micro_batches(FinetuneSettings(batch_size=6, grad_accumulation=2), World(0, 4))
    check_micro_batches(FinetuneSettings(batch_size=8, grad_accumulation=2), World(0, 4))


# --- two processes compute what one computes -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_take_the_steps_of_one(runs, method, strategy):
    ours = runs(method, strategy)
    assert_same_run(method, ours, runs(method, "one"))
    written = record(ours)
    assert written["distributed"] == {"strategy": strategy, "reshard_after_forward": True, "cpu_offload": False,
                                      "processes": 2, "backend": "gloo"}
    assert len(written["peak_memory"]["per_rank_gb"]) == 2
    assert (ours / "adapter").is_dir() == (method == "lora")
    assert sorted(path.name for path in (ours / "checkpoint").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp_runs_with_bf16_checkpointed_layers_kept_gathered(data, tmp_path):
    """The memory options together: bf16 compute (fp32 reduction), activation checkpointing applied before
    sharding, and layers kept gathered from forward to backward. bf16 is not fp32, so this checks that the run
    learns (its loss falls), not equality."""
    out = tmp_path / "bf16"
    succeeded(launch(out, data, "full", 2, "--distributed", "fsdp", "--precision", "bf16",
                     "--activation-checkpointing", "--no-reshard-after-forward"))
    losses = [h["loss"] for h in record(out)["history"]]
    assert record(out)["distributed"]["reshard_after_forward"] is False
    assert losses[-1] < losses[0] - 1.0, losses


# --- resuming on another number of processes, and after a lost rank --------------------------------------------------


def test_resume_from_two_processes_on_one_and_from_one_on_two(runs, data, tmp_path):
    """Stopped by a SIGKILL at step 3 (after the checkpoint of step 2), continued on the other number of
    processes: the run ends where the uninterrupted one-process run ends."""
    kill = {"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": "3"}
    two_then_one = tmp_path / "two-then-one"
    stopped = launch(two_then_one, data, "lora", 2, "--distributed", "fsdp", script=FAULTY, fault=kill)
    assert stopped.returncode != 0 and not (two_then_one / "model").exists()
    assert json.loads((two_then_one / "checkpoint" / "run.json").read_text())["step"] == 2
    resumed = succeeded(launch(two_then_one, data, "lora", 1, "--resume"))
    assert "resuming from step 2" in resumed.stdout
    assert_same_run("lora", two_then_one, runs("lora", "one"))

    one_then_two = tmp_path / "one-then-two"
    stopped = launch(one_then_two, data, "lora", 1, script=FAULTY, fault={**kill, "FAULT_RANK": "0"})
    assert stopped.returncode == -9 and not (one_then_two / "model").exists()
    resumed = succeeded(launch(one_then_two, data, "lora", 2, "--distributed", "fsdp", "--resume"))
    assert "resuming from step 2" in resumed.stdout
    assert_same_run("lora", one_then_two, runs("lora", "one"))


@pytest.mark.parametrize("strategy", ["fsdp"])
def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_loses_nothing(runs, data, tmp_path, strategy):
    """SIGKILL on rank 1 as it starts step 3, while rank 0 waits for it: torchrun (--max-restarts 1) restarts
    both ranks with the same command, they go on from the checkpoint of step 2, and the weights equal those of the
    run never interrupted, bit for bit."""
    out = tmp_path / "restarted"
    result = succeeded(launch(out, data, "lora", 2, "--distributed", strategy, script=FAULTY, restarts=1,
                              fault={"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": "3"}))
    assert "resuming from step 2" in result.stdout
    assert "error: rank 0 of 2: RuntimeError" in result.stderr  # rank 0 lost its peer mid-collective, and said so
    whole = runs("lora", strategy)
    after, expected = weights(out), weights(whole)
    assert all(torch.equal(after[name], expected[name]) for name in expected)
    assert [h["loss"] for h in record(out)["history"]] == [h["loss"] for h in record(whole)["history"]]


# --- errors ----------------------------------------------------------------------------------------------------------


def test_an_error_on_one_rank_names_it_and_ends_the_group(data, tmp_path):
    result = launch(tmp_path / "failed", data, "lora", 2, "--distributed", "ddp", script=FAULTY,
                    fault={"FAULT": "raise", "FAULT_RANK": "1", "FAULT_STEP": "1"})
    assert result.returncode != 0  # and it returned: rank 0, waiting in a collective, was stopped
    assert "error: rank 1 of 2: injected fault at step 1" in result.stderr
    assert "Traceback" not in result.stderr.split("error: rank 1")[0]


def test_distributed_without_torchrun_and_torchrun_without_distributed_are_refused(data, tmp_path):
    alone = launch(tmp_path / "alone", data, "lora", 1, "--distributed", "fsdp")
    assert alone.returncode == 2 and alone.stderr.startswith("error: --distributed needs several processes "
                                                             "started by torchrun")
    several = launch(tmp_path / "several", data, "lora", 2)
    assert several.returncode != 0
    assert "started by torchrun as 2 processes without --distributed: pass --distributed ddp or " \
           "--distributed fsdp" in several.stderr
    offload = launch(tmp_path / "offload", data, "lora", 1, "--cpu-offload")
    assert offload.returncode == 2 and "need --distributed fsdp" in offload.stderr
    on_cpu = launch(tmp_path / "offload-on-cpu", data, "lora", 2, "--distributed", "fsdp", "--cpu-offload",
                    "--device", "cpu")
    assert "error: rank 0 of 2: --cpu-offload keeps the shards in CPU memory while a GPU computes: it needs " \
           "--device cuda" in on_cpu.stderr
