"""The SMTP transport against a real aiosmtpd server, real TLS and trustme certificates."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from e2email import Mailer, Message, Protection
from e2email.cli import cli
from e2email.config import SMTPSettings, TLSMode
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    DeliveryError,
    InsecureTransportError,
    MessageError,
    RecipientsRefusedError,
    RequireTLSError,
    SMTPReply,
    TLSError,
    TransportError,
)
from e2email.keystore import Keystore
from e2email.message import check_wire_safe
from e2email.outcome import CopyOutcome
from e2email.testing import Fault, LoopbackSMTPServer, TestCA
from e2email.transport import SMTPTransport
from e2email.transport import smtp as smtp_module

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


def send(settings: SMTPSettings, raw: bytes = RAW, **kwargs: Any) -> CopyOutcome:
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

    async def run() -> tuple[dict[str, str], CopyOutcome]:
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
    """Every recipient refused: returned, not raised (issue 9: the transport reports what the
    server answered per recipient), with a RecipientsRefusedError naming each reply as the
    outcome's error; DATA is never sent and the transaction is reset."""
    refusal = (550, "5.1.1 No such user")
    server = smtp_server(
        tls="implicit",
        refuse_recipients={"bob@example.net": refusal, "carol@example.net": refusal},
    )
    result = send(settings_for(server), recipients=["bob@example.net", "carol@example.net"])

    err = result.error
    assert isinstance(err, RecipientsRefusedError)
    assert err.refused == {
        "bob@example.net": SMTPReply(*refusal),
        "carol@example.net": SMTPReply(*refusal),
    }
    assert err.accepted == ()
    assert [(r.address, r.status, r.reply) for r in result.recipients] == [
        ("bob@example.net", "failed", SMTPReply(*refusal)),
        ("carol@example.net", "failed", SMTPReply(*refusal)),
    ]
    assert result.accepted == ()
    assert result.data_reply is None
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
            refused = await conn.send(
                RAW, mail_from="alice@example.org", recipients=["nobody@example.net"]
            )
            assert isinstance(refused.error, RecipientsRefusedError)
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


# -- downgrades: refused, and nothing secret or from the message reaches the server -----------


def _old_tls_context(module_ca: TestCA) -> ssl.SSLContext:
    v1 = ssl.TLSVersion.TLSv1
    return module_ca.server_context("127.0.0.1", minimum_version=v1, maximum_version=v1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("case", "tls", "kwargs"),
    [
        ("stripped-starttls", "starttls", {"offer_starttls": False}),
        ("wrong-host-implicit", "implicit", {"identities": ("wrong.example",)}),
        ("wrong-host-starttls", "starttls", {"identities": ("wrong.example",)}),
        ("tls1.0-implicit", "implicit", {"old_tls": True}),
        ("tls1.0-starttls", "starttls", {"old_tls": True}),
    ],
)
def test_downgrade_refused_and_nothing_leaks(
    smtp_server: ServerFactory, module_ca: TestCA, case: str, tls: str, kwargs: dict[str, Any]
) -> None:
    """Stripped STARTTLS, a certificate for another host, a TLS-1.0-only server (implicit and
    STARTTLS): TLSError (not transient), and the server's own transcript shows no AUTH, MAIL,
    RCPT or DATA, no password in any encoding, no envelope address and no message byte; the
    password source is never asked and nothing is recorded."""
    if kwargs.pop("old_tls", False):
        kwargs["ssl_context"] = _old_tls_context(module_ca)
    server = smtp_server(tls=tls, credentials={USER: PASSWORD}, **kwargs)
    spy = PasswordSpy()
    with pytest.raises(TLSError) as info:
        send(settings_for(server, username=USER, password=spy, ca_file=module_ca.ca_file))

    assert info.value.transient is False
    if case.startswith("tls1.0"):
        assert "TLS 1.2" in str(info.value)
    commands = server.received_commands()
    assert not {"AUTH", "MAIL", "RCPT", "DATA"} & set(commands)
    assert commands in ([], ["EHLO"], ["EHLO", "STARTTLS"])
    received = all_bytes(server)
    assert all(form not in received for form in password_forms())
    assert b"alice@example.org" not in received
    assert b"bob@example.net" not in received
    assert b"Hello Bob" not in received
    assert spy.seen_at_call == []
    assert server.messages == []


