"""Weights in 2 MB pages: the arena, moving a model's weights into one, and the loaders reading into one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from paligemma import generate, load_pretrained
from paligemma.errors import PaliGemmaError
from paligemma.io.safetensors import SafetensorsFile
from paligemma.kernels import huge_pages
from paligemma.kernels.huge_pages import HugePageArena, huge_page_bytes, place_in_huge_pages
from paligemma.quantization import quantize

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "paligemma" / "checkpoints" / "tiny-shapes"
IMAGE = ROOT / "images" / "shapes_3.png"
UNAVAILABLE = huge_pages.huge_pages_unavailable()
needs_huge_pages = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}")


@pytest.fixture
def small_threshold(monkeypatch):
    """tiny-shapes' largest tensor is 1.2 MB: with a 64 KB threshold most of its weights go into huge pages."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 64 << 10)


def in_arena(tensor: torch.Tensor) -> bool:
    return huge_pages.in_an_arena(tensor)


@needs_huge_pages
def test_arena_hands_out_aligned_tensors_of_their_own_in_huge_pages():
    arena = HugePageArena(65 << 20)
    big = arena.take((4096, 4096), torch.float32)  # 64 MB
    small = arena.take((3, 5), torch.bfloat16)
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0  # the first tensor starts the first whole page
    assert small.data_ptr() % huge_pages.ALIGN == 0
    assert big.untyped_storage().nbytes() == 64 << 20 and small.untyped_storage().nbytes() == 30
    big.fill_(1.5)
    assert huge_page_bytes(big) >= 32 << 20  # most of the 64 MB, as 2 MB pages
    if "[madvise]" in huge_pages.THP_SETTING.read_text():  # a mapping that does not ask gets 4 KB pages only
        plain = huge_pages.mmap.mmap(-1, 32 << 20, flags=huge_pages.mmap.MAP_PRIVATE | huge_pages.mmap.MAP_ANONYMOUS)
        written = torch.frombuffer(plain, dtype=torch.uint8)
        written.fill_(1)
        assert huge_page_bytes(written) == 0 and not in_arena(written)
        del written
    assert in_arena(big) and in_arena(small) and not in_arena(torch.ones(4))
    with pytest.raises(MemoryError, match="arena has"):
        arena.take((1 << 20,), torch.float32)
    del arena  # the tensors keep the mapping
    assert float(big.sum()) == 1.5 * (1 << 24)


@needs_huge_pages
def test_place_in_huge_pages_keeps_parameters_ties_and_answers(small_threshold):
    model, processor = load_pretrained(TINY, huge_pages=False)
    before = generate(model, processor, [IMAGE], ["caption en"])
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    moved = place_in_huge_pages(model)
    assert moved == sum(p.numel() * p.element_size() for p in model.parameters() if p.numel() * 4 >= 64 << 10)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    embedding = model.language_model.embed_tokens.weight
    assert model.language_model.lm_head.weight is embedding and in_arena(embedding)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    assert generate(model, processor, [IMAGE], ["caption en"]) == before
    assert place_in_huge_pages(model) == 0  # everything big is there already


@needs_huge_pages
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loading_into_huge_pages_reads_the_same_weights(dtype, small_threshold):
    mapped, processor = load_pretrained(TINY, dtype=dtype, huge_pages=False)
    paged, _ = load_pretrained(TINY, dtype=dtype, huge_pages=True)
    expected = mapped.state_dict()
    assert paged.state_dict().keys() == expected.keys()
    assert all(torch.equal(paged.state_dict()[name], t) and paged.state_dict()[name].dtype == t.dtype
               for name, t in expected.items())
    big = [t for t in paged.state_dict().values() if t.numel() * t.element_size() >= 64 << 10]
    assert big and all(in_arena(t) for t in big)
    assert not any(in_arena(t) for t in mapped.state_dict().values())
    assert paged.language_model.lm_head.weight is paged.language_model.embed_tokens.weight
    assert generate(paged, processor, [IMAGE], ["caption en"]) == generate(mapped, processor, [IMAGE], ["caption en"])
    default, _ = load_pretrained(TINY, dtype=dtype)  # the file holds float32: bf16 is made, float32 mapped
    made = [t for t in default.state_dict().values() if t.numel() * t.element_size() >= 64 << 10]
    assert made and all(in_arena(t) == (dtype == "bf16") for t in made)
    assert all(torch.equal(default.state_dict()[name], t) for name, t in expected.items())


