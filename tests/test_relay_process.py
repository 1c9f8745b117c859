"""`e2email relay` as a real process: SIGTERM in the middle of a burst of 100 submissions loses
none of the accepted messages and sends none twice (a real TLS server upstream, real gpg)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import IO

import pytest
from fixtures_pgp import Keys
from pgp_helpers import header_value, kill_agent, new_gnupg_home, split_head

from e2email.keystore import Keystore
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

BURST = 100


@pytest.fixture
def relay_home(keys: Keys) -> Iterator[Path]:
    path = new_gnupg_home("e2y")
    store = Keystore(path)
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.bob.cert)
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


class RelayProcess:
    """``python -m e2email relay`` on a free loopback port, its log read by a thread."""

    def __init__(
        self,
        home: Path,
        upstream: LoopbackSMTPServer,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        assert upstream.ca_file is not None
        args = [
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--host",
            upstream.host,
            "--port",
            str(upstream.port),
            "--tls",
            "implicit",
            "--ca-file",
            str(upstream.ca_file),
            "--retries",
            "1",
            *extra,
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "e2email", *args],
            env={**os.environ, "E2EMAIL_HOME": str(home), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                self._port = int(found.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def port(self) -> int:
        assert self._ready.wait(120), "the relay did not start"
        assert self._port is not None, "\n".join(self.lines)
        return self._port

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._reader.join(timeout=30)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.net"
    msg["Subject"] = f"burst {n}"
    msg["Message-ID"] = f"<burst-{n}@example.org>"
    msg.set_content(f"message number {n}\n")
    return msg


def message_ids(server: LoopbackSMTPServer) -> Counter[str]:
    return Counter(
        header_value(split_head(m.data)[0], "Message-ID").strip() for m in list(server.messages)
    )


def test_sigterm_during_a_burst_loses_no_accepted_message_and_sends_none_twice(
    relay_home: Path, smtp_server: ServerFactory
) -> None:
    """A client sends 100 messages over one connection; SIGTERM lands after 30 got their 250.
    The relay answers the message in progress, stops, and exits 0, with the upstream server
    (slow: every message takes it a while) part way through. Started again (against the same
    upstream, no longer slow), it delivers what was left: every accepted message arrives exactly
    once."""
    slow = smtp_server(faults=[Fault("data-end", "stall", seconds=0.1, times=None)])
    first = RelayProcess(relay_home, slow, "--connections", "1")
    accepted: list[str] = []
    failures: list[BaseException] = []

    def client(port: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as conn:
                for n in range(BURST):
                    conn.send_message(message(n))  # raises unless 250
                    accepted.append(f"<burst-{n}@example.org>")
        except (smtplib.SMTPException, OSError) as exc:
            failures.append(exc)  # the relay went away mid-burst: expected

    try:
        sender = threading.Thread(target=client, args=(first.port,), daemon=True)
        sender.start()
        deadline = time.monotonic() + 120
        while len(accepted) < 30:
            assert sender.is_alive(), f"the burst ended early: {failures}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert first.terminate() == 0, "\n".join(first.lines)
        sender.join(timeout=60)
        assert not sender.is_alive()
    finally:
        first.kill()
    log = "\n".join(first.lines)
    assert f"stopped: {len(accepted)} accepted" in log, log
    assert 30 <= len(accepted) < BURST, "the SIGTERM did not land mid-burst"
    # The client saw the relay go away (421 or a closed connection), not a refusal.
    assert failures
    assert getattr(failures[0], "smtp_code", 421) == 421, failures

    # The same upstream (host and port: a relay delivers only the copies stored for it).
    slow.faults = ()
    second = RelayProcess(relay_home, slow)
    try:
        second.port  # noqa: B018 - started
        deadline = time.monotonic() + 120
        while not set(accepted) <= set(message_ids(slow)):
            assert second.proc.poll() is None, "\n".join(second.lines)
            assert time.monotonic() < deadline, "accepted messages were lost"
            time.sleep(0.02)
        assert second.terminate() == 0, "\n".join(second.lines)
    finally:
        second.kill()
    received = message_ids(slow)
    assert set(accepted) <= set(received)
    assert not {mid: n for mid, n in received.items() if n > 1}
    # Only messages the client sent arrive (at most the one whose 250 the SIGTERM cut off).
    assert set(received) - set(accepted) <= {f"<burst-{len(accepted)}@example.org>"}
    assert "0 copy(ies) wait in the outbox" in "\n".join(second.lines)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ((), "not loopback) needs STARTTLS"),
        (("--tls-self-signed",), "not loopback) needs STARTTLS"),
        (("--relay-user", "app"), "--relay-user needs --relay-password-env"),
    ],
)
def test_the_cli_refuses_to_listen_beyond_loopback_without_tls_and_auth(
    relay_home: Path, smtp_server: ServerFactory, extra: tuple[str, ...], expected: str
) -> None:
    """One line, exit 2, nothing listening: a relay open to the network in clear would let
    anyone read what is submitted or send through it."""
    upstream = smtp_server()
    assert upstream.ca_file is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2email",
            "relay",
            "--listen",
            "0.0.0.0:0",
            "--host",
            upstream.host,
            "--port",
            str(upstream.port),
            "--tls",
            "implicit",
            "--ca-file",
            str(upstream.ca_file),
            *extra,
        ],
        env={**os.environ, "E2EMAIL_HOME": str(relay_home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert expected in done.stderr
    assert not re.search(r"listening on \S+:\d+", done.stderr)
    assert not (relay_home / "relay-tls").exists()  # checked before anything is made


def test_the_cli_offers_starttls_with_a_self_signed_certificate_and_auth_only_inside_it(
    relay_home: Path, smtp_server: ServerFactory
) -> None:
    """--tls-self-signed makes a certificate (its fingerprint logged), clients must STARTTLS
    before anything else and only then see AUTH; with the right password a message goes
    through, protected."""
    upstream = smtp_server()
    relay = RelayProcess(
        relay_home,
        upstream,
        "--tls-self-signed",
        "--relay-user",
        "app",
        "--relay-password-env",
        "RELAY_TEST_PASSWORD",
        env={"RELAY_TEST_PASSWORD": "correct-password"},
    )
    try:
        port = relay.port
        cert = relay_home / "relay-tls" / "relay-cert.pem"
        assert cert.stat().st_mode & 0o777 == 0o600
        logged = "\n".join(relay.lines)
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest().upper()
        assert fingerprint in logged.replace(":", "")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            assert client.mail("alice@example.org")[0] == 530
            client.starttls(context=ssl.create_default_context(cafile=str(cert)))
            client.ehlo()
            assert client.has_extn("auth")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("app", "wrong-password")
            client.login("app", "correct-password")
            assert client.send_message(message(1)) == {}
        deadline = time.monotonic() + 60
        while not upstream.messages:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert b"message number 1" not in upstream.messages[0].data
        assert relay.terminate() == 0
    finally:
        relay.kill()
    assert "correct-password" not in "\n".join(relay.lines)
