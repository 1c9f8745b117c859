"""SMTP submission over verified TLS, built on :mod:`aiosmtplib`.

This layer takes finished message bytes and envelope addresses; it never sees keys. It sends
the bytes exactly as given (``sendmail()``, never ``send_message()``, which re-serialises:
standards item 4) and refuses to move anything but an EHLO and STARTTLS in the clear:

* Implicit TLS (port 465) is TLS from the first byte (RFC 8314 §3.3).
* STARTTLS is *required*: a server that does not offer it is refused before anything else is
  sent (RFC 3207 §4; aiosmtplib's default ``start_tls=None`` is opportunistic and a man in the
  middle can strip the offer, so it is never used).
* Certificates and host names are always verified (RFC 8314 §4.4, RFC 7817) and the protocol is
  TLS 1.2 or newer (RFC 8997).
* AUTH (PLAIN or LOGIN, RFC 4954; or XOAUTH2 with an OAuth2 access token) happens only after
  TLS, and the password or token source is asked only then.
* REQUIRETLS (RFC 8689) when asked: refused before MAIL if the server does not offer it.
* PIPELINING (RFC 2920) when the server offers it: MAIL, every RCPT and DATA in one write,
  their replies read in order (see :meth:`SMTPConnection._pipelined`); the outcomes are those
  of the one-command-at-a-time exchange.
* CHUNKING (RFC 3030) when the server offers it together with PIPELINING: MAIL, every RCPT,
  ``BDAT <size> LAST`` and the message itself in one write, the replies read after: one round
  trip per message, no dot-stuffing (see :meth:`SMTPConnection._chunked`), for copies that
  fit in one write; larger copies, and servers without both offers, get DATA as before.
* Without a configured port, the ports of ``SMTPSettings.port_order`` are tried in turn, but
  only past ports that cannot be reached or offer no STARTTLS (reported); a certificate or
  TLS version failure stops the search. See :mod:`e2email.transport.ports`.
* Separate timeouts for connecting, for each command and for the message data; every timeout
  is a :class:`~e2email.errors.ConnectError` saying "timed out". After the connection is up,
  every wait is bounded by our own ``asyncio.timeout()``, never by aiosmtplib's
  ``asyncio.wait_for()``, so a cancellation (Ctrl-C) is never lost (see :func:`_bounded`).

Every aiosmtplib, ssl and socket exception is translated here into the
:mod:`e2email.errors` tree, chained with ``raise ... from``. Each error's ``transient`` tells a
retry loop whether waiting may help.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import email.utils
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from e2email.config import SMTPSettings, TLSMode
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    DeliveryError,
    E2EmailError,
    InsecureTransportError,
    MessageError,
    RecipientsRefusedError,
    RequireTLSError,
    SMTPReply,
    TLSError,
    TransportError,
)
from e2email.message import check_wire_safe
from e2email.outcome import (
    CopyOutcome,
    RecipientOutcome,
    RecipientStatus,
    TLSInfo,
    deprecated_name,
)
from e2email.spool import Spool, line_pieces
from e2email.transport.ports import (
    NO_TLS_OUTCOMES,
    HostMemory,
    Outcome,
    PortAttempt,
    order_candidates,
)
from e2email.transport.text import server_text

__all__ = [
    "DeliveryResult",
    "RecipientResult",
    "SMTPConnection",
    "SMTPTransport",
    "TLSInfo",
    "client_tls_context",
]

log = logging.getLogger(__name__)

#: The only AUTH mechanisms we use, in order of preference. Both send the password, so both are
#: only ever used inside TLS (RFC 4954 §4, RFC 4616 §6). PLAIN needs one round trip.
_AUTH_MECHANISMS = ("plain", "login")

#: Negotiated protocol versions we accept (RFC 8997: TLS 1.2 is the minimum).
_MIN_TLS = ssl.TLSVersion.TLSv1_2

#: Characters that may never appear in an envelope address: controls (CR, LF and NUL would end
#: or split the SMTP command line), space and the angle brackets that delimit the path.
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x20\x7f<>]")

#: RFC 5321 §4.5.3.1.3: a reverse- or forward-path is at most 256 octets, brackets included.
_MAX_PATH = 254

#: OpenSSL reason codes that mean the two sides share no acceptable protocol version.
_VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "WRONG_SSL_VERSION",
    }
)


#: DATA is written in pieces of about this size, each cut just after a CRLF and each waiting
#: for the connection to take it (flow control), so a large message is never copied whole.
_DATA_CHUNK = 256 * 1024
#: The largest copy sent with BDAT (RFC 3030) in the same write as MAIL and RCPT: larger ones
#: go by DATA, whose 354 lets a refusal of the sender or recipients stop the send before the
#: message (a kernel's socket buffers would take megabytes before the server read MAIL). The
#: round trip saved matters for small messages only.
_CHUNK_MAX = _DATA_CHUNK

_T = TypeVar("_T")

_HANDSHAKE_DROPPED_HINT = (
    "the server closed the connection during the TLS handshake; it may not support TLS 1.2 "
    "or newer (RFC 8997), or not speak TLS on this port"
)


#: Deprecated names, kept for one release: one transaction's result is a
#: :class:`~e2email.outcome.CopyOutcome`, each recipient's a
#: :class:`~e2email.outcome.RecipientOutcome` (``accepted`` is still a property of it). Reading
#: them warns (DeprecationWarning); their old positional forms raise TypeError.
if TYPE_CHECKING:
    DeliveryResult = CopyOutcome
    RecipientResult = RecipientOutcome
_DEPRECATED = {
    "DeliveryResult": (CopyOutcome, "e2email.outcome.CopyOutcome"),
    "RecipientResult": (RecipientOutcome, "e2email.outcome.RecipientOutcome"),
}


def __getattr__(name: str) -> object:  # PEP 562: the deprecated names above
    return deprecated_name(__name__, name, _DEPRECATED)


#: Envelope addresses that passed :func:`_check_address` lately: a bulk run sends from one
#: address to a few, and ``parseaddr`` costs a tenth of a millisecond per address per message.
#: Only addresses that passed are kept (a refusal is worked out again, with its message).
_GOOD_ADDRESSES: dict[str, None] = {}
_GOOD_ADDRESSES_MAX = 1024


def _check_address(address: str, *, field: str) -> None:
    """Refuse an envelope address that could inject SMTP syntax (standards item 20).

    aiosmtplib re-parses addresses with ``email.utils.parseaddr`` before quoting them; we
    require that to be a no-op, so the path on the wire is exactly the address given.
    """
    if address in _GOOD_ADDRESSES:
        return
    _judge_address(address, field=field)
    if len(_GOOD_ADDRESSES) >= _GOOD_ADDRESSES_MAX:
        _GOOD_ADDRESSES.clear()
    _GOOD_ADDRESSES[address] = None


def _judge_address(address: str, *, field: str) -> None:
    if not address:
        raise MessageError("empty envelope address", field=field)
    if not address.isascii():
        raise MessageError(
            f"address {address!r} is not ASCII; that needs SMTPUTF8 (RFC 6531), "
            "which e2email does not use",
            field=field,
        )
    if _BAD_ADDRESS_CHARS.search(address):
        raise MessageError(
            f"address {address!r} contains a control character, space or angle bracket",
            field=field,
        )
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise MessageError(f"address {address!r} is not of the form local@domain", field=field)
    if len(address) > _MAX_PATH:
        raise MessageError(f"address {address[:40]!r}... is too long", field=field)
    if email.utils.parseaddr(address)[1] != address:
        raise MessageError(f"address {address!r} is not a plain addr-spec", field=field)


def _check_envelope(mail_from: str, recipients: Sequence[str]) -> tuple[str, ...]:
    """Validate the envelope; return the recipients with exact duplicates dropped."""
    if isinstance(recipients, str):
        # A bare string is a Sequence[str] too; sending to each of its characters is never meant.
        raise MessageError("recipients must be a sequence of addresses, not a string")
    _check_address(mail_from, field="mail_from")
    if not recipients:
        raise MessageError("no envelope recipients")
    for rcpt in recipients:
        _check_address(rcpt, field="recipients")
    return tuple(dict.fromkeys(recipients))


def client_tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The TLS client context e2email submits with: chain and host name verified, TLS >= 1.2,
    trusting only ``ca_file`` when given, else the system store. (``e2email doctor`` uses it
    too, so it judges a server exactly as sending would.)"""
    return _client_context(ca_file)


def _client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the certificate chain and the host name.

    With ``ca_file`` only that file is trusted (``create_default_context`` then skips the system
    store); otherwise the system's trust store is used.
    """
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file is not None else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA file {ca_file}: {exc}") from exc
    # These are create_default_context's defaults; set them anyway so that no later change of
    # default can weaken us (RFC 8314 §4.4, RFC 7817 §3).
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.minimum_version = _MIN_TLS
    return ctx


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind ``exc``, if any (aiosmtplib wraps some, not others)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        todo.extend((current.__cause__, current.__context__))
    return None


def _ssl_text(exc: ssl.SSLError) -> str:
    """OpenSSL's message without the ``(_ssl.c:1006)`` source location."""
    text = exc.strerror if isinstance(exc.strerror, str) else str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)\s*$", "", text)


