"""S/MIME of a large message is made piece by piece (issue 9 part 5), by e2email's own CMS
writer (e2email/crypto/cms.py) instead of ``cryptography``'s builders, which take and return
whole buffers.

What a real SMTP server received (sent with the outbox, as the benchmark sends) decrypts and
verifies with ``openssl cms`` and ``gpgsm``, sign-only and sign+encrypt, and carries the
attached file's bytes; the objects have ``cryptography``'s layout field by field (the
signature byte for byte); Python's allocations while protecting stay a few pieces, far below
the message; an attachment that cannot be read, or changes, mid-way leaves no copy.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import hashlib
import itertools
import os
import re
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from fixtures_smime import PKI
from pgp_helpers import multipart_parts, part_body, run
from test_smime import (
    cms_print,
    gpgsm_decrypt,
    gpgsm_home,  # noqa: F401  (a module-scoped fixture: Bob's key in a gpgsm home)
    gpgsm_verify,
    openssl_decrypt,
    openssl_verify,
    sha1_fpr,
)
from test_spool import _spool_fds

from e2email import (
    Attachment,
    Mailer,
    Message,
    Protection,
    RecipientKeyError,
    Scheme,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertStore
from e2email.config import SMIMECipher
from e2email.crypto import cms, smime
from e2email.errors import CryptoError, MessageError
from e2email.keystore import Keystore
from e2email.outbox import Outbox
from e2email.spool import spool_dir
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

#: Over LARGE once base64-encoded (4/3 of it), and over every internal piece size.
SIZE = 6_000_000 + 1234


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smime-large") / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def no_library_cms(monkeypatch: pytest.MonkeyPatch) -> None:
    """cryptography's whole-buffer builders are not used for a large message."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cryptography's PKCS#7 builder was used for a large message")

    monkeypatch.setattr(smime.pkcs7, "PKCS7EnvelopeBuilder", refuse)
    monkeypatch.setattr(smime.pkcs7, "PKCS7SignatureBuilder", refuse)


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=60
    )


def _message(sender: str, to: str, path: Path, *, bcc: str | None = None) -> Message:
    return Message(
        sender=sender,
        to=[to],
        bcc=[bcc] if bcc else [],
        subject="large S/MIME",
        text="The file is attached.\n",
        attachments=[Attachment.from_path(path)],
    )


