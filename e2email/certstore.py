"""Where S/MIME certificates and identities live, how they are found by address, and whether
they may be used (RFC 8550, RFC 5280).

Everything is under ``HOME/smime/`` (HOME is e2email's home, ``--home`` / ``$E2EMAIL_HOME``)::

    certs/<SHA256>.pem            other people's certificates (recipients)
    intermediates/<SHA256>.pem    CA certificates that are *not* trusted, kept for path building
    trust/<SHA256>.pem            trust anchors: CAs, and self-signed certificates trusted by name
    identities/<SHA256>.pem       your own certificate followed by its chain
    identities/<SHA256>.key       its private key, PKCS#8 PEM, file mode 0600
    testca/ca.pem, ca.key         the local test CA of ``keys generate --smime --test-ca``
    crls/<issuer>.crl             the newest CRL of each CA (DER), imported or fetched

Every folder is made 0700 (through :mod:`e2email.private`, whatever the umask), and a store
that another user owns or that group or others may write is refused
(:class:`~e2email.errors.InsecurePathError`): whoever can write there can swap a recipient's
certificate or a trust anchor.

The local test CA exists to try S/MIME without a commercial certificate. Its key is stored
unencrypted, so it is bounded instead: it lives one year, and a nameConstraints extension
(RFC 5280 §4.2.1.10) lets it certify only addresses at the domains it issued identities for (a
new domain re-issues it under the same key and name, so earlier identities stay valid;
recipients then need the new ``ca.pem``). Whoever copies the home can mint certificates for
those domains only, which is what anyone trusting it agreed to. A test CA made by an older
version without constraints is re-issued constrained the next time it is used.

Private keys are stored the way they came: a key imported with a passphrase (a protected
PKCS#12 bundle or an encrypted PEM key) is stored encrypted under that same passphrase (PKCS#8,
``BestAvailableEncryption``), so the passphrase asked when signing is the one the user knows;
a key that came unprotected stays unprotected (the user chose that, typically for unattended
sending) but, like every key file, is created 0600 (exclusively, never through a symlink)
inside a 0700 directory. This mirrors GnuPG, which keeps a secret key's protection as imported.
An unlocked key is cached in memory for the life of the :class:`CertStore` (like gpg-agent), so
parsing and decryption happen once, but only for the passphrase that unlocked it: another
passphrase is tried against the file, so a wrong one still fails; exports always read the file.

Certificates are judged by :meth:`CertStore.check`, which fails closed with a
:class:`~e2email.errors.KeyProblem`: the certificate current, an end-entity certificate whose
key usage and extended key usage (if constrained) allow email protection for the purpose, RSA of
at least 2048 bits or ECDSA on P-256/384/521, nothing in its chain signed with SHA-1 or MD5, a
chain to a trust anchor (``cryptography.x509.verification`` with a web-PKI-style CA profile that
requires emailProtection where a CA constrains usage, and enforces CAs' name constraints), and
the address among the rfc822Name entries of the verified certificate's subjectAltName. A
self-signed certificate is accepted only when it is itself a trust anchor: imported with
``--trust`` or named by fingerprint for a message.

Addresses come from subjectAltName only. RFC 8550 §3 also mentions the subject's PKCS #9
emailAddress, but name constraints are checked against subjectAltName, so a CA constrained to
``partner.example`` could put any address there (RFC 5280 §4.2.1.10 asks verifiers to check it
only when there is no subjectAltName at all, and the verifier refuses end-entity certificates
without one anyway). A certificate whose address is only in its subject names no address here.
Addresses are taken exactly as the certificate states them (a padded `` bob@x`` is no address)
and looked up without case; that is safe because e-mail name constraints are checked here
again, after the verifier, with an excluded mailbox excluding every spelling of it (see
``_email_constraint_violation``).

Revocation (RFC 5280 §6.3, RFC 6960): every certificate of the verified chain but the trust
anchor, for recipients and for the signer alike, is looked up in the stored CRL of its issuer
(imported with ``keys import``, verified against that CA's certificate, the newest kept). A
listed certificate is refused (:attr:`KeyReason.REVOKED`, naming it, its serial, the date and
reason) even when the CRL has expired: a revocation does not lapse. Whether the status is also
fetched (OCSP first, then the CRL distribution points; a fetched CRL is kept like an imported
one) and whether a missing status refuses is the :class:`~e2email.config.RevocationPolicy`;
an expired CRL counts as none. See :mod:`e2email.revocation` for what is accepted.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from e2email.config import PasswordSource, RevocationPolicy, default_home
from e2email.errors import (
    ConfigError,
    KeyProblem,
    KeyReason,
    KeystoreError,
    MessageError,
    PassphraseError,
)
from e2email.message import Address
from e2email.private import check_private, ensure_private_dir
from e2email.revocation import (
    FETCH_TIMEOUT,
    RevocationUnavailable,
    Revoked,
    crl_covers,
    crl_current,
    crl_entry,
    crl_issuer_problem,
    fetch_crl,
    issuer_key_id,
    load_crl,
    ocsp_status,
)

__all__ = [
    "MIN_RSA_BITS",
    "CertKind",
    "CertStore",
    "ImportResult",
    "ImportedCRL",
    "ImportedCert",
    "SignerKey",
    "StoredCert",
    "cert_addresses",
    "describe",
    "fingerprint",
    "holds_crl",
    "looks_like_x509",
    "name_text",
    "permitted_email_subtrees",
]

#: Below this an RSA key is refused (NIST SP 800-131A; standards item 10).
MIN_RSA_BITS = 2048
_GOOD_CURVES = {"secp256r1", "secp384r1", "secp521r1"}
_HASH_NAMES = {"sha1": "SHA-1", "md5": "MD5"}
_WEAK_HASHES = set(_HASH_NAMES)
#: The extended key usages that allow S/MIME (RFC 8550 §4.4.4).
_EMAIL_EKUS = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_X509_PEM_LABELS = (
    b"CERTIFICATE",
    b"PKCS7",
    b"PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"X509 CRL",
)
_FILE_SUFFIXES = {".p12", ".pfx", ".crt", ".cer", ".der", ".p7b", ".p7c", ".crl"}

_WHAT = "the S/MIME certificate store"
Purpose = Literal["sign", "encrypt"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, upper-case hex (how e2email names certificates)."""
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def _normal_fpr(text: str) -> str:
    return text.replace(":", "").replace(" ", "").upper().removeprefix("0X")


#: A mailbox as a certificate may state it: one "@", no space or control character around or
#: inside it. Anything else (" bob@x", "bob@x\n") names no address: it is never trimmed into one.
_MAILBOX = re.compile(r"[^\s@\x00-\x1f\x7f]+@[^\s@\x00-\x1f\x7f]+")


def _rfc822(names: Iterable[x509.GeneralName]) -> tuple[str, ...]:
    # Exactly as stated: name constraints were judged on these very strings, so a value is
    # never trimmed or re-cased into an address the constraint check did not see.
    found = (n.value for n in names if isinstance(n, x509.RFC822Name))
    return tuple(dict.fromkeys(a for a in found if _MAILBOX.fullmatch(a)))


def _same_mailbox(a: str, b: str) -> bool:
    """Lookup by address ignores case (users type ``Bob@Example.NET``); the name constraint
    check below makes that safe by excluding mailboxes case-insensitively too."""
    return a.lower() == b.lower()