def _tls_error(exc: ssl.SSLError, where: str) -> TLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Pass OpenSSL's verify message through: it says what is wrong ("Hostname mismatch,
        # certificate is not valid for 'x'", "self-signed certificate in certificate chain").
        detail = server_text(exc.verify_message or _ssl_text(exc))
        return TLSError(
            f"TLS certificate of {where} not accepted: certificate verify failed: {detail}",
            host=where,
        )
    text = _ssl_text(exc)
    hint = ""
    if exc.reason in _VERSION_REASONS:
        hint = " (e2email requires TLS 1.2 or newer, RFC 8997)"
    elif exc.reason == "WRONG_VERSION_NUMBER":
        hint = " (is this a STARTTLS port? 465 uses implicit TLS, 587 STARTTLS)"
    elif exc.reason == "UNEXPECTED_EOF_WHILE_READING":
        hint = f" ({_HANDSHAKE_DROPPED_HINT})"
    return TLSError(f"TLS handshake with {where} failed: {text}{hint}", host=where)


def _reply(exc: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPResponse) -> SMTPReply:
    """The server's reply as an :class:`SMTPReply`, its text made safe to print (the one place
    replies are made: every consumer, terminal, log or outbox, gets them clean)."""
    return SMTPReply(exc.code, server_text(exc.message))


