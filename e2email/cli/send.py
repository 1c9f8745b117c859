"""``e2email send``: build, protect and submit one message, or one per row of a CSV file."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from e2email.cli.app import (
    EXIT_INTERRUPTED,
    State,
    cli,
    exit_code_for,
    fail,
    prompt_for,
    secret_source,
    set_interrupt_hint,
)
from e2email.client import Mailer, MessageOutcome, ProtectedCopy
from e2email.config import (
    OpenPGPEngine,
    PasswordSource,
    Protection,
    RetryPolicy,
    Scheme,
    SMIMECipher,
    SMTPSettings,
    TLSMode,
    password_from_command,
    password_from_env,
)
from e2email.errors import (
    DeliveryError,
    E2EmailError,
    MessageError,
    RecipientsRefusedError,
    RequireTLSError,
    TransportError,
)
from e2email.message import Attachment, Message
from e2email.outbox import DEFAULT_FILENAME, Outbox
from e2email.private import ensure_private_dir, write_private

if TYPE_CHECKING:
    from e2email.accounts import Account


def _parse_key_map(items: Sequence[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        addr, sep, fpr = item.partition("=")
        if not sep or not addr.strip() or not fpr.strip():
            raise click.BadParameter(f"{item!r} is not ADDRESS=FINGERPRINT", param_hint="--key")
        mapping[addr.strip()] = fpr.strip()
    return mapping


def _smtp_credentials(opts: dict[str, Any]) -> tuple[PasswordSource | None, PasswordSource | None]:
    """(password source, OAuth2 token source) from the --user/--password-*/--auth/--token-*
    options; a password is prompted for (when needed, after TLS) if none is given."""
    password = secret_source(opts["password_env"], opts["password_command"], "SMTP password")
    token_env, token_command = opts["token_env"], opts["token_command"]
    auth = opts["auth"] or ("xoauth2" if token_env or token_command else "password")
    if auth == "password":
        if token_env or token_command:
            raise click.UsageError("--token-env and --token-command go with --auth xoauth2")
        if opts["user"] and password is None:
            password = prompt_for("SMTP password")
        return password, None
    if password is not None:
        raise click.UsageError(
            "--auth xoauth2 takes --token-env or --token-command, not a password"
        )
    if token_env and token_command:
        raise click.UsageError("give the token either from an environment variable or a command")
    if not (token_env or token_command):
        raise click.UsageError("--auth xoauth2 needs --token-env VAR or --token-command CMD")
    if not opts["user"]:
        raise click.UsageError("--auth xoauth2 needs --user (the account's address)")
    if token_env:
        return None, password_from_env(token_env, what="the OAuth2 access token")
    return None, password_from_command(token_command, what="OAuth2 token")


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


def _read_html(html_file: Path | None) -> str | None:
    """The HTML alternative from --html-file, if given."""
    if html_file is None:
        return None
    try:
        return html_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MessageError(f"cannot read {html_file}: {exc}", field="html") from exc


def _read_subject(opts: dict[str, Any]) -> str:
    """The subject: --subject, or --subject-file (so that a confidential subject need not
    appear in the process table). One trailing newline of the file is not part of it; anything
    else (a second line, control characters) is refused by the message checks as for
    --subject."""
    subject, subject_file = opts["subject"], opts["subject_file"]
    if subject_file is None:
        return subject or ""
    if subject is not None:
        raise click.UsageError("give the subject once: --subject or --subject-file")
    if subject_file == "-":
        body_from_stdin = (
            opts["body"] is None and opts["body_file"] is None and opts["template"] is None
        )
        if body_from_stdin:
            raise click.UsageError(
                "--subject-file - reads standard input, which already gives the body: "
                "give the body with --body-file (or the subject from a file)"
            )
        data = sys.stdin.buffer.read()
        where = "standard input"
    else:
        where = subject_file
        try:
            data = Path(subject_file).read_bytes()
        except OSError as exc:
            raise MessageError(
                f"cannot read {subject_file}: {exc.strerror or exc}", field="subject"
            ) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"{where} is not UTF-8 text", field="subject") from exc
    # A file made by an editor or `echo` ends with one newline; it ends the line, it is not in
    # the subject. Only one: anything more is refused as a line break in the subject.
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _smime_options(command: Any) -> Any:
    """The S/MIME options of ``send`` (kept together, applied as one decorator)."""
    from e2email.config import RevocationPolicy

    options = [
        click.option(
            "--smime",
            is_flag=True,
            help="Use S/MIME (X.509 certificates, RFC 8551) instead of OpenPGP.",
        ),
        click.option(
            "--smime-cipher",
            type=click.Choice([c.value for c in SMIMECipher]),
            help="S/MIME content cipher: aes256 (default) or aes128 (both CBC).",
        ),
        click.option(
            "--rsa-pss", is_flag=True, help="S/MIME: sign with RSASSA-PSS, not PKCS#1 v1.5."
        ),
        click.option(
            "--trust-self-signed",
            multiple=True,
            metavar="SHA256",
            help="S/MIME: accept this self-signed certificate, named by fingerprint (repeatable).",
        ),
        click.option(
            "--revocation",
            type=click.Choice([p.value for p in RevocationPolicy]),
            help="S/MIME: fetch revocation status (OCSP, CRL distribution points) for every "
            "certificate: off (default; imported CRLs are still used), prefer (refuse a "
            "revoked one, go on when no status can be had) or require (refuse when the status "
            "cannot be established).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _smime_protection(opts: dict[str, Any]) -> dict[str, Any]:
    """Protection fields for the S/MIME options; refuses them without --smime."""
    from e2email.config import RevocationPolicy

    if not opts["smime"]:
        for name in ("smime_cipher", "rsa_pss", "trust_self_signed", "revocation"):
            if opts[name]:
                flag = "--" + name.replace("_", "-")
                raise click.UsageError(f"{flag} needs --smime")
        return {}
    fields: dict[str, Any] = {
        "scheme": Scheme.SMIME,
        "smime_rsa_pss": opts["rsa_pss"],
        "smime_trust_self_signed": frozenset(opts["trust_self_signed"]),
    }
    if opts["smime_cipher"]:
        fields["smime_cipher"] = SMIMECipher(opts["smime_cipher"])
    if opts["revocation"]:
        fields["revocation"] = RevocationPolicy(opts["revocation"])
    return fields


def _save_draft(home: Path, text: str) -> Path:
    """Keep a body read from stdin (plaintext) in HOME/drafts/, 0700/0600 whatever the umask."""
    folder = ensure_private_dir(home / "drafts", what="the drafts folder")
    path = folder / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.txt"
    write_private(path, text.encode("utf-8"))
    return path


def _report(result: MessageOutcome) -> None:
    for c in result.copies:
        label = "copy to To/Cc" if c.kind == "main" else "Bcc copy"
        tls = f" over {c.tls.version}" if c.tls else ""
        reply = f" ({c.data_reply})" if c.data_reply else ""
        click.echo(f"sent {label}{tls}: accepted for {', '.join(c.accepted)}{reply}")


def delivery_options(command: Any) -> Any:
    """--retries and --connections: how hard and how wide to deliver (send, outbox retry)."""
    command = click.option(
        "--connections",
        type=click.IntRange(1, 64),
        default=4,
        show_default=True,
        help="SMTP connections used side by side for --to-file and outbox retry.",
    )(command)
    return click.option(
        "--retries",
        type=click.IntRange(0, 20),
        default=2,
        show_default=True,
        help="Retries after a transient failure (4xx, timeout, dropped connection), with "
        "exponential back-off; what is still undelivered stays in the outbox.",
    )(command)


def _bulk_options(command: Any) -> Any:
    """--to-file and what goes with it."""
    for opt in reversed(
        [
            click.option(
                "--to-file",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                metavar="CSV",
                help="Send one message per row of this CSV file (columns: email, name, and "
                "any used as $placeholders), each protected for its recipient alone.",
            ),
            click.option(
                "--template",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                help="The message from a file: 'Subject: ...', a blank line, the body (keeps the "
                "subject out of the process table). With --to-file, $column or ${column} "
                "placeholders are filled per row. Instead of --subject/--body.",
            ),
            click.option(
                "--report",
                type=click.Path(dir_okay=False, path_type=Path),
                help="With --to-file: write a per-recipient report to FILE (.json: JSON, "
                "else CSV).",
            ),
            click.option(
                "--batch",
                "batch_name",
                default="",
                metavar="NAME",
                help="With --to-file: a name for this batch. Rerunning the same command sends "
                "only the rows not yet delivered; a new NAME sends every row again.",
            ),
            # Issue 12: protect here, deliver through Celery workers (e2email.celery).
            click.option(
                "--queue",
                type=click.Choice(["celery"]),
                default=None,
                help="With --to-file: protect each message here and queue the copies for "
                "Celery workers (`celery -A e2email.celery worker`), which deliver them "
                "through the --account; see `e2email queue status`.",
            ),
            click.option(
                "--queue-batch",
                type=click.IntRange(min=1),
                default=None,
                metavar="N",
                help="With --queue: copies per Celery task (default: [celery] batch-size, 50).",
            ),
        ]
    ):
        command = opt(command)
    return command


# -- accounts (config.toml, e2email.accounts) -------------------------------------------------

#: Where `send` keeps the chosen Account in its options (the --account option is its name).
ACCOUNT = "chosen_account"


def account_options(command: Any) -> Any:
    """--account and --config (send, outbox retry, doctor)."""
    command = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The accounts file (instead of the group's --config, $E2EMAIL_CONFIG or "
        "$XDG_CONFIG_HOME/e2email/config.toml).",
    )(command)
    return click.option(
        "--account",
        metavar="NAME",
        help="Use this account of the config file (`e2email config show`); options given "
        "here win over its settings.",
    )(command)


def given(name: str) -> bool:
    """Was option ``name`` given on the command line (or by its environment variable), not
    left at its default? Only those override an account's settings."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def choose_account(state: State, opts: dict[str, Any]) -> Account | None:
    """The account a command uses, by msmtp's rules: --account NAME; else none when --host is
    on the command line (the server is given whole); else the account whose `from` matches
    --from/-f; else the default account. None when the config file has no accounts (and none
    is named); with --output (nothing sent) also when none matches and there is no default.
    Also fills --from from the account and makes its home (and GnuPG home) the one used,
    unless given on the command line."""

    name = opts.get("account")
    if name is None and opts.get("host"):
        return None
    config = state.config(opts.get("config_file"))
    if name is None and not config.accounts:
        return None
    sender = opts.get("sender")
    account: Account | None
    if name is not None:
        account = config.account(name)
    elif sender:
        account = config.match_sender(parseaddr(sender)[1] or sender)
        if account is None and (config.default is not None or opts.get("output") is None):
            account = config.account(None)
    elif config.default is not None or opts.get("output") is None:
        account = config.account(None)
    else:
        account = None
    if account is not None:
        state.use_account(account)
        if "sender" in opts and not sender:
            opts["sender"] = account.sender
    return account


