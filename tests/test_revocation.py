"""S/MIME revocation (issue 8 item 2): CRLs imported with ``keys import`` and, under
``--revocation prefer|require``, OCSP (RFC 6960) and CRL distribution points (RFC 5280
§4.2.1.13) fetched from a real loopback HTTP server, for every certificate of the chains of the
recipients and of the signer. A revoked certificate is refused naming it, and nothing reaches
the SMTP server.

CRLs and OCSP responses are real ones, made with ``cryptography`` by the test PKI's CAs.
"""

from __future__ import annotations

import datetime as dt
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from fixtures_smime import PKI, PrivateKey, issue_leaf, sub_ca

from e2email import (
    KeyReason,
    Mailer,
    Message,
    Protection,
    RecipientKeyError,
    RevocationPolicy,
    Scheme,
    SignerKeyError,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertStore, StoredCert, holds_crl, looks_like_x509
from e2email.errors import ConfigError, KeyProblem, KeystoreError
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]
NOW = dt.datetime.now(dt.UTC)
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


# -- CRLs and OCSP responses -------------------------------------------------------------------


def make_crl(
    issuer: x509.Certificate,
    key: PrivateKey,
    revoked: tuple[tuple[x509.Certificate, x509.ReasonFlags | None], ...] = (),
    *,
    number: int = 1,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update or NOW - dt.timedelta(hours=1))
        .next_update(next_update or NOW + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for cert, reason in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(NOW - dt.timedelta(days=2))
        )
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256())


@dataclass
class OCSPAnswer:
    """How the loopback responder answers for one certificate serial number."""

    status: ocsp.OCSPCertStatus
    reason: x509.ReasonFlags | None = None
    #: Signed by this (certificate, key) instead of the issuer (a delegated responder).
    signer: tuple[x509.Certificate, PrivateKey] | None = None
    next_update: dt.timedelta = dt.timedelta(days=1)
    echo_nonce: bool = True


@dataclass
class Responder:
    """A real HTTP server on 127.0.0.1 serving CRLs by path and answering OCSP POSTs at
    /ocsp for the certificates of ``issuers`` (serial -> issuer, issuer key, answer)."""

    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    answers: dict[int, tuple[x509.Certificate, x509.Certificate, PrivateKey, OCSPAnswer]] = field(
        default_factory=dict
    )
    requests: list[str] = field(default_factory=list)
    #: Set to let requests for /slow (which never get an answer otherwise) go.
    release: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.files.clear()
        self.answers.clear()
        self.requests.clear()

    def answer(self, body: bytes) -> bytes:
        request = ocsp.load_der_ocsp_request(body)
        cert, issuer, key, how = self.answers[request.serial_number]
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert,
            issuer=issuer,
            algorithm=hashes.SHA1(),
            cert_status=how.status,
            this_update=NOW - dt.timedelta(minutes=1),
            next_update=NOW + how.next_update,
            revocation_time=NOW - dt.timedelta(days=1)
            if how.status is ocsp.OCSPCertStatus.REVOKED
            else None,
            revocation_reason=how.reason,
        )
        signer_cert, signer_key = how.signer or (issuer, key)
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        if how.signer is not None:
            builder = builder.certificates([signer_cert])
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value
        except x509.ExtensionNotFound:
            pass
        else:
            echoed = nonce if how.echo_nonce else x509.OCSPNonce(os.urandom(16))
            builder = builder.add_extension(echoed, critical=False)
        return builder.sign(signer_key, hashes.SHA256()).public_bytes(DER)


