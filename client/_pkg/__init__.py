"""portlease: connection-bound TCP/UDP port leases for CI hosts shared by many runners.

The work lives in two subpackages: :mod:`portlease.client` (the sync and async
clients and the pytest plugin; needs msgspec only) and :mod:`portlease.broker`
(the daemon and the ``portlease`` command; needs the ``broker`` extra).

This module stays empty on purpose: every pytest run of everyone who installed
portlease imports it (through the plugin), so it must cost nothing.
"""

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]) and ``portlease --version`` prints it.
__version__ = "0.2.0.dev0"
