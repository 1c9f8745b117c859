"""``e2email relay``: a local SMTP submission server that protects every message it accepts.

For programs that can only speak plain SMTP to "a mail server" (anything with an SMTP host
setting, Python's :class:`logging.handlers.SMTPHandler`, monitoring tools): they submit to the
relay, the relay protects each message as the mailer's policy says, stores the protected copies
in the outbox and delivers them upstream with e2email's own rules (verified TLS, no downgrade,
the outbox's retries).

What a client can rely on:

* **250 means stored.** The reply to the end of DATA (RFC 5321 §4.1.1.4) is ``250`` only once
  the protected copies are committed to the outbox (SQLite, ``synchronous=FULL``: the commit is
  on disk). Delivery upstream happens afterwards, in the background; a copy not delivered stays
  in the outbox for the next run or ``e2email outbox retry``.
* **Fail closed, early.** A recipient whose key is already known to be missing is refused at
  RCPT (``550 5.7.1``, RFC 3463 §3.8: delivery not authorized, message refused). A message that
  cannot be protected is refused at the end of DATA with ``550 5.7.1`` naming each recipient
  and the reason, and nothing of it is stored or sent.
* **No AUTH in clear.** On loopback no TLS is needed. Any other address needs a TLS context
  (STARTTLS, RFC 3207, required before any mail command) and credentials (AUTH, RFC 4954,
  offered only after TLS).
* **A clean stop.** :meth:`Relay.stop` (SIGTERM, SIGINT in the CLI) stops accepting, lets every
  message whose data is being received or stored finish (its client gets its 250), answers
  anything else with ``421``, lets the upstream transactions in progress finish (bounded), and
  leaves the rest in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from e2email import inbound
from e2email.client import AsyncMailer, ProtectedCopy, outbox_item
from e2email.config import Protection
from e2email.delivery import route_of
from e2email.errors import (
    ConfigError,
    CryptoError,
    E2EmailError,
    KeyErrorBase,
    KeyProblem,
    MessageError,
    RecipientKeyError,
    SignerKeyError,
)
from e2email.outbox import ItemState, Outbox, OutboxItem, same_route
from e2email.outcome import CopyOutcome
from e2email.private import ensure_private_dir, write_private

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "Relay",
    "TLSFiles",
    "is_loopback",
    "self_signed_certificate",
    "store_copies",
]

log = logging.getLogger(__name__)

#: The SIZE announced (RFC 1870) and enforced: 35 MiB, a common submission limit; a message
#: above it is refused with 552 after its data (aiosmtpd does this).
DEFAULT_MAX_MESSAGE_SIZE = 35 * 1024 * 1024
#: RCPT commands accepted per message: RFC 5321 §4.5.3.1.8 asks for at least 100.
DEFAULT_MAX_RECIPIENTS = 100
#: How many stored copies one delivery round sends, per connection, before checking whether
#: to stop: a clean stop waits for one round, so that no copy is cut off mid-transaction
#: upstream (which the next start would send a second time).
_ROUND_PER_CONNECTION = 2


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)? Only there may the relay listen
    without TLS and AUTH."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _line(text: str) -> str:
    """``text`` safe for one SMTP reply line: ASCII, no control characters (a client's address
    or a key's user ID must not be able to end the reply or start another)."""
    flat = " ".join(text.split())
    return "".join(c if " " <= c < "\x7f" else "?" for c in flat)


def _reply(code: int, enhanced: str, lines: Sequence[str]) -> str:
    """A (possibly multiline, RFC 5321 §4.2.1) reply: ``code-`` on every line but the last."""
    lines = [_line(x) for x in lines] or [""]
    out = [f"{code}-{enhanced} {x}" for x in lines[:-1]]
    out.append(f"{code} {enhanced} {lines[-1]}")
    return "\r\n".join(out)


def _why(problem: KeyProblem) -> str:
    return problem.reason.value + (f" ({problem.detail})" if problem.detail else "")


def _problem_reply(problems: Sequence[KeyProblem]) -> str:
    """550 5.7.1 (RFC 3463 §3.8: delivery not authorized, message refused), one line per
    address and why."""
    return _reply(550, "5.7.1", [f"<{p.address}>: {_why(p)}" for p in problems])


# -- storing protected copies -------------------------------------------------------------


async def store_copies(mailer: AsyncMailer, copies: Sequence[ProtectedCopy]) -> tuple[str, ...]:
    """Store ``copies`` in ``mailer``'s outbox, not claimed: the next delivery round (or any
    ``outbox retry``) sends them. Returns their outbox IDs once the commit is on disk.

    The outbox entry is what :meth:`AsyncMailer.send_copies` stores (same metadata: a retry
    asks for REQUIRETLS when the settings did), for the mailer's upstream route."""
    outbox = mailer.outbox
    if outbox is None:
        raise ConfigError("the relay needs an outbox: accepted messages must survive a crash")
    smtp = mailer.smtp
    if smtp is None:
        raise ConfigError("the relay needs an upstream SMTP server")
    # The route leaves the port out; a relay without an account delivers only what was
    # stored for its own upstream, host and port (see Relay._mine).
    items = [outbox_item(c, smtp, meta={"port": smtp.port}) for c in copies]
    return await asyncio.to_thread(outbox.add, items, route=route_of(smtp), claim=False)


# -- TLS for the listener -----------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A certificate and its key (PEM files), and the certificate's SHA-256 fingerprint."""

    cert: Path
    key: Path
    fingerprint: str

    def context(self) -> ssl.SSLContext:
        """A server context for STARTTLS: TLS 1.2 at least, as for every e2email connection."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the certificate {self.cert} with key {self.key}: {exc}"
            ) from exc
        return context

    @classmethod
    def load(cls, cert: Path, key: Path) -> TLSFiles:
        try:
            pem = cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the certificate {cert}: {exc.strerror}") from exc
        files = cls(cert, key, _fingerprint(pem))
        files.context()  # checked now: a bad pair is a start-up error, not a failed STARTTLS
        return files


def _fingerprint(pem: bytes) -> str:
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def self_signed_certificate(directory: Path, host: str) -> TLSFiles:
    """A self-signed certificate for ``host`` kept in ``directory`` (made 0700, files 0600),
    made on first use and reused after, so that clients that pin its fingerprint keep working
    across restarts. A kept certificate for another name is replaced."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = ensure_private_dir(directory, what="the relay's TLS folder")
    name = host.strip("[]").lower()
    cert_path, key_path = folder / "relay-cert.pem", folder / "relay-key.pem"
    if cert_path.is_file() and key_path.is_file():
        try:
            kept = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = kept.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v).lower() for v in san.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
            if name in names and kept.not_valid_after_utc > datetime.datetime.now(datetime.UTC):
                return TLSFiles.load(cert_path, key_path)
        except (ValueError, x509.ExtensionNotFound, OSError):
            pass  # unreadable or for another name: make a new one
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"e2email relay {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return TLSFiles.load(cert_path, key_path)


