"""The delivery engine: protected copies to the server, retried, reported per recipient.

What it promises, for each :class:`Submission` (one protected copy and its envelope):

* **Transient failures are retried, permanent ones are not.** A 4xx reply, a dropped
  connection or a timeout (:attr:`TransportError.transient`) is tried again after an
  exponential back-off with jitter (:class:`~e2email.config.RetryPolicy`), up to its attempt
  limit; a 5xx reply is final (RFC 5321 §4.2.1). The decision is made per recipient: when the
  server accepts a copy for some recipients and refuses others, only the recipients refused
  with a 4xx are tried again, with the same bytes.
* **Every recipient ends in one of four states**: ``delivered`` (the server took the message
  for them), ``failed`` (refused permanently), ``deferred`` (still undelivered after the
  last attempt, or never tried because the run stopped) or ``maybe-delivered``. With an
  outbox, the copy stays there until every recipient is delivered; the outbox is updated
  after each attempt, before the outcome is reported (without waiting for the disk: a power
  cut that loses that record leaves the copy maybe-delivered or queued, as the durable state
  before it says, see :meth:`Outbox.settle(synced=False)`).
* **A copy is never sent twice by itself.** Once the end of its data (the final ".") is
  sent, the server may have it (RFC 5321 §6.1, RFC 1047): a lost reply, a timeout, a dropped
  connection or an interruption from then on makes it ``maybe-delivered``, which is not
  retried (``outbox retry --maybe-delivered`` sends it on request). With an outbox this is
  recorded *before* the "." goes out (:meth:`Outbox.mark_in_flight`), so a copy whose sender
  crashed there is found maybe-delivered too, not resent.
* **Connections are reused.** Each worker keeps one connection and sends message after
  message over it. After a transaction the server accepted, the next MAIL follows at once:
  the server's 250 to the end of data already reset its state (RFC 5321 §4.1.1.4), so an
  RSET there is a wasted round trip per message. RSET (§4.1.1.5) goes first only when the
  previous transaction did not end that way (a refusal, an error), or when the connection sat
  idle for :data:`PROBE_AFTER_IDLE` seconds: then it is a cheap check that the server has not
  closed it (it is then replaced without counting as an attempt). Should the server have
  closed a connection reused without that check, the MAIL command finds out (its 421, or
  the hang-up seen before anything of the message was sent); the copy then goes over a new
  connection at once, again without counting an attempt. With CHUNKING (RFC 3030) the
  message goes in MAIL's own write, so a connection lost with no reply at all after that
  write leaves the copy maybe-delivered (the server may have read it all before it went):
  a reused session closed as the write went out is no longer told from that.
  ``connections`` workers send side by side: a bounded pool.
* **A problem no retry can fix stops the run**: a certificate that does not verify, refused
  credentials, a 5xx greeting, or a server that stayed unreachable for a copy's every attempt.
  What was not sent is reported ``deferred`` and stays in the outbox;
  :attr:`DeliveryEngine.fatal` holds the error.

Nothing here knows about keys or MIME: it moves bytes, like the transport beneath it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from e2email.config import RetryPolicy, SMTPSettings
from e2email.errors import (
    DeliveryError,
    E2EmailError,
    MessageError,
    SMTPReply,
    TransportError,
)
from e2email.outbox import AddWrite, GroupWrite, MarkWrite, NewItem, Outbox, SettleWrite
from e2email.outcome import (
    CopyOutcome,
    RecipientOutcome,
    RecipientStatus,
    TLSInfo,
    deprecated_name,
)
from e2email.spool import Spool
from e2email.transport.smtp import SMTPConnection, SMTPTransport

__all__ = [
    "DeliveryEngine",
    "OutboxWriter",
    "RecipientOutcome",
    "RecipientStatus",
    "Submission",
    "deliver",
    "is_transient",
    "route_of",
]

log = logging.getLogger(__name__)

_ids = itertools.count(1)


def route_of(settings: SMTPSettings) -> str:
    """Which server and account a copy is meant for, as the outbox records it: ``user@host``
    or ``host``. The port is left out, as port fallback may pick another one next time."""
    return f"{settings.username}@{settings.host}" if settings.username else settings.host


def is_transient(error: BaseException) -> bool:
    """May trying again later help? 4xx replies, timeouts and lost connections: yes; 5xx
    replies, TLS and certificate problems, refused credentials and bad input: no."""
    if isinstance(error, TransportError):
        return bool(error.transient)
    return False


@dataclass(frozen=True)
class Submission:
    """One protected copy to deliver: the exact bytes and the envelope.

    ``id`` is its outbox item ID when there is an outbox (any unique string otherwise);
    ``tag`` is the caller's, handed back unchanged in the :class:`~e2email.outcome.CopyOutcome`.
    """

    #: The bytes, or the spool that holds a large copy (e2email.spool).
    raw: bytes | Spool = field(repr=False)
    mail_from: str
    recipients: tuple[str, ...]
    id: str = field(default_factory=lambda: f"mem-{next(_ids)}")
    tag: Any = None
    #: REQUIRETLS (RFC 8689) for this copy; ``None``: as the SMTP settings say. Stored with
    #: the copy in the outbox, so a retry asks for it too.
    require_tls: bool | None = None


#: The former name of a copy's final outcome, kept: it is :class:`e2email.outcome.CopyOutcome`
#: (with ``submission`` set), the same type the transport returns for one transaction.
#: Reading it from outside e2email warns (DeprecationWarning).
if TYPE_CHECKING:
    Outcome = CopyOutcome
_DEPRECATED = {"Outcome": (CopyOutcome, "e2email.outcome.CopyOutcome")}


def __getattr__(name: str) -> object:  # PEP 562: the deprecated name above
    return deprecated_name(__name__, name, _DEPRECATED)


class OutboxWriter:
    """The outbox writes that must be durable before a run goes on (storing a message's copies
    before they are sent, marking a copy in flight before its final "."), made together: the
    writes asked for while one group waits for the disk are made next, as one group with one
    wait for the disk (:meth:`Outbox.write_group`). Each caller still returns only once its
    own write is durable. One group at a time, so a lone write goes at once.

    ``send_many`` shares one between its stores and its delivery engine, so a copy's in-flight
    mark and the next messages' stores share their fsync: while a transaction is under way on
    some connection (:meth:`sending`), stores wait for the next in-flight mark (or the end of
    that transaction) and go with it. Those stores are of messages protected ahead of their
    turn, so the wait costs no time; when no transaction is under way they go at once.
    Attempts' outcomes (:meth:`settle`, which need no wait for the disk of their own) wait
    the same way: a copy's outcome goes with the next copy's in-flight mark, one trip to the
    outbox's thread for both.

    Used within one event loop (one ``send_many`` or delivery run)."""

    #: Longest a store or outcome waits for a mark to go with (a safety net: every
    #: transaction ends).
    HOLD_LIMIT = 0.05

    def __init__(self, outbox: Outbox, route: str | None = None) -> None:
        self.outbox = outbox
        self._route = route
        self._waiting: list[tuple[GroupWrite, asyncio.Future[tuple[str, ...] | None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._sending = 0
        self._due = asyncio.Event()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around a transaction whose copy will be marked in flight before its end of data
        (or fail before): stores asked for meanwhile wait to go with that mark."""
        self._sending += 1
        try:
            yield
        finally:
            self._sending -= 1
            # Not at once: the next transaction on the connection usually starts before the
            # loop turns, and its mark is the one to go with.
            asyncio.get_running_loop().call_soon(self._wake_if_idle)

    def _wake_if_idle(self) -> None:
        if not self._sending:
            self._due.set()

    async def add(
        self, items: Sequence[NewItem], ledger: tuple[str, str] | None = None
    ) -> tuple[str, ...]:
        """The IDs of ``items``, stored (claimed) and durable; raises what refused them (e.g.
        :class:`~e2email.outbox.LedgerTaken`)."""
        return await self._write(AddWrite(tuple(items), ledger)) or ()

    async def mark(self, item_id: str) -> None:
        """:meth:`Outbox.mark_in_flight`, durable when this returns."""
        self._due.set()
        await self._write(MarkWrite(item_id))

    async def settle(self, op: SettleWrite) -> None:
        """Record an attempt's outcome (:meth:`Outbox.settle` with ``synced=False``): with
        the next group, so while a transaction is under way with its in-flight mark, one trip
        to the outbox's thread and one wait for the disk for both instead of two trips."""
        await self._write(op)

    async def _write(self, op: GroupWrite) -> tuple[str, ...] | None:
        done: asyncio.Future[tuple[str, ...] | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((op, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await done

    async def _run(self) -> None:
        try:
            await self._groups()
        except BaseException as exc:
            # Never leave a caller waiting for a write this task will not make.
            for _, done in self._waiting:
                if not done.done():
                    if isinstance(exc, Exception):
                        done.set_exception(exc)
                    else:
                        done.cancel()
            self._waiting = []
            raise

    async def close(self) -> None:
        """The end of an aborted run: the stores and marks whose callers were cancelled and
        that are not written yet are dropped (nobody sent those copies), the outcomes still
        queued are written (each holds the server's answer), and the group in the outbox's
        thread, which cannot be stopped, is waited for. After this no write of the run lands
        late, so what the run then records about its copies stands."""
        self._waiting = [(op, done) for op, done in self._waiting if _wanted(op, done)]
        self._due.set()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await task
        elif self._waiting:
            with contextlib.suppress(BaseException):
                await self._run()

    async def _groups(self) -> None:
        while self._waiting:
            if self._sending and not any(isinstance(op, MarkWrite) for op, _ in self._waiting):
                # Stores only, and a mark to come: go with it.
                self._due.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.HOLD_LIMIT):
                        await self._due.wait()
            group, self._waiting = self._waiting, []
            # A store or mark whose caller was cancelled meanwhile is not made: its copy is
            # not going to be sent (an outcome is made all the same: it is the server's).
            group = [(op, done) for op, done in group if _wanted(op, done)]
            if not group:
                continue
            try:
                results = await asyncio.to_thread(
                    self.outbox.write_group, [op for op, _ in group], route=self._route
                )
            except Exception as exc:  # the group failed as a whole
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException:
                # Cancelled: the thread may still make these writes, as a cancelled
                # to_thread(outbox.add) may; nobody waits for them any more.
                for _, done in (*group, *self._waiting):
                    done.cancel()
                self._waiting = []
                raise
            orphans: list[str] = []
            for (op, done), result in zip(group, results, strict=True):
                if done.done():
                    if isinstance(op, AddWrite) and isinstance(result, tuple):
                        # Stored (and claimed by this process) for a caller cancelled
                        # meanwhile, which will never submit them: back in the queue, or
                        # they would stay claimed until this process ends.
                        orphans.extend(result)
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)
            if orphans:
                await asyncio.to_thread(self.outbox.release, orphans)


def _wanted(op: GroupWrite, done: asyncio.Future[tuple[str, ...] | None]) -> bool:
    """Whether a queued write is still to be made: an outcome always; a store or an
    in-flight mark only while its caller waits for it."""
    return isinstance(op, SettleWrite) or not done.done()


@dataclass
class _Job:
    sub: Submission
    pending: list[str]
    done: dict[str, RecipientOutcome] = field(default_factory=dict)
    #: The latest reply for each pending recipient (a 4xx refusal), kept for the report.
    replies: dict[str, SMTPReply | None] = field(default_factory=dict)
    attempts: int = 0
    error: E2EmailError | None = None
    data_reply: SMTPReply | None = None
    tls: TLSInfo | None = None
    #: This attempt marked the copy in flight in the outbox (its end of data was about to be
    #: sent), and whether the end of data was then sent (so the server may have it).
    marked: bool = False
    ended: bool = False

    def settled_mark(self) -> bool | None:
        """``maybe_delivered`` for :meth:`Outbox.settle` when the outcome is recorded without
        a result from the server (released, interrupted)."""
        return self.ended if self.marked else None


#: Seconds a connection may sit idle after a successful transaction and still carry the next
#: message without an RSET first (see the module docstring). Servers close idle sessions after
#: minutes (RFC 5321 §4.5.3.2.7 suggests 5); a bulk run sends the next message within
#: milliseconds.
PROBE_AFTER_IDLE = 1.0


class _Slot:
    """One worker's connection: opened on first use, reused (RSET first unless the previous
    transaction ended in the server's acceptance just now), replaced when lost."""

    def __init__(self, transport: SMTPTransport) -> None:
        self._transport = transport
        self._cm: contextlib.AbstractAsyncContextManager[SMTPConnection] | None = None
        self._conn: SMTPConnection | None = None
        self._used = False
        #: When the latest transaction ended with the server's acceptance (monotonic), None
        #: when it did not (or none was made on this connection).
        self._accepted_at: float | None = None
        #: The connection :meth:`get` returned was used before and not checked with RSET.
        self.unchecked = False
        self.opened = 0

    async def get(self) -> SMTPConnection:
        conn = self._conn
        self.unchecked = False
        if conn is not None and self._used:
            # Clean just now: the server's 250 to the end of data, or to the RSET with which
            # the transport cleared a refused transaction (a second RSET would only repeat
            # that one's check).
            clean = self._accepted_at if self._accepted_at is not None else conn.reset_at
            fresh = clean is not None and time.monotonic() - clean < PROBE_AFTER_IDLE
            if conn.is_connected and not fresh:
                # RSET between messages after anything but a success, or after idling: a
                # clean state, and proof that the server has not dropped the connection
                # meanwhile. Errors here are not the next message's fault, so they only make
                # us reconnect.
                await _rset(conn)
            elif conn.is_connected:
                self.unchecked = True
            if not conn.is_connected:
                await self.close()
                conn = None
                self.unchecked = False
        if conn is None:
            cm = self._transport.connect()
            conn = await cm.__aenter__()
            self._cm, self._conn, self._used = cm, conn, False
            self.opened += 1
        return conn

    def abort(self) -> None:
        """Cancelled: drop the connection without QUIT (close() then has nothing to wait for)."""
        if self._conn is not None:
            self._conn._abort()

    def mark_used(self) -> None:
        self._used = True
        self._accepted_at = None

    def mark_accepted(self) -> None:
        """The transaction just made ended with the server's acceptance of the data."""
        self._accepted_at = time.monotonic()

    async def close(self) -> None:
        cm, self._cm, self._conn = self._cm, None, None
        if cm is not None:
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)


