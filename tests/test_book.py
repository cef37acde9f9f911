"""The book: it builds with no warnings, and every page renders in headless Chromium with its images, links and formulas.

The build uses the notebooks' stored outputs (nbval checks those separately). Chromium is Debian's `chromium`
with `chromium-driver`; outside CI the browser part is skipped when they are not installed.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("jupyter_book", reason="the book extra is not installed")


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = out / "_build" / "html"
    assert (html / "index.html").is_file(), "the build produced no index.html"
    return html


def toc_pages(html: Path) -> list[Path]:
    """Every page the table of contents names, as built HTML."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]
    return [html / f"{name}.html" for name in files]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


@functools.lru_cache(maxsize=None)
def _parse(page: Path) -> _Links:
    """A page's links, images and ids, parsed once: many links point into the same page (chapter 14 alone is 0.6 MB,
    and every anchor into it would parse it again)."""
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_every_page_is_built(built_book):
    for page in toc_pages(built_book):
        assert page.is_file(), f"missing page {page.relative_to(built_book)}"


def test_every_inline_script_appears_once_per_page(built_book):
    """Sphinx 7.4 wrote sphinx-thebe's and sphinx-togglebutton's inline scripts twice into every page, and the
    browser refused the second `const THEBE_JS_URL`; book/_ext/single_inline_scripts.py keeps one of each."""
    import re
    from collections import Counter

    repeated = []
    for page in sorted(built_book.rglob("*.html")):
        bodies = re.findall(r"<script>(.+?)</script>", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        repeated += [f"{page.relative_to(built_book)}: {body[:60]}" for body, n in Counter(bodies).items() if n > 1]
    assert not repeated, "\n".join(repeated[:10])


def test_no_broken_internal_links_or_images(built_book):
    problems = []
    for page in sorted(built_book.rglob("*.html")):
        if "_modules" in page.parts or page.name in ("genindex.html", "search.html", "py-modindex.html"):
            continue
        parsed = _parse(page)
        for href in parsed.links + parsed.images:
            if urlparse(href).scheme or href.startswith(("//", "mailto:", "javascript:")):
                continue  # external: not checked here (no network)
            path, anchor = urldefrag(href)
            target = (page.parent / unquote(path)).resolve() if path else page
            if not target.exists():
                problems.append(f"{page.relative_to(built_book)}: {href} (no such file)")
            elif anchor and target.suffix == ".html" and anchor not in _parse(target).ids:
                problems.append(f"{page.relative_to(built_book)}: {href} (no such anchor)")
    assert not problems, "\n".join(problems[:20])


@pytest.fixture(scope="module")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# Waits for MathJax (shipped with the book, book/_static/mathjax) to typeset the page, then counts the formulas,
# those it typeset, and its errors (a formula it could not parse): [formulas, typeset, errors].
_TYPESET_MATH = """
const done = arguments[arguments.length - 1];
const formulas = document.querySelectorAll('main .math');
if (!formulas.length) { done([0, 0, 0]); return; }
const startup = window.MathJax && MathJax.startup && MathJax.startup.promise;
if (!startup) { done([formulas.length, 0, 'MathJax did not load']); return; }
startup.then(() => done([formulas.length, document.querySelectorAll('main .math mjx-container').length,
                         document.querySelectorAll('main mjx-merror').length]),
             (error) => done([formulas.length, 0, String(error)]));
"""


def _console(chromium, relative: str) -> list[str]:
    """The page's console messages of level WARNING or SEVERE since the last call (errors, failed requests)."""
    return [f"{relative}: console {entry['level']}: {entry['message']}" for entry in chromium.get_log("browser")
            if entry["level"] in ("WARNING", "SEVERE")]


def test_pages_render_in_chromium(built_book, chromium, server, tmp_path):
    """Every page renders, with its images and formulas, and logs no error or warning to the console: an unset
    default theme mode logged "Got invalid theme mode" on every page, a missing favicon a 404 on the first."""
    failures = []
    chromium.get_log("browser")  # start from an empty console
    for page in toc_pages(built_book):
        relative = page.relative_to(built_book).as_posix()
        chromium.get(f"{server}/{relative}")
        state = chromium.execute_script("return document.readyState")
        title = chromium.execute_script("return (document.querySelector('main h1') || {}).textContent || ''")
        text_length = chromium.execute_script("return (document.querySelector('main') || document.body).innerText.length")
        broken = chromium.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
        if state != "complete" or not title.strip() or text_length < 200 or broken:
            failures.append(f"{relative}: state={state} title={title!r} text={text_length} broken images={broken}")
        formulas, typeset, errors = chromium.execute_async_script(_TYPESET_MATH)
        if typeset != formulas or errors:
            failures.append(f"{relative}: {typeset} of {formulas} formulas typeset by MathJax, errors: {errors}")
        if relative.endswith("intro.html"):
            chromium.save_screenshot(str(tmp_path / "intro.png"))
        failures += _console(chromium, relative)
    failures += _console(chromium, "after the last page")  # a request that failed late
    assert not failures, "\n".join(failures)


# After the fonts: the code blocks that scroll sideways (input and output cells, and the prose pages' code), by their
# first characters; and how many characters of the first code cell's font fit on one line of its input.
_CODE_THAT_SCROLLS = """
const done = arguments[arguments.length - 1];
document.fonts.ready.then(() => {
  const scrolling = Array.from(document.querySelectorAll('div.cell_input pre, div.cell_output pre, .highlight pre'))
    .filter(pre => pre.scrollWidth > pre.clientWidth + 1).map(pre => pre.textContent.slice(0, 60));
  const pre = document.querySelector('div.cell_input pre');
  let fits = null;
  if (pre) {
    const probe = document.createElement('span');
    probe.style.whiteSpace = 'pre';
    probe.textContent = '0'.repeat(200);
    pre.appendChild(probe);
    const width = probe.getBoundingClientRect().width / 200;
    probe.remove();
    const style = getComputedStyle(pre);
    fits = Math.floor((pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) / width);
  }
  done([scrolling, fits]);
});
"""


def test_code_is_seen_whole_at_1280_px(built_book, chromium, server):
    """At a 1280×1000 window no code block scrolls sideways, and a code cell holds a whole line of 120 characters
    (the project's line length): book/_static/code-width.css gives the article the table of contents' column at
    that width and wraps what still does not fit."""
    chromium.set_window_size(1280, 1000)
    failures = []
    for page in toc_pages(built_book):
        relative = page.relative_to(built_book).as_posix()
        chromium.get(f"{server}/{relative}")
        scrolling, fits = chromium.execute_async_script(_CODE_THAT_SCROLLS)
        failures += [f"{relative}: scrolls sideways: {text!r}" for text in scrolling]
        if fits is not None and fits < 120:
            failures.append(f"{relative}: a code cell holds {fits} characters a line, not 120")
    assert not failures, "\n".join(failures)


def test_attention_explorer_in_chapter_14(built_book, chromium, server):
    """The rendered chapter 14 carries the attention explorer, with its data, in under 2 MB: it draws with no console
    message, over http and from file:// (offline); a click on another token, an arrow key, and another layer each
    redraw the map (the canvas's pixels change)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    page = built_book / "notebooks" / "14_attention_maps.html"
    size = page.stat().st_size  # the viewer's data and script are inline: this is all the explorer needs
    assert size < 2_000_000, f"chapter 14 weighs {size / 1e6:.2f} MB with the viewer's data"
    chromium.set_window_size(1280, 1000)
    for address in (page.as_uri(), f"{server}/notebooks/14_attention_maps.html"):
        chromium.get_log("browser")  # start from an empty console
        chromium.get(address)
        viewers = chromium.find_elements(By.CSS_SELECTOR, ".pga")
        assert len(viewers) == 1, f"{address}: {len(viewers)} mounted viewers"
        root = viewers[0]
        chromium.execute_script("arguments[0].scrollIntoView()", root)
        canvas = root.find_element(By.CSS_SELECTOR, "canvas.pga-main")

        def pixels() -> str:
            return chromium.execute_script("return arguments[0].toDataURL()", canvas)

        first = pixels()
        assert len(root.find_elements(By.CSS_SELECTOR, ".pga-tokens button")) > 3
        root.find_elements(By.CSS_SELECTOR, ".pga-tokens button")[3].click()
        clicked = pixels()
        assert clicked != first, "a click on another token left the map as it was"
        assert "predicted at position" in root.find_element(By.CSS_SELECTOR, ".pga-caption").text
        root.send_keys(Keys.ARROW_RIGHT)
        stepped = pixels()
        assert stepped != clicked, "the right arrow key left the map as it was"
        Select(root.find_element(By.CSS_SELECTOR, "select[aria-label=layer]")).select_by_value("0")
        assert pixels() != stepped, "another layer left the map as it was"
        messages = [entry for entry in chromium.get_log("browser") if entry["level"] in ("WARNING", "SEVERE")]
        assert not messages, f"{address}: {messages}"


def test_colab_cells_install_from_the_book_repository():
    """Every chapter's first code cell clones the repository the book's launch buttons point at, only in Colab."""
    import json

    import yaml

    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert url in (ROOT / "book" / "setup.md").read_text(), "book/setup.md clones another repository"
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert 'if "google.colab" in sys.modules' in first, f"{notebook.name}: the first code cell is not the Colab cell"
        assert f'"{url}"' in first, f"{notebook.name}: the Colab cell clones another repository than {url}"
