"""Choosing keys safely (issue 8): refusing ambiguity, respecting a GnuPG home's validity,
re-checking keys after queueing, revocation certificates, and what `keys import` reports."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import generate_key, gpg, kill_agent, new_gnupg_home

from e2email.crypto import openpgp
from e2email.errors import InsecurePathError, KeyProblem, KeyReason, PassphraseError
from e2email.keystore import Keystore


@pytest.fixture
def store() -> Iterator[Keystore]:
    home = new_gnupg_home("e2kc")
    ks = Keystore(home)
    yield ks
    ks.shutdown_agent()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def factory() -> Iterator[Path]:
    home = new_gnupg_home("e2kf")
    yield home
    kill_agent(home)
    shutil.rmtree(home, ignore_errors=True)


def test_check_fingerprints_reports_keys_revoked_or_gone_since(
    store: Keystore, factory: Path, tmp_path: Path, keys: Keys
) -> None:
    """A queued copy's keys are re-checked: fine ones give no problem, a key revoked since
    (bare revocation certificate imported later) and a key no longer present are named."""
    victim = generate_key(factory, tmp_path, "later@example.com")
    store.import_file(keys.bob.cert)
    store.import_file(victim.cert)
    fprs = [keys.bob.fingerprint, victim.fingerprint.lower()]
    assert store.check_fingerprints(fprs) == []
    rev = (factory / "openpgp-revocs.d" / f"{victim.fingerprint}.rev").read_text()
    rev = rev.replace(":-----BEGIN PGP PUBLIC", "-----BEGIN PGP PUBLIC")
    store.import_keys(rev.encode())
    problems = store.check_fingerprints([*fprs, "AB" * 20])
    assert [(p.fingerprint, p.reason) for p in problems] == [
        (victim.fingerprint, KeyReason.REVOKED),
        ("AB" * 20, KeyReason.NOT_FOUND),
    ]
    assert problems[0].address == "later@example.com"
    assert isinstance(problems[0], KeyProblem)


# -- Passphrases: the one given is the one checked (item 18) ----------------------------------

PAYLOAD = b"Content-Type: text/plain\r\n\r\nsigned\r\n"


def _sign_with(store: Keystore, fingerprint: str, passphrase: str | None) -> None:
    key = store.get(fingerprint)
    assert key is not None
    openpgp.sign(store, PAYLOAD, signer=key, passphrase=passphrase)


def test_wrong_passphrase_is_refused_right_after_a_right_one(store: Keystore, keys: Keys) -> None:
    """A real gpg-agent: after signing with the right passphrase, a wrong one (or none) is
    refused; the agent's cache of the right one is not used in e2email's own home."""
    assert keys.locked.secret and keys.locked.passphrase
    store.import_file(keys.locked.secret)
    _sign_with(store, keys.locked.fingerprint, keys.locked.passphrase)
    with pytest.raises(PassphraseError) as wrong:
        _sign_with(store, keys.locked.fingerprint, "not the passphrase")
    assert not wrong.value.missing
    with pytest.raises(PassphraseError) as none:
        _sign_with(store, keys.locked.fingerprint, None)
    assert none.value.missing
    _sign_with(store, keys.locked.fingerprint, keys.locked.passphrase)


def test_passphrase_cached_by_an_agent_started_before_is_flushed(keys: Keys) -> None:
    """A home made by an older e2email whose gpg-agent is already running and holds the
    passphrase: opening the keystore configures and reloads the agent, so a wrong passphrase
    is refused all the same."""
    home = new_gnupg_home("e2kp")
    gnupg_home = home / "gnupg"
    gnupg_home.mkdir(mode=0o700)
    assert keys.locked.secret and keys.locked.passphrase
    try:
        gpg(gnupg_home, "--import", str(keys.locked.secret))
        # Sign once through the agent so that it caches the passphrase (default TTL 600 s).
        gpg(gnupg_home, "--passphrase", keys.locked.passphrase, "--detach-sign", input=b"x")
        cached = gpg(gnupg_home, "--passphrase", "wrong", "--detach-sign", input=b"x")
        assert cached.returncode == 0  # the old behaviour: the cache hides the wrong one
        store = Keystore(home)
        with pytest.raises(PassphraseError):
            _sign_with(store, keys.locked.fingerprint, "wrong")
        assert "max-cache-ttl 0" in (gnupg_home / "gpg-agent.conf").read_text()
    finally:
        kill_agent(gnupg_home)
        shutil.rmtree(home, ignore_errors=True)


def test_named_gnupg_home_signs_with_the_passphrase_given_not_the_cached_one(
    keys: Keys,
) -> None:
    """A user's own GnuPG home (``--gnupg-home``) keeps its agent's cache settings, but a
    passphrase given for a message is the one that must unlock the key: the cached one is
    dropped first, so a wrong passphrase is refused even right after a right one."""
    home = new_gnupg_home("e2kn")
    gnupg_home = home / "user-gnupg"
    gnupg_home.mkdir(mode=0o700)
    assert keys.locked.secret and keys.locked.passphrase
    try:
        gpg(gnupg_home, "--import", str(keys.locked.secret))
        store = Keystore(home / "e2", gnupg_home=gnupg_home)
        assert not store.managed
        _sign_with(store, keys.locked.fingerprint, keys.locked.passphrase)
        # The user's agent cached it (its settings are untouched: no gpg-agent.conf written).
        assert not (gnupg_home / "gpg-agent.conf").exists()
        cached = gpg(gnupg_home, "--passphrase", "wrong", "--detach-sign", input=b"x")
        assert cached.returncode == 0
        with pytest.raises(PassphraseError) as wrong:
            _sign_with(store, keys.locked.fingerprint, "wrong")
        assert not wrong.value.missing
        _sign_with(store, keys.locked.fingerprint, keys.locked.passphrase)
    finally:
        kill_agent(gnupg_home)
        shutil.rmtree(home, ignore_errors=True)


# -- Several keys for one address through the CLI (item 1) ------------------------------------


def _e2email(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", "--home", str(home), *args],
        input=b"",
        capture_output=True,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


def test_a_file_carrying_a_second_key_for_another_address_is_reported_and_not_guessed(
    keys: Keys, factory: Path, tmp_path: Path
) -> None:
    """bob.asc also carries a newer key whose user ID is <carol@example.com>: importing it
    names every user ID it adds and warns that carol now has two keys; a message to carol is
    then refused naming both fingerprints and the file each came from, until --key decides."""
    intruder = generate_key(factory, tmp_path, "carol@example.com")
    bob_asc = tmp_path / "bob.asc"
    bob_asc.write_bytes(keys.bob.cert.read_bytes() + intruder.cert.read_bytes())
    home = new_gnupg_home("e2kh")
    try:
        assert keys.alice.secret
        first = _e2email("keys", "import", str(keys.alice.secret), str(keys.carol.cert), home=home)
        assert first.returncode == 0, first.stderr
        assert "WARNING" not in first.stderr
        done = _e2email("keys", "import", str(bob_asc), home=home)
        assert done.returncode == 0, done.stderr
        assert keys.bob.fingerprint in done.stdout and intruder.fingerprint in done.stdout
        assert "user ID added: Test Carol <carol@example.com>" in done.stdout
        assert "user ID added: Bob Demo <bob@example.net>" in done.stdout or (
            "bob@example.net" in done.stdout
        )
        warning = next(ln for ln in done.stderr.splitlines() if "WARNING" in ln)
        assert "carol@example.com now has 2 keys" in warning
        assert keys.carol.fingerprint in warning and intruder.fingerprint in warning
        assert "bob@example.net" not in done.stderr  # bob's own key is no conflict
        assert "are refused until you choose one" in warning
        export = _e2email("keys", "export", "carol@example.com", home=home)
        assert export.returncode == 3 and intruder.fingerprint in export.stderr

        out = tmp_path / "msg.eml"
        send = [
            "send",
            "--from",
            "alice@example.org",
            "--to",
            "carol@example.com",
            "--subject",
            "s",
            "--body",
            "b",
            "--output",
            str(out),
        ]
        refused = _e2email(*send, home=home)
        assert refused.returncode == 3
        assert "more than one key matches" in refused.stderr
        assert keys.carol.fingerprint in refused.stderr and intruder.fingerprint in refused.stderr
        assert str(bob_asc) in refused.stderr and str(keys.carol.cert) in refused.stderr
        assert not out.exists()
        chosen = _e2email(*send, "--key", f"carol@example.com={keys.carol.fingerprint}", home=home)
        assert chosen.returncode == 0, chosen.stderr
        assert out.exists()
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_importing_a_bare_revocation_certificate_says_which_key_it_revoked(
    factory: Path, tmp_path: Path
) -> None:
    """A revocation certificate alone (no key material) imports and names the key revoked."""
    victim = generate_key(factory, tmp_path, "gone@example.com")
    rev = (factory / "openpgp-revocs.d" / f"{victim.fingerprint}.rev").read_text()
    rev_file = tmp_path / "gone.rev"
    rev_file.write_text(rev.replace(":-----BEGIN PGP PUBLIC", "-----BEGIN PGP PUBLIC"))
    home = new_gnupg_home("e2kv")
    try:
        assert _e2email("keys", "import", str(victim.cert), home=home).returncode == 0
        done = _e2email("keys", "import", str(rev_file), home=home)
        assert done.returncode == 0, done.stderr
        assert f"revoked key {victim.fingerprint}: Test Gone <gone@example.com>" in done.stdout
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_keys_generate_and_import_refuse_bad_input_with_exit_2(tmp_path: Path) -> None:
    """Item 13: a bad address or --expire is refused before anything is made (exit 2, the
    option named, no GnuPG status line); a missing file is exit 2 naming it; a file without a
    key names the file and no stray ': 0'."""
    home = tmp_path / "h"
    bad = _e2email("keys", "generate", "not-an-address", home=home)
    assert bad.returncode == 2 and "not-an-address" in bad.stderr
    expire = _e2email("keys", "generate", "a@example.org", "--expire", "5x", home=home)
    assert expire.returncode == 2 and "--expire" in expire.stderr
    assert "[GNUPG:]" not in expire.stderr and "5x" in expire.stderr
    missing = _e2email("keys", "import", str(tmp_path / "missing.asc"), home=home)
    assert missing.returncode == 2 and "missing.asc" in missing.stderr
    nokey = tmp_path / "nokey.txt"
    nokey.write_text("hello\n")
    empty = _e2email("keys", "import", str(nokey), home=home)
    assert empty.returncode != 0
    assert "nokey.txt" in empty.stderr and ": 0" not in empty.stderr
    assert "no keys" in _e2email("keys", "list", home=home).stdout


# -- A user-supplied GnuPG home: gpg's own validity counts (item 1) ---------------------------


def test_named_gnupg_home_uses_only_keys_gpg_validates(
    keys: Keys, factory: Path, tmp_path: Path
) -> None:
    """In a --gnupg-home, bob's locally signed key sits beside a newer key for bob nobody
    certified: the certified one is used, not the newer (which gpg would call "no
    assurance"); an address with only an uncertified key is refused saying so, unless a key
    map names that key. A gpg.conf saying "trust-model always" changes none of it."""
    newer_bob = generate_key(factory, tmp_path, "bob@example.net")
    only = generate_key(factory, tmp_path, "nobody-vouched@example.com")
    home = new_gnupg_home("e2kn")
    try:
        owner = generate_key(home, tmp_path, "owner@example.org")
        gpg(home, "--import", str(keys.bob.cert))
        gpg(home, "--quick-lsign-key", keys.bob.fingerprint)
        gpg(home, "--import", str(newer_bob.cert), str(only.cert))
        (home / "gpg.conf").write_text("trust-model always\n")
        store = Keystore(tmp_path / "e2home", gnupg_home=home)
        chosen = store.encryption_key("bob@example.net")
        assert not isinstance(chosen, KeyProblem), chosen
        assert chosen.fingerprint == keys.bob.fingerprint
        refused = store.encryption_key(only.address)
        assert isinstance(refused, KeyProblem)
        assert refused.reason is KeyReason.UNVALIDATED
        assert "unknown" in refused.detail and str(home) in refused.detail
        mapped = store.encryption_key(only.address, key_map={only.address: only.fingerprint})
        assert not isinstance(mapped, KeyProblem)
        # The owner's own key (secret here) is usable for signing and encrypting to self.
        assert not isinstance(store.signing_key(owner.address), KeyProblem)
        assert not isinstance(store.encryption_key(owner.address), KeyProblem)
        # Once certified, the newer bob key is a second usable key: refused as ambiguous,
        # each described as found in that GnuPG home.
        gpg(home, "--quick-lsign-key", newer_bob.fingerprint)
        both = store.encryption_key("bob@example.net")
        assert isinstance(both, KeyProblem) and both.reason is KeyReason.AMBIGUOUS
        assert f"found in the GnuPG home {home}" in both.detail
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


# -- The keystore on disk (item 6) -------------------------------------------------------------


def test_managed_gnupg_home_is_made_0700_whatever_the_umask(tmp_path: Path, keys: Keys) -> None:
    """e2email's home, its GnuPG home and its record of key sources are private even under
    umask 000."""
    old = os.umask(0)
    try:
        store = Keystore(tmp_path / "new" / "home")
        store.import_file(keys.bob.cert)
    finally:
        os.umask(old)
        Keystore(tmp_path / "new" / "home").shutdown_agent()
    for folder in (tmp_path / "new", store.home, store.gnupg_home):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(store.sources.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((store.gnupg_home / "gpg-agent.conf").stat().st_mode) == 0o600


def test_a_loose_or_foreign_gnupg_home_is_refused(tmp_path: Path, keys: Keys) -> None:
    """A GnuPG home others may write, or owned by another user, is refused with
    InsecurePathError (gpg itself only warns): whoever can write it can swap a key."""
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o700)
    loose.chmod(0o770)
    for store in (Keystore(tmp_path / "h1", gnupg_home=loose), Keystore(loose.parent / "h2")):
        if store.managed:
            store.gnupg_home.parent.mkdir(mode=0o700)
            store.gnupg_home.mkdir(mode=0o700)
            store.gnupg_home.chmod(0o777)
        with pytest.raises(InsecurePathError):
            store.encryption_key("bob@example.net")
        with pytest.raises(InsecurePathError):
            store.import_file(keys.bob.cert)
    # The record of where keys came from vouches for keys in a named home: it must be private.
    named = Keystore(tmp_path / "h4", gnupg_home=new_gnupg_home("e2kl"))
    try:
        named.import_file(keys.bob.cert)
        named.sources.path.chmod(0o666)
        with pytest.raises(InsecurePathError, match="key sources"):
            named.encryption_key("bob@example.net")
    finally:
        named.shutdown_agent()
        shutil.rmtree(named.gnupg_home, ignore_errors=True)
    if os.geteuid() == 0:  # only root can give a folder away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, -1)
        with pytest.raises(InsecurePathError, match="another user"):
            Keystore(tmp_path / "h3", gnupg_home=foreign).all_keys()


def test_an_update_that_adds_an_encryption_subkey_is_reported_and_warned(
    keys: Keys, factory: Path, tmp_path: Path
) -> None:
    """A second key for carol that cannot encrypt is no ambiguity; an update of it that adds
    an encryption subkey makes it one: the import names the new subkey and warns, as for a
    new key (before, it printed "0 imported, 0 unchanged" and said nothing)."""
    intruder = generate_key(factory, tmp_path, "carol@example.com", encryption_subkey=False)
    home = new_gnupg_home("e2ks")
    try:
        first = _e2email("keys", "import", str(keys.carol.cert), str(intruder.cert), home=home)
        assert first.returncode == 0, first.stderr
        assert "Check with its owner" in first.stderr  # two keys, one usable
        gpg(
            factory,
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-add-key",
            intruder.fingerprint,
            "cv25519",
            "encr",
            "never",
        )
        updated = tmp_path / "intruder-with-subkey.asc"
        updated.write_bytes(gpg(factory, "--armor", "--export", intruder.fingerprint).stdout)
        done = _e2email("keys", "import", str(updated), home=home)
        assert done.returncode == 0, done.stderr
        assert f"updated key {intruder.fingerprint}" in done.stdout
        assert "subkey added: " in done.stdout
        warning = next(ln for ln in done.stderr.splitlines() if "WARNING" in ln)
        assert "carol@example.com now has 2 keys" in warning
        assert "are refused until you choose one" in warning
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_loose_keyring_files_in_a_named_home_are_refused_and_narrowed_in_our_own(
    tmp_path: Path, keys: Keys
) -> None:
    """Whoever may write pubring.kbx or trustdb.gpg can swap a key or trust one: in a named
    GnuPG home such files are refused like a loose folder; in e2email's own home (where gpg
    made them under a lax umask) they are narrowed to 0600."""
    named_home = new_gnupg_home("e2kf")
    try:
        gpg(named_home, "--import", str(keys.bob.cert))
        for name in ("pubring.kbx", "trustdb.gpg"):
            if (named_home / name).exists():
                (named_home / name).chmod(0o666)
        with pytest.raises(InsecurePathError, match=r"pubring\.kbx|trustdb\.gpg"):
            Keystore(tmp_path / "n", gnupg_home=named_home).all_keys()
    finally:
        kill_agent(named_home)
        shutil.rmtree(named_home, ignore_errors=True)
    own = Keystore(tmp_path / "own")
    try:
        own.import_file(keys.bob.cert)
        ring = own.gnupg_home / "pubring.kbx"
        ring.chmod(0o664)
        fresh = Keystore(tmp_path / "own")
        assert fresh.encryption_key("bob@example.net") is not None
        assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    finally:
        own.shutdown_agent()
