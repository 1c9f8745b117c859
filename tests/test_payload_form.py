"""A program's own MIME body (sendmail, relay, Django) in the protected payload: encrypted with
OpenPGP it decrypts to the program's bytes (only line ends CRLF: binary literal data needs no
7-bit form, RFC 3156 §6.2); signed in a multipart/signed it stays canonical (RFC 3156 §3) and
verifies. Checked with gpg and sqop on the bytes a real TLS SMTP server received."""

from __future__ import annotations

import asyncio
import email
import email.policy
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from fixtures_smime import PKI
from pgp_helpers import (
    gpg_decrypt,
    gpg_verify,
    multipart_parts,
    part_body,
    sop_decrypt,
    sop_verify,
    split_head,
)

from e2email import AsyncMailer, Protection, Scheme, SMTPSettings, TLSMode
from e2email.certstore import CertStore
from e2email.config import OpenPGPEngine
from e2email.errors import MessageError
from e2email.inbound import submit
from e2email.keystore import Keystore
from e2email.message import HP, Message, MimeBody, build_payload
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

# As git send-email pipes it: LF, 8-bit UTF-8, a context line that is one space, a removed
# line with a trailing space, the "-- " signature separator, a line starting "From ".
PATCH = (
    b"From: A U Thor <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Subject: [PATCH] hello: say b\xc3\xa9\n"
    b"Date: Sun, 6 Dec 2026 11:00:00 +0100\n"
    b"Message-ID: <20261206100000.1-1-alice@example.org>\n"
    b"X-Mailer: git-send-email 2.39.5\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"Say b\xc3\xa9, not be.\n"
    b"From now on it is right.\n"
    b"\n"
    b"Signed-off-by: A U Thor <alice@example.org>\n"
    b"---\n"
    b" hello.c | 2 +-\n"
    b"\n"
    b"diff --git a/hello.c b/hello.c\n"
    b"--- a/hello.c\n"
    b"+++ b/hello.c\n"
    b"@@ -1,3 +1,3 @@\n"
    b" int main(void) {\n"
    b'-\tputs("be"); \n'
    b'+\tputs("b\xc3\xa9");\n'
    b" \n"
    b"-- \n"
    b"2.39.5\n"
    b"\n"
)
PATCH_BODY_CRLF = PATCH.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def _mailer(store: Keystore, server: LoopbackSMTPServer, **prot: object) -> AsyncMailer:
    assert server.ca_file is not None
    return AsyncMailer(
        smtp=SMTPSettings(
            host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
        ),
        keystore=store,
        protection=Protection(**prot),  # type: ignore[arg-type]
    )


def _send(store: Keystore, server: LoopbackSMTPServer, raw: bytes, **prot: object) -> bytes:
    result = asyncio.run(submit(_mailer(store, server, **prot), raw))
    assert list(result.accepted) == ["bob@example.net"]
    (received,) = server.messages
    data: bytes = received.data
    data.decode("ascii")  # 7-bit on the wire: the armor, and e2email's own outer head
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    return data


def _armored(raw: bytes) -> bytes:
    _, (version, encrypted) = multipart_parts(raw)
    assert part_body(version).strip() == b"Version: 1"
    return part_body(encrypted)