def _attachment(signed_part: bytes) -> bytes:
    msg = email.message_from_bytes(signed_part, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    (part,) = list(msg.iter_attachments())
    assert part.get_filename() == "big.bin"
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return content


def _signature(entity: bytes) -> tuple[bytes, bytes]:
    """(signed part, DER signature) of a multipart/signed entity, cut by byte offsets."""
    _, (signed, sig_part) = multipart_parts(entity)
    return signed, base64.b64decode(b"".join(part_body(sig_part).split()))


def _body_der(raw: bytes) -> bytes:
    body = raw.split(b"\r\n\r\n", 1)[1]
    return base64.b64decode(b"".join(body.split()), validate=True)


# -- What a real server received: openssl and gpgsm ---------------------------------------------


def test_large_signed_and_encrypted_message_decrypts_and_verifies_with_openssl_and_gpgsm(
    pki: PKI,
    smime_store: CertStore,
    smtp_server: ServerFactory,
    big_file: Path,
    gpgsm_home: Path,  # noqa: F811
    tmp_path: Path,
    no_library_cms: None,
) -> None:
    """A 6 MB file attached by path, signed and encrypted To Bob and Bcc Carol, sent with the
    outbox: each copy's base64 lines are 76 characters, openssl decrypts each with its
    recipient's key (and Bob's with gpgsm), the signature inside verifies with openssl and
    gpgsm, and the attachment is the file's bytes."""
    server = smtp_server(tls="implicit")
    blob = big_file.read_bytes()
    message = _message(pki.alice.address, pki.bob.address, big_file, bcc=pki.carol.address)
    with Mailer(
        smtp=_settings(server),
        keystore=Keystore(smime_store.home),
        certstore=smime_store,
        outbox=tmp_path / "outbox.sqlite3",
        protection=Protection(scheme=Scheme.SMIME),
    ) as mailer:
        result = mailer.send(message)
    assert sorted(result.accepted) == sorted([pki.bob.address, pki.carol.address])
    by_rcpt = {tuple(m.rcpt_tos): m.data for m in server.messages}
    assert set(by_rcpt) == {(pki.bob.address,), (pki.carol.address,)}
    for who in (pki.bob, pki.carol):
        raw = by_rcpt[(who.address,)]
        lines = raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
        assert {len(line) for line in lines[:-2]} == {76} and lines[-1] == b""
        der = _body_der(raw)
        # Each copy is also encrypted to the sender (encrypt-to-self, the default).
        assert sorted(smime.recipient_ids(der)) == sorted(
            (c.issuer.public_bytes(), c.serial_number) for c in (who.cert, pki.alice.cert)
        )
        entity = openssl_decrypt(raw, who, tmp_path)
        assert entity is not None
        assert openssl_verify(entity, pki.root_pem, tmp_path) == pki.alice.cert_pem.read_bytes()
        signed, signature = _signature(entity)
        assert _attachment(signed) == blob
    bob_der = _body_der(by_rcpt[(pki.bob.address,)])
    entity = gpgsm_decrypt(gpgsm_home, bob_der, tmp_path)
    assert entity == openssl_decrypt(by_rcpt[(pki.bob.address,)], pki.bob, tmp_path)
    signed, signature = _signature(entity)
    assert gpgsm_verify(gpgsm_home, signed, signature, tmp_path) == sha1_fpr(pki.alice)
    assert "aes-256-cbc" in cms_print(by_rcpt[(pki.bob.address,)], tmp_path)


def test_large_signed_only_message_verifies_with_openssl_and_gpgsm(
    pki: PKI,
    smime_store: CertStore,
    smtp_server: ServerFactory,
    big_file: Path,
    gpgsm_home: Path,  # noqa: F811
    tmp_path: Path,
    no_library_cms: None,
) -> None:
    """Sign-only, the payload written into the copy's spool as it is hashed: what the server
    received verifies with openssl and gpgsm and carries the file's bytes."""
    server = smtp_server(tls="implicit")
    with Mailer(
        smtp=_settings(server),
        keystore=Keystore(smime_store.home),
        certstore=smime_store,
        outbox=tmp_path / "outbox.sqlite3",
        protection=Protection(scheme=Scheme.SMIME, encrypt=False),
    ) as mailer:
        mailer.send(_message(pki.alice.address, pki.bob.address, big_file))
    (received,) = server.messages
    entity = received.data.split(b"Content-Type: multipart/signed", 1)
    assert len(entity) == 2
    entity_bytes = b"Content-Type: multipart/signed" + entity[1]
    assert openssl_verify(entity_bytes, pki.root_pem, tmp_path) == pki.alice.cert_pem.read_bytes()
    signed, signature = _signature(received.data)
    assert gpgsm_verify(gpgsm_home, signed, signature, tmp_path) == sha1_fpr(pki.alice)
    assert _attachment(signed) == big_file.read_bytes()


@pytest.mark.parametrize(
    ("signer", "options", "printed"),
    [
        ("alice_ec", {"smime_digest": "sha384"}, ["ecdsa-with-SHA384", "aes-256-cbc"]),
        (
            "alice",
            {
                "smime_rsa_pss": True,
                "smime_digest": "sha512",
                "smime_cipher": SMIMECipher.AES128_CBC,
            },
            ["rsassaPss", "sha512", "aes-128-cbc"],
        ),
    ],
)
def test_large_message_with_ecdsa_or_pss_signer_and_aes128(
    pki: PKI,
    big_file: Path,
    gpgsm_home: Path,  # noqa: F811
    tmp_path: Path,
    no_library_cms: None,
    signer: str,
    options: dict[str, Any],
    printed: list[str],
) -> None:
    """An ECDSA signer with SHA-384, and RSASSA-PSS with SHA-512 and AES-128-CBC: openssl
    decrypts and verifies, and shows the algorithms asked for; gpgsm verifies."""
    ident = getattr(pki, signer)
    store = CertStore(tmp_path / "home")
    store.import_files([ident.chain_pem, ident.key_pem, pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    protector = smime.SMIMEProtector(store)
    message = _message(ident.address, pki.bob.address, big_file).finalized()
    protection = Protection(scheme=Scheme.SMIME, encrypt_to_self=False, **options)
    (copy,) = asyncio.run(protector.protect(message, protection))
    raw = copy.raw
    entity = openssl_decrypt(raw, pki.bob, tmp_path)
    assert entity is not None
    assert openssl_verify(entity, pki.root_pem, tmp_path) == ident.cert_pem.read_bytes()
    shown = cms_print(raw, tmp_path) + cms_print(entity, tmp_path)
    for name in printed:
        assert name in shown
    signed, signature = _signature(entity)
    assert _attachment(signed) == big_file.read_bytes()
    assert gpgsm_verify(gpgsm_home, signed, signature, tmp_path) == sha1_fpr(ident)


def test_large_message_encrypted_only_decrypts_to_the_payload(
    pki: PKI, smime_store: CertStore, big_file: Path, tmp_path: Path, no_library_cms: None
) -> None:
    """Encrypt-only: the payload itself (no signature) is enveloped piece by piece and
    openssl decrypts it to the MIME entity that carries the file."""
    protector = smime.SMIMEProtector(smime_store)
    message = _message(pki.alice.address, pki.bob.address, big_file).finalized()
    protection = Protection(scheme=Scheme.SMIME, sign=False)
    (copy,) = asyncio.run(protector.protect(message, protection))
    entity = openssl_decrypt(copy.raw, pki.bob, tmp_path)
    copy.discard()
    assert entity is not None
    assert b"multipart/signed" not in entity.split(b"\r\n\r\n", 1)[0]
    assert _attachment(entity) == big_file.read_bytes()


# -- The objects have cryptography's layout -----------------------------------------------------


def _tree(der: bytes, masked: Callable[[int, bytes], bool]) -> Any:
    """A DER structure as nested (tag, children or content), the primitives ``masked``
    chooses shown by their tag alone (random values: keys, IVs, signatures)."""

    def walk(tlv: Any) -> Any:
        if tlv.tag & 0x20:
            return (tlv.tag, [walk(child) for child in tlv.children()])
        return (tlv.tag, None if masked(tlv.tag, tlv.content) else tlv.content)

    return walk(smime._parse(der))


def _signing_time(der: bytes) -> dt.datetime:
    # The signingTime attribute (1.2.840.113549.1.9.5), not a certificate's validity dates.
    found = re.search(
        rb"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x09\x05\x31\x0f\x17\x0d(\d{12})Z", der
    )
    assert found is not None
    return dt.datetime.strptime(found.group(1).decode(), "%y%m%d%H%M%S").replace(tzinfo=dt.UTC)


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
def test_cms_signature_is_byte_for_byte_cryptographys(pki: PKI, digest: str) -> None:
    """RSA PKCS#1 v1.5 signatures are deterministic: with the same signing time, the
    SignedData e2email writes from a digest is cryptography's, byte for byte (attributes,
    their order, the certificates and the chain included)."""
    content = b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * 1000
    algorithm = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
    theirs = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(pki.alice.cert, pki.alice.key, algorithm[digest]())  # type: ignore[arg-type]
        .add_certificate(pki.intermediate)
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    )
    ours = cms.detached_signature(
        hashlib.new(digest, content).digest(),
        certificate=pki.alice.cert,
        private_key=pki.alice.key,
        chain=[pki.intermediate],
        digest=digest,
        signing_time=_signing_time(theirs),
    )
    assert ours == theirs


@pytest.mark.parametrize("kind", ["pss", "ecdsa"])
def test_cms_pss_and_ecdsa_signatures_have_cryptographys_layout(pki: PKI, kind: str) -> None:
    """RSASSA-PSS and ECDSA signatures are randomised: every field but the signature value is
    cryptography's, and our own verifier accepts ours over the content."""
    content = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    ident = pki.alice_ec if kind == "ecdsa" else pki.alice
    pad = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        if kind == "pss"
        else None
    )
    theirs = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(ident.cert, ident.key, hashes.SHA256(), rsa_padding=pad)
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    )
    ours = cms.detached_signature(
        hashlib.sha256(content).digest(),
        certificate=ident.cert,
        private_key=ident.key,
        digest="sha256",
        rsa_pss=kind == "pss",
        signing_time=_signing_time(theirs),
    )

    def signature_value(tag: int, body: bytes) -> bool:
        # RSA 256 bytes, ECDSA about 70; the messageDigest and the certificates' extension
        # values are shorter.
        return tag == 0x04 and len(body) >= 64

    assert _tree(ours, signature_value) == _tree(theirs, signature_value)
    assert smime.verify_detached(content, ours).certificate == ident.cert
    assert isinstance(ident.key, ec.EllipticCurvePrivateKey) == (kind == "ecdsa")