# -- timeouts -----------------------------------------------------------------------------------


def test_connect_timeout_is_separate(smtp_server: ServerFactory) -> None:
    """connect_timeout bounds the wait for the greeting even when the command timeout is long:
    ConnectError saying 'timed out', transient."""
    server = smtp_server(tls="starttls", faults=[Fault("connect", "stall", seconds=2)])
    settings = settings_for(server, connect_timeout=0.3, command_timeout=30)
    with pytest.raises(ConnectError, match="timed out") as info:
        send(settings)
    assert info.value.transient is True
    assert server.messages == []


def test_command_timeout(smtp_server: ServerFactory) -> None:
    """A server that stalls at MAIL beyond command_timeout: ConnectError 'timed out ... MAIL',
    transient, nothing recorded."""
    server = smtp_server(tls="implicit", faults=[Fault("mail", "stall", seconds=2)])
    with pytest.raises(ConnectError, match=r"timed out after 0\.3 s .* MAIL") as info:
        send(settings_for(server, command_timeout=0.3))
    assert info.value.transient is True
    assert server.messages == []


def test_data_timeout_says_delivery_is_uncertain(smtp_server: ServerFactory) -> None:
    """A server that stalls after the whole message beyond data_timeout: ConnectError 'timed
    out' that says the message may or may not have been accepted; the command timeout alone is
    not what counts for DATA."""
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "stall", seconds=2)])
    with pytest.raises(ConnectError, match="timed out") as info:
        send(settings_for(server, command_timeout=30, data_timeout=0.3))
    assert "may or may not" in str(info.value)
    assert info.value.maybe_delivered is True
    assert info.value.transient is True


def test_the_final_reply_to_data_gets_ten_minutes_by_default(smtp_server: ServerFactory) -> None:
    """RFC 5321 §4.5.3.2.6: the reply to the final "." may take a filtering server long; the
    data phase has its own 600 s default, not the general ``timeout``: a server slower than
    ``timeout`` after the message is waited for (delivered once, not timed out and
    retried); `send` and `outbox retry` take --data-timeout."""
    settings = SMTPSettings(host="127.0.0.1", timeout=60)
    assert settings.effective_data_timeout == 600 and settings.effective_command_timeout == 60
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "stall", seconds=1.2)])
    assert server.ca_file is not None
    slow = SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.IMPLICIT,
        ca_file=server.ca_file,
        timeout=0.5,
        local_hostname=CLIENT_NAME,
    )
    result = send(slow)
    assert result.data_reply is not None and result.data_reply.code == 250
    assert len(server.messages) == 1
    for command in (["send"], ["outbox", "retry"]):
        shown = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
        assert "--data-timeout" in shown.output and "600" in shown.output


class _StalledReader:
    """A plaintext SMTP server that answers up to DATA's 354, then stops reading, so the
    client's writes back up (a receive buffer of a few kilobytes)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.commands: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 stalled.test ESMTP\r\n")
            for line in lines:
                verb = line.split()[0].upper() if line.strip() else b""
                self.commands.append(verb)
                if verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    self.done.wait(30)  # read nothing more
                    return
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.listener.close()


def test_data_timeout_while_the_server_stops_reading() -> None:
    """DATA goes out in pieces, each waiting for the connection to take it: a server that
    stops reading after 354 makes the client give up after data_timeout (not hang, not
    buffer the whole message) with a ConnectError. The final "." was never sent, so the
    server cannot have accepted the message: not "maybe delivered", safe to retry."""
    server = _StalledReader()
    try:
        raw = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 200_000  # 15.6 MB
        settings = SMTPSettings(
            host="127.0.0.1",
            port=server.port,
            tls=TLSMode.INSECURE_PLAINTEXT,
            allow_insecure_plaintext=True,
            timeout=5,
            data_timeout=0.5,
        )
        with pytest.raises(ConnectError, match=r"timed out after 0\.5 s") as info:
            send(settings, raw)
        assert "may or may not" not in str(info.value)
        assert info.value.maybe_delivered is False
        assert info.value.transient is True
        assert server.commands == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]
    finally:
        server.close()


@pytest.mark.parametrize("size", [1, 2, 5, 16, 100, 1 << 20])
def test_dot_stuffing_in_pieces(size: int) -> None:
    """DATA's pieces (about ``size`` bytes, never split inside a line) joined are the
    message with a "." added before every line that starts with one (RFC 5321 §4.5.2),
    whether a piece starts with such a line or not, with or without a final CRLF."""
    lines = [b".", b"..", b"x", b"", b".x.", b"a.b", b"." * 7, b"From x", b"\t."]
    raw = b"\r\n".join(lines[i % len(lines)] for i in range(200)) + b"\r\n"
    for message in (raw, raw + b".end", b".", b""):
        pieces = list(smtp_module._dot_stuffed(message, size))
        assert b"".join(pieces) == re.sub(rb"(?m)^\.", b"..", message)
        assert all(piece.endswith(b"\r\n") for piece in pieces[:-1])


def test_message_without_final_crlf_gets_one(smtp_server: ServerFactory) -> None:
    """Bytes that do not end in CRLF arrive with one added (the end-of-data line needs it),
    and MAIL FROM's SIZE counts it (RFC 1870)."""
    server = smtp_server(tls="implicit")
    raw = RAW + b".last line"
    send(settings_for(server), raw)
    (received,) = server.messages
    assert received.data == raw + b"\r\n"
    assert f"SIZE={len(raw) + 2}" in received.mail_options


