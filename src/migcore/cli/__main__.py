"""``python -m migcore.cli``: the same as the ``migcore`` command."""

from migcore.cli import main

raise SystemExit(main())
