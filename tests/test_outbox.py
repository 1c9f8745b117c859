"""The outbox store: private files, what an attempt's outcome does to an item, the batch
ledger, claims that keep two processes from sending the same copy (real processes), and the
`e2email outbox` commands."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import kill_agent, new_gnupg_home
from test_cli import e2email, send_args

from e2email.errors import ConfigError, InsecurePathError, SMTPReply
from e2email.keystore import Keystore
from e2email.outbox import ItemState, LedgerTaken, NewItem, Outbox, OutboxError
from e2email.testing import Fault, LoopbackSMTPServer

RAW = b"From: a@example.org\r\nSubject: [...]\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n"


def item(*rcpts: str, raw: bytes = RAW) -> NewItem:
    return NewItem(raw=raw, mail_from="a@example.org", recipients=rcpts, message_id="m@x")


def test_files_are_private(tmp_path: Path) -> None:
    """The database and SQLite's -wal and -shm files are 0600, in a 0700 directory, whatever
    the umask."""
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "home" / "outbox.sqlite3")
        box.add([item("b@example.net")])
    finally:
        os.umask(old)
    home = tmp_path / "home"
    assert home.stat().st_mode & 0o777 == 0o700
    names = {p.name: p.stat().st_mode & 0o777 for p in home.iterdir()}
    assert "outbox.sqlite3-wal" in names
    assert names == dict.fromkeys(names, 0o600)
    box.close()


def test_an_item_leaves_only_when_every_recipient_is_delivered(tmp_path: Path) -> None:
    """Delivered and permanently failed recipients are recorded one attempt at a time; the
    item is deleted only when none is pending or failed, and is ``failed`` when only refused
    ones remain (kept for the user)."""
    box = Outbox(tmp_path / "o.sqlite3")
    (a,) = box.add([item("b@example.net", "c@example.com", "d@example.com")])
    assert box.get(a).state is ItemState.SENDING and box.get(a).raw == RAW
    ok = SMTPReply(250, "queued")
    gone = box.settle(
        a,
        delivered={"b@example.net": ok},
        pending={"c@example.com": SMTPReply(451, "later")},
        failed={"d@example.com": SMTPReply(552, "full")},
        error="c: 451",
    )
    assert not gone
    got = box.get(a)
    assert got.pending == ("c@example.com",) and got.delivered == ("b@example.net",)
    assert got.attempts == 1 and got.state is ItemState.SENDING
    assert box.settle(a, delivered={"c@example.com": ok}, release=True) is False
    got = box.get(a)
    assert got.state is ItemState.FAILED and got.pending == ()
    assert [(r.address, r.reply) for r in got.failed] == [("d@example.com", SMTPReply(552, "full"))]
    # An explicit retry makes the refused recipient pending again; delivering it removes all.
    (claimed,) = box.claim([a[:5]])
    assert claimed.pending == ("d@example.com",)
    assert box.settle(a, delivered={"d@example.com": ok}) is True
    assert len(box) == 0


def test_release_requeues_without_counting_an_attempt(tmp_path: Path) -> None:
    """A run that stops before trying an item gives it back as queued, attempts unchanged."""
    box = Outbox(tmp_path / "o.sqlite3")
    (a,) = box.add([item("b@example.net")])
    box.release([a], error="sending stopped")
    got = box.get(a)
    assert got.state is ItemState.QUEUED and got.attempts == 0
    assert got.last_error == "sending stopped" and got.claimed_by is None


def test_ids_prefixes_and_drop(tmp_path: Path) -> None:
    """Items are named by ID or unique prefix; unknown or malformed IDs are clear errors
    (ConfigError); dropping deletes the item and marks its batch row done."""
    box = Outbox(tmp_path / "o.sqlite3")
    (a,) = box.add([item("b@example.net")], ledger=("batch", "key1"))
    assert box.ledger_state("key1") == "queued"
    with pytest.raises(OutboxError, match="no item"):
        box.get("ffffffffffff" if not a.startswith("f") else "000000000000")
    with pytest.raises(ConfigError, match="not an outbox item ID"):
        box.drop("x; DROP TABLE items")
    dropped = box.drop(a[:6])
    assert dropped.id == a and len(box) == 0
    assert box.ledger_state("key1") == "done"


def test_ledger_is_done_only_when_all_copies_of_the_row_are_delivered(tmp_path: Path) -> None:
    """A batch row with two copies (To and Bcc) is done when both are delivered, not before."""
    box = Outbox(tmp_path / "o.sqlite3")
    a, b = box.add([item("b@example.net"), item("c@example.com")], ledger=("batch", "row"))
    assert box.settle(a, delivered={"b@example.net": None})
    assert box.ledger_state("row") == "queued"
    assert box.settle(b, delivered={"c@example.com": None})
    assert box.ledger_state("row") == "done"
    assert box.ledger_state("other") is None


def test_storing_a_ledger_row_that_is_taken_stores_nothing(tmp_path: Path) -> None:
    """The ledger check and the store are one transaction: a second add for a key that is
    queued (with items) or done raises LedgerTaken and stores nothing, even from a second
    Outbox on the same file (another process); a queued key whose items are gone is free."""
    box = Outbox(tmp_path / "o.sqlite3")
    other = Outbox(tmp_path / "o.sqlite3")
    (first,) = box.add([item("b@example.net")], ledger=("batch", "row"))
    with pytest.raises(LedgerTaken) as taken:
        other.add([item("b@example.net")], ledger=("batch", "row"))
    assert taken.value.state == "queued" and len(box) == 1
    box.settle(first, delivered={"b@example.net": None})
    with pytest.raises(LedgerTaken, match="done"):
        other.add([item("b@example.net")], ledger=("batch", "row"))
    assert len(box) == 0
    with sqlite3.connect(tmp_path / "o.sqlite3") as db:
        db.execute("INSERT INTO ledger VALUES ('stale', 'batch', 'queued', 0)")
    assert len(other.add([item("c@example.com")], ledger=("batch", "stale"))) == 1


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """An outbox written by a newer e2email is not touched."""
    path = tmp_path / "o.sqlite3"
    Outbox(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(OutboxError, match="newer e2email"):
        Outbox(path)


def test_claims_of_another_machine_hold_until_their_lease_ends(tmp_path: Path) -> None:
    """A claim whose owner cannot be checked (another host) is honoured until its lease
    expires, then taken over."""
    box = Outbox(tmp_path / "o.sqlite3")
    a, b = box.add([item("b@example.net"), item("c@example.com")], claim=False)
    with sqlite3.connect(box.path) as db:
        db.execute(
            "UPDATE items SET state = 'sending', claimed_by = 'elsewhere:1:1', claimed_until = ?"
            " WHERE id = ?",
            (time.time() + 600, a),
        )
        db.execute(
            "UPDATE items SET state = 'sending', claimed_by = 'elsewhere:1:1', claimed_until = ?"
            " WHERE id = ?",
            (time.time() - 1, b),
        )
    assert [i.id for i in box.claim()] == [b]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from e2email.outbox import Outbox
    box = Outbox(sys.argv[1])
    got = box.claim()
    print(" ".join(i.id for i in got), flush=True)
    time.sleep(60)
    """
)


