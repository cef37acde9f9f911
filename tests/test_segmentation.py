"""The `<seg>` decoder: the `vae-oid.npz` key layout, shapes at every stage, and the output against an
independent NumPy transcription of big_vision's Flax decoder (the official PaliGemma segmentation code).

The real `vae-oid.npz` cannot be downloaded here, so every file below is written by the test itself, in that
layout: the key names and PyTorch weight layouts that big_vision's `_get_params` reads
(big_vision/evaluators/proj/paligemma/transfers/segmentation.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paligemma import PaliGemmaError
from paligemma.tasks.locations import parse_locations
from paligemma.tasks.segmentation import (
    CODEBOOK_KEY,
    MaskDecoder,
    decode_objects,
    load_mask_decoder,
    paste_mask,
    save_mask_decoder,
)

EMBED = 512

# Every key big_vision reads, with its shape. Convolutions are PyTorch [out, in, kh, kw]; transposed
# convolutions [in, out, kh, kw]. Widths: 512 -> 128, two residual blocks at 128, then 128, 64, 32, 16 -> 1.
LAYOUT = {CODEBOOK_KEY: (128, EMBED), "decoder.0.weight": (128, EMBED, 1, 1), "decoder.0.bias": (128,)}
for block in (2, 3):
    for conv, k in ((0, 3), (2, 3), (4, 1)):
        LAYOUT[f"decoder.{block}.net.{conv}.weight"] = (128, 128, k, k)
        LAYOUT[f"decoder.{block}.net.{conv}.bias"] = (128,)
for index, (c_in, c_out) in zip((4, 6, 8, 10), ((128, 128), (128, 64), (64, 32), (32, 16))):
    LAYOUT[f"decoder.{index}.weight"] = (c_in, c_out, 4, 4)
    LAYOUT[f"decoder.{index}.bias"] = (c_out,)
LAYOUT["decoder.12.weight"] = (1, 16, 1, 1)
LAYOUT["decoder.12.bias"] = (1,)


def random_npz_arrays(seed: int = 0, embed: int = EMBED) -> dict[str, np.ndarray]:
    """Random weights in the layout, scaled so activations stay of order one through the network."""
    rng = np.random.RandomState(seed)
    arrays = {}
    for name, shape in LAYOUT.items():
        shape = tuple(embed if s == EMBED else s for s in shape)
        if name == CODEBOOK_KEY:
            arrays[name] = rng.randn(*shape).astype(np.float32)
        elif name.endswith(".bias"):
            arrays[name] = (0.1 * rng.randn(*shape)).astype(np.float32)
        else:
            fan_in = shape[1] * shape[2] * shape[3] if "net" in name or name in ("decoder.0.weight", "decoder.12.weight") \
                else shape[0] * 4  # a stride-2 transposed conv sums over in_channels x (4 / 2)^2 taps
            arrays[name] = (rng.randn(*shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory):
    """A file of vae-oid.npz's layout, plus encoder tensors of the full VQ-VAE that the decoder must ignore."""
    path = tmp_path_factory.mktemp("vae") / "vae-test.npz"
    arrays = random_npz_arrays()
    arrays["encoder.0.weight"] = np.zeros((8, 1, 3, 3), np.float32)
    np.savez(path, **arrays)
    return path


# ---- big_vision's decoder, transcribed to NumPy (NHWC, Flax kernels), independently of the PyTorch code ----