@pytest.fixture(scope="module")
def responder() -> Iterator[Responder]:
    state: list[Responder] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            state[0].requests.append(f"GET {self.path}")
            if self.path == "/slow":
                state[0].release.wait(30)
            body = state[0].files.get(self.path)
            if body is None:
                self._reply(404, b"not found", "text/plain")
            else:
                self._reply(200, body, "application/pkix-crl")

        def do_POST(self) -> None:
            state[0].requests.append(f"POST {self.path}")
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/ocsp" or self.headers["Content-Type"] != "application/ocsp-request":
                self._reply(400, b"bad request", "text/plain")
                return
            try:
                answer = state[0].answer(body)
            except KeyError:
                self._reply(500, b"no answer configured", "text/plain")
                return
            self._reply(200, answer, "application/ocsp-response")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.append(Responder(url=f"http://127.0.0.1:{server.server_address[1]}"))
    yield state[0]
    state[0].release.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours http_proxy: the loopback responder must be reached directly."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _urls(ocsp_url: str | None, crl_url: str | None) -> tuple[x509.ExtensionType, ...]:
    found: list[x509.ExtensionType] = []
    if ocsp_url:
        found.append(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
                    )
                ]
            )
        )
    if crl_url:
        found.append(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(crl_url)], None, None, None
                    )
                ]
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class Chain:
    """A CA under the test root and Alice (signer) and Bob (recipient) certificates it issued,
    with their revocation URLs; written out for import."""

    ca: x509.Certificate
    ca_key: PrivateKey
    alice: x509.Certificate
    bob: x509.Certificate
    files: tuple[Path, ...]


def make_chain(
    pki: PKI,
    out: Path,
    *,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
    ca_crl_url: str | None = None,
) -> Chain:
    """Alice's identity (her RSA key) and Bob's certificate (his RSA key) under a new CA
    "Revocation Test CA" issued by the test root; the leaves point at ``ocsp_url`` and
    ``crl_url``, the CA at ``ca_crl_url`` (the root's CRL)."""
    ca, ca_key = sub_ca(
        "Revocation Test CA", pki.root, pki.root_key, extensions=_urls(None, ca_crl_url)
    )
    extensions = _urls(ocsp_url, crl_url)
    alice = issue_leaf("alice@example.org", pki.alice.key, ca, ca_key, extensions=extensions)
    bob = issue_leaf("bob@example.net", pki.bob.key, ca, ca_key, extensions=extensions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alice.pem").write_bytes(alice.public_bytes(PEM) + ca.public_bytes(PEM))
    (out / "bob.pem").write_bytes(bob.public_bytes(PEM))
    return Chain(ca, ca_key, alice, bob, (out / "alice.pem", pki.alice.key_pem, out / "bob.pem"))


def chain_store(pki: PKI, home: Path, chain: Chain) -> CertStore:
    store = CertStore(home)
    store.import_files(list(chain.files))
    store.import_files([pki.root_pem], trust=True)
    return store


def send(
    store: CertStore,
    server: LoopbackSMTPServer,
    *,
    to: str = "bob@example.net",
    **protection: object,
) -> None:
    assert server.ca_file is not None
    settings = SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )
    message = Message(sender="alice@example.org", to=[to], text="the quarterly figures")
    prot = Protection(scheme=Scheme.SMIME, **protection)  # type: ignore[arg-type]
    with Mailer(
        smtp=settings, keystore=Keystore(store.home), certstore=store, protection=prot
    ) as mailer:
        mailer.send(message)


def write_crl(path: Path, crl: x509.CertificateRevocationList, encoding: str = "pem") -> Path:
    path.write_bytes(crl.public_bytes(PEM if encoding == "pem" else DER))
    return path


# -- Imported CRLs (no network) ----------------------------------------------------------------


