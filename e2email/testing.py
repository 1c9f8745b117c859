"""A real SMTP server on the loopback interface, with real TLS, for tests and ``e2email demo``.

Built on aiosmtpd and trustme: :class:`TestCA` makes a throw-away certificate authority and
server certificates; :class:`LoopbackSMTPServer` runs an aiosmtpd server in a thread of its
own, with implicit TLS, STARTTLS or (for test rigs) no TLS, optional AUTH, and a record of
everything it received::

    with LoopbackSMTPServer(tls="starttls", credentials={"alice": "s3cret"}) as server:
        settings = SMTPSettings(host=server.host, port=server.port, tls=TLSMode.STARTTLS,
                                ca_file=server.ca_file, username="alice", password="s3cret")
        ...
        server.messages[0].data          # the exact bytes received
        server.received_commands()       # ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", ...]

Nothing here is meant for production mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
import threading
import types
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr, Literal

import trustme
from aiosmtpd.smtp import SMTP as _AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, LoginPassword

__all__ = ["LoopbackSMTPServer", "ReceivedMessage", "TestCA"]

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


@dataclass
class ReceivedMessage:
    """One message as the server received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    #: The exact bytes after the DATA command, dot-unstuffed, CRLF line ends as sent, without
    #: the terminating ``.``.
    data: bytes
    tls_version: str | None
    cipher: str | None
    auth_user: str | None


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
        auth = self._owner._advertised_auth
        out: list[str] = []
        for line in responses:
            if line[4:].upper().startswith("AUTH"):
                # aiosmtpd advertises its built-in mechanisms whenever AUTH is possible, even
                # with no credentials configured; advertise exactly what the test asked for.
                if auth:
                    out.append("250-AUTH " + " ".join(auth))
                continue
            out.append(line)
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
        version, cipher = _tls_of(server.transport)
        auth_user: str | None = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            auth_user = session.auth_data.login.decode("utf-8", "replace")
        owner = self._owner
        with owner._lock:
            owner.messages.append(
                ReceivedMessage(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=data,
                    tls_version=version,
                    cipher=cipher,
                    auth_user=auth_user,
                )
            )
            number = len(owner.messages)
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


def _verbs(log: list[tuple[str, bool, bytes]]) -> list[str]:
    """The command verbs of one connection, skipping DATA content and AUTH continuation lines.

    Each final reply line tells how the next client line is to be read (RFC 5321 §4.2, RFC
    4954 §4): after 334 it is an AUTH response, after 354 message data up to ``.``, else a
    command. The greeting counts as the reply that comes before the first command.
    """
    lines: deque[bytes] = deque()
    replies: deque[int] = deque()
    pending = b""
    verbs: list[str] = []
    awaiting = True  # the greeting
    mode = "cmd"

    def pump() -> None:
        nonlocal awaiting, mode
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
            if not lines:
                return
            line = lines.popleft()
            if mode == "data":
                if line == b".":
                    awaiting = True
                continue
            awaiting = True
            if mode == "cmd":
                verb = line.split(b" ", 1)[0].upper()
                verbs.append(verb.decode("ascii", "replace"))

    for kind, _tls, chunk in log:
        if kind == "c":
            pending += chunk
            *complete, pending = pending.split(b"\r\n")
            lines.extend(complete)
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
      possible inside TLS. ``auth_mechanisms`` is what EHLO advertises (aiosmtpd implements
      PLAIN and LOGIN; advertising another makes the server answer it with 504).
    * ``offer_starttls=False`` with ``tls="starttls"``: a server (or a man in the middle) that
      strips STARTTLS, for downgrade tests.
    * ``refuse_recipients``: address -> (code, text) replied to RCPT for that address.
    """

    def __init__(
        self,
        *,
        tls: TLSChoice = "implicit",
        ssl_context: ssl.SSLContext | None = None,
        ca: TestCA | None = None,
        identities: Sequence[str] = ("127.0.0.1", "localhost"),
        credentials: Mapping[str, str] | None = None,
        auth_mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
        offer_starttls: bool = True,
        refuse_recipients: Mapping[str, tuple[int, str]] | None = None,
        host: str = "127.0.0.1",
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
                ssl_context = ca.server_context(*identities)
            self._ssl_context = ssl_context
            self.ca_file = ca.ca_file if ca is not None else None
        self._offer_starttls = offer_starttls
        self._credentials = dict(credentials) if credentials is not None else None
        self._advertised_auth = (
            tuple(m.upper() for m in auth_mechanisms) if self._credentials is not None else ()
        )
        self._refuse = {k.lower(): v for k, v in (refuse_recipients or {}).items()}

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
        excluded = [m for m in ("PLAIN", "LOGIN") if m not in self._advertised_auth]
        return _RecordingSMTP(
            _Handler(self),
            owner=self,
            hostname="loopback.e2email.test",
            ident="e2email test server",
            tls_context=starttls_ctx,
            require_starttls=starttls_ctx is not None,
            implicit_tls=self.tls == "implicit",
            auth_required=self._credentials is not None,
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
