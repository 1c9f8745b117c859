"""Review findings on the certificate store (issue 9 part 3): each test fails on the store as
first merged. gpg is used only as the other side (the GnuPG home being migrated, the tool that
extends a key's expiry)."""

from __future__ import annotations

from pathlib import Path

import pysequoia
from fixtures_pgp import Keys
from pgp_helpers import gpg

from e2email import KeyReason
from e2email.errors import KeyProblem
from e2email.keystore import Keystore


def test_a_key_disabled_in_gpg_stays_disabled_after_migrate(keys: Keys, tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = Keystore(home)
    try:
        old.import_file(keys.bob.cert)
        gpg(home / "gnupg", "--edit-key", keys.bob.fingerprint, "disable", "quit")
        old.invalidate()
        refused = old.encryption_key("bob@example.net")
        assert isinstance(refused, KeyProblem) and refused.reason is KeyReason.DISABLED
        Keystore(home, backend="certd").migrate()
        now = Keystore(home)
        assert now.backend == "certd"
        choice = now.encryption_key("bob@example.net")
        assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.DISABLED
    finally:
        old.shutdown_agent()


def _store_key(home: Path, address: str) -> tuple[bytes, bytes]:
    """A key made in a scratch store: its public certificate and a revocation of it."""
    scratch = Keystore(home, backend="certd")
    made = scratch.generate(address, passphrase="pw")
    tsk = pysequoia.Tsk.from_bytes(scratch.secret_key_bytes(made.fingerprint) or b"")
    public = scratch.export(made.fingerprint, armor=False)
    return public, bytes(pysequoia.Cert.from_bytes(public).revoke(tsk.certifier("pw")))


def test_a_running_process_follows_the_home_to_its_store_after_migrate(tmp_path: Path) -> None:
    """A sender started before ``keys migrate`` (Django, relay, worker) must see revocations
    imported into the store afterwards, not keep reading the old GnuPG home."""
    public, revocation = _store_key(tmp_path / "scratch", "dana@example.com")
    home = tmp_path / "home"
    live = Keystore(home)
    try:
        assert live.backend == "gnupg"
        live.import_keys(public)
        assert not isinstance(live.encryption_key("dana@example.com"), KeyProblem)
        Keystore(home).migrate()
        Keystore(home).import_keys(revocation)
        choice = live.encryption_key("dana@example.com")
        assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOKED
        assert live.backend == "certd" and live.gnupg_home == home / "gnupg-engine"
    finally:
        Keystore(home, gnupg_home=home / "gnupg").shutdown_agent()
