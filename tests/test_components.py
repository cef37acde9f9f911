"""Each building block against its transformers twin, with the same weights, in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import TOL, assert_matches
from paligemma import load_model
from paligemma.models.attention import additive_mask
from paligemma.interpret.capture import record_attention
from paligemma.models.paligemma import prefix_lm_mask


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def pair(request, mqa_checkpoint):
    """(ours, reference) on the same checkpoint; ours runs with each attention implementation."""
    directory, reference = mqa_checkpoint
    ours = load_model(directory)
    ours.set_attention_implementation(request.param)
    return ours, reference


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def hidden(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_patch_embedding(pair, pixels):
    ours, ref = pair
    assert_matches(ours.vision_tower.embeddings(pixels), ref.model.vision_tower.embeddings(pixels), **TOL)


@torch.no_grad()
def test_siglip_attention(pair):
    ours, ref = pair
    x = hidden((2, 16, 32))
    ours_out = ours.vision_tower.encoder.layers[0].self_attn(x)
    ref_out, _ = ref.model.vision_tower.encoder.layers[0].self_attn(x)
    assert_matches(ours_out, ref_out, **TOL)


@torch.no_grad()
def test_siglip_attention_weights(pair):
    ours, ref = pair
    x = hidden((2, 16, 32))
    with record_attention(ours.vision_tower) as recorded:
        ours.vision_tower.encoder.layers[0].self_attn(x)
    (ours_weights,) = recorded
    _, ref_weights = ref.model.vision_tower.encoder.layers[0].self_attn(x)
    assert_matches(ours_weights, ref_weights, **TOL)
    torch.testing.assert_close(ours_weights.sum(-1), torch.ones(2, 4, 16), **TOL)


@torch.no_grad()
def test_siglip_mlp_and_layer(pair):
    ours, ref = pair
    x = hidden((2, 16, 32), seed=1)
    ref_layer = ref.model.vision_tower.encoder.layers[1]
    assert_matches(ours.vision_tower.encoder.layers[1].mlp(x), ref_layer.mlp(x), **TOL)
    assert_matches(ours.vision_tower.encoder.layers[1](x), ref_layer(x, attention_mask=None), **TOL)


@torch.no_grad()
def test_siglip_encoder(pair, pixels):
    ours, ref = pair
    expected = ref.model.vision_tower(pixels).last_hidden_state
    assert_matches(ours.vision_tower(pixels), expected, **TOL)


@torch.no_grad()
def test_projector(pair):
    ours, ref = pair
    x = hidden((2, 16, 32), seed=2)
    assert_matches(ours.multi_modal_projector(x), ref.model.multi_modal_projector(x), **TOL)


@torch.no_grad()
def test_rms_norm(pair):
    ours, ref = pair
    x = hidden((2, 5, 64), seed=3) * 3
    assert_matches(ours.language_model.norm(x), ref.model.language_model.norm(x), atol=0, rtol=0)
    layer = ours.language_model.layers[0].input_layernorm
    assert_matches(layer(x), ref.model.language_model.layers[0].input_layernorm(x), atol=0, rtol=0)


@torch.no_grad()
def test_rms_norm_bf16_computes_in_float32(pair):
    ours, ref = pair
    x = (hidden((2, 5, 64), seed=4) * 3).bfloat16()
    ours_norm = copy.deepcopy(ours.language_model.norm).to(torch.bfloat16)
    ref_norm = copy.deepcopy(ref.model.language_model.norm).to(torch.bfloat16)
    assert_matches(ours_norm(x), ref_norm(x), atol=0, rtol=0)
    assert ours_norm(x).dtype == torch.bfloat16


@torch.no_grad()
def test_rotary_embedding(pair):
    ours, ref = pair
    position_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4]])
    x = hidden((2, 6, 64))
    ours_cos, ours_sin = ours.language_model.rotary(position_ids, x.dtype)
    ref_cos, ref_sin = ref.model.language_model.rotary_emb(x, position_ids)
    assert_matches(ours_cos, ref_cos, atol=0, rtol=0)
    assert_matches(ours_sin, ref_sin, atol=0, rtol=0)


def reference_mask(ref, embeds, attention_mask, token_type_ids, position_ids):
    """The 4-D additive mask transformers builds for PaliGemma (eager attention, so it is materialised)."""
    from transformers.masking_utils import create_causal_mask

    text_config = ref.config.get_text_config()
    return create_causal_mask(
        config=text_config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
        block_sequence_ids=torch.where(token_type_ids == 0, 0, -1),
    )


def padded_batch():
    """Two sequences of 7 and 5 tokens, left padded; 4 prefix and 3 (or 1) suffix tokens."""
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    token_type_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
    position_ids = attention_mask.cumsum(-1)
    return attention_mask, token_type_ids, position_ids


def test_prefix_lm_mask_matches_reference(pair):
    ours, ref = pair
    attention_mask, token_type_ids, position_ids = padded_batch()
    embeds = torch.zeros(2, 7, 64)
    expected = reference_mask(ref, embeds, attention_mask, token_type_ids, position_ids)
    allowed = prefix_lm_mask(attention_mask, token_type_ids)
    assert torch.equal(allowed, expected == 0)
    assert torch.equal(additive_mask(allowed, torch.float32), expected)


def test_prefix_lm_mask_layout():
    attention_mask, token_type_ids, _ = padded_batch()
    allowed = prefix_lm_mask(attention_mask, token_type_ids)[1, 0].int()
    # Row 1: two pads, a prefix of four (image, bos, prompt, \n) that sees itself fully, one causal suffix token.
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(allowed, expected)


def decoder_inputs(ours, ref, seed):
    """Hidden states of the padded batch, its reference mask, and both models' rotary tables."""
    attention_mask, token_type_ids, position_ids = padded_batch()
    x = hidden((2, 7, 64), seed=seed)
    mask = reference_mask(ref, x, attention_mask, token_type_ids, position_ids)
    return x, mask, ours.language_model.rotary(position_ids, x.dtype), ref.model.language_model.rotary_emb(x, position_ids)


