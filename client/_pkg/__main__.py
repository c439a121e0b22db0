"""``python -m portlease`` is the ``portlease`` command."""

from portlease.broker.cli import main

raise SystemExit(main())
