"""`python -m paligemma.finetune ...`: the same as `paligemma finetune ...` (fine-tune a checkpoint on a JSONL file)."""

import sys

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(["finetune", *sys.argv[1:]]))
