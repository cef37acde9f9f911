"""The attention export and its browser viewer: the stored maps are attention_maps' own after the stated 8-bit
rounding, files are checked when read, and the viewer in headless Chromium draws what the library computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_image
from paligemma import PaliGemmaError, load_pretrained
from paligemma.interpret.capture import attention_maps
from paligemma.interpret.export import (
    FORMAT,
    decode_example,
    dequantize_rows,
    export_attention,
    quantize_rows,
    read_attention_export,
    write_attention_export,
)
from paligemma.interpret.viewer import AttentionViewer, viewer_html, write_viewer_page

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["caption en", "answer en what color is the circle?", "detect circle"]


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("tiny-shapes")


@pytest.fixture(scope="module")
def captured(tiny):
    model, processor = tiny
    return [attention_maps(model, processor, ROOT / "images" / "shapes_1.png", prompt, max_new_tokens=12)
            for prompt in PROMPTS]


def test_quantize_rows():
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(5, 3, 64, generator=generator).softmax(-1)
    rows[1, 2] = 0.0  # a row of zeros stays zeros
    values, top = quantize_rows(rows)
    assert values.dtype == torch.uint8 and top.dtype == torch.float32 and top.shape == (5, 3)
    assert (values.amax(-1)[top > 0] == 255).all() and (values[1, 2] == 0).all() and top[1, 2] == 0
    back = dequantize_rows(values, top)
    assert ((back - rows).abs() <= top.unsqueeze(-1) / 510 * (1 + 1e-6)).all()  # within half a step
    assert (quantize_rows(torch.tensor([0.0, 0.5, 1.0]))[0] == torch.tensor([0, 128, 255], dtype=torch.uint8)).all()
    with pytest.raises(PaliGemmaError, match="non-negative"):
        quantize_rows(torch.tensor([0.5, -0.1]))


def _assert_stored(raw: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor) -> None:
    """Stored values equal round(255 * w / row max) exactly; decoded, they lie within half a step of w."""
    values, top = raw
    expected_values, expected_top = quantize_rows(weights)
    assert torch.equal(values, expected_values) and torch.equal(top, expected_top)
    assert ((dequantize_rows(values, top) - weights).abs() <= top.unsqueeze(-1) / 510 * (1 + 1e-6)).all()


def test_export_is_attention_maps_after_rounding(captured, tmp_path):
    """Every stored array, read back from the file, is the library's own maps after the stated rounding."""
    records = [export_attention(maps, label=f"shapes_1.png: {maps.prompt_text}") for maps in captured]
    size = write_attention_export(tmp_path / "maps.json", records)
    assert size == (tmp_path / "maps.json").stat().st_size
    export = read_attention_export(tmp_path / "maps.json")
    assert export["format"] == FORMAT and [e["label"] for e in export["examples"]] == [r["label"] for r in records]
    for maps, example in zip(captured, export["examples"]):
        decoded = decode_example(example)
        raw = decoded["raw"]
        _assert_stored(raw["generated"], maps.generated)  # [steps, layers, heads, P]
        _assert_stored(raw["prompt"], maps.prompt)
        _assert_stored(raw["rollout"], maps.rollout())
        _assert_stored(raw["patch"], maps.vision.mean(1))
        # The library's named maps are these rows: a token's head map, and one SigLIP patch's map in layer 2.
        layers, heads = maps.generated.shape[1:3]
        assert example["decoder"] == {**example["decoder"], "layers": layers, "heads": heads}
        step = len(maps.tokens) - 1
        top = decoded["raw"]["generated"][1][step, -1, 1]
        assert (decoded["generated"][step, -1, 1] - maps.token_map(step, -1, 1).flatten()).abs().max() <= top / 510
        top = decoded["raw"]["patch"][1][2, 9]
        assert (decoded["patch"][2, 9] - maps.patch_map(9, layers=2).flatten()).abs().max() <= top / 510 + 1e-7
        # Tokens: text, id, and the position whose query predicted each (the \\n, then the previous token).
        length = int(maps.prompt_positions[-1]) + 1
        assert [t["text"] for t in example["tokens"]] == maps.tokens
        assert [t["id"] for t in example["tokens"]] == maps.token_ids
        assert [t["predicted_at"] for t in example["tokens"]] == list(range(length - 1, length - 1 + len(maps.tokens)))
        assert [t["predictor"] for t in example["tokens"]] == ["\n"] + maps.tokens[:-1]
        assert [t["position"] for t in example["prompt_tokens"]] == maps.prompt_positions.tolist()
        assert example["answer"] == maps.text and example["grid"] == maps.grid == 8
        assert example["image"].startswith("data:image/png;base64,")
    assert captured[2].text.startswith("<loc") and captured[1].text  # a detection and an answer


