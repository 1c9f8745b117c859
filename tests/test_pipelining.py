"""SMTP PIPELINING (RFC 2920): with a server that offers it, MAIL, every RCPT and DATA go in
one write and their replies are read after, in order; refusals, drops and the outbox's marks
come out as without it. Raw submissions (no crypto): only the SMTP exchange is under test.
(tests/test_reuse.py runs its connection-reuse tests against both kinds of server.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from e2email import SMTPSettings, TLSMode
from e2email.config import RetryPolicy
from e2email.delivery import DeliveryEngine, Submission, deliver
from e2email.errors import ConnectError, DeliveryError, E2EmailError, RecipientsRefusedError
from e2email.outbox import ItemState, NewItem, Outbox
from e2email.outcome import CopyOutcome
from e2email.testing import Fault, LoopbackSMTPServer, TestCA, _RecordingSMTP
from e2email.transport.smtp import SMTPConnection, SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0)
SENDER = "a@example.org"
BOB = "bob@example.net"
CAROL = "carol@example.com"


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=10
    )


def _raw(i: int) -> bytes:
    return f"From: {SENDER}\r\nSubject: n{i}\r\n\r\nbody {i}\r\n.dot line\r\n".encode()


def _subs(n: int, *, to: Sequence[str] = (BOB,)) -> list[Submission]:
    return [Submission(raw=_raw(i), mail_from=SENDER, recipients=tuple(to)) for i in range(n)]


def _send(server: LoopbackSMTPServer, subs: list[Submission]) -> list[CopyOutcome]:
    outcomes, fatal = asyncio.run(deliver(_settings(server), subs, retry=FAST, connections=1))
    assert fatal is None
    return sorted(outcomes, key=lambda o: subs.index(o.submission))


def _chunks(server: LoopbackSMTPServer) -> list[bytes]:
    """What the client wrote, as the server read it (one entry per read)."""
    return [data for _, data in server.transcript]


Steps = Callable[[SMTPConnection], list[Coroutine[Any, Any, None]]]


def _on_one_connection(server: LoopbackSMTPServer, steps: Steps) -> None:
    """Run ``steps(conn)`` one after the other over one connection (which pipelines)."""

    async def main() -> None:
        async with SMTPTransport(_settings(server)).connect() as conn:
            assert conn.pipelining
            for step in steps(conn):
                await step

    asyncio.run(main())


def test_the_envelope_goes_in_one_write_when_offered(smtp_server: ServerFactory) -> None:
    """Three messages to two recipients over one connection: each MAIL, its two RCPTs and
    DATA reach the server in one read (one round trip instead of four); the messages arrive
    as sent, dot-stuffing included."""
    server = smtp_server(offer_pipelining=True)
    outcomes = _send(server, _subs(3, to=(BOB, CAROL)))
    assert [o.status for o in outcomes] == ["delivered"] * 3
    groups = [c for c in _chunks(server) if c.startswith(b"MAIL FROM:")]
    assert groups == [
        f"MAIL FROM:<{SENDER}> SIZE={len(_raw(i))}\r\nRCPT TO:<{BOB}>\r\nRCPT TO:<{CAROL}>\r\n"
        "DATA\r\n".encode()
        for i in range(3)
    ]
    assert server.received_commands() == ["EHLO", *["MAIL", "RCPT", "RCPT", "DATA"] * 3, "QUIT"]
    assert [m.data for m in server.messages] == [_raw(i) for i in range(3)]
    assert server.connections == 1


def test_without_the_offer_each_command_waits_for_its_reply(smtp_server: ServerFactory) -> None:
    """A server that does not offer PIPELINING gets one command per write, as before."""
    server = smtp_server()
    assert [o.status for o in _send(server, _subs(2))] == ["delivered"] * 2
    mails = [c for c in _chunks(server) if c.startswith(b"MAIL FROM:")]
    assert len(mails) == 2 and all(b"RCPT" not in c and b"DATA" not in c for c in mails)


def test_a_partial_rcpt_refusal_is_reported_per_recipient(smtp_server: ServerFactory) -> None:
    """One of two recipients refused (5xx) inside the group: the copy goes to the other, the
    refusal is kept with its reply, and the next message follows on the same connection."""
    server = smtp_server(
        offer_pipelining=True, refuse_recipients={CAROL: (550, "5.1.1 no such user")}
    )
    outcomes = _send(server, _subs(2, to=(BOB, CAROL)))
    assert [o.status for o in outcomes] == ["partial", "partial"]
    first = outcomes[0]
    assert first.delivered == (BOB,) and first.failed == (CAROL,)
    (refused,) = [r for r in first.recipients if r.address == CAROL]
    assert refused.reply is not None and refused.reply.code == 550
    assert [m.rcpt_tos for m in server.messages] == [(BOB,), (BOB,)]
    assert server.connections == 1


def test_every_rcpt_refused_reads_the_data_reply_then_resets(smtp_server: ServerFactory) -> None:
    """Every recipient refused: DATA (in the group) is answered 503 and no message content
    is sent; RSET, and the connection still carries the next message."""
    server = smtp_server(
        offer_pipelining=True, refuse_recipients={CAROL: (550, "5.1.1 no such user")}
    )

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def refused() -> None:
            result = await conn.send(_raw(0), mail_from=SENDER, recipients=[CAROL])
            assert isinstance(result.error, RecipientsRefusedError)
            assert result.error.refused[CAROL].code == 550
            assert [(r.address, r.status) for r in result.recipients] == [(CAROL, "failed")]
            assert conn.stage == "RCPT" and not conn.end_of_data_sent

        async def fine() -> None:
            result = await conn.send(_raw(1), mail_from=SENDER, recipients=[BOB])
            assert result.accepted == (BOB,)

        return [refused(), fine()]

    _on_one_connection(server, steps)
    assert server.received_commands() == [
        "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    assert [m.data for m in server.messages] == [_raw(1)]
    assert b"body 0" not in b"".join(_chunks(server))


@pytest.mark.parametrize(
    ("fault", "stage", "code"),
    [
        (Fault("mail", "reply", 550, "5.7.1 sender refused"), "MAIL", 550),
        (Fault("data", "reply", 451, "4.3.0 try later"), "DATA", 451),
        (Fault("data-end", "reply", 554, "5.6.0 no thanks"), "DATA", 554),
    ],
    ids=["mail", "data", "data-end"],
)
def test_a_refused_transaction_leaves_the_session_in_step(
    smtp_server: ServerFactory, fault: Fault, stage: str, code: int
) -> None:
    """A refusal of the sender, of DATA or of the message: an outcome whose error is a
    DeliveryError with the server's reply, nothing delivered, then RSET; the next message on
    the same connection is paired with its own replies and delivered."""
    server = smtp_server(offer_pipelining=True, faults=[fault])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def refused() -> None:
            result = await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            error = result.error
            assert isinstance(error, DeliveryError)
            assert not isinstance(error, RecipientsRefusedError)
            assert error.reply is not None and error.reply.code == code
            assert conn.stage == stage and conn.is_connected and not error.maybe_delivered
            (bob,) = result.recipients
            assert bob.status == ("deferred" if code < 500 else "failed")
            assert bob.reply == error.reply and result.accepted == ()

        async def fine() -> None:
            result = await conn.send(_raw(1), mail_from=SENDER, recipients=[BOB])
            assert result.data_reply is not None and result.data_reply.code == 250

        return [refused(), fine(), fine()]

    _on_one_connection(server, steps)
    assert [m.data for m in server.messages] == [_raw(1), _raw(1)]
    verbs = server.received_commands()
    assert verbs.count("RSET") == 1 and verbs.count("MAIL") == 3
    assert server.connections == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_a_drop_in_the_middle_of_the_group_is_retried(
    smtp_server: ServerFactory, stage: str
) -> None:
    """The server hangs up while answering the group (at MAIL or at RCPT): nothing of the
    message was sent, so it is retried over a new connection and delivered once."""
    fault = Fault(stage, "drop")  # type: ignore[arg-type]
    server = smtp_server(offer_pipelining=True, faults=[fault])
    (outcome,) = _send(server, _subs(1))
    assert outcome.status == "delivered" and outcome.attempts == 2
    assert [m.data for m in server.messages] == [_raw(0)]
    assert server.connections == 2


def test_a_drop_in_the_group_is_a_connect_error_before_the_end(
    smtp_server: ServerFactory,
) -> None:
    """On the connection itself: a drop at RCPT is a ConnectError naming the stage, with
    nothing of the message sent and ``maybe_delivered`` false."""
    server = smtp_server(offer_pipelining=True, faults=[Fault("rcpt", "drop")])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def dropped() -> None:
            with pytest.raises(ConnectError) as info:
                await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            assert "lost at RCPT" in str(info.value)
            assert not info.value.maybe_delivered and not conn.end_of_data_sent
            assert not conn.is_connected

        return [dropped()]

    _on_one_connection(server, steps)
    assert b"body 0" not in b"".join(_chunks(server)) and server.messages == []


def test_a_421_to_rcpt_closes_the_session(smtp_server: ServerFactory) -> None:
    """421 to a RCPT inside the group: the server is closing (RFC 5321 §3.8); the send fails
    at RCPT with that reply and the session is not used again (its other replies are
    unread)."""
    server = smtp_server(offer_pipelining=True, faults=[Fault("rcpt", "reply", 421, "4.3.2 bye")])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def closing() -> None:
            with pytest.raises(DeliveryError) as info:
                await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB, CAROL])
            assert info.value.reply is not None and info.value.reply.code == 421
            assert conn.stage == "RCPT" and not conn.is_connected

        return [closing()]

    _on_one_connection(server, steps)
    assert server.messages == []


def _outbox_run(
    server: LoopbackSMTPServer, box: Outbox, to: Sequence[str]
) -> tuple[list[CopyOutcome], tuple[str, ...]]:
    """Copy ``i`` to ``to[i]``, stored in ``box`` and delivered with it."""
    ids = box.add(
        [
            NewItem(raw=_raw(i), mail_from=SENDER, recipients=(r,), message_id=f"<m{i}@x>")
            for i, r in enumerate(to)
        ]
    )
    outcomes: list[CopyOutcome] = []

    async def run() -> None:
        engine = DeliveryEngine(
            _settings(server), outbox=box, on_outcome=outcomes.append, retry=FAST
        )
        async with engine:
            for i, item_id in enumerate(ids):
                await engine.submit(
                    Submission(raw=_raw(i), mail_from=SENDER, recipients=(to[i],), id=item_id)
                )

    asyncio.run(asyncio.wait_for(run(), 20))
    return outcomes, ids


def test_outbox_states_with_pipelining(smtp_server: ServerFactory, tmp_path: Path) -> None:
    """With the outbox: a reply lost after the final "." leaves that copy maybe-delivered
    (marked in flight before the "."), a drop inside a later copy's group (at its RCPT) has
    it retried and delivered; the delivered copies leave the outbox."""
    server = smtp_server(
        offer_pipelining=True,
        faults=[Fault("data-end", "accept-drop"), Fault("rcpt", "drop", address=CAROL)],
    )
    box = Outbox(tmp_path / "o.sqlite3")
    outcomes, ids = _outbox_run(server, box, [BOB, BOB, CAROL])
    by_id = {o.submission.id: o for o in outcomes}
    assert by_id[ids[0]].status == "maybe-delivered"
    assert [by_id[i].status for i in ids[1:]] == ["delivered", "delivered"]
    assert by_id[ids[2]].attempts == 2 and server.faults_fired[1].stage == "rcpt"
    (left,) = box.items()
    assert left.id == ids[0] and left.state is ItemState.MAYBE_DELIVERED
    assert sorted(m.data for m in server.messages) == sorted(_raw(i) for i in range(3))


def test_a_cancel_as_the_replies_arrive_stops_before_the_message(
    smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the very loop turn in which the group's replies arrive: the send stops
    there (CancelledError, never swallowed), the session is closed (its replies are out of
    step) and nothing of the message is sent."""
    from e2email.transport import smtp

    server = smtp_server(offer_pipelining=True)
    real = smtp._Replies.data_received
    victim: list[asyncio.Task[Any]] = []

    def data_received(self: smtp._Replies, data: bytes) -> None:
        real(self, data)
        if victim:
            victim.pop().cancel()

    async def run() -> None:
        async with SMTPTransport(_settings(server)).connect() as conn:
            monkeypatch.setattr(smtp._Replies, "data_received", data_received)
            task = asyncio.create_task(conn.send(_raw(0), mail_from=SENDER, recipients=[BOB]))
            victim.append(task)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not conn.is_connected and not conn.end_of_data_sent

    asyncio.run(run())
    assert server.messages == [] and b"body 0" not in b"".join(_chunks(server))


