"""The certificate store (issue 9 part 3): public certificates in the shared OpenPGP certificate
directory, secret keys passphrase-protected, judged without gpg exactly as a GnuPG home is, read
by the in-process engine, and an existing e2email home migrated without losing a key.

gpg is used here only as the independent other side (the GnuPG backend to compare with, and
the reader of what the store wrote)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pysequoia
import pytest
from fixtures_pgp import LOCKED_PASSPHRASE, Keys
from pgp_helpers import (
    gpg,
    gpg_decrypt,
    kill_agent,
    multipart_parts,
    new_gnupg_home,
    part_body,
    sop_decrypt,
)

from e2email import (
    KeyReason,
    Message,
    OpenPGPEngine,
    PassphraseError,
    Protection,
    RecipientKeyError,
)
from e2email.certd import is_protected, protect
from e2email.certstore import CertStore
from e2email.crypto.base import protector_for
from e2email.crypto.sequoia import SequoiaProtector
from e2email.errors import KeyProblem, KeystoreError
from e2email.keystore import Keystore

SEQUOIA = Protection(engine=OpenPGPEngine.SEQUOIA)


@pytest.fixture(scope="module")
def certd_store(keys: Keys) -> Iterator[Keystore]:
    """The same keys as ``sender_store`` (a GnuPG home), in a certificate store."""
    home = new_gnupg_home("e2d")
    store = Keystore(home, backend="certd")
    for key in keys.all():
        store.import_file(key.cert)
    assert keys.alice.secret and keys.locked.secret
    store.import_file(keys.alice.secret, unprotected=True)  # the demo key has no passphrase
    store.import_file(keys.locked.secret)  # protected: taken as it is
    yield store
    shutil.rmtree(home, ignore_errors=True)


def _reason(choice: object) -> object:
    return choice.reason if isinstance(choice, KeyProblem) else ("ok", choice.fingerprint)  # type: ignore[attr-defined]


def test_certificates_are_in_the_shared_directory_layout(certd_store: Keystore, keys: Keys) -> None:
    """pgp.cert.d/<2 hex>/<38 hex>, lower case, binary, public parts only (cert-d §3), folders
    0700 and files 0600, a writelock; secret keys apart, protected as they came."""
    root = certd_store.home / "pgp.cert.d"
    fpr = keys.bob.fingerprint.lower()
    path = root / fpr[:2] / fpr[2:]
    data = path.read_bytes()
    assert data[0] & 0x80  # a binary OpenPGP packet, not armor
    tags = [p.tag for p in pysequoia.packet.PacketPile.from_bytes(data)]
    assert pysequoia.packet.Tag.SecretKey not in tags
    alice = certd_store.home / "pgp.cert.d" / keys.alice.fingerprint.lower()[:2]
    alice_cert = (alice / keys.alice.fingerprint.lower()[2:]).read_bytes()
    alice_tags = [p.tag for p in pysequoia.packet.PacketPile.from_bytes(alice_cert)]
    assert pysequoia.packet.Tag.SecretKey not in alice_tags  # the secret is kept elsewhere
    assert (root / "writelock").exists()
    for folder in (root, path.parent, certd_store.home / "secret"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    secret = certd_store.home / "secret" / f"{keys.locked.fingerprint}.pgp"
    for file in (path, secret):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert is_protected(secret.read_bytes())
    if shutil.which("sq"):
        # Another OpenPGP implementation reads the stored file as the certificate it names.
        shown = subprocess.run(["sq", "inspect", str(path)], capture_output=True, check=True)
        assert keys.bob.fingerprint in shown.stdout.decode().replace(" ", "")


def test_every_fail_closed_reason_is_the_same_as_with_a_gnupg_home(
    certd_store: Keystore, sender_store: Keystore, keys: Keys
) -> None:
    """expired, revoked, weak (RSA-1024), SHA-1 self-signatures, sign-only, missing: the
    judgment without gpg gives the KeyReason gpg's listing gives, key for key."""
    want = {
        keys.expired.address: KeyReason.EXPIRED,
        keys.revoked.address: KeyReason.REVOKED,
        keys.weak.address: KeyReason.WEAK,
        keys.sha1.address: KeyReason.WEAK,
        keys.signonly.address: KeyReason.NO_ENCRYPTION_KEY,
        "nobody@example.com": KeyReason.NOT_FOUND,
    }
    for key in keys.all():
        assert _reason(certd_store.encryption_key(key.address)) == _reason(
            sender_store.encryption_key(key.address)
        ), key.address
    for address, reason in want.items():
        assert _reason(certd_store.encryption_key(address)) == reason
    for sender in (keys.alice, keys.locked, keys.bob):
        assert _reason(certd_store.signing_key(sender.address)) == _reason(
            sender_store.signing_key(sender.address)
        )
    assert certd_store.check_fingerprints([keys.revoked.fingerprint])[0].reason is (
        KeyReason.REVOKED
    )


