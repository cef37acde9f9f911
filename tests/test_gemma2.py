"""PaliGemma 2 (the Gemma 2 decoder) against transformers: logits, loss, caches, greedy generation, full-size configs.

The tiny configs make every Gemma 2 feature bite: grouped-query heads (4 query heads, 2 key/value heads), small
soft-caps (attention 2, logits 3) so that tanh is far from linear, a query_pre_attn_scalar unlike head_dim, and a
sliding window of 6 positions, much shorter than the sequences (16 image tokens, a prompt, 24 new tokens).
The `<image>` id lies past the embedding table, as in PaliGemma 2.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    GEMMA2_SIZES,
    PROMPTS,
    TOKENIZER_VOCAB,
    TOL,
    WINDOW,
    assert_matches,
    cached_and_recomputed_logits,
    fixed_shape_logits,
    gemma2_config_dict,
    random_image,
    real_paligemma2_config,
    reference_logits,
    reference_processor,
    strip_after_eos,
    write_reference_checkpoint,
)
from paligemma import (
    DynamicCache,
    PaliGemmaConfig,
    PaliGemmaError,
    PaliGemmaForConditionalGeneration,
    StaticCache,
    generate,
    load_pretrained,
)
from paligemma.io.layout import to_library_name
from paligemma.models.config import Gemma2Config, GemmaConfig
from paligemma.models.gemma2 import Gemma2LanguageModel
from paligemma.models.paligemma import prefix_lm_mask

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pg2_checkpoint(workdir, tokenizer_file_without_image):
    """(folder, transformers model) of a tiny PaliGemma 2 written by transformers' own save_pretrained."""
    directory = workdir / "paligemma2"
    return directory, write_reference_checkpoint(directory, gemma2_config_dict(), tokenizer_file_without_image, 3)


def test_config_from_transformers_file_is_gemma2(pg2_checkpoint):
    directory, ref = pg2_checkpoint
    model, _ = load_pretrained(directory)
    text = model.config.text_config
    assert isinstance(text, Gemma2Config) and isinstance(model.language_model, Gemma2LanguageModel)
    assert (text.query_pre_attn_scalar, text.sliding_window) == (24, WINDOW)
    assert (text.attn_logit_softcapping, text.final_logit_softcapping) == (2.0, 3.0)
    assert text.layer_types == ref.config.text_config.layer_types == ["sliding_attention", "full_attention",
                                                                     "sliding_attention"]
    assert not model.config.image_token_in_vocab
    assert [layer.self_attn.sliding_window for layer in model.language_model.layers] == [WINDOW, None, WINDOW]
    assert all(layer.self_attn.attend.scale == 24**-0.5 for layer in model.language_model.layers)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_logits_padded_batch(pg2_checkpoint, implementation):
    directory, ref = pg2_checkpoint
    model, processor = load_pretrained(directory)
    model.set_attention_implementation(implementation)
    batch = processor(text=PROMPTS, images=[random_image(1), random_image(2, 64, 40)])
    assert batch["input_ids"].shape[1] > 2 * WINDOW, "the sequence must be longer than the sliding window"
    with torch.no_grad():
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert_matches(ours[real], reference_logits(ref, batch).logits[real], **TOL)


def test_loss_with_long_suffixes(pg2_checkpoint):
    """Suffixes longer than the window: causal look-back is cut short on the sliding layers."""
    directory, ref = pg2_checkpoint
    model, processor = load_pretrained(directory)
    suffixes = ["a red circle and a blue square and a green triangle", "red and blue and green"]
    batch = processor(text=PROMPTS, images=[random_image(3), random_image(4)], suffix=suffixes)
    assert int((batch["token_type_ids"] == 1).sum(-1).max()) > WINDOW
    with torch.no_grad():
        ours = model(**batch)
    expected = reference_logits(ref, batch, labels=batch["labels"])
    real = batch["attention_mask"].bool()
    assert_matches(ours.logits[real], expected.logits[real], **TOL)
    assert_matches(ours.loss, expected.loss, **TOL)


