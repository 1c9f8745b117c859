"""The mailer: compose -> protect -> send. An async core and a thin sync facade.

Protection happens completely before the first byte goes to the server, so a key problem for any
recipient means nothing is sent (fail closed). Each Bcc recipient gets a copy of its own,
encrypted only to them and the sender, so no copy reveals a Bcc recipient, not even as a key ID.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Literal

from e2email.config import PasswordSource, Protection, Scheme, SMTPSettings
from e2email.crypto import openpgp
from e2email.errors import (
    ConfigError,
    KeyProblem,
    PassphraseError,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPReply,
    TransportError,
)
from e2email.keystore import Keystore, OpenPGPKey
from e2email.message import HP, Address, Message, build_message, build_payload
from e2email.transport.smtp import DeliveryResult, SMTPTransport

__all__ = ["AsyncMailer", "CopyResult", "Mailer", "ProtectedCopy", "SendResult"]


@dataclass(frozen=True)
class ProtectedCopy:
    """One copy of a message, ready to submit: the exact bytes and its envelope."""

    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]
    #: "main" carries To and Cc (and, when not encrypting, Bcc in the envelope only);
    #: "bcc" is the separate copy for one Bcc recipient.
    kind: Literal["main", "bcc"]
    message_id: str
    signed: bool
    #: Fingerprints of the keys this copy is encrypted to (empty when not encrypted).
    encrypted_to: tuple[str, ...] = ()
    #: Fingerprint of the signing key.
    signer: str | None = None


@dataclass(frozen=True)
class CopyResult:
    copy: ProtectedCopy
    delivery: DeliveryResult


@dataclass(frozen=True)
class SendResult:
    """What happened to each copy of one message."""

    message_id: str
    copies: tuple[CopyResult, ...]

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(a for c in self.copies for a in c.delivery.accepted)

    @property
    def refused(self) -> dict[str, SMTPReply | None]:
        return {r.address: r.reply for c in self.copies for r in c.delivery.refused}


class AsyncMailer:
    """Protects and sends messages. All options are keyword-only.

    ``smtp`` may be None when only :meth:`protect` is used (``e2email send --output``).
    ``passphrase`` unlocks the sender's signing key: a string or a callable asked once.
    """

    def __init__(
        self,
        *,
        smtp: SMTPSettings | None = None,
        keystore: Keystore | None = None,
        protection: Protection | None = None,
        passphrase: PasswordSource | None = None,
        envelope_from: str | None = None,
    ) -> None:
        self.smtp = smtp
        self.keystore = keystore if keystore is not None else Keystore()
        self.protection = protection if protection is not None else Protection()
        self.envelope_from = envelope_from
        self._passphrase_source = passphrase
        self._passphrase: str | None = None

    def __repr__(self) -> str:
        return f"AsyncMailer(smtp={self.smtp!r}, keystore={self.keystore!r})"

    async def protect(
        self, message: Message, *, protection: Protection | None = None
    ) -> tuple[ProtectedCopy, ...]:
        """Sign and/or encrypt ``message``: the copies to submit, nothing sent.

        Raises RecipientKeyError (every recipient without a usable key, with reasons),
        SignerKeyError, PassphraseError or CryptoError; on any of them, nothing is produced.
        """
        prot = protection if protection is not None else self.protection
        if prot.scheme is not Scheme.OPENPGP:
            raise ConfigError(f"the {prot.scheme.value} scheme is not available in this version")
        msg = message.finalized()
        try:
            return await self._protect(msg, prot, self._passphrase)
        except PassphraseError as exc:
            # The passphrase source (maybe a prompt) is asked only when gpg says the key needs
            # one, so unprotected keys and a warm gpg-agent never trigger it.
            if not exc.missing or self._passphrase_source is None or self._passphrase is not None:
                raise
            source = self._passphrase_source
            self._passphrase = await asyncio.to_thread(
                lambda: source if isinstance(source, str) else source()
            )
            return await self._protect(msg, prot, self._passphrase)

    async def _protect(
        self, msg: Message, prot: Protection, passphrase: str | None
    ) -> tuple[ProtectedCopy, ...]:
        assert msg.message_id is not None
        mail_from = self.envelope_from or msg.sender.addr_spec

        if not prot.sign and not prot.encrypt:
            raw = build_message(msg, payload=build_payload(msg, hp=None), hp=None)
            return (self._copy(raw, mail_from, msg.recipients, "main", msg, signed=False),)

        signer, recipient_keys, self_key = await asyncio.to_thread(self._resolve_keys, msg, prot)

        if not prot.encrypt:
            assert signer is not None
            payload = build_payload(msg, hp=HP.CLEAR)
            entity, _ = await asyncio.to_thread(
                openpgp.sign, self.keystore, payload, signer=signer, passphrase=passphrase
            )
            raw = build_message(msg, payload=entity, hp=HP.CLEAR)
            copy = self._copy(raw, mail_from, msg.recipients, "main", msg, signed=True)
            return (replace(copy, signer=signer.fingerprint),)

        payload = build_payload(msg, hp=HP.CIPHER)
        plans: list[tuple[Literal["main", "bcc"], tuple[Address, ...]]] = []
        if msg.to or msg.cc:
            plans.append(("main", (*msg.to, *msg.cc)))
        plans.extend(("bcc", (b,)) for b in msg.bcc)

        async def one(kind: Literal["main", "bcc"], rcpts: tuple[Address, ...]) -> ProtectedCopy:
            keys = [recipient_keys[a.addr_spec.lower()] for a in rcpts]
            if self_key is not None:
                keys.append(self_key)
            unique = list({k.fingerprint: k for k in keys}.values())
            entity = await asyncio.to_thread(
                openpgp.encrypt,
                self.keystore,
                payload,
                recipients=unique,
                signer=signer,
                passphrase=passphrase,
            )
            raw = build_message(msg, payload=entity, hp=HP.CIPHER)
            copy = self._copy(raw, mail_from, rcpts, kind, msg, signed=signer is not None)
            return replace(
                copy,
                encrypted_to=tuple(k.fingerprint for k in unique),
                signer=signer.fingerprint if signer else None,
            )

        # gpg work is a subprocess per copy: run the copies side by side.
        return tuple(await asyncio.gather(*(one(kind, rcpts) for kind, rcpts in plans)))

    @staticmethod
    def _copy(
        raw: bytes,
        mail_from: str,
        rcpts: Sequence[Address],
        kind: Literal["main", "bcc"],
        msg: Message,
        *,
        signed: bool,
    ) -> ProtectedCopy:
        assert msg.message_id is not None
        return ProtectedCopy(
            raw=raw,
            mail_from=mail_from,
            recipients=tuple(a.addr_spec for a in rcpts),
            kind=kind,
            message_id=msg.message_id,
            signed=signed,
        )

    def _resolve_keys(
        self, msg: Message, prot: Protection
    ) -> tuple[OpenPGPKey | None, dict[str, OpenPGPKey], OpenPGPKey | None]:
        """Find every key, or raise listing every address that has none (fail closed)."""
        signer: OpenPGPKey | None = None
        sender = msg.sender.addr_spec
        if prot.sign:
            choice = self.keystore.signing_key(sender, key_map=prot.key_map)
            if isinstance(choice, KeyProblem):
                raise SignerKeyError(choice)
            signer = choice
        recipient_keys: dict[str, OpenPGPKey] = {}
        self_key: OpenPGPKey | None = None
        if prot.encrypt:
            addresses = list(dict.fromkeys(a.addr_spec.lower() for a in msg.recipients))
            recipient_keys, problems = self.keystore.resolve_recipients(
                addresses, key_map=prot.key_map
            )
            if prot.encrypt_to_self:
                own = self.keystore.encryption_key(sender, key_map=prot.key_map)
                if isinstance(own, KeyProblem):
                    problems.append(
                        KeyProblem(
                            own.address,
                            own.reason,
                            "sender, for encrypt-to-self; turn it off to send without a "
                            "readable sent copy" + (f"; {own.detail}" if own.detail else ""),
                            fingerprint=own.fingerprint,
                        )
                    )
                else:
                    self_key = own
            if problems:
                raise RecipientKeyError(problems)
        return signer, recipient_keys, self_key

    async def send(self, message: Message, *, protection: Protection | None = None) -> SendResult:
        """Protect ``message`` and submit every copy over one TLS connection.

        Raises before connecting when protection fails. Raises RecipientsRefusedError when the
        server refuses any recipient (its ``result`` says what was accepted), and a
        TransportError subclass when the connection, TLS or authentication fails; such errors
        carry ``unsent``, the protected copies not delivered, so the message is never lost.
        """
        copies = await self.protect(message, protection=protection)
        return await self.send_copies(copies)

    async def send_copies(self, copies: Sequence[ProtectedCopy]) -> SendResult:
        """Submit already protected copies (e.g. kept from an earlier failed attempt)."""
        if self.smtp is None:
            raise ConfigError("no SMTP server configured")
        if not copies:
            raise ConfigError("nothing to send")
        transport = SMTPTransport(self.smtp)
        done: list[CopyResult] = []
        message_id = copies[0].message_id
        try:
            async with transport.connect() as conn:
                for copy in copies:
                    try:
                        delivery = await conn.send(
                            copy.raw, mail_from=copy.mail_from, recipients=copy.recipients
                        )
                    except RecipientsRefusedError as exc:
                        if not isinstance(exc.result, DeliveryResult):
                            raise
                        delivery = exc.result
                    done.append(CopyResult(copy=copy, delivery=delivery))
        except TransportError as exc:
            sent = {id(c.copy) for c in done}
            exc.result = SendResult(message_id=message_id, copies=tuple(done))
            exc.unsent = tuple(c for c in copies if id(c) not in sent)
            raise
        result = SendResult(message_id=message_id, copies=tuple(done))
        refused = [
            (r.address, r.reply or SMTPReply(0, "refused"))
            for c in done
            for r in c.delivery.refused
        ]
        if refused:
            error = RecipientsRefusedError(
                refused, host=self.smtp.host, result=result, accepted=result.accepted
            )
            # Keep what was refused, addressed only to the refused recipients, for a retry.
            error.unsent = tuple(
                replace(c.copy, recipients=tuple(r.address for r in c.delivery.refused))
                for c in done
                if c.delivery.refused
            )
            raise error
        return result


class Mailer:
    """The synchronous facade: the same names and arguments as :class:`AsyncMailer`.

    Runs the async core on a private event loop; use it as a context manager or call
    :meth:`close`. Do not call it from inside a running event loop: use AsyncMailer there.
    """

    def __init__(
        self,
        *,
        smtp: SMTPSettings | None = None,
        keystore: Keystore | None = None,
        protection: Protection | None = None,
        passphrase: PasswordSource | None = None,
        envelope_from: str | None = None,
    ) -> None:
        self._async = AsyncMailer(
            smtp=smtp,
            keystore=keystore,
            protection=protection,
            passphrase=passphrase,
            envelope_from=envelope_from,
        )
        self._runner = asyncio.Runner()

    @property
    def keystore(self) -> Keystore:
        return self._async.keystore

    def protect(
        self, message: Message, *, protection: Protection | None = None
    ) -> tuple[ProtectedCopy, ...]:
        return self._runner.run(self._async.protect(message, protection=protection))

    def send(self, message: Message, *, protection: Protection | None = None) -> SendResult:
        return self._runner.run(self._async.send(message, protection=protection))

    def send_copies(self, copies: Sequence[ProtectedCopy]) -> SendResult:
        return self._runner.run(self._async.send_copies(copies))

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> Mailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
