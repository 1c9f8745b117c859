"""S/MIME (RFC 8551): what a real SMTP server received verifies and decrypts with openssl cms and
gpgsm; certificates are judged and every problem fails closed; Bcc copies are encrypted to
disjoint recipient sets; keys import/list/generate and send --smime work from the command line.

Messages go through e2email's real path (certstore -> cryptography -> canonical MIME ->
aiosmtplib over TLS) to a real aiosmtpd server; the received bytes are handed, cut by byte
offsets and never re-serialised, to openssl and gpgsm.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12
from cryptography.x509.oid import NameOID
from fixtures_smime import P12_PASSPHRASE, PKI, Identity, issue_leaf, legacy_p12
from pgp_helpers import header_value, kill_agent, multipart_parts, new_gnupg_home, part_body, run
from pgp_helpers import split_head as _split_head

from e2email import (
    Attachment,
    KeyReason,
    Mailer,
    Message,
    PassphraseError,
    Protection,
    RecipientKeyError,
    Scheme,
    SignerKeyError,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertKind, CertStore, StoredCert, describe, fingerprint
from e2email.client import MessageOutcome
from e2email.config import SMIMECipher
from e2email.crypto import smime
from e2email.errors import CryptoError, KeyProblem, KeystoreError
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]
REPO = Path(__file__).resolve().parent.parent


# -- Helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    subject: str = "S/MIME interop test"
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
        text="Grüße, Zoë — ünïcödé text ✓\nFrom the desk of Alice\n",
    ),
    "long-lines": Case(text=("x" * 2000) + "\n" + ("word " * 400) + "\n"),
}
assert 70 <= len(CASES["utf8-subject"].subject) <= 77


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=30
    )


def _send(
    store: CertStore, settings: SMTPSettings, message: Message, **prot: object
) -> MessageOutcome:
    protection = Protection(scheme=Scheme.SMIME, **prot)  # type: ignore[arg-type]
    with Mailer(
        smtp=settings, keystore=Keystore(store.home), certstore=store, protection=protection
    ) as mailer:
        return mailer.send(message)


def _message(case: Case, *, to: str = "Bob <bob@example.net>") -> Message:
    return Message(
        sender="Alice <alice@example.org>",
        to=[to],
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


def _check_content(entity: bytes, case: Case) -> None:
    """The signed (or decrypted) entity carries exactly what was sent, subject included."""
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Subject"] == case.subject
    assert 'protected-headers="v1"' in header_value(_split_head(entity)[0], "Content-Type")
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == case.text
    if case.html is not None:
        html = msg.get_body(preferencelist=("html",))
        assert html is not None
        assert html.get_content().replace("\r\n", "\n") == case.html
    got = {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()}
    assert got == {n: c for n, _, c in case.attachments}


def _body_der(raw: bytes) -> bytes:
    """The CMS object of a received application/pkcs7-mime message (its base64 body)."""
    head, body = _split_head(raw)
    assert header_value(head, "Content-Transfer-Encoding") == "base64"
    return base64.b64decode(b"".join(body.split()), validate=True)


def openssl_verify(entity: bytes, ca: Path, tmp: Path, name: str = "signed") -> bytes:
    """``openssl cms -verify`` of a whole multipart/signed entity against ``ca`` for S/MIME
    signing; returns the PEM of the signer certificate openssl found."""
    path, signer = tmp / f"{name}.eml", tmp / f"{name}-signer.pem"
    path.write_bytes(entity)
    done = run(
        [
            "openssl", "cms", "-verify", "-in", str(path), "-CAfile", str(ca),
            "-purpose", "smimesign", "-signer", str(signer), "-out", "/dev/null",
        ]
    )  # fmt: skip
    assert b"Verification successful" in done.stderr
    return signer.read_bytes()


def openssl_decrypt(raw: bytes, who: Identity, tmp: Path, *, check: bool = True) -> bytes | None:
    """``openssl cms -decrypt`` of a whole received message with ``who``'s certificate and
    key; None when that key opens nothing (only with ``check=False``)."""
    return openssl_decrypt_with(raw, who.cert_pem, who.key_pem, tmp, check=check)


def openssl_decrypt_with(
    raw: bytes, cert: Path, key: Path, tmp: Path, *, check: bool = True
) -> bytes | None:
    path, out = tmp / "enc.eml", tmp / "dec.eml"
    path.write_bytes(raw)
    out.unlink(missing_ok=True)
    done = run(
        [
            "openssl", "cms", "-decrypt", "-in", str(path), "-recip", str(cert),
            "-inkey", str(key), "-out", str(out),
        ],
        check=check,
    )  # fmt: skip
    return out.read_bytes() if done.returncode == 0 else None


def cms_print(raw: bytes, tmp: Path) -> str:
    path = tmp / "print.eml"
    path.write_bytes(raw)
    return run(["openssl", "cms", "-cmsout", "-print", "-in", str(path)]).stdout.decode()


def recipient_infos(raw: bytes, tmp: Path) -> set[tuple[str, int]]:
    """(issuer, serial) of every RecipientInfo, as ``openssl cms -cmsout -print`` shows them."""
    text = cms_print(raw, tmp)
    pairs = re.findall(r"issuer: (.+?)\n\s+serialNumber: (0x[0-9A-Fa-f]+|\d+)", text)
    return {(issuer.strip(), int(serial, 0)) for issuer, serial in pairs}


def gpgsm(
    home: Path, *args: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    return run(
        [
            "gpgsm", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback",
            "--disable-policy-checks", *args,
        ],
        input=input,
        check=check,
    )  # fmt: skip


def sha1_fpr(ident: Identity) -> str:
    return ident.cert.fingerprint(hashes.SHA1()).hex().upper()


@pytest.fixture(scope="module")
def gpgsm_home(pki: PKI) -> Iterator[Path]:
    """A throwaway gpgsm home: the test root trusted (trustlist.txt, flag S), the intermediate
    imported, CRL checks off, and Bob's PKCS#12 imported with loopback pinentry."""
    home = new_gnupg_home("e2gs")
    (home / "gpgsm.conf").write_text("disable-crl-checks\n")
    (home / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    root_fpr = pki.root.fingerprint(hashes.SHA1()).hex(":").upper()
    (home / "trustlist.txt").write_text(f"{root_fpr} S\n")
    gpgsm(home, "--import", str(pki.root_pem), str(pki.intermediate_pem))
    # gpgsm 2.2's PKCS#12 reader rejects about one valid 3DES bundle in sixty (openssl and
    # cryptography read the same file): a fresh bundle, with new salts, is tried on failure.
    bundle = home / "bob.p12"
    for _ in range(5):
        bundle.write_bytes(legacy_p12("bob", pki.bob.cert, pki.bob.key, [pki.intermediate]))
        done = gpgsm(
            home,
            "--passphrase-fd",
            "0",
            "--import",
            str(bundle),
            input=P12_PASSPHRASE.encode(),
            check=False,
        )
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr.decode()
    yield home
    kill_agent(home)
    shutil.rmtree(home, ignore_errors=True)


def gpgsm_verify(home: Path, signed: bytes, signature: bytes, tmp: Path) -> str:
    """gpgsm's VALIDSIG fingerprint (SHA-1) for a detached signature over ``signed``."""
    sig, data = tmp / "gpgsm.p7s", tmp / "gpgsm-signed.eml"
    sig.write_bytes(signature)
    data.write_bytes(signed)
    done = gpgsm(home, "--status-fd", "1", "--verify", str(sig), str(data))
    status = done.stdout.decode()
    assert "[GNUPG:] GOODSIG" in status, status
    assert "TRUST_FULLY" in status, status
    m = re.search(r"\[GNUPG:\] VALIDSIG ([0-9A-F]{40})", status)
    assert m, status
    return m.group(1)


def gpgsm_decrypt(home: Path, der: bytes, tmp: Path) -> bytes:
    enc, out = tmp / "gpgsm.p7m", tmp / "gpgsm-plain.eml"
    enc.write_bytes(der)
    done = gpgsm(
        home,
        "--passphrase-fd",
        "0",
        "--status-fd",
        "1",
        "--output",
        str(out),
        "--decrypt",
        str(enc),
        input=P12_PASSPHRASE.encode(),
        # gpgsm logs "No secret key" for the other recipients' RecipientInfos and then exits 2
        # even when it decrypted with ours: judge by its status lines.
        check=False,
    )
    status = done.stdout.decode()
    assert "[GNUPG:] DECRYPTION_OKAY" in status, status + done.stderr.decode()
    assert "DECRYPTION_FAILED" not in status
    return out.read_bytes()


# -- Interop on the received bytes: openssl cms and gpgsm ---------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_signed_message_verifies_with_openssl_and_gpgsm(
    name: str,
    pki: PKI,
    smime_store: CertStore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    gpgsm_home: Path,
    tmp_path: Path,
) -> None:
    """A signed-only S/MIME message, as the server received it, is the standard
    multipart/signed (application/pkcs7-signature, micalg=sha-256), verifies with openssl cms
    against the root CA alone (so the intermediate travelled in the signature) and with gpgsm,
    both naming Alice's certificate, and the signed part carries the content unchanged."""
    case = CASES[name]
    result = _send(smime_store, smtp_settings, _message(case), encrypt=False)
    assert result.accepted == ("bob@example.net",)
    raw = _received(tls_server, result.message_id)
    head, (signed, signature_part) = multipart_parts(raw)
    ctype = header_value(head, "Content-Type")
    assert ctype.startswith("multipart/signed;")
    assert 'protocol="application/pkcs7-signature"' in ctype
    assert "micalg=sha-256" in ctype
    assert b"x-pkcs7" not in raw
    sig_head, _ = _split_head(signature_part)
    assert header_value(sig_head, "Content-Type").startswith("application/pkcs7-signature")
    signature = base64.b64decode(b"".join(part_body(signature_part).split()), validate=True)

    signer_pem = openssl_verify(raw, pki.root_pem, tmp_path)
    assert pki.alice.cert.public_bytes(Encoding.PEM) in signer_pem
    assert gpgsm_verify(gpgsm_home, signed, signature, tmp_path) == sha1_fpr(pki.alice)
    _check_content(signed, case)
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert outer["Subject"] == case.subject  # signed only: hp="clear", the real subject outside