def test_every_gemma2_feature_changes_the_output(pg2_checkpoint):
    """Switching off the window, either soft-cap or the extra norms changes the logits: the tests above bite."""
    directory, _ = pg2_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS[:1], images=[random_image(3)], suffix=["a red circle and a blue square and two"])
    text = model.config.text_config
    layers = model.language_model.layers
    changes = {}
    with torch.no_grad():
        base = model(**batch).logits
        text.sliding_window = None  # every layer global: one mask, no window in the caches
        for layer in layers:
            layer.self_attn.sliding_window = None
        changes["sliding window"] = model(**batch).logits
        text.sliding_window = WINDOW
        for layer in layers:
            layer.self_attn.sliding_window = WINDOW if layer.attention_type == "sliding_attention" else None
            layer.self_attn.attend.softcap = None
        changes["attention soft-cap"] = model(**batch).logits
        for layer in layers:
            layer.self_attn.attend.softcap = 2.0
        text.final_logit_softcapping = None
        changes["final soft-cap"] = model(**batch).logits
        text.final_logit_softcapping = 3.0
        assert torch.equal(model(**batch).logits, base)  # everything restored
        for layer in layers:
            layer.post_feedforward_layernorm.weight.add_(1.0)
        changes["post-MLP norm"] = model(**batch).logits
    for name, logits in changes.items():
        assert (logits - base).abs().max() > 1e-2, name
    assert base.abs().max() < 3.0, "final soft-capping keeps logits inside (-3, 3)"


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decoding_equals_recomputation_past_the_window(pg2_checkpoint, cache_kind):
    directory, _ = pg2_checkpoint
    model, processor = load_pretrained(directory)
    model.set_attention_implementation("eager")
    prompt = processor(text=PROMPTS, images=[random_image(5), random_image(6)])
    suffix_ids = [processor.tokenizer.encode(s) for s in ["red circle and blue square and a green triangle",
                                                          "two small cats and a big dog on the left"]]
    steps = min(len(ids) for ids in suffix_ids)
    assert steps > WINDOW
    new_tokens = torch.tensor([ids[:steps] for ids in suffix_ids])
    config = model.config.text_config
    length = prompt["input_ids"].shape[1]
    if cache_kind == "dynamic":
        cache = DynamicCache()
    else:
        cache = StaticCache(config.num_hidden_layers, 2, config.num_key_value_heads, config.head_dim, length + steps,
                            sliding_windows=config.layer_sliding_windows)
    cached, recomputed = cached_and_recomputed_logits(model, prompt, new_tokens, cache)
    assert_matches(cached, recomputed, **TOL)
    assert cache.get_seq_length() == length + steps - 1
    # The sliding layers keep only what a later token can still see; the global layer keeps everything.
    held = [cache.keys[i].shape[2] for i in range(config.num_hidden_layers)]
    if cache_kind == "dynamic":
        assert held == [WINDOW - 1, length + steps - 1, WINDOW - 1]
    else:
        assert held == [WINDOW, length + steps, WINDOW]


def test_fixed_shape_steps_equal_recomputation_past_the_window(pg2_checkpoint):
    """The CUDA-graph-ready step attends over whole buffers: its masks alone must keep padding, unwritten positions
    and (on sliding layers) positions beyond the window out."""
    directory, _ = pg2_checkpoint
    model, processor = load_pretrained(directory)
    prompt = processor(text=PROMPTS, images=[random_image(5), random_image(6)])
    suffix_ids = [processor.tokenizer.encode(s) for s in ["red circle and blue square and a green triangle",
                                                          "two small cats and a big dog on the left"]]
    steps = min(len(ids) for ids in suffix_ids)
    assert steps > WINDOW and prompt["attention_mask"].min() == 0, "past the window, with a padded prompt"
    new_tokens = torch.tensor([ids[:steps] for ids in suffix_ids])
    _, recomputed = cached_and_recomputed_logits(model, prompt, new_tokens, DynamicCache())
    assert_matches(fixed_shape_logits(model, prompt, new_tokens), recomputed, **TOL)


