"""The ``portlease`` command's exit statuses, and the table ``--help`` prints."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_BROKER = 69  # EX_UNAVAILABLE: no broker, or it refused
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127

EXIT_CODES = f"""\
exit status:
  0      success; with `lease -- CMD`: CMD's own status
  1      an error the message explains (a leased port could not be bound,
         `wait` timed out, the broker could not start)
  2      bad arguments or configuration
  69     no broker answers, or the broker refused (no free ports, quota)
  {EXIT_CANNOT_RUN}    `lease -- CMD`: CMD exists but cannot be run (not executable)
  {EXIT_NOT_FOUND}    `lease -- CMD`: CMD was not found
  128+N  `lease -- CMD`: CMD was killed by signal N
"""
