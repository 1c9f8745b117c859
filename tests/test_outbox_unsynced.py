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