def outbox_for(state: State, opts: dict[str, Any]) -> Outbox:
    """The outbox: the account's (its `outbox`, else HOME's), recording the account's name
    with every item so that `outbox retry` needs no server options."""
    account: Account | None = opts.get(ACCOUNT)
    path = account.outbox if account is not None and account.outbox else None
    return Outbox(path or state.home / DEFAULT_FILENAME, account=account.name if account else None)


@dataclass(frozen=True)
class AccountSettings:
    smtp: SMTPSettings
    protection: Protection
    passphrase: PasswordSource | None


#: The options that say how to log in: given any of them, the credentials are the options'.
_CREDENTIAL_OPTIONS = (
    "user",
    "password_env",
    "password_command",
    "auth",
    "token_env",
    "token_command",
)
#: option -> SMTPSettings field, taken over as they are when given.
_SMTP_FIELDS = {
    "host": "host",
    "port": "port",
    "ca_file": "ca_file",
    "require_tls": "require_tls",
    "timeout": "timeout",
    "connect_timeout": "connect_timeout",
    "data_timeout": "data_timeout",
}
#: S/MIME option -> Protection field.
_SMIME_FIELDS = {
    "smime_cipher": "smime_cipher",
    "rsa_pss": "smime_rsa_pss",
    "trust_self_signed": "smime_trust_self_signed",
    "revocation": "revocation",
}


