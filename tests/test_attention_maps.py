"""Attention maps: captured weights against transformers, masks, rollout, plots, and whether the maps mean anything."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    PROMPTS,
    TOL,
    assert_matches,
    gemma2_config_dict,
    random_image,
    reference_processor,
    strip_after_eos,
    write_reference_checkpoint,
)
from paligemma import PaliGemmaError, generate, load_pretrained
from paligemma.cli import main
from paligemma.interpret.capture import AttentionMaps, attention_maps, record_attention
from paligemma.interpret.localisation import (
    LocalisationCase,
    box_coverage,
    centres_inside,
    localisation_score,
    score_localisation,
)
from paligemma.interpret.rollout import aggregate, as_grid, attention_distance, rollout, rollout_rows
from paligemma.models.paligemma import prefix_lm_mask

NEW_TOKENS = 20


def reference_generation(ref, batch, max_new_tokens):
    """transformers' greedy generation with every step's attention weights (eager attention)."""
    with torch.no_grad():
        return ref.generate(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], max_new_tokens=max_new_tokens, do_sample=False,
            output_attentions=True, return_dict_in_generate=True,
        )


def reference_vision_attentions(ref, pixel_values):
    with torch.no_grad():
        out = ref.model.vision_tower(pixel_values=pixel_values, output_attentions=True)
    return torch.stack([w[0] for w in out.attentions])  # [layers, heads, P, P]


@pytest.fixture(scope="module", params=["mqa", "gqa"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_captured_weights_match_reference(checkpoint, prompt):
    """SigLIP's weights, the prompt's rows and every generation step's row equal transformers' (eager, with a cache)."""
    directory, ref = checkpoint
    model, processor = load_pretrained(directory)
    image = random_image(10)
    maps = attention_maps(model, processor, image, prompt, max_new_tokens=NEW_TOKENS)
    batch = reference_processor(directory)(text=[prompt], images=[image], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == processor(text=prompt, images=image)["input_ids"][0].tolist()

    assert_matches(maps.vision, reference_vision_attentions(ref, batch["pixel_values"]), **TOL)

    out = reference_generation(ref, batch, NEW_TOKENS)
    length = batch["input_ids"].shape[1]
    new = out.sequences[0, length:].tolist()
    assert maps.token_ids == strip_after_eos([new])[0]
    assert len(maps.token_ids) >= 10, "the comparison must cover generated tokens, not only the prompt"
    prefix = torch.stack([w[0] for w in out.attentions[0]])  # [layers, heads, L, L]
    assert_matches(maps.prompt_rows, prefix[:, :, maps.prompt_positions].permute(2, 0, 1, 3), **TOL)
    for step in range(len(maps.token_ids)):
        expected = torch.stack([w[0, :, -1] for w in out.attentions[step]])  # [layers, heads, L + step]
        assert expected.shape[-1] == length + step
        assert_matches(maps.generated_rows[step, ..., : length + step], expected, **TOL)
        assert (maps.generated_rows[step, ..., length + step:] == 0).all()
        assert_matches(maps.generated[step], expected[..., maps.image_positions], **TOL)


def test_capture_changes_nothing(mqa_checkpoint):
    """Same tokens as `generate`, greedy and sampled; no hook is left behind and no attention path is changed."""
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    image = random_image(11)

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    def implementations() -> list[str]:
        return [m.implementation for m in model.modules() if hasattr(m, "implementation")]

    for settings in (dict(), dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=3)):
        expected = generate(model, processor, [image], ["caption en"], max_new_tokens=12, return_ids=True, **settings)
        maps = attention_maps(model, processor, image, "caption en", max_new_tokens=12, **settings)
        assert maps.token_ids == expected.token_ids[0]
        assert maps.text == expected.texts[0]
        assert set(implementations()) == {"sdpa"} and hooks() == 0
    model.set_attention_implementation("eager")
    model.vision_tower.encoder.layers[0].self_attn.attend.implementation = "sdpa"  # a mixed model stays mixed
    before = implementations()
    eager_maps = attention_maps(model, processor, image, "caption en", max_new_tokens=4)
    assert implementations() == before and hooks() == 0
    model.set_attention_implementation("sdpa")
    sdpa_maps = attention_maps(model, processor, image, "caption en", max_new_tokens=4)
    assert_matches(sdpa_maps.vision, eager_maps.vision, **TOL)  # the weights do not depend on the path taken
    assert_matches(sdpa_maps.generated_rows, eager_maps.generated_rows, **TOL)
    with pytest.raises(RuntimeError), record_attention(model) as records:
        assert hooks() > 0
        raise RuntimeError("hooks are removed even when the block fails")
    assert hooks() == 0 and records == []


def test_rows_sum_to_one_and_masked_positions_are_exactly_zero(gqa_checkpoint):
    """A padded batch with suffixes: every real query's row sums to 1 over what it may see, and is 0 elsewhere."""
    directory, _ = gqa_checkpoint
    model, processor = load_pretrained(directory)
    batch = processor(text=PROMPTS, images=[random_image(1), random_image(2)], suffix=["a red circle", "red"])
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()
    with torch.no_grad(), record_attention(model.language_model) as text, record_attention(model.vision_tower) as vision:
        model(**batch)
    assert len(text) == model.config.text_config.num_hidden_layers
    assert len(vision) == model.config.vision_config.num_hidden_layers
    allowed = prefix_lm_mask(batch["attention_mask"], batch["token_type_ids"])  # [b, 1, s, s]
    real = batch["attention_mask"].bool()[:, None, :, None]  # rows of padding queries see nothing: skip them
    assert not allowed.all(), "the batch must have masked positions"
    for weights in text:  # [b, heads, s, s]
        masked = ~allowed.expand_as(weights) & real.expand_as(weights)
        assert (weights[masked] == 0).all()
        sums = weights.sum(-1)[real[..., 0].expand(weights.shape[:3])]
        assert_matches(sums, torch.ones_like(sums), **TOL)
    for weights in vision:
        assert_matches(weights.sum(-1), torch.ones(weights.shape[:3]), **TOL)

    maps = attention_maps(model, processor, random_image(3), PROMPTS[1], max_new_tokens=8)
    length = maps.prompt_rows.shape[-1]
    assert_matches(maps.prompt_rows.sum(-1), torch.ones(maps.prompt_rows.shape[:3]), **TOL)
    for step in range(len(maps.token_ids)):
        seen = maps.generated_rows[step, ..., : length + step]
        assert_matches(seen.sum(-1), torch.ones(seen.shape[:2]), **TOL)
    share = maps.image_share()
    assert ((share > 0) & (share < 1)).all()


