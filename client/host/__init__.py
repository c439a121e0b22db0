"""Facts about this host that the broker, the clients and the CLI read alike.

Process facts from /proc (:mod:`.procinfo`), the kernel's socket tables
(:mod:`.procnet`), the rule that picks the broker's socket (:mod:`.locations`) and
the probe that tells whether something serves a socket (:mod:`.probe`).
Standard library only; nothing else of portlease.
"""
