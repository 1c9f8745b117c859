"""Messages made by other programs (sendmail callers, Django, an SMTP relay), protected and
sent: the one entry point every integration uses.

A program hands over a complete RFC 5322 message. Its own MIME body becomes the protected
payload as it is (:meth:`Message.from_bytes`); its headers are protected per RFC 9788 as
:meth:`AsyncMailer.send` does. A message the program protected itself (PGP/MIME or S/MIME) is
not wrapped again: it is sent as it is when it is encrypted to every recipient's key, and
refused otherwise when the policy asks for encryption (fail closed).
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import replace
from email.utils import format_datetime

from e2email.client import AsyncMailer, Mailer, MessageOutcome, ProtectedCopy
from e2email.config import Protection
from e2email.crypto.base import engine_for_kind
from e2email.errors import KeyProblem, MessageError
from e2email.message import (
    Address,
    Message,
    ProtectionKind,
    check_wire_safe,
    existing_protection,
    render_header,
    split_message,
)

__all__ = ["protect", "recipients_without_keys", "submit", "submit_sync"]


async def submit(
    mailer: AsyncMailer,
    raw: bytes,
    *,
    envelope_from: str | None = None,
    recipients: Sequence[str] | None = None,
    protection: Protection | None = None,
) -> MessageOutcome:
    """Protect and send one message made by another program.

    ``recipients`` is the envelope (sendmail's command line): exactly these addresses get the
    message; one that is not in To or Cc gets a copy of its own, as a Bcc recipient. None
    means the To, Cc and Bcc headers (``sendmail -t``). The Bcc header is never sent.
    ``envelope_from`` is the SMTP MAIL FROM (``sendmail -f``); it also fills a missing From.
    Missing Date and Message-ID are added.

    Raises what :meth:`AsyncMailer.send` raises (RecipientKeyError, TransportError, ... with
    ``result`` and ``unsent``), and MessageError for a malformed message or one that is
    already signed but not encrypted when the policy is to encrypt.
    """
    copies = await protect(
        mailer, raw, envelope_from=envelope_from, recipients=recipients, protection=protection
    )
    return await mailer.send_copies(copies)


async def protect(
    mailer: AsyncMailer,
    raw: bytes,
    *,
    envelope_from: str | None = None,
    recipients: Sequence[str] | None = None,
    protection: Protection | None = None,
) -> tuple[ProtectedCopy, ...]:
    """What :func:`submit` sends, nothing sent: the protected copies, each with its envelope
    (e.g. for a relay that stores them before it answers, then sends them with
    :meth:`AsyncMailer.send_copies`). Same arguments and errors as :func:`submit`, without
    the transport ones."""
    prot = protection if protection is not None else mailer.protection
    data = bytes(raw)
    mail_from = _envelope_from(envelope_from)
    given = _given_recipients(recipients)
    kind = existing_protection(data)
    if kind is not None:
        copy = await asyncio.to_thread(_pass_through, mailer, data, kind, prot, mail_from, given)
        return (copy,)
    message = Message.from_bytes(data, sender=mail_from or mailer.envelope_from, envelope=given)
    copies = await mailer.protect(message, protection=prot)
    return tuple(_to_envelope(copies, given, mail_from))


def submit_sync(
    mailer: Mailer,
    raw: bytes,
    *,
    envelope_from: str | None = None,
    recipients: Sequence[str] | None = None,
    protection: Protection | None = None,
) -> MessageOutcome:
    """:func:`submit` for the synchronous :class:`Mailer` (same arguments, same errors)."""
    # The facade's own event loop runs the async core, as every Mailer method does.
    return mailer._runner.run(
        submit(
            mailer._async,
            raw,
            envelope_from=envelope_from,
            recipients=recipients,
            protection=protection,
        )
    )


def recipients_without_keys(
    mailer: AsyncMailer | Mailer,
    addresses: Iterable[str],
    *,
    protection: Protection | None = None,
) -> dict[str, str]:
    """Which of ``addresses`` could not be encrypted to, and why (each address as given ->
    reason), found
    the way sending finds keys: the keystore (OpenPGP) or certificate store (S/MIME) and the
    policy's key map. Empty when the policy does not encrypt. For a relay to refuse a
    recipient at RCPT already. Blocking (it runs gpg): use ``asyncio.to_thread`` in async code.
    """
    core = mailer._async if isinstance(mailer, Mailer) else mailer
    prot = protection if protection is not None else core.protection
    if not prot.encrypt:
        return {}
    missing: dict[str, str] = {}
    given: dict[str, str] = {}  # normalised address -> as the caller wrote it
    for text in addresses:
        try:
            given.setdefault(Address(text.strip()).addr_spec.lower(), text)
        except MessageError as exc:
            missing[text] = f"invalid address ({exc.reason})"
    for problem in _key_problems(core, list(given), prot):
        reason = problem.reason.value + (f" ({problem.detail})" if problem.detail else "")
        missing[given.get(problem.address.lower(), problem.address)] = reason
    return missing


def _key_problems(core: AsyncMailer, addresses: list[str], prot: Protection) -> list[KeyProblem]:
    # The engine that would protect the message judges its keys: no scheme is named here.
    return core.protector_for(prot).missing_keys(addresses, prot)


def _envelope_from(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    try:
        return Address(value.strip()).addr_spec
    except MessageError as exc:
        raise MessageError(exc.reason, field="envelope sender") from None


def _given_recipients(recipients: Sequence[str] | None) -> tuple[Address, ...] | None:
    if recipients is None:
        return None
    if isinstance(recipients, str):
        recipients = [recipients]
    given: dict[str, Address] = {}
    for text in recipients:
        try:
            address = Address.parse(text)
        except MessageError as exc:
            raise MessageError(exc.reason, field="recipients") from None
        given.setdefault(address.addr_spec.lower(), address)
    if not given:
        raise MessageError("no recipients given", field="recipients")
    return tuple(given.values())


def _to_envelope(
    copies: Sequence[ProtectedCopy], given: tuple[Address, ...] | None, mail_from: str | None
) -> list[ProtectedCopy]:
    """Each copy addressed only to envelope recipients (an address the header names but the
    caller did not give is not sent to, as with sendmail), from ``mail_from`` when given."""
    wanted = None if given is None else {a.addr_spec.lower() for a in given}
    out: list[ProtectedCopy] = []
    for copy in copies:
        rcpts = copy.recipients
        if wanted is not None:
            rcpts = tuple(r for r in rcpts if r.lower() in wanted)
        if not rcpts:
            continue
        out.append(replace(copy, recipients=rcpts, mail_from=mail_from or copy.mail_from))
    return out


def _pass_through(
    mailer: AsyncMailer,
    data: bytes,
    kind: ProtectionKind,
    prot: Protection,
    mail_from: str | None,
    given: tuple[Address, ...] | None,
) -> ProtectedCopy:
    """A message the calling program signed or encrypted itself, as one copy to send as it
    is: refused when the policy encrypts and it is not encrypted to every recipient's key.

    What is inside the encryption (a signature, its protected headers) cannot be checked
    without a recipient's key: the program that encrypted answers for it. It is one copy for
    every envelope recipient, as the program made it: its session-key packets name all of
    their keys, Bcc recipients' too (the program chose that)."""
    fields, body = split_message(data)
    head = b"".join(f.raw for f in fields)
    header_rcpts: list[str] = []
    author: str | None = None
    for item in fields:
        if item.lower in ("to", "cc", "bcc"):
            header_rcpts += [a for _, a in item.addresses() if a]
        elif item.lower == "from":
            found = [a for _, a in item.addresses() if "@" in a]
            author = found[0] if found else None
    if given is not None:
        rcpts = [a.addr_spec for a in given]
    else:
        rcpts = []
        for text in header_rcpts:
            try:
                rcpts.append(Address(text).addr_spec)
            except MessageError as exc:
                raise MessageError(exc.reason, field="recipients") from None
        rcpts = list({r.lower(): r for r in rcpts}.values())
    if not rcpts:
        raise MessageError("at least one recipient (To, Cc or Bcc) is needed", field="to")
    scheme = "PGP/MIME" if kind.startswith("pgp") else "S/MIME"
    encrypted_to: tuple[str, ...] = ()
    if kind.endswith("-signed"):
        if prot.encrypt:
            raise MessageError(
                f"the message is already {scheme} signed but not encrypted, and the policy "
                "is to encrypt; a signed message is not wrapped again: let the program "
                "encrypt it too, or send it with a sign-only policy",
                field="message",
            )
    elif prot.encrypt:
        encrypted_to = _check_encrypted_to(mailer, kind, prot, rcpts, head, body)

    sender = author or mail_from or mailer.envelope_from
    if sender is None:
        raise MessageError("no From header and no envelope sender", field="from")
    names = {f.lower for f in fields}
    added: list[bytes] = []
    if "date" not in names:
        now = datetime.datetime.now().astimezone().replace(microsecond=0)
        added.append(render_header("Date", format_datetime(now)))
    if "from" not in names:
        added.append(render_header("From", Address(sender).header_form()))
    message_id = None
    for item in fields:
        if item.lower == "message-id":
            message_id = item.value().strip().strip("<>").strip()
    if message_id is None:
        message_id = f"{secrets.token_hex(16)}@{Address(sender).domain}"
        added.append(render_header("Message-ID", f"<{message_id}>"))
    # The outer header of a PGP/MIME or S/MIME message is not covered by its protection:
    # dropping Bcc (never sent) and adding fields leaves the protected body untouched.
    kept = [f.raw for f in fields if f.lower not in ("bcc", "return-path")]
    out = b"".join([*added, *kept, b"\r\n", body])
    check_wire_safe(out)
    return ProtectedCopy(
        raw=out,
        mail_from=mail_from or mailer.envelope_from or sender,
        recipients=tuple(rcpts),
        kind="main",
        message_id=message_id,
        signed=kind.endswith("-signed"),
        encrypted_to=encrypted_to,
    )


def _check_encrypted_to(
    mailer: AsyncMailer,
    kind: ProtectionKind,
    prot: Protection,
    rcpts: list[str],
    head: bytes,
    body: bytes,
) -> tuple[str, ...]:
    """Every recipient's key among those the message is encrypted to: the fingerprints.
    Raises RecipientKeyError naming each recipient without a key or not encrypted to. The
    engine that reads the message's kind of protection (its parsed Content-Type) judges it."""
    engine = mailer.engine_named(engine_for_kind(kind))
    return engine.check_encrypted(head, body, [r.lower() for r in rcpts], prot)
