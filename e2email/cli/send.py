"""``e2email send``: build, protect and submit one message."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from e2email.cli.app import (
    State,
    cli,
    exit_code_for,
    fail,
    prompt_for,
    secret_source,
)
from e2email.client import Mailer, ProtectedCopy, SendResult
from e2email.config import (
    Protection,
    SMTPSettings,
    TLSMode,
)
from e2email.errors import (
    E2EmailError,
    MessageError,
    TransportError,
)
from e2email.message import Attachment, Message


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
def send(state: State, /, **opts: Any) -> None:
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
        fail(f"{exc}{extra}", exit_code_for(exc))


def _send(state: State, opts: dict[str, Any], text: str) -> None:
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
    passphrase = secret_source(
        opts["passphrase_env"], opts["passphrase_command"], "passphrase"
    ) or prompt_for("signing key passphrase")
    smtp = None
    if opts["output"] is None:
        password = secret_source(opts["password_env"], opts["password_command"], "password")
        if opts["user"] and password is None:
            password = prompt_for("SMTP password")
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
