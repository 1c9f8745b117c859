"""S/MIME (RFC 8551) through ``cryptography``: detached signatures and enveloped-data.

Takes canonical MIME bytes from :mod:`e2email.message` and returns the bytes of a
``multipart/signed`` or ``application/pkcs7-mime`` entity (its own header block, a blank line
and the body), mirroring :mod:`e2email.crypto.openpgp`. Never opens a socket. The functions
never look keys up: :class:`SMIMEProtector`, the engine at the end, chooses and checks the
certificates through :mod:`e2email.certstore` and builds each copy as a complete message.

The MIME wrappers are written here rather than by ``cryptography``, which emits the legacy
``application/x-pkcs7-signature`` type and serialises through :mod:`email.generator`
(standards checklist items 7-9). The CMS objects are DER, base64 in 76-column CRLF lines.

A large message (a payload of :data:`LARGE` bytes or more) is never held whole (issue 9 part
5): ``cryptography``'s builders take and return whole buffers, so its CMS objects are written
by :mod:`e2email.crypto.cms` instead, in the same layout, as the payload streams past: read
once to be hashed (:func:`sign_large`), then once per copy to be encrypted
(:func:`encrypt_large_into`), each copy's base64 going to its spool a block at a time.

Checks beyond what ``cryptography`` promises:

* every signature is verified over the exact bytes it covers before it is used (our own CMS
  verifier below: a CRLF translation anywhere would show up here, not at the recipient);
* enveloped output is parsed: its RecipientInfos must name exactly the certificates asked for
  (Bcc privacy, checklist 21) and its content cipher must be the one asked for.

The same small DER reader also decrypts and verifies received S/MIME for ``e2email demo``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from e2email.certstore import CertStore, SignerKey, StoredCert
from e2email.config import SMIME_DIGESTS, Protection, SMIMECipher
from e2email.crypto import cms
from e2email.crypto.base import (
    ProtectedCopy,
    Protector,
    Resolved,
    copy_plans,
    make_copy,
    plain_copy,
    resolve_keys,
)
from e2email.errors import (
    CryptoError,
    E2EmailError,
    KeyProblem,
    KeyReason,
    MessageError,
    RecipientKeyError,
)
from e2email.message import (
    HP,
    Message,
    build_payload,
    message_head,
    new_boundary,
    stream_payload,
)
from e2email.spool import Spool, spool_dir

__all__ = [
    "LARGE",
    "MICALGS",
    "SMIMEProtector",
    "SignatureCheck",
    "SignedEntity",
    "decrypt",
    "encrypt",
    "encrypt_into",
    "encrypt_large_into",
    "entity_der",
    "parse_multipart_signed",
    "recipient_ids",
    "sign",
    "sign_large",
    "verify_detached",
]

#: Digest name -> micalg parameter (RFC 8551 §3.5.3.2; RFC 5751 names for SHA-2).
MICALGS = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
_HASHES: dict[str, type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_CIPHERS: dict[SMIMECipher, type[algorithms.AES128] | type[algorithms.AES256]] = {
    SMIMECipher.AES256_CBC: algorithms.AES256,
    SMIMECipher.AES128_CBC: algorithms.AES128,
}

# Object identifiers (RFC 5652, RFC 5754, RFC 3565, RFC 4056, RFC 5758), in DER content form.
_OID_DATA = "1.2.840.113549.1.7.1"
_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
_OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
_DIGEST_OIDS = {
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
}
_WEAK_DIGEST_OIDS = {"1.3.14.3.2.26": "sha1", "1.2.840.113549.2.5": "md5"}
_OID_RSA = "1.2.840.113549.1.1.1"
_OID_RSA_PSS = "1.2.840.113549.1.1.10"
_RSA_WITH = {
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.113549.1.1.14": "sha224",
}
_ECDSA_WITH = {
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10045.4.3.1": "sha224",
}
_CIPHER_OIDS = {
    "2.16.840.1.101.3.4.1.42": SMIMECipher.AES256_CBC,
    "2.16.840.1.101.3.4.1.2": SMIMECipher.AES128_CBC,
}
_ALL_HASHES: dict[str, type[hashes.HashAlgorithm]] = {**_HASHES, "sha224": hashes.SHA224}

_PREAMBLE_SIGNED = b"This is an S/MIME signed message (RFC 8551).\r\n"

#: A payload of at least this many bytes is signed and enveloped by e2email's own CMS writer
#: (:mod:`e2email.crypto.cms`), piece by piece, so that the message is never held whole
#: (issue 9 part 5); below it, ``cryptography``'s builders, which take and return whole
#: buffers (nothing to save at that size, and the library's output is the reference).
LARGE = 4 << 20


# -- A minimal DER reader (X.690) ----------------------------------------------------------------


@dataclass(frozen=True)
class _TLV:
    """One DER element: its tag byte, where its whole encoding and its content are."""

    tag: int
    data: bytes
    start: int  # first byte of the tag
    body: int  # first byte of the content
    end: int  # one past the last byte of the content

    @property
    def content(self) -> bytes:
        return self.data[self.body : self.end]

    @property
    def encoded(self) -> bytes:
        return self.data[self.start : self.end]

    def children(self) -> list[_TLV]:
        return list(_elements(self.data, self.body, self.end))


def _read(data: bytes, pos: int, limit: int) -> _TLV:
    if pos + 2 > limit:
        raise CryptoError("truncated DER data")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise CryptoError("unsupported DER tag (high tag number)")
    first = data[pos + 1]
    pos_len = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise CryptoError("BER indefinite length where DER was expected")
    else:
        count = first & 0x7F
        if count > 4 or pos_len + count > limit:
            raise CryptoError("DER length out of range")
        length = int.from_bytes(data[pos_len : pos_len + count], "big")
        pos_len += count
    end = pos_len + length
    if end > limit:
        raise CryptoError("DER element runs past its container")
    return _TLV(tag=tag, data=data, start=pos, body=pos_len, end=end)


def _elements(data: bytes, pos: int, limit: int) -> Iterator[_TLV]:
    while pos < limit:
        tlv = _read(data, pos, limit)
        yield tlv
        pos = tlv.end


def _parse(data: bytes) -> _TLV:
    top = _read(data, 0, len(data))
    if top.end != len(data):
        raise CryptoError("trailing bytes after the DER structure")
    return top


def _oid(tlv: _TLV) -> str:
    if tlv.tag != 0x06 or not tlv.content:
        raise CryptoError("expected an OBJECT IDENTIFIER")
    raw = tlv.content
    arcs: list[int] = []
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _integer(tlv: _TLV) -> int:
    if tlv.tag != 0x02:
        raise CryptoError("expected an INTEGER")
    return int.from_bytes(tlv.content, "big", signed=True)


def _expect(tlv: _TLV, tag: int, what: str) -> _TLV:
    if tlv.tag != tag:
        raise CryptoError(f"malformed CMS: {what} has tag 0x{tlv.tag:02x}, expected 0x{tag:02x}")
    return tlv


def _content_info(der: bytes, oid: str, what: str) -> list[_TLV]:
    """The fields of the SEQUENCE inside ``ContentInfo { oid, [0] EXPLICIT ... }``."""
    top = _expect(_parse(der), 0x30, "ContentInfo")
    fields = top.children()
    if len(fields) != 2 or _oid(fields[0]) != oid:
        raise CryptoError(f"not CMS {what}")
    inner = _expect(fields[1], 0xA0, "ContentInfo content").children()
    if len(inner) != 1:
        raise CryptoError(f"malformed CMS {what}")
    return _expect(inner[0], 0x30, what).children()


# -- MIME helpers --------------------------------------------------------------------------------


def _base64_lines(data: bytes | bytearray | memoryview) -> bytes:
    """Base64 in 76-character CRLF lines (RFC 2045 §6.8), ending in CRLF."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


