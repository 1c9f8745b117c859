"""``e2email relay``: a local SMTP submission server that protects and forwards every message
(see :mod:`e2email.relay`). Runs in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from e2email.cli.app import State, cli, secret_source
from e2email.cli.send import (
    SMTP_OPTION_NAMES,
    delivery_options,
    protection_options,
    retry_policy,
    send,
    smtp_settings,
)
from e2email.client import AsyncMailer
from e2email.errors import ConfigError
from e2email.outbox import Outbox
from e2email.relay import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RECIPIENTS,
    Relay,
    TLSFiles,
    is_loopback,
    run_until_stopped,
    self_signed_certificate,
)

#: The options of `send` that say how to protect a message (shared with the relay).
_PROTECTION_OPTION_NAMES = (
    "sign",
    "encrypt",
    "encrypt_to_self",
    "key_map",
    "passphrase_env",
    "passphrase_command",
    "smime",
    "smime_cipher",
    "rsa_pss",
    "trust_self_signed",
    "revocation",
)


def _listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) or ``PORT`` alone (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--listen")
    return host, int(port)


class _LogLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{when} e2email relay: {level}{' '.join(record.getMessage().split())}"


def _log_to_stderr() -> None:
    """One line per event on stderr (journald keeps it under systemd)."""
    logger = logging.getLogger("e2email.relay")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogLine())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@cli.command()
@click.option(
    "--listen",
    default="127.0.0.1:1587",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to accept SMTP submissions. Anything but loopback needs --tls-cert/--tls-key "
    "or --tls-self-signed, and --relay-user with a password.",
)
@click.option(
    "--account", metavar="NAME", help="The account (config file) to protect and send with."
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Certificate (PEM, with its chain) offered with STARTTLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The private key (PEM) of --tls-cert.",
)
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Offer STARTTLS with a self-signed certificate kept in HOME/relay-tls (made once; its "
    "SHA-256 fingerprint is logged at start, for clients to pin).",
)
@click.option("--relay-user", metavar="NAME", help="The user name clients AUTH with (after TLS).")
@click.option("--relay-password-env", metavar="VAR", help="The clients' AUTH password from $VAR.")
@click.option(
    "--relay-password-command", metavar="CMD", help="The clients' AUTH password from CMD."
)
@click.option(
    "--max-size",
    type=click.IntRange(1024),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Largest message accepted, in bytes (announced as SIZE).",
)
@click.option(
    "--max-recipients",
    type=click.IntRange(1, 10000),
    default=DEFAULT_MAX_RECIPIENTS,
    show_default=True,
    help="Recipients accepted per message (more get 452, as RFC 5321 says).",
)
@delivery_options
@click.pass_obj
def relay(state: State, /, **opts: Any) -> None:
    """Run a local SMTP relay that protects every message before it goes upstream.

    Programs that can only send plain SMTP submit to it (no TLS needed on loopback); each
    message is signed and encrypted as the options (or the account) say, stored in the outbox
    (HOME/outbox.sqlite3), and only then answered with 250; the relay then delivers it to
    --host with verified TLS, retrying what fails. A message that cannot be protected for
    every recipient is refused (550 5.7.1, naming each) and nothing of it is sent.

    Runs in the foreground and logs one line per message; SIGTERM or Ctrl-C stops it cleanly
    (what is not yet delivered stays in the outbox for the next start or `outbox retry`).
    """
    host, port = _listen(opts["listen"])
    if opts["account"] and opts["host"]:
        raise click.UsageError("give --account or the server options (--host ...), not both")
    if not opts["account"] and not opts["host"]:
        raise click.UsageError(
            "give the upstream server: --account NAME, or --host and the options of `send`"
        )
    credentials = _credentials(opts)
    wants_tls = bool(opts["tls_cert"] or opts["tls_key"] or opts["tls_self_signed"])
    if not is_loopback(host) and not (wants_tls and credentials):
        raise click.UsageError(
            f"listening on {host} (not loopback) needs STARTTLS (--tls-cert and --tls-key, or "
            "--tls-self-signed) and AUTH (--relay-user with --relay-password-env or "
            "--relay-password-command)"
        )
    if credentials and not wants_tls:
        raise click.UsageError(
            "AUTH is never offered in clear: --relay-user needs --tls-cert/--tls-key or "
            "--tls-self-signed"
        )
    tls = _tls(state, opts, host)
    mailer = _mailer(state, opts)
    _log_to_stderr()
    if tls is not None:
        logging.getLogger("e2email.relay").info(
            "STARTTLS certificate %s, SHA-256 fingerprint %s", tls.cert, tls.fingerprint
        )
    try:
        server = Relay(
            mailer,
            host=host,
            port=port,
            tls_context=tls.context() if tls is not None else None,
            credentials=credentials,
            max_message_size=opts["max_size"],
            max_recipients=opts["max_recipients"],
        )
        asyncio.run(_serve(server))
    finally:
        mailer.close()
        if mailer.outbox is not None:
            mailer.outbox.close()


def _mailer(state: State, opts: dict[str, Any]) -> AsyncMailer:
    """The mailer the relay protects and delivers with: the account's, or one made from the
    options of `send`."""
    if opts["account"]:
        # Accounts (e2email.accounts, `AsyncMailer.from_account`) come with the config file.
        from_account = getattr(AsyncMailer, "from_account", None)
        if from_account is None:
            raise click.UsageError(
                "--account needs accounts in a config file, which this e2email does not have: "
                "give --host and the options of `send`"
            )
        # The group's --config, and --home/--gnupg-home over the account's (e2email.accounts).
        account = state.config().account(opts["account"])
        state.use_account(account)
        account = dataclasses.replace(account, home=state.home, gnupg_home=state.gnupg_home)
        mailer = from_account(account, outbox=True)
        assert isinstance(mailer, AsyncMailer)
        return mailer
    protection, passphrase = protection_options(opts)
    return AsyncMailer(
        smtp=smtp_settings(state, opts),
        keystore=state.keystore(),
        protection=protection,
        passphrase=passphrase,
        outbox=Outbox.in_home(state.home),
        retry=retry_policy(opts),
        connections=opts["connections"],
    )


async def _serve(server: Relay) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_until_stopped(server, stop)


def _tls(state: State, opts: dict[str, Any], host: str) -> TLSFiles | None:
    cert, key, generate = opts["tls_cert"], opts["tls_key"], opts["tls_self_signed"]
    if generate and (cert or key):
        raise click.UsageError("give --tls-cert/--tls-key or --tls-self-signed, not both")
    if bool(cert) != bool(key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if cert and key:
        return TLSFiles.load(cert, key)
    if generate:
        return self_signed_certificate(state.home / "relay-tls", host)
    return None


def _credentials(opts: dict[str, Any]) -> dict[str, str] | None:
    user = opts["relay_user"]
    source = secret_source(
        opts["relay_password_env"], opts["relay_password_command"], "relay password"
    )
    if user is None:
        if source is not None:
            raise click.UsageError("--relay-password-* goes with --relay-user")
        return None
    if source is None:
        raise click.UsageError(
            "--relay-user needs --relay-password-env VAR or --relay-password-command CMD"
        )
    password = source if isinstance(source, str) else source()
    if not password:
        raise ConfigError("the relay password is empty")
    return {user: password}


# The relay reaches the upstream server and protects messages exactly as `send` does.
relay.params[:0] = [
    p for p in send.params if p.name in (*_PROTECTION_OPTION_NAMES, *SMTP_OPTION_NAMES)
]
