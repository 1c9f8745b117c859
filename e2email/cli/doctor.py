"""``e2email doctor HOST``: what an SMTP host offers on 25, 465, 587 and 2525, and which to use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import click

from e2email.cli.app import EXIT_CONNECTION, EXIT_OK, State, cli
from e2email.doctor import PROBED_PORTS, diagnose, openpgp_engine_info, openpgp_engines


def _port_map(items: Sequence[str]) -> dict[int, int]:
    mapping = {p: p for p in PROBED_PORTS}
    for item in items:
        label, sep, port = item.partition("=")
        try:
            std, real = int(label), int(port)
        except ValueError:
            std = real = 0
        if not sep or std not in PROBED_PORTS or not 0 < real < 65536:
            raise click.BadParameter(
                f"{item!r} is not STANDARD=PORT with STANDARD one of 25, 465, 587, 2525",
                param_hint="--port-map",
            )
        mapping[std] = real
    return mapping


@cli.command()
@click.argument("host", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust this CA bundle (PEM) instead of the system's, as `send --ca-file` does.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds allowed for each network step of each probe.",
)
@click.option(
    "--port-map",
    multiple=True,
    metavar="STANDARD=PORT",
    help="Probe PORT in place of the standard port (e.g. 465=10465 for a test server).",
)
@click.option(
    "--account",
    metavar="NAME",
    help="Check this account's server (its host and ca-file; HOST and --ca-file win).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The accounts file (instead of the group's --config or the default).",
)
@click.pass_obj
def doctor(
    state: State,
    host: str | None,
    as_json: bool,
    ca_file: Path | None,
    timeout: float,
    port_map: Sequence[str],
    account: str | None,
    config_file: Path | None,
) -> None:
    """Check HOST's (or an account's) submission ports: TLS mode, version, certificate,
    extensions, advice.

    Sends only EHLO, STARTTLS and QUIT (never AUTH or MAIL). A certificate that does not verify
    is read again without verification, only to show what is wrong with it. Exit status 0 when
    some port is usable with verified TLS, 4 when none is.
    """
    if host is None or account is not None:
        # The account's server (the default account's without HOST and --account).
        config = state.config(config_file)
        if host is None and account is None and not config.accounts:
            raise click.UsageError("give HOST (or --account NAME of the config file)")
        chosen = config.account(account)
        host = host or chosen.smtp.host
        ca_file = ca_file or chosen.smtp.ca_file
    # A bad HOST (not a name, or with a port glued on) is a ConfigError from diagnose(): one
    # line and exit 2, before anything is probed.
    report = asyncio.run(
        diagnose(host, ports=_port_map(port_map), ca_file=ca_file, timeout=timeout)
    )
    if as_json:
        click.echo(json.dumps({**report.to_json(), "openpgp": openpgp_engine_info()}, indent=2))
    else:
        click.echo(report.describe())
        click.echo("\n".join(["", *openpgp_engines()]))
    raise SystemExit(EXIT_OK if report.ok else EXIT_CONNECTION)