# -- transient or permanent ---------------------------------------------------------------------


def failure(settings: SMTPSettings) -> tuple[TransportError, CopyOutcome | None]:
    """The error of a failed send: raised (no answer per recipient, or the session ended),
    or the returned outcome's (the server refused the transaction), with that outcome."""
    try:
        result = send(settings)
    except TransportError as exc:
        return exc, None
    assert isinstance(result.error, TransportError), "a refused transaction names its error"
    return result.error, result


@pytest.mark.parametrize(
    ("fault", "error", "transient", "returned"),
    [
        (Fault("data-end", "reply", 451, "4.3.0 try later"), DeliveryError, True, True),
        (Fault("data-end", "reply", 554, "5.6.0 rejected"), DeliveryError, False, True),
        (Fault("mail", "reply", 452, "4.3.1 out of space"), DeliveryError, True, True),
        (Fault("mail", "reply", 421, "4.3.2 closing"), DeliveryError, True, False),
        (Fault("mail", "reply", 553, "5.7.1 not your address"), DeliveryError, False, True),
        (Fault("data", "drop"), ConnectError, True, False),
        (Fault("data-end", "drop"), ConnectError, True, False),
        (Fault("rcpt", "reply", 450, "4.2.1 busy"), RecipientsRefusedError, True, True),
        (Fault("rcpt", "reply", 550, "5.1.1 no such user"), RecipientsRefusedError, False, True),
        (Fault("connect", "reply", 421, "4.3.2 busy"), ConnectError, True, False),
        (Fault("connect", "reply", 554, "5.3.2 no service"), ConnectError, False, False),
    ],
)
def test_transient_tells_retryable_from_permanent(
    smtp_server: ServerFactory,
    fault: Fault,
    error: type[Exception],
    transient: bool,
    returned: bool,
) -> None:
    """Each failure maps to the right TransportError subclass and its transient flag: 4xx,
    drops and timeouts are transient, 5xx are not. What the server answered about the
    transaction comes back as the outcome (each recipient deferred for a 4xx, failed for a
    5xx, with the reply); a lost connection or a reply that ended the session is raised.
    Nothing is recorded by the server."""
    server = smtp_server(tls="implicit", faults=[fault])
    err, result = failure(settings_for(server))
    assert isinstance(err, error)
    assert err.transient is transient
    assert (result is not None) is returned
    if result is not None:
        want = "deferred" if transient else "failed"
        assert [(r.address, r.status) for r in result.recipients] == [("bob@example.net", want)]
        assert result.recipients[0].reply == SMTPReply(fault.code, fault.text)
    assert server.faults_fired == [fault]
    assert server.messages == []


def test_retry_after_transient_fault_succeeds(smtp_server: ServerFactory) -> None:
    """After a transient data-end refusal (times=1) a second send delivers the exact bytes
    once: the fault does not leave a half-recorded message."""
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "reply", 451, "4.3.0 later")])
    assert isinstance(send(settings_for(server)).error, DeliveryError)
    send(settings_for(server))
    assert [m.data for m in server.messages] == [RAW]
    assert server.connections == 2


