"""The OpenPGP certificate store: public certificates in the shared certificate directory, secret
keys passphrase-protected beside it. No gpg process anywhere.

Public certificates follow the OpenPGP certificate directory layout that Sequoia's ``sq`` and
other tools share (draft-nwjw-openpgp-cert-d): ``HOME/pgp.cert.d/<first two hex digits of the
fingerprint>/<the other 38>``, lower case, one binary certificate per file and never any secret
key material (cert-d §3). A certificate inserted again is *merged* with what is there (Sequoia's
``Cert.merge``: a new revocation, user ID or subkey is added, nothing is lost), under the
store's ``writelock`` file (cert-d §4, an exclusive ``flock``), and written to a temporary file
in the same folder that is then renamed over the old one, so a reader sees the old or the new
certificate, never half of one.

Secret keys live in ``HOME/secret/<FINGERPRINT>.pgp``: one transferable secret key per primary
key (binary), as it was generated or imported, its secret key material protected with OpenPGP's
own passphrase protection (RFC 9580 §3.7.2.1, S2K usage 254). pysequoia can generate keys and
unlock protected ones but has no call that protects one, so :func:`protect` does that step:
iterated and salted SHA-256 S2K (RFC 9580 §3.7.1.3), AES-256 in CFB mode over the secret MPIs
and their SHA-1 check hash (§5.5.3), exactly what gpg 2.2 writes, and what Sequoia and gpg read
back. Folders are 0700 and files 0600 through :mod:`e2email.private`.

Freshness: each file's (inode, mtime, size) is its tag (cert-d §3.3); the keystore re-reads
only certificates whose tag changed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2email.errors import KeystoreError
from e2email.private import check_private, ensure_private_dir

__all__ = [
    "CERT_DIR",
    "SECRET_DIR",
    "CertDirectory",
    "SecretKeys",
    "Tag",
    "is_protected",
    "protect",
    "secret_fingerprints",
]

#: The folder names inside an e2email home.
CERT_DIR = "pgp.cert.d"
SECRET_DIR = "secret"

#: (st_ino, st_mtime_ns, st_size) of a file: the cert-d "tag" of a certificate.
Tag = tuple[int, int, int]

_HEX = frozenset("0123456789abcdef")
#: S2K count byte 0xE0: 16 MiB hashed per derivation (RFC 9580 §3.7.1.3), about what gpg-agent
#: calibrates to on a current machine (tens of milliseconds), paid once per unlock.
_S2K_COUNT = 0xE0


def _sq() -> Any:
    try:
        import pysequoia
    except ImportError as exc:  # a core dependency; said plainly if it is missing anyway
        raise KeystoreError(f"the certificate store needs pysequoia: {exc}") from exc
    return pysequoia


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _tag_of(path: Path) -> Tag | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` (0600) through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never a torn one (cert-d §4)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename into ``folder`` durable (POSIX: the directory entry is written when the
    folder is synced); not possible, nor needed, on Windows."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder: the rename stands as it is
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive lock on the open file ``fd``, waiting for it (flock, as ``sq`` takes it;
    a byte-range lock on Windows, which has no flock)."""
    if sys.platform == "win32":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)