@pytest.mark.parametrize("with_outbox", [False, True], ids=["no-outbox", "outbox"])
def test_the_end_of_data_rides_with_the_last_piece_unless_a_mark_comes_between(
    smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_outbox: bool
) -> None:
    """Without an outbox nothing waits between the message and its final ".": both go in one
    write (one TLS record, one send). With one, the in-flight mark comes between, so the "."
    is a write of its own after it. Per message: the group, then the data (and the ".")."""
    import aiosmtplib.protocol

    writes: list[bytes] = []
    real = aiosmtplib.protocol.SMTPProtocol.write

    def write(self: aiosmtplib.protocol.SMTPProtocol, data: bytes) -> None:
        writes.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(aiosmtplib.protocol.SMTPProtocol, "write", write)
    server = smtp_server(offer_pipelining=True)
    if with_outbox:
        outcomes, _ = _outbox_run(server, Outbox(tmp_path / "o.sqlite3"), [BOB, BOB])
    else:
        outcomes = _send(server, _subs(2))
    assert [o.status for o in outcomes] == ["delivered"] * 2
    sent = [w for w in writes if w.startswith((b"MAIL", b"From:", b"."))]
    stuffed = [_raw(i).replace(b"\r\n.dot", b"\r\n..dot") for i in range(2)]
    if with_outbox:
        assert sent[1:] == [stuffed[0], b".\r\n", sent[3], stuffed[1], b".\r\n"]
    else:
        assert sent[1:] == [stuffed[0] + b".\r\n", sent[2], stuffed[1] + b".\r\n"]
    assert sent[0].startswith(b"MAIL FROM:") and sent[0].endswith(b"DATA\r\n")


