"""Revocation of X.509 certificates for S/MIME: CRLs (RFC 5280 §5-6.3) and OCSP (RFC 6960).

:class:`~e2email.certstore.CertStore` decides; this module only reads, checks and fetches:

* a CRL is used only when its signature verifies against the certificate of its issuer (one
  that may sign CRLs, with SHA-2 or better) and it is complete: delta CRLs and indirect or
  reason-partitioned ones are refused; one scoped to CA or to end-entity certificates
  (issuingDistributionPoint) says nothing about the others;
* an OCSP response is used only when it answers for this very certificate (CertID), is
  signed by the issuer itself or by a responder the issuer certified with the OCSPSigning
  extended key usage (RFC 6960 §4.2.2.2), is current (thisUpdate not in the future,
  nextUpdate not past), and echoes our nonce when it carries one (RFC 8954; optional);
* fetching goes over plain HTTP as is normal for CRLs and OCSP (the answers are signed, and
  HTTPS would need revocation checking of its own), bounded in size and in time.

Anything that does not establish a status raises :class:`RevocationUnavailable` with the
reason; the certificate store turns that into a refusal or a shrug according to the policy.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)

__all__ = [
    "CRL_LIMIT",
    "FETCH_TIMEOUT",
    "OCSP_LIMIT",
    "RevocationUnavailable",
    "Revoked",
    "crl_covers",
    "crl_current",
    "crl_entry",
    "crl_issuer_problem",
    "fetch_crl",
    "issuer_key_id",
    "load_crl",
    "ocsp_status",
]

#: Seconds a fetch may take in all (connect, send, every read); then the status is unknown.
FETCH_TIMEOUT = 10.0
#: The largest CRL fetched (a large public CA's full CRL is a few MB).
CRL_LIMIT = 16 * 1024 * 1024
#: The largest OCSP response read (a response with a responder chain is a few kB).
OCSP_LIMIT = 64 * 1024
#: How old an OCSP response without nextUpdate may be (RFC 5019 §2.2.4 leaves it to policy).
_OCSP_MAX_AGE = datetime.timedelta(days=4)
#: Clock skew tolerated on thisUpdate (a responder's clock a little ahead of ours).
_SKEW = datetime.timedelta(minutes=5)
_WEAK = {"sha1", "md5"}


class RevocationUnavailable(Exception):
    """No revocation status could be established from this source (the text says why)."""


@dataclass(frozen=True)
class Revoked:
    """A certificate found revoked, and what the issuer said about it."""

    serial: int
    date: datetime.datetime | None
    reason: str | None
    #: Where it was said: ``the stored CRL``, ``the CRL at URL``, ``OCSP at URL``.
    source: str


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _name(name: x509.Name) -> str:
    return name.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})


def issuer_key_id(issuer: x509.Certificate) -> str:
    """A file-name-safe key for the CRLs of ``issuer``: its name and public key (a CA
    re-issued under the same name and key keeps its CRLs; another key with the same name
    does not get them)."""
    spki = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(issuer.subject.public_bytes() + b"\0" + spki).hexdigest()[:40]


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from PEM or DER bytes (ValueError when it is neither)."""
    if b"-----BEGIN X509 CRL-----" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


# -- CRLs ---------------------------------------------------------------------------------------


def crl_issuer_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    """Why ``crl`` cannot be taken as ``issuer``'s complete CRL, or None."""
    if crl.issuer != issuer.subject:
        return f"it is issued by {_name(crl.issuer)}, not {_name(issuer.subject)}"
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if not usage.crl_sign:
            return f"{_name(issuer.subject)} may not sign CRLs (keyUsage without cRLSign)"
    try:
        algorithm = crl.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "its signature algorithm is not supported"
    if algorithm is not None and algorithm.name in _WEAK:
        return f"it is signed with {algorithm.name.upper()}"
    public = issuer.public_key()
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return "its issuer's key type is not supported"
    try:
        valid = crl.is_signature_valid(public)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        return f"its signature does not verify with the key of {_name(issuer.subject)}"
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            return "it is a delta CRL (only complete CRLs are used)"
        if isinstance(ext.value, x509.IssuingDistributionPoint):
            idp = ext.value
            if idp.indirect_crl or idp.only_some_reasons or idp.only_contains_attribute_certs:
                return "it is an indirect or partial CRL (only complete CRLs are used)"
        elif ext.critical:
            return f"it has an unknown critical extension {ext.oid.dotted_string}"
    return None