@pytest.mark.parametrize("cipher", [algorithms.AES256, algorithms.AES128])
def test_cms_envelope_has_cryptographys_layout_and_decrypts(
    pki: PKI, cipher: type[algorithms.AES256] | type[algorithms.AES128], tmp_path: Path
) -> None:
    """EnvelopedData for two recipients: every field but the random ones (encrypted keys,
    IV, ciphertext) is cryptography's for the same content length, and openssl decrypts it
    with either recipient's key to the content, fed in uneven pieces."""
    content = os.urandom(100_000) + b"\r\n"
    recipients = [pki.bob.cert, pki.carol.cert]
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content)
    for cert in recipients:
        builder = builder.add_recipient(cert)
    theirs = builder.set_content_encryption_algorithm(cipher).encrypt(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]
    )
    envelope = cms.Envelope(recipients, key_bits=cipher.key_size)
    pieces = [content[:1], content[1:70_001], content[70_001:]]
    ours = b"".join(envelope.pieces(pieces, len(content)))

    def random_value(tag: int, body: bytes) -> bool:
        return tag in (0x04, 0x80)

    # RecipientInfos are a SET OF sorted by encoding: the random keys decide their order.
    def ordered(tree: Any) -> Any:
        top = tree[1][1][1][0][1]  # ContentInfo -> [0] -> EnvelopedData fields
        top[1] = (top[1][0], sorted(top[1][1], key=repr))
        return tree

    assert ordered(_tree(ours, random_value)) == ordered(_tree(theirs, random_value))
    path = tmp_path / "env.der"
    path.write_bytes(ours)
    for who in (pki.bob, pki.carol):
        out = tmp_path / "out.bin"
        run(
            [
                "openssl", "cms", "-decrypt", "-inform", "DER", "-binary", "-in", str(path),
                "-recip", str(who.cert_pem), "-inkey", str(who.key_pem), "-out", str(out),
            ]
        )  # fmt: skip
        assert out.read_bytes() == content
    with pytest.raises(ValueError, match="shorter"):
        b"".join(cms.Envelope(recipients).pieces([content[:10]], len(content)))


