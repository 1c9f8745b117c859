"""SMTP CHUNKING (RFC 3030) with PIPELINING (RFC 2920): with a server that offers both, MAIL,
every RCPT, ``BDAT <size> LAST`` and the message go in one write (one round trip per message,
no dot-stuffing); refusals, drops, timeouts and the outbox's mark come out as on the DATA path,
except that the message is written before any reply is read, so a connection lost after its
last octet is maybe-delivered. Raw submissions (no crypto) but for the gpg round trip."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib.protocol
import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email import AsyncMailer, Message, OpenPGPEngine, Protection, SMTPSettings, TLSMode
from e2email.config import RetryPolicy
from e2email.delivery import DeliveryEngine, Submission, deliver
from e2email.errors import ConnectError, DeliveryError, E2EmailError, RecipientsRefusedError
from e2email.keystore import Keystore
from e2email.outbox import ItemState, NewItem, Outbox
from e2email.outcome import CopyOutcome
from e2email.spool import Spool
from e2email.testing import Fault, FaultStage, LoopbackSMTPServer, TestCA, _verbs
from e2email.transport.smtp import SMTPConnection, SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0)
SENDER = "a@example.org"
BOB = "bob@example.net"
CAROL = "carol@example.com"


def _settings(server: LoopbackSMTPServer, **kw: Any) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.IMPLICIT,
        ca_file=server.ca_file,
        timeout=10,
        **kw,
    )


def _raw(i: int) -> bytes:
    # Lines that start with "." (DATA would double them): BDAT sends them as they are.
    return f"From: {SENDER}\r\nSubject: n{i}\r\n\r\n.body {i}\r\n.\r\n..two\r\n".encode()


def _group(raw: bytes, to: Sequence[str]) -> bytes:
    """The one write of a copy: the envelope, BDAT and the message's exact octets."""
    rcpts = "".join(f"RCPT TO:<{r}>\r\n" for r in to)
    head = f"MAIL FROM:<{SENDER}> SIZE={len(raw)}\r\n{rcpts}BDAT {len(raw)} LAST\r\n"
    return head.encode() + raw


def _chunking(factory: ServerFactory, **kw: Any) -> LoopbackSMTPServer:
    return factory(offer_pipelining=True, offer_chunking=True, **kw)


@pytest.fixture(scope="module")
def server(module_ca: TestCA) -> Any:
    """One server offering PIPELINING and CHUNKING for the tests that need no faults."""
    with LoopbackSMTPServer(ca=module_ca, offer_pipelining=True, offer_chunking=True) as srv:
        yield srv


def _last_session(server: LoopbackSMTPServer) -> list[str]:
    """The command verbs of the server's latest connection."""
    with server._lock:
        log = list(server._connections[-1])
    return _verbs(log)


def _reply_codes(server: LoopbackSMTPServer) -> list[int]:
    """The codes of the replies of the server's latest connection (greeting first)."""
    with server._lock:
        log = list(server._connections[-1])
    return [int(line[:3]) for kind, _, line in log if kind == "s" and line[3:4] != b"-"]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of the client's SMTP connections, in order."""
    seen: list[bytes] = []
    real = aiosmtplib.protocol.SMTPProtocol.write

    def write(self: aiosmtplib.protocol.SMTPProtocol, data: bytes) -> None:
        seen.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(aiosmtplib.protocol.SMTPProtocol, "write", write)
    return seen


Steps = Callable[[SMTPConnection], list[Coroutine[Any, Any, None]]]


def _on_one_connection(server: LoopbackSMTPServer, steps: Steps, **kw: Any) -> None:
    async def main() -> None:
        async with SMTPTransport(_settings(server, **kw)).connect() as conn:
            assert conn.chunking and conn.pipelining
            for step in steps(conn):
                await step

    asyncio.run(main())


def _send(server: LoopbackSMTPServer, subs: list[Submission]) -> list[CopyOutcome]:
    outcomes, fatal = asyncio.run(deliver(_settings(server), subs, retry=FAST, connections=1))
    assert fatal is None
    return sorted(outcomes, key=lambda o: subs.index(o.submission))


