"""Fixtures and hooks only: a tokenizer the project trains, small random checkpoints written by transformers, and
headless Chromium.

Everything is built once per test session in a temporary folder, from seeds, on the CPU, in float32. The plain
helpers these fixtures use, and that tests import, are in helpers.py.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from helpers import MEASURED, TOKENIZER_VOCAB, corpus, tiny_config_dict, write_reference_checkpoint
from paligemma.training.tokenizer_training import train_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paligemma")


@pytest.fixture(scope="session")
def tokenizer_file(workdir) -> Path:
    """A tokenizer with an `<image>` piece (id 5, after `<mask>` at 4 as in Gemma's)."""
    return train_tokenizer(corpus(), workdir / "tokenizer" / "tokenizer.model", vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def tokenizer_file_without_image(workdir) -> Path:
    """A tokenizer laid out like the real one: no `<image>` piece, so its id is the vocabulary size."""
    return train_tokenizer(
        corpus(), workdir / "tokenizer_no_image" / "tokenizer.model", vocab_size=TOKENIZER_VOCAB,
        include_image_token=False,
    )


@pytest.fixture(scope="session")
def mqa_checkpoint(workdir, tokenizer_file):
    """(folder, transformers model): multi-query attention, 56-pixel images (16 image tokens)."""
    directory = workdir / "mqa"
    return directory, write_reference_checkpoint(directory, tiny_config_dict(), tokenizer_file, seed=1)


@pytest.fixture(scope="session")
def gqa_checkpoint(workdir, tokenizer_file_without_image):
    """(folder, transformers model): grouped-query attention, 84-pixel images, `<image>` id past the tokenizer."""
    directory = workdir / "gqa"
    config = tiny_config_dict(image_size=84, num_key_value_heads=2, image_token_index=TOKENIZER_VOCAB)
    return directory, write_reference_checkpoint(directory, config, tokenizer_file_without_image, seed=2)


def pytest_terminal_summary(terminalreporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("largest |difference| per numeric check (float32)")
    for name, diff in sorted(MEASURED.items()):
        terminalreporter.write_line(f"{diff:10.3e}  {name}")


# Debian's chromium here; a GitHub runner's preinstalled Chrome and driver elsewhere.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver") or (
    os.path.join(os.environ["CHROMEWEBDRIVER"], "chromedriver") if os.environ.get("CHROMEWEBDRIVER") else None
)


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium through selenium, at 1280 x 1000, keeping every console message (`get_log("browser")`).

    In CI it must be there (.ci/run installs Debian's chromium and chromium-driver); elsewhere the tests that need it
    are skipped when it is not installed.
    """
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver must be installed in CI (Debian packages chromium, chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-file-access-from-files", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