def test_export_size_and_options(captured):
    """The stated size: (S + T) L H P + (V + 1) P^2 bytes before base64; SigLIP's layers can be left out."""
    maps = captured[0]
    record = export_attention(maps)
    steps, layers, heads, patches = maps.generated.shape
    stored = sum(len(record[part][name]["values"]) for part, name in
                 [("decoder", "generated"), ("decoder", "prompt"), ("vision", "rollout"), ("vision", "patch")])
    expected = (steps + len(maps.prompt_tokens)) * layers * heads * patches + (maps.vision.shape[0] + 1) * patches**2
    assert stored == 4 * -(-expected // 3) or abs(stored - 4 * expected / 3) < 16  # base64 of that many bytes
    small = export_attention(maps, siglip_layers=False)
    assert "patch" not in small["vision"] and "rollout" in small["vision"]
    assert decode_example(small)["rollout"].shape == (patches, patches)
    with pytest.raises(PaliGemmaError, match="AttentionMaps"):
        export_attention({"not": "maps"})


def test_export_for_another_model_and_image(mqa_checkpoint, tmp_path):
    """Any checkpoint and image: a test checkpoint with its own grid, head counts and an image of another size."""
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    maps = attention_maps(model, processor, random_image(3, 50, 20), "caption en", max_new_tokens=5)
    write_attention_export(tmp_path / "m.json", [export_attention(maps)])
    example = read_attention_export(tmp_path / "m.json")["examples"][0]
    _assert_stored(decode_example(example)["raw"]["generated"], maps.generated)
    assert example["grid"] == maps.grid and example["decoder"]["heads"] == model.config.text_config.num_attention_heads


def test_bad_exports_are_named(captured, tmp_path):
    record = export_attention(captured[1])
    path = tmp_path / "bad.json"

    def error_for(text: str) -> str:
        path.write_text(text)
        with pytest.raises(PaliGemmaError) as error:
            read_attention_export(path)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "no attention export" in str(pytest.raises(PaliGemmaError, read_attention_export, tmp_path / "none.json").value)
    assert "not valid JSON" in error_for("{\"format\": ")
    assert "not a paligemma-attention/1 file" in error_for(json.dumps({"format": "other", "examples": [record]}))
    assert "no examples" in error_for(json.dumps({"format": FORMAT, "examples": []}))
    cut = json.loads(json.dumps(record))
    cut["decoder"]["generated"]["values"] = cut["decoder"]["generated"]["values"][:-8]
    assert "do not fit the shape" in error_for(json.dumps({"format": FORMAT, "examples": [cut]}))
    missing = {key: value for key, value in record.items() if key != "vision"}
    assert "missing field 'vision'" in error_for(json.dumps({"format": FORMAT, "examples": [missing]}))
    with pytest.raises(PaliGemmaError, match="folder"):
        write_attention_export(tmp_path / "no" / "m.json", [record])
    with pytest.raises(PaliGemmaError, match="at least one record"):
        write_attention_export(tmp_path / "m.json", [])


def test_viewer_html(captured, tmp_path):
    """One mount point, the data inline (no '<' that could end its script), the script, and a page that stands alone."""
    record = export_attention(captured[0])
    record["answer"] = "</script><b>"  # text from the model is data, never markup
    page = viewer_html([record])
    assert page.count('class="pga-mount"') == 1 and "PaliGemmaAttention.mount(" in page
    data = page.split('type="application/json"')[1].split("</script>")[0]
    assert "<" not in data.split(">", 1)[1] and json.loads(data.split(">", 1)[1])["examples"][0]["answer"] == "</script><b>"
    assert "http" not in page.split("<script>")[1]  # no network: nothing fetched from anywhere
    viewer = AttentionViewer(captured[0])
    assert viewer._repr_html_() == viewer.html and repr(viewer) == "AttentionViewer(1 examples: 'caption en')"
    size = write_viewer_page(tmp_path / "page.html", captured)
    assert size == (tmp_path / "page.html").stat().st_size and "<!DOCTYPE html>" in (tmp_path / "page.html").read_text()
    with pytest.raises(PaliGemmaError, match="the viewer shows"):
        AttentionViewer(42)


def test_cli_export(tmp_path):
    """`paligemma attention export` writes the file and the page, and names bad input in one line."""
    out, page = tmp_path / "maps.json", tmp_path / "maps.html"
    command = [sys.executable, "-m", "paligemma", "attention", "export", "--image", str(ROOT / "images" / "shapes_4.png"),
               "--prompt", "caption en", "--prompt", "detect circle", "--max-new-tokens", "6", "--out", str(out),
               "--html", str(page), "--no-siglip-layers"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    export = read_attention_export(out)
    assert [e["label"] for e in export["examples"]] == ["shapes_4.png: caption en", "shapes_4.png: detect circle"]
    assert "patch" not in export["examples"][0]["vision"] and page.is_file()
    assert f"2 examples, {out.stat().st_size / 1e3:.0f} kB (8-bit maps) written to {out}" in result.stdout
    bad = subprocess.run(command[:6] + ["missing.png", "--prompt", "x", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: image file not found: missing.png"


def test_explorer_shows_the_viewer(mqa_checkpoint):
    """The live-kernel explorer captures each new (image, prompt) pair once and shows it in the same viewer."""
    pytest.importorskip("ipywidgets")
    from paligemma.interpret.explorer import AttentionExplorer

    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    explorer = AttentionExplorer(model, processor, {"noise": random_image(10), "other": random_image(6)},
                                 ["caption en", "detect cat"], max_new_tokens=4)
    first = explorer.viewer
    assert first is not None and first.export["examples"][0]["label"] == "noise: caption en"
    explorer.prompt.value = "detect cat"
    assert explorer.viewer.export["examples"][0]["label"] == "noise: detect cat"
    explorer.image.value = "other"  # (other, detect cat)
    explorer.prompt.value = "caption en"
    assert len(explorer._captured) == 4 and explorer.viewer.export["examples"][0]["label"] == "other: caption en"
    explorer.image.value = "noise"  # seen before: shown again, not captured again
    assert len(explorer._captured) == 4 and explorer.viewer.export == first.export


# --- the viewer in Chromium ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(captured, tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "viewer.html"
    write_viewer_page(path, [export_attention(maps) for maps in captured])
    return path


def test_viewer_in_chromium_draws_the_library_maps(chromium, captured, page):
    """From file://: no console errors; the drawn maps are the library's (within the 8-bit rounding); clicks, arrow
    keys, layer and head choices and the SigLIP views each change the canvas."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    chromium.get(page.as_uri())
    root = chromium.find_element(By.CSS_SELECTOR, ".pga")
    canvas = root.find_element(By.CSS_SELECTOR, "canvas.pga-main")

    def drawn() -> tuple[str, torch.Tensor]:
        values = torch.tensor([float(v) for v in canvas.get_attribute("data-map").split()])
        return chromium.execute_script("return arguments[0].toDataURL()", canvas), values

    def near(values: torch.Tensor, expected: torch.Tensor, top: float) -> bool:
        return bool((values - expected.flatten()).abs().max() <= top / 510 + 1e-4)  # 8 bits, then 4 decimals

    maps = captured[0]
    pixels, values = drawn()
    assert near(values, maps.token_map(0), float(maps.generated[0, -1].amax()))  # last layer, mean over heads
    root.find_elements(By.CSS_SELECTOR, ".pga-tokens button")[2].click()
    after_click, values = drawn()
    assert after_click != pixels and near(values, maps.token_map(2), float(maps.generated[2, -1].amax()))
    assert "predicted at position" in root.find_element(By.CSS_SELECTOR, ".pga-caption").text
    root.send_keys(Keys.ARROW_RIGHT)
    after_key, values = drawn()
    assert after_key != after_click and near(values, maps.token_map(3), float(maps.generated[3, -1].amax()))
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=layer]")).select_by_value("0")
    after_layer, values = drawn()
    assert after_layer != after_key and near(values, maps.token_map(3, layers=0), float(maps.generated[3, 0].amax()))
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=head]")).select_by_value("2")
    after_head, values = drawn()
    assert after_head != after_layer and near(values, maps.token_map(3, 0, 2), float(maps.generated[3, 0, 2].max()))
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=view]")).select_by_value("through")
    _, values = drawn()
    assert (values - maps.token_map_through_vision(3, 0, 2).flatten()).abs().max() < 0.01
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=view]")).select_by_value("patch")
    chromium.execute_script(  # a click at the middle of patch (4, 4) of the 8 x 8 grid
        "const box = arguments[0].getBoundingClientRect();"
        "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: box.left + box.width * 9 / 16,"
        " clientY: box.top + box.height * 9 / 16}));", canvas)
    _, values = drawn()
    assert "patch (4, 4)" in root.find_element(By.CSS_SELECTOR, ".pga-caption").text
    assert near(values, maps.patch_map((4, 4), layers=0), float(maps.vision[0].mean(0)[36].max()))
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=view]")).select_by_value("rollout")
    _, values = drawn()
    assert (values - maps.rollout_map().flatten()).abs().max() < 0.005
    Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=example]")).select_by_index(2)
    assert "detect circle" in root.text
    errors = [entry for entry in chromium.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