def test_two_usable_keys_for_one_address_are_refused_in_the_store(
    keys: Keys, tmp_path: Path
) -> None:
    store = Keystore(tmp_path / "home", backend="certd")
    store.import_file(keys.carol.cert)
    other = store.generate("carol@example.com", unprotected=True)
    choice = store.encryption_key("carol@example.com")
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.AMBIGUOUS
    assert keys.carol.fingerprint in choice.detail and other.fingerprint in choice.detail
    mapped = store.encryption_key(
        "carol@example.com", key_map={"carol@example.com": other.fingerprint}
    )
    assert not isinstance(mapped, KeyProblem) and mapped.fingerprint == other.fingerprint


def test_a_secret_key_without_passphrase_is_refused_protected_or_kept_as_told(
    keys: Keys, tmp_path: Path
) -> None:
    """The store never writes an unprotected secret key unless told to: refused (nothing
    written), protected with the passphrase given, or kept with unprotected=True."""
    assert keys.carol.secret is not None
    refused = Keystore(tmp_path / "a", backend="certd")
    with pytest.raises(KeystoreError, match="--unprotected"):
        refused.import_file(keys.carol.secret)
    assert refused.all_keys() == ()
    protected = Keystore(tmp_path / "b", backend="certd")
    summary = protected.import_file(keys.carol.secret, passphrase="pw 1")
    assert summary.secret_imported == 1
    stored = protected.secret_key_bytes(keys.carol.fingerprint)
    assert stored is not None and is_protected(stored)
    with pytest.raises(RuntimeError, match="encrypted"):
        pysequoia.Tsk.from_bytes(stored).signer(None)
    pysequoia.Tsk.from_bytes(stored).signer("pw 1")
    kept = Keystore(tmp_path / "c", backend="certd")
    kept.import_file(keys.carol.secret, unprotected=True)
    assert not is_protected(kept.secret_key_bytes(keys.carol.fingerprint) or b"")
    with pytest.raises(KeystoreError, match="passphrase"):
        Keystore(tmp_path / "d", backend="certd").generate("x@example.com")


def test_a_protected_key_is_read_by_gpg_under_its_passphrase_only(tmp_path: Path) -> None:
    """protect() writes what gpg reads: gpg imports the key, signs only with the right
    passphrase; Sequoia unlocks it only with it too."""
    tsk = pysequoia.Tsk.generate("P <p@example.com>", profile=pysequoia.Profile.RFC4880)
    raw = protect(bytes(tsk), "right one")
    assert is_protected(raw) and not is_protected(bytes(tsk))
    for wrong in (None, "wrong"):
        with pytest.raises(RuntimeError):
            pysequoia.Tsk.from_bytes(raw).signer(wrong)
    home = new_gnupg_home("e2g")
    try:
        gpg(home, "--import", input=raw)
        bad = gpg(home, "--passphrase", "wrong", "--sign", "-o", "-", input=b"x", check=False)
        assert bad.returncode != 0
        good = gpg(home, "--passphrase", "right one", "--sign", "-o", "-", input=b"x")
        assert good.stdout
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def test_a_revocation_certificate_is_merged_into_the_stored_certificate(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "home", backend="certd")
    made = store.generate("rev@example.com", passphrase="pw")
    key = store.get(made.fingerprint)
    assert key is not None and key.status() == "usable"
    tsk = pysequoia.Tsk.from_bytes(store.secret_key_bytes(made.fingerprint) or b"")
    cert = pysequoia.Cert.from_bytes(store.export(made.fingerprint, armor=False))
    revocation = bytes(cert.revoke(tsk.certifier("pw")))
    summary = store.import_keys(revocation)
    assert summary.fingerprints == (made.fingerprint,) and summary.changes[0].revoked
    choice = store.encryption_key("rev@example.com")
    assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.REVOKED
    # The stored file holds the merged certificate: the revocation is there for any reader.
    assert pysequoia.Cert.from_bytes(store.export(made.fingerprint, armor=False)).is_revoked


def test_the_in_process_engine_reads_keys_from_the_store_and_gpg_reads_its_copy(
    certd_store: Keystore, keys: Keys, recipients_home: Path
) -> None:
    """Signed and encrypted from the store (no gpg export): gpg decrypts it and the signature
    is Alice's; a protected key in the store needs each message's passphrase."""
    engine = SequoiaProtector(certd_store)
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="hi").finalized()
    (copy,) = asyncio.run(engine.protect(message, SEQUOIA))
    _, (_, encrypted) = multipart_parts(copy.raw)
    plain, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert b"hi" in plain
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    locked = Message(sender="locked@example.org", to=["bob@example.net"], text="x").finalized()
    with pytest.raises(PassphraseError):
        asyncio.run(engine.protect(locked, SEQUOIA, passphrase="wrong"))
    (signed,) = asyncio.run(engine.protect(locked, SEQUOIA, passphrase=LOCKED_PASSPHRASE))
    assert signed.signed


