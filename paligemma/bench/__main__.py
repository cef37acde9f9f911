"""`python -m paligemma.bench`: the same as `paligemma bench`."""

from ..cli import main

raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
