"""What a real SMTP server received verifies and decrypts with implementations we did not write.

Every test sends through e2email's real path (keystore -> engine -> canonical MIME ->
aiosmtplib over TLS) to a real aiosmtpd server, then cuts the parts out of the *received bytes*
and hands them to gpg, Sequoia's sqop and sq, and gosop. Nothing is re-serialised on the way.
Every test runs once per OpenPGP engine (the gpg program, and Sequoia in process: issue 9).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import subprocess
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    gpg_decrypt,
    gpg_verify,
    header_value,
    multipart_parts,
    part_body,
    sop_decrypt,
    sop_verify,
    split_head,
)

from e2email import (
    AsyncMailer,
    Attachment,
    Mailer,
    Message,
    OpenPGPEngine,
    Protection,
    SMTPSettings,
)
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

SOP_TOOLS = ["sqop", "gosop"]


def _sq(*args: str, input: bytes) -> bytes:
    """Run Sequoia's own CLI (``sq``, Debian 12: 0.27, which has ``verify --detached`` and
    ``decrypt --recipient-key``); a failure shows its stderr."""
    done = subprocess.run(["sq", *args], input=input, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def sq_verify(signature: bytes, signed: bytes, cert: Path, tmp: Path) -> None:
    sig = tmp / "sq-sig.asc"
    sig.write_bytes(signature)
    _sq("verify", "--signer-cert", str(cert), "--detached", str(sig), input=signed)


def sq_decrypt(armored: bytes, key: Path, cert: Path) -> bytes:
    """Plaintext, only when exactly-one-good-signature verification by ``cert`` succeeds."""
    return _sq(
        "decrypt",
        "--recipient-key",
        str(key),
        "--signer-cert",
        str(cert),
        "--signatures",
        "1",
        input=armored,
    )


@dataclass(frozen=True)
class Case:
    subject: str = "Interop test"
    text: str = "Hello Bob,\nthis is a test.\n"
    html: str | None = None
    attachments: tuple[tuple[str, str, bytes], ...] = field(default_factory=tuple)


PDF_BYTES = b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF\n"

CASES = {
    "text-only": Case(),
    "html-and-attachment": Case(
        text="See the attached report.\n",
        html="<html><body><p>See the <b>attached</b> report.</p></body></html>\n",
        attachments=(("report.pdf", "application/pdf", PDF_BYTES),),
    ),
    "utf8-subject": Case(
        # 74 characters: the 70-77 range where folding bugs broke signatures (envelope#32).
        subject="Grüße aus Köln: die Quartalszahlen für das dritte Quartal 2026 (vertraulich)",
        text="Grüße, Zoë — ünïcödé text ✓\n",
    ),
    "from-line": Case(text="Hi Bob,\nFrom the desk of Alice:\nFrom here on\n>From quoted\n.\n"),
    "trailing-spaces": Case(text="trailing spaces   \ntrailing tab\t\n  \nend\n"),
    "long-lines": Case(text=("x" * 2000) + "\n" + ("word " * 400) + "\n"),
    "forty-char-filename": Case(
        text="Attachment with a long name.\n",
        attachments=(("financial-report-2026-third-quarter2.pdf", "application/pdf", PDF_BYTES),),
    ),
}
assert len(CASES["forty-char-filename"].attachments[0][0]) == 40


def _message(case: Case, keys: Keys) -> Message:
    return Message(
        sender=f"Alice Demo <{keys.alice.address}>",
        to=[f"Bob Demo <{keys.bob.address}>"],
        subject=case.subject,
        text=case.text,
        html=case.html,
        attachments=tuple(
            Attachment(filename=n, content_type=t, content=c) for n, t, c in case.attachments
        ),
    )


def _received(server: LoopbackSMTPServer, message_id: str) -> bytes:
    found = [m.data for m in server.messages if f"<{message_id}>".encode() in m.data]
    assert len(found) == 1, f"expected one received copy of {message_id}, got {len(found)}"
    return found[0]


def _check_content(entity: bytes, case: Case, *, protected_subject: bool) -> None:
    """The decrypted or signed entity carries exactly what was sent."""
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    if protected_subject:
        assert msg["Subject"] == case.subject
        assert 'protected-headers="v1"' in header_value(split_head(entity)[0], "Content-Type")
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == case.text
    if case.html is not None:
        html = msg.get_body(preferencelist=("html",))
        assert html is not None
        assert html.get_content().replace("\r\n", "\n") == case.html
    got = {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()}
    assert got == {n: c for n, _, c in case.attachments}


def _send(
    case: Case,
    keys: Keys,
    store: Keystore,
    settings: SMTPSettings,
    *,
    encrypt: bool,
    engine: OpenPGPEngine,
) -> str:
    """Send through the sync facade (signed-only) or the async core (encrypted): both paths."""
    protection = Protection(sign=True, encrypt=encrypt, engine=engine)
    if encrypt:
        mailer = AsyncMailer(smtp=settings, keystore=store, protection=protection)
        result = asyncio.run(mailer.send(_message(case, keys)))
    else:
        with Mailer(smtp=settings, keystore=store, protection=protection) as sync_mailer:
            result = sync_mailer.send(_message(case, keys))
    assert result.accepted == (keys.bob.address,)
    return result.message_id


@pytest.mark.parametrize("name", list(CASES))
def test_signed_message_verifies_with_gpg_sqop_and_gosop(
    name: str,
    openpgp_engine: OpenPGPEngine,
    keys: Keys,
    sender_store: Keystore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """A signed-only message, as received by the server, verifies with three implementations,
    its micalg names the hash really used, and the signed part carries the content unchanged."""
    case = CASES[name]
    message_id = _send(
        case, keys, sender_store, smtp_settings, encrypt=False, engine=openpgp_engine
    )
    raw = _received(tls_server, message_id)
    head, (signed, signature_part) = multipart_parts(raw)
    ctype = header_value(head, "Content-Type")
    assert ctype.startswith("multipart/signed;")
    assert 'protocol="application/pgp-signature"' in ctype
    signature = part_body(signature_part)

    assert gpg_verify(recipients_home, signature, signed, tmp_path) == keys.alice.fingerprint
    for tool in SOP_TOOLS:
        sop_verify(tool, signature, signed, keys.alice.cert, tmp_path)
    sq_verify(signature, signed, keys.alice.cert, tmp_path)

    # micalg must name the hash in the signature packet (RFC 3156 §5).
    micalg = re.search(r'micalg="?([\w-]+)', ctype)
    assert micalg
    listing = os.popen(f"gpg --batch --list-packets < {tmp_path / 'sig.asc'}").read()
    digest_algo = re.search(r"digest algo (\d+)", listing)
    assert digest_algo
    assert (
        micalg.group(1)
        == {"8": "pgp-sha256", "10": "pgp-sha512", "9": "pgp-sha384"}[digest_algo.group(1)]
    )
    _check_content(signed, case, protected_subject=True)
    # Signed-only: the outer Subject is the real one (hp="clear").
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert outer["Subject"] == case.subject


@pytest.mark.parametrize("name", list(CASES))
def test_encrypted_message_decrypts_and_verifies_with_gpg_sqop_and_gosop(
    name: str,
    openpgp_engine: OpenPGPEngine,
    keys: Keys,
    sender_store: Keystore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """A signed+encrypted message, as received by the server, decrypts for the recipient with
    gpg, sqop and gosop, each finds Alice's good signature, and the content is exact; the
    server saw no plaintext, not even the subject."""
    case = CASES[name]
    message_id = _send(case, keys, sender_store, smtp_settings, encrypt=True, engine=openpgp_engine)
    raw = _received(tls_server, message_id)
    head, (version_part, encrypted_part) = multipart_parts(raw)
    ctype = header_value(head, "Content-Type")
    assert ctype.startswith("multipart/encrypted;")
    assert 'protocol="application/pgp-encrypted"' in ctype
    assert part_body(version_part).strip() == b"Version: 1"
    assert header_value(head, "Subject") == "[...]"
    for secret in (case.text.split("\n")[0], case.subject):
        assert secret.encode() not in raw
    armored = part_body(encrypted_part)

    plaintext, status = gpg_decrypt(recipients_home, armored)
    assert "DECRYPTION_OKAY" in status
    assert "GOODMDC" in status or "DECRYPTION_INFO" in status
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    _check_content(plaintext, case, protected_subject=True)

    assert keys.bob.secret is not None
    for tool in SOP_TOOLS:
        sop_plain, verifications = sop_decrypt(
            tool, armored, keys.bob.secret, keys.alice.cert, tmp_path
        )
        if tool == "gosop":
            # Debian 12's gosop (2022 snapshot) writes every decrypted CRLF as LF, whatever the
            # literal data format; the bytes are otherwise identical.
            assert sop_plain == plaintext.replace(b"\r\n", b"\n"), tool
        else:
            assert sop_plain == plaintext, tool
        assert keys.alice.fingerprint.lower() in verifications.lower(), (tool, verifications)
    assert sq_decrypt(armored, keys.bob.secret, keys.alice.cert) == plaintext
