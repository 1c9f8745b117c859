"""The S/MIME certificate store is private (issue 8 item 6): made 0700 whatever the umask, and
refused, like ssh refuses a loose ``~/.ssh``, when another user owns it or group/others may
write it (whoever can write there can swap a certificate, a trust anchor or a key)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_smime import PKI

from e2email import InsecurePathError
from e2email.certstore import CertStore


@pytest.fixture
def lax_umask() -> Iterator[None]:
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("lax_umask")
def test_store_folders_are_made_0700_whatever_the_umask(pki: PKI, tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    store = CertStore(home)
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    store.generate_identity("test@example.org", algorithm="ecdsa-p256", test_ca=True)
    made = [home, store.root, *(p for p in store.root.iterdir() if p.is_dir())]
    assert {p.name for p in made} >= {"identities", "certs", "trust", "testca", "intermediates"}
    for folder in made:
        assert _mode(folder) == 0o700, folder
    for key in store.root.glob("*/*.key"):
        assert _mode(key) == 0o600, key


@pytest.mark.parametrize("where", ["smime", "smime/trust", "smime/identities"])
def test_group_or_world_writable_store_is_refused(pki: PKI, tmp_path: Path, where: str) -> None:
    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.bob.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    loose = store.home / where
    loose.chmod(0o777 if where == "smime" else 0o770)
    fresh = CertStore(store.home)
    with pytest.raises(InsecurePathError, match="writable by group or others") as info:
        fresh.recipient_cert("bob@example.net")
    assert info.value.path == loose
    with pytest.raises(InsecurePathError):
        fresh.signer_cert("alice@example.org")
    with pytest.raises(InsecurePathError):
        fresh.import_files([pki.carol.cert_pem])
    loose.chmod(0o700)
    assert fresh.find("bob@example.net")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a folder's owner needs root")
def test_store_owned_by_another_user_is_refused(pki: PKI, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "home")
    store.import_files([pki.bob.cert_pem])
    os.chown(store.root, 65534, 65534)
    try:
        with pytest.raises(InsecurePathError, match="owned by another user"):
            CertStore(store.home).find("bob@example.net")
    finally:
        os.chown(store.root, os.geteuid(), os.getegid())