def account_settings(account: Account, opts: dict[str, Any]) -> AccountSettings:
    """The one place where an account and the command line meet: the account's settings,
    each replaced by the option that says otherwise when that option was given (msmtp:
    "options override configuration file settings"). The dataclasses check the result."""
    smtp_changes: dict[str, Any] = {
        field: opts[name] for name, field in _SMTP_FIELDS.items() if given(name)
    }
    if given("tls"):
        smtp_changes.update(tls=TLSMode(opts["tls"]), allow_insecure_plaintext=False)
    if opts.get("insecure_plaintext"):
        if given("tls"):
            raise click.UsageError("--insecure-plaintext contradicts --tls")
        smtp_changes.update(tls=TLSMode.INSECURE_PLAINTEXT, allow_insecure_plaintext=True)
    if account.smtp.effective_tls is TLSMode.INSECURE_PLAINTEXT or opts.get("insecure_plaintext"):
        click.echo("e2email: WARNING: sending WITHOUT TLS (insecure-plaintext)", err=True)
    if any(given(name) for name in _CREDENTIAL_OPTIONS):
        with_user = {**opts, "user": opts["user"] or account.smtp.username}
        password, token = _smtp_credentials(with_user)
        smtp_changes.update(username=with_user["user"], password=password, oauth_token=token)
    elif account.smtp.username and account.smtp.password is None and not account.smtp.oauth_token:
        smtp_changes["password"] = prompt_for("SMTP password")
    smtp = replace(account.smtp, **smtp_changes) if smtp_changes else account.smtp
    base = account.protection
    if "sign" not in opts:
        # A command without the policy options (outbox retry): the account's policy.
        return AccountSettings(smtp=smtp, protection=base, passphrase=account.passphrase)

    changes: dict[str, Any] = {
        name: opts[name] for name in ("sign", "encrypt", "encrypt_to_self") if given(name)
    }
    if opts["key_map"]:
        changes["key_map"] = {**base.key_map, **_parse_key_map(opts["key_map"])}
    if opts["smime"] or base.scheme is Scheme.SMIME:
        # The account may say S/MIME; then its S/MIME options need no --smime here.
        smime = _smime_protection({**opts, "smime": True})
        changes["scheme"] = Scheme.SMIME
        for name, field in _SMIME_FIELDS.items():
            if given(name) and field in smime:
                changes[field] = smime[field]
        if "smime_trust_self_signed" in changes:
            changes["smime_trust_self_signed"] |= base.smime_trust_self_signed
    else:
        _smime_protection(opts)  # refuses the S/MIME options without S/MIME
    protection = replace(base, **changes) if changes else base
    return AccountSettings(smtp=smtp, protection=protection, passphrase=account.passphrase)