def test_each_message_is_one_write_and_arrives_exact(
    server: LoopbackSMTPServer, writes: list[bytes]
) -> None:
    """Three messages to two recipients over one connection: each is one write (MAIL, both
    RCPTs, BDAT and the message) and one read on the server; the server has exactly the bytes
    that were sent, with no dot-stuffing applied or needed."""
    before = len(server.messages)
    subs = [Submission(raw=_raw(i), mail_from=SENDER, recipients=(BOB, CAROL)) for i in range(3)]
    assert [o.status for o in _send(server, subs)] == ["delivered"] * 3
    assert [m.data for m in server.messages[before:]] == [_raw(i) for i in range(3)]
    assert [w for w in writes if not w.startswith((b"EHLO", b"QUIT"))] == [
        _group(_raw(i), (BOB, CAROL)) for i in range(3)
    ]
    with server._lock:
        reads = [data for kind, _, data in server._connections[-1] if kind == "c"]
    assert [r for r in reads if r.startswith(b"MAIL")] == [
        _group(_raw(i), (BOB, CAROL)) for i in range(3)
    ]
    assert _last_session(server) == ["EHLO", *["MAIL", "RCPT", "RCPT", "BDAT"] * 3, "QUIT"]


def test_a_copy_without_a_final_crlf_gets_one(
    server: LoopbackSMTPServer, writes: list[bytes]
) -> None:
    """A copy whose last line lacks its CRLF: the chunk (and SIZE) count the CRLF added, as
    the DATA path adds one before its ".", and the server has the copy with it."""
    before = len(server.messages)
    raw = _raw(0)[:-2]
    (outcome,) = _send(server, [Submission(raw=raw, mail_from=SENDER, recipients=(BOB,))])
    assert outcome.status == "delivered"
    assert [m.data for m in server.messages[before:]] == [raw + b"\r\n"]
    assert _group(raw + b"\r\n", [BOB]) in writes


def test_gpg_decrypts_what_the_server_received(
    server: LoopbackSMTPServer,
    keys: Keys,
    sender_store: Keystore,
    recipients_home: Path,
) -> None:
    """A signed and encrypted message (Sequoia) sent with BDAT: the bytes the server received
    decrypt with gpg, with Alice's good signature, to the text sent, dot lines included."""
    text = "Hi Bob,\n.\n..two dots\n.leading dot\nend\n"
    mailer = AsyncMailer(
        smtp=_settings(server),
        keystore=sender_store,
        protection=Protection(sign=True, encrypt=True, engine=OpenPGPEngine.SEQUOIA),
    )
    message = Message(sender=keys.alice.address, to=[keys.bob.address], subject="s", text=text)
    result = asyncio.run(mailer.send(message))
    assert result.accepted == (keys.bob.address,)
    (raw,) = [m.data for m in server.messages if f"<{result.message_id}>".encode() in m.data]
    assert "BDAT" in _last_session(server) and "DATA" not in _last_session(server)
    _, (_, encrypted) = multipart_parts(raw)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert "DECRYPTION_OKAY" in status and f"VALIDSIG {keys.alice.fingerprint}" in status
    inner = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert isinstance(inner, EmailMessage)
    body = inner.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().replace("\r\n", "\n") == text


@pytest.mark.parametrize(
    ("fault", "stage", "code"),
    [
        (Fault("mail", "reply", 550, "5.7.1 sender refused"), "MAIL", 550),
        (Fault("data", "reply", 451, "4.3.0 try later"), "DATA", 451),
        (Fault("data-end", "reply", 554, "5.6.0 no thanks"), "DATA", 554),
    ],
    ids=["sender", "bdat-4xx", "bdat-5xx"],
)
def test_a_refused_transaction_is_reported_and_reset(
    smtp_server: ServerFactory, fault: Fault, stage: str, code: int
) -> None:
    """The sender refused, or BDAT refused for now or for good: an outcome whose error is a
    DeliveryError with that reply (deferred for 4xx, failed for 5xx), nothing delivered, not
    maybe-delivered, then RSET; the next message on the same connection is delivered. A
    refused sender's BDAT is still read by the server and answered 503 (RFC 3030 §2)."""
    server = _chunking(smtp_server, faults=[fault])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def refused() -> None:
            result = await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            error = result.error
            assert isinstance(error, DeliveryError)
            assert not isinstance(error, RecipientsRefusedError)
            assert error.reply is not None and error.reply.code == code
            assert conn.stage == stage and conn.is_connected
            assert not error.maybe_delivered and not conn.end_of_data_sent
            (bob,) = result.recipients
            assert bob.status == ("deferred" if code < 500 else "failed")

        async def fine() -> None:
            result = await conn.send(_raw(1), mail_from=SENDER, recipients=[BOB])
            assert result.data_reply is not None and result.data_reply.code == 250

        return [refused(), fine()]

    _on_one_connection(server, steps)
    assert [m.data for m in server.messages] == [_raw(1)]
    assert _last_session(server) == [
        "EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "QUIT",
    ]  # fmt: skip
    codes = _reply_codes(server)[2:5]  # after the greeting and EHLO: MAIL, RCPT, BDAT
    assert codes == ([550, 503, 503] if stage == "MAIL" else [250, 250, code])


