"""CMS (RFC 5652) written by e2email, piece by piece, for large S/MIME messages.

``cryptography``'s PKCS#7 builders take the content whole and return the result whole: for a
25 MB attachment that is the 34 MB signed entity, its padded copy, the ciphertext, its DER and
the returned bytes at once (issue 9 part 5). No library streams CMS, so for a *large* message
:mod:`e2email.crypto.smime` makes the two objects here instead, on ``cryptography``'s
primitives, with the same algorithms and layout that ``cryptography`` emits for a small one
(tests/test_smime_large.py compares them field by field):

* :func:`detached_signature`: SignedData (RFC 5652 §5) over a digest computed by the caller as
  the content streamed past; the signed attributes contentType, signingTime, messageDigest and
  smimeCapabilities (RFC 8551 §2.5); RSA PKCS#1 v1.5, RSASSA-PSS (RFC 4056) or ECDSA (RFC 5753
  §2.1.1 as profiled by RFC 5758); the signer's certificate and chain. The signature is small:
  it is built whole.
* :class:`Envelope`: EnvelopedData (RFC 5652 §6) with one KeyTransRecipientInfo per certificate
  (issuerAndSerialNumber, rsaEncryption: RSA PKCS#1 v1.5 key transport, RFC 3370 §4.2.1) and
  AES-CBC content encryption (RFC 3565), yielded as DER pieces while the content streams
  through a ``cryptography`` AES-CBC encryptor. Every length is definite and known before the
  first byte (the ciphertext of ``n`` bytes under PKCS#7 padding is ``16 * (n // 16 + 1)``), so
  the output is DER, byte for byte the layout of ``cryptography``'s, never held whole.

The DER writer is the minimum X.690 needs here: definite lengths in the fewest octets
(§8.1.3, §10.1), minimal two's-complement INTEGERs (§8.3.2), OBJECT IDENTIFIERs in base 128
(§8.19) and SET OF components sorted by their encodings (§11.6).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "Envelope",
    "algorithm",
    "ciphertext_length",
    "detached_signature",
    "enveloped_head",
    "head",
    "integer",
    "length_octets",
    "oid",
    "recipient_info",
    "sequence",
    "set_of",
    "tlv",
]

# X.690 universal tags (§8) and the context-specific constructed [0] (0xA0).
SEQUENCE, SET, INTEGER, OCTET_STRING, NULL, OID, UTC_TIME, GENERALIZED_TIME = (
    0x30,
    0x31,
    0x02,
    0x04,
    0x05,
    0x06,
    0x17,
    0x18,
)

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_SMIME_CAPABILITIES = "1.2.840.113549.1.9.15"
OID_RSA = "1.2.840.113549.1.1.1"
OID_RSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"
DIGEST_OIDS = {
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
ECDSA_OIDS = {
    "sha256": "1.2.840.10045.4.3.2",
    "sha384": "1.2.840.10045.4.3.3",
    "sha512": "1.2.840.10045.4.3.4",
}
AES_CBC_OIDS = {
    256: "2.16.840.1.101.3.4.1.42",
    192: "2.16.840.1.101.3.4.1.22",
    128: "2.16.840.1.101.3.4.1.2",
}
_HASHES: dict[str, type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

#: Plaintext bytes encrypted per yielded piece (small: the input, padded and encrypted
#: copies of a piece are alive at once; the calls cost nothing at this size).
_PIECE = 1 << 16


# -- DER writer (X.690) -------------------------------------------------------------------------


def length_octets(length: int) -> bytes:
    """X.690 §8.1.3 definite form, §10.1 shortest: short form below 128, else long form."""
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def head(tag: int, length: int) -> bytes:
    """The identifier and length octets of an element whose content is ``length`` bytes."""
    return bytes([tag]) + length_octets(length)


def tlv(tag: int, content: bytes) -> bytes:
    return head(tag, len(content)) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def set_of(parts: Iterable[bytes], tag: int = SET) -> bytes:
    """SET OF, components in ascending order of their encodings (X.690 §11.6). Complete TLVs
    of different lengths differ before the shorter one ends, so plain byte order is that."""
    return tlv(tag, b"".join(sorted(parts)))


def integer(value: int) -> bytes:
    """X.690 §8.3: two's complement in the fewest octets."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def oid(dotted: str) -> bytes:
    """X.690 §8.19: the first two arcs as 40 * a + b, each subidentifier in base 128."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return tlv(OID, bytes(out))


def algorithm(dotted: str, parameters: bytes | None = None) -> bytes:
    """AlgorithmIdentifier (RFC 5280 §4.1.1.2)."""
    return sequence(oid(dotted), parameters if parameters is not None else b"")


def _digest_algorithm(digest: str) -> bytes:
    # With a NULL parameter, as cryptography and OpenSSL write it (byte-for-byte parity with
    # the small path). RFC 5754 §2 says to generate it absent but to accept both forms;
    # every reader we test (openssl, gpgsm) does.
    return algorithm(DIGEST_OIDS[digest], tlv(NULL, b""))


def _time(when: datetime.datetime) -> bytes:
    """RFC 5652 §11.3: UTCTime from 1950 to 2049, GeneralizedTime otherwise; seconds, Z."""
    when = when.astimezone(datetime.UTC)
    if 1950 <= when.year < 2050:
        return tlv(UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, when.strftime("%Y%m%d%H%M%SZ").encode())


# -- SignedData ---------------------------------------------------------------------------------


def _attribute(dotted: str, value: bytes) -> bytes:
    return sequence(oid(dotted), set_of([value]))


def _smime_capabilities() -> bytes:
    # What cryptography announces (RFC 8551 §2.5.2): AES-256, -192, -128 CBC, in that order
    # (a SEQUENCE OF: preference order, not sorted).
    return sequence(*(algorithm(AES_CBC_OIDS[bits]) for bits in (256, 192, 128)))


def detached_signature(
    message_digest: bytes,
    *,
    certificate: x509.Certificate,
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate] = (),
    digest: str = "sha256",
    rsa_pss: bool = False,
    signing_time: datetime.datetime | None = None,
) -> bytes:
    """A detached CMS SignedData (DER) whose signer signs ``message_digest``, the ``digest``
    hash of the content (RFC 5652 §5.4), the way ``cryptography``'s PKCS7SignatureBuilder
    with DetachedSignature writes it: version 1, the digest algorithm with a NULL parameter,
    eContentType id-data without content, the certificates (signer and chain, a DER SET OF),
    one SignerInfo by issuer and serial number with the four signed attributes."""
    hash_class = _HASHES[digest]
    if len(message_digest) != hash_class.digest_size:
        raise ValueError("the message digest does not fit the digest algorithm")
    when = signing_time or datetime.datetime.now(datetime.UTC)
    attributes = [
        _attribute(OID_CONTENT_TYPE, oid(OID_DATA)),
        _attribute(OID_SIGNING_TIME, _time(when)),
        _attribute(OID_MESSAGE_DIGEST, tlv(OCTET_STRING, message_digest)),
        _attribute(OID_SMIME_CAPABILITIES, _smime_capabilities()),
    ]
    # The signature covers the attributes' DER as a SET OF (RFC 5652 §5.4); in the SignerInfo
    # they are the same bytes under the [0] IMPLICIT tag.
    signed_attributes = set_of(attributes)
    if isinstance(private_key, rsa.RSAPrivateKey):
        if rsa_pss:
            # RFC 4056 §3: MGF1 with the same hash; salt as long as the digest; the default
            # trailer field left out (RFC 4055 §3.1), as cryptography writes it.
            pss = padding.PSS(mgf=padding.MGF1(hash_class()), salt_length=hash_class.digest_size)
            value = private_key.sign(signed_attributes, pss, hash_class())
            params = sequence(
                tlv(0xA0, _digest_algorithm(digest)),
                tlv(0xA1, algorithm(OID_MGF1, _digest_algorithm(digest))),
                tlv(0xA2, integer(hash_class.digest_size)),
            )
            signature_algorithm = algorithm(OID_RSA_PSS, params)
        else:
            value = private_key.sign(signed_attributes, padding.PKCS1v15(), hash_class())
            # rsaEncryption, as cryptography writes it (RFC 3370 §3.2 allows it for SignerInfo).
            signature_algorithm = algorithm(OID_RSA, tlv(NULL, b""))
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        value = private_key.sign(signed_attributes, ec.ECDSA(hash_class()))
        signature_algorithm = algorithm(ECDSA_OIDS[digest])  # no parameters (RFC 5758 §3.2)
    else:  # pragma: no cover - SignerKey admits RSA and EC keys only
        raise TypeError("unsupported signer key type")
    signer_info = sequence(
        integer(1),
        _issuer_and_serial(certificate),
        _digest_algorithm(digest),
        b"\xa0" + signed_attributes[1:],  # the same SET OF, tagged [0] IMPLICIT
        signature_algorithm,
        tlv(OCTET_STRING, value),
    )
    certificates = [c.public_bytes(serialization.Encoding.DER) for c in (certificate, *chain)]
    signed_data = sequence(
        integer(1),
        set_of([_digest_algorithm(digest)]),
        sequence(oid(OID_DATA)),  # detached: no eContent (RFC 5652 §5.2)
        set_of(dict.fromkeys(certificates), tag=0xA0),
        set_of([signer_info]),
    )
    return sequence(oid(OID_SIGNED_DATA), tlv(0xA0, signed_data))


def _issuer_and_serial(certificate: x509.Certificate) -> bytes:
    """IssuerAndSerialNumber (RFC 5652 §10.2.4)."""
    return sequence(certificate.issuer.public_bytes(), integer(certificate.serial_number))


# -- EnvelopedData ------------------------------------------------------------------------------


def ciphertext_length(length: int) -> int:
    """AES-CBC with PKCS#7 padding (RFC 5652 §6.3): always 1 to 16 bytes of padding."""
    return 16 * (length // 16 + 1)


def enveloped_head(
    recipient_infos: Sequence[bytes], content_algorithm: bytes, ciphertext: int
) -> bytes:
    """Everything of ContentInfo(EnvelopedData) before the ciphertext, whose length is
    ``ciphertext``: the ciphertext follows as the content of encryptedContent ([0] IMPLICIT
    OCTET STRING, primitive), the last bytes of the whole. Version 0 (RFC 5652 §6.1: only
    KeyTransRecipientInfo v0, no originatorInfo or unprotectedAttrs)."""
    content = head(0x80, ciphertext)
    encrypted_content_info = oid(OID_DATA) + content_algorithm
    eci_head = head(SEQUENCE, len(encrypted_content_info) + len(content) + ciphertext)
    enveloped = integer(0) + set_of(recipient_infos)
    env_length = len(enveloped) + len(eci_head) + len(encrypted_content_info) + len(content)
    env_head = head(SEQUENCE, env_length + ciphertext)
    explicit = head(0xA0, len(env_head) + env_length + ciphertext)
    outer = oid(OID_ENVELOPED_DATA)
    top = head(SEQUENCE, len(outer) + len(explicit) + len(env_head) + env_length + ciphertext)
    return b"".join(
        [top, outer, explicit, env_head, enveloped, eci_head, encrypted_content_info, content]
    )


def recipient_info(certificate: x509.Certificate, key: bytes) -> bytes:
    """KeyTransRecipientInfo v0 (RFC 5652 §6.2.1): ``key`` encrypted to the certificate's RSA
    key with PKCS#1 v1.5 (rsaEncryption, RFC 3370 §4.2.1), as cryptography does."""
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError("key transport needs an RSA certificate")
    encrypted = public.encrypt(key, padding.PKCS1v15())
    return sequence(
        integer(0),
        _issuer_and_serial(certificate),
        algorithm(OID_RSA, tlv(NULL, b"")),
        tlv(OCTET_STRING, encrypted),
    )


class Envelope:
    """ContentInfo(EnvelopedData) for ``recipients`` (RSA certificates) with AES-``key_bits``
    -CBC, made piece by piece (:meth:`pieces`). A fresh content key and IV for each envelope
    (RFC 3565 §2.3: the IV is the algorithm's parameter, an OCTET STRING); the RecipientInfos
    are made at once, so :meth:`skeleton` shows what will be written before any content is."""

    def __init__(self, recipients: Sequence[x509.Certificate], *, key_bits: int = 256) -> None:
        key = os.urandom(key_bits // 8)
        iv = os.urandom(16)
        self.recipient_infos = tuple(recipient_info(cert, key) for cert in recipients)
        self.content_algorithm = algorithm(AES_CBC_OIDS[key_bits], tlv(OCTET_STRING, iv))
        self._cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
        self._used = False

    def __repr__(self) -> str:
        return f"Envelope({len(self.recipient_infos)} recipients)"

    def skeleton(self) -> bytes:
        """The whole DER with an empty encryptedContent: every field but the ciphertext."""
        return enveloped_head(self.recipient_infos, self.content_algorithm, 0)

    def pieces(self, content: Iterable[bytes], length: int) -> Iterator[bytes]:
        """The DER of the envelope of the ``length`` bytes ``content`` yields, in pieces as
        they are encrypted. Raises ValueError if ``content`` does not yield exactly ``length``
        bytes (the lengths written up front would be wrong); nothing after that is yielded.
        One use only: a second call would encrypt other content under the same key and IV
        (CBC with a repeated IV shows equal prefixes), so it raises RuntimeError."""
        if self._used:
            raise RuntimeError("an Envelope encrypts one content; make a new one")
        self._used = True
        yield enveloped_head(
            self.recipient_infos, self.content_algorithm, ciphertext_length(length)
        )
        encryptor = self._cipher.encryptor()
        padder = sym_padding.PKCS7(128).padder()
        seen = 0
        for piece in content:
            seen += len(piece)
            if seen > length:
                raise ValueError("the content is longer than announced")
            with memoryview(piece) as view:
                for start in range(0, len(view), _PIECE):
                    out = encryptor.update(padder.update(view[start : start + _PIECE]))
                    if out:
                        yield out
        if seen != length:
            raise ValueError("the content is shorter than announced")
        yield encryptor.update(padder.finalize()) + encryptor.finalize()
