"""What happened to a message: one value per recipient, per copy and per message.

The transport makes a :class:`RecipientOutcome` for every envelope recipient of a transaction
(a refused RCPT is ``failed`` or ``deferred`` by its reply's class, RFC 5321 §4.2.1, with the
server's exact reply) and a :class:`CopyOutcome` for the transaction. The delivery engine
merges a copy's attempts into one :class:`CopyOutcome` (keeping the transport's recipient
values for what is final), and the mailer returns one :class:`MessageOutcome` per message from
:meth:`~e2email.AsyncMailer.send` and :meth:`~e2email.AsyncMailer.send_many` alike; errors
raised after a partial send carry it as ``result``. The CLI, the Django backend, Celery, the
relay and the logging handler all read these.

It sits between the crypto interface and the transport: at run time it imports only
:mod:`e2email.errors` and :mod:`e2email.crypto.base` (for :class:`ProtectedCopy` and
:data:`CopyKind`, so ``typing.get_type_hints()`` resolves every field), and :mod:`e2email.errors`
names it for type checkers only.

Outcomes hold no message bytes but ``send()``'s :attr:`CopyOutcome.copy` (the old
``CopyResult.copy``): a batch's outcomes are small whatever the messages' size.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Literal, get_args

from e2email.crypto.base import CopyKind, ProtectedCopy
from e2email.errors import E2EmailError, SMTPReply

__all__ = [
    "BatchResult",
    "CopyKind",
    "CopyOutcome",
    "MessageOutcome",
    "MessageStatus",
    "RecipientOutcome",
    "RecipientStatus",
    "TLSInfo",
]

#: ``delivered``: the server accepted the copy for this recipient; ``failed``: refused for
#: good (5xx) or not deliverable; ``deferred``: not delivered yet (a 4xx, or no answer), may be
#: retried; ``maybe-delivered``: interrupted after the end of data, the server may have it.
RecipientStatus = Literal["delivered", "failed", "deferred", "maybe-delivered"]

#: ``delivered`` to every recipient; ``partial``: to some; ``failed``: refused permanently;
#: ``deferred``: not delivered yet, kept for a retry; ``not-sent``: could not be protected (key
#: problem: nothing sent, nothing stored); ``skipped``: already sent by an earlier run (or
#: being sent by another process); ``duplicate``: its key equals that of an earlier message of
#: this same run (``duplicate_of`` is that message's tag), so it is not sent again;
#: ``maybe-delivered``: interrupted after the end of its data was sent (now or by an earlier
#: run), so the server may have it: kept in the outbox, not sent again by itself.
MessageStatus = Literal[
    "delivered",
    "partial",
    "failed",
    "deferred",
    "not-sent",
    "skipped",
    "duplicate",
    "maybe-delivered",
]


@dataclass(frozen=True)
class TLSInfo:
    """What TLS protected the session: protocol version and cipher suite as OpenSSL names them,
    e.g. ``TLSv1.3`` and ``TLS_AES_256_GCM_SHA384``."""

    version: str
    cipher: str


_RECIPIENT_STATUSES: tuple[str, ...] = get_args(RecipientStatus)


@dataclass(frozen=True)
class RecipientOutcome:
    """What happened for one envelope recipient of a copy."""

    address: str
    status: RecipientStatus
    #: The server's last word about this recipient: DATA's 250 when delivered, the refusal
    #: when refused, ``None`` when the server never answered about it (e.g. no connection).
    reply: SMTPReply | None = None
    #: Why it was not delivered, as one line (``None`` when delivered).
    error: str | None = None

    def __post_init__(self) -> None:
        # The former RecipientResult(address, accepted, reply) took a bool second: refuse it
        # (and any unknown status) rather than make an outcome whose status means nothing.
        if not isinstance(self.status, str):
            raise TypeError(
                f"RecipientOutcome status must be one of {_RECIPIENT_STATUSES}, not {self.status!r}"
            )
        if self.status not in _RECIPIENT_STATUSES:
            raise ValueError(
                f"RecipientOutcome status must be one of {_RECIPIENT_STATUSES}, not {self.status!r}"
            )

    @classmethod
    def from_refusal(cls, address: str, reply: SMTPReply) -> RecipientOutcome:
        """The server refused RCPT TO for ``address``: ``deferred`` for a 4xx (the same
        command may succeed later), ``failed`` otherwise (RFC 5321 §4.2.1)."""
        if reply.is_transient:
            return cls(address, "deferred", reply, f"refused for now: {reply}")
        return cls(address, "failed", reply, f"refused: {reply}")

    @property
    def accepted(self) -> bool:
        """Delivered to this recipient (the former ``RecipientResult.accepted``)."""
        return self.status == "delivered"


@dataclass(frozen=True, kw_only=True)
class CopyOutcome:
    """What happened to one protected copy: one transaction (from the transport) or, from the
    delivery engine, every attempt of it merged. Keyword arguments only."""

    recipients: tuple[RecipientOutcome, ...]
    mail_from: str = ""
    #: The final reply to DATA of the last successful transaction (e.g. ``250 OK queued as
    #: X``); ``None`` when DATA was not sent or not accepted.
    data_reply: SMTPReply | None = None
    #: The TLS it went over; ``None`` only for the explicitly allowed insecure plaintext mode.
    tls: TLSInfo | None = None
    #: Attempts made (connections tried or transactions started); 1 for one transaction.
    attempts: int = 1
    #: The last failure, when something is not delivered (``None`` in the ``result`` of the
    #: error that says it: no reference cycle). Not compared: errors have no value equality
    #: (an outcome and its pickled copy are equal).
    error: E2EmailError | None = field(default=None, compare=False)
    #: Still stored in the outbox (something is not delivered, and there is an outbox).
    kept: bool = False
    #: The copy's outbox item ID when there is an outbox (an in-memory ID without one);
    #: ``None`` for a bare transaction.
    id: str | None = None
    #: The tag the caller gave the copy's submission (``None`` for a bare transaction).
    tag: Any = None
    #: ``main`` (To/Cc) or ``bcc``, when known.
    kind: CopyKind | None = None
    #: The protected copy, when the mailer sent it with ``send()`` or ``send_copies()`` (the
    #: former ``CopyResult.copy``); never in :meth:`~e2email.AsyncMailer.send_many`'s or an
    #: outbox run's outcomes, which hold no message bytes.
    copy: ProtectedCopy | None = field(default=None, repr=False)
    #: What the delivery engine was given (a :class:`e2email.delivery.Submission`, with the
    #: copy's bytes): set in the engine's own outcomes only (``deliver()``,
    #: ``DeliveryEngine``); the mailer's outcomes have ``None`` (their ``id`` and ``tag``
    #: are taken from it).
    submission: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        sub = self.submission
        if sub is not None:
            if self.id is None:
                object.__setattr__(self, "id", sub.id)
            if self.tag is None:
                object.__setattr__(self, "tag", sub.tag)
        if self.kind is None and self.copy is not None:
            object.__setattr__(self, "kind", self.copy.kind)

    def summary(self) -> CopyOutcome:
        """This outcome without the copy's bytes (no ``submission``, no ``copy``)."""
        if self.submission is None and self.copy is None:
            return self
        return _replace(self, submission=None, copy=None)

    @property
    def delivery(self) -> CopyOutcome:
        """Itself: the former ``CopyResult.delivery``."""
        return self

    def _with(self, status: RecipientStatus) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.status == status)

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients the server accepted the copy for (same as :attr:`delivered`)."""
        return self._with("delivered")

    @property
    def refused(self) -> tuple[RecipientOutcome, ...]:
        """Recipients the copy was not delivered to, whatever the reason."""
        return tuple(r for r in self.recipients if r.status != "delivered")

    @property
    def delivered(self) -> tuple[str, ...]:
        return self._with("delivered")

    @property
    def failed(self) -> tuple[str, ...]:
        return self._with("failed")

    @property
    def deferred(self) -> tuple[str, ...]:
        return self._with("deferred")

    @property
    def maybe_delivered(self) -> tuple[str, ...]:
        """Recipients the server may or may not have accepted the copy for (interrupted after
        the end of data): not sent again unless asked for."""
        return self._with("maybe-delivered")

    @property
    def status(self) -> Literal["delivered", "partial", "failed", "deferred", "maybe-delivered"]:
        """``delivered`` for every recipient; ``partial`` for some; otherwise ``deferred``
        when any recipient may still be delivered by a later retry, ``maybe-delivered`` when
        the server may have it, else ``failed``."""
        if not self.failed and not self.deferred and not self.maybe_delivered:
            return "delivered"
        if self.delivered:
            return "partial"
        if self.deferred:
            return "deferred"
        return "maybe-delivered" if self.maybe_delivered else "failed"


@dataclass(frozen=True, kw_only=True)
class MessageOutcome:
    """What happened to one message, per copy and per recipient (To, Cc and Bcc): returned by
    :meth:`~e2email.AsyncMailer.send` and, per message, by
    :meth:`~e2email.AsyncMailer.send_many`. Keyword arguments only.

    Made from ``copies`` alone, its ``status``, ``recipients`` and ``kept`` are taken from
    them (and ``error`` too with :meth:`of_copies`); without copies, ``status`` must be given
    (there is no default: an outcome never says ``delivered`` by omission).

    ``recipients`` lists every recipient of every copy as the copies' outcomes have them; for
    ``not-sent`` every To, Cc and Bcc address (``failed``, with the reason it could not be
    protected), so ``unsent`` names them all. ``skipped``, ``duplicate`` and a
    ``maybe-delivered`` message found so in the outbox were not sent by this call: their
    ``recipients`` (and so ``accepted`` and ``unsent``) are empty.
    """

    #: The message's position in a batch's input (0-based; 0 for ``send()``).
    index: int = 0
    #: A batch item's tag (``None`` for ``send()``).
    tag: Any = None
    #: Required unless ``copies`` are given (then taken from them).
    status: MessageStatus = None  # type: ignore[assignment]
    message_id: str | None = None
    #: Every recipient of every copy, as the copies' outcomes have them (taken from
    #: ``copies`` when not given).
    recipients: tuple[RecipientOutcome, ...] = ()
    #: The last failure (for ``not-sent``: why it could not be protected). ``None`` in the
    #: ``result`` of the error that says it. Not compared (errors have no value equality).
    error: Exception | None = field(default=None, compare=False)
    #: Outbox IDs of its copies still kept there.
    kept: tuple[str, ...] = ()
    detail: str = ""
    #: For ``duplicate``: the tag of the earlier message of this run with the same key.
    duplicate_of: Any = None
    #: Each copy's outcome (one for To/Cc, one per Bcc recipient).
    copies: tuple[CopyOutcome, ...] = ()

    def __post_init__(self) -> None:
        copies = tuple(self.copies)
        object.__setattr__(self, "copies", copies)
        if copies and not self.recipients:
            object.__setattr__(self, "recipients", tuple(r for c in copies for r in c.recipients))
        if copies and not self.kept:
            kept = tuple(c.id for c in copies if c.kept and c.id is not None)
            object.__setattr__(self, "kept", kept)
        if self.status is None:
            if not copies:
                raise TypeError("MessageOutcome needs a status when it has no copies")
            object.__setattr__(self, "status", _status_of(self.recipients))
        elif self.status not in _MESSAGE_STATUSES:
            raise ValueError(
                f"MessageOutcome status must be one of {_MESSAGE_STATUSES}, not {self.status!r}"
            )

    @classmethod
    def of_copies(
        cls,
        copies: Sequence[CopyOutcome],
        *,
        message_id: str | None,
        index: int = 0,
        tag: Any = None,
    ) -> MessageOutcome:
        """The outcome of a message whose every copy has its outcome (``error``: the last
        copy's failure)."""
        errors = [c.error for c in copies if c.error is not None]
        return cls(
            index=index,
            tag=tag,
            message_id=message_id,
            copies=tuple(copies),
            error=errors[-1] if errors else None,
        )

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients the message was delivered to."""
        return tuple(r.address for r in self.recipients if r.status == "delivered")

    @property
    def refused(self) -> dict[str, SMTPReply | None]:
        """Each recipient it was not delivered to, with the server's last reply about it."""
        return {r.address: r.reply for r in self.recipients if r.status != "delivered"}

    @property
    def unsent(self) -> tuple[str, ...]:
        """Recipients it was not delivered to (``refused``'s addresses)."""
        return tuple(r.address for r in self.recipients if r.status != "delivered")


_MESSAGE_STATUSES: tuple[str, ...] = get_args(MessageStatus)


def _status_of(recipients: Sequence[RecipientOutcome]) -> MessageStatus:
    """A message's status from its recipients' (every copy's)."""
    delivered = sum(r.status == "delivered" for r in recipients)
    if delivered == len(recipients):
        return "delivered"
    if delivered:
        return "partial"
    if any(r.status == "deferred" for r in recipients):
        return "deferred"
    if any(r.status == "maybe-delivered" for r in recipients):
        return "maybe-delivered"
    return "failed"


@dataclass(frozen=True)
class BatchResult:
    """The result of :meth:`~e2email.AsyncMailer.send_many`: counts per status and, unless an
    ``on_outcome`` callback took them as they came, every :class:`MessageOutcome`."""

    counts: Mapping[str, int]
    outcomes: tuple[MessageOutcome, ...] = ()
    #: SMTP connections opened.
    connections: int = 0
    #: The error that stopped the batch early (certificate, credentials, server unreachable).
    stopped_by: Exception | None = field(default=None, compare=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """Was every message delivered (or already delivered by an earlier run, or a duplicate
        of one that was)?"""
        return self.total == sum(
            self.counts.get(s, 0) for s in ("delivered", "skipped", "duplicate")
        )


def deprecated_name(module: str, name: str, names: Mapping[str, tuple[object, str]]) -> object:
    """For a module's ``__getattr__`` (PEP 562): the value of the deprecated ``name`` (one of
    ``names``: value and the name to use instead), with a :class:`DeprecationWarning` to code
    outside e2email (the package's own re-exports stay silent, so ``import e2email`` never
    warns); :class:`AttributeError` for any other name."""
    try:
        value, instead = names[name]
    except KeyError:
        raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
    # Frame 0 is this function, 1 the module's __getattr__, 2 the code reading the name.
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller != "e2email" and not caller.startswith("e2email."):
        warnings.warn(
            f"{module}.{name} is deprecated: use {instead} (the same type)",
            DeprecationWarning,
            stacklevel=3,
        )
    return value