def test_der_writer_follows_x690() -> None:
    """Lengths in the fewest octets, minimal two's-complement integers, base-128 OIDs, a
    sorted SET OF: checked against encodings ``cryptography`` makes."""
    assert cms.length_octets(127) == b"\x7f"
    assert cms.length_octets(128) == b"\x81\x80"
    assert cms.length_octets(65536) == b"\x83\x01\x00\x00"
    assert cms.integer(0) == b"\x02\x01\x00"
    assert cms.integer(128) == b"\x02\x02\x00\x80"
    assert cms.integer(-129) == b"\x02\x02\xff\x7f"
    assert cms.integer(-128) == b"\x02\x01\x80"
    name = x509.Name.from_rfc4514_string("CN=x")
    assert name.public_bytes()[-1:] == b"x"
    assert cms.oid("2.5.4.3") == b"\x06\x03\x55\x04\x03"
    assert cms.oid("1.2.840.113549.1.7.3") == bytes.fromhex("06092a864886f70d010703")
    assert cms.set_of([b"\x04\x01\x02", b"\x04\x01\x01"]) == b"\x31\x06\x04\x01\x01\x04\x01\x02"
    assert cms.ciphertext_length(0) == 16 and cms.ciphertext_length(16) == 32
    assert cms.ciphertext_length(31) == 32


