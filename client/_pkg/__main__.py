"""``python -m portlease`` is the ``portlease`` command."""

from portlease.cli import main

raise SystemExit(main())
