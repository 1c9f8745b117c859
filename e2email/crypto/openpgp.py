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
import copy
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from e2email.errors import CryptoError, KeyProblem, KeyReason, PassphraseError, SignerKeyError
from e2email.keystore import Keystore, OpenPGPKey
from e2email.message import new_boundary
from e2email.spool import Spool

__all__ = [
    "SignatureInfo",
    "armor_into",
    "crc24",
    "crc24_combine",
    "dearmor",
    "encrypt",
    "encrypt_into",
    "encrypted_to_key_ids",
    "packet_key_ids",
    "sign",
    "sign_into",
    "signed_entity_into",
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
#: gpg options for every operation. --no-options: a gpg.conf (an existing GnuPG home may be
#: named) must not choose the signing key (local-user), weaken the digest or cipher, or add
#: recipients (encrypt-to, group). Strong digests and ciphers first, and --trust-model always
#: because the keystore, not the web of trust, judged the keys.
_COMMON_ARGS = [
    "--no-options",
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

#: No compression when encrypting (gpg's default is ZIP). Compression beside encryption makes
#: the ciphertext's length depend on the plaintext's content, which an attacker who can add text
#: to a message (a quoted reply, a form field) can exploit to learn secret text beside it, as
#: CRIME did to TLS; the Compressed Data packet is optional (RFC 9580 §5.6). It buys nothing for the
#: large payloads that matter (attachments that are already zip, jpeg, pdf: base64 of them gains
#: only base64's quarter, at ~2.7 s of gpg CPU for 25 MB). Sequoia's default is no compression,
#: so both engines now produce the same packets (no tag 8 Compressed Data packet).
_NO_COMPRESSION = ["--compress-algo", "none"]

#: Symmetric algorithm IDs (RFC 9580 §9.3) accepted in BEGIN_ENCRYPTION: AES-128/192/256.
_STRONG_CIPHERS = {7, 8, 9}

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
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


#: python-gnupg moves data to and from gpg in pieces of this size (its default is 16 KiB).
_PIPE_CHUNK = 64 * 1024


class _ChunkReader:
    """A read-only file over pieces of bytes, for python-gnupg to copy to gpg's stdin: a
    payload given in pieces is handed over as it is made, never joined first."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._current = b""
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._current):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._current, self._pos = chunk, 0
        end = len(self._current) if size < 0 else self._pos + size
        if self._pos == 0 and end >= len(self._current):
            piece = self._current
        else:
            piece = self._current[self._pos : end]
        self._pos += len(piece)
        return piece


class _ArmorWriter:
    """Takes gpg's ASCII-armored output as it arrives (python-gnupg's ``on_data``) and writes
    it to ``out`` with CRLF line ends, as the MIME part carries it, so the output is never
    held twice (nor, in a spool file, once). Trailing line ends are dropped and one CRLF
    written by :meth:`finish`. An error writing ``out`` (a full disk) is kept for
    :meth:`finish` to raise: python-gnupg's reader thread would only log it."""

    def __init__(self, out: Spool) -> None:
        self._out = out
        self._held = b""  # a CR at the end of one piece may start a CRLF ending in the next
        self._trailing = 0  # CR and LF bytes at the end of what was written
        self.size = 0
        self.error: BaseException | None = None

    def __call__(self, chunk: bytes) -> bool:
        if self.error is not None:
            return False
        try:
            self._write(chunk)
        except Exception as exc:  # re-raised by finish(), in the caller's thread
            self.error = exc
        return False  # python-gnupg: do not also keep the piece in result.data

    def _write(self, chunk: bytes) -> None:
        data = self._held + chunk
        self._held = b""
        if data.endswith(b"\r"):
            self._held, data = b"\r", data[:-1]
        data = _crlf(data)
        if data:
            self._out.write(data)
            self.size += len(data)
            tail = len(data) - len(data.rstrip(b"\r\n"))
            self._trailing = self._trailing + tail if tail == len(data) else tail

    def finish(self) -> None:
        if self.error is not None:
            raise self.error
        self._out.truncate(len(self._out) - self._trailing)
        self._out.write(b"\r\n")


def _gpg_for_call(keystore: Keystore, on_data: Callable[[bytes], bool]) -> tuple[Any, list[Any]]:
    """A copy of the keystore's python-gnupg object for one call: its ``on_data`` hook is
    per instance, and copies run in parallel threads. The second value collects the result
    object of an encryption even if python-gnupg raises after gpg finished (a broken pipe
    when gpg stops reading early), so gpg's own status can still say what went wrong."""
    gpg = copy.copy(keystore.gpg)
    gpg.on_data = on_data
    gpg.buffer_size = _PIPE_CHUNK
    made: list[Any] = []
    make_crypt = gpg.result_map["crypt"]

    def crypt_result(owner: Any) -> Any:
        result = make_crypt(owner)
        made.append(result)
        return result

    gpg.result_map = {**gpg.result_map, "crypt": crypt_result}
    return gpg, made


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


def _status(result: object, keyword: str) -> list[list[str]]:
    """The arguments of every ``[GNUPG:] KEYWORD ...`` status line gpg wrote."""
    prefix = f"[GNUPG:] {keyword} "
    return [ln[len(prefix) :].split() for ln in _stderr_lines(result) if ln.startswith(prefix)]


def _check_passphrase_text(passphrase: str | None) -> None:
    # python-gnupg writes the passphrase as a line on gpg's stdin and refuses these with a bare
    # ValueError; say it in our terms instead.
    if passphrase is not None and any(c in passphrase for c in "\r\n\0"):
        raise PassphraseError("a passphrase cannot contain CR, LF or NUL")


def _signing_subkey(signer: OpenPGPKey) -> str:
    """The (sub)key that must make the signature, named exactly (``FPR!``) so that gpg cannot
    pick another one: the keystore judged this one (standards items 14 and 15)."""
    sub = signer.signing_subkey()
    if sub is None:
        problem = signer.signing_problem()
        reason, detail = problem or (KeyReason.NO_SIGNING_KEY, "")
        raise SignerKeyError(
            KeyProblem(
                signer.addresses[0] if signer.addresses else signer.fingerprint,
                reason,
                detail,
                fingerprint=signer.fingerprint,
            )
        )
    return sub.fingerprint


def _encryption_subkeys(recipients: Sequence[OpenPGPKey]) -> list[str]:
    """The subkey to encrypt to for each recipient, named exactly, so that gpg cannot choose a
    subkey the keystore refused (RSA-1024, SHA-1 binding, ...)."""
    chosen: list[str] = []
    for key in recipients:
        sub = key.encryption_subkey()
        if sub is None:
            raise CryptoError(f"key {key.fingerprint} has no usable encryption subkey")
        if sub.fingerprint not in chosen:
            chosen.append(sub.fingerprint)
    return chosen


def _check_signature_status(result: object, signing_subkey: str) -> SignatureInfo:
    """Exactly one signature, made by the chosen subkey, with a strong hash."""
    created = _status(result, "SIG_CREATED")
    if len(created) != 1 or len(created[0]) < 6:
        raise CryptoError(f"gpg made {len(created)} signatures where one was asked for")
    hash_id, fingerprint = int(created[0][2]), created[0][5].upper()
    if fingerprint != signing_subkey:
        raise CryptoError(f"gpg signed with key {fingerprint}, not the chosen {signing_subkey}")
    if hash_id in _WEAK_HASHES or hash_id not in _HASHES:
        raise CryptoError(f"gpg signed with a weak or unknown hash (algorithm {hash_id})")
    return SignatureInfo(fingerprint=fingerprint, hash_name=_HASHES[hash_id])


def _failure(action: str, result: object) -> CryptoError:
    lines = [ln for ln in _stderr_lines(result) if not ln.startswith("[GNUPG:]")]
    status = [ln[9:] for ln in _stderr_lines(result) if ln.startswith("[GNUPG:] ")]
    hint = next((s for s in status if s.split()[0] in ("FAILURE", "ERROR", "INV_SGNR")), "")
    detail = lines[-1] if lines else hint or "no detail from gpg"
    return CryptoError(f"gpg could not {action}: {detail}")


def signed_entity(payload: bytes, signature: bytes, micalg: str, *, prefix: bytes = b"") -> bytes:
    """RFC 3156 §5 ``multipart/signed``: ``payload`` byte for byte (the CRLF before the next
    boundary belongs to the boundary, RFC 2046 §5.1.1), then the armored ``signature`` (CRLF
    lines) as given; ``prefix`` (the outer header block) goes first. Shared by the engines."""
    return b"".join(_signed_entity_parts(payload, signature, micalg, prefix))


def signed_entity_into(
    out: Spool, payload: bytes, signature: bytes, micalg: str, *, prefix: bytes = b""
) -> None:
    """:func:`signed_entity` written to ``out`` (a large message's spool: the entity is not
    made a second time beside the payload)."""
    for part in _signed_entity_parts(payload, signature, micalg, prefix):
        out.write(part)


def _signed_entity_parts(
    payload: bytes, signature: bytes, micalg: str, prefix: bytes
) -> list[bytes]:
    boundary = new_boundary().encode()
    return [
        prefix,
        b'Content-Type: multipart/signed; micalg="' + micalg.encode() + b'";\r\n',
        b' protocol="application/pgp-signature";\r\n',
        b' boundary="' + boundary + b'"\r\n',
        b"\r\n",
        _PREAMBLE_SIGNED,
        b"--" + boundary + b"\r\n",
        payload,
        b"\r\n--" + boundary + b"\r\n",
        b'Content-Type: application/pgp-signature; name="signature.asc"\r\n',
        b"Content-Description: OpenPGP digital signature\r\n",
        b'Content-Disposition: attachment; filename="signature.asc"\r\n',
        b"\r\n",
        signature,
        b"\r\n--" + boundary + b"--\r\n",
    ]


def encrypted_entity_head(boundary: bytes) -> bytes:
    """RFC 3156 §4 ``multipart/encrypted`` up to where the armored message goes: the header,
    the ``Version: 1`` part and the second part's header. The entity ends with the armor and
    ``CRLF --boundary-- CRLF``. Shared by the engines."""
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
        ]
    )