def crl_covers(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    """Whether ``crl`` speaks for ``cert`` (a CRL scoped to CA or end-entity certificates by
    its issuingDistributionPoint says nothing about the others, RFC 5280 §5.2.5)."""
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return True
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return not (
        (idp.only_contains_ca_certs and not is_ca) or (idp.only_contains_user_certs and is_ca)
    )


def crl_current(crl: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    """Whether ``crl`` may be relied on *now* for certificates it does not list: issued
    already and its nextUpdate not past (a CRL without nextUpdate is never current: RFC 5280
    §5.1.2.5 requires it, and it would have to be trusted forever)."""
    next_update = crl.next_update_utc
    return (
        next_update is not None
        and _utc(crl.last_update_utc) <= now + _SKEW
        and now <= _utc(next_update)
    )


def crl_entry(
    crl: x509.CertificateRevocationList, cert: x509.Certificate, source: str
) -> Revoked | None:
    """``cert``'s revocation as ``crl`` states it (expired or not: a revocation does not
    lapse), or None when ``crl`` does not list it or does not speak for it."""
    if not crl_covers(crl, cert):
        return None
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return None
    reason: str | None = None
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        pass
    else:
        if flag is x509.ReasonFlags.remove_from_crl:
            return None  # only meaningful in delta CRLs, which are not used
        reason = flag.value
    return Revoked(cert.serial_number, _utc(entry.revocation_date_utc), reason, source)


def _uris(names: Sequence[x509.GeneralName]) -> list[str]:
    return [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) URLs of ``cert``'s CRL distribution points (complete CRLs only: points
    limited to some reasons or with another CRL issuer are left aside)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    found: list[str] = []
    for point in points:
        if point.full_name and not point.reasons and not point.crl_issuer:
            found += [u for u in _uris(point.full_name) if _fetchable(u)]
    return found


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) OCSP responder URLs of ``cert``'s authorityInfoAccess."""
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        d.access_location.value
        for d in access
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and _fetchable(d.access_location.value)
    ]


