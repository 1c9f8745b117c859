"""`e2email.testing.MockProtector`: the stand-in engine applications use in their own tests.
It records messages, returns complete copies with a visible marker, and refuses recipients it
is told to, failing the message closed as a real engine does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from e2email import (
    AsyncMailer,
    Mailer,
    Message,
    PassphraseError,
    Protection,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPSettings,
    TLSMode,
)
from e2email.config import RetryPolicy
from e2email.errors import KeyReason
from e2email.outbox import Outbox
from e2email.testing import Fault, LoopbackSMTPServer, MockProtector

ServerFactory = Callable[..., LoopbackSMTPServer]


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


def test_mock_records_messages_and_sends_marked_copies_per_plan(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """With MockProtector no key is needed: the message is recorded, and the server gets one
    marked copy for To/Cc and one per Bcc, the Bcc recipient named in no other copy."""
    server = smtp_server(tls="implicit")
    protector = MockProtector()
    message = Message(
        sender="app@example.org",
        to=["bob@example.net"],
        cc=["carol@example.com"],
        bcc=["dave@example.com"],
        subject="Hello",
        text="hi",
    )
    with Mailer(smtp=_settings(server), protector=protector) as mailer:
        result = mailer.send(message)
    assert [m.subject for m in protector.messages] == ["Hello"]
    assert protector.messages[0].message_id == result.message_id
    assert [(c.kind, c.recipients) for c in protector.copies] == [
        ("main", ("bob@example.net", "carol@example.com")),
        ("bcc", ("dave@example.com",)),
    ]
    assert protector.copies[1].encrypted_to == ("MOCK:dave@example.com", "MOCK:app@example.org")
    assert len(server.messages) == 2
    for got in server.messages:
        assert b"\r\nX-E2Email-Mock: signed, encrypted\r\n" in got.data
        assert got.data.startswith(b"Date: ")
    main = next(m for m in server.messages if b"bob@example.net" in m.data)
    assert b"dave@example.com" not in main.data


def test_mock_refuses_every_named_recipient_and_nothing_is_sent(
    smtp_server: ServerFactory,
) -> None:
    """Told to refuse, the mock fails the message closed like a real engine: every refused
    recipient (To, Cc, Bcc, the sender for encrypt-to-self) named with its reason, nothing
    sent; a refused sender cannot sign. Allowed again, it goes out."""
    server = smtp_server(tls="implicit")
    protector = MockProtector(refuse={"mallory@example.com": KeyReason.REVOKED})
    protector.refuse("eve@example.com", "key server says no")
    message = Message(
        sender="app@example.org",
        to=["bob@example.net", "mallory@example.com"],
        bcc=["eve@example.com"],
        text="hi",
    )
    mailer = AsyncMailer(smtp=_settings(server), protector=protector)
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(mailer.send(message))
    assert [(p.address, p.reason, p.detail) for p in info.value.problems] == [
        ("mallory@example.com", KeyReason.REVOKED, ""),
        ("eve@example.com", KeyReason.BACKEND, "key server says no"),
    ]
    assert server.transcript == []
    assert len(protector.messages) == 1 and protector.copies == []
    # Signing only: recipients need no key, so they are not refused.
    signed = asyncio.run(mailer.protect(message, protection=Protection(encrypt=False)))
    assert len(signed) == 1 and signed[0].encrypted_to == ()
    assert b"X-E2Email-Mock: signed\r\n" in signed[0].raw
    protector.refuse("app@example.org")
    with pytest.raises(SignerKeyError):
        asyncio.run(mailer.protect(message))
    for address in ("app@example.org", "mallory@example.com", "eve@example.com"):
        protector.allow(address)
    assert asyncio.run(mailer.send(message)).accepted


def test_recipient_check_at_rcpt_asks_the_mailers_engine() -> None:
    """`recipients_without_keys` (the relay's and sendmail's RCPT check) asks the engine
    that would protect the message, not a store picked by scheme: with the mock engine only
    the refused address is reported (a keystore lookup would report every address)."""
    from e2email.inbound import recipients_without_keys

    protector = MockProtector()
    protector.refuse("mallory@example.com", KeyReason.REVOKED)
    with Mailer(protector=protector) as mailer:
        missing = recipients_without_keys(
            mailer, ["bob@example.net", "MALLORY@example.com", "not an address"]
        )
    assert set(missing) == {"MALLORY@example.com", "not an address"}
    assert "revoked" in missing["MALLORY@example.com"]


def test_mock_passphrase_asks_the_mailers_source_once() -> None:
    """A mock key with a passphrase: none given -> PassphraseError(missing); the mailer's
    prompt is then asked once and the right answer protects; a wrong one is refused."""
    asked: list[int] = []

    class Prompt:
        interactive = True

        def __call__(self) -> str:
            asked.append(1)
            return "open sesame"

    message = Message(sender="app@example.org", to=["bob@example.net"], text="x")
    with Mailer(protector=MockProtector(passphrase="open sesame")) as mailer:
        with pytest.raises(PassphraseError) as missing:
            mailer.protect(message)
        assert missing.value.missing
    with Mailer(protector=MockProtector(passphrase="open sesame"), passphrase=Prompt()) as mailer:
        assert mailer.protect(message)[0].signed
        assert mailer.protect(message)[0].signed
    assert asked == [1]
    with (
        Mailer(protector=MockProtector(passphrase="open sesame"), passphrase="nope") as mailer,
        pytest.raises(PassphraseError) as wrong,
    ):
        mailer.protect(message)
    assert not wrong.value.missing


def test_mock_recheck_holds_a_queued_copy_to_an_address_refused_since(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A copy queued by the mock (the server said 451) and an address refused afterwards:
    the outbox retry holds it, naming the address, and sends nothing."""
    busy = smtp_server(tls="implicit", faults=[Fault("rcpt", "reply", 451, "4.3.2 busy")])
    protector = MockProtector()
    box = Outbox(tmp_path / "o.sqlite3")
    mailer = AsyncMailer(
        smtp=_settings(busy), protector=protector, outbox=box, retry=RetryPolicy(max_attempts=1)
    )
    message = Message(sender="app@example.org", to=["bob@example.net"], text="x")
    with pytest.raises(RecipientsRefusedError):
        asyncio.run(mailer.send(message))
    (item,) = box.items()
    assert item.meta["scheme"] == "mock"
    protector.refuse("bob@example.net", KeyReason.REVOKED)
    (outcome,) = asyncio.run(mailer.send_outbox())
    assert outcome.error is not None and "bob@example.net" in str(outcome.error)
    assert [r.status for r in outcome.recipients] == ["deferred"]
    assert busy.messages == []
    box.close()


def test_the_mock_is_a_public_name_of_e2email_testing() -> None:
    """`e2email.testing` lists MockProtector, and it is a Protector."""
    import e2email.testing
    from e2email.crypto import Protector

    assert "MockProtector" in e2email.testing.__all__
    assert issubclass(MockProtector, Protector)
    assert repr(MockProtector(refuse={"A@x.org": "no"})) == "MockProtector(refused=['a@x.org'])"
