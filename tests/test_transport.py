"""The SMTP transport against a real aiosmtpd server, real TLS and trustme certificates."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from e2email.config import SMTPSettings, TLSMode
from e2email.errors import (
    AuthenticationError,
    ConnectError,
    InsecureTransportError,
    MessageError,
    RecipientsRefusedError,
    SMTPReply,
    TLSError,
)
from e2email.testing import LoopbackSMTPServer, TestCA
from e2email.transport import DeliveryResult, SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

USER = "alice"
PASSWORD = "correct horse battery"
CLIENT_NAME = "client.e2email.test"

RAW = (
    b"From: alice@example.org\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: transport test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"From here on, nothing special.\r\n"
)

MODES = {
    "implicit": TLSMode.IMPLICIT,
    "starttls": TLSMode.STARTTLS,
    "none": TLSMode.INSECURE_PLAINTEXT,
}


def settings_for(server: LoopbackSMTPServer, **kwargs: Any) -> SMTPSettings:
    kwargs.setdefault("tls", MODES[server.tls])
    kwargs.setdefault("ca_file", server.ca_file)
    return SMTPSettings(
        host=server.host,
        port=server.port,
        timeout=5,
        local_hostname=CLIENT_NAME,
        **kwargs,
    )


def send(settings: SMTPSettings, raw: bytes = RAW, **kwargs: Any) -> DeliveryResult:
    kwargs.setdefault("mail_from", "alice@example.org")
    kwargs.setdefault("recipients", ["bob@example.net"])
    return asyncio.run(SMTPTransport(settings).send(raw, **kwargs))


def password_forms(user: str = USER, password: str = PASSWORD) -> list[bytes]:
    """The password as it would travel in PLAIN or LOGIN."""
    pw = password.encode()
    return [
        pw,
        base64.b64encode(pw),
        base64.b64encode(b"\0" + user.encode() + b"\0" + pw),
    ]


def all_bytes(server: LoopbackSMTPServer) -> bytes:
    return b"".join(data for _tls, data in server.transcript)


class PasswordSpy:
    """A password source that records when it was asked."""

    def __init__(self, server: LoopbackSMTPServer | None = None) -> None:
        self.server = server
        self.seen_at_call: list[list[str]] = []

    def __call__(self) -> str:
        self.seen_at_call.append(self.server.received_commands() if self.server else [])
        return PASSWORD


# -- successful delivery ----------------------------------------------------------------------


def test_implicit_tls_delivers_exact_bytes(smtp_server: ServerFactory) -> None:
    """Implicit TLS: the exact bytes arrive (dot-stuffing undone, CRLF kept), both sides record
    TLS 1.2 or newer, and the result reports acceptance and the DATA reply."""
    server = smtp_server(tls="implicit")
    result = send(settings_for(server), recipients=["bob@example.net", "carol@example.net"])

    assert len(server.messages) == 1
    msg = server.messages[0]
    assert msg.data == RAW
    assert msg.mail_from == "alice@example.org"
    assert msg.rcpt_tos == ("bob@example.net", "carol@example.net")
    assert msg.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.tls is not None
    assert result.tls.version == msg.tls_version
    assert result.tls.cipher == msg.cipher
    assert result.accepted == ("bob@example.net", "carol@example.net")
    assert result.refused == ()
    assert result.data_reply == SMTPReply(250, "2.0.0 OK queued as TEST1")
    assert all(tls for tls, _ in server.transcript)
    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def test_starttls_comes_before_anything_but_ehlo(smtp_server: ServerFactory) -> None:
    """STARTTLS: only EHLO and STARTTLS travel in clear; EHLO is repeated inside TLS (RFC 3207
    §4.2), the pre-TLS extensions are forgotten, and the password source is asked only after
    TLS is up, once."""
    server = smtp_server(tls="starttls", credentials={USER: PASSWORD})
    spy = PasswordSpy(server)
    settings = settings_for(server, username=USER, password=spy)

    async def run() -> tuple[dict[str, str], DeliveryResult]:
        async with SMTPTransport(settings).connect() as conn:
            extensions = dict(conn.extensions)
            result = await conn.send(
                RAW, mail_from="alice@example.org", recipients=["bob@example.net"]
            )
            return extensions, result

    extensions, result = asyncio.run(run())

    assert server.cleartext() == f"EHLO {CLIENT_NAME}\r\nSTARTTLS\r\n".encode()
    assert server.received_commands() == [
        "EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    assert spy.seen_at_call == [["EHLO", "STARTTLS", "EHLO"]]
    assert "starttls" not in extensions  # the post-TLS EHLO, not the first one
    assert "auth" in extensions
    assert result.tls is not None
    assert result.tls.version in ("TLSv1.2", "TLSv1.3")
    assert server.messages[0].data == RAW
    assert server.messages[0].auth_user == USER
    assert server.messages[0].tls_version == result.tls.version


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanism_succeeds(smtp_server: ServerFactory, mechanism: str) -> None:
    """AUTH works with a server offering only PLAIN, and with one offering only LOGIN."""
    server = smtp_server(tls="implicit", credentials={USER: PASSWORD}, auth_mechanisms=(mechanism,))
    send(settings_for(server, username=USER, password=PASSWORD))

    assert server.auth_attempts == [(USER, True)]
    assert server.messages[0].auth_user == USER
    assert f"AUTH {mechanism}".encode() in all_bytes(server)


def test_plain_is_preferred_when_both_are_offered(smtp_server: ServerFactory) -> None:
    """With PLAIN and LOGIN both offered, PLAIN is used (one round trip)."""
    server = smtp_server(
        tls="implicit", credentials={USER: PASSWORD}, auth_mechanisms=("LOGIN", "PLAIN")
    )
    send(settings_for(server, username=USER, password=PASSWORD))
    assert b"AUTH PLAIN " in all_bytes(server)
    assert b"AUTH LOGIN" not in all_bytes(server)


# -- authentication failures ------------------------------------------------------------------


def test_wrong_password_raises_with_535(smtp_server: ServerFactory) -> None:
    """Wrong credentials: AuthenticationError carrying the 535 reply, one attempt only (no retry
    with the other mechanism), and no MAIL."""
    server = smtp_server(tls="implicit", credentials={USER: PASSWORD})
    with pytest.raises(AuthenticationError) as info:
        send(settings_for(server, username=USER, password="wrong"))

    assert info.value.reply is not None
    assert info.value.reply.code == 535
    assert "535" in str(info.value)
    assert server.auth_attempts == [(USER, False)]
    assert "MAIL" not in server.received_commands()
    assert server.messages == []


def test_server_without_auth_refused_before_password(smtp_server: ServerFactory) -> None:
    """A user name is configured but the server offers no AUTH: AuthenticationError, and the
    password source is never asked."""
    server = smtp_server(tls="implicit")
    spy = PasswordSpy()
    with pytest.raises(AuthenticationError, match="does not offer SMTP AUTH"):
        send(settings_for(server, username=USER, password=spy))
    assert spy.seen_at_call == []
    assert server.received_commands() == ["EHLO", "QUIT"]


def test_unsupported_mechanism_only(smtp_server: ServerFactory) -> None:
    """A server offering only mechanisms we do not use (here CRAM-MD5): AuthenticationError
    naming them; no AUTH command sent and the password source not asked."""
    server = smtp_server(
        tls="implicit", credentials={USER: PASSWORD}, auth_mechanisms=("CRAM-MD5",)
    )
    spy = PasswordSpy()
    with pytest.raises(
        AuthenticationError, match=r"CRAM-MD5; e2email supports only PLAIN and LOGIN"
    ):
        send(settings_for(server, username=USER, password=spy))
    assert spy.seen_at_call == []
    assert "AUTH" not in server.received_commands()


# -- TLS refusals: nothing but the handshake (and EHLO/STARTTLS) may reach the server ---------


def test_stripped_starttls_is_refused(smtp_server: ServerFactory) -> None:
    """A server (or man in the middle) that does not offer STARTTLS: TLSError, and nothing but
    EHLO went out: no AUTH, MAIL, RCPT or DATA, no password in any form, no message."""
    server = smtp_server(tls="starttls", offer_starttls=False, credentials={USER: PASSWORD})
    spy = PasswordSpy()
    with pytest.raises(TLSError, match="does not offer STARTTLS"):
        send(settings_for(server, username=USER, password=spy))

    assert server.received_commands() == ["EHLO"]
    assert server.cleartext() == f"EHLO {CLIENT_NAME}\r\n".encode()
    sent = all_bytes(server)
    assert all(form not in sent for form in password_forms())
    assert b"alice@example.org" not in sent
    assert spy.seen_at_call == []
    assert server.messages == []


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_certificate_for_wrong_host(smtp_server: ServerFactory, tls: str) -> None:
    """A certificate for another name: TLSError passing OpenSSL's reason and naming the host;
    implicit TLS sends nothing at all, STARTTLS nothing after STARTTLS; the password source is
    not asked."""
    server = smtp_server(tls=tls, identities=("wrong.example",), credentials={USER: PASSWORD})
    spy = PasswordSpy()
    with pytest.raises(TLSError) as info:
        send(settings_for(server, username=USER, password=spy))

    text = str(info.value)
    assert "certificate verify failed" in text
    assert "mismatch" in text
    assert "'127.0.0.1'" in text
    assert spy.seen_at_call == []
    assert server.messages == []
    if tls == "implicit":
        assert server.transcript == []
    else:
        assert server.received_commands() == ["EHLO", "STARTTLS"]
        assert server.cleartext() == f"EHLO {CLIENT_NAME}\r\nSTARTTLS\r\n".encode()
        assert all(not tls_active for tls_active, _ in server.transcript)


def test_untrusted_ca(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A certificate from a CA the client does not trust: TLSError, nothing sent."""
    with TestCA() as other:
        server = smtp_server(tls="implicit", ca=other)
        with pytest.raises(TLSError, match="certificate verify failed"):
            send(settings_for(server, ca_file=module_ca.ca_file))
    assert server.transcript == []
    assert server.messages == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_server_refused(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A server that speaks at most TLS 1.1: TLSError (RFC 8997), nothing sent."""
    try:
        ctx = module_ca.server_context("127.0.0.1", maximum_version=ssl.TLSVersion.TLSv1_1)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"local OpenSSL cannot configure a TLS 1.1 server: {exc}")
    server = smtp_server(tls="implicit", ssl_context=ctx)
    # Prove the server really speaks TLS 1.1 to a lax client; otherwise the test means nothing.
    lax = ssl.create_default_context(cafile=str(module_ca.ca_file))
    try:
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
        lax.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        lax.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            socket.create_connection((server.host, server.port), timeout=5) as raw,
            lax.wrap_socket(raw, server_hostname=server.host) as tls_sock,
        ):
            negotiated = tls_sock.version()
    except (ssl.SSLError, OSError, ValueError) as exc:
        pytest.skip(f"local OpenSSL cannot do TLS 1.1 at all: {exc}")
    assert negotiated == "TLSv1.1"

    with pytest.raises(TLSError, match=r"TLS 1\.2"):
        send(settings_for(server, ca_file=module_ca.ca_file))
    assert server.transcript == []
    assert server.messages == []


# -- connection failures ----------------------------------------------------------------------


def test_connection_refused() -> None:
    """Nothing listening on the port: ConnectError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = SMTPSettings(host="127.0.0.1", port=port, tls=TLSMode.IMPLICIT, timeout=5)
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        send(settings)


def test_silent_server_times_out() -> None:
    """A server that accepts the connection but never greets: ConnectError after the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = SMTPSettings(host="127.0.0.1", port=port, tls=TLSMode.STARTTLS, timeout=0.3)
        with pytest.raises(ConnectError, match="timed out"):
            send(settings)


# -- recipients -------------------------------------------------------------------------------


def test_one_of_three_recipients_refused(smtp_server: ServerFactory) -> None:
    """One recipient refused with 550: no exception; the result lists two accepted and the
    refusal with the server's reply; the message goes to the other two."""
    server = smtp_server(
        tls="implicit", refuse_recipients={"carol@example.net": (550, "5.1.1 No such user")}
    )
    rcpts = ["bob@example.net", "carol@example.net", "dave@example.net"]
    result = send(settings_for(server), recipients=rcpts)

    assert result.accepted == ("bob@example.net", "dave@example.net")
    assert len(result.refused) == 1
    refused = result.refused[0]
    assert refused.address == "carol@example.net"
    assert refused.reply == SMTPReply(550, "5.1.1 No such user")
    assert [r.address for r in result.recipients] == rcpts
    assert server.messages[0].rcpt_tos == ("bob@example.net", "dave@example.net")


def test_all_recipients_refused(smtp_server: ServerFactory) -> None:
    """Every recipient refused: RecipientsRefusedError with each reply and the result; DATA is
    never sent and the transaction is reset."""
    refusal = (550, "5.1.1 No such user")
    server = smtp_server(
        tls="implicit",
        refuse_recipients={"bob@example.net": refusal, "carol@example.net": refusal},
    )
    with pytest.raises(RecipientsRefusedError) as info:
        send(settings_for(server), recipients=["bob@example.net", "carol@example.net"])

    err = info.value
    assert err.refused == {
        "bob@example.net": SMTPReply(*refusal),
        "carol@example.net": SMTPReply(*refusal),
    }
    assert err.accepted == ()
    assert isinstance(err.result, DeliveryResult)
    assert err.result.accepted == ()
    assert err.result.data_reply is None
    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "QUIT"]
    assert server.messages == []