def test_one_refused_recipient_and_every_recipient_refused(
    smtp_server: ServerFactory,
) -> None:
    """Carol refused at RCPT: the copy goes to Bob, Carol's refusal kept with its reply. Only
    Carol: the server reads the chunk and refuses BDAT (503); RecipientsRefusedError, RSET,
    not maybe-delivered; the connection carries the next message."""
    server = _chunking(smtp_server, refuse_recipients={CAROL: (550, "5.1.1 no such user")})

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def partial() -> None:
            result = await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB, CAROL])
            assert result.delivered == (BOB,) and result.failed == (CAROL,)
            (carol,) = [r for r in result.recipients if r.address == CAROL]
            assert carol.reply is not None and carol.reply.code == 550

        async def none() -> None:
            result = await conn.send(_raw(1), mail_from=SENDER, recipients=[CAROL])
            assert isinstance(result.error, RecipientsRefusedError)
            assert result.error.refused[CAROL].code == 550
            assert [(r.address, r.status) for r in result.recipients] == [(CAROL, "failed")]
            assert conn.stage == "RCPT" and not conn.end_of_data_sent and conn.is_connected

        async def fine() -> None:
            result = await conn.send(_raw(2), mail_from=SENDER, recipients=[BOB])
            assert result.accepted == (BOB,)

        return [partial(), none(), fine()]

    _on_one_connection(server, steps)
    assert [(m.data, m.rcpt_tos) for m in server.messages] == [(_raw(0), (BOB,)), (_raw(2), (BOB,))]
    assert _last_session(server) == [
        "EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "MAIL", "RCPT", "BDAT", "RSET",
        "MAIL", "RCPT", "BDAT", "QUIT",
    ]  # fmt: skip
    assert 503 in _reply_codes(server)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data-end"])
def test_a_421_closes_the_session_without_rset(smtp_server: ServerFactory, stage: str) -> None:
    """421 (RFC 5321 §3.8) to MAIL, to RCPT or to BDAT: a DeliveryError with that reply, the
    session closed, no RSET, not maybe-delivered (the server refused it before taking it)."""
    fault = Fault(stage, "reply", 421, "4.3.2 closing")  # type: ignore[arg-type]
    server = _chunking(smtp_server, faults=[fault])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def closing() -> None:
            with pytest.raises(DeliveryError) as info:
                await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            assert info.value.reply is not None and info.value.reply.code == 421
            assert not info.value.maybe_delivered and not conn.end_of_data_sent
            assert not conn.is_connected

        return [closing()]

    _on_one_connection(server, steps)
    assert server.messages == []
    assert "RSET" not in server.received_commands()
    assert _group(_raw(0), [BOB]) in b"".join(d for _, d in server.transcript)


@pytest.mark.parametrize(
    ("fault", "stored"),
    [(Fault("data-end", "accept-drop"), 1), (Fault("mail", "drop"), 0)],
    ids=["after-accepting", "at-mail"],
)
def test_a_drop_after_the_last_octet_is_maybe_delivered(
    smtp_server: ServerFactory, fault: Fault, stored: int
) -> None:
    """The connection lost after the one write carried the message's last octet: the server
    may have it (one that holds its replies until it has read the group, as RFC 2920 §3.2
    allows, can deliver without having answered MAIL), so maybe-delivered, not retried."""
    server = _chunking(smtp_server, faults=[fault])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def dropped() -> None:
            with pytest.raises(ConnectError) as info:
                await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            assert info.value.maybe_delivered and conn.end_of_data_sent
            assert "may or may not" in str(info.value)

        return [dropped()]

    _on_one_connection(server, steps)
    assert len(server.messages) == stored