def flax_conv(x, kernel, bias, padding):
    """flax.linen.Conv, stride 1: cross-correlation of NHWC x with an HWIO kernel, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = sum(x[:, a:a + h, b:b + w, :] @ kernel[a, b] for a in range(kh) for b in range(kw))
    return out + bias


def flax_conv_transpose(x, kernel, bias, stride=2, padding=2):
    """flax.linen.ConvTranspose(transpose_kernel=True) = lax.conv_transpose: dilate the input by the stride,
    pad (padding, padding), and correlate with the kernel flipped in space and with in/out axes swapped."""
    n, h, w, c = x.shape
    dilated = np.zeros((n, (h - 1) * stride + 1, (w - 1) * stride + 1, c), x.dtype)
    dilated[:, ::stride, ::stride] = x
    hwio = kernel[::-1, ::-1].swapaxes(2, 3)  # [kh, kw, out, in] -> flipped, [kh, kw, in, out]
    return flax_conv(dilated, hwio, bias, padding)


def big_vision_decode(arrays, codes):
    """big_vision: _get_params (transp = (2, 3, 1, 0)), _quantized_values_from_codebook_indices, Decoder."""
    transp = lambda w: np.transpose(w, (2, 3, 1, 0)).astype(np.float64)  # noqa: E731
    conv = lambda name: (transp(arrays[name + ".weight"]), arrays[name + ".bias"].astype(np.float64))  # noqa: E731
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    b = codes.shape[0]
    x = arrays[CODEBOOK_KEY].astype(np.float64)[codes.reshape(-1)].reshape(b, 4, 4, -1)
    stages = [x]
    x = relu(flax_conv(x, *conv("decoder.0"), padding=0))
    stages.append(x)
    for block in (2, 3):
        h = relu(flax_conv(x, *conv(f"decoder.{block}.net.0"), padding=1))
        h = relu(flax_conv(h, *conv(f"decoder.{block}.net.2"), padding=1))
        x = x + flax_conv(h, *conv(f"decoder.{block}.net.4"), padding=0)
        stages.append(x)
    for index in (4, 6, 8, 10):
        x = relu(flax_conv_transpose(x, *conv(f"decoder.{index}")))
        stages.append(x)
    x = flax_conv(x, *conv("decoder.12"), padding=0)
    stages.append(x)
    return x[..., 0], stages  # [b, 64, 64]


def test_layout_shapes_and_keys_match_big_vision():
    torch.manual_seed(0)  # the initial weights' values do not matter here, only their shapes
    decoder = MaskDecoder()
    from paligemma.tasks.segmentation import decoder_state_to_npz

    written = {name: tuple(array.shape) for name, array in decoder_state_to_npz(decoder).items()}
    assert written == LAYOUT
    assert sum(int(np.prod(s)) for s in LAYOUT.values()) == sum(p.numel() for p in decoder.parameters())


def test_shapes_at_every_stage(npz_file):
    decoder = load_mask_decoder(npz_file)
    codes = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    shapes = [(name, tuple(t.shape)) for name, t in decoder.stages(codes)]
    assert shapes == [
        ("codebook vectors", (3, EMBED, 4, 4)),  # 16 codes -> a 4 x 4 grid of 512-vectors
        ("decoder.0", (3, 128, 4, 4)),
        ("decoder.2", (3, 128, 4, 4)),
        ("decoder.3", (3, 128, 4, 4)),
        ("decoder.4", (3, 128, 8, 8)),
        ("decoder.6", (3, 64, 16, 16)),
        ("decoder.8", (3, 32, 32, 32)),
        ("decoder.10", (3, 16, 64, 64)),
        ("decoder.12", (3, 1, 64, 64)),
    ]
    assert decoder(codes).shape == (3, 64, 64)


def test_decoder_equals_big_vision_transcription(npz_file):
    """Same file, same codes: the PyTorch decoder and the NumPy transcription of the Flax one agree, stage by stage."""
    arrays = dict(np.load(npz_file))
    decoder = load_mask_decoder(npz_file)
    codes = np.random.RandomState(1).randint(0, 128, (4, 16))
    expected, expected_stages = big_vision_decode(arrays, codes)
    with torch.no_grad():
        ours_stages = [t for name, t in decoder.stages(torch.from_numpy(codes)) if name != "decoder.12"]
        ours = decoder(torch.from_numpy(codes)).numpy()
    relu_after = {1, 4, 5, 6, 7}  # big_vision's stages after decoder.0 and each transposed conv include the ReLU
    for index, (theirs, mine) in enumerate(zip(expected_stages, ours_stages)):
        mine = mine.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
        if index in relu_after:
            mine = np.maximum(mine, 0)
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=1e-4, err_msg=f"stage {index}")
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    assert ours.std() > 0.05  # a real signal, not all zeros


def test_codes_fill_the_grid_row_by_row(npz_file):
    """Code t sits at row t // 4, column t % 4 of the 4 x 4 grid, as big_vision's reshape puts it."""
    decoder = load_mask_decoder(npz_file)
    codes = torch.arange(16)[None] * 7
    grid = decoder.embed(codes)[0]  # [e, 4, 4]
    for t in range(16):
        assert torch.equal(grid[:, t // 4, t % 4], decoder.codebook[7 * t])


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    decoder = MaskDecoder(embedding_dim=64)
    for param in decoder.parameters():
        torch.nn.init.normal_(param, 0, 0.1)
    save_mask_decoder(decoder, tmp_path / "mine.npz")
    loaded = load_mask_decoder(tmp_path / "mine.npz")
    assert loaded.codebook.shape == (128, 64)  # the codebook's width comes from the file
    codes = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(codes), decoder(codes))


def write(tmp_path, arrays, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_loader_errors(tmp_path):
    good = random_npz_arrays()
    with pytest.raises(PaliGemmaError, match="not found"):
        load_mask_decoder(tmp_path / "nowhere.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(PaliGemmaError, match="not a readable .npz"):
        load_mask_decoder(tmp_path / "text.npz")
    with pytest.raises(PaliGemmaError, match="no codebook"):
        load_mask_decoder(write(tmp_path, {k: v for k, v in good.items() if k != CODEBOOK_KEY}))
    with pytest.raises(PaliGemmaError, match="missing from .*decoder.6.bias"):
        load_mask_decoder(write(tmp_path, {k: v for k, v in good.items() if k != "decoder.6.bias"}))
    with pytest.raises(PaliGemmaError, match=r"wrong shape .*decoder.8.weight \[64, 32, 3, 3\]"):
        load_mask_decoder(write(tmp_path, {**good, "decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)}))
    with pytest.raises(PaliGemmaError, match="unexpected in .*decoder.14.weight"):
        load_mask_decoder(write(tmp_path, {**good, "decoder.14.weight": np.zeros(3, np.float32)}))


def test_bad_codes(npz_file):
    decoder = load_mask_decoder(npz_file)
    with pytest.raises(PaliGemmaError, match=r"shape \[batch, 16\]"):
        decoder(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(PaliGemmaError, match="0-127"):
        decoder(torch.full((1, 16), 128))


def test_paste_mask_into_the_box():
    mask64 = -np.ones((64, 64), np.float32)
    mask64[:, :32] = 1.0  # the left half of the box belongs to the object
    full = paste_mask(mask64, (10, 20, 50, 40), width=100, height=60)
    assert full.shape == (60, 100) and full.dtype == bool
    assert full[20:40, 10:29].all() and not full[20:40, 31:50].any()  # left half inside, right half not
    assert not full[:20].any() and not full[40:].any() and not full[:, :10].any() and not full[:, 50:].any()
    # A box running off the image is clipped; an empty or inverted box gives an empty or the same mask.
    assert paste_mask(np.ones((64, 64)), (90, 50, 130, 80), 100, 60).sum() == 10 * 10
    assert not paste_mask(np.ones((64, 64)), (5, 5, 5.2, 30), 100, 60).any()
    assert np.array_equal(paste_mask(mask64, (50, 40, 10, 20), 100, 60), paste_mask(mask64, (10, 20, 50, 40), 100, 60))
    with pytest.raises(PaliGemmaError, match="64 x 64"):
        paste_mask(np.zeros((32, 32)), (0, 0, 10, 10), 100, 60)


def test_segment_answer_to_masks(npz_file):
    decoder = load_mask_decoder(npz_file)
    codes = np.random.RandomState(2).randint(0, 128, 16)
    text = "<loc0256><loc0128><loc0768><loc0512>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat ; " \
           "<loc0000><loc0000><loc0100><loc0100> dog"
    objects = parse_locations(text, 320, 200)
    with torch.no_grad():
        mask64 = decoder(torch.from_numpy(codes)[None])[0]
    threshold = float(mask64.median())  # random weights: cut at the median so that half the box is object
    cat, dog = decode_objects(decoder, objects, 320, 200, threshold=threshold)
    assert dog is None and cat.shape == (200, 320)
    assert np.array_equal(cat, paste_mask(mask64, objects[0].box, 320, 200, threshold))
    inside = cat[50:150, 40:160]  # the box: x 40-160, y 50-150
    assert 0.3 < inside.mean() < 0.7 and inside.sum() == cat.sum()
