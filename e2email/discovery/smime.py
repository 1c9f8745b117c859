"""S/MIME certificates from received signed mail (``e2email keys import MESSAGE.eml``).

That is how S/MIME users exchange certificates: a signed message carries the signer's
certificate (and usually its chain). It is taken only after

1. the signature verifies over the signed content (``openssl cms -verify -noverify``:
   ``cryptography`` loads PKCS#7 certificates but has no CMS verification API, and
   re-implementing signed-attribute checking by hand is what the checklist warns against;
   ``-noverify`` leaves the chain to step 2, so one set of trust rules applies), and
2. the certstore's own checks pass for the message's From address: the chain to a trusted
   root (with the intermediates the message carried), validity dates, key usage, the
   address in subjectAltName, key strength, imported CRLs (:meth:`CertStore.check`).

Then the signer's certificate, and the CA certificates of the message that issue its chain
(for path building), are imported as for a certificate file; any other certificate the
message carries (other people's, CAs off the chain, roots) is ignored.
"""

from __future__ import annotations

import email.utils
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from e2email.certstore import CertStore, ImportedCert, fingerprint
from e2email.errors import KeystoreError, MessageError

__all__ = ["SignerImport", "import_signer", "is_smime_signed_message"]

_SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_OPAQUE_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")


def _parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=email_policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def _signature_der(msg: EmailMessage) -> bytes | None:
    """The CMS SignedData of a multipart/signed (RFC 8551 §3.5.3) or opaque signed-data
    (§3.5.2) message, or None."""
    ctype = msg.get_content_type()
    if ctype == "multipart/signed":
        parts = list(msg.iter_parts())
        if len(parts) == 2 and parts[1].get_content_type() in _SIGNATURE_TYPES:
            data = parts[1].get_payload(decode=True)
            return data if isinstance(data, bytes) else None
        return None
    if ctype in _OPAQUE_TYPES and msg.get_param("smime-type") == "signed-data":
        data = msg.get_payload(decode=True)
        return data if isinstance(data, bytes) else None
    return None


def is_smime_signed_message(path: Path) -> bool:
    """Whether ``path`` holds a mail message signed with S/MIME (so ``keys import`` takes its
    signer certificate instead of reading it as a key file)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return False
    lowered = head.lower()
    if b"pkcs7-signature" not in lowered and b"signed-data" not in lowered:
        return False
    try:
        return _signature_der(_parse(path.read_bytes())) is not None
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class SignerImport:
    address: str
    fingerprint: str
    imported: tuple[ImportedCert, ...]
    status: str


def _ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _issuing_chain(
    signer: x509.Certificate, bag: list[x509.Certificate], *, depth: int = 8
) -> list[x509.Certificate]:
    """The CA certificates (BasicConstraints cA, RFC 5280 §4.2.1.9) of ``bag`` that issue
    ``signer``'s chain, issuer by issuer (name and signature), without the self-signed root
    (trust comes from the certstore's own anchors, never from a message). End-entity
    certificates and CA certificates off the chain are left out."""
    chain: list[x509.Certificate] = []
    current = signer
    cas = [c for c in bag if _ca(c) and c.issuer != c.subject]
    for _ in range(depth):
        issuer = None
        for candidate in cas:
            if candidate in chain or candidate.subject != current.issuer:
                continue
            try:
                current.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            issuer = candidate
            break
        if issuer is None:
            break
        chain.append(issuer)
        current = issuer
    return chain


def import_signer(store: CertStore, path: Path) -> SignerImport:
    """Verify the S/MIME signature of the message in ``path`` and import its signer's
    certificate (see the module docstring). KeystoreError when the signature does not verify
    or the certificate is refused (naming why); MessageError for a file that is not a signed
    message."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MessageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    msg = _parse(raw)
    der = _signature_der(msg)
    if der is None:
        raise MessageError(f"{path}: not an S/MIME signed message")
    senders = [a for _, a in email.utils.getaddresses([str(v) for v in msg.get_all("From", [])])]
    if len(senders) != 1 or "@" not in senders[0]:
        raise MessageError(f"{path}: the message needs exactly one From address")
    sender = senders[0].lower()
    openssl = shutil.which("openssl")
    if openssl is None:
        raise KeystoreError("verifying an S/MIME signature needs the openssl program")
    with tempfile.TemporaryDirectory(prefix="e2sv") as tmp:
        signer_pem = Path(tmp) / "signer.pem"
        message = Path(tmp) / "message.eml"
        message.write_bytes(raw)
        try:
            done = subprocess.run(
                [
                    openssl, "cms", "-verify", "-noverify", "-in", str(message),
                    "-signer", str(signer_pem), "-out", "/dev/null",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeystoreError(f"cannot run openssl: {exc}") from exc
        if done.returncode != 0 or not signer_pem.exists():
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = next((ln for ln in lines if ":error:" in ln), lines[0] if lines else "")
            # OpenSSL's line is pid:error:code:library:function:reason:file:line: say the reason.
            fields = why.split(":")
            reason = fields[5] if len(fields) > 6 and fields[1] == "error" else why.strip()
            raise KeystoreError(f"{path}: the S/MIME signature does not verify ({reason})")
        signers = x509.load_pem_x509_certificates(signer_pem.read_bytes())
    if len(signers) != 1:
        raise KeystoreError(f"{path}: {len(signers)} signers; expected one")
    signer = signers[0]
    try:
        bag = list(pkcs7.load_der_pkcs7_certificates(der))
    except ValueError:
        bag = []
    # Only the CA certificates that issue the signer's chain: the bag may hold anything the
    # sender put there (other people's certificates above all), and a signature vouches for
    # the signer alone.
    intermediates = _issuing_chain(signer, bag)
    problem = store.check(signer, sender, purpose="sign", intermediates=intermediates)
    if problem is not None:
        raise KeystoreError(f"{path}: the signer's certificate is refused: {problem}")
    with tempfile.TemporaryDirectory(prefix="e2si") as tmp:
        pem = Path(tmp) / f"{path.name}.pem"
        pem.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (signer, *intermediates))
        )
        result = store.import_files([pem], crls=False)
    stored = store.get(fingerprint(signer))
    status = store.status(stored) if stored is not None else "not stored"
    return SignerImport(sender, fingerprint(signer), tuple(result), status)
