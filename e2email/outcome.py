"""What happened to a message: one value per recipient, per copy and per message.

The transport makes a :class:`RecipientOutcome` for every envelope recipient of a transaction
(a refused RCPT is ``failed`` or ``deferred`` by its reply's class, RFC 5321 §4.2.1, with the
server's exact reply) and a :class:`CopyOutcome` for the transaction. The delivery engine
merges a copy's attempts into one :class:`CopyOutcome` (keeping the transport's recipient
values for what is final), and the mailer returns one :class:`MessageOutcome` per message from
:meth:`~e2email.AsyncMailer.send` and :meth:`~e2email.AsyncMailer.send_many` alike; errors
raised after a partial send carry it as ``result``. The CLI, the Django backend, Celery, the
relay and the logging handler all read these.

Like :mod:`e2email.errors`, this module imports nothing above it at run time, so every layer
can use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from e2email.errors import E2EmailError, SMTPReply

if TYPE_CHECKING:
    # For annotations only: what a copy's outcome points back to, made by higher layers.
    from e2email.crypto.base import ProtectedCopy
    from e2email.delivery import Submission

__all__ = [
    "BatchResult",
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

    @classmethod
    def refused(cls, address: str, reply: SMTPReply) -> RecipientOutcome:
        """The server refused RCPT TO for ``address``: ``deferred`` for a 4xx (the same
        command may succeed later), ``failed`` otherwise (RFC 5321 §4.2.1)."""
        if reply.is_transient:
            return cls(address, "deferred", reply, f"refused for now: {reply}")
        return cls(address, "failed", reply, f"refused: {reply}")

    @property
    def accepted(self) -> bool:
        """Delivered to this recipient (the former ``RecipientResult.accepted``)."""
        return self.status == "delivered"


@dataclass(frozen=True)
class CopyOutcome:
    """What happened to one protected copy: one transaction (from the transport) or, from the
    delivery engine, every attempt of it merged."""

    recipients: tuple[RecipientOutcome, ...]
    mail_from: str = ""
    #: The final reply to DATA of the last successful transaction (e.g. ``250 OK queued as
    #: X``); ``None`` when DATA was not sent or not accepted.
    data_reply: SMTPReply | None = None
    #: The TLS it went over; ``None`` only for the explicitly allowed insecure plaintext mode.
    tls: TLSInfo | None = None
    #: Attempts made (connections tried or transactions started); 1 for one transaction.
    attempts: int = 1
    #: The last failure, when something is not delivered.
    error: E2EmailError | None = None
    #: Still stored in the outbox (something is not delivered, and there is an outbox).
    kept: bool = False
    #: What the delivery engine was given (its ``id`` is the outbox item's ID when there is an
    #: outbox; its ``tag`` the caller's); ``None`` for a bare transaction.
    submission: Submission | None = None
    #: The protected copy, when the mailer sent it (``send()``, ``send_copies()``).
    copy: ProtectedCopy | None = None

    @property
    def id(self) -> str | None:
        """The copy's outbox item ID (an in-memory ID without an outbox)."""
        return self.submission.id if self.submission is not None else None

    @property
    def tag(self) -> Any:
        """The tag the caller gave the copy's submission."""
        return self.submission.tag if self.submission is not None else None

    @property
    def kind(self) -> str | None:
        """``main`` (To/Cc) or ``bcc``, when the copy is known."""
        return self.copy.kind if self.copy is not None else None

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


@dataclass(frozen=True)
class MessageOutcome:
    """What happened to one message, per copy and per recipient (To, Cc and Bcc): returned by
    :meth:`~e2email.AsyncMailer.send` and, per message, by
    :meth:`~e2email.AsyncMailer.send_many`."""

    #: The message's position in a batch's input (0-based; 0 for ``send()``).
    index: int = 0
    #: A batch item's tag (``None`` for ``send()``).
    tag: Any = None
    status: MessageStatus = "delivered"
    message_id: str | None = None
    #: Every recipient of every copy, as the copies' outcomes have them.
    recipients: tuple[RecipientOutcome, ...] = ()
    #: The last failure (for ``not-sent``: why it could not be protected).
    error: Exception | None = None
    #: Outbox IDs of its copies still kept there.
    kept: tuple[str, ...] = ()
    detail: str = ""
    #: For ``duplicate``: the tag of the earlier message of this run with the same key.
    duplicate_of: Any = None
    #: Each copy's outcome (one for To/Cc, one per Bcc recipient).
    copies: tuple[CopyOutcome, ...] = ()

    @classmethod
    def of_copies(
        cls,
        copies: Sequence[CopyOutcome],
        *,
        message_id: str | None,
        index: int = 0,
        tag: Any = None,
    ) -> MessageOutcome:
        """The outcome of a message whose every copy has its outcome."""
        recipients = tuple(r for c in copies for r in c.recipients)
        delivered = sum(r.status == "delivered" for r in recipients)
        status: MessageStatus
        if delivered == len(recipients):
            status = "delivered"
        elif delivered:
            status = "partial"
        elif any(r.status == "deferred" for r in recipients):
            status = "deferred"
        elif any(r.status == "maybe-delivered" for r in recipients):
            status = "maybe-delivered"
        else:
            status = "failed"
        errors = [c.error for c in copies if c.error is not None]
        return cls(
            index=index,
            tag=tag,
            status=status,
            message_id=message_id,
            recipients=recipients,
            error=errors[-1] if errors else None,
            kept=tuple(c.id for c in copies if c.kept and c.id is not None),
            copies=tuple(copies),
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


@dataclass(frozen=True)
class BatchResult:
    """The result of :meth:`~e2email.AsyncMailer.send_many`: counts per status and, unless an
    ``on_outcome`` callback took them as they came, every :class:`MessageOutcome`."""

    counts: Mapping[str, int]
    outcomes: tuple[MessageOutcome, ...] = ()
    #: SMTP connections opened.
    connections: int = 0
    #: The error that stopped the batch early (certificate, credentials, server unreachable).
    stopped_by: Exception | None = None

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
