"""``e2email.logging.EncryptedSMTPHandler``: :class:`logging.handlers.SMTPHandler`, protected.

A drop-in for the standard library's handler (same constructor arguments) that sends each
record as a signed and encrypted message, and that fixes what the standard one does wrong for
an application: it never blocks the calling thread on the network (records go to a queue and
one worker thread, with its own event loop, protects and sends them), it never sends in clear
(verified TLS always, no downgrade; the Subject, which often carries the error text, is hidden
inside the encryption as RFC 9788 header protection does for every e2email message), and it
never drops a record silently:

* a record whose delivery fails is kept, protected, in the outbox (``e2email outbox retry``
  or the handler's next successful send delivers it); while the server is unreachable, new
  records are protected and stored without trying the network again, until ``retry_interval``
  has passed;
* a record that cannot be protected (a recipient's key missing, the signing key locked) is
  never sent: its text is kept in ``HOME/drafts`` (a private folder, as ``e2email send`` keeps
  an unsendable body) and the problem is reported through :meth:`~logging.Handler.handleError`
  once per distinct reason, never raised into the application;
* :meth:`flush` and :meth:`close` wait for the queue, bounded by ``flush_timeout``; what is
  still queued when ``close`` gives up waiting is protected and stored without sending.

Records that e2email itself logs while this handler is sending (a port skipped, a retry) are
not sent by it: that would loop. They still reach the application's other handlers.

This module is ``e2email.logging``; inside e2email, ``import logging`` is the standard library
(absolute imports), as it is everywhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread  # now, not first at exit (see _Inline)
import contextlib
import contextvars
import datetime
import logging as _logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from e2email.client import AsyncMailer
from e2email.config import DEFAULT_PORTS, Protection, SMTPSettings, TLSMode, default_home
from e2email.errors import (
    ConfigError,
    CryptoError,
    E2EmailError,
    KeyErrorBase,
    MessageError,
)
from e2email.keystore import Keystore
from e2email.message import Message
from e2email.outbox import Outbox
from e2email.private import ensure_private_dir, write_private
from e2email.relay import store_copies

__all__ = ["EncryptedSMTPHandler"]

_T = TypeVar("_T")

#: Set in the worker thread (and copied into the threads asyncio.to_thread starts from it):
#: records logged there come from e2email itself, sending a record.
_sending: contextvars.ContextVar[bool] = contextvars.ContextVar("e2email_sending", default=False)


def _tls_mode(value: TLSMode | str | None) -> TLSMode | None:
    if value is None or isinstance(value, TLSMode):
        return value
    if value not in (TLSMode.IMPLICIT.value, TLSMode.STARTTLS.value):
        raise ConfigError(f"tls must be 'implicit' or 'starttls', not {value!r}")
    return TLSMode(value)


class _Inline(concurrent.futures.ThreadPoolExecutor):
    """The worker loop's default executor: runs each call at once, in the worker thread.

    ``asyncio.to_thread`` (gpg, Sequoia, the outbox, password sources, getaddrinfo) uses the
    loop's default executor. When a program exits without calling :func:`logging.shutdown`,
    logging's atexit hook flushes this handler only after ``threading._shutdown`` has stopped
    every thread pool: a new pool then refuses work ("cannot schedule new futures after
    interpreter shutdown", or "can't register atexit after shutdown" when the module is first
    imported then), and a record, or its "delivered" mark, would fail half-way. The worker
    has its own thread and loop and handles one record at a time, so running these calls
    inline costs no concurrency that matters and cannot be refused at exit."""

    def submit(
        self, fn: Callable[..., _T], /, *args: object, **kwargs: object
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine, as a pool does
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future


@dataclass(frozen=True)
class _Item:
    subject: str
    body: str
    created: float


class EncryptedSMTPHandler(_logging.Handler):
    """Send each log record as a protected message to ``toaddrs`` (see the module docs).

    The first seven arguments are :class:`logging.handlers.SMTPHandler`'s: ``mailhost`` is a
    host or ``(host, port)`` (no port: e2email's port search, 465 then 587 and 2525), TLS is
    always used and verified (``secure`` is accepted for compatibility: a client certificate
    in it is refused), ``credentials`` is ``(user, password)``, ``timeout`` each reply's
    timeout. Instead of ``mailhost``, give ``mailer=`` (an :class:`AsyncMailer` with an
    outbox, used only by this handler's thread) or ``account=`` (a configured account).
    ``protection`` is the policy (default: sign and encrypt, to self too); ``home`` is
    e2email's home (keys, outbox, drafts) when the handler makes its mailer; ``tls``
    (``"implicit"`` or ``"starttls"``; a port other than 465, 587, 2525 and 25 is STARTTLS
    unless told) and ``ca_file`` say how to verify the server.
    """

    def __init__(
        self,
        mailhost: str | tuple[str, int] | None = None,
        fromaddr: str | None = None,
        toaddrs: str | Sequence[str] | None = None,
        subject: str = "",
        credentials: tuple[str, str] | None = None,
        secure: tuple[()] | tuple[str] | tuple[str, str] | None = None,
        timeout: float = 5.0,
        *,
        account: str | None = None,
        mailer: AsyncMailer | None = None,
        protection: Protection | None = None,
        home: str | Path | None = None,
        tls: TLSMode | str | None = None,
        ca_file: str | Path | None = None,
        capacity: int = 10000,
        flush_timeout: float = 30.0,
        retry_interval: float = 60.0,
    ) -> None:
        super().__init__()
        if not fromaddr:
            raise ConfigError("EncryptedSMTPHandler needs fromaddr (the sender)")
        if not toaddrs:
            raise ConfigError("EncryptedSMTPHandler needs toaddrs (the recipients)")
        self.fromaddr = fromaddr
        self.toaddrs = [toaddrs] if isinstance(toaddrs, str) else list(toaddrs)
        self.subject = subject
        self.flush_timeout = flush_timeout
        self.retry_interval = retry_interval
        if secure:
            raise ConfigError(
                "EncryptedSMTPHandler always uses verified TLS; client certificates (secure="
                "(keyfile, certfile)) are not supported"
            )
        # Checked now, in the application's thread: a wrong address is a setup error.
        Message(sender=fromaddr, to=self.toaddrs)
        self._owns_mailer = mailer is None
        self.mailer = self._make_mailer(
            mailhost,
            credentials,
            timeout,
            account,
            mailer,
            protection,
            home,
            _tls_mode(tls),
            Path(ca_file) if ca_file is not None else None,
        )
        if self.mailer.outbox is None:
            raise ConfigError(
                "EncryptedSMTPHandler needs a mailer with an outbox: a record that cannot be "
                "delivered must be kept"
            )
        self.protection = protection
        self.drafts = Path(self.mailer.keystore.home) / "drafts"
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=capacity)
        self._pending = 0
        self._done = threading.Condition()
        self._closed = False
        #: Store without trying the network until this time (the server was unreachable).
        self._offline_until = 0.0
        #: Outbox IDs this handler stored without delivering (sent on the next success).
        self._backlog: list[str] = []
        self._store_only = False
        self._reported: set[str] = set()
        self._worker = threading.Thread(target=self._run, name="e2email-logging", daemon=True)
        self._worker.start()

    @staticmethod
    def _make_mailer(
        mailhost: str | tuple[str, int] | None,
        credentials: tuple[str, str] | None,
        timeout: float,
        account: str | None,
        mailer: AsyncMailer | None,
        protection: Protection | None,
        home: str | Path | None,
        tls: TLSMode | None,
        ca_file: Path | None,
    ) -> AsyncMailer:
        given = [n for n, v in (("mailhost", mailhost), ("account", account)) if v is not None]
        if mailer is not None:
            given.append("mailer")
        if len(given) != 1:
            raise ConfigError(
                "give EncryptedSMTPHandler one of mailhost, account= or mailer="
                + (f" (got {', '.join(given)})" if given else "")
            )
        if mailer is not None:
            return mailer
        if account is not None:
            from_account = getattr(AsyncMailer, "from_account", None)
            if from_account is None:
                raise ConfigError("account= needs accounts in a config file (not available)")
            made = from_account(account)
            assert isinstance(made, AsyncMailer)
            return made
        assert mailhost is not None
        host, port = (mailhost, None) if isinstance(mailhost, str) else mailhost
        if tls is None and port is not None and port not in DEFAULT_PORTS:
            # SMTPHandler speaks plain SMTP there, STARTTLS with ``secure``; here TLS is never
            # optional: STARTTLS, required, unless told it is implicit TLS.
            tls = TLSMode.STARTTLS
        user, password = credentials if credentials is not None else (None, None)
        base = Path(home) if home is not None else default_home()
        smtp = SMTPSettings(
            host=host,
            port=port,
            username=user,
            password=password,
            tls=tls,
            ca_file=ca_file,
            timeout=timeout,
            hosts_file=base / "hosts.json",
        )
        return AsyncMailer(
            smtp=smtp,
            keystore=Keystore(base),
            protection=protection,
            outbox=Outbox.in_home(base),
        )

    # -- the application's side -----------------------------------------------------------

    def getSubject(self, record: _logging.LogRecord) -> str:
        """The subject for ``record`` (``subject`` by default; override as for SMTPHandler).
        It is hidden inside the encryption, so it may say what went wrong."""
        return self.subject

    def emit(self, record: _logging.LogRecord) -> None:
        """Queue ``record``: formatting only, never the network."""
        if _sending.get():
            return  # logged by e2email while sending a record: sending it would loop
        try:
            item = _Item(
                subject=" ".join(self.getSubject(record).split()),
                body=self.format(record),
                created=record.created,
            )
        except Exception:
            self.handleError(record)
            return
        if self._closed:
            self._keep_draft(item, "the handler was closed")
            return
        with self._done:
            self._pending += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._done:
                self._pending -= 1
                self._done.notify_all()
            # A local write, not the network: the record is kept, never dropped.
            self._keep_draft(item, "the logging queue is full")

    def flush(self) -> None:
        """Wait (at most ``flush_timeout`` seconds) until every queued record is sent or
        kept."""
        self._wait(self.flush_timeout)

    def close(self) -> None:
        """Send what is queued (waiting at most ``flush_timeout``), store the rest protected
        without sending, and stop the worker."""
        if self._closed:
            super().close()
            return
        self._closed = True
        try:
            if not self._wait(self.flush_timeout):
                # Out of time: protect and store what is left (local work only).
                self._store_only = True
                self._wait(self.flush_timeout)
            self._queue.put(None)
            self._worker.join(self.flush_timeout)
            if self._pending:
                self._report(f"{self._pending} log record(s) were still being protected at exit")
            elif self._owns_mailer and not self._worker.is_alive():
                self.mailer.close()
                if self.mailer.outbox is not None:
                    self.mailer.outbox.close()
        finally:
            super().close()

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._done:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._done.wait(left)
        return True

    def handleError(self, record: _logging.LogRecord | None) -> None:
        """Report the exception being handled as one line on stderr, when
        :data:`logging.raiseExceptions` is set (as :class:`logging.Handler` does), but
        without the record's text: it may be what the encryption was to hide."""
        error = sys.exc_info()[1]
        self._report(f"{type(error).__name__}: {error}" if error else "cannot send a record")

    def _report(self, text: str) -> None:
        if not _logging.raiseExceptions:
            return
        # No stderr left (closed at exit): nothing more can be done.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"e2email.logging: {' '.join(text.split())}\n")

    def _report_once(self, reason: str) -> None:
        """handleError() for the exception being handled, once per distinct ``reason``: a
        server that is down for an hour is one report, not one per record."""
        if reason not in self._reported:
            self._reported.add(reason)
            self.handleError(None)

    def _keep_draft(self, item: _Item, why: str) -> Path | None:
        """Keep a record's text in HOME/drafts (0600 in a 0700 folder)."""
        try:
            folder = ensure_private_dir(self.drafts, what="the drafts folder")
            stamp = datetime.datetime.fromtimestamp(item.created, datetime.UTC)
            path = folder / f"log-{stamp:%Y%m%dT%H%M%S%fZ}-{id(item):x}.txt"
            write_private(path, f"Subject: {item.subject}\n\n{item.body}\n".encode())
        except E2EmailError as exc:
            self._report(f"a log record could not be kept ({why}): {exc}")
            return None
        if why not in self._reported:
            self._reported.add(why)
            self._report(f"a log record was not sent ({why}); its text is kept in {path}")
        return path

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        _sending.set(True)
        with asyncio.Runner() as runner:
            runner.get_loop().set_default_executor(_Inline(max_workers=1))
            while True:
                item = self._queue.get()
                if item is None:
                    return
                try:
                    runner.run(self._handle(item))
                except BaseException as exc:  # never let the worker die with records queued
                    self._keep_draft(item, f"internal error: {type(exc).__name__}")
                finally:
                    with self._done:
                        self._pending -= 1
                        self._done.notify_all()

    async def _handle(self, item: _Item) -> None:
        message = Message(
            sender=self.fromaddr,
            to=self.toaddrs,
            subject=item.subject,
            text=item.body,
            date=datetime.datetime.fromtimestamp(item.created, datetime.UTC),
        )
        mailer = self.mailer
        try:
            if self._store_only or time.time() < self._offline_until:
                copies = await mailer.protect(message, protection=self.protection)
                self._backlog.extend(await store_copies(mailer, copies))
                return
            copies = await mailer.protect(message, protection=self.protection)
            mailer.last_stored = ()
            try:
                await mailer.send_copies(copies)
            except E2EmailError:
                raise
            except Exception as exc:
                # Stored in the outbox already (perhaps delivered too, the "delivered" mark
                # failing): it is kept there, protected, and the outbox's states decide
                # whether it may go again (an interrupted send is "maybe delivered", never
                # resent by itself). Never also a plaintext draft, so never twice.
                if not mailer.last_stored:
                    raise
                self._backlog.extend(mailer.last_stored)
                self._report_once(f"interrupted: {type(exc).__name__}")
                return
        except (KeyErrorBase, CryptoError, MessageError) as exc:
            # Not protected, so never sent: keep the text, say why (once per reason).
            self._keep_draft(item, str(exc))
            return
        except E2EmailError as exc:
            kept = getattr(getattr(exc, "result", None), "kept", ()) or ()
            self._backlog.extend(kept)
            if not kept:
                self._keep_draft(item, str(exc))
                return
            self._offline_until = time.time() + self.retry_interval
            self._report_once(f"delivery: {type(exc).__name__}")
            return
        if self._backlog:
            await self._send_backlog()

    async def _send_backlog(self) -> None:
        """The server works again: send what was stored while it did not (the copies still
        in the outbox: ``outbox retry`` may have sent some meanwhile)."""
        outbox = self.mailer.outbox
        assert outbox is not None
        waiting = {it.id for it in await asyncio.to_thread(outbox.items)}
        backlog = [i for i in self._backlog if i in waiting]
        self._backlog = []
        try:
            outcomes = await self.mailer.send_outbox(backlog, include_failed=False)
        except E2EmailError:
            self._backlog = backlog
            self._report_once("backlog")
            return
        left = {o.id for o in outcomes if o.status != "delivered"}
        self._backlog = [i for i in backlog if i in left]

    def __repr__(self) -> str:
        level = _logging.getLevelName(self.level)
        return f"<EncryptedSMTPHandler {', '.join(self.toaddrs)} ({level})>"