@dataclass(frozen=True)
class CertDirectory:
    """An OpenPGP certificate directory (draft-nwjw-openpgp-cert-d)."""

    root: Path

    def path_for(self, fingerprint: str) -> Path:
        fpr = fingerprint.replace(" ", "").lower()
        if len(fpr) != 40 or not set(fpr) <= _HEX:
            raise KeystoreError(f"not a v4 OpenPGP fingerprint: {fingerprint!r}")
        return self.root / fpr[:2] / fpr[2:]

    def exists(self) -> bool:
        return self.root.is_dir()

    def ensure(self) -> None:
        ensure_private_dir(self.root, what="certificate directory")

    def fingerprints(self) -> Iterator[tuple[str, Path]]:
        """(upper-case fingerprint, path) of every certificate; other files (``writelock``,
        ``trust-root``, temporary files) are not certificates and are skipped."""
        try:
            folders = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise KeystoreError(f"cannot read {self.root}: {exc.strerror or exc}") from exc
        for folder in folders:
            if len(folder.name) != 2 or not set(folder.name) <= _HEX or not folder.is_dir():
                continue
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                if len(entry.name) == 38 and set(entry.name) <= _HEX and entry.is_file():
                    yield (folder.name + entry.name).upper(), Path(entry.path)

    def tags(self) -> dict[str, Tag]:
        found = {}
        for fpr, path in self.fingerprints():
            tag = _tag_of(path)
            if tag is not None:
                found[fpr] = tag
        return found

    def get(self, fingerprint: str) -> bytes | None:
        path = self.path_for(fingerprint)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeystoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The store's write lock (cert-d §4: ``writelock``, an exclusive advisory lock)."""
        self.ensure()
        lock = self.root / "writelock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            _lock(fd)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def insert(self, cert: Any) -> tuple[bytes | None, bytes]:
        """Merge ``cert`` (a pysequoia Cert) into the store; (old bytes or None, new bytes).
        Only public parts are written (cert-d §3: no secret key material)."""
        sq = _sq()
        fpr = str(cert.fingerprint).upper()
        path = self.path_for(fpr)
        with self.locked():
            old = self.get(fpr)
            merged = cert
            if old is not None:
                try:
                    merged = sq.Cert.from_bytes(old).merge(cert)
                except (RuntimeError, ValueError) as exc:
                    raise KeystoreError(
                        f"cannot merge certificate {fpr}: {_first_line(exc)}"
                    ) from exc
            new = bytes(merged)  # a Cert serialises without secrets
            if new != old:
                ensure_private_dir(path.parent, what="certificate directory")
                _write_atomic(path, new)
        return old, new


