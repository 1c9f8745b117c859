"""Review findings on the certificate store (issue 9 part 3): each test fails on the store as
first merged. gpg is used only as the other side (the GnuPG home being migrated, the tool that
extends a key's expiry)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysequoia
import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg, kill_agent, new_gnupg_home

from e2email import KeyReason, Message, OpenPGPEngine, PassphraseError, Protection
from e2email.certd import generate_key, protect
from e2email.crypto.sequoia import SequoiaProtector
from e2email.errors import KeyProblem, KeystoreError
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer


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


@pytest.fixture(scope="module")
def big_store(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Keystore:
    store = Keystore(tmp_path_factory.mktemp("big") / "home", backend="certd")
    for key in keys.all():
        store.import_file(key.cert)
    return store


def test_a_lookup_and_autocrypt_keydata_do_not_read_the_whole_store(
    big_store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per message, the cost must not grow with the store: no listing of every certificate
    file for the Autocrypt key data, no parsing of every user ID per lookup."""
    import e2email.keystore as keystore_module
    from e2email.certd import CertDirectory

    big_store.find("bob@example.net")
    key = big_store.encryption_key("bob@example.net")
    assert not isinstance(key, KeyProblem)
    big_store.export_minimal(key, "bob@example.net")
    parsed: list[str] = []
    real = keystore_module._uid_address
    monkeypatch.setattr(keystore_module, "_uid_address", lambda t: parsed.append(t) or real(t))

    def listed(self: CertDirectory) -> None:
        raise AssertionError("every certificate file listed")

    monkeypatch.setattr(CertDirectory, "tags", listed)
    monkeypatch.setattr(CertDirectory, "fingerprints", listed)
    for _ in range(3):
        assert big_store.find("bob@example.net") == (key,)
        assert big_store.export_minimal(key, "bob@example.net")
    # Only the found key's user IDs are read (by find, and by export_minimal): not all 11 keys'.
    assert len(parsed) <= 3 * 2 * len(key.user_ids) < 3 * len(big_store.all_keys())