def cert_addresses(cert: x509.Certificate) -> tuple[str, ...]:
    """The rfc822Name entries of subjectAltName exactly as the certificate states them (only
    well-formed mailboxes): the only addresses a certificate names here. Compare them
    case-insensitively. The subject's emailAddress is ignored on purpose: CAs' name
    constraints are checked against subjectAltName, not against it (see the module
    documentation)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return _rfc822(san)


def permitted_email_subtrees(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The rfc822Name permitted subtrees of a CA's nameConstraints (``example.org``: mailboxes
    at that host; ``.example.org``: at its subdomains), or None when it has no nameConstraints."""
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    return tuple(
        n.value.lower() for n in nc.permitted_subtrees or () if isinstance(n, x509.RFC822Name)
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _hash_name(cert: x509.Certificate) -> str | None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "unknown"
    return algorithm.name if algorithm is not None else None


def key_description(cert: x509.Certificate) -> str:
    """``rsa2048``, ``ecdsa-p256``, ``ed25519``...: the certificate's key, briefly."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
        return f"ecdsa-{curve.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "").lower() or "unknown"


def name_text(name: x509.Name) -> str:
    """An X.509 name as RFC 4514 text, with emailAddress spelled out (not as an OID)."""
    return name.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})


def describe(cert: x509.Certificate) -> str:
    """``Common Name <address>``: who a certificate is for, in one short phrase."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common = str(names[0].value) if names else ""
    addresses = cert_addresses(cert)
    if addresses and common and common.lower() != addresses[0].lower():
        return f"{common} <{addresses[0]}>"
    return addresses[0] if addresses else common or name_text(cert.subject)


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class SignerKey:
    """What signing needs: the certificate, its unlocked private key and the chain sent along
    with signatures (intermediates, not the root: recipients must already trust the root)."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()


class CertKind(enum.Enum):
    """What a stored certificate is for."""

    IDENTITY = "own identity"
    CERTIFICATE = "certificate"
    INTERMEDIATE = "untrusted CA"
    TRUSTED = "trusted"


@dataclass(frozen=True)
class StoredCert:
    """A certificate in the store, with its chain and (for identities) where its key is."""

    certificate: x509.Certificate
    kind: CertKind
    path: Path
    #: For identities: the CA certificates sent along with signatures (not the root).
    chain: tuple[x509.Certificate, ...] = ()
    key_path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @property
    def sha1_fingerprint(self) -> str:
        # Only a name: gpgsm and many UIs show SHA-1 fingerprints, so they are accepted too.
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303

    @property
    def addresses(self) -> tuple[str, ...]:
        return cert_addresses(self.certificate)

    @property
    def subject(self) -> str:
        return name_text(self.certificate.subject)

    @property
    def issuer(self) -> str:
        return name_text(self.certificate.issuer)

    @property
    def not_before(self) -> datetime.datetime:
        return _utc(self.certificate.not_valid_before_utc)

    @property
    def not_after(self) -> datetime.datetime:
        return _utc(self.certificate.not_valid_after_utc)

    @property
    def is_ca(self) -> bool:
        return _is_ca(self.certificate)

    @property
    def self_signed(self) -> bool:
        return _self_signed(self.certificate)

    @property
    def algorithm(self) -> str:
        return key_description(self.certificate)

    def matches(self, spec: str) -> bool:
        norm = _normal_fpr(spec)
        return norm in (self.fingerprint, self.sha1_fingerprint)


@dataclass(frozen=True)
class ImportedCert:
    """One certificate an import stored (or found already stored)."""

    source: Path
    stored: StoredCert
    new: bool


@dataclass(frozen=True)
class ImportedCRL:
    """One CRL an import checked, and what became of it."""

    source: Path
    #: The issuing CA, as RFC 4514 text.
    issuer: str
    this_update: datetime.datetime
    #: None: the CRL never says when it is superseded (then it is never current).
    next_update: datetime.datetime | None
    #: How many certificates it lists as revoked.
    revoked: int
    #: ``imported`` (stored, replacing any older CRL of the issuer), ``unchanged`` (this very
    #: CRL was stored already) or ``older`` (a newer CRL of the issuer is kept instead).
    outcome: Literal["imported", "unchanged", "older"]

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Whether its nextUpdate has passed: it still revokes what it lists, but vouches for
        nothing else (see :class:`~e2email.config.RevocationPolicy`)."""
        now = now or datetime.datetime.now(datetime.UTC)
        return self.next_update is None or self.next_update < now


class ImportResult(list[ImportedCert]):
    """What :meth:`CertStore.import_files` stored: the certificates (the list itself) and, in
    :attr:`crls`, the certificate revocation lists found among the files."""

    def __init__(
        self, certs: Iterable[ImportedCert] = (), crls: Iterable[ImportedCRL] = ()
    ) -> None:
        super().__init__(certs)
        self.crls: list[ImportedCRL] = list(crls)


def _crls_in(data: bytes) -> list[x509.CertificateRevocationList]:
    """The CRLs in PEM ``X509 CRL`` blocks, or the DER CRL that ``data`` is (ValueError for an
    unreadable PEM CRL block)."""
    blocks = [b.group(0) for b in _PEM_BLOCK.finditer(data) if b.group(1) == b"X509 CRL"]
    if blocks:
        return [x509.load_pem_x509_crl(b) for b in blocks]
    if data[:1] == b"\x30" and b"-----BEGIN " not in data:
        try:
            return [x509.load_der_x509_crl(data)]
        except ValueError:
            return []
    return []


def holds_crl(path: Path) -> bool:
    """Whether ``path`` holds a certificate revocation list (PEM ``X509 CRL``, even an
    unreadable one, which :meth:`CertStore.import_crls` then reports; or DER)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if b"-----BEGIN X509 CRL-----" in data:
        return True
    return bool(_crls_in(data))


def looks_like_x509(path: Path) -> bool:
    """Whether ``path`` holds X.509 material (PEM certificates, keys or CRLs, a DER certificate
    or CRL, PKCS#7 certificates or PKCS#12), as opposed to OpenPGP keys. Unreadable files:
    False (the OpenPGP import then reports them)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if path.suffix.lower() in _FILE_SUFFIXES:
        return True
    if any(b"-----BEGIN " + label + b"-----" in data for label in _X509_PEM_LABELS):
        return True
    # A DER SEQUENCE: an OpenPGP packet always has the high bit of its first byte set.
    return data[:1] == b"\x30"


def _load_der(data: bytes) -> list[x509.Certificate] | None:
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:
        return list(pkcs7.load_der_pkcs7_certificates(data))
    except (ValueError, UnsupportedAlgorithm):
        return None


@dataclass
class _Material:
    certs: list[tuple[x509.Certificate, Path]]
    keys: list[tuple[PrivateKey, Path, str | None]]  # key, source, passphrase it came with
    bundles: list[tuple[PrivateKey, x509.Certificate, list[x509.Certificate], Path, str | None]]


class _Asker:
    """Asks a passphrase source at most once, and only when a file needs it."""

    def __init__(self, source: PasswordSource | None) -> None:
        self._source = source
        self._value: str | None = None

    def get(self, what: str) -> str:
        if self._value is None:
            if self._source is None:
                raise PassphraseError(
                    f"{what} is protected by a passphrase and none was given", missing=True
                )
            self._value = self._source if isinstance(self._source, str) else self._source()
        return self._value


def _spki(public: object) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key, to pair keys with certificates."""
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return b""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_type(key: object, source: Path) -> PrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeystoreError(f"{source}: only RSA and ECDSA keys can be used for S/MIME")
    return key


def _cert_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data``, permissions at most ``mode`` from the first
    byte. The temporary file has a random name and is created exclusively (O_EXCL, O_NOFOLLOW)
    with ``mode``, so it is never an existing file or a planted symlink and never wider than
    ``mode`` (no chmod afterwards); os.replace then renames it over ``path`` (replacing a
    symlink there rather than writing through it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _CREATE_FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _parse_lifetime(text: str) -> int:
    """``2y``, ``18m``, ``90d``, ``6w`` or plain days -> days."""
    m = re.fullmatch(r"\s*(\d+)\s*([dwmy]?)\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        raise KeystoreError(f"invalid lifetime {text!r} (e.g. 2y, 18m, 90d; X.509 needs an end)")
    days = int(m.group(1)) * {"": 1, "d": 1, "w": 7, "m": 30, "y": 365}[m.group(2)]
    if days > 3650:
        raise KeystoreError("lifetime longer than 10 years")
    return days


class CertStore:
    """The user's S/MIME certificates, identities and trust anchors under ``HOME/smime``.

    Listings are cached and refreshed when the directories change. Every public method is
    blocking (file I/O, RSA); async callers run them in a worker thread.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        revocation_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        #: Seconds one OCSP or CRL fetch may take before its answer counts as unavailable.
        self.revocation_timeout = revocation_timeout
        # (certificate, issuer) fingerprints -> (what fetching said: None good, Revoked, or why
        # nothing could be had; until when it is reused).
        self._fetched: dict[tuple[str, str], tuple[Revoked | str | None, datetime.datetime]] = {}
        # Stored CRL file -> ((inode, mtime, size), the CRL as parsed and checked).
        self._crls: dict[Path, tuple[tuple[int, int, int], x509.CertificateRevocationList]] = {}
        self.root = self.home / "smime"
        self._lock = threading.Lock()
        self._listing: tuple[tuple[int, ...], tuple[StoredCert, ...]] | None = None
        # (fingerprint, inode, mtime) -> (key, keyed hash of the passphrase that unlocked it, or
        # None for an unprotected key). The hash is keyed by a per-store secret, so it says
        # nothing about the passphrase outside this object.
        self._keys: dict[tuple[str, int, int], tuple[PrivateKey, bytes | None]] = {}
        self._pw_secret = secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"CertStore(root={str(self.root)!r})"

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _make_dir(self, name: str) -> Path:
        # 0700 whatever the umask (home and parents too); a store another user owns or that
        # group/others may write is refused (InsecurePathError): whoever can write here can
        # swap a recipient's certificate, a trust anchor or a signing key.
        ensure_private_dir(self.root, what=_WHAT)
        self._check_private()
        return ensure_private_dir(self._dir(name), what=_WHAT)

    def _check_private(self) -> None:
        """Refuse to read a store that another user owns or group/others may write (like ssh
        with a loose ``~/.ssh``): its trust anchors and certificates cannot be relied on."""
        if not self.root.exists():
            return
        check_private(self.root, what=_WHAT)
        for name in (*(n for n, _ in self._DIRS), "crls", "testca"):
            folder = self._dir(name)
            if folder.exists():
                check_private(folder, what=_WHAT)

    # -- Listing ----------------------------------------------------------------------------

    _DIRS = (
        ("identities", CertKind.IDENTITY),
        ("certs", CertKind.CERTIFICATE),
        ("intermediates", CertKind.INTERMEDIATE),
        ("trust", CertKind.TRUSTED),
    )

    def _stamp(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for name, _ in self._DIRS:
            try:
                st = self._dir(name).stat()
            except OSError:
                stamp += [0, 0]
            else:
                stamp += [st.st_mtime_ns, st.st_nlink]
        return tuple(stamp)

    def invalidate(self) -> None:
        """Forget the cached listing (done automatically when the directories change)."""
        self._listing = None

    def all_certs(self) -> tuple[StoredCert, ...]:
        """Everything stored: identities, others' certificates, untrusted CAs, trust anchors."""
        self._check_private()
        stamp = self._stamp()
        with self._lock:
            if self._listing is not None and self._listing[0] == stamp:
                return self._listing[1]
        found: list[StoredCert] = []
        for name, kind in self._DIRS:
            folder = self._dir(name)
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.pem")):
                try:
                    certs = x509.load_pem_x509_certificates(path.read_bytes())
                except (OSError, ValueError) as exc:
                    raise KeystoreError(f"unreadable certificate file {path}: {exc}") from exc
                key_path = path.with_suffix(".key") if kind is CertKind.IDENTITY else None
                if key_path is not None and not key_path.is_file():
                    raise KeystoreError(f"identity {path} has no key file {key_path.name}")
                found.append(
                    StoredCert(
                        certificate=certs[0],
                        kind=kind,
                        path=path,
                        chain=tuple(certs[1:]),
                        key_path=key_path,
                    )
                )
        listing = tuple(found)
        with self._lock:
            self._listing = (stamp, listing)
        return listing

    def identities(self) -> tuple[StoredCert, ...]:
        return tuple(c for c in self.all_certs() if c.kind is CertKind.IDENTITY)

    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        return tuple(c.certificate for c in self.all_certs() if c.kind is CertKind.TRUSTED)

    def get(self, spec: str) -> StoredCert | None:
        """The certificate with this SHA-256 or SHA-1 fingerprint (colons and case ignored);
        an identity is preferred over another copy of the same certificate."""
        matches = [c for c in self.all_certs() if c.matches(spec)]
        matches.sort(key=lambda c: c.kind is not CertKind.IDENTITY)
        return matches[0] if matches else None

    def find(self, address: str) -> tuple[StoredCert, ...]:
        """End-entity certificates naming ``address`` (case-insensitive), one entry per
        certificate (the identity entry when it is also stored elsewhere)."""
        addr = address.strip().lower()
        chosen: dict[str, StoredCert] = {}
        for cert in self.all_certs():
            if cert.is_ca or not any(_same_mailbox(addr, a) for a in cert.addresses):
                continue
            have = chosen.get(cert.fingerprint)
            if have is None or (
                cert.kind is CertKind.IDENTITY and have.kind is not CertKind.IDENTITY
            ):
                chosen[cert.fingerprint] = cert
        return tuple(chosen.values())

    # -- Checks -----------------------------------------------------------------------------

    def check(
        self,
        cert: x509.Certificate,
        address: str | None,
        *,
        purpose: Purpose,
        now: datetime.datetime | None = None,
        trusted_self_signed: Iterable[str] = (),
        intermediates: Sequence[x509.Certificate] = (),
        revocation: RevocationPolicy = RevocationPolicy.OFF,
    ) -> KeyProblem | None:
        """Why ``cert`` cannot be used for ``purpose`` by/for ``address``, or None.

        ``trusted_self_signed`` names (SHA-256) self-signed certificates to accept as their own
        trust anchor; ``intermediates`` are extra untrusted CA certificates for path building
        (e.g. those that came with a signature). Every certificate of the verified chain but
        the trust anchor is checked for revocation: against imported CRLs always, and by
        fetching (OCSP, CRL distribution points) as ``revocation`` says.
        """
        now = now or datetime.datetime.now(datetime.UTC)
        fpr = fingerprint(cert)
        addr = (address or "").strip().lower()

        def problem(reason: KeyReason, detail: str = "") -> KeyProblem:
            return KeyProblem(addr or name_text(cert.subject), reason, detail, fpr)

        names = cert_addresses(cert)
        if addr and not any(_same_mailbox(addr, n) for n in names):
            listed = ", ".join(names) if names else "no email address"
            return problem(KeyReason.ADDRESS_MISMATCH, f"the certificate names {listed}")
        not_before = _utc(cert.not_valid_before_utc)
        not_after = _utc(cert.not_valid_after_utc)
        if now < not_before:
            return problem(KeyReason.NOT_YET_VALID, f"valid from {not_before:%Y-%m-%d %H:%M} UTC")
        if now > not_after:
            return problem(KeyReason.EXPIRED, f"not valid after {not_after:%Y-%m-%d}")
        key = cert.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                return problem(KeyReason.WEAK, f"RSA-{key.key_size} is below {MIN_RSA_BITS} bits")
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in _GOOD_CURVES:
                return problem(KeyReason.WEAK, f"the curve {key.curve.name} is not allowed")
            if purpose == "encrypt":
                return problem(
                    KeyReason.UNSUPPORTED,
                    f"{key_description(cert)}: encrypting to EC keys (ECDH, RFC 5753) is not "
                    "supported; an RSA certificate is needed",
                )
        else:
            return problem(KeyReason.UNSUPPORTED, f"{key_description(cert)} keys")
        hash_name = _hash_name(cert)
        if hash_name in _WEAK_HASHES and not _self_signed(cert):
            return problem(
                KeyReason.WEAK, f"the certificate is signed with {_HASH_NAMES[hash_name]}"
            )
        usage = self._usage_problem(cert, purpose)
        if usage:
            return problem(KeyReason.WRONG_USAGE, usage)
        verified = self._verify_chain(cert, now, trusted_self_signed, intermediates)
        if isinstance(verified, str):
            return problem(KeyReason.UNTRUSTED, verified)
        verified_names, chain = verified
        # The address must be one the path validation covered: an rfc822Name of the verified
        # leaf's subjectAltName, which name constraints (RFC 5280 §4.2.1.10) were checked on.
        if addr and not any(_same_mailbox(addr, n) for n in verified_names):
            listed = ", ".join(verified_names) if verified_names else "no email address"
            return problem(KeyReason.ADDRESS_MISMATCH, f"the verified certificate names {listed}")
        revoked = self._revocation_problem(chain, now, revocation)
        if revoked is not None:
            return problem(*revoked)
        return None

    @staticmethod
    def _usage_problem(cert: x509.Certificate, purpose: Purpose) -> str | None:
        if _is_ca(cert):
            return "it is a CA certificate"
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            pass
        else:
            if not _EMAIL_EKUS & set(eku):
                return "its extended key usage does not include emailProtection"
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return None
        # RFC 8550 §4.4.2: digitalSignature or nonRepudiation to sign; keyEncipherment for RSA
        # key transport.
        if purpose == "sign" and not (ku.digital_signature or ku.content_commitment):
            return "its key usage does not allow signing"
        if purpose == "encrypt" and not ku.key_encipherment:
            return "its key usage does not allow key encipherment"
        return None

    def _verify_chain(
        self,
        cert: x509.Certificate,
        now: datetime.datetime,
        trusted_self_signed: Iterable[str],
        intermediates: Sequence[x509.Certificate],
    ) -> str | tuple[tuple[str, ...], tuple[x509.Certificate, ...]]:
        """Why ``cert`` has no chain to a trust anchor (text), or the addresses (rfc822Name)
        of the verified leaf (for a certificate trusted directly, its own) and the verified
        chain, leaf first, trust anchor last."""
        fpr = fingerprint(cert)
        anchors = self.trust_anchors()
        if fpr in {fingerprint(a) for a in anchors}:
            # Explicitly trusted (imported with --trust, or generated here).
            return cert_addresses(cert), (cert,)
        if _self_signed(cert):
            if fpr in {_normal_fpr(f) for f in trusted_self_signed}:
                return cert_addresses(cert), (cert,)
            return (
                f"self-signed; trust it by name with --trust-self-signed {fpr} or "
                "`e2email keys import --trust FILE`"
            )
        if not anchors:
            return "no trusted CA configured (add one with `e2email keys import --trust CA.pem`)"
        pool = [*intermediates]
        for stored in self.all_certs():
            if stored.kind is CertKind.INTERMEDIATE:
                pool.append(stored.certificate)
            pool.extend(stored.chain)
        weak = self._weak_chain(cert, pool)
        if weak:
            return weak
        verifier = (
            PolicyBuilder()
            .store(Store(list(anchors)))
            .time(now)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(cert, pool)
        except VerificationError as exc:
            why = str(exc).removeprefix("validation failed: ")
            if "name constraint" in why:
                why = (
                    "its address is outside what its CA may certify (name constraints, "
                    "RFC 5280 §4.2.1.10)"
                )
            elif "candidates exhausted" in why:
                why = "no chain to a trusted CA"
            return f"{why}; issuer {name_text(cert.issuer)}"
        if not verified.chain or verified.chain[0] != cert:
            return "the verified chain does not start with this certificate"
        violation = _email_constraint_violation(verified.chain)
        if violation:
            return violation
        return _rfc822(verified.subjects or ()), tuple(verified.chain)

    @staticmethod
    def _weak_chain(cert: x509.Certificate, pool: Sequence[x509.Certificate]) -> str | None:
        """A SHA-1/MD5 signature on an intermediate CA is named as such (the verifier would
        only say it found no chain). Roots' self-signatures are not relied on."""
        current = cert
        for _ in range(8):
            issuer = next(
                (
                    c
                    for c in pool
                    if c.subject == current.issuer and c != current and not _self_signed(c)
                ),
                None,
            )
            if issuer is None:
                return None
            name = _hash_name(issuer)
            if name in _WEAK_HASHES:
                who = name_text(issuer.subject)
                return f"the intermediate {who} is signed with {_HASH_NAMES[name]}"
            current = issuer
        return None

    # -- Revocation -------------------------------------------------------------------------

    def _revocation_problem(
        self,
        chain: Sequence[x509.Certificate],
        now: datetime.datetime,
        policy: RevocationPolicy,
    ) -> tuple[KeyReason, str] | None:
        """Why a certificate of the verified ``chain`` (leaf first, trust anchor last) must not
        be relied on for revocation, or None. The anchor itself is trusted as configured."""
        for position, cert in enumerate(chain[:-1]):
            issuer = chain[position + 1]
            who = (
                f"the certificate {describe(cert)}"
                if position == 0
                else f"its CA certificate {name_text(cert.subject)}"
            )
            status = self._revocation_status(cert, issuer, now, policy)
            if isinstance(status, Revoked):
                when = f" on {status.date:%Y-%m-%d %H:%M} UTC" if status.date else ""
                reason = f", reason: {status.reason}" if status.reason else ""
                return (
                    KeyReason.REVOKED,
                    f"{who}, serial {status.serial:X}, was revoked{when}{reason} "
                    f"(according to {status.source} of {name_text(issuer.subject)})",
                )
            if isinstance(status, _Refused):
                return KeyReason.REVOCATION_UNKNOWN, f"{who}: {status.why}"
            if status is not None and policy is RevocationPolicy.REQUIRE:
                return (
                    KeyReason.REVOCATION_UNKNOWN,
                    f"{who}: no revocation status could be established ({status}), and the "
                    "revocation policy requires one",
                )
        return None

    def _revocation_status(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        now: datetime.datetime,
        policy: RevocationPolicy,
    ) -> Revoked | _Refused | str | None:
        """``cert``'s status: Revoked; None (good, from a current source); a text saying why
        none could be had; or _Refused when a stored CRL is unusable (fail closed)."""
        reasons: list[str] = []
        try:
            stored = self._stored_crl(issuer)
        except KeystoreError as exc:
            return _Refused(str(exc))
        if stored is not None:
            # A revocation does not lapse: an expired CRL still revokes what it lists.
            hit = crl_entry(stored, cert, "the stored CRL")
            if hit is not None:
                return hit
            if not crl_covers(stored, cert):
                reasons.append("the stored CRL of its issuer does not cover it")
            elif crl_current(stored, now):
                return None
            else:
                ends = stored.next_update_utc
                reasons.append(
                    "the stored CRL of its issuer expired"
                    + (f" on {_utc(ends):%Y-%m-%d %H:%M} UTC" if ends else " (no nextUpdate)")
                )
        else:
            reasons.append("no CRL of its issuer imported")
        if policy is RevocationPolicy.OFF:
            return "; ".join(reasons)
        cache_key = (fingerprint(cert), fingerprint(issuer))
        cached = self._fetched.get(cache_key)
        if cached is not None and now <= cached[1]:
            return "; ".join([*reasons, cached[0]]) if isinstance(cached[0], str) else cached[0]
        found: Revoked | None
        failed: list[str] = []
        try:
            found = ocsp_status(cert, issuer, now, timeout=self.revocation_timeout)
        except RevocationUnavailable as exc:
            failed.append(str(exc))
        else:
            self._fetched[cache_key] = (found, now + _FETCHED_LIFE)
            return found
        try:
            crl, url = fetch_crl(cert, issuer, now, timeout=self.revocation_timeout)
        except RevocationUnavailable as exc:
            failed.append(str(exc))
            # Remembered briefly too: an unreachable responder is not waited for twice in
            # one send (the sender's certificate is checked to sign and to encrypt to self).
            self._fetched[cache_key] = ("; ".join(failed), now + _UNAVAILABLE_LIFE)
            return "; ".join([*reasons, *failed])
        # Keep it (verified, current, newest wins) so the next message needs no fetch.
        with contextlib.suppress(KeystoreError, ConfigError):
            self._store_crl(crl, issuer)  # a store we cannot write to still gets the answer
        found = crl_entry(crl, cert, f"the CRL at {url}")
        self._fetched[cache_key] = (found, now + _FETCHED_LIFE)
        return found

    def _crl_path(self, issuer: x509.Certificate) -> Path:
        return self._dir("crls") / f"{issuer_key_id(issuer)}.crl"

    def _stored_crl(self, issuer: x509.Certificate) -> x509.CertificateRevocationList | None:
        """The stored CRL of ``issuer``, checked again (signature, completeness), or None.
        Raises KeystoreError for a stored CRL that cannot be used."""
        path = self._crl_path(issuer)
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._crls.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]  # parsed and checked already (a big CRL takes a while)
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeystoreError(f"cannot read the stored CRL {path}: {exc.strerror}") from exc
        try:
            crl = load_crl(data)
        except ValueError as exc:
            raise KeystoreError(f"the stored CRL {path} is unreadable") from exc
        problem = crl_issuer_problem(crl, issuer)
        if problem:
            raise KeystoreError(f"the stored CRL {path} cannot be used: {problem}")
        self._crls[path] = (stamp, crl)
        return crl

    def _store_crl(
        self, crl: x509.CertificateRevocationList, issuer: x509.Certificate
    ) -> Literal["imported", "unchanged", "older"]:
        """Store ``crl`` (already checked against ``issuer``) unless the stored one of the same
        issuer is the same or newer (higher cRLNumber, else later thisUpdate)."""
        try:
            existing = self._stored_crl(issuer)
        except KeystoreError:
            existing = None  # an unusable stored CRL is replaced by a good one
        der = crl.public_bytes(serialization.Encoding.DER)
        if existing is not None:
            if existing.public_bytes(serialization.Encoding.DER) == der:
                return "unchanged"
            if _crl_order(crl) <= _crl_order(existing):
                return "older"
        folder = self._make_dir("crls")
        path = folder / f"{issuer_key_id(issuer)}.crl"
        try:
            _write(path, der, 0o644)
        except OSError as exc:
            raise KeystoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        self._fetched.clear()
        return "imported"

    def import_crls(
        self, paths: Sequence[Path], *, now: datetime.datetime | None = None
    ) -> list[ImportedCRL]:
        """Import certificate revocation lists (PEM or DER). Each must be signed by the
        certificate of its issuer, which must be in the store already (a trust anchor, an
        untrusted CA or a chain certificate of an identity: import it first, or in the same
        ``keys import``), allowed to sign CRLs, with SHA-2 or better; delta and partial CRLs are
        refused. The newest CRL of each issuer is kept. Imported CRLs are used on every check
        whatever the revocation policy; an expired one still revokes what it lists."""
        now = now or datetime.datetime.now(datetime.UTC)
        pool: dict[str, x509.Certificate] = {}
        for stored in self.all_certs():
            for candidate in (stored.certificate, *stored.chain):
                pool.setdefault(fingerprint(candidate), candidate)
        results: list[ImportedCRL] = []
        for path in paths:
            path = Path(path)
            try:
                crls = _crls_in(path.read_bytes())
            except OSError as exc:
                raise KeystoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
            except ValueError as exc:
                raise KeystoreError(f"{path}: unreadable CRL: {exc}") from exc
            if not crls:
                raise KeystoreError(f"{path}: no certificate revocation list in it")
            for crl in crls:
                results.append(self._import_crl(crl, path, pool.values(), now))
        return results

    def _import_crl(
        self,
        crl: x509.CertificateRevocationList,
        path: Path,
        pool: Iterable[x509.Certificate],
        now: datetime.datetime,
    ) -> ImportedCRL:
        issuer_name = name_text(crl.issuer)
        candidates = [c for c in pool if c.subject == crl.issuer]
        if not candidates:
            raise KeystoreError(
                f"{path}: the CRL of {issuer_name} cannot be checked: that CA's certificate is "
                "not in the store (import it first, or in the same command)"
            )
        problems = [(c, crl_issuer_problem(crl, c)) for c in candidates]
        issuer = next((c for c, p in problems if p is None), None)
        if issuer is None:
            raise KeystoreError(f"{path}: the CRL of {issuer_name} is refused: {problems[0][1]}")
        if _utc(crl.last_update_utc) > now + datetime.timedelta(minutes=5):
            raise KeystoreError(f"{path}: the CRL of {issuer_name} is dated in the future")
        outcome = self._store_crl(crl, issuer)
        next_update = crl.next_update_utc
        return ImportedCRL(
            source=path,
            issuer=issuer_name,
            this_update=_utc(crl.last_update_utc),
            next_update=_utc(next_update) if next_update else None,
            revoked=len(crl),
            outcome=outcome,
        )

    def status(self, stored: StoredCert, now: datetime.datetime | None = None) -> str:
        """One phrase for ``keys list``: ``usable`` or why not."""
        now = now or datetime.datetime.now(datetime.UTC)
        if stored.is_ca:
            if now > stored.not_after:
                return f"expired on {stored.not_after:%Y-%m-%d}"
            if now < stored.not_before:
                return f"not yet valid (from {stored.not_before:%Y-%m-%d})"
            said = ["valid"]
            if stored.certificate.subject == _TEST_CA_NAME:
                said.append(
                    "a local test CA (`keys generate --smime --test-ca`), not for real mail"
                )
            permitted = permitted_email_subtrees(stored.certificate)
            if permitted:
                said.append("may certify only addresses at " + ", ".join(permitted))
            return "; ".join(said)
        address = stored.addresses[0] if stored.addresses else None
        if address is None:
            return "no email address in the certificate"
        enc = self.check(stored.certificate, address, purpose="encrypt", now=now)
        if stored.kind is not CertKind.IDENTITY:
            return "usable" if enc is None else _phrase(enc)
        sig = self.check(stored.certificate, address, purpose="sign", now=now)
        if sig is not None:
            return _phrase(sig)
        if enc is None:
            return "usable"
        if enc.reason is KeyReason.UNSUPPORTED:
            return "usable for signing only (encryption needs an RSA certificate)"
        return f"usable for signing only: {_phrase(enc)}"

    # -- Choosing certificates --------------------------------------------------------------

    def recipient_cert(
        self,
        address: str,
        *,
        key_map: Mapping[str, str] | None = None,
        trusted_self_signed: Iterable[str] = (),
        now: datetime.datetime | None = None,
        revocation: RevocationPolicy = RevocationPolicy.OFF,
    ) -> StoredCert | KeyProblem:
        """The certificate to encrypt to ``address``, or why there is none.

        ``key_map`` (address -> fingerprint) chooses the certificate instead of lookup by
        address; the certificate must still name the address (RFC 8550 §3). ``revocation``:
        see :meth:`check`.
        """
        return self._choose(
            address, key_map, trusted_self_signed, now, purpose="encrypt", revocation=revocation
        )

    def signer_cert(
        self,
        address: str,
        *,
        key_map: Mapping[str, str] | None = None,
        trusted_self_signed: Iterable[str] = (),
        now: datetime.datetime | None = None,
        revocation: RevocationPolicy = RevocationPolicy.OFF,
    ) -> StoredCert | KeyProblem:
        """The identity (certificate with a private key) to sign as ``address``. A revoked
        one is refused like any other unusable one (``revocation``: see :meth:`check`)."""
        return self._choose(
            address, key_map, trusted_self_signed, now, purpose="sign", revocation=revocation
        )

    def _choose(
        self,
        address: str,
        key_map: Mapping[str, str] | None,
        trusted_self_signed: Iterable[str],
        now: datetime.datetime | None,
        *,
        purpose: Purpose,
        revocation: RevocationPolicy,
    ) -> StoredCert | KeyProblem:
        addr = address.strip().lower()
        now = now or datetime.datetime.now(datetime.UTC)
        trusted = tuple(trusted_self_signed)
        override = (key_map or {}).get(addr)
        if override is not None:
            mapped = self.get(override)
            if mapped is None:
                return KeyProblem(addr, KeyReason.NOT_FOUND, f"mapped certificate {override}")
            candidates: Sequence[StoredCert] = (mapped,)
        else:
            candidates = self.find(addr)
            if not candidates:
                return KeyProblem(addr, KeyReason.NOT_FOUND, "no S/MIME certificate")
        if purpose == "sign":
            own = [c for c in candidates if c.kind is CertKind.IDENTITY]
            if not own:
                return KeyProblem(
                    addr,
                    KeyReason.NO_SECRET_KEY,
                    "no S/MIME identity (certificate with its private key)",
                    candidates[0].fingerprint,
                )
            candidates = own
        judged = [
            (
                c,
                self.check(
                    c.certificate,
                    addr,
                    purpose=purpose,
                    now=now,
                    trusted_self_signed=trusted,
                    intermediates=c.chain,
                    revocation=revocation,
                ),
            )
            for c in candidates
        ]
        usable = [c for c, p in judged if p is None]
        if usable:
            # Renewals leave several good certificates: the one valid longest wins.
            return max(usable, key=lambda c: (c.not_after, c.fingerprint))
        _, worst = max(judged, key=lambda cp: (cp[0].not_after, cp[0].fingerprint))
        assert worst is not None
        return worst

    def resolve_recipients(
        self,
        addresses: Iterable[str],
        *,
        key_map: Mapping[str, str] | None = None,
        trusted_self_signed: Iterable[str] = (),
        revocation: RevocationPolicy = RevocationPolicy.OFF,
    ) -> tuple[dict[str, StoredCert], list[KeyProblem]]:
        """Certificates for every address, and a problem for each address that has none
        (``revocation``: see :meth:`check`)."""
        found: dict[str, StoredCert] = {}
        problems: list[KeyProblem] = []
        now = datetime.datetime.now(datetime.UTC)
        for address in addresses:
            choice = self.recipient_cert(
                address,
                key_map=key_map,
                trusted_self_signed=trusted_self_signed,
                now=now,
                revocation=revocation,
            )
            if isinstance(choice, KeyProblem):
                problems.append(choice)
            else:
                found[address.strip().lower()] = choice
        return found, problems

    # -- Private keys -----------------------------------------------------------------------

    def signer_key(self, identity: StoredCert, passphrase: str | None = None) -> SignerKey:
        """The identity's certificate, unlocked private key and chain. Raises PassphraseError
        (``missing`` when the key is protected and no passphrase was given).

        The unlocked key is cached for the passphrase that unlocked it (repeated sends decrypt
        once); any other passphrase, or none, is judged against the key file again."""
        key_path = self._key_path(identity)
        try:
            st = key_path.stat()
        except OSError as exc:
            raise KeystoreError(f"cannot read {key_path}: {exc.strerror or exc}") from exc
        cache_key = (identity.fingerprint, st.st_ino, st.st_mtime_ns)
        tag = self._passphrase_tag(passphrase)
        cached = self._keys.get(cache_key)
        if cached is not None and (
            cached[1] is None or (tag is not None and hmac.compare_digest(cached[1], tag))
        ):
            key = cached[0]
        else:
            key, encrypted = self._unlock(identity, passphrase)
            self._keys[cache_key] = (key, tag if encrypted else None)
        chain = tuple(c for c in identity.chain if not _self_signed(c))
        return SignerKey(certificate=identity.certificate, private_key=key, chain=chain)

    def _passphrase_tag(self, passphrase: str | None) -> bytes | None:
        if not passphrase:
            return None
        return hashlib.blake2b(passphrase.encode(), key=self._pw_secret).digest()

    @staticmethod
    def _key_path(identity: StoredCert) -> Path:
        if identity.key_path is None:
            raise KeystoreError(f"{identity.subject} has no private key here")
        return identity.key_path

    def _unlock(self, identity: StoredCert, passphrase: str | None) -> tuple[PrivateKey, bool]:
        """The identity's private key read from its file (never the cache), and whether the
        file is passphrase-protected."""
        key_path = self._key_path(identity)
        try:
            data = key_path.read_bytes()
        except OSError as exc:
            raise KeystoreError(f"cannot read {key_path}: {exc.strerror or exc}") from exc
        key = self._load_key(data, passphrase, identity)
        if _spki(key.public_key()) != _spki(identity.certificate.public_key()):
            raise KeystoreError(f"{key_path} does not belong to its certificate")
        return key, b"ENCRYPTED PRIVATE KEY" in data

    @staticmethod
    def _load_key(data: bytes, passphrase: str | None, identity: StoredCert) -> PrivateKey:
        fpr = identity.fingerprint
        encrypted = b"ENCRYPTED PRIVATE KEY" in data
        if encrypted and not passphrase:
            raise PassphraseError(
                f"the S/MIME key of {identity.subject} is protected by a passphrase and none "
                "was given",
                fingerprint=fpr,
                missing=True,
            )
        try:
            key = serialization.load_pem_private_key(
                data, password=passphrase.encode() if encrypted and passphrase else None
            )
        except ValueError as exc:
            if encrypted:
                raise PassphraseError(
                    f"wrong passphrase for the S/MIME key of {identity.subject}", fingerprint=fpr
                ) from None
            raise KeystoreError(f"unreadable key {identity.key_path}: {exc}") from exc
        return _check_key_type(key, identity.key_path or Path("?"))

    # -- Import -----------------------------------------------------------------------------

    def import_files(
        self,
        paths: Sequence[Path],
        *,
        trust: bool = False,
        passphrase: PasswordSource | None = None,
        crls: bool = True,
    ) -> ImportResult:
        """Import X.509 material: certificates (PEM, DER, PKCS#7), PKCS#12 bundles and PEM
        private keys, which are paired with the certificate of the same public key from any of
        ``paths`` (so ``cert.pem key.pem`` works as well as one combined file); and CRLs (PEM or
        DER), after the certificates, so a CA and its CRL can come together (see
        :meth:`import_crls`; they are listed in the result's ``crls``). ``crls=False`` leaves
        CRLs for a later :meth:`import_crls`, once other certificates (``--trust``) are in.

        A key with its certificate becomes an identity (its CA certificates become its chain);
        other end-entity certificates become recipients' certificates and CA certificates are
        kept, untrusted, for path building. With ``trust``, every certificate becomes a trust
        anchor instead (CA certificates, or self-signed ones you trust by name) and keys are
        refused. ``passphrase`` (asked at most once, only if a file needs it) opens protected
        PKCS#12 files and PEM keys; the key is stored under that same passphrase.
        """
        asker = _Asker(passphrase)
        material = _Material(certs=[], keys=[], bundles=[])
        for path in paths:
            self._read_material(Path(path), material, asker)
        if trust and (material.keys or material.bundles):
            raise KeystoreError("--trust takes certificates only, not private keys or PKCS#12")
        identities: list[
            tuple[PrivateKey, x509.Certificate, list[x509.Certificate], Path, str | None]
        ]
        identities = list(material.bundles)
        by_spki = {_spki(c.public_key()): (c, p) for c, p in material.certs if not _is_ca(c)}
        used: set[str] = set()
        cas = [c for c, _ in material.certs if _is_ca(c)]
        for key, source, pw in material.keys:
            match = by_spki.get(_spki(key.public_key()))
            if match is None:
                raise KeystoreError(
                    f"{source}: no certificate for this private key (give its certificate too)"
                )
            identities.append((key, match[0], cas, source, pw))
            used.add(fingerprint(match[0]))
        results: list[ImportedCert] = []
        for key, cert, extra, source, pw in identities:
            chain = [c for c in extra if _is_ca(c) and c != cert]
            results.append(self._store_identity(key, cert, chain, source, pw))
            for ca in chain:
                results.append(self._store_cert(ca, source, CertKind.INTERMEDIATE))
        for cert, source in material.certs:
            if fingerprint(cert) in used:
                continue
            if trust:
                kind = CertKind.TRUSTED
            else:
                kind = CertKind.INTERMEDIATE if _is_ca(cert) else CertKind.CERTIFICATE
            results.append(self._store_cert(cert, source, kind))
        self.invalidate()
        crl_paths = [Path(p) for p in paths if crls and holds_crl(Path(p))]
        return ImportResult(results, self.import_crls(crl_paths) if crl_paths else ())

    def _read_material(self, path: Path, out: _Material, asker: _Asker) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeystoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
        blocks = list(_PEM_BLOCK.finditer(data))
        if blocks:
            found = False
            for block in blocks:
                label, pem = block.group(1), block.group(0)
                if label == b"CERTIFICATE":
                    try:
                        cert = x509.load_pem_x509_certificate(pem)
                    except ValueError as exc:
                        raise KeystoreError(f"{path}: unreadable certificate: {exc}") from exc
                    out.certs.append((cert, path))
                    found = True
                elif label == b"PKCS7":
                    try:
                        certs = pkcs7.load_pem_pkcs7_certificates(pem)
                    except ValueError as exc:
                        raise KeystoreError(f"{path}: unreadable PKCS#7: {exc}") from exc
                    out.certs.extend((c, path) for c in certs)
                    found = True
                elif label.endswith(b"PRIVATE KEY"):
                    out.keys.append(self._read_pem_key(pem, path, asker))
                    found = True
                elif label == b"X509 CRL":
                    found = True  # CRLs are imported after the certificates
            if not found:
                raise KeystoreError(f"{path}: no certificate or private key in the PEM file")
            return
        if data[:1] != b"\x30":
            raise KeystoreError(f"{path}: not a certificate, PKCS#12 or PEM file")
        der_certs = _load_der(data)
        if der_certs is not None:
            out.certs.extend((c, path) for c in der_certs)
            return
        if _crls_in(data):
            return  # a DER CRL: imported after the certificates
        out.bundles.append(self._read_pkcs12(data, path, asker))

    @staticmethod
    def _read_pem_key(pem: bytes, path: Path, asker: _Asker) -> tuple[PrivateKey, Path, str | None]:
        encrypted = b"ENCRYPTED" in pem or b"Proc-Type: 4,ENCRYPTED" in pem
        password = asker.get(f"the private key in {path}") if encrypted else None
        try:
            key = serialization.load_pem_private_key(
                pem, password=password.encode() if password else None
            )
        except (ValueError, TypeError) as exc:
            if encrypted:
                raise PassphraseError(f"wrong passphrase for the private key in {path}") from None
            raise KeystoreError(f"{path}: unreadable private key: {exc}") from exc
        return _check_key_type(key, path), path, password or None

    @staticmethod
    def _read_pkcs12(
        data: bytes, path: Path, asker: _Asker
    ) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate], Path, str | None]:
        loaded = None
        used: str | None = None
        for attempt in (None, b""):
            try:
                loaded = pkcs12.load_key_and_certificates(data, attempt)
                break
            except (ValueError, TypeError):
                continue
        if loaded is None:
            used = asker.get(f"the PKCS#12 file {path}")
            try:
                loaded = pkcs12.load_key_and_certificates(data, used.encode())
            except (ValueError, TypeError):
                raise PassphraseError(
                    f"wrong passphrase for {path} (or it is not a PKCS#12 file)"
                ) from None
            except UnsupportedAlgorithm as exc:
                raise KeystoreError(f"{path}: unsupported PKCS#12 encryption: {exc}") from exc
        key, cert, extra = loaded
        if key is None or cert is None:
            raise KeystoreError(f"{path}: the PKCS#12 file lacks a private key or its certificate")
        key = _check_key_type(key, path)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise KeystoreError(f"{path}: the private key does not match the certificate")
        return key, cert, list(extra), path, used or None

    def _store_identity(
        self,
        key: PrivateKey,
        cert: x509.Certificate,
        chain: Sequence[x509.Certificate],
        source: Path,
        passphrase: str | None,
    ) -> ImportedCert:
        folder = self._make_dir("identities")
        fpr = fingerprint(cert)
        pem_path, key_path = folder / f"{fpr}.pem", folder / f"{fpr}.key"
        new = not pem_path.exists()
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase.encode())
            if passphrase
            else serialization.NoEncryption()
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        try:
            _write(key_path, key_pem, 0o600)
            _write(pem_path, _cert_pem([cert, *chain]), 0o644)
        except OSError as exc:
            raise KeystoreError(f"cannot write {folder}: {exc.strerror or exc}") from exc
        self.invalidate()
        stored = StoredCert(cert, CertKind.IDENTITY, pem_path, tuple(chain), key_path)
        return ImportedCert(source=source, stored=stored, new=new)

    def _store_cert(self, cert: x509.Certificate, source: Path, kind: CertKind) -> ImportedCert:
        folder = self._make_dir({v: k for k, v in self._DIRS}[kind])
        path = folder / f"{fingerprint(cert)}.pem"
        new = not path.exists()
        if new:
            try:
                _write(path, _cert_pem([cert]), 0o644)
            except OSError as exc:
                raise KeystoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        self.invalidate()
        return ImportedCert(source=source, stored=StoredCert(cert, kind, path), new=new)

    # -- Export -----------------------------------------------------------------------------

    def export_pem(self, stored: StoredCert) -> bytes:
        """The certificate and its chain, PEM (public material only)."""
        return _cert_pem([stored.certificate, *stored.chain])

    def export_pkcs12(
        self,
        identity: StoredCert,
        *,
        passphrase: str | None,
        export_passphrase: str,
        legacy: bool = False,
    ) -> bytes:
        """The identity as a PKCS#12 bundle (key, certificate, chain) protected by
        ``export_passphrase``, for mail clients. AES-256 (PBES2) by default, which Thunderbird,
        current Outlook and macOS read; ``legacy`` uses 3DES with a SHA-1 MAC for older
        readers (macOS before 14, gpgsm 2.2), at the cost of weaker protection at rest.

        The key is read from its file, never from the unlock cache: exporting a protected key
        takes its ``passphrase`` every time."""
        if not export_passphrase:
            raise KeystoreError("a PKCS#12 export needs a passphrase")
        private_key, _ = self._unlock(identity, passphrase)
        name = (identity.addresses[0] if identity.addresses else identity.subject).encode()
        encryption: serialization.KeySerializationEncryption
        if legacy:
            encryption = (
                serialization.PrivateFormat.PKCS12.encryption_builder()
                .kdf_rounds(100_000)
                .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                .hmac_hash(hashes.SHA1())  # noqa: S303 - what legacy readers understand
                .build(export_passphrase.encode())
            )
        else:
            encryption = serialization.BestAvailableEncryption(export_passphrase.encode())
        return pkcs12.serialize_key_and_certificates(
            name, private_key, identity.certificate, list(identity.chain) or None, encryption
        )

    # -- Generation (for testing S/MIME without a commercial certificate) ------------------------

    def generate_identity(
        self,
        address: str,
        *,
        name: str = "",
        algorithm: str = "rsa3072",
        test_ca: bool = False,
        lifetime: str = "2y",
        passphrase: str | None = None,
    ) -> StoredCert:
        """Make an identity for ``address``: self-signed, or issued by this home's local test
        CA (created on first use, valid one year, name-constrained to the domains it issued
        for; a new domain re-issues it, see the module documentation). Either way it is made a
        trust anchor here (the self-signed certificate itself, or the test CA), since you made
        it yourself.

        ``algorithm``: ``rsa2048``, ``rsa3072`` (default), ``rsa4096`` or ``ecdsa-p256``
        (signing only: ``cryptography`` cannot encrypt to EC keys).
        """
        try:
            addr = Address(address).addr_spec
        except MessageError as exc:
            raise KeystoreError(f"invalid address {address!r}: {exc}") from exc
        if any(c in name for c in "\r\n\0"):
            raise KeystoreError("invalid character in the name")
        days = _parse_lifetime(lifetime)
        key = _new_key(algorithm)
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name or addr),
                x509.NameAttribute(NameOID.EMAIL_ADDRESS, addr),
            ]
        )
        if test_ca:
            ca_cert, ca_key = self._test_ca(addr.rpartition("@")[2].lower())
            issuer, signing_key = ca_cert.subject, ca_key
            not_after = min(now + datetime.timedelta(days=days), _utc(ca_cert.not_valid_after_utc))
        else:
            issuer, signing_key, ca_cert = subject, key, None
            not_after = now + datetime.timedelta(days=days)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(addr)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(signing_key, hashes.SHA256())
        source = Path("(generated)")
        stored = self._store_identity(key, cert, [], source, passphrase).stored
        if ca_cert is None:
            self._store_cert(cert, source, CertKind.TRUSTED)
        self.invalidate()
        return stored

    def _test_ca(self, domain: str) -> tuple[x509.Certificate, PrivateKey]:
        """This home's local test CA, able to certify addresses at ``domain``: made on first
        use (or when the old one is about to expire), re-issued under the same key and name
        with ``domain`` added to its name constraints when needed, and trusted here."""
        folder = self._make_dir("testca")
        cert_path, key_path = folder / "ca.pem", folder / "ca.key"
        now = datetime.datetime.now(datetime.UTC)
        old: x509.Certificate | None = None
        if cert_path.is_file() and key_path.is_file():
            try:
                old = x509.load_pem_x509_certificate(cert_path.read_bytes())
                loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
            except (OSError, ValueError, TypeError) as exc:
                raise KeystoreError(f"unreadable test CA in {folder}: {exc}") from exc
            key = _check_key_type(loaded, key_path)
            if _spki(key.public_key()) != _spki(old.public_key()):
                raise KeystoreError(f"{key_path} does not belong to {cert_path}")
        if old is not None and _utc(old.not_valid_after_utc) > now + datetime.timedelta(days=1):
            permitted = permitted_email_subtrees(old)
            if permitted is not None and domain in permitted:
                return old, key
            # A new domain, or a CA from before name constraints (then constrained to what it
            # issued here): same key and name, so identities it issued stay valid.
            domains = permitted if permitted is not None else self._issued_domains(old)
            cert = _test_ca_cert(
                key,
                (*domains, domain),
                name=old.subject,
                not_before=_utc(old.not_valid_before_utc),
                not_after=min(_utc(old.not_valid_after_utc), now + _TEST_CA_LIFE),
            )
            new_key = False
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
            cert = _test_ca_cert(
                key,
                (domain,),
                not_before=now - datetime.timedelta(minutes=5),
                not_after=now + _TEST_CA_LIFE,
            )
            new_key = True
        try:
            if new_key:
                # A throwaway CA for testing: its key is unencrypted, 0600, never for real mail;
                # its name constraints and short life bound what a copy of it can do.
                _write(
                    key_path,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    0o600,
                )
            _write(cert_path, _cert_pem([cert]), 0o644)
            if old is not None:
                # The superseded certificate stops being a trust anchor here.
                (self._dir("trust") / f"{fingerprint(old)}.pem").unlink(missing_ok=True)
        except OSError as exc:
            raise KeystoreError(f"cannot write {folder}: {exc.strerror or exc}") from exc
        self._store_cert(cert, cert_path, CertKind.TRUSTED)
        return cert, key

    def _issued_domains(self, ca: x509.Certificate) -> tuple[str, ...]:
        """The domains of this home's identities issued by ``ca``."""
        domains: list[str] = []
        for stored in self.identities():
            cert = stored.certificate
            if cert.issuer != ca.subject or _self_signed(cert):
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            domains += [a.rpartition("@")[2].lower() for a in cert_addresses(cert)]
        return tuple(dict.fromkeys(domains))

    def test_ca_cert(self) -> Path | None:
        """The local test CA's certificate file, if one was made."""
        path = self._dir("testca") / "ca.pem"
        return path if path.is_file() else None