@cli.command()
@click.option(
    "-f",
    "--from",
    "sender",
    metavar="ADDRESS",
    help="The sender. Without --account (and --host), also picks the account whose `from` "
    "matches (msmtp's rule). Default: the account's `from`.",
)
@click.option("--to", multiple=True, metavar="ADDRESS", help="A To recipient (repeatable).")
@click.option("--cc", multiple=True, metavar="ADDRESS", help="A Cc recipient (repeatable).")
@click.option(
    "--bcc",
    multiple=True,
    metavar="ADDRESS",
    help="A Bcc recipient (repeatable); each gets a separate copy encrypted only to them.",
)
@click.option("--reply-to", multiple=True, metavar="ADDRESS")
@click.option("--subject", help="The subject (hidden inside the encryption).")
@click.option(
    "--subject-file",
    metavar="FILE",
    help="Read the subject (UTF-8, one line) from FILE (- for stdin when the body comes from "
    "a file), so that it does not show in the process table.",
)
@click.option("--body", help="The text body.")
@click.option(
    "--body-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the body (UTF-8) from FILE.",
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
@click.option(
    "--encrypt/--no-encrypt",
    default=True,
    show_default=True,
    help="Encryption is the default: only --no-encrypt sends a message readable on the way "
    "(and says so on stderr).",
)
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
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Use only this port. Default: 465 (implicit TLS), then 587 and 2525 (STARTTLS), moving "
    "on only when a port refuses or times out; what worked is remembered in HOME/hosts.json.",
)
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
@click.option("--user", help="The SMTP user name (AUTH PLAIN, LOGIN or XOAUTH2, only after TLS).")
@click.option("--password-env", metavar="VAR", help="SMTP password from $VAR.")
@click.option("--password-command", metavar="CMD", help="SMTP password from CMD's first line.")
@click.option(
    "--auth",
    type=click.Choice(["password", "xoauth2"]),
    help="password: AUTH PLAIN/LOGIN; xoauth2: an OAuth2 access token (Gmail, Microsoft 365). "
    "Default: xoauth2 when a --token-* option is given.",
)
@click.option("--token-env", metavar="VAR", help="OAuth2 access token from $VAR (XOAUTH2).")
@click.option(
    "--token-command", metavar="CMD", help="OAuth2 access token from CMD's first line (XOAUTH2)."
)
@click.option(
    "--require-tls",
    is_flag=True,
    help="REQUIRETLS (RFC 8689): every relay must use verified TLS; refuse to send when the "
    "server does not offer it.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust this CA bundle (PEM) instead of the system's.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each reply from the server.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    help="Seconds to wait to connect, per port tried (default: --timeout).",
)
@click.option(
    "--data-timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the server's reply after the message data (RFC 5321 "
    "§4.5.3.2.6: at least 10 minutes; a server may be filtering the message).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the protected message to FILE (- for stdout) instead of sending it.",
)
@_smime_options
@click.option(
    "--discover",
    type=click.Choice(["off", "wkd", "wkd+keyserver"]),
    default=None,
    help="OpenPGP: look up keys of recipients who have none: off (default), wkd (their own "
    "domain's Web Key Directory), wkd+keyserver (then keys.openpgp.org). A key found is still "
    "refused when unusable or when it differs from a stored one (e2email keys accept).",
)
@click.option(
    "--engine",
    type=click.Choice([e.value for e in OpenPGPEngine if e is not OpenPGPEngine.AUTO]),
    help="OpenPGP engine: sequoia (in process, needs e2email[sequoia]) or gpg (the gpg "
    "program: smartcards, gpg-agent). Default: sequoia when installed, else gpg.",
)
@click.option(
    "--no-autocrypt",
    is_flag=True,
    help="OpenPGP: do not publish the sender's key in an Autocrypt header, nor the recipients' "
    "keys in Autocrypt-Gossip headers inside the encryption.",
)
@delivery_options
@_bulk_options
@account_options
@click.pass_obj
def send(state: State, /, **opts: Any) -> None:
    """Sign, encrypt and send one message.

    The body comes from --body, --body-file or standard input. If anything prevents
    encryption for any recipient, nothing is sent and every such recipient is named.

    The protected message is stored in the outbox (HOME/outbox.sqlite3) before it is sent and
    stays there until the server accepted it for every recipient; `e2email outbox` lists,
    retries and drops what is left. With --to-file, one message per CSV row.

    The server, credentials and policy come from the options or from an account of the
    config file (--account NAME, the account matching --from, or the default one; options
    given here win over the account's).
    """
    opts[ACCOUNT] = choose_account(state, opts)
    if not opts["sender"]:
        raise click.UsageError("Missing option '--from' (or an account that has `from`)")
    if opts["to_file"] is None:
        # What a Ctrl-C may leave: only a message being sent waits in the outbox.
        set_interrupt_hint(
            ""
            if opts["output"] is not None
            else "anything already protected waits in the outbox: `e2email outbox list`"
        )
    opts["subject"] = _read_subject(opts)
    if opts["to_file"] is not None:
        from e2email.cli.bulk_send import send_bulk

        send_bulk(state, opts)
        return
    for name in ("report", "queue", "queue_batch"):
        if opts[name] is not None:
            raise click.UsageError(f"--{name.replace('_', '-')} goes with --to-file")
    if opts["template"] is not None:
        _single_template(opts)
    if not (opts["to"] or opts["cc"] or opts["bcc"]):
        raise click.UsageError("no recipients: give --to, --cc or --bcc")
    if opts["output"] is None and not opts["host"] and opts[ACCOUNT] is None:
        raise click.UsageError(
            "give --host or --account NAME to send (or configure a default account: "
            "`e2email config --help`), or --output FILE to write the message"
        )
    text, from_stdin = _read_body(opts["body"], opts["body_file"])
    try:
        _send(state, opts, text)
    except E2EmailError as exc:
        extra = ""
        kept = kept_ids(exc)
        if kept:
            extra = kept_hint(exc, kept)
        elif from_stdin and text and not isinstance(exc, TransportError):
            try:
                extra = f" (the body read from stdin is saved in {_save_draft(state.home, text)})"
            except E2EmailError as unsaved:
                # Say both: the error that stopped the message, and why its body is not kept.
                extra = f" (the body read from stdin could not be saved: {unsaved})"
        fail(f"{exc}{extra}", exit_code_for(exc))


