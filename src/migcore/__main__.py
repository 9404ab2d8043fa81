"""``python -m migcore``: the same as the ``migcore`` command."""

from migcore.cli import main

raise SystemExit(main())