#: How long the local test CA lives (its identities end no later).
_TEST_CA_LIFE = datetime.timedelta(days=365)
_TEST_CA_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "e2email"),
        x509.NameAttribute(NameOID.COMMON_NAME, "e2email local test CA (not for real mail)"),
    ]
)


def _test_ca_cert(
    key: PrivateKey,
    domains: Sequence[str],
    *,
    name: x509.Name = _TEST_CA_NAME,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """The local test CA's self-signed certificate, allowed to certify only mailboxes at
    ``domains`` (nameConstraints with rfc822Name permitted subtrees, RFC 5280 §4.2.1.10; other
    name forms are left alone, S/MIME needs none) and no further CA (pathLenConstraint 0), so
    nothing it signs can widen that.

    The extension is not marked critical, although RFC 5280 asks CAs to: gpgsm 2.2 refuses
    every chain through a CA with a critical nameConstraints ("critical certificate extension
    2.5.29.30 is not supported"), while verifiers that implement name constraints (e2email's
    own, OpenSSL; tested) enforce it either way."""
    permitted: list[x509.GeneralName] = [x509.RFC822Name(d) for d in dict.fromkeys(domains)]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.NameConstraints(permitted, None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _new_key(algorithm: str) -> PrivateKey:
    if algorithm in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[3:]))
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise KeystoreError(
        f"unknown S/MIME key algorithm {algorithm!r} (rsa2048, rsa3072, rsa4096, ecdsa-p256)"
    )