class _RefusesSecondMail(LoopbackSMTPServer):
    """Answers the second MAIL of its life with 421 and closes: a per-session limit."""

    mails = 0

    def _take_fault(self, stage: FaultStage, address: str | None = None) -> Fault | None:
        if stage == "mail":
            self.mails += 1
            if self.mails == 2:
                return Fault("mail", "reply", 421, "4.7.0 too many messages, closing")
        return super()._take_fault(stage, address)


def test_a_421_to_mail_between_messages_is_replaced_without_an_attempt(
    module_ca: TestCA,
) -> None:
    """The reused connection's next MAIL answered 421 (the chunk already written with it):
    the server refused the transaction, so nothing was delivered; the copy goes over a new
    connection at once, as its first attempt, and arrives once."""
    with _RefusesSecondMail(ca=module_ca, offer_pipelining=True, offer_chunking=True) as server:
        subs = [Submission(raw=_raw(i), mail_from=SENDER, recipients=(BOB,)) for i in range(3)]
        outcomes = _send(server, subs)
        assert [(o.status, o.attempts) for o in outcomes] == [("delivered", 1)] * 3
        assert server.connections == 2
        assert sorted(m.data for m in server.messages) == sorted(_raw(i) for i in range(3))
        # The refused copy's whole group reached the server, which read no further than MAIL.
        assert b"".join(d for _, d in server.transcript).count(_group(_raw(1), [BOB])) == 2
        assert server.received_commands().count("BDAT") == 3