def sign(
    keystore: Keystore,
    payload: bytes,
    *,
    signer: OpenPGPKey,
    passphrase: str | None = None,
    prefix: bytes = b"",
) -> tuple[bytes, SignatureInfo]:
    """Make a ``multipart/signed`` entity over ``payload`` (RFC 3156 §5).

    ``payload`` must already be canonical (CRLF, 7-bit). It is signed byte for byte, and the
    entity carries it byte for byte: the CRLF before the next boundary belongs to the boundary
    (RFC 2046 §5.1.1), so what a verifier cuts out is exactly what was signed. ``prefix``
    (e.g. the outer header block) goes before the entity in the returned bytes, so a whole
    message is assembled in one copy.
    """
    with Spool() as out:
        info = sign_into(
            out, keystore, payload, signer=signer, passphrase=passphrase, prefix=prefix
        )
        return out.getvalue(), info


def sign_into(
    out: Spool,
    keystore: Keystore,
    payload: bytes,
    *,
    signer: OpenPGPKey,
    passphrase: str | None = None,
    prefix: bytes = b"",
) -> SignatureInfo:
    """:func:`sign`, the message written to ``out`` (a spool: a large one goes to a private
    file instead of being assembled a second time in memory)."""
    _check_passphrase_text(passphrase)
    subkey = _signing_subkey(signer)
    if passphrase is not None:
        keystore.forget_passphrase(subkey)
    result = keystore.gpg.sign(
        payload,
        keyid=None,
        detach=True,
        clearsign=False,
        binary=False,
        passphrase=passphrase,
        extra_args=[*_COMMON_ARGS, "--local-user", f"{subkey}!"],
    )
    _check_sign_result(result, signer)
    info = _check_signature_status(result, subkey)
    body = _crlf(result.data).rstrip(b"\r\n") + b"\r\n"
    signed_entity_into(out, payload, body, info.micalg, prefix=prefix)
    return info