def _phrase(problem: KeyProblem) -> str:
    return f"{problem.reason.value} ({problem.detail})" if problem.detail else problem.reason.value


def _eku_for_email(
    _policy: object, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    # RFC 8550 §4.4.4: where extended key usage is constrained, it must allow email protection.
    if eku is not None and not _EMAIL_EKUS & set(eku):
        raise ValueError("extended key usage does not include emailProtection")


# The web-PKI profile (basicConstraints, keyUsage keyCertSign, ...) for CAs and leaves, except
# that extended key usage means emailProtection rather than TLS client authentication, and an
# end-entity certificate may lack an authorityKeyIdentifier (older corporate CAs omit it).
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_for_email
)
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_for_email)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
)


def _email_constraint_matches(constraint: str, address: str, *, excluding: bool) -> bool:
    """Whether an rfc822Name name constraint covers ``address`` (RFC 5280 §4.2.1.10): a full
    mailbox (``bob@evil.example``) that mailbox, a host (``evil.example``) every mailbox at
    it, ``.evil.example`` every mailbox at its subdomains. Domains compare without case
    (RFC 5280 §7.5). Local parts are case-sensitive in principle (RFC 5321 §2.4) but every
    real mail system treats ``BOB`` and ``bob`` as one mailbox, so each side fails closed: an
    excluded mailbox excludes every spelling of it, a permitted one permits only its own."""
    local, _, domain = address.rpartition("@")
    domain = domain.lower()
    if "@" in constraint:
        c_local, _, c_domain = constraint.rpartition("@")
        if c_domain.lower() != domain:
            return False
        return c_local.casefold() == local.casefold() if excluding else c_local == local
    if constraint.startswith("."):
        return domain.endswith(constraint.lower())
    return domain == constraint.lower()


