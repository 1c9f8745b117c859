"""Issue 8, transport edges: host names (a glued port, IDNA 2008), server text that must not
reach a terminal as it is, a 454 to STARTTLS, Ctrl-C that must never be swallowed, and
secrets read only once TLS is verified. Real servers, real TLS, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from e2email.config import SMTPSettings, TLSMode, host_for_connecting
from e2email.errors import ConfigError, RecipientsRefusedError, SMTPReply
from e2email.testing import HostileSMTPServer, LoopbackSMTPServer, TestCA
from e2email.transport import SMTPTransport
from e2email.transport.text import server_text

ServerFactory = Callable[..., LoopbackSMTPServer]

RAW = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: edges\r\n\r\nHello.\r\n"

#: What a hostile server appends to its replies: an OSC that retitles the terminal, a CSI that
#: clears the screen, BEL, BS, DEL, NUL, a C1 CSI and a byte that is not UTF-8.
TAINT = b"\x1b]0;owned\x07\x1b[2J\x07\x08\x7f\x00\xc2\x9b31m\xff"

#: Control bytes other than LF, and the UTF-8 encodings of C1 controls.
_CONTROL_BYTES = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


def assert_no_control_bytes(*outputs: bytes) -> None:
    for output in outputs:
        found = _CONTROL_BYTES.search(output)
        assert found is None, (found, output[-400:])


@pytest.fixture
def hostile(module_ca: TestCA) -> Iterator[Callable[..., HostileSMTPServer]]:
    servers: list[HostileSMTPServer] = []

    def make(**kwargs: Any) -> HostileSMTPServer:
        kwargs.setdefault("ca", module_ca)
        server = HostileSMTPServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def cli(
    *args: str | bytes, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        input=b"",
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home), **(env or {})},
        timeout=120,
        check=False,
    )


def send_args(server: LoopbackSMTPServer, *extra: str, ca_file: Path | None = None) -> list[str]:
    """An unprotected one-liner (no keys needed) from alice to bob via ``server``."""
    return [
        "send",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--no-sign",
        "--no-encrypt",
        "--subject",
        "edges",
        "--body",
        "hello",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--tls",
        server.tls,
        "--ca-file",
        str(ca_file or server.ca_file),
        *extra,
    ]


def error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("e2email: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def outbox_list(home: Path) -> str:
    return cli("outbox", "list", home=home).stdout.decode()


# -- item 12: host names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port"),
    [("localhost:587", "587"), ("smtp.example.org:465", "465"), ("[::1]:25", "25")],
)
def test_a_port_glued_to_the_host_is_refused_with_a_pointer_to_port(host: str, port: str) -> None:
    """`localhost:587` is not a host name to look up (and retry three times): a ConfigError at
    once, pointing to the port setting."""
    with pytest.raises(ConfigError, match=rf"contains a port.*--port {port}"):
        SMTPSettings(host=host)


def test_ipv6_literals_are_accepted_bare_or_in_brackets() -> None:
    """An IPv6 address is a host, with or without brackets (connected to without them); an
    IPv4 address in brackets is not."""
    assert SMTPSettings(host="::1").connect_host == "::1"
    assert SMTPSettings(host="[::1]").connect_host == "::1"
    assert SMTPSettings(host="2001:DB8::1").connect_host == "2001:db8::1"
    assert SMTPSettings(host="127.0.0.1").connect_host == "127.0.0.1"
    with pytest.raises(ConfigError):
        SMTPSettings(host="[127.0.0.1]")


@pytest.mark.parametrize(
    "host", ["x..y", "a" * 64 + ".example", "bad\udcffname.example", "-lead.example", "a b", ""]
)
def test_invalid_host_names_are_config_errors(host: str) -> None:
    with pytest.raises(ConfigError):
        SMTPSettings(host=host)


def test_host_names_use_idna_2008() -> None:
    """UTS 46 non-transitional, as for every address: ß stays (xn--fa-hia), never "fass" (the
    IDNA 2003 answer of Python's codec, which socket and ssl would apply)."""
    assert SMTPSettings(host="faß.example").connect_host == "xn--fa-hia.example"
    assert SMTPSettings(host="Smtp.Example.ORG").connect_host == "smtp.example.org"
    assert host_for_connecting("bücher.example.") == "xn--bcher-kva.example."


def test_an_international_host_is_looked_up_and_verified_as_its_a_label(
    module_ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transport looks up and verifies the certificate for the IDNA 2008 A-label: a server
    whose certificate names xn--fa-hia.example gets the message for host faß.example."""
    looked_up: list[object] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: object, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        if host in ("xn--fa-hia.example", b"xn--fa-hia.example"):
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with LoopbackSMTPServer(tls="implicit", ca=module_ca, identities=("xn--fa-hia.example",)) as s:
        settings = SMTPSettings(
            host="faß.example", port=s.port, tls=TLSMode.IMPLICIT, ca_file=module_ca.ca_file
        )
        result = asyncio.run(
            SMTPTransport(settings).send(
                RAW, mail_from="alice@example.org", recipients=["bob@example.net"]
            )
        )
        assert result.accepted == ("bob@example.net",)
        assert len(s.messages) == 1
    assert looked_up and set(looked_up) <= {"xn--fa-hia.example", b"xn--fa-hia.example"}


def test_cli_refuses_a_glued_port_and_bad_names_as_usage_errors(tmp_path: Path) -> None:
    """`send --host localhost:587`, `doctor localhost:587`, `x..y`, a 64-character label and a
    name that is not UTF-8: exit 2, one line, nothing stored, no internal error."""
    base = ["send", "--from", "alice@example.org", "--to", "bob@example.net", "--no-sign"]
    base += ["--no-encrypt", "--subject", "s", "--body", "b", "--host"]
    done = cli(*base, "localhost:587", home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--port 587" in error_line(done)
    done = cli("doctor", "localhost:587", home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "contains a port" in error_line(done)
    for bad in (b"x..y", b"a" * 64 + b".example", b"bad\xffname.example"):
        for args in (base, ["doctor"]):
            done = cli(*args, bad, home=tmp_path)
            assert done.returncode == 2, (bad, args[0], done.stderr)
            assert "not a valid host name" in error_line(done)
    assert "the outbox is empty" in outbox_list(tmp_path)


# -- item 17: server text never reaches the terminal as it is ----------------------------------


def test_server_text_is_stripped_of_escapes_and_controls() -> None:
    assert server_text("250 OK") == "250 OK"
    assert server_text("a\x1b]0;t\x07b\x1b[2Jc\x9b31md\x07\x08e\x7f\x00f") == "abcdef"
    assert server_text("line one\nline two\r\n") == "line one line two"
    assert server_text("bad\udcff") == "bad\ufffd"
    assert server_text("Grüße \u202eexe.txt") == "Grüße exe.txt"


def test_replies_are_clean_where_the_transport_makes_them(
    hostile: Callable[..., HostileSMTPServer],
) -> None:
    """Every reply the transport hands on (a refusal, the final 250) has no escape or control
    character left, and keeps its code."""
    server = hostile(
        tls="implicit",
        reply_taint=TAINT,
        refuse_recipients={"carol@example.net": (550, "5.1.1 \x1b[31mno such user\x1b[0m")},
    )
    settings = SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )
    result = asyncio.run(
        SMTPTransport(settings).send(
            RAW, mail_from="alice@example.org", recipients=["bob@example.net", "carol@example.net"]
        )
    )
    (refused,) = result.refused
    replies: list[SMTPReply | None] = [result.data_reply, refused.reply]
    for reply in replies:
        assert reply is not None
        assert reply.text.isprintable(), reply
    assert refused.reply is not None and refused.reply.code == 550
    assert "no such user" in refused.reply.text
    assert result.data_reply is not None and result.data_reply.code == 250
    every = asyncio.run(
        SMTPTransport(settings).send(
            RAW, mail_from="alice@example.org", recipients=["carol@example.net"]
        )
    )
    assert isinstance(every.error, RecipientsRefusedError)
    assert str(every.error).isprintable()
    assert all(r.error is not None and r.error.isprintable() for r in every.recipients)


def test_cli_send_prints_no_escape_sequences_from_the_server(
    hostile: Callable[..., HostileSMTPServer], tmp_path: Path
) -> None:
    """A server that puts escape sequences, control bytes and non-UTF-8 bytes into its
    greeting and every reply: `e2email send` (delivered, and refused) prints none of them."""
    server = hostile(
        tls="implicit",
        reply_taint=TAINT,
        refuse_recipients={"bob@example.net": (550, "5.1.1 \x1b]0;owned\x07gone")},
    )
    done = cli(*send_args(server), home=tmp_path)
    assert done.returncode == 6, done.stderr
    assert "gone" in error_line(done)
    assert_no_control_bytes(done.stdout, done.stderr)
    good = hostile(tls="implicit", reply_taint=TAINT)
    done = cli(*send_args(good), home=tmp_path / "2")
    assert done.returncode == 0, done.stderr
    assert b"queued as TEST1" in done.stdout
    assert_no_control_bytes(done.stdout, done.stderr)


def test_cli_doctor_prints_no_escape_sequences_from_the_server(
    hostile: Callable[..., HostileSMTPServer], tmp_path: Path
) -> None:
    """`e2email doctor` (text and JSON) against a server whose greeting, EHLO and STARTTLS
    answer carry escape sequences: none reach the output, not even inside the JSON values."""
    server = hostile(
        tls="starttls", reply_taint=TAINT, starttls_reply=(454, "4.7.0 \x1b[2Jno TLS today")
    )
    args = ["doctor", "127.0.0.1", "--ca-file", str(server.ca_file), "--timeout", "5"]
    args += ["--port-map", f"587={server.port}"]
    done = cli(*args, home=tmp_path)
    assert done.returncode == 4, done.stderr
    assert b"no TLS today" in done.stdout
    assert_no_control_bytes(done.stdout, done.stderr)
    done = cli(*args, "--json", home=tmp_path)
    assert done.returncode == 4, done.stderr
    report = json.loads(done.stdout)
    (port,) = [p for p in report["ports"] if p["port"] == 587]
    assert port["banner"].startswith("220 ")
    texts = json.dumps(report, ensure_ascii=False)
    assert_no_control_bytes(texts.encode("utf-8", "surrogateescape"))


# -- item 9: a 454 to STARTTLS is a TLS refusal --------------------------------------------------


def test_cli_a_454_to_starttls_is_a_tls_refusal_exit_4(
    hostile: Callable[..., HostileSMTPServer], tmp_path: Path
) -> None:
    """Not retried into "every recipient was refused" (exit 6): exit 4 at once, the message
    kept in the outbox, nothing but EHLO and STARTTLS sent, one connection."""
    server = hostile(tls="starttls", starttls_reply=(454, "4.7.0 TLS not available"))
    done = cli(*send_args(server), home=tmp_path)
    assert done.returncode == 4, done.stderr
    line = error_line(done)
    assert "refused STARTTLS" in line and "454" in line
    assert "every recipient" not in line
    assert server.connections == 1
    assert server.received_commands() in (["EHLO", "STARTTLS"], ["EHLO", "STARTTLS", "QUIT"])
    assert "1 item(s)" in outbox_list(tmp_path)


# -- item 10: Ctrl-C is never swallowed ---------------------------------------------------------


def test_a_cancel_racing_a_reply_is_not_swallowed(
    smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python 3.11 wait_for race, made deterministic: the task is cancelled in the very
    loop turn in which the reply to MAIL arrives. The send must stop there (CancelledError),
    not go on to RCPT and DATA and deliver a message after the user said stop."""
    server = smtp_server(tls="implicit")
    settings = SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )
    real_read_response = aiosmtplib.protocol.SMTPProtocol.read_response
    armed = False

    async def read_response(self: Any, timeout: float | None = None) -> Any:
        waiter = self._response_waiter
        task = asyncio.current_task()
        if armed and waiter is not None and task is not None:
            # Runs first among the reply's callbacks: the cancellation and the reply meet.
            waiter.add_done_callback(lambda _: task.cancel())
        return await real_read_response(self, timeout)

    async def run() -> None:
        nonlocal armed
        async with SMTPTransport(settings).connect() as conn:
            monkeypatch.setattr(aiosmtplib.protocol.SMTPProtocol, "read_response", read_response)
            armed = True
            task = asyncio.create_task(
                conn.send(RAW, mail_from="alice@example.org", recipients=["bob@example.net"])
            )
            with pytest.raises(asyncio.CancelledError):
                await task
            armed = False

    asyncio.run(run())
    assert server.messages == []
    commands = server.received_commands()
    assert "MAIL" in commands
    assert "RCPT" not in commands and "DATA" not in commands


def test_ctrl_c_while_a_data_chunk_is_written_exits_130_and_keeps_the_copy(
    hostile: Callable[..., HostileSMTPServer], tmp_path: Path
) -> None:
    """SIGINT while the client is writing the message (the server said 354 and stopped
    reading, so the writes wait for room): exit 130, one line naming the outbox ID, the copy
    back in the queue with the interruption recorded, and nothing delivered."""
    server = hostile(tls="implicit", stop_reading_at_data=True)
    body = tmp_path / "body.txt"
    # Larger than every buffer on the way (the kernel's send buffer is at most a few MB), so
    # the client cannot have written it all before the server stopped reading.
    body.write_bytes((b"x" * 70 + b"\n") * 90_000)
    args = [a for a in send_args(server) if a not in ("--body", "hello")]
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2email", *args, "--body-file", str(body)],
        env={**os.environ, "E2EMAIL_HOME": str(home)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.reading_stopped.wait(60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    stderr = err.decode()
    assert "Traceback" not in stderr
    listed = outbox_list(home)
    item_id = listed.split()[0]
    assert f"kept in the outbox as {item_id}" in stderr
    assert "interrupted" in listed
    assert server.messages == []


# -- item 7: secrets are read only once TLS is verified ------------------------------------------


def _password_command(marker: Path) -> str:
    return f"echo ran >> '{marker}'; echo pw"


@pytest.mark.parametrize("case", ["untrusted-certificate", "stripped-starttls", "wrong-host"])
def test_the_password_command_never_runs_without_verified_tls(
    smtp_server: ServerFactory, tmp_path: Path, case: str
) -> None:
    """`--password-command` against a server whose certificate is not trusted, whose STARTTLS
    was stripped, or whose certificate is for another host: the send fails (exit 4) and the
    command was never run."""
    marker = tmp_path / "ran"
    ca_file: Path | None = None
    if case == "untrusted-certificate":
        server = smtp_server(tls="implicit", credentials={"alice": "pw"})
        other = TestCA()
        try:
            ca_file = tmp_path / "other-ca.pem"
            ca_file.write_bytes(other.cert_pem)
        finally:
            other.cleanup()
    elif case == "stripped-starttls":
        server = smtp_server(tls="starttls", offer_starttls=False, credentials={"alice": "pw"})
    else:
        server = smtp_server(
            tls="starttls", identities=("wrong.example",), credentials={"alice": "pw"}
        )
    args = send_args(server, "--user", "alice", "--password-command", _password_command(marker))
    if ca_file is not None:
        args[args.index("--ca-file") + 1] = str(ca_file)
    done = cli(*args, home=tmp_path / "home")
    assert done.returncode == 4, done.stderr
    assert not marker.exists(), "the password command ran before TLS was verified"
    assert server.auth_attempts == [] and server.messages == []


def test_the_token_command_never_runs_without_verified_tls(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The same for `--token-command` (XOAUTH2): STARTTLS stripped, the command never ran."""
    marker = tmp_path / "ran"
    server = smtp_server(tls="starttls", offer_starttls=False, xoauth2_tokens={"alice": "pw"})
    args = send_args(server, "--user", "alice", "--token-command", _password_command(marker))
    done = cli(*args, home=tmp_path / "home")
    assert done.returncode == 4, done.stderr
    assert not marker.exists(), "the token command ran before TLS was verified"
    assert set(server.received_commands()) <= {"EHLO", "QUIT"}


def test_the_password_command_runs_once_against_a_good_server(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Against a server with verified TLS the command runs exactly once and the message is
    delivered with it."""
    marker = tmp_path / "ran"
    server = smtp_server(tls="starttls", credentials={"alice": "pw"})
    args = send_args(server, "--user", "alice", "--password-command", _password_command(marker))
    done = cli(*args, home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert marker.read_text().splitlines() == ["ran"]
    assert server.auth_attempts == [("alice", True)]
    assert len(server.messages) == 1


def test_a_failing_password_command_after_verified_tls_stores_nothing(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The command still fails before anything is stored (TLS was verified on a first
    connection): exit 2, the outbox empty, the server never saw AUTH or MAIL."""
    server = smtp_server(tls="implicit", credentials={"alice": "pw"})
    args = send_args(server, "--user", "alice", "--password-command", "exit 3")
    done = cli(*args, home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "exited with 3" in error_line(done)
    assert "the outbox is empty" in outbox_list(tmp_path)
    assert server.connections == 1
    assert server.received_commands() in (["EHLO"], ["EHLO", "QUIT"])