@pytest.mark.parametrize("cache", ["dynamic", "static", "graph", "compiled"])
def test_greedy_matches_reference(pg2_checkpoint, cache):
    directory, ref = pg2_checkpoint
    model, processor = load_pretrained(directory)
    images = [random_image(11), random_image(12, 80, 20), random_image(13, 20, 80)]
    prompts = ["caption en", "answer en what color is the big circle on the left?", "detect cat ; dog"]
    result = generate(model, processor, images=images, prompts=prompts, max_new_tokens=NEW_TOKENS, return_ids=True,
                      cache=cache)
    batch = reference_processor(directory)(text=prompts, images=images, return_tensors="pt", padding="longest")
    with torch.no_grad():
        expected = ref.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = strip_after_eos(expected[:, batch["input_ids"].shape[1]:].tolist())
    assert result.token_ids == expected
    assert min(len(ids) for ids in result.token_ids) > 2 * WINDOW, "generation must run well past the window"


def test_fused_attention_without_softcapping(workdir, tokenizer_file_without_image):
    """With no attention soft-cap, the sdpa path runs PyTorch's fused kernel: equal to the reference within e-6."""
    directory = workdir / "paligemma2_nocap"
    ref = write_reference_checkpoint(directory, gemma2_config_dict(softcap=False), tokenizer_file_without_image, 4)
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(7), random_image(8)])
    real = batch["attention_mask"].bool()
    expected = reference_logits(ref, batch).logits[real]
    for implementation in ("sdpa", "eager"):
        model.set_attention_implementation(implementation)
        with torch.no_grad():
            ours = model(**batch).logits[real]
        assert_matches(ours, expected, **TOL)