@pytest.mark.parametrize("name", list(CASES))
def test_signed_and_encrypted_message_decrypts_and_verifies_with_openssl_and_gpgsm(
    name: str,
    pki: PKI,
    smime_store: CertStore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    gpgsm_home: Path,
    tmp_path: Path,
) -> None:
    """Sign+encrypt (the default): the received message is application/pkcs7-mime
    enveloped-data with AES-256-CBC and the Subject hidden; openssl cms and gpgsm both decrypt
    it for Bob to the same signed entity, which verifies with both (Alice's certificate,
    chain to the root), and the content is exact."""
    case = CASES[name]
    result = _send(smime_store, smtp_settings, _message(case))
    raw = _received(tls_server, result.message_id)
    head, _ = _split_head(raw)
    ctype = header_value(head, "Content-Type")
    assert ctype == 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'
    assert header_value(head, "Subject") == "[...]"
    for secret in (case.text.split("\n")[0], case.subject):
        assert secret.encode() not in raw
    assert "aes-256-cbc" in cms_print(raw, tmp_path)

    inner = openssl_decrypt(raw, pki.bob, tmp_path)
    assert inner is not None
    assert inner == gpgsm_decrypt(gpgsm_home, _body_der(raw), tmp_path)
    inner_head, (signed, signature_part) = multipart_parts(inner)
    assert 'protocol="application/pkcs7-signature"' in header_value(inner_head, "Content-Type")
    signer_pem = openssl_verify(inner, pki.root_pem, tmp_path, "inner")
    assert pki.alice.cert.public_bytes(Encoding.PEM) in signer_pem
    signature = base64.b64decode(b"".join(part_body(signature_part).split()), validate=True)
    assert gpgsm_verify(gpgsm_home, signed, signature, tmp_path) == sha1_fpr(pki.alice)
    _check_content(signed, case)