def test_sliding_window_layers_see_only_their_window(workdir, tokenizer_file_without_image):
    """PaliGemma 2: on a sliding layer a generated token's row is 0 outside its window (the cache forgot those
    positions), sums to 1 inside, and equals transformers' weights placed at the same positions."""
    window = 6
    directory = workdir / "attention_gemma2"
    ref = write_reference_checkpoint(directory, gemma2_config_dict(window=window), tokenizer_file_without_image, seed=4)
    model, processor = load_pretrained(directory)
    image = random_image(12)
    maps = attention_maps(model, processor, image, "caption en", max_new_tokens=12)
    assert len(maps.token_ids) == 12
    length = maps.prompt_rows.shape[-1]
    sliding = [i for i, layer in enumerate(model.language_model.layers) if layer.is_sliding]
    assert sliding == [0, 2]
    for step in range(1, len(maps.token_ids)):
        query = length + step - 1  # the position of the query that predicted token `step`
        for layer in sliding:
            row = maps.generated_rows[step, layer]  # [heads, positions]
            assert (row[:, : query - window + 1] == 0).all()
            assert_matches(row[:, query - window + 1: query + 1].sum(-1), torch.ones(row.shape[0]), **TOL)
        assert (maps.generated_rows[step, 1, :, : query - window + 1] > 0).all(), "the full layer sees everything"

    batch = reference_processor(directory)(text=["caption en"], images=[image], return_tensors="pt")
    out = reference_generation(ref, batch, 12)
    assert maps.token_ids == out.sequences[0, length:].tolist()
    assert_matches(maps.vision, reference_vision_attentions(ref, batch["pixel_values"]), **TOL)
    for step in range(len(maps.token_ids)):
        for layer, weights in enumerate(out.attentions[step]):
            expected = weights[0, :, -1]  # [heads, keys]: the most recent positions
            ours = maps.generated_rows[step, layer, :, : length + step]
            assert_matches(ours[:, ours.shape[-1] - expected.shape[-1]:], expected, **TOL)
            assert (ours[:, : ours.shape[-1] - expected.shape[-1]] == 0).all()


