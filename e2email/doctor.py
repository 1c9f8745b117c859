"""``e2email doctor``: what an SMTP host offers on each submission port, and which to use.

For each of ports 25, 465, 587 and 2525, concurrently and with timeouts: is it reachable, does
it speak implicit TLS, STARTTLS or no TLS, which TLS version and cipher, the certificate
(subject, issuer, expiry, host-name match, whether it verifies exactly as ``e2email send``
would verify it), and the SMTP extensions (AUTH mechanisms, SIZE, 8BITMIME, SMTPUTF8,
REQUIRETLS, PIPELINING, CHUNKING). Then a recommendation in plain words.

The probe only ever sends EHLO, STARTTLS and QUIT: never AUTH, never MAIL, so it sends no mail
and no credentials, whatever the port (port 25 included). When a certificate does not verify,
a second connection completes a handshake *without* verification only to read the certificate
and say what is wrong with it; the report marks it as not verified, and nothing learned that
way counts as usable.

Everything the server says (greeting, EHLO lines, replies, certificate names) is stripped of
terminal escape sequences and control characters before it reaches the report
(:func:`e2email.transport.text.server_text`). A bad host name, or one with a port glued on, is
a :class:`~e2email.errors.ConfigError` before anything is probed; names are probed and
matched in their IDNA 2008 A-label form, as ``e2email send`` connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from e2email.config import host_for_connecting
from e2email.transport.smtp import client_tls_context
from e2email.transport.text import server_text

__all__ = [
    "PROBED_PORTS",
    "CertificateInfo",
    "DoctorReport",
    "PortReport",
    "Recommendation",
    "diagnose",
    "diagnose_sync",
]

#: The ports probed, in the order they are reported.
PROBED_PORTS: tuple[int, ...] = (25, 465, 587, 2525)

#: What e2email would use each port for (465 implicit TLS, the others STARTTLS required).
_SUBMISSION_PREFERENCE = (465, 587, 2525, 25)

#: Warn when the certificate expires within this many days.
_EXPIRY_WARNING_DAYS = 14

_MAX_REPLY_LINES = 100
_EHLO_NAME = "[127.0.0.1]"  # as the transport sends it: the machine's name is nobody's business

TLSOffer = Literal["implicit", "starttls", "none"]


@dataclass(frozen=True)
class CertificateInfo:
    """The server's certificate as presented, and whether it verified."""

    subject: str
    issuer: str
    not_before: str
    not_after: str
    days_left: int
    #: DNS names and IP addresses from subjectAltName.
    names: tuple[str, ...]
    #: Did the certificate (chain, dates and host name) verify as ``e2email send`` verifies?
    verified: bool
    #: Does a subjectAltName match the host that was asked for?
    host_matches: bool
    #: OpenSSL's reason when it did not verify.
    verify_error: str | None = None


@dataclass(frozen=True)
class PortReport:
    """What one port offers."""

    #: The standard port this probe stands for (25, 465, 587, 2525).
    port: int
    #: The port really connected to (differs only when a ``ports`` mapping was given).
    connected_port: int
    reachable: bool
    #: How the port protects the session: implicit TLS, STARTTLS offered, or no TLS at all.
    tls: TLSOffer | None = None
    tls_version: str | None = None
    cipher: str | None = None
    certificate: CertificateInfo | None = None
    #: The greeting line(s), e.g. ``220 smtp.example.org ESMTP``.
    banner: str | None = None
    #: EHLO keywords (upper case) -> parameters, from inside TLS when there is TLS.
    extensions: dict[str, str] = field(default_factory=dict)
    #: EHLO keywords offered before TLS (STARTTLS ports only).
    extensions_before_tls: dict[str, str] = field(default_factory=dict)
    auth_mechanisms: tuple[str, ...] = ()
    size_limit: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    requiretls: bool = False
    pipelining: bool = False
    #: CHUNKING (RFC 3030, BDAT): with PIPELINING, a message goes in one round trip.
    chunking: bool = False
    #: Would ``e2email send`` accept this port (verified TLS >= 1.2)?
    usable: bool = False
    #: What is wrong or worth knowing, in plain words.
    problems: tuple[str, ...] = ()
    #: Why the probe failed, when it did (refused, timed out, ...).
    error: str | None = None


