"""S/MIME name constraints (RFC 5280 §4.2.1.10) on e-mail addresses: a CA's permitted and
excluded rfc822Name subtrees in mailbox, host and ``.domain`` form, whatever the case of the
address in the certificate; and addresses used exactly as the certificate states them.

Before this, ``cryptography``'s verifier compared an excluded mailbox's local part
case-sensitively while the store looked addresses up without case: a CA forbidden to certify
``bob@evil.example`` could issue ``BOB@evil.example`` and mail to bob@evil.example was
encrypted to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fixtures_smime import PKI, issue_leaf, sub_ca

from e2email import (
    KeyReason,
    Mailer,
    Message,
    Protection,
    RecipientKeyError,
    Scheme,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertStore, StoredCert, cert_addresses
from e2email.errors import KeyProblem
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer


def _store(
    pki: PKI, tmp_path: Path, san: str, *, permitted: str | None = None, excluded: str = ""
) -> tuple[CertStore, x509.Certificate]:
    """A store trusting the test root, holding a CA constrained as asked and a certificate it
    issued whose only subjectAltName is ``san`` (Bob's RSA key, so it could be encrypted to)."""
    ca, ca_key = sub_ca(
        "Constrained CA",
        pki.root,
        pki.root_key,
        permitted_email=permitted,
        excluded_email=(excluded,) if excluded else (),
    )
    leaf = issue_leaf(san, pki.bob.key, ca, ca_key)
    files = tmp_path / "in.pem"
    files.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca, leaf)))
    store = CertStore(tmp_path / "home")
    store.import_files([files])
    store.import_files([pki.root_pem], trust=True)
    return store, leaf


# (permitted, excluded, address stated in the certificate, address mailed to, usable?)
CASES = [
    # An excluded mailbox excludes every spelling of it (the bug: BOB@ went through).
    (None, "bob@evil.example", "BOB@evil.example", "bob@evil.example", False),
    (None, "bob@evil.example", "Bob@Evil.Example", "bob@evil.example", False),
    (None, "bob@evil.example", "bob@EVIL.example", "BOB@evil.example", False),
    (None, "BOB@evil.example", "bob@evil.example", "bob@evil.example", False),
    (None, "bob@evil.example", "alice@evil.example", "alice@evil.example", True),
    # Host and subdomain forms, domains without case.
    (None, "evil.example", "bob@EVIL.example", "bob@evil.example", False),
    (None, "evil.example", "bob@sub.evil.example", "bob@sub.evil.example", True),
    (None, ".evil.example", "bob@Sub.Evil.example", "bob@sub.evil.example", False),
    (None, ".evil.example", "bob@evil.example", "bob@evil.example", True),
    # Permitted: a mailbox permits only itself; host and .domain as RFC 5280 says.
    ("ann@good.example", "", "ann@GOOD.example", "ann@good.example", True),
    ("ann@good.example", "", "ANN@good.example", "ann@good.example", False),
    ("ann@good.example", "", "bob@good.example", "bob@good.example", False),
    ("good.example", "", "a@Good.Example", "a@good.example", True),
    ("good.example", "", "a@sub.good.example", "a@sub.good.example", False),
    (".good.example", "", "a@SUB.good.example", "a@sub.good.example", True),
    (".good.example", "", "a@good.example", "a@good.example", False),
]


@pytest.mark.parametrize(("permitted", "excluded", "stated", "address", "usable"), CASES)
def test_email_name_constraints_whatever_the_case(
    permitted: str | None,
    excluded: str,
    stated: str,
    address: str,
    usable: bool,
    pki: PKI,
    tmp_path: Path,
) -> None:
    store, leaf = _store(pki, tmp_path, stated, permitted=permitted, excluded=excluded)
    choice = store.recipient_cert(address)
    if usable:
        assert isinstance(choice, StoredCert), choice
        assert choice.certificate == leaf
        return
    assert isinstance(choice, KeyProblem)
    assert choice.reason is KeyReason.UNTRUSTED
    assert "name constraints" in choice.detail
    assert store.check(leaf, None, purpose="encrypt") is not None


def test_excluded_mailbox_in_other_case_sends_nothing(
    pki: PKI, tmp_path: Path, smtp_server: Callable[..., LoopbackSMTPServer]
) -> None:
    """End to end: the certificate a CA was forbidden to issue (``BOB@evil.example`` under an
    excluded ``bob@evil.example``) is refused for bob@evil.example, naming the constraint, and
    the SMTP server sees nothing."""
    store, _ = _store(pki, tmp_path, "BOB@evil.example", excluded="bob@evil.example")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem])
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    settings = SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )
    message = Message(sender="alice@example.org", to=["bob@evil.example"], text="secret")
    protection = Protection(scheme=Scheme.SMIME)
    with (
        pytest.raises(RecipientKeyError) as info,
        Mailer(
            smtp=settings, keystore=Keystore(store.home), certstore=store, protection=protection
        ) as mailer,
    ):
        mailer.send(message)
    assert [p.address for p in info.value.problems] == ["bob@evil.example"]
    assert "excluded (bob@evil.example)" in str(info.value)
    assert server.transcript == []


def test_addresses_are_used_exactly_as_the_certificate_states_them(
    pki: PKI, tmp_path: Path
) -> None:
    """A subjectAltName with spaces around the address names no address (it used to be
    trimmed into bob@example.net); a mixed-case one is kept as stated and found without case."""
    padded = issue_leaf(" bob@example.net", pki.bob.key, pki.intermediate, pki.intermediate_key)
    mixed = issue_leaf("Carol.Smith@Example.com", pki.carol.key, pki.intermediate,
                       pki.intermediate_key)  # fmt: skip
    assert cert_addresses(padded) == ()
    assert cert_addresses(mixed) == ("Carol.Smith@Example.com",)
    files = tmp_path / "in.pem"
    files.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (padded, mixed)))
    store = CertStore(tmp_path / "home")
    store.import_files([files, pki.intermediate_pem])
    store.import_files([pki.root_pem], trust=True)
    assert store.find("bob@example.net") == ()
    missing = store.recipient_cert("bob@example.net")
    assert isinstance(missing, KeyProblem) and missing.reason is KeyReason.NOT_FOUND
    judged = store.check(padded, "bob@example.net", purpose="encrypt")
    assert judged is not None and judged.reason is KeyReason.ADDRESS_MISMATCH
    found = store.recipient_cert("carol.smith@example.com")
    assert isinstance(found, StoredCert) and found.addresses == ("Carol.Smith@Example.com",)
