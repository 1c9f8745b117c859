"""Delivery that never loses a message: retries, per-recipient outcomes, the outbox underneath,
connection reuse and pools. Against a real aiosmtpd server that misbehaves on purpose
(e2email.testing.Fault); every test ends by accounting for each (copy, recipient): delivered
exactly as protected (the bytes the server received) or still in the outbox, never neither."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email import (
    AsyncMailer,
    AuthenticationError,
    ConnectError,
    Mailer,
    Message,
    RecipientsRefusedError,
    SMTPSettings,
    TLSError,
    TLSMode,
)
from e2email.client import ProtectedCopy
from e2email.config import RetryPolicy
from e2email.keystore import Keystore
from e2email.outbox import ItemState, Outbox, OutboxError, RecipientState
from e2email.testing import Fault, LoopbackSMTPServer, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]

#: Quick retries for tests: the back-off itself is pinned down in test_backoff_*.
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0)


def settings(server: LoopbackSMTPServer, **extra: object) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.IMPLICIT,
        ca_file=server.ca_file,
        timeout=10,
        **extra,  # type: ignore[arg-type]
    )


def mailer(
    store: Keystore,
    server: LoopbackSMTPServer,
    tmp_path: Path,
    *,
    retry: RetryPolicy = FAST,
    connections: int = 4,
    **extra: object,
) -> AsyncMailer:
    return AsyncMailer(
        smtp=settings(server, **extra),
        keystore=store,
        outbox=tmp_path / "outbox.sqlite3",
        retry=retry,
        connections=connections,
    )


def protect(m: AsyncMailer, *to: str, text: str = "secret") -> tuple[ProtectedCopy, ...]:
    message = Message(sender="alice@example.org", to=list(to), subject="s", text=text)
    return asyncio.run(m.protect(message))


def account(
    copies: Sequence[ProtectedCopy],
    server: LoopbackSMTPServer,
    outbox: Outbox,
    *,
    delivered: set[str],
    kept: set[str],
) -> None:
    """Each recipient of each copy is either delivered (exactly once, with exactly the
    protected bytes) or kept in the outbox (with exactly those bytes), as expected."""
    items = outbox.items()
    for copy in copies:
        for rcpt in copy.recipients:
            got = [m for m in server.messages if rcpt in m.rcpt_tos]
            stored = [
                outbox.get(i.id)
                for i in items
                if rcpt in i.pending or rcpt in [r.address for r in i.failed]
            ]
            if rcpt in delivered:
                assert len(got) == 1, (rcpt, len(got))
                assert got[0].data == copy.raw
                assert not stored, rcpt
            else:
                assert rcpt in kept
                assert not got, rcpt
                assert [s.raw for s in stored] == [copy.raw], rcpt
    assert delivered | kept == {r for c in copies for r in c.recipients}


def rcpt_count(server: LoopbackSMTPServer, address: str) -> int:
    """How often RCPT TO:<address> was sent, over all connections."""
    data = b"".join(chunk for tls, chunk in server.transcript)
    return len(re.findall(rb"RCPT TO:<" + re.escape(address.encode()) + rb">", data))


# -- the five judged faults --------------------------------------------------------------------


def test_421_at_connect_is_retried_after_a_backoff_and_delivered(
    sender_store: Keystore,
    smtp_server: ServerFactory,
    tmp_path: Path,
    recipients_home: Path,
) -> None:
    """A 421 greeting is transient: after the back-off a new connection delivers the message,
    the exact protected bytes, which Bob decrypts; the outbox is empty afterwards."""
    server = smtp_server(faults=[Fault("connect", "reply", 421, "4.3.2 too busy")])
    policy = RetryPolicy(max_attempts=3, base_delay=0.2, jitter=0)
    m = mailer(sender_store, server, tmp_path, retry=policy)
    copies = protect(m, "bob@example.net", text="after a 421")
    started = time.monotonic()
    result = asyncio.run(m.send_copies(copies))
    assert time.monotonic() - started >= 0.2  # it waited before trying again
    assert result.accepted == ("bob@example.net",)
    assert result.kept == ()
    assert server.connections == 2
    assert m.outbox is not None
    account(copies, server, m.outbox, delivered={"bob@example.net"}, kept=set())
    _, (_, encrypted) = multipart_parts(server.messages[0].data)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert b"after a 421" in plaintext and "DECRYPTION_OKAY" in status
    assert len(m.outbox) == 0


def test_451_at_rcpt_retries_only_the_refused_recipient(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server takes the message for Bob and says 451 for Carol: the message goes to Bob
    once, and only Carol is tried again, with the same bytes."""
    server = smtp_server(
        faults=[Fault("rcpt", "reply", 451, "4.2.0 mailbox busy", address="carol@example.com")]
    )
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net", "carol@example.com")
    result = asyncio.run(m.send_copies(copies))
    assert sorted(result.accepted) == ["bob@example.net", "carol@example.com"]
    assert [msg.rcpt_tos for msg in server.messages] == [
        ("bob@example.net",),
        ("carol@example.com",),
    ]
    assert rcpt_count(server, "bob@example.net") == 1
    assert rcpt_count(server, "carol@example.com") == 2
    assert m.outbox is not None
    account(
        copies,
        server,
        m.outbox,
        delivered={"bob@example.net", "carol@example.com"},
        kept=set(),
    )