def test_stream_check_judges_line_ends_across_pieces() -> None:
    """The canonical-CRLF check of a streamed payload: a CRLF cut between two pieces is
    fine; a bare LF or CR, at a cut or inside a piece, or no header block, is refused."""

    def digest_of(*pieces: bytes) -> bytes:
        check = smime._StreamCheck("sha256")
        for piece in pieces:
            check.update(piece)
        return check.finalize()

    whole = b"A: b\r\n\r\nline\r\nline\r\n"
    for cut in range(1, len(whole)):
        assert digest_of(whole[:cut], whole[cut:]) == hashlib.sha256(whole).digest()
    assert (
        digest_of(b"A: b\r", b"\n", b"\r", b"\n", b"x\r\n")
        == hashlib.sha256(b"A: b\r\n\r\nx\r\n").digest()
    )
    for bad in (
        (b"A: b\r\n\r\nx\n",),
        (b"A: b\r\n\r\nx", b"\ny\r\n"),
        (b"A: b\r\n\r\nx\r", b"y\r\n"),
        (b"A: b\r\n\r\nx\r",),
        (b"A: b\r\nx\r\n",),
        (b"\nA: b\r\n\r\n",),
        (b"A: b\r\n\r\nx\ry\r\n",),
    ):
        with pytest.raises(CryptoError, match="canonical"):
            digest_of(*bad)


# -- Memory: pieces, not the message -------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False])
def test_protecting_a_large_message_holds_pieces_not_the_message(
    pki: PKI, smime_store: CertStore, big_file: Path, encrypt: bool
) -> None:
    """Python's peak allocations while protecting a message with a 6 MB file attached by
    path (an 8 MB payload; two 11 MB copies when encrypting, To and Bcc) stay under 4 MB
    whatever the size: the payload's own block-by-block base64 (about 2 MB, in message.py),
    the first MiB a spool keeps in memory before it goes to its file, and a few 64 KiB pieces
    (before: the signed entity, the CMS blob and its base64 blocks, over 18 MB)."""
    protector = smime.SMIMEProtector(smime_store)
    message = _message(
        pki.alice.address, pki.bob.address, big_file, bcc=pki.carol.address if encrypt else None
    ).finalized()
    protection = Protection(scheme=Scheme.SMIME, encrypt=encrypt)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        copies = asyncio.run(protector.protect(message, protection))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert len(copies) == (2 if encrypt else 1)
        for copy in copies:
            assert copy.size > 8_000_000
        assert peak - before < 4_000_000, peak - before
    finally:
        for copy in copies:
            copy.discard()


# -- Fail closed -------------------------------------------------------------------------------


def test_large_message_to_an_unusable_certificate_produces_nothing(
    pki: PKI, smime_store: CertStore, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipient whose certificate cannot be used (an EC key: no key transport): refused,
    naming the recipient, before the payload is made."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the payload was made for a message that is refused")

    monkeypatch.setattr(smime, "stream_payload", never)
    ec = pki.bad["ec"]
    message = _message(pki.alice.address, ec.address, big_file).finalized()
    with pytest.raises(RecipientKeyError) as failure:
        asyncio.run(
            smime.SMIMEProtector(smime_store).protect(message, Protection(scheme=Scheme.SMIME))
        )
    assert ec.address in str(failure.value)
    assert _spool_fds(spool_dir(smime_store.home)) == []