class _Says354ToAnyone(LoopbackSMTPServer):
    """A server that answers DATA with 354 even when no recipient was accepted (RFC 2920
    §3.1 warns of such servers); it records the line that then ends the data."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.ended_with: list[bytes] = []
        owner = self

        class _Protocol(_RecordingSMTP):
            async def smtp_DATA(self, arg: str) -> None:
                assert self.envelope is not None
                if self.envelope.rcpt_tos:
                    await super().smtp_DATA(arg)
                    return
                await self.push("354 go ahead")
                owner.ended_with.append(await self._reader.readuntil(b"\r\n"))
                await self.push("554 5.5.1 no valid recipients")
                self.envelope = self._create_envelope()

        self._protocol_class = _Protocol


def test_a_354_with_no_recipient_accepted_is_ended_with_a_lone_dot(module_ca: TestCA) -> None:
    """RFC 2920 §3.1: every RCPT refused but DATA answered 354: the client ends that empty
    message at once with a lone ".", reports the refusals, resets, and the connection carries
    the next message."""
    with _Says354ToAnyone(
        ca=module_ca, offer_pipelining=True, refuse_recipients={CAROL: (550, "5.1.1 no")}
    ) as server:

        def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
            async def refused() -> None:
                result = await conn.send(_raw(0), mail_from=SENDER, recipients=[CAROL])
                assert isinstance(result.error, RecipientsRefusedError)
                assert result.error.refused[CAROL].code == 550

            async def fine() -> None:
                await conn.send(_raw(1), mail_from=SENDER, recipients=[BOB])

            return [refused(), fine()]

        _on_one_connection(server, steps)
        assert server.ended_with == [b".\r\n"]
        assert [m.data for m in server.messages] == [_raw(1)]
        assert server.received_commands()[-5:] == ["RSET", "MAIL", "RCPT", "DATA", "QUIT"]
        assert b"body 0" not in b"".join(_chunks(server))


class _Inner:
    """Stands in for aiosmtplib's protocol behind :class:`_Replies`."""

    def __init__(self) -> None:
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def test_the_reply_reader_keeps_every_reply_however_the_packets_fall() -> None:
    """Replies split across packets, several in one packet, multi-line replies: each comes
    out whole and in order; a malformed line or the connection's loss ends the reading with
    aiosmtplib's exception, and the loss still reaches aiosmtplib's protocol."""
    import aiosmtplib

    from e2email.transport.smtp import _Replies

    async def run() -> None:
        inner = _Inner()
        replies = _Replies(inner)  # type: ignore[arg-type]
        replies.data_received(b"250-first li")
        assert replies.ready() is None
        replies.data_received(b"ne\r\n250 second line\r\n250 2.1.5 OK\r\n35")
        replies.data_received(b"4 go ahead\r\n")
        got = [await replies.read() for _ in range(3)]
        assert [(r.code, r.message) for r in got] == [
            (250, "first line\nsecond line"),
            (250, "2.1.5 OK"),
            (354, "go ahead"),
        ]
        waiting = asyncio.ensure_future(replies.read())
        await asyncio.sleep(0)
        lost = ConnectionResetError("reset")
        replies.connection_lost(lost)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await waiting
        assert inner.lost == [lost]

        bad = _Replies(_Inner())  # type: ignore[arg-type]
        bad.data_received(b"250 fine\r\nHELLO there\r\n")
        assert (await bad.read()).code == 250
        with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
            await bad.read()

    asyncio.run(run())