def test_imported_crl_refuses_a_revoked_recipient_without_any_network(
    pki: PKI, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """The intermediate's CRL lists Carol (keyCompromise): mail to Bob and Carol is refused
    naming Carol's certificate, serial, date and reason, and the SMTP server sees nothing. The
    certificates carry no revocation URL, so nothing but the imported CRL can say it; a DER CRL
    is read as well as PEM."""
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.carol.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    crl = make_crl(
        pki.intermediate, pki.intermediate_key, ((pki.carol.cert, x509.ReasonFlags.key_compromise),)
    )
    crl_file = write_crl(tmp_path / "inter.crl", crl, "der")
    assert looks_like_x509(crl_file)
    [imported] = store.import_crls([crl_file])
    assert imported.outcome == "imported" and imported.revoked == 1
    assert "e2email Test Intermediate CA" in imported.issuer

    server = smtp_server(tls="implicit")
    message_to = "carol@example.com"
    with pytest.raises(RecipientKeyError) as info:
        send(store, server, to=message_to)
    [problem] = info.value.problems
    assert (problem.address, problem.reason) == ("carol@example.com", KeyReason.REVOKED)
    said = str(info.value)
    assert f"serial {pki.carol.cert.serial_number:X}" in said
    assert "keyCompromise" in said
    assert f"{(NOW - dt.timedelta(days=2)):%Y-%m-%d}" in said
    assert "carol@example.com: key revoked" in said
    assert server.transcript == []
    # Bob is not listed: still usable, under every policy (no URL to fetch, prefer goes on).
    send(store, server, to="bob@example.net")
    send(store, server, to="bob@example.net", revocation=RevocationPolicy.PREFER)
    assert len(server.messages) == 2
    # keys list shows it too (status uses the imported CRL).
    carol = store.get(pki.carol.fingerprint)
    assert carol is not None and store.status(carol).startswith("key revoked")


def test_revoked_signer_is_refused(pki: PKI, tmp_path: Path, smtp_server: ServerFactory) -> None:
    """Our own certificate, listed in its CA's CRL: signing is refused (SignerKeyError naming
    it), signed-only and signed-and-encrypted alike, nothing sent."""
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    crl = make_crl(pki.intermediate, pki.intermediate_key, ((pki.alice.cert, None),))
    store.import_crls([write_crl(tmp_path / "inter.pem", crl)])
    server = smtp_server(tls="implicit")
    for encrypt in (False, True):
        with pytest.raises(SignerKeyError) as info:
            send(store, server, encrypt=encrypt)
        assert info.value.problem.reason is KeyReason.REVOKED
        assert f"serial {pki.alice.cert.serial_number:X}" in str(info.value)
        assert "alice@example.org" in str(info.value)
    assert server.transcript == []


def test_revoked_intermediate_is_refused_naming_it(
    pki: PKI, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """The root's CRL revokes the CA that issued Bob's certificate: Bob is refused, the
    detail naming the CA certificate (not only Bob's); the root's CRL can come in the same
    import as the certificates."""
    chain = make_chain(pki, tmp_path / "pki")
    crl = make_crl(pki.root, pki.root_key, ((chain.ca, x509.ReasonFlags.ca_compromise),))
    store = chain_store(pki, tmp_path / "home", chain)
    store.import_crls([write_crl(tmp_path / "root.crl", crl)])
    choice = store.recipient_cert("bob@example.net")
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOKED
    assert "its CA certificate CN=Revocation Test CA" in choice.detail
    assert f"serial {chain.ca.serial_number:X}" in choice.detail
    assert "cACompromise" in choice.detail
    server = smtp_server(tls="implicit")
    with pytest.raises(SignerKeyError):  # Alice's own chain goes through the same CA
        send(store, server)
    assert server.transcript == []


def test_crl_import_is_checked_and_the_newest_kept(pki: PKI, tmp_path: Path) -> None:
    """A CRL is taken only when its CA's certificate is in the store and its signature
    verifies with that CA's key; an older CRL (lower cRLNumber) never replaces a newer one;
    the same one again is unchanged."""
    store = CertStore(tmp_path / "home")
    store.import_files([pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    newer = make_crl(pki.intermediate, pki.intermediate_key, ((pki.bob.cert, None),), number=5)
    older = make_crl(pki.intermediate, pki.intermediate_key, (), number=4)
    with pytest.raises(KeystoreError, match="not in the store"):
        store.import_crls([write_crl(tmp_path / "a.crl", newer)])
    store.import_files([pki.intermediate_pem])
    forged_key = ec.generate_private_key(ec.SECP256R1())
    forged = make_crl(pki.intermediate, forged_key, (), number=9)
    with pytest.raises(KeystoreError, match="signature does not verify"):
        store.import_crls([write_crl(tmp_path / "forged.crl", forged)])
    assert [c.outcome for c in store.import_crls([tmp_path / "a.crl"])] == ["imported"]
    assert [c.outcome for c in store.import_crls([tmp_path / "a.crl"])] == ["unchanged"]
    assert [c.outcome for c in store.import_crls([write_crl(tmp_path / "o.crl", older)])] == [
        "older"
    ]
    bob = store.recipient_cert("bob@example.net")
    assert isinstance(bob, KeyProblem) and bob.reason is KeyReason.REVOKED
    with pytest.raises(KeystoreError, match="no certificate revocation list"):
        store.import_crls([pki.bob.cert_pem])
    # A damaged PEM CRL is reported, never skipped (the CLI hands it to import_crls).
    damaged = tmp_path / "damaged.pem"
    damaged.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    assert holds_crl(damaged) and looks_like_x509(damaged)
    with pytest.raises(KeystoreError, match="unreadable CRL"):
        store.import_crls([damaged])


def test_import_files_takes_a_ca_and_its_crl_together(pki: PKI, tmp_path: Path) -> None:
    """One PEM file with a CA certificate and that CA's CRL (or a DER CRL beside it): the
    library's import_files stores the CA first, then the CRL, listed in ``crls``."""
    bundle = tmp_path / "ca-and-crl.pem"
    crl = make_crl(pki.intermediate, pki.intermediate_key, ((pki.dave.cert, None),))
    bundle.write_bytes(pki.intermediate.public_bytes(PEM) + crl.public_bytes(PEM))
    store = CertStore(tmp_path / "home")
    store.import_files([pki.root_pem], trust=True)
    result = store.import_files([pki.dave.cert_pem, bundle])
    assert {i.stored.fingerprint for i in result} >= {pki.dave.fingerprint}
    assert [(c.source, c.outcome, c.revoked) for c in result.crls] == [(bundle, "imported", 1)]
    dave = store.recipient_cert("dave@example.com")
    assert isinstance(dave, KeyProblem) and dave.reason is KeyReason.REVOKED
    der = write_crl(tmp_path / "again.crl", crl, "der")
    assert [c.outcome for c in store.import_files([der]).crls] == ["unchanged"]


def test_expired_crl_still_revokes_but_vouches_for_nothing(pki: PKI, tmp_path: Path) -> None:
    """A CRL past its nextUpdate: what it lists stays revoked under every policy; the others
    are usable under off and prefer (as with no CRL), refused under require."""
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.carol.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    stale = make_crl(
        pki.intermediate,
        pki.intermediate_key,
        ((pki.carol.cert, None),),
        this_update=NOW - dt.timedelta(days=20),
        next_update=NOW - dt.timedelta(days=13),
    )
    [imported] = store.import_crls([write_crl(tmp_path / "stale.crl", stale)])
    assert imported.expired()
    for policy in RevocationPolicy:
        carol = store.recipient_cert("carol@example.com", revocation=policy)
        assert isinstance(carol, KeyProblem) and carol.reason is KeyReason.REVOKED
    for policy in (RevocationPolicy.OFF, RevocationPolicy.PREFER):
        assert isinstance(store.recipient_cert("bob@example.net", revocation=policy), StoredCert)
    bob = store.recipient_cert("bob@example.net", revocation=RevocationPolicy.REQUIRE)
    assert isinstance(bob, KeyProblem) and bob.reason is KeyReason.REVOCATION_UNKNOWN
    assert "expired" in bob.detail


# -- Fetching: OCSP and CRL distribution points over loopback HTTP ----------------------------


def test_ocsp_revoked_recipient_refused_and_good_one_sent(
    pki: PKI, tmp_path: Path, responder: Responder, smtp_server: ServerFactory
) -> None:
    """Under prefer and require, the OCSP responder named in the certificates is asked
    (a POST to /ocsp): revoked Bob is refused naming the OCSP answer, nothing sent; once the
    responder says good, the message goes out under require, the signer checked too."""
    responder.reset()
    chain = make_chain(pki, tmp_path / "pki", ocsp_url=f"{responder.url}/ocsp")
    revoked = OCSPAnswer(ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.superseded)
    good = OCSPAnswer(ocsp.OCSPCertStatus.GOOD)
    responder.answers[chain.bob.serial_number] = (chain.bob, chain.ca, chain.ca_key, revoked)
    responder.answers[chain.alice.serial_number] = (chain.alice, chain.ca, chain.ca_key, good)
    # The CA itself has no revocation URL: the root's CRL is imported, listing nothing.
    store = chain_store(pki, tmp_path / "home", chain)
    store.import_crls([write_crl(tmp_path / "root.crl", make_crl(pki.root, pki.root_key))])
    server = smtp_server(tls="implicit")
    for policy in (RevocationPolicy.PREFER, RevocationPolicy.REQUIRE):
        with pytest.raises(RecipientKeyError) as info:
            send(CertStore(store.home), server, revocation=policy)
        [problem] = info.value.problems
        assert problem.reason is KeyReason.REVOKED
        assert f"OCSP at {responder.url}/ocsp" in problem.detail
        assert "superseded" in problem.detail
    assert server.transcript == []
    assert "POST /ocsp" in responder.requests
    # Without fetching nothing says so: off sends (the documented default).
    send(CertStore(store.home), server)
    responder.answers[chain.bob.serial_number] = (chain.bob, chain.ca, chain.ca_key, good)
    send(CertStore(store.home), server, revocation=RevocationPolicy.REQUIRE)
    assert len(server.messages) == 2


def test_ocsp_response_signature_and_responder_are_checked(
    pki: PKI, tmp_path: Path, responder: Responder
) -> None:
    """A delegated responder is accepted only with the OCSPSigning EKU and certified by the
    issuer; a response signed by anyone else, stale, or echoing another nonce establishes
    nothing (refused under require)."""
    responder.reset()
    chain = make_chain(pki, tmp_path / "pki", ocsp_url=f"{responder.url}/ocsp")
    store = chain_store(pki, tmp_path / "home", chain)
    store.import_crls([write_crl(tmp_path / "root.crl", make_crl(pki.root, pki.root_key))])
    responder_key = ec.generate_private_key(ec.SECP256R1())

    def responder_cert(issuer: x509.Certificate, key: PrivateKey, *, eku: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name.from_rfc4514_string("CN=OCSP Responder"))
            .issuer_name(issuer.subject)
            .public_key(responder_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
        )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
            )
        return builder.sign(key, hashes.SHA256())

    delegated = responder_cert(chain.ca, chain.ca_key, eku=True)
    no_eku = responder_cert(chain.ca, chain.ca_key, eku=False)
    rogue_ca, rogue_key = sub_ca("Revocation Test CA", pki.root, pki.root_key)
    foreign = responder_cert(rogue_ca, rogue_key, eku=True)
    good = ocsp.OCSPCertStatus.GOOD
    cases = [
        (OCSPAnswer(good, signer=(delegated, responder_key)), None),
        (OCSPAnswer(good, signer=(no_eku, responder_key)), "OCSPSigning"),
        (OCSPAnswer(good, signer=(foreign, responder_key)), "signed neither by"),
        (OCSPAnswer(good, signer=(rogue_ca, rogue_key)), "signed neither by"),
        (OCSPAnswer(good, next_update=-dt.timedelta(hours=1)), "out of date"),
        (OCSPAnswer(good, echo_nonce=False), "not for our request"),
        (OCSPAnswer(ocsp.OCSPCertStatus.UNKNOWN), "does not know"),
    ]
    for answer, error in cases:
        for leaf in (chain.alice, chain.bob):
            responder.answers[leaf.serial_number] = (leaf, chain.ca, chain.ca_key, answer)
        fresh = CertStore(store.home)
        choice = fresh.recipient_cert("bob@example.net", revocation=RevocationPolicy.REQUIRE)
        if error is None:
            assert isinstance(choice, StoredCert), choice
            continue
        assert isinstance(choice, KeyProblem), answer
        assert choice.reason is KeyReason.REVOCATION_UNKNOWN
        assert error in choice.detail, choice.detail
        # prefer: no status established, go on.
        preferred = fresh.recipient_cert("bob@example.net", revocation=RevocationPolicy.PREFER)
        assert isinstance(preferred, StoredCert)


def test_crl_distribution_point_is_fetched_checked_and_kept(
    pki: PKI, tmp_path: Path, responder: Responder, smtp_server: ServerFactory
) -> None:
    """No OCSP: the leaves' CRL distribution point is fetched (plain HTTP, signed CRL), so is
    the CA's (the root's CRL), and Bob, listed, is refused; the fetched CRL is kept and then
    refuses Bob with fetching off and the server gone. A CRL at the distribution point signed
    by another key is not believed."""
    responder.reset()
    chain = make_chain(
        pki,
        tmp_path / "pki",
        crl_url=f"{responder.url}/ca.crl",
        ca_crl_url=f"{responder.url}/root.crl",
    )
    store = chain_store(pki, tmp_path / "home", chain)
    responder.files["/root.crl"] = make_crl(pki.root, pki.root_key).public_bytes(DER)
    forged = make_crl(chain.ca, ec.generate_private_key(ec.SECP256R1()), ())
    responder.files["/ca.crl"] = forged.public_bytes(DER)
    choice = store.recipient_cert("bob@example.net", revocation=RevocationPolicy.REQUIRE)
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOCATION_UNKNOWN
    assert "signature does not verify" in choice.detail

    listed = make_crl(chain.ca, chain.ca_key, ((chain.bob, x509.ReasonFlags.affiliation_changed),))
    responder.files["/ca.crl"] = listed.public_bytes(DER)
    server = smtp_server(tls="implicit")
    with pytest.raises(RecipientKeyError) as info:
        send(CertStore(store.home), server, sign=False, revocation=RevocationPolicy.PREFER)
    assert info.value.problems[0].reason is KeyReason.REVOKED
    assert f"the CRL at {responder.url}/ca.crl" in str(info.value)
    assert "affiliationChanged" in str(info.value)
    assert {"GET /ca.crl", "GET /root.crl"} <= set(responder.requests)
    assert server.transcript == []

    responder.reset()  # the server knows nothing any more: the kept CRL answers
    kept = CertStore(store.home).recipient_cert("bob@example.net")
    assert isinstance(kept, KeyProblem) and kept.reason is KeyReason.REVOKED
    assert responder.requests == []


def test_require_refuses_and_prefer_sends_when_nothing_answers(
    pki: PKI, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """The responder and the distribution point cannot be reached (nothing listens): require
    refuses Bob (status unknown, naming why) and the signer, nothing sent; prefer sends."""
    dead = closed_port_url()
    chain = make_chain(
        pki, tmp_path / "pki", ocsp_url=f"{dead}/ocsp", crl_url=f"{dead}/ca.crl",
        ca_crl_url=f"{dead}/root.crl",
    )  # fmt: skip
    store = chain_store(pki, tmp_path / "home", chain)
    server = smtp_server(tls="implicit")
    with pytest.raises(SignerKeyError) as signer:
        send(store, server, revocation=RevocationPolicy.REQUIRE)
    assert signer.value.problem.reason is KeyReason.REVOCATION_UNKNOWN
    with pytest.raises(RecipientKeyError) as info:
        send(store, server, sign=False, revocation=RevocationPolicy.REQUIRE)
    problem = info.value.problems[0]
    assert (problem.address, problem.reason) == ("bob@example.net", KeyReason.REVOCATION_UNKNOWN)
    assert f"{dead}/ocsp" in problem.detail and f"{dead}/ca.crl" in problem.detail
    assert server.transcript == []
    send(store, server, revocation=RevocationPolicy.PREFER)
    assert len(server.messages) == 1


def test_revocation_policy_from_the_library_and_the_command_line(
    pki: PKI, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """``Protection(revocation=...)`` takes the enum or its name and refuses others;
    ``send --smime --revocation require`` refuses (exit 3) when nothing answers, and
    ``--revocation`` without --smime is a usage error; ``keys import`` of a CRL says what it
    did."""
    assert Protection(revocation="prefer").revocation is RevocationPolicy.PREFER  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="off, prefer or require"):
        Protection(revocation="sometimes")  # type: ignore[arg-type]

    dead = closed_port_url()
    chain = make_chain(pki, tmp_path / "pki", ocsp_url=f"{dead}/ocsp")
    crl = write_crl(tmp_path / "root.crl", make_crl(pki.root, pki.root_key), "der")
    home = tmp_path / "home"

    def e2email(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "e2email", *args],
            input="",
            capture_output=True,
            text=True,
            env={**os.environ, "E2EMAIL_HOME": str(home)},
            timeout=120,
            check=False,
        )

    imported = e2email(
        "keys", "import", *map(str, chain.files), str(crl), "--trust", str(pki.root_pem)
    )
    assert imported.returncode == 0, imported.stderr
    assert f"{crl}: S/MIME CRL of CN=e2email Test Root CA: imported" in imported.stdout
    assert "0 revoked" in imported.stdout
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    base = [
        "send", "--smime", "--from", "alice@example.org", "--to", "bob@example.net",
        "--host", server.host, "--port", str(server.port), "--tls", "implicit",
        "--ca-file", str(server.ca_file), "--body", "x",
    ]  # fmt: skip
    refused = e2email(*base, "--revocation", "require")
    assert refused.returncode == 3, refused.stderr
    assert "revocation status unknown" in refused.stderr
    assert server.transcript == []
    usage = e2email(
        "send", "--revocation", "prefer", "--from", "alice@example.org", "--to", "b@example.net",
        "--output", "-", "--body", "x",
    )  # fmt: skip
    assert usage.returncode == 2 and "--revocation needs --smime" in usage.stderr
    sent = e2email(*base, "--revocation", "prefer")
    assert sent.returncode == 0, sent.stderr
    assert len(server.messages) == 1


def test_revoked_intermediate_found_through_its_distribution_point(
    pki: PKI, tmp_path: Path, responder: Responder
) -> None:
    """The CA certificate names the root's CRL at a distribution point; the CRL served there
    revokes the CA: under prefer, Bob (whose own certificate names no URL) is refused naming
    the CA; with fetching off nothing is asked and nothing says so."""
    responder.reset()
    chain = make_chain(pki, tmp_path / "pki", ca_crl_url=f"{responder.url}/root.crl")
    crl = make_crl(pki.root, pki.root_key, ((chain.ca, x509.ReasonFlags.cessation_of_operation),))
    responder.files["/root.crl"] = crl.public_bytes(DER)
    store = chain_store(pki, tmp_path / "home", chain)
    assert isinstance(store.recipient_cert("bob@example.net"), StoredCert)
    assert responder.requests == []
    choice = store.recipient_cert("bob@example.net", revocation=RevocationPolicy.PREFER)
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOKED
    assert "its CA certificate CN=Revocation Test CA" in choice.detail
    assert "cessationOfOperation" in choice.detail
    assert responder.requests == ["GET /root.crl"]


def test_fetches_are_bounded_in_size_and_time(
    pki: PKI, tmp_path: Path, responder: Responder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRL larger than the limit is not read to the end, a distribution point that never
    answers is given up after the store's revocation_timeout, anything not a CRL or an HTTP
    error establishes nothing: require refuses, naming why."""
    import e2email.revocation

    responder.reset()
    chain = make_chain(pki, tmp_path / "pki", crl_url=f"{responder.url}/ca.crl")
    store = chain_store(pki, tmp_path / "home", chain)
    store.import_crls([write_crl(tmp_path / "root.crl", make_crl(pki.root, pki.root_key))])
    big = make_crl(chain.ca, chain.ca_key, tuple((pki.bad[k].cert, None) for k in pki.bad))
    responder.files["/ca.crl"] = big.public_bytes(DER)
    monkeypatch.setattr(e2email.revocation, "CRL_LIMIT", 200)
    too_big = CertStore(store.home).recipient_cert(
        "bob@example.net", revocation=RevocationPolicy.REQUIRE
    )
    assert isinstance(too_big, KeyProblem) and "larger than 200 bytes" in too_big.detail
    monkeypatch.undo()
    responder.files["/ca.crl"] = b"this is not a CRL"
    garbled = CertStore(store.home).recipient_cert(
        "bob@example.net", revocation=RevocationPolicy.REQUIRE
    )
    assert isinstance(garbled, KeyProblem) and "not a CRL" in garbled.detail
    del responder.files["/ca.crl"]
    missing = CertStore(store.home).recipient_cert(
        "bob@example.net", revocation=RevocationPolicy.REQUIRE
    )
    assert isinstance(missing, KeyProblem) and "HTTP 404" in missing.detail

    slow_chain = make_chain(pki, tmp_path / "slow", crl_url=f"{responder.url}/slow")
    slow = chain_store(pki, tmp_path / "slow-home", slow_chain)
    slow.import_crls([write_crl(tmp_path / "root.crl", make_crl(pki.root, pki.root_key))])
    impatient = CertStore(slow.home, revocation_timeout=0.5)
    choice = impatient.recipient_cert("bob@example.net", revocation=RevocationPolicy.REQUIRE)
    assert isinstance(choice, KeyProblem)
    assert choice.reason is KeyReason.REVOCATION_UNKNOWN
    assert f"{responder.url}/slow" in choice.detail
    preferred = impatient.recipient_cert("bob@example.net", revocation=RevocationPolicy.PREFER)
    assert isinstance(preferred, StoredCert)
