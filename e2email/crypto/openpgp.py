"""PGP/MIME (RFC 3156) through python-gnupg and GnuPG.

Takes canonical MIME bytes from :mod:`e2email.message` and returns the bytes of a
``multipart/signed`` or ``multipart/encrypted`` entity (its own header block, a blank line and
the body). Never opens a socket. Every gpg call is blocking: callers in async code run these
functions in a worker thread.

Safety checks beyond what gpg promises:

* ``micalg`` is taken from the hash gpg reports in ``SIG_CREATED`` (RFC 3156 §5), and weak
  hashes (MD5, SHA-1, RIPEMD-160) are refused.
* Encrypted output is parsed: it must be integrity protected (SEIPD or AEAD, never the legacy
  symmetrically encrypted packet; EFAIL, CVE-2017-17688), and its public-key encrypted session
  key packets must name exactly the keys we asked for, so no configuration (``encrypt-to``,
  ``default-recipient``, ...) can leak another key ID into a copy (Bcc privacy, checklist 21).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from e2email.errors import CryptoError, KeyProblem, KeyReason, PassphraseError, SignerKeyError
from e2email.keystore import Keystore, OpenPGPKey
from e2email.message import new_boundary

__all__ = [
    "SignatureInfo",
    "dearmor",
    "encrypt",
    "encrypted_to_key_ids",
    "sign",
]

#: RFC 9580 §9.5 hash algorithm IDs -> the names RFC 3156 §5 uses in micalg (lower case).
_HASHES = {
    1: "md5",
    2: "sha1",
    3: "ripemd160",
    8: "sha256",
    9: "sha384",
    10: "sha512",
    11: "sha224",
}
_WEAK_HASHES = {1, 2, 3}
#: gpg options for every operation: strong digests first, never an encrypt-to key we did not
#: choose, and --trust-model always because the keystore, not the web of trust, judged the keys.
_COMMON_ARGS = [
    "--personal-digest-preferences",
    "SHA512 SHA384 SHA256",
    "--personal-cipher-preferences",
    "AES256 AES192 AES",
    "--no-encrypt-to",
    "--no-default-recipient",
    "--trust-model",
    "always",
    "--pinentry-mode",
    "loopback",
]

_PREAMBLE_SIGNED = b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)\r\n"
_PREAMBLE_ENCRYPTED = b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"


@dataclass(frozen=True)
class SignatureInfo:
    """What gpg reported about a signature it made."""

    fingerprint: str
    hash_name: str

    @property
    def micalg(self) -> str:
        return f"pgp-{self.hash_name}"


def _crlf(text: str | bytes) -> bytes:
    data = text.encode("ascii") if isinstance(text, str) else text
    return b"\r\n".join(data.replace(b"\r\n", b"\n").split(b"\n"))


def _stderr_lines(result: object) -> list[str]:
    return [ln for ln in (getattr(result, "stderr", "") or "").splitlines() if ln.strip()]


def _passphrase_problem(result: object, fingerprint: str) -> PassphraseError | None:
    joined = "\n".join(_stderr_lines(result))
    if "BAD_PASSPHRASE" in joined or "Bad passphrase" in joined:
        return PassphraseError(f"wrong passphrase for key {fingerprint}", fingerprint=fingerprint)
    if "GOOD_PASSPHRASE" not in joined and (
        "MISSING_PASSPHRASE" in joined
        or "No passphrase given" in joined
        or ("NEED_PASSPHRASE" in joined and "can't get input" in joined)
    ):
        return PassphraseError(
            f"key {fingerprint} is protected by a passphrase and none was given",
            fingerprint=fingerprint,
            missing=True,
        )
    return None


def _failure(action: str, result: object) -> CryptoError:
    lines = [ln for ln in _stderr_lines(result) if not ln.startswith("[GNUPG:]")]
    status = [ln[9:] for ln in _stderr_lines(result) if ln.startswith("[GNUPG:] ")]
    hint = next((s for s in status if s.split()[0] in ("FAILURE", "ERROR", "INV_SGNR")), "")
    detail = lines[-1] if lines else hint or "no detail from gpg"
    return CryptoError(f"gpg could not {action}: {detail}")


def sign(
    keystore: Keystore,
    payload: bytes,
    *,
    signer: OpenPGPKey,
    passphrase: str | None = None,
) -> tuple[bytes, SignatureInfo]:
    """Make a ``multipart/signed`` entity over ``payload`` (RFC 3156 §5).

    ``payload`` must already be canonical (CRLF, 7-bit). It is signed byte for byte, and the
    entity carries it byte for byte: the CRLF before the next boundary belongs to the boundary
    (RFC 2046 §5.1.1), so what a verifier cuts out is exactly what was signed.
    """
    result = keystore.gpg.sign(
        payload,
        keyid=signer.fingerprint,
        detach=True,
        clearsign=False,
        binary=False,
        passphrase=passphrase,
        extra_args=_COMMON_ARGS,
    )
    info = _signature_info(result, signer)
    body = _crlf(result.data).rstrip(b"\r\n") + b"\r\n"
    boundary = new_boundary()
    entity = b"".join(
        [
            b'Content-Type: multipart/signed; micalg="' + info.micalg.encode() + b'";\r\n',
            b' protocol="application/pgp-signature";\r\n',
            b' boundary="' + boundary.encode() + b'"\r\n',
            b"\r\n",
            _PREAMBLE_SIGNED,
            b"--" + boundary.encode() + b"\r\n",
            payload,
            b"\r\n--" + boundary.encode() + b"\r\n",
            b'Content-Type: application/pgp-signature; name="signature.asc"\r\n',
            b"Content-Description: OpenPGP digital signature\r\n",
            b'Content-Disposition: attachment; filename="signature.asc"\r\n',
            b"\r\n",
            body,
            b"\r\n--" + boundary.encode() + b"--\r\n",
        ]
    )
    return entity, info


def _signature_info(result: object, signer: OpenPGPKey) -> SignatureInfo:
    problem = _passphrase_problem(result, signer.fingerprint)
    if problem is not None:
        raise problem
    hash_algo = getattr(result, "hash_algo", None)
    fingerprint = getattr(result, "fingerprint", None)
    if not getattr(result, "data", b"") or not hash_algo or not fingerprint:
        status = getattr(result, "status", None) or ""
        if status in ("key expired", "key revoked") or status.startswith("invalid signer"):
            raise SignerKeyError(
                KeyProblem(
                    signer.addresses[0] if signer.addresses else signer.fingerprint,
                    KeyReason.BACKEND,
                    status,
                    fingerprint=signer.fingerprint,
                )
            )
        raise _failure("sign", result)
    algo_id = int(hash_algo)
    if algo_id in _WEAK_HASHES or algo_id not in _HASHES:
        raise CryptoError(f"gpg signed with a weak or unknown hash (algorithm {algo_id})")
    return SignatureInfo(fingerprint=str(fingerprint), hash_name=_HASHES[algo_id])


def encrypt(
    keystore: Keystore,
    payload: bytes,
    *,
    recipients: Sequence[OpenPGPKey],
    signer: OpenPGPKey | None = None,
    passphrase: str | None = None,
) -> bytes:
    """Make a ``multipart/encrypted`` entity (RFC 3156 §4), signed and encrypted in one OpenPGP
    message when ``signer`` is given (§6.2).

    ``recipients`` must be the complete, deduplicated list of keys (sender included when
    encrypting to self): the output is checked to be encrypted to those keys and no others.
    """
    if not recipients:
        raise CryptoError("no recipient keys to encrypt to")
    fprs = list(dict.fromkeys(k.fingerprint for k in recipients))
    result = keystore.gpg.encrypt(
        payload,
        fprs,
        sign=signer.fingerprint if signer is not None else None,
        passphrase=passphrase,
        armor=True,
        always_trust=True,
        extra_args=_COMMON_ARGS,
    )
    if signer is not None:
        problem = _passphrase_problem(result, signer.fingerprint)
        if problem is not None:
            raise problem
    if not getattr(result, "ok", False) or not result.data:
        raise _failure("encrypt", result)
    armored = _crlf(result.data).rstrip(b"\r\n") + b"\r\n"
    _check_encrypted(armored, recipients)
    boundary = new_boundary().encode()
    return b"".join(
        [
            b"Content-Type: multipart/encrypted;\r\n",
            b' protocol="application/pgp-encrypted";\r\n',
            b' boundary="' + boundary + b'"\r\n',
            b"\r\n",
            _PREAMBLE_ENCRYPTED,
            b"--" + boundary + b"\r\n",
            b"Content-Type: application/pgp-encrypted\r\n",
            b"Content-Description: PGP/MIME version identification\r\n",
            b"\r\n",
            b"Version: 1\r\n",
            b"\r\n--" + boundary + b"\r\n",
            b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n',
            b"Content-Description: OpenPGP encrypted message\r\n",
            b'Content-Disposition: inline; filename="encrypted.asc"\r\n',
            b"\r\n",
            armored,
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )


# -- Looking inside OpenPGP messages -----------------------------------------------------------


def dearmor(armored: bytes) -> bytes:
    """The binary packets of an ASCII-armored OpenPGP block (RFC 9580 §6)."""
    lines = armored.replace(b"\r\n", b"\n").split(b"\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(b"-----BEGIN PGP"))
    except StopIteration:
        raise CryptoError("no ASCII-armored OpenPGP block found") from None
    i = start + 1
    while i < len(lines) and lines[i].strip():  # armor headers end at the first blank line
        i += 1
    body = []
    for ln in lines[i + 1 :]:
        if ln.startswith(b"-----END PGP") or ln.startswith(b"="):
            break
        body.append(ln.strip())
    try:
        return base64.b64decode(b"".join(body), validate=True)
    except binascii.Error as exc:
        raise CryptoError(f"malformed ASCII armor: {exc}") from exc


def _packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Top-level packets as (tag, body), both header formats (RFC 9580 §4.2)."""
    pos = 0
    while pos < len(data):
        head = data[pos]
        if not head & 0x80:
            raise CryptoError("malformed OpenPGP packet header")
        if head & 0x40:  # new format
            tag = head & 0x3F
            pos += 1
            first = data[pos]
            if first < 192:
                length, pos = first, pos + 1
            elif first < 224:
                length, pos = ((first - 192) << 8) + data[pos + 1] + 192, pos + 2
            elif first == 255:
                length, pos = int.from_bytes(data[pos + 1 : pos + 5], "big"), pos + 5
            else:
                # Partial body lengths: only the encrypted data packet uses them, and it is the
                # last packet we look at, so the rest of the stream is its body.
                yield tag, data[pos:]
                return
        else:  # old format
            tag = (head >> 2) & 0x0F
            ltype = head & 0x03
            pos += 1
            if ltype == 3:
                yield tag, data[pos:]
                return
            size = (1, 2, 4)[ltype]
            length, pos = int.from_bytes(data[pos : pos + size], "big"), pos + size
        yield tag, data[pos : pos + length]
        pos += length