def test_pipelining_after_starttls_and_auth_with_requiretls(smtp_server: ServerFactory) -> None:
    """Over STARTTLS (the transport replaced by the upgrade) with AUTH: the group goes in one
    write inside TLS, MAIL carries SIZE and REQUIRETLS (RFC 8689), and nothing of it is seen
    in the clear."""
    server = smtp_server(
        tls="starttls",
        credentials={"alice": "s3cret"},
        offer_pipelining=True,
        offer_requiretls=True,
    )
    assert server.ca_file is not None
    settings = SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.STARTTLS,
        ca_file=server.ca_file,
        username="alice",
        password="s3cret",
        timeout=10,
    )

    async def run() -> None:
        async with SMTPTransport(settings).connect() as conn:
            assert conn.pipelining
            for i in range(2):
                await conn.send(_raw(i), mail_from=SENDER, recipients=[BOB], require_tls=True)

    asyncio.run(run())
    assert [m.data for m in server.messages] == [_raw(0), _raw(1)]
    assert all(m.requiretls and m.auth_user == "alice" for m in server.messages)
    groups = [data for tls, data in server.transcript if data.startswith(b"MAIL FROM:")]
    assert groups == [
        f"MAIL FROM:<{SENDER}> SIZE={len(_raw(i))} REQUIRETLS\r\nRCPT TO:<{BOB}>\r\n"
        "DATA\r\n".encode()
        for i in range(2)
    ]
    assert all(tls for tls, data in server.transcript if data.startswith(b"MAIL FROM:"))
    assert b"MAIL" not in server.cleartext()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