@torch.no_grad()
def test_gemma_attention(pair):
    ours, ref = pair
    x, mask, rotary, ref_rotary = decoder_inputs(ours, ref, seed=5)
    ours_out = ours.language_model.layers[0].self_attn(x, rotary, mask)
    ref_out, _ = ref.model.language_model.layers[0].self_attn(x, ref_rotary, mask)
    assert_matches(ours_out, ref_out, **TOL)


@torch.no_grad()
def test_gemma_mlp(pair):
    ours, ref = pair
    x = hidden((2, 7, 64), seed=6)
    assert_matches(ours.language_model.layers[1].mlp(x), ref.model.language_model.layers[1].mlp(x), **TOL)


@torch.no_grad()
def test_gemma_decoder_layer(pair):
    ours, ref = pair
    x, mask, rotary, ref_rotary = decoder_inputs(ours, ref, seed=7)
    ours_out = ours.language_model.layers[1](x, rotary, mask)
    ref_out = ref.model.language_model.layers[1](x, attention_mask=mask, position_embeddings=ref_rotary)
    assert_matches(ours_out, ref_out, **TOL)


@torch.no_grad()
def test_merged_input_embeddings(pair, pixels):
    ours, ref = pair
    n = ours.config.num_image_tokens
    image_id = ours.config.image_token_index
    input_ids = torch.tensor([[image_id] * n + [2, 100, 200, 1157], [image_id] * n + [2, 300, 301, 1157]])
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = ref.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        ref(input_ids=input_ids, pixel_values=pixels, token_type_ids=torch.zeros_like(input_ids))
    finally:
        handle.remove()
    features = ours.get_image_features(pixels)
    assert_matches(ours.embed_inputs(input_ids, features), captured["embeds"], **TOL)


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("queries", [1, 3, 8])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_decoding_attention_in_fp32_on_cpu(heads, kv_heads, queries, per_head_mask):
    """A decoding step's bf16 attention on a CPU takes plain fp32 products (PyTorch's fused kernel is slow there): the
    float64 attention of the same bf16 inputs, rounded once to bf16; within bf16's rounding of the fused kernel's;
    and a key masked out (per head or shared) carries no weight at all."""
    import torch.nn.functional as F

    from paligemma.models.attention import attention, few_queries_on_cpu

    generator = torch.Generator().manual_seed(queries * 10 + heads + kv_heads)
    batch, keys, dim = 3, 37, 32
    query = torch.randn(batch, heads, queries, dim, generator=generator).to(torch.bfloat16)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator).to(torch.bfloat16)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator).to(torch.bfloat16)
    allowed = torch.rand(batch, heads if per_head_mask else 1, queries, keys, generator=generator) > 0.3
    allowed[..., 0] = True
    allowed[0, ..., 5] = False  # key 5 of sequence 0: hidden from every head and query
    mask = additive_mask(allowed, torch.bfloat16)
    assert few_queries_on_cpu(query, mask) and not few_queries_on_cpu(query.float(), mask)
    assert not few_queries_on_cpu(query, allowed)  # a boolean mask goes to the fused kernel
    ours = attention(query, key, value, mask, scale=dim**-0.5)  # [b, q, heads, d]

    groups = heads // kv_heads
    k64, v64 = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = query.double() @ k64.transpose(2, 3) * dim**-0.5 + mask.double()
    exact = (torch.softmax(scores, -1) @ v64).transpose(1, 2)  # [b, q, heads, d]
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    fused = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=dim**-0.5,
                                           enable_gqa=groups > 1).transpose(1, 2)
    assert ((ours.double() - fused.double()).abs() <= exact.abs().amax() * 2**-7).all()
    changed = value.clone()
    changed[0, :, 5] = 100.0
    assert torch.equal(attention(query, key, changed, mask, scale=dim**-0.5), ours)
