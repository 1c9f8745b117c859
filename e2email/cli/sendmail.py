"""``e2email sendmail``: the sendmail-compatible command (see :mod:`e2email.sendmail`), also
installed as the console script ``e2email-sendmail``."""

from __future__ import annotations

import sys

import click

from e2email.cli.app import cli


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sendmail(ctx: click.Context, /, args: tuple[str, ...]) -> None:
    """Read one message on stdin, protect it and send it, as sendmail does (msmtp's flags;
    sysexits.h exit statuses). `e2email sendmail --help` lists the flags."""
    from e2email.sendmail import run

    # The group's --home (or E2EMAIL_HOME) and --gnupg-home come first, so that the sendmail
    # flags may name their own (the last one given counts).
    group = ctx.parent.params if ctx.parent is not None else {}
    given = [
        f"--{name.replace('_', '-')}={group[name]}"
        for name in ("home", "gnupg_home")
        if group.get(name) is not None
    ]
    sys.exit(run([*given, *args]))