@needs_huge_pages
@pytest.mark.parametrize("scheme, group_size", [("int8", 128), ("int4", 32)])
def test_quantized_loading_into_huge_pages(scheme, group_size, small_threshold, tmp_path):
    """Quantized while loading, from a quantized folder, and quantized after an adapter merge: the same tensors as
    without huge pages, the codes among those in the arena."""
    plain, processor = load_pretrained(TINY, dtype="bf16", quantization=scheme, group_size=group_size,
                                       huge_pages=False)
    expected = plain.state_dict()
    plain.save_pretrained(tmp_path)
    shutil.copy(TINY / "tokenizer.model", tmp_path)
    codes = "codes" if scheme == "int8" else "packed"
    for source, huge in ((TINY, None), (TINY, True), (tmp_path, None), (tmp_path, True)):
        paged, _ = load_pretrained(source, dtype="bf16", quantization=scheme, group_size=group_size,
                                   huge_pages=huge)
        state = paged.state_dict()
        assert all(torch.equal(state[name], t) and state[name].dtype == t.dtype for name, t in expected.items())
        big = {name: t for name, t in state.items() if t.numel() * t.element_size() >= 64 << 10}
        assert any(name.endswith(codes) for name in big)
        # by default what loading makes goes into huge pages (the codes from wide weights), what it maps stays
        # mapped (a saved quantized folder's codes, stored as they are wanted); with huge_pages=True everything
        made = huge or source == TINY
        assert all(in_arena(t) == made for name, t in big.items() if name.endswith(codes))
        assert not huge or all(in_arena(t) for t in big.values())
        assert generate(paged, processor, [IMAGE], ["caption en"]) == \
            generate(plain, processor, [IMAGE], ["caption en"])
    wide, _ = load_pretrained(TINY, dtype="bf16")
    quantize(wide, scheme, group_size)
    moved = place_in_huge_pages(wide)  # only the new codes: the rest is in the arena already
    assert 0 < moved < sum(t.numel() * t.element_size() for t in wide.state_dict().values())


def test_huge_pages_errors(monkeypatch, tmp_path):
    with pytest.raises(PaliGemmaError, match="huge_pages=True, but the model is not on the CPU"):
        load_pretrained(TINY, device="meta", huge_pages=True)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    if hasattr(huge_pages.mmap, "MADV_HUGEPAGE"):
        assert "switched off" in huge_pages.huge_pages_unavailable()
    with pytest.raises(PaliGemmaError, match="huge_pages=True, but"):
        load_pretrained(TINY, huge_pages=True)
    with pytest.raises(OSError):
        HugePageArena(1 << 20)
    model, _ = load_pretrained(TINY)  # the default: mapped, as without huge pages
    assert place_in_huge_pages(model) == 0


@needs_huge_pages
def test_a_refused_mapping_falls_back_to_plain_memory(monkeypatch, small_threshold):
    """Where the system refuses the mapping or its advice (a sandbox), loading uses plain memory unless huge pages were
    asked for, which is then a one-line error."""
    def refuse(self, capacity):
        raise OSError("[Errno 1] Operation not permitted")

    monkeypatch.setattr(HugePageArena, "__init__", refuse)
    model, processor = load_pretrained(TINY, dtype="bf16", quantization="int8")
    assert not any(in_arena(t) for t in model.state_dict().values())
    assert generate(model, processor, [IMAGE], ["caption en"])
    with pytest.raises(PaliGemmaError, match="huge_pages=True, but the system refused them: .*not permitted"):
        load_pretrained(TINY, dtype="bf16", huge_pages=True)
    assert place_in_huge_pages(model) == 0