def test_authentication_and_tls_errors_are_permanent(smtp_server: ServerFactory) -> None:
    """Refused credentials (535) and an untrusted certificate are not transient."""
    server = smtp_server(tls="implicit", credentials={USER: PASSWORD})
    with pytest.raises(AuthenticationError) as auth:
        send(settings_for(server, username=USER, password="wrong"))
    assert auth.value.transient is False
    assert TLSError("x").transient is False
    assert ConnectError("x").transient is True
    assert AuthenticationError("x", reply=SMTPReply(454, "4.7.0 try later")).transient is True


# -- XOAUTH2 ------------------------------------------------------------------------------------

TOKEN = "ya29.a0AfH6SMBx-secret-token"


class TokenSpy:
    """A token source that records what the server had seen when it was asked."""

    def __init__(self, server: LoopbackSMTPServer, token: str = TOKEN) -> None:
        self.server = server
        self.token = token
        self.seen_at_call: list[list[str]] = []

    def __call__(self) -> str:
        self.seen_at_call.append(self.server.received_commands())
        return self.token


def test_xoauth2_success(smtp_server: ServerFactory) -> None:
    """XOAUTH2 with a good token: the token is asked for only after STARTTLS and EHLO, travels
    only inside TLS in the SASL format, and the message is delivered as the user."""
    server = smtp_server(tls="starttls", xoauth2_tokens={USER: TOKEN})
    spy = TokenSpy(server)
    send(settings_for(server, username=USER, oauth_token=spy))

    assert spy.seen_at_call == [["EHLO", "STARTTLS", "EHLO"]]
    assert server.auth_attempts == [(USER, True)]
    assert server.messages[0].auth_user == USER
    blob = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
    inside = b"".join(data for tls, data in server.transcript if tls)
    assert b"AUTH XOAUTH2 " + blob in inside
    assert TOKEN.encode() not in server.cleartext() and blob not in server.cleartext()


def test_xoauth2_refused_token(smtp_server: ServerFactory) -> None:
    """A stale token: the server's 334 JSON error is answered with an empty line and the final
    535 becomes an AuthenticationError naming the user and the JSON status, never the token.
    No MAIL is sent; not transient."""
    server = smtp_server(tls="implicit", xoauth2_tokens={USER: TOKEN})
    with pytest.raises(AuthenticationError) as info:
        send(settings_for(server, username=USER, oauth_token="stale-token"))
    err = info.value
    assert err.reply is not None and err.reply.code == 535
    assert "status 401" in str(err)
    assert repr(USER) in str(err)
    assert "stale-token" not in str(err)
    assert err.transient is False
    assert server.auth_attempts == [(USER, False)]
    assert "MAIL" not in server.received_commands()


def test_xoauth2_not_offered(smtp_server: ServerFactory) -> None:
    """A token configured but the server offers only PLAIN/LOGIN: AuthenticationError saying so,
    before the token source is asked and without any AUTH command."""
    server = smtp_server(tls="implicit", credentials={USER: PASSWORD})
    spy = TokenSpy(server)
    with pytest.raises(AuthenticationError, match="not XOAUTH2"):
        send(settings_for(server, username=USER, oauth_token=spy))
    assert spy.seen_at_call == []
    assert "AUTH" not in server.received_commands()


def test_password_client_hints_at_xoauth2(smtp_server: ServerFactory) -> None:
    """A password configured but the server offers only XOAUTH2: the error says a token is
    needed."""
    server = smtp_server(tls="implicit", xoauth2_tokens={USER: TOKEN})
    with pytest.raises(AuthenticationError, match="XOAUTH2 is offered"):
        send(settings_for(server, username=USER, password=PASSWORD))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"oauth_token": TOKEN},
        {"oauth_token": TOKEN, "username": USER, "password": PASSWORD},
        {"oauth_token": TOKEN, "username": "a\x01b"},
    ],
)
def test_xoauth2_settings_checked(kwargs: dict[str, Any]) -> None:
    """A token without a user name, together with a password, or with a user name that could
    break the SASL fields: ConfigError when the settings are made."""
    with pytest.raises(ConfigError):
        SMTPSettings(host="smtp.example.org", **kwargs)


