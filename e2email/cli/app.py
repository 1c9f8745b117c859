"""The ``e2email`` command group, exit statuses and helpers shared by its commands.

Every failure is one line on stderr (no traceback) and a documented exit status:

====  ==============================================================
0     sent (or written with --output)
1     unexpected internal error (a bug: please report it)
2     usage error or bad input (options, addresses, headers, files)
3     key or crypto refusal (missing/expired/revoked/weak key, passphrase)
4     connection or TLS refusal (unreachable, no STARTTLS, bad certificate)
5     authentication failed
6     the server refused the message or some recipients
====  ==============================================================
"""

from __future__ import annotations

import getpass
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import click

from e2email.config import (
    PasswordSource,
    default_home,
    password_from_command,
    password_from_env,
)
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CryptoError,
    DeliveryError,
    E2EmailError,
    KeyErrorBase,
    MessageError,
    TLSError,
    TransportError,
)
from e2email.keystore import Keystore

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_KEY = 3
EXIT_CONNECTION = 4
EXIT_AUTH = 5
EXIT_REJECTED = 6
#: Interrupted (Ctrl-C, SIGINT): 128 + 2, as shells report it.
EXIT_INTERRUPTED = 130

#: Checked in order: the first matching class decides the exit status.
_EXIT_CODES: Sequence[tuple[type[E2EmailError], int]] = (
    (MessageError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (KeyErrorBase, EXIT_KEY),
    (CryptoError, EXIT_KEY),
    (AuthenticationError, EXIT_AUTH),
    (DeliveryError, EXIT_REJECTED),
    (TLSError, EXIT_CONNECTION),
    (ConnectError, EXIT_CONNECTION),
    (TransportError, EXIT_CONNECTION),
)


def exit_code_for(error: E2EmailError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"e2email: error: {message}", err=True)
    sys.exit(code)


class State:
    def __init__(self, home: Path, gnupg_home: Path | None) -> None:
        self.home = home
        self.gnupg_home = gnupg_home

    def keystore(self) -> Keystore:
        return Keystore(self.home, gnupg_home=self.gnupg_home)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit status: 0 ok, 2 usage or bad input, 3 key/crypto refusal, 4 connection/TLS "
    "refusal, 5 authentication failed, 6 server refused, 1 internal error.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="E2EMAIL_HOME",
    help="e2email's home directory (keys, certificates, outbox). Env: E2EMAIL_HOME. "
    f"Default: {default_home()}",
)
@click.option(
    "--gnupg-home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use this existing GnuPG home for OpenPGP keys instead of HOME/gnupg.",
)
@click.version_option(package_name="e2email")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, gnupg_home: Path | None) -> None:
    """Send end-to-end encrypted email: OpenPGP (PGP/MIME) or S/MIME, signed and encrypted,
    submitted over verified TLS. Try `e2email demo` for a full round trip on this machine."""
    ctx.obj = State(home or default_home(), gnupg_home)


def secret_source(env: str | None, command: str | None, what: str) -> PasswordSource | None:
    if env and command:
        raise click.UsageError(f"give the {what} either from an environment variable or a command")
    if env:
        return password_from_env(env, what=f"the {what}")
    if command:
        return password_from_command(command, what=what)
    return None


class _Prompt:
    """A secret asked on the terminal when first needed. ``interactive`` tells the transport
    not to ask before it must (after TLS is verified); the answer is cached by the caller."""

    interactive = True

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self) -> str:
        what = self.what
        if not sys.stdin.isatty():
            raise ConfigError(
                f"a {what} is needed and there is no terminal to ask on: "
                f"use --{what.split()[-1]}-env or --{what.split()[-1]}-command"
            )
        # Upper-case the first letter only: "SMTP password", not "Smtp password".
        return getpass.getpass(f"{what[:1].upper()}{what[1:]}: ")


def prompt_for(what: str) -> Callable[[], str]:
    return _Prompt(what)


@cli.command()
def demo() -> None:
    """Run a full round trip on loopback: sign, encrypt, send over TLS, receive, decrypt, verify.

    Needs no network and no configuration; uses the public demo keys shipped with e2email.
    """
    from e2email.demo import run_demo

    sys.exit(run_demo())


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: run the CLI, turning every e2email error into one line and an exit code."""
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; an interrupt is 130, not a usage error.
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            fail(_INTERRUPTED, EXIT_INTERRUPTED)
        fail("aborted", EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except E2EmailError as exc:
        fail(str(exc), exit_code_for(exc))
    except KeyboardInterrupt:
        fail(_INTERRUPTED, EXIT_INTERRUPTED)
    except Exception as exc:
        # A bug. One line, as for every other failure; the traceback on request.
        if os.environ.get("E2EMAIL_DEBUG") == "1":
            traceback.print_exc()
        click.echo(
            f"e2email: internal error: {type(exc).__name__}: {exc} "
            "(a bug: please report it; E2EMAIL_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


_INTERRUPTED = (
    "interrupted (anything already protected waits in the outbox: `e2email outbox list`; "
    "a --to-file batch resumes when the same command is run again)"
)
