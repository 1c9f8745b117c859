"""The mailer's promises: fail closed, Bcc kept blind, encrypt-to-self, explicit key choice,
passphrases, and per-recipient results. Checked on the bytes a real TLS SMTP server received.
Each OpenPGP test runs once per engine (the gpg program, and Sequoia in process: issue 9)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import LOCKED_PASSPHRASE, Keys
from pgp_helpers import (
    gpg_decrypt,
    list_packet_key_ids,
    multipart_parts,
    part_body,
    subkey_ids,
)

from e2email import (
    AsyncMailer,
    KeyReason,
    Mailer,
    Message,
    OpenPGPEngine,
    PassphraseError,
    Protection,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPSettings,
    TLSMode,
)
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


def _send(  # type: ignore[no-untyped-def]
    engine: OpenPGPEngine,
    store: Keystore,
    server: LoopbackSMTPServer,
    message: Message,
    **prot: object,
):
    with Mailer(
        smtp=_settings(server),
        keystore=store,
        protection=Protection(engine=engine, **prot),  # type: ignore[arg-type]
    ) as mailer:
        return mailer.send(message)


def _armored(raw: bytes) -> bytes:
    _, (_, encrypted) = multipart_parts(raw)
    return part_body(encrypted)


# -- Fail closed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("nobody@example.com", KeyReason.NOT_FOUND),
        ("expired@example.com", KeyReason.EXPIRED),
        ("revoked@example.com", KeyReason.REVOKED),
        ("weak@example.com", KeyReason.WEAK),
        ("signonly@example.com", KeyReason.NO_ENCRYPTION_KEY),
        ("sha1@example.com", KeyReason.WEAK),
    ],
)
def test_one_unusable_recipient_key_sends_nothing(
    who: str,
    reason: KeyReason,
    openpgp_engine: OpenPGPEngine,
    sender_store: Keystore,
    smtp_server: ServerFactory,
) -> None:
    """A recipient whose key is missing, expired, revoked, weak (RSA-1024, SHA-1 self-signatures)
    or cannot encrypt stops the whole message before any connection: the server sees not a
    single byte."""
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["bob@example.net", who], text="secret")
    with pytest.raises(RecipientKeyError) as info:
        _send(openpgp_engine, sender_store, server, message)
    assert [(p.address, p.reason) for p in info.value.problems] == [(who, reason)]
    assert who in str(info.value)
    assert server.transcript == []
    assert server.messages == []


def test_every_offending_recipient_in_to_cc_and_bcc_is_named(
    openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """All unusable recipients are reported together, whichever header they are in."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net", "expired@example.com"],
        cc=["revoked@example.com"],
        bcc=["nobody@example.com", "weak@example.com"],
        subject="x",
        text="secret",
    )
    with pytest.raises(RecipientKeyError) as info:
        _send(openpgp_engine, sender_store, server, message)
    assert {p.address: p.reason for p in info.value.problems} == {
        "expired@example.com": KeyReason.EXPIRED,
        "revoked@example.com": KeyReason.REVOKED,
        "nobody@example.com": KeyReason.NOT_FOUND,
        "weak@example.com": KeyReason.WEAK,
    }
    assert "4 recipients have no usable key" in str(info.value)
    assert server.transcript == []


