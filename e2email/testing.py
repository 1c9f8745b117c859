"""A real SMTP server on the loopback interface, with real TLS, for tests and ``e2email demo``.

Built on aiosmtpd and trustme: :class:`TestCA` makes a throw-away certificate authority and
server certificates; :class:`LoopbackSMTPServer` runs an aiosmtpd server in a thread of its
own, with implicit TLS, STARTTLS or (for test rigs) no TLS, optional AUTH (PLAIN, LOGIN,
XOAUTH2), optional REQUIRETLS (RFC 8689), injected faults (:class:`Fault`: error replies, dropped
connections, stalls at a chosen stage) and a record of everything it received::

    with LoopbackSMTPServer(tls="starttls", credentials={"alice": "s3cret"}) as server:
        settings = SMTPSettings(host=server.host, port=server.port, tls=TLSMode.STARTTLS,
                                ca_file=server.ca_file, username="alice", password="s3cret")
        ...
        server.messages[0].data          # the exact bytes received
        server.received_commands()       # ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", ...]

    # The first DATA is answered 451, the second attempt (on any connection) succeeds.
    with LoopbackSMTPServer(faults=[Fault("data-end", "reply", 451, "4.3.0 try later")]) as server:
        ...
        server.faults_fired              # [Fault(stage="data-end", ...)]

Nothing here is meant for production mail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
import tempfile
import threading
import types
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr, ClassVar, Literal, NoReturn

import trustme
from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from aiosmtpd.smtp import SMTP as _AiosmtpdSMTP

from e2email.config import Protection
from e2email.crypto.base import ProtectedCopy, Protector, copy_plans, make_copy
from e2email.errors import (
    KeyProblem,
    KeyReason,
    PassphraseError,
    RecipientKeyError,
    SignerKeyError,
)
from e2email.message import Message, build_payload, message_head

__all__ = [
    "Fault",
    "FaultAction",
    "FaultStage",
    "HostileSMTPServer",
    "LoopbackSMTPServer",
    "MockProtector",
    "ReceivedMessage",
    "TestCA",
]

_log = logging.getLogger(__name__)

_START_TIMEOUT = 10.0


def _not_login_data_notice(record: logging.LogRecord) -> bool:
    # aiosmtpd 1.4 logs a deprecation notice on every successful AUTH, from its own code.
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_not_login_data_notice)


class TestCA:
    """A throw-away certificate authority (a :class:`trustme.CA`) whose certificate is written
    to ``ca_file`` in a temporary directory owned by this object (removed by :meth:`cleanup`)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        self._ca = trustme.CA()
        self._dir: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="e2email-testca-"
        )
        self.ca_file = Path(self._dir.name) / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    @property
    def cert_pem(self) -> bytes:
        return bytes(self._ca.cert_pem.bytes())

    def server_context(
        self,
        *identities: str,
        minimum_version: ssl.TLSVersion | None = None,
        maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ) -> ssl.SSLContext:
        """A server context with a fresh leaf certificate for ``identities`` (host names or IP
        addresses). ``minimum_version`` defaults to TLS 1.2, or to the oldest version OpenSSL
        has when ``maximum_version`` is below 1.2 (to build an old server for tests)."""
        if not identities:
            raise ValueError("name at least one identity, e.g. '127.0.0.1'")
        capped = maximum_version is not ssl.TLSVersion.MAXIMUM_SUPPORTED
        if minimum_version is None:
            old = capped and maximum_version < ssl.TLSVersion.TLSv1_2
            minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED if old else ssl.TLSVersion.TLSv1_2
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if minimum_version is ssl.TLSVersion.MINIMUM_SUPPORTED or (
            minimum_version < ssl.TLSVersion.TLSv1_2
        ):
            # OpenSSL 3 refuses TLS 1.0/1.1 at security level 1 and above (their handshake
            # signatures use SHA-1/MD5); level 0 lets a test server speak them.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = minimum_version
        ctx.maximum_version = maximum_version
        self._ca.issue_cert(*identities).configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> TestCA:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


FaultStage = Literal["connect", "ehlo", "mail", "rcpt", "data", "data-end"]
FaultAction = Literal["reply", "drop", "stall", "accept-drop"]
_STAGES = ("connect", "ehlo", "mail", "rcpt", "data", "data-end")
_ACTIONS = ("reply", "drop", "stall", "accept-drop")


