"""Self-tests of the loopback server's fault injection, REQUIRETLS, XOAUTH2 and old-TLS modes.

The client here is the standard library's smtplib, independent of the transport under test, so
these tests pin down what the server does on the wire.
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from e2email.testing import Fault, LoopbackSMTPServer, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]

RAW = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nbody line\r\n" * 3
FROM = "a@example.org"
TO = "b@example.net"


@contextmanager
def client(
    server: LoopbackSMTPServer, module_ca: TestCA, *, timeout: float = 5.0
) -> Iterator[smtplib.SMTP]:
    """An smtplib session (TLS as the server does it) that is closed afterwards."""
    ctx = module_ca.client_context()
    conn: smtplib.SMTP
    if server.tls == "implicit":
        conn = smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=ctx)
    else:
        conn = smtplib.SMTP(server.host, server.port, timeout=timeout)
        if server.tls == "starttls":
            conn.starttls(context=ctx)
    try:
        yield conn
    finally:
        with suppress(OSError):
            conn.close()


def send_once(server: LoopbackSMTPServer, module_ca: TestCA, **kwargs: float) -> dict[str, object]:
    with client(server, module_ca, **kwargs) as conn:
        return dict(conn.sendmail(FROM, [TO], RAW))


def raw_greeting(server: LoopbackSMTPServer, timeout: float = 5.0) -> bytes:
    """What a plain TCP client reads first (until the server closes or a line ends)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


# -- the Fault value ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage": "helo", "action": "reply", "code": 451},
        {"stage": "mail", "action": "explode"},
        {"stage": "mail", "action": "reply"},
        {"stage": "mail", "action": "reply", "code": 99},
        {"stage": "mail", "action": "reply", "code": 451, "text": "a\r\nRCPT"},
        {"stage": "mail", "action": "drop", "address": "b@example.net"},
        {"stage": "mail", "action": "drop", "times": 0},
        {"stage": "mail", "action": "stall", "seconds": -1},
    ],
)
def test_fault_rejects_nonsense(kwargs: dict[str, object]) -> None:
    """A Fault that cannot be acted out (unknown stage or action, reply without a code, a
    multi-line text, an address outside RCPT, zero times, negative seconds) is a ValueError."""
    with pytest.raises(ValueError):
        Fault(**kwargs)  # type: ignore[arg-type]


# -- connect ------------------------------------------------------------------------------------


def test_connect_reply_is_the_greeting_then_close(smtp_server: ServerFactory) -> None:
    """A 'connect' reply replaces the 220 greeting and closes; with times=1 the next connection
    is greeted normally. Both connections are counted."""
    fault = Fault("connect", "reply", 421, "4.3.2 busy, try later")
    server = smtp_server(tls="none", faults=[fault])
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        first = sock.recv(1024)
        assert sock.recv(1024) == b""  # closed after the greeting
    assert first == b"421 4.3.2 busy, try later\r\n"
    assert raw_greeting(server).startswith(b"220 ")
    assert server.faults_fired == [fault]
    assert server.connections == 2


def test_connect_drop_sends_nothing(smtp_server: ServerFactory) -> None:
    """A 'connect' drop closes the connection before any byte is sent."""
    server = smtp_server(tls="none", faults=[Fault("connect", "drop")])
    assert raw_greeting(server) == b""
    assert raw_greeting(server).startswith(b"220 ")


def test_connect_stall_delays_the_greeting(smtp_server: ServerFactory) -> None:
    """A 'connect' stall holds the greeting back for the given seconds, then greets."""
    server = smtp_server(tls="none", faults=[Fault("connect", "stall", seconds=0.3)])
    start = time.monotonic()
    greeting = raw_greeting(server)
    assert time.monotonic() - start >= 0.29
    assert greeting.startswith(b"220 ")


def test_connections_counts_failed_handshakes(smtp_server: ServerFactory) -> None:
    """connections counts TCP connections even when the TLS handshake never completes."""
    server = smtp_server(tls="implicit")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"EHLO not-tls\r\n")
        sock.recv(1024)
    deadline = time.monotonic() + 5
    while server.connections < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections == 1
    assert server.messages == []


# -- commands -----------------------------------------------------------------------------------