#: Input bytes base64-encoded at a time: a multiple of 57 (one 76-character line), so the
#: blocks' lines are exactly the whole's lines.
_B64_BLOCK = 57 * 4096
#: The same for a large message's pieces, smaller: a few of them are alive at once.
_B64_PIECE = 57 * 1024


def _write_base64_lines(out: io.BytesIO | Spool, data: bytes) -> None:
    """:func:`_base64_lines` of ``data`` written to ``out`` block by block: a large CMS blob's
    base64 form (a third bigger, plus line ends) is made once, in ``out``, not three times."""
    with memoryview(data) as view:
        for start in range(0, len(view), _B64_BLOCK):
            out.write(_base64_lines(view[start : start + _B64_BLOCK]))


class _Base64Writer:
    """:func:`_base64_lines` of everything written, into ``out`` a block at a time: pieces of
    any size in, whole 76-character lines out, the same lines as the whole's (a block is a
    multiple of 57 input bytes); :meth:`close` writes the last, short line."""

    def __init__(self, out: Spool) -> None:
        self._out = out
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _B64_PIECE:
            whole = len(self._buffer) - len(self._buffer) % 57
            with memoryview(self._buffer) as view:
                for start in range(0, whole, _B64_PIECE):
                    with view[start : min(start + _B64_PIECE, whole)] as block:
                        self._out.write(_base64_lines(block))
            del self._buffer[:whole]

    def close(self) -> None:
        if self._buffer:
            self._out.write(_base64_lines(self._buffer))
            self._buffer.clear()


def _split_entity(entity: bytes) -> tuple[bytes, bytes]:
    head, sep, body = entity.partition(b"\r\n\r\n")
    if not sep:
        raise CryptoError("not a MIME entity (no blank line after the headers)")
    return head + b"\r\n", body


def _header(head: bytes, name: str) -> str | None:
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").decode("ascii", "replace")
    for line in unfolded.split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _param(value: str, name: str) -> str | None:
    for item in value.split(";")[1:]:
        key, sep, val = item.strip().partition("=")
        if sep and key.strip().lower() == name:
            return val.strip().strip('"')
    return None


def entity_der(entity: bytes) -> bytes:
    """The DER body of an ``application/pkcs7-mime`` or ``-signature`` entity (base64 decoded)."""
    head, body = _split_entity(entity)
    ctype = (_header(head, "content-type") or "").lower()
    if not ctype.startswith(("application/pkcs7-", "application/x-pkcs7-")):
        raise CryptoError(f"not an S/MIME entity: {ctype or 'no Content-Type'}")
    encoding = (_header(head, "content-transfer-encoding") or "binary").lower()
    if encoding != "base64":
        return body
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error as exc:
        raise CryptoError(f"bad base64 in the S/MIME part: {exc}") from exc


# -- Signing -------------------------------------------------------------------------------------


