"""`python -m sync_server` is `sync-server`."""

from .cli import main

raise SystemExit(main())
