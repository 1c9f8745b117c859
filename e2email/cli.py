"""The ``e2email`` command line.

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
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from e2email.client import Mailer, ProtectedCopy, SendResult
from e2email.config import (
    PasswordSource,
    Protection,
    SMTPSettings,
    TLSMode,
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
from e2email.message import Attachment, Message

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_KEY = 3
EXIT_CONNECTION = 4
EXIT_AUTH = 5
EXIT_REJECTED = 6

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


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"e2email: error: {message}", err=True)
    sys.exit(code)


class _State:
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
    help="e2email's home directory (keys, unsent mail). Env: E2EMAIL_HOME. "
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
    """Send end-to-end encrypted email: OpenPGP (PGP/MIME) signed and encrypted, submitted
    over verified TLS. Try `e2email demo` for a full round trip on this machine."""
    ctx.obj = _State(home or default_home(), gnupg_home)


# -- send ------------------------------------------------------------------------------------


def _secret_source(env: str | None, command: str | None, what: str) -> PasswordSource | None:
    if env and command:
        raise click.UsageError(f"give the {what} either from an environment variable or a command")
    if env:
        return password_from_env(env)
    if command:
        return password_from_command(command)
    return None


def _prompt(what: str) -> Callable[[], str]:
    def ask() -> str:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"a {what} is needed and there is no terminal to ask on: "
                f"use --{what.split()[-1]}-env or --{what.split()[-1]}-command"
            )
        return getpass.getpass(f"{what.capitalize()}: ")

    return ask


def _parse_key_map(items: Sequence[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        addr, sep, fpr = item.partition("=")
        if not sep or not addr.strip() or not fpr.strip():
            raise click.BadParameter(f"{item!r} is not ADDRESS=FINGERPRINT", param_hint="--key")
        mapping[addr.strip()] = fpr.strip()
    return mapping


def _read_body(body: str | None, body_file: Path | None) -> tuple[str, bool]:
    """The body text, and whether it came from stdin (and would be lost on failure)."""
    if body is not None and body_file is not None:
        raise click.UsageError("give the body once: --body or --body-file")
    if body is not None:
        return body, False
    if body_file is not None:
        try:
            return body_file.read_text(encoding="utf-8"), False
        except (OSError, UnicodeDecodeError) as exc:
            raise MessageError(f"cannot read {body_file}: {exc}", field="body") from exc
    if sys.stdin.isatty():
        raise click.UsageError("no body: give --body, --body-file, or pipe it on stdin")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError as exc:
        raise MessageError("standard input is not UTF-8 text", field="body") from exc


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _save_unsent(home: Path, copies: Sequence[ProtectedCopy]) -> list[Path]:
    """Write protected copies that were not delivered (ciphertext only), with their envelope."""
    folder = _private_dir(home / "unsent")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = []
    for n, copy in enumerate(copies, 1):
        tag = hashlib.sha256(copy.message_id.encode()).hexdigest()[:10]
        path = folder / f"{stamp}-{tag}-{n}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(copy.raw)
        envelope = {"mail_from": copy.mail_from, "recipients": list(copy.recipients)}
        path.with_suffix(".json").write_text(json.dumps(envelope) + "\n")
        paths.append(path)
    return paths


def _save_draft(home: Path, text: str) -> Path:
    folder = _private_dir(home / "drafts")
    path = folder / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _report(result: SendResult) -> None:
    for c in result.copies:
        label = "copy to To/Cc" if c.copy.kind == "main" else "Bcc copy"
        tls = f" over {c.delivery.tls.version}" if c.delivery.tls else ""
        reply = f" ({c.delivery.data_reply})" if c.delivery.data_reply else ""
        click.echo(f"sent {label}{tls}: accepted for {', '.join(c.delivery.accepted)}{reply}")


@cli.command()
@click.option("--from", "sender", required=True, metavar="ADDRESS", help="The sender.")
@click.option("--to", multiple=True, metavar="ADDRESS", help="A To recipient (repeatable).")
@click.option("--cc", multiple=True, metavar="ADDRESS", help="A Cc recipient (repeatable).")
@click.option(
    "--bcc",
    multiple=True,
    metavar="ADDRESS",
    help="A Bcc recipient (repeatable); each gets a separate copy encrypted only to them.",
)
@click.option("--reply-to", multiple=True, metavar="ADDRESS")
@click.option("--subject", default="", help="The subject (hidden inside the encryption).")
@click.option("--body", help="The text body.")
@click.option(
    "--body-file", type=click.Path(dir_okay=False, path_type=Path), help="Read the body from F."
)
@click.option(
    "--html-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An HTML alternative to the text body.",
)
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Attach a file (repeatable).",
)
@click.option("--sign/--no-sign", default=True, show_default=True)
@click.option("--encrypt/--no-encrypt", default=True, show_default=True)
@click.option(
    "--encrypt-to-self/--no-encrypt-to-self",
    default=True,
    show_default=True,
    help="Also encrypt to the sender so the sent copy stays readable.",
)
@click.option(
    "--key",
    "key_map",
    multiple=True,
    metavar="ADDRESS=FINGERPRINT",
    help="Use this key for this address instead of looking it up (repeatable).",
)
@click.option("--passphrase-env", metavar="VAR", help="Signing key passphrase from $VAR.")
@click.option("--passphrase-command", metavar="CMD", help="Signing key passphrase from CMD.")
@click.option("--host", help="The SMTP submission server.")
@click.option("--port", type=click.IntRange(1, 65535), help="Default 465 (implicit TLS).")
@click.option(
    "--tls",
    type=click.Choice(["implicit", "starttls"]),
    help="TLS mode: implicit (465) or STARTTLS, which is then required (587, 2525, 25).",
)
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    help="DANGER: submit without TLS (test rigs only; never with credentials).",
)
@click.option("--user", help="The SMTP user name (AUTH PLAIN or LOGIN, only after TLS).")
@click.option("--password-env", metavar="VAR", help="SMTP password from $VAR.")
@click.option("--password-command", metavar="CMD", help="SMTP password from CMD's first line.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust this CA bundle (PEM) instead of the system's.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the protected message to FILE (- for stdout) instead of sending it.",
)
@click.pass_obj
def send(state: _State, /, **opts: Any) -> None:
    """Sign, encrypt and send one message.

    The body comes from --body, --body-file or standard input. If anything prevents
    encryption for any recipient, nothing is sent and every such recipient is named.
    """
    if not (opts["to"] or opts["cc"] or opts["bcc"]):
        raise click.UsageError("no recipients: give --to, --cc or --bcc")
    if opts["output"] is None and not opts["host"]:
        raise click.UsageError("give --host to send, or --output FILE to write the message")
    text, from_stdin = _read_body(opts["body"], opts["body_file"])
    try:
        _send(state, opts, text)
    except E2EmailError as exc:
        extra = ""
        if isinstance(exc, TransportError) and exc.unsent:
            paths = _save_unsent(state.home, exc.unsent)
            extra = f" (the undelivered protected message is kept in {paths[0].parent})"
        elif from_stdin and text and not isinstance(exc, TransportError):
            extra = f" (the body read from stdin is saved in {_save_draft(state.home, text)})"
        _fail(f"{exc}{extra}", exit_code_for(exc))


def _send(state: _State, opts: dict[str, Any], text: str) -> None:
    html = None
    if opts["html_file"] is not None:
        try:
            html = opts["html_file"].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MessageError(f"cannot read {opts['html_file']}: {exc}", field="html") from exc
    message = Message(
        sender=opts["sender"],
        to=opts["to"],
        cc=opts["cc"],
        bcc=opts["bcc"],
        reply_to=opts["reply_to"],
        subject=opts["subject"],
        text=text,
        html=html,
        attachments=tuple(Attachment.from_path(p) for p in opts["attach"]),
    )
    protection = Protection(
        sign=opts["sign"],
        encrypt=opts["encrypt"],
        encrypt_to_self=opts["encrypt_to_self"],
        key_map=_parse_key_map(opts["key_map"]),
    )
    passphrase = _secret_source(
        opts["passphrase_env"], opts["passphrase_command"], "passphrase"
    ) or _prompt("signing key passphrase")
    smtp = None
    if opts["output"] is None:
        password = _secret_source(opts["password_env"], opts["password_command"], "password")
        if opts["user"] and password is None:
            password = _prompt("SMTP password")
        tls = TLSMode(opts["tls"]) if opts["tls"] else None
        if opts["insecure_plaintext"]:
            if opts["tls"]:
                raise click.UsageError("--insecure-plaintext contradicts --tls")
            tls = TLSMode.INSECURE_PLAINTEXT
            click.echo("e2email: WARNING: sending WITHOUT TLS (--insecure-plaintext)", err=True)
        smtp = SMTPSettings(
            host=opts["host"],
            port=opts["port"],
            tls=tls,
            username=opts["user"],
            password=password,
            ca_file=opts["ca_file"],
            timeout=opts["timeout"],
            allow_insecure_plaintext=opts["insecure_plaintext"],
        )
    with Mailer(
        smtp=smtp, keystore=state.keystore(), protection=protection, passphrase=passphrase
    ) as mailer:
        if opts["output"] is not None:
            copies = mailer.protect(message)
            _write_output(opts["output"], copies)
        else:
            _report(mailer.send(message))


def _write_output(target: Path, copies: Sequence[ProtectedCopy]) -> None:
    if str(target) == "-":
        if len(copies) > 1:
            raise click.UsageError("Bcc makes several copies: --output needs a file name")
        sys.stdout.buffer.write(copies[0].raw)
        return
    for n, copy in enumerate(copies):
        path = target if n == 0 else target.with_name(f"{target.stem}.bcc{n}{target.suffix}")
        try:
            path.write_bytes(copy.raw)
        except OSError as exc:
            raise MessageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        who = ", ".join(copy.recipients)
        click.echo(f"wrote {path} ({'To/Cc copy' if copy.kind == 'main' else 'Bcc copy'}: {who})")


# -- keys ------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Import, list, export and generate OpenPGP keys in the keystore."""


