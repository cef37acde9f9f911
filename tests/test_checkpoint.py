"""Checkpoints: both directions with transformers, shards, key layouts, configs, dtypes and broken folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file


from helpers import (
    TOL,
    assert_matches,
    random_image,
    real_paligemma_3b_224,
    reference_logits,
    tiny_config_dict,
    write_reference_checkpoint,
)
from paligemma import PaliGemmaConfig, PaliGemmaError, load_model, load_pretrained
from paligemma.io.layout import to_disk_name, to_library_name


def logits_of(model, processor, seed=0):
    batch = processor(text=["caption en", "answer en what is this?"], images=[random_image(seed), random_image(seed + 1)])
    with torch.no_grad():
        return model(**batch).logits, batch


def test_reference_checkpoint_loads_with_identical_weights(mqa_checkpoint):
    directory, ref = mqa_checkpoint
    model = load_model(directory)
    ref_state = {to_library_name(k): v for k, v in ref.state_dict().items()}  # the tied head included, as ours
    ours = model.state_dict()
    assert ours.keys() == ref_state.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_state[name]), name
    head, table = model.language_model.lm_head.weight, model.language_model.embed_tokens.weight
    assert head is table, "the output head is the embedding table itself"


def test_our_checkpoint_loads_in_transformers(mqa_checkpoint, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as Reference

    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    reloaded = Reference.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ours_logits, batch = logits_of(model, processor)
    real = batch["attention_mask"].bool()
    assert_matches(reference_logits(reloaded, batch).logits[real], ours_logits[real], **TOL)
    # and back again: our own loader reads what we wrote, bit for bit
    again = load_model(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert (tmp_path / "ours" / "tokenizer.model").is_file()


def test_sharded_checkpoints_both_ways(workdir, tokenizer_file, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as Reference

    directory = workdir / "sharded"
    ref = write_reference_checkpoint(directory, tiny_config_dict(), tokenizer_file, seed=3, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    model, processor = load_pretrained(directory)
    ours_logits, batch = logits_of(model, processor, seed=4)
    real = batch["attention_mask"].bool()
    assert_matches(ours_logits[real], reference_logits(ref, batch).logits[real], **TOL)

    model.save_pretrained(tmp_path / "ours", max_shard_size="50KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = Reference.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert_matches(reference_logits(reloaded, batch).logits[real], ours_logits[real], **TOL)


def rewrite_keys(source, target, rename, extra=None):
    """Copy a single-file checkpoint with its tensor names changed (and tensors added)."""
    shutil.copytree(source, target)
    tensors = load_file(str(source / "model.safetensors"))
    tensors = {rename(name): tensor for name, tensor in tensors.items()}
    tensors.update(extra(tensors) if extra else {})
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "layout, rename",
    [
        ("without vision_model level", lambda n: n.replace("vision_tower.vision_model.", "vision_tower.")),
        ("transformers 5 in-memory names", lambda n: "model." + n.replace("language_model.model.", "language_model.")),
    ],
)
def test_other_key_layouts(mqa_checkpoint, tmp_path, layout, rename):
    directory, ref = mqa_checkpoint
    rewrite_keys(directory, tmp_path / "ckpt", rename)
    model, processor = load_pretrained(tmp_path / "ckpt")
    expected, batch = logits_of(load_model(directory), processor)
    assert_matches(model(**batch).logits, expected, atol=0, rtol=0)


def test_lm_head_present_is_accepted(mqa_checkpoint, tmp_path):
    directory, _ = mqa_checkpoint
    add_head = lambda t: {"language_model.lm_head.weight": t["language_model.model.embed_tokens.weight"].clone()}
    rewrite_keys(directory, tmp_path / "ckpt", lambda n: n, extra=add_head)
    model = load_model(tmp_path / "ckpt")
    lm = model.language_model
    assert lm.lm_head.weight is lm.embed_tokens.weight  # tied: the head is the embedding table


def test_real_sparse_config_parses_like_reference():
    from transformers import PaliGemmaConfig as ReferenceConfig

    values = real_paligemma_3b_224()
    ours, ref = PaliGemmaConfig.from_dict(values), ReferenceConfig(**values)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(ours.vision_config, field) == getattr(ref.vision_config, field), field
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "attention_bias", "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings"):
        assert getattr(ours.text_config, field) == getattr(ref.text_config, field), field
    assert ours.text_config.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    assert ours.image_token_index == ref.image_token_index == 257152
    assert ours.num_image_tokens == ref.text_config.num_image_tokens == 256
    assert ours.dtype == "float32"
    assert not ours.image_token_in_vocab or ours.text_config.vocab_size > 257152


def test_empty_and_keyword_configs_match_reference_defaults():
    from transformers import PaliGemmaConfig as ReferenceConfig

    for values in ({}, tiny_config_dict(), {"text_config": {"rope_theta": 500.0, "hidden_activation": "gelu", "hidden_size": 2048}}):
        ours, ref = PaliGemmaConfig.from_dict(values), ReferenceConfig(**values)
        assert ours.vision_config.intermediate_size == ref.vision_config.intermediate_size
        assert ours.vision_config.hidden_size == ref.vision_config.hidden_size
        assert ours.text_config.hidden_size == ref.text_config.hidden_size
        assert ours.text_config.vocab_size == ref.text_config.vocab_size
        assert ours.text_config.num_key_value_heads == ref.text_config.num_key_value_heads
        assert ours.text_config.hidden_act == "gelu_pytorch_tanh"
    assert PaliGemmaConfig.from_dict({"text_config": {"rope_theta": 500.0, "hidden_size": 2048}}).text_config.rope_theta == 500.0
    assert PaliGemmaConfig(vision_config={"image_size": 448, "patch_size": 14}).num_image_tokens == 1024


def test_sparse_tiny_config_file_loads_in_both(mqa_checkpoint, tmp_path):
    """Our loader and transformers agree on a config.json that leaves most fields out, as the real ones do."""
    from transformers import PaliGemmaForConditionalGeneration as Reference

    directory, _ = mqa_checkpoint
    shutil.copytree(directory, tmp_path / "ckpt")
    sparse = {
        "model_type": "paligemma", "image_token_index": 5, "projection_dim": 64, "torch_dtype": "float32",
        "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 1664,
                        "hidden_activation": "gelu_pytorch_tanh", "num_image_tokens": 16},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
                          "projection_dim": 64},
    }
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(sparse))
    model, processor = load_pretrained(tmp_path / "ckpt")
    reference = Reference.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    ours_logits, batch = logits_of(model, processor)
    real = batch["attention_mask"].bool()
    assert_matches(ours_logits[real], reference_logits(reference, batch).logits[real], **TOL)


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             (torch.float32, torch.float32), ("auto", torch.float32)])
def test_dtype_choice(mqa_checkpoint, dtype, expected):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    logits, _ = logits_of(model, processor)
    assert logits.dtype == expected and torch.isfinite(logits).all()


def test_bf16_logits_stay_close_to_fp32(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    full, processor = load_pretrained(directory)
    half, _ = load_pretrained(directory, dtype="bf16")
    expected, _ = logits_of(full, processor)
    got, _ = logits_of(half, processor)
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_name_mapping_round_trips():
    for name in ["language_model.layers.3.self_attn.q_proj.weight", "vision_tower.encoder.layers.0.mlp.fc1.bias",
                 "multi_modal_projector.linear.weight", "language_model.embed_tokens.weight"]:
        assert to_library_name(to_disk_name(name)) == name
    assert to_disk_name("vision_tower.post_layernorm.weight") == "vision_tower.vision_model.post_layernorm.weight"
    assert to_library_name("lm_head.weight") == "language_model.lm_head.weight"


def broken(source, target, damage):
    shutil.copytree(source, target)
    damage(target)
    return target


def _wrong_shape(directory):
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["language_model.model.norm.weight"] = torch.zeros(65)
    save_file(tensors, str(directory / "model.safetensors"))


def _drop_tensor(directory):
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["multi_modal_projector.linear.bias"]
    save_file(tensors, str(directory / "model.safetensors"))


def _extra_tensor(directory):
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["vision_tower.vision_model.head.probe.weight"] = torch.zeros(3)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config file not found"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "tokenizer.model").unlink(), "tokenizer file not found"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"), "not a valid safetensors"),
        (_wrong_shape, r"wrong shape.*language_model\.model\.norm\.weight \[65\] \(expected \[64\]\)"),
        (_drop_tensor, r"missing.*multi_modal_projector\.linear\.bias"),
        (_extra_tensor, r"unexpected.*vision_tower\.vision_model\.head\.probe\.weight"),
    ],
)
def test_broken_checkpoints_are_named(mqa_checkpoint, tmp_path, damage, message):
    directory, _ = mqa_checkpoint
    target = broken(directory, tmp_path / "ckpt", damage)
    with pytest.raises(PaliGemmaError, match=message) as error:
        load_pretrained(target)
    assert "\n" not in str(error.value)


def test_missing_folder_and_bad_options(mqa_checkpoint, tmp_path):
    directory, _ = mqa_checkpoint
    with pytest.raises(PaliGemmaError, match="checkpoint folder not found"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(PaliGemmaError, match="unknown dtype"):
        load_pretrained(directory, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(PaliGemmaError, match="CUDA is not available"):
            load_pretrained(directory, device="cuda")


MEMORY_PROBE = r"""
import sys, threading, time
import torch
from paligemma import PaliGemmaForConditionalGeneration, load_model
from paligemma.io.config_file import read_config

