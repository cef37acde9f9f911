"""The plan for real sizes (`bench.distributed_plan`): counts from the real configs, what sharding divides and what
it does not, the FLOPs, and the one case this machine can measure, two gloo processes on tiny-shapes."""

from __future__ import annotations

import pytest

from paligemma.bench import distributed_plan as plan
from paligemma.bench.memory_fit import parameter_counts


def test_the_real_configs_have_the_published_sizes():
    """PaliGemma 3B has 2,923,466,480 parameters (transformers' count of paligemma-3b-pt-224); PaliGemma 2's
    three decoders make models of about 3, 10 and 28 billion."""
    assert plan.count(plan.model_config("PaliGemma 3B", 224), "full").trainable == 2_923_466_480
    for name, low, high in [("PaliGemma 2 3B", 2.9e9, 3.2e9), ("PaliGemma 2 10B", 9.4e9, 10e9),
                            ("PaliGemma 2 28B", 27e9, 28.5e9)]:
        counts = plan.count(plan.model_config(name, 448), "full")
        assert low < counts.trainable < high and counts.frozen == 0
        lora = plan.count(plan.model_config(name, 448), "lora")
        assert lora.trainable + lora.frozen > counts.trainable > 100 * lora.trainable  # the base, plus adapters
    assert plan.model_config("PaliGemma 2 28B", 896).num_image_tokens == 4096


def test_fsdp_divides_weights_gradients_and_optimiser_but_not_the_gathered_layers():
    counts = plan.count(plan.model_config("PaliGemma 2 10B", 224), "full")
    alone, eight, sixteen = (plan.static_bytes(counts, shards) for shards in (1, 8, 16))
    for part in ("weights", "gradients", "optimizer"):
        assert alone[part] == pytest.approx(8 * eight[part]) == pytest.approx(16 * sixteen[part])
    assert alone["weights"] == 4 * counts.trainable and alone["optimizer"] == 8 * counts.trainable
    assert "gathered" not in alone and eight["gathered"] == sixteen["gathered"] > 2 * 2 * counts.largest_layer


def test_lora_and_checkpointing_change_the_flops_as_stated():
    config = plan.model_config("PaliGemma 3B", 224)
    full, lora = plan.count(config, "full"), plan.count(config, "lora")
    flops = {(method, c): plan.training_flops(config, counts, method, c)
             for method, counts in (("full", full), ("lora", lora)) for c in (False, True)}
    tokens = config.num_image_tokens + plan.TEXT_TOKENS
    assert 6 * full.decoder * tokens < flops["full", False] < 8 * (full.vision + full.decoder) * tokens
    assert flops["lora", False] < flops["full", False] < flops["full", True]
    assert flops["lora", True] < flops["full", True]
    # every parameter is counted once: in the tower (with the projector), the decoder's layers or the head
    assert full.vision + full.decoder + full.head == parameter_counts(config, "full")["trainable"]


def test_two_processes_hold_what_the_plan_predicts():
    """Each rank of the FSDP run holds exactly half of the weights, gradients and AdamW moments, and keeps the
    activations one process keeps at the same local batch; the plan's batch-1 figure, doubled, is an upper bound
    (part of what a step keeps does not grow with the batch)."""
    report = plan.check(log=lambda message: None)
    predicted = report["predicted_per_rank"]
    for rank in report["measured"]:
        for part in ("weights", "gradients", "optimizer"):
            assert rank[part] == predicted[part]
        assert rank["activations"] == report["one_process_activations_at_the_same_batch"]
        assert report["activations_per_example_at_batch_1"] < rank["activations"] <= predicted["activations"]
