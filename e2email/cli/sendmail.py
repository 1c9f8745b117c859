"""``e2email sendmail``: the sendmail-compatible command (see :mod:`e2email.sendmail`), also
installed as the console script ``e2email-sendmail``."""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

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

    # The group's --home, --gnupg-home and --config, when given on its command line, come
    # first, so that the sendmail flags may name their own (the last one given counts). From
    # the environment (E2EMAIL_HOME, E2EMAIL_CONFIG) they are read where they are used.
    group = ctx.parent
    given = []
    if group is not None:
        for name, flag in (
            ("home", "home"),
            ("gnupg_home", "gnupg-home"),
            ("config_path", "config"),
        ):
            value = group.params.get(name)
            if (
                value is not None
                and group.get_parameter_source(name) is ParameterSource.COMMANDLINE
            ):
                given.append(f"--{flag}={value}")
    sys.exit(run([*given, *args]))