def sign(
    payload: bytes | Iterable[bytes],
    *,
    signer: SignerKey,
    digest: str = "sha256",
    rsa_pss: bool = False,
    prefix: bytes = b"",
) -> bytes:
    """A ``multipart/signed; protocol="application/pkcs7-signature"`` entity over ``payload``
    (RFC 8551 §3.5.3), with a detached CMS SignedData signature that includes the signer's
    certificate and chain.

    ``payload`` must already be canonical (CRLF, 7-bit): it is signed byte for byte (the Binary
    option stops ``cryptography`` from translating line endings) and carried byte for byte, the
    CRLF before the next boundary belonging to the boundary (RFC 2046 §5.1.1).

    ``payload`` may come in pieces (e.g. a :class:`~e2email.message.PayloadStream`): they are
    written once, straight into the entity, and signed there, so a large payload is held once.
    ``prefix`` (e.g. the outer header block) goes before the entity in the returned bytes.
    """
    _check_digest(digest)
    boundary = new_boundary().encode()
    out = io.BytesIO()
    out.write(prefix)
    out.write(_signed_head(boundary, digest))
    start = out.tell()
    for piece in [payload] if isinstance(payload, bytes) else payload:
        out.write(piece)
    end = out.tell()
    with out.getbuffer() as buffer, buffer[start:end] as signed:
        signature = _sign_view(signed, signer=signer, digest=digest, rsa_pss=rsa_pss)
    out.write(_signed_tail(boundary, signature))
    # The views are released, so getvalue() hands over the buffer without copying it.
    return out.getvalue()


def _check_digest(digest: str) -> None:
    if digest not in SMIME_DIGESTS:
        raise CryptoError(f"S/MIME digest {digest!r} is not one of {', '.join(SMIME_DIGESTS)}")


def _signed_head(boundary: bytes, digest: str) -> bytes:
    """A multipart/signed entity up to the signed part (RFC 8551 §3.5.3)."""
    return b"".join(
        [
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n',
            b" micalg=" + MICALGS[digest].encode() + b'; boundary="' + boundary + b'"\r\n',
            b"\r\n" + _PREAMBLE_SIGNED + b"--" + boundary + b"\r\n",
        ]
    )