def _email_constraint_violation(chain: Sequence[x509.Certificate]) -> str | None:
    """Check the rfc822Name name constraints of every CA of a verified ``chain`` (leaf first)
    against the mailboxes of the certificates below it, as stated in them.

    ``cryptography``'s verifier checks them too, but compares a full-mailbox constraint's local
    part case-sensitively, so an excluded ``bob@evil.example`` let ``BOB@evil.example`` through
    while e2email looks addresses up without case: that certificate would then be used for
    bob@evil.example. This check closes that gap (and repeats the rest, to fail closed)."""
    for position, ca in enumerate(chain[1:], start=1):
        try:
            constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        except ValueError:
            return f"unreadable name constraints in {name_text(ca.subject)}"
        permitted = [
            n.value for n in constraints.permitted_subtrees or () if isinstance(n, x509.RFC822Name)
        ]
        excluded = [
            n.value for n in constraints.excluded_subtrees or () if isinstance(n, x509.RFC822Name)
        ]
        if not (permitted or excluded):
            continue
        for below in chain[:position]:
            if below is not chain[0] and below.issuer == below.subject:
                continue  # self-issued CA certificates are exempt (RFC 5280 §6.1.3 (b))
            try:
                san = below.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except (x509.ExtensionNotFound, ValueError):
                continue
            for name in san.value.get_values_for_type(x509.RFC822Name):
                who = name_text(ca.subject)
                if "@" not in name:
                    return f"{name!r} is not a mailbox, yet {who} constrains addresses"
                hit = next(
                    (c for c in excluded if _email_constraint_matches(c, name, excluding=True)),
                    None,
                )
                if hit is not None:
                    return (
                        f"{name} is excluded ({hit}) by the name constraints of {who} "
                        "(RFC 5280 §4.2.1.10)"
                    )
                if permitted and not any(
                    _email_constraint_matches(c, name, excluding=False) for c in permitted
                ):
                    return (
                        f"{name} is outside what {who} may certify (name constraints, "
                        "RFC 5280 §4.2.1.10)"
                    )
    return None


#: How long a fetched status is reused by one store (one send checks a certificate twice:
#: as signer and for encrypt-to-self; a batch checks shared intermediates for every row).
_FETCHED_LIFE = datetime.timedelta(minutes=10)
#: How long "could not be reached" is remembered (short: the network may come back).
_UNAVAILABLE_LIFE = datetime.timedelta(minutes=1)


@dataclass(frozen=True)
class _Refused:
    """A revocation check that must refuse whatever the policy (an unusable stored CRL)."""

    why: str


def _crl_order(crl: x509.CertificateRevocationList) -> tuple[int, datetime.datetime]:
    """Which of two CRLs of one issuer is newer: cRLNumber (RFC 5280 §5.2.3), then thisUpdate."""
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (x509.ExtensionNotFound, ValueError):
        number = -1
    return number, _utc(crl.last_update_utc)
