"""``python -m e2email``: the same as the ``e2email`` command."""

from e2email.cli import main

main()