def test_a_refused_transaction_keeps_each_recipients_own_answer(
    smtp_server: ServerFactory, pipelining: bool
) -> None:
    """DATA refused for now (451) after Carol was refused for good (550) at RCPT: the
    transport's outcome keeps Carol's 550 (failed) and gives Bob the 451 (deferred); the
    engine retries Bob only (one RCPT for Carol in all; before, the whole transaction's 451
    was applied to both and Carol was asked again), and Bob is delivered."""
    server = smtp_server(
        offer_pipelining=pipelining,
        refuse_recipients={CAROL: (550, "5.1.1 no such user")},
        faults=[Fault("data", "reply", 451, "4.3.0 try later")],
    )
    (outcome,) = _send(server, _subs(1, to=(BOB, CAROL)))
    assert outcome.delivered == (BOB,) and outcome.failed == (CAROL,)
    (carol,) = [r for r in outcome.recipients if r.address == CAROL]
    assert carol.reply is not None and carol.reply.code == 550
    assert outcome.attempts == 2
    rcpts = [line for _, line in server.transcript if b"RCPT TO:<" + CAROL.encode() in line]
    assert len(rcpts) == 1, rcpts
    assert [m.rcpt_tos for m in server.messages] == [(BOB,)]


# -- servers out of step: a scripted TLS server answers exactly the bytes each test gives it --