async def _rset(conn: SMTPConnection) -> None:
    # SMTPConnection._reset() sends RSET under the command timeout; on any error it closes the
    # session (which then reports not connected). A public reset() would be nicer.
    await conn._reset()


class DeliveryEngine:
    """Delivers submissions with retries over a bounded pool of reused connections.

    Use as an async context manager; :meth:`submit` copies while it runs (it waits when the
    workers are busy, so a producer never runs far ahead); leaving the block waits until every
    submission has its :class:`~e2email.outcome.CopyOutcome`, passed to ``on_outcome`` as
    soon as it is final::

        async with DeliveryEngine(settings, connections=4, on_outcome=report) as engine:
            for sub in submissions:
                if not await engine.submit(sub):
                    break  # stopped: engine.fatal says why

    With an ``outbox``, each submission's ``id`` must be the ID of an item this process has
    claimed; the item is updated after every attempt and removed once fully delivered.
    """

    def __init__(
        self,
        smtp: SMTPSettings,
        *,
        retry: RetryPolicy | None = None,
        connections: int = 1,
        outbox: Outbox | None = None,
        on_outcome: Callable[[CopyOutcome], None] | None = None,
        transport: SMTPTransport | None = None,
        rand: Callable[[], float] | None = None,
        writer: OutboxWriter | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.smtp = smtp
        self.retry = retry if retry is not None else RetryPolicy()
        self.connections = connections
        self.outbox = outbox
        if writer is not None and writer.outbox is not outbox:
            raise ValueError("the writer must write to the engine's outbox")
        #: Makes the in-flight marks (with other durable writes of the run, when shared).
        self._writer = writer if writer is not None or outbox is None else OutboxWriter(outbox)
        self._on_outcome = on_outcome
        self._transport = transport if transport is not None else SMTPTransport(smtp)
        self._rand = rand
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * connections)
        self._workers: list[asyncio.Task[None]] = []
        self._timers: dict[asyncio.Task[None], _Job] = {}
        self._cleanup: set[asyncio.Task[None]] = set()
        self._live: dict[str, _Job] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        self._fatal: E2EmailError | None = None
        self._crashed: Exception | None = None
        self._started = False
        #: Connections opened (all workers), for reports and tests.
        self.connections_opened = 0

    @property
    def fatal(self) -> E2EmailError | None:
        """The error that stopped the run, if one did."""
        return self._fatal

    @property
    def stopped(self) -> bool:
        return self._fatal is not None

    async def __aenter__(self) -> DeliveryEngine:
        self._started = True
        self._workers = [
            asyncio.create_task(self._work(), name=f"e2email-delivery-{n}")
            for n in range(self.connections)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            try:
                await self._drain()
            except BaseException as interrupt:
                # Cancelled (Ctrl-C) while waiting for the workers: they must not go on
                # sending behind the caller's back, nor hold their connections open.
                await self._abort(interrupt)
                raise
            if self._crashed is not None:
                raise self._crashed
            return
        await self._abort(exc)

    async def _drain(self) -> None:
        """Wait until every submission has its outcome, then stop the workers. Should every
        worker have died (a bug), what is left is reported deferred instead of waiting."""
        waiter = asyncio.ensure_future(self._drained.wait())
        try:
            while not waiter.done():
                alive = [w for w in self._workers if not w.done()]
                if not alive:
                    for job in list(self._live.values()):
                        await self._finish(job, stopped=True)
                    break
                await asyncio.wait([waiter, *alive], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        for worker in self._workers:
            if not worker.done():
                await self._queue.put(None)
        for result in await asyncio.gather(*self._workers, return_exceptions=True):
            if isinstance(result, Exception):
                self._crashed = self._crashed or result

    async def _abort(self, exc: BaseException) -> None:
        """Interrupted (cancelled, or the producer failed): stop everything, give back what
        this process claimed so the next run need not wait for the claims to be noticed as
        dead, with the reason recorded as the items' last error."""
        tasks = [*self._workers, *self._timers, *self._cleanup]
        for task in tasks:
            task.cancel()
        # Shielded: a second Ctrl-C must not leave the workers (and connections) running.
        with contextlib.suppress(BaseException):
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        if self._writer is not None:
            # No write of this run may land after the settles below (a late in-flight mark
            # would say "the server may have it" of a copy whose end of data never went).
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._writer.close())
        if self.outbox is not None and self._live:
            for job in list(self._live.values()):
                maybe = job.settled_mark()
                why = f"interrupted: {exc!r}"
                if maybe:
                    why = f"interrupted after the end of the message data was sent: {exc!r}"
                with contextlib.suppress(Exception):
                    self.outbox.settle(
                        job.sub.id, error=why, attempted=False, release=True, maybe_delivered=maybe
                    )

    async def submit(self, sub: Submission) -> bool:
        """Queue ``sub``; False (and the submission reported deferred) if the run stopped."""
        if not self._started:
            raise RuntimeError("use the engine inside 'async with'")
        job = _Job(sub=sub, pending=list(dict.fromkeys(sub.recipients)))
        self._live[sub.id] = job
        self._drained.clear()
        if self._fatal is not None:
            await self._finish(job, stopped=True)
            return False
        await self._queue.put(job)
        return True

    # -- workers ---------------------------------------------------------------------------

    async def _work(self) -> None:
        slot = _Slot(self._transport)
        connect_failures = 0
        try:
            while True:
                job = await self._queue.get()
                if job is None:
                    return
                if self._fatal is not None:
                    await self._finish(job, stopped=True)
                    continue
                opened = slot.opened
                try:
                    connected = await self._attempt(slot, job)
                except Exception as exc:
                    await slot.close()
                    await self._crash(job, exc)
                    continue
                self.connections_opened += slot.opened - opened
                if connected:
                    connect_failures = 0
                else:
                    # The server could not be reached: do not hammer it with the next copy
                    # at once (that one's attempt would be wasted too).
                    connect_failures += 1
                    await asyncio.sleep(self.retry.delay(connect_failures, rand=self._rand))
        except asyncio.CancelledError:
            slot.abort()
            raise
        finally:
            await slot.close()

    async def _crash(self, job: _Job, exc: Exception) -> None:
        """``job``'s attempt raised something unexpected: stop cleanly (everything not sent
        stays in the outbox, reported deferred). An E2EmailError (the outbox cannot be
        written: disk full) becomes the run's error; anything else is a bug, raised from the
        engine when it ends. Never raises: the worker must live on to drain the queue."""
        try:
            if isinstance(exc, E2EmailError):
                job.error = job.error or exc
                self._stop(exc)
            else:
                self._crashed = self._crashed or exc
                self._stop(E2EmailError(f"internal error while sending: {exc!r}"))
            await self._finish(job, stopped=True)
        except Exception as again:  # pragma: no cover - _finish guards itself
            log.error("delivery: cannot record %s after %r: %r", job.sub.id, exc, again)
            self._crashed = self._crashed or again
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        self._live.pop(job.sub.id, None)
        if not self._live:
            self._drained.set()

    async def _attempt(self, slot: _Slot, job: _Job) -> bool:
        """One attempt for ``job``; False if no connection could be made."""
        job.attempts += 1
        job.marked = job.ended = False
        sub = job.sub
        outbox = self.outbox

        async def in_flight() -> None:
            # Marked before the mark is written: a cancel during the write may still let it
            # land (to_thread cannot be stopped), and _abort must then clear it.
            job.marked = True
            assert self._writer is not None
            await self._writer.mark(sub.id)
            # One turn of the event loop: a hang-up that already arrived is noticed before
            # the "." is written (then the server cannot have the message: retried), not
            # after (maybe delivered).
            await asyncio.sleep(0)

        while True:
            try:
                conn = await slot.get()
            except E2EmailError as exc:
                if not is_transient(exc):
                    # Certificates, credentials, a 5xx greeting: the same for every copy. Stop.
                    job.attempts -= 1  # this copy never reached the server
                    self._stop(exc)
                    job.error = exc
                    await self._finish(job, stopped=True)
                    return False
                await self._failed_whole(job, exc, connecting=True)
                return False
            unchecked = slot.unchecked
            slot.mark_used()
            try:
                with self._writer.sending() if self._writer is not None else nullcontext():
                    result = await conn.send(
                        sub.raw,
                        mail_from=sub.mail_from,
                        recipients=job.pending,
                        require_tls=sub.require_tls,
                        before_end=in_flight if outbox is not None else None,
                    )
            except asyncio.CancelledError:
                job.ended = conn.end_of_data_sent
                raise
            except TransportError as exc:
                if exc.maybe_delivered:
                    await slot.close()
                    job.ended = True
                    await self._maybe_delivered(job, exc)
                    return True
                if unchecked and conn.stage == "MAIL" and not conn.is_connected:
                    # The server closed the reused connection between transactions (an idle
                    # timeout, a limit of messages per session, with or without a 421):
                    # nothing of this copy reached it. A new connection, at once and not
                    # counted as an attempt, as an RSET check would have done.
                    log.debug("connection to %s was closed between messages: %s", conn.where, exc)
                    await slot.close()
                    continue
                return await self._send_failed(slot, job, exc)
            except MessageError as exc:
                # Bad envelope or bytes: no retry can change them.
                await self._failed_whole(job, exc)
                return True
            break
        if result.error is not None:
            # The server refused the transaction (the sender, every recipient, or the data):
            # its answer for each recipient, as the transport made it (5xx failed, 4xx
            # retried). The session was reset, or closed when it was out of step; the slot
            # reconnects for the next copy when it is down.
            job.error = result.error
            await self._apply(job, result)
            return True
        slot.mark_accepted()
        # The server has it: should recording that fail, the copy is maybe-delivered.
        job.ended = True
        if self.outbox is None:
            # Nothing to write, so nothing to wait for: recorded and reported at once (a task
            # would only cost the event loop a turn per message).
            await self._record_accepted(job, result)
            return True
        # Recorded (and reported) beside the next transaction on this connection, not before
        # it: the record's trip to the outbox's thread is off the path from one message to
        # the next. The copy stays live until then, so the run waits for it, and an
        # interruption meanwhile leaves it in flight (maybe-delivered), as before.
        task = asyncio.create_task(self._record_accepted(job, result))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)
        return True

    async def _record_accepted(self, job: _Job, result: CopyOutcome) -> None:
        try:
            await self._apply(job, result)
        except Exception as exc:
            await self._crash(job, exc)

    async def _send_failed(self, slot: _Slot, job: _Job, exc: TransportError) -> bool:
        """The transaction failed, and the server does not have the message."""
        if isinstance(exc, DeliveryError):
            # A reply that closed the session (e.g. 421): the same for every recipient.
            await self._failed_whole(job, exc)
        else:
            await slot.close()
            if not exc.transient:
                # E.g. REQUIRETLS asked for and not offered: every copy would fail the same way.
                job.attempts -= 1
                self._stop(exc)
                job.error = exc
                await self._finish(job, stopped=True)
                return True
            await self._failed_whole(job, exc)
        return True

    # -- outcomes --------------------------------------------------------------------------

    async def _apply(self, job: _Job, result: CopyOutcome) -> None:
        """Per recipient: accepted -> delivered; 5xx -> failed; 4xx -> still pending."""
        delivered: dict[str, SMTPReply | None] = {}
        failed: dict[str, SMTPReply | None] = {}
        still: dict[str, SMTPReply | None] = {}
        for r in result.recipients:
            # The transport's own values are final for delivered and failed recipients.
            if r.status == "delivered":
                delivered[r.address] = r.reply
                job.done[r.address] = r
            elif r.status == "failed":
                failed[r.address] = r.reply
                job.done[r.address] = r
            else:
                still[r.address] = r.reply
                job.replies[r.address] = r.reply
        if delivered:
            job.data_reply, job.tls = result.data_reply, result.tls
        job.pending = [a for a in job.pending if a in still]
        await self._next(job, delivered=delivered, failed=failed, pending=still)

    async def _maybe_delivered(self, job: _Job, exc: TransportError) -> None:
        """Interrupted after the end of data: the server may have the copy. Not retried (a
        retry may deliver it twice): reported ``maybe-delivered`` and, with an outbox, left
        there as such for the user to check and resend (``outbox retry --maybe-delivered``)
        or drop."""
        job.error = exc
        for address in job.pending:
            job.done[address] = RecipientOutcome(
                address,
                "maybe-delivered",
                None,
                f"{exc}; not sent again by itself, as that may deliver it twice",
            )
        pending: dict[str, SMTPReply | None] = dict.fromkeys(job.pending)
        job.pending = []
        if self.outbox is not None:
            # Unsynced: lost only with a power cut, which leaves the copy in flight, so
            # maybe-delivered all the same (Outbox.settle(synced=False)).
            await asyncio.to_thread(
                self.outbox.settle,
                job.sub.id,
                pending=pending,
                error=f"maybe delivered: {exc}",
                maybe_delivered=True,
                synced=False,
            )
        await self._finish(job, recorded=True)

    async def _failed_whole(
        self, job: _Job, exc: E2EmailError, *, connecting: bool = False
    ) -> None:
        """The attempt failed for every pending recipient alike."""
        job.error = exc
        reply = getattr(exc, "reply", None)
        if is_transient(exc):
            still: dict[str, SMTPReply | None] = dict.fromkeys(job.pending, reply)
            job.replies.update(still)
            await self._next(job, pending=still, connecting=connecting)
            return
        failed: dict[str, SMTPReply | None] = {}
        for address in job.pending:
            failed[address] = reply
            job.done[address] = RecipientOutcome(address, "failed", reply, str(exc))
        job.pending = []
        await self._next(job, failed=failed)

    async def _next(
        self,
        job: _Job,
        *,
        delivered: dict[str, SMTPReply | None] | None = None,
        failed: dict[str, SMTPReply | None] | None = None,
        pending: dict[str, SMTPReply | None] | None = None,
        connecting: bool = False,
    ) -> None:
        """Record the attempt; then finish the job or schedule its retry."""
        retry = bool(job.pending) and job.attempts < self.retry.max_attempts
        retry = retry and self._fatal is None
        delay = self.retry.delay(job.attempts, rand=self._rand) if job.pending else 0.0
        if self._writer is not None:
            # Unsynced (one fsync per message fewer): should a power cut lose this record, the
            # copy is as the last durable state says, in flight (maybe-delivered: never sent
            # again by itself) once its end of data went out, else queued to send again
            # (Outbox.settle(synced=False)). Made with the next in-flight mark of the run (one
            # trip to the outbox's thread for both), which also makes it durable.
            await self._writer.settle(
                SettleWrite(
                    job.sub.id,
                    delivered=delivered,
                    failed=failed,
                    pending=pending,
                    error=_error_text(job, failed),
                    retry_at=time.time() + delay if job.pending else None,
                    release=not retry,
                    # The server answered (or the data never ended): the outcome is known.
                    maybe_delivered=False,
                )
            )
        job.marked = job.ended = False
        if not retry:
            if job.pending and connecting and self._fatal is None and job.error is not None:
                # Unreachable for this copy's every attempt: the next copies would only
                # repeat that. Stop; everything not sent stays in the outbox.
                self._stop(job.error)
            await self._finish(job, recorded=True)
            return
        log.debug(
            "retrying %s for %d recipient(s) in %.2f s (attempt %d failed: %s)",
            job.sub.id,
            len(job.pending),
            delay,
            job.attempts,
            job.error,
        )
        timer = asyncio.create_task(self._later(job, delay))
        self._timers[timer] = job
        timer.add_done_callback(lambda t: self._timers.pop(t, None))

    async def _later(self, job: _Job, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._fatal is not None:
            await self._finish(job, stopped=True)
            return
        await self._queue.put(job)

    def stop(self, error: E2EmailError) -> None:
        """Stop the run as a fatal error would (no new copy is sent, those queued are
        reported with ``error``), letting the transactions under way end: for a caller whose
        own part failed (e.g. its outcome callback raised), so that no copy in the middle of
        its transaction is cut off and left maybe-delivered."""
        self._stop(error)

    def _stop(self, error: E2EmailError) -> None:
        if self._fatal is not None:
            return
        log.debug("delivery stopped: %s", error)
        self._fatal = error
        # Copies waiting for their retry will not get one: report them now.
        for timer, job in list(self._timers.items()):
            timer.cancel()
            self._timers.pop(timer, None)
            task = asyncio.get_running_loop().create_task(self._finish(job, stopped=True))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

    async def _finish(self, job: _Job, *, stopped: bool = False, recorded: bool = False) -> None:
        if job.sub.id not in self._live:
            return
        reason = job.error
        if stopped and reason is None:
            reason = self._fatal
        suffix = ""
        if stopped and self._fatal is not None and reason is not self._fatal:
            suffix = f"; sending stopped: {self._fatal}"
        outcomes = dict(job.done)
        for address in job.pending:
            reply = job.replies.get(address)
            if reply is not None and (reason is None or getattr(reason, "reply", None) is None):
                why = f"refused for now: {reply}"
            else:
                why = str(reason) if reason is not None else "not delivered"
            outcomes[address] = RecipientOutcome(address, "deferred", reply, why + suffix)
        undelivered = any(o.status != "delivered" for o in outcomes.values())
        # Delivered, but recording that failed (the outbox could not be written): the copy
        # must not stay an ordinary queued one, nor claimed by us: it is maybe-delivered.
        unrecorded = not recorded and job.marked and job.ended
        kept = False
        try:
            if self.outbox is not None and (undelivered or unrecorded):
                kept = undelivered
                if not recorded:
                    await asyncio.to_thread(
                        self.outbox.settle,
                        job.sub.id,
                        error=str(reason) if reason else None,
                        attempted=False,
                        release=True,
                        maybe_delivered=job.settled_mark(),
                    )
        except Exception as exc:
            # The outbox cannot be written (disk full): the item stays claimed by this
            # process, which a later run takes over once this one has ended. Stop the run.
            log.debug("cannot release %s in the outbox: %s", job.sub.id, exc)
            if isinstance(exc, E2EmailError):
                self._stop(exc)
            else:
                self._crashed = self._crashed or exc
        finally:
            self._forget(job)
        outcome = CopyOutcome(
            submission=job.sub,
            mail_from=job.sub.mail_from,
            recipients=tuple(outcomes[a] for a in dict.fromkeys(job.sub.recipients)),
            attempts=job.attempts,
            data_reply=job.data_reply,
            tls=job.tls,
            error=reason if undelivered else None,
            kept=kept,
        )
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception as exc:
                # The caller's callback failed (e.g. its report cannot be written): stop the
                # run and raise that from the engine; what is not sent stays in the outbox.
                self._crashed = self._crashed or exc
                self._stop(E2EmailError(f"stopped: reporting an outcome failed: {exc!r}"))


def _error_text(job: _Job, failed: dict[str, SMTPReply | None] | None) -> str | None:
    """The item's ``last_error`` in the outbox: why it is still there."""
    if job.pending and job.error is not None:
        return str(job.error)
    if job.pending:
        return "; ".join(f"{a}: refused for now: {job.replies.get(a)}" for a in job.pending)
    if failed:
        return "; ".join(f"{a}: refused: {r}" for a, r in failed.items())
    return None


async def deliver(
    smtp: SMTPSettings,
    submissions: Iterable[Submission],
    *,
    retry: RetryPolicy | None = None,
    connections: int = 1,
    outbox: Outbox | None = None,
    rand: Callable[[], float] | None = None,
    transport: SMTPTransport | None = None,
) -> tuple[list[CopyOutcome], E2EmailError | None]:
    """Deliver ``submissions``: an outcome for every one (in the order they became final),
    and the error that stopped the run early, if one did."""
    outcomes: list[CopyOutcome] = []
    engine = DeliveryEngine(
        smtp,
        retry=retry,
        connections=connections,
        outbox=outbox,
        on_outcome=outcomes.append,
        rand=rand,
        transport=transport,
    )
    async with engine:
        for sub in submissions:
            # After a stop this reports the submission deferred at once: every one gets an
            # outcome.
            await engine.submit(sub)
    return outcomes, engine.fatal
