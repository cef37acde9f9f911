"""The files around the code say what the code does: the conda environment installs what the Makefile installs,
the introduction's reading guide names every part of the table of contents, and the book's helpers work (or
say why not) in an installed package with no checkout beside it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_conda_environment_installs_what_make_installs():
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install --quiet (?:-e )?(\S+)", makefile)
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    wanted = [entry.removeprefix("-e ").strip() for entry in pip]
    assert [i.strip('"') for i in installs if i != "--upgrade"] == [w.strip('"') for w in wanted]
    assert "book" in wanted[-1] and "test" in wanted[-1]


def test_reading_guide_names_every_part():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = {part["caption"]: [chapter["file"] for chapter in part["chapters"]] for part in toc["parts"]}
    guide = (ROOT / "book" / "intro.md").read_text().split("## How to read it", 1)[1]
    rows = {line.split("|")[1].strip(): line for line in guide.splitlines() if line.startswith("| ")}
    notebook_parts = {caption: files for caption, files in parts.items()
                      if all(f.startswith("notebooks/") for f in files)}
    assert set(notebook_parts) == set(rows) - {"part"}
    for caption, files in notebook_parts.items():
        named = re.findall(r"\{doc\}`\.\./(notebooks/[^`]+)`", rows[caption])
        assert named == files, caption
        for folder in re.findall(r"`(paligemma/[a-z_]+/)`", rows[caption]):
            assert (ROOT / folder).is_dir(), folder


PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import paligemma.book as book
from paligemma import PaliGemmaError
print(book.__file__)
print(book.versions().split(",")[0])
try:
    print(book.IMAGES)
except PaliGemmaError as error:
    print("error:", error)
"""


def test_book_helpers_in_an_installed_package(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(ROOT / "paligemma", site / "paligemma", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = lambda **extra: subprocess.run([sys.executable, "-c", PROBE, str(site)], capture_output=True, text=True,
                                         cwd=elsewhere, env={**env, **extra}, timeout=120)
    alone = run()
    assert alone.returncode == 0, alone.stderr
    lines = alone.stdout.splitlines()
    assert lines[0].startswith(str(site)), "the copy was imported, not the checkout"
    assert lines[1].startswith("python ")
    assert lines[2].startswith("error: the book's files (images/, book/) were not found") and len(lines) == 3
    pointed = run(PALIGEMMA_REPOSITORY=str(ROOT))
    assert pointed.stdout.splitlines()[2] == str(ROOT / "images")