@dataclass(frozen=True)
class SecretKeys:
    """Secret keys, one protected transferable secret key per file (``<FPR>.pgp``)."""

    root: Path

    def path_for(self, fingerprint: str) -> Path:
        fpr = fingerprint.replace(" ", "").upper()
        if len(fpr) != 40 or not set(fpr.lower()) <= _HEX:
            raise KeystoreError(f"not a v4 OpenPGP fingerprint: {fingerprint!r}")
        return self.root / f"{fpr}.pgp"

    def fingerprints(self) -> set[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise KeystoreError(f"cannot read {self.root}: {exc.strerror or exc}") from exc
        return {n[:-4] for n in names if n.endswith(".pgp") and len(n) == 44}

    def tag(self, fingerprint: str) -> Tag | None:
        return _tag_of(self.path_for(fingerprint))

    def get(self, fingerprint: str) -> bytes | None:
        path = self.path_for(fingerprint)
        if not path.exists():
            return None
        # Whoever may write the file can swap the key: refused as a loose GnuPG home is.
        check_private(path, what="secret key file")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeystoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def put(self, fingerprint: str, data: bytes) -> None:
        ensure_private_dir(self.root, what="secret key folder")
        _write_atomic(self.path_for(fingerprint), data)


# -- Passphrase protection of secret keys (RFC 9580 §3.7, §5.5.3) --------------------------


def _secret_parts(tsk_bytes: bytes) -> list[tuple[Any, bytes]]:
    """(packet, public body) for every packet of a transferable secret key; the public body
    is the packet's own for public packets, the public key part for secret key packets."""
    sq = _sq()
    from pysequoia.packet import PacketPile, Tag

    packets = list(PacketPile.from_bytes(tsk_bytes))
    cert = sq.Cert.from_bytes(tsk_bytes)
    public = {
        (p.fingerprint or "").upper(): bytes(p.body)
        for p in PacketPile.from_bytes(bytes(cert))
        if p.tag in (Tag.PublicKey, Tag.PublicSubkey)
    }
    out = []
    for p in packets:
        if p.tag in (Tag.SecretKey, Tag.SecretSubkey):
            out.append((p, public[(p.fingerprint or "").upper()]))
        else:
            out.append((p, b""))
    return out


def is_protected(tsk_bytes: bytes) -> bool:
    """Whether every secret key packet of ``tsk_bytes`` is passphrase-protected (S2K usage
    not 0, RFC 9580 §5.5.3). A key stub (gpg's "secret on a card") counts as protected."""
    from pysequoia.packet import Tag

    for packet, pub in _secret_parts(tsk_bytes):
        if packet.tag in (Tag.SecretKey, Tag.SecretSubkey):
            body = bytes(packet.body)
            if body[len(pub)] == 0:
                return False
    return True


def secret_fingerprints(tsk_bytes: bytes) -> set[str]:
    """Upper-case fingerprints of the (sub)keys whose secret key material ``tsk_bytes``
    really holds: a GnuPG stub (S2K usage 254/255 with S2K type 101, "gnu-dummy" or a key on
    a smartcard) holds none, as gpg lists it without its '+'."""
    from pysequoia.packet import Tag

    try:
        parts = _secret_parts(tsk_bytes)
    except (RuntimeError, ValueError, KeyError):
        return set()
    found = set()
    for packet, pub in parts:
        if packet.tag not in (Tag.SecretKey, Tag.SecretSubkey) or not packet.fingerprint:
            continue
        body = bytes(packet.body)
        usage = body[len(pub)] if len(body) > len(pub) else 0
        if usage in (254, 255) and len(body) > len(pub) + 2 and body[len(pub) + 2] == 101:
            continue
        found.add(str(packet.fingerprint).upper())
    return found


def _s2k(passphrase: bytes, salt: bytes, count_byte: int) -> bytes:
    """Iterated and salted S2K with SHA-256 (RFC 9580 §3.7.1.3): 32 bytes, an AES-256 key."""
    count = (16 + (count_byte & 15)) << ((count_byte >> 4) + 6)
    data = salt + passphrase
    count = max(count, len(data))
    h = hashlib.sha256()
    block = data * (65536 // len(data) + 1)
    full, rest = divmod(count, len(block))
    for _ in range(full):
        h.update(block)
    h.update(block[:rest])
    return h.digest()


def _packet(tag: int, body: bytes) -> bytes:
    """An OpenPGP packet in the new format (RFC 9580 §4.2.1)."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n -= 192
        length = bytes([(n >> 8) + 192, n & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def protect(tsk_bytes: bytes, passphrase: str) -> bytes:
    """``tsk_bytes`` with every unprotected v4 secret key packet protected by ``passphrase``
    (S2K usage 254, AES-256, iterated+salted SHA-256; RFC 9580 §5.5.3). Checked by unlocking
    the result with pysequoia before it is returned."""
    sq = _sq()
    # `cryptography` here, not at the top: about 10 MB, needed only to protect a key.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from pysequoia.packet import PacketPile, Tag

    try:  # cryptography >= 47 keeps CFB with the decrepit modes; OpenPGP's secret keys use it
        from cryptography.hazmat.decrepit.ciphers.modes import CFB
    except ImportError:  # pragma: no cover - older cryptography
        from cryptography.hazmat.primitives.ciphers.modes import CFB

    if not passphrase:
        raise KeystoreError("an empty passphrase protects nothing")
    out = []
    for packet, pub in _secret_parts(tsk_bytes):
        if packet.tag not in (Tag.SecretKey, Tag.SecretSubkey):
            out.append(packet)
            continue
        body = bytes(packet.body)
        if body[0] != 4:
            raise KeystoreError("only version 4 secret keys can be protected here")
        rest = body[len(pub) :]
        if rest[0] != 0:  # protected already (or a stub): kept as it is
            out.append(packet)
            continue
        mpis, checksum = rest[1:-2], rest[-2:]
        if sum(mpis) & 0xFFFF != int.from_bytes(checksum, "big"):
            raise KeystoreError("a secret key packet is damaged (bad checksum)")
        salt, iv = secrets.token_bytes(8), secrets.token_bytes(16)
        key = _s2k(passphrase.encode("utf-8"), salt, _S2K_COUNT)
        enc = Cipher(algorithms.AES(key), CFB(iv)).encryptor()
        sealed = enc.update(mpis + hashlib.sha1(mpis).digest()) + enc.finalize()  # noqa: S324 - RFC 9580 §5.5.3's check hash
        new_body = pub + bytes([254, 9, 3, 8]) + salt + bytes([_S2K_COUNT]) + iv + sealed
        tag = 5 if packet.tag == Tag.SecretKey else 7
        out.extend(PacketPile.from_bytes(_packet(tag, new_body)))
    try:
        tsk = sq.Tsk.from_packets(out)
        tsk.signer(passphrase) if _can_sign(tsk) else tsk.decryptor(passphrase)
    except (RuntimeError, ValueError) as exc:
        raise KeystoreError(f"protecting the secret key failed: {_first_line(exc)}") from exc
    return bytes(tsk)


def _can_sign(tsk: Any) -> bool:
    try:
        tsk.signer(None)
    except (RuntimeError, ValueError) as exc:
        return "encrypted" in _first_line(exc)
    return True


# -- Key generation with gpg-compatible self-signatures --------------------------------------


def _mpis(data: bytes, count: int) -> tuple[list[int], bytes]:
    """``count`` MPIs (RFC 9580 §3.2) from the start of ``data``, and what follows."""
    values = []
    pos = 0
    for _ in range(count):
        bits = int.from_bytes(data[pos : pos + 2], "big")
        size = (bits + 7) // 8
        values.append(int.from_bytes(data[pos + 2 : pos + 2 + size], "big"))
        pos += 2 + size
    return values, data[pos:]


def _mpi(value: int) -> bytes:
    return value.bit_length().to_bytes(2, "big") + value.to_bytes(
        (value.bit_length() + 7) // 8, "big"
    )


def _subpacket(kind: int, data: bytes) -> bytes:
    return bytes([len(data) + 1, kind]) + data  # every one here is shorter than 191 bytes


def _signer_for(algorithm: int, secret: bytes) -> Any:
    """A function signing a digest with the primary key's secret (unprotected, v4 layout):
    EdDSA (22) with the 32-byte seed, RSA (1) with d, p, q (u is recomputed)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if secret[0] != 0:
        raise KeystoreError("a freshly generated key is protected already")
    if algorithm == 22:
        (seed,), _ = _mpis(secret[1:], 1)
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big"))

        def eddsa(digest: bytes) -> bytes:
            sig = key.sign(digest)  # legacy EdDSA signs the digest itself (RFC 9580 §5.2.3.3)
            return _mpi(int.from_bytes(sig[:32], "big")) + _mpi(int.from_bytes(sig[32:], "big"))

        return eddsa
    if algorithm == 1:
        return functools.partial(_rsa_sign, secret, rsa, padding, hashes, Prehashed)
    raise KeystoreError(f"cannot sign with public-key algorithm {algorithm}")


def _rsa_sign(
    secret: bytes, rsa: Any, padding: Any, hashes: Any, prehashed: Any, public: bytes, digest: bytes
) -> bytes:
    (n, e), _ = _mpis(public[6:], 2)
    (d, p, q, _u), _ = _mpis(secret[1:], 4)
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, n),
    )
    key = numbers.private_key()
    return _mpi(
        int.from_bytes(key.sign(digest, padding.PKCS1v15(), prehashed(hashes.SHA512())), "big")
    )


