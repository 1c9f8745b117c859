"""Outcomes recorded without waiting for the disk (Outbox.settle(synced=False)): a killed process
loses none of them, and stores and in-flight marks stay synced (synchronous=FULL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from e2email.errors import SMTPReply
from e2email.outbox import ItemState, NewItem, Outbox

_KILLED_AFTER_SETTLING = textwrap.dedent(
    """
    import os, signal, sys
    from e2email.errors import SMTPReply
    from e2email.outbox import NewItem, Outbox
    box = Outbox(sys.argv[1])
    new = NewItem(raw=b"x", mail_from="a@example.org", recipients=("b@example.net",),
                  message_id="m")
    sent, later = box.add([new, new])
    box.mark_in_flight(sent)
    assert box.settle(sent, delivered={"b@example.net": SMTPReply(250, "ok")},
                      maybe_delivered=False, synced=False)
    box.settle(later, pending={"b@example.net": SMTPReply(451, "later")},
               error="451 later", release=True, maybe_delivered=False, synced=False)
    print(sent, later, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
    """
)


def test_unsynced_outcomes_survive_a_killed_process(tmp_path: Path) -> None:
    """SIGKILL right after two outcomes were recorded: both are there for the next run (the
    delivered copy gone, not left maybe-delivered; the refused one queued with its reply)."""
    path = tmp_path / "o.sqlite3"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_SETTLING, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    _sent, later = done.stdout.split()
    with Outbox(path) as box:
        assert [i.id for i in box.items()] == [later]
        item = box.get(later, raw=False)
        assert item.state is ItemState.QUEUED and item.maybe_since is None
        assert item.last_error == "451 later" and item.attempts == 1
        assert item.recipients[0].reply == SMTPReply(451, "later")


def _synchronous(box: Outbox) -> int:
    # PRAGMA synchronous: 2 is FULL (what storing and in-flight marks need), 1 NORMAL.
    db: Any = box._db  # the setting itself is the point of this test
    return int(db.execute("PRAGMA synchronous").fetchone()[0])


def test_stores_stay_synced_around_an_unsynced_outcome(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as box:
        assert _synchronous(box) == 2
        new = NewItem(
            raw=b"x", mail_from="a@example.org", recipients=("b@example.net",), message_id="m"
        )
        (item_id,) = box.add([new])
        box.settle(item_id, error="later", release=True, synced=False)
        assert _synchronous(box) == 2
        bad: Any = {"b@example.net": object()}  # no .code: the transaction fails
        with pytest.raises(AttributeError):
            box.settle(item_id, delivered=bad, synced=False)
        assert _synchronous(box) == 2
        assert box.get(item_id, raw=False).state is ItemState.QUEUED
    assert os.path.exists(tmp_path / "o.sqlite3")


# -- group commit: several messages' copies stored with one wait for the disk ----------------


def _new(n: int, *, to: tuple[str, ...] = ("b@example.net",)) -> list[NewItem]:
    return [
        NewItem(raw=f"x{i}".encode(), mail_from="a@example.org", recipients=to, message_id="m")
        for i in range(n)
    ]


def test_a_group_write_makes_each_write_or_says_why_not(tmp_path: Path) -> None:
    """Per write its result, or the error that refused only that write (a ledger key already
    taken, an item without recipients); the connection is synced again afterwards."""
    from e2email.errors import ConfigError
    from e2email.outbox import AddWrite, LedgerTaken

    with Outbox(tmp_path / "o.sqlite3") as box:
        box.add(_new(1), ledger=("batch", "taken"))
        results = box.write_group(
            [
                AddWrite(tuple(_new(2)), ("batch", "k1")),
                AddWrite(tuple(_new(1)), ("batch", "taken")),
                AddWrite(tuple(_new(1, to=()))),
                AddWrite(tuple(_new(1))),
            ],
            route="host",
        )
        assert isinstance(results[1], LedgerTaken)
        assert isinstance(results[2], ConfigError)
        stored = [i for r in results if isinstance(r, tuple) for i in r]
        assert len(stored) == 3 and len(box) == 4
        assert box.ledger_state("k1") == "queued"
        assert all(box.get(i, raw=False).state is ItemState.SENDING for i in stored)
        assert _synchronous(box) == 2
        # The last group refused: the groups before it are made durable all the same.
        results = box.write_group(
            [AddWrite(tuple(_new(1))), AddWrite(tuple(_new(1)), ("batch", "taken"))]
        )
        assert isinstance(results[0], tuple) and isinstance(results[1], LedgerTaken)
        assert _synchronous(box) == 2


def test_writes_asked_for_meanwhile_are_made_together(tmp_path: Path) -> None:
    """send_many's writer: the stores and in-flight marks asked for while a group waits for
    the disk go in one write_group call; each caller gets its own result or its own error,
    and each write is there when its caller goes on."""
    import asyncio

    from e2email.delivery import OutboxWriter
    from e2email.outbox import LedgerTaken

    with Outbox(tmp_path / "o.sqlite3") as box:
        box.add(_new(1), ledger=("batch", "taken"))
        (sent,) = box.add(_new(1))
        calls: list[int] = []
        real = box.write_group

        def spy(ops: Any, **kw: Any) -> Any:
            calls.append(len(ops))
            return real(ops, **kw)

        box.write_group = spy  # type: ignore[method-assign]
        writer = OutboxWriter(box, "host")

        async def run() -> list[Any]:
            return await asyncio.gather(
                *(writer.add(_new(2), ("batch", f"k{i}")) for i in range(4)),
                writer.mark(sent),
                writer.add(_new(1), ("batch", "taken")),
                return_exceptions=True,
            )

        results = asyncio.run(run())
        assert calls == [6]
        assert results[4] is None and isinstance(results[5], LedgerTaken)
        ids = [i for r in results[:4] for i in r]
        assert len(set(ids)) == 8 and len(box) == 10
        assert box.get(ids[0], raw=False).state is ItemState.SENDING
        assert box.get(sent, raw=False).maybe_since is not None
        assert _synchronous(box) == 2


def test_stores_wait_for_the_next_in_flight_mark_while_a_transaction_is_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a transaction is under way, a store goes with that transaction's in-flight mark
    (one group, one fsync); a transaction that ends without a mark lets it go at once; with
    none under way it goes at once."""
    import asyncio

    from e2email.delivery import OutboxWriter

    # Should a store wait for the safety limit, this test would take minutes, not fail.
    monkeypatch.setattr(OutboxWriter, "HOLD_LIMIT", 300.0)
    with Outbox(tmp_path / "o.sqlite3") as box:
        (sent,) = box.add(_new(1))
        calls: list[list[str]] = []
        real = box.write_group

        def spy(ops: Any, **kw: Any) -> Any:
            calls.append([type(op).__name__ for op in ops])
            return real(ops, **kw)

        box.write_group = spy  # type: ignore[method-assign]
        writer = OutboxWriter(box, "host")

        async def with_mark() -> tuple[str, ...]:
            with writer.sending():
                store = asyncio.create_task(writer.add(_new(1)))
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not store.done() and calls == []
                await writer.mark(sent)
                assert store.done()
            return await store

        async def without_mark() -> tuple[str, ...]:
            with writer.sending():
                store = asyncio.create_task(writer.add(_new(1)))
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not store.done()
            return await store  # the transaction ended (failed before its mark)

        async def idle() -> tuple[str, ...]:
            return await writer.add(_new(1))

        async def all_three() -> list[tuple[str, ...]]:
            return [await with_mark(), await without_mark(), await idle()]

        stored = asyncio.run(all_three())
        assert calls == [["AddWrite", "MarkWrite"], ["AddWrite"], ["AddWrite"]]
        assert all(len(ids) == 1 for ids in stored) and len(box) == 4
        assert box.get(sent, raw=False).maybe_since is not None


# -- outcomes with the group: one trip to the outbox's thread per message, not two ---------


def test_settles_go_first_unsynced_and_the_last_store_or_mark_syncs_the_group(
    tmp_path: Path,
) -> None:
    """An attempt's outcome (SettleWrite) in a group is made before the group's stores and
    marks, without waiting for the disk; the last store or mark is the synced commit that
    makes the group durable; a group of outcomes alone waits for no disk (as
    settle(synced=False)). Each write gets its own result, in the order asked."""
    from e2email.outbox import MarkWrite, SettleWrite

    with Outbox(tmp_path / "o.sqlite3") as box:
        done, later, marked = box.add(_new(3))
        seen: list[tuple[str, int]] = []
        settle, mark = box.settle, box.mark_in_flight

        def spy_settle(item_id: str, **kw: Any) -> bool:
            seen.append(("settle", _synchronous(box)))
            return settle(item_id, **kw)

        def spy_mark(item_id: str) -> None:
            seen.append(("mark", _synchronous(box)))
            mark(item_id)

        box.settle = spy_settle  # type: ignore[method-assign]
        box.mark_in_flight = spy_mark  # type: ignore[method-assign]
        ok = SMTPReply(250, "ok")
        results = box.write_group(
            [
                MarkWrite(marked),
                SettleWrite(done, delivered={"b@example.net": ok}, maybe_delivered=False),
                SettleWrite(later, pending={"b@example.net": SMTPReply(451, "later")},
                            error="451 later", release=True, maybe_delivered=False),
            ]
        )  # fmt: skip
        assert results == [None, None, None]
        assert seen == [("settle", 1), ("settle", 1), ("mark", 2)]
        assert [i.id for i in box.items()] == [later, marked]
        assert box.get(later, raw=False).state is ItemState.QUEUED
        assert box.get(marked, raw=False).maybe_since is not None
        seen.clear()
        assert box.write_group([SettleWrite(later, error="again", release=True)]) == [None]
        assert seen == [("settle", 1)]
        assert box.get(later, raw=False).attempts == 2
        assert _synchronous(box) == 2


def test_an_outcome_that_cannot_be_recorded_fails_only_its_own_write(tmp_path: Path) -> None:
    """A settle that raises (here: a reply without a code) is its caller's error; the mark
    in the same group is made and synced all the same."""
    from e2email.outbox import MarkWrite, SettleWrite

    with Outbox(tmp_path / "o.sqlite3") as box:
        bad_item, marked = box.add(_new(2))
        bad: Any = {"b@example.net": object()}
        results = box.write_group([SettleWrite(bad_item, delivered=bad), MarkWrite(marked)])
        assert isinstance(results[0], AttributeError) and results[1] is None
        assert box.get(marked, raw=False).maybe_since is not None
        assert box.get(bad_item, raw=False).state is ItemState.SENDING
        assert _synchronous(box) == 2


_KILLED_AFTER_A_GROUP = textwrap.dedent(
    """
    import os, signal, sys
    from e2email.errors import SMTPReply
    from e2email.outbox import MarkWrite, NewItem, Outbox, SettleWrite
    box = Outbox(sys.argv[1])
    new = NewItem(raw=b"x", mail_from="a@example.org", recipients=("b@example.net",),
                  message_id="m")
    sent, nxt = box.add([new, new])
    box.mark_in_flight(sent)
    box.write_group([MarkWrite(nxt), SettleWrite(sent,
        delivered={"b@example.net": SMTPReply(250, "ok")}, maybe_delivered=False)])
    print(sent, nxt, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
    """
)


def test_an_outcome_made_with_the_next_mark_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_A_GROUP, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    _sent, nxt = done.stdout.split()
    with Outbox(path) as box:
        assert [i.id for i in box.items()] == [nxt]
        assert box.get(nxt, raw=False).state is ItemState.MAYBE_DELIVERED


def test_a_run_records_each_outcome_with_the_next_in_flight_mark(
    smtp_server: Any, tmp_path: Path
) -> None:
    """Messages over one connection with an outbox: each copy's outcome is written in the
    same trip to the outbox's thread (and the same group) as the next copy's in-flight mark,
    not in a trip of its own: one write_group per message and no settle outside one (the old
    code made a to_thread(settle) per message besides). The outbox ends empty."""
    import asyncio
    import threading

    from e2email.config import SMTPSettings, TLSMode
    from e2email.delivery import DeliveryEngine, Submission

    server = smtp_server()
    assert server.ca_file is not None
    smtp = SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file,
        timeout=10,
    )  # fmt: skip
    box = Outbox(tmp_path / "o.sqlite3")
    n = 6
    raw = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nhi\r\n"
    ids = box.add(
        [
            NewItem(raw=raw, mail_from="a@example.org", recipients=("b@example.net",),
                    message_id=f"<{i}@x>")
            for i in range(n)
        ]
    )  # fmt: skip
    in_group = threading.local()
    groups: list[list[str]] = []
    alone: list[str] = []
    write_group, settle = box.write_group, box.settle

    def spy_group(ops: Any, **kw: Any) -> Any:
        groups.append([type(op).__name__ for op in ops])
        in_group.on = True
        try:
            return write_group(ops, **kw)
        finally:
            in_group.on = False

    def spy_settle(item_id: str, **kw: Any) -> bool:
        if not getattr(in_group, "on", False):
            alone.append(item_id)
        return settle(item_id, **kw)

    box.write_group = spy_group  # type: ignore[method-assign]
    box.settle = spy_settle  # type: ignore[method-assign]
    outcomes: list[Any] = []

    async def run() -> None:
        async with DeliveryEngine(smtp, outbox=box, on_outcome=outcomes.append) as engine:
            for item_id in ids:
                await engine.submit(
                    Submission(raw=raw, mail_from="a@example.org",
                               recipients=("b@example.net",), id=item_id)
                )  # fmt: skip

    asyncio.run(run())
    assert [o.status for o in outcomes] == ["delivered"] * n
    assert alone == []
    assert len(groups) <= n + 1
    assert sum(g.count("SettleWrite") for g in groups) == n
    assert sum(g.count("MarkWrite") for g in groups) == n
    assert len(box) == 0 and len(server.messages) == n
    box.close()