def test_rollout():
    """Rows sum to 1; with no residual it is the product of the head-averaged layers; identity stays identity."""
    generator = torch.Generator().manual_seed(0)
    vision = torch.rand(3, 2, 16, 16, generator=generator).softmax(-1)  # [layers, heads, P, P], rows sum to 1
    rolled = rollout(vision)
    assert_matches(rolled.sum(-1), torch.ones(16), **TOL)
    layers = vision.double().mean(1)
    assert_matches(rollout(vision, residual=0.0), (layers[2] @ layers[1] @ layers[0]).float(), **TOL)
    half = [0.5 * torch.eye(16, dtype=torch.float64) + 0.5 * layer for layer in layers]
    assert_matches(rolled, (half[2] @ half[1] @ half[0]).float(), **TOL)
    maxed = [0.5 * torch.eye(16, dtype=torch.float64) + 0.5 * layer.amax(0) for layer in vision.double()]
    maxed = [m / m.sum(-1, keepdim=True) for m in maxed]
    assert_matches(rollout(vision, heads="max"), (maxed[2] @ maxed[1] @ maxed[0]).float(), **TOL)
    rows = torch.rand(5, 16, generator=generator)
    expected = rows @ rollout(vision, heads=1, residual=0.3)
    assert_matches(rollout_rows(vision, rows, heads=1, residual=0.3), expected, **TOL)
    identity = torch.eye(16).expand(3, 2, 16, 16)
    assert_matches(rollout(identity), torch.eye(16), **TOL)
    with pytest.raises(PaliGemmaError):
        rollout(vision[0])
    with pytest.raises(PaliGemmaError):
        rollout(vision, residual=1.0)


def test_rollout_of_a_captured_model(mqa_checkpoint):
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    maps = attention_maps(model, processor, random_image(4), "caption en", max_new_tokens=3)
    rolled = maps.rollout()
    assert_matches(rolled.sum(-1), torch.ones(rolled.shape[0]), **TOL)
    assert (rolled >= 0).all()
    assert_matches(maps.rollout_map().sum(), torch.tensor(1.0), **TOL)
    through = maps.token_map_through_vision(0)
    assert_matches(through.sum(), maps.token_map(0).sum(), **TOL)  # rollout moves attention, never creates it


def test_aggregation():
    weights = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [layers, heads, P]
    # Bit for bit although `aggregate` reduces heads first, then layers: weights[l, h, p] = 12 l + 4 h + p, so every
    # mean below (over 3 heads, 2 layers, or all 6) is an integer, exact in float32 whatever the order of the sums.
    assert torch.equal(aggregate(weights, 0, 1), weights[0, 1])
    assert torch.equal(aggregate(weights, -1, -1), weights[1, 2])
    assert torch.equal(aggregate(weights, "mean", "mean"), weights.mean((0, 1)))
    assert torch.equal(aggregate(weights, "max", "mean"), weights.mean(1).amax(0))
    assert torch.equal(aggregate(weights, 1, "max"), weights[1].amax(0))
    assert as_grid(torch.arange(16.0)).tolist()[1] == [4.0, 5.0, 6.0, 7.0]  # row by row from the top left


def test_attention_distance():
    """Each patch looking at itself: distance 0; at its right-hand neighbour (last column: left): distance 1."""
    grid = 4
    own = torch.eye(16).expand(1, 2, 16, 16)
    neighbour = torch.zeros(1, 1, 16, 16)
    for patch in range(16):
        neighbour[0, 0, patch, patch + 1 if patch % grid < grid - 1 else patch - 1] = 1.0
    assert attention_distance(own).tolist() == [[0.0, 0.0]]
    assert attention_distance(neighbour).tolist() == [[1.0]]
    uniform = torch.full((1, 1, 16, 16), 1 / 16)
    assert attention_distance(uniform).item() == pytest.approx(float(torch.cdist(*[torch.tensor(
        [[r, c] for r in range(4) for c in range(4)], dtype=torch.float64)] * 2).mean()))
    with pytest.raises(PaliGemmaError):
        attention_distance(torch.ones(2, 2, 15, 15))