def test_sliding_prefix_lm_mask():
    """Window 3: causal rows see only the last 3 positions; the prefix (first 4) still sees itself whole."""
    attention_mask = torch.ones(1, 8, dtype=torch.long)
    token_types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    allowed = prefix_lm_mask(attention_mask, token_types, sliding_window=3)[0, 0].int()
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(allowed, expected)
    # During decoding (a cache of 8 positions, one new token) only the window counts.
    decoding = prefix_lm_mask(torch.ones(1, 9, dtype=torch.long), None, past_length=8, sliding_window=3)
    assert decoding[0, 0, 0].int().tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_our_paligemma2_checkpoint_loads_in_transformers(workdir, tokenizer_file_without_image):
    from transformers import PaliGemmaForConditionalGeneration as Reference

    torch.manual_seed(0)
    ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**gemma2_config_dict()))
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0, 0.3)
    directory = workdir / "ours_paligemma2"
    ours.save_pretrained(directory)
    written = json.loads((directory / "config.json").read_text())["text_config"]
    assert written["model_type"] == "gemma2" and written["hidden_activation"] == "gelu_pytorch_tanh"
    ref = Reference.from_pretrained(directory, attn_implementation="eager").eval()
    text = ref.config.text_config
    assert type(text).__name__ == "Gemma2Config"
    assert (text.query_pre_attn_scalar, text.sliding_window, text.attn_logit_softcapping,
            text.final_logit_softcapping) == (24, WINDOW, 2.0, 3.0)
    assert text.layer_types == ours.config.text_config.layer_types
    ids = torch.tensor([[TOKENIZER_VOCAB] * 16 + [2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        mine = ours(ids, pixel_values=pixels).logits
        theirs = ref(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids),
                     position_ids=torch.arange(1, ids.shape[1] + 1)[None]).logits
    assert_matches(mine, theirs, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Full-size PaliGemma 2: 3B (Gemma 2 2B), 10B (Gemma 2 9B), 28B (Gemma 2 27B), at 224, 448 and 896 pixels.

# Published parameter counts (keras-hub's PaliGemma 2 presets, which match helpers.GEMMA2_SIZES; 28B at 448 and 896
# are computed, the presets repeat the 224 count for them).
PARAMETERS = {
    ("3b", 224): 3_032_094_960, ("3b", 448): 3_032_979_696, ("3b", 896): 3_036_518_640,
    ("10b", 224): 9_662_409_456, ("10b", 448): 9_663_294_192, ("10b", 896): 9_666_833_136,
    ("28b", 224): 27_650_192_112, ("28b", 448): 27_651_076_848, ("28b", 896): 27_654_615_792,
}


def compare_on_meta(values: dict) -> tuple[PaliGemmaForConditionalGeneration, int]:
    from transformers import PaliGemmaConfig as ReferenceConfig
    from transformers import PaliGemmaForConditionalGeneration as Reference

    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(values))
        ref = Reference(ReferenceConfig(**values))
    count = sum(p.numel() for p in ref.parameters())
    assert ours.num_parameters() == count
    ours_shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    ref_shapes = {to_library_name(n): tuple(t.shape) for n, t in ref.state_dict().items()}  # tied head in both
    assert ours_shapes == ref_shapes
    ref_text = ref.config.text_config
    ours_text = ours.config.text_config
    assert ours_text.layer_types == ref_text.layer_types
    for name in ("query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                 "head_dim", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(ours_text, name) == getattr(ref_text, name), name
    return ours, count


@pytest.mark.parametrize("resolution", [224, 448, 896])
@pytest.mark.parametrize("size", ["3b", "10b", "28b"])
def test_full_size_paligemma2_matches_reference(size, resolution):
    ours, count = compare_on_meta(real_paligemma2_config(size, resolution))
    assert count == PARAMETERS[size, resolution]
    assert ours.config.num_image_tokens == (resolution // 14) ** 2 == {224: 256, 448: 1024, 896: 4096}[resolution]
    assert ours.vision_tower.embeddings.position_embedding.weight.shape == (ours.config.num_image_tokens, 1152)
    assert ours.language_model.embed_tokens.weight.shape[0] == 257152  # <image> (257152) lies past the table
    assert not ours.config.image_token_in_vocab
    layers = ours.language_model.layers
    assert [layer.self_attn.sliding_window for layer in layers[:4]] == [4096, None, 4096, None]
    assert layers[0].self_attn.attend.scale == GEMMA2_SIZES[size]["query_pre_attn_scalar"] ** -0.5
    assert ours.config.text_config.eos_token_id == 1


def test_sparse_gemma2_text_config_takes_gemma2_defaults():
    """A text_config that names only the model type gets Gemma 2 2B's shape, as transformers gives it."""
    values = real_paligemma2_config("3b", 224)
    values["text_config"] = {"model_type": "gemma2", "vocab_size": 257152}
    ours, count = compare_on_meta(values)
    assert count == PARAMETERS["3b", 224]
    text = ours.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.sliding_window, text.attn_logit_softcapping) == (
        2304, 26, 4096, 50.0)


def test_text_model_type_selects_the_decoder():
    def text_config(text: dict, projection_dim: int = 2048):
        return PaliGemmaConfig.from_dict({"text_config": text, "projection_dim": projection_dim}).text_config

    assert type(text_config({"model_type": "gemma", "hidden_size": 2048})) is GemmaConfig
    assert type(text_config({"hidden_size": 2048})) is GemmaConfig
    assert type(PaliGemmaConfig.from_dict({}).text_config) is GemmaConfig
    assert type(text_config({"model_type": "gemma2"}, projection_dim=2304)) is Gemma2Config
    assert GemmaConfig().layer_sliding_windows == [None] * 28
    with pytest.raises(PaliGemmaError, match="unsupported text model type 'llama'"):
        PaliGemmaConfig.from_dict({"text_config": {"model_type": "llama"}})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(num_hidden_layers=2, layer_types=["sliding_attention", "local"]), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping"),
        (dict(query_pre_attn_scalar=None), "query_pre_attn_scalar"),
    ],
)
def test_bad_gemma2_configs(fields, message):
    with pytest.raises(PaliGemmaError, match=message) as error:
        Gemma2Config.from_dict(fields)
    assert "\n" not in str(error.value)


def test_static_cache_rejects_a_window_it_was_not_sized_for():
    cache = StaticCache(1, 1, 1, 4, max_length=10, sliding_windows=[3])
    cache.update(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), torch.arange(3), sliding_window=3)
    with pytest.raises(PaliGemmaError, match="sliding window of 3"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.arange(3, 4))


def test_command_line_answers_with_a_paligemma2_checkpoint(pg2_checkpoint, tmp_path, capsys):
    from paligemma.cli import main

    directory, _ = pg2_checkpoint
    image = tmp_path / "scene.png"
    random_image(31, 64, 48).save(image)
    status = main(["--image", str(image), "--prompt", "detect cat", "--model", str(directory), "--max-new-tokens", "12",
                   "--device", "cpu"])
    assert status == 0
    model, processor = load_pretrained(directory)
    expected = generate(model, processor, images=[image], prompts=["detect cat"], max_new_tokens=12)[0]
    assert capsys.readouterr().out == expected + "\n"
