"""send_many's protections: a fixed set of tasks, each protecting message after message (one
task per protection in flight, not one per message), with what the batch promised before:
input read lazily and in order, at most ``concurrency`` protections at once and the first
alone, each message its input index, duplicates in input order, an input that fails stops
the batch with its error and leaves nothing running. MockProtector: no crypto under test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2email import AsyncMailer, Message, Protection, SMTPSettings, TLSMode
from e2email.client import BatchItem
from e2email.config import RetryPolicy
from e2email.crypto.base import ProtectedCopy
from e2email.errors import AuthenticationError
from e2email.testing import LoopbackSMTPServer, MockProtector

FAST = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, jitter=0)


def _settings(server: LoopbackSMTPServer, **extra: Any) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file,
        timeout=10, **extra,
    )  # fmt: skip


def _message(i: int) -> Message:
    return Message(
        sender="alice@example.org", to=["bob@example.net"], subject=f"n{i}", text=f"body {i}"
    )


class _Counting(MockProtector):
    """Takes a few event-loop turns per message and keeps the most protections seen at once,
    and how many were under way when each started."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.most = 0
        self.started_with: list[int] = []

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        self.started_with.append(self.now)
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            return await super().protect(message, protection, passphrase=passphrase)
        finally:
            self.now -= 1


def _mailer(server: LoopbackSMTPServer, protector: MockProtector, **smtp: Any) -> AsyncMailer:
    return AsyncMailer(
        smtp=_settings(server, **smtp),
        protector=protector,
        protection=Protection(sign=True, encrypt=True),
        connections=1,
        retry=FAST,
    )


@pytest.mark.parametrize("concurrency", [1, 3])
def test_at_most_concurrency_protections_and_the_first_alone_input_read_lazily(
    smtp_server: Any, concurrency: int
) -> None:
    server = smtp_server(offer_pipelining=True)
    protector = _Counting()
    m = _mailer(server, protector)
    n = 12
    read: list[int] = []
    ahead: list[int] = []

    def source() -> Iterator[Message]:
        for i in range(n):
            # Read only when a protection is free: never more than that ahead of them.
            ahead.append(i - len(protector.started_with))
            read.append(i)
            yield _message(i)

    result = asyncio.run(m.send_many(source(), concurrency=concurrency))
    assert result.counts == {"delivered": n}
    assert sorted(o.index for o in result.outcomes) == list(range(n))
    assert [o.message_id for o in sorted(result.outcomes, key=lambda o: o.index)] == [
        msg.message_id for msg in protector.messages
    ]
    assert protector.started_with[0] == 0 and protector.most == concurrency
    assert max(ahead) == 0  # each item read just before its protection starts
    assert len(server.messages) == n and server.connections == 1


def test_indexes_and_duplicates_follow_the_input_order_from_an_async_iterable(
    smtp_server: Any,
) -> None:
    server = smtp_server(offer_pipelining=True)
    m = _mailer(server, _Counting())
    keys = ["a", "b", "a", "c", "b", "d", "e", "a"]

    async def source() -> AsyncIterator[BatchItem]:
        for i, key in enumerate(keys):
            await asyncio.sleep(0)
            yield BatchItem(message=_message(i), key=key, tag=f"row{i}")

    result = asyncio.run(m.send_many(source(), concurrency=3))
    by_index = {o.index: o for o in result.outcomes}
    assert sorted(by_index) == list(range(len(keys)))
    assert [by_index[i].status for i in range(len(keys))] == [
        "delivered", "delivered", "duplicate", "delivered", "duplicate", "delivered",
        "delivered", "duplicate",
    ]  # fmt: skip
    assert [by_index[i].duplicate_of for i in (2, 4, 7)] == ["row0", "row1", "row0"]
    assert all(by_index[i].tag == f"row{i}" for i in range(len(keys)))
    assert len(server.messages) == 5


def test_an_input_that_fails_stops_the_batch_with_its_error_and_leaves_nothing_running(
    smtp_server: Any,
) -> None:
    server = smtp_server(offer_pipelining=True)
    m = _mailer(server, _Counting())

    def source() -> Iterator[Message]:
        for i in range(4):
            yield _message(i)
        raise ValueError("row 5 is broken")

    async def run() -> list[asyncio.Task[Any]]:
        with pytest.raises(ValueError, match="row 5 is broken"):
            await m.send_many(source(), concurrency=2)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(run()) == []


def test_a_stopped_batch_reads_no_more_of_its_input(smtp_server: Any) -> None:
    """Refused credentials stop the run: the input is not read to its end (a batch of any
    length stops at once), and what was started is recorded."""
    server = smtp_server(credentials={"alice": "right"})
    m = _mailer(server, _Counting(), username="alice", password="wrong")
    read: list[int] = []

    def source() -> Iterator[Message]:
        for i in range(1000):
            read.append(i)
            yield _message(i)

    with pytest.raises(AuthenticationError) as info:
        asyncio.run(m.send_many(source(), concurrency=2))
    assert len(read) < 10
    assert info.value.result is not None and server.messages == []


def test_one_task_per_protection_in_flight_not_one_per_message(smtp_server: Any) -> None:
    """The protections run in ``concurrency`` tasks for the whole batch: the tasks the
    batch makes do not grow with its length (the old code made one per message, each a
    task start, a semaphore hand-off and a wake-up of the reading loop)."""
    server = smtp_server(offer_pipelining=True)
    m = _mailer(server, _Counting())
    counts: dict[int, int] = {}

    async def run(n: int) -> None:
        loop = asyncio.get_running_loop()
        made = 0

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            nonlocal made
            made += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        await m.send_many([_message(i) for i in range(n)], concurrency=2)
        counts[n] = made

    for n in (4, 24):
        asyncio.run(run(n))
    assert counts[24] == counts[4]


def test_the_sync_facade_still_sends_a_batch(smtp_server: Any, tmp_path: Path) -> None:
    from e2email import Mailer

    server = smtp_server()
    with Mailer(
        smtp=_settings(server), protector=MockProtector(), outbox=tmp_path / "o.sqlite3"
    ) as m:
        result = m.send_many([_message(i) for i in range(5)])
    assert result.counts == {"delivered": 5} and len(server.messages) == 5
