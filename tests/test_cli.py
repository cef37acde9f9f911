"""The command line: answers on stdout; bad input gives one line on stderr and exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import random_image
from paligemma import generate, load_pretrained
from paligemma.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    random_image(30, 64, 48).save(path)
    return path


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "paligemma", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_prints_the_same_answer_as_the_api(mqa_checkpoint, image_file):
    directory, _ = mqa_checkpoint
    result = run_cli("--image", image_file, "--prompt", "caption en", "--model", directory, "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    model, processor = load_pretrained(directory)
    expected = generate(model, processor, images=[image_file], prompts=["caption en"], max_new_tokens=8)[0]
    assert result.stdout == expected + "\n"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cache", ["static", "graph", "compiled"])
def test_cli_every_cache_gives_the_same_answer(mqa_checkpoint, image_file, capsys, monkeypatch, cache):
    from paligemma.inference import decoders, generation

    directory, _ = mqa_checkpoint
    args = ["--image", str(image_file), "--prompt", "caption en", "--model", str(directory), "--max-new-tokens", "12",
            "--device", "cpu"]
    assert main(args) == 0
    default = capsys.readouterr().out
    built = []  # which decoder (and cache) the generation really made
    make_decoder = generation.make_decoder

    def recording(*args, **kwargs):
        decoder = make_decoder(*args, **kwargs)
        built.append(type(decoder.cache).__name__ if isinstance(decoder, decoders.CachedDecoder)
                     else type(decoder).__name__)
        return decoder

    monkeypatch.setattr(generation, "make_decoder", recording)
    assert main(args + ["--cache", cache]) == 0
    assert capsys.readouterr().out == default
    assert built == [{"static": "StaticCache", "graph": "FixedShapeDecoder", "compiled": "FixedShapeDecoder"}[cache]]


def test_cli_sampling_is_seeded(mqa_checkpoint, image_file, capsys):
    directory, _ = mqa_checkpoint
    args = ["--image", str(image_file), "--prompt", "caption en", "--model", str(directory), "--max-new-tokens", "8",
            "--sample", "--temperature", "1.3", "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--device", "cpu",
            "--dtype", "fp32"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path, image_file):
    result = run_cli("--image", image_file, "--prompt", "caption en", "--model", tmp_path / "absent")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint folder not found: {tmp_path / 'absent'}"
    assert result.stdout == ""


def _folder_without(source, target, name):
    shutil.copytree(source, target)
    (target / name).unlink()
    return target


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", "image file not found"),
        ("text file as image", "is not a readable image"),
        ("no config", "config file not found"),
        ("no weights", "no weights"),
        ("no tokenizer", "tokenizer file not found"),
        ("negative max tokens", "max_new_tokens must be a non-negative integer"),
        ("zero temperature", "temperature must be > 0"),
        ("top_p too large", "top_p must lie in (0, 1]"),
        ("prompt too long", "exceeds the model's context"),
    ],
)
def test_cli_bad_input(mqa_checkpoint, image_file, tmp_path, capsys, case, message):
    directory, _ = mqa_checkpoint
    image, model, prompt, extra = str(image_file), str(directory), "caption en", []
    if case == "missing image":
        image = str(tmp_path / "missing.jpg")
    elif case == "text file as image":
        (tmp_path / "notes.jpg").write_text("hello")
        image = str(tmp_path / "notes.jpg")
    elif case == "no config":
        model = str(_folder_without(directory, tmp_path / "c", "config.json"))
    elif case == "no weights":
        model = str(_folder_without(directory, tmp_path / "w", "model.safetensors"))
    elif case == "no tokenizer":
        model = str(_folder_without(directory, tmp_path / "t", "tokenizer.model"))
    elif case == "negative max tokens":
        extra = ["--max-new-tokens", "-1"]
    elif case == "zero temperature":
        extra = ["--sample", "--temperature", "0"]
    elif case == "top_p too large":
        extra = ["--sample", "--top-p", "1.5"]
    elif case == "prompt too long":
        prompt = "caption en " * 5000
    args = ["--image", image, "--prompt", prompt, *extra, "--model", model]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
