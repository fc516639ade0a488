"""`python -m converter ...` runs `edge-convert`."""

from .cli import main

raise SystemExit(main())