def test_the_gnupg_engine_copy_imports_only_what_changed(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gnupg

    # A short home: gpg-agent's socket lives in the GnuPG engine's home beside it.
    store = Keystore(new_gnupg_home(), backend="certd")
    for key in (keys.bob, keys.carol, keys.dave):
        store.import_file(key.cert)
    try:
        store.gpg  # noqa: B018 - the first sync imports everything
        seen: list[int] = []
        real = gnupg.GPG.import_keys

        def counting(self: gnupg.GPG, data: bytes, *args: object, **kw: object) -> object:
            seen.append(len(list(pysequoia.Cert.split_bytes(data))))
            return real(self, data, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(gnupg.GPG, "import_keys", counting)
        store.gpg  # noqa: B018 - nothing changed: nothing imported
        assert seen == []
        store.import_file(keys.erin.cert)
        store.gpg  # noqa: B018
        assert seen == [1]
        # Another process with the same store imports nothing more.
        Keystore(store.home, backend="certd").gpg  # noqa: B018
        assert seen == [1]
        listing = gpg(store.gnupg_home, "--with-colons", "--list-keys").stdout.decode()
        assert keys.erin.fingerprint in listing
        # A secret key re-imported under a new passphrase replaces gpg's copy too.
        raw = generate_key("<pat@example.com>", suite="cv25519", validity_seconds=None)
        fpr = store.import_keys(protect(raw, "old")).fingerprints[0]
        store.gpg  # noqa: B018
        store.import_keys(protect(raw, "new"))
        store.gpg  # noqa: B018
        out = gpg(store.gnupg_home, "--passphrase", "new", "--export-secret-keys", fpr).stdout
        assert out and pysequoia.Tsk.from_bytes(out)
    finally:
        store.shutdown_agent()


def test_a_store_others_may_write_is_refused(keys: Keys, tmp_path: Path) -> None:
    """Whoever may write the store can swap a certificate: refused like a loose GnuPG home,
    whether the store, one of its folders, a certificate file or the secret key folder."""
    from e2email.errors import InsecurePathError

    store = Keystore(tmp_path / "home", backend="certd")
    store.import_file(keys.bob.cert)
    store.generate("me@example.com", passphrase="pw")
    fpr = keys.bob.fingerprint.lower()
    folder = store.certd.root / fpr[:2]
    for path in (store.certd.root, folder, folder / fpr[2:], store.secret_keys.root):
        mode = path.stat().st_mode & 0o777
        path.chmod(mode | 0o022)
        try:
            with pytest.raises(InsecurePathError, match="writable by group or others"):
                Keystore(store.home).encryption_key("bob@example.net")
            if path.is_dir():  # a running process too, even with its listing cached
                with pytest.raises(InsecurePathError, match=str(path)):
                    store.all_keys()
        finally:
            path.chmod(mode)
    assert not isinstance(store.encryption_key("bob@example.net"), KeyProblem)


def test_one_unreadable_certificate_is_left_out_and_named(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Keystore(tmp_path / "home", backend="certd")
    store.import_file(keys.bob.cert)
    store.import_file(keys.carol.cert)
    fpr = keys.bob.fingerprint.lower()
    path = store.certd.root / fpr[:2] / fpr[2:]
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads it anyway: a damaged file instead
            path.chmod(0o600)
            path.write_bytes(b"\x99damaged")
        with caplog.at_level("WARNING", logger="e2email.keystore"):
            fresh = Keystore(store.home)
            missing = fresh.encryption_key("bob@example.net")
            assert isinstance(missing, KeyProblem) and missing.reason is KeyReason.NOT_FOUND
            assert not isinstance(fresh.encryption_key(keys.carol.address), KeyProblem)
        assert str(path) in caplog.text
    finally:
        path.chmod(0o600)


def _revocation_by_key_id(raw: bytes, signer_raw: bytes) -> bytes:
    """A key revocation (RFC 9580 §5.2.1.10) of ``raw``'s certificate made by ``signer_raw``'s
    primary key, naming its issuer by key ID only (as gpg 1.x wrote them), EdDSA/SHA-512."""
    import hashlib
    import time

    from pysequoia.packet import PacketPile, Tag

    from e2email.certd import _packet, _signer_for, _subpacket

    def primary(data: bytes, tag: Tag) -> Any:
        return next(p for p in PacketPile.from_bytes(data) if p.tag == tag)

    target = primary(bytes(pysequoia.Tsk.from_bytes(raw).extract_certificate()), Tag.PublicKey)
    body = bytes(target.body)
    signer_pub = bytes(
        primary(
            bytes(pysequoia.Tsk.from_bytes(signer_raw).extract_certificate()), Tag.PublicKey
        ).body
    )
    signer_secret = bytes(primary(signer_raw, Tag.SecretKey).body)[len(signer_pub) :]
    hashed = _subpacket(2, int(time.time()).to_bytes(4, "big")) + _subpacket(29, b"\x00")
    head = bytes([4, 0x20, 22, 10]) + len(hashed).to_bytes(2, "big") + hashed
    trailer = b"\x04\xff" + len(head).to_bytes(4, "big")
    digest = hashlib.sha512(b"\x99" + len(body).to_bytes(2, "big") + body + head + trailer).digest()
    unhashed = _subpacket(16, bytes.fromhex(str(target.fingerprint))[-8:])
    sign = _signer_for(22, signer_secret)
    return _packet(
        2, head + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2] + sign(digest)
    )


def test_a_revocation_naming_its_issuer_by_key_id_only_is_taken(tmp_path: Path) -> None:
    raw = generate_key("<old@example.com>", suite="cv25519", validity_seconds=None)
    other = generate_key("<mallory@example.com>", suite="cv25519", validity_seconds=None)
    store = Keystore(tmp_path / "home", backend="certd")
    store.import_keys(bytes(pysequoia.Tsk.from_bytes(raw).extract_certificate()))
    # A forged one (made by another key, naming this key's ID) revokes nothing.
    store.import_keys(_revocation_by_key_id(raw, other))
    assert not isinstance(store.encryption_key("old@example.com"), KeyProblem)
    summary = store.import_keys(_revocation_by_key_id(raw, raw))
    assert summary.revoked == 1
    choice = store.encryption_key("old@example.com")
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOKED


def _gpg_key(home: Path, address: str, passphrase: str, algo: str = "ed25519") -> str:
    """A key made by gpg in the e2email home's GnuPG home (sign primary, encryption subkey)."""
    gnupg_home = home / "gnupg"
    gnupg_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    pw = ("--passphrase", passphrase)
    gpg(gnupg_home, *pw, "--quick-gen-key", f"<{address}>", algo, "sign,cert", "never")
    listing = gpg(gnupg_home, "--with-colons", "--list-keys", f"<{address}>").stdout.decode()
    fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
    sub = "cv25519" if algo == "ed25519" else algo
    gpg(gnupg_home, *pw, "--quick-add-key", fpr, sub, "encr", "never")
    return fpr


def test_migrate_protects_or_refuses_a_key_without_passphrase(tmp_path: Path) -> None:
    from e2email.certd import is_protected

    home = tmp_path / "home"
    fpr = _gpg_key(home, "open@example.com", "")
    try:
        with pytest.raises(KeystoreError, match="--unprotected"):
            Keystore(home, backend="certd").migrate()
        assert not (home / "pgp.cert.d").exists() and not (home / "secret").exists()
        done = Keystore(home, backend="certd").migrate(passphrase="now one")
        assert not done.keys[0].unprotected
        store = Keystore(home)
        assert is_protected(store.secret_key_bytes(fpr) or b"")
        assert _sign_as(store, "open@example.com", "now one")
    finally:
        kill_agent(home / "gnupg")


def test_migrate_asks_per_key_and_says_which_key_a_passphrase_does_not_open(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    first = _gpg_key(home, "one@example.com", "first")
    second = _gpg_key(home, "two@example.com", "second")
    try:
        with pytest.raises(PassphraseError, match=f"wrong passphrase for ({first}|{second})"):
            Keystore(home, backend="certd").migrate(passphrase="nope")
        asked: list[str] = []

        def ask(fpr: str) -> str | None:
            asked.append(fpr)
            return "second" if fpr == second else None

        done = Keystore(home, backend="certd").migrate(passphrase="first", ask=ask)
        assert asked == [second]
        assert {k.fingerprint for k in done.keys if k.secrets} == {first, second}
        store = Keystore(home)
        assert _sign_as(store, "one@example.com", "first")
        assert _sign_as(store, "two@example.com", "second")
    finally:
        kill_agent(home / "gnupg")


def test_migrate_says_which_keys_the_store_cannot_use(tmp_path: Path) -> None:
    """Brainpool: gpg signs and encrypts with it, Sequoia's judge refuses it. The move is
    reported as such, on the command line too, not as a plain "moved"."""
    import sys

    home = tmp_path / "home"
    fpr = _gpg_key(home, "bp@example.com", "", algo="brainpoolP256r1")
    good = _gpg_key(home, "ok@example.com", "")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "e2email",
                "--home",
                str(home),
                "keys",
                "migrate",
                "--unprotected",
            ],
            capture_output=True,
            timeout=120,
            check=False,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        line = next(ln for ln in done.stdout.splitlines() if fpr in ln)
        assert "NOT USABLE HERE: usable for encryption and signing with gpg" in line
        assert "NOT USABLE" not in next(ln for ln in done.stdout.splitlines() if good in ln)
        assert "1 key(s) gpg could use are refused in the store" in done.stderr
    finally:
        kill_agent(home / "gnupg")


def test_an_interrupted_migrate_is_finished_by_the_next_and_leaves_no_secret_copies(
    tmp_path: Path,
) -> None:
    """A crash between the two renames left HOME/secret (and maybe a staging folder with
    secret keys): the next migrate merges into it and removes the leftovers."""
    home = tmp_path / "home"
    fpr = _gpg_key(home, "crash@example.com", "")
    try:
        (home / "secret").mkdir(mode=0o700)
        (home / "secret" / f"{fpr}.pgp").write_bytes(b"from the interrupted run")
        (home / "secret" / f"{fpr}.pgp").chmod(0o600)
        stale = home / ".migrate-abc123" / "secret"
        stale.mkdir(parents=True, mode=0o700)
        (stale / f"{fpr}.pgp").write_bytes(b"secret copy")
        done = Keystore(home, backend="certd").migrate(unprotected=True)
        assert done.keys[0].secrets
        assert [p.name for p in home.iterdir() if p.name.startswith(".migrate")] == []
        assert _sign_as(Keystore(home), "crash@example.com", "")
    finally:
        kill_agent(home / "gnupg")


def test_a_key_stub_is_not_counted_as_a_secret(tmp_path: Path) -> None:
    """gpg --export-secret-subkeys writes the primary as a gnu-dummy stub (its secret is
    elsewhere): only the subkeys' secrets are held."""
    from e2email.certd import secret_fingerprints

    home = tmp_path / "g"
    fpr = _gpg_key(home, "stub@example.com", "")
    try:
        data = gpg(home / "gnupg", "--export-secret-subkeys", fpr).stdout
    finally:
        kill_agent(home / "gnupg")
    held = secret_fingerprints(data)
    assert held and fpr not in held


def test_an_expiry_beyond_what_openpgp_can_say_is_a_one_line_error(tmp_path: Path) -> None:
    import sys

    env = {**os.environ, "E2EMAIL_KEYSTORE": "certd"}
    args = ["--home", str(tmp_path / "home"), "keys", "generate", "--expire", "99999y"]
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args, "--unprotected", "far@example.com"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
        text=True,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "e2email: error: expiry '99999y' is too far away: OpenPGP can say at most about 136 "
        "years (or 0 for never)"
    ]


def test_a_keystore_choice_that_cannot_apply_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    (home / "gnupg").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("E2EMAIL_KEYSTORE", "certd")
    with caplog.at_level("WARNING", logger="e2email.keystore"):
        assert Keystore(home).backend == "gnupg"
    assert "E2EMAIL_KEYSTORE=certd is not used" in caplog.text and "keys migrate" in caplog.text


def test_doctor_json_says_which_openpgp_engines_there_are(
    smtp_server: Callable[..., LoopbackSMTPServer], tmp_path: Path
) -> None:
    import json
    import sys

    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    done = subprocess.run(
        [sys.executable, "-m", "e2email", "--home", str(tmp_path / "h"), "doctor", server.host,
         "--timeout", "2", "--ca-file", str(server.ca_file), "--port-map",
         f"465={server.port}", "--json"],
        capture_output=True, timeout=120, check=False, text=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["openpgp"]["in_process"] is True
    assert report["openpgp"]["default"] == "sequoia"
    assert report["openpgp"]["gpg"] == shutil.which("gpg")
