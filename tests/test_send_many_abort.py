"""send_many and the delivery engine when a run is stopped part-way (review rev5-m): nothing
of an aborted run lands in the outbox after the run recorded its copies, nothing it stored
stays claimed, bad arguments are refused before anything is sent, and the input ends at its
first end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_send_many_pool import FAST, _Counting, _mailer, _message, _settings

from e2email import ConfigError, Mailer, Message, Protection
from e2email.delivery import DeliveryEngine, Submission
from e2email.outbox import ItemState, MarkWrite, NewItem, Outbox
from e2email.testing import Fault, MockProtector

RAW = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nhi\r\n"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_concurrency_is_refused_before_anything_is_sent(smtp_server: Any, bad: Any) -> None:
    server = smtp_server()
    m = _mailer(server, _Counting())
    with pytest.raises(ConfigError, match="concurrency"):
        asyncio.run(m.send_many([_message(i) for i in range(5)], concurrency=bad))
    assert server.messages == []


class _Tail:
    """A growing source (a log being appended to): StopIteration now, more items later."""

    def __init__(self) -> None:
        self.i = 0

    def __iter__(self) -> _Tail:
        return self

    def __next__(self) -> Message:
        self.i += 1
        if self.i in (4, 8, 12):
            raise StopIteration
        return _message(self.i)


def test_the_input_ends_at_its_first_end(smtp_server: Any) -> None:
    server = smtp_server()
    m = _mailer(server, _Counting())
    result = asyncio.run(m.send_many(_Tail(), concurrency=3))
    assert len(server.messages) == 3 and result.counts == {"delivered": 3}


def test_a_cancelled_run_writes_no_in_flight_mark_after_it_released_the_copies(
    smtp_server: Any, tmp_path: Path
) -> None:
    """Two connections; copy A's mark takes 0.3 s on the disk, copy B's waits behind it.
    Cancelled meanwhile, the loop living on: neither "." was sent, so neither copy may be
    left maybe-delivered by a mark written late."""
    server = smtp_server()
    box = Outbox(tmp_path / "o.sqlite3")
    new = [
        NewItem(
            raw=RAW,
            mail_from="a@example.org",
            recipients=("b@example.net",),
            message_id=f"<{i}@x>",
        )
        for i in range(2)
    ]
    a, b = box.add(new)
    write_group = box.write_group

    def slow(ops: Any, **kw: Any) -> Any:
        if any(isinstance(op, MarkWrite) for op in ops):
            time.sleep(0.3)
        return write_group(ops, **kw)

    box.write_group = slow  # type: ignore[method-assign]

    async def run() -> None:
        async def send() -> None:
            async with DeliveryEngine(_settings(server), outbox=box, connections=2) as engine:
                for i in (a, b):
                    sub = Submission(
                        raw=RAW, mail_from="a@example.org", recipients=("b@example.net",), id=i
                    )
                    await engine.submit(sub)

        task = asyncio.create_task(send())
        await asyncio.sleep(0.15)  # both marks asked for; A's being written
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.8)  # the loop lives on

    try:
        asyncio.run(run())
        assert server.messages == []
        states = {i: box.get(i, raw=False).state for i in (a, b)}
    finally:
        box.close()
    assert states == {a: ItemState.QUEUED, b: ItemState.QUEUED}


def test_items_an_aborted_batch_stored_are_sent_by_send_outbox_in_the_same_process(
    smtp_server: Any, tmp_path: Path
) -> None:
    """on_outcome raising aborts the batch while other tasks are storing their messages:
    nothing stored may stay claimed by this process (a service using the sync Mailer)."""
    server = smtp_server(offer_pipelining=True)

    def msg(i: int) -> Message:
        to = "mallory@example.com" if i == 6 else "bob@example.net"
        return Message(sender="alice@example.org", to=[to], subject=f"n{i}", text=f"body {i}")

    def report(outcome: Any) -> None:
        if outcome.status == "not-sent":
            raise RuntimeError("report file full")

    protector = MockProtector(refuse={"mallory@example.com": "revoked"})
    with Mailer(
        smtp=_settings(server),
        protector=protector,
        outbox=tmp_path / "o.sqlite3",
        protection=Protection(sign=True, encrypt=True),
        connections=2,
        retry=FAST,
    ) as m:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                m.send_many([msg(i) for i in range(40)], concurrency=3, on_outcome=report)
            m.send_outbox()
            assert m.outbox is not None
            assert {i.id: i.state.value for i in m.outbox.items()} == {}


def test_a_batch_whose_input_fails_leaves_every_stored_item_sendable(
    smtp_server: Any, tmp_path: Path
) -> None:
    server = smtp_server(offer_pipelining=True)

    def source() -> Iterator[Message]:
        for i in range(30):
            yield _message(i)
        raise ValueError("row 31 is broken")

    with Mailer(
        smtp=_settings(server),
        protector=_Counting(),
        outbox=tmp_path / "o.sqlite3",
        protection=Protection(sign=True, encrypt=True),
        connections=1,
        retry=FAST,
    ) as m:
        with pytest.raises(ValueError):
            m.send_many(source(), concurrency=4)
        m.send_outbox()
        assert m.outbox is not None and len(m.outbox) == 0


def test_an_outcome_callback_failing_for_an_unsent_message_stops_the_batch_gracefully(
    smtp_server: Any, tmp_path: Path
) -> None:
    """on_outcome fails on a not-sent outcome (reported by the protecting side): the batch
    stops as when it fails for a copy the engine sent: the transactions under way end (none
    is cut off after its end of data, so none is left maybe-delivered), the error is raised."""
    # The first messages' final replies a little late: when message 6 is refused, other
    # copies are past their end of data, waiting for theirs.
    server = smtp_server(
        offer_pipelining=True, faults=[Fault("data-end", "stall", seconds=0.05, times=12)]
    )

    def msg(i: int) -> Message:
        to = "mallory@example.com" if i == 6 else "bob@example.net"
        return Message(sender="alice@example.org", to=[to], subject=f"n{i}", text=f"body {i}")

    reported: list[tuple[int, str]] = []

    def report(outcome: Any) -> None:
        reported.append((outcome.index, outcome.status))
        if outcome.status == "not-sent":
            raise RuntimeError("report file full")

    m = _mailer_with_outbox(server, tmp_path)
    for _ in range(2):
        reported.clear()
        with pytest.raises(RuntimeError, match="report file full"):
            asyncio.run(m.send_many([msg(i) for i in range(40)], concurrency=3, on_outcome=report))
        # Every message handed over before the failure got its outcome (the run drained,
        # it was not cut off): message 0 at least was under way.
        assert (6, "not-sent") in reported
        assert {i for i, status in reported if status != "not-sent"} >= {0}
        assert m.outbox is not None
        states = {i.state for i in m.outbox.items()}
        assert ItemState.MAYBE_DELIVERED not in states and ItemState.SENDING not in states
        asyncio.run(m.send_outbox())
        assert len(m.outbox) == 0
    m.close()


def _mailer_with_outbox(server: Any, tmp_path: Path) -> Any:
    from e2email import AsyncMailer

    return AsyncMailer(
        smtp=_settings(server),
        protector=MockProtector(refuse={"mallory@example.com": "revoked"}),
        protection=Protection(sign=True, encrypt=True),
        connections=2,
        retry=FAST,
        outbox=tmp_path / "o.sqlite3",
    )