def _self_signature(
    sign: Any,
    algorithm: int,
    fingerprint: bytes,
    prefix: bytes,
    sig_type: int,
    subpackets: bytes,
) -> bytes:
    """A v4 self-signature (RFC 9580 §5.2.4) with SHA-512 over ``prefix`` (the key, then the
    user ID or subkey it binds) and the hashed subpackets given plus creation time and issuer
    fingerprint."""
    created = _subpacket(2, int(time.time()).to_bytes(4, "big"))
    hashed = created + subpackets + _subpacket(33, b"\x04" + fingerprint)
    head = bytes([4, sig_type, algorithm, 10]) + len(hashed).to_bytes(2, "big") + hashed
    trailer = b"\x04\xff" + len(head).to_bytes(4, "big")
    digest = hashlib.sha512(prefix + head + trailer).digest()
    unhashed = _subpacket(16, fingerprint[-8:])
    signature: bytes = sign(digest)
    return head + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2] + signature


def generate_key(user_id: str, *, suite: str, validity_seconds: int | None) -> bytes:
    """A new unprotected v4 transferable secret key: a certification and signing primary key
    and an encryption subkey, as gpg makes them, with self-signatures that advertise only what
    GnuPG 2.2 reads (Features: SEIPD v1 only, RFC 9580 §5.2.3.32).

    The key material comes from Sequoia (``Tsk.generate``, "cv25519" / "rsa3k" / "rsa4k");
    the self-signatures are made here because Sequoia's own advertise SEIPD v2, so that any
    Sequoia-based sender (e2email's own engine among them) would encrypt to the key in a form
    GnuPG, the most common reader, cannot decrypt. Checked before it is returned: Sequoia
    reads it, encrypts to exactly its subkey and signs with its primary key."""
    sq = _sq()
    from pysequoia.packet import PacketPile, Tag

    suites = {"cv25519": "Cv25519", "rsa3k": "RSA3k", "rsa4k": "RSA4k"}
    made = sq.Tsk.generate(
        user_id, profile=sq.Profile.RFC4880, cipher_suite=getattr(sq.CipherSuite, suites[suite])
    )
    packets = list(PacketPile.from_bytes(bytes(made)))
    public = {
        (p.fingerprint or "").upper(): bytes(p.body)
        for p in PacketPile.from_bytes(bytes(made.extract_certificate()))
        if p.tag in (Tag.PublicKey, Tag.PublicSubkey)
    }
    primary = packets[0]
    encryption = None
    for i, packet in enumerate(packets):
        following = packets[i + 1] if i + 1 < len(packets) else None
        if packet.tag == Tag.SecretSubkey and "encryption" in str(
            getattr(following, "key_flags", "")
        ):
            encryption = packet
    if primary.tag != Tag.SecretKey or encryption is None:
        raise KeystoreError("key generation gave no primary key and encryption subkey")
    p_fpr = (primary.fingerprint or "").upper()
    s_fpr = (encryption.fingerprint or "").upper()
    p_pub, s_pub = public[p_fpr], public[s_fpr]
    p_body = bytes(primary.body)
    algorithm = p_pub[5]
    sign = _signer_for(algorithm, p_body[len(p_pub) :])
    if algorithm == 1:
        sign = functools.partial(sign, p_pub)
    fpr = bytes.fromhex(p_fpr)
    expiry = (
        _subpacket(9, validity_seconds.to_bytes(4, "big")) if validity_seconds is not None else b""
    )
    uid = user_id.encode("utf-8")
    key_prefix = b"\x99" + len(p_pub).to_bytes(2, "big") + p_pub
    certification = _self_signature(
        sign,
        algorithm,
        fpr,
        key_prefix + b"\xb4" + len(uid).to_bytes(4, "big") + uid,
        0x13,
        _subpacket(27, b"\x03")  # certify and sign
        + expiry
        + _subpacket(11, bytes([9, 8, 7]))  # AES-256, AES-192, AES-128
        + _subpacket(21, bytes([10, 8]))  # SHA-512, SHA-256
        + _subpacket(22, bytes([0]))  # uncompressed (e2email never compresses)
        + _subpacket(30, b"\x01")  # SEIPD v1 only: what GnuPG 2.2 and 2.4 decrypt
        + _subpacket(25, b"\x01"),  # the primary user ID
    )
    binding = _self_signature(
        sign,
        algorithm,
        fpr,
        key_prefix + b"\x99" + len(s_pub).to_bytes(2, "big") + s_pub,
        0x18,
        _subpacket(27, b"\x0c") + expiry,  # encrypt communications and storage
    )
    raw = (
        _packet(5, p_body)
        + _packet(13, uid)
        + _packet(2, certification)
        + _packet(7, bytes(encryption.body))
        + _packet(2, binding)
    )
    try:
        tsk = sq.Tsk.from_bytes(raw)
        tsk.signer(None)
        sq.encrypt(b"", [tsk.extract_certificate()], armor=False)
    except (RuntimeError, ValueError) as exc:
        raise KeystoreError(f"the generated key does not check: {_first_line(exc)}") from exc
    return raw