def test_sender_without_encryption_key_fails_unless_encrypt_to_self_is_off(
    openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """Encrypt-to-self needs the sender's own certificate; without it nothing is sent, and
    turning encrypt-to-self off is the named way out."""
    server = smtp_server(tls="implicit")
    message = Message(sender="carol@example.com", to=["bob@example.net"], text="hi")
    sender_store.invalidate()
    with pytest.raises(SignerKeyError) as info:
        _send(openpgp_engine, sender_store, server, message)
    assert info.value.problem.reason is KeyReason.NO_SECRET_KEY
    no_cert = Message(sender="nokey@example.org", to=["bob@example.net"], text="hi")
    with pytest.raises(RecipientKeyError) as rinfo:
        _send(openpgp_engine, sender_store, server, no_cert, sign=False)
    assert rinfo.value.addresses == ("nokey@example.org",)
    assert "encrypt-to-self" in str(rinfo.value)
    assert server.transcript == []
    result = _send(openpgp_engine, sender_store, server, no_cert, sign=False, encrypt_to_self=False)
    assert result.accepted == ("bob@example.net",)


# -- Bcc privacy and encrypt-to-self ----------------------------------------------------------


def test_bcc_recipients_get_separate_copies_invisible_in_the_others(
    keys: Keys,
    openpgp_engine: OpenPGPEngine,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
) -> None:
    """Each Bcc recipient's copy is encrypted only to them and the sender; the To/Cc copy has
    no Bcc header and no Bcc key ID (checked with gpg --list-packets), and every copy
    decrypts for its recipients."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        cc=["carol@example.com"],
        bcc=["dave@example.com", "erin@example.com"],
        subject="blind",
        text="for your eyes",
    )
    result = _send(openpgp_engine, sender_store, server, message)
    assert sorted(result.accepted) == sorted(
        ["bob@example.net", "carol@example.com", "dave@example.com", "erin@example.com"]
    )
    by_rcpts = {m.rcpt_tos: m.data for m in server.messages}
    assert set(by_rcpts) == {
        ("bob@example.net", "carol@example.com"),
        ("dave@example.com",),
        ("erin@example.com",),
    }
    ids = {k.address: subkey_ids(recipients_home, k.fingerprint) for k in keys.all()[:5]}
    expected = {
        ("bob@example.net", "carol@example.com"): (
            "alice@example.org",
            "bob@example.net",
            "carol@example.com",
        ),
        ("dave@example.com",): ("alice@example.org", "dave@example.com"),
        ("erin@example.com",): ("alice@example.org", "erin@example.com"),
    }
    for rcpts, raw in by_rcpts.items():
        assert b"\r\nBcc:" not in raw and not raw.startswith(b"Bcc:")
        packet_ids = list_packet_key_ids(recipients_home, _armored(raw))
        owners = sorted(addr for addr, sub in ids.items() if packet_ids & sub)
        assert owners == sorted(expected[rcpts]), rcpts
        assert len(packet_ids) == len(expected[rcpts])
        plaintext, status = gpg_decrypt(recipients_home, _armored(raw))
        assert "DECRYPTION_OKAY" in status
        inner = plaintext.decode()
        # No Bcc field (a header line; "Bcc" can occur by chance inside the base64 key data
        # of an Autocrypt-Gossip field, which is why a bare substring check was flaky).
        assert re.search(r"(?im)^bcc\s*:", inner) is None, inner
        if "bob@example.net" in rcpts:
            assert "dave@example.com" not in inner and "erin@example.com" not in inner
            assert b"dave@example.com" not in raw and b"erin@example.com" not in raw


def test_sender_can_read_the_sent_copy_only_with_encrypt_to_self(
    keys: Keys, openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """By default the sender's key is a recipient (the sent copy stays readable to them);
    with encrypt_to_self=False it is not."""
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="self")
    _send(openpgp_engine, sender_store, server, message)
    _send(openpgp_engine, sender_store, server, message, encrypt_to_self=False)
    with_self, without_self = (_armored(m.data) for m in server.messages)
    plaintext, status = gpg_decrypt(sender_store.gnupg_home, with_self)
    assert "DECRYPTION_OKAY" in status and b"self" in plaintext
    alice_ids = subkey_ids(sender_store.gnupg_home, keys.alice.fingerprint)
    assert list_packet_key_ids(sender_store.gnupg_home, with_self) & alice_ids
    assert not list_packet_key_ids(sender_store.gnupg_home, without_self) & alice_ids


def test_key_map_overrides_lookup_by_address(
    keys: Keys,
    openpgp_engine: OpenPGPEngine,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
) -> None:
    """An explicit address -> fingerprint choice is used even when the key carries another
    address (user IDs that do not match, envelope#9)."""
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="mapped")
    _send(
        openpgp_engine,
        sender_store,
        server,
        message,
        encrypt_to_self=False,
        key_map={"Bob@Example.NET": keys.carol.fingerprint},
    )
    packet_ids = list_packet_key_ids(recipients_home, _armored(server.messages[0].data))
    assert packet_ids <= subkey_ids(recipients_home, keys.carol.fingerprint)
    assert packet_ids


# -- Passphrases -------------------------------------------------------------------------------


def test_locked_signing_key_missing_wrong_and_right_passphrase(
    openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """A passphrase-protected signing key: none given -> PassphraseError (missing), a wrong one
    -> PassphraseError, the right one (asked lazily, once) -> signed and sent."""
    server = smtp_server(tls="implicit")
    message = Message(sender="locked@example.org", to=["bob@example.net"], text="locked")
    settings = _settings(server)
    policy = Protection(engine=openpgp_engine)
    with Mailer(smtp=settings, keystore=sender_store, protection=policy) as mailer:
        with pytest.raises(PassphraseError) as info:
            mailer.send(message)
        assert info.value.missing
    with Mailer(
        smtp=settings, keystore=sender_store, protection=policy, passphrase="wrong"
    ) as mailer:
        with pytest.raises(PassphraseError) as info:
            mailer.send(message)
        assert not info.value.missing
        assert "wrong passphrase" in str(info.value)
    assert server.transcript == []
    asked: list[int] = []

    def ask() -> str:
        asked.append(1)
        return LOCKED_PASSPHRASE

    mailer_async = AsyncMailer(
        smtp=settings, keystore=sender_store, protection=policy, passphrase=ask
    )
    result = asyncio.run(mailer_async.send(message))
    assert result.accepted == ("bob@example.net",)
    assert len(asked) <= 1  # asked once at most (a warm gpg-agent may not need it at all)


# -- Per-recipient results ---------------------------------------------------------------------


def test_partly_refused_message_reports_each_recipient_and_keeps_the_rest(
    openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """When the server refuses one recipient, the error says who was accepted and who was
    refused with the server's reply, and carries the protected copy for the refused one."""
    server = smtp_server(
        tls="implicit", refuse_recipients={"carol@example.com": (550, "5.1.1 no such user")}
    )
    message = Message(
        sender="alice@example.org", to=["bob@example.net", "carol@example.com"], text="x"
    )
    with pytest.raises(RecipientsRefusedError) as info:
        _send(openpgp_engine, sender_store, server, message)
    err = info.value
    assert err.accepted == ("bob@example.net",)
    assert list(err.refused) == ["carol@example.com"]
    assert err.refused["carol@example.com"].code == 550
    assert "no such user" in str(err)
    assert [c.recipients for c in err.unsent] == [("carol@example.com",)]
    assert err.unsent[0].raw == server.messages[0].data
    assert server.messages[0].rcpt_tos == ("bob@example.net",)


def test_signed_only_and_plain_messages_go_to_all_recipients_in_one_copy(
    openpgp_engine: OpenPGPEngine, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """Without encryption there are no key IDs to leak, so one copy goes to To, Cc and Bcc
    (Bcc only in the envelope, never in a header)."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org", to=["bob@example.net"], bcc=["dave@example.com"], text="x"
    )
    _send(openpgp_engine, sender_store, server, message, encrypt=False)
    _send(openpgp_engine, sender_store, server, message, encrypt=False, sign=False)
    signed, plain = server.messages
    for received in (signed, plain):
        assert received.rcpt_tos == ("bob@example.net", "dave@example.com")
        assert b"dave" not in received.data
    parsed = email.message_from_bytes(signed.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/signed"
    assert email.message_from_bytes(plain.data).get_content_type() == "text/plain"