def _big(size: int = 1_200_000) -> bytes:
    line = b"." + b"x" * 69 + b"\r\n"
    return b"From: a@example.org\r\nSubject: big\r\n\r\n" + line * (size // len(line))


def test_a_large_copy_goes_by_data_so_a_refusal_stops_it_before_the_message(
    smtp_server: ServerFactory,
) -> None:
    """A copy larger than one write goes by DATA, not BDAT: the kernel would take megabytes
    of a chunk before the server read MAIL, so a 421 (or a drop) at MAIL would come after the
    whole message went and leave it maybe-delivered. With DATA the 421 stops it before the
    message: a refusal, retried, the server holding nothing (review rev5-c finding 1)."""
    server = _chunking(smtp_server, faults=[Fault("mail", "reply", 421, "4.7.0 too many")])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def refused() -> None:
            with pytest.raises(DeliveryError) as info:
                await conn.send(_big(), mail_from=SENDER, recipients=[BOB])
            assert not info.value.maybe_delivered and info.value.reply is not None
            assert info.value.reply.code == 421

        return [refused()]

    _on_one_connection(server, steps)
    assert server.messages == []
    sent = b"".join(d for _, d in server.transcript)
    assert b"BDAT" not in sent and b"x" * 69 not in sent


@pytest.mark.parametrize("large", [False, True], ids=["small", "large-spooled"])
def test_the_mark_comes_before_the_last_octet(
    server: LoopbackSMTPServer, writes: list[bytes], tmp_path: Path, large: bool
) -> None:
    """The outbox's in-flight mark is awaited before the write that carries the last octet:
    for a small copy before its one write (BDAT); a large spooled copy goes by DATA, its
    end-of-data line after the mark."""
    raw = _big() if large else _raw(0)
    copy: bytes | Spool = raw
    if large:
        copy = Spool(tmp_path, memory_max=0)
        copy.write(raw)
        assert not copy.in_memory
    before = len(server.messages)
    marked: list[int] = []

    async def mark() -> None:
        marked.append(len(writes))

    async def main() -> None:
        async with SMTPTransport(_settings(server)).connect() as conn:
            start = len(writes)
            result = await conn.send(copy, mail_from=SENDER, recipients=[BOB], before_end=mark)
            assert result.accepted == (BOB,)
            sent = writes[start:]
            assert marked == [len(writes) - 1]  # only the last write after the mark
            if large:
                assert sent[0].endswith(b"DATA\r\n") and sent[-1] == b".\r\n"
            else:
                assert sent == [_group(raw, [BOB])]

    asyncio.run(main())
    assert [m.data for m in server.messages[before:]] == [raw]
    verb = "DATA" if large else "BDAT"
    assert _last_session(server) == ["EHLO", "MAIL", "RCPT", verb, "QUIT"]


def test_outbox_states_with_chunking(smtp_server: ServerFactory, tmp_path: Path) -> None:
    """Through the outbox: the first copy's reply lost after the server took it is left
    maybe-delivered (marked in flight before the write), the second is delivered and leaves."""
    server = _chunking(smtp_server, faults=[Fault("data-end", "accept-drop")])
    box = Outbox(tmp_path / "o.sqlite3")
    raws = [_raw(0), _raw(1)]
    ids = box.add(
        [
            NewItem(raw=r, mail_from=SENDER, recipients=(BOB,), message_id=f"<m{i}@x>")
            for i, r in enumerate(raws)
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
                    Submission(raw=raws[i], mail_from=SENDER, recipients=(BOB,), id=item_id)
                )

    asyncio.run(asyncio.wait_for(run(), 20))
    by_id = {o.submission.id: o.status for o in outcomes}
    assert [by_id[i] for i in ids] == ["maybe-delivered", "delivered"]
    (left,) = box.items()
    assert left.id == ids[0] and left.state is ItemState.MAYBE_DELIVERED
    assert [m.data for m in server.messages] == raws
    assert server.received_commands().count("BDAT") == 2


@pytest.mark.parametrize(
    ("pipelining", "chunking"), [(True, False), (False, True)], ids=["no-chunking", "no-pipelining"]
)
def test_without_both_offers_data_is_used(
    smtp_server: ServerFactory, pipelining: bool, chunking: bool
) -> None:
    """A server without CHUNKING, or with CHUNKING but without PIPELINING (where BDAT would
    save nothing: each command waits for its reply), gets DATA as before."""
    server = smtp_server(offer_pipelining=pipelining, offer_chunking=chunking)

    async def main() -> None:
        async with SMTPTransport(_settings(server)).connect() as conn:
            assert not conn.chunking and conn.pipelining is pipelining
            assert ("chunking" in conn.extensions) is chunking
            await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])

    asyncio.run(main())
    assert server.received_commands() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [m.data for m in server.messages] == [_raw(0)]


def test_the_bdat_reply_is_waited_for_with_the_data_timeout(smtp_server: ServerFactory) -> None:
    """BDAT's reply is the message's final answer: waited for as long as the data timeout
    allows (a server taking longer than the command timeout there is fine), and a timeout
    there is maybe-delivered, its error saying the commands went together."""
    server = _chunking(smtp_server, faults=[Fault("data-end", "stall", seconds=1.5)])

    def steps(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def slow() -> None:
            result = await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            assert result.accepted == (BOB,)

        return [slow()]

    _on_one_connection(server, steps, command_timeout=1.0, data_timeout=10)
    assert [m.data for m in server.messages] == [_raw(0)]

    stalled = _chunking(smtp_server, faults=[Fault("data-end", "stall", seconds=30)])

    def timing_out(conn: SMTPConnection) -> list[Coroutine[Any, Any, None]]:
        async def late() -> None:
            with pytest.raises(ConnectError) as info:
                await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            assert info.value.maybe_delivered
            assert "reply to DATA" in str(info.value) and "CHUNKING" in str(info.value)

        return [late()]

    _on_one_connection(stalled, timing_out, data_timeout=0.2)
    assert stalled.messages == []


class _Scripted:
    """A TLS server offering PIPELINING and CHUNKING whose answers to BDAT are given."""

    def __init__(self, bdat: bytes) -> None:
        self.bdat = bdat
        self.stored = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"220 hi\r\n")
            while line := await r.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    w.write(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                elif verb == b"BDAT":
                    await r.readexactly(int(line.split()[1]))
                    self.stored += 1
                    w.write(self.bdat)
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    return
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()


@contextlib.asynccontextmanager
async def _tls_server(
    ca: TestCA,
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    **settings: Any,
) -> AsyncIterator[SMTPSettings]:
    """A TLS server on loopback answering with ``handle``: the settings to reach it."""
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ca.server_context("127.0.0.1"))
    try:
        yield SMTPSettings(
            host="127.0.0.1",
            port=srv.sockets[0].getsockname()[1],
            tls=TLSMode.IMPLICIT,
            ca_file=ca.ca_file,
            timeout=10,
            **settings,
        )
    finally:
        srv.close()


