"""Messages made by real programs' conventions, through e2email.inbound.submit, checked on the
bytes a real TLS SMTP server received with gpg and sqop (nothing re-serialised on the way)."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    gpg,
    gpg_decrypt,
    list_packet_key_ids,
    multipart_parts,
    part_body,
    sop_decrypt,
    split_head,
    subkey_ids,
)

from e2email import AsyncMailer, Mailer, Protection, SMTPSettings, TLSMode
from e2email.errors import KeyReason, MessageError, RecipientKeyError
from e2email.inbound import recipients_without_keys, submit, submit_sync
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

PATCH = (
    "From 1a2b3c Mon Sep 17 00:00:00 2001\n"
    "From: A U Thor <alice@example.org>\n"
    "To: Bob <bob@example.net>\n"
    "Cc: carol@example.com\n"
    "Subject: [PATCH 1/2] =?UTF-8?q?gr=C3=BC=C3=9Fe:?= fix the greeting\n"
    "Date: Sun, 6 Dec 2026 11:00:00 +0100\n"
    "Message-ID: <20261206100000.1-1-alice@example.org>\n"
    "In-Reply-To: <cover.1@example.org>\n"
    "References: <cover.1@example.org>\n"
    "X-Mailer: git-send-email 2.39.5\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "The greeting said Gruesse; it is Grüße.\n"
    "From now on it is right.\n"
    "\n"
    "Signed-off-by: A U Thor <alice@example.org>\n"
    "---\n"
    " hello.c | 2 +-\n"
    " 1 file changed, 1 insertion(+), 1 deletion(-)\n"
    "\n"
    "diff --git a/hello.c b/hello.c\n"
    "--- a/hello.c\n"
    "+++ b/hello.c\n"
    "@@ -1,3 +1,3 @@\n"
    " int main(void) {\n"
    '-\tputs("Gruesse"); \n'
    '+\tputs("Grüße");\n'
    " \n"
    "-- \n"
    "2.39.5\n"
    "\n"
)
PATCH_BODY = PATCH.split("\n\n", 1)[1]


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


def _mailer(store: Keystore, server: LoopbackSMTPServer, **prot: object) -> AsyncMailer:
    return AsyncMailer(
        smtp=_settings(server),
        keystore=store,
        protection=Protection(**prot),  # type: ignore[arg-type]
    )


def _armored(raw: bytes) -> bytes:
    _, (version, encrypted) = multipart_parts(raw)
    assert part_body(version).strip() == b"Version: 1"
    return part_body(encrypted)


def _decrypt(home: Path, raw: bytes, keys: Keys) -> EmailMessage:
    plaintext, status = gpg_decrypt(home, _armored(raw))
    assert "DECRYPTION_OKAY" in status
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    parsed = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_git_send_email_patch_decrypts_to_the_exact_patch(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """An 8bit UTF-8 patch as git send-email writes it (LF, mbox From line, trailing spaces,
    "From " in the text) arrives encrypted; gpg and sqop decrypt it, the text decodes to the
    patch byte for byte, and the headers are protected per RFC 9788."""
    server = smtp_server(tls="implicit")
    mailer = _mailer(sender_store, server)
    result = asyncio.run(
        submit(
            mailer,
            PATCH.encode(),
            envelope_from="alice@example.org",
            recipients=["bob@example.net", "carol@example.com"],
        )
    )
    assert sorted(result.accepted) == ["bob@example.net", "carol@example.com"]
    (received,) = server.messages
    raw = received.data
    assert received.mail_from == "alice@example.org"
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert outer["Subject"] == "[...]"
    # Threading stays readable outside (RFC 9788 baseline); the mailer does not.
    assert outer["In-Reply-To"] == "<cover.1@example.org>"
    assert outer["References"] == "<cover.1@example.org>"
    assert b"X-Mailer" not in raw and b"git-send-email" not in raw
    assert b"greeting" not in raw
    raw.decode("ascii")  # 7-bit on the wire

    inner = _decrypt(recipients_home, raw, keys)
    assert inner["Subject"] == "[PATCH 1/2] grüße: fix the greeting"
    assert inner["X-Mailer"] == "git-send-email 2.39.5"
    assert inner["Message-ID"] == "<20261206100000.1-1-alice@example.org>"
    assert 'hp="cipher"' in inner["Content-Type"]
    assert inner.get_content_type() == "text/plain"
    assert inner.get_content_charset() == "utf-8"
    payload = inner.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == PATCH_BODY.encode()
    # sqop reads the same bytes.
    assert keys.bob.secret is not None
    plain, _ = sop_decrypt("sqop", _armored(raw), keys.bob.secret, keys.alice.cert, tmp_path)
    assert plain == gpg_decrypt(recipients_home, _armored(raw))[0]


def test_envelope_recipient_not_in_the_header_gets_a_separate_copy_without_bcc(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """mutt passes Bcc recipients on the command line and strips the header: each gets a
    copy of its own, encrypted only to them (and the sender); a Bcc header is never sent and
    a Bcc header address that is not an envelope recipient gets nothing."""
    server = smtp_server(tls="implicit")
    raw = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nBcc: erin@example.com\r\n"
        b"Subject: hi\r\n\r\nsecret text\r\n"
    )
    mailer = _mailer(sender_store, server)
    submit_result = asyncio.run(
        submit(mailer, raw, recipients=["bob@example.net", "dave@example.com"])
    )
    assert sorted(submit_result.accepted) == ["bob@example.net", "dave@example.com"]
    by_rcpts = {m.rcpt_tos: m.data for m in server.messages}
    assert set(by_rcpts) == {("bob@example.net",), ("dave@example.com",)}
    dave_ids = subkey_ids(recipients_home, keys.dave.fingerprint)
    for rcpts, data in by_rcpts.items():
        assert b"Bcc" not in data and b"erin" not in data
        packet_ids = list_packet_key_ids(recipients_home, _armored(data))
        assert bool(packet_ids & dave_ids) == (rcpts == ("dave@example.com",))
        inner = _decrypt(recipients_home, data, keys)
        assert inner["Bcc"] is None
        assert inner.get_content().strip() == "secret text"


def test_recipient_without_key_sends_nothing(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    server = smtp_server(tls="implicit")
    raw = b"From: alice@example.org\nTo: bob@example.net, nobody@example.com\nSubject: x\n\nhi\n"
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert info.value.addresses == ("nobody@example.com",)
    assert server.messages == [] and server.transcript == []


def test_recipients_without_keys_names_each_with_its_reason(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    mailer = _mailer(sender_store, smtp_server(tls="implicit"))
    missing = recipients_without_keys(
        mailer, ["bob@example.net", "nobody@example.com", "expired@example.com", "not an address"]
    )
    assert set(missing) == {"nobody@example.com", "expired@example.com", "not an address"}
    assert missing["nobody@example.com"].startswith(KeyReason.NOT_FOUND.value)
    assert missing["expired@example.com"].startswith(KeyReason.EXPIRED.value)
    assert (
        recipients_without_keys(
            mailer, ["nobody@example.com"], protection=Protection(encrypt=False)
        )
        == {}
    )


def _encrypted_by_the_program(keys: Keys, home: Path, *to: str) -> bytes:
    """A PGP/MIME message as mutt makes it (encrypted with gpg by the calling program)."""
    inner = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nencrypted by mutt\r\n"
    args = [a for k in to for a in ("--recipient", k)]
    armored = gpg(
        home, "--trust-model", "always", "--armor", "--encrypt", *args, input=inner
    ).stdout.replace(b"\n", b"\r\n")
    return (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
        b"Bcc: dave@example.com\r\nSubject: mutt\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="mutt1"\r\n\r\n'
        b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
        b"--mutt1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b'--mutt1\r\nContent-Type: application/octet-stream; name="msg.asc"\r\n\r\n'
        + armored
        + b"\r\n--mutt1--\r\n"
    )


def test_already_encrypted_message_is_sent_as_it_is(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """Encrypted by the program to every envelope recipient: sent byte for byte (only the
    Bcc header dropped and a Date and Message-ID added), not wrapped again."""
    raw = _encrypted_by_the_program(keys, recipients_home, "bob@example.net", "dave@example.com")
    server = smtp_server(tls="implicit")
    result = asyncio.run(submit(_mailer(sender_store, server), raw))
    assert sorted(result.accepted) == ["bob@example.net", "dave@example.com"]
    (received,) = server.messages
    data = received.data
    assert b"Bcc" not in data
    body_start = raw.index(b"MIME-Version")
    assert data.endswith(raw[body_start:])
    assert data.count(b"multipart/encrypted") == 1
    head = split_head(data)[0]
    assert b"\r\nDate: " in b"\r\n" + head and b"Message-ID: <" in head


def test_already_encrypted_but_not_to_a_recipient_is_refused(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    raw = _encrypted_by_the_program(keys, recipients_home, "bob@example.net")
    server = smtp_server(tls="implicit")
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    (problem,) = info.value.problems
    assert problem.address == "dave@example.com"
    assert problem.reason is KeyReason.NOT_ENCRYPTED_TO
    assert server.transcript == []


def test_signed_only_message_with_an_encrypt_policy_is_refused(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    raw = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n"
        b"Content-Type: multipart/signed; micalg=pgp-sha256;\r\n"
        b' protocol="application/pgp-signature"; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n"
    )
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError, match="already PGP/MIME signed but not encrypted"):
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert server.transcript == []


def test_submit_sync_sends_through_the_facade(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    server = smtp_server(tls="implicit")
    raw = b"To: bob@example.net\nSubject: cron\n\nno From header\n"
    with Mailer(smtp=_settings(server), keystore=sender_store) as mailer:
        result = submit_sync(mailer, raw, envelope_from="alice@example.org")
    assert result.accepted == ("bob@example.net",)
    inner = _decrypt(recipients_home, server.messages[0].data, keys)
    assert inner["From"] == "alice@example.org"
    assert inner["Date"] is not None and inner["Message-ID"] is not None