def _reason(exc: BaseException) -> str:
    """The most telling text for a connection-level failure (made safe to print: an
    exception's text may quote the server)."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and str(cause):
        return server_text(str(cause))
    if isinstance(exc, aiosmtplib.SMTPException):
        return server_text(exc.message)
    return server_text(str(exc)) or type(exc).__name__


async def _bounded(smtp: aiosmtplib.SMTP, call: Awaitable[_T], seconds: float | None) -> _T:
    """Await ``call``, an aiosmtplib command made with ``timeout=None``, for at most
    ``seconds`` (``None``: no limit).

    Why not aiosmtplib's own timeouts: they use ``asyncio.wait_for()``, which on Python 3.11
    loses a cancellation that arrives while the reply it waits for has just come in (it returns
    the reply instead of raising; CPython gh-86296, fixed in 3.12). A Ctrl-C at that moment was
    swallowed and the send went on: the rest of the message, the final dot, a delivery after
    the user said stop. With ``timeout=None`` aiosmtplib awaits the reply directly and
    ``asyncio.timeout()`` lets every cancellation through. As with aiosmtplib's own timeout the
    session is closed (a late reply would pair with the next command) and the error is
    aiosmtplib's ``SMTPReadTimeoutError``, so callers handle both alike.
    """
    try:
        async with asyncio.timeout(seconds):
            return await call
    except aiosmtplib.SMTPException:
        raise
    except TimeoutError as exc:
        smtp.close()
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc


# MAIL and RCPT as aiosmtplib's ``mail()`` and ``rcpt()`` send them (RFC 5321 §4.1.1.2-3),
# minus their re-parsing of each address (``email.utils.parseaddr``, a tenth of a millisecond
# per address and message): :func:`_check_address` already required the address to be a plain
# ASCII addr-spec that parseaddr leaves as it is, with no space, control or angle bracket, so
# aiosmtplib's quoting would give exactly ``<address>``. The session greeted us already, and a
# reply other than the expected one raises the same aiosmtplib exception as those methods.


async def _mail(smtp: aiosmtplib.SMTP, sender: str, options: Sequence[str]) -> None:
    response = await smtp.execute_command(
        b"MAIL",
        b"FROM:<" + sender.encode("ascii") + b">",
        *(option.encode("ascii") for option in options),
        timeout=None,
    )
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)


async def _rcpt(smtp: aiosmtplib.SMTP, recipient: str) -> None:
    response = await smtp.execute_command(
        b"RCPT", b"TO:<" + recipient.encode("ascii") + b">", timeout=None
    )
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)


#: The longest reply :class:`_Replies` takes (aiosmtplib's bound for one whole reply).
_MAX_REPLY = 32 * 1024


class _Replies(asyncio.Protocol):
    """The server's replies to a pipelined group of commands (RFC 2920), read in order.

    aiosmtplib reads one reply per command written and awaited: its protocol parses a reply
    only when data arrives while a read is pending, and drops what arrives otherwise, so two
    replies in one packet (what pipelining produces) would lose the second. While a pipelined
    transaction is under way this protocol takes the connection's incoming bytes instead
    (``asyncio.BaseTransport.set_protocol``, the public way to do so) and keeps every reply;
    writes, flow control and the loss of the connection still go to aiosmtplib's protocol, so
    its state stays true. Put back with :meth:`installed`'s exit before any aiosmtplib command
    (RSET, QUIT) is sent.

    At most ``limit`` replies are kept unread (a well-behaved server cannot have sent more
    than the transaction's commands ahead): more means the server is out of step with the
    commands, and the reading fails, as for a reply that cannot be parsed.
    """

    def __init__(self, inner: SMTPProtocol, *, limit: int = 1 << 30) -> None:
        self._inner = inner
        self._limit = limit
        self._buffer = bytearray()
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        #: What ends the reading: the connection's loss, or a reply that cannot be parsed.
        self._failure: aiosmtplib.SMTPException | None = None

    @classmethod
    @contextlib.contextmanager
    def installed(cls, smtp: aiosmtplib.SMTP, *, limit: int) -> Iterator[_Replies]:
        protocol, transport = smtp.protocol, smtp.transport
        if protocol is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        replies = cls(protocol, limit=limit)
        transport.set_protocol(replies)
        try:
            yield replies
        finally:
            # Unread bytes are dropped with this object, as aiosmtplib drops unsolicited data.
            transport.set_protocol(protocol)

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    @property
    def queued(self) -> bool:
        """Has a reply arrived that no read took yet?"""
        return bool(self._replies)

    def check_idle(self) -> None:
        """Raise if anything arrived that no read took: what ends the reading (the
        connection's loss, a malformed reply), or a reply (then the server is out of
        step)."""
        if self._failure is not None:
            raise self._failure
        if self._replies:
            raise aiosmtplib.SMTPServerDisconnected(
                "the server replied before the end of the data (out of step)"
            )

    def ready(self) -> aiosmtplib.SMTPResponse | None:
        """The next reply if it has arrived already (a group's replies mostly come in one
        packet: no wait, so no timer, for the second and later), else ``None``."""
        return self._replies.popleft() if self._replies else None

    async def read(self) -> aiosmtplib.SMTPResponse:
        """The next reply; the connection's loss (or a malformed reply) raises as aiosmtplib
        would (:class:`aiosmtplib.SMTPServerDisconnected`, ``SMTPResponseException``)."""
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._buffer += data
        # Every complete reply (RFC 5321 §4.2: "code-" lines, then one "code SP" line).
        start = 0
        lines: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            code = line[:3]
            if not code.isdigit():
                text = f"Malformed SMTP response line: {line.decode('ascii', 'replace')}"
                self._fail(aiosmtplib.SMTPResponseException(-1, text))
                return
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                self._replies.append(aiosmtplib.SMTPResponse(int(code), text))
                if len(self._replies) > self._limit:
                    # Replies to commands never sent: whatever is read next could be any of
                    # them. What came before is dropped too; the caller closes the session.
                    self._replies.clear()
                    self._fail(
                        aiosmtplib.SMTPResponseException(
                            -1, "the server sent more replies than there were commands"
                        )
                    )
                    return
                lines = []
                del self._buffer[:start]
                start = 0
        if len(self._buffer) > _MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        if self._replies:
            self._wake()

    def _fail(self, failure: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = failure
        self._buffer.clear()
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes, and connection_lost() follows

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def _next_reply(
    smtp: aiosmtplib.SMTP, replies: _Replies, timeout: float | None
) -> aiosmtplib.SMTPResponse:
    """The next reply of a pipelined group, waited for (see :func:`_bounded`) only when it
    has not arrived yet."""
    reply = replies.ready()
    if reply is None:
        reply = await _bounded(smtp, replies.read(), timeout)
    return reply


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop while a wait swallowed the request.

    Used after aiosmtplib's connect(), whose TCP, greeting and STARTTLS waits use
    ``asyncio.wait_for()`` internally (see :func:`_bounded`): there a lost cancellation only
    means a connection was opened, over which nothing of the message or the credentials went
    yet, so stopping right after is exact. ``Task.cancelling()`` still counts the request."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _quit_quietly(smtp: aiosmtplib.SMTP) -> None:
    """QUIT (RFC 5321 §4.1.1.10) if the session is still up, then close the socket.

    Errors here cannot change the outcome, so they are ignored.
    """
    transport = smtp.transport
    try:
        if smtp.is_connected:
            await _bounded(smtp, smtp.quit(timeout=None), smtp.timeout)
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()
        # aiosmtplib's close() on a TLS transport starts a close_notify exchange that needs
        # more turns of the event loop; when the loop stops first (asyncio.run() returning)
        # the socket leaks. After QUIT (or a failure) there is nothing left to protect, so
        # drop the connection now and give the loop one turn to release the socket.
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        await asyncio.sleep(0)


class _AttemptFailed(Exception):
    """Internal: connecting on one port failed before the session was usable."""

    def __init__(self, error: TransportError, outcome: Outcome) -> None:
        super().__init__(str(error))
        self.error = error
        self.outcome = outcome


class SMTPConnection:
    """An open SMTP session: TLS-protected (unless the insecure plaintext opt-in was used) and
    authenticated if a user name is configured. Made by :meth:`SMTPTransport.connect`; not
    constructed directly."""

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        *,
        where: str,
        tls: TLSInfo | None,
        extensions: Mapping[str, str],
        settings: SMTPSettings | None = None,
        port: int = 0,
        mode: TLSMode = TLSMode.IMPLICIT,
        attempts: Sequence[PortAttempt] = (),
    ) -> None:
        self._smtp = smtp
        self._where = where
        self._tls = tls
        self._extensions: Mapping[str, str] = MappingProxyType(dict(extensions))
        self._settings = settings
        self._port = port
        self._mode = mode
        self._attempts = tuple(attempts)
        # One mail transaction at a time: MAIL..DATA of two sends must not interleave.
        self._lock = asyncio.Lock()
        self._end_of_data_sent = False
        self._stage: str | None = None
        #: The latest send closed the session itself, the server's replies being out of step
        #: with the commands, after a refusal it could still read (see :meth:`_closed_by`).
        self._out_of_step = False
        self._reset_at: float | None = None
        #: The latest send is reading the replies to a pipelined group (RFC 2920).
        self._in_group = False
        #: The latest send's group carried the message in BDAT (RFC 3030).
        self._chunked_group = False

    @property
    def tls(self) -> TLSInfo | None:
        return self._tls

    @property
    def extensions(self) -> Mapping[str, str]:
        """The EHLO keywords (lower case) the server announced *after* TLS was established."""
        return self._extensions

    @property
    def where(self) -> str:
        """``host:port`` of this session."""
        return self._where

    @property
    def port(self) -> int:
        return self._port

    @property
    def mode(self) -> TLSMode:
        return self._mode

    @property
    def attempts(self) -> tuple[PortAttempt, ...]:
        """Every port tried to open this session, the last one the one that worked."""
        return self._attempts

    @property
    def end_of_data_sent(self) -> bool:
        """Has the latest :meth:`send` written the end-of-data line without reading the reply
        to it (a lost reply, a timeout or a cancellation after the final ".")? Then the
        server may have taken the message (RFC 5321 §6.1). With CHUNKING (:attr:`chunking`)
        the same from the message's last octet until a reply settles it (BDAT's, or a
        refusal of MAIL or of every RCPT)."""
        return self._end_of_data_sent

    @property
    def stage(self) -> str | None:
        """Where the latest :meth:`send` stopped: ``"MAIL"``, ``"RCPT"`` or ``"DATA"`` (the
        command it was at when it failed; BDAT counts as ``"DATA"``), ``None`` when it
        completed or none was made. A failure at ``"MAIL"`` means the server took nothing of
        that transaction, unless the error says it may have (``maybe_delivered``: with
        CHUNKING the message goes in the same write as MAIL)."""
        return self._stage

    @property
    def reset_at(self) -> float | None:
        """When (``time.monotonic()``) the server accepted the RSET with which the latest
        :meth:`send` cleared its refused transaction; ``None`` if it made none (or it
        failed, which closes the session). The session was then clean and alive."""
        return self._reset_at

    @property
    def pipelining(self) -> bool:
        """Does the server offer PIPELINING (RFC 2920)? Then :meth:`send` writes MAIL, every
        RCPT and DATA at once and reads their replies after: two round trips per message
        instead of three plus one per recipient."""
        return "pipelining" in self._extensions

    @property
    def chunking(self) -> bool:
        """Does the server offer CHUNKING (RFC 3030) *and* PIPELINING (RFC 2920)? Then
        :meth:`send` writes MAIL, every RCPT, ``BDAT <size> LAST`` and the message at once and
        reads the replies after: one round trip per message. (CHUNKING alone would save
        nothing over DATA: each command would still wait for its reply.)"""
        return "chunking" in self._extensions and "pipelining" in self._extensions

    @property
    def is_connected(self) -> bool:
        """Is the session still up (not closed by us, the server or a failure)?"""
        return bool(self._smtp.is_connected)

    def _timeouts(self) -> tuple[float | None, float | None]:
        settings = self._settings
        if settings is None:
            return None, None
        return settings.effective_command_timeout, settings.effective_data_timeout

    async def send(
        self,
        raw: bytes | Spool,
        *,
        mail_from: str,
        recipients: Sequence[str],
        require_tls: bool | None = None,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> CopyOutcome:
        """Send ``raw`` unchanged to ``recipients``.

        Whatever the server answers is returned, not raised: one :class:`RecipientOutcome` per
        recipient (accepted: ``delivered`` with DATA's reply; refused at RCPT, MAIL or DATA:
        ``failed`` for a 5xx, ``deferred`` for a 4xx, with that reply, RFC 5321 §4.2.1). When
        the server refused the transaction (the sender, every recipient, or the data), the
        outcome's ``error`` says so (:class:`DeliveryError`, :class:`RecipientsRefusedError`)
        and the session is reset (RSET, RFC 5321 §4.1.1.5) and can carry another message.
        Raised: what leaves no answer about the recipients or ends the session: the
        connection lost or timed out, or a reply that cannot be read or comes out of step
        (:class:`ConnectError`, the session closed), a reply that closed the session (e.g.
        421, :class:`DeliveryError`), bad input (:class:`MessageError`).
        ``require_tls`` overrides ``SMTPSettings.require_tls`` for this
        message: REQUIRETLS (RFC 8689) on MAIL FROM, or :class:`RequireTLSError` before MAIL
        when the server does not offer it.

        ``before_end`` is awaited just before the end-of-data line is written (with CHUNKING:
        before the write that carries the message's last octet, for a small message the one
        write of the whole transaction): the caller records there that the message may be
        delivered from now on (e.g. in the outbox), so a crash after the "." is never taken
        for "not sent". A failure after that line (or octet) has ``maybe_delivered`` set on
        the error.
        """
        self._end_of_data_sent = False
        self._stage = None
        self._out_of_step = False
        self._reset_at = None
        self._in_group = False
        self._chunked_group = False
        rcpts = _check_envelope(mail_from, recipients)
        # SMTP smuggling (CVE-2023-51764) and RFC 5322 §2.1.1: only CRLF line ends, no NUL, no
        # 8-bit bytes, lines of at most 998 octets. aiosmtplib would "repair" bare CR/LF; we
        # refuse instead, so what was signed is what is sent, and no "<LF>.<CR><LF>" or
        # "<CR><LF>.<LF>" can end DATA early on a lenient server.
        check_wire_safe(raw)
        if require_tls is None:
            require_tls = self._settings.require_tls if self._settings is not None else False
        where = self._where
        options: list[str] = []
        if "size" in self._extensions:
            # RFC 1870: the size as transmitted; aiosmtplib adds the final CRLF if missing.
            size = len(raw) if raw.endswith(b"\r\n") else len(raw) + 2
            options.append(f"SIZE={size}")
        if require_tls:
            if self._tls is None:
                raise RequireTLSError("REQUIRETLS needs TLS", host=where)
            if "requiretls" not in self._extensions:
                raise RequireTLSError(
                    f"{where} does not offer REQUIRETLS (RFC 8689), which was required; "
                    "the message was not sent",
                    host=where,
                )
            options.append("REQUIRETLS")
        command_timeout, data_timeout = self._timeouts()
        smtp = self._smtp
        pipelined = self.pipelining
        chunked = self.chunking
        async with self._lock:
            self._stage = "MAIL"
            refusals: dict[str, SMTPReply] = {}
            try:
                response: aiosmtplib.SMTPResponse | None = None
                try:
                    if chunked and isinstance(raw, bytes) and len(raw) <= _CHUNK_MAX:
                        response = await self._chunked(
                            raw, mail_from, rcpts, options, before_end, refusals
                        )
                    elif pipelined:
                        response = await self._pipelined(
                            raw, mail_from, rcpts, options, before_end, refusals
                        )
                    else:
                        await _bounded(smtp, _mail(smtp, mail_from, options), command_timeout)
                        self._stage = "RCPT"
                        for rcpt in rcpts:
                            try:
                                await _bounded(smtp, _rcpt(smtp, rcpt), command_timeout)
                            except aiosmtplib.SMTPRecipientRefused as exc:
                                refusals[rcpt] = _reply(exc)
                                if not smtp.is_connected:  # e.g. 421: the server closed it
                                    raise
                    if len(refusals) == len(rcpts):
                        await self._reset()
                        every = RecipientsRefusedError(
                            [(r, refusals[r]) for r in rcpts], host=where
                        )
                        return self._refused(mail_from, rcpts, refusals, every)
                    if response is None:
                        self._stage = "DATA"
                        response = await self._data(raw, data_timeout, before_end)
                except aiosmtplib.SMTPSenderRefused as exc:
                    sender = DeliveryError(
                        f"{where} refused the sender {mail_from}", host=where, reply=_reply(exc)
                    )
                    if self._closed_by(exc):
                        raise sender from exc
                    await self._reset()
                    return self._refused(mail_from, rcpts, {}, sender)
                except aiosmtplib.SMTPDataError as exc:  # DATA or the data refused
                    data = DeliveryError(
                        f"{where} refused the message data", host=where, reply=_reply(exc)
                    )
                    if self._closed_by(exc):
                        raise data from exc
                    await self._reset()
                    return self._refused(mail_from, rcpts, refusals, data)
            except aiosmtplib.SMTPTimeoutError as exc:
                stage = self._stage
                timeout = data_timeout if stage == "DATA" else command_timeout
                hint = ""
                if self._in_group:
                    # A server that offers PIPELINING yet answers only the first command of
                    # each packet leaves the rest of the group unanswered: say so, or the
                    # timeout looks like a slow server.
                    hint = (
                        " (MAIL, RCPT and BDAT with the message were sent together, as its"
                        " offer of PIPELINING and CHUNKING allows, RFC 2920 and RFC 3030; it"
                        " may not really support that)"
                        if self._chunked_group
                        else " (MAIL, RCPT and DATA were sent together, as its offer of"
                        " PIPELINING allows, RFC 2920; it may not really support that)"
                    )
                error = ConnectError(
                    f"timed out after {timeout:g} s waiting for {where}'s reply to {stage}"
                    + hint
                    + _maybe_delivered(self._end_of_data_sent),
                    host=where,
                )
                error.maybe_delivered = self._end_of_data_sent
                raise error from exc
            except aiosmtplib.SMTPResponseException as exc:
                # Anything else with a code, e.g. a 421 to RCPT that closed the session, or a
                # reply that could not be parsed (aiosmtplib's code -1, which leaves the bad
                # line in its buffer) or came out of step: either way the session is over, as
                # a later command would read a reply not meant for it.
                smtp.close()
                if exc.code < 200:
                    # Not the server's answer, so no refusal (a retry may well work); after
                    # the final "." the server may have taken the message (RFC 5321 §6.1).
                    error = ConnectError(
                        f"unreadable reply from {where} at {self._stage}: "
                        f"{server_text(exc.message)}" + _maybe_delivered(self._end_of_data_sent),
                        host=where,
                    )
                    error.maybe_delivered = self._end_of_data_sent
                    raise error from exc
                raise DeliveryError(
                    f"{where} refused the message at {self._stage}", host=where, reply=_reply(exc)
                ) from exc
            except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:
                error = ConnectError(
                    f"connection to {where} lost at {self._stage}: {_reason(exc)}"
                    + _maybe_delivered(self._end_of_data_sent),
                    host=where,
                )
                error.maybe_delivered = self._end_of_data_sent
                raise error from exc
            except aiosmtplib.SMTPException as exc:
                raise TransportError(
                    f"sending via {where} failed: {server_text(str(exc))}", host=where
                ) from exc
            except ValueError as exc:  # aiosmtplib's own address/command-injection checks
                raise MessageError(server_text(str(exc))) from exc

        self._stage = None
        log.debug("%s accepted message for %d recipient(s)", where, len(rcpts) - len(refusals))
        data_reply = _reply(response)
        return CopyOutcome(
            mail_from=mail_from,
            # Accepted recipients have DATA's reply as the server's last word about them.
            recipients=tuple(
                RecipientOutcome.from_refusal(r, refusals[r])
                if r in refusals
                else RecipientOutcome(r, "delivered", data_reply)
                for r in rcpts
            ),
            data_reply=data_reply,
            tls=self._tls,
        )

    def _closed_by(self, exc: aiosmtplib.SMTPResponseException) -> bool:
        """Did this refusal end the session (a 421, RFC 5321 §3.8, or the server gone)? Then
        it is raised, like a lost connection: nothing more can be said per recipient, and a
        reused connection closed at MAIL is replaced without counting an attempt. Asked
        before any RSET: after a 421 nothing more is sent (the server may be slow to hang
        up), so the session is closed here. A session this side closed because the server
        got out of step (:attr:`_out_of_step`) still has its refusal reported, not raised."""
        if exc.code == 421:
            self._smtp.close()
            return True
        return not self._smtp.is_connected and not self._out_of_step

    def _refused(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        refusals: Mapping[str, SMTPReply],
        error: DeliveryError,
    ) -> CopyOutcome:
        """The outcome of a transaction the server refused as a whole (the sender, every
        recipient, or the data): recipients it refused at RCPT keep that reply; the others get
        the refusal of the transaction, ``deferred`` for a 4xx and ``failed`` for a 5xx (RFC
        5321 §4.2.1), with ``error``'s text. ``error`` goes with the outcome, not raised."""
        status: RecipientStatus = "deferred" if error.transient else "failed"
        return CopyOutcome(
            mail_from=mail_from,
            recipients=tuple(
                RecipientOutcome.from_refusal(r, refusals[r])
                if r in refusals
                else RecipientOutcome(r, status, error.reply, str(error))
                for r in rcpts
            ),
            tls=self._tls,
            error=error,
        )

    async def _pipelined(
        self,
        raw: bytes | Spool,
        mail_from: str,
        rcpts: Sequence[str],
        options: Sequence[str],
        before_end: Callable[[], Awaitable[None]] | None,
        refusals: dict[str, SMTPReply],
    ) -> aiosmtplib.SMTPResponse | None:
        """MAIL, every RCPT and DATA in one write, their replies read in order (RFC 2920
        §3.1: DATA ends the group, its outcome decides what follows), then the message as in
        :meth:`_data`. Fills ``refusals`` with the refused recipients as their replies come
        (so a refusal of the data keeps them) and returns the final reply, ``None`` when every
        recipient was refused (the caller resets and reports them, as without pipelining).

        Raises as the one-command-at-a-time exchange does: ``SMTPSenderRefused`` (after the
        rest of the group's replies were read), ``SMTPRecipientRefused`` for a refusal that
        ended the session, ``SMTPDataError`` for DATA or the message refused; the caller sends
        RSET, once the replies are read and aiosmtplib has the connection back.

        What the server closed before this transaction is found at MAIL (stage ``"MAIL"``),
        with nothing of the message sent: only the envelope commands went out.
        """
        smtp = self._smtp
        command_timeout, data_timeout = self._timeouts()
        group = [b"MAIL FROM:<" + mail_from.encode("ascii") + b">"]
        group[0] += b"".join(b" " + option.encode("ascii") for option in options)
        group.extend(b"RCPT TO:<" + rcpt.encode("ascii") + b">" for rcpt in rcpts)
        group.append(b"DATA\r\n")
        # More unread replies than the group's and the one to the final "." would mean the
        # server answers commands never sent (RFC 2920 §3.1: one reply per command): refused,
        # not queued without end. (One stray reply within that bound is caught before the ".".)
        with _Replies.installed(smtp, limit=len(rcpts) + 3) as replies:
            replies.write(b"\r\n".join(group))
            self._in_group = True
            # Replies still to read: should anything stop the reading early, the session is
            # out of step (the next command would get an old reply) and is closed.
            unread = len(rcpts) + 2
            try:
                mail = await _next_reply(smtp, replies, command_timeout)
                unread -= 1
                if mail.code != 250:
                    if mail.code != 421:  # 421: the server is closing (RFC 5321 §3.8)
                        with contextlib.suppress(aiosmtplib.SMTPException):
                            # "503 need MAIL" to each RCPT and to DATA, as a rule.
                            last = await self._drain_group(replies, unread, data_timeout)
                            unread = 0
                            if last is not None and last.code == 354:
                                # DATA taken without a sender: a server this confused is
                                # not sent even a lone "." (RFC 2920 §3.1 allows that only
                                # when no recipient was accepted); the refusal stands.
                                smtp.close()
                                self._out_of_step = True
                    raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, mail_from)
                self._stage = "RCPT"
                for rcpt in rcpts:
                    reply = await _next_reply(smtp, replies, command_timeout)
                    unread -= 1
                    if reply.code not in (250, 251):
                        refusals[rcpt] = _reply(reply)
                        if reply.code == 421 or not smtp.is_connected:  # closing, §3.8
                            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
                self._stage = "DATA"
                if len(refusals) == len(rcpts):
                    # RFC 2920 §3.1: DATA's reply must be read all the same (503 or 554).
                    last = await self._drain_group(replies, unread, data_timeout)
                    unread = 0
                    self._in_group = False
                    if last is not None and last.code == 354:
                        # RFC 2920 §3.1: a 354 with no recipient accepted; that empty message
                        # is ended at once with a lone "." (the caller's RSET then clears it).
                        replies.write(b".\r\n")
                        await _next_reply(smtp, replies, data_timeout)
                    self._stage = "RCPT"
                    return None
                start = await _next_reply(smtp, replies, data_timeout)
                unread -= 1
                self._in_group = False
            except BaseException:
                if unread:
                    smtp.close()
                raise
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)

            def in_step() -> None:
                # Just before the ".": a reply already here was sent before the server saw
                # the end of the data, so it cannot be the answer to it, and taking it for
                # one could report a refused message delivered. Nothing was delivered yet
                # (the "." was not sent), so the copy may be tried again.
                try:
                    replies.check_idle()
                except aiosmtplib.SMTPException:
                    smtp.close()
                    raise

            async def final() -> aiosmtplib.SMTPResponse:
                response = await replies.read()
                if replies.queued:
                    # More replies after the last one: out of step, so the session is not
                    # used again. This reply came after the "." and stands.
                    smtp.close()
                    self._out_of_step = True
                return response

            return await self._body(raw, data_timeout, before_end, final, in_step)

    async def _drain_group(
        self, replies: _Replies, unread: int, timeout: float | None
    ) -> aiosmtplib.SMTPResponse | None:
        """Read the last ``unread`` replies of a pipelined group whose transaction is refused;
        the last of them (DATA's), which the caller judges: a server may still answer DATA
        with 354 (RFC 2920 §3.1)."""
        reply: aiosmtplib.SMTPResponse | None = None
        closing = False
        for _ in range(unread):
            reply = await _next_reply(self._smtp, replies, timeout)
            closing = closing or reply.code == 421
        if closing:
            # A 421 among them: the server is closing (RFC 5321 §3.8); nothing more is sent
            # on this session, not even RSET.
            self._smtp.close()
            self._out_of_step = True
        return reply

    async def _chunked(
        self,
        raw: bytes,
        mail_from: str,
        rcpts: Sequence[str],
        options: Sequence[str],
        before_end: Callable[[], Awaitable[None]] | None,
        refusals: dict[str, SMTPReply],
    ) -> aiosmtplib.SMTPResponse | None:
        """MAIL, every RCPT, ``BDAT <size> LAST`` and the message in one write (RFC 3030 §4.2
        with RFC 2920), then every reply of the group: MAIL's, each RCPT's, and BDAT's, which
        is the final answer about the message, as the reply to "." is. One round trip per
        message. For copies that fit in one write (:data:`_CHUNK_MAX`); larger ones go by
        DATA, whose 354 lets a refusal at MAIL or RCPT stop the send before the message.

        The chunk is the copy's exact octets (a CRLF added if it lacks the last one, as the
        DATA path does): no dot-stuffing, no end-of-data line (RFC 3030 §2); they passed
        :func:`check_wire_safe` like any copy. ``before_end`` is awaited before the write
        (the server may deliver once it has every octet); from then on the send is
        ``end_of_data_sent``.

        Every reply is read before anything is decided (with the data timeout: a server may
        hold them all until it has taken the message, RFC 2920 §3.2, e.g. behind a content
        filter), since a server may go on after a refusal: the server reads the chunk even when
        it refused MAIL or every RCPT (RFC 3030 §2) and then refuses BDAT (503, 554), giving
        the same outcomes as the DATA path: ``SMTPSenderRefused``, ``SMTPDataError`` for the
        message refused, ``None`` when every recipient was refused (``refusals`` filled as in
        :meth:`_pipelined`). A BDAT accepted after a refused sender or with no recipient
        accepted, or replies out of step, are no answer one can trust after the message went:
        the session is closed and the copy is maybe-delivered. A connection lost before every
        reply came is maybe-delivered too (even with no reply at all: a server may hold its
        replies until the message is queued), except after a 421 that no yes followed (the
        server was closing: nothing taken). So a reused session that the server closed just
        as this write went out leaves the copy maybe-delivered, where DATA would have found
        the close at MAIL: the delivery engine's RSET after a second of idling keeps that
        window small.
        """
        smtp = self._smtp
        _, data_timeout = self._timeouts()
        tail = b"" if raw.endswith(b"\r\n") else b"\r\n"
        size = len(raw) + len(tail)
        group = [b"MAIL FROM:<" + mail_from.encode("ascii") + b">"]
        group[0] += b"".join(b" " + option.encode("ascii") for option in options)
        group.extend(b"RCPT TO:<" + rcpt.encode("ascii") + b">" for rcpt in rcpts)
        group.append(b"BDAT %d LAST\r\n" % size)
        # One reply per command (RFC 2920 §3.1); one more is let in, so that a stray reply
        # is seen (and judged below) rather than failing the reading.
        commands = len(rcpts) + 2
        got: list[aiosmtplib.SMTPResponse] = []
        with _Replies.installed(smtp, limit=commands + 1) as replies:
            self._in_group = self._chunked_group = True
            try:
                if before_end is not None:
                    await before_end()
                # A hang-up noticed meanwhile (the server closed a reused session) stops the
                # send before anything of the message went: nothing delivered.
                replies.check_idle()
                replies.write(b"\r\n".join(group) + raw + tail)
                self._end_of_data_sent = True
                for stage in ("MAIL", *("RCPT" for _ in rcpts), "DATA"):
                    self._stage = stage
                    got.append(await _next_reply(smtp, replies, data_timeout))
                extra: list[aiosmtplib.SMTPResponse] = []
                while (more := replies.ready()) is not None:
                    extra.append(more)
            except (aiosmtplib.SMTPServerDisconnected, OSError):
                smtp.close()
                # A 421 (RFC 5321 §3.8) that nothing accepted followed: the server was
                # closing and took nothing. A yes after it shows it went on (and may have
                # the message); no reply at all says nothing: maybe-delivered, both.
                first = next((i for i, r in enumerate(got) if r.code == 421), None)
                if first is None or any(r.code in (250, 251) for r in got[first + 1 :]):
                    raise
                closing = got[first]
                self._end_of_data_sent = False
                self._out_of_step = True
                if first == 0:
                    self._stage = "MAIL"
                    raise aiosmtplib.SMTPSenderRefused(
                        closing.code, closing.message, mail_from
                    ) from None
                self._stage = "RCPT"
                _note_refusals(rcpts, got[1:], refusals)
                raise aiosmtplib.SMTPRecipientRefused(
                    closing.code, closing.message, rcpts[first - 1]
                ) from None
            except BaseException:
                smtp.close()  # mid-group: out of step whatever comes next
                raise
        self._in_group = False
        mail, final = got[0], got[-1]
        _note_refusals(rcpts, got[1:-1], refusals)
        closes = any(r.code == 421 for r in got)
        no_transaction = mail.code != 250 or len(refusals) == len(rcpts)
        if extra or (no_transaction and final.code == 250):
            # Replies that do not pair with the commands (one too many), or the message
            # accepted with no sender or recipient: whatever the server did with it cannot be
            # known; the session is not used again.
            smtp.close()
            self._out_of_step = True
            if final.code == 250 and all(r.code in (250, 251) for r in (*got, *extra)):
                self._end_of_data_sent = False
                return final  # every reply a yes: the message stands delivered
            raise aiosmtplib.SMTPResponseException(
                -1, "the server's replies to the message do not match its commands"
            )
        # A reply to every command, in step: the server's word on the message, whatever it
        # says (delivered or refused), so no longer "maybe".
        self._end_of_data_sent = False
        if closes:
            # A 421 among them: the server is closing; nothing more is sent on this session.
            smtp.close()
            self._out_of_step = True
        if mail.code != 250:
            self._stage = "MAIL"
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, mail_from)
        if len(refusals) == len(rcpts):
            self._stage = "RCPT"
            return None
        self._stage = "DATA"
        if final.code != 250:
            raise aiosmtplib.SMTPDataError(final.code, final.message)
        return final

    async def _data(
        self,
        raw: bytes | Spool,
        timeout: float | None,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> aiosmtplib.SMTPResponse:
        """DATA (RFC 5321 §4.1.1.4), then the message (:meth:`_body`); the final reply."""
        smtp = self._smtp
        start = await _bounded(smtp, smtp.execute_command(b"DATA", timeout=None), timeout)
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = smtp.protocol
        if protocol is None:
            smtp.close()
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        return await self._body(raw, timeout, before_end, lambda: protocol.read_response())

    async def _body(
        self,
        raw: bytes | Spool,
        timeout: float | None,
        before_end: Callable[[], Awaitable[None]] | None,
        read_reply: Callable[[], Awaitable[aiosmtplib.SMTPResponse]],
        in_step: Callable[[], None] | None = None,
    ) -> aiosmtplib.SMTPResponse:
        """The message after the server's 354: ``raw`` dot-stuffed and streamed in pieces,
        then the end-of-data line; the final reply, read with ``read_reply``. aiosmtplib's own
        ``data()`` would copy the whole message twice (line-end repair, dot-stuffing) and
        buffer it all in the transport; the bytes here already passed
        :func:`check_wire_safe`, so they need no repair.

        ``timeout`` bounds the wait for the reply and for each piece to be taken by the
        connection (RFC 5321 §4.5.3.2.5 times each send of a data block, not the whole);
        a timeout or lost connection closes the session, since it is mid-DATA.
        """
        smtp = self._smtp
        protocol = smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            end = b".\r\n" if raw.endswith(b"\r\n") else b"\r\n.\r\n"
            pieces = _dot_stuffed(raw)
            piece = next(pieces, None)
            while piece is not None:
                following = next(pieces, None)
                if following is None and before_end is None:
                    # Nothing to wait for before the end: the last piece and the end-of-data
                    # line in one write (one TLS record and one send per message, not two).
                    end = piece + end
                    break
                protocol.write(piece)
                async with asyncio.timeout(timeout):
                    # aiosmtplib's copy of asyncio's StreamWriter.drain(): returns once the
                    # transport's buffer is below its low-water mark (raises if the
                    # connection was lost).
                    await protocol._drain_helper()
                piece = following
            if before_end is not None:
                await before_end()
            if in_step is not None:
                in_step()
            # Reading the reply starts right after the last write, so it cannot be missed.
            protocol.write(end)
            self._end_of_data_sent = True
            response = await _bounded(smtp, read_reply(), timeout)
            self._end_of_data_sent = False
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            smtp.close()
            raise
        except TimeoutError as exc:  # a piece was not taken in time
            smtp.close()
            raise aiosmtplib.SMTPTimeoutError("Timed out sending the message data") from exc
        except OSError:
            smtp.close()
            raise
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _reset(self) -> None:
        """RSET after a refused transaction; its failure cannot change the outcome, but closes
        the session."""
        if not self._smtp.is_connected:
            return
        command_timeout, _ = self._timeouts()
        try:
            await _bounded(self._smtp, self._smtp.rset(timeout=None), command_timeout)
            self._reset_at = time.monotonic()
        except (aiosmtplib.SMTPException, OSError):
            # Refused, unreadable, timed out: a session that cannot be reset is in no known
            # state (the next MAIL could get this RSET's late reply), so it is not reused.
            self._smtp.close()

    async def _close(self) -> None:
        await _quit_quietly(self._smtp)

    def _abort(self) -> None:
        """Drop the connection at once, without QUIT: for a cancelled send, whose server may
        still be working on DATA (a polite QUIT would wait up to the data timeout)."""
        transport = self._smtp.transport
        self._smtp.close()
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()


def _note_refusals(
    rcpts: Sequence[str], replies: Sequence[aiosmtplib.SMTPResponse], refusals: dict[str, SMTPReply]
) -> None:
    """Record in ``refusals`` each of ``rcpts`` whose RCPT reply (in order; as many as came)
    is not 250 or 251 (RFC 5321 §4.1.1.3)."""
    for rcpt, reply in zip(rcpts, replies, strict=False):
        if reply.code not in (250, 251):
            refusals[rcpt] = _reply(reply)


def _dot_stuffed(raw: bytes | Spool, size: int = _DATA_CHUNK) -> Iterator[bytes]:
    """``raw`` as DATA content (without the end-of-data line), in pieces of about ``size``
    bytes cut just after a line end: RFC 5321 §4.5.2 transparency, a line that starts with
    "." gets a second one. Every piece starts a line, so the lines starting inside it are the
    piece's start and those after its CRLFs. A spooled copy is read a piece at a time."""
    for _, piece in line_pieces(raw, size):
        piece = piece.replace(b"\r\n.", b"\r\n..")
        yield b"." + piece if piece.startswith(b".") else piece


def _maybe_delivered(after_end: bool) -> str:
    if not after_end:
        return ""
    # RFC 5321 §6.1 / RFC 1047: the server may have taken the message and its reply got lost.
    return " (the server may or may not have accepted the message)"


def _classify(exc: BaseException, error: E2EmailError) -> Outcome:
    """How a failure to connect on one port ended (see :mod:`e2email.transport.ports`)."""
    if isinstance(error, TLSError):
        if isinstance(_find_ssl_error(exc), ssl.SSLCertVerificationError):
            return "certificate"
        if "STARTTLS" in str(error):
            return "no starttls"
        return "tls"
    if not isinstance(error, ConnectError):
        return "error"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "timed out"
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return "greeting"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, socket.gaierror):
        return "name"
    if isinstance(cause, ConnectionRefusedError):
        return "refused"
    if isinstance(cause, aiosmtplib.SMTPServerDisconnected | ConnectionResetError | EOFError):
        return "dropped"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "dropped"
    return "unreachable"