_RAW = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


class _Scripted:
    """A TLS SMTP server whose ``on(verb, n)`` gives the bytes to write for the n-th (0-based)
    command ``verb``, or for the n-th end of data (verb ``"END"``); ``None``: the normal
    answer. It records every command line (and ``<end of data>``) and counts whole messages."""

    def __init__(self, pipelining: bool, on: Callable[[str, int], list[bytes] | None]) -> None:
        self.pipelining, self.on = pipelining, on
        self.seen: list[bytes] = []
        self.stored = 0
        self.counts: dict[str, int] = {}

    def _answer(self, verb: str, normal: bytes) -> list[bytes]:
        n = self.counts.get(verb, 0)
        self.counts[verb] = n + 1
        special = self.on(verb, n)
        return special if special is not None else [normal]

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def send(chunks: list[bytes]) -> None:
            for c in chunks:
                w.write(c)
                await w.drain()

        try:
            await send([b"220 hi\r\n"])
            while line := await r.readline():
                verb = line[:4].upper().decode()
                self.seen.append(line)
                if verb == "EHLO":
                    ext = b"250-PIPELINING\r\n" if self.pipelining else b""
                    await send([b"250-x\r\n" + ext + b"250 SIZE 1000000\r\n"])
                elif verb == "QUIT":
                    await send([b"221 bye\r\n"])
                    return
                elif verb == "DATA":
                    out = self._answer("DATA", b"354 go\r\n")
                    await send(out)
                    if not out[0].startswith(b"354"):
                        continue
                    body = b""
                    while (body := await r.readline()) not in (b".\r\n", b""):
                        pass
                    if body != b".\r\n":
                        return
                    self.stored += 1
                    self.seen.append(b"<end of data>")
                    await send(self._answer("END", b"250 queued\r\n"))
                else:
                    await send(self._answer(verb, b"250 ok\r\n"))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()


def _scripted_run(
    ca: TestCA,
    script: _Scripted | _FirstOnly,
    body: Callable[[SMTPSettings], Coroutine[Any, Any, Any]],
) -> Any:
    async def run() -> Any:
        srv = await asyncio.start_server(
            script.handle, "127.0.0.1", 0, ssl=ca.server_context("127.0.0.1")
        )
        port = srv.sockets[0].getsockname()[1]
        settings = SMTPSettings(
            host="127.0.0.1", port=port, tls=TLSMode.IMPLICIT, ca_file=ca.ca_file, timeout=10
        )
        try:
            return await body(settings)
        finally:
            srv.close()

    return asyncio.run(run())


def _one_send(ca: TestCA, script: _Scripted) -> tuple[CopyOutcome | E2EmailError, bool]:
    """One send over one connection: its outcome (or error) and whether the session is up."""

    async def body(settings: SMTPSettings) -> tuple[CopyOutcome | E2EmailError, bool]:
        async with SMTPTransport(settings).connect() as conn:
            try:
                result: CopyOutcome | E2EmailError = await conn.send(
                    _RAW, mail_from=SENDER, recipients=[BOB]
                )
            except E2EmailError as exc:
                result = exc
            return result, conn.is_connected

    result: tuple[CopyOutcome | E2EmailError, bool] = _scripted_run(ca, script, body)
    return result


_BOTH = pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])