def test_ecdsa_signer_and_rsa_pss_verify_and_aes128_is_used_when_asked(
    pki: PKI, smtp_settings: SMTPSettings, tls_server: LoopbackSMTPServer, gpgsm_home: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """An ECDSA P-256 signer and an RSA signer with RSASSA-PSS both produce signatures that
    openssl and gpgsm accept; --smime-cipher aes128 really envelopes with AES-128-CBC."""
    ec_store = CertStore(tmp_path / "ec-home")
    ec_store.import_files([pki.alice_ec.chain_pem, pki.alice_ec.key_pem, pki.bob.cert_pem])
    ec_store.import_files([pki.root_pem], trust=True)
    case = Case(text="ECDSA signed.\n")
    ec_result = _send(ec_store, smtp_settings, _message(case), encrypt_to_self=False)
    inner = openssl_decrypt(_received(tls_server, ec_result.message_id), pki.bob, tmp_path)
    assert inner is not None
    assert pki.alice_ec.cert.public_bytes(Encoding.PEM) in openssl_verify(
        inner, pki.root_pem, tmp_path
    )
    _, (signed, sig_part) = multipart_parts(inner)
    sig = base64.b64decode(b"".join(part_body(sig_part).split()))
    assert gpgsm_verify(gpgsm_home, signed, sig, tmp_path) == sha1_fpr(pki.alice_ec)
    assert "ecdsa-with-SHA256" in cms_print(inner, tmp_path)

    store = CertStore(tmp_path / "pss-home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    result = _send(
        store,
        smtp_settings,
        _message(case),
        smime_rsa_pss=True,
        smime_cipher=SMIMECipher.AES128_CBC,
    )
    raw = _received(tls_server, result.message_id)
    assert "aes-128-cbc" in cms_print(raw, tmp_path)
    inner = openssl_decrypt(raw, pki.bob, tmp_path)
    assert inner is not None
    assert "rsassaPss" in cms_print(inner, tmp_path)
    openssl_verify(inner, pki.root_pem, tmp_path)
    _, (signed, sig_part) = multipart_parts(inner)
    sig = base64.b64decode(b"".join(part_body(sig_part).split()))
    assert gpgsm_verify(gpgsm_home, signed, sig, tmp_path) == sha1_fpr(pki.alice)


# -- Bcc privacy and encrypt-to-self -----------------------------------------------------------


def test_bcc_copies_and_the_to_cc_copy_are_encrypted_to_disjoint_recipient_sets(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """One copy for To+Cc and one per Bcc recipient; the RecipientInfos (issuer and serial,
    read by openssl) of the copies share no recipient but the sender (encrypt-to-self), the
    To/Cc copy carries no Bcc address anywhere, and each copy decrypts for its recipients."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        cc=["carol@example.com"],
        bcc=["dave@example.com", "erin@example.com"],
        subject="blind",
        text="for your eyes",
    )
    result = _send(smime_store, _settings(server), message)
    assert sorted(result.accepted) == sorted(
        ["bob@example.net", "carol@example.com", "dave@example.com", "erin@example.com"]
    )
    by_rcpts = {m.rcpt_tos: m.data for m in server.messages}

    def ids(*people: Identity) -> set[tuple[str, int]]:
        return {p.issuer_serial for p in people}

    main = recipient_infos(by_rcpts[("bob@example.net", "carol@example.com")], tmp_path)
    dave = recipient_infos(by_rcpts[("dave@example.com",)], tmp_path)
    erin = recipient_infos(by_rcpts[("erin@example.com",)], tmp_path)
    assert main == ids(pki.alice, pki.bob, pki.carol)
    assert dave == ids(pki.alice, pki.dave)
    assert erin == ids(pki.alice, pki.erin)
    sender = ids(pki.alice)
    assert not (main - sender) & (dave - sender)
    assert not (main - sender) & (erin - sender)
    assert not (dave - sender) & (erin - sender)
    for rcpts, raw in by_rcpts.items():
        assert b"\r\nBcc:" not in raw
        who = {"bob@example.net": pki.bob, "dave@example.com": pki.dave}.get(rcpts[0], pki.erin)
        inner = openssl_decrypt(raw, who, tmp_path)
        assert inner is not None and b"Bcc" not in inner
        if "bob@example.net" in rcpts:
            assert b"dave" not in inner and b"erin" not in inner
            assert b"dave" not in raw and b"erin" not in raw
            assert openssl_decrypt(raw, pki.dave, tmp_path, check=False) is None
        else:
            assert openssl_decrypt(raw, pki.bob, tmp_path, check=False) is None

    # Without encrypt-to-self the copies have no recipient in common at all.
    server.messages.clear()
    _send(smime_store, _settings(server), message, encrypt_to_self=False)
    sets = [recipient_infos(m.data, tmp_path) for m in server.messages]
    assert sets == [ids(pki.bob, pki.carol), ids(pki.dave), ids(pki.erin)]


def test_sender_can_read_the_sent_copy_only_with_encrypt_to_self(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """By default the sender's certificate is a recipient (openssl decrypts the sent copy with
    Alice's key); with encrypt_to_self=False it is not, and her key opens nothing."""
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="self copy")
    _send(smime_store, _settings(server), message)
    _send(smime_store, _settings(server), message, encrypt_to_self=False)
    with_self, without_self = (m.data for m in server.messages)
    inner = openssl_decrypt(with_self, pki.alice, tmp_path)
    assert inner is not None and b"self copy" in inner
    assert openssl_decrypt(without_self, pki.alice, tmp_path, check=False) is None
    assert pki.alice.issuer_serial not in recipient_infos(without_self, tmp_path)


def test_encrypt_only_envelopes_the_protected_payload_unsigned(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """With signing off, the envelope holds the payload itself (protected headers, no
    multipart/signed) and still decrypts for the recipient with openssl."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org", to=["bob@example.net"], subject="unsigned", text="sealed"
    )
    result = _send(smime_store, _settings(server), message, sign=False)
    assert result.copies[0].copy.signer is None and not result.copies[0].copy.signed
    inner = openssl_decrypt(server.messages[0].data, pki.bob, tmp_path)
    assert inner is not None
    head, body = _split_head(inner)
    assert header_value(head, "Content-Type").startswith("text/plain;")
    assert header_value(head, "Subject") == "unsigned"
    assert body == b"sealed"


# -- Fail closed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason", "mapped"),
    [
        ("nobody@example.com", KeyReason.NOT_FOUND, None),
        ("expired@example.com", KeyReason.EXPIRED, None),
        ("future@example.com", KeyReason.NOT_YET_VALID, None),
        ("wrong@example.com", KeyReason.ADDRESS_MISMATCH, "wrong"),
        ("untrusted@example.com", KeyReason.UNTRUSTED, None),
        ("weak@example.com", KeyReason.WEAK, None),
        ("sha1@example.com", KeyReason.WEAK, None),
        ("noeku@example.com", KeyReason.WRONG_USAGE, None),
        ("ec@example.com", KeyReason.UNSUPPORTED, None),
    ],
)
def test_one_unusable_recipient_certificate_sends_nothing(
    who: str,
    reason: KeyReason,
    mapped: str | None,
    pki: PKI,
    smime_store: CertStore,
    smtp_server: ServerFactory,
) -> None:
    """A recipient whose certificate is missing, expired, not yet valid, for another address
    (even when chosen explicitly), from an untrusted issuer, RSA-1024, SHA-1 signed, without
    emailProtection, or EC (no key transport) stops the message before any connection."""
    server = smtp_server(tls="implicit")
    key_map = {who: pki.bad[mapped].fingerprint} if mapped else {}
    message = Message(sender="alice@example.org", to=["bob@example.net", who], text="secret")
    with pytest.raises(RecipientKeyError) as info:
        _send(smime_store, _settings(server), message, key_map=key_map)
    assert [(p.address, p.reason) for p in info.value.problems] == [(who, reason)]
    assert who in str(info.value)
    assert server.transcript == []
    assert server.messages == []


def test_every_offending_recipient_in_to_cc_and_bcc_is_named(
    smime_store: CertStore, smtp_server: ServerFactory
) -> None:
    """All recipients without a usable certificate are reported together, with reasons,
    whichever header they are in; the server sees nothing."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net", "expired@example.com"],
        cc=["untrusted@example.com"],
        bcc=["nobody@example.com", "future@example.com"],
        text="secret",
    )
    with pytest.raises(RecipientKeyError) as info:
        _send(smime_store, _settings(server), message)
    assert {p.address: p.reason for p in info.value.problems} == {
        "expired@example.com": KeyReason.EXPIRED,
        "untrusted@example.com": KeyReason.UNTRUSTED,
        "nobody@example.com": KeyReason.NOT_FOUND,
        "future@example.com": KeyReason.NOT_YET_VALID,
    }
    assert "4 recipients have no usable key" in str(info.value)
    assert "Rogue Root CA" in str(info.value)
    assert server.transcript == []