def encrypted_to_key_ids(armored: bytes) -> tuple[list[str], int]:
    """The key IDs in the PKESK packets, and the tag of the encrypted data packet."""
    key_ids: list[str] = []
    for tag, body in _packets(dearmor(armored)):
        if tag == 1:  # public-key encrypted session key
            version = body[0]
            if version == 3:
                key_ids.append(body[1:9].hex().upper())
            elif version == 6:
                # v6 PKESK: a key version and fingerprint follow (RFC 9580 §5.1.1)
                size = body[1]
                key_ids.append(body[3 : 2 + size].hex().upper()[-16:])
            else:
                raise CryptoError(f"unexpected PKESK version {version}")
        elif tag in (9, 18, 20):
            return key_ids, tag
        elif tag == 3:  # symmetric-key session key: we never ask for one
            raise CryptoError("output contains a passphrase-encrypted session key")
    raise CryptoError("no encrypted data packet in gpg's output")


def _check_encrypted(armored: bytes, recipients: Sequence[OpenPGPKey]) -> None:
    key_ids, data_tag = encrypted_to_key_ids(armored)
    if data_tag == 9:
        raise CryptoError(
            "gpg produced a message without integrity protection (SED packet); refusing it"
        )
    allowed = {sub.key_id for k in recipients for sub in (k.primary, *k.subkeys)}
    unexpected = [kid for kid in key_ids if kid not in allowed]
    if unexpected or len(set(key_ids)) != len({k.fingerprint for k in recipients}):
        raise CryptoError(
            "gpg encrypted to an unexpected set of keys "
            f"({', '.join(key_ids)}); check encrypt-to/hidden-encrypt-to in gpg.conf"
        )