def test_several_messages_over_one_connection(smtp_server: ServerFactory) -> None:
    """One connection carries several messages, and still does after a refused transaction
    (RSET in between)."""
    server = smtp_server(
        tls="starttls",
        credentials={USER: PASSWORD},
        refuse_recipients={"nobody@example.net": (550, "5.1.1 No such user")},
    )
    second = RAW.replace(b"Hello Bob.", b"Hello again.")
    settings = settings_for(server, username=USER, password=PASSWORD)

    async def run() -> None:
        async with SMTPTransport(settings).connect() as conn:
            await conn.send(RAW, mail_from="alice@example.org", recipients=["bob@example.net"])
            with pytest.raises(RecipientsRefusedError):
                await conn.send(
                    RAW, mail_from="alice@example.org", recipients=["nobody@example.net"]
                )
            await conn.send(second, mail_from="alice@example.org", recipients=["bob@example.net"])

    asyncio.run(run())
    assert [m.data for m in server.messages] == [RAW, second]
    assert server.received_commands() == [
        "EHLO", "STARTTLS", "EHLO", "AUTH",
        "MAIL", "RCPT", "DATA",
        "MAIL", "RCPT", "RSET",
        "MAIL", "RCPT", "DATA",
        "QUIT",
    ]  # fmt: skip
    assert server.auth_attempts == [(USER, True)]


