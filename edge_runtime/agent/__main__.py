"""`python -m edge_runtime.agent` is `edge-agent`."""

from .cli import main

raise SystemExit(main())