def anonymous_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

peak, done = [0], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], anonymous_bytes())
        time.sleep(0.001)

# Warm up what torch allocates once per process (meta model, a dtype conversion), so only loading is measured.
with torch.device("meta"):
    PaliGemmaForConditionalGeneration(read_config(sys.argv[1] + "/config.json"))
torch.ones(1000, 1000).to(torch.bfloat16)
base = anonymous_bytes()
watcher = threading.Thread(target=watch)
watcher.start()
model = load_model(sys.argv[1], dtype="bf16")
done[0] = True
watcher.join()
size = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() for p in model.parameters()) * 4
print(peak[0] - base, size, largest)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_bf16_loading_never_holds_a_float32_copy(tmp_path):
    """Tensors are converted one at a time from the memory-mapped file: the peak is the bf16 model plus one tensor."""
    import subprocess
    import sys

    from paligemma import PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=112, patch_size=14),
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=64, vocab_size=16000),
        projection_dim=512, image_token_index=5,
    )
    torch.manual_seed(0)  # the weights' values do not matter here, only their size; drawn from a seed all the same
    PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    peak, bf16_size, largest_fp32 = map(int, result.stdout.split())
    assert bf16_size > 50e6
    assert peak < bf16_size + largest_fp32 + 16e6, (peak, bf16_size, largest_fp32)
    assert peak < 1.5 * bf16_size  # a float32 copy of the model would be 2x the bf16 size on its own
