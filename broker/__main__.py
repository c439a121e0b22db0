"""``python -m portlease.broker`` is the ``portlease`` command."""

from .cli import main

raise SystemExit(main())