class SMTPTransport:
    """Connects to one SMTP submission server as ``settings`` say.

    ``memory`` remembers which port worked per host (default: a :class:`HostMemory` on
    ``settings.hosts_file`` when that is set). It is used only when no port is configured.
    """

    def __init__(self, settings: SMTPSettings, *, memory: HostMemory | None = None) -> None:
        self._settings = settings
        self._candidates = settings.candidates
        if settings.username is not None and (
            settings.password is None and settings.oauth_token is None
        ):
            raise ConfigError("an SMTP user name is set but no password source")
        if memory is None and settings.hosts_file is not None:
            memory = HostMemory(settings.hosts_file)
        self._memory = memory if settings.port is None else None
        if any(mode is TLSMode.INSECURE_PLAINTEXT for _, mode in self._candidates):
            # SMTPSettings enforces both already; checked again because this is where it counts.
            if not settings.allow_insecure_plaintext:
                raise InsecureTransportError("plaintext SMTP needs allow_insecure_plaintext")
            if settings.username is not None:
                raise InsecureTransportError("credentials are never sent without TLS")
        if all(mode is TLSMode.INSECURE_PLAINTEXT for _, mode in self._candidates):
            self._context: ssl.SSLContext | None = None
        else:
            self._context = _client_context(settings.ca_file)
        # The password or token, resolved once for every connection this transport opens
        # (a prompt asked once, a password command run once), off the event loop.
        self._secret: str | None = None
        self._secret_lock: asyncio.Lock | None = None
        #: Ports already reported as passed over for want of STARTTLS.
        self._warned: set[tuple[int, TLSMode]] = set()

    async def prepare(self) -> None:
        """Have the password or token ready before anything is stored or sent (so a failing
        password command is reported while nothing waits in the outbox), yet read it only once
        TLS is verified, as promised: a password command may unlock a keyring or ask a
        hardware token, and none of that is done for a server that cannot prove who it is.

        * A string, or an environment variable (a source marked ``in_process``, as
          :func:`~e2email.config.password_from_env` makes): read now. Nothing leaves the
          process, and an unset variable is reported at once.
        * A prompt (marked ``interactive``): asked only when AUTH needs it, inside TLS.
        * Anything else (a password or token command, any callable): first a connection is
          opened exactly as for sending (port search, TLS verified, EHLO) and closed again
          with QUIT; only once it stood is the source run. When no verified connection can
          be made the source is not run at all and this returns quietly: delivery then meets
          the same failure and reports it, with the copies kept, like any connection failure.
        """
        settings = self._settings
        source = settings.oauth_token if settings.oauth_token is not None else settings.password
        if settings.username is None or source is None or self._secret is not None:
            return
        if isinstance(source, str) or getattr(source, "in_process", False):
            await self._resolve_secret()
            return
        if getattr(source, "interactive", False):
            return
        try:
            conn = await self._open(authenticate=False)
        except TransportError as exc:
            log.debug("the password source is not run: no verified connection: %s", exc)
            return
        await conn._close()
        await self._resolve_secret()

    async def _resolve_secret(self) -> str | None:
        """The password (or OAuth2 token): its source run once, in a thread."""
        if self._secret is not None:
            return self._secret
        if self._secret_lock is None:
            self._secret_lock = asyncio.Lock()
        async with self._secret_lock:
            if self._secret is None:
                settings = self._settings
                resolve = (
                    settings.resolve_oauth_token
                    if settings.oauth_token is not None
                    else settings.resolve_password
                )
                self._secret = await asyncio.to_thread(resolve)
        return self._secret

    @property
    def settings(self) -> SMTPSettings:
        return self._settings

    def candidates(self) -> tuple[tuple[int, TLSMode], ...]:
        """The (port, TLS mode) pairs the next connect() tries, in order."""
        remembered = self._memory.recall(self._settings.host) if self._memory else None
        return order_candidates(self._candidates, remembered)

    def connect(self) -> contextlib.AbstractAsyncContextManager[SMTPConnection]:
        """Connect, establish TLS, EHLO (again, after STARTTLS) and AUTH; QUIT on exit."""
        return self._session()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[SMTPConnection]:
        conn = await self._open()
        try:
            yield conn
        finally:
            await conn._close()

    async def send(
        self,
        raw: bytes | Spool,
        *,
        mail_from: str,
        recipients: Sequence[str],
        require_tls: bool | None = None,
    ) -> CopyOutcome:
        """Send one message over a connection of its own."""
        # Check before connecting, so bad input never costs a connection or reaches a server.
        _check_envelope(mail_from, recipients)
        check_wire_safe(raw)
        async with self.connect() as conn:
            return await conn.send(
                raw, mail_from=mail_from, recipients=recipients, require_tls=require_tls
            )

    async def _open(self, *, authenticate: bool = True) -> SMTPConnection:
        """Try the candidate ports in order; see :mod:`e2email.transport.ports` for when the
        next one is tried. Each attempt is reported in the error's (or connection's)
        ``attempts``. ``authenticate=False`` stops after TLS and EHLO (see :meth:`prepare`)."""
        host = self._settings.host
        candidates = self.candidates()
        attempts: list[PortAttempt] = []
        for index, (port, mode) in enumerate(candidates):
            try:
                conn = await self._open_one(port, mode, attempts, authenticate=authenticate)
            except _AttemptFailed as failed:
                attempt = PortAttempt(port, mode, failed.outcome, str(failed.error))
                attempts.append(attempt)
                if attempt.may_fall_back and index + 1 < len(candidates):
                    if attempt.outcome in NO_TLS_OUTCOMES and (port, mode) not in self._warned:
                        # Never passed over quietly: a removed STARTTLS offer is what an
                        # attack looks like (the CLI prints warnings on stderr). Once per
                        # port and transport: prepare() may have met it already.
                        self._warned.add((port, mode))
                        log.warning("%s; trying the next port, under the same TLS checks", attempt)
                    else:
                        log.info("%s; trying the next port", attempt)
                    continue
                final = self._final_error(failed.error, attempts)
                raise final from (failed.error.__cause__ if final is failed.error else failed.error)
            except TransportError as error:
                # A server answered and something after the connection failed (TLS up, then
                # EHLO, AUTH or REQUIRETLS): never a reason to try another port.
                attempts.append(PortAttempt(port, mode, "error", str(error)))
                raise self._final_error(error, attempts) from error.__cause__
            if self._memory is not None and len(self._candidates) > 1:
                self._memory.remember(host, port, mode)
            return conn
        raise AssertionError("no candidate ports")  # SMTPSettings guarantees at least one

    def _final_error(self, error: TransportError, attempts: list[PortAttempt]) -> TransportError:
        """The error to raise: ``error`` itself for a single attempt; with several, one naming
        each attempt (a ConnectError when no port was reachable)."""
        error.attempts = tuple(attempts)
        if len(attempts) == 1:
            return error
        listed = "; ".join(str(a) for a in attempts)
        if all(a.may_fall_back for a in attempts):
            if any(a.outcome in NO_TLS_OUTCOMES for a in attempts):
                # Some port answered without (usable) STARTTLS: a TLS refusal, not a network
                # problem that waiting might fix.
                final: TransportError = TLSError(
                    f"no port of {self._settings.host} could be used with TLS: {listed}",
                    host=self._settings.host,
                    transient=False,
                )
                final.attempts = tuple(attempts)
                return final
            final = ConnectError(
                f"cannot reach {self._settings.host} on any port tried: {listed}",
                host=self._settings.host,
            )
            final.attempts = tuple(attempts)
            return final
        earlier = "; ".join(str(a) for a in attempts[:-1])
        error.args = (f"{error} (not trying other ports; tried before: {earlier})",)
        return error

    async def _open_one(
        self, port: int, mode: TLSMode, attempts: list[PortAttempt], *, authenticate: bool = True
    ) -> SMTPConnection:
        settings = self._settings
        where = f"{settings.host}:{port}"
        smtp = aiosmtplib.SMTP(
            # The A-label form (IDNA 2008): given a non-ASCII name, asyncio and ssl would
            # encode it with the IDNA 2003 codec, which turns "faß" into "fass".
            hostname=settings.connect_host,
            port=port,
            local_hostname=settings.local_hostname,
            timeout=settings.effective_command_timeout,
            use_tls=mode is TLSMode.IMPLICIT,
            # True, never None: None means "STARTTLS if offered", which a man in the middle
            # defeats by deleting the offer (RFC 3207 §6). With True, aiosmtplib raises when
            # the server does not offer it, having sent nothing but EHLO.
            start_tls=mode is TLSMode.STARTTLS,
            validate_certs=True,
            tls_context=self._context if mode is not TLSMode.INSECURE_PLAINTEXT else None,
        )
        try:
            try:
                # The connect timeout covers TCP, the implicit-TLS handshake and the greeting;
                # STARTTLS and its handshake run under the command timeout.
                await smtp.connect(timeout=settings.effective_connect_timeout)
                _raise_if_cancelled()
            except (aiosmtplib.SMTPException, OSError) as exc:
                error = self._connect_error(exc, where, mode)
                error.__cause__ = exc
                raise _AttemptFailed(error, _classify(exc, error)) from exc
            try:
                tls = self._check_tls(smtp, where, mode)
                await self._ehlo(smtp, where)
                # The parameters are the server's words (e.g. "AUTH PLAIN LOGIN"): made safe.
                extensions = {k: server_text(v) for k, v in smtp.esmtp_extensions.items()}
                if settings.require_tls and "requiretls" not in extensions:
                    # RFC 8689 §4.1: checked before AUTH, so no credentials are spent on a
                    # server that cannot carry the message as asked.
                    raise RequireTLSError(
                        f"{where} does not offer REQUIRETLS (RFC 8689), which was required; "
                        "the message was not sent",
                        host=where,
                    )
                if settings.username is not None and authenticate:
                    await self._authenticate(smtp, tls, settings.username, where)
            except aiosmtplib.SMTPTimeoutError as exc:
                raise ConnectError(
                    f"timed out after {settings.effective_command_timeout:g} s talking to "
                    f"{where}: {_reason(exc)}",
                    host=where,
                ) from exc
            except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:
                raise ConnectError(
                    f"connection to {where} lost: {_reason(exc)}", host=where
                ) from exc
            except aiosmtplib.SMTPException as exc:
                raise TransportError(
                    f"SMTP session with {where} failed: {server_text(str(exc))}", host=where
                ) from exc
        except Exception:
            # E.g. AUTH refused: the session is still up, so end it properly.
            await _quit_quietly(smtp)
            raise
        except BaseException:  # cancelled: do not wait for the server
            smtp.close()
            raise
        log.debug("connected to %s (%s)", where, tls or "no TLS")
        attempts.append(PortAttempt(port, mode, "ok"))
        return SMTPConnection(
            smtp,
            where=where,
            tls=tls,
            extensions=extensions,
            settings=settings,
            port=port,
            mode=mode,
            attempts=attempts,
        )

    def _connect_error(self, exc: BaseException, where: str, mode: TLSMode) -> TransportError:
        """Translate a failure of connect (TCP, greeting, STARTTLS, TLS handshake)."""
        ssl_exc = _find_ssl_error(exc)
        if ssl_exc is not None:
            return _tls_error(ssl_exc, where)
        if self._handshake_dropped(exc, mode):
            return TLSError(
                f"TLS handshake with {where} failed: {_HANDSHAKE_DROPPED_HINT}", host=where
            )
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            return ConnectError(f"{where} did not greet us with 220", host=where, reply=_reply(exc))
        if isinstance(exc, aiosmtplib.SMTPTimeoutError):
            hint = ""
            if mode is not TLSMode.IMPLICIT and isinstance(
                exc.__cause__, aiosmtplib.SMTPReadTimeoutError
            ):
                # Connected, but no greeting: typical of a port that expects a TLS
                # ClientHello first (RFC 8314 §3.3), e.g. 465.
                hint = " (no greeting: if this port uses implicit TLS, e.g. 465, say so)"
            return ConnectError(f"timed out talking to {where}: {_reason(exc)}{hint}", host=where)
        if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected)):
            return ConnectError(f"cannot connect to {where}: {_reason(exc)}", host=where)
        if isinstance(exc, aiosmtplib.SMTPHeloError):
            return TransportError(f"{where} refused EHLO", host=where, reply=_reply(exc))
        if mode is TLSMode.STARTTLS:
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                # RFC 3207 §4: 454 "TLS not available due to temporary reason". Still a refusal
                # of TLS, not a deferral: retrying the message here would only end, after the
                # back-off, as "every recipient was refused". The search goes on to the next
                # port (see ports.py); when none works, this is the error.
                return TLSError(
                    f"{where} refused STARTTLS (nothing but EHLO and STARTTLS was sent)",
                    host=where,
                    reply=_reply(exc),
                    transient=False,
                )
            if isinstance(exc, aiosmtplib.SMTPException):
                # aiosmtplib raises a bare SMTPException when STARTTLS is not in the EHLO reply.
                return TLSError(
                    f"server {where} does not offer STARTTLS (it may have been removed on the "
                    "way); nothing but EHLO was sent, and nothing is sent without TLS",
                    host=where,
                )
        if isinstance(exc, OSError):
            return ConnectError(f"cannot connect to {where}: {server_text(str(exc))}", host=where)
        return TransportError(f"connecting to {where} failed: {server_text(str(exc))}", host=where)

    @staticmethod
    def _handshake_dropped(exc: BaseException, mode: TLSMode) -> bool:
        """Did the server drop the connection in the middle of the TLS handshake?

        Servers (and asyncio-based ones in particular, which do not flush the TLS alert) often
        just close the connection when they dislike the ClientHello, e.g. when they cannot do
        TLS 1.2. That is a failure to establish TLS, not a network problem.
        """
        if mode is TLSMode.IMPLICIT and isinstance(exc, aiosmtplib.SMTPConnectError):
            # aiosmtplib chains the OSError of create_connection(), which includes the
            # handshake; a reset after the TCP connection was made can only come from there.
            # (A failure to read the greeting is chained to SMTPServerDisconnected instead.)
            cause = exc.__cause__
            return isinstance(cause, ConnectionResetError | ConnectionAbortedError)
        if mode is TLSMode.STARTTLS and isinstance(exc, aiosmtplib.SMTPServerDisconnected):
            # Raised by aiosmtplib's protocol.start_tls() after the server's 220 to STARTTLS.
            return "upgrading transport" in exc.message
        return False

    @staticmethod
    def _check_tls(smtp: aiosmtplib.SMTP, where: str, mode: TLSMode) -> TLSInfo | None:
        """Confirm TLS is really up and new enough; return what was negotiated."""
        if mode is TLSMode.INSECURE_PLAINTEXT:
            return None
        sslobj = smtp.get_transport_info("ssl_object")
        if not isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
            # Cannot happen with use_tls/start_tls=True; refuse rather than trust that.
            raise TLSError(f"TLS was not established with {where}", host=where)
        version = sslobj.version() or ""
        try:
            negotiated = ssl.TLSVersion[version.replace(".", "_")]
        except KeyError:
            negotiated = None
        if negotiated is None or negotiated < _MIN_TLS:
            # Belt and braces: the context's minimum_version already forbids this (RFC 8997).
            raise TLSError(
                f"{where} negotiated {version or 'an unknown protocol'}; "
                "TLS 1.2 or newer is required (RFC 8997)",
                host=where,
            )
        cipher = sslobj.cipher()
        return TLSInfo(version=version, cipher=cipher[0] if cipher else "")

    async def _ehlo(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        """EHLO inside TLS. After STARTTLS, aiosmtplib has dropped what the first EHLO said
        (RFC 3207 §4.2: forget everything learned before TLS), so this asks again; for
        implicit TLS it is the first EHLO."""
        try:
            await _bounded(smtp, smtp.ehlo(timeout=None), smtp.timeout)
        except aiosmtplib.SMTPHeloError as exc:
            # RFC 5321 §4.1.4: a server that does not know EHLO still knows HELO. Without EHLO
            # there are no extensions, so AUTH (if configured) fails below with a clear message.
            if not smtp.is_connected or exc.code not in (500, 502):
                raise TransportError(
                    f"{where} refused EHLO", host=where, reply=_reply(exc)
                ) from exc
            await _bounded(smtp, smtp.helo(timeout=None), smtp.timeout)

    async def _authenticate(
        self, smtp: aiosmtplib.SMTP, tls: TLSInfo | None, user: str, where: str
    ) -> None:
        if tls is None:
            # RFC 4954 §4 / RFC 8314: never send credentials in the clear.
            raise InsecureTransportError("credentials are never sent without TLS")
        if not smtp.supports_extension("auth"):
            raise AuthenticationError(
                f"{where} does not offer SMTP AUTH (after TLS), so user {user!r} cannot log in",
                host=where,
            )
        offered = [server_text(m).lower() for m in smtp.server_auth_methods]
        if self._settings.oauth_token is not None:
            await self._auth_xoauth2(smtp, user, offered, where)
            return
        usable = [m for m in _AUTH_MECHANISMS if m in offered]
        if not usable:
            listed = " ".join(m.upper() for m in offered) or "none"
            hint = " (XOAUTH2 is offered: use an OAuth2 token)" if "xoauth2" in offered else ""
            raise AuthenticationError(
                f"{where} offers AUTH mechanisms {listed}; e2email supports only PLAIN and LOGIN "
                f"with a password{hint}",
                host=where,
            )
        # Only now, with TLS verified, is the password source asked (it may run a command or
        # prompt). A ConfigError from it propagates unchanged.
        password = await self._resolve_secret()
        if password is None:
            raise ConfigError("an SMTP user name is set but no password source")
        last: aiosmtplib.SMTPAuthenticationError | None = None
        for mech in usable:
            try:
                if mech == "plain":
                    await _bounded(
                        smtp, smtp.auth_plain(user, password, timeout=None), smtp.timeout
                    )
                else:
                    await _bounded(
                        smtp, smtp.auth_login(user, password, timeout=None), smtp.timeout
                    )
            except aiosmtplib.SMTPAuthenticationError as exc:
                last = exc
                # 504: the server does not really support this mechanism although it
                # advertised it (RFC 4954 §6); try the next. Any other refusal (535 bad
                # credentials, 454 temporary) is final: retrying the same password with
                # another mechanism only doubles the failed attempts the server counts.
                if exc.code == 504:
                    continue
                break
            else:
                log.debug("authenticated to %s as %r with %s", where, user, mech.upper())
                return
        assert last is not None
        raise AuthenticationError(
            f"{where} refused the credentials for user {user!r}",
            host=where,
            reply=_reply(last),
        ) from last

    async def _auth_xoauth2(
        self, smtp: aiosmtplib.SMTP, user: str, offered: Sequence[str], where: str
    ) -> None:
        """SASL XOAUTH2 (Google's and Microsoft's OAuth2 bearer-token mechanism).

        The initial response is ``base64("user=" user ^A "auth=Bearer " token ^A ^A)``. A
        refused token is answered with a 334 carrying a base64 JSON error (status, scope); the
        client must then send an empty line to get the final 535 (RFC 7628 §3.2.3 does the
        same for OAUTHBEARER). Sent inside TLS only: the token is a password for its lifetime.
        """
        if "xoauth2" not in offered:
            listed = " ".join(m.upper() for m in offered) or "none"
            raise AuthenticationError(
                f"{where} offers AUTH mechanisms {listed}, not XOAUTH2, so the OAuth2 token "
                f"for {user!r} cannot be used",
                host=where,
            )
        token = await self._resolve_secret()
        if not token:
            raise ConfigError("the OAuth2 access token is empty")
        if any(c in token for c in "\x01\r\n"):
            raise ConfigError("the OAuth2 access token contains a control character")
        blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        detail = ""
        response = await _bounded(
            smtp, smtp.execute_command(b"AUTH", b"XOAUTH2", blob, timeout=None), smtp.timeout
        )
        if response.code == 334:
            detail = _xoauth2_error_detail(response.message)
            # Acknowledge the error challenge with an empty response; the server then sends
            # the final reply (535 and friends).
            response = await _bounded(smtp, smtp.execute_command(b"", timeout=None), smtp.timeout)
        if response.code != 235:
            raise AuthenticationError(
                f"{where} refused the OAuth2 token for user {user!r}{detail}",
                host=where,
                reply=_reply(response),
            )
        log.debug("authenticated to %s as %r with XOAUTH2", where, user)


def _xoauth2_error_detail(challenge: str) -> str:
    """The readable part of an XOAUTH2 error challenge (base64 JSON), or ""."""
    try:
        data = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (binascii.Error, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    parts = [
        f"{k} {server_text(data[k])}" for k in ("status", "scope") if isinstance(data.get(k), str)
    ]
    if data.get("status") in ("400", "401"):
        parts.append("the token is invalid or expired, or lacks the SMTP scope")
    return f" ({'; '.join(parts)})" if parts else ""
