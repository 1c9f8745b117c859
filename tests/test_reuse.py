"""Connection reuse without a round trip to spare: no RSET after a transaction the server
accepted (RFC 5321 §4.1.1.4: its 250 to the end of data already reset the state), RSET after
anything else or after idling, and a connection the server closed between messages replaced
at once without counting an attempt. Raw submissions (no crypto): only the SMTP exchange is
under test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from e2email import SMTPSettings, TLSMode
from e2email import delivery as delivery_module
from e2email.config import RetryPolicy
from e2email.delivery import Submission, deliver
from e2email.outcome import CopyOutcome
from e2email.testing import Fault, FaultStage, LoopbackSMTPServer, TestCA

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0)


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def smtp_server(
    request: pytest.FixtureRequest, smtp_server: Callable[..., LoopbackSMTPServer]
) -> Callable[..., LoopbackSMTPServer]:
    """Every test here twice: against a server without PIPELINING and one offering it (RFC
    2920, as Postfix does): the reuse rules are the same either way."""

    def make(**kwargs: Any) -> LoopbackSMTPServer:
        kwargs.setdefault("offer_pipelining", request.param)
        return smtp_server(**kwargs)

    return make


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=10
    )


def _subs(n: int, *, to: Sequence[str] = ("bob@example.net",)) -> list[Submission]:
    return [
        Submission(
            raw=f"From: a@example.org\r\nSubject: n{i}\r\n\r\nbody {i}\r\n".encode(),
            mail_from="a@example.org",
            recipients=tuple(to),
        )
        for i in range(n)
    ]


def _send(server: LoopbackSMTPServer, subs: list[Submission]) -> list[CopyOutcome]:
    outcomes, fatal = asyncio.run(deliver(_settings(server), subs, retry=FAST, connections=1))
    assert fatal is None
    return sorted(outcomes, key=lambda o: subs.index(o.submission))


def test_no_rset_after_an_accepted_transaction(
    smtp_server: Callable[..., LoopbackSMTPServer],
) -> None:
    """Four messages over one connection: MAIL follows the previous 250 at once."""
    server = smtp_server()
    outcomes = _send(server, _subs(4))
    assert [o.status for o in outcomes] == ["delivered"] * 4
    assert [o.attempts for o in outcomes] == [1] * 4
    assert server.received_commands() == ["EHLO", *["MAIL", "RCPT", "DATA"] * 4, "QUIT"]
    assert server.connections == 1 and len(server.messages) == 4


def test_rset_after_a_refused_transaction_and_the_next_message_still_goes(
    smtp_server: Callable[..., LoopbackSMTPServer],
) -> None:
    """A refused end of data (no 250, so no reset by the server): one RSET (the transport's,
    which the next message does not repeat), then the next message is delivered over the same
    connection; per-recipient results."""
    server = smtp_server(faults=[Fault("data-end", "reply", 554, "5.6.0 no thanks")])
    outcomes = _send(server, _subs(3, to=("bob@example.net", "carol@example.com")))
    assert [o.status for o in outcomes] == ["failed", "delivered", "delivered"]
    assert [r.status for r in outcomes[0].recipients] == ["failed", "failed"]
    assert outcomes[0].recipients[0].reply is not None
    assert outcomes[0].recipients[0].reply.code == 554
    assert [r.address for r in outcomes[1].recipients] == ["bob@example.net", "carol@example.com"]
    verbs = server.received_commands()
    first_end = verbs.index("DATA")
    assert "RSET" in verbs[first_end:]
    assert verbs.count("RSET") == 1 and verbs.count("MAIL") == 3
    assert server.connections == 1 and len(server.messages) == 2


def test_rset_checks_a_connection_that_sat_idle(
    smtp_server: Callable[..., LoopbackSMTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PROBE_AFTER_IDLE (here: zero seconds) the connection is checked with RSET before
    it carries the next message."""
    monkeypatch.setattr(delivery_module, "PROBE_AFTER_IDLE", 0.0)
    server = smtp_server()
    outcomes = _send(server, _subs(3))
    assert [o.status for o in outcomes] == ["delivered"] * 3
    assert server.received_commands() == [
        "EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT",
        "DATA", "QUIT",
    ]  # fmt: skip