def test_no_token_over_plaintext() -> None:
    """A token over plaintext is refused like a password."""
    with pytest.raises(InsecureTransportError):
        SMTPSettings(
            host="127.0.0.1",
            port=2500,
            tls=TLSMode.INSECURE_PLAINTEXT,
            allow_insecure_plaintext=True,
            username=USER,
            oauth_token=TOKEN,
        )


# -- REQUIRETLS (RFC 8689) ----------------------------------------------------------------------


def test_requiretls_offered_goes_on_mail_from(smtp_server: ServerFactory) -> None:
    """require_tls with a server that offers REQUIRETLS: MAIL FROM carries the parameter and
    the message is delivered; without require_tls it does not."""
    server = smtp_server(tls="starttls", offer_requiretls=True)
    send(settings_for(server, require_tls=True))
    send(settings_for(server))
    assert [m.requiretls for m in server.messages] == [True, False]
    assert b"REQUIRETLS" in b"".join(d for tls, d in server.transcript if tls)


def test_requiretls_not_offered_sends_nothing(smtp_server: ServerFactory) -> None:
    """require_tls with a server that does not offer it: RequireTLSError (a TLSError, not
    transient), raised before AUTH and MAIL, so neither credentials nor the message are sent."""
    server = smtp_server(tls="implicit", credentials={USER: PASSWORD})
    spy = PasswordSpy()
    with pytest.raises(RequireTLSError, match="REQUIRETLS") as info:
        send(settings_for(server, require_tls=True, username=USER, password=spy))
    assert isinstance(info.value, TLSError)
    assert info.value.transient is False
    assert server.received_commands() == ["EHLO", "QUIT"]
    assert spy.seen_at_call == []
    assert server.messages == []


def test_requiretls_per_message(smtp_server: ServerFactory) -> None:
    """require_tls=True on one send over an open connection: refused before MAIL on a server
    without REQUIRETLS; the connection still carries the next message."""
    server = smtp_server(tls="implicit")
    settings = settings_for(server)

    async def run() -> None:
        async with SMTPTransport(settings).connect() as conn:
            with pytest.raises(RequireTLSError):
                await conn.send(
                    RAW,
                    mail_from="alice@example.org",
                    recipients=["bob@example.net"],
                    require_tls=True,
                )
            await conn.send(RAW, mail_from="alice@example.org", recipients=["bob@example.net"])

    asyncio.run(run())
    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(server.messages) == 1


# -- SMTP smuggling (CVE-2023-51764 and kin) ------------------------------------------------------

SMUGGLED = "MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"


def test_smuggling_sequences_cannot_end_data_early(smtp_server: ServerFactory) -> None:
    """A message whose lines include "." and what looks like a second transaction: dot-stuffing
    keeps it inside DATA, so the server sees exactly one MAIL and one DATA and records exactly
    one message with every byte."""
    raw = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n\r\n"
        b"before\r\n.\r\n" + SMUGGLED.encode() + b"From: evil@example.com\r\n\r\nforged\r\n"
        b".\r\nafter\r\n"
    )
    server = smtp_server(tls="implicit")
    send(settings_for(server), raw)
    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [m.data for m in server.messages] == [raw]


@pytest.mark.parametrize(
    "sequence", [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\n\r\n"]
)
def test_wire_check_refuses_smuggling_sequences(
    smtp_server: ServerFactory, sequence: bytes
) -> None:
    """Raw bytes with <LF>.<CR><LF>, <CR><LF>.<LF> and other bare CR/LF forms are refused
    (MessageError) before any connection: nothing leaves e2email with a bare CR or LF."""
    raw = b"Subject: s\r\n\r\nbefore" + sequence + SMUGGLED.encode() + b"after\r\n"
    with pytest.raises(MessageError, match="bare CR or LF"):
        check_wire_safe(raw)
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError):
        send(settings_for(server), raw)
    assert server.transcript == []
    assert server.connections == 0


