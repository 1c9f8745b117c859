"""One outcome type from the transport to the CLI (issue 9, part 1): the transport's value for
each recipient (its status and the server's exact reply) is what ``send()``, ``send_many()``,
the error raised after a partial send and the CLI's JSON report carry, unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_bulk import bulk_home  # noqa: F401  (a fixture: a home with Alice's and Carol's keys)
from test_cli import e2email, send_args

import e2email as api
from e2email import (
    AsyncMailer,
    Message,
    RecipientsRefusedError,
    SMTPReply,
    SMTPSettings,
    TLSMode,
)
from e2email.outcome import CopyOutcome, MessageOutcome, RecipientOutcome
from e2email.testing import LoopbackSMTPServer, MockProtector
from e2email.transport.smtp import SMTPConnection, SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

BOB, CAROL = "bob@example.net", "carol@example.com"
REFUSAL = SMTPReply(550, "5.1.1 no such user")


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


def _message() -> Message:
    return Message(sender="app@example.org", to=[BOB, CAROL], subject="Hi", text="hi")


@pytest.fixture
def refusing(smtp_server: ServerFactory) -> LoopbackSMTPServer:
    return smtp_server(tls="implicit", refuse_recipients={CAROL: (550, "5.1.1 no such user")})


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[CopyOutcome]:
    """Every transaction's result as the transport returned it (the real method, recorded)."""
    seen: list[CopyOutcome] = []
    real = SMTPConnection.send

    async def recording(self: SMTPConnection, *args: Any, **kwargs: Any) -> CopyOutcome:
        result = await real(self, *args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(SMTPConnection, "send", recording)
    return seen


def test_the_transport_reports_each_rcpt_as_a_recipient_outcome(
    refusing: LoopbackSMTPServer,
) -> None:
    """One transaction: the refused RCPT is ``failed`` (5xx) with the server's exact reply, the
    accepted one ``delivered`` with DATA's reply; nothing raised for a partial refusal."""
    raw = b"From: app@example.org\r\nSubject: x\r\n\r\nhi\r\n"
    result = asyncio.run(
        SMTPTransport(_settings(refusing)).send(
            raw, mail_from="app@example.org", recipients=[BOB, CAROL]
        )
    )
    assert isinstance(result, CopyOutcome)
    bob, carol = result.recipients
    assert carol == RecipientOutcome(CAROL, "failed", REFUSAL, f"refused: {REFUSAL}")
    assert bob.status == "delivered" and bob.reply == result.data_reply
    assert result.data_reply is not None and result.data_reply.code == 250
    assert result.accepted == (BOB,) and result.refused == (carol,)
    # A 4xx refusal is "deferred" (RFC 5321 §4.2.1: the same command may succeed later).
    later = RecipientOutcome.refused(CAROL, SMTPReply(450, "4.2.1 try later"))
    assert later.status == "deferred" and not later.accepted


def test_send_and_send_many_carry_the_transports_recipient_values_unchanged(
    refusing: LoopbackSMTPServer, transactions: list[CopyOutcome]
) -> None:
    """``send()`` raises after the partial send with a typed ``result`` (a MessageOutcome) and
    ``unsent``; ``send_many()`` returns a MessageOutcome for the message: in both, each
    recipient's value is the very object the transport made."""
    mailer = AsyncMailer(smtp=_settings(refusing), protector=MockProtector())

    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(mailer.send(_message()))
    err = info.value
    sent = err.result
    assert isinstance(sent, MessageOutcome)
    assert sent.status == "partial" and sent.accepted == (BOB,)
    assert sent.refused == {CAROL: REFUSAL} and sent.unsent == (CAROL,)
    assert err.unsent_recipients == (CAROL,) and [c.recipients for c in err.unsent] == [(CAROL,)]
    (copy,) = sent.copies
    assert isinstance(copy, CopyOutcome) and copy.kind == "main" and copy.copy is not None
    (transaction,) = transactions
    assert all(a is b for a, b in zip(sent.recipients, transaction.recipients, strict=True))
    assert copy.data_reply == transaction.data_reply and copy.tls == transaction.tls

    transactions.clear()
    batch = asyncio.run(mailer.send_many([_message()]))
    (outcome,) = batch.outcomes
    assert isinstance(outcome, MessageOutcome) and outcome.status == "partial"
    (transaction,) = transactions
    assert all(a is b for a, b in zip(outcome.recipients, transaction.recipients, strict=True))
    # The same value for the refused recipient whichever way the message went (the accepted
    # one's differs only by the server's queue ID in DATA's reply).
    assert outcome.recipients[1] == sent.recipients[1] == RecipientOutcome.refused(CAROL, REFUSAL)
    assert outcome.copies[0].recipients == outcome.recipients


def test_send_returns_a_message_outcome(smtp_server: ServerFactory) -> None:
    """A delivered message: ``send()`` returns the same type ``send_many()`` does."""
    server = smtp_server(tls="implicit")
    mailer = AsyncMailer(smtp=_settings(server), protector=MockProtector())
    result = asyncio.run(mailer.send(_message()))
    assert isinstance(result, MessageOutcome)
    assert result.status == "delivered" and result.accepted == (BOB, CAROL)
    assert result.message_id is not None and result.refused == {} and result.kept == ()
    assert [r.reply == result.copies[0].data_reply for r in result.recipients] == [True, True]


def test_old_names_are_the_new_types() -> None:
    """Deprecated names stay importable for a release, as the one type (not a re-wrapping)."""
    from e2email.client import CopyResult, SendResult
    from e2email.delivery import Outcome
    from e2email.transport.smtp import DeliveryResult, RecipientResult

    assert SendResult is MessageOutcome and api.SendResult is MessageOutcome
    assert CopyResult is CopyOutcome and DeliveryResult is CopyOutcome and Outcome is CopyOutcome
    assert RecipientResult is RecipientOutcome
    assert api.CopyOutcome is CopyOutcome and api.RecipientOutcome is RecipientOutcome
    one = CopyOutcome(recipients=(RecipientOutcome(BOB, "delivered"),))
    assert one.delivery is one and one.recipients[0].accepted


def test_the_cli_report_shows_the_transports_reply(
    bulk_home: Path,  # noqa: F811
    smtp_server: ServerFactory,
    tmp_path: Path,
) -> None:
    """The CLI's JSON report names the refused recipient with the status and the exact reply
    the transport recorded (what ``send_many()`` returns), through a real process."""
    server = smtp_server(refuse_recipients={CAROL: (550, "5.1.1 no such user")})
    rows = tmp_path / "rows.csv"
    rows.write_text(f"email\n{BOB}\n{CAROL}\n")
    report = tmp_path / "report.json"
    args = send_args(
        server, "--to-file", str(rows), "--subject", "S", "--body", "B", "--report", str(report)
    )
    done = e2email(*args, home=bulk_home)
    assert done.returncode == 6, done.stderr
    entries = {e["email"]: e for e in json.loads(report.read_text())}
    assert entries[BOB]["status"] == "delivered"
    refused = RecipientOutcome.refused(CAROL, REFUSAL)
    assert entries[CAROL]["status"] == refused.status == "failed"
    assert entries[CAROL]["detail"] == f"{CAROL}: {refused.error}"