@_BOTH
def test_an_unreadable_reply_to_the_final_dot_is_maybe_delivered(
    module_ca: TestCA, pipelining: bool
) -> None:
    """The server stored the message; its reply to "." cannot be parsed. That is "may or may
    not have accepted" (RFC 5321 §6.1), not a refusal, and the session is out of step: closed."""
    script = _Scripted(pipelining, lambda v, n: [b"OK queued as 1\r\n"] if v == "END" else None)
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, ConnectError), result
    assert result.maybe_delivered and result.transient
    assert "unreadable reply" in str(result) and "may or may not" in str(result)
    assert not connected
    assert script.stored == 1


@_BOTH
def test_one_unreadable_reply_does_not_fail_the_rest_of_the_batch(
    module_ca: TestCA, pipelining: bool
) -> None:
    """A garbled reply to the first copy's RCPT: a transient error for that copy (retried, and
    delivered), and a new connection for the rest, which are delivered too (the bad line used
    to stay in aiosmtplib's buffer and fail every later copy for good)."""
    script = _Scripted(pipelining, lambda v, n: [b"hello\r\n"] if (v, n) == ("RCPT", 0) else None)
    subs = [Submission(raw=_RAW, mail_from=SENDER, recipients=(BOB,)) for _ in range(3)]

    async def body(settings: SMTPSettings) -> list[CopyOutcome]:
        outcomes, fatal = await deliver(settings, subs, retry=FAST, connections=1)
        assert fatal is None
        return sorted(outcomes, key=lambda o: subs.index(o.submission))

    outcomes = _scripted_run(module_ca, script, body)
    assert [o.status for o in outcomes] == ["delivered"] * 3
    assert script.stored == 3


def test_a_reset_that_fails_closes_the_session(module_ca: TestCA) -> None:
    """Every recipient refused, and the RSET after it answered with a line that cannot be
    parsed: the session is in no known state, so it is closed, not reused."""
    script = _Scripted(
        False,
        lambda v, n: {"RCPT": [b"550 5.1.1 no\r\n"], "RSET": [b"what?\r\n"]}.get(v),
    )
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, CopyOutcome)
    assert isinstance(result.error, RecipientsRefusedError)
    assert b"RSET\r\n" in script.seen
    assert not connected


@pytest.mark.parametrize("verb", ["DATA", "END"])
@_BOTH
def test_a_421_closes_the_session_without_rset(
    module_ca: TestCA, pipelining: bool, verb: str
) -> None:
    """421 (RFC 5321 §3.8: the server is closing) to DATA or to the final ".", the server slow
    to hang up: the client closes at once, sends no RSET, raises (nothing delivered)."""
    script = _Scripted(
        pipelining, lambda v, n: [b"421 4.3.2 closing\r\n"] if (v, n) == (verb, 0) else None
    )
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, DeliveryError), result
    assert result.reply is not None and result.reply.code == 421
    assert not result.maybe_delivered
    assert not connected
    assert b"RSET\r\n" not in script.seen


def test_a_reply_already_there_before_the_end_of_data_is_not_its_answer(
    module_ca: TestCA,
) -> None:
    """Pipelined: "354" and a stray "250" in one packet, and the real answer to "." a 554. The
    stray reply was there before the "." was written, so it is not the answer: the "." is not
    sent, the session is closed, and the error (nothing delivered) lets the copy be retried."""
    script = _Scripted(
        True,
        lambda v, n: {
            "DATA": [b"354 go\r\n250 2.0.0 stray\r\n"],
            "END": [b"554 5.7.1 rejected\r\n"],
        }.get(v),
    )
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, ConnectError), result
    assert not result.maybe_delivered and result.transient
    assert "out of step" in str(result)
    assert not connected
    assert script.stored == 0


def test_replies_after_the_final_one_close_the_session(module_ca: TestCA) -> None:
    """Pipelined: the answer to "." comes with a second, unasked-for reply. The answer stands
    (delivered), but the session is out of step and is not used again."""
    script = _Scripted(
        True, lambda v, n: [b"250 queued\r\n250 and again\r\n"] if v == "END" else None
    )
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, CopyOutcome), result
    assert result.accepted == (BOB,)
    assert not connected


