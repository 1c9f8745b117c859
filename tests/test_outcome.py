"""One outcome type from the transport to the CLI (issue 9, part 1): the transport's value for
each recipient (its status and the server's exact reply) is what ``send()``, ``send_many()``,
the error raised after a partial send and the CLI's JSON report carry, unchanged."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import subprocess
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_bulk import bulk_home  # noqa: F401  (a fixture: a home with Alice's and Carol's keys)
from test_cli import e2email, send_args

import e2email as api
import e2email.client as client_module
import e2email.transport as transport_package
from e2email import (
    AsyncMailer,
    Message,
    Protection,
    RecipientsRefusedError,
    RetryPolicy,
    SMTPReply,
    SMTPSettings,
    TLSMode,
)
from e2email import errors as E
from e2email.crypto.base import CopyKind, ProtectedCopy
from e2email.outbox import OutboxError
from e2email.outcome import (
    BatchResult,
    CopyOutcome,
    MessageOutcome,
    RecipientOutcome,
    TLSInfo,
)
from e2email.spool import Spool
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
    later = RecipientOutcome.from_refusal(CAROL, SMTPReply(450, "4.2.1 try later"))
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
    assert (
        outcome.recipients[1] == sent.recipients[1] == RecipientOutcome.from_refusal(CAROL, REFUSAL)
    )
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


def test_old_names_are_the_new_types_and_warn() -> None:
    """Deprecated names stay importable for a release, as the one type (not a re-wrapping),
    and importing them from outside e2email warns."""
    with pytest.warns(DeprecationWarning, match=r"client\.CopyResult is deprecated"):
        from e2email.client import CopyResult
    with pytest.warns(DeprecationWarning, match=r"client\.SendResult is deprecated"):
        from e2email.client import SendResult
    with pytest.warns(DeprecationWarning, match=r"delivery\.Outcome is deprecated"):
        from e2email.delivery import Outcome
    with pytest.warns(DeprecationWarning, match=r"smtp\.DeliveryResult is deprecated"):
        from e2email.transport.smtp import DeliveryResult
    with pytest.warns(DeprecationWarning, match=r"smtp\.RecipientResult is deprecated"):
        from e2email.transport.smtp import RecipientResult

    with pytest.warns(DeprecationWarning, match=r"e2email\.SendResult is deprecated"):
        assert api.SendResult is MessageOutcome
    with pytest.warns(DeprecationWarning, match=r"transport\.DeliveryResult is deprecated"):
        assert transport_package.DeliveryResult is CopyOutcome
    assert "SendResult" not in dir(api) and "SendResult" not in api.__all__
    assert SendResult is MessageOutcome
    assert CopyResult is CopyOutcome and DeliveryResult is CopyOutcome and Outcome is CopyOutcome
    assert RecipientResult is RecipientOutcome
    assert api.CopyOutcome is CopyOutcome and api.RecipientOutcome is RecipientOutcome
    one = CopyOutcome(recipients=(RecipientOutcome(BOB, "delivered"),))
    assert one.delivery is one and one.recipients[0].accepted
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        _ = client_module.Nothing  # type: ignore[attr-defined]


def test_importing_e2email_does_not_warn() -> None:
    """The package's own re-exports of the old names stay silent: an application run with
    ``-W error::DeprecationWarning`` can still import e2email."""
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c",
         "import e2email, e2email.transport, e2email.client, e2email.delivery"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_old_positional_constructors_fail_loudly() -> None:
    """The old positional forms gave wrong values silently (a bool as the status, the sender
    as the recipients, the Message-ID as the index); now they raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from e2email.client import CopyResult, SendResult
        from e2email.transport.smtp import DeliveryResult, RecipientResult

    with pytest.raises(TypeError, match="status must be one of"):
        RecipientResult(BOB, True, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status must be one of"):
        RecipientOutcome(BOB, "accepted")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeliveryResult("app@example.org", (), None, None)  # type: ignore[misc]
    with pytest.raises(TypeError):
        SendResult("<m@x>", ())  # type: ignore[misc]
    with pytest.raises(TypeError):
        CopyResult(None, CopyOutcome(recipients=()))  # type: ignore[misc]
    with pytest.raises(ValueError, match="status must be one of"):
        MessageOutcome(status="sent")  # type: ignore[arg-type]


def test_a_message_outcome_made_from_copies_takes_its_status_from_them() -> None:
    """The old ``SendResult(message_id=..., copies=..., kept=())`` call with a refused recipient
    said ``delivered`` (Django's backend took that for success); the status, recipients, kept
    IDs and error now come from the copies, and there is no default status."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from e2email.client import SendResult

    failure = E.DeliveryError("refused", reply=REFUSAL)
    copy = CopyOutcome(
        recipients=(
            RecipientOutcome(BOB, "delivered"),
            RecipientOutcome(CAROL, "failed", REFUSAL, f"refused: {REFUSAL}"),
        ),
        id="item-1",
        kept=True,
        error=failure,
    )
    made = SendResult(message_id="<m@x>", copies=(copy,), kept=())
    assert isinstance(made, MessageOutcome)
    assert made.status == "partial" and made.accepted == (BOB,) and made.unsent == (CAROL,)
    assert made.recipients == copy.recipients and made.refused == {CAROL: REFUSAL}
    assert made.kept == ("item-1",) and made.error is None
    assert MessageOutcome.of_copies((copy,), message_id="<m@x>").error is failure
    every = CopyOutcome(recipients=(RecipientOutcome.from_refusal(BOB, SMTPReply(450, "later")),))
    assert MessageOutcome(copies=(every,)).status == "deferred"
    with pytest.raises(TypeError, match="needs a status"):
        MessageOutcome(message_id="<m@x>")


def test_from_refusal_and_no_refused_on_an_outcome() -> None:
    """``refused`` read from an outcome would be a bound method, always true: the class
    method is ``from_refusal``, and an outcome has no ``refused``."""
    outcome = RecipientOutcome.from_refusal(BOB, REFUSAL)
    assert outcome.status == "failed" and outcome.reply == REFUSAL
    assert RecipientOutcome.from_refusal(BOB, SMTPReply(450, "4.2.1 busy")).status == "deferred"
    assert not hasattr(outcome, "refused")
    assert not hasattr(RecipientOutcome, "refused")


class _SpoolingProtector(MockProtector):
    """MockProtector whose copies are spooled in private files in ``directory`` (as large
    copies are)."""

    directory: Path
    #: The most spool files seen open at once (proves the copies were spooled).
    peak = 0

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        copies = await super().protect(message, protection, passphrase=passphrase)
        spooled = []
        for c in copies:
            spool = Spool(self.directory, memory_max=0)
            spool.write(c.raw)
            spooled.append(replace(c, content=spool))
        self.peak = max(self.peak, _open_files_in(self.directory))
        return tuple(spooled)


def _reachable(root: object) -> Iterator[object]:
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        yield obj
        todo.extend(gc.get_referents(obj))


def _open_files_in(directory: Path) -> int:
    """This process's file descriptors open on a file in ``directory``."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the listing's own descriptor, closed already
    return sum(link.startswith(f"{directory}/") for link in links)


@pytest.mark.parametrize("spooled", [False, True])
def test_send_many_outcomes_hold_no_message_bytes(
    smtp_server: ServerFactory, tmp_path: Path, spooled: bool
) -> None:
    """A batch's outcomes (collected when there is no ``on_outcome``) keep none of the
    protected copies' bytes reachable and no spool file open: each copy's ``id``, ``tag`` and
    ``kind`` are plain fields, without the submission or the copy."""
    server = smtp_server(tls="implicit")
    protector = MockProtector()
    if spooled:
        protector = _SpoolingProtector()
        protector.directory = tmp_path
    mailer = AsyncMailer(smtp=_settings(server), protector=protector)
    big = Message(sender="app@example.org", to=[BOB], bcc=[CAROL], subject="x", text="y" * 200_000)
    batch = asyncio.run(mailer.send_many([big, big, big]))
    gc.collect()
    assert batch.counts == {"delivered": 3}
    copies = [c for o in batch.outcomes for c in o.copies]
    assert len(copies) == 6 and {c.kind for c in copies} == {"main", "bcc"}
    assert all(c.submission is None and c.copy is None and c.id for c in copies)
    held = [o for o in _reachable(batch) if isinstance(o, (bytes, bytearray, memoryview, Spool))]
    assert sum(len(o) if not isinstance(o, Spool) else 1 << 30 for o in held) < 10_000
    assert _open_files_in(tmp_path) == 0
    if isinstance(protector, _SpoolingProtector):  # the copies were in files while alive
        assert protector.peak >= 2


def test_send_keeps_the_copy_but_not_the_submission(smtp_server: ServerFactory) -> None:
    """``send()``'s copies keep ``copy`` (the old ``CopyResult.copy``), once: no submission."""
    server = smtp_server(tls="implicit")
    mailer = AsyncMailer(smtp=_settings(server), protector=MockProtector())
    result = asyncio.run(mailer.send(_message()))
    (copy,) = result.copies
    assert copy.copy is not None and copy.kind == copy.copy.kind == "main"
    assert copy.submission is None and copy.tag is None and copy.id


def test_the_outcome_types_hints_resolve() -> None:
    """``typing.get_type_hints()`` (pydantic, cattrs...) resolves every field of every type."""
    for cls in (RecipientOutcome, CopyOutcome, MessageOutcome, BatchResult, TLSInfo):
        typing.get_type_hints(cls)
    hints = typing.get_type_hints(CopyOutcome)
    assert hints["kind"] == CopyKind | None and hints["copy"] == ProtectedCopy | None


def test_a_not_sent_message_names_every_recipient(smtp_server: ServerFactory) -> None:
    """A message that could not be protected: every To, Cc and Bcc address is ``failed`` for
    that reason, so ``unsent`` names them all."""
    server = smtp_server(tls="implicit")
    mailer = AsyncMailer(smtp=_settings(server), protector=MockProtector(refuse={CAROL: "revoked"}))
    message = Message(
        sender="app@example.org", to=[BOB], cc=[CAROL], bcc=["dan@example.com"], subject="s",
        text="t",
    )  # fmt: skip
    (outcome,) = asyncio.run(mailer.send_many([message])).outcomes
    assert outcome.status == "not-sent" and isinstance(outcome.error, E.RecipientKeyError)
    assert outcome.unsent == (BOB, CAROL, "dan@example.com") and outcome.accepted == ()
    assert {r.status for r in outcome.recipients} == {"failed"}
    assert all(r.error == str(outcome.error) for r in outcome.recipients)


def test_the_result_of_a_failed_send_names_its_recipients_without_a_cycle(
    smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the delivery run itself raises, the error's ``result`` lists every recipient of
    the copies and does not point back to the error (no reference cycle)."""
    server = smtp_server(tls="implicit")
    mailer = AsyncMailer(smtp=_settings(server), protector=MockProtector())

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OutboxError("the outbox cannot be written")

    monkeypatch.setattr("e2email.client.deliver", broken)
    with pytest.raises(OutboxError) as info:
        asyncio.run(mailer.send(_message()))
    result = info.value.result
    assert isinstance(result, MessageOutcome) and result.status == "failed"
    assert result.error is None and result.unsent == (BOB, CAROL)
    assert [r.error for r in result.recipients] == [str(info.value)] * 2
    assert info.value.unsent_recipients == (BOB, CAROL)


def _round_trip(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value))


def _same_error(back: BaseException, err: BaseException) -> None:
    assert type(back) is type(err) and back.args == err.args and str(back) == str(err)
    assert vars(back) == vars(err)


def test_outcomes_and_errors_pickle(smtp_server: ServerFactory) -> None:
    """Each outcome type and each error, as the usual scenarios make them, come back equal
    from pickle (a refused send()'s error and its ``result``; a batch with a not-sent message;
    every error class with its attributes)."""
    server = smtp_server(tls="implicit", refuse_recipients={BOB: (550, "no"), CAROL: (550, "no")})
    mailer = AsyncMailer(smtp=_settings(server), protector=MockProtector())
    with pytest.raises(RecipientsRefusedError) as info:
        asyncio.run(mailer.send(_message()))
    err = info.value
    assert isinstance(err.result, MessageOutcome) and err.result.status == "failed"
    assert _round_trip(err.result) == err.result
    _same_error(_round_trip(err), err)
    assert _round_trip(err).refused == err.refused and _round_trip(err).result == err.result
    (copy,) = err.result.copies
    assert _round_trip(copy) == copy and _round_trip(copy.recipients[0]) == copy.recipients[0]

    refusing = MockProtector(refuse={CAROL: "revoked"})
    mailer = AsyncMailer(smtp=_settings(server), protector=refusing)
    batch = asyncio.run(mailer.send_many([_message()]))
    assert _round_trip(batch) == batch and batch.outcomes[0].status == "not-sent"

    problem = E.KeyProblem(BOB, E.KeyReason.REVOKED, "since 2026", "ABCD")
    errors: list[E.E2EmailError] = [
        E.E2EmailError("plain"),
        E.ConfigError("bad port"),
        E.InsecureTransportError("no TLS"),
        E.InsecurePathError("loose", path=Path("/tmp/x")),
        E.MessageError("bad address", field="to"),
        E.RecipientKeyError([problem, E.KeyProblem(CAROL, E.KeyReason.NOT_FOUND)]),
        E.HeldError([problem]),
        E.SignerKeyError(problem),
        E.PassphraseError("wrong", fingerprint="ABCD", missing=True),
        E.KeystoreError("import failed"),
        E.CryptoError("gpg failed"),
        E.TransportError("failed", host="h", reply=SMTPReply(451, "later")),
        E.ConnectError("refused", host="h"),
        E.TLSError("certificate not verified", host="h", transient=False),
        E.RequireTLSError("no REQUIRETLS", host="h"),
        E.AuthenticationError("refused", host="h", reply=SMTPReply(535, "no")),
        E.DeliveryError("refused the data", host="h", reply=SMTPReply(554, "no")),
        E.RecipientsRefusedError([(BOB, REFUSAL)], host="h", accepted=[CAROL]),
        OutboxError("locked"),
    ]
    for error in errors:
        back = _round_trip(error)
        _same_error(back, error)
    assert _round_trip(errors[5]).addresses == (BOB, CAROL)
    assert str(_round_trip(errors[7])) == f"cannot sign: {problem}"
    assert _round_trip(errors[-2]).accepted == (CAROL,)
    assert _round_trip(errors[11]).transient and not _round_trip(errors[13]).transient


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
    refused = RecipientOutcome.from_refusal(CAROL, REFUSAL)
    assert entries[CAROL]["status"] == refused.status == "failed"
    assert entries[CAROL]["detail"] == f"{CAROL}: {refused.error}"


def test_a_django_message_kept_when_the_broker_is_down_names_its_recipients(
    tmp_path: Path,
) -> None:
    """The Django backend's queue path: the broker unreachable, the protected copies kept in
    the outbox; the ``not-sent`` outcome lists each recipient, waiting there (deferred)."""
    pytest.importorskip("django")
    from e2email.django import _enqueue, _Prepared

    class DownQueue:
        def enqueue(self, copies: Any, *, account: str | None) -> Any:
            raise E.ConnectError("the broker is unreachable", host="broker")

    settings = SMTPSettings(host="127.0.0.1", port=1, tls=TLSMode.IMPLICIT)
    mailer = AsyncMailer(smtp=settings, protector=MockProtector(), outbox=tmp_path / "o.sqlite3")
    try:
        p = _Prepared(
            raw=b"From: app@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nhi\r\n",
            envelope_from="app@example.org",
            recipients=[BOB, CAROL],
            bcc=[CAROL],
            protection=mailer.protection,
            policy_key=None,
        )
        outcome = asyncio.run(_enqueue(DownQueue(), mailer, p, account=None))
    finally:
        mailer.close()
    assert outcome.status == "not-sent" and len(outcome.kept) == 2
    assert set(outcome.unsent) == {BOB, CAROL} and outcome.accepted == ()
    assert {r.status for r in outcome.recipients} == {"deferred"}


def test_the_error_of_a_failed_connection_and_its_result_make_no_cycle(
    smtp_server: ServerFactory,
) -> None:
    """A certificate that does not verify: the TLSError raised by ``send()`` carries the
    message's outcome, whose ``error`` does not point back to it."""
    server = smtp_server(tls="implicit")
    wrong = SMTPSettings(host=server.host, port=server.port, tls=TLSMode.IMPLICIT)
    mailer = AsyncMailer(smtp=wrong, protector=MockProtector(), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(E.TLSError) as info:
        asyncio.run(mailer.send(_message()))
    result = info.value.result
    assert isinstance(result, MessageOutcome) and result.unsent == (BOB, CAROL)
    assert result.error is None and result.copies[0].error is None
    assert result.copies[0].recipients[0].error == str(info.value)