# -- plaintext --------------------------------------------------------------------------------


def test_plaintext_needs_the_opt_in(smtp_server: ServerFactory) -> None:
    """Plaintext is refused unless explicitly allowed; allowed, it works against a server
    without TLS and the result says there was no TLS."""
    server = smtp_server(tls="none")
    with pytest.raises(InsecureTransportError):
        settings_for(server)

    result = send(settings_for(server, allow_insecure_plaintext=True))
    assert result.tls is None
    assert server.messages[0].data == RAW
    assert server.messages[0].tls_version is None


def test_credentials_never_over_plaintext() -> None:
    """Credentials together with plaintext are refused when the settings are made."""
    with pytest.raises(InsecureTransportError):
        SMTPSettings(
            host="127.0.0.1",
            port=2500,
            tls=TLSMode.INSECURE_PLAINTEXT,
            allow_insecure_plaintext=True,
            username=USER,
            password=PASSWORD,
        )


# -- input checked before connecting ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: bare LF\nbody\r\n",
        b"Subject: bare CR\rbody\r\n",
        b"Subject: smuggling\r\n\r\nbody\n.\r\nMAIL FROM:<evil@example.com>\r\n",
    ],
)
def test_unsafe_bytes_refused_before_connecting(smtp_server: ServerFactory, raw: bytes) -> None:
    """Bare CR or LF in the message (SMTP smuggling): MessageError before any connection."""
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError):
        send(settings_for(server), raw)
    assert server.transcript == []
    assert server.received_commands() == []


@pytest.mark.parametrize(
    ("mail_from", "recipients"),
    [
        ("alice@example.org>\r\nRCPT TO:<evil@example.com", ["bob@example.net"]),
        ("alice@example.org", ["bob@example.net\r\nDATA"]),
        ("alice@example.org", ["bob@example.net> NOTIFY=NEVER"]),
        ("alice@example.org", ["bob @example.net"]),
        ("alice@example.org", ["bob@example.net\0"]),
        ("alice@example.org", ["<bob@example.net>"]),
        ("alice@example.org", ["bob"]),
        ("alice@example.org", []),
        ("", ["bob@example.net"]),
        ("alice@exämple.org", ["bob@example.net"]),
    ],
)
def test_bad_envelope_refused_before_connecting(
    smtp_server: ServerFactory, mail_from: str, recipients: list[str]
) -> None:
    """Envelope addresses with CR, LF, NUL, spaces, angle brackets, no domain, or non-ASCII, and
    an empty recipient list: MessageError before any connection."""
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError):
        send(settings_for(server), mail_from=mail_from, recipients=recipients)
    assert server.transcript == []
