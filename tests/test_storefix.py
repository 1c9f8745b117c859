"""Review findings on the certificate store (issue 9 part 3): each test fails on the store as
first merged. gpg is used only as the other side (the GnuPG home being migrated, the tool that
extends a key's expiry)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pysequoia
import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg, kill_agent, new_gnupg_home

from e2email import KeyReason, Message, OpenPGPEngine, PassphraseError, Protection
from e2email.certd import generate_key, protect
from e2email.crypto.sequoia import SequoiaProtector
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


SEQUOIA = Protection(engine=OpenPGPEngine.SEQUOIA)


def _sign_as(store: Keystore, sender: str, passphrase: str) -> bool:
    message = Message(sender=sender, to=[sender], text="x").finalized()
    (copy,) = asyncio.run(SequoiaProtector(store).protect(message, SEQUOIA, passphrase=passphrase))
    return copy.signed


def test_a_secret_key_reimported_under_a_new_passphrase_replaces_the_old(tmp_path: Path) -> None:
    """Re-importing one's key under a new passphrase is how a leaked passphrase is changed:
    the stored file must be the new one (reported as a secret key imported), not kept."""
    store = Keystore(tmp_path / "home", backend="certd")
    raw = generate_key("<pat@example.com>", suite="cv25519", validity_seconds=None)
    fpr = store.import_keys(protect(raw, "leaked")).fingerprints[0]
    again = store.import_keys(protect(raw, "new one"))
    assert again.secret_imported == 1
    assert _sign_as(store, "pat@example.com", "new one")
    with pytest.raises(PassphraseError):
        _sign_as(store, "pat@example.com", "leaked")
    # The same bytes again change nothing.
    same = store.secret_key_bytes(fpr) or b""
    assert store.import_keys(same).secret_imported == 0


def test_the_in_process_engine_signs_after_the_key_expiry_was_extended(tmp_path: Path) -> None:
    """A key made two years ago to expire after one, extended since with gpg: the store's
    certificate carries the new expiry, and signing must use it, not the secret key file's
    old (expired) self-signatures."""
    g = new_gnupg_home("e2x")
    try:
        old = ("--faked-system-time", "20240101T000000!")
        gpg(g, *old, "--passphrase", "pw", "--quick-gen-key", "<sam@example.com>", "ed25519",
            "sign", "1y")  # fmt: skip
        fpr = gpg(g, "--with-colons", "--list-keys").stdout.decode().split("fpr:::::::::")[1][:40]
        gpg(g, *old, "--passphrase", "pw", "--quick-add-key", fpr, "cv25519", "encr", "never")
        first = gpg(g, "--passphrase", "pw", "--export-secret-keys", fpr).stdout
        gpg(g, "--passphrase", "pw", "--quick-set-expire", fpr, "1y")
        extended = gpg(g, "--export", fpr).stdout
    finally:
        kill_agent(g)
        shutil.rmtree(g, ignore_errors=True)
    store = Keystore(tmp_path / "home", backend="certd")
    store.import_keys(first)
    assert isinstance(store.signing_key("sam@example.com"), KeyProblem)  # expired
    store.import_keys(extended)
    assert not isinstance(store.signing_key("sam@example.com"), KeyProblem)
    assert _sign_as(store, "sam@example.com", "pw")