def _check_sign_result(result: object, signer: OpenPGPKey) -> None:
    """Map a failed signing call to the error that says why (passphrase, key, gpg)."""
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


def encrypt(
    keystore: Keystore,
    payload: bytes | Iterable[bytes],
    *,
    recipients: Sequence[OpenPGPKey],
    signer: OpenPGPKey | None = None,
    passphrase: str | None = None,
    prefix: bytes = b"",
) -> bytes:
    """The entity of :func:`encrypt_into`, as bytes."""
    with Spool() as out:
        encrypt_into(
            out,
            keystore,
            payload,
            recipients=recipients,
            signer=signer,
            passphrase=passphrase,
            prefix=prefix,
        )
        return out.getvalue()


def encrypt_into(
    out: Spool,
    keystore: Keystore,
    payload: bytes | Iterable[bytes],
    *,
    recipients: Sequence[OpenPGPKey],
    signer: OpenPGPKey | None = None,
    passphrase: str | None = None,
    prefix: bytes = b"",
) -> None:
    """Write a ``multipart/encrypted`` entity (RFC 3156 §4), signed and encrypted in one OpenPGP
    message when ``signer`` is given (§6.2).

    ``recipients`` must be the complete, deduplicated list of keys (sender included when
    encrypting to self): the output is checked to be encrypted to those keys and no others.

    ``payload`` may come in pieces (e.g. a :class:`~e2email.message.PayloadStream`): they are
    piped to gpg as they are made, and gpg's output is written, CRLF-converted, straight into
    ``out`` (empty), so neither the plaintext nor the ciphertext is ever held whole in
    memory when ``out`` is a spool with a folder. ``prefix`` (e.g. the outer header block)
    goes before the entity. On an error ``out`` holds nothing usable (the caller closes it).
    """
    if not recipients:
        raise CryptoError("no recipient keys to encrypt to")
    _check_passphrase_text(passphrase)
    subkeys = _encryption_subkeys(recipients)
    sign_args = []
    signing_subkey = None
    if signer is not None:
        signing_subkey = _signing_subkey(signer)
        sign_args = ["--sign", "--local-user", f"{signing_subkey}!"]
        if passphrase is not None:
            keystore.forget_passphrase(signing_subkey)
    boundary = new_boundary().encode()
    out.write(prefix)
    out.write(encrypted_entity_head(boundary))
    armor_start = len(out)
    writer = _ArmorWriter(out)
    gpg, made = _gpg_for_call(keystore, writer)
    chunks = [payload] if isinstance(payload, bytes) else payload
    copy_error: OSError | None = None
    try:
        result = gpg.encrypt_file(
            _ChunkReader(chunks),
            [f"{fpr}!" for fpr in subkeys],
            sign=None,
            passphrase=passphrase,
            armor=True,
            always_trust=True,
            extra_args=[*_COMMON_ARGS, *_NO_COMPRESSION, *sign_args],
        )
    except OSError as exc:
        # python-gnupg re-raises, after gpg ended, an error from copying the payload to it:
        # a broken pipe when gpg stopped reading early (it failed; its status lines in the
        # result say why), or an error reading the payload. Either way the output is unusable.
        if not made:
            raise CryptoError(f"cannot run gpg: {exc}") from exc
        result, copy_error = made[0], exc
    if signer is not None:
        problem = _passphrase_problem(result, signer.fingerprint)
        if problem is not None:
            raise problem
    if writer.error is not None:
        writer.finish()  # raises the error that writing the output met
    if not getattr(result, "ok", False) or not writer.size:
        raise _failure("encrypt", result) from copy_error
    if copy_error is not None:  # gpg encrypted what it got: not all of the payload
        raise CryptoError(f"could not pass the message to gpg: {copy_error}") from copy_error
    if signing_subkey is not None:
        _check_signature_status(result, signing_subkey)
    ciphers = [int(args[1]) for args in _status(result, "BEGIN_ENCRYPTION") if len(args) > 1]
    if not ciphers or any(c not in _STRONG_CIPHERS for c in ciphers):
        raise CryptoError(f"gpg encrypted with a cipher other than AES (algorithm {ciphers})")
    writer.finish()
    # The packet check reads only the first packets of the armored output, a piece at a time.
    _check_encrypted(out.chunks(_ARMOR_READ, start=armor_start), subkeys)
    out.write(b"\r\n--" + boundary + b"--\r\n")