@keys.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_obj
def keys_import(state: _State, files: tuple[Path, ...]) -> None:
    """Import keys from FILES (armored or binary, public or secret)."""
    store = state.keystore()
    for path in files:
        summary = store.import_file(path)
        secret = f", {summary.secret_imported} secret" if summary.secret_imported else ""
        click.echo(
            f"{path}: {summary.imported} imported, {summary.unchanged} unchanged{secret}: "
            + ", ".join(summary.fingerprints)
        )


@keys.command("list")
@click.pass_obj
def keys_list(state: _State) -> None:
    """List keys: address, fingerprint, algorithm, expiry, and usable or why not."""
    from rich.console import Console
    from rich.table import Table

    found = state.keystore().all_keys()
    if not found:
        click.echo(f"no keys in {state.home} (import some with `e2email keys import FILE`)")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("address", "fingerprint", "algorithm", "expires", "secret", "status"):
        table.add_column(col)
    for key in found:
        algos = "/".join(dict.fromkeys(k.algorithm for k in (key.primary, *key.subkeys)))
        expires = f"{key.expires:%Y-%m-%d}" if key.expires else "never"
        table.add_row(
            "\n".join(key.addresses) or "(no address)",
            key.fingerprint,
            algos,
            expires,
            "yes" if key.has_secret else "no",
            key.status(),
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@keys.command("export")
@click.argument("address")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def keys_export(state: _State, address: str, output: Path | None) -> None:
    """Export the public key of ADDRESS (or a fingerprint), armored."""
    data = state.keystore().export(address)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
        click.echo(f"wrote {output}")


@keys.command("generate")
@click.argument("address")
@click.option("--name", default="", help="A real name for the user ID.")
@click.option(
    "--algorithm",
    type=click.Choice(["ed25519", "rsa3072", "rsa4096"]),
    default="ed25519",
    show_default=True,
)
@click.option("--expire", default="3y", show_default=True, help="e.g. 2y, 180d, 0 (never).")
@click.option(
    "--passphrase-env", metavar="VAR", help="Protect the key with the passphrase in $VAR."
)
@click.option("--ask-passphrase", is_flag=True, help="Ask for a passphrase on the terminal.")
@click.pass_obj
def keys_generate(
    state: _State,
    address: str,
    name: str,
    algorithm: str,
    expire: str,
    passphrase_env: str | None,
    ask_passphrase: bool,
) -> None:
    """Generate a key pair for ADDRESS (Ed25519/Cv25519 by default)."""
    passphrase = None
    if passphrase_env:
        passphrase = password_from_env(passphrase_env)()
    elif ask_passphrase:
        passphrase = getpass.getpass("Passphrase for the new key: ")
        if getpass.getpass("Again: ") != passphrase:
            raise ConfigError("the passphrases differ")
    key = state.keystore().generate(
        address, name=name, algorithm=algorithm, passphrase=passphrase, expire=expire
    )
    click.echo(f"generated {key.fingerprint} {key.user_id}")


# -- demo ------------------------------------------------------------------------------------


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
    except click.exceptions.Abort:
        _fail("aborted", EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except E2EmailError as exc:
        _fail(str(exc), exit_code_for(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)