def synthetic_maps(grid: int, layers: int = 2, heads: int = 3, steps: int = 3, vision_heads: int = 3) -> AttentionMaps:
    """An AttentionMaps of random row-stochastic weights on a grid x grid image, as a real capture would give."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    patches, prompt = grid * grid, 4
    length = patches + prompt
    vision = torch.rand(layers, vision_heads, patches, patches, generator=generator).softmax(-1)
    prompt_rows = torch.rand(prompt, layers, heads, length, generator=generator).softmax(-1)
    generated_rows = torch.zeros(steps, layers, heads, length + steps - 1)
    for step in range(steps):
        scores = torch.rand(layers, heads, length + step, generator=generator)
        generated_rows[step, ..., : length + step] = scores.softmax(-1)
    pixels = torch.randint(0, 256, (grid * 14, grid * 14, 3), generator=generator, dtype=torch.uint8)
    return AttentionMaps(
        prompt_text="answer en what color is the circle?", token_ids=[7, 8, 1][:steps],
        tokens=["red", " circle", "<eos>"][:steps],
        prompt_tokens=["<bos>", "answer", " en", "\n"], vision=vision, generated_rows=generated_rows,
        prompt_rows=prompt_rows, image_positions=torch.arange(patches), prompt_positions=torch.arange(patches, length),
        image=Image.fromarray(pixels.numpy()), text="red circle",
    )


def test_bad_input_is_one_line_error(mqa_checkpoint):
    maps = synthetic_maps(4)
    calls = [
        lambda: maps.token_map(3), lambda: maps.token_map(0, layers=2), lambda: maps.token_map(0, heads=-4),
        lambda: maps.token_map(0, heads="median"), lambda: maps.token_map(0, layers=True), lambda: maps.prompt_map(9),
        lambda: maps.patch_map(16), lambda: maps.patch_map((0, 4)), lambda: maps.rollout_map((5, 0)),
        lambda: aggregate(torch.ones(3)), lambda: as_grid(torch.ones(15)), lambda: maps.token_map(0, layers=None),
    ]
    for call in calls:
        with pytest.raises(PaliGemmaError) as error:
            call()
        assert "\n" not in str(error.value)
    assert "layer 2 is out of range" in _message(lambda: maps.token_map(0, layers=2))
    assert "unknown head aggregation 'median'" in _message(lambda: maps.token_map(0, heads="median"))
    directory, _ = mqa_checkpoint
    model, processor = load_pretrained(directory)
    for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=-1), dict(do_sample=True, temperature=0.0)):
        with pytest.raises(PaliGemmaError):
            attention_maps(model, processor, random_image(0), "caption en", **kwargs)
    with pytest.raises(PaliGemmaError):
        attention_maps(model, processor, [random_image(0)] * 2, "caption en")


def _message(call) -> str:
    with pytest.raises(PaliGemmaError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize("grid", [8, 16, 32, 64])
def test_plots_for_every_grid(grid):
    """Every figure draws for the grids of tiny-shapes and of PaliGemma at 224, 448 and 896 pixels."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paligemma.interpret.plots import plot_heads, plot_tokens, show_map, upsample

    maps = synthetic_maps(grid, steps=3, vision_heads=3 if grid < 64 else 1)  # 64 x 64: 4096^2 weights a head
    generator = torch.Generator().manual_seed(grid)
    values = torch.rand(grid, grid, generator=generator)
    pixels = upsample(values, grid * 14)
    assert pixels.shape == (grid * 14, grid * 14)
    for row in (0, grid // 2, grid - 1):  # each patch is exactly its own 14 x 14 block of pixels
        for column in (0, grid - 1):
            block = pixels[row * 14:(row + 1) * 14, column * 14:(column + 1) * 14]
            assert (block == values[row, column].item()).all()
    assert upsample(values, 100, 50).shape == (100, 50)
    ax = show_map(values, maps.image, grid_lines=True, mark=(1, 2), title="one map", style="heat")
    assert ax.get_images()[1].get_array().shape == (grid * 14, grid * 14, 4)  # the heat, one RGBA value per pixel
    assert ax.get_images()[0].get_array().shape == (grid * 14, grid * 14, 3)
    assert ax.get_xlim() == (0.0, grid * 14.0)
    figures = [ax.figure, plot_heads(maps.generated[0], maps.image, title="heads"),
               plot_heads(maps.vision[:, :, 0], maps.image, layers=[-1], shared_scale=True, mark=0),
               plot_tokens(maps), plot_tokens(maps, layers="mean", heads="max", through_vision=True, style="heat"),
               plot_tokens(maps, source="prompt", through_vision=True, steps=[0, 3])]
    assert figures[3].axes[0].get_title() == "'red'"
    for figure in figures:
        figure.canvas.draw()
        plt.close(figure)
    with pytest.raises(PaliGemmaError):
        plot_heads(maps.generated[0], layers=[5])
    with pytest.raises(PaliGemmaError):
        show_map(torch.rand(3, 4, generator=generator))
    with pytest.raises(PaliGemmaError):
        show_map(values, style="glow")
    with pytest.raises(PaliGemmaError):
        plot_tokens(maps, source="image")
    assert len(figures[5].axes) == 2 and figures[5].axes[1].get_title() == repr("\n")
    spotlight = show_map(values, maps.image, style="spotlight")
    assert len(spotlight.get_images()) == 1
    plt.close("all")

def test_localisation_scoring_on_known_maps():
    """All attention in the box: hit and mass 1; uniform attention: mass equal to the box's area, the baseline."""
    grid, size = 8, 112
    box = (14, 28, 41, 55)  # exactly patches (2..3, 1..2): 2 x 2 patches
    coverage = box_coverage(box, grid, size)
    assert coverage.sum().item() == pytest.approx(4.0) and coverage[2, 1] == 1 and coverage[0, 0] == 0
    assert centres_inside(box, grid, size).sum() == 4
    assert box_coverage((0, 0, 6, 13), grid, size)[0, 0].item() == pytest.approx(0.5)  # half a patch
    inside = torch.zeros(1, 1, 64)
    inside[0, 0, 2 * 8 + 1] = 1.0
    uniform = torch.full((1, 1, 64), 1 / 64)
    other = (70, 70, 97, 97)
    on_other = torch.zeros(1, 1, 64)
    on_other[0, 0, 6 * 8 + 6] = 1.0  # a patch inside the other box: (70..97) covers patch rows and columns 5..6
    cases = [LocalisationCase("q", "red", "red", inside, [box, other], ["red", "blue"], 0, size),
             LocalisationCase("q", "red", "blue", uniform, [other, box], ["blue", "red"], 1, size),
             LocalisationCase("q", "red", "blue", on_other, [box, other], ["red", "blue"], 0, size),
             LocalisationCase("q", "red", "pink", inside, [box, other], ["red", "blue"], 0, size)]
    hit, flat, wrong = score_localisation(cases[:1]), score_localisation(cases[1:2]), score_localisation(cases[2:3])
    assert (hit.hit_rate, hit.mass_inside, hit.mass_other, hit.right_shape_rate, hit.answer_accuracy) == (1, 1, 0, 1, 1)
    assert (hit.said_scenes, hit.said_hit_rate, hit.said_hit_baseline) == (1, 1, 4 / 64)
    assert flat.mass_inside == pytest.approx(flat.area_baseline) == pytest.approx(28 * 28 / 112**2)
    assert flat.hit_baseline == pytest.approx(4 / 64) and flat.right_shape_rate == 0 and flat.answer_accuracy == 0
    assert (wrong.hit_rate, wrong.mass_inside, wrong.mass_other, wrong.said_hit_rate) == (0, 0, 1, 1)
    assert score_localisation(cases[3:]).said_scenes == 0  # a colour no shape has: not counted
    assert score_localisation(cases).said_scenes == 3
    assert "4 scenes" in score_localisation(cases).summary()


def test_answer_looks_at_the_asked_shape():
    """On tiny-shapes, the colour answer's attention (last decoder layer, mean over heads) falls on the shape
    asked about far more often than chance, and with far more mass than the shape's area: checked on a CI-sized
    sample (the book and `python -m paligemma.attention_maps score` measure 200 scenes)."""
    model, processor = load_pretrained("tiny-shapes")
    score = localisation_score(model, processor, n_scenes=40, seed=17)
    assert score.scenes == 40
    assert score.hit_rate > 2 * score.hit_baseline, score.summary()
    assert score.mass_inside > 2 * score.area_baseline, score.summary()


def test_command_line(tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    assert main(["attention", "score", "--scenes", "3", "--seed", "1"]) == 0
    assert "3 scenes (layer -1, heads mean)" in capsys.readouterr().out
    assert main(["attention", "score", "--scenes", "2", "--layers", "9"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: layer 9 is out of range") and error.count("\n") == 1
    image = tmp_path / "scene.png"
    from paligemma.book import shapes_scene

    shapes_scene(3).image.save(image)
    out = tmp_path / "maps.png"
    plot = ["attention", "plot", "--image", str(image), "--prompt", "caption en", "--out", str(out), "--max-new-tokens", "3"]
    assert main(plot) == 0
    assert out.stat().st_size > 1000
    assert main(["attention", "plot", "--image", str(tmp_path / "missing.png"), "--prompt", "caption en", "--out", str(out)]) == 2
    assert "image file not found" in capsys.readouterr().err
