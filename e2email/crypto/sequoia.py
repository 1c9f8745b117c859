"""The in-process OpenPGP engine: PGP/MIME (RFC 3156) through Sequoia (``pysequoia``).

The same output contract as the GnuPG engine (:mod:`e2email.crypto.gpg`): ``multipart/signed``
with ``micalg`` read from the signature packet really made (§5), ``multipart/encrypted`` with
one signed-and-encrypted OpenPGP message (§6.2), RFC 9788 header protection through
:mod:`e2email.message`'s payload and head, one copy for To and Cc and one per Bcc recipient,
and a packet check of who each copy is encrypted to. What changes is where the cryptography
runs: in this process, with no gpg process and no agent per copy (issue 9: the process tax
was ~97% of the time of a 4 KB signed and encrypted message).

Keys. In this first slice the keys come from the same :class:`~e2email.keystore.Keystore` as
the GnuPG engine's, and are judged by it, exactly as for that engine (expiry, revocation, RSA
below 2048 bits, SHA-1 self-signatures, a live encryption-capable subkey): the judgment is
e2email's, made before pysequoia is called. That matters because pysequoia's ``encrypt()``
falls back to an *expired* subkey when a certificate has no live one, and picks every live
encryption subkey it finds, and ``Tsk.signer()`` the first signing key with a secret. So each
certificate handed to pysequoia is cut down to the one (sub)key the keystore chose: the
primary key, the user IDs and their signatures, and that subkey with its binding
signatures; the secret key keeps only that subkey's secret. pysequoia then has exactly one
choice, and the packet check proves it made that one.

The certificates and secret keys are exported from gpg once per key (and per chosen subkey
and its expiry) and kept with the keystore, so a bulk run pays the export once, not per
message. A passphrase-protected secret key stays protected in that cache: every message
unlocks it with the passphrase it was given (a wrong one is never hidden by an earlier right
one), and only while gpg's secret-key file is the one it came from (a key re-imported under a
new passphrase is exported anew). Export runs gpg in loopback mode with the passphrase on
stdin, so no pinentry is ever started.

Keys gpg can use and Sequoia cannot (a secret on a smartcard, DSA/ElGamal, brainpool or
secp256k1 keys, an RSA primary that encrypts beside the chosen subkey) are found before
anything is encrypted: with ``engine=AUTO`` ("the best engine available for this message")
such a message is made by the GnuPG engine, with one warning; with ``engine=SEQUOIA`` the
error names each key and says ``--engine gpg``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import select
import signal
import subprocess
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from e2email import feed as _feed
from e2email.config import OpenPGPEngine, Protection
from e2email.crypto.base import (
    CopyKind,
    ProtectedCopy,
    Protector,
    Resolved,
    copy_plans,
    make_copy,
    plain_copy,
)
from e2email.crypto.openpgp import (
    _ARMOR_WHOLE,
    Armored,
    armor_into,
    check_session_keys,
    encrypted_entity_head,
    encrypted_to_key_ids,
    packet_key_ids,
    signed_entity,
    signed_entity_into,
)
from e2email.discovery.autocrypt import autocrypt_fields
from e2email.errors import (
    CryptoError,
    KeyProblem,
    KeyReason,
    PassphraseError,
    RecipientKeyError,
    SignerKeyError,
)
from e2email.message import (
    HP,
    Message,
    PayloadStream,
    build_payload,
    message_head,
    new_boundary,
    stream_payload,
)
from e2email.spool import MEMORY_MAX, READ_CHUNK, Spool, open_spool_file, spool_dir

if TYPE_CHECKING:
    from e2email.crypto.gpg import GpgProtector
    from e2email.keystore import Keystore, OpenPGPKey, SubKey

__all__ = ["SequoiaProtector", "available", "raw_sign_encrypt"]

log = logging.getLogger(__name__)

#: What a user can do about a key this engine cannot use.
_USE_GPG = "use --engine gpg"


@functools.cache
def available() -> bool:
    """Whether pysequoia can be imported (the ``e2email[sequoia]`` extra is installed)."""
    try:
        import pysequoia  # noqa: F401
    except ImportError:
        return False
    return True


def _sq() -> Any:
    """The pysequoia module, or a CryptoError saying how to get it."""
    try:
        import pysequoia
    except ImportError as exc:
        raise CryptoError(
            "the in-process OpenPGP engine needs pysequoia: pip install 'e2email[sequoia]' "
            "(or use --engine gpg)"
        ) from exc
    return pysequoia


def _first_line(exc: BaseException) -> str:
    # pysequoia's errors carry a Rust backtrace after the first line when RUST_BACKTRACE is
    # set: a user needs only the reason.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


#: pysequoia's HashAlgorithm names -> RFC 3156 §5 micalg names (lower case); weak ones absent.
_MICALG = {
    "SHA256": "pgp-sha256",
    "SHA384": "pgp-sha384",
    "SHA512": "pgp-sha512",
    "SHA224": "pgp-sha224",
    "SHA3_256": "pgp-sha3-256",
    "SHA3_512": "pgp-sha3-512",
}


def _crlf(data: bytes) -> bytes:
    """Sequoia armors with LF line ends; a MIME part carries CRLF (RFC 5322 §2.1). The
    armor of a large message is tens of megabytes: one copy when it has no CR (always, from
    Sequoia), the general conversion otherwise."""
    if b"\r" not in data and data.endswith(b"\n") and not data.endswith(b"\n\n"):
        return data.replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"


# -- Cutting certificates down to the chosen key ---------------------------------------------


def _reduced(
    packets: Sequence[Any], keep: str, *, public: dict[str, Any] | None = None
) -> list[Any]:
    """The packets of a certificate with only the primary key and the (sub)key ``keep``
    (upper-case fingerprint): other subkeys and their binding signatures are dropped. With
    ``public`` (fingerprint -> public key packet), every secret key packet but ``keep``'s is
    replaced by its public packet, so that ``keep`` is the only key with a secret."""
    from pysequoia.packet import Tag

    out: list[Any] = []
    skipping = False
    for packet in packets:
        tag = packet.tag
        if tag in (Tag.PublicSubkey, Tag.SecretSubkey):
            skipping = (packet.fingerprint or "").upper() != keep
        elif tag in (Tag.PublicKey, Tag.SecretKey, Tag.UserID, Tag.UserAttribute):
            skipping = False
        if skipping:
            continue
        if public is not None and tag in (Tag.SecretKey, Tag.SecretSubkey):
            fpr = (packet.fingerprint or "").upper()
            if fpr != keep:
                packet = public[fpr]
        out.append(packet)
    return out


#: (st_ino, st_mtime_ns, st_size) of a secret-key file, None when there is none.
_Stamp = tuple[int, int, int] | None


@dataclass
class _KeyCache:
    """Certificates and secret keys exported from one keystore's gpg, cut down for pysequoia.
    Keyed by (primary, chosen subkey, their expiry): a new subkey or new expiry is exported
    anew; revocation is judged by the keystore before the cache is asked."""

    certs: dict[tuple[object, ...], Any] = field(default_factory=dict)
    #: Secret keys and signers are kept with the identity of gpg's secret-key file they came
    #: from (:meth:`_Keys._stamp`): a key deleted and re-imported (say under a new passphrase,
    #: or now protected) is a new file, and whatever was kept from the old one is dropped.
    secrets: dict[tuple[object, ...], tuple[_Stamp, Any]] = field(default_factory=dict)
    #: Signers of keys that need no passphrase (see _Keys._open).
    open_signers: dict[tuple[object, ...], tuple[_Stamp, Any]] = field(default_factory=dict)
    #: Recipient cache key -> why Sequoia cannot encrypt to it ("" when it can).
    unusable: dict[tuple[object, ...], str] = field(default_factory=dict)
    #: Subkey fingerprint -> keygrip (the name of its file in private-keys-v1.d).
    grips: dict[str, str | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


#: One cache per keystore object, gone with it.
_CACHES: weakref.WeakKeyDictionary[Keystore, _KeyCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def _cache_for(keystore: Keystore) -> _KeyCache:
    with _CACHES_LOCK:
        cache = _CACHES.get(keystore)
        if cache is None:
            cache = _CACHES[keystore] = _KeyCache()
        return cache


def _cache_key(key: OpenPGPKey, sub: SubKey) -> tuple[object, ...]:
    return (key.fingerprint, sub.fingerprint, key.primary.expires, sub.expires)


def _signer_problem(key: OpenPGPKey, reason: KeyReason, detail: str) -> SignerKeyError:
    return SignerKeyError(
        KeyProblem(
            key.addresses[0] if key.addresses else key.fingerprint,
            reason,
            detail,
            fingerprint=key.fingerprint,
        )
    )


class _Keys:
    """pysequoia objects for the keys a keystore chose: from a certificate store read directly
    (certificates, and secret keys as stored, still protected), from a GnuPG home exported
    by gpg."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self.cache = _cache_for(keystore)

    def recipient(self, key: OpenPGPKey) -> tuple[Any, str]:
        """The certificate to encrypt to, holding only the subkey the keystore chose, and
        that subkey's fingerprint."""
        sub = key.encryption_subkey()
        if sub is None:  # the keystore's resolution refuses such keys first
            raise CryptoError(f"key {key.fingerprint} has no usable encryption subkey")
        ident = _cache_key(key, sub)
        with self.cache.lock:
            cert = self.cache.certs.get(ident)
        if cert is None:
            sq = _sq()
            from pysequoia.packet import PacketPile

            try:
                data = self.keystore.export(key.fingerprint, armor=False)
                cert = sq.Cert.from_packets(
                    _reduced(list(PacketPile.from_bytes(data)), sub.fingerprint)
                )
            except (RuntimeError, ValueError) as exc:
                raise CryptoError(
                    f"cannot read certificate {key.fingerprint}: {_first_line(exc)}"
                ) from exc
            with self.cache.lock:
                self.cache.certs[ident] = cert
        return cert, sub.fingerprint

    def unusable(self, key: OpenPGPKey) -> str:
        """Why Sequoia cannot encrypt to exactly the subkey the keystore chose ("" when it
        can): keys gpg accepts but Sequoia does not (DSA/ElGamal, brainpool, secp256k1: "no
        suitable encryption subkey"), or whose primary can encrypt too (pysequoia would also
        encrypt to it, and the packet check would refuse the copy). A trial encryption of
        nothing, once per key."""
        sub = key.encryption_subkey()
        if sub is None:
            return "no usable encryption subkey"
        ident = _cache_key(key, sub)
        with self.cache.lock:
            known = self.cache.unusable.get(ident)
        if known is not None:
            return known
        why = ""
        try:
            cert, fpr = self.recipient(key)
            _check_binary(bytes(_sq().encrypt(b"", [cert], armor=False)), [fpr])
        except (RuntimeError, ValueError) as exc:
            why = _first_line(exc)
        except CryptoError as exc:
            why = str(exc)
        if why:
            why = (
                f"the in-process engine cannot encrypt to {sub.algorithm} subkey "
                f"{sub.key_id} ({why})"
            )
        with self.cache.lock:
            self.cache.unusable[ident] = why
        return why

    def signer(self, key: OpenPGPKey, passphrase: str | None) -> Any:
        """A pysequoia signer for exactly the signing (sub)key the keystore chose, unlocked
        with ``passphrase`` (PassphraseError when it needs one and got none, or a wrong one)."""
        sub = key.signing_subkey()
        if sub is None:
            reason, detail = key.signing_problem() or (KeyReason.NO_SIGNING_KEY, "")
            raise _signer_problem(key, reason, detail)
        ident = _cache_key(key, sub)
        # One stat per message: what was kept is used only while gpg's secret-key file is the
        # one it came from.
        stamp = self._stamp(key, sub)
        with self.cache.lock:
            ready = self.cache.open_signers.get(ident)
            kept = self.cache.secrets.get(ident)
            if ready is not None and ready[0] != stamp:
                del self.cache.open_signers[ident]
                ready = None
            if kept is not None and kept[0] != stamp:
                del self.cache.secrets[ident]
                kept = None
        if ready is not None:
            return ready[1]
        if kept is not None:
            try:
                return self._unlock(key, sub, ident, stamp, kept[1], passphrase)
            except PassphraseError:
                # A file with the same identity but another passphrase (or a stat that could
                # not tell): ask gpg once more before saying the passphrase is wrong.
                with self.cache.lock:
                    self.cache.secrets.pop(ident, None)
        tsk = self._export_secret(key, sub, passphrase, stamp)
        with self.cache.lock:
            self.cache.secrets[ident] = (stamp, tsk)
        return self._unlock(key, sub, ident, stamp, tsk, passphrase)

    def _unlock(
        self,
        key: OpenPGPKey,
        sub: SubKey,
        ident: tuple[object, ...],
        stamp: _Stamp,
        tsk: Any,
        passphrase: str | None,
    ) -> Any:
        if passphrase is None:
            try:
                return self._open(ident, stamp, tsk.signer(None))
            except (RuntimeError, ValueError) as exc:
                failure: BaseException = exc
        else:
            try:
                return tsk.signer(passphrase)
            except (RuntimeError, ValueError) as exc:
                failure = exc
            # The same call without one tells an unprotected key (a passphrase given for the
            # run is then not needed, as with gpg) from a wrong passphrase.
            try:
                return self._open(ident, stamp, tsk.signer(None))
            except (RuntimeError, ValueError) as exc:
                if "encrypted" in _first_line(exc):
                    raise PassphraseError(
                        f"wrong passphrase for key {key.fingerprint}",
                        fingerprint=key.fingerprint,
                    ) from None
        if passphrase is None and "encrypted" in _first_line(failure):
            raise PassphraseError(
                f"key {key.fingerprint} is protected by a passphrase and none was given",
                fingerprint=key.fingerprint,
                missing=True,
            ) from None
        raise _signer_problem(
            key,
            KeyReason.BACKEND,
            f"the in-process engine cannot sign with {sub.algorithm} key {sub.key_id} "
            f"({_first_line(failure)}): a key on a smartcard or of an algorithm Sequoia "
            f"cannot use; {_USE_GPG}",
        ) from failure

    def _open(self, ident: tuple[object, ...], stamp: _Stamp, signer: Any) -> Any:
        """Keep the signer of a key that has no passphrase: it unlocks nothing, so keeping it
        hides nothing, and a bulk run does not unpack the key per message. A protected key's
        signer is never kept: each message's passphrase must unlock it."""
        with self.cache.lock:
            self.cache.open_signers[ident] = (stamp, signer)
        return signer

    def _gpg(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        """gpg on the keystore's home, never asking anyone: batch, no tty, and any passphrase
        through loopback on stdin, so gpg-agent never starts a pinentry (openpgp._COMMON_ARGS
        does the same for the GnuPG engine)."""
        self.keystore.gpg  # noqa: B018 - ensures the home exists
        cmd = [
            self.keystore.gpg_binary,
            "--homedir",
            str(self.keystore.gnupg_home),
            "--no-options",
            "--batch",
            "--no-tty",
            *args,
        ]
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CryptoError(f"cannot run {self.keystore.gpg_binary}: {exc}") from exc

    def _keygrip(self, sub: SubKey) -> str | None:
        """The keygrip of ``sub`` (gpg names its secret-key file after it), asked once."""
        fpr = sub.fingerprint.upper()
        with self.cache.lock:
            if fpr in self.cache.grips:
                return self.cache.grips[fpr]
        done = self._gpg("--with-colons", "--fixed-list-mode", "--with-keygrip", "--list-keys", fpr)
        grip = None
        current = None
        for line in done.stdout.decode("utf-8", errors="replace").splitlines():
            fields = line.split(":")
            if fields[0] == "fpr" and len(fields) > 9:
                current = fields[9].upper()
            elif fields[0] == "grp" and len(fields) > 9 and current == fpr:
                grip = fields[9]
                break
        with self.cache.lock:
            self.cache.grips[fpr] = grip
        return grip

    def _stamp(self, key: OpenPGPKey, sub: SubKey) -> _Stamp:
        """The identity of gpg's secret-key file for ``sub`` (gpg 2.1+:
        ``private-keys-v1.d/<keygrip>.key``), or in a certificate store of the key's secret
        key file; None when there is none."""
        if self.keystore.is_certd:
            return self.keystore.secret_key_tag(key.fingerprint)
        grip = self._keygrip(sub)
        if grip is None:
            return None
        try:
            # A joined string: three Path objects per message cost more than the stat.
            st = os.stat(os.path.join(self.keystore.gnupg_home, "private-keys-v1.d", f"{grip}.key"))
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _export_secret(
        self, key: OpenPGPKey, sub: SubKey, passphrase: str | None, stamp: _Stamp
    ) -> Any:
        """The secret key from gpg, with the secret of ``sub`` only. gpg (2.1+) exports a
        protected key only when given its passphrase (it re-protects it with the same one)."""
        if self.keystore.is_certd:
            # The certificate store keeps the key as it came (protected): read, never exported;
            # the passphrase is checked when the key is unlocked (_unlock).
            stored = self.keystore.current_secret_key(key.fingerprint)
            if stored is None:
                raise _signer_problem(
                    key,
                    KeyReason.NO_SECRET_KEY,
                    f"no secret key for {sub.key_id} in {self.keystore.secret_keys.root}",
                )
            return self._reduce_secret(key, sub, stored)
        if passphrase is not None and any(c in passphrase for c in "\r\n\0"):
            raise PassphraseError("a passphrase cannot contain CR, LF or NUL")
        # Loopback with the passphrase (an empty line for none) on stdin: python-gnupg leaves
        # out --pinentry-mode loopback without a passphrase, and gpg-agent would then start a
        # pinentry for a protected key.
        done = self._gpg(
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--export-secret-keys",
            key.fingerprint,
            stdin=(passphrase or "").encode() + b"\n",
        )
        data = done.stdout
        if done.returncode != 0 or not data:
            if stamp is None:
                raise _signer_problem(
                    key,
                    KeyReason.NO_SECRET_KEY,
                    f"no secret key for {sub.key_id} in {self.keystore.gnupg_home}",
                )
            if passphrase is None:
                raise PassphraseError(
                    f"key {key.fingerprint} is protected by a passphrase and none was given",
                    fingerprint=key.fingerprint,
                    missing=True,
                )
            raise PassphraseError(
                f"wrong passphrase for key {key.fingerprint}", fingerprint=key.fingerprint
            )
        return self._reduce_secret(key, sub, bytes(data))

    def _reduce_secret(self, key: OpenPGPKey, sub: SubKey, data: bytes) -> Any:
        """The secret key ``data`` with the secret of ``sub`` only."""
        sq = _sq()
        from pysequoia.packet import PacketPile

        try:
            packets = list(PacketPile.from_bytes(bytes(data)))
            full = sq.Tsk.from_bytes(bytes(data))
            public = {
                (p.fingerprint or "").upper(): p
                for p in PacketPile.from_bytes(bytes(full.extract_certificate()))
                if p.fingerprint
            }
            return sq.Tsk.from_packets(_reduced(packets, sub.fingerprint, public=public))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CryptoError(
                f"cannot read secret key {key.fingerprint}: {_first_line(exc)}"
            ) from exc


# -- PGP/MIME ---------------------------------------------------------------------------------


def _micalg(signature: bytes, expected_signer: str) -> str:
    """``micalg`` from the hash in the signature packet (RFC 3156 §5), checked to be the
    chosen key's and a strong hash."""
    sq = _sq()
    sig = sq.Sig.from_bytes(signature)
    issuer = (sig.issuer_fingerprint or "").upper()
    if issuer and issuer != expected_signer:
        raise CryptoError(f"Sequoia signed with key {issuer}, not the chosen {expected_signer}")
    name = str(sig.hash_algorithm).rsplit(".", 1)[-1]
    micalg = _MICALG.get(name)
    if micalg is None:
        raise CryptoError(f"Sequoia signed with a weak or unknown hash ({name})")
    return micalg


def _signed_entity(
    payload: bytes, signature: bytes, micalg: str, prefix: bytes, *, directory: Path
) -> bytes | Spool:
    """RFC 3156 §5, as the gpg engine makes it (openpgp.signed_entity); a large one written
    into a spool (a private file) rather than joined a second time beside the payload."""
    if len(payload) <= MEMORY_MAX:
        return signed_entity(payload, _crlf(signature), micalg, prefix=prefix)
    spool = Spool(directory)
    try:
        signed_entity_into(spool, payload, _crlf(signature), micalg, prefix=prefix)
    except BaseException:
        spool.close()
        raise
    return spool


def _encrypted_entity(armored: bytes, prefix: bytes) -> bytes:
    """RFC 3156 §4: the version part, then the armored OpenPGP message."""
    boundary = new_boundary().encode()
    return b"".join(
        [prefix, encrypted_entity_head(boundary), armored, b"\r\n--" + boundary + b"--\r\n"]
    )


def _armor_crc(block: bytes) -> int:
    """The CRC-24 of ``block`` (RFC 9580 §6.1), computed by Sequoia's armor writer: Python
    takes seconds for the tens of megabytes of a large message."""
    armored = _sq().armor(block, _sq().ArmorKind.Message)
    line = armored.rstrip().rsplit("\n", 2)[-2]
    if not line.startswith("="):
        raise CryptoError("Sequoia's armor has no checksum line")
    return int.from_bytes(base64.b64decode(line[1:]), "big")


#: Where this process's open files can be opened again by name (Linux): Sequoia writes a
#: large copy's binary output through it into an anonymous file, and reads the payload
#: through it from a pipe.
_PROC_FD = Path("/proc/self/fd")


#: Payloads from this size up are fed to Sequoia by a child process (:mod:`e2email.feed`),
#: never held whole here. Below it the child would cost more than it saves: a Python
#: interpreter of its own (about 22 MB, and 0.05 to 0.2 s to start) against a payload of a
#: few megabytes held once.
FEED_MIN = 8 << 20

#: How long the payload feeder may take to start writing (an interpreter's start, a few
#: tenths of a second on a busy machine) before the copy is made in memory instead.
FEED_START_TIMEOUT = 30.0


def _encrypted_copy(
    data: PayloadStream,
    certs: Sequence[Any],
    signer: Any,
    subkeys: Sequence[str],
    *,
    prefix: bytes,
    directory: Path,
) -> bytes | Spool:
    """The entity (RFC 3156 §4) after ``prefix``: ``data`` signed and encrypted, checked to be
    encrypted to exactly ``subkeys``. The usual message is made in memory with Sequoia's own
    armor; a large one (over :data:`~e2email.spool.MEMORY_MAX`) is armored here, a block at a
    time, into a spool (e2email.spool): Sequoia's armor and its CRLF conversion would be two
    more whole copies."""
    if len(data) <= MEMORY_MAX:
        whole = bytes(data)  # a MessageError (a file changed since it was attached) as it is
        sq = _sq()
        try:
            packets = bytes(sq.encrypt(whole, certs, signer=signer, armor=False))
        except (RuntimeError, ValueError) as exc:
            raise CryptoError(f"Sequoia could not encrypt: {_first_line(exc)}") from exc
        # The check reads the packets Sequoia returned, before they are armored: the same
        # packets the armor then carries, with no armor to decode again (that decoding was
        # about a tenth of a small message's protection).
        _check_binary(packets, subkeys)
        return _encrypted_entity(_armored(sq, packets), prefix)
    with _encrypted_binary(data, certs, signer, directory=directory) as binary:
        return _encrypted_spool(binary, prefix, subkeys, directory=directory)


@contextlib.contextmanager
def _encrypted_binary(
    data: PayloadStream, certs: Sequence[Any], signer: Any, *, directory: Path
) -> Iterator[bytes | Iterable[bytes]]:
    """``data`` (large) signed (with ``signer``, when given) and encrypted to ``certs`` by
    Sequoia, binary, read a piece at a time from an anonymous private file in ``directory``
    that Sequoia wrote it to (ciphertext only); where that cannot be done, as bytes.

    pysequoia's ``encrypt()`` returns its output whole, twice over while it grows and is
    handed to Python (about three times a large message); ``encrypt_file()`` streams, but
    between paths. So for a large message the payload goes in through a pipe (never a file:
    plaintext never touches the disk) and the output goes to an unnamed 0600 file, each by
    its ``/proc/self/fd`` name. From :data:`FEED_MIN` up the pipe is fed piece by piece by a
    child process (:mod:`e2email.feed`: the payload is never held whole here); below it, or
    where that child cannot run, from the payload made whole (:func:`_encrypt_through_pipe`)."""
    sq = _sq()
    out = open_spool_file(directory) if _PROC_FD.is_dir() else None
    if out is not None:
        with out:
            if len(data) >= FEED_MIN and _feed.available():
                try:
                    _encrypt_from_feeder(sq, data, certs, signer, out.fileno())
                except (RuntimeError, ValueError, OSError) as exc:
                    # The feeder could not start, failed or was killed (what Sequoia wrote
                    # is then never used: it may be a truncated payload's), or Sequoia
                    # failed: the copy is made again below, from the payload whole. The
                    # reason logged is generic: the child's own words may name the
                    # attachment's file.
                    if isinstance(exc, _FeederNotStarted):
                        why = str(exc)
                    elif isinstance(exc, OSError):
                        why = "the payload feeder failed"
                    else:
                        why = "Sequoia failed on the fed payload"
                    log.warning("e2email: the large copy is made again in memory: %s", why)
                    out.truncate(0)
                else:
                    yield _file_pieces(out.fileno())
                    return
            whole = bytes(data)
            try:
                _encrypt_through_pipe(sq, whole, certs, signer, out.fileno())
            except (RuntimeError, ValueError, OSError) as exc:
                # E.g. a sandbox where /proc/self/fd cannot be opened again: the call in
                # memory below either works or raises the reason that concerns the message.
                log.debug("e2email: Sequoia could not stream the copy (%s)", _first_line(exc))
            else:
                yield _file_pieces(out.fileno())
                return
    else:
        whole = bytes(data)
    try:
        binary = sq.encrypt(whole, certs, signer=signer, armor=False)
    except (RuntimeError, ValueError) as exc:
        raise CryptoError(f"Sequoia could not encrypt: {_first_line(exc)}") from exc
    yield binary


class _FeederNotStarted(_feed.FeedError):
    """The payload feeder wrote nothing within :data:`FEED_START_TIMEOUT`."""


def _encrypt_from_feeder(
    sq: Any, data: PayloadStream, certs: Sequence[Any], signer: Any, out: int
) -> None:
    """``encrypt_file`` from a pipe that a child process (:class:`e2email.feed.Feeder`) fills
    with ``data``'s pieces, to the file ``out``. Raises (FeedError, an OSError) unless the
    child fed exactly ``len(data)`` bytes: Sequoia signs and encrypts whatever it read before
    the end of its input, and a child killed mid-way ends that input early."""
    size = len(data)
    with _feed.Feeder(data, size) as feeder:
        # pysequoia holds the GIL while it waits for input: here, before it is called, the
        # wait for the child's first bytes releases it (signal handlers, other threads and
        # an event loop run on), and a child that never starts feeding is given up on.
        if not feeder.started(FEED_START_TIMEOUT):
            raise _FeederNotStarted(
                f"the payload feeder wrote nothing in {FEED_START_TIMEOUT:g} seconds"
            )
        sq.encrypt_file(
            _PROC_FD / str(feeder.fd), _PROC_FD / str(out), certs, signer=signer, armor=False
        )
        done = feeder.finish()
    # The child's own memory, not this process's (benchmarks/run.py reports it).
    log.debug(
        "e2email: the payload feeder wrote %d bytes (its peak memory %d MB)",
        done.written,
        done.peak_rss >> 20,
        extra={"feeder_peak_rss": done.peak_rss},
    )


def _encrypt_through_pipe(
    sq: Any, data: bytes, certs: Sequence[Any], signer: Any, out: int
) -> None:
    """``encrypt_file`` from a pipe that a thread fills with ``data`` to the file ``out``.

    pysequoia holds the GIL for the whole call, so the pipe must fill without it: the thread
    writes ``data`` in one ``os.write``, one write(2) that runs with the GIL released and
    blocks, signals masked, until Sequoia has read everything. The call starts only once
    bytes are in the pipe (that write(2) is under way), and the pipe's write end is closed
    here first: the running write(2) holds the pipe open, and its end is Sequoia's end of
    input. Whatever happens, the read end is closed afterwards, so the thread ends (EPIPE
    when Sequoia stopped reading early)."""
    read_end, write_end = os.pipe()
    failed: list[OSError] = []
    written: list[int] = []

    def feed(fd: int = write_end) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            # One write(2), not a loop: Sequoia holds the GIL while it reads, so a second
            # write could never run. A write(2) cut short (the process stopped and continued:
            # Ctrl-Z, SIGSTOP, a debugger or a cgroup freeze) is caught below, not looped on.
            written.append(os.write(fd, data))
        except OSError as exc:
            failed.append(exc)

    writer = threading.Thread(target=feed, name="e2email-sequoia-feed", daemon=True)
    # poll, not select: a descriptor above 1023 (a busy server process) is fine.
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    try:
        writer.start()
        while not poller.poll(50):
            if not writer.is_alive():
                break
        # Only once bytes are in the pipe (the write(2) is under way and holds the pipe) or
        # the thread has ended may its descriptor be closed: closing it earlier could let the
        # number be reused before the thread writes, sending the payload elsewhere.
        os.close(write_end)
        write_end = -1
        if failed:
            raise failed[0]
        sq.encrypt_file(
            _PROC_FD / str(read_end), _PROC_FD / str(out), certs, signer=signer, armor=False
        )
    finally:
        # The read end first: a thread still writing then gets EPIPE and ends; only then is
        # its descriptor closed (when the loop above did not get that far).
        os.close(read_end)
        if writer.ident is not None:  # started
            writer.join()
        if write_end >= 0:
            os.close(write_end)
    if failed or written != [len(data)]:
        # Sequoia encrypted (and signed) only what it read: a copy cut short must never go out.
        raise OSError(
            f"the payload reached Sequoia only in part ({sum(written)} of {len(data)} bytes)"
        )


def _file_pieces(fd: int, size: int = READ_CHUNK) -> Iterator[bytes]:
    """The bytes of the file ``fd`` from its start, ``size`` at a time."""
    offset = 0
    while piece := os.pread(fd, size, offset):
        offset += len(piece)
        yield piece


def _encrypted_spool(
    binary: bytes | Iterable[bytes], prefix: bytes, subkeys: Sequence[str], *, directory: Path
) -> Spool:
    """RFC 3156 §4 after ``prefix``, the OpenPGP message ``binary`` armored into it, checked
    (:func:`_check_encrypted`) as written: in a private file in ``directory`` when large
    (e2email.spool)."""
    spool = Spool(directory)
    try:
        boundary = new_boundary().encode()
        spool.write(prefix)
        spool.write(encrypted_entity_head(boundary))
        start = len(spool)
        armor_into(spool, binary, block_crc=_armor_crc)
        _check_encrypted(spool.chunks(1 << 14, start=start), subkeys)
        spool.write(b"\r\n--" + boundary + b"--\r\n")
    except BaseException:
        spool.close()  # nothing of a failed copy is kept
        raise
    return spool


#: Armor characters read first by the packet check: the session keys and the encrypted data
#: packet's header come first, and this much holds about 1.5 KB of packets (two RSA-4096 or
#: a dozen X25519 session keys). A message with more is read on in full.
_ARMOR_HEAD = 2048


def _armor_head(armored: bytes) -> bytes | None:
    """The first :data:`_ARMOR_HEAD` characters of ``armored`` cut after a whole line, or
    None when that is all of it."""
    if len(armored) <= _ARMOR_WHOLE:
        return None  # decoded whole in one step (openpgp._dearmored_whole), faster still
    end = armored.find(b"\n", _ARMOR_HEAD)
    return None if end < 0 else armored[: end + 1]


def _armored(sq: Any, binary: bytes) -> bytes:
    """The OpenPGP message ``binary`` in ASCII armor (RFC 9580 §6.2, with its CRC-24 line)
    by Sequoia's armor writer, with CRLF line ends: for v4 recipients (SEIPD v1) the bytes
    ``encrypt(armor=True)`` writes; for SEIPD v2 a CRC line it would leave out (RFC 9580
    §6.1: readers must not reject one)."""
    try:
        text = sq.armor(binary, sq.ArmorKind.Message)
    except (RuntimeError, ValueError) as exc:
        raise CryptoError(f"Sequoia could not armor the message: {_first_line(exc)}") from exc
    return _crlf(text.encode("ascii"))


def _check_binary(binary: bytes, subkeys: Sequence[str]) -> None:
    """:func:`~e2email.crypto.openpgp.check_session_keys` on Sequoia's binary output."""
    check_session_keys(*packet_key_ids(binary), subkeys, producer="Sequoia")


def _check_encrypted(armored: Armored, subkeys: Sequence[str]) -> None:
    """:func:`~e2email.crypto.openpgp.check_session_keys` on Sequoia's armored output."""
    head = _armor_head(armored) if isinstance(armored, bytes) else None
    try:
        # The packets before the encrypted data are all that is looked at: when the head
        # holds them, reading it is the same check at a fraction of the cost (the armor's
        # lines are decoded one by one).
        key_ids, data_tag = encrypted_to_key_ids(head if head is not None else armored)
    except CryptoError:
        if head is None:
            raise
        key_ids, data_tag = encrypted_to_key_ids(armored)
    check_session_keys(key_ids, data_tag, subkeys, producer="Sequoia")


def _unsupported(address: str, key: OpenPGPKey, why: str) -> KeyProblem:
    return KeyProblem(
        address, KeyReason.UNSUPPORTED, f"{why}; {_USE_GPG}", fingerprint=key.fingerprint
    )


def _in_process_only(exc: RecipientKeyError | SignerKeyError) -> bool:
    """Whether ``exc`` says only that this engine cannot use a key gpg can (made by
    ``protect_sync``: UNSUPPORTED recipients, or a BACKEND signer)."""
    if isinstance(exc, SignerKeyError):
        return exc.problem.reason is KeyReason.BACKEND
    return all(p.reason is KeyReason.UNSUPPORTED for p in exc.problems)


def raw_sign_encrypt(payload: bytes, recipients: Sequence[Any], signer: Any) -> bytes:
    """pysequoia's own sign+encrypt call and nothing else: the floor the benchmarks compare
    the engine's protection with."""
    return bytes(_sq().encrypt(payload, recipients, signer=signer))


class SequoiaProtector(Protector):
    """OpenPGP in this process, through Sequoia. Same keys, same judgment and the same
    output contract as the GnuPG engine; no gpg process per copy.

    Its copies record the scheme "openpgp" (:attr:`name`): ``encrypted_to`` names OpenPGP
    primary fingerprints, re-checked by the keystore exactly as the GnuPG engine's are, so an
    outbox copy can be retried with either engine. It is registered as "openpgp-sequoia"."""

    name: ClassVar[str] = "openpgp"

    def __init__(self, keystore: Keystore, *, lookup: GpgProtector | None = None) -> None:
        from e2email.crypto.gpg import GpgProtector

        self.keystore = keystore
        # The keystore's lookups and judgment, and the key discovery hook: the GnuPG engine's
        # (one keystore whichever engine runs). The registry passes the GnuPG engine it would
        # make, so whatever that one is given (e.g. discovery settings) serves this one too.
        self._lookup = lookup if lookup is not None else GpgProtector(keystore)
        self._keys = _Keys(keystore)
        #: The keystore's home and its spool folder, made once (two Path objects per copy
        #: were a few microseconds of every message).
        self._spool: tuple[Path, Path] | None = None

    def _spool_dir(self) -> Path:
        home = self.keystore.home
        held = self._spool
        if held is None or held[0] is not home:
            held = self._spool = (home, spool_dir(home))
        return held[1]

    def __repr__(self) -> str:
        return f"SequoiaProtector({self.keystore!r})"

    def resolve(self, message: Message, protection: Protection) -> Resolved[OpenPGPKey]:
        """Every key ``message`` needs, judged by the keystore (blocking)."""
        return self._lookup.resolve(message, protection)

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        msg = message
        if not protection.sign and not protection.encrypt:
            return (plain_copy(msg),)
        _sq()  # a missing extra says so before any key is looked at
        discovered = await self._lookup.discover(msg, protection)
        resolved = False

        def resolve_and_protect() -> tuple[ProtectedCopy, ...]:
            nonlocal resolved
            try:
                keys = self.resolve(msg, protection)
            except RecipientKeyError as exc:
                if not discovered:
                    raise
                raise RecipientKeyError(
                    [discovered.get(p.address, p) for p in exc.problems]
                ) from None
            resolved = True
            return self.protect_sync(msg, protection, keys, passphrase)

        def pinned_resolve_and_protect() -> tuple[ProtectedCopy, ...]:
            # One look at the keystore for the keys and the Autocrypt key data of a message.
            with self.keystore.pinned():
                return resolve_and_protect()

        # One trip to a worker thread for the whole message, key lookup included: the work is
        # a few key exports the first time, then fractions of a millisecond per copy, and
        # each trip costs about a tenth of that (pysequoia holds the GIL while it works, so a
        # thread buys no parallelism, only an event loop free while gpg lists or exports).
        try:
            return await asyncio.to_thread(pinned_resolve_and_protect)
        except (RecipientKeyError, SignerKeyError) as exc:
            # AUTO means the best engine available for this message: keys gpg can use and
            # Sequoia cannot are served by gpg. An explicit engine=SEQUOIA gets the error.
            # (The keystore's own judgment, made before: the same for either engine.)
            if not resolved or protection.engine is not OpenPGPEngine.AUTO:
                raise
            if not _in_process_only(exc):
                raise
            log.warning("e2email: using the GnuPG engine for this message: %s", exc)
        return await self._lookup.protect(msg, protection, passphrase=passphrase)

    def protect_sync(
        self,
        msg: Message,
        protection: Protection,
        keys: Resolved[OpenPGPKey],
        passphrase: str | None,
    ) -> tuple[ProtectedCopy, ...]:
        """The copies of ``msg`` with keys already resolved (blocking; the benchmarks time it)."""
        sq = _sq()
        if protection.encrypt:
            # Every key checked before anything is encrypted, every problem named at once.
            problems = []
            for address, key in sorted(keys.recipients.items()):
                why = self._keys.unusable(key)
                if why:
                    problems.append(_unsupported(address, key, why))
            if keys.own is not None and keys.own.fingerprint not in {
                k.fingerprint for k in keys.recipients.values()
            }:
                why = self._keys.unusable(keys.own)
                if why:
                    problems.append(_unsupported(msg.sender.addr_spec, keys.own, why))
            if problems:
                raise RecipientKeyError(problems)
        signer_key = keys.signer
        signer = self._keys.signer(signer_key, passphrase) if signer_key is not None else None
        # Autocrypt Level 1, as the gpg engine adds it (issue 10 §3).
        autocrypt = autocrypt_fields(
            self.keystore, msg, protection, own=keys.own, recipients=keys.recipients
        )

        if not protection.encrypt:
            assert signer_key is not None
            assert signer is not None
            sub = signer_key.signing_subkey()
            assert sub is not None
            payload = build_payload(msg, hp=HP.CLEAR)
            # Binary-mode detached signature over the canonical (CRLF, 7-bit) part as it is.
            signature = bytes(sq.sign(signer, payload, mode=sq.SignatureMode.DETACHED))
            micalg = _micalg(signature, sub.fingerprint)
            head = message_head(msg, hp=HP.CLEAR) + autocrypt["main"][0]
            raw = _signed_entity(payload, signature, micalg, head, directory=self._spool_dir())
            return (
                make_copy(
                    raw, msg, "main", msg.recipients, signed=True, signer=signer_key.fingerprint
                ),
            )

        # Encrypted (alone or signed inside, RFC 3156 §6.2): binary literal data, so a
        # program's own MIME body goes in as it wrote it, not re-encoded for signing.
        stream = stream_payload(msg, hp=HP.CIPHER, canonical=False)
        head = message_head(msg, hp=HP.CIPHER)

        def one(kind: CopyKind, rcpts: Sequence[Any]) -> ProtectedCopy:
            unique = keys.keys_for(rcpts)
            chosen = [self._keys.recipient(k) for k in unique]
            outer, gossip = autocrypt[kind]
            # Gossip only inside this copy's own payload; Bcc copies share the plain one.
            data = (
                stream_payload(msg, hp=HP.CIPHER, canonical=False, extra_fields=gossip)
                if gossip
                else stream
            )
            content = _encrypted_copy(
                data,
                [c for c, _ in chosen],
                signer,
                [fpr for _, fpr in chosen],
                prefix=head + outer,
                directory=self._spool_dir(),
            )
            return make_copy(
                content,
                msg,
                kind,
                rcpts,
                signed=signer is not None,
                encrypted_to=[k.fingerprint for k in unique],
                signer=signer_key.fingerprint if signer_key else None,
                scheme=self.name,
            )

        return tuple(one(kind, rcpts) for kind, rcpts in copy_plans(msg))

    def check_encrypted(
        self, head: bytes, body: bytes, addresses: Sequence[str], protection: Protection
    ) -> tuple[str, ...]:
        """As the GnuPG engine reads it (the same keystore and judgement)."""
        return self._lookup.check_encrypted(head, body, addresses, protection)

    def missing_keys(self, addresses: Sequence[str], protection: Protection) -> list[KeyProblem]:
        """As the GnuPG engine judges them (one keystore whichever engine runs)."""
        return self._lookup.missing_keys(addresses, protection)

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        """The keys judged as for a new message (revoked, expired, disabled, gone)."""
        return self._lookup.recheck(encrypted_to)

    @classmethod
    def recognises(cls, head: bytes) -> bool:
        return b"application/pgp-encrypted" in head or b"application/pgp-signature" in head
