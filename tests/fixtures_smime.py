"""Session-scoped S/MIME fixtures: a test PKI made once per run with ``cryptography``.

Imported by conftest.py. A root CA and an intermediate (RSA-2048, the intermediate with the
emailProtection EKU real S/MIME intermediates carry) issue:

* alice@example.org (RSA-2048 sender), alice_ec (alice@example.org, ECDSA P-256 signer)
* bob@example.net, carol@example.com, dave@example.com, erin@example.com (RSA-2048)
* bad ones: expired, not yet valid, wrong address (names mallory@example.com), untrusted issuer
  (a rogue root nobody trusts), RSA-1024, SHA-1 signed, no emailProtection EKU (clientAuth only),
  and an ECDSA P-256 recipient (cryptography cannot encrypt to it)

A second intermediate, "Partner CA" (ECDSA P-256), is name-constrained to addresses at
``partner.example`` (RFC 5280 §4.2.1.10) and issues ``constrained``: ``ok`` (ann@partner.example,
allowed), ``outside`` (SAN ceo@corp.example, a plain violation) and ``subject_email`` (no
rfc822Name in its SAN, only a dNSName, with ceo@corp.example in the subject's emailAddress, which
the constraint check never looks at: the bypass the store must not fall for).

Every identity is written as PEM certificate (leaf), PEM chain (leaf + intermediate), an
unencrypted PKCS#8 key, and a PKCS#12 bundle (legacy 3DES/SHA-1 so gpgsm 2.2 can import it)
protected by ``P12_PASSPHRASE``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2email.certstore import CertStore, fingerprint

P12_PASSPHRASE = "p12 test passphrase"
_NOW = dt.datetime.now(dt.UTC)
_KU = dict(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Identity:
    """A test certificate, its key, and the files that hold them."""

    __test__ = False

    address: str
    cert: x509.Certificate
    key: PrivateKey
    cert_pem: Path  # the certificate alone
    chain_pem: Path  # certificate + issuing intermediate
    key_pem: Path  # unencrypted PKCS#8
    p12: Path  # key + certificate + intermediate, P12_PASSPHRASE, legacy encryption

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def issuer_serial(self) -> tuple[str, int]:
        return self.cert.issuer.rfc4514_string(), self.cert.serial_number


@dataclass(frozen=True)
class PKI:
    dir: Path
    root: x509.Certificate
    root_key: rsa.RSAPrivateKey
    root_pem: Path
    intermediate: x509.Certificate
    intermediate_key: rsa.RSAPrivateKey
    intermediate_pem: Path
    rogue_root_pem: Path
    partner_ca: x509.Certificate
    partner_ca_pem: Path
    alice: Identity
    alice_ec: Identity
    bob: Identity
    carol: Identity
    dave: Identity
    erin: Identity
    #: expired, future, wrong (names mallory@), untrusted, weak, sha1, noeku, ec
    bad: dict[str, Identity] = field(default_factory=dict)
    #: under the Partner CA (permitted: partner.example): ok, outside, subject_email
    constrained: dict[str, Identity] = field(default_factory=dict)

    def recipients(self) -> list[Identity]:
        return [self.bob, self.carol, self.dave, self.erin]


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _ca(
    name: str,
    key: PrivateKey,
    issuer: x509.Certificate | None = None,
    issuer_key: PrivateKey | None = None,
    *,
    permitted_email: str | None = None,
    excluded_email: tuple[str, ...] = (),
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(
            issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - dt.timedelta(days=30))
        .not_valid_after(_NOW + dt.timedelta(days=3650))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=0 if issuer else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(**{**_KU, "key_cert_sign": True, "crl_sign": True}), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None and issuer_key is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
    if permitted_email is not None or excluded_email:
        constraints = x509.NameConstraints(
            [x509.RFC822Name(permitted_email)] if permitted_email is not None else None,
            [x509.RFC822Name(e) for e in excluded_email] or None,
        )
        builder = builder.add_extension(constraints, critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def sub_ca(
    name: str,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    permitted_email: str | None = None,
    excluded_email: tuple[str, ...] = (),
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new intermediate CA (ECDSA P-256: quick to make) under ``issuer``, optionally with
    rfc822Name name constraints and extra (non-critical) extensions."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca(
        name,
        key,
        issuer,
        issuer_key,
        permitted_email=permitted_email,
        excluded_email=excluded_email,
        extensions=extensions,
    )
    return cert, key


def issue_leaf(
    address: str,
    key: PrivateKey,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    san: str | None = None,
    san_names: list[x509.GeneralName] | None = None,
    subject_email: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.EMAIL_PROTECTION,
    sha1: bool = False,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """An end-entity S/MIME certificate for ``address`` (in subjectAltName, unless
    ``san``/``san_names`` say otherwise) issued by ``issuer``; ``sha1`` re-signs it with SHA-1."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    local = address.split("@")[0]
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, f"Test {local.title()}")]
    if subject_email is not None:
        subject.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    names = san_names if san_names is not None else [x509.RFC822Name(san or address)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or _NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(**{**_KU, "digital_signature": True, "key_encipherment": is_rsa}),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    if not sha1:
        return cert
    # cryptography refuses to sign certificates with SHA-1, so re-sign the TBS by hand with
    # the sha1WithRSAEncryption identifier (RFC 3279 §2.2.1) in place of sha256WithRSA.
    sha256_rsa = bytes.fromhex("06092A864886F70D01010B")
    sha1_rsa = bytes.fromhex("06092A864886F70D010105")
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(sha256_rsa) == 1
    tbs = tbs.replace(sha256_rsa, sha1_rsa)
    assert isinstance(issuer_key, rsa.RSAPrivateKey)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    algorithm = _der(0x30, sha1_rsa + b"\x05\x00")
    return x509.load_der_x509_certificate(
        _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write_identity(
    out: Path,
    stem: str,
    address: str,
    cert: x509.Certificate,
    key: PrivateKey,
    chain: list[x509.Certificate],
) -> Identity:
    cert_pem, chain_pem, key_pem, p12 = (
        out / f"{stem}.crt.pem",
        out / f"{stem}.chain.pem",
        out / f"{stem}.key.pem",
        out / f"{stem}.p12",
    )
    cert_pem.write_bytes(_pem(cert))
    chain_pem.write_bytes(_pem(cert, *chain))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    p12.write_bytes(legacy_p12(stem, cert, key, chain))
    return Identity(address, cert, key, cert_pem, chain_pem, key_pem, p12)


def legacy_p12(
    name: str, cert: x509.Certificate, key: PrivateKey, chain: list[x509.Certificate]
) -> bytes:
    """A PKCS#12 bundle protected by P12_PASSPHRASE with 3DES and a SHA-1 MAC: gpgsm 2.2
    cannot read PBES2/AES bundles. Each call uses fresh salts."""
    legacy = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(P12_PASSPHRASE.encode())
    )
    return pkcs12.serialize_key_and_certificates(name.encode(), key, cert, chain or None, legacy)


@pytest.fixture(scope="session")
def pki() -> Iterator[PKI]:
    out = Path(tempfile.mkdtemp(prefix="e2pki"))

    def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)

    root_key, inter_key, rogue_key = rsa_key(), rsa_key(), rsa_key()
    root = _ca("e2email Test Root CA", root_key)
    inter = _ca("e2email Test Intermediate CA", inter_key, root, root_key)
    rogue = _ca("Rogue Root CA", rogue_key)
    partner_key = ec.generate_private_key(ec.SECP256R1())  # EC: quick to make
    partner = _ca("Partner CA", partner_key, root, root_key, permitted_email="partner.example")
    (out / "root.pem").write_bytes(_pem(root))
    (out / "intermediate.pem").write_bytes(_pem(inter))
    (out / "rogue.pem").write_bytes(_pem(rogue))
    (out / "partner-ca.pem").write_bytes(_pem(partner))

    def good(stem: str, address: str, key: PrivateKey | None = None) -> Identity:
        key = key or rsa_key()
        return _write_identity(
            out, stem, address, issue_leaf(address, key, inter, inter_key), key, [inter]
        )

    shared = rsa_key()  # the bad certificates may share one key: they are refused anyway
    bad_specs: dict[str, tuple[str, x509.Certificate, PrivateKey]] = {}

    def bad(stem: str, address: str, cert: x509.Certificate, key: PrivateKey = shared) -> None:
        bad_specs[stem] = (address, cert, key)

    bad(
        "expired",
        "expired@example.com",
        issue_leaf(
            "expired@example.com",
            shared,
            inter,
            inter_key,
            not_before=_NOW - dt.timedelta(days=400),
            not_after=_NOW - dt.timedelta(days=35),
        ),
    )
    bad(
        "future",
        "future@example.com",
        issue_leaf(
            "future@example.com",
            shared,
            inter,
            inter_key,
            not_before=_NOW + dt.timedelta(days=10),
            not_after=_NOW + dt.timedelta(days=400),
        ),
    )
    bad(
        "wrong",
        "wrong@example.com",
        issue_leaf("wrong@example.com", shared, inter, inter_key, san="mallory@example.com"),
    )
    untrusted_key = rsa_key()
    bad(
        "untrusted",
        "untrusted@example.com",
        issue_leaf("untrusted@example.com", untrusted_key, rogue, rogue_key),
        untrusted_key,
    )
    weak_key = rsa_key(1024)
    bad(
        "weak",
        "weak@example.com",
        issue_leaf("weak@example.com", weak_key, inter, inter_key),
        weak_key,
    )
    bad(
        "sha1",
        "sha1@example.com",
        issue_leaf("sha1@example.com", shared, inter, inter_key, sha1=True),
    )
    bad(
        "noeku",
        "noeku@example.com",
        issue_leaf(
            "noeku@example.com", shared, inter, inter_key, eku=ExtendedKeyUsageOID.CLIENT_AUTH
        ),
    )
    ec_key = ec.generate_private_key(ec.SECP256R1())
    bad("ec", "ec@example.com", issue_leaf("ec@example.com", ec_key, inter, inter_key), ec_key)

    constrained = {
        "ok": (
            "ann@partner.example",
            issue_leaf("ann@partner.example", shared, partner, partner_key),
        ),
        "outside": (
            "ceo@corp.example",
            issue_leaf("ceo@corp.example", shared, partner, partner_key),
        ),
        "subject_email": (
            "ceo@corp.example",
            issue_leaf(
                "ceo@corp.example",
                shared,
                partner,
                partner_key,
                san_names=[x509.DNSName("mail.partner.example")],
                subject_email="ceo@corp.example",
            ),
        ),
    }

    made = PKI(
        dir=out,
        root=root,
        root_key=root_key,
        root_pem=out / "root.pem",
        intermediate=inter,
        intermediate_key=inter_key,
        intermediate_pem=out / "intermediate.pem",
        rogue_root_pem=out / "rogue.pem",
        partner_ca=partner,
        partner_ca_pem=out / "partner-ca.pem",
        alice=good("alice", "alice@example.org"),
        alice_ec=good("alice-ec", "alice@example.org", ec.generate_private_key(ec.SECP256R1())),
        bob=good("bob", "bob@example.net"),
        carol=good("carol", "carol@example.com"),
        dave=good("dave", "dave@example.com"),
        erin=good("erin", "erin@example.com"),
        bad={
            stem: _write_identity(
                out,
                stem,
                address,
                cert,
                key,
                [rogue] if stem == "untrusted" else [inter],
            )
            for stem, (address, cert, key) in bad_specs.items()
        },
        constrained={
            stem: _write_identity(out, f"nc-{stem}", address, cert, shared, [partner])
            for stem, (address, cert) in constrained.items()
        },
    )
    yield made
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def smime_store(pki: PKI) -> Iterator[CertStore]:
    """A sender's S/MIME store: Alice's identity (from her PEM key + chain, unprotected),
    every recipient's certificate (good and bad), and the test root as the one trust anchor."""
    home = Path(tempfile.mkdtemp(prefix="e2sm"))
    store = CertStore(home)
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem])
    store.import_files([i.cert_pem for i in (*pki.recipients(), *pki.bad.values())])
    store.import_files([pki.root_pem], trust=True)
    yield store
    shutil.rmtree(home, ignore_errors=True)