@dataclass(frozen=True)
class Recommendation:
    """Which port to use, or ``port=None`` when none is usable; ``text`` says why."""

    port: int | None
    tls: TLSOffer | None
    text: str


@dataclass(frozen=True)
class DoctorReport:
    host: str
    ports: tuple[PortReport, ...]
    recommendation: Recommendation

    @property
    def ok(self) -> bool:
        return self.recommendation.port is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def describe(self) -> str:
        """A readable multi-line summary (the default CLI output)."""
        lines = [f"e2email doctor: {self.host}"]
        for report in self.ports:
            lines.extend(_describe_port(report))
        lines.append("")
        lines.append(self.recommendation.text)
        return "\n".join(lines)


# -- the probe ----------------------------------------------------------------------------------


_T = TypeVar("_T")


async def _within(call: Awaitable[_T], seconds: float) -> _T:
    """``await call`` for at most ``seconds`` (TimeoutError after). Not ``asyncio.wait_for``:
    on Python 3.11 it loses a cancellation (Ctrl-C) that arrives just as the awaited step
    completes (CPython gh-86296); ``asyncio.timeout()`` never does."""
    async with asyncio.timeout(seconds):
        return await call


class _Unreachable(Exception):
    """The TCP connection could not be made."""


class _NotThisMode(Exception):
    """Connected, but the port does not speak the TLS mode being tried."""


