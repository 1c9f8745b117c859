"""The ``e2email`` command group, exit statuses and helpers shared by its commands.

Every failure is one line on stderr (no traceback), usage errors included, and a documented
exit status:

====  ==============================================================
0     sent (or written with --output)
1     unexpected internal error (a bug: please report it)
2     usage error or bad input (options, addresses, headers, files)
3     key or crypto refusal (missing/expired/revoked/weak key, passphrase)
4     connection or TLS refusal (unreachable, no STARTTLS, bad certificate)
5     authentication failed
6     the server refused the message or some recipients
130   interrupted (Ctrl-C)
====  ==============================================================
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

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
from e2email.private import ensure_private_dir

if TYPE_CHECKING:
    from e2email.accounts import Account, Config

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
    # One line, whatever the message holds: scripts and people read the first line only.
    click.echo(f"e2email: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(code)


class State:
    """What every command shares: HOME, and the GnuPG home if one was named."""

    def __init__(self, home: Path, gnupg_home: Path | None) -> None:
        self._home = home
        self._home_checked = False
        self.gnupg_home = gnupg_home

    @property
    def home(self) -> Path:
        """e2email's home, created 0700 (whatever the umask) when first used, and refused
        (:class:`~e2email.errors.InsecurePathError`, exit 2) when another user owns it or
        group/others may write it: whoever can write there can swap keys or queued messages.
        Checked on first use, so that `--help` and `demo` never touch it."""
        if not self._home_checked:
            ensure_private_dir(self._home, what="the e2email home")
            self._home_checked = True
        return self._home

    def keystore(self) -> Keystore:
        return Keystore(self.home, gnupg_home=self.gnupg_home)

    # -- accounts (config.toml) -------------------------------------------------------------

    #: The group's --config FILE (None: $E2EMAIL_CONFIG or the default file).
    config_path: Path | None = None
    #: Whether --home (or E2EMAIL_HOME) / --gnupg-home were given: they win over an account's.
    home_given = True
    gnupg_home_given = True

    def config(self, path: Path | None = None) -> Config:
        """The configuration file (``path``, else the group's --config, else
        $E2EMAIL_CONFIG, else the default). Its mistakes are printed one line each, exit 2."""
        from e2email.accounts import ConfigFileError, load_config

        try:
            return load_config(path or self.config_path)
        except ConfigFileError as exc:
            for problem in exc.problems:
                click.echo(f"e2email: error: {problem}", err=True)
            sys.exit(EXIT_USAGE)

    def use_account(self, account: Account) -> None:
        """Use ``account``'s home and GnuPG home, unless given on the command line."""
        if account.home is not None and not self.home_given:
            self._home = account.home
            self._home_checked = False
        if account.gnupg_home is not None and not self.gnupg_home_given:
            self.gnupg_home = account.gnupg_home


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
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="E2EMAIL_CONFIG",
    help="The accounts file (TOML). Env: E2EMAIL_CONFIG. Default: "
    "$XDG_CONFIG_HOME/e2email/config.toml. See `e2email config --help`.",
)
@click.version_option(package_name="e2email")
@click.pass_context
def cli(
    ctx: click.Context, home: Path | None, gnupg_home: Path | None, config_path: Path | None
) -> None:
    """Send end-to-end encrypted email: OpenPGP (PGP/MIME) or S/MIME, signed and encrypted,
    submitted over verified TLS. Try `e2email demo` for a full round trip on this machine."""
    ctx.obj = State(home or default_home(), gnupg_home)
    ctx.obj.config_path = config_path
    ctx.obj.home_given = home is not None
    ctx.obj.gnupg_home_given = gnupg_home is not None
    # What a Ctrl-C can leave behind depends on the command: only sending has an outbox to
    # point at (send refines this once it knows whether it sends or writes --output).
    set_interrupt_hint(_INTERRUPT_HINTS.get(ctx.invoked_subcommand or "", ""))


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


def set_interrupt_hint(hint: str) -> None:
    """What the one line printed on Ctrl-C adds after "interrupted" (empty: nothing), for the
    command now running. A command that leaves something behind sets it once it does."""
    global _interrupt_hint
    _interrupt_hint = hint


def _interrupted() -> NoReturn:
    hint = _interrupt_hint
    fail(f"interrupted ({hint})" if hint else "interrupted", EXIT_INTERRUPTED)


def _usage_line(exc: click.UsageError) -> str:
    """A click usage error as one line: its message and where to read more. click's own form
    is three lines (Usage, Try, Error), and the README promises one line for every error."""
    path = exc.ctx.command_path if exc.ctx is not None else "e2email"
    return f"{exc.format_message()} (see `{path} --help`)"


class _WarningLine(logging.Formatter):
    """The library's warnings (e.g. a port skipped because STARTTLS was stripped) as the CLI's
    own one-line warnings, not Python's bare "lastResort" lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"e2email: WARNING: {' '.join(record.getMessage().split())}"


def _log_warnings_to_stderr() -> None:
    logger = logging.getLogger("e2email")
    if not any(getattr(h, "_e2email_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(_WarningLine())
        handler._e2email_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: run the CLI, turning every e2email error into one line and an exit code."""
    _log_warnings_to_stderr()
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; an interrupt is 130, not a usage error.
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            _interrupted()
        fail("aborted", EXIT_USAGE)
    except click.exceptions.NoArgsIsHelpError as exc:
        # `e2email` (or `e2email keys`) alone: the help is the answer, shown as click shows it.
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        fail(_usage_line(exc), EXIT_USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), EXIT_USAGE)
    except E2EmailError as exc:
        fail(str(exc), exit_code_for(exc))
    except KeyboardInterrupt:
        _interrupted()
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


#: The hint on Ctrl-C, per command (see :func:`set_interrupt_hint`); others say only
#: "interrupted": `demo` and `keys` leave nothing to resume.
_INTERRUPT_HINTS = {
    "send": "anything already protected waits in the outbox: `e2email outbox list`; "
    "a --to-file batch resumes when the same command is run again",
    "outbox": "what was not delivered stays in the outbox: `e2email outbox list`",
}
_interrupt_hint = ""