# -- the SMTP side ------------------------------------------------------------------------


class _Authenticator:
    """AUTH PLAIN/LOGIN against the configured users (constant-time comparison)."""

    def __init__(self, credentials: Mapping[str, str]) -> None:
        self._credentials = {u.encode(): p.encode() for u, p in credentials.items()}

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        expected = self._credentials.get(data.login)
        # Compare even for an unknown user, so that timing does not tell users apart.
        ok = hmac.compare_digest(expected or b"\0" * 32, data.password) and expected is not None
        if not ok:
            log.warning("AUTH %s failed from %s", mechanism, session.peer)
        return AuthResult(success=ok, handled=False)


class _Session(SMTP):
    """aiosmtpd's SMTP protocol, counting the messages whose data is being received or stored
    (a clean stop waits for those) and tracked by the relay so that it can close the rest."""

    def __init__(self, relay: Relay, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._relay._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._relay._sessions.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        relay = self._relay
        if relay._stopping:
            await self.push("421 4.3.2 e2email relay shutting down, try again later")
            return
        relay._busy += 1
        relay._idle.clear()
        try:
            await super().smtp_DATA(arg)
        finally:
            relay._busy -= 1
            if relay._busy == 0:
                relay._idle.set()

    def shut(self) -> None:
        """Say goodbye (RFC 5321 §3.8: 421 when the service must close) and close."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(b"421 4.3.2 e2email relay shutting down\r\n")  # type: ignore[attr-defined]
            transport.close()


class _Handler:
    """aiosmtpd's hooks: RCPT (limits, known missing keys) and DATA (protect, store)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self._relay._stopping:
            return "421 4.3.2 e2email relay shutting down, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        relay = self._relay
        if relay._stopping:
            return "421 4.3.2 e2email relay shutting down, try again later"
        if len(envelope.rcpt_tos) >= relay.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 for too many recipients; the client sends the rest in
            # another transaction.
            return "452 4.5.3 Too many recipients"
        reason = await relay._known_missing_key(address)
        if reason is not None:
            log.info("refused a recipient at RCPT: %s", _line(reason))
            return _reply(550, "5.7.1", [f"<{address}>: {reason}"])
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        return await self._relay._accept(raw, envelope.mail_from, tuple(envelope.rcpt_tos))


# -- the relay ----------------------------------------------------------------------------


class Relay:
    """An SMTP submission server on ``host``:``port`` that protects with ``mailer`` (its
    keystore, certstore and protection policy), stores in ``mailer.outbox`` and delivers to
    ``mailer.smtp``. All options are keyword-only.

    ``tls_context`` enables STARTTLS (then required before any mail command) and
    ``credentials`` (user -> password) AUTH (then required, and offered only after TLS). On
    anything but loopback both are required. ``port=0`` picks a free port (see
    :attr:`address`). Use ``async with Relay(...)`` or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        mailer: AsyncMailer,
        *,
        host: str = "127.0.0.1",
        port: int = 1587,
        protection: Protection | None = None,
        tls_context: ssl.SSLContext | None = None,
        credentials: Mapping[str, str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        retry_interval: float = 60.0,
        stop_timeout: float = 30.0,
        hostname: str | None = None,
    ) -> None:
        if mailer.outbox is None:
            raise ConfigError("the relay needs an outbox: accepted messages must survive a crash")
        if mailer.smtp is None:
            raise ConfigError("the relay needs an upstream SMTP server to deliver to")
        if not is_loopback(host):
            missing = []
            if tls_context is None:
                missing.append("TLS (a certificate for STARTTLS)")
            if not credentials:
                missing.append("AUTH credentials")
            if missing:
                raise ConfigError(
                    f"listening on {host} (not loopback) needs {' and '.join(missing)}: "
                    "anyone who can reach it could otherwise read or send mail through it"
                )
        if credentials and tls_context is None:
            raise ConfigError("AUTH needs TLS: credentials are never accepted in clear")
        if max_message_size < 1 or max_recipients < 1:
            raise ConfigError("the relay's size and recipient limits must be positive")
        self.mailer = mailer
        self.host = host
        self.port = port
        self.protection = protection if protection is not None else mailer.protection
        self.tls_context = tls_context
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.retry_interval = retry_interval
        self.stop_timeout = stop_timeout
        self.hostname = hostname or socket.gethostname()
        self._authenticator = _Authenticator(credentials) if credentials else None
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._wake = asyncio.Event()
        self._delivery: asyncio.Task[None] | None = None
        self._round: asyncio.Task[None] | None = None
        #: Counters for the log and for tests.
        self.accepted = 0
        self.refused = 0
        self.delivered = 0

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) listened on (the real port when ``port=0``)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def _protocol(self) -> _Session:
        auth = self._authenticator is not None
        return _Session(
            self,
            _Handler(self),
            data_size_limit=self.max_message_size,
            # Bytes in, bytes protected: 8-bit bodies are kept as they are and re-encoded for
            # signing where needed (8BITMIME is announced by aiosmtpd with decode_data=False).
            decode_data=False,
            # Not announced: the upstream submission and the message layer would both have to
            # carry internationalised addresses (RFC 6531), which they do not promise.
            enable_SMTPUTF8=False,
            hostname=self.hostname,
            ident="e2email relay",
            tls_context=self.tls_context,
            require_starttls=self.tls_context is not None,
            auth_required=auth,
            auth_require_tls=True,
            authenticator=self._authenticator,
        )

    async def start(self) -> None:
        """Listen, and start delivering what waits in the outbox for this upstream server."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._protocol, host=self.host.strip("[]"), port=self.port
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        host, port = self.address
        log.info(
            "listening on %s:%d (%s%s), delivering to %s",
            host,
            port,
            "STARTTLS required" if self.tls_context else "loopback, no TLS",
            ", AUTH required" if self._authenticator else "",
            route_of(self.mailer.smtp) if self.mailer.smtp else "?",
        )
        self._delivery = asyncio.create_task(self._deliver_forever())

    async def stop(self) -> None:
        """Stop cleanly: no new connection or message; every message whose data is being
        received or stored is finished (its client gets its reply); the other sessions get
        421; upstream transactions in progress finish (within ``stop_timeout`` each wait);
        what was not delivered stays in the outbox."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("stopping: gave up waiting for %d message(s) in progress", self._busy)
        for session in list(self._sessions):
            session.shut()
        self._wake.set()
        if self._delivery is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._delivery), self.stop_timeout)
            except TimeoutError:
                log.warning("stopping: upstream delivery did not finish; the rest stays queued")
                self._delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._delivery
        if self._server is not None:
            await self._server.wait_closed()
        left = await asyncio.to_thread(self._waiting)
        log.info(
            "stopped: %d accepted, %d refused, %d delivered; %d copy(ies) wait in the outbox",
            self.accepted,
            self.refused,
            self.delivered,
            left,
        )

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- accepting ------------------------------------------------------------------------

    async def _known_missing_key(self, address: str) -> str | None:
        """Why ``address`` cannot be encrypted to, when that is already known (encryption
        asked and no usable key or certificate), else None."""
        try:
            missing = await asyncio.to_thread(
                inbound.recipients_without_keys,
                self.mailer,
                [address],
                protection=self.protection,
            )
        except E2EmailError as exc:
            # Not known to be missing (e.g. the keystore could not be read): DATA decides.
            log.warning("could not check a recipient's key at RCPT: %s", exc)
            return None
        return next(iter(missing.values()), None)

    async def _accept(self, raw: bytes, mail_from: str | None, rcpts: tuple[str, ...]) -> str:
        """Protect and store one submitted message; the reply to the end of its DATA."""
        try:
            copies = await inbound.protect(
                self.mailer,
                raw,
                envelope_from=mail_from or None,
                recipients=rcpts,
                protection=self.protection,
            )
            if not copies:
                raise MessageError("no recipient left to send to", field="recipients")
            ids = await store_copies(self.mailer, copies)
        except RecipientKeyError as exc:
            self.refused += 1
            log.info(
                "refused a message to %d recipient(s): %d without a usable key",
                len(rcpts),
                len(exc.problems),
            )
            return _problem_reply(exc.problems)
        except SignerKeyError as exc:
            self.refused += 1
            log.error("refused a message: cannot sign: %s", exc.problem)
            problem = exc.problem
            return _reply(550, "5.7.1", [f"<{problem.address}>: cannot sign: {_why(problem)}"])
        except (KeyErrorBase, CryptoError) as exc:
            # A passphrase or the crypto backend: the relay's setup, not the message; the
            # client may try again once it is fixed.
            self.refused += 1
            log.error("refused a message: %s", exc)
            return _reply(451, "4.7.0", [f"cannot protect the message now: {exc}"])
        except MessageError as exc:
            self.refused += 1
            log.info("refused a malformed message: %s", exc)
            return _reply(554, "5.6.0", [f"cannot protect this message: {exc}"])
        except E2EmailError as exc:
            self.refused += 1
            log.error("refused a message (not stored): %s", exc)
            return _reply(451, "4.3.0", [f"cannot store the message now: {exc}"])
        except Exception:
            self.refused += 1
            log.exception("refused a message: internal error")
            return _reply(451, "4.3.0", ["internal error; the message was not accepted"])
        self.accepted += 1
        log.info(
            "stored %s for %d recipient(s) (%d copy(ies)); delivering",
            ",".join(ids),
            len(rcpts),
            len(copies),
        )
        self._wake.set()
        return f"250 2.0.0 OK queued as {ids[0]}"

    # -- delivering -----------------------------------------------------------------------

    def _outbox_route(self) -> tuple[Outbox, str]:
        outbox, smtp = self.mailer.outbox, self.mailer.smtp
        assert outbox is not None  # checked in __init__
        assert smtp is not None
        return outbox, route_of(smtp)

    def _mine(self, item: OutboxItem, route: str) -> bool:
        """Is ``item`` for this relay to deliver? The outbox may be shared with other programs
        (``e2email send``, sendmail, other accounts): their copies go through their own
        server, never this relay's. With an account: the items stored for that account.
        Without: the items stored for no account, for this upstream's host (and user) and
        port (which the route leaves out: :func:`store_copies` records it)."""
        outbox = self.mailer.outbox
        assert outbox is not None
        assert self.mailer.smtp is not None
        if outbox.account is not None:
            return item.account == outbox.account
        return (
            item.account is None
            and item.route is not None
            and same_route(item.route, route)
            and "port" in item.meta
            and item.meta["port"] == self.mailer.smtp.port
        )

    def _waiting(self) -> int:
        """Copies for this relay (see :meth:`_mine`) still in the outbox."""
        outbox, route = self._outbox_route()
        return sum(self._mine(it, route) for it in outbox.items())

    def _due(self) -> tuple[list[str], float | None]:
        """IDs of copies for this route that are due now, and when the next one will be.
        Copies the server refused for good (5xx) and copies it may have already (interrupted
        after their end of data) wait for the user (``e2email outbox``), as for every
        ``outbox retry``."""
        outbox, route = self._outbox_route()
        now = time.time()
        due: list[str] = []
        later: float | None = None
        for item in outbox.items():
            if not self._mine(item, route) or item.state in (
                ItemState.FAILED,
                ItemState.MAYBE_DELIVERED,
            ):
                continue
            if item.next_attempt <= now:
                due.append(item.id)
            else:
                later = item.next_attempt if later is None else min(later, item.next_attempt)
        return due, later

    def _outcome(self, outcome: CopyOutcome) -> None:
        n = len(outcome.recipients)
        if outcome.status == "delivered":
            self.delivered += 1
            log.info("%s: delivered upstream to %d recipient(s)", outcome.id, n)
        else:
            log.warning(
                "%s: %s (%d of %d recipient(s) delivered): %s; kept in the outbox",
                outcome.id,
                outcome.status,
                len(outcome.delivered),
                n,
                _line(str(outcome.error) if outcome.error else "not delivered"),
            )

    async def _deliver_forever(self) -> None:
        """Deliver what is due, in small rounds (a stop waits for one round at most), then
        wait for a new message or the next retry time."""
        failures = 0
        while True:
            self._wake.clear()
            later: float | None = None
            try:
                due, later = await asyncio.to_thread(self._due)
                size = _ROUND_PER_CONNECTION * self.mailer.connections
                for start in range(0, len(due), size):
                    if self._stopping:
                        return
                    await self.mailer.send_outbox(
                        due[start : start + size],
                        include_failed=False,
                        due_only=True,
                        on_outcome=self._outcome,
                    )
                failures = 0
            except E2EmailError as exc:
                # The upstream server is unreachable, TLS or credentials failed, or an item
                # went away under us: what was not delivered stays queued; try again later.
                failures += 1
                later = time.time() + min(self.retry_interval, 2.0**failures)
                log.warning("upstream delivery stopped: %s (kept in the outbox)", _line(str(exc)))
            except Exception:
                # A bug must not end delivery for good while the relay goes on accepting.
                failures += 1
                later = time.time() + min(self.retry_interval, 2.0**failures)
                log.exception("upstream delivery failed (kept in the outbox)")
            if self._stopping:
                return
            wait = self.retry_interval
            if later is not None:
                wait = max(0.5, min(wait, later - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


async def run_until_stopped(relay: Relay, stop: asyncio.Event) -> None:
    """Start ``relay``, serve until ``stop`` is set, then stop it cleanly."""
    await relay.start()
    try:
        await stop.wait()
    finally:
        await relay.stop()