# -- ASCII armor (RFC 9580 §6) -----------------------------------------------------------------

#: RFC 9580 §6.1 CRC-24: generator polynomial (with its x^24 term) and initial value.
_CRC24_POLY = 0x1864CFB
_CRC24_INIT = 0xB704CE
#: Binary bytes per armor line: 48 bytes are 64 base64 characters, the line length gpg and
#: Sequoia write (RFC 9580 §6.3 allows up to 76).
_ARMOR_LINE_BYTES = 48
#: Binary bytes armored at a time: a whole number of lines (192 KiB; 256 KiB of armor).
_ARMOR_BLOCK = _ARMOR_LINE_BYTES * 4096


def crc24(data: bytes, crc: int = _CRC24_INIT) -> int:
    """RFC 9580 §6.1 CRC-24 of ``data``, continuing from ``crc`` (byte by byte: for small
    data and as the reference; large data goes through :func:`armor_into`'s ``block_crc``)."""
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
    return crc & 0xFFFFFF


def _gf2_mulmod(a: int, b: int) -> int:
    """a·b mod the CRC-24 polynomial, in GF(2)[x] (a, b below x^24)."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 0x1000000:
            a ^= _CRC24_POLY
    return product


@functools.lru_cache(maxsize=8)
def _x_pow_bytes(count: int) -> int:
    """x^(8·count) mod the CRC-24 polynomial."""
    result, base, exponent = 1, 1 << 8, count
    while exponent:
        if exponent & 1:
            result = _gf2_mulmod(result, base)
        base = _gf2_mulmod(base, base)
        exponent >>= 1
    return result


def crc24_combine(crc: int, block_crc: int, length: int) -> int:
    """The CRC-24 of A followed by B, from ``crc`` (A's, any initial value) and ``block_crc``
    (B's, with the standard initial value) and B's ``length``. A CRC is linear over GF(2):
    crc(A‖B) = crc(A)·x^(8|B|) + crc0(B), where crc0(B) = crc(B) + init·x^(8|B|) (+ is XOR)."""
    shift = _x_pow_bytes(length)
    return _gf2_mulmod(crc ^ _CRC24_INIT, shift) ^ block_crc


def armor_into(
    out: Spool,
    data: bytes | Iterable[bytes],
    *,
    block_crc: Callable[[bytes], int] | None = None,
) -> None:
    """Write ``data`` (an OpenPGP message, binary: whole, or in pieces as read from a file)
    to ``out`` as ASCII armor (RFC 9580 §6.2) with CRLF line ends, as a MIME part carries it:
    the header line, a blank line, base64 in lines of 64 characters, the CRC-24 line (RFC 9580
    says new writers may leave it out; GnuPG 2.2 wants it) and the tail line. Written a block
    at a time: the armor is never held whole. ``block_crc`` computes the CRC-24 of a block
    faster than Python can (e.g. in the OpenPGP library at hand); blocks are combined with
    :func:`crc24_combine`."""
    crc = _CRC24_INIT
    out.write(b"-----BEGIN PGP MESSAGE-----\r\n\r\n")
    for block in _armor_blocks(data):
        if block_crc is None:
            crc = crc24(block, crc)
        else:
            crc = crc24_combine(crc, block_crc(block), len(block))
        with memoryview(block) as view:
            lines = [
                binascii.b2a_base64(view[i : i + _ARMOR_LINE_BYTES], newline=False)
                for i in range(0, len(view), _ARMOR_LINE_BYTES)
            ]
        lines.append(b"")
        out.write(b"\r\n".join(lines))
    checksum = base64.b64encode(crc.to_bytes(3, "big"))
    out.write(b"=" + checksum + b"\r\n-----END PGP MESSAGE-----\r\n")


def _armor_blocks(data: bytes | Iterable[bytes]) -> Iterator[bytes]:
    """``data`` in blocks of :data:`_ARMOR_BLOCK` bytes (whole armor lines), the last one
    shorter, whatever the pieces it came in."""
    if isinstance(data, bytes):
        with memoryview(data) as view:
            for start in range(0, len(view), _ARMOR_BLOCK):
                yield bytes(view[start : start + _ARMOR_BLOCK])
        return
    held = bytearray()
    for piece in data:
        held += piece
        if len(held) >= _ARMOR_BLOCK:
            cut = len(held) - len(held) % _ARMOR_BLOCK
            with memoryview(held) as view:
                for start in range(0, cut, _ARMOR_BLOCK):
                    yield bytes(view[start : start + _ARMOR_BLOCK])
            del held[:cut]
    if held:
        yield bytes(held)


# -- Looking inside OpenPGP messages -----------------------------------------------------------


_LINE = re.compile(rb"[^\n]*\n?")
#: Armor lines decoded at a time when only the first packets are wanted: 64 lines of 64
#: characters are 3 KiB of packets, enough for about a dozen RSA-4096 session keys.
_ARMOR_LINES_PER_BLOCK = 64


#: Armored output is read back from a spool this many bytes at a time for the packet check.
_ARMOR_READ = 1 << 14

#: Armored text: whole (bytes, a view of a buffer) or in pieces as read from a spool.
Armored = bytes | memoryview | Iterable[bytes]


def _lines(data: Armored) -> Iterator[bytes]:
    """The lines of ``data`` without their LF or CRLF, one at a time (only one line is ever
    copied out of a large buffer); ``data`` may come in pieces, a line across two of them."""
    pieces: Iterable[bytes | memoryview] = (
        (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    )
    rest = b""
    for piece in pieces:
        pos, size = 0, len(piece)
        while pos < size:
            match = _LINE.match(piece, pos)
            assert match is not None  # the pattern matches anywhere, if only the empty string
            pos = match.end()
            line = bytes(match.group())
            if rest:
                line, rest = rest + line, b""
            if not line.endswith(b"\n"):
                rest = line  # the end of this piece: the line goes on in the next one
                break
            yield line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if rest:
        yield rest


def _b64decode(text: bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise CryptoError(f"malformed ASCII armor: {exc}") from exc


#: Armor up to this size (a usual message) is decoded in one step, not line by line.
_ARMOR_WHOLE = 1 << 16


def _dearmored_whole(armored: bytes) -> bytes | None:
    """The packets of a small armored block (RFC 9580 §6.2: the BEGIN line, armor headers up
    to a blank line, base64 lines, an optional CRC line, the END line) decoded at once; None
    whenever it is not laid out exactly so, and the line-by-line reader then decides: this
    may only ever agree with that reader or leave the answer to it."""
    begin = armored.find(b"-----BEGIN PGP")
    # The armor lines start lines (as the line reader requires): a BEGIN or END inside a line
    # (a decoy in a preamble) is not this block's.
    if begin < 0 or (begin > 0 and armored[begin - 1] != 0x0A):
        return None
    end = armored.find(b"-----END PGP", begin)
    body_start = armored.find(b"\n", begin)
    if end < 0 or body_start < 0 or armored[end - 1] != 0x0A:
        return None
    # The armor headers end at the first blank line (CRLF or LF).
    blank = re.search(rb"\n\r?\n", armored[body_start : end + 1])
    if blank is None:
        return None
    # Only "Key: value" armor headers may come before that blank line (a whitespace-only
    # "blank" line would end the headers for the line reader, not here).
    headers = armored[body_start + 1 : body_start + blank.start() + 1].split(b"\n")
    if any(b": " not in line for line in headers if line.rstrip(b"\r")):
        return None
    text = armored[body_start + blank.end() : end]
    crc = text.rfind(b"\n=")
    if crc >= 0:
        text = text[: crc + 1]
    elif text.startswith(b"="):
        text = b""
    if re.search(rb"[^A-Za-z0-9+/=\r\n]", text):
        return None  # anything but base64 and line ends: the line reader's call
    try:
        return base64.b64decode(text.translate(None, b"\r\n"), validate=True)
    except binascii.Error:
        return None


def _dearmored(armored: Armored, lines_per_block: int) -> Iterator[bytes]:
    """The binary packets of an ASCII-armored OpenPGP block (RFC 9580 §6), decoded
    ``lines_per_block`` armor lines at a time, as they are asked for."""
    if isinstance(armored, bytes) and len(armored) <= _ARMOR_WHOLE:
        whole = _dearmored_whole(armored)
        if whole is not None:
            yield whole
            return
    lines = _lines(armored)
    if not any(ln.startswith(b"-----BEGIN PGP") for ln in lines):
        raise CryptoError("no ASCII-armored OpenPGP block found")
    for ln in lines:  # armor headers end at the first blank line
        if not ln.strip():
            break
    batch: list[bytes] = []
    rest = b""
    for ln in lines:
        if ln.startswith(b"-----END PGP") or ln.startswith(b"="):
            break
        batch.append(ln.strip())
        if len(batch) >= lines_per_block:
            text = rest + b"".join(batch)
            batch = []
            cut = len(text) - len(text) % 4  # base64 decodes 4 characters at a time
            rest = text[cut:]
            yield _b64decode(text[:cut])
    text = rest + b"".join(batch)
    if text:
        yield _b64decode(text)


def dearmor(armored: Armored) -> bytes:
    """The binary packets of an ASCII-armored OpenPGP block (RFC 9580 §6)."""
    return b"".join(_dearmored(armored, 1 << 16))


class _NeedMore(Exception):
    """Internal: the packets decoded so far end inside a packet header or body."""


def _packet_header(data: bytes, pos: int) -> tuple[int, int, int | None]:
    """(tag, body start, body length) of the packet at ``pos``, both header formats (RFC 9580
    §4.2); the length is None for a partial or indeterminate length, which only the encrypted
    data packet uses (its body is the rest of the stream)."""
    try:
        head = data[pos]
        if not head & 0x80:
            raise CryptoError("malformed OpenPGP packet header")
        if head & 0x40:  # new format
            tag = head & 0x3F
            first = data[pos + 1]
            if first < 192:
                return tag, pos + 2, first
            if first < 224:
                return tag, pos + 3, ((first - 192) << 8) + data[pos + 2] + 192
            if first == 255:
                if pos + 6 > len(data):
                    raise _NeedMore
                return tag, pos + 6, int.from_bytes(data[pos + 2 : pos + 6], "big")
            return tag, pos + 2, None
        tag = (head >> 2) & 0x0F  # old format
        ltype = head & 0x03
        if ltype == 3:
            return tag, pos + 1, None
        size = (1, 2, 4)[ltype]
        if pos + 1 + size > len(data):
            raise _NeedMore
        return tag, pos + 1 + size, int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
    except IndexError:
        raise _NeedMore from None


def encrypted_to_key_ids(armored: Armored) -> tuple[list[str], int]:
    """The key IDs in the PKESK packets, and the tag of the encrypted data packet.

    Only the first packets are decoded, a few armor lines at a time: the session keys and the
    header of the encrypted data packet, never its (possibly many megabytes of) body."""
    return _session_key_ids(_dearmored(armored, _ARMOR_LINES_PER_BLOCK))


def packet_key_ids(packets: bytes | Iterable[bytes]) -> tuple[list[str], int]:
    """:func:`encrypted_to_key_ids` of a binary OpenPGP message (whole, or in pieces as read
    from a file): the same packet walk on the bytes an engine returned, with no armor to
    decode (an engine's binary output is checked before it is armored)."""
    if isinstance(packets, bytes | bytearray | memoryview):
        return _session_key_ids(iter((bytes(packets),)))
    return _session_key_ids(iter(packets))


#: Packets that may come before the encrypted data (RFC 9580 §10.3): session keys (1; 3, a
#: passphrase's, is refused on its own), the marker (10) and padding (21).
_BEFORE_DATA = frozenset({1, 3, 10, 21})


def _session_key_ids(blocks: Iterator[bytes]) -> tuple[list[str], int]:
    """The packet walk of :func:`encrypted_to_key_ids` over binary ``blocks``, read only as
    far as the header of the encrypted data packet."""
    data = b""
    pos = 0
    key_ids: list[str] = []
    while True:
        try:
            if pos >= len(data):
                raise _NeedMore
            tag, start, length = _packet_header(data, pos)
            if tag in (9, 18, 20):
                return key_ids, tag
            if tag == 3:  # symmetric-key session key: we never ask for one
                raise CryptoError("output contains a passphrase-encrypted session key")
            if tag not in _BEFORE_DATA:
                # Nothing readable may come before the encrypted data (a literal or
                # compressed packet there would travel in clear beside it).
                raise CryptoError(
                    f"unexpected OpenPGP packet (tag {tag}) before the encrypted data"
                )
            if length is None:
                break
            if start + length > len(data):
                raise _NeedMore
        except _NeedMore:
            more = next(blocks, b"")
            if not more:
                break
            data += more
            continue
        body = data[start : start + length]
        pos = start + length
        if tag != 1:  # public-key encrypted session key
            continue
        version = body[0] if body else None
        if version == 3:
            key_ids.append(body[1:9].hex().upper())
        elif version == 6:
            # v6 PKESK: a key version and fingerprint follow (RFC 9580 §5.1.1)
            if len(body) < 2 or body[1] < 1 or len(body) < 2 + body[1]:
                raise CryptoError("truncated v6 PKESK packet")
            size = body[1]
            key_ids.append(body[3 : 2 + size].hex().upper()[-16:])
        else:
            raise CryptoError(f"unexpected PKESK version {version}")
    raise CryptoError("no encrypted data packet in gpg's output")


def _check_encrypted(armored: Armored, subkeys: Sequence[str]) -> None:
    """Integrity-protected data, and one session key for each chosen subkey and no other."""
    check_session_keys(*encrypted_to_key_ids(armored), subkeys, producer="gpg")


def check_session_keys(
    key_ids: Sequence[str], data_tag: int, subkeys: Sequence[str], *, producer: str
) -> None:
    """What an engine's output must be (``key_ids``, ``data_tag``: from
    :func:`encrypted_to_key_ids`): integrity-protected data, never the legacy SED packet
    (EFAIL), and one session key for each chosen subkey and no other (Bcc privacy, standards
    item 21). ``producer`` names the engine in the error."""
    if data_tag == 9:
        raise CryptoError(
            f"{producer} produced a message without integrity protection (SED packet); refusing it"
        )
    expected = sorted(fpr[-16:].upper() for fpr in subkeys)
    if sorted(key_ids) != expected:
        raise CryptoError(
            f"{producer} encrypted to an unexpected set of keys ({', '.join(key_ids)}), "
            f"not exactly {', '.join(expected)}"
        )
