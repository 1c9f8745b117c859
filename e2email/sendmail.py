"""``e2email-sendmail``: a sendmail-compatible command that protects what it is given.

Programs that send mail by running ``sendmail`` (git send-email, mutt and neomutt, PHP's
``mail()``, cron, logwatch, smartd) can run this instead, unchanged: it reads one RFC 5322
message on standard input, signs and encrypts it as ``e2email send`` does (the message's own
MIME body becomes the protected payload as it is), stores it in the outbox and submits it over
verified TLS.

The command line is msmtp's (itself sendmail's), parsed by hand: sendmail's flags (``-oi``,
``-oem``, ``-FCronDaemon``, ``-B8BITMIME``, grouped ``-ti``) follow getopt rules, not those of
an option library. Flags that mean nothing here are accepted and ignored as msmtp does;
anything else is a usage error (exit 64), never silently dropped.

Exit statuses are sendmail's (``sysexits.h``), because callers act on them (Postfix's pipe
bounces on anything it does not know; mutt and git show the failure): see :func:`exit_code_for`.

The input is read to its end: a line holding a lone ``.`` is part of the message, with or
without ``-i``/``-oi``, as msmtp does (sendmail, Postfix and Exim end the input there unless
``-i`` is given). The callers decide it: mutt and neomutt pass ``-oem -oi`` only in their
default ``sendmail`` setting, and call the command a user sets (``set
sendmail="e2email-sendmail"``, as msmtp's documentation has it) with nothing but ``--`` and
the recipients, so sendmail's rule would silently cut a mail body at its first lone dot. A
stray dot line kept is visible; a message cut short and signed as such is not.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from e2email.accounts import ConfigFileError, load_config
from e2email.client import AsyncMailer, MessageOutcome
from e2email.config import (
    HOME_ENV,
    Protection,
    RetryPolicy,
    SMTPSettings,
    TLSMode,
    default_home,
    password_from_command,
)
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CryptoError,
    DeliveryError,
    E2EmailError,
    KeyErrorBase,
    KeystoreError,
    MessageError,
    PassphraseError,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPReply,
    TLSError,
    TransportError,
)
from e2email.inbound import submit
from e2email.keystore import Keystore
from e2email.message import split_message
from e2email.outbox import Outbox
from e2email.private import ensure_private_dir, write_private

__all__ = [
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOHOST",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_PROTOCOL",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "Invocation",
    "SendmailError",
    "exit_code_for",
    "main",
    "parse_args",
    "prepare",
    "read_message",
    "run",
    "send_message",
]

PROG = "e2email-sendmail"

# sysexits.h (the values sendmail and msmtp return; callers act on them).
EX_OK = 0
EX_USAGE = 64  # the command line was wrong
EX_DATAERR = 65  # the message is malformed
EX_NOINPUT = 66  # no message on standard input
EX_NOUSER = 67  # a recipient cannot be mailed: no usable key, or not an address
EX_NOHOST = 68  # the server's name does not resolve
EX_UNAVAILABLE = 69  # the server refused permanently (5xx)
EX_SOFTWARE = 70  # an internal error (a bug) or the crypto backend failed
EX_TEMPFAIL = 75  # not delivered now; kept in the outbox for `e2email outbox retry`
EX_PROTOCOL = 76  # TLS could not be established safely
EX_NOPERM = 77  # authentication failed (or the signing key's passphrase)
EX_CONFIG = 78  # the settings cannot work

USAGE = f"""\
usage: {PROG} [options] [--] recipient...
       {PROG} [options] -t [--] [recipient...]