def _signed_tail(boundary: bytes, signature: bytes) -> bytes:
    """A multipart/signed entity after the signed part: the signature part, the last
    boundary. The CRLF before the boundary belongs to the boundary (RFC 2046 §5.1.1)."""
    return b"".join(
        [
            b"\r\n--" + boundary + b"\r\n",
            b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n',
            b"Content-Transfer-Encoding: base64\r\n",
            b'Content-Disposition: attachment; filename="smime.p7s"\r\n',
            b"Content-Description: S/MIME Cryptographic Signature\r\n",
            b"\r\n" + _base64_lines(signature),
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )


class _Pieces(Protocol):
    """Bytes that can be read piece by piece more than once, with a known total length
    (a :class:`~e2email.message.PayloadStream`, a :class:`SignedEntity`)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __len__(self) -> int: ...


class _StreamCheck:
    """The payload checks of :func:`_sign_view` (canonical CRLF line ends, a header block)
    and its digest, on pieces as they go past: nothing is kept but the last bytes of the
    previous piece, for a CRLF or a blank line cut in two."""

    def __init__(self, digest: str) -> None:
        self._hash = hashes.Hash(_HASHES[digest]())
        self._tail = b""
        self._blank = False

    def update(self, piece: bytes) -> None:
        if not piece:
            return
        self._hash.update(piece)
        after_cr = self._tail.endswith(b"\r")
        if after_cr != piece.startswith(b"\n"):  # a CR alone, or an LF alone, at the cut
            raise _not_canonical()
        # A CR that ends the piece is judged with the next one (or at the end).
        end = len(piece) - 1 if piece.endswith(b"\r") else len(piece)
        # A bare CR anywhere up to ``end`` (the first byte too); a bare LF from the second byte
        # on (an LF first in the piece was judged at the cut, above).
        if _BARE_CR.search(piece, 0, end) or _BARE_LF.search(piece, 1):
            raise _not_canonical()
        if not self._blank:
            self._blank = b"\r\n\r\n" in self._tail + piece[:3] or b"\r\n\r\n" in piece
        self._tail = piece[-3:] if len(piece) >= 3 else (self._tail + piece)[-3:]

    def finalize(self) -> bytes:
        if self._tail.endswith(b"\r") or not self._blank:
            raise _not_canonical()
        return self._hash.finalize()


#: An attached file changed between two readings of a large payload (e2email reads a large
#: message again for each copy rather than hold it).
_CHANGED = (
    "the message changed while it was being protected (a file attached by path was written "
    "to meanwhile); nothing was sent"
)


class SignedEntity:
    """A multipart/signed entity (RFC 8551 §3.5.3) over a large payload, held as its parts:
    its head, the payload (read again, piece by piece, each time the entity is), the tail
    with the detached signature. Each reading checks that the payload still has the digest
    that was signed (an attached file rewritten in between would otherwise be sent under a
    signature that does not verify)."""

    def __init__(
        self, head: bytes, payload: _Pieces, tail: bytes, *, digest: str, message_digest: bytes
    ) -> None:
        self.head = head
        self.payload = payload
        self.tail = tail
        self._digest = digest
        self._message_digest = message_digest

    def __repr__(self) -> str:
        return f"SignedEntity({len(self)} bytes)"

    def __len__(self) -> int:
        return len(self.head) + len(self.payload) + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        hasher = hashes.Hash(_HASHES[self._digest]())
        for piece in self.payload:
            hasher.update(piece)
            yield piece
        if hasher.finalize() != self._message_digest:
            raise CryptoError(_CHANGED)
        yield self.tail


class _SameEachTime:
    """A large payload that is read again for each copy (encrypted, not signed), checked to
    give the same bytes every time: without a signature's digest to compare with, a file
    rewritten in place between two copies (size and time kept) would otherwise give the To/Cc
    copy and a Bcc copy different content. The first reading sets the digest; a later one
    that differs raises before its last piece is encrypted."""

    def __init__(self, payload: _Pieces) -> None:
        self.payload = payload
        self._digest: bytes | None = None

    def __repr__(self) -> str:
        return f"_SameEachTime({len(self)} bytes)"

    def __len__(self) -> int:
        return len(self.payload)

    def __iter__(self) -> Iterator[bytes]:
        hasher = hashes.Hash(hashes.SHA256())
        for piece in self.payload:
            hasher.update(piece)
            yield piece
        digest = hasher.finalize()
        if self._digest is None:
            self._digest = digest
        elif digest != self._digest:
            raise CryptoError(_CHANGED)


def sign_large(
    payload: _Pieces,
    *,
    signer: SignerKey,
    digest: str = "sha256",
    rsa_pss: bool = False,
    out: Spool | None = None,
) -> SignedEntity:
    """:func:`sign` for a large ``payload``, never holding it: the payload is read once to be
    checked and hashed (or, with ``out``, to be written to ``out`` as it is hashed, after the
    entity's head: ``out`` then holds the whole entity when this returns), and the detached
    signature is made by :func:`e2email.crypto.cms.detached_signature` over that digest, in
    the form ``cryptography`` gives a small one, then verified as :func:`sign` does."""
    _check_digest(digest)
    boundary = new_boundary().encode()
    head = _signed_head(boundary, digest)
    check = _StreamCheck(digest)
    if out is not None:
        out.write(head)
    for piece in payload:
        check.update(piece)
        if out is not None:
            out.write(piece)
    message_digest = check.finalize()
    key = signer.private_key
    try:
        signature = cms.detached_signature(
            message_digest,
            certificate=signer.certificate,
            private_key=key,
            chain=signer.chain,
            digest=digest,
            rsa_pss=rsa_pss,
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot sign: {exc}") from exc
    check_sig = verify_detached(b"", signature, digested=(digest, message_digest))
    if check_sig.certificate != signer.certificate:
        raise CryptoError("the signature names another signer certificate")
    tail = _signed_tail(boundary, signature)
    if out is not None:
        out.write(tail)
    return SignedEntity(head, payload, tail, digest=digest, message_digest=message_digest)


#: A CR not before LF, or an LF not after CR: not canonical (searched in place, no copy).
_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")


def _not_canonical() -> CryptoError:
    return CryptoError("the payload to sign is not a canonical (CRLF) MIME entity")


def _sign_view(payload: memoryview, *, signer: SignerKey, digest: str, rsa_pss: bool) -> bytes:
    """The detached CMS signature (DER) of ``payload``, a view of the entity being built."""
    if _BARE_CR_LF.search(payload) or re.search(rb"\r\n\r\n", payload) is None:
        # A bare LF would be signed as LF but could reach the recipient as CRLF (checklist 9).
        raise _not_canonical()
    key = signer.private_key
    pad: padding.PSS | padding.PKCS1v15 | None = None
    if isinstance(key, rsa.RSAPrivateKey):
        # RFC 4056 §3: MGF1 with the same hash; salt as long as the digest.
        pad = (
            padding.PSS(mgf=padding.MGF1(_HASHES[digest]()), salt_length=padding.PSS.DIGEST_LENGTH)
            if rsa_pss
            else padding.PKCS1v15()
        )
    builder = pkcs7.PKCS7SignatureBuilder().set_data(payload)
    builder = builder.add_signer(signer.certificate, key, _HASHES[digest](), rsa_padding=pad)
    for cert in signer.chain:
        builder = builder.add_certificate(cert)
    try:
        signature = builder.sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cryptography could not sign: {exc}") from exc
    # What the recipient will check, checked here first: the exact bytes, our certificate.
    check = verify_detached(payload, signature)
    if check.certificate != signer.certificate:
        raise CryptoError("the signature names another signer certificate")
    return signature


# -- Encryption ----------------------------------------------------------------------------------


def encrypt(
    payload: bytes,
    *,
    recipients: Sequence[x509.Certificate],
    cipher: SMIMECipher = SMIMECipher.AES256_CBC,
    prefix: bytes = b"",
) -> bytes:
    """The entity of :func:`encrypt_into`, as bytes."""
    with Spool() as out:
        encrypt_into(out, payload, recipients=recipients, cipher=cipher, prefix=prefix)
        return out.getvalue()


def encrypt_into(
    out: Spool,
    payload: bytes,
    *,
    recipients: Sequence[x509.Certificate],
    cipher: SMIMECipher = SMIMECipher.AES256_CBC,
    prefix: bytes = b"",
) -> None:
    """Write an ``application/pkcs7-mime; smime-type=enveloped-data`` entity (RFC 8551 §3.3)
    of ``payload`` for ``recipients`` to ``out`` (RSA certificates only: ``cryptography`` has
    no ECDH key agreement, RFC 5753).

    ``recipients`` must be the complete list (the sender included when encrypting to self): the
    output is checked to name exactly these certificates and to use ``cipher``.

    ``prefix`` (e.g. the outer header block) goes first; the CMS blob is base64-encoded block
    by block into ``out`` (a spool: a private file when large), never held a second time.
    """
    unique = _unique_rsa(recipients)
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(payload)
    for cert in unique:
        builder = builder.add_recipient(cert)
    builder = builder.set_content_encryption_algorithm(_CIPHERS[cipher])
    try:
        der = builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cryptography could not encrypt: {exc}") from exc
    del builder  # it holds the payload too
    _check_enveloped(der, unique, cipher)
    _write_enveloped_head(out, prefix)
    _write_base64_lines(out, der)


def encrypt_large_into(
    out: Spool,
    content: _Pieces,
    *,
    recipients: Sequence[x509.Certificate],
    cipher: SMIMECipher = SMIMECipher.AES256_CBC,
    prefix: bytes = b"",
) -> None:
    """:func:`encrypt_into` for a large ``content`` (e.g. a :class:`SignedEntity`), never
    holding it: the EnvelopedData is written by :class:`e2email.crypto.cms.Envelope` as the
    content is read and encrypted, and base64-encoded into ``out`` a block at a time. Its
    fields (every one but the ciphertext) are checked as :func:`encrypt_into` checks
    ``cryptography``'s output, before any content is read. Unlike :func:`encrypt_into`, it
    writes as it goes: when it raises, ``out`` holds part of an entity and must be discarded
    (the engine closes such a spool; nothing of it is stored or sent)."""
    unique = _unique_rsa(recipients)
    try:
        envelope = cms.Envelope(unique, key_bits=_CIPHERS[cipher].key_size)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot encrypt: {exc}") from exc
    _check_enveloped(envelope.skeleton(), unique, cipher)
    _write_enveloped_head(out, prefix)
    encoder = _Base64Writer(out)
    try:
        for piece in envelope.pieces(content, len(content)):
            encoder.write(piece)
    except E2EmailError:
        raise  # e.g. an attached file that cannot be read (a MessageError, a ValueError too)
    except ValueError as exc:  # the content's length changed while it was read
        raise CryptoError(f"cannot encrypt: {exc}") from exc
    encoder.close()


def _write_enveloped_head(out: Spool, prefix: bytes) -> None:
    out.write(prefix)
    out.write(b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data;\r\n")
    out.write(b' name="smime.p7m"\r\n')
    out.write(b"Content-Transfer-Encoding: base64\r\n")
    out.write(b'Content-Disposition: attachment; filename="smime.p7m"\r\n')
    out.write(b"Content-Description: S/MIME Encrypted Message\r\n")
    out.write(b"\r\n")


def _unique_rsa(recipients: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    unique = list({c.fingerprint(hashes.SHA256()): c for c in recipients}.values())
    if not unique:
        raise CryptoError("no recipient certificates to encrypt to")
    for cert in unique:
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise CryptoError(
                f"cannot encrypt to {cert.subject.rfc4514_string()}: only RSA certificates "
                "are supported"
            )
    return unique


def _enveloped_fields(der: bytes) -> tuple[list[_TLV], _TLV]:
    """(RecipientInfos, EncryptedContentInfo) of CMS EnvelopedData (RFC 5652 §6.1)."""
    fields = _content_info(der, _OID_ENVELOPED_DATA, "EnvelopedData")
    rest = fields[1:]  # after the version
    if rest and rest[0].tag == 0xA0:  # originatorInfo
        rest = rest[1:]
    if len(rest) < 2:
        raise CryptoError("malformed CMS EnvelopedData")
    return _expect(rest[0], 0x31, "RecipientInfos").children(), rest[1]


def recipient_ids(der: bytes) -> list[tuple[bytes, int]]:
    """The (issuer Name DER, serial number) of every KeyTransRecipientInfo in CMS
    EnvelopedData; any other RecipientInfo kind is refused."""
    try:
        return _recipient_ids(der)
    except (IndexError, ValueError) as exc:
        raise CryptoError(f"malformed CMS EnvelopedData: {exc}") from exc


def _recipient_ids(der: bytes) -> list[tuple[bytes, int]]:
    infos, _ = _enveloped_fields(der)
    out: list[tuple[bytes, int]] = []
    for info in infos:
        if info.tag != 0x30:
            raise CryptoError("unexpected RecipientInfo kind (only key transport is made)")
        rid = info.children()[1]
        if rid.tag != 0x30:
            raise CryptoError("RecipientInfo by subject key identifier, not issuer and serial")
        issuer, serial = rid.children()
        out.append((_expect(issuer, 0x30, "issuer").encoded, _integer(serial)))
    return out


def _check_enveloped(
    der: bytes, recipients: Sequence[x509.Certificate], cipher: SMIMECipher
) -> None:
    got = recipient_ids(der)
    wanted = [(c.issuer.public_bytes(), c.serial_number) for c in recipients]
    if sorted(got) != sorted(wanted):
        raise CryptoError("the enveloped data is not encrypted to exactly the chosen certificates")
    _, content = _enveloped_fields(der)
    algorithm = _expect(content.children()[1], 0x30, "contentEncryptionAlgorithm")
    if _CIPHER_OIDS.get(_oid(algorithm.children()[0])) is not cipher:
        raise CryptoError("the enveloped data does not use the chosen content cipher")


# -- Receiving: decrypt and verify (for `e2email demo`; tests use openssl and gpgsm) ------------


def decrypt(der: bytes, *, certificate: x509.Certificate, private_key: rsa.RSAPrivateKey) -> bytes:
    """The content of CMS EnvelopedData for this recipient."""
    try:
        return pkcs7.pkcs7_decrypt_der(der, certificate, private_key, [])
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot decrypt: {exc}") from exc


@dataclass(frozen=True)
class SignatureCheck:
    """A verified CMS signature: who made it and what came with it. The signer certificate
    is *not* judged here (dates, usage, chain): that is :meth:`CertStore.check`'s job."""

    certificate: x509.Certificate
    #: Every certificate in the SignedData (the signer's and its chain), for path building.
    certificates: tuple[x509.Certificate, ...]
    digest: str
    signing_time: datetime.datetime | None


def verify_detached(
    content: bytes | memoryview,
    signature: bytes,
    *,
    digested: tuple[str, bytes] | None = None,
) -> SignatureCheck:
    """Verify a detached CMS SignedData ``signature`` (DER) over ``content`` exactly as given
    (RFC 5652 §5.4, §5.6): one signer, signed attributes with contentType id-data and the
    messageDigest of ``content``, and a valid RSA (PKCS#1 v1.5 or PSS) or ECDSA signature over
    them by the certificate the SignerInfo names. Raises CryptoError otherwise.

    ``digested`` (digest name, value) stands for ``content`` when it was hashed as it streamed
    past (a large message): the signature must then use that digest, and ``content`` must be
    empty (a ValueError otherwise: content given with a digest would not be looked at)."""
    if digested is not None and len(content):
        raise ValueError("give either the content or its digest, not both")
    try:
        return _verify_detached(content, signature, digested)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise CryptoError(f"malformed CMS signature: {exc}") from exc


def _verify_detached(
    content: bytes | memoryview, signature: bytes, digested: tuple[str, bytes] | None = None
) -> SignatureCheck:
    fields = _content_info(signature, _OID_SIGNED_DATA, "SignedData")
    encap = _expect(fields[2], 0x30, "EncapsulatedContentInfo").children()
    if _oid(encap[0]) != _OID_DATA:
        raise CryptoError("the signature does not cover MIME data (eContentType is not id-data)")
    if len(encap) > 1:
        raise CryptoError("not a detached signature (the content is inside the CMS)")
    certs: list[x509.Certificate] = []
    rest = fields[3:]
    for item in rest:
        if item.tag == 0xA0:
            for cert in item.children():
                if cert.tag == 0x30:
                    try:
                        certs.append(x509.load_der_x509_certificate(cert.encoded))
                    except ValueError as exc:
                        raise CryptoError(
                            f"unreadable certificate in the signature: {exc}"
                        ) from exc
    signer_infos = _expect(rest[-1], 0x31, "SignerInfos").children()
    if len(signer_infos) != 1:
        raise CryptoError(f"expected one signer, found {len(signer_infos)}")
    info = _expect(signer_infos[0], 0x30, "SignerInfo").children()
    sid = info[1]
    signer = _find_signer(sid, certs)
    digest = _digest_name(info[2])
    attrs = info[3]
    if attrs.tag != 0xA0:
        raise CryptoError("the signature has no signed attributes (RFC 8551 §2.5 requires them)")
    sig_alg, sig_value = info[4], _expect(info[5], 0x04, "signature")
    if digested is not None:
        if digested[0] != digest:
            raise CryptoError("the signature does not use the digest the content was hashed with")
        message_digest = digested[1]
    else:
        hasher = hashes.Hash(_ALL_HASHES[digest]())
        hasher.update(content)
        message_digest = hasher.finalize()
    found: dict[str, bytes] = {}
    signing_time = None
    for attr in attrs.children():
        parts = attr.children()
        oid = _oid(parts[0])
        values = _expect(parts[1], 0x31, "attribute values").children()
        if len(values) != 1:
            raise CryptoError("a signed attribute has more than one value")
        if oid in found:
            raise CryptoError("a signed attribute appears twice")
        found[oid] = values[0].encoded
        if oid == _OID_MESSAGE_DIGEST:
            if _expect(values[0], 0x04, "messageDigest").content != message_digest:
                raise CryptoError("BAD signature: the content does not match its digest")
        elif oid == _OID_CONTENT_TYPE and _oid(values[0]) != _OID_DATA:
            raise CryptoError("the signed contentType attribute is not id-data")
        elif oid == _OID_SIGNING_TIME:
            signing_time = _asn1_time(values[0])
    if _OID_MESSAGE_DIGEST not in found or _OID_CONTENT_TYPE not in found:
        raise CryptoError("the signed attributes lack contentType or messageDigest")
    # The signature covers the attributes DER-encoded as a SET OF, not as [0] (RFC 5652 §5.4).
    signed = b"\x31" + attrs.encoded[1:]
    _verify_signature(signer, sig_alg, sig_value.content, signed, digest)
    return SignatureCheck(
        certificate=signer, certificates=tuple(certs), digest=digest, signing_time=signing_time
    )


def _find_signer(sid: _TLV, certs: Sequence[x509.Certificate]) -> x509.Certificate:
    if sid.tag == 0x30:
        issuer, serial = sid.children()
        for cert in certs:
            if cert.issuer.public_bytes() == issuer.encoded and cert.serial_number == _integer(
                serial
            ):
                return cert
    elif sid.tag == 0x80:  # [0] SubjectKeyIdentifier
        for cert in certs:
            try:
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            if ski.value.digest == sid.content:
                return cert
    raise CryptoError("the signer's certificate is not included in the signature")


def _digest_name(algorithm: _TLV) -> str:
    oid = _oid(_expect(algorithm, 0x30, "digestAlgorithm").children()[0])
    if oid in _WEAK_DIGEST_OIDS:
        raise CryptoError(f"the signature uses the weak digest {_WEAK_DIGEST_OIDS[oid]}")
    if oid not in _DIGEST_OIDS:
        raise CryptoError(f"unknown signature digest {oid}")
    return _DIGEST_OIDS[oid]


def _verify_signature(
    cert: x509.Certificate, algorithm: _TLV, value: bytes, data: bytes, digest: str
) -> None:
    parts = _expect(algorithm, 0x30, "signatureAlgorithm").children()
    oid = _oid(parts[0])
    key = cert.public_key()
    chosen = _ALL_HASHES[digest]()
    try:
        if oid in (_OID_RSA, *_RSA_WITH) and isinstance(key, rsa.RSAPublicKey):
            if oid in _RSA_WITH and _RSA_WITH[oid] != digest:
                raise CryptoError("signature and digest algorithms disagree")
            key.verify(value, data, padding.PKCS1v15(), chosen)
        elif oid == _OID_RSA_PSS and isinstance(key, rsa.RSAPublicKey):
            pss_hash, salt = _pss_params(parts[1] if len(parts) > 1 else None)
            if pss_hash != digest:
                raise CryptoError("PSS hash and digest algorithm disagree")
            key.verify(value, data, padding.PSS(padding.MGF1(chosen), salt), chosen)
        elif oid in _ECDSA_WITH and isinstance(key, ec.EllipticCurvePublicKey):
            if _ECDSA_WITH[oid] != digest:
                raise CryptoError("signature and digest algorithms disagree")
            key.verify(value, data, ec.ECDSA(chosen))
        else:
            raise CryptoError(f"unsupported signature algorithm {oid} for this key")
    except InvalidSignature:
        raise CryptoError("BAD signature: it does not verify with the signer's key") from None


def _pss_params(params: _TLV | None) -> tuple[str, int]:
    """RSASSA-PSS-params (RFC 4055 §3.1): the hash (default SHA-1, which we refuse) and salt."""
    digest, salt = "sha1", 20
    if params is not None and params.tag == 0x30:
        for item in params.children():
            inner = item.children()
            if item.tag == 0xA0:
                oid = _oid(inner[0].children()[0])
                digest = _DIGEST_OIDS.get(oid, _WEAK_DIGEST_OIDS.get(oid, oid))
            elif item.tag == 0xA2:
                salt = _integer(inner[0])
    if digest not in _ALL_HASHES:
        raise CryptoError(f"RSASSA-PSS with the unsupported or weak hash {digest}")
    return digest, salt


def _asn1_time(tlv: _TLV) -> datetime.datetime | None:
    text = tlv.content.decode("ascii", "replace")
    try:
        if tlv.tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ (RFC 5280 §4.1.2.5.1)
            return datetime.datetime.strptime(text, "%y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
        if tlv.tag == 0x18:  # GeneralizedTime
            return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    return None


def parse_multipart_signed(entity: bytes) -> tuple[bytes, bytes]:
    """The signed part (exact bytes) and the DER signature of a ``multipart/signed`` entity."""
    head, body = _split_entity(entity)
    ctype = _header(head, "content-type") or ""
    if not ctype.lower().startswith("multipart/signed"):
        raise CryptoError(f"not multipart/signed: {ctype or 'no Content-Type'}")
    boundary = _param(ctype, "boundary")
    if not boundary:
        raise CryptoError("multipart/signed without a boundary")
    delim = b"\r\n--" + boundary.encode("ascii")
    pieces = (b"\r\n" + body).split(delim)
    parts = [p[2:] for p in pieces[1:] if p.startswith(b"\r\n")]
    if len(parts) != 2:
        raise CryptoError(f"multipart/signed with {len(parts)} parts, expected 2")
    return parts[0], entity_der(parts[1])


# -- The engine ----------------------------------------------------------------------------------


class SMIMEProtector(Protector):
    """S/MIME (RFC 8551) with the certificates of a :class:`~e2email.certstore.CertStore`:
    sign (detached multipart/signed), or sign then envelope the signed entity once per copy
    (§3.7), AES-256-CBC unless AES-128-CBC is asked for. A large message is signed and
    enveloped piece by piece (:data:`LARGE`), its attachments read again for each copy."""

    name: ClassVar[str] = "smime"

    def __init__(self, certstore: CertStore) -> None:
        self.certstore = certstore

    def __repr__(self) -> str:
        return f"SMIMEProtector({self.certstore!r})"

    def resolve(self, message: Message, protection: Protection) -> Resolved[StoredCert]:
        """Every certificate ``message`` needs (chain, validity, revocation checked), or
        RecipientKeyError/SignerKeyError naming every address without one. Blocking."""
        store = self.certstore
        key_map = protection.key_map
        trusted = protection.smime_trust_self_signed
        revocation = protection.revocation
        return resolve_keys(
            message,
            protection,
            signer=lambda sender: store.signer_cert(
                sender, key_map=key_map, trusted_self_signed=trusted, revocation=revocation
            ),
            recipients=lambda addresses: store.resolve_recipients(
                addresses, key_map=key_map, trusted_self_signed=trusted, revocation=revocation
            ),
            own=lambda sender: store.recipient_cert(
                sender, key_map=key_map, trusted_self_signed=trusted, revocation=revocation
            ),
        )

    def check_encrypted(
        self, head: bytes, body: bytes, addresses: Sequence[str], protection: Protection
    ) -> tuple[str, ...]:
        """Each recipient's certificate among the RecipientInfos (issuer and serial number,
        RFC 5652 section 6.2.1) of a program's S/MIME-encrypted message."""
        certs, problems = self.certstore.resolve_recipients(
            addresses,
            key_map=protection.key_map,
            trusted_self_signed=protection.smime_trust_self_signed,
            revocation=protection.revocation,
        )
        try:
            found = set(recipient_ids(entity_der(head + b"\r\n" + body)))
        except CryptoError as exc:
            raise MessageError(f"cannot read the encrypted part: {exc}", field="message") from None
        matched: list[str] = []
        for address, stored in certs.items():
            cert = stored.certificate
            if (cert.issuer.public_bytes(), cert.serial_number) in found:
                matched.append(stored.fingerprint)
                continue
            problems.append(
                KeyProblem(
                    address,
                    KeyReason.NOT_ENCRYPTED_TO,
                    f"not encrypted to the certificate {stored.fingerprint}",
                    stored.fingerprint,
                )
            )
        if problems:
            raise RecipientKeyError(problems)
        return tuple(matched)

    def missing_keys(self, addresses: Sequence[str], protection: Protection) -> list[KeyProblem]:
        """Each address without a usable certificate (chain, validity, revocation checked)."""
        _, problems = self.certstore.resolve_recipients(
            addresses,
            key_map=protection.key_map,
            trusted_self_signed=protection.smime_trust_self_signed,
            revocation=protection.revocation,
        )
        return problems

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        msg = message
        if not protection.sign and not protection.encrypt:
            return (plain_copy(msg),)
        return await asyncio.to_thread(self._protect, msg, protection, passphrase)

    def _protect(
        self, msg: Message, prot: Protection, passphrase: str | None
    ) -> tuple[ProtectedCopy, ...]:
        if msg.message_id is None:  # before any work: a large payload would be read and signed
            raise ValueError("protect a finalised message (Message.finalized())")
        keys = self.resolve(msg, prot)
        signer = keys.signer
        signer_fpr = signer.fingerprint if signer is not None else None
        # Raises PassphraseError(missing=True) for a protected key: the caller then asks.
        signer_key = self.certstore.signer_key(signer, passphrase) if signer is not None else None

        # Memory (issue 9 part 5): a small payload is streamed into the signed entity, which
        # is its only copy, and cryptography's builders take it whole. From LARGE on, the
        # payload is never held: it is read once to be hashed (written out as it goes when
        # only signing), then again for each copy as it is encrypted, by e2email's own CMS
        # writer (crypto/cms.py); attachments by path are re-read from disk each time.
        def signed(hp: HP, prefix: bytes = b"") -> bytes:
            if signer_key is None:
                return prefix + build_payload(msg, hp=hp)
            return sign(
                stream_payload(msg, hp=hp),
                signer=signer_key,
                digest=prot.smime_digest,
                rsa_pss=prot.smime_rsa_pss,
                prefix=prefix,
            )

        if not prot.encrypt:
            stream = stream_payload(msg, hp=HP.CLEAR)
            if signer_key is None or len(stream) < LARGE:
                raw: bytes | Spool = signed(HP.CLEAR, message_head(msg, hp=HP.CLEAR))
            else:
                raw = Spool(spool_dir(self.certstore.home))
                try:
                    raw.write(message_head(msg, hp=HP.CLEAR))
                    sign_large(
                        stream,
                        signer=signer_key,
                        digest=prot.smime_digest,
                        rsa_pss=prot.smime_rsa_pss,
                        out=raw,
                    )
                except BaseException:
                    raw.close()  # nothing of a failed message is kept
                    raise
            return (make_copy(raw, msg, "main", msg.recipients, signed=True, signer=signer_fpr),)

        # Sign once; every copy envelopes the same signed entity (sign, then encrypt). Each
        # copy's base64 goes to its own spool (a private file when large: e2email.spool).
        stream = stream_payload(msg, hp=HP.CIPHER)
        inner: bytes | SignedEntity | _SameEachTime
        if len(stream) < LARGE:
            inner = signed(HP.CIPHER)
        elif signer_key is None:
            inner = _SameEachTime(stream)
        else:
            inner = sign_large(
                stream, signer=signer_key, digest=prot.smime_digest, rsa_pss=prot.smime_rsa_pss
            )
        del stream
        plans = copy_plans(msg)
        copies = []
        spools: list[Spool] = []
        try:
            for n, (kind, rcpts) in enumerate(plans):
                unique = keys.keys_for(rcpts)
                spool = Spool(spool_dir(self.certstore.home))
                spools.append(spool)
                certs = [c.certificate for c in unique]
                head = message_head(msg, hp=HP.CIPHER)
                if isinstance(inner, bytes):
                    encrypt_into(
                        spool, inner, recipients=certs, cipher=prot.smime_cipher, prefix=head
                    )
                else:
                    encrypt_large_into(
                        spool, inner, recipients=certs, cipher=prot.smime_cipher, prefix=head
                    )
                if n == len(plans) - 1:
                    del inner  # enveloped by every copy: not held while the result is used
                copies.append(
                    make_copy(
                        spool,
                        msg,
                        kind,
                        rcpts,
                        signed=signer is not None,
                        encrypted_to=[c.fingerprint for c in unique],
                        signer=signer_fpr,
                        scheme=self.name,
                    )
                )
        except BaseException:
            for spool in spools:
                spool.close()  # nothing of a failed message is kept, not even ciphertext
            raise
        return tuple(copies)

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        """Each certificate judged by the store's checks (validity, chain, revocation), the
        ones trusted when the copy was made counting as trusted anchors again."""
        problems: list[KeyProblem] = []
        for fpr in dict.fromkeys(encrypted_to):
            stored = self.certstore.get(fpr)
            if stored is None:
                problems.append(
                    KeyProblem(fpr, KeyReason.NOT_FOUND, "no longer in the certificate store", fpr)
                )
                continue
            problem = self.certstore.check(
                stored.certificate,
                next(iter(stored.addresses), None),  # named by its address, as when sending
                purpose="encrypt",
                trusted_self_signed=encrypted_to,
            )
            if problem is not None:
                problems.append(problem)
        return problems

    @classmethod
    def recognises(cls, head: bytes) -> bool:
        # RFC 8551 §3.3 (enveloped) and §3.5.3 (detached signature).
        return b"pkcs7-mime" in head or b"pkcs7-signature" in head
