"""`python -m paligemma.train`: the same as `paligemma train` (and, with `--evaluate MODEL`, `paligemma evaluate`)."""

import sys

from .cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--evaluate" in args:  # the older spelling: --evaluate MODEL [--examples N]
        at = args.index("--evaluate")
        args = ["evaluate", *args[at + 1:at + 2], *args[:at], *args[at + 2:]]
    else:
        args = ["train", *args]
    raise SystemExit(main(args))
