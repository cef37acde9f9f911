"""`python -m paligemma`: see `paligemma.cli`."""

from .cli import main

raise SystemExit(main())
