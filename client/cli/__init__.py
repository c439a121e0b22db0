"""The client side of the ``portlease`` command: one module per subcommand.

Nothing here imports the broker: ``portlease lease``, ``status``, ``wait``,
``renew``, ``release`` and ``metrics`` run with msgspec alone.
:func:`portlease.client.cli.main.main` is the parser and dispatch.
"""