def _scripted(ca: TestCA, bdat: bytes) -> tuple[CopyOutcome | ConnectError, bool, int]:
    script = _Scripted(bdat)

    async def run() -> tuple[CopyOutcome | ConnectError, bool]:
        async with (
            _tls_server(ca, script.handle) as settings,
            SMTPTransport(settings).connect() as conn,
        ):
            assert conn.chunking
            try:
                result: CopyOutcome | ConnectError = await conn.send(
                    _raw(0), mail_from=SENDER, recipients=[BOB]
                )
            except ConnectError as exc:
                result = exc
            return result, conn.is_connected

    result, connected = asyncio.run(run())
    return result, connected, script.stored


def test_replies_out_of_step_close_the_session(module_ca: TestCA) -> None:
    """A second reply after BDAT's: the answer stands (delivered) but the session is out of
    step and not used again. Many replies to BDAT (more than the group's commands): the
    reading fails; the message was written whole, so it is maybe-delivered."""
    result, connected, stored = _scripted(module_ca, b"250 queued\r\n250 again\r\n")
    assert isinstance(result, CopyOutcome) and result.accepted == (BOB,)
    assert not connected and stored == 1
    result, connected, _ = _scripted(module_ca, b"250 queued\r\n" * 6)
    assert isinstance(result, ConnectError), result
    assert result.maybe_delivered and "more replies" in str(result)
    assert not connected


class _Tiny(LoopbackSMTPServer):
    def _make_protocol(self) -> Any:
        protocol = super()._make_protocol()
        protocol.data_size_limit = 20
        return protocol


