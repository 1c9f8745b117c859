"""A crash loses nothing: `e2email send --to-file` is killed with SIGKILL in the middle of a
batch, and rerunning the same command delivers every remaining message (a real process, a
real TLS server, real gpg)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, kill_agent, multipart_parts, new_gnupg_home, part_body
from test_cli import e2email, send_args

from e2email.keystore import Keystore
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

ROWS = 30


@pytest.fixture
def kill_home(keys: Keys) -> Iterator[Path]:
    path = new_gnupg_home("e2k")
    store = Keystore(path)
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.bob.cert)
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


def _codes(server: LoopbackSMTPServer, recipients_home: Path) -> list[str]:
    """The code each received message carries, read by decrypting it as Bob."""
    codes = []
    for msg in server.messages:
        _, (_, encrypted) = multipart_parts(msg.data)
        plaintext, _ = gpg_decrypt(recipients_home, part_body(encrypted))
        found = re.search(rb"your code is (K-\d+)\.", plaintext)
        assert found, plaintext
        codes.append(found.group(1).decode())
    return codes


def test_sigkill_mid_batch_then_rerun_delivers_every_remaining_message(
    kill_home: Path, smtp_server: ServerFactory, recipients_home: Path, tmp_path: Path
) -> None:
    """SIGKILL while the server sits on its reply to the final "." of a fifth message: the
    outbox then holds only ciphertext (no code appears in it), and that fifth copy, in
    flight when its sender died, is maybe-delivered (the server may have it: the old code
    sent it again on the rerun). Rerunning the same command reports the four delivered rows
    as already sent, that fifth as maybe-delivered (not sent), and delivers all the others;
    `outbox retry --maybe-delivered` then sends the fifth. Every row arrives exactly once."""
    rows = tmp_path / "rows.csv"
    rows.write_text("email,code\n" + "".join(f"bob@example.net,K-{n}\n" for n in range(ROWS)))
    template = tmp_path / "t.txt"
    template.write_text("Subject: your code\n\nHello Bob, your code is $code.\n")
    # Four messages go through; the server then sits on the fifth's reply until the kill.
    slow = smtp_server(
        faults=[
            Fault("data-end", "stall", seconds=0.01, times=4),
            Fault("data-end", "stall", seconds=60, times=None),
        ]
    )
    args = send_args(
        slow, "--to-file", str(rows), "--template", str(template), "--connections", "1"
    )
    env = {**os.environ, "E2EMAIL_HOME": str(kill_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2email", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(slow.faults_fired) < 5:  # the fifth message's "." has arrived
            assert proc.poll() is None, "the batch finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = _codes(slow, recipients_home)
    assert len(set(first)) == len(first) == 4

    outbox_files = [p for p in kill_home.iterdir() if p.name.startswith("outbox.sqlite3")]
    stored = b"".join(p.read_bytes() for p in outbox_files)
    assert b"BEGIN PGP MESSAGE" in stored  # protected copies wait there ...
    assert b"your code is" not in stored and b"K-1" not in stored  # ... and nothing else
    listing = e2email("outbox", "list", home=kill_home)
    assert "maybe-delivered" in listing.stdout, listing.stdout
    with sqlite3.connect(kill_home / "outbox.sqlite3") as db:
        waiting = [bytes(r[0]) for r in db.execute("SELECT raw FROM items")]
    assert waiting

    fresh = smtp_server()
    again = e2email(
        *send_args(
            fresh, "--to-file", str(rows), "--template", str(template), "--connections", "2"
        ),
        home=kill_home,
    )
    assert again.returncode == 6, again.stderr
    (maybe_row,) = re.findall(r"^row (\d+) bob@example.net: maybe-delivered", again.stdout, re.M)
    in_flight = f"K-{int(maybe_row) - 1}"
    assert in_flight not in first
    assert f"{ROWS} row(s)" in again.stderr and "4 already sent earlier" in again.stderr
    assert "1 maybe-delivered (not sent again by itself)" in again.stderr
    second = _codes(fresh, recipients_home)
    assert in_flight not in second and len(second) == ROWS - 5

    retried = e2email(
        "outbox",
        "retry",
        "--maybe-delivered",
        *send_args(fresh)[send_args(fresh).index("--host") :],
        home=kill_home,
    )
    assert retried.returncode == 0, retried.stderr
    # What waited in the outbox is sent as it was stored, not protected again.
    received = [m.data for m in fresh.messages]
    assert all(raw in received for raw in waiting)
    everything = Counter(first + _codes(fresh, recipients_home))
    assert everything == Counter(f"K-{n}" for n in range(ROWS))
    assert e2email("outbox", "list", home=kill_home).stdout.startswith("the outbox is empty")
