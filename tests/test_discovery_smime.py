"""``e2email keys import MESSAGE.eml``: the signer certificate of a received S/MIME signed
message is taken only when the signature verifies and the certificate passes the certstore's
chain and address checks (issue 10 part 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_smime import PKI, Identity
from pgp_helpers import run

from e2email.certstore import CertStore


def _signed(tmp: Path, who: Identity, pki: PKI, *, sender: str | None = None) -> Path:
    body = tmp / "body.txt"
    body.write_bytes(b"Content-Type: text/plain\r\n\r\nhello from a signed message\r\n")
    out = tmp / f"{who.address.split('@')[0]}.eml"
    run(
        [
            "openssl", "cms", "-sign", "-in", str(body), "-signer", str(who.cert_pem),
            "-inkey", str(who.key_pem), "-certfile", str(pki.intermediate_pem),
            "-from", sender or who.address, "-to", "alice@example.org", "-subject", "hi",
            "-out", str(out),
        ]
    )  # fmt: skip
    assert b"multipart/signed" in out.read_bytes()
    return out


def e2email(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home)},
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


@pytest.fixture
def home(tmp_path: Path, pki: PKI) -> Path:
    home = tmp_path / "home"
    CertStore(home).import_files([pki.root_pem], trust=True)
    return home


def test_signer_certificate_is_imported_after_verification(
    home: Path, pki: PKI, tmp_path: Path
) -> None:
    msg = _signed(tmp_path, pki.bob, pki)
    done = e2email("keys", "import", str(msg), home=home)
    assert done.returncode == 0, done.stderr
    assert "S/MIME signature verified" in done.stdout
    stored = CertStore(home).get(pki.bob.fingerprint)
    assert stored is not None
    assert CertStore(home).status(stored) == "usable"


@pytest.mark.parametrize("case", ["tampered", "untrusted", "from-mismatch"])
def test_signer_certificate_is_refused(case: str, home: Path, pki: PKI, tmp_path: Path) -> None:
    who = pki.bad["untrusted"] if case == "untrusted" else pki.bob
    msg = _signed(
        tmp_path, who, pki, sender="mallory@example.org" if case == "from-mismatch" else None
    )
    if case == "tampered":
        msg.write_bytes(msg.read_bytes().replace(b"hello from", b"HELLO from"))
    done = e2email("keys", "import", str(msg), home=home)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    words = {
        "tampered": "does not verify",
        "untrusted": "not trusted",
        "from-mismatch": "mallory@example.org",
    }[case]
    assert words in done.stderr
    assert CertStore(home).get(who.fingerprint) is None