def test_the_gnupg_engine_uses_the_store_through_its_own_copy(
    certd_store: Keystore, keys: Keys, recipients_home: Path
) -> None:
    """One keystore whichever engine runs: the GnuPG engine over a certificate store gets the
    store's keys (imported into its own GnuPG home when the store changed), the same refusals
    (judged by the store), and each message's passphrase unlocks a protected key."""
    from e2email.crypto.gpg import GpgProtector

    certstore = CertStore(certd_store.home / "certs")
    gpg_protection = Protection(engine=OpenPGPEngine.GPG)
    engine = protector_for(gpg_protection, keystore=certd_store, certstore=certstore)
    assert isinstance(engine, GpgProtector)
    assert certd_store.gnupg_home == certd_store.home / "gnupg-engine"
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="via gpg")
    (copy,) = asyncio.run(engine.protect(message.finalized(), gpg_protection))
    _, (_, encrypted) = multipart_parts(copy.raw)
    plain, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert b"via gpg" in plain and f"VALIDSIG {keys.alice.fingerprint}" in status
    locked = Message(sender="locked@example.org", to=["bob@example.net"], text="x").finalized()
    with pytest.raises(PassphraseError):
        asyncio.run(engine.protect(locked, gpg_protection, passphrase="wrong"))
    (signed,) = asyncio.run(engine.protect(locked, gpg_protection, passphrase=LOCKED_PASSPHRASE))
    assert signed.signed
    revoked = Message(sender="alice@example.org", to=[keys.revoked.address], text="x")
    with pytest.raises(RecipientKeyError) as refused:
        asyncio.run(engine.protect(revoked.finalized(), gpg_protection))
    assert refused.value.problems[0].reason is KeyReason.REVOKED
    certd_store.shutdown_agent()


