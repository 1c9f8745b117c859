"""`e2email --config FILE relay --account NAME`: the relay protects and delivers through an
account of the accounts file (its server, CA file and policy), a real process between
Python's smtplib and a real TLS server."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import kill_agent, new_gnupg_home

from e2email.keystore import Keystore
from e2email.outbox import Outbox

test_relay_process = pytest.importorskip("test_relay_process")


@pytest.fixture
def home(keys: Keys) -> Iterator[Path]:
    path = new_gnupg_home("e2z")
    store = Keystore(path)
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.bob.cert)
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


class AccountRelay(test_relay_process.RelayProcess):  # type: ignore[misc,name-defined]
    """The relay process, its upstream given by an account instead of server options."""

    def __init__(self, home: Path, config: Path, name: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "e2email",
                "--config",
                str(config),
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--account",
                name,
            ],
            env={**os.environ, "E2EMAIL_HOME": str(home)},
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


def test_relay_delivers_through_the_account(
    tmp_path: Path, home: Path, smtp_server: test_relay_process.ServerFactory
) -> None:
    upstream = smtp_server(tls="implicit")
    assert upstream.ca_file is not None
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[accounts.work]\n"
        f'host = "{upstream.host}"\nport = {upstream.port}\ntls = "implicit"\n'
        f'ca-file = "{upstream.ca_file}"\nfrom = "alice@example.org"\n',
        encoding="utf-8",
    )
    cfg.chmod(0o600)
    relay = AccountRelay(home, cfg, "work")
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
            client.send_message(test_relay_process.message(1))
        # 250 means stored; delivery upstream runs in the background: wait for it (bounded)
        # before stopping the relay, or a SIGTERM that comes first leaves it in the outbox.
        deadline = time.monotonic() + 60
        while not upstream.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        code = relay.terminate()
        relay.kill()
    assert code == 0, "\n".join(relay.lines)
    (received,) = upstream.messages
    assert b"multipart/encrypted" in received.data
    assert b"message number 1" not in received.data
    with Outbox.in_home(home) as box:
        assert len(box) == 0