def test_ehlo_reply(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """An 'ehlo' reply answers EHLO instead of the extension list."""
    server = smtp_server(tls="implicit", faults=[Fault("ehlo", "reply", 554, "5.7.1 go away")])
    with client(server, module_ca) as conn:
        assert conn.ehlo() == (554, b"5.7.1 go away")
        assert conn.ehlo()[0] == 250


def test_mail_reply_then_retry_succeeds(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 'mail' 451 refuses the transaction (nothing recorded); the retry on the same connection
    is accepted and recorded once."""
    fault = Fault("mail", "reply", 451, "4.3.0 queue full")
    server = smtp_server(tls="implicit", faults=[fault])
    with client(server, module_ca) as conn:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            conn.sendmail(FROM, [TO], RAW)
        assert info.value.smtp_code == 451
        assert server.messages == []
        conn.rset()
        conn.sendmail(FROM, [TO], RAW)
    assert len(server.messages) == 1
    assert server.messages[0].data == RAW
    assert server.faults_fired == [fault]


def test_rcpt_fault_for_one_address(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """An 'rcpt' fault with an address refuses only that recipient (case-insensitively); the
    message is recorded for the others."""
    fault = Fault("rcpt", "reply", 450, "4.2.1 mailbox busy", address="Carol@Example.net")
    server = smtp_server(tls="implicit", faults=[fault])
    with client(server, module_ca) as conn:
        refused = conn.sendmail(FROM, [TO, "carol@example.net"], RAW)
    assert refused == {"carol@example.net": (450, b"4.2.1 mailbox busy")}
    assert server.messages[0].rcpt_tos == (TO,)
    assert server.faults_fired == [fault]


def test_times_none_fires_always_and_times_counts(
    smtp_server: ServerFactory, module_ca: TestCA
) -> None:
    """times=None fires on every matching command; times=2 fires twice, across connections."""
    always = Fault("rcpt", "reply", 550, "5.1.1 no such user", address="x@example.net", times=None)
    twice = Fault("mail", "reply", 421, "4.3.2 closing", times=2)
    server = smtp_server(tls="implicit", faults=[always, twice])
    for _ in range(2):
        with pytest.raises(smtplib.SMTPException):
            send_once(server, module_ca)
    with client(server, module_ca) as conn:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            conn.sendmail(FROM, ["x@example.net"], RAW)
        conn.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            conn.sendmail(FROM, ["x@example.net"], RAW)
    assert server.faults_fired == [twice, twice, always, always]
    assert server.connections == 3
    assert server.messages == []


def test_421_closes_the_connection(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 421 reply at a command is followed by the server closing the connection."""
    server = smtp_server(tls="implicit", faults=[Fault("mail", "reply", 421, "4.3.2 bye")])
    with client(server, module_ca) as conn:
        conn.ehlo()
        assert conn.mail(FROM) == (421, b"4.3.2 bye")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            conn.noop()


# -- data ---------------------------------------------------------------------------------------


def test_data_command_reply(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 'data' reply answers the DATA command itself (no 354); nothing is recorded."""
    server = smtp_server(tls="starttls", faults=[Fault("data", "reply", 554, "5.3.4 no")])
    with client(server, module_ca) as conn:
        conn.ehlo()
        conn.mail(FROM)
        conn.rcpt(TO)
        assert conn.docmd("DATA") == (554, b"5.3.4 no")
    assert server.messages == []


def test_drop_in_the_middle_of_data(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 'data' drop says 354, reads part of the message and hangs up: the client sees the
    connection lost, the server recorded no message (but did receive some of the body)."""
    server = smtp_server(tls="implicit", faults=[Fault("data", "drop")])
    body = RAW * 2000  # large enough that the client is still writing when the server hangs up
    with client(server, module_ca) as conn, pytest.raises(smtplib.SMTPServerDisconnected):
        conn.sendmail(FROM, [TO], body)
    assert server.messages == []
    assert b"From: a@example.org" in b"".join(data for _tls, data in server.transcript)
    assert server.received_commands()[-1] == "DATA"


@pytest.mark.parametrize(("code", "text"), [(451, "4.3.0 try later"), (554, "5.6.0 rejected")])
def test_data_end_reply_not_recorded(
    smtp_server: ServerFactory, module_ca: TestCA, code: int, text: str
) -> None:
    """A 'data-end' reply comes after the whole message; the message is not recorded, and the
    next attempt (times=1) is."""
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "reply", code, text)])
    with client(server, module_ca) as conn:
        with pytest.raises(smtplib.SMTPDataError) as info:
            conn.sendmail(FROM, [TO], RAW)
        assert (info.value.smtp_code, info.value.smtp_error) == (code, text.encode())
        assert server.messages == []
        conn.sendmail(FROM, [TO], RAW)
    assert len(server.messages) == 1