def test_sender_without_identity_or_with_unusable_self_certificate_sends_nothing(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Signing needs an identity (certificate + key) naming From; encrypt-to-self needs the
    sender's certificate (an EC-only sender is told why); nothing is sent either way."""
    server = smtp_server(tls="implicit")
    message = Message(sender="bob@example.net", to=["carol@example.com"], text="hi")
    with pytest.raises(SignerKeyError) as info:
        _send(smime_store, _settings(server), message)
    assert info.value.problem.reason is KeyReason.NO_SECRET_KEY
    ec_store = CertStore(tmp_path / "ec")
    ec_store.import_files([pki.alice_ec.chain_pem, pki.alice_ec.key_pem, pki.bob.cert_pem])
    ec_store.import_files([pki.root_pem], trust=True)
    alice = Message(sender="alice@example.org", to=["bob@example.net"], text="hi")
    with pytest.raises(RecipientKeyError) as rinfo:
        _send(ec_store, _settings(server), alice)
    assert rinfo.value.problems[0].reason is KeyReason.UNSUPPORTED
    assert "encrypt-to-self" in str(rinfo.value)
    assert server.transcript == []


def test_self_signed_certificate_needs_explicit_trust_by_fingerprint(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A self-signed recipient certificate is refused as untrusted (the message says how to
    trust it); named by SHA-256 fingerprint for this message it is accepted, and the copy
    decrypts for its owner with openssl."""
    other = CertStore(tmp_path / "frank")
    frank = other.generate_identity("frank@example.com", algorithm="rsa2048")
    (tmp_path / "frank.pem").write_bytes(other.export_pem(frank))
    store = CertStore(tmp_path / "sender")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, tmp_path / "frank.pem"])
    store.import_files([pki.root_pem], trust=True)
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["frank@example.com"], text="self-signed")
    with pytest.raises(RecipientKeyError) as info:
        _send(store, _settings(server), message)
    (problem,) = info.value.problems
    assert problem.reason is KeyReason.UNTRUSTED
    assert "self-signed" in problem.detail and frank.fingerprint in problem.detail
    assert server.transcript == []
    result = _send(
        store, _settings(server), message, smime_trust_self_signed=frozenset({frank.fingerprint})
    )
    assert set(result.copies[0].copy.encrypted_to) == {frank.fingerprint, pki.alice.fingerprint}
    assert frank.key_path is not None
    inner = openssl_decrypt_with(
        server.messages[0].data, tmp_path / "frank.pem", frank.key_path, tmp_path
    )
    assert inner is not None and b"self-signed" in inner


def test_passphrase_protected_identity_missing_wrong_and_right(
    pki: PKI, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A PKCS#12 identity imported with its passphrase is stored encrypted (0600) under it;
    sending without the passphrase -> PassphraseError (missing), a wrong one -> PassphraseError,
    the right one -> sent."""
    store = CertStore(tmp_path / "home")
    imported = store.import_files([pki.alice.p12, pki.bob.cert_pem], passphrase=P12_PASSPHRASE)
    store.import_files([pki.root_pem], trust=True)
    identity = next(i.stored for i in imported if i.stored.kind is CertKind.IDENTITY)
    assert identity.key_path is not None
    assert b"ENCRYPTED PRIVATE KEY" in identity.key_path.read_bytes()
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert identity.chain == (pki.intermediate,)
    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="locked")
    settings = _settings(server)
    protection = Protection(scheme=Scheme.SMIME)
    with Mailer(smtp=settings, certstore=store, protection=protection) as mailer:
        with pytest.raises(PassphraseError) as info:
            mailer.send(message)
        assert info.value.missing
    with Mailer(smtp=settings, certstore=store, protection=protection, passphrase="no") as mailer:
        with pytest.raises(PassphraseError) as info:
            mailer.send(message)
        assert not info.value.missing
    assert server.transcript == []
    asked: list[int] = []

    def ask() -> str:
        asked.append(1)
        return P12_PASSPHRASE

    with Mailer(smtp=settings, certstore=store, protection=protection, passphrase=ask) as mailer:
        assert mailer.send(message).accepted == ("bob@example.net",)
        assert mailer.send(message).accepted == ("bob@example.net",)  # key cached: asked once
    assert asked == [1]


# -- The certificate store ---------------------------------------------------------------------


def test_import_forms_lookup_and_key_map(pki: PKI, tmp_path: Path) -> None:
    """Certificates import from PEM, DER and PKCS#7; a key and its certificate from separate
    files make an identity; --trust makes an anchor and refuses keys; lookup by address is
    case-insensitive; the key map takes SHA-256 or SHA-1 fingerprints; a lone key is refused."""
    store = CertStore(tmp_path / "home")
    der = tmp_path / "carol.cer"
    der.write_bytes(pki.carol.cert.public_bytes(Encoding.DER))
    p7b = tmp_path / "dave.p7b"
    run(
        ["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(pki.dave.cert_pem), "-outform",
         "DER", "-out", str(p7b)]
    )  # fmt: skip
    kinds = {
        i.stored.fingerprint: i.stored.kind
        for i in store.import_files(
            [pki.alice.key_pem, pki.alice.cert_pem, der, p7b, pki.intermediate_pem]
        )
    }
    assert kinds == {
        pki.alice.fingerprint: CertKind.IDENTITY,
        pki.carol.fingerprint: CertKind.CERTIFICATE,
        pki.dave.fingerprint: CertKind.CERTIFICATE,
        fingerprint(pki.intermediate): CertKind.INTERMEDIATE,
    }
    untrusted = store.recipient_cert("CAROL@Example.COM")
    assert isinstance(untrusted, KeyProblem) and untrusted.reason is KeyReason.UNTRUSTED
    store.import_files([pki.root_pem], trust=True)
    with pytest.raises(KeystoreError, match="certificates only"):
        store.import_files([pki.bob.key_pem, pki.bob.cert_pem], trust=True)
    with pytest.raises(KeystoreError, match="no certificate for this private key"):
        store.import_files([pki.bob.key_pem])
    found = store.recipient_cert("CAROL@Example.COM")
    assert isinstance(found, StoredCert) and found.fingerprint == pki.carol.fingerprint
    dave_sha1 = pki.dave.cert.fingerprint(hashes.SHA1()).hex(":")
    mapped = store.recipient_cert("dave@example.com", key_map={"dave@example.com": dave_sha1})
    assert isinstance(mapped, StoredCert) and mapped.fingerprint == pki.dave.fingerprint
    wrong = store.recipient_cert("carol@example.com", key_map={"carol@example.com": dave_sha1})
    assert isinstance(wrong, KeyProblem) and wrong.reason is KeyReason.ADDRESS_MISMATCH
    signer = store.signer_cert("alice@example.org")
    assert isinstance(signer, StoredCert) and signer.kind is CertKind.IDENTITY


def openssl_x509_verify(cert: Path, ca: Path, *untrusted: Path, purpose: str) -> str:
    """``openssl verify`` of a certificate file for an S/MIME purpose: its combined output
    ("...: OK" or the error)."""
    args = ["openssl", "verify", "-CAfile", str(ca), "-purpose", purpose]
    for path in untrusted:
        args += ["-untrusted", str(path)]
    done = run([*args, str(cert)], check=False)
    return (done.stdout + done.stderr).decode()


def test_name_constrained_ca_cannot_lend_an_address_through_the_subject(
    pki: PKI, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Addresses come only from subjectAltName rfc822Name, which a CA's name constraints bind.
    Under a CA constrained to partner.example: a certificate with ceo@corp.example only in its
    subject emailAddress (its SAN a dNSName) names no address, is not found for
    ceo@corp.example, is an address mismatch when chosen by fingerprint, and nothing is sent;
    one with ceo@corp.example in its SAN is untrusted (name constraints); ann@partner.example
    is usable. openssl judges the three certificates the same way."""
    ok, outside, bypass = (pki.constrained[k] for k in ("ok", "outside", "subject_email"))
    for ident, verdict in ((ok, ": OK"), (outside, "subtree violation"), (bypass, "subtree")):
        said = openssl_x509_verify(
            ident.cert_pem, pki.root_pem, pki.partner_ca_pem, purpose="smimeencrypt"
        )
        assert verdict in said, said
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.partner_ca_pem])
    store.import_files([c.cert_pem for c in pki.constrained.values()])
    store.import_files([pki.root_pem], trust=True)

    good = store.recipient_cert("ann@partner.example")
    assert isinstance(good, StoredCert) and good.fingerprint == ok.fingerprint
    stored = store.get(bypass.fingerprint)
    assert stored is not None and stored.addresses == ()
    assert "ceo@corp.example" not in describe(bypass.cert)
    assert [c.fingerprint for c in store.find("ceo@corp.example")] == [outside.fingerprint]
    refused = store.recipient_cert("ceo@corp.example")
    assert isinstance(refused, KeyProblem) and refused.reason is KeyReason.UNTRUSTED
    assert "name constraints" in refused.detail
    mapped = store.recipient_cert(
        "ceo@corp.example", key_map={"ceo@corp.example": bypass.fingerprint}
    )
    assert isinstance(mapped, KeyProblem) and mapped.reason is KeyReason.ADDRESS_MISMATCH
    judged = store.check(bypass.cert, "ceo@corp.example", purpose="encrypt")
    assert judged is not None and judged.reason is KeyReason.ADDRESS_MISMATCH

    server = smtp_server(tls="implicit")
    message = Message(sender="alice@example.org", to=["ceo@corp.example"], text="board minutes")
    with pytest.raises(RecipientKeyError) as info:
        _send(
            store,
            _settings(server),
            message,
            key_map={"ceo@corp.example": bypass.fingerprint},
        )
    assert [p.address for p in info.value.problems] == ["ceo@corp.example"]
    with pytest.raises(RecipientKeyError):
        _send(store, _settings(server), message)
    assert server.transcript == []


def test_cached_key_never_turns_a_wrong_or_missing_passphrase_into_success(
    pki: PKI, tmp_path: Path
) -> None:
    """A protected identity's unlocked key is cached for the passphrase that unlocked it only:
    that passphrase again returns the same key object (no second decryption), while a wrong
    passphrase or none still raises PassphraseError after the cached unlock; export_pkcs12
    reads the key file and demands the passphrase whatever is cached."""
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.p12], passphrase=P12_PASSPHRASE)
    (identity,) = store.identities()
    first = store.signer_key(identity, P12_PASSPHRASE).private_key
    assert store.signer_key(identity, P12_PASSPHRASE).private_key is first
    with pytest.raises(PassphraseError) as wrong:
        store.signer_key(identity, "wrong")
    assert not wrong.value.missing
    with pytest.raises(PassphraseError) as missing:
        store.signer_key(identity, None)
    assert missing.value.missing
    with pytest.raises(PassphraseError) as no_export:
        store.export_pkcs12(identity, passphrase=None, export_passphrase="x")
    assert no_export.value.missing
    with pytest.raises(PassphraseError):
        store.export_pkcs12(identity, passphrase="wrong", export_passphrase="x")
    bundle = store.export_pkcs12(identity, passphrase=P12_PASSPHRASE, export_passphrase="x")
    assert pkcs12.load_key_and_certificates(bundle, b"x")[1] == pki.alice.cert
    assert store.signer_key(identity, P12_PASSPHRASE).private_key is first


def test_key_files_are_never_written_through_a_planted_symlink(pki: PKI, tmp_path: Path) -> None:
    """Key files are written through a fresh, exclusively created temporary file (O_EXCL |
    O_NOFOLLOW, 0600 from the start) renamed into place: a symlink planted at the predictable
    name KEY.key.tmp, pointing outside the home, receives nothing, and the key file is a
    regular 0600 file."""
    store = CertStore(tmp_path / "home")
    folder = store.root / "identities"
    folder.mkdir(parents=True, mode=0o700)
    store.root.chmod(0o700)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours\n")
    key_path = folder / f"{pki.alice.fingerprint}.key"
    (folder / f"{key_path.name}.tmp").symlink_to(outside)
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem])
    assert outside.read_bytes() == b"not yours\n"
    assert key_path.is_file() and not key_path.is_symlink()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"-----BEGIN PRIVATE KEY-----" in key_path.read_bytes()
    leftovers = {p.name for p in folder.iterdir()} - {key_path.name, f"{key_path.name}.tmp"}
    assert leftovers == {f"{pki.alice.fingerprint}.pem"}


def test_local_test_ca_is_name_constrained_and_short_lived(tmp_path: Path) -> None:
    """The local test CA certifies only the domains it issued for: a CA left by an older
    version without name constraints is re-issued, under the same key, with a nameConstraints
    extension for the domain of its existing identity plus the new one, at most a year of
    life, and the old anchor is no longer trusted; its identities stay usable (openssl agrees).
    A certificate minted with its unencrypted key for another domain is refused here and by
    openssl; `status` calls it a local test CA and lists its domains."""
    store = CertStore(tmp_path / "home")
    folder = store.root / "testca"
    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())  # as an older e2email left it, but quick
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "e2email"),
            x509.NameAttribute(NameOID.COMMON_NAME, "e2email local test CA (not for real mail)"),
        ]
    )
    legacy = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(legacy.public_bytes(Encoding.PEM))
    (folder / "ca.key").write_bytes(
        ca_key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    store.import_files([folder / "ca.pem"], trust=True)
    old_me = issue_leaf("me@example.org", ca_key, legacy, ca_key)  # signing only (EC)
    (tmp_path / "me.pem").write_bytes(old_me.public_bytes(Encoding.PEM))
    (tmp_path / "me.key").write_bytes(
        ca_key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    store.import_files([tmp_path / "me.pem", tmp_path / "me.key"])

    other = store.generate_identity("you@example.net", algorithm="ecdsa-p256", test_ca=True)
    ca_pem = store.test_ca_cert()
    assert ca_pem is not None
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    assert ca.public_key() == ca_key.public_key() and ca != legacy
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.value.permitted_subtrees == [
        x509.RFC822Name("example.org"),
        x509.RFC822Name("example.net"),
    ]
    assert ca.not_valid_after_utc - now <= datetime.timedelta(days=365, minutes=1)
    assert store.trust_anchors() == (ca,)
    assert other.not_after <= ca.not_valid_after_utc
    for address, cert in (("me@example.org", old_me), ("you@example.net", other.certificate)):
        assert store.check(cert, address, purpose="sign") is None
    (tmp_path / "you.pem").write_bytes(other.certificate.public_bytes(Encoding.PEM))
    assert ": OK" in openssl_x509_verify(tmp_path / "you.pem", ca_pem, purpose="smimesign")

    minted = issue_leaf("ceo@bank.example", ca_key, ca, ca_key)
    problem = store.check(minted, "ceo@bank.example", purpose="sign")
    assert problem is not None and problem.reason is KeyReason.UNTRUSTED
    assert "name constraints" in problem.detail
    (tmp_path / "minted.pem").write_bytes(minted.public_bytes(Encoding.PEM))
    said = openssl_x509_verify(tmp_path / "minted.pem", ca_pem, purpose="smimesign")
    assert "permitted subtree violation" in said, said

    (anchor,) = (c for c in store.all_certs() if c.kind is CertKind.TRUSTED)
    status = store.status(anchor)
    assert "local test CA" in status and "not for real mail" in status
    assert "may certify only addresses at example.org, example.net" in status


def test_generated_identities_self_signed_and_from_the_local_test_ca(tmp_path: Path) -> None:
    """`generate_identity` makes a usable self-signed identity (trusted here, by name) or one
    issued by a local test CA it creates (valid a year, name-constrained to example.org);
    openssl and gpgsm (which refuses chains through a *critical* nameConstraints) verify a
    signature by the latter against the test CA certificate, and export_pkcs12 produces a
    bundle openssl can read."""
    store = CertStore(tmp_path / "home")
    own = store.generate_identity("me@example.org", name="Me", algorithm="rsa2048")
    assert own.self_signed and store.status(own) == "usable"
    issued = store.generate_identity("ca-issued@example.org", algorithm="rsa2048", test_ca=True)
    ca = store.test_ca_cert()
    assert ca is not None and not issued.self_signed
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraints.permitted_subtrees == [x509.RFC822Name("example.org")]
    life = ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc
    assert life <= datetime.timedelta(days=365, minutes=6)
    assert stat.S_IMODE((ca.parent / "ca.key").stat().st_mode) == 0o600
    assert store.status(issued) == "usable"
    payload = b"Content-Type: text/plain\r\n\r\nhi\r\n"
    entity = smime.sign(payload, signer=store.signer_key(issued))
    openssl_verify(b"MIME-Version: 1.0\r\n" + entity, ca, tmp_path)
    home = new_gnupg_home("e2tca")
    try:
        (home / "gpgsm.conf").write_text("disable-crl-checks\n")
        sha1 = ca_cert.fingerprint(hashes.SHA1()).hex(":").upper()
        (home / "trustlist.txt").write_text(f"{sha1} S\n")
        gpgsm(home, "--import", str(ca))
        signed, signature = smime.parse_multipart_signed(entity)
        valid = gpgsm_verify(home, signed, signature, tmp_path)
        assert valid == issued.sha1_fingerprint
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    p12 = tmp_path / "out.p12"
    p12.write_bytes(store.export_pkcs12(issued, passphrase=None, export_passphrase="x"))
    out = run(["openssl", "pkcs12", "-in", str(p12), "-passin", "pass:x", "-nokeys"]).stdout
    assert b"BEGIN CERTIFICATE" in out


def test_own_verifier_rejects_tampered_content(pki: PKI) -> None:
    """The CMS verifier the demo uses accepts the exact signed bytes and refuses a one-byte
    change, and the envelope check reads back exactly the chosen recipients."""
    store = CertStore(pki.dir / "verifier-home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem])
    signer = store.signer_key(store.identities()[0])
    payload = b"Content-Type: text/plain\r\n\r\npay 100 EUR\r\n"
    signed, signature = smime.parse_multipart_signed(smime.sign(payload, signer=signer))
    assert signed == payload
    assert smime.verify_detached(signed, signature).certificate == pki.alice.cert
    with pytest.raises(CryptoError, match="BAD signature"):
        smime.verify_detached(signed.replace(b"100", b"900"), signature)
    entity = smime.encrypt(payload, recipients=[pki.bob.cert, pki.carol.cert])
    ids = smime.recipient_ids(smime.entity_der(entity))
    assert sorted(s for _, s in ids) == sorted(
        [pki.bob.cert.serial_number, pki.carol.cert.serial_number]
    )
    with pytest.raises(CryptoError, match="only RSA"):
        smime.encrypt(payload, recipients=[pki.bad["ec"].cert])


# -- Command line ------------------------------------------------------------------------------


def e2email(
    *args: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        input=b"",
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home), **(env or {})},
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


def test_cli_keys_import_list_generate_and_send_smime(
    pki: PKI, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """`keys import` takes a PKCS#12 (passphrase from the environment), certificates and
    --trust CA; `keys list` shows each S/MIME certificate's subject, issuer, validity and
    status; `keys generate --smime` makes a usable identity; `send --smime` delivers a message
    openssl verifies and decrypts; an expired recipient exits 3 naming it, nothing sent; and
    S/MIME options without --smime are a usage error."""
    home = tmp_path / "home"
    env = {"P12_PW": P12_PASSPHRASE}
    done = e2email(
        "keys", "import", str(pki.alice.p12), str(pki.bob.cert_pem),
        str(pki.bad["expired"].cert_pem), "--trust", str(pki.root_pem),
        "--passphrase-env", "P12_PW", home=home, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"S/MIME own identity alice@example.org: imported {pki.alice.fingerprint}" in done.stdout
    assert "S/MIME trusted CN=e2email Test Root CA: imported" in done.stdout
    assert "note: key expired" in done.stdout

    generated = e2email(
        "keys", "generate", "--smime", "new@example.org", "--algorithm", "rsa2048", home=home
    )
    assert generated.returncode == 0, generated.stderr
    assert "self-signed, trusted here" in generated.stdout

    listing = e2email("keys", "list", home=home)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(ln.startswith("S/MIME (") for ln in lines)
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  ") and "@" in ln.split()[0]}
    assert "[own identity]  usable" in rows["alice@example.org"]
    assert "[certificate]  usable" in rows["bob@example.net"]
    assert "key expired" in rows["expired@example.com"]
    assert "[own identity, trusted]  usable" in rows["new@example.org"]
    assert "      issuer   CN=e2email Test Intermediate CA" in listing.stdout
    assert pki.bob.fingerprint in listing.stdout
    assert re.search(r"valid +\d{4}-\d\d-\d\d to \d{4}-\d\d-\d\d +rsa2048", listing.stdout)

    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    base = [
        "send", "--smime", "--from", "alice@example.org", "--host", server.host,
        "--port", str(server.port), "--tls", "implicit", "--ca-file", str(server.ca_file),
        "--passphrase-env", "P12_PW", "--subject", "CLI S/MIME",
    ]  # fmt: skip
    refused = e2email(
        *base,
        "--to",
        "bob@example.net",
        "--to",
        "expired@example.com",
        "--body",
        "x",
        home=home,
        env=env,
    )
    assert refused.returncode == 3
    assert "expired@example.com: key expired" in refused.stderr
    assert server.transcript == []
    sent = e2email(
        *base, "--to", "bob@example.net", "--body", "hello from the CLI", home=home, env=env
    )
    assert sent.returncode == 0, sent.stderr
    inner = openssl_decrypt(server.messages[0].data, pki.bob, tmp_path)
    assert inner is not None and b"hello from the CLI" in inner
    openssl_verify(inner, pki.root_pem, tmp_path)
    usage = e2email(
        "send",
        "--rsa-pss",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--output",
        "-",
        "--body",
        "x",
        home=home,
    )
    assert usage.returncode == 2 and "--rsa-pss needs --smime" in usage.stderr


def test_demo_smime_round_trip(tmp_path: Path) -> None:
    """The demo's S/MIME part: identities from a local test CA, sign+encrypt over TLS to a real
    server, then Bob decrypts and verifies signature and chain with e2email's own verifier."""
    import asyncio
    import io

    from rich.console import Console

    from e2email.demo import _run_smime

    out = io.StringIO()
    console = Console(file=out, width=100)
    assert asyncio.run(_run_smime(console, tmp_path)) is True
    text = out.getvalue()
    assert "S/MIME round trip complete" in text
    assert "signature: GOOD, by Alice Demo <alice@example.org>" in text
    assert "application/pkcs7-mime" in text and "Subject: [...]" in text


def test_pkcs12_export_is_private_and_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    """`keys export --smime --pkcs12 --output FILE` holds the private key: the file is 0600
    whatever the umask, and a symbolic link planted at FILE is not written through."""
    home = tmp_path / "home"
    made = e2email(
        "keys", "generate", "--smime", "new@example.org", "--algorithm", "rsa2048", home=home
    )
    assert made.returncode == 0, made.stderr
    env = {"EXPORT_PW": "bundle pass"}
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.p12"
    link.symlink_to(victim)
    args = ("keys", "export", "new@example.org", "--smime", "--pkcs12")
    planted = e2email(
        *args, "--output", str(link), "--export-passphrase-env", "EXPORT_PW", home=home, env=env
    )
    assert planted.returncode != 0
    assert victim.read_text() == "keep me"
    out = tmp_path / "new.p12"
    old = os.umask(0)
    try:
        done = e2email(
            *args, "--output", str(out), "--export-passphrase-env", "EXPORT_PW", home=home, env=env
        )
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key, cert, _ = pkcs12.load_key_and_certificates(out.read_bytes(), b"bundle pass")
    assert key is not None and cert is not None
