"""The keystore: import in every form, judging keys, choosing among several, and the checks on
what gpg produced (integrity protection, exactly the intended recipients)."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import generate_key, gpg, kill_agent, new_gnupg_home

from e2email.crypto import openpgp
from e2email.errors import (
    CryptoError,
    KeyProblem,
    KeyReason,
    KeystoreError,
    MessageError,
    PassphraseError,
)
from e2email.keystore import Keystore


@pytest.fixture
def store() -> Iterator[Keystore]:
    home = new_gnupg_home("e2ks")
    ks = Keystore(home)
    yield ks
    ks.shutdown_agent()
    shutil.rmtree(home, ignore_errors=True)


def test_imports_armored_and_binary_public_and_secret_keys(store: Keystore, keys: Keys) -> None:
    """Armored and binary certificates and secret keys import; secret ones are marked so."""
    store.gnupg_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    binary = gpg(store.gnupg_home, "--dearmor", input=keys.bob.cert.read_bytes()).stdout
    assert not binary.startswith(b"-----")
    summary = store.import_keys(binary)
    assert summary.fingerprints == (keys.bob.fingerprint,)
    assert keys.alice.secret
    secret = store.import_file(keys.alice.secret)
    assert secret.secret_imported == 1
    by_fpr = {k.fingerprint: k for k in store.all_keys()}
    assert by_fpr[keys.alice.fingerprint].has_secret
    assert not by_fpr[keys.bob.fingerprint].has_secret


@pytest.mark.parametrize("data", [b"", b"not a key at all\n", b"-----BEGIN PGP PUBLIC KEY BLOCK"])
def test_import_of_garbage_is_a_clear_error(store: Keystore, data: bytes) -> None:
    """Data that holds no key is refused with a KeystoreError, not a silent no-op."""
    with pytest.raises(KeystoreError):
        store.import_keys(data)


def test_lookup_is_case_insensitive_and_reports_why_keys_are_unusable(
    store: Keystore, keys: Keys
) -> None:
    """Addresses match whatever their case; unusable keys come back as a KeyProblem with the
    reason and the fingerprint of the key that was found."""
    for key in (keys.bob, keys.expired, keys.revoked, keys.weak, keys.signonly, keys.sha1):
        store.import_file(key.cert)
    assert not isinstance(store.encryption_key("BOB@example.NET"), KeyProblem)
    for key, reason in (
        (keys.expired, KeyReason.EXPIRED),
        (keys.revoked, KeyReason.REVOKED),
        (keys.weak, KeyReason.WEAK),
        (keys.signonly, KeyReason.NO_ENCRYPTION_KEY),
        (keys.sha1, KeyReason.WEAK),
    ):
        problem = store.encryption_key(key.address)
        assert isinstance(problem, KeyProblem)
        assert problem.reason is reason
        assert problem.fingerprint == key.fingerprint
    weak = store.encryption_key(keys.weak.address)
    assert isinstance(weak, KeyProblem)
    assert "rsa1024" in weak.detail
    sha1 = store.encryption_key(keys.sha1.address)
    assert isinstance(sha1, KeyProblem)
    assert "SHA-1" in sha1.detail
    assert store.encryption_key("bob@example.net.evil") == KeyProblem(
        "bob@example.net.evil", KeyReason.NOT_FOUND
    )


def test_two_usable_keys_are_refused_as_ambiguous_and_a_key_map_decides(
    store: Keystore, tmp_path: Path
) -> None:
    """With two usable keys for one address neither is guessed (the newest used to win):
    the refusal names both fingerprints and the file each came from. An explicit map (by
    fingerprint or long key ID) chooses one, even one without the address."""
    factory = new_gnupg_home("e2kf")
    try:
        old = generate_key(factory, tmp_path, "twice@example.com", faked_time="20240101T000000")
        (tmp_path / "old.cert").write_bytes(old.cert.read_bytes())
        new = generate_key(factory, tmp_path, "twice@example.com")
        other = generate_key(factory, tmp_path, "other@example.com")
    finally:
        kill_agent(factory)
        shutil.rmtree(factory, ignore_errors=True)
    for path in (tmp_path / "old.cert", new.cert, other.cert):
        store.import_file(path)
    refused = store.encryption_key("twice@example.com")
    assert isinstance(refused, KeyProblem)
    assert refused.reason is KeyReason.AMBIGUOUS
    assert old.fingerprint in refused.detail and new.fingerprint in refused.detail
    assert str(tmp_path / "old.cert") in refused.detail and str(new.cert) in refused.detail
    for spec in (new.fingerprint, new.fingerprint[-16:]):
        mapped = store.encryption_key("twice@example.com", key_map={"twice@example.com": spec})
        assert not isinstance(mapped, KeyProblem)
        assert mapped.fingerprint == new.fingerprint
    for spec in (old.fingerprint, old.fingerprint[-16:], f"0x{old.fingerprint[-16:]}"):
        mapped = store.encryption_key("twice@example.com", key_map={"twice@example.com": spec})
        assert not isinstance(mapped, KeyProblem)
        assert mapped.fingerprint == old.fingerprint
    foreign = store.encryption_key(
        "twice@example.com", key_map={"twice@example.com": other.fingerprint}
    )
    assert not isinstance(foreign, KeyProblem)
    assert foreign.fingerprint == other.fingerprint
    missing = store.encryption_key("twice@example.com", key_map={"twice@example.com": "AB" * 20})
    assert isinstance(missing, KeyProblem)
    assert missing.reason is KeyReason.NOT_FOUND


def test_generate_rsa3072_on_request(store: Keystore) -> None:
    """`generate(..., algorithm="rsa3072")` makes an RSA-3072 key with an encryption subkey."""
    made = store.generate("rsa@example.org", algorithm="rsa3072", expire="1y")
    key = store.get(made.fingerprint)
    assert key is not None
    assert key.primary.algorithm == "rsa3072"
    assert [s.algorithm for s in key.subkeys] == ["rsa3072"]
    assert key.expires is not None
    assert key.encryption_problem() is None
    assert key.signing_problem() is None
    with pytest.raises(MessageError):
        store.generate("bad\naddress@example.org")


# -- Checks on gpg's output ------------------------------------------------------------------


def _armor(packets: bytes) -> bytes:
    body = base64.b64encode(packets).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN PGP MESSAGE-----\n\n" + "\n".join(lines) + "\n-----END PGP MESSAGE-----\n"
    ).encode()


def _pkesk(key_id: str) -> bytes:
    body = bytes([3]) + bytes.fromhex(key_id) + bytes([18]) + b"\x00" * 10
    return bytes([0xC1, len(body)]) + body


def test_packet_walk_reads_recipients_and_refuses_unprotected_data(
    store: Keystore, keys: Keys
) -> None:
    """The encrypted-output check reads PKESK key IDs and refuses the legacy SED packet
    (no integrity protection, EFAIL) and session keys for keys nobody asked for."""
    store.import_file(keys.bob.cert)
    bob = store.get(keys.bob.fingerprint)
    assert bob is not None
    enc_id = bob.encryption_subkeys()[0].key_id
    seipd = bytes([0xD2, 5]) + b"\x01abcd"
    sed = bytes([0xC9, 4]) + b"abcd"
    assert openpgp.encrypted_to_key_ids(_armor(_pkesk(enc_id) + seipd)) == ([enc_id], 18)
    chosen = [bob.encryption_subkeys()[0].fingerprint]
    openpgp._check_encrypted(_armor(_pkesk(enc_id) + seipd), chosen)
    with pytest.raises(CryptoError, match="integrity"):
        openpgp._check_encrypted(_armor(_pkesk(enc_id) + sed), chosen)
    with pytest.raises(CryptoError, match="unexpected set of keys"):
        openpgp._check_encrypted(
            _armor(_pkesk(enc_id) + _pkesk("1122334455667788") + seipd), chosen
        )
    with pytest.raises(CryptoError, match="unexpected set of keys"):  # one recipient missing
        openpgp._check_encrypted(_armor(_pkesk(enc_id) + seipd), [*chosen, "AB" * 20])
    # A passphrase-encrypted session key (tag 3) is never something we asked for.
    with pytest.raises(CryptoError):
        openpgp.encrypted_to_key_ids(_armor(bytes([0xC3, 4]) + b"\x04\x09\x03\x00" + seipd))


def test_encrypt_to_key_in_gpg_conf_is_ignored(keys: Keys, tmp_path: Path) -> None:
    """An `encrypt-to` line in an existing gpg.conf cannot add a key ID to a copy (it would
    reveal a Bcc recipient or a third party): e2email passes --no-encrypt-to."""
    home = new_gnupg_home("e2kc")
    try:
        store = Keystore(tmp_path, gnupg_home=home)
        for key in (keys.bob, keys.carol):
            store.import_file(key.cert)
        (home / "gpg.conf").write_text(f"encrypt-to {keys.carol.fingerprint}\n")
        bob = store.get(keys.bob.fingerprint)
        assert bob is not None
        entity = openpgp.encrypt(store, b"Content-Type: text/plain\r\n\r\nhi\r\n", recipients=[bob])
        armored = entity[entity.index(b"-----BEGIN PGP MESSAGE") :]
        ids, tag = openpgp.encrypted_to_key_ids(armored)
        assert ids == [bob.encryption_subkeys()[0].key_id]
        assert tag in (18, 20)
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def test_gpg_conf_cannot_choose_the_signer_the_digest_or_the_cipher(
    keys: Keys, tmp_path: Path
) -> None:
    """An existing GnuPG home whose gpg.conf says local-user (another key), digest-algo SHA1
    and cipher-algo 3DES: e2email still signs with the sender's own key and a strong hash and
    encrypts with AES (it runs gpg with --no-options and names the subkeys exactly)."""
    home = new_gnupg_home("e2kg")
    try:
        store = Keystore(tmp_path, gnupg_home=home)
        assert keys.alice.secret and keys.locked.secret
        for path in (keys.alice.secret, keys.bob.cert):
            store.import_file(path)
        (home / "gpg.conf").write_text(
            f"local-user {keys.bob.fingerprint}\ndigest-algo SHA1\ncipher-algo 3DES\n"
        )
        alice = store.get(keys.alice.fingerprint)
        bob = store.get(keys.bob.fingerprint)
        assert alice is not None and bob is not None
        signing_sub = alice.signing_subkey()
        assert signing_sub is not None
        _, info = openpgp.sign(store, b"Content-Type: text/plain\r\n\r\nx\r\n", signer=alice)
        assert info.fingerprint == signing_sub.fingerprint
        assert info.hash_name in ("sha256", "sha384", "sha512")
        entity = openpgp.encrypt(
            store, b"Content-Type: text/plain\r\n\r\nhi\r\n", recipients=[bob], signer=alice
        )
        armored = entity[entity.index(b"-----BEGIN PGP MESSAGE") :]
        recipient = new_gnupg_home("e2kr")
        try:
            gpg(recipient, "--import", str(keys.bob.secret))
            gpg(recipient, "--import", str(keys.alice.cert))
            done = gpg(recipient, "--status-fd", "1", "--decrypt", input=armored)
        finally:
            kill_agent(recipient)
            shutil.rmtree(recipient, ignore_errors=True)
        status = done.stdout.decode(errors="replace")
        assert f"VALIDSIG {signing_sub.fingerprint}" in status
        validsig = next(ln for ln in status.splitlines() if "VALIDSIG" in ln).split()
        assert validsig[9] != "2"  # hash algorithm: never SHA-1
        cipher = next(ln for ln in status.splitlines() if "DECRYPTION_INFO" in ln).split()
        assert cipher[3] in ("7", "8", "9")  # AES
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def test_refused_subkey_is_never_used_even_if_newest(keys: Keys, tmp_path: Path) -> None:
    """A certificate whose newest encryption subkey is RSA-1024 (refused) and an older good
    one: the message is encrypted to the good subkey, not to the one gpg would pick."""
    factory = new_gnupg_home("e2kw")
    home = new_gnupg_home("e2kx")
    try:
        key = generate_key(factory, tmp_path, "twosubs@example.com")
        gpg(factory, "--passphrase", "", "--quick-add-key", key.fingerprint, "rsa1024", "encr", "0")
        key.cert.write_bytes(gpg(factory, "--armor", "--export", key.fingerprint).stdout)
        store = Keystore(tmp_path / "h", gnupg_home=home)
        store.import_file(key.cert)
        cert = store.get(key.fingerprint)
        assert cert is not None
        weak = [s for s in cert.subkeys if s.algorithm == "rsa1024"]
        good = cert.encryption_subkey()
        assert weak and good is not None and good.algorithm == "cv25519"
        entity = openpgp.encrypt(store, b"Content-Type: text/plain\r\n\r\nx\r\n", recipients=[cert])
        armored = entity[entity.index(b"-----BEGIN PGP MESSAGE") :]
        assert openpgp.encrypted_to_key_ids(armored)[0] == [good.key_id]
    finally:
        for h in (factory, home):
            kill_agent(h)
            shutil.rmtree(h, ignore_errors=True)


def test_signing_key_chosen_by_map_must_carry_the_from_address(
    keys: Keys, sender_store: Keystore
) -> None:
    """An explicit key for the sender still has to name the From address (standards item 15);
    for recipients a mapped key may carry another address."""
    problem = sender_store.signing_key(
        "alice@example.org", key_map={"alice@example.org": keys.locked.fingerprint}
    )
    assert isinstance(problem, KeyProblem)
    assert problem.reason is KeyReason.ADDRESS_MISMATCH


def test_passphrase_with_a_line_break_is_a_clear_error(keys: Keys, sender_store: Keystore) -> None:
    """A passphrase containing CR or LF is refused as a PassphraseError, not a bare ValueError
    from python-gnupg."""
    locked = sender_store.get(keys.locked.fingerprint)
    assert locked is not None
    with pytest.raises(PassphraseError):
        openpgp.sign(sender_store, b"x\r\n", signer=locked, passphrase="a\nb")