def test_drop_in_the_middle_of_data_is_retried_on_a_new_connection(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server hangs up halfway through DATA: nothing was accepted, so the copy is sent
    again over a new connection and arrives once, intact."""
    server = smtp_server(faults=[Fault("data", "drop")])
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net")
    result = asyncio.run(m.send_copies(copies))
    assert result.accepted == ("bob@example.net",)
    assert server.faults_fired and server.connections == 2
    assert m.outbox is not None
    account(copies, server, m.outbox, delivered={"bob@example.net"}, kept=set())


def test_a_stall_past_the_data_timeout_is_maybe_delivered_and_not_resent(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server sits on the final reply longer than the data timeout: the client gives up
    after the final "." was sent, so the server may have the message (RFC 5321 §6.1). It is
    reported maybe-delivered and kept so, not retried (the old code retried it: a second
    copy whenever the server had in fact taken it); a plain retry of the outbox leaves it,
    and asking for it (``maybe_delivered=True``) sends it."""
    server = smtp_server(faults=[Fault("data-end", "stall", seconds=3.0)])
    m = mailer(sender_store, server, tmp_path, data_timeout=0.5)
    copies = protect(m, "bob@example.net")
    with pytest.raises(ConnectError, match="may or may not") as info:
        asyncio.run(m.send_copies(copies))
    assert info.value.maybe_delivered is True
    assert server.connections == 1  # never tried again by itself
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.state is ItemState.MAYBE_DELIVERED and item.maybe_since is not None
    assert info.value.result.kept == (item.id,)
    assert "maybe delivered" in (item.last_error or "")
    assert asyncio.run(m.send_outbox()) == ()
    assert server.connections == 1
    (outcome,) = asyncio.run(m.send_outbox(maybe_delivered=True))
    assert outcome.status == "delivered"
    account(copies, server, m.outbox, delivered={"bob@example.net"}, kept=set())


def test_a_drop_after_the_final_dot_delivers_exactly_one_copy(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server takes the message and the connection drops before its 250 arrives: with
    the default retries the old code sent it three times (three copies at the server). Now
    exactly one copy arrives; the outbox keeps it as maybe-delivered, and the outcome says
    so per recipient."""
    server = smtp_server(faults=[Fault("data-end", "accept-drop", times=None)])
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net", "carol@example.com")
    with pytest.raises(ConnectError, match="may or may not") as info:
        asyncio.run(m.send_copies(copies))
    assert len(server.messages) == 1 and server.messages[0].data == copies[0].raw
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.state is ItemState.MAYBE_DELIVERED
    assert set(item.pending) == {"bob@example.net", "carol@example.com"}
    assert info.value.unsent[0].outbox_id == item.id
    # A later batch engine run (no IDs) leaves it too, and so does sending the unsent copy.
    assert asyncio.run(m.send_outbox()) == ()
    with pytest.raises(OutboxError, match="may have been delivered"):
        asyncio.run(m.send_copies(info.value.unsent))
    assert len(server.messages) == 1
    assert m.outbox.get(item.id, raw=False).state is ItemState.MAYBE_DELIVERED


def test_without_an_outbox_a_maybe_delivered_copy_is_not_retried_either(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """No outbox: the engine still does not resend a copy whose reply to the final "." was
    lost; its recipients are maybe-delivered, and the copy travels in the error."""
    server = smtp_server(faults=[Fault("data-end", "accept-drop", times=None)])
    m = AsyncMailer(smtp=settings(server), keystore=sender_store, retry=FAST)
    copies = protect(m, "bob@example.net")
    with pytest.raises(ConnectError) as info:
        asyncio.run(m.send_copies(copies))
    assert info.value.maybe_delivered and len(server.messages) == 1
    assert [c.raw for c in info.value.unsent] == [copies[0].raw]


def test_a_drop_before_the_end_of_data_is_still_retried(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server reads part of a large message and hangs up: the final "." was never sent,
    so the server cannot have it; that is retried at once (not maybe-delivered) and arrives
    once."""
    server = smtp_server(faults=[Fault("data", "drop")])
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net", text="x" * 3_000_000)
    result = asyncio.run(m.send_copies(copies))
    assert result.accepted == ("bob@example.net",)
    assert server.connections == 2
    assert m.outbox is not None
    account(copies, server, m.outbox, delivered={"bob@example.net"}, kept=set())


def test_552_for_one_recipient_of_three_is_reported_and_kept_not_retried(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A permanent refusal (552) for Carol: Bob and Dave get the message; Carol is reported
    with the server's reply, asked only once (5xx is not retried), and her copy stays in the
    outbox as failed, for her alone."""
    server = smtp_server(
        faults=[
            Fault(
                "rcpt", "reply", 552, "5.2.2 mailbox full", address="carol@example.com", times=None
            )
        ]
    )
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net", "carol@example.com", "dave@example.com")
    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(m.send_copies(copies))
    err = info.value
    assert sorted(err.accepted) == ["bob@example.net", "dave@example.com"]
    assert list(err.refused) == ["carol@example.com"]
    assert err.refused["carol@example.com"].code == 552
    assert "partly delivered" in str(err) and "mailbox full" in str(err)
    assert [c.recipients for c in err.unsent] == [("carol@example.com",)]
    assert rcpt_count(server, "carol@example.com") == 1
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert err.result.kept == (item.id,)
    assert item.state is ItemState.FAILED
    states = {r.address: r.state for r in item.recipients}
    assert states == {
        "bob@example.net": RecipientState.DELIVERED,
        "carol@example.com": RecipientState.FAILED,
        "dave@example.com": RecipientState.DELIVERED,
    }
    assert "552" in (item.last_error or "")
    account(
        copies,
        server,
        m.outbox,
        delivered={"bob@example.net", "dave@example.com"},
        kept={"carol@example.com"},
    )


# -- limits, permanent errors, the outbox as the retry queue ----------------------------------


def test_transient_failures_beyond_the_limit_stay_queued_until_the_outbox_is_retried(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """451 three times in a row with two attempts allowed: the message is reported not
    delivered and stays queued in the outbox (never dropped); `send_outbox` later delivers it,
    once, with the stored bytes."""
    server = smtp_server(
        faults=[Fault("rcpt", "reply", 451, "4.7.1 greylisted", address="bob@example.net", times=3)]
    )
    m = mailer(sender_store, server, tmp_path, retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    copies = protect(m, "bob@example.net")
    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(m.send_copies(copies))
    assert info.value.refused["bob@example.net"].code == 451
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.state is ItemState.QUEUED and item.attempts == 2
    assert "greylisted" in (item.last_error or "")
    account(copies, server, m.outbox, delivered=set(), kept={"bob@example.net"})
    outcomes = asyncio.run(m.send_outbox())
    assert [o.status for o in outcomes] == ["delivered"]
    account(copies, server, m.outbox, delivered={"bob@example.net"}, kept=set())


def test_an_untrusted_certificate_is_not_retried_and_the_copy_is_kept(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path, session_ca: TestCA
) -> None:
    """A certificate that does not verify is permanent: one connection attempt, a TLSError,
    and the protected copy kept in the outbox."""
    other = TestCA()
    try:
        server = smtp_server(ca=other)
        m = AsyncMailer(
            smtp=SMTPSettings(
                host=server.host,
                port=server.port,
                tls=TLSMode.IMPLICIT,
                ca_file=session_ca.ca_file,
            ),
            keystore=sender_store,
            outbox=tmp_path / "o.sqlite3",
            retry=FAST,
        )
        copies = protect(m, "bob@example.net")
        with pytest.raises(TLSError) as info:
            asyncio.run(m.send_copies(copies))
    finally:
        other.cleanup()
    assert server.connections == 1
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert [(c.raw, c.recipients, c.outbox_id) for c in info.value.unsent] == [
        (copies[0].raw, copies[0].recipients, item.id)
    ]
    assert info.value.result.kept == (item.id,)
    assert item.state is ItemState.QUEUED and item.attempts == 0
    account(copies, server, m.outbox, delivered=set(), kept={"bob@example.net"})


def test_sending_the_unsent_copies_again_sends_the_kept_item_not_a_second_one(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """``send_copies(error.unsent)`` after a failure claims the copy kept in the outbox
    instead of storing it twice, so a later `outbox retry` cannot deliver it again."""
    server = smtp_server(
        faults=[Fault("rcpt", "reply", 452, "4.3.1 no space", address="bob@example.net", times=2)]
    )
    m = mailer(sender_store, server, tmp_path, retry=RetryPolicy(max_attempts=2, base_delay=0))
    copies = protect(m, "bob@example.net", "carol@example.com")
    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(m.send_copies(copies))
    assert m.outbox is not None and len(m.outbox) == 1
    result = asyncio.run(m.send_copies(info.value.unsent))
    assert result.accepted == ("bob@example.net",)
    assert len(m.outbox) == 0
    account(
        copies,
        server,
        m.outbox,
        delivered={"bob@example.net", "carol@example.com"},
        kept=set(),
    )


def test_an_unreachable_server_is_tried_max_attempts_times(
    sender_store: Keystore, tmp_path: Path, session_ca: TestCA
) -> None:
    """Connection refused is transient: tried max_attempts times, then a ConnectError and
    the copy stays queued."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = AsyncMailer(
        smtp=SMTPSettings(
            host="127.0.0.1", port=port, tls=TLSMode.IMPLICIT, ca_file=session_ca.ca_file
        ),
        keystore=sender_store,
        outbox=tmp_path / "o.sqlite3",
        retry=FAST,
    )
    copies = protect(m, "bob@example.net")
    with pytest.raises(ConnectError) as info:
        asyncio.run(m.send_copies(copies))
    assert info.value.transient
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.attempts == FAST.max_attempts and item.state is ItemState.QUEUED


def test_without_an_outbox_the_undelivered_copies_travel_in_the_error(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """The library's default has no outbox; retries still happen, and what is left is in the
    error's ``unsent`` (nothing lost)."""
    server = smtp_server(
        faults=[
            Fault("connect", "reply", 421, "4.3.2 busy"),
            Fault("rcpt", "reply", 550, "5.1.1 unknown", address="erin@example.com"),
        ]
    )
    m = AsyncMailer(smtp=settings(server), keystore=sender_store, retry=FAST)
    assert m.outbox is None
    copies = protect(m, "bob@example.net", "erin@example.com")
    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(m.send_copies(copies))
    assert info.value.accepted == ("bob@example.net",)
    assert [(c.raw, c.recipients) for c in info.value.unsent] == [
        (copies[0].raw, ("erin@example.com",))
    ]
    assert info.value.result.kept == ()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    """Delays double from base_delay up to max_delay; jitter takes a random share of up to
    ``jitter`` of each delay off (never more); bad policies are refused."""
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 10, 5000)] == [1, 2, 4, 5, 5, 5]
    jittery = RetryPolicy(base_delay=2.0, max_delay=100.0, jitter=0.5)
    assert jittery.delay(3, rand=lambda: 0.0) == 8.0
    assert jittery.delay(3, rand=lambda: 1.0) == 4.0
    samples = {jittery.delay(3) for _ in range(50)}
    assert all(4.0 <= d <= 8.0 for d in samples) and len(samples) > 1
    for bad in ({"max_attempts": 0}, {"jitter": 1.5}, {"base_delay": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


# -- many messages -----------------------------------------------------------------------------


def _messages(n: int, to: str = "bob@example.net") -> list[Message]:
    return [
        Message(sender="alice@example.org", to=[to], subject=f"n{i}", text=f"message {i}")
        for i in range(n)
    ]


def _message_ids(server: LoopbackSMTPServer) -> list[str]:
    ids = []
    for msg in server.messages:
        found = re.search(rb"\r\nMessage-ID: <([^>]+)>\r\n", msg.data)
        assert found
        ids.append(found.group(1).decode())
    return ids


def test_one_connection_carries_many_messages(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """With one connection, six messages share one TLS session: six MAIL transactions, no RSET
    between them (each 250 to the data already reset the server's state, RFC 5321
    §4.1.1.4), one connection; every message delivered once."""
    server = smtp_server()
    m = mailer(sender_store, server, tmp_path, connections=1)
    result = asyncio.run(m.send_many(_messages(6)))
    assert result.counts == {"delivered": 6} and result.ok
    assert server.connections == 1 and result.connections == 1
    verbs = server.received_commands()
    assert verbs.count("MAIL") == 6 and verbs.count("RSET") == 0
    assert sorted(_message_ids(server)) == sorted(o.message_id or "" for o in result.outcomes)
    assert m.outbox is not None and len(m.outbox) == 0


def test_a_pool_of_connections_sends_side_by_side(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Twelve messages over a pool of three: at most three connections, each reused."""
    server = smtp_server()
    m = mailer(sender_store, server, tmp_path, connections=3)
    result = asyncio.run(m.send_many(_messages(12)))
    assert result.counts == {"delivered": 12}
    assert 1 <= server.connections <= 3
    assert len(set(_message_ids(server))) == 12


def test_a_batch_survives_every_fault_and_delivers_each_message_once(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """421 at connect, 451 at RCPT, a drop mid-DATA, 451 after the data, a stall: each
    message of the batch still arrives exactly once, and the outbox ends empty. (A small
    message may be sent whole before the client sees the hang-up: then it is maybe-delivered,
    never resent by itself, and sending it on request delivers it once.)"""
    server = smtp_server(
        faults=[
            Fault("connect", "reply", 421, "4.3.2 busy"),
            Fault("rcpt", "reply", 451, "4.2.0 later", times=2),
            Fault("data", "drop"),
            Fault("data-end", "reply", 451, "4.3.0 try again"),
            Fault("mail", "stall", seconds=1.5),
        ]
    )
    # Enough attempts that one message meeting every fault in turn is still delivered.
    retry = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, jitter=0)
    m = mailer(sender_store, server, tmp_path, connections=2, command_timeout=0.5, retry=retry)
    result = asyncio.run(m.send_many(_messages(10)))
    maybe = result.counts.get("maybe-delivered", 0)
    assert result.counts == {"delivered": 10 - maybe, **({"maybe-delivered": 1} if maybe else {})}
    assert len(server.faults_fired) >= 5
    assert m.outbox is not None
    if maybe:
        (again,) = asyncio.run(m.send_outbox(maybe_delivered=True))
        assert again.status == "delivered"
    ids = _message_ids(server)
    assert sorted(ids) == sorted(o.message_id or "" for o in result.outcomes)
    assert len(m.outbox) == 0


def test_a_message_without_a_key_is_not_sent_and_the_others_are(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Fail closed per message: the one for a recipient without a key is ``not-sent`` (and
    not stored), the rest of the batch is delivered."""
    server = smtp_server()
    m = mailer(sender_store, server, tmp_path)
    batch = [*_messages(2), *_messages(1, to="nobody@example.com"), *_messages(2)]
    result = asyncio.run(m.send_many(batch))
    assert result.counts == {"delivered": 4, "not-sent": 1}
    (bad,) = [o for o in result.outcomes if o.status == "not-sent"]
    assert bad.index == 2 and "nobody@example.com: no key found" in bad.detail
    assert len(server.messages) == 4
    assert m.outbox is not None and len(m.outbox) == 0


def test_refused_credentials_stop_the_batch_and_keep_everything_for_later(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Wrong password: not retried, the batch stops with AuthenticationError (after recording
    every started message), the protected messages wait in the outbox, and `send_outbox` with
    the right password delivers them."""
    server = smtp_server(credentials={"alice": "right"})
    m = mailer(sender_store, server, tmp_path, username="alice", password="wrong")
    with pytest.raises(AuthenticationError) as info:
        asyncio.run(m.send_many(_messages(5), concurrency=1))
    result = info.value.result
    assert result.stopped_by is info.value
    assert result.counts.get("delivered", 0) == 0
    assert server.messages == []
    assert m.outbox is not None
    kept = m.outbox.items()
    assert kept and all(i.state is ItemState.QUEUED for i in kept)
    assert sum(len(o.kept) for o in result.outcomes) == len(kept)
    fixed = mailer(sender_store, server, tmp_path, username="alice", password="right")
    outcomes = asyncio.run(fixed.send_outbox())
    assert {o.status for o in outcomes} == {"delivered"}
    assert len(server.messages) == len(kept)
    assert fixed.outbox is not None and len(fixed.outbox) == 0


def test_sync_facade_mirrors_the_new_async_methods(sender_store: Keystore, tmp_path: Path) -> None:
    """Mailer offers send_many and send_outbox with AsyncMailer's parameters, and an outbox
    given as a path is opened by the mailer and closed with it."""
    for name in ("send_many", "send_outbox"):
        a = inspect.signature(getattr(AsyncMailer, name))
        s = inspect.signature(getattr(Mailer, name))
        assert list(a.parameters) == list(s.parameters), name
    with Mailer(keystore=sender_store, outbox=tmp_path / "o.sqlite3") as m:
        assert isinstance(m.outbox, Outbox) and len(m.outbox) == 0
    with pytest.raises(OutboxError):
        len(m.outbox)


def test_a_bug_in_the_transport_stops_the_run_and_keeps_the_copies(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """An unexpected exception while sending (a bug, not a delivery problem) does not hang
    the engine: it is raised, and the copies stay queued in the outbox."""
    server = smtp_server()
    m = mailer(sender_store, server, tmp_path)
    copies = protect(m, "bob@example.net")

    async def broken(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("e2email.transport.smtp.SMTPConnection.send", broken)
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(asyncio.wait_for(m.send_copies(copies), 20))
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.state is ItemState.QUEUED and item.raw is None
    assert server.messages == []


# -- review fixes: nothing stored before the run can start; secrets once; REQUIRETLS kept ----


def test_an_unresolvable_password_or_ca_file_fails_before_anything_is_stored(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """An unset password variable, a failing password command or a CA file that is not PEM
    is a ConfigError raised before the copies are stored: nothing waits in the outbox for a
    later `outbox retry` to deliver a second time after the user resent the message."""
    from e2email.config import password_from_command, password_from_env
    from e2email.errors import ConfigError

    server = smtp_server(credentials={"alice": "pw"})
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a certificate\n")
    cases: list[dict[str, object]] = [
        {"username": "alice", "password": password_from_env("E2EMAIL_TEST_UNSET_PW")},
        {"username": "alice", "password": password_from_command("exit 3")},
        {},
    ]
    for n, extra in enumerate(cases):
        m = mailer(sender_store, server, tmp_path / str(n), **extra)
        if not extra:
            assert m.smtp is not None
            m.smtp = replace(m.smtp, ca_file=bad_pem)
        copies = protect(m, "bob@example.net")
        with pytest.raises(ConfigError):
            asyncio.run(m.send_copies(copies))
        assert m.outbox is not None and len(m.outbox) == 0, extra
    assert server.messages == []


def test_an_error_after_storing_carries_the_kept_ids_whatever_its_class(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A secret source that stays lazy (a prompt) and fails after the copies were stored:
    the ConfigError says where they are (``result.kept``, ``unsent``), like a TransportError."""
    from e2email.errors import ConfigError

    class Prompt:
        interactive = True

        def __call__(self) -> str:
            raise ConfigError("no terminal to ask on")

    server = smtp_server(credentials={"alice": "pw"})
    m = mailer(sender_store, server, tmp_path, username="alice", password=Prompt())
    copies = protect(m, "bob@example.net")
    with pytest.raises(ConfigError) as info:
        asyncio.run(m.send_copies(copies))
    assert m.outbox is not None
    (item,) = m.outbox.items()
    err: Any = info.value
    assert err.result.kept == (item.id,)
    assert [c.outbox_id for c in err.unsent] == [item.id]
    assert item.state is ItemState.QUEUED


def test_the_password_is_resolved_once_per_run_off_the_event_loop(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Four connections share one resolution of the password source (a command is run once,
    a prompt asked once), and it runs in a worker thread, not on the event loop."""
    import threading

    calls: list[str] = []

    def source() -> str:
        calls.append(threading.current_thread().name)
        return "pw"

    server = smtp_server(credentials={"alice": "pw"})
    m = mailer(sender_store, server, tmp_path, username="alice", password=source)
    result = asyncio.run(m.send_many(_messages(6), connections=4))
    assert result.counts == {"delivered": 6}
    assert len(calls) == 1
    assert calls[0] != threading.main_thread().name


def test_require_tls_is_stored_with_the_copy_and_asked_for_on_retry(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A copy sent with require_tls to a server without REQUIRETLS stays in the outbox, and
    `send_outbox` with settings that do not ask for REQUIRETLS still asks for it (RFC 8689):
    the requirement belongs to the message, not to the run."""
    from e2email.errors import RequireTLSError

    plain = smtp_server()
    m = mailer(sender_store, plain, tmp_path, require_tls=True)
    copies = protect(m, "bob@example.net")
    with pytest.raises(RequireTLSError):
        asyncio.run(m.send_copies(copies))
    assert plain.messages == []
    strict = smtp_server(offer_requiretls=True)
    retry = mailer(sender_store, strict, tmp_path)
    (outcome,) = asyncio.run(retry.send_outbox())
    assert outcome.status == "delivered"
    (got,) = strict.messages
    assert got.requiretls and got.data == copies[0].raw


def test_an_outbox_that_cannot_be_written_ends_the_run_with_its_error(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Disk full: every settle and release of the outbox fails. The engine does not hang (it
    used to wait forever for a worker that had died): every submission gets an outcome, the
    run's error is the OutboxError, and the items are still in the outbox for a later run."""
    from e2email.delivery import DeliveryEngine, Submission
    from e2email.outbox import NewItem

    server = smtp_server()
    raw = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nhi\r\n"
    box = Outbox(tmp_path / "o.sqlite3")
    rcpts = [f"b{n}@example.net" for n in range(4)]
    ids = box.add(
        [
            NewItem(raw=raw, mail_from="a@example.org", recipients=(r,), message_id=f"<{r}>")
            for r in rcpts
        ]
    )
    outcomes: list[object] = []

    def full(*args: object, **kwargs: object) -> bool:
        raise OutboxError("outbox: database or disk is full")

    async def run() -> DeliveryEngine:
        engine = DeliveryEngine(
            settings(server), outbox=box, on_outcome=outcomes.append, retry=FAST
        )
        async with engine:
            for item_id, rcpt in zip(ids, rcpts, strict=True):
                await engine.submit(
                    Submission(raw=raw, mail_from="a@example.org", recipients=(rcpt,), id=item_id)
                )
        return engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(box, "settle", full)
        engine = asyncio.run(asyncio.wait_for(run(), 10))
    assert isinstance(engine.fatal, OutboxError)
    assert len(outcomes) == len(ids)
    assert len(box.items()) == len(ids)


def test_cancelling_send_stops_delivery_and_gives_the_claim_back(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Cancelling send() while the server sits on DATA stops at once: no worker task is left
    running, the connection is dropped without waiting for the server, and the copy is back
    in the outbox with the interruption as its last error: maybe-delivered, since the
    cancel came after its final "." (the old code queued it to be sent again)."""
    from e2email.config import Protection

    server = smtp_server(faults=[Fault("data-end", "stall", seconds=5)])
    m = mailer(sender_store, server, tmp_path)
    m.protection = Protection(sign=False, encrypt=False)
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="x")

    async def run() -> tuple[list[asyncio.Task[object]], float]:
        task = asyncio.create_task(m.send(message))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - start
        await asyncio.sleep(0.05)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()], took

    left, took = asyncio.run(run())
    assert left == []
    assert took < 2
    assert m.outbox is not None
    (item,) = m.outbox.items()
    assert item.state is ItemState.MAYBE_DELIVERED
    assert item.last_error is not None and "interrupted after the end" in item.last_error
    assert m.outbox.claim() == ()  # not taken by a plain retry