def test_read_into_a_tensor(tmp_path):
    file = SafetensorsFile(TINY / "model.safetensors")
    name = "language_model.model.embed_tokens.weight"
    view = file.view(name)
    into = torch.empty_like(view)
    assert file.read(name, view.dtype, torch.device("cpu"), out=into) is into and torch.equal(into, view)
    narrow = torch.empty(view.shape, dtype=torch.bfloat16)
    file.read(name, torch.bfloat16, torch.device("cpu"), out=narrow)
    assert torch.equal(narrow, view.bfloat16())
    rows = torch.empty(3, view.shape[1])
    file.read(name, torch.float32, torch.device("cpu"), rows=(5, 8), out=rows)
    assert torch.equal(rows, view[5:8])
    with pytest.raises(PaliGemmaError, match="cannot read tensor .* into a tensor of"):
        file.read(name, torch.float32, torch.device("cpu"), out=torch.empty(2, 2))
    with pytest.raises(PaliGemmaError, match="cannot read tensor .* into a tensor of"):
        file.read(name, torch.float32, torch.device("cpu"), out=torch.empty(view.shape[1], view.shape[0]).t())


@needs_huge_pages
def test_page_sizes_benchmark_compares_the_two_copies_cycle_by_cycle(small_threshold):
    from paligemma.bench.page_sizes import format_table, run

    report = run("tiny", formats=("bf16", "int8"), batches=(1,), new_tokens=3, cycles=3, decode_cache="static",
                 log=lambda message: None)
    assert [(r["format"], r["batch"]) for r in report["results"]] == [("bf16", 1), ("int8", 1)]
    for r in report["results"]:
        small, huge = r["samples"]["4 KB pages"], r["samples"]["2 MB pages"]
        assert len(small) == len(huge) == 3 and min(small + huge) > 0
        assert r["speedup"] == pytest.approx(sorted(h / s for h, s in zip(huge, small))[1], 1e-3)
        assert r["faster_cycles"] == sum(h > s for h, s in zip(huge, small))
    models = report["models"]
    assert set(models) == {f"{f}, {p}" for f in ("bf16", "int8") for p in ("4 KB pages", "2 MB pages")}
    assert all(m["huge_page_bytes"] == 0 for name, m in models.items() if "4 KB" in name)
    assert models["int8, 4 KB pages"]["bytes"] == models["int8, 2 MB pages"]["bytes"] < \
        models["bf16, 2 MB pages"]["bytes"] == models["bf16, 4 KB pages"]["bytes"]
    assert len(report["run_bandwidths"]["1"]) == 1 + 3 * 4
    table = format_table(report)
    assert "bf16" in table and "in huge pages" in table


def test_the_writer_writes_whole_aligned_pieces_and_every_byte():
    """Every write but the last starts on a piece boundary and is whole pieces long, whatever the sizes given; the
    bytes come out as they went in."""
    from paligemma.io.safetensors import HugePageAlignedWriter

    class Recorder:
        def __init__(self):
            self.writes: list[bytes] = []

        def write(self, data) -> None:
            self.writes.append(bytes(data))

    generator = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(0, 300, (200,), generator=generator)] + [0, 64, 1000, 5]
    chunks = [bytes(torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).tolist()) for size in sizes]
    recorder = Recorder()
    writer = HugePageAlignedWriter(recorder, piece=64)
    for chunk in chunks:
        writer.write(chunk)
    writer.flush()
    assert b"".join(recorder.writes) == b"".join(chunks)
    offset = 0
    for data in recorder.writes[:-1]:
        assert offset % 64 == 0 and len(data) % 64 == 0 and len(data) > 0
        offset += len(data)
    assert len(recorder.writes[-1]) < 64


@pytest.mark.skipif(not hasattr(huge_pages.mmap, "MADV_NOHUGEPAGE"), reason="madvise advice is Linux's")
def test_a_mapped_file_loaded_with_huge_pages_false_stays_in_small_pages(tmp_path):
    """`huge_pages=False` advises the file's mapping against 2 MB pages, so a mapped tensor is read in 4 KB pages
    even where the page cache holds the file in 2 MB pieces (as this library writes it); a checkpoint written by
    `write_safetensors` reads back exactly either way."""
    from paligemma.io.safetensors import write_safetensors

    weight = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # 8 MB
    write_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(3), "w": weight})
    for advice in (False, None):
        view = SafetensorsFile(tmp_path / "w.safetensors", huge_pages=advice).view("w")
        assert torch.equal(view, weight)  # every page touched
        if advice is False:
            assert huge_page_bytes(view) == 0
