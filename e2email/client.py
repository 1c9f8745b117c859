"""The mailer: compose -> protect -> deliver. An async core and a thin sync facade.

Protection is an engine's work (:class:`e2email.crypto.base.Protector`, chosen by the policy's
scheme): this module never asks which scheme is at work. It happens completely before the
first byte goes to the server, so a key problem for any recipient means nothing is sent (fail
closed). Each Bcc recipient gets a copy of its own, encrypted only to them and the sender, so
no copy reveals a Bcc recipient, not even as a key ID (OpenPGP) or an issuer and serial number
(S/MIME RecipientInfo).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from e2email.config import PasswordSource, Protection, RetryPolicy, SMTPSettings
from e2email.crypto.base import (
    CopyKind,
    Passphrase,
    ProtectedCopy,
    Protector,
    engine_for_copy,
    engine_name,
    protector_for,
)
from e2email.delivery import (
    DeliveryEngine,
    OutboxWriter,
    Submission,
    deliver,
    route_of,
)
from e2email.discovery.net import DiscoverySettings
from e2email.errors import (
    ConfigError,
    DeliveryError,
    E2EmailError,
    ErrorResult,
    HeldError,
    KeyProblem,
    RecipientsRefusedError,
    SMTPReply,
    TransportError,
)
from e2email.keystore import Keystore
from e2email.message import Message
from e2email.outbox import (
    ItemState,
    LedgerTaken,
    NewItem,
    Outbox,
    OutboxError,
    OutboxItem,
    same_route,
)
from e2email.outcome import (
    BatchResult,
    CopyOutcome,
    MessageOutcome,
    MessageStatus,
    RecipientOutcome,
    RecipientStatus,
    deprecated_name,
)
from e2email.transport.smtp import SMTPTransport

if TYPE_CHECKING:
    # Imported when first used (AsyncMailer.certstore): it loads `cryptography`, about 10 MB
    # that OpenPGP never needs.
    from e2email.certstore import CertStore

__all__ = [
    "AsyncMailer",
    "BatchItem",
    "BatchResult",
    "CopyOutcome",
    "CopyResult",
    "Mailer",
    "MessageOutcome",
    "MessageStatus",
    "ProtectedCopy",
    "SendResult",
]


#: Deprecated names, kept for one release: ``send()`` returns a :class:`MessageOutcome` (with
#: ``accepted``, ``refused`` and ``copies``) and each copy's outcome is a :class:`CopyOutcome`
#: (``copy`` and ``delivery`` are still attributes of it). Reading them from outside e2email
#: warns (DeprecationWarning); their old positional forms raise TypeError.
if TYPE_CHECKING:
    SendResult = MessageOutcome
    CopyResult = CopyOutcome
_DEPRECATED = {
    "SendResult": (MessageOutcome, "e2email.outcome.MessageOutcome"),
    "CopyResult": (CopyOutcome, "e2email.outcome.CopyOutcome"),
}


def __getattr__(name: str) -> object:  # PEP 562: the deprecated names above
    return deprecated_name(__name__, name, _DEPRECATED)


@dataclass(frozen=True)
class BatchItem:
    """A message for :meth:`AsyncMailer.send_many`, with what the batch needs to know."""

    message: Message
    #: A stable key for this message in its batch (e.g. a digest of a CSV row). With an
    #: outbox, a message whose key is already done is not sent again, and one whose copies
    #: are still queued is sent from the outbox instead of being protected again.
    key: str | None = None
    #: Anything the caller wants back in the :class:`MessageOutcome` (e.g. a row number).
    tag: Any = None


@dataclass
class _Group:
    """The copies of one batch message, collected until each has its outcome."""

    index: int
    tag: Any
    message_id: str | None
    expected: int
    outcomes: list[CopyOutcome] = field(default_factory=list)
    #: Each copy's kind by its submission's ID (known for the copies protected by this run).
    kinds: dict[str, CopyKind] = field(default_factory=dict)

    def add(self, outcome: CopyOutcome) -> None:
        """Keep ``outcome`` without the copy's bytes: a batch's outcomes stay small."""
        kind = self.kinds.pop(outcome.id, None) if outcome.id is not None else None
        small = outcome.summary()
        self.outcomes.append(replace(small, kind=kind) if kind is not None else small)

    def result(self) -> MessageOutcome:
        return MessageOutcome.of_copies(
            self.outcomes, message_id=self.message_id, index=self.index, tag=self.tag
        )


def _not_sent(index: int, tag: Any, message: Message, exc: E2EmailError) -> MessageOutcome:
    """A message that could not be protected: nothing sent or stored, so every To, Cc and Bcc
    address is ``failed`` for the reason (and in ``unsent``)."""
    why = str(exc)
    return MessageOutcome(
        index=index,
        tag=tag,
        status="not-sent",
        recipients=tuple(
            RecipientOutcome(a, "failed", None, why)
            for a in dict.fromkeys(r.addr_spec for r in message.recipients)
        ),
        error=exc,
        detail=why,
    )


class AsyncMailer:
    """Protects and sends messages. All options are keyword-only.

    ``smtp`` may be None when only :meth:`protect` is used (``e2email send --output``).
    ``passphrase`` unlocks the sender's signing key: a string or a callable, read once, before
    the first attempt; a prompt (a callable marked ``interactive = True``) only when the key
    turns out to need one (:class:`e2email.crypto.Passphrase`).
    ``certstore`` holds the S/MIME certificates (by default the one in the keystore's home).
    ``protector`` is the engine that protects every message (e.g.
    :class:`e2email.testing.MockProtector` in an application's tests); by default the engine
    registered for the policy's scheme (:func:`e2email.crypto.protector_for`).
    """

    def __init__(
        self,
        *,
        smtp: SMTPSettings | None = None,
        keystore: Keystore | None = None,
        protection: Protection | None = None,
        passphrase: PasswordSource | None = None,
        envelope_from: str | None = None,
        certstore: CertStore | None = None,
        outbox: Outbox | str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        connections: int = 4,
        protector: Protector | None = None,
    ) -> None:
        # The outbox is opt-in for the library: a library that quietly writes a database into
        # the user's home surprises servers and tests, and without one nothing is lost either
        # (errors carry the undelivered copies in ``unsent``). The CLI always uses one.
        self._owns_outbox = False
        if outbox is not None and not isinstance(outbox, Outbox):
            outbox = Outbox(outbox)
            self._owns_outbox = True
        self.outbox: Outbox | None = outbox
        self.retry = retry if retry is not None else RetryPolicy()
        if connections < 1:
            raise ConfigError("connections must be at least 1")
        #: How many SMTP connections :meth:`send_many` and :meth:`send_outbox` use at once.
        self.connections = connections
        self.smtp = smtp
        self.keystore = keystore if keystore is not None else Keystore()
        self._certstore = certstore
        self.protection = protection if protection is not None else Protection()
        self.envelope_from = envelope_from
        #: The signing key's passphrase, its source asked at most once.
        self._passphrase = Passphrase(passphrase)
        self._protector = protector
        self._engines: dict[str, Protector] = {}
        self._discovery_settings: DiscoverySettings | None = None
        self._smtp_transport: SMTPTransport | None = None
        #: The outbox IDs the latest :meth:`send_copies` stored: where the message is when
        #: that call was interrupted (Ctrl-C) and so could not say it in an error.
        self.last_stored: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"AsyncMailer(smtp={self.smtp!r}, keystore={self.keystore!r})"

    @property
    def certstore(self) -> CertStore:
        """The S/MIME certificate store: the one given, else the keystore home's, made when
        first asked for (by S/MIME), so OpenPGP never loads ``cryptography`` (about 10 MB)."""
        if self._certstore is None:
            from e2email.certstore import CertStore

            self._certstore = CertStore(self.keystore.home)
        return self._certstore

    @certstore.setter
    def certstore(self, store: CertStore) -> None:
        # Settable, as it was when it was a plain attribute.
        self._certstore = store
        self._engines.clear()  # made again with this store when next needed

    async def protect(
        self, message: Message, *, protection: Protection | None = None
    ) -> tuple[ProtectedCopy, ...]:
        """Sign and/or encrypt ``message``: the copies to submit, nothing sent.

        Raises RecipientKeyError (every recipient without a usable key, with reasons),
        SignerKeyError, PassphraseError or CryptoError; on any of them, nothing is produced.
        """
        prot = protection if protection is not None else self.protection
        msg = message.finalized()
        protector = self.protector_for(prot)
        copies = await self._passphrase.run(
            lambda passphrase: protector.protect(msg, prot, passphrase=passphrase)
        )
        if self.envelope_from is not None:
            copies = tuple(replace(c, mail_from=self.envelope_from) for c in copies)
        return copies

    def protector_for(self, protection: Protection) -> Protector:
        """The engine that protects messages under ``protection``: the one given to this
        mailer (``protector=``), else the registered engine for its scheme, made once."""
        if self._protector is not None:
            return self._protector
        return self._engine(engine_name(protection))

    def engine_named(self, name: str) -> Protector:
        """The registered engine ``name`` (e.g. the one that recognised a stored copy or a
        program's already-protected message), made once per mailer."""
        return self._engine(name)

    def _engine(self, name: str) -> Protector:
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = protector_for(
                name,
                keystore=self.keystore,
                certstore=lambda: self.certstore,
                discovery_settings=self._discovery_settings,
            )
        return engine

    @property
    def discovery_settings(self) -> DiscoverySettings | None:
        """Network settings for key discovery (CA file, timeouts, keyservers, cache TTLs);
        None: the defaults. Discovery runs only when ``Protection.discovery`` is not OFF."""
        return self._discovery_settings

    @discovery_settings.setter
    def discovery_settings(self, settings: DiscoverySettings | None) -> None:
        self._discovery_settings = settings
        self._engines.clear()  # made again with these settings when next needed

    async def send(
        self, message: Message, *, protection: Protection | None = None
    ) -> MessageOutcome:
        """Protect ``message`` and submit every copy over one TLS connection.

        With an outbox, the protected copies are stored before connecting and each is removed
        only once the server accepted it for every recipient. Transient failures (4xx,
        timeouts, dropped connections) are retried as ``retry`` says, only for the recipients
        they concern; permanent ones (5xx) are not.

        Raises before connecting when protection fails. Raises RecipientsRefusedError when the
        server refuses any recipient (its ``result`` says what was accepted), and a
        TransportError subclass when the connection, TLS or authentication fails; such errors
        carry ``unsent``, the protected copies not delivered, so the message is never lost.
        """
        copies = await self.protect(message, protection=protection)
        return await self.send_copies(copies)

    async def send_copies(self, copies: Sequence[ProtectedCopy]) -> MessageOutcome:
        """Submit already protected copies (e.g. kept from an earlier failed attempt).

        Raises RecipientsRefusedError when any recipient is left undelivered after the retries
        (``refused`` has each one's last reply, ``result`` what was accepted), or the
        TransportError that made the server unreachable (TLS, credentials, connection). Either
        carries ``unsent``: the copies, addressed to the undelivered recipients only; with an
        outbox they are also kept there (``result.kept`` has their IDs).
        """
        smtp = self._require_smtp()
        if not copies:
            raise ConfigError("nothing to send")
        # Everything that can fail before a connection (CA file, an unset password variable, a
        # failing password command) fails here, before the copies are stored: an error after
        # storing would leave a copy that a resend plus `outbox retry` delivers twice.
        transport = await self._transport(smtp)
        ids = await self._store(copies, smtp)
        self.last_stored = tuple(i for i in ids if i is not None)
        subs = [
            Submission(
                raw=c.content,
                mail_from=c.mail_from,
                recipients=c.recipients,
                tag=c,
                require_tls=smtp.require_tls,
                **({"id": i} if i is not None else {}),
            )
            for c, i in zip(copies, ids, strict=True)
        ]
        try:
            # One connection carries every copy of one message (RSET between them).
            outcomes, _ = await deliver(
                smtp, subs, retry=self.retry, outbox=self.outbox, transport=transport
            )
        except E2EmailError as exc:
            kept = tuple(i for i in ids if i is not None)
            status: RecipientStatus = "deferred" if kept else "failed"
            attach_unsent(
                exc,
                # Not error=exc: this outcome is exc.result (no reference cycle); every
                # recipient is left, for the reason exc gives.
                MessageOutcome(
                    status=status,
                    message_id=copies[0].message_id,
                    recipients=tuple(
                        RecipientOutcome(a, status, None, str(exc))
                        for c in copies
                        for a in c.recipients
                    ),
                    kept=kept,
                ),
                tuple(
                    replace(c, outbox_id=i) if i is not None else c
                    for c, i in zip(copies, ids, strict=True)
                ),
            )
            raise
        by_id = {o.id: o for o in outcomes}
        return self._send_result(smtp, [by_id[s.id] for s in subs])

    async def _transport(self, smtp: SMTPSettings) -> SMTPTransport:
        """This mailer's transport for ``smtp`` (made once: the password or token it resolves
        is asked or run once per mailer), with non-interactive secrets resolved already."""
        transport = self._smtp_transport
        if transport is None or transport.settings is not smtp:
            transport = self._smtp_transport = SMTPTransport(smtp)
        await transport.prepare()
        return transport

    def _require_smtp(self) -> SMTPSettings:
        if self.smtp is None:
            raise ConfigError("no SMTP server configured")
        return self.smtp

    async def _store(
        self,
        copies: Sequence[ProtectedCopy],
        smtp: SMTPSettings,
        *,
        ledger: Any = None,
        group: OutboxWriter | None = None,
    ) -> Sequence[str | None]:
        """Put ``copies`` in the outbox (claimed by us, about to be sent): their IDs. A copy
        that is kept there already (``outbox_id``) is claimed instead of stored again. With
        ``group``, stored together with other messages' copies (one fsync for all)."""
        outbox = self.outbox
        if outbox is None:
            return [None] * len(copies)
        kept = [c.outbox_id for c in copies if c.outbox_id is not None]
        if kept:
            if len(kept) != len(copies):
                raise ConfigError("send copies kept in the outbox apart from new ones")
            claimed = {i.id for i in await asyncio.to_thread(outbox.claim, kept)}
            busy = [i for i in kept if i not in claimed]
            if busy:
                await asyncio.to_thread(outbox.release, claimed)
                maybe = [
                    i for i in busy if outbox.get(i, raw=False).state is ItemState.MAYBE_DELIVERED
                ]
                if maybe:
                    raise OutboxError(
                        f"outbox item(s) {', '.join(maybe)} may have been delivered already "
                        "(interrupted after the message was sent): not sent again by itself; "
                        "`e2email outbox retry --maybe-delivered` sends them"
                    )
                raise OutboxError(
                    f"outbox item(s) {', '.join(busy)} are being sent by another process"
                )
            return kept
        items = [outbox_item(c, smtp) for c in copies]
        if group is not None:
            return await group.add(items, ledger)
        return await asyncio.to_thread(outbox.add, items, route=route_of(smtp), ledger=ledger)

    @staticmethod
    def _send_result(smtp: SMTPSettings, outcomes: Sequence[CopyOutcome]) -> MessageOutcome:
        """The outcome of one message's copies, or the error saying what is left (with that
        outcome as its ``result``)."""
        # Each copy's outcome as the delivery engine made it, told which copy it was: the
        # recipients' values (the server's replies) are the transport's own, unchanged.
        # The copy replaces the submission (the same bytes, once), and is no longer the tag.
        copy_outcomes = [replace(o, copy=o.tag, submission=None, tag=None) for o in outcomes]
        unsent: list[ProtectedCopy] = []
        refused: list[tuple[str, SMTPReply]] = []
        other: Exception | None = None
        for o in copy_outcomes:
            assert o.copy is not None
            copy = o.copy
            left = [r for r in o.recipients if r.status != "delivered"]
            if not left:
                continue
            unsent.append(
                replace(
                    copy,
                    recipients=tuple(r.address for r in left),
                    outbox_id=o.id if o.kept else None,
                )
            )
            for r in left:
                if r.reply is not None:
                    refused.append((r.address, r.reply))
                elif o.error is not None and not isinstance(o.error, DeliveryError):
                    # No server reply about this recipient: the connection, TLS or
                    # credentials failed; that error says more than a refusal would.
                    other = other or o.error
                else:
                    refused.append((r.address, SMTPReply(0, r.error or "not delivered")))
        result = MessageOutcome.of_copies(copy_outcomes, message_id=outcomes[0].tag.message_id)
        if not unsent:
            return result
        if other is not None:
            # The error carries the outcome, which does not point back to it (no cycle).
            copy_outcomes = [
                replace(o, error=None) if o.error is other else o for o in copy_outcomes
            ]
            result = replace(result, copies=tuple(copy_outcomes), error=None)
            attach_unsent(other, result, tuple(unsent))
            raise other
        error = RecipientsRefusedError(
            refused, host=smtp.host, result=result, accepted=result.accepted
        )
        error.unsent = tuple(unsent)
        raise error

    # -- many messages ---------------------------------------------------------------------

    async def send_many(
        self,
        messages: Iterable[Message | BatchItem] | AsyncIterable[Message | BatchItem],
        *,
        protection: Protection | None = None,
        batch: str = "",
        connections: int | None = None,
        concurrency: int | None = None,
        on_outcome: Callable[[MessageOutcome], None] | None = None,
    ) -> BatchResult:
        """Protect and send many messages: ``connections`` SMTP connections side by side, each
        carrying message after message, while up to ``concurrency`` messages are being
        protected (default: the engine's ``protections_per_cpu`` times the CPUs, at least one
        per connection: twice the CPUs for gpg, a process per message; once for the
        in-process engines, which hold the GIL while they work).

        ``messages`` is read lazily and protected copies wait only in the outbox (when there is
        one) and a short queue, so a batch of any length runs in bounded memory. Each message
        is protected on its own (fail closed per message: a key problem makes that message
        ``not-sent`` and the others go on); the first is protected alone, so a passphrase is
        asked once and gpg-agent is warm before the rest run in parallel.

        Per-message results go to ``on_outcome`` as they come (then ``BatchResult.outcomes``
        is empty) or are collected in the result. A message that is not delivered is no reason
        to raise; an error that stops the whole batch (certificate, credentials, server
        unreachable) is raised after every started message was recorded, with ``result`` set
        to the :class:`BatchResult`. ``batch`` names the batch for the outbox's ledger of
        :attr:`BatchItem.key`.
        """
        smtp = self._require_smtp()
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0
        ):
            # Checked before anything is sent (a negative number made no protecting task:
            # the first message alone was sent, the rest silently never read).
            raise ConfigError(
                f"concurrency must be a whole number (0: the default), not {concurrency!r}"
            )
        prot = protection if protection is not None else self.protection
        counts: Counter[str] = Counter()
        collected: list[MessageOutcome] = []
        groups: dict[int, _Group] = {}

        def emit(outcome: MessageOutcome) -> None:
            counts[outcome.status] += 1
            if on_outcome is not None:
                on_outcome(outcome)
            else:
                collected.append(outcome)

        def copy_done(outcome: CopyOutcome) -> None:
            group = groups[outcome.tag]
            group.add(outcome)
            if len(group.outcomes) == group.expected:
                del groups[group.index]
                emit(group.result())

        # One writer for the stores and the in-flight marks: they share their fsyncs.
        group = OutboxWriter(self.outbox, route_of(smtp)) if self.outbox is not None else None
        engine = DeliveryEngine(
            smtp,
            retry=self.retry,
            connections=connections or self.connections,
            outbox=self.outbox,
            on_outcome=copy_done,
            transport=await self._transport(smtp),
            writer=group,
        )
        per_cpu = self.protector_for(prot).protections_per_cpu
        default = max(per_cpu * (os.cpu_count() or 1), engine.connections)
        protectors = concurrency or default
        #: Keys of this run, with their message's tag: an equal item later in the input is a
        #: duplicate even while the first is still in flight (not yet in the ledger).
        seen: dict[str, Any] = {}
        index = 0
        # A plain iterable is read with next() (nothing to wait for, so no two readers can
        # interleave); an asynchronous one by one reader at a time.
        items = None if isinstance(messages, AsyncIterable) else iter(messages)
        aitems = aiter(messages) if isinstance(messages, AsyncIterable) else None
        reading = asyncio.Lock()
        ended = False

        async def pull() -> tuple[int, Message | BatchItem] | None:
            """The next input item to protect, with its index (None at the end of the input
            or once the run stopped). A duplicate key is reported here, in input order. The
            input's first end is its end: an iterator that would give more afterwards (a file
            being appended to) is not read past it."""
            nonlocal index, ended
            while not engine.stopped and not ended:
                item: Message | BatchItem | object
                if items is not None:
                    item = next(items, _END)
                else:
                    assert aitems is not None
                    async with reading:
                        item = await anext(aitems, _END)
                        if engine.stopped:
                            return None  # read, but the run stopped meanwhile
                if item is _END:
                    ended = True
                    return None
                item = cast("Message | BatchItem", item)
                at = index
                index += 1
                if isinstance(item, BatchItem) and item.key is not None:
                    if item.key in seen:
                        emit(
                            MessageOutcome(
                                index=at,
                                tag=item.tag,
                                status="duplicate",
                                detail="same key as an earlier message of this batch",
                                duplicate_of=seen[item.key],
                            )
                        )
                        continue
                    seen[item.key] = item.tag
                return at, item
            return None

        #: The first error of this side of the run (the input, the outcome callback, the
        #: outbox refusing a store): raised once the transactions under way have ended.
        failures: list[Exception] = []

        async def step() -> bool:
            """Read and protect (and store, and hand over) the next message; False at the
            end of the input, once the run stopped, or after a failure."""
            if failures:
                return False
            try:
                got = await pull()
                if got is None:
                    return False
                await self._batch_one(
                    engine, smtp, got[0], got[1], prot, batch, groups, emit, copy_done, group
                )
            except Exception as exc:
                # As the engine does when the callback fails for a copy it sent: stop, and
                # let the transactions under way end (cancelling them would cut copies off
                # after their end of data, leaving them maybe-delivered).
                if not failures:
                    failures.append(exc)
                engine.stop(E2EmailError(f"sending stopped: {exc!r}"))
                return False
            return True

        async def protector() -> None:
            # Message after message: one task per protection in flight for the whole run,
            # not one per message (a task, a semaphore hand-off and a wake-up of the reading
            # loop per message cost the event loop turns, each a chance for the protecting
            # threads to take the GIL from it).
            while await step():
                pass

        tasks: list[asyncio.Task[None]] = []
        async with engine:
            try:
                # The first alone: a passphrase asked once, gpg-agent warm, before the rest
                # run in parallel.
                if await step():
                    tasks = [asyncio.create_task(protector()) for _ in range(protectors)]
                    await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        if failures:
            raise failures[0]
        result = BatchResult(
            counts=dict(counts),
            outcomes=tuple(collected),
            connections=engine.connections_opened,
            stopped_by=engine.fatal,
        )
        if engine.fatal is not None:
            if isinstance(engine.fatal, TransportError):
                engine.fatal.result = result
            raise engine.fatal
        return result

    async def _batch_one(
        self,
        engine: DeliveryEngine,
        smtp: SMTPSettings,
        index: int,
        item: Message | BatchItem,
        prot: Protection,
        batch: str,
        groups: dict[int, _Group],
        emit: Callable[[MessageOutcome], None],
        copy_done: Callable[[CopyOutcome], None],
        group: OutboxWriter | None = None,
    ) -> None:
        entry = item if isinstance(item, BatchItem) else BatchItem(message=item)
        outbox = self.outbox
        if entry.key is not None and outbox is not None:
            state = await asyncio.to_thread(outbox.ledger_state, entry.key)
            if state == "done":
                emit(
                    MessageOutcome(
                        index=index,
                        tag=entry.tag,
                        status="skipped",
                        detail="sent by an earlier run",
                    )
                )
                return
            if state == "queued":
                # Protected and stored by an earlier run that did not finish: send those
                # very copies (protecting again would make a second, different message).
                stored = await asyncio.to_thread(outbox.claim, ledger_keys=[entry.key])
                if not stored:
                    maybe = [
                        it.id
                        for it in await asyncio.to_thread(outbox.items, ledger_key=entry.key)
                        if it.state is ItemState.MAYBE_DELIVERED
                    ]
                    if maybe:
                        emit(
                            MessageOutcome(
                                index=index,
                                tag=entry.tag,
                                status="maybe-delivered",
                                kept=tuple(maybe),
                                detail="an earlier run was interrupted after sending it, "
                                "so the server may have it; not sent again by itself "
                                "(`e2email outbox retry --maybe-delivered` sends it)",
                            )
                        )
                        return
                    emit(
                        MessageOutcome(
                            index=index,
                            tag=entry.tag,
                            status="skipped",
                            detail="in the outbox, being sent by another process",
                        )
                    )
                    return
                groups[index] = _Group(index, entry.tag, stored[0].message_id, len(stored))
                await self._submit_stored(engine, stored, copy_done, tag=lambda _: index)
                return
        try:
            copies = await self.protect(entry.message, protection=prot)
        except E2EmailError as exc:
            # Fail closed for this message only; nothing of it is sent or stored.
            emit(_not_sent(index, entry.tag, entry.message, exc))
            return
        ledger = (batch, entry.key) if entry.key is not None else None
        try:
            ids = await self._store(copies, smtp, ledger=ledger, group=group)
        except LedgerTaken as exc:
            # Another run stored or sent this row since the check above.
            detail = (
                "sent by another run"
                if exc.state == "done"
                else "in the outbox, being sent by another process"
            )
            emit(MessageOutcome(index=index, tag=entry.tag, status="skipped", detail=detail))
            return
        groups[index] = one = _Group(index, entry.tag, copies[0].message_id, len(copies))
        handed: set[str] = set()
        try:
            for copy, item_id in zip(copies, ids, strict=True):
                sub = Submission(
                    raw=copy.content,
                    mail_from=copy.mail_from,
                    recipients=copy.recipients,
                    tag=index,
                    require_tls=smtp.require_tls,
                )
                sub = replace(sub, id=item_id) if item_id is not None else sub
                one.kinds[sub.id] = copy.kind
                handed.add(sub.id)  # the engine answers for it from here (even if cancelled)
                await engine.submit(sub)
        except BaseException:
            # Stopped (cancelled) between storing the copies and handing them all over: the
            # ones the engine never got are given back to the outbox's queue now, or they
            # would stay claimed by this process (no send_outbox of it would take them).
            left = [i for i in ids if i is not None and i not in handed]
            if left and outbox is not None:
                with contextlib.suppress(Exception):
                    outbox.release(left)
            raise

    async def send_outbox(
        self,
        ids: Sequence[str] | None = None,
        *,
        all_routes: bool = False,
        connections: int | None = None,
        on_outcome: Callable[[CopyOutcome], None] | None = None,
        include_failed: bool = True,
        due_only: bool = False,
        maybe_delivered: bool = False,
    ) -> tuple[CopyOutcome, ...]:
        """Send what waits in the outbox: the items ``ids`` (IDs or unique prefixes), or every
        item meant for this server and user (any server with ``all_routes``). Items the
        server refused before are tried again too (by default); items another live process
        is sending are left to it. ``include_failed=False`` leaves the recipients the server
        refused (5xx) alone; ``due_only`` takes only items whose retry time has come;
        ``maybe_delivered`` also sends the items the server may have already (interrupted after
        their end of data: a second copy may arrive), left alone otherwise. Outcomes go to
        ``on_outcome`` as they come (and are returned when no callback is given). An error
        that stops the run is raised after the outcomes, with ``result`` set to them.
        """
        smtp = self._require_smtp()
        outbox = self.outbox
        if outbox is None:
            raise ConfigError("no outbox configured")
        if ids is not None:
            wanted = [outbox.get(i, raw=False).id for i in ids]
        else:
            route = route_of(smtp)
            items = await asyncio.to_thread(outbox.items)
            wanted = [it.id for it in items if all_routes or same_route(it.route, route)]
        collected: list[CopyOutcome] = []
        report = on_outcome or collected.append
        engine = DeliveryEngine(
            smtp,
            retry=self.retry,
            connections=connections or self.connections,
            outbox=outbox,
            on_outcome=report,
            transport=await self._transport(smtp),
        )
        async with engine:
            for item_id in wanted:
                if engine.stopped:
                    break
                # Claimed one at a time, just before it is queued: only a few items' bytes
                # are in memory at once.
                claimed = await asyncio.to_thread(
                    outbox.claim,
                    [item_id],
                    include_failed=include_failed,
                    due_only=due_only,
                    maybe_delivered=maybe_delivered,
                )
                await self._submit_stored(engine, claimed, report, tag=lambda it: it)
        if engine.fatal is not None:
            if isinstance(engine.fatal, TransportError):
                engine.fatal.result = tuple(collected)
            raise engine.fatal
        return tuple(collected)

    def recheck_keys(self, item: OutboxItem) -> tuple[KeyProblem, ...]:
        """Why the queued copy ``item`` must not be sent now: each key it was encrypted to
        that is no longer fit (revoked, expired, disabled, gone from the keystore) since it
        was queued. Empty: send it. The engine that made the copy judges its keys
        (:meth:`~e2email.crypto.base.Protector.recheck`). Blocking."""
        fingerprints = [str(f) for f in item.meta.get("encrypted_to") or ()]
        if not fingerprints:
            return ()
        name = engine_for_copy(item.meta.get("scheme"), item.content)
        engine = self._protector
        if engine is None or engine.name != name:
            engine = self._engine(name)
        return tuple(engine.recheck(fingerprints))

    async def _submit_stored(
        self,
        engine: DeliveryEngine,
        items: Sequence[OutboxItem],
        report: Callable[[CopyOutcome], None],
        *,
        tag: Callable[[OutboxItem], Any],
    ) -> None:
        """Hand copies stored earlier (claimed) to ``engine``, each after its keys are
        checked again (they may have been revoked since): a copy whose keys no longer fit is
        held instead (:meth:`_hold`)."""
        for it in items:
            problems = await asyncio.to_thread(self.recheck_keys, it)
            if problems:
                self._hold(it, problems, report, tag=tag(it))
                continue
            await engine.submit(_stored_submission(it, tag=tag(it)))

    def _hold(
        self,
        item: OutboxItem,
        problems: Sequence[KeyProblem],
        report: Callable[[CopyOutcome], None],
        *,
        tag: Any,
    ) -> None:
        """Do not send ``item`` (claimed): it is encrypted to a key no longer fit. It goes
        back to the outbox with the reason, and is reported deferred with that reason (the
        outcome's ``tag`` is ``tag``)."""
        assert self.outbox is not None
        error = HeldError(problems)
        self.outbox.release([item.id], error=str(error))
        report(
            CopyOutcome(
                id=item.id,
                tag=tag,
                mail_from=item.mail_from,
                recipients=tuple(
                    RecipientOutcome(a, "deferred", None, str(error)) for a in item.pending
                ),
                attempts=0,
                error=error,
                kept=True,
            )
        )

    def close(self) -> None:
        """Close the outbox if this mailer opened it (from a path)."""
        if self._owns_outbox and self.outbox is not None:
            self.outbox.close()

    # -- accounts (e2email.accounts): keep at the end of the class -------------------------

    @staticmethod
    def _account_options(
        account: Any,
        *,
        config: os.PathLike[str] | str | None,
        outbox: bool,
        passphrase: PasswordSource | None,
    ) -> tuple[dict[str, Any], str]:
        """The constructor's arguments for a configured account, and the account's name."""
        from dataclasses import replace as _replace
        from pathlib import Path

        from e2email.accounts import Account, load_config
        from e2email.config import default_home
        from e2email.outbox import DEFAULT_FILENAME
        from e2email.private import ensure_private_dir

        if not isinstance(account, Account):
            account = load_config(Path(config) if config is not None else None).account(account)
        home = ensure_private_dir(account.home or default_home(), what="the e2email home")
        smtp = account.smtp
        if smtp.hosts_file is None:
            smtp = _replace(smtp, hosts_file=home / "hosts.json")
        options: dict[str, Any] = {
            "smtp": smtp,
            "keystore": Keystore(home, gnupg_home=account.gnupg_home),
            "protection": account.protection,
            "passphrase": passphrase if passphrase is not None else account.passphrase,
            "outbox": (account.outbox or home / DEFAULT_FILENAME) if outbox else None,
        }
        if account.retry is not None:
            options["retry"] = account.retry
        return options, account.name

    @classmethod
    def from_account(
        cls,
        account: Any = None,
        *,
        config: os.PathLike[str] | str | None = None,
        outbox: bool = True,
        passphrase: PasswordSource | None = None,
    ) -> AsyncMailer:
        """A mailer for a configured account (:mod:`e2email.accounts`): an
        :class:`~e2email.accounts.Account`, an account name, or None for the default one
        (read from ``config``, else ``$E2EMAIL_CONFIG``, else the default file). Its server,
        policy, key map, keystore and certificates (its ``home``, ``gnupg-home``) and its
        outbox (``outbox``, else HOME/outbox.sqlite3; none with ``outbox=False``), which
        records the account's name with each message so ``e2email outbox retry`` finds the
        server again. ``passphrase`` overrides the account's passphrase source."""
        options, name = cls._account_options(
            account, config=config, outbox=outbox, passphrase=passphrase
        )
        mailer = cls(**options)
        if mailer.outbox is not None:
            mailer.outbox.account = name
        return mailer


def outbox_item(
    copy: ProtectedCopy, smtp: SMTPSettings, *, meta: Mapping[str, Any] | None = None
) -> NewItem:
    """What the outbox keeps of a protected copy meant for ``smtp``: the bytes, the envelope
    and what a retry needs (``meta`` adds to it); never a secret."""
    return NewItem(
        raw=copy.content,
        mail_from=copy.mail_from,
        recipients=copy.recipients,
        message_id=copy.message_id,
        kind=copy.kind,
        meta={
            "signed": copy.signed,
            # Re-checked before every retry (recheck_keys): a key revoked since the copy was
            # queued holds it.
            "encrypted_to": list(copy.encrypted_to),
            "scheme": copy.scheme,
            "signer": copy.signer,
            # A retry must ask for REQUIRETLS too (RFC 8689): it is part of the message's
            # protection, not of the run that first tried to send it.
            "require_tls": smtp.require_tls,
            **(meta or {}),
        },
    )


def _stored_submission(item: OutboxItem, *, tag: Any) -> Submission:
    """A claimed outbox copy, to its recipients still pending. REQUIRETLS as the copy was
    first sent with: asked then -> asked now; otherwise as the current settings say."""
    assert item.content is not None
    return Submission(
        raw=item.content,
        mail_from=item.mail_from,
        recipients=item.pending,
        id=item.id,
        tag=tag,
        require_tls=True if item.meta.get("require_tls") else None,
    )


def attach_unsent(
    error: BaseException, result: ErrorResult, unsent: tuple[ProtectedCopy, ...]
) -> None:
    """Give ``error`` what is left to send (``result``, with ``kept`` outbox IDs, and
    ``unsent``), whatever its class: every error after the copies were stored says where
    they are, so the caller never resends what a later ``outbox retry`` would send again."""
    if isinstance(error, E2EmailError):
        error.result = result
        error.unsent = unsent
    else:  # e.g. CancelledError or KeyboardInterrupt on the way out
        vars(error).update(result=result, unsent=unsent)


#: The end of send_many's input.
_END = object()


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
        certstore: CertStore | None = None,
        outbox: Outbox | str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        connections: int = 4,
        protector: Protector | None = None,
    ) -> None:
        self._async = AsyncMailer(
            smtp=smtp,
            keystore=keystore,
            protection=protection,
            passphrase=passphrase,
            envelope_from=envelope_from,
            certstore=certstore,
            outbox=outbox,
            retry=retry,
            connections=connections,
            protector=protector,
        )
        self._runner = asyncio.Runner()

    @property
    def keystore(self) -> Keystore:
        return self._async.keystore

    @property
    def certstore(self) -> CertStore:
        return self._async.certstore

    def protect(
        self, message: Message, *, protection: Protection | None = None
    ) -> tuple[ProtectedCopy, ...]:
        return self._runner.run(self._async.protect(message, protection=protection))

    def send(self, message: Message, *, protection: Protection | None = None) -> MessageOutcome:
        return self._runner.run(self._async.send(message, protection=protection))

    def send_copies(self, copies: Sequence[ProtectedCopy]) -> MessageOutcome:
        return self._runner.run(self._async.send_copies(copies))

    @property
    def outbox(self) -> Outbox | None:
        return self._async.outbox

    @property
    def last_stored(self) -> tuple[str, ...]:
        return self._async.last_stored

    def send_many(
        self,
        messages: Iterable[Message | BatchItem],
        *,
        protection: Protection | None = None,
        batch: str = "",
        connections: int | None = None,
        concurrency: int | None = None,
        on_outcome: Callable[[MessageOutcome], None] | None = None,
    ) -> BatchResult:
        return self._runner.run(
            self._async.send_many(
                messages,
                protection=protection,
                batch=batch,
                connections=connections,
                concurrency=concurrency,
                on_outcome=on_outcome,
            )
        )

    def send_outbox(
        self,
        ids: Sequence[str] | None = None,
        *,
        all_routes: bool = False,
        connections: int | None = None,
        on_outcome: Callable[[CopyOutcome], None] | None = None,
        include_failed: bool = True,
        due_only: bool = False,
        maybe_delivered: bool = False,
    ) -> tuple[CopyOutcome, ...]:
        return self._runner.run(
            self._async.send_outbox(
                ids,
                all_routes=all_routes,
                connections=connections,
                on_outcome=on_outcome,
                include_failed=include_failed,
                due_only=due_only,
                maybe_delivered=maybe_delivered,
            )
        )

    def close(self) -> None:
        self._runner.close()
        self._async.close()

    def __enter__(self) -> Mailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- accounts (e2email.accounts): keep at the end of the class -------------------------

    @classmethod
    def from_account(
        cls,
        account: Any = None,
        *,
        config: os.PathLike[str] | str | None = None,
        outbox: bool = True,
        passphrase: PasswordSource | None = None,
    ) -> Mailer:
        """The synchronous :meth:`AsyncMailer.from_account`."""
        options, name = AsyncMailer._account_options(
            account, config=config, outbox=outbox, passphrase=passphrase
        )
        mailer = cls(**options)
        if mailer.outbox is not None:
            mailer.outbox.account = name
        return mailer