@pytest.mark.parametrize("sign", [True, False], ids=["sign+encrypt", "encrypt-only"])
def test_encrypted_program_body_decrypts_byte_for_byte(
    openpgp_engine: OpenPGPEngine,
    sign: bool,
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """The decrypted entity's body is the patch as git wrote it (8-bit, trailing spaces,
    "-- "), only its line ends CRLF: no quoted-printable on the way."""
    server = smtp_server(tls="implicit")
    raw = _send(
        sender_store, server, PATCH, engine=openpgp_engine, sign=sign, encrypt_to_self=False
    )
    assert b"hello.c" not in raw
    armored = _armored(raw)
    plaintext, status = gpg_decrypt(recipients_home, armored)
    assert "DECRYPTION_OKAY" in status
    assert ("VALIDSIG " + keys.alice.fingerprint in status) is sign
    head, body = split_head(plaintext)
    assert body == PATCH_BODY_CRLF
    assert b"=C3=A9" not in plaintext and b"=20" not in plaintext
    assert b"Content-Transfer-Encoding: 8bit\r\n" in head
    assert b'hp="cipher"' in head
    inner = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert inner["X-Mailer"] == "git-send-email 2.39.5"
    assert inner["Subject"] == "[PATCH] hello: say bé"
    # sqop reads the same bytes.
    assert keys.bob.secret is not None
    if sign:
        plain, _ = sop_decrypt("sqop", armored, keys.bob.secret, keys.alice.cert, tmp_path)
    else:
        plain = subprocess.run(
            ["sqop", "decrypt", str(keys.bob.secret)],
            input=armored,
            capture_output=True,
            check=True,
        ).stdout
    assert plain == plaintext


def test_signed_only_program_body_stays_canonical_and_verifies(
    openpgp_engine: OpenPGPEngine,
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """Signed only, the part inside multipart/signed is the canonical 7-bit form (RFC 3156
    §3): quoted-printable, and both gpg and sqop verify it as received."""
    server = smtp_server(tls="implicit")
    raw = _send(sender_store, server, PATCH, engine=openpgp_engine, encrypt=False)
    _, (signed, signature) = multipart_parts(raw)
    assert b"Content-Transfer-Encoding: quoted-printable" in signed
    assert b"b=C3=A9" in signed and b"--=20" in signed
    signed.decode("ascii")
    assert gpg_verify(recipients_home, part_body(signature), signed, tmp_path) == (
        keys.alice.fingerprint
    )
    sop_verify("sqop", part_body(signature), signed, keys.alice.cert, tmp_path)
    inner = email.message_from_bytes(signed, policy=email.policy.default)
    decoded = inner.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded == PATCH_BODY_CRLF


def test_mime_body_keeps_the_program_form_next_to_the_canonical_one() -> None:
    entity = (
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n\n"
        b"b\xc3\xa9 \r\nbare\rcr\n"
    )
    mime = MimeBody.parse(entity)
    assert mime.head.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n")
    assert mime.body.isascii()
    head, body = mime.form(canonical=False)
    # Line ends made CRLF (a bare CR too), nothing else changed.
    assert body == b"b\xc3\xa9 \r\nbare\r\ncr\r\n"
    assert head == (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    assert mime.form() == (mime.head, mime.body)
    # Already canonical: nothing kept twice.
    plain = MimeBody.parse(b"Content-Type: text/plain\n\nhello\n")
    assert plain.original is None
    assert plain.form(canonical=False) == plain.form()


def test_payload_forms_of_program_and_built_messages() -> None:
    msg = Message.from_bytes(PATCH).finalized()
    canonical = build_payload(msg, hp=HP.CIPHER)
    program = build_payload(msg, hp=HP.CIPHER, canonical=False)
    assert canonical.isascii() and not program.isascii()
    assert split_head(program)[1] == PATCH_BODY_CRLF
    assert build_payload(msg, hp=HP.CIPHER, canonical=True) == canonical
    # Messages e2email builds are the same either way.
    built = Message(
        sender="alice@example.org", to=["bob@example.net"], subject="s", text="b\xe9 \n"
    ).finalized()
    assert build_payload(built, hp=HP.CIPHER, canonical=False) == build_payload(built, hp=HP.CIPHER)


# -- An address listed twice: one recipient, the header as written -------------------------

DUPLICATES = (
    b"From: alice@example.org\n"
    b"To: bob@example.net, BOB@EXAMPLE.NET\n"
    b"Cc: bob@example.net\n"
    b"Bcc: carol@example.com\n"
    b"Subject: twice\n"
    b"\n"
    b"hello\n"
)


def test_duplicate_addresses_leave_the_protected_to_and_cc_as_written(
    openpgp_engine: OpenPGPEngine,
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
) -> None:
    """bob is one recipient (one envelope address, one key, one copy), but the decrypted
    header keeps To and Cc as the program wrote them; the Bcc is nowhere in it."""
    server = smtp_server(tls="implicit")
    result = asyncio.run(submit(_mailer(sender_store, server, engine=openpgp_engine), DUPLICATES))
    assert sorted(result.accepted) == ["bob@example.net", "carol@example.com"]
    main = [m for m in server.messages if m.rcpt_tos == ("bob@example.net",)]
    assert len(main) == 1 and len(server.messages) == 2
    raw = main[0].data
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert outer["To"] == "bob@example.net, BOB@example.net"
    assert outer["Cc"] == "bob@example.net"
    plaintext, status = gpg_decrypt(recipients_home, _armored(raw))
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    inner = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert inner["To"] == "bob@example.net, BOB@example.net"
    assert inner["Cc"] == "bob@example.net"
    assert b"carol" not in plaintext.lower() and b"carol" not in raw.lower()


def test_shown_fields_must_name_the_recipients() -> None:
    msg = Message.from_bytes(DUPLICATES)
    assert [a.addr_spec for a in msg.to] == ["bob@example.net"]
    assert msg.cc == ()
    assert [a.addr_spec for a in msg.to_field] == ["bob@example.net", "BOB@example.net"]
    assert [a.addr_spec for a in msg.cc_field] == ["bob@example.net"]
    # Without duplicates nothing extra is kept.
    plain = Message.from_bytes(b"From: alice@example.org\nTo: bob@example.net\n\nx\n")
    assert plain.shown_to is None and plain.shown_cc is None
    # A written field may not show a Bcc recipient, nor leave out a real one.
    with pytest.raises(MessageError):
        Message(
            sender="alice@example.org",
            to=["bob@example.net"],
            bcc=["carol@example.com"],
            shown_to=["bob@example.net", "carol@example.com"],
        )
    with pytest.raises(MessageError):
        Message(
            sender="alice@example.org",
            to=["bob@example.net", "dave@example.com"],
            shown_to=["bob@example.net"],
        )


def test_smime_keeps_the_canonical_form_inside_its_signature(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """S/MIME signs, then encrypts (RFC 8551): the inner multipart/signed carries the
    canonical 7-bit form (quoted-printable), openssl verifies it, and it decodes to the
    patch's bytes."""
    server = smtp_server(tls="implicit")
    mailer = AsyncMailer(
        smtp=SMTPSettings(
            host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
        ),
        keystore=Keystore(smime_store.home),
        certstore=smime_store,
        protection=Protection(scheme=Scheme.SMIME),
    )
    asyncio.run(submit(mailer, PATCH))
    (received,) = server.messages
    received.data.decode("ascii")
    enc = tmp_path / "enc.eml"
    enc.write_bytes(received.data)
    inner = _openssl(
        "cms", "-decrypt", "-in", str(enc), "-recip", str(pki.bob.cert_pem),
        "-inkey", str(pki.bob.key_pem),
    )  # fmt: skip
    assert b"b=C3=A9" in inner and b"--=20" in inner
    inner.decode("ascii")
    signed_file = tmp_path / "inner.eml"
    signed_file.write_bytes(inner)
    content = _openssl(
        "cms", "-verify", "-in", str(signed_file), "-CAfile", str(pki.root_pem),
        "-purpose", "smimesign",
    )  # fmt: skip
    part = email.message_from_bytes(content, policy=email.policy.default)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == PATCH_BODY_CRLF


def _openssl(*args: str) -> bytes:
    done = subprocess.run(["openssl", *args], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout
