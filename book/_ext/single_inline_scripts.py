"""A Sphinx extension of this book: each page carries each inline script once.

Sphinx 7.4 adds a script registered after the HTML builder started (`app.add_js_file(None, body=...)`, as
sphinx-thebe and sphinx-togglebutton do from their event handlers) to the builder at once, with the filename
`None`; `prepare_writing` then adds every such registered script again, as `filename or ''`. The two differ only
in that filename, so the builder's own de-duplication keeps both, and every page declared `const THEBE_JS_URL`
twice: "Identifier 'THEBE_JS_URL' has already been declared". This drops the second copy of each page's scripts.
"""

from __future__ import annotations


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept  # the builder's own list: the page is written from it


def setup(app):
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