@dataclass(frozen=True)
class Fault:
    """A misbehaviour for :class:`LoopbackSMTPServer` to show at one stage of a session.

    ``stage``:

    * ``"connect"``: before the greeting;
    * ``"ehlo"``, ``"mail"``, ``"rcpt"``: when that command arrives (EHLO before and after
      STARTTLS both count);
    * ``"data"``: when the DATA command arrives;
    * ``"data-end"``: after the whole message was received, before the final reply.

    ``action``:

    * ``"reply"``: answer ``code text`` instead of the normal reply (at ``"connect"`` that is
      the greeting). After a 421 the server closes the connection (RFC 5321 §3.8).
    * ``"drop"``: close the connection abruptly, without a reply. At ``"data"`` the server first
      says 354 and reads part of the message: a drop in the middle of DATA. (A client that
      sent a small message whole, final "." included, before it saw the hang-up cannot tell
      this from a lost reply: for it the message is maybe delivered.)
    * ``"stall"``: wait ``seconds`` before answering normally (to exceed client timeouts). A
      client that gives up during a stall at ``"data-end"`` leaves no message behind.
    * ``"accept-drop"`` (``"data-end"`` only): accept the message (it is in
      :attr:`LoopbackSMTPServer.messages`), then close the connection before the 250 reply
      goes out: the reply lost after the final ".", when a retry would deliver a second copy.

    ``address`` (``"rcpt"`` only) makes the fault fire only for that recipient
    (case-insensitive). ``times`` is how often it fires in the server's lifetime, counted
    across connections (``None``: always), so a retry after a ``times=1`` fault succeeds.

    A message whose transaction failed because of a fault (a reply at MAIL, DATA or data-end, a
    drop) is not in :attr:`LoopbackSMTPServer.messages`: the server did not accept it. A
    ``"rcpt"`` reply refuses only that recipient; if others were accepted, the message is
    recorded for them, as a real server would deliver it.
    """

    stage: FaultStage
    action: FaultAction
    code: int = 0
    text: str = ""
    address: str | None = None
    times: int | None = 1
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in _STAGES:
            raise ValueError(f"fault stage must be one of {_STAGES}, not {self.stage!r}")
        if self.action not in _ACTIONS:
            raise ValueError(f"fault action must be one of {_ACTIONS}, not {self.action!r}")
        if self.action == "reply" and not 200 <= self.code <= 599:
            raise ValueError("a 'reply' fault needs an SMTP code (200-599)")
        if any(c in self.text for c in "\r\n"):
            raise ValueError("fault text must be one line")
        if self.action == "accept-drop" and self.stage != "data-end":
            raise ValueError("'accept-drop' applies only to the 'data-end' stage")
        if self.address is not None and self.stage != "rcpt":
            raise ValueError("address applies only to the 'rcpt' stage")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None for always)")
        if self.seconds < 0:
            raise ValueError("seconds must not be negative")

    @property
    def reply_line(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@dataclass
class ReceivedMessage:
    """One message as the server received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    #: The exact bytes after the DATA command, dot-unstuffed, CRLF line ends as sent, without
    #: the terminating ``.``; or the BDAT chunks joined, as sent (RFC 3030).
    data: bytes
    tls_version: str | None
    cipher: str | None
    auth_user: str | None
    #: The MAIL FROM parameters, upper case (e.g. ``("SIZE=1234", "REQUIRETLS")``).
    mail_options: tuple[str, ...] = ()

    @property
    def requiretls(self) -> bool:
        """Did MAIL FROM carry the REQUIRETLS parameter (RFC 8689 §4.1)?"""
        return "REQUIRETLS" in self.mail_options


def _tls_of(transport: Any) -> tuple[str | None, str | None]:
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return None, None
    cipher = sslobj.cipher()
    return sslobj.version(), (cipher[0] if cipher else None)


class _Handler:
    """aiosmtpd handler hooks: refusals at RCPT, the EHLO AUTH line, storing messages."""

    def __init__(self, owner: LoopbackSMTPServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        # The five-argument hook must record the host name itself.
        session.host_name = hostname
        owner = self._owner
        auth = owner._advertised_auth
        out: list[str] = []
        for line in responses:
            if line[4:].upper().startswith("AUTH"):
                # aiosmtpd advertises its built-in mechanisms whenever AUTH is possible, even
                # with no credentials configured; advertise exactly what the test asked for.
                if auth:
                    out.append("250-AUTH " + " ".join(auth))
                continue
            out.append(line)
        if owner._offer_requiretls and server._tls_active():
            # RFC 8689 §4.1: REQUIRETLS is offered only inside TLS. Before the last line
            # ("250 HELP"), which must stay the one without a dash.
            out.insert(len(out) - 1, "250-REQUIRETLS")
        if owner.offer_pipelining:
            # RFC 2920. aiosmtpd reads commands line by line from a stream, so a group of them
            # in one packet is answered one by one, in order: it only never said so.
            out.insert(len(out) - 1, "250-PIPELINING")
        if owner.offer_chunking:
            # RFC 3030: BDAT, served by _RecordingSMTP.smtp_BDAT (aiosmtpd has none).
            out.insert(len(out) - 1, "250-CHUNKING")
        return out

    async def handle_exception(self, error: Exception) -> str:
        # Without this hook aiosmtpd logs every failed TLS handshake (which the tests provoke
        # on purpose) as an error with a traceback. Keep them for inspection instead.
        with self._owner._lock:
            self._owner.errors.append(error)
        _log.debug("loopback SMTP server: %r", error)
        return f"451 4.3.0 test server error: {type(error).__name__}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        fault = self._owner._take_fault("rcpt", address)
        if fault is not None:
            proto: _RecordingSMTP = server
            reply = await proto._apply_fault(fault)
            if reply is not None:
                return reply
        refusal = self._owner._refuse.get(address.lower())
        if refusal is not None:
            code, text = refusal
            return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):  # decode_data=False guarantees bytes
            return "451 4.3.0 test server got no raw bytes"
        owner = self._owner
        fault = owner._take_fault("data-end")
        if fault is not None and fault.action != "accept-drop":
            proto: _RecordingSMTP = server
            reply = await proto._apply_fault(fault)
            if reply is not None:
                # Refused (or closed with 421): the message was not accepted, so not recorded.
                return reply
            # A stall the client sat through: accept normally. (One that made the client give
            # up cancelled this coroutine: nothing recorded, as the 250 was never sent.)
        version, cipher = _tls_of(server.transport)
        auth_user: str | None = None
        if session.authenticated:
            login = getattr(session.auth_data, "login", None)
            if isinstance(login, bytes):
                auth_user = login.decode("utf-8", "replace")
        with owner._lock:
            owner.messages.append(
                ReceivedMessage(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=data,
                    tls_version=version,
                    cipher=cipher,
                    auth_user=auth_user,
                    mail_options=tuple(envelope.mail_options),
                )
            )
            number = len(owner.messages)
        if fault is not None and fault.action == "accept-drop":  # taken; the reply is lost
            dropping: _RecordingSMTP = server
            await dropping._drop()
        # Stored before the 250 goes out, so a client that has its 250 sees the message.
        return f"250 2.0.0 OK queued as TEST{number}"


class _RecordingSMTP(_AiosmtpdSMTP):
    """aiosmtpd's protocol, recording every received chunk and every reply line."""

    def __init__(
        self,
        handler: _Handler,
        *,
        owner: LoopbackSMTPServer,
        implicit_tls: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        if implicit_tls:
            # aiosmtpd only knows about TLS it started itself (STARTTLS), so it would never
            # allow AUTH here. The whole connection is inside TLS: lift its check. (Passing
            # auth_require_tls=False instead makes it warn about AUTH without TLS.)
            self._auth_require_tls = False
        self._owner = owner
        # ("c", tls_active, data) for client chunks, ("s", tls_active, line) for replies.
        self._log: list[tuple[str, bool, bytes]] = []
        #: The BDAT chunks of the current transaction so far (RFC 3030), with the envelope
        #: they belong to: an RSET, a new MAIL or a final reply starts a new one.
        self._chunks: tuple[Any, bytearray] | None = None
        with owner._lock:
            owner._connections.append(self._log)
            owner._protocols.add(self)

    def _tls_active(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        # Before STARTTLS this is what came over the wire; after it (and with implicit TLS)
        # the SSL protocol hands this same protocol the decrypted bytes.
        tls = self._tls_active()
        with self._owner._lock:
            self._owner.transcript.append((tls, bytes(data)))
            self._log.append(("c", tls, bytes(data)))
        super().data_received(data)

    async def push(self, status: AnyStr) -> None:
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        self._log.append(("s", self._tls_active(), line))
        await super().push(status)

    def connection_lost(self, error: Exception | None) -> None:
        with self._owner._lock:
            self._owner._protocols.discard(self)
        super().connection_lost(error)

    # -- fault injection -----------------------------------------------------------------

    async def _drop(self) -> NoReturn:
        """Close the connection abruptly (no reply, no TLS close_notify) and end this session."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        elif transport is not None:
            transport.close()
        # connection_lost() cancels the session task, which is the one running this.
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _apply_fault(self, fault: Fault) -> str | None:
        """Act out ``fault``: returns the reply line to send instead of the normal one, or
        ``None`` to go on normally (after a stall). A drop does not return."""
        if fault.action == "stall":
            await asyncio.sleep(fault.seconds)
            return None
        if fault.action == "drop":
            await self._drop()
        if fault.code == 421:
            # RFC 5321 §3.8: 421 means the server is closing the channel; do so right after.
            await self.push(fault.reply_line)
            transport = self.transport
            if transport is not None:
                transport.close()
            await asyncio.Event().wait()  # cancelled by connection_lost()
        return fault.reply_line

    async def _handle_client(self) -> None:
        fault = self._owner._take_fault("connect")
        if fault is not None:
            if fault.action == "reply":
                # A greeting other than 220 (e.g. 421 or 554, RFC 5321 §3.1), then close.
                await self.push(fault.reply_line)
                if self.transport is not None:
                    self.transport.close()
                return
            await self._apply_fault(fault)
        await super()._handle_client()

    async def _command_fault(self, stage: FaultStage) -> bool:
        """Apply a fault for ``stage`` if one is due; True if it replied in place of the command."""
        fault = self._owner._take_fault(stage)
        if fault is None:
            return False
        reply = await self._apply_fault(fault)
        if reply is None:
            return False
        await self.push(reply)
        return True

    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._command_fault("ehlo"):
            await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._command_fault("mail"):
            return
        requiretls = False
        if arg is not None and self._owner._offer_requiretls and self._tls_active():
            # aiosmtpd refuses parameters it does not know (555); take REQUIRETLS (RFC 8689
            # §4.1, no value) out before it looks and put it back into the envelope after.
            words = arg.split(" ")
            kept = [w for w in words if w.upper() != "REQUIRETLS"]
            requiretls = len(kept) != len(words)
            arg = " ".join(kept)
        await super().smtp_MAIL(arg)
        envelope = self.envelope
        if requiretls and envelope is not None and envelope.mail_from:
            envelope.mail_options.append("REQUIRETLS")

    async def smtp_DATA(self, arg: str) -> None:
        fault = self._owner._take_fault("data")
        if fault is not None and fault.action == "drop":
            # Take the message, read a little of it, then hang up in the middle.
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with contextlib.suppress(Exception):
                await self._reader.readuntil(b"\r\n")
            await self._drop()
        if fault is not None:
            reply = await self._apply_fault(fault)
            if reply is not None:
                await self.push(reply)
                self.envelope = self._create_envelope()  # as after any DATA reply
                return
        await super().smtp_DATA(arg)

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 BDAT: ``BDAT <size> [LAST]`` and exactly ``size`` octets of the message,
        which are read whatever the answer (§2: the octets that follow cannot be told from
        commands). Chunks accumulate; the LAST one ends the message, which is then taken as
        one ended by DATA's "." is (the same hook, record and faults at ``"data-end"``).
        A fault at ``"data"`` fires at a transaction's first BDAT: a reply refuses the chunk
        once read (the transaction is over, as after a refused DATA); a drop hangs up after a
        line of it; a stall waits before the chunk is read."""
        words = (arg or "").split()
        ok = 1 <= len(words) <= 2 and words[0].isascii() and words[0].isdigit()
        ok = ok and len(words[0]) <= 12
        if not ok or [w.upper() for w in words[1:]] not in ([], ["LAST"]):  # ABNF: any case
            # Without a size the chunk cannot be found in the stream: give up on the session,
            # now (its octets must never be read as commands).
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            if self.transport is not None:
                self.transport.close()  # the reply is flushed first
            # connection_lost() cancels the session task, which is the one running this.
            await asyncio.Event().wait()
        size, last = int(words[0]), len(words) == 2
        envelope = self.envelope
        assert envelope is not None  # made with the session
        chunks = self._chunks
        first = chunks is None or chunks[0] is not envelope
        fault = self._owner._take_fault("data") if first and envelope.rcpt_tos else None
        if fault is not None and fault.action == "drop":
            with contextlib.suppress(Exception):
                await self._reader.readuntil(b"\r\n")
            await self._drop()
        reply = await self._apply_fault(fault) if fault is not None else None
        chunk = await self._reader.readexactly(size)
        if await self.check_helo_needed() or await self.check_auth_needed("BDAT"):
            return
        if reply is not None:
            self._chunks = None
            self.envelope = self._create_envelope()  # as after any reply to the data
            await self.push(reply)
            return
        if not envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if first or chunks is None:
            chunks = self._chunks = (envelope, bytearray())
        content = chunks[1]
        content += chunk
        limit = self.data_size_limit
        if limit and len(content) > limit:
            self._chunks = None
            self.envelope = self._create_envelope()
            await self.push("552 5.3.4 Error: too much mail data")
            return
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        self._chunks = None
        envelope.content = envelope.original_content = bytes(content)
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push("250 OK" if status is MISSING else status)

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail and Microsoft 365 speak it: the initial response is
        ``base64("user=" U "\\x01auth=Bearer " T "\\x01\\x01")``. A bad token gets a 334 with a
        base64 JSON error; the client answers with an empty line and gets 535."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        user, token = _parse_xoauth2(blob)
        owner = self._owner
        tokens = owner._xoauth2_tokens or {}
        ok = user is not None and token is not None and tokens.get(user) == token
        with owner._lock:
            owner.auth_attempts.append((user or "", ok))
        if ok:
            assert user is not None
            return AuthResult(success=True, auth_data=_OAuthLogin(user.encode()))
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "https://mail.test/"})
        await self.push("334 " + base64.b64encode(error.encode()).decode("ascii"))
        # RFC 7628 §3.2.3: the client acknowledges the error challenge (an empty line, or "*").
        with contextlib.suppress(Exception):
            await self._reader.readuntil(b"\r\n")
        await self.push("535 5.7.8 Username and Password not accepted (XOAUTH2)")
        return AuthResult(success=False, handled=True)


@dataclass(frozen=True)
class _OAuthLogin:
    """auth_data of an XOAUTH2 session (``login`` like aiosmtpd's LoginPassword)."""

    login: bytes


def _parse_xoauth2(blob: bytes) -> tuple[str | None, str | None]:
    """(user, token) from an XOAUTH2 initial response, or Nones where it is malformed."""
    user = token = None
    for field in blob.split(b"\x01"):
        if field.startswith(b"user="):
            user = field[5:].decode("utf-8", "replace")
        elif field.startswith(b"auth=Bearer "):
            token = field[12:].decode("utf-8", "replace")
    return user, token


def _verbs(log: list[tuple[str, bool, bytes]]) -> list[str]:
    """The command verbs of one connection, skipping DATA content, BDAT chunks and AUTH
    continuation lines.

    Each final reply line tells how the next client line is to be read (RFC 5321 §4.2, RFC
    4954 §4): after 334 it is an AUTH response, after 354 message data up to ``.``, else a
    command. The greeting counts as the reply that comes before the first command. The
    ``size`` octets after a ``BDAT <size>`` line are its chunk (RFC 3030 §2), whatever the reply.
    """
    pending = bytearray()  # the client's bytes not yet taken
    skip = 0  # octets of a BDAT chunk still to pass over
    replies: deque[int] = deque()
    verbs: list[str] = []
    awaiting = True  # the greeting
    mode = "cmd"

    def next_line() -> bytes | None:
        nonlocal skip
        if skip:
            passed = min(skip, len(pending))
            del pending[:passed]
            skip -= passed
            if skip:
                return None
        end = pending.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(pending[:end])
        del pending[: end + 2]
        return line

    def pump() -> None:
        nonlocal awaiting, mode, skip
        while True:
            if awaiting:
                if not replies:
                    return
                code = replies.popleft()
                awaiting = False
                if code == 334:
                    mode = "auth"
                elif code == 354:
                    mode = "data"
                else:
                    mode = "cmd"
            line = next_line()
            if line is None:
                return
            if mode == "data":
                if line == b".":
                    awaiting = True
                continue
            awaiting = True
            if mode == "cmd":
                words = line.split(b" ")
                verb = words[0].upper()
                verbs.append(verb.decode("ascii", "replace"))
                if verb == b"BDAT" and len(words) > 1 and words[1].isdigit():
                    skip = int(words[1])

    for kind, _tls, chunk in log:
        if kind == "c":
            pending += chunk
        elif len(chunk) < 4 or chunk[3:4] != b"-":  # last line of a reply
            try:
                replies.append(int(chunk[:3]))
            except ValueError:
                replies.append(0)
        pump()
    return verbs


TLSChoice = Literal["implicit", "starttls", "none"]


class LoopbackSMTPServer:
    """An aiosmtpd server on ``host`` (127.0.0.1) and a free port, in a daemon thread.

    * ``tls``: ``"implicit"`` (TLS from the first byte), ``"starttls"`` or ``"none"``.
    * ``ssl_context``: the server context; by default a :class:`TestCA` (``ca``, or one made
      and owned here) issues a certificate for ``identities``.
    * ``credentials``: user -> password. When given, AUTH is required before MAIL and is only
      possible inside TLS. ``auth_mechanisms`` is what EHLO advertises (default: PLAIN and
      LOGIN when ``credentials`` are given, XOAUTH2 when ``xoauth2_tokens`` are; the server
      implements those three, and answers another advertised one with 504).
    * ``xoauth2_tokens``: user -> OAuth2 access token accepted by AUTH XOAUTH2; also makes AUTH
      required.
    * ``offer_starttls=False`` with ``tls="starttls"``: a server (or a man in the middle) that
      strips STARTTLS, for downgrade tests.
    * ``tls_versions``: (minimum, maximum) protocol versions of the server's own context, e.g.
      ``(TLSv1, TLSv1)`` for a TLS-1.0-only server (made at OpenSSL security level 0).
    * ``offer_requiretls``: advertise REQUIRETLS (RFC 8689) after TLS and accept it on MAIL
      FROM (recorded in :attr:`ReceivedMessage.mail_options`); without it a MAIL FROM carrying
      REQUIRETLS is refused with 555, as by a server that does not know the extension.
    * ``offer_pipelining``: advertise PIPELINING (RFC 2920), as Postfix, Exim and the large
      providers do (aiosmtpd itself does not). An attribute: may be changed between sessions.
    * ``offer_chunking``: advertise CHUNKING (RFC 3030), as Postfix (3.4 and later), Exim,
      Gmail and Exchange do, and take BDAT (aiosmtpd has none): the chunks are recorded as
      the message's :attr:`ReceivedMessage.data`. An attribute, like ``offer_pipelining``.
    * ``refuse_recipients``: address -> (code, text) replied to RCPT for that address.
    * ``faults``: misbehaviours to act out (see :class:`Fault`). :attr:`faults_fired` lists
      those that fired, in order; :attr:`connections` counts accepted TCP connections.
    """

    def __init__(
        self,
        *,
        tls: TLSChoice = "implicit",
        ssl_context: ssl.SSLContext | None = None,
        ca: TestCA | None = None,
        identities: Sequence[str] = ("127.0.0.1", "localhost"),
        credentials: Mapping[str, str] | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        offer_starttls: bool = True,
        refuse_recipients: Mapping[str, tuple[int, str]] | None = None,
        host: str = "127.0.0.1",
        faults: Sequence[Fault] = (),
        tls_versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
        offer_requiretls: bool = False,
        xoauth2_tokens: Mapping[str, str] | None = None,
        offer_pipelining: bool = False,
        offer_chunking: bool = False,
    ) -> None:
        if tls not in ("implicit", "starttls", "none"):
            raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")
        self.tls: TLSChoice = tls
        self.host = host
        self.port = 0
        self._own_ca: TestCA | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self.ca_file: Path | None = None
        if tls != "none":
            if ssl_context is None:
                if ca is None:
                    ca = self._own_ca = TestCA()
                if tls_versions is None:
                    ssl_context = ca.server_context(*identities)
                else:
                    ssl_context = ca.server_context(
                        *identities,
                        minimum_version=tls_versions[0],
                        maximum_version=tls_versions[1],
                    )
            self._ssl_context = ssl_context
            self.ca_file = ca.ca_file if ca is not None else None
        self._offer_starttls = offer_starttls
        self._credentials = dict(credentials) if credentials is not None else None
        self._xoauth2_tokens = dict(xoauth2_tokens) if xoauth2_tokens is not None else None
        self._auth_required = self._credentials is not None or self._xoauth2_tokens is not None
        if auth_mechanisms is None:
            auth_mechanisms = ("PLAIN", "LOGIN") if self._credentials is not None else ()
            if self._xoauth2_tokens is not None:
                auth_mechanisms = (*auth_mechanisms, "XOAUTH2")
        self._advertised_auth = (
            tuple(m.upper() for m in auth_mechanisms) if self._auth_required else ()
        )
        self._refuse = {k.lower(): v for k, v in (refuse_recipients or {}).items()}
        self._offer_requiretls = offer_requiretls
        #: Advertise PIPELINING in the next EHLO replies.
        self.offer_pipelining = offer_pipelining
        #: Advertise CHUNKING (and take BDAT) in the next EHLO replies.
        self.offer_chunking = offer_chunking
        self.faults: tuple[Fault, ...] = tuple(faults)
        self._fault_budget: list[int | None] = [f.times for f in self.faults]
        #: The faults that fired, in firing order.
        self.faults_fired: list[Fault] = []
        #: TCP connections accepted (counted before any TLS handshake).
        self.connections = 0

        self._lock = threading.Lock()
        self.messages: list[ReceivedMessage] = []
        self.transcript: list[tuple[bool, bytes]] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        #: Exceptions raised inside the server (failed TLS handshakes, mostly).
        self.errors: list[Exception] = []
        self._connections: list[list[tuple[str, bool, bytes]]] = []
        self._protocols: set[_RecordingSMTP] = set()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    # -- what the server saw -------------------------------------------------------------

    def received_commands(self) -> list[str]:
        """The command verbs received, connection after connection, e.g. ``["EHLO",
        "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]``. DATA content and AUTH
        continuation lines are not commands and are left out."""
        with self._lock:
            logs = [list(log) for log in self._connections]
        verbs: list[str] = []
        for log in logs:
            verbs.extend(_verbs(log))
        return verbs

    def cleartext(self) -> bytes:
        """Everything received outside TLS, joined."""
        with self._lock:
            return b"".join(data for tls, data in self.transcript if not tls)

    def _take_fault(self, stage: FaultStage, address: str | None = None) -> Fault | None:
        """The first fault due at ``stage`` (for ``address`` at RCPT), counted as fired."""
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault.stage != stage:
                    continue
                if fault.address is not None and (
                    address is None or fault.address.lower() != address.lower()
                ):
                    continue
                left = self._fault_budget[index]
                if left is not None:
                    if left <= 0:
                        continue
                    self._fault_budget[index] = left - 1
                self.faults_fired.append(fault)
                return fault
        return None

    # -- lifecycle -----------------------------------------------------------------------

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = False
        user = ""
        if isinstance(auth_data, LoginPassword) and self._credentials is not None:
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            ok = self._credentials.get(user) == password
        with self._lock:
            self.auth_attempts.append((user, ok))
        # handled=False: let aiosmtpd send its 535 (handled=True would mean we replied).
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _make_protocol(self) -> _RecordingSMTP:
        assert self._loop is not None
        starttls_ctx = (
            self._ssl_context if self.tls == "starttls" and self._offer_starttls else None
        )
        excluded = [m for m in ("PLAIN", "LOGIN", "XOAUTH2") if m not in self._advertised_auth]
        with self._lock:
            # asyncio calls the protocol factory once per accepted TCP connection, before any
            # TLS handshake: so this counts connections whose handshake then fails, too.
            self.connections += 1
        # A subclass may speak a variant of the protocol (see HostileSMTPServer).
        protocol: type[_RecordingSMTP] = getattr(self, "_protocol_class", _RecordingSMTP)
        return protocol(
            _Handler(self),
            owner=self,
            hostname="loopback.e2email.test",
            ident="e2email test server",
            tls_context=starttls_ctx,
            require_starttls=starttls_ctx is not None,
            implicit_tls=self.tls == "implicit",
            auth_required=self._auth_required,
            auth_require_tls=True,
            auth_exclude_mechanism=excluded,
            authenticator=self._authenticate,
            loop=self._loop,
        )

    def start(self) -> LoopbackSMTPServer:
        """Start serving; ``port`` is then the bound port."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="e2email-loopback-smtp", daemon=True
        )
        self._thread.start()
        # Not aiosmtpd's Controller: with port 0 its readiness check connects to port 0. Bind
        # port 0 ourselves and read what the kernel chose.
        implicit = self._ssl_context if self.tls == "implicit" else None
        future = asyncio.run_coroutine_threadsafe(
            loop.create_server(self._make_protocol, host=self.host, port=0, ssl=implicit), loop
        )
        try:
            self._server = future.result(_START_TIMEOUT)
        except BaseException:
            self._stop_loop()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        with self._lock:
            protocols = list(self._protocols)
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.close()
        # Let close callbacks run, then cancel what is left (aiosmtpd's per-client tasks).
        await asyncio.sleep(0)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def stop(self) -> None:
        """Stop serving and close every connection; removes the CA made here, if any."""
        loop = self._loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(_START_TIMEOUT)
        self._stop_loop()
        self._server = None
        if self._own_ca is not None:
            self._own_ca.cleanup()
            self._own_ca = None

    def __enter__(self) -> LoopbackSMTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()


# -- a server that misbehaves in ways a Fault cannot say ---------------------------------------


class _HostileSMTP(_RecordingSMTP):
    """The protocol of :class:`HostileSMTPServer`."""

    _owner: HostileSMTPServer

    async def push(self, status: AnyStr) -> None:
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        taint = self._owner.reply_taint
        # Appended to the last line of each reply (the one with a space after the code), but
        # not to an AUTH challenge (334), whose text is base64 the client must decode.
        if taint and line[3:4] in (b" ", b"") and not line.startswith(b"334"):
            line = line + taint
        await super().push(line)

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self._owner.starttls_reply
        if reply is None:
            await super().smtp_STARTTLS(arg)
            return
        await self.push(f"{reply[0]} {reply[1]}".rstrip())

    async def smtp_DATA(self, arg: str) -> None:
        owner = self._owner
        if not owner.stop_reading_at_data:
            await super().smtp_DATA(arg)
            return
        # Say 354, then never read: the client's writes pile up until its socket buffers are
        # full and each write waits for room that never comes (flow control).
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        owner.reading_stopped.set()
        await asyncio.Event().wait()  # cancelled by connection_lost()


class HostileSMTPServer(LoopbackSMTPServer):
    """A :class:`LoopbackSMTPServer` that misbehaves in ways :class:`Fault` cannot express.

    * ``reply_taint``: bytes appended to the last line of every reply (greeting, EHLO, MAIL,
      RCPT, DATA, the final 250, QUIT; not AUTH challenges), e.g. terminal escape sequences
      (``b"\\x1b]0;owned\\x07\\x1b[2J"``), control characters or bytes that are not UTF-8: a
      server whose text must never reach a terminal or a log as it is.
    * ``starttls_reply``: (code, text) answered to STARTTLS instead of starting TLS, e.g.
      ``(454, "4.7.0 TLS not available")`` (RFC 3207 §4), STARTTLS still being offered.
    * ``stop_reading_at_data``: answer DATA with 354, then stop reading, so the client blocks
      writing the message; :attr:`reading_stopped` is set at that moment.
    """

    _protocol_class = _HostileSMTP

    def __init__(
        self,
        *,
        reply_taint: bytes = b"",
        starttls_reply: tuple[int, str] | None = None,
        stop_reading_at_data: bool = False,
        **kwargs: Any,
    ) -> None:
        if any(c in reply_taint for c in b"\r\n"):
            raise ValueError("reply_taint must not contain CR or LF (it would end the line)")
        super().__init__(**kwargs)
        self.reply_taint = reply_taint
        self.starttls_reply = starttls_reply
        self.stop_reading_at_data = stop_reading_at_data
        #: Set once a DATA was answered 354 and the server stopped reading.
        self.reading_stopped = threading.Event()


class MockProtector(Protector):
    """A stand-in protection engine for an application's own tests, as httpx ships
    ``MockTransport``: no keys, no gpg, no certificates, nothing encrypted.

    Give it to a mailer with ``protector=``; every message the mailer protects is recorded
    (finalised) in :attr:`messages`, and comes out as the same copies a real engine would make
    (one for To and Cc, one per Bcc recipient when encrypting), in clear text with a visible
    ``X-E2Email-Mock`` header saying what would have been done. It can be told to refuse a
    recipient, which fails the whole message closed exactly like a missing key::

        from e2email import Mailer, Message, Protection
        from e2email.errors import KeyReason, RecipientKeyError
        from e2email.testing import MockProtector

        protector = MockProtector()
        protector.refuse("mallory@example.com", KeyReason.REVOKED)
        with Mailer(smtp=settings, protector=protector) as mailer:
            mailer.send(Message(sender="app@example.org", to=["bob@example.net"], text="hi"))
            try:
                mailer.send(Message(sender="app@example.org", to=["mallory@example.com"],
                                    text="hi"))
            except RecipientKeyError as exc:
                assert exc.problems[0].reason is KeyReason.REVOKED
        assert protector.messages[0].to[0].addr_spec == "bob@example.net"
        assert protector.copies[0].raw.startswith(b"Date:")  # a complete message

    A refused address also fails :meth:`recheck`, so an application can test what its outbox
    does with a copy whose key was revoked after it was queued. ``passphrase`` makes the
    "signing key" need that passphrase: none given raises ``PassphraseError(missing=True)``
    (the mailer then asks its passphrase source), a wrong one ``PassphraseError``.
    """

    name: ClassVar[str] = "mock"
    #: The header field every copy carries.
    MARKER: ClassVar[str] = "X-E2Email-Mock"

    def __init__(
        self,
        *,
        refuse: Mapping[str, KeyReason | str] | None = None,
        passphrase: str | None = None,
    ) -> None:
        #: Every message asked for, finalised, in order (also those refused).
        self.messages: list[Message] = []
        #: Every copy returned, in order.
        self.copies: list[ProtectedCopy] = []
        self._refused: dict[str, KeyProblem] = {}
        self._passphrase = passphrase
        for address, reason in (refuse or {}).items():
            self.refuse(address, reason)

    def __repr__(self) -> str:
        return f"MockProtector(refused={sorted(self._refused)!r})"

    def refuse(self, address: str, reason: KeyReason | str = KeyReason.NOT_FOUND) -> None:
        """Treat ``address`` as having no usable key: ``reason`` is a :class:`KeyReason` or a
        free text (shown as the detail of a :attr:`KeyReason.BACKEND` problem)."""
        addr = address.strip().lower()
        if isinstance(reason, KeyReason):
            problem = KeyProblem(addr, reason, "", _mock_fingerprint(addr))
        else:
            problem = KeyProblem(addr, KeyReason.BACKEND, reason, _mock_fingerprint(addr))
        self._refused[addr] = problem

    def allow(self, address: str) -> None:
        """Undo :meth:`refuse` for ``address``."""
        self._refused.pop(address.strip().lower(), None)

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        msg = message.finalized()
        self.messages.append(msg)
        sender = msg.sender.addr_spec.lower()
        if protection.sign:
            if sender in self._refused:
                raise SignerKeyError(self._refused[sender])
            if self._passphrase is not None and passphrase is None:
                raise PassphraseError(
                    "the mock signing key needs a passphrase", fingerprint=None, missing=True
                )
            if self._passphrase is not None and passphrase != self._passphrase:
                raise PassphraseError("wrong passphrase for the mock signing key")
        if protection.encrypt:
            # Every problem at once, the sender's own key last (encrypt-to-self).
            wanted = list(dict.fromkeys(a.addr_spec.lower() for a in msg.recipients))
            if protection.encrypt_to_self:
                wanted.append(sender)
            problems = [self._refused[a] for a in dict.fromkeys(wanted) if a in self._refused]
            if problems:
                raise RecipientKeyError(problems)
            plans = copy_plans(msg)
        else:
            plans = [("main", tuple(msg.recipients))]
        done = [
            name
            for name, asked in (("signed", protection.sign), ("encrypted", protection.encrypt))
            if asked
        ]
        marker = f"{self.MARKER}: {', '.join(done) or 'not protected'}\r\n".encode("ascii")
        payload = build_payload(msg, hp=None)
        copies = []
        for kind, rcpts in plans:
            keys: list[str] = []
            if protection.encrypt:
                keys = [_mock_fingerprint(a.addr_spec.lower()) for a in rcpts]
                if protection.encrypt_to_self:
                    keys.append(_mock_fingerprint(sender))
            copies.append(
                make_copy(
                    message_head(msg, hp=None) + marker + payload,
                    msg,
                    kind,
                    rcpts,
                    signed=protection.sign,
                    encrypted_to=list(dict.fromkeys(keys)),
                    signer=_mock_fingerprint(sender) if protection.sign else None,
                    scheme=self.name,
                )
            )
        self.copies.extend(copies)
        return tuple(copies)

    def missing_keys(self, addresses: Sequence[str], protection: Protection) -> list[KeyProblem]:
        """The refused addresses among ``addresses`` (what a relay asks at RCPT)."""
        if not protection.encrypt:
            return []
        wanted = [a.strip().lower() for a in addresses]
        return [self._refused[a] for a in dict.fromkeys(wanted) if a in self._refused]

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        """A refused address's key counts as gone bad since the copy was made."""
        by_fpr = {p.fingerprint: p for p in self._refused.values()}
        return [by_fpr[f] for f in dict.fromkeys(encrypted_to) if f in by_fpr]


def _mock_fingerprint(address: str) -> str:
    """The stand-in "fingerprint" of an address's key, recorded in ``encrypted_to``."""
    return f"MOCK:{address}"