def test_more_replies_than_commands_end_the_group(module_ca: TestCA) -> None:
    """Pipelined: a server that answers one RCPT with many replies (more than the group has
    commands) is out of step: not queued without end, but a transient error, session closed."""
    script = _Scripted(True, lambda v, n: [b"250 ok\r\n" * 8] if v == "RCPT" else None)
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, ConnectError), result
    assert result.transient and not result.maybe_delivered
    assert "more replies" in str(result)
    assert not connected
    assert script.stored == 0


def test_a_354_after_a_refused_sender_closes_the_session(module_ca: TestCA) -> None:
    """Pipelined: MAIL refused, yet RCPT and DATA accepted (354). Only when no recipient was
    accepted does RFC 2920 §3.1 have the client end that message with a lone "."; a server
    this confused gets nothing more: the session is closed, the sender's refusal reported."""
    script = _Scripted(True, lambda v, n: [b"550 5.7.1 not you\r\n"] if v == "MAIL" else None)
    result, connected = _one_send(module_ca, script)
    assert isinstance(result, CopyOutcome), result
    assert isinstance(result.error, DeliveryError)
    assert result.error.reply is not None and result.error.reply.code == 550
    assert [r.status for r in result.recipients] == ["failed"]
    assert not connected
    assert b"<end of data>" not in script.seen and b"RSET\r\n" not in script.seen


class _FirstOnly:
    """Offers PIPELINING, but answers only the first command of each packet it reads (a
    server that does not really pipeline)."""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"220 hi\r\n")
            await r.readline()  # EHLO
            w.write(b"250-x\r\n250 PIPELINING\r\n")
            while chunk := await r.read(65536):
                w.write(b"250 ok\r\n" if not chunk.startswith(b"QUIT") else b"221 bye\r\n")
                await w.drain()
        except ConnectionError:
            return
        finally:
            w.close()


def test_a_timeout_in_a_pipelined_group_says_the_commands_went_together(
    module_ca: TestCA,
) -> None:
    """The reply to RCPT never comes (the server answered MAIL only): the timeout says that
    the commands were pipelined, the likely cause, and nothing was delivered."""
    script = _FirstOnly()

    async def body(settings: SMTPSettings) -> ConnectError:
        settings = dataclasses.replace(settings, command_timeout=0.2)
        async with SMTPTransport(settings).connect() as conn:
            assert conn.pipelining
            with pytest.raises(ConnectError) as info:
                await conn.send(_RAW, mail_from=SENDER, recipients=[BOB])
            return info.value

    error = _scripted_run(module_ca, script, body)
    assert "reply to RCPT" in str(error) and "PIPELINING" in str(error)
    assert error.transient and not error.maybe_delivered


@pytest.mark.parametrize(
    "replies",
    [
        {"RCPT": [b"550 5.1.1 no\r\n"], "DATA": [b"421 4.3.2 closing\r\n"]},
        {
            "MAIL": [b"550 5.7.1 no\r\n"],
            "RCPT": [b"503 need MAIL\r\n"],
            "DATA": [b"421 4.3.2 bye\r\n"],
        },
    ],
    ids=["every-rcpt-refused", "sender-refused"],
)
def test_a_421_among_the_drained_replies_closes_the_session(
    module_ca: TestCA, replies: dict[str, list[bytes]]
) -> None:
    """A refused group's remaining replies are read all the same; a 421 among them means the
    server is closing (RFC 5321 §3.8): no RSET, no next MAIL on that session (review
    finding: it was ignored and the session reset and reused)."""
    script = _Scripted(True, lambda verb, n: replies.get(verb))
    result, connected = _one_send(module_ca, script)
    assert b"RSET\r\n" not in script.seen
    assert not connected
    if "MAIL" not in replies:  # every recipient refused: their outcome, each with its reply
        assert isinstance(result, CopyOutcome)
        assert isinstance(result.error, RecipientsRefusedError)
        assert [r.status for r in result.recipients] == ["failed"]