def test_a_live_process_keeps_its_claims_and_a_killed_one_loses_them_at_once(
    tmp_path: Path,
) -> None:
    """Another process has claimed the items: this one cannot claim them while it runs; once
    it is killed (SIGKILL; even before it is reaped) they can be claimed right away."""
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    ids = set(box.add([item("b@example.net"), item("c@example.com")], claim=False))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert set(holder.stdout.readline().split()) == ids
        assert box.claim() == ()
        with pytest.raises(OutboxError, match="being sent"):
            box.drop(next(iter(ids)))
        os.kill(holder.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # a zombie until reaped: must already count as gone
            with open(f"/proc/{holder.pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert {i.id for i in box.claim()} == ids
    finally:
        holder.kill()
        holder.wait()


_CLAIMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from e2email.outbox import Outbox
    box = Outbox(sys.argv[1])
    while not Path(sys.argv[2]).exists():
        time.sleep(0.001)
    mine = []
    while True:
        got = box.claim(limit=3)
        if not got:
            break
        mine.extend(i.id for i in got)
    print(" ".join(mine), flush=True)
    time.sleep(2)  # stay alive so the claims stay valid while the other one looks
    """
)


def test_two_processes_claiming_at_once_never_take_the_same_item(tmp_path: Path) -> None:
    """Two processes racing to claim 60 items get disjoint sets that cover them all."""
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    ids = set(box.add([item(f"r{n}@example.net") for n in range(60)], claim=False))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(path), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        time.sleep(0.5)  # both have imported and opened the outbox
        go.touch()
        taken = []
        for p in procs:
            assert p.stdout is not None
            taken.append(set(p.stdout.readline().split()))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not taken[0] & taken[1]
    assert taken[0] | taken[1] == ids


def test_the_file_shrinks_again_after_a_large_item_is_gone(tmp_path: Path) -> None:
    """A large message once sent does not keep the outbox file large: its pages are given
    back when the outbox is next opened."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        (a,) = box.add([item("b@example.net", raw=b"x" * 5_000_000)])
        assert box.settle(a, delivered={"b@example.net": None})
    with Outbox(path) as box, sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert len(box) == 0
    assert path.stat().st_size < 1_000_000


def test_cli_outbox_retry_sends_what_a_failed_send_left(
    keys: Keys, smtp_server: Callable[..., LoopbackSMTPServer], tmp_path: Path
) -> None:
    """`send` against a server that keeps saying 451 exits 6 and leaves the message queued;
    `outbox list` shows why; `outbox retry` with the same server options delivers exactly the
    stored bytes and empties the outbox."""
    home = new_gnupg_home("e2o")
    try:
        store = Keystore(home)
        assert keys.alice.secret
        store.import_file(keys.alice.secret)
        store.import_file(keys.bob.cert)
        busy = smtp_server(faults=[Fault("rcpt", "reply", 451, "4.3.2 busy", times=None)])
        done = e2email(
            *send_args(busy, "--to", "bob@example.net", "--body", "later", "--retries", "1"),
            home=home,
        )
        assert done.returncode == 6, done.stderr
        assert "outbox retry" in done.stderr
        with sqlite3.connect(home / "outbox.sqlite3") as db:
            (raw,) = db.execute("SELECT raw FROM items").fetchone()
        listing = e2email("outbox", "list", home=home)
        assert "queued  2 attempt(s)" in listing.stdout and "4.3.2 busy" in listing.stdout
        fine = smtp_server()
        args = send_args(fine)[send_args(fine).index("--host") :]
        retried = e2email("outbox", "retry", "--now", *args, home=home)
        assert retried.returncode == 0, retried.stderr
        assert "delivered: bob@example.net" in retried.stdout
        assert [m.data for m in fine.messages] == [raw]
        assert e2email("outbox", "list", home=home).stdout.startswith("the outbox is empty")
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_cli_outbox_retry_honours_refusals_retry_times_and_routes(
    smtp_server: Callable[..., LoopbackSMTPServer], tmp_path: Path
) -> None:
    """`outbox retry` resends only pending recipients whose retry time has come: a recipient
    refused with 5xx only with --include-failed, an item not due only with --now; routes
    compare case-insensitively; when nothing matches the IDs or the server it exits 2 with one
    line; server text with CR/LF is shown escaped."""
    home = tmp_path / "home"
    reply = SMTPReply(550, "5.1.1 no such user\r\nFAKE: injected line")
    with Outbox.in_home(home) as box:
        (part,) = box.add([item("b@example.net", "c@example.com")], route="127.0.0.1")
        box.settle(part, failed={"c@example.com": reply}, release=True)
        (refused,) = box.add([item("d@example.net")], route="127.0.0.1")
        box.settle(refused, failed={"d@example.net": reply}, release=True)
        (later,) = box.add([item("e@example.net")], route="127.0.0.1")
        box.settle(later, error="451 busy", retry_at=time.time() + 3600, release=True)
        (elsewhere,) = box.add([item("f@example.net")], route="Mail.Example.ORG", claim=False)
        assert [i.id for i in box.claim(route="mail.example.org")] == [elsewhere]
        box.release([elsewhere])
    listing = e2email("outbox", "list", home=home)
    assert "\\r\\nFAKE: injected line" in listing.stdout
    assert not any(line.startswith("FAKE") for line in listing.stdout.splitlines())
    server = smtp_server()
    args = send_args(server)[send_args(server).index("--host") :]
    done = e2email("outbox", "retry", *args, home=home)
    assert done.returncode == 0, done.stderr
    assert [m.rcpt_tos for m in server.messages] == [("b@example.net",)]
    again = e2email("outbox", "retry", *args, home=home)
    assert again.returncode == 2 and "nothing to retry" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and len(server.messages) == 1
    unknown = e2email("outbox", "retry", "abcdef", *args, home=home)
    assert unknown.returncode == 2 and "no item abcdef" in unknown.stderr
    other = e2email("outbox", "retry", *args, "--user", "nobody", home=home)
    assert other.returncode == 2 and "nothing in the outbox is for nobody@" in other.stderr
    forced = e2email("outbox", "retry", "--include-failed", "--now", *args, home=home)
    assert forced.returncode == 0, forced.stderr
    assert sorted(m.rcpt_tos for m in server.messages[1:]) == [
        ("c@example.com",),
        ("d@example.net",),
        ("e@example.net",),
    ]


def test_the_outbox_is_private_even_under_umask_0(tmp_path: Path) -> None:
    """Created 0700/0600 through e2email.private whatever the umask (0 here: the old code
    made the folder 0777 less the umask)."""
    old = os.umask(0)
    try:
        with Outbox(tmp_path / "home" / "deeper" / "outbox.sqlite3") as box:
            box.add([item("b@example.net")])
    finally:
        os.umask(old)
    for folder in (tmp_path / "home", tmp_path / "home" / "deeper"):
        assert folder.stat().st_mode & 0o777 == 0o700
    for path in (tmp_path / "home" / "deeper").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


@pytest.mark.parametrize("loose", ["folder", "file"])
def test_a_group_writable_outbox_is_refused(tmp_path: Path, loose: str) -> None:
    """Whoever may write the outbox (or its folder) can swap a queued message: a
    group-writable one is refused with an InsecurePathError (exit 2 in the CLI) naming it, as
    ssh refuses a loose ~/.ssh; the items stay untouched."""
    home = tmp_path / "home"
    with Outbox.in_home(home) as box:
        box.add([item("b@example.net")], claim=False)
    target = home if loose == "folder" else home / "outbox.sqlite3"
    target.chmod(target.stat().st_mode | 0o020)
    with pytest.raises(InsecurePathError, match="writable by group or others") as info:
        Outbox.in_home(home)
    assert info.value.path == target
    listing = e2email("outbox", "list", home=home)
    assert listing.returncode == 2 and "chmod go-w" in listing.stderr
    target.chmod(target.stat().st_mode & ~0o020)
    with Outbox.in_home(home) as box:
        assert len(box) == 1


def test_an_outbox_of_another_user_is_refused(tmp_path: Path) -> None:
    """An outbox file owned by someone else is refused (checked as root can chown; otherwise
    through check_private's own test of the owner, pinned down in test_private)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user")
    home = tmp_path / "home"
    Outbox.in_home(home).close()
    os.chown(home / "outbox.sqlite3", 12345, 12345)
    with pytest.raises(InsecurePathError, match="owned by another user"):
        Outbox.in_home(home)


def test_outbox_retry_with_incomplete_server_options_is_a_usage_error(tmp_path: Path) -> None:
    """`outbox retry` with incomplete server options exits 2 with a usage message, whether
    the outbox is empty or not (it must never say "the outbox is empty" and exit 0). With no
    server options at all, each item goes through the account it was stored for (issue 11):
    one stored without an account is left, naming --host, exit 2."""
    home = tmp_path / "home"
    for args in (["--port", "587"], ["--user", "bob"]):
        done = e2email("outbox", "retry", *args, home=home)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "--host" in done.stderr and "outbox is empty" not in done.stdout
    with Outbox.in_home(home) as box:
        box.add([item("b@example.net")], claim=False)
    done = e2email("outbox", "retry", home=home)
    assert done.returncode == 2 and "--host" in done.stderr