def test_migrate_moves_every_key_checks_both_sides_and_keeps_the_gnupg_home(
    keys: Keys, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    old = Keystore(home)
    assert old.backend == "gnupg"  # an e2email home as it was before the store
    assert keys.alice.secret and keys.locked.secret
    for path in (keys.alice.secret, keys.locked.secret, keys.bob.cert, keys.expired.cert):
        old.import_file(path)
    before = {k.fingerprint: k.has_secret for k in old.all_keys()}
    try:
        # The protected key cannot be exported without its passphrase: nothing switches.
        with pytest.raises(PassphraseError, match="passphrase"):
            Keystore(home, backend="certd").migrate(unprotected=True)
        assert not (home / "pgp.cert.d").exists()
        assert Keystore(home).backend == "gnupg"
        assert [p.name for p in home.iterdir() if p.name.startswith(".migrate")] == []

        done = Keystore(home, backend="certd").migrate(passphrase=LOCKED_PASSPHRASE)
        assert {k.fingerprint for k in done.keys} == set(before)
        assert all(k.moved for k in done.keys)
        now = Keystore(home)
        assert now.backend == "certd"
        assert {k.fingerprint: k.has_secret for k in now.all_keys()} == before
        assert is_protected(now.secret_key_bytes(keys.locked.fingerprint) or b"")
        # The GnuPG home is still there, with every key, for --gnupg-home.
        kept = Keystore(home, gnupg_home=home / "gnupg")
        assert {k.fingerprint for k in kept.all_keys()} == set(before)
        # Idempotent: nothing more to move.
        again = Keystore(home).migrate(passphrase=LOCKED_PASSPHRASE)
        assert not any(k.moved for k in again.keys)
        # The in-process engine signs with the migrated protected key.
        engine = SequoiaProtector(now)
        msg = Message(sender="locked@example.org", to=["bob@example.net"], text="x").finalized()
        (copy,) = asyncio.run(engine.protect(msg, SEQUOIA, passphrase=LOCKED_PASSPHRASE))
        assert copy.signed and copy.encrypted_to
        kept.shutdown_agent()
    finally:
        old.shutdown_agent()


def test_keys_migrate_on_the_command_line(keys: Keys, tmp_path: Path) -> None:
    import sys

    home = tmp_path / "home"
    old = Keystore(home)
    assert keys.alice.secret
    old.import_file(keys.alice.secret)
    old.import_file(keys.bob.cert)
    env = {**os.environ, "E2EMAIL_HOME": str(home)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "e2email", "keys", "migrate", "--unprotected"],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert f"moved: {keys.alice.fingerprint} alice@example.org, secret" in done.stdout
        assert f"moved: {keys.bob.fingerprint} bob@example.net" in done.stdout
        assert "2 of 2 key(s) moved" in done.stdout
    finally:
        old.shutdown_agent()


def test_mail_between_keys_generated_in_the_store_is_read_by_gpg(tmp_path: Path) -> None:
    """Keys made without gpg advertise only what GnuPG reads (SEIPD v1): a message from one to
    the other, made in process, is decrypted and verified by gpg. (Sequoia's own generated
    keys advertise SEIPD v2, which gpg cannot decrypt: "packet(1) with unknown version 6".)"""
    store = Keystore(tmp_path / "home", backend="certd")
    sender = store.generate("gen-a@example.com", name="Gen A", passphrase="pw a")
    recipient = store.generate("gen-b@example.com", unprotected=True, expire="1y")
    key = store.get(sender.fingerprint)
    assert key is not None and key.status() == "usable" and key.expires is not None
    engine = SequoiaProtector(store)
    message = Message(sender="gen-a@example.com", to=["gen-b@example.com"], text="made here")
    (copy,) = asyncio.run(engine.protect(message.finalized(), SEQUOIA, passphrase="pw a"))
    reader = new_gnupg_home("e2b")
    try:
        gpg(reader, "--import", input=store.secret_key_bytes(recipient.fingerprint))
        gpg(reader, "--import", input=store.export(sender.fingerprint))
        _, (_, encrypted) = multipart_parts(copy.raw)
        plain, status = gpg_decrypt(reader, part_body(encrypted))
        assert b"made here" in plain
        assert f"VALIDSIG {sender.fingerprint}" in status
    finally:
        kill_agent(reader)
        shutil.rmtree(reader, ignore_errors=True)
    # And by the SOP implementations the interop suite uses, where installed.
    key_file, cert_file = tmp_path / "gen-b.key", tmp_path / "gen-a.cert"
    key_file.write_bytes(store.secret_key_bytes(recipient.fingerprint) or b"")
    cert_file.write_bytes(store.export(sender.fingerprint))
    for tool in ("sqop", "gosop"):
        if shutil.which(tool):
            plain, verified = sop_decrypt(tool, part_body(encrypted), key_file, cert_file, tmp_path)
            assert b"made here" in plain and verified.strip(), tool


def test_a_discovered_key_is_vetted_without_gpg_as_with_it(keys: Keys, tmp_path: Path) -> None:
    """Key discovery's vetting (vet_key) with no gpg program gives gpg's answers: the key and
    only the user IDs naming the address, or the same refusal."""
    from e2email.keystore import VettedKey, vet_key

    store = Keystore(tmp_path / "home", backend="certd")
    made = store.generate("two@example.com", name="Two", unprotected=True)
    tsk = pysequoia.Tsk.from_bytes(store.secret_key_bytes(made.fingerprint) or b"")
    cert = pysequoia.Cert.from_bytes(store.export(made.fingerprint, armor=False))
    two_ids = bytes(cert.add_user_id("Other <other@example.net>", tsk.certifier()))
    cases = [
        (keys.bob.cert.read_bytes(), "bob@example.net"),
        (keys.bob.cert.read_bytes(), "carol@example.com"),
        (keys.expired.cert.read_bytes(), keys.expired.address),
        (keys.weak.cert.read_bytes(), keys.weak.address),
        (two_ids, "two@example.com"),
        (two_ids, "other@example.net"),
        (b"not a key", "bob@example.net"),
    ]
    for data, address in cases:
        with_gpg = vet_key(data, address)
        without = vet_key(data, address, gpg_binary="no-such-gpg-program")
        if isinstance(with_gpg, VettedKey):
            assert isinstance(without, VettedKey), (address, without)
            assert without.fingerprint == with_gpg.fingerprint
            ids = [str(u) for u in pysequoia.Cert.from_bytes(without.data).user_ids]
            assert all(address in str(u) for u in ids) and len(ids) == 1, ids
        else:
            assert isinstance(without, KeyProblem), (address, without)
            assert without.reason is with_gpg.reason, (address, without, with_gpg)


def test_import_counts_are_gpgs(keys: Keys, tmp_path: Path) -> None:
    """imported: keys new to the keystore; unchanged: keys the data did not change."""
    store = Keystore(tmp_path / "home", backend="certd")
    first = store.import_keys(keys.bob.cert.read_bytes() + keys.carol.cert.read_bytes())
    assert (first.imported, first.unchanged) == (2, 0)
    again = store.import_file(keys.bob.cert)
    assert (again.imported, again.unchanged, again.changes) == (0, 1, ())
    assert keys.carol.secret is not None
    secret = store.import_file(keys.carol.secret, unprotected=True)
    assert (secret.imported, secret.unchanged, secret.secret_imported) == (0, 0, 1)
    assert secret.changes[0].secret_added
