"""LoRA built by hand against peft: the same modules, logits and gradients, merging, and peft's folder format both ways.

Our model and transformers' are compared with the same attention implementation (eager), where their float32 logits
agree bit for bit; a fresh transformers model is loaded from the checkpoint folder for each test, since peft wraps
the modules of the model it is given in place.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import PROMPTS, TOL, assert_matches, random_image
from paligemma import LoraSettings, PaliGemmaError, apply_lora, load_adapter, load_pretrained, lora_parameters
from paligemma import merge_lora, save_adapter
from paligemma.io.adapter import adapter_config, transformers_module
from paligemma.kernels import FastLinear
from paligemma.training.lora import LoraLinear, lora_layers, lora_state_dict

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, via peft

EXACT = dict(atol=1e-6, rtol=0)  # the same float32 operations in the same order: equal to rounding at most
SUFFIXES = ["a red circle", "red"]


@pytest.fixture(scope="module", params=["mqa", "gqa"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_checkpoint")


def ours(directory, **kwargs):
    model, processor = load_pretrained(directory, **kwargs)
    model.set_attention_implementation("eager")
    return model, processor


def reference(directory):
    """A fresh transformers PaliGemma from the folder (peft changes the model it wraps, so never the fixture's)."""
    from transformers import PaliGemmaForConditionalGeneration as Reference

    return Reference.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def training_batch(processor, seed=0):
    return processor(text=PROMPTS, images=[random_image(seed), random_image(seed + 1)], suffix=SUFFIXES)


def run_reference(ref, batch, labels=False):
    """transformers' (or peft's) forward on our batch, with our position ids and token types, gradients kept."""
    return ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
               attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
               position_ids=batch["attention_mask"].cumsum(-1), labels=batch["labels"] if labels else None)