@pytest.mark.parametrize(("sign", "encrypt"), [(False, False), (True, False), (True, True)])
def test_message_text_with_smuggling_sequences_arrives_whole(
    smtp_server: ServerFactory, sender_store: Keystore, sign: bool, encrypt: bool
) -> None:
    """End to end through the real client: a Message whose text contains <LF>.<CR><LF>,
    <CR><LF>.<LF>, <CR>.<CR><LF> and a fake transaction arrives as exactly one message (one
    MAIL, one DATA); unprotected and signed, its text part decodes to the full text."""
    text = f"one\n.\r\n{SMUGGLED}.\ntwo\r.\r\nthree\r\n.\r\nfour\n"
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org", to=["bob@example.net"], subject="smuggle", text=text
    )
    protection = Protection(sign=sign, encrypt=encrypt, encrypt_to_self=encrypt)
    with Mailer(smtp=settings_for(server), keystore=sender_store, protection=protection) as mailer:
        mailer.send(message)

    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(server.messages) == 1
    received = server.messages[0]
    assert received.rcpt_tos == ("bob@example.net",)
    check_wire_safe(received.data)
    if encrypt:
        assert b"evil@example.com" not in received.data
        return
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    part = next(p for p in parsed.walk() if p.get_content_type() == "text/plain")
    decoded = part.get_payload(decode=True).decode("utf-8")
    normalise = re.compile(r"\r\n|\r|\n")
    assert normalise.sub("\n", decoded) == normalise.sub("\n", text)


# -- the command line's connection options ------------------------------------------------------


def cli_send(
    server: LoopbackSMTPServer, home: Path, *extra: str, env: dict[str, str] | None = None
) -> Any:
    """``e2email send`` in-process, unsigned and unencrypted (no keys needed): the SMTP options
    are what is under test."""
    assert server.ca_file is not None
    args = [
        "--home", str(home),
        "send", "--from", "alice@example.org", "--to", "bob@example.net",
        "--body", "hello", "--no-sign", "--no-encrypt",
        "--host", server.host, "--port", str(server.port), "--tls", server.tls,
        "--ca-file", str(server.ca_file), "--timeout", "5",
        *extra,
    ]  # fmt: skip
    return CliRunner().invoke(cli, args, env=env)


def test_cli_xoauth2_from_env(smtp_server: ServerFactory, tmp_path: Path) -> None:
    """--token-env: the token is read from the environment and used with XOAUTH2 (--auth
    inferred); a wrong token exits 5 with the server's refusal."""
    server = smtp_server(tls="implicit", xoauth2_tokens={USER: TOKEN})
    ok = cli_send(server, tmp_path, "--user", USER, "--token-env", "TOK", env={"TOK": TOKEN})
    assert ok.exit_code == 0, ok.output
    assert server.auth_attempts == [(USER, True)]
    bad = cli_send(
        server, tmp_path, "--user", USER, "--auth", "xoauth2", "--token-env", "TOK",
        env={"TOK": "expired"},
    )  # fmt: skip
    assert bad.exit_code == 5
    assert server.auth_attempts[-1] == (USER, False)
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    "extra",
    [
        ("--user", USER, "--auth", "xoauth2"),
        ("--auth", "xoauth2", "--token-env", "TOK"),
        ("--user", USER, "--auth", "password", "--token-env", "TOK"),
        ("--user", USER, "--token-env", "TOK", "--password-env", "PW"),
        ("--user", USER, "--token-env", "TOK", "--token-command", "echo t"),
    ],
)
def test_cli_auth_options_checked(
    smtp_server: ServerFactory, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """Contradictory or incomplete --auth/--token-*/--password-* options: usage error (2) and
    nothing reaches the server."""
    server = smtp_server(tls="implicit")
    result = cli_send(server, tmp_path, *extra, env={"TOK": TOKEN, "PW": PASSWORD})
    assert result.exit_code == 2
    assert server.connections == 0


def test_cli_require_tls(smtp_server: ServerFactory, tmp_path: Path) -> None:
    """--require-tls: sent with REQUIRETLS where offered; refused (exit 4, nothing sent) where
    not."""
    offering = smtp_server(tls="starttls", offer_requiretls=True)
    ok = cli_send(offering, tmp_path, "--require-tls")
    assert ok.exit_code == 0, ok.output
    assert offering.messages[0].requiretls
    lacking = smtp_server(tls="starttls")
    refused = cli_send(lacking, tmp_path, "--require-tls")
    assert refused.exit_code == 4
    assert "REQUIRETLS" in refused.output
    assert lacking.messages == []
    assert "MAIL" not in lacking.received_commands()