class _Session:
    """A minimal SMTP client on asyncio streams: EHLO, STARTTLS and QUIT only."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        lines: list[str] = []
        while len(lines) < _MAX_REPLY_LINES:
            try:
                raw = await _within(self.reader.readline(), timeout or self.timeout)
            except ValueError as exc:
                # StreamReader's line limit (64 KiB) overrun: no SMTP server sends that
                # (RFC 5321 §4.5.3.1.5: 512 octets per reply line).
                raise ConnectionError("a reply line longer than 64 KiB") from exc
            if not raw:
                raise ConnectionError("the server closed the connection")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                raise _NotThisMode(f"not an SMTP reply: {text[:60]!r}")
            # The server's words reach the report (banner, extensions, problems) only made
            # safe: no escape sequences or control characters (the code and separator stay).
            lines.append(text[:4] + server_text(text[4:]))
            if text[3:4] != "-":
                return int(text[:3]), lines
        raise ConnectionError("reply too long")

    async def command(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode("ascii") + b"\r\n")
        await _within(self.writer.drain(), self.timeout)
        return await self.reply()

    async def ehlo(self) -> dict[str, str]:
        code, lines = await self.command(f"EHLO {_EHLO_NAME}")
        if code != 250:
            raise ConnectionError(f"EHLO refused: {lines[-1] if lines else code}")
        extensions: dict[str, str] = {}
        for line in lines[1:]:
            keyword, _, params = line[4:].strip().partition(" ")
            if keyword:
                extensions[keyword.upper()] = params.strip()
        return extensions

    async def close(self, *, polite: bool = True) -> None:
        """QUIT and close; ``polite=False`` just drops the connection (after a failed
        handshake or a missing greeting there is no session to end)."""
        if polite:
            with contextlib.suppress(Exception):
                self.writer.write(b"QUIT\r\n")
                await _within(self.writer.drain(), self.timeout)
                await _within(self.reply(), min(self.timeout, 2.0))
            self.writer.close()
        else:
            self.writer.transport.abort()
        with contextlib.suppress(Exception):
            await _within(self.writer.wait_closed(), 1.0)


def _lax_context() -> ssl.SSLContext:
    """For reading a certificate that did not verify, and nothing else: no verification, any
    protocol version OpenSSL still has (so an old server can be named as such)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with contextlib.suppress(ssl.SSLError, ValueError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with contextlib.suppress(ValueError):
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    return ctx


async def _connect(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection; any failure here means the port is not reachable."""
    try:
        return await _within(asyncio.open_connection(host, port), timeout)
    except TimeoutError as exc:
        raise _Unreachable(f"timed out after {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise _Unreachable("connection refused") from exc
    except OSError as exc:
        raise _Unreachable(exc.strerror or str(exc) or type(exc).__name__) from exc


class _HandshakeFailed(Exception):
    """The TLS handshake failed. ``certificate`` is true when it got as far as rejecting the
    certificate (or host name); ``not_tls`` when the other side does not speak TLS at all."""

    def __init__(self, reason: str, *, certificate: bool = False, not_tls: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate
        #: The other side does not speak TLS (it said something else, or nothing at all).
        self.not_tls = not_tls


_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}
)


async def _handshake(
    writer: asyncio.StreamWriter, host: str, ctx: ssl.SSLContext, timeout: float
) -> None:
    """TLS on an open connection (from the first byte for implicit TLS, or after STARTTLS)."""
    try:
        await _within(
            writer.start_tls(ctx, server_hostname=host, ssl_handshake_timeout=timeout), timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise _HandshakeFailed(_ssl_reason(exc), certificate=True) from exc
    except ssl.SSLError as exc:
        raise _HandshakeFailed(_ssl_reason(exc), not_tls=exc.reason in _NOT_TLS_REASONS) from exc
    except TimeoutError as exc:
        raise _HandshakeFailed(f"no TLS handshake within {timeout:g} s", not_tls=True) from exc
    except (ConnectionError, EOFError, OSError) as exc:
        # asyncio servers in particular just close when they dislike the ClientHello, e.g.
        # one that cannot do TLS 1.2.
        raise _HandshakeFailed(
            "the server closed the connection during the handshake (it may not support TLS "
            "1.2 or newer)"
        ) from exc


@dataclass
class _Findings:
    tls: TLSOffer | None = None
    tls_version: str | None = None
    cipher: str | None = None
    certificate: CertificateInfo | None = None
    banner: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    extensions_before_tls: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    #: Why the verifying handshake failed, and whether it was the certificate.
    tls_error: str | None = None
    certificate_error: bool = False
    problems: list[str] = field(default_factory=list)


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return server_text(str(exc.verify_message))
    return server_text(str(exc.reason or exc.strerror or exc))


def _record_tls(findings: _Findings, writer: asyncio.StreamWriter, host: str) -> None:
    sslobj = writer.get_extra_info("ssl_object")
    if sslobj is None:
        return
    findings.tls_version = sslobj.version()
    cipher = sslobj.cipher()
    findings.cipher = cipher[0] if cipher else None
    der = sslobj.getpeercert(binary_form=True)
    if der:
        error = findings.tls_error
        if error is not None and not findings.certificate_error:
            error = f"not checked: the verifying handshake failed first ({error})"
        findings.certificate = _certificate_info(der, host, findings.verified, error)


async def _smtp_inside(findings: _Findings, session: _Session) -> None:
    """Greeting and EHLO inside implicit TLS."""
    try:
        code, lines = await session.reply()
        findings.banner = "\n".join(lines)
        if code == 220:
            findings.extensions = await session.ehlo()
        else:
            findings.problems.append(f"greeting is not 220: {lines[-1]}")
    except (_NotThisMode, ConnectionError, TimeoutError) as exc:
        findings.problems.append(f"SMTP inside TLS failed: {str(exc) or type(exc).__name__}")


async def _probe_implicit(
    host: str, port: int, verify: ssl.SSLContext, timeout: float
) -> _Findings:
    findings = _Findings(tls="implicit")
    reader, writer = await _connect(host, port, timeout)
    session = _Session(reader, writer, timeout)
    try:
        await _handshake(writer, host, verify, timeout)
        findings.verified = True
    except _HandshakeFailed as exc:
        await session.close(polite=False)
        if exc.not_tls:
            raise _NotThisMode(exc.reason) from exc
        findings.tls_error, findings.certificate_error = exc.reason, exc.certificate
    if not findings.verified:
        # Second look, without verification, only to read the certificate and the version.
        reader, writer = await _connect(host, port, timeout)
        session = _Session(reader, writer, timeout)
        try:
            await _handshake(writer, host, _lax_context(), timeout)
        except _HandshakeFailed as exc:
            await session.close(polite=False)
            if exc.not_tls:
                raise _NotThisMode(exc.reason) from exc
            findings.problems.append(f"TLS handshake failed: {findings.tls_error}")
            return findings
    _record_tls(findings, writer, host)
    try:
        await _smtp_inside(findings, session)
    finally:
        await session.close()
    return findings


async def _plain_session(
    host: str, port: int, timeout: float, greeting_wait: float
) -> tuple[_Session, str, dict[str, str]]:
    """Connect in clear, read the greeting, EHLO; return the session, banner and extensions."""
    reader, writer = await _connect(host, port, timeout)
    session = _Session(reader, writer, timeout)
    try:
        try:
            code, lines = await session.reply(greeting_wait)
        except TimeoutError as exc:
            raise _NotThisMode(f"no greeting within {greeting_wait:g} s") from exc
        if code != 220:
            raise ConnectionError(f"greeting is not 220: {lines[-1]}")
        return session, "\n".join(lines), await session.ehlo()
    except BaseException:
        await session.close(polite=False)
        raise


class _Injected(Exception):
    """Bytes came in clear after STARTTLS's 220, before TLS: a STARTTLS command injection
    (CVE-2011-0411, RFC 3207 §5) by something on the path, or a broken server. They are never
    read as if they had come from inside TLS."""

    def __init__(self, count: int) -> None:
        super().__init__(
            f"{count} byte(s) came in clear right after STARTTLS's 220, where nothing may "
            "follow until TLS is up: a STARTTLS injection attempt (RFC 3207 §5); they were "
            "ignored and this port is not trusted"
        )


def _buffered(session: _Session) -> int:
    """Bytes the stream reader holds that were not read yet (asyncio has no public API)."""
    return len(getattr(session.reader, "_buffer", b""))


async def _starttls(session: _Session, host: str, ctx: ssl.SSLContext) -> None:
    code, lines = await session.command("STARTTLS")
    if code != 220:
        raise _HandshakeFailed(f"STARTTLS refused: {lines[-1]}")
    # Anything read along with the 220 stays in the reader's buffer across start_tls() and
    # would be taken for the reply to the EHLO inside TLS. Checked again after the handshake:
    # bytes that arrived in clear just after the 220 land there too, and a real server sends
    # nothing inside TLS before our EHLO.
    if _buffered(session):
        raise _Injected(_buffered(session))
    await _handshake(session.writer, host, ctx, session.timeout)
    if _buffered(session):
        raise _Injected(_buffered(session))


async def _probe_plain(
    host: str, port: int, verify: ssl.SSLContext, timeout: float, greeting_wait: float
) -> _Findings:
    findings = _Findings()
    session, banner, before = await _plain_session(host, port, timeout, greeting_wait)
    findings.banner = banner
    findings.extensions_before_tls = before
    if "STARTTLS" not in before:
        findings.tls = "none"
        findings.extensions = before
        await session.close()
        return findings
    findings.tls = "starttls"
    polite = True
    try:
        await _starttls(session, host, verify)
        findings.verified = True
        _record_tls(findings, session.writer, host)
        findings.extensions = await session.ehlo()
        return findings
    except _HandshakeFailed as exc:
        findings.tls_error, findings.certificate_error = exc.reason, exc.certificate
        polite = False
    except _Injected as exc:
        findings.verified = False
        findings.problems.append(str(exc))
        polite = False
        return findings
    except (ConnectionError, TimeoutError, _NotThisMode) as exc:
        findings.problems.append(f"SMTP inside TLS failed: {str(exc) or type(exc).__name__}")
        return findings
    finally:
        await session.close(polite=polite)
    # Second look, without verification, only to read the certificate and the version.
    try:
        session, _, _ = await _plain_session(host, port, timeout, timeout)
    except (_Unreachable, _NotThisMode, ConnectionError, TimeoutError) as exc:
        findings.problems.append(f"TLS handshake failed: {findings.tls_error}; {exc}")
        return findings
    polite = True
    try:
        await _starttls(session, host, _lax_context())
        _record_tls(findings, session.writer, host)
        findings.extensions = await session.ehlo()
    except _HandshakeFailed:
        findings.problems.append(f"TLS handshake failed: {findings.tls_error}")
        polite = False
    except _Injected as exc:
        findings.problems.append(str(exc))
        findings.extensions = {}
        polite = False
    except (ConnectionError, TimeoutError, _NotThisMode) as exc:
        findings.problems.append(f"SMTP inside TLS failed: {str(exc) or type(exc).__name__}")
    finally:
        await session.close(polite=polite)
    return findings


async def _probe(
    host: str, label: int, port: int, verify: ssl.SSLContext, timeout: float
) -> PortReport:
    # 465 is implicit TLS by standard (RFC 8314 §3.3): try that first. The others greet in
    # clear; a port that stays silent is tried with TLS next.
    greeting_wait = min(timeout, 5.0)
    implicit_first = label == 465
    try:
        try:
            findings = await (
                _probe_implicit(host, port, verify, timeout)
                if implicit_first
                else _probe_plain(host, port, verify, timeout, greeting_wait)
            )
        except _NotThisMode as exc:
            why = str(exc)
            try:
                findings = await (
                    _probe_plain(host, port, verify, timeout, timeout)
                    if implicit_first
                    else _probe_implicit(host, port, verify, timeout)
                )
            except (_Unreachable, _NotThisMode) as again:
                # It accepted the first connection, so it is there; it just speaks neither.
                raise _NotThisMode(f"{why}; and {again}") from again
    except _Unreachable as exc:
        return PortReport(port=label, connected_port=port, reachable=False, error=str(exc))
    except (_NotThisMode, ConnectionError, TimeoutError) as exc:
        text = str(exc) or type(exc).__name__
        return PortReport(
            port=label,
            connected_port=port,
            reachable=True,
            error=text,
            problems=(f"connected, but found neither SMTP nor TLS: {text}",),
        )
    return _report(label, port, host, findings)


def _report(label: int, port: int, host: str, f: _Findings) -> PortReport:
    ext = f.extensions
    problems = list(f.problems)
    auth = tuple(ext.get("AUTH", "").upper().split())
    size: int | None = None
    with contextlib.suppress(ValueError):
        size = int(ext["SIZE"]) if ext.get("SIZE") else None
    version_ok = f.tls_version in ("TLSv1.2", "TLSv1.3")
    usable = f.tls in ("implicit", "starttls") and f.verified and version_ok
    cert = f.certificate
    if f.tls == "none":
        problems.append("no TLS at all (no STARTTLS offered): e2email will not use this port")
        if "AUTH" in ext:
            problems.append("AUTH is offered without TLS: passwords would travel in clear")
    elif f.tls is not None and not f.verified:
        if f.certificate_error:
            problems.append(f"the certificate did not verify: {f.tls_error}")
            if cert is not None and not cert.host_matches:
                problems.append(f"the certificate is not for {host} (it names {_names(cert)})")
        elif f.tls_version is not None and version_ok:
            problems.append(f"TLS handshake failed: {f.tls_error}")
        # (an old version is named below; a failed second look is already in the problems)
    if f.tls is not None and f.tls != "none" and f.tls != _standard_mode(label):
        usual = _mode_words(_standard_mode(label))
        problems.append(
            f"port {label} speaks {_mode_words(f.tls)}, not the usual {usual} (RFC 8314): "
            f"e2email needs --tls {f.tls} for it"
        )
    if f.tls_version is not None and not version_ok:
        problems.append(f"only {f.tls_version}: e2email requires TLS 1.2 or newer (RFC 8997)")
    if cert is not None and cert.days_left < 0:
        problems.append(f"the certificate expired on {cert.not_after[:10]}")
    elif cert is not None and cert.days_left <= _EXPIRY_WARNING_DAYS:
        problems.append(f"the certificate expires in {cert.days_left} days ({cert.not_after[:10]})")
    if f.tls == "starttls" and "AUTH" in f.extensions_before_tls:
        problems.append("AUTH is also offered before STARTTLS (e2email never uses it there)")
    if label == 25 and usable:
        problems.append("port 25 is for server-to-server relay; submission belongs on 465/587")
    return PortReport(
        port=label,
        connected_port=port,
        reachable=True,
        tls=f.tls,
        tls_version=f.tls_version,
        cipher=f.cipher,
        certificate=cert,
        banner=f.banner,
        extensions=dict(ext),
        extensions_before_tls=dict(f.extensions_before_tls),
        auth_mechanisms=auth,
        size_limit=size,
        eightbitmime="8BITMIME" in ext,
        smtputf8="SMTPUTF8" in ext,
        requiretls="REQUIRETLS" in ext,
        pipelining="PIPELINING" in ext,
        chunking="CHUNKING" in ext,
        usable=usable,
        problems=tuple(problems),
    )


# -- certificates -------------------------------------------------------------------------------


def _certificate_info(
    der: bytes, host: str, verified: bool, verify_error: str | None
) -> CertificateInfo:
    # Here, not at the top: `cryptography` (about 10 MB) loaded only when a server is checked.
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.extend(san.get_values_for_type(x509.DNSName))
        names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    not_after = cert.not_valid_after_utc
    # Names in a certificate are the server's words too (a CN can hold an escape sequence).
    names = [server_text(name) for name in names]
    return CertificateInfo(
        subject=server_text(cert.subject.rfc4514_string()),
        issuer=server_text(cert.issuer.rfc4514_string()),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=not_after.isoformat(),
        days_left=(not_after - datetime.now(UTC)).days,
        names=tuple(names),
        verified=verified,
        host_matches=verified or _host_matches(host, names),
        verify_error=verify_error,
    )


def _host_matches(host: str, names: Sequence[str]) -> bool:
    """RFC 6125 §6.4 matching of ``host`` against subjectAltName entries: exact (case-blind),
    or a wildcard standing for exactly one left-most label; IP addresses compare as addresses."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    wanted = host.rstrip(".").lower()
    for name in names:
        if address is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(name) == address:
                    return True
            continue
        pattern = name.rstrip(".").lower()
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            first, rest = wanted.split(".", 1)
            if first and rest == pattern[2:]:
                return True
    return False


def _names(cert: CertificateInfo) -> str:
    return ", ".join(cert.names) if cert.names else cert.subject or "no names"


# -- the recommendation -------------------------------------------------------------------------


def _recommend(host: str, reports: Sequence[PortReport]) -> Recommendation:
    by_port = {r.port: r for r in reports}
    for index, port in enumerate(_SUBMISSION_PREFERENCE):
        report = by_port.get(port)
        if report is None or not report.usable:
            continue
        parts = [f"Use port {port} ({_mode_words(report.tls)}, {report.tls_version})"]
        cert = report.certificate
        if cert is not None:
            parts.append(f"the certificate verifies for {host} until {cert.not_after[:10]}")
        if report.auth_mechanisms:
            parts.append("AUTH " + " ".join(report.auth_mechanisms))
        text = "; ".join(parts) + "."
        passed = [by_port[p] for p in _SUBMISSION_PREFERENCE[:index] if p in by_port]
        if passed:
            text += " Not " + "; not ".join(f"port {r.port}: {_short_reason(r)}" for r in passed)
            text += "."
        if port == 25:
            text += (
                " Port 25 is meant for relaying between servers and often refuses"
                " submission; e2email uses it only when asked (--port 25)."
            )
        if not report.requiretls:
            text += " REQUIRETLS is not offered, so --require-tls would refuse to send."
        flag = "" if report.tls == _standard_mode(port) else f" --tls {report.tls}"
        text += f" Try: e2email send --host {host} --port {port}{flag} ..."
        return Recommendation(port=port, tls=report.tls, text=text)
    reasons = "; ".join(f"port {r.port}: {_short_reason(r)}" for r in reports)
    return Recommendation(
        port=None,
        tls=None,
        text=f"No port of {host} can be used with verified TLS 1.2 or newer: {reasons}.",
    )


def _standard_mode(port: int) -> TLSOffer:
    return "implicit" if port == 465 else "starttls"


def _short_reason(report: PortReport) -> str:
    if report.usable:
        return "usable"
    if not report.reachable:
        return f"not reachable ({report.error})"
    if report.problems:
        return report.problems[0]
    return report.error or "not usable"


def _mode_words(tls: TLSOffer | None) -> str:
    return {"implicit": "implicit TLS", "starttls": "STARTTLS", "none": "no TLS"}.get(
        tls or "", "unknown"
    )


def _describe_port(r: PortReport) -> list[str]:
    where = f"port {r.port}" + (f" (at {r.connected_port})" if r.connected_port != r.port else "")
    if not r.reachable:
        return [f"  {where}: not reachable: {r.error}"]
    head = f"  {where}: {_mode_words(r.tls)}"
    if r.tls_version:
        head += f", {r.tls_version} {r.cipher or ''}".rstrip()
    head += ", usable" if r.usable else ", NOT usable"
    lines = [head]
    if r.certificate is not None:
        c = r.certificate
        state = "verified" if c.verified else "DID NOT VERIFY (read without verification)"
        lines.append(f"      certificate {state}: {c.subject}, issued by {c.issuer}")
        lines.append(f"      names: {_names(c)}; expires {c.not_after[:10]} ({c.days_left} days)")
    if r.extensions:
        feats = [f"AUTH {' '.join(r.auth_mechanisms)}" if r.auth_mechanisms else "no AUTH"]
        if r.size_limit:
            feats.append(f"SIZE {r.size_limit}")
        feats += [
            n
            for n, on in (
                ("8BITMIME", r.eightbitmime),
                ("SMTPUTF8", r.smtputf8),
                ("REQUIRETLS", r.requiretls),
                ("PIPELINING", r.pipelining),
                ("CHUNKING", r.chunking),
            )
            if on
        ]
        lines.append("      " + ", ".join(feats))
    lines.extend(f"      ! {p}" for p in r.problems)
    if r.error and not r.problems:
        lines.append(f"      ! {r.error}")
    return lines


# -- entry points -------------------------------------------------------------------------------


async def diagnose(
    host: str,
    *,
    ports: Mapping[int, int] | None = None,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> DoctorReport:
    """Probe ``host`` on 25, 465, 587 and 2525 concurrently and recommend a port.

    ``ports`` maps a standard port to the port really probed (e.g. ``{465: 10465}`` for a test
    server; its keys choose which standard ports are probed). ``ca_file`` trusts only that CA,
    as in ``e2email send --ca-file``. ``timeout`` bounds each network step.
    """
    # A usage error (ConfigError, a ValueError) for a bad name or a glued port, before any
    # probe; the probes connect to, and verify certificates for, the A-label form.
    name = host_for_connecting(
        host, what="host", port_hint="let doctor probe 25, 465, 587 and 2525 (or --port-map)"
    )
    mapping = dict(ports) if ports is not None else {p: p for p in PROBED_PORTS}
    verify = client_tls_context(ca_file)
    # Each probe makes at most a handful of round trips; bound the whole so a tarpit cannot
    # hold the report forever.
    budget = timeout * 6 + 5

    async def bounded(label: int, port: int) -> PortReport:
        try:
            return await _within(_probe(name, label, port, verify, timeout), budget)
        except TimeoutError:
            return PortReport(
                port=label, connected_port=port, reachable=True, error="probe timed out"
            )

    labels = sorted(mapping)
    reports = await asyncio.gather(*(bounded(label, mapping[label]) for label in labels))
    return DoctorReport(host=host, ports=tuple(reports), recommendation=_recommend(host, reports))


def diagnose_sync(
    host: str,
    *,
    ports: Mapping[int, int] | None = None,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> DoctorReport:
    """:func:`diagnose` on a private event loop."""
    return asyncio.run(diagnose(host, ports=ports, ca_file=ca_file, timeout=timeout))


# -- the OpenPGP engines on this machine -------------------------------------------------------


def openpgp_engine_info(*, gpg_binary: str = "gpg") -> dict[str, Any]:
    """The same as :func:`openpgp_engines`, for ``--json``: whether the in-process engine
    can run, where gpg is (None: not installed), which engine AUTO picks, and the line."""
    import shutil

    from e2email.crypto.sequoia import available

    gpg = shutil.which(gpg_binary)
    sequoia = available()
    return {
        "in_process": sequoia,
        "gpg": gpg,
        "default": "sequoia" if sequoia else ("gpg" if gpg else None),
        "summary": openpgp_engines(gpg_binary=gpg_binary)[0],
    }


def openpgp_engines(*, gpg_binary: str = "gpg") -> list[str]:
    """What OpenPGP can use here, one line each, for the end of the report. A missing gpg
    program is only information when the in-process engine is there: only ``--engine gpg``,
    smartcards and GnuPG homes need it."""
    import shutil

    from e2email.crypto.sequoia import available

    gpg = shutil.which(gpg_binary)
    sequoia = available()
    if sequoia and gpg:
        return [f"OpenPGP: in-process engine (pysequoia) by default; gpg also found ({gpg})"]
    if sequoia:
        return [
            "OpenPGP: in-process engine (pysequoia); note: gpg is not installed, which only "
            "--engine gpg, smartcards and GnuPG homes need"
        ]
    if gpg:
        return [f"OpenPGP: gpg ({gpg}); pysequoia cannot be imported (no in-process engine)"]
    return ["OpenPGP: no engine: gpg is not installed and pysequoia cannot be imported"]