def randomise_b(model, seed=0, scale=0.5):
    """B starts at zero (the adapted model is the base model); random values make the comparison mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * scale)


def peft_twin(directory, model):
    """get_peft_model on a fresh transformers model with the LoraConfig our adapter_config.json describes, and our
    A and B copied in."""
    config = adapter_config(model)
    lora_config = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                                  target_modules=config["target_modules"])
    twin = peft.get_peft_model(reference(directory), lora_config).eval()
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            theirs = twin.base_model.model.get_submodule(transformers_module(name))
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return twin


def peft_modules(twin) -> set[str]:
    """The names (in transformers' model) of the modules peft wrapped."""
    return {name for name, module in twin.base_model.model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


def peft_layer(twin, name):
    return twin.base_model.model.get_submodule(transformers_module(name))


def real(batch):
    return batch["attention_mask"].bool()


# ---------------------------------------------------------------------------------------------------------------
# The layer and the settings


def test_lora_layer_starts_as_its_base_and_is_seeded():
    base = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    layer = LoraLinear(base, LoraSettings(rank=4, alpha=8), torch.Generator().manual_seed(3))
    again = LoraLinear(torch.nn.Linear(64, 32), LoraSettings(rank=4, alpha=8), torch.Generator().manual_seed(3))
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (32, 4)
    assert torch.equal(layer.lora_A.weight, again.lora_A.weight)
    assert layer.lora_A.weight.abs().max() <= 64**-0.5 and not layer.lora_B.weight.any()
    assert torch.equal(layer(x), base(x))  # B = 0: the adapted layer is the base layer
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad and layer.scaling == 2.0
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0  # [2, 5, 64] -> [2, 5, 32]
    assert_matches(layer(x), expected, **TOL)


def test_half_precision_bases_get_float32_adapters():
    base = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = LoraLinear(base, LoraSettings(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert layer.lora_A.weight.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    expected = (base(x).float() + layer.lora_B(layer.lora_A(x.float())) * layer.scaling).bfloat16()  # one rounding
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("settings, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(target_modules=()), "target_modules must be some of"),
    (dict(target_modules=("q_proj", "qkv")), r"target_modules must be some of .*got \['q_proj', 'qkv'\]"),
    (dict(target_modules=("fc1",)), r"target_modules must be some of .*\(in language_model\)"),
    (dict(parts=("projector",)), "parts must be some of language_model, vision_tower"),
    (dict(parts=()), "parts must be some of"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(PaliGemmaError, match=message) as error:
        LoraSettings(**settings)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Against peft: modules, parameters, logits, gradients


def test_default_adapts_the_decoder_only_as_peft_does_with_our_config(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, _ = ours(directory)
    names = apply_lora(model, LoraSettings())
    assert len(names) == 2 * 7 and all(name.startswith("language_model.layers.") for name in names)
    assert all(isinstance(layer.base_layer, FastLinear) for layer in lora_layers(model).values())  # accelerated
    twin = peft_twin(directory, model)
    assert peft_modules(twin) == {transformers_module(name) for name in names}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(model))
    assert trainable == sum(p.numel() for p in twin.parameters() if p.requires_grad) == 2 * 8 * (
        (64 + 64) + (64 + 16) * 2 + (64 + 64) + (64 + 128) * 3)  # q, k and v (one key/value head), o, gate/up/down
    assert not model.language_model.embed_tokens.weight.requires_grad  # the tied head is the table: frozen
    # The guide's plain names, which peft matches as suffixes, would also adapt SigLIP's q, k and v projections.
    guide = peft.LoraConfig(target_modules=list(LoraSettings().target_modules))
    suffixes = peft.get_peft_model(reference(directory), guide)
    assert len(peft_modules(suffixes)) == len(names) + 2 * 3


@pytest.mark.parametrize("settings", [
    LoraSettings(),
    LoraSettings(rank=4, alpha=16, dropout=0.1),  # compared in eval mode, where dropout is the identity
    LoraSettings(rank=2, alpha=3, target_modules=("q_proj", "v_proj")),
    LoraSettings(target_modules=("q_proj", "v_proj", "o_proj", "fc1"), parts=("language_model", "vision_tower")),
], ids=["default", "dropout", "q-v", "with-tower"])
def test_logits_and_gradients_equal_peft(checkpoint, settings):
    directory, _ = checkpoint
    model, processor = ours(directory)
    batch = training_batch(processor)
    with torch.no_grad():
        base_logits = model(**batch).logits
    names = apply_lora(model, settings, seed=1)
    randomise_b(model)
    twin = peft_twin(directory, model)
    assert peft_modules(twin) == {transformers_module(name) for name in names}

    out, expected = model(**batch), run_reference(twin, batch, labels=True)
    assert_matches(out.logits[real(batch)], expected.logits[real(batch)], **EXACT)
    assert (out.logits - base_logits).abs().max() > 1e-2, "the adapter must change the logits for the test to mean much"
    assert_matches(out.loss, expected.loss, **EXACT)
    out.loss.backward()
    expected.loss.backward()
    for name, layer in lora_layers(model).items():
        for matrix in ("lora_A", "lora_B"):
            theirs = getattr(peft_layer(twin, name), matrix)["default"].weight.grad
            assert_matches(getattr(layer, matrix).weight.grad, theirs, **EXACT)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base stays frozen


def test_dropout_is_active_in_training_mode_only(mqa_checkpoint):
    """In train mode each adapter drops inputs at random (peft's draws differ from ours, so no bitwise comparison):
    the same seed gives the same output, and it differs from eval mode's."""
    directory, _ = mqa_checkpoint
    model, processor = ours(directory)
    apply_lora(model, LoraSettings(dropout=0.5), seed=2)
    randomise_b(model)
    batch = processor(text=PROMPTS, images=[random_image(5), random_image(6)])
    with torch.no_grad():
        evaluated = model(**batch).logits
        model.train()
        torch.manual_seed(0)
        first = model(**batch).logits
        torch.manual_seed(0)
        second = model(**batch).logits
        model.eval()
    assert torch.equal(first, second)
    assert (first - evaluated).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Merging


def test_merging_keeps_the_logits_and_saves_a_plain_checkpoint(checkpoint, tmp_path):
    directory, _ = checkpoint
    model, processor = ours(directory)
    plain_names = set(model.state_dict())
    both = ("language_model", "vision_tower")
    apply_lora(model, LoraSettings(target_modules=("q_proj", "v_proj", "fc1"), parts=both))
    randomise_b(model)
    batch = processor(text=PROMPTS, images=[random_image(7), random_image(8)])
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged_model = merge_lora(model)
        merged = merged_model(**batch).logits
    assert merged_model is model and not lora_layers(model)
    assert set(model.state_dict()) == plain_names
    assert_matches(merged[real(batch)], unmerged[real(batch)], **TOL)
    model.save_pretrained(tmp_path / "merged")
    reloaded = reference(tmp_path / "merged")
    assert_matches(run_reference(reloaded, batch).logits[real(batch)], merged[real(batch)], **TOL)


# ---------------------------------------------------------------------------------------------------------------
# peft's folder format, both ways


def test_our_adapter_loads_in_peft(checkpoint, tmp_path):
    directory, _ = checkpoint
    model, processor = ours(directory)
    names = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.05), seed=3)
    randomise_b(model, seed=3)
    save_adapter(model, tmp_path / "adapter", directory)

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * len(names)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.05)
    assert config["base_model_name_or_path"] == str(directory)
    written_by_peft = peft.get_peft_model(reference(directory), peft.LoraConfig(target_modules=["q_proj"]))
    written_by_peft.save_pretrained(tmp_path / "by_peft")
    assert set(config) == set(json.loads((tmp_path / "by_peft" / "adapter_config.json").read_text()))

    loaded = peft.PeftModel.from_pretrained(reference(directory), tmp_path / "adapter").eval()
    assert peft_modules(loaded) == {transformers_module(name) for name in names}
    batch = processor(text=PROMPTS, images=[random_image(9), random_image(10)])
    with torch.no_grad():
        expected = run_reference(loaded, batch).logits
        assert_matches(model(**batch).logits[real(batch)], expected[real(batch)], **TOL)
    # and our own loader reads it back bit for bit
    again, _ = ours(directory, adapter=tmp_path / "adapter")
    saved, loaded_back = lora_state_dict(model), lora_state_dict(again)
    assert saved.keys() == loaded_back.keys() and all(torch.equal(saved[k], loaded_back[k]) for k in saved)


def _old_layout(key: str) -> str:
    """peft's keys as written with transformers < 4.52 (the released checkpoints' layout)."""
    key = key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
    return key.replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model.")


@pytest.mark.parametrize("layout", ["current", "transformers-4"])
def test_peft_adapter_loads_in_ours(checkpoint, tmp_path, layout):
    directory, _ = checkpoint
    config = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,  # B random too
                             target_modules=r".*(language_model.*\.(q_proj|down_proj)|vision_tower.*\.fc2)")
    torch.manual_seed(4)
    twin = peft.get_peft_model(reference(directory), config).eval()
    twin.save_pretrained(tmp_path / "adapter")
    if layout == "transformers-4":
        path = str(tmp_path / "adapter" / "adapter_model.safetensors")
        save_file({_old_layout(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})

    model, processor = ours(directory, adapter=tmp_path / "adapter")
    assert {transformers_module(name) for name in lora_layers(model)} == peft_modules(twin)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference: adapters frozen too
    batch = processor(text=PROMPTS, images=[random_image(11), random_image(12)])
    with torch.no_grad():
        expected = run_reference(twin, batch).logits
        assert_matches(model(**batch).logits[real(batch)], expected[real(batch)], **TOL)
        merged, _ = ours(directory, adapter=tmp_path / "adapter", merge=True)
        assert not lora_layers(merged)
        assert_matches(merged(**batch).logits[real(batch)], expected[real(batch)], **TOL)


def test_adapter_on_some_layers_round_trips(mqa_checkpoint, tmp_path):
    """peft's layers_to_transform adapts layer 1 only (of both the tower and the decoder, as peft matches plain names
    as suffixes): our config's pattern must then name layer 1 alone."""
    directory, _ = mqa_checkpoint
    config = peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "o_proj", "fc2"],
                             layers_to_transform=[1], layers_pattern="layers")
    torch.manual_seed(5)
    peft.get_peft_model(reference(directory), config).save_pretrained(tmp_path / "by_peft")
    model, processor = ours(directory)
    names = load_adapter(model, tmp_path / "by_peft", trainable=True)
    assert names == ["vision_tower.encoder.layers.1.self_attn.q_proj", "vision_tower.encoder.layers.1.mlp.fc2",
                     "language_model.layers.1.self_attn.q_proj", "language_model.layers.1.self_attn.o_proj"]
    assert all(p.requires_grad for p in lora_parameters(model))
    save_adapter(model, tmp_path / "ours")
    pattern = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    assert r"layers\.(?:1)\." in pattern and r"\d+" not in pattern
    loaded = peft.PeftModel.from_pretrained(reference(directory), tmp_path / "ours").eval()
    assert peft_modules(loaded) == {transformers_module(name) for name in names}
    batch = processor(text=PROMPTS, images=[random_image(13), random_image(14)])
    with torch.no_grad():
        assert_matches(model(**batch).logits[real(batch)], run_reference(loaded, batch).logits[real(batch)], **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Broken adapters and misuse


def _edit_config(**changes):
    def edit(directory):
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _edit_weights(change):
    def edit(directory):
        path = str(directory / "adapter_model.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


Q = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("damage, message", [
    (lambda d: shutil.rmtree(d), "adapter folder not found"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing from the adapter folder"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text("[1]"), "adapter_config.json is not a JSON object"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing from the adapter"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "it holds adapter_model.bin"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"), "not a valid safetensors"),
    (_edit_config(peft_type="IA3"), "has peft_type 'IA3'; only 'LORA' adapters can be loaded"),
    (_edit_config(use_dora=True), "uses use_dora, which this library's LoRA does not implement"),
    (_edit_config(bias="all"), "uses bias, which"),
    (_edit_config(r=0), "LoRA rank must be an integer >= 1"),
    (_edit_config(r=4),
     r"wrong shape for this model \(r=4\): .*q_proj\.lora_A\.weight \[8, 64\] \(this model needs \[4, 64\]\)"),
    (_edit_weights(lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(8, 65)})),
     r"wrong shape .*q_proj\.lora_A\.weight \[8, 65\] \(this model needs \[8, 64\]\)"),
    (_edit_weights(lambda t: t.pop(f"{Q}.lora_B.weight")), "not both lora_A and lora_B for language_model.layers.0"),
    (_edit_weights(lambda t: t.update({"base_model.model.model.multi_modal_projector.linear.bias": torch.zeros(3)})),
     "unexpected tensor base_model.model.model.multi_modal_projector.linear.bias"),
    (_edit_weights(lambda t: t.update({f"{Q.replace('layers.0', 'layers.7')}.lora_{m}.weight": torch.zeros(8, 8)
                                       for m in "AB"})),
     "names language_model.layers.7.self_attn.q_proj, not a module"),
    (_edit_weights(lambda t: t.clear() or t.update({"other": torch.zeros(1)})), "unexpected tensor other"),
])
def test_broken_adapters_are_named(mqa_checkpoint, tmp_path, damage, message):
    directory, _ = mqa_checkpoint
    model, _ = ours(directory)
    apply_lora(model, LoraSettings())
    save_adapter(model, tmp_path / "adapter")
    damage(tmp_path / "adapter")
    fresh, _ = ours(directory)
    with pytest.raises(PaliGemmaError, match=message) as error:
        load_adapter(fresh, tmp_path / "adapter")
    assert "\n" not in str(error.value)
    assert not lora_layers(fresh), "a failed load leaves the model as it was"


def test_adapter_for_another_model_is_refused(mqa_checkpoint, gqa_checkpoint, tmp_path):
    gqa_directory, _ = gqa_checkpoint
    model, _ = ours(gqa_directory)
    apply_lora(model, LoraSettings())
    save_adapter(model, tmp_path / "gqa_adapter")
    with pytest.raises(PaliGemmaError, match=r"wrong shape .*k_proj\.lora_B\.weight \[32, 8\] \(this model needs "
                                             r"\[16, 8\]\)"):
        load_pretrained(mqa_checkpoint[0], adapter=tmp_path / "gqa_adapter")


def test_misuse_is_named(mqa_checkpoint, tmp_path):
    directory, _ = mqa_checkpoint
    model, _ = ours(directory)
    with pytest.raises(PaliGemmaError, match="no LoRA adapters to save"):
        save_adapter(model, tmp_path / "empty")
    with pytest.raises(PaliGemmaError, match="merge=True needs an adapter"):
        load_pretrained(directory, merge=True)
    with pytest.raises(PaliGemmaError, match="no linear layer of the model matches"):
        apply_lora(model, LoraSettings(target_modules=("fc1",), parts=("vision_tower",)), modules=[])
    with pytest.raises(PaliGemmaError, match="cannot add LoRA to language_model.norm: it is a GemmaRMSNorm"):
        apply_lora(model, LoraSettings(), modules=["language_model.norm"])
    apply_lora(model, LoraSettings())
    with pytest.raises(PaliGemmaError, match="already has LoRA adapters"):
        apply_lora(model, LoraSettings())