Reads one RFC 5322 message on standard input, signs and encrypts it for every recipient
(nothing is sent if any recipient lacks a usable key), stores it in the outbox and submits it
over verified TLS.

  -t, --read-recipients   also send to the To, Cc and Bcc of the message
  -f ADDR, -r ADDR, --from=ADDR
                          envelope sender; also picks the account whose `from` matches
  --read-envelope-from    the envelope sender is the message's From address
  -F NAME                 the sender's name, for a From field added when there is none
  --account=NAME, -a NAME the account to use (default: the config's default account)
  --config=FILE, -C FILE  the accounts file (env E2EMAIL_CONFIG)
  --host=HOST --port=N --tls-starttls=on|off --tls-trust-file=FILE --user=USER
  --passwordeval=CMD --timeout=SECONDS
                          server settings without an accounts file (as msmtp's)
  --home=DIR              e2email's home (keys, outbox; env E2EMAIL_HOME)
  --gnupg-home=DIR        an existing GnuPG home for OpenPGP keys
Accepted and ignored: -i, -oi (the input is always read to its end, a lone "." included),
-oX..., -B TYPE, -bm, -G, -h N, -L TAG, -m, -n, -O OPT, -A X, -N X, -R X, -X FILE, -v.

Exit status (sysexits.h): 0 sent; 64 usage; 65 malformed message; 66 no input; 67 a recipient
has no usable key (nothing sent; the message is kept in HOME/drafts); 68 server name unknown;
69 server refused permanently; 70 internal error; 75 not sent yet, queued in the outbox
(`e2email outbox retry`); 76 TLS failure; 77 authentication failed or required; 78 configuration
error.
"""


class SendmailError(E2EmailError):
    """A failure with its sysexits code, found before anything reaches e2email's library
    (command line, standard input, recipients)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _usage(message: str) -> SendmailError:
    return SendmailError(f"{message} (see `{PROG} --help`)", EX_USAGE)


@dataclass(frozen=True, kw_only=True)
class Invocation:
    """What the command line asked for."""

    recipients: tuple[str, ...] = ()
    #: ``-t``: also the To, Cc and Bcc of the message.
    read_recipients: bool = False
    #: ``-f`` / ``-r`` / ``--from``.
    envelope_from: str | None = None
    read_envelope_from: bool = False
    #: ``-F``: the sender's name for a From field that has to be added.
    full_name: str | None = None
    account: str | None = None
    config: Path | None = None
    home: Path | None = None
    gnupg_home: Path | None = None
    # Server settings on the command line (msmtp's names), instead of an account.
    host: str | None = None
    port: int | None = None
    tls: TLSMode | None = None
    ca_file: Path | None = None
    user: str | None = None
    passwordeval: str | None = field(default=None, repr=False)
    timeout: float | None = None
    help: bool = False
    version: bool = False


# Short options as getopt sees them: those taking an argument (attached, "-FCronDaemon", or
# the next word, "-F CronDaemon"), and those that take none and may be grouped ("-ti").
_SHORT_WITH_ARG = frozenset("fFrCaoBbhLOAXNR")
_SHORT_FLAGS = frozenset("tiGmnv")
#: Long options and whether each takes a value ("--x=v" or "--x v").
_LONG: dict[str, bool] = {
    "account": True,
    "config": True,
    "file": True,
    "from": True,
    "read-envelope-from": False,
    "read-recipients": False,
    "home": True,
    "gnupg-home": True,
    "host": True,
    "port": True,
    "tls": False,
    "tls-starttls": False,
    "tls-trust-file": True,
    "user": True,
    "passwordeval": True,
    "timeout": True,
    "help": False,
    "version": False,
}
#: Long options whose value is optional and only given as "--x=v" (getopt's
#: optional_argument), as msmtp's --tls and --tls-starttls.
_LONG_OPTIONAL = frozenset({"tls", "tls-starttls"})


def _no_control(value: str, what: str) -> str:
    # argv can hold a line break: "-F $'x\nBcc: y'" must not become a header of its own.
    if any(c in value for c in "\r\n\0"):
        raise _usage(f"{what} must be one line")
    return value


def _on_off(name: str, value: str | None) -> bool:
    if value is None or value == "on":
        return True
    if value == "off":
        return False
    raise _usage(f"--{name} takes on or off, not {value!r}")


def parse_args(argv: Sequence[str]) -> Invocation:
    """Parse a sendmail command line (without the program name) as getopt would, with msmtp's
    set of options. Raises :class:`SendmailError` (exit 64) for anything unknown."""
    opts: dict[str, Any] = {}
    recipients: list[str] = []
    args = list(argv)
    i = 0

    def take_value(option: str, attached: str) -> str:
        nonlocal i
        if attached:
            return attached
        if i + 1 >= len(args):
            raise _usage(f"option {option} needs a value")
        i += 1
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "--":
            recipients.extend(args[i + 1 :])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in _LONG:
                raise _usage(f"unknown option --{name}")
            if name in _LONG_OPTIONAL:
                _long_option(opts, name, value if eq else None)
            elif _LONG[name]:
                _long_option(opts, name, value if eq else take_value(f"--{name}", ""))
            elif eq:
                raise _usage(f"option --{name} takes no value")
            else:
                _long_option(opts, name, None)
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                if letter in _SHORT_FLAGS:
                    _short_option(opts, letter, None)
                    j += 1
                    continue
                if letter in _SHORT_WITH_ARG:
                    _short_option(opts, letter, take_value(f"-{letter}", arg[j + 1 :]))
                    break
                raise _usage(f"unknown option -{letter}")
        else:
            # getopt on GNU permutes: options may follow recipients (msmtp accepts
            # "msmtp bob@example.net -f alice@example.org").
            recipients.append(arg)
        i += 1
    if opts.get("read_envelope_from") and opts.get("envelope_from") is not None:
        raise _usage("give either -f/--from or --read-envelope-from")
    if opts.get("host") is not None and (
        opts.get("account") is not None or opts.get("config") is not None
    ):
        # As msmtp: an account and command-line server settings would contradict each other.
        raise _usage("--host names the server itself: give it or --account/--config, not both")
    for recipient in recipients:
        _no_control(recipient, "a recipient")
    return Invocation(recipients=tuple(recipients), **opts)


def _short_option(opts: dict[str, Any], letter: str, value: str | None) -> None:
    if letter == "t":
        opts["read_recipients"] = True
    elif letter in "fr":
        _set_from(opts, value)
    elif letter == "F":
        opts["full_name"] = _no_control(value or "", "-F NAME")
    elif letter == "b":
        # Only -bm ("deliver mail", the default mode) is a mode we have; -bs, -bp, -bt...
        # are refused rather than read as a message.
        if value != "m":
            raise _usage(f"mode -b{value} is not supported (only -bm)")
    elif letter == "C":
        opts["config"] = Path(value or "")
    elif letter == "a":
        opts["account"] = value
    # Accepted and ignored, as by msmtp: i (see read_message), o (-oXvalue sets sendmail
    # option X: -oi, -oem, -odi, -oQ...), B (body type), G, h (hop count), L (syslog tag),
    # m, n, O, A, X (log file), N and R (DSN, which e2email does not request), v.


def _set_from(opts: dict[str, Any], value: str | None) -> None:
    address = _no_control((value or "").strip(), "-f ADDRESS")
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        # The null sender ("-f <>") is for bounces, which carry no signature of ours.
        raise _usage("-f needs an address: the null sender <> cannot sign a message")
    opts["envelope_from"] = address


def _long_option(opts: dict[str, Any], name: str, value: str | None) -> None:
    if name == "from":
        _set_from(opts, value)
    elif name == "read-envelope-from":
        opts["read_envelope_from"] = True
    elif name == "read-recipients":
        opts["read_recipients"] = True
    elif name == "account":
        opts["account"] = value
    elif name in ("config", "file"):
        opts["config"] = Path(value or "")
    elif name in ("home", "gnupg-home", "tls-trust-file"):
        key = {"home": "home", "gnupg-home": "gnupg_home", "tls-trust-file": "ca_file"}[name]
        opts[key] = Path(value or "")
    elif name in ("host", "user", "passwordeval"):
        opts[name] = _no_control(value or "", f"--{name}")
    elif name == "port":
        try:
            opts["port"] = int(value or "")
        except ValueError:
            raise _usage(f"--port takes a number, not {value!r}") from None
        if not 0 < opts["port"] < 65536:
            raise _usage(f"--port {value} is out of range (1-65535)")
    elif name == "timeout":
        try:
            opts["timeout"] = float(value or "")
        except ValueError:
            raise _usage(f"--timeout takes seconds, not {value!r}") from None
        if opts["timeout"] < 1:
            raise _usage("--timeout must be at least 1 second")
    elif name == "tls":
        if not _on_off(name, value):
            raise SendmailError("--tls=off: e2email never sends without TLS", EX_CONFIG)
    elif name == "tls-starttls":
        # msmtp's pair: --tls-starttls=on is STARTTLS (required), off is implicit TLS.
        opts["tls"] = TLSMode.STARTTLS if _on_off(name, value) else TLSMode.IMPLICIT
    elif name in ("help", "version"):
        opts[name] = True


# -- Standard input -------------------------------------------------------------------------


def read_message(stream: IO[bytes]) -> bytes:
    """The message on ``stream``, read to its end (a lone ``.`` line is content: see the
    module's docstring). A leading mbox ``From `` line is dropped. Raises
    :class:`SendmailError` (66) when there is nothing, 65 when there are only blank lines."""
    try:
        data = stream.read()
    except OSError as exc:
        raise SendmailError(f"cannot read the message: {exc.strerror or exc}", EX_NOINPUT) from exc
    if data.startswith(b"From "):
        # The mbox separator some callers leave in (RFC 4155); it is not a header field.
        _, _, data = data.partition(b"\n")
    if not data:
        raise SendmailError("no message on standard input", EX_NOINPUT)
    if not data.strip():
        # Input, but no header field at all: a malformed message, not a missing one.
        raise SendmailError("the message is only blank lines: it has no header", EX_DATAERR)
    return data


# -- Recipients, envelope sender, From ------------------------------------------------------


class _Header:
    """The message's header fields, read with e2email.message's parser (MessageError, exit
    65, for what is not a message)."""

    def __init__(self, raw: bytes) -> None:
        self.fields, self.body = split_message(raw)

    def values(self, *names: str) -> list[str]:
        return [f.value() for f in self.fields if f.lower in names]

    def addresses(self, *names: str) -> list[tuple[str, str]]:
        return [a for f in self.fields if f.lower in names for a in f.addresses()]

    def with_from(self, value: str) -> bytes:
        """The message (CRLF) with its From fields replaced by ``From: value`` at the top."""
        kept = b"".join(f.raw for f in self.fields if f.lower != "from")
        return f"From: {value}\r\n".encode() + kept + b"\r\n" + self.body


def _qualified(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain)


def _dedupe(addresses: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for addr in addresses:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(addr)
    return out


@dataclass(frozen=True)
class _Prepared:
    raw: bytes
    envelope_from: str | None
    recipients: tuple[str, ...]


def _recipients(invocation: Invocation, head: _Header) -> tuple[str, ...]:
    """The envelope recipients: the command line's and (``-t``) the header's To, Cc and Bcc.
    SendmailError for none (64, or 65 with -t) and for a local user name (67)."""
    recipients: list[str] = []
    for arg in invocation.recipients:
        # One argument may hold a list ("a@x, Bob <b@y>"), as msmtp reads them.
        found = [addr for _, addr in email.utils.getaddresses([arg]) if addr]
        if not found:
            raise SendmailError(f"{arg!r} is not an email address", EX_NOUSER)
        recipients.extend(found)
    if invocation.read_recipients:
        if head.values("resent-to", "resent-cc", "resent-bcc"):
            # Which Resent- block counts (RFC 5322 §3.6.6) is easy to get wrong, and a wrong
            # guess mails someone the sender did not mean: refused, not guessed.
            raise SendmailError(
                "-t with Resent- fields is not supported: name the recipients on the command "
                "line instead",
                EX_DATAERR,
            )
        recipients.extend(addr for _, addr in head.addresses("to", "cc", "bcc"))
    recipients = _dedupe(recipients)
    if not recipients:
        if invocation.read_recipients:
            raise SendmailError("-t: the message names no recipients (To, Cc, Bcc)", EX_DATAERR)
        raise _usage("no recipients: name them on the command line, or give -t")
    unqualified = [r for r in recipients if not _qualified(r)]
    if unqualified:
        # "cron ... -oem root": a local user has no key, and there is no local delivery here.
        raise SendmailError(
            f"not sent: {', '.join(unqualified)}: not a full email address (a local user name "
            "cannot be encrypted to; set MAILTO or the alias to an address)",
            EX_NOUSER,
        )
    return tuple(recipients)


def prepare(invocation: Invocation, raw: bytes, *, sender: str | None = None) -> _Prepared:
    """The message as it is submitted: recipients from the command line and (``-t``) its
    header, the envelope sender, and a From field when it lacks a usable one. ``sender`` is
    the account's own address, used when neither ``-f`` nor the message names one."""
    head = _Header(raw)
    envelope_from = invocation.envelope_from
    from_fields = head.addresses("from")
    if invocation.read_envelope_from:
        if not from_fields:
            raise SendmailError("--read-envelope-from: the message has no From address", EX_DATAERR)
        envelope_from = from_fields[0][1]

    recipients = _recipients(invocation, head)
    own = envelope_from or sender
    if not from_fields or not _qualified(from_fields[0][1]):
        # No From, or a local user name as cron writes it ("From: root (Cron Daemon)"): the
        # signer must be a real address with a key, so it is the sender's own, with -F's
        # name (or the name the field gave) as its display name.
        if own is None:
            shown = "no From field" if not from_fields else f"From {from_fields[0][1]!r}"
            raise SendmailError(
                f"{shown} and no sender address: give -f ADDRESS or an account with `from`",
                EX_DATAERR,
            )
        name = invocation.full_name
        if name is None and from_fields:
            name = from_fields[0][0] or _comment_name(head.values("from")[0])
        raw = head.with_from(email.utils.formataddr((name or "", own), charset="utf-8"))
    return _Prepared(raw=raw, envelope_from=envelope_from, recipients=recipients)


def _comment_name(value: str) -> str:
    # "root (Cron Daemon)": the old comment form of a display name (RFC 5322 §3.4 obs).
    start, end = value.find("("), value.rfind(")")
    return value[start + 1 : end].strip() if 0 <= start < end else ""


# -- Exit statuses --------------------------------------------------------------------------


def _name_not_found(error: BaseException) -> bool | None:
    """Whether the server's name did not resolve: True when it does not exist, False when the
    lookup failed for now (EAI_AGAIN: offline, resolver down), None when no lookup failed."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror):
            return exc.errno != socket.EAI_AGAIN
        stack.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return None


def _asks_for_auth(reply: SMTPReply | None) -> bool:
    """Is ``reply`` "authentication required"? 530 (RFC 4954 section 6: "530 5.7.0
    Authentication required"), or another 5xx with enhanced status 5.7.0 that says so. A bare
    5.7.0 is any security or policy refusal (a spam filter's "554 5.7.0 Reject"): not that."""
    if reply is None or not 500 <= reply.code < 600:
        return False
    if reply.code == 530:
        return True
    return reply.text.startswith("5.7.0") and "auth" in reply.text.casefold()


def _auth_required(error: TransportError) -> bool:
    """The server wants AUTH first (at MAIL, or at RCPT for every recipient refused): no
    credentials were configured, so a permission problem (77), not a refusal (69)."""
    if isinstance(error, RecipientsRefusedError):
        replies = list(error.refused.values())
        return bool(replies) and all(_asks_for_auth(r) for r in replies)
    return isinstance(error, DeliveryError) and _asks_for_auth(error.reply)


def exit_code_for(error: BaseException) -> int:
    """The sysexits.h status for ``error``, as sendmail's callers read it.

    ====  ===================================================================================
    65    MessageError: the message is malformed
    67    RecipientKeyError: a recipient has no usable key (nothing sent)
    68    the SMTP server's name does not exist
    69    the server refused permanently (5xx), or some other permanent transport failure
    70    CryptoError (the backend failed) or an internal error
    75    anything transient (4xx, timeout, refused or dropped connection, a name lookup that
          failed for now): the protected message is kept in the outbox for a retry
    76    TLSError: no verified TLS
    77    AuthenticationError, the server requires AUTH and none was configured (530 or
          5.7.0 "authentication required" at MAIL or RCPT), or the signing key's
          passphrase missing or wrong
    78    ConfigError, or the sender's own key missing (SignerKeyError, KeystoreError)
    ====  ===================================================================================
    """
    if isinstance(error, SendmailError):
        return error.code
    if isinstance(error, RecipientKeyError):
        return EX_NOUSER
    if isinstance(error, PassphraseError):
        return EX_NOPERM
    if isinstance(error, SignerKeyError | KeystoreError):
        return EX_CONFIG
    if isinstance(error, KeyErrorBase):
        return EX_NOUSER
    if isinstance(error, MessageError):
        return EX_DATAERR
    if isinstance(error, ConfigError):
        return EX_CONFIG
    if isinstance(error, CryptoError):
        return EX_SOFTWARE
    if isinstance(error, TransportError):
        not_found = _name_not_found(error)
        if not_found:
            return EX_NOHOST
        if error.transient or not_found is False:
            return EX_TEMPFAIL
        if isinstance(error, TLSError):
            return EX_PROTOCOL
        if isinstance(error, AuthenticationError):
            return EX_NOPERM
        if _auth_required(error):
            return EX_NOPERM
        if isinstance(error, DeliveryError | ConnectError):
            return EX_UNAVAILABLE
        return EX_UNAVAILABLE
    return EX_SOFTWARE


# -- Sending --------------------------------------------------------------------------------


async def send_message(
    mailer: AsyncMailer, invocation: Invocation, raw: bytes, *, sender: str | None = None
) -> MessageOutcome:
    """Protect and submit the message ``raw`` as ``invocation`` says, through ``mailer``."""
    prepared = prepare(invocation, raw, sender=sender)
    return await submit(
        mailer,
        prepared.raw,
        envelope_from=prepared.envelope_from,
        recipients=prepared.recipients,
    )


#: One attempt, then the outbox: a sendmail caller (mutt, git, cron) waits for us, and
#: `e2email outbox retry` (or a timer running it) is the queue, as msmtpq is msmtp's.
_RETRY = RetryPolicy(max_attempts=1)


def _mailer_from_options(invocation: Invocation) -> AsyncMailer:
    """A mailer from the server settings on the command line (msmtp's --host etc.)."""
    assert invocation.host is not None
    home = ensure_private_dir(invocation.home or default_home(), what="the e2email home")
    password = (
        password_from_command(invocation.passwordeval, what="SMTP password")
        if invocation.passwordeval
        else None
    )
    smtp = SMTPSettings(
        host=invocation.host,
        port=invocation.port,
        tls=invocation.tls,
        username=invocation.user,
        password=password,
        ca_file=invocation.ca_file,
        hosts_file=home / "hosts.json",
        timeout=invocation.timeout if invocation.timeout is not None else 60.0,
    )
    keystore = Keystore(home, gnupg_home=invocation.gnupg_home)
    return AsyncMailer(
        smtp=smtp,
        keystore=keystore,
        protection=Protection(),
        outbox=Outbox.in_home(home),
        retry=_RETRY,
    )


def _mailer_from_account(invocation: Invocation) -> tuple[AsyncMailer, str | None]:
    """A mailer from an account of the accounts file, and the account's own address:
    ``--account``, else the account whose ``from`` matches ``-f`` (or, failing that, the
    default account: msmtp's rule, :meth:`Config.for_sender`), else the default account.
    ``--home`` (or ``E2EMAIL_HOME``) and ``--gnupg-home`` win over the account's, as in the
    other commands."""
    config = load_config(invocation.config)
    if invocation.account is None and invocation.envelope_from is not None:
        account = config.for_sender(invocation.envelope_from)
    else:
        account = config.account(invocation.account)
    home = invocation.home or (Path(os.environ[HOME_ENV]) if os.environ.get(HOME_ENV) else None)
    if home is not None:
        account = replace(account, home=home)
    if invocation.gnupg_home is not None:
        account = replace(account, gnupg_home=invocation.gnupg_home)
    mailer = AsyncMailer.from_account(account, config=invocation.config, outbox=True)
    if account.retry is None:
        # Retries the account asks for are its own choice; otherwise one attempt.
        mailer.retry = _RETRY
    return mailer, account.sender


def _save_draft(home: Path, raw: bytes) -> Path:
    """Keep a message that was not sent (nor stored in the outbox) in HOME/drafts, 0600."""
    folder = ensure_private_dir(home / "drafts", what="the drafts folder")
    path = folder / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.eml"
    write_private(path, raw)
    return path


def _kept(error: BaseException) -> tuple[str, ...]:
    kept = getattr(getattr(error, "result", None), "kept", None)
    return tuple(kept) if isinstance(kept, tuple | list) else ()


class _WarningLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: WARNING: {' '.join(record.getMessage().split())}"


def _log_warnings_to_stderr() -> None:
    logger = logging.getLogger("e2email")
    if not any(getattr(h, "_e2email_sendmail", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(_WarningLine())
        handler._e2email_sendmail = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def _say(message: str) -> None:
    # One line, whatever the message holds: callers show the first line only.
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def run(
    argv: Sequence[str],
    *,
    stdin: IO[bytes] | None = None,
    mailer_factory: Callable[[Invocation], tuple[AsyncMailer, str | None]] | None = None,
) -> int:
    """Run the command with ``argv`` (without the program name); its exit status.

    ``mailer_factory`` makes the mailer (and gives the account's own address) from the
    invocation; by default from the command-line server settings or the accounts file."""
    try:
        invocation = parse_args(argv)
    except SendmailError as exc:
        _say(f"error: {exc}")
        return exc.code
    if invocation.help:
        print(USAGE, end="")
        return EX_OK
    if invocation.version:
        from importlib.metadata import version

        print(f"{PROG} (e2email) {version('e2email')}")
        return EX_OK

    raw: bytes | None = None
    home = invocation.home or default_home()
    mailer: AsyncMailer | None = None
    try:
        if stdin is None:
            # Started with standard input closed (sys.stdin is then None): nothing to read.
            if sys.stdin is None:
                raise SendmailError("no standard input to read the message from", EX_NOINPUT)
            stdin = sys.stdin.buffer
        raw = read_message(stdin)
        # What the message and the command line say is checked before any setting is read:
        # a usage or data error is reported as such, not as a missing configuration.
        head = _Header(raw)
        _recipients(invocation, head)
        if invocation.read_envelope_from:
            # The From address picks the account, as -f does (msmtp's rule).
            found = head.addresses("from")
            if found:
                invocation = replace(invocation, envelope_from=found[0][1])
        if mailer_factory is not None:
            mailer, sender = mailer_factory(invocation)
        elif invocation.host is not None:
            mailer, sender = _mailer_from_options(invocation), None
        else:
            mailer, sender = _mailer_from_account(invocation)
        home = mailer.keystore.home
        asyncio.run(send_message(mailer, invocation, raw, sender=sender))
        return EX_OK
    except E2EmailError as exc:
        code = exit_code_for(exc)
        kept = _kept(exc)
        if kept:
            extra = _outbox_note(code, kept)
        elif raw is not None and code != EX_NOINPUT:
            extra = _draft_note(home, raw)
        else:
            extra = ""
        if isinstance(exc, ConfigFileError):
            # One line per mistake in the accounts file, each with its file and line.
            for problem in exc.problems[:-1]:
                _say(f"error: {problem}")
            _say(f"error: {exc.problems[-1]}{extra}")
        else:
            _say(f"error: {exc}{extra}")
        return code
    except KeyboardInterrupt:
        stored = mailer.last_stored if mailer is not None else ()
        if stored:
            _say(
                f"interrupted: the protected message is in the outbox as {', '.join(stored)}; "
                "the server may have received it already (`e2email outbox list`)"
            )
            return EX_TEMPFAIL
        _say(f"interrupted{_draft_note(home, raw) if raw else ''}")
        return 130
    except Exception as exc:
        # A bug. One line, as every other failure; the traceback on request.
        if os.environ.get("E2EMAIL_DEBUG") == "1":
            traceback.print_exc()
        extra = _draft_note(home, raw) if raw else ""
        _say(
            f"internal error: {type(exc).__name__}: {exc}{extra} (a bug: please report it; "
            "E2EMAIL_DEBUG=1 shows the traceback)"
        )
        return EX_SOFTWARE
    finally:
        if mailer is not None:
            mailer.close()


def _outbox_note(code: int, kept: Sequence[str]) -> str:
    """Where the protected message waits, and what to do, in parentheses after the error."""
    ids = ", ".join(kept)
    drop = f"`e2email outbox drop {ids}` gives it up"
    if code == EX_TEMPFAIL:
        what = "queued: `e2email outbox retry` sends it"
    elif code == EX_UNAVAILABLE:
        # Asking again does not undo a 5xx unless the server's policy changes.
        what = f"the refusal is permanent, retrying will not help; {drop}"
    else:
        what = f"`e2email outbox retry` sends it once the problem is fixed; {drop}"
    return f" (the protected message is in the outbox as {ids}: {what})"


def _draft_note(home: Path, raw: bytes) -> str:
    try:
        return f" (the message is saved in {_save_draft(home, raw)})"
    except (E2EmailError, OSError) as exc:
        return f" (the message could not be saved: {exc})"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script ``e2email-sendmail``."""
    _log_warnings_to_stderr()
    sys.exit(run(sys.argv[1:] if argv is None else argv))