def test_data_end_drop_not_recorded(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 'data-end' drop takes the whole message and hangs up without a reply: not recorded."""
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "drop")])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send_once(server, module_ca)
    assert server.messages == []
    send_once(server, module_ca)
    assert len(server.messages) == 1


def test_data_end_stall(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A 'data-end' stall longer than the client waits: the client times out and nothing is
    recorded. A stall the client sits through: accepted and recorded."""
    server = smtp_server(
        tls="implicit",
        faults=[Fault("data-end", "stall", seconds=1.0), Fault("data-end", "stall", seconds=0.2)],
    )
    with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
        send_once(server, module_ca, timeout=0.3)
    time.sleep(0.1)  # let the server notice the closed connection
    assert server.messages == []
    start = time.monotonic()
    send_once(server, module_ca, timeout=5)
    assert time.monotonic() - start >= 0.19
    assert len(server.messages) == 1
    assert len(server.faults_fired) == 2


# -- REQUIRETLS ---------------------------------------------------------------------------------


def test_requiretls_offered_only_inside_tls(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """offer_requiretls: REQUIRETLS is in the EHLO reply only after STARTTLS (RFC 8689 §4.1);
    MAIL FROM with it is accepted and recorded in mail_options."""
    server = smtp_server(tls="starttls", offer_requiretls=True)
    with smtplib.SMTP(server.host, server.port, timeout=5) as conn:
        conn.ehlo()
        assert not conn.has_extn("requiretls")
        conn.starttls(context=module_ca.client_context())
        conn.ehlo()
        assert conn.has_extn("requiretls")
        conn.sendmail(FROM, [TO], RAW, mail_options=["REQUIRETLS"])
        conn.sendmail(FROM, [TO], RAW)
    assert [m.requiretls for m in server.messages] == [True, False]
    assert "REQUIRETLS" in server.messages[0].mail_options


def test_requiretls_refused_when_not_offered(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """Without offer_requiretls the server neither offers REQUIRETLS nor accepts it (555)."""
    server = smtp_server(tls="implicit")
    with client(server, module_ca) as conn:
        conn.ehlo()
        assert not conn.has_extn("requiretls")
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            conn.sendmail(FROM, [TO], RAW, mail_options=["REQUIRETLS"])
    assert info.value.smtp_code == 555
    assert server.messages == []


# -- XOAUTH2 ------------------------------------------------------------------------------------


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def test_xoauth2_success(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """xoauth2_tokens: XOAUTH2 is advertised (alone), a correct token gets 235, and the
    message records the user."""
    server = smtp_server(tls="implicit", xoauth2_tokens={"alice": "ya29.token"})
    with client(server, module_ca) as conn:
        conn.ehlo()
        assert conn.esmtp_features["auth"].split() == ["XOAUTH2"]
        code, _ = conn.docmd("AUTH", "XOAUTH2 " + xoauth2("alice", "ya29.token"))
        assert code == 235
        conn.sendmail(FROM, [TO], RAW)
    assert server.auth_attempts == [("alice", True)]
    assert server.messages[0].auth_user == "alice"


def test_xoauth2_failure_is_334_json_then_535(
    smtp_server: ServerFactory, module_ca: TestCA
) -> None:
    """A wrong token gets a 334 carrying a base64 JSON error; after the client's empty line the
    server says 535 (the Gmail/Microsoft 365 behaviour). MAIL is then refused (AUTH required)."""
    server = smtp_server(tls="implicit", xoauth2_tokens={"alice": "ya29.token"})
    with client(server, module_ca) as conn:
        conn.ehlo()
        code, challenge = conn.docmd("AUTH", "XOAUTH2 " + xoauth2("alice", "stale"))
        assert code == 334
        assert json.loads(base64.b64decode(challenge))["status"] == "401"
        code, _ = conn.docmd("")
        assert code == 535
        assert conn.mail(FROM)[0] == 530
    assert server.auth_attempts == [("alice", False)]


# -- old TLS ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_0_only_server(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """tls_versions=(TLSv1, TLSv1) makes a server that speaks TLS 1.0 and nothing newer."""
    v1 = ssl.TLSVersion.TLSv1
    server = smtp_server(tls="implicit", tls_versions=(v1, v1))
    lax = module_ca.client_context()
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    lax.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with (
        socket.create_connection((server.host, server.port), timeout=5) as raw,
        lax.wrap_socket(raw, server_hostname=server.host) as tls_sock,
    ):
        assert tls_sock.version() == "TLSv1"
        assert tls_sock.recv(1024).startswith(b"220 ")
    strict = module_ca.client_context()
    strict.minimum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection((server.host, server.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        strict.wrap_socket(raw, server_hostname=server.host)