class _ClosesAtMail(LoopbackSMTPServer):
    """Closes the session when MAIL number ``at`` (and, with ``every``, each later one)
    arrives on a connection that already carried a message: as a server whose idle timeout
    or per-session limit struck between two transactions."""

    def __init__(self, fault: Fault, *, at: int = 2, every: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self._fault = fault
        self._at = at
        self._every = every
        self.mails = 0

    def _take_fault(self, stage: FaultStage, address: str | None = None) -> Fault | None:
        if stage != "mail":
            return super()._take_fault(stage, address)
        self.mails += 1
        if self.mails == self._at or (self._every and self.mails > self._at):
            self.faults_fired.append(self._fault)
            return self._fault
        return None


@pytest.mark.parametrize(
    "fault",
    [Fault("mail", "drop"), Fault("mail", "reply", 421, "4.4.2 idle too long, closing")],
    ids=["drop", "421"],
)
@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
def test_a_connection_closed_between_messages_is_replaced_without_an_attempt(
    module_ca: TestCA, fault: Fault, pipelining: bool
) -> None:
    """The server closed the reused connection when the next MAIL came (nothing of that
    message reached it): the copy goes over a new connection at once, as its first attempt,
    and is delivered once."""
    with _ClosesAtMail(fault, ca=module_ca, offer_pipelining=pipelining) as server:
        outcomes = _send(server, _subs(3))
        assert [o.status for o in outcomes] == ["delivered"] * 3
        assert [o.attempts for o in outcomes] == [1, 1, 1]
        assert server.faults_fired == [fault]
        assert server.connections == 2 and len(server.messages) == 3


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
def test_a_new_connection_that_fails_at_mail_counts_as_an_attempt(
    module_ca: TestCA, pipelining: bool
) -> None:
    """Only a reused, unchecked connection is replaced for free: when the new one fails at
    MAIL too, that is an attempt, retried up to the limit (no endless reconnecting)."""
    with _ClosesAtMail(
        Fault("mail", "drop"), every=True, ca=module_ca, offer_pipelining=pipelining
    ) as server:
        outcomes = _send(server, _subs(2))
        assert [o.status for o in outcomes] == ["delivered", "deferred"]
        assert outcomes[1].attempts == FAST.max_attempts
        assert len(server.messages) == 1


def test_envelope_addresses_are_judged_once_and_bad_ones_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bulk run's envelope is checked without parsing the same address per message; an
    address that failed is refused each time it comes, with its reason."""
    from e2email.errors import MessageError
    from e2email.transport import smtp

    calls: list[str] = []
    real = smtp.email.utils.parseaddr

    def counting(address: str, *args: Any, **kw: Any) -> tuple[str, str]:
        calls.append(address)
        return real(address, *args, **kw)

    monkeypatch.setattr(smtp.email.utils, "parseaddr", counting)
    monkeypatch.setattr(smtp, "_GOOD_ADDRESSES", {})
    for _ in range(3):
        assert smtp._check_envelope("a@example.org", ["b@example.net"]) == ("b@example.net",)
    assert sorted(calls) == ["a@example.org", "b@example.net"]
    for _ in range(2):
        with pytest.raises(MessageError, match="not a plain addr-spec"):
            smtp._check_envelope("a@example.org", ["b(c)@example.net"])
    assert calls.count("b(c)@example.net") == 2


# -- the in-flight mark ------------------------------------------------------------------------


def _outbox_run(
    server: LoopbackSMTPServer,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    *,
    fail: bool = False,
) -> tuple[list[CopyOutcome], list[str], Any]:
    """Two small copies stored in an outbox and delivered over one connection; the in-flight
    marks are recorded (and, with ``fail``, the first one fails like a full disk)."""
    from e2email.outbox import NewItem, Outbox, OutboxError

    box = Outbox(tmp_path / "o.sqlite3")
    marks: list[str] = []
    real = box.mark_in_flight

    def mark(item_id: str) -> None:
        marks.append(item_id)
        if fail and len(marks) == 1:
            raise OutboxError("disk full")
        real(item_id)

    monkeypatch.setattr(box, "mark_in_flight", mark)
    raws = [s.raw for s in _subs(2)]
    ids = box.add(
        [
            NewItem(
                raw=r, mail_from="a@example.org", recipients=("bob@example.net",), message_id="m"
            )
            for r in raws
        ]
    )
    subs = [
        Submission(raw=r, mail_from="a@example.org", recipients=("bob@example.net",), id=i)
        for r, i in zip(raws, ids, strict=True)
    ]
    # A short command timeout: the connection left in the middle of DATA is closed after it.
    smtp = replace(_settings(server), timeout=1)
    outcomes, _ = asyncio.run(deliver(smtp, subs, retry=FAST, connections=1, outbox=box))
    return sorted(outcomes, key=lambda o: subs.index(o.submission)), marks, box


def test_no_end_of_data_when_the_in_flight_mark_cannot_be_written(
    smtp_server: Callable[..., LoopbackSMTPServer], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-flight mark fails (disk full): that copy's "." is never sent, so the server does
    not have it, and it stays in the outbox; the next copy goes as usual."""
    server = smtp_server()
    outcomes, marks, box = _outbox_run(server, tmp_path, monkeypatch, fail=True)
    assert marks == [o.submission.id for o in outcomes]
    # Only the second copy reached the server: the first one's "." never went out.
    assert len(server.messages) == 1
    assert b"Subject: n1\r\n" in server.messages[0].data
    assert outcomes[0].status != "delivered" and outcomes[0].kept
    assert outcomes[1].status == "delivered"
    assert [i.id for i in box.items()] == [outcomes[0].submission.id]
    box.close()


def test_a_batch_parses_each_envelope_address_once(
    smtp_server: Callable[..., LoopbackSMTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAIL and RCPT go out as the checked addresses are, not parsed again per message
    (aiosmtplib's mail()/rcpt() parsed each address of each message once more)."""
    from e2email.transport import smtp

    server = smtp_server()
    calls: list[str] = []
    real = smtp.email.utils.parseaddr

    def counting(address: str, *args: Any, **kw: Any) -> tuple[str, str]:
        calls.append(address)
        return real(address, *args, **kw)

    monkeypatch.setattr(smtp, "_GOOD_ADDRESSES", {})
    monkeypatch.setattr(smtp.email.utils, "parseaddr", counting)
    outcomes = _send(server, _subs(4))
    assert [o.status for o in outcomes] == ["delivered"] * 4
    assert calls.count("a@example.org") == 1 and calls.count("bob@example.net") == 1
    assert all(m.mail_from == "a@example.org" for m in server.messages)
    assert all(m.rcpt_tos == ("bob@example.net",) for m in server.messages)
    assert all(any(o.startswith("SIZE=") for o in m.mail_options) for m in server.messages)


def test_each_outcome_is_reported_after_the_outbox_recorded_it(
    smtp_server: Callable[..., LoopbackSMTPServer], tmp_path: Any
) -> None:
    """The record of an accepted copy runs beside the next transaction, but its outcome is
    still reported only once the outbox has it: the item is gone when the report comes."""
    from e2email.delivery import DeliveryEngine
    from e2email.outbox import NewItem, Outbox, OutboxError

    server = smtp_server()
    box = Outbox(tmp_path / "o.sqlite3")
    subs = _subs(5)
    ids = box.add(
        [
            NewItem(raw=s.raw, mail_from=s.mail_from, recipients=s.recipients, message_id="m")
            for s in subs
        ]
    )
    seen: list[tuple[str, bool]] = []

    def report(outcome: CopyOutcome) -> None:
        try:
            box.get(outcome.submission.id, raw=False)
        except OutboxError:
            seen.append((outcome.status, True))
        else:
            seen.append((outcome.status, False))

    async def run() -> None:
        async with DeliveryEngine(
            _settings(server), connections=1, outbox=box, on_outcome=report
        ) as engine:
            for sub, item_id in zip(subs, ids, strict=True):
                await engine.submit(replace(sub, id=item_id))

    asyncio.run(run())
    assert seen == [("delivered", True)] * 5
    assert len(box) == 0 and len(server.messages) == 5
    box.close()