@pytest.mark.parametrize("encrypt", [True, False])
def test_attachment_cut_short_mid_way_gives_a_clear_error_and_no_copy(
    pki: PKI,
    smime_store: CertStore,
    smtp_server: ServerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    encrypt: bool,
) -> None:
    """The attached file truncated while it is being read: the send fails with a one-line
    MessageError naming the file, nothing reaches the server or the outbox, and no spool is
    left open."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    seen = []
    update = smime._StreamCheck.update

    def truncate_after_first(self: smime._StreamCheck, piece: bytes) -> None:
        seen.append(len(piece))
        if len(seen) == 3:
            os.truncate(path, SIZE // 2)
        update(self, piece)

    monkeypatch.setattr(smime._StreamCheck, "update", truncate_after_first)
    server = smtp_server(tls="implicit")
    outbox = tmp_path / "outbox.sqlite3"
    with (
        Mailer(
            smtp=_settings(server),
            keystore=Keystore(smime_store.home),
            certstore=smime_store,
            outbox=outbox,
            protection=Protection(scheme=Scheme.SMIME, encrypt=encrypt),
        ) as mailer,
        pytest.raises(MessageError, match=r"big\.bin changed after it was attached"),
    ):
        mailer.send(_message(pki.alice.address, pki.bob.address, path))
    assert len(seen) >= 3
    assert server.messages == []
    with Outbox(outbox) as box:
        assert box.items() == ()
    assert _spool_fds(spool_dir(smime_store.home)) == []


def test_attachment_rewritten_between_signing_and_encrypting_gives_no_copy(
    pki: PKI, smime_store: CertStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file rewritten in place after it was signed, size and time kept (what a stat
    check cannot see): the encryption pass finds the signed digest no longer matches and
    refuses, rather than send a signature that does not verify."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    sign_large = smime.sign_large

    def then_rewrite(*args: Any, **kwargs: Any) -> smime.SignedEntity:
        entity = sign_large(*args, **kwargs)
        info = path.stat()
        with open(path, "r+b") as file:
            file.seek(SIZE // 2)
            file.write(b"changed")
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        return entity

    monkeypatch.setattr(smime, "sign_large", then_rewrite)
    message = _message(pki.alice.address, pki.bob.address, path).finalized()
    with pytest.raises(CryptoError, match="changed while it was being protected"):
        asyncio.run(
            smime.SMIMEProtector(smime_store).protect(message, Protection(scheme=Scheme.SMIME))
        )
    assert _spool_fds(spool_dir(smime_store.home)) == []


def test_encrypted_only_copies_refuse_a_file_rewritten_between_them(
    pki: PKI, smime_store: CertStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted, not signed, To and Bcc: each copy reads the file again. Rewritten in place
    after the first copy (size and time kept), the second copy must not carry other bytes
    than the first: the payload's digest from the first reading is checked (review finding:
    the To and Bcc recipients got different attachments, with no error)."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    encrypt_large_into = smime.encrypt_large_into
    calls: list[int] = []

    def then_rewrite(*args: Any, **kwargs: Any) -> None:
        encrypt_large_into(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            info = path.stat()
            with open(path, "r+b") as file:
                file.seek(SIZE // 2)
                file.write(b"CHANGED!")
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

    monkeypatch.setattr(smime, "encrypt_large_into", then_rewrite)
    message = _message(pki.alice.address, pki.bob.address, path, bcc=pki.carol.address)
    with pytest.raises(CryptoError, match="changed while it was being protected"):
        asyncio.run(
            smime.SMIMEProtector(smime_store).protect(
                message.finalized(), Protection(scheme=Scheme.SMIME, sign=False)
            )
        )
    assert len(calls) == 1
    assert _spool_fds(spool_dir(smime_store.home)) == []


def _digest_of(*pieces: bytes) -> bytes:
    check = smime._StreamCheck("sha256")
    for piece in pieces:
        check.update(piece)
    return check.finalize()


def test_stream_check_finds_a_bare_cr_first_in_a_piece() -> None:
    """A CR not followed by LF as a piece's first byte is not canonical, as it is for the
    whole-buffer check (review finding: the search started at the second byte)."""
    for pieces in [(b"A: b\r\n\r\nx", b"\ry\r\n"), (b"\rA: b\r\n\r\nx\r\n",)]:
        with pytest.raises(CryptoError, match="canonical"):
            _digest_of(*pieces)
    # Every two-piece cut of short strings agrees with the whole-buffer check.
    for n in range(1, 5):
        for tail in itertools.product([b"\r", b"\n", b"a"], repeat=n):
            whole = b"A: b\r\n\r\n" + b"".join(tail)
            want = smime._BARE_CR_LF.search(whole) is None
            for cut in range(1, len(whole)):
                try:
                    _digest_of(whole[:cut], whole[cut:])
                    got = True
                except CryptoError:
                    got = False
                assert got == want, (whole, cut)


def test_an_envelope_encrypts_one_content_only(pki: PKI) -> None:
    """A second use would encrypt other content under the same AES key and CBC IV (equal
    prefixes show): refused."""
    envelope = cms.Envelope([pki.bob.cert])
    list(envelope.pieces([b"A" * 32 + b"secret one"], 42))
    with pytest.raises(RuntimeError, match="one content"):
        list(envelope.pieces([b"A" * 32 + b"secret two"], 42))


def test_verify_detached_refuses_content_beside_a_digest() -> None:
    """With ``digested``, content would not be looked at: giving both is a caller's error,
    not a silent pass."""
    with pytest.raises(ValueError, match="not both"):
        smime.verify_detached(b"anything", b"", digested=("sha256", b"\0" * 32))
