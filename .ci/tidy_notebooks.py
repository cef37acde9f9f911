"""After `make notebooks` executes the chapters: drop saved widget state and join adjacent stream outputs.

The static book cannot run chapter 14's explorer, and its saved state would pull ipywidgets' JavaScript into
every page; nbval compares a cell's stdout as one coalesced text, so the stored output is kept that way too.
"""

import sys

import nbformat


def tidy(path: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        joined = []
        for output in cell.outputs:
            previous = joined[-1] if joined else None
            if (previous is not None and output.output_type == "stream" and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                joined.append(output)
        cell.outputs = joined
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        tidy(path)