def _fetchable(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


# -- Fetching -----------------------------------------------------------------------------------


class _NoRedirectToOtherSchemes(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        # urllib would also follow a redirect to ftp://.
        if not _fetchable(newurl):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoRedirectToOtherSchemes())


def _fetch(
    url: str,
    *,
    limit: int,
    timeout: float,
    data: bytes | None = None,
    content_type: str | None = None,
) -> bytes:
    """GET (or POST ``data``) ``url`` and return the body, at most ``limit`` bytes, all within
    ``timeout`` seconds. Raises RevocationUnavailable."""
    if not _fetchable(url):
        raise RevocationUnavailable(f"{url}: only http and https are fetched")
    headers = {"User-Agent": "e2email"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - checked above
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise RevocationUnavailable(f"{url}: no complete answer in {timeout:g} s")
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise RevocationUnavailable(f"{url}: answer larger than {limit} bytes")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise RevocationUnavailable(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise RevocationUnavailable(f"{url}: {why}") from exc
    return b"".join(chunks)


def fetch_crl(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime.datetime,
    *,
    timeout: float = FETCH_TIMEOUT,
) -> tuple[x509.CertificateRevocationList, str]:
    """The current, verified CRL of ``issuer`` from ``cert``'s distribution points, and the
    URL it came from. Raises RevocationUnavailable (the reasons of every point tried)."""
    urls = crl_urls(cert)
    if not urls:
        raise RevocationUnavailable("no CRL distribution point")
    failures: list[str] = []
    for url in urls:
        try:
            data = _fetch(url, limit=CRL_LIMIT, timeout=timeout)
            try:
                crl = load_crl(data)
            except ValueError as exc:
                raise RevocationUnavailable(f"{url}: not a CRL") from exc
            problem = crl_issuer_problem(crl, issuer)
            if problem:
                raise RevocationUnavailable(f"the CRL at {url}: {problem}")
            if not crl_covers(crl, cert):
                raise RevocationUnavailable(f"the CRL at {url} does not cover this certificate")
            if not crl_current(crl, now):
                raise RevocationUnavailable(f"the CRL at {url} is out of date")
        except RevocationUnavailable as exc:
            failures.append(str(exc))
            continue
        return crl, url
    raise RevocationUnavailable("; ".join(failures))


# -- OCSP ---------------------------------------------------------------------------------------


def _verify_signature(
    public: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> bool:
    if algorithm is None or algorithm.name in _WEAK:
        return False
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(algorithm))
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING (RFC 6960 §4.2.1 ResponderID byKey)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _responder(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime.datetime
) -> x509.Certificate:
    """The certificate whose key signed ``response``: the issuer itself, or a responder the
    issuer certified for OCSP signing (RFC 6960 §4.2.2.2). Raises RevocationUnavailable."""

    def named(cert: x509.Certificate) -> bool:
        if response.responder_name is not None:
            return response.responder_name == cert.subject
        return response.responder_key_hash == _key_hash(cert)

    if named(issuer):
        return issuer
    for cert in response.certificates:
        if not named(cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise RevocationUnavailable(
                "the OCSP responder's certificate lacks the OCSPSigning extended key usage"
            ) from None
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise RevocationUnavailable(
                "the OCSP responder's certificate lacks the OCSPSigning extended key usage"
            )
        if not _utc(cert.not_valid_before_utc) <= now <= _utc(cert.not_valid_after_utc):
            raise RevocationUnavailable("the OCSP responder's certificate is not valid now")
        return cert
    raise RevocationUnavailable(
        f"the OCSP response is signed neither by {_name(issuer.subject)} nor by a responder "
        "it authorised"
    )


def ocsp_status(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime.datetime,
    *,
    timeout: float = FETCH_TIMEOUT,
) -> Revoked | None:
    """Ask ``cert``'s OCSP responders: None when one says good, a :class:`Revoked` when one
    says revoked. Raises RevocationUnavailable when none gives a valid answer (including
    "unknown")."""
    urls = ocsp_urls(cert)
    if not urls:
        raise RevocationUnavailable("no OCSP responder")
    failures: list[str] = []
    for url in urls:
        try:
            return _ask_ocsp(url, cert, issuer, now, timeout)
        except RevocationUnavailable as exc:
            failures.append(str(exc))
    raise RevocationUnavailable("; ".join(failures))


def _ask_ocsp(
    url: str,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime.datetime,
    timeout: float,
) -> Revoked | None:
    nonce = os.urandom(16)
    # SHA-1 in the CertID is what responders are required to understand (RFC 5019 §2.1.1);
    # it only names the certificate, the response's own signature is judged separately.
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
        .add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
    )
    body = _fetch(
        url,
        limit=OCSP_LIMIT,
        timeout=timeout,
        data=request.public_bytes(serialization.Encoding.DER),
        content_type="application/ocsp-request",
    )
    try:
        response = ocsp.load_der_ocsp_response(body)
    except ValueError as exc:
        raise RevocationUnavailable(f"OCSP at {url}: not an OCSP response") from exc
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise RevocationUnavailable(
            f"OCSP at {url}: {response.response_status.name.lower().replace('_', ' ')}"
        )
    signer = _responder(response, issuer, now)
    if not _verify_signature(
        signer.public_key(),
        response.signature,
        response.tbs_response_bytes,
        response.signature_hash_algorithm,
    ):
        raise RevocationUnavailable(f"OCSP at {url}: the response signature does not verify")
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        echoed = None  # many responders pre-sign answers without nonces (RFC 5019 §2.2.1)
    if echoed is not None and echoed != nonce:
        raise RevocationUnavailable(f"OCSP at {url}: the response is not for our request")
    for single in response.responses:
        if (
            single.serial_number != request.serial_number
            or single.issuer_key_hash != request.issuer_key_hash
            or single.issuer_name_hash != request.issuer_name_hash
            or single.hash_algorithm.name != request.hash_algorithm.name
        ):
            continue
        this_update = _utc(single.this_update_utc)
        next_update = single.next_update_utc
        if this_update > now + _SKEW:
            raise RevocationUnavailable(f"OCSP at {url}: the response is from the future")
        if (next_update is not None and _utc(next_update) < now) or (
            next_update is None and now - this_update > _OCSP_MAX_AGE
        ):
            raise RevocationUnavailable(f"OCSP at {url}: the response is out of date")
        status = single.certificate_status
        if status is ocsp.OCSPCertStatus.GOOD:
            return None
        if status is ocsp.OCSPCertStatus.REVOKED:
            when = single.revocation_time_utc
            flag = single.revocation_reason
            return Revoked(
                cert.serial_number,
                _utc(when) if when else None,
                flag.value if flag else None,
                f"OCSP at {url}",
            )
        raise RevocationUnavailable(f"OCSP at {url}: the responder does not know the certificate")
    raise RevocationUnavailable(f"OCSP at {url}: the response does not answer for the certificate")
