"""The ``e2email`` command line: one module per command group.

Exit statuses are documented in :mod:`e2email.cli.app`.
"""

# Importing the command modules registers their commands on the group.
from e2email.cli import config, doctor, keys, outbox, queue, relay, send, sendmail  # noqa: F401
from e2email.cli.app import cli, exit_code_for, main

__all__ = ["cli", "exit_code_for", "main"]