def test_the_loopback_server_takes_bdat(module_ca: TestCA) -> None:
    """The test server's BDAT (RFC 3030): the chunk is read even when refused (503 without
    MAIL; the command-like lines inside it are not taken as commands), chunks without LAST
    accumulate, LAST delivers them joined, more than the size limit is 552 once read."""

    async def talk(server: LoopbackSMTPServer) -> list[bytes]:
        reader, writer = await asyncio.open_connection(
            server.host, server.port, ssl=module_ca.client_context()
        )
        out: list[bytes] = []

        async def say(data: bytes, replies: int = 1) -> None:
            writer.write(data)
            for _ in range(replies):
                line = await reader.readline()
                while line[3:4] == b"-":
                    line = await reader.readline()
                out.append(line[:3])

        await reader.readline()
        await say(b"EHLO me\r\n")
        await say(b"BDAT 12\r\nRSET\r\nNOOP\r\n")
        await say(b"NOOP\r\n")
        await say(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n", 2)
        await say(b"BDAT 6\r\nab\r\ncd")
        await say(b"BDAT 4 LAST\r\nef\r\n")
        await say(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n", 2)
        await say(b"BDAT 22 LAST\r\n" + b"x" * 20 + b"\r\n")
        await say(b"QUIT\r\n")
        writer.close()
        return out

    with _Tiny(ca=module_ca, offer_pipelining=True, offer_chunking=True) as server:
        codes = asyncio.run(talk(server))
        assert codes == [
            b"250", b"503", b"250", b"250", b"250", b"250", b"250", b"250", b"250", b"552",
            b"221",
        ]  # fmt: skip
        assert [m.data for m in server.messages] == [b"ab\r\ncdef\r\n"]
        assert server.received_commands() == [
            "EHLO", "BDAT", "NOOP", "MAIL", "RCPT", "BDAT", "BDAT", "MAIL", "RCPT", "BDAT",
            "QUIT",
        ]  # fmt: skip


# -- Review findings (rev5-c) ------------------------------------------------------------------


def test_a_421_to_one_rcpt_from_a_server_that_goes_on_is_not_retried_into_duplicates(
    smtp_server: ServerFactory,
) -> None:
    """A 421 to one RCPT from a server that does not hang up, and BDAT (already written)
    taken for the other recipient: every reply is read before deciding, so the accepted
    recipient is delivered once and the refused one deferred, never the copy sent again."""
    server = _chunking(smtp_server, refuse_recipients={CAROL: (421, "4.7.0 rate limited")})
    outcomes = _send(server, [Submission(raw=_raw(0), mail_from=SENDER, recipients=(BOB, CAROL))])
    assert [tuple(m.rcpt_tos) for m in server.messages] == [(BOB,)]
    (outcome,) = outcomes
    assert {r.address: r.status for r in outcome.recipients}[BOB] == "delivered"


class _HeldScript:
    """A CHUNKING server answering from a script: what it says to EHLO, MAIL and BDAT
    (``hold``: every reply held until the end of the data, then ``delay`` seconds more, as a
    Postfix with a content filter flushes them)."""

    def __init__(
        self, mail: bytes = b"250 ok\r\n", bdat: bytes = b"250 ok\r\n", *, delay: float = 0
    ) -> None:
        self.mail, self.bdat, self.delay, self.stored = mail, bdat, delay, 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        out: list[bytes] = []
        try:
            w.write(b"220 hi\r\n")
            while line := await r.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    w.write(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                elif verb == b"MAIL":
                    out.append(self.mail)
                elif verb == b"BDAT":
                    await r.readexactly(int(line.split()[1]))
                    await asyncio.sleep(self.delay)
                    self.stored += 1
                    w.write(b"".join(out) + self.bdat)
                    out.clear()
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    return
                else:
                    out.append(b"250 ok\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()


def _against(ca: TestCA, script: _HeldScript, **settings: Any) -> Any:
    async def run() -> Any:
        async with (
            _tls_server(ca, script.handle, **settings) as st,
            SMTPTransport(st).connect() as conn,
        ):
            try:
                return await conn.send(_raw(0), mail_from=SENDER, recipients=[BOB])
            except E2EmailError as exc:
                return exc

    return asyncio.run(run())


def test_replies_held_until_the_end_of_the_data_get_the_data_timeout(module_ca: TestCA) -> None:
    """A server that holds every reply until it has taken the message (behind a 1.5 s
    filter): MAIL's reply too comes after the data, so it is waited for with the data
    timeout, not the command timeout (which would make a delivered copy maybe-delivered)."""
    script = _HeldScript(delay=1.5)
    result = _against(module_ca, script, command_timeout=1.0, data_timeout=10)
    assert not isinstance(result, E2EmailError), result
    assert result.accepted == (BOB,) and script.stored == 1


def test_an_extra_reply_never_turns_a_refused_message_into_delivered(module_ca: TestCA) -> None:
    result = _against(module_ca, _HeldScript(mail=b"250 ok\r\n250 ok\r\n", bdat=b"554 no\r\n"))
    assert isinstance(result, ConnectError) and result.maybe_delivered, result


def test_a_message_taken_after_its_sender_was_refused_is_maybe_delivered(
    module_ca: TestCA,
) -> None:
    """MAIL refused 451, yet BDAT answered 250: not a refusal (a retry would deliver it
    again) but maybe-delivered."""
    script = _HeldScript(mail=b"451 4.7.1 later\r\n", bdat=b"250 2.0.0 queued anyway\r\n")
    result = _against(module_ca, script)
    assert isinstance(result, ConnectError) and result.maybe_delivered, result


def test_a_malformed_bdat_line_ends_the_test_servers_session(module_ca: TestCA) -> None:
    """The loopback server: after a BDAT it cannot parse, nothing more of the stream is read
    (its octets would be taken for commands: a smuggled message)."""

    async def talk(server: LoopbackSMTPServer) -> None:
        r, w = await asyncio.open_connection(
            server.host, server.port, ssl=module_ca.client_context()
        )
        await r.readline()
        w.write(b"EHLO me\r\n")
        while (await r.readline())[3:4] == b"-":
            pass
        w.write(
            b"BDAT 5x\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nhi\r\n.\r\n"
        )
        assert (await r.readline()).startswith(b"501")
        assert await r.read() == b""
        w.close()

    with LoopbackSMTPServer(ca=module_ca, offer_pipelining=True, offer_chunking=True) as server:
        asyncio.run(talk(server))
        assert server.messages == []


class _Planned:
    """A CHUNKING and PIPELINING server run from a plan per (connection, transaction):
    ``mail``, ``rcpt`` (replies), ``bdat`` (a reply, or "drop": take the chunk, then hang up
    after the first ``flush`` held replies), ``hold`` (replies held until BDAT, as Postfix
    flushes them only when it would wait for input)."""

    def __init__(self, plan: Any) -> None:
        self.plan, self.conns = plan, 0
        self.stored: list[tuple[int, bytes]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn, tx, n = self.conns, 0, 0
        out: list[bytes] = []
        p: dict[str, Any] = {}
        self.conns += 1
        try:
            w.write(b"220 hi\r\n")
            while line := await r.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    out.append(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                elif verb == b"MAIL":
                    p, n = self.plan(conn, tx) or {}, 0
                    out.append(p.get("mail", b"250 ok\r\n"))
                elif verb == b"RCPT":
                    planned = p.get("rcpt", [])
                    out.append(planned[n] if n < len(planned) else b"250 ok\r\n")
                    n += 1
                elif verb == b"BDAT":
                    data = await r.readexactly(int(line.split()[1]))
                    tx += 1
                    act = p.get("bdat", b"250 queued\r\n")
                    if act == "drop":
                        self.stored.append((conn, data))
                        w.write(b"".join(out[: p.get("flush", 0)]))
                        await w.drain()
                        return
                    if act.startswith(b"250"):
                        self.stored.append((conn, data))
                    out.append(act)
                elif verb == b"QUIT":
                    out.append(b"221 bye\r\n")
                else:
                    out.append(b"250 ok\r\n")
                if not (p.get("hold") and verb in (b"MAIL", b"RCPT")):
                    w.write(b"".join(out))
                    out.clear()
                    await w.drain()
                if verb == b"QUIT":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()


def _planned(ca: TestCA, plan: Any, subs: list[Submission]) -> tuple[Any, _Planned]:
    server = _Planned(plan)

    async def main() -> Any:
        async with _tls_server(ca, server.handle) as settings:
            outcomes, _ = await deliver(settings, subs, retry=FAST, connections=1)
            return outcomes

    return asyncio.run(main()), server


def test_a_421_then_a_yes_then_a_lost_connection_is_maybe_delivered(module_ca: TestCA) -> None:
    """A 421 to Carol from a server that went on: Bob accepted, the chunk taken for him, the
    connection lost before BDAT's reply. The yes after the 421 shows the server did not close:
    it may have Bob's copy, so it is maybe-delivered, never sent again."""

    def plan(conn: int, tx: int) -> dict[str, Any]:
        if conn == 0:
            return {
                "rcpt": [b"421 4.7.0 rate limited\r\n"],
                "bdat": "drop",
                "flush": 3,
                "hold": True,
            }
        return {}

    sub = Submission(raw=_raw(0), mail_from=SENDER, recipients=(CAROL, BOB))
    (outcome,), server = _planned(module_ca, plan, [sub])
    assert [c for c, _ in server.stored] == [0]
    assert outcome.status == "maybe-delivered"


def test_no_reply_at_all_after_the_write_is_maybe_delivered_even_on_a_reused_session(
    module_ca: TestCA,
) -> None:
    """A server that holds its replies until the message is queued (as Postfix does) queues
    the second message of a session, then the connection is lost with no reply at all: the
    message went in MAIL's own write, so it may be there: maybe-delivered, not sent again."""

    def plan(conn: int, tx: int) -> dict[str, Any]:
        return {"bdat": "drop", "hold": True} if (conn, tx) == (0, 1) else {"hold": True}

    subs = [Submission(raw=_raw(i), mail_from=SENDER, recipients=(BOB,)) for i in range(3)]
    outcomes, server = _planned(module_ca, plan, subs)
    assert [d for _, d in server.stored].count(_raw(1)) == 1
    assert [o.status for o in outcomes] == ["delivered", "maybe-delivered", "delivered"]