def _single_template(opts: dict[str, Any]) -> None:
    """``--template`` for one message: its header block gives the Subject (so a confidential
    one stays out of the process table, as with --subject-file) and the rest is the body.
    ``$column`` placeholders need rows to fill them: only with --to-file."""
    from e2email.bulk import Template

    if opts["body"] is not None or opts["body_file"] is not None:
        raise click.UsageError("give the body once: --template or --body/--body-file")
    path: Path = opts["template"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MessageError(f"cannot read the template {path}: {exc}", field="body") from exc
    template = Template.parse(text)
    if template.placeholders:
        names = ", ".join(f"${n}" for n in sorted(template.placeholders))
        raise click.UsageError(
            f"the template has placeholders ({names}): they are filled from --to-file rows"
        )
    if template.subject and opts["subject"]:
        raise click.UsageError(
            "the subject is given twice: --subject (or --subject-file) and in --template"
        )
    # string.Template's escape: "$$" in a template is one "$" in the message.
    opts["subject"] = (template.subject or opts["subject"] or "").replace("$$", "$")
    opts["body"] = template.body.replace("$$", "$")


def kept_ids(exc: BaseException) -> tuple[str, ...]:
    """The outbox IDs an error says the message is kept under (any error class: every error
    raised after the copies were stored carries them)."""
    kept = getattr(getattr(exc, "result", None), "kept", None)
    return tuple(kept) if isinstance(kept, tuple | list) else ()


def kept_hint(exc: BaseException, kept: Sequence[str]) -> str:
    """Where the message is and what to do, in parentheses after the error. `outbox retry` is
    offered only where a retry can help: a permanent refusal (5xx) is not undone by asking
    again, so it says so and how to give the message up."""
    ids = ", ".join(kept)
    where = f" (the protected message is kept in the outbox as {ids}: "
    if getattr(exc, "maybe_delivered", False):
        return where + (
            "the server may have it already, so it is not sent again by itself; check with "
            "the recipients, then `e2email outbox retry --maybe-delivered` sends it again)"
        )
    if isinstance(exc, RequireTLSError):
        return where + (
            "it is sent only with REQUIRETLS, so `e2email outbox retry` needs a server that "
            "offers it; `e2email outbox drop` gives it up)"
        )
    if isinstance(exc, DeliveryError) and not exc.transient:
        drop = f"`e2email outbox drop {ids}` gives it up"
        refused = exc.refused if isinstance(exc, RecipientsRefusedError) else {}
        later = [addr for addr, reply in refused.items() if reply.is_transient]
        if later:
            # Some were refused for now (4xx), others for good (5xx).
            return where + (
                f"`e2email outbox retry` tries {', '.join(later)} again; the permanent "
                f"refusals (5xx) will not change by retrying; {drop})"
            )
        return (
            " (the server refused it permanently (5xx): retrying will not help unless the "
            f"server's policy changes; the protected message is kept in the outbox as {ids} "
            f"until {drop})"
        )
    return where + "`e2email outbox retry` sends it again; do not send it anew)"


def _send(state: State, opts: dict[str, Any], text: str) -> None:
    html = _read_html(opts["html_file"])
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
    protection, passphrase = protection_options(opts)
    smtp = smtp_settings(state, opts) if opts["output"] is None else None
    with Mailer(
        smtp=smtp,
        keystore=state.keystore(),
        protection=protection,
        passphrase=passphrase,
        outbox=outbox_for(state, opts) if smtp is not None else None,
        retry=retry_policy(opts),
    ) as mailer:
        if opts["output"] is not None:
            copies = mailer.protect(message)
            _write_output(opts["output"], copies)
        else:
            try:
                _report(mailer.send(message))
            except KeyboardInterrupt:
                kept = mailer.last_stored
                where = (
                    f": the protected message is kept in the outbox as {', '.join(kept)}; the "
                    "server may have received it already (`e2email outbox list` shows whether "
                    "it is maybe-delivered; `outbox retry` sends what was not, "
                    "`outbox retry --maybe-delivered` also what may have arrived, "
                    "`outbox drop` gives it up)"
                    if kept
                    else ""
                )
                fail(f"interrupted{where}", EXIT_INTERRUPTED)


def retry_policy(opts: dict[str, Any]) -> RetryPolicy:
    account: Account | None = opts.get(ACCOUNT)
    if account is not None and account.retry is not None and not given("retries"):
        return account.retry
    return RetryPolicy(max_attempts=opts["retries"] + 1)


def protection_options(opts: dict[str, Any]) -> tuple[Protection, PasswordSource]:
    """What to do to each message, and where the signing key's passphrase comes from: the
    options, over the chosen account's policy (see :func:`account_settings`)."""
    account: Account | None = opts.get(ACCOUNT)
    passphrase: PasswordSource | None = None
    if account is not None:
        settings = account_settings(account, opts)
        protection, passphrase = settings.protection, settings.passphrase
    else:
        protection = Protection(
            sign=opts["sign"],
            encrypt=opts["encrypt"],
            encrypt_to_self=opts["encrypt_to_self"],
            key_map=_parse_key_map(opts["key_map"]),
            **_smime_protection(opts),
        )
    engine = _engine_protection(opts)
    if engine:
        protection = dataclasses.replace(protection, **engine)
    if opts.get("discover"):
        # Key discovery (issue 10): only OpenPGP keys are looked up.
        protection = dataclasses.replace(protection, discovery=opts["discover"])
    if opts.get("no_autocrypt"):
        protection = dataclasses.replace(protection, autocrypt=False)
    _warn_unprotected(protection)
    passphrase = (
        secret_source(opts["passphrase_env"], opts["passphrase_command"], "signing key passphrase")
        or passphrase
        or prompt_for("signing key passphrase")
    )
    return protection, passphrase


def _engine_protection(opts: dict[str, Any]) -> dict[str, Any]:
    """The OpenPGP engine choice (--engine); refused with --smime, which has one engine."""
    engine = opts.get("engine")
    if engine is None:
        return {}
    if opts.get("smime"):
        raise click.UsageError("--engine chooses an OpenPGP engine: leave it out with --smime")
    return {"engine": OpenPGPEngine(engine)}


def _warn_unprotected(protection: Protection) -> None:
    """Say aloud, as one line on stderr, what an explicit --no-sign or --no-encrypt gives up.

    Encryption is the default and only an explicit --no-encrypt turns it off; a plaintext
    message is readable by every server and mailbox on its way, so it is never silent."""
    if not protection.encrypt and not protection.sign:
        warning = (
            "neither signed nor encrypted (--no-sign --no-encrypt): anyone who handles the "
            "message can read it, and the recipient cannot tell who sent it or whether it was "
            "altered"
        )
    elif not protection.encrypt:
        warning = (
            "NOT encrypted (--no-encrypt): anyone who handles the message can read it (it is "
            "only signed)"
        )
    elif not protection.sign:
        # Unsigned encryption has no integrity: S/MIME's CBC is malleable (EFAIL) and anyone
        # can encrypt to the recipient in the sender's name. An explicit choice, said aloud.
        warning = (
            "encrypted but NOT signed (--no-sign): the recipient cannot tell who sent it or "
            "whether it was altered"
        )
    else:
        return
    click.echo(f"e2email: WARNING: {warning}", err=True)


#: The options of `send` that say how to reach the server (shared with `outbox retry`).
SMTP_OPTION_NAMES = (
    "host",
    "port",
    "tls",
    "insecure_plaintext",
    "user",
    "password_env",
    "password_command",
    "auth",
    "token_env",
    "token_command",
    "require_tls",
    "ca_file",
    "timeout",
    "connect_timeout",
    "data_timeout",
)


def smtp_settings(state: State, opts: dict[str, Any]) -> SMTPSettings:
    """SMTPSettings from the SMTP_OPTION_NAMES options, over the chosen account's server (see
    :func:`account_settings`)."""
    account: Account | None = opts.get(ACCOUNT)
    if account is not None:
        smtp = account_settings(account, opts).smtp
        if smtp.hosts_file is None:
            smtp = replace(smtp, hosts_file=state.home / "hosts.json")
        return smtp
    password, token = _smtp_credentials(opts)
    tls = TLSMode(opts["tls"]) if opts["tls"] else None
    if opts["insecure_plaintext"]:
        if opts["tls"]:
            raise click.UsageError("--insecure-plaintext contradicts --tls")
        tls = TLSMode.INSECURE_PLAINTEXT
        click.echo("e2email: WARNING: sending WITHOUT TLS (--insecure-plaintext)", err=True)
    return SMTPSettings(
        host=opts["host"],
        port=opts["port"],
        tls=tls,
        username=opts["user"],
        password=password,
        oauth_token=token,
        ca_file=opts["ca_file"],
        timeout=opts["timeout"],
        connect_timeout=opts["connect_timeout"],
        data_timeout=opts["data_timeout"],
        require_tls=opts["require_tls"],
        hosts_file=state.home / "hosts.json",
        allow_insecure_plaintext=opts["insecure_plaintext"],
    )


def _write_output(target: Path, copies: Sequence[ProtectedCopy]) -> None:
    if str(target) == "-":
        if len(copies) > 1:
            raise click.UsageError("Bcc makes several copies: --output needs a file name")
        sys.stdout.buffer.write(copies[0].raw)
        return
    for n, copy in enumerate(copies):
        path = target if n == 0 else target.with_name(f"{target.stem}.bcc{n}{target.suffix}")
        # Created 0600 whatever the umask: a signed-only or unencrypted message is plaintext,
        # and even ciphertext names its recipients. A symbolic link is not followed.
        write_private(path, copy.raw)
        who = ", ".join(copy.recipients)
        click.echo(f"wrote {path} ({'To/Cc copy' if copy.kind == 'main' else 'Bcc copy'}: {who})")
