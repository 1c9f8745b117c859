"""The in-process OpenPGP engine (issue 9 parts 2 and 4): what it must do beyond the shared
interop and fail-closed suites (which run against both engines).

pysequoia chooses keys itself: ``encrypt()`` encrypts to every live encryption subkey and,
when none is live, falls back to expired ones; ``Tsk.signer()`` takes the first signing key
with a secret. The engine must use exactly the (sub)keys the keystore chose and judged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pysequoia
import pytest
from fixtures_pgp import LOCKED_PASSPHRASE, Keys
from pgp_helpers import (
    TestKey,
    generate_key,
    gpg,
    gpg_verify,
    kill_agent,
    list_packet_key_ids,
    multipart_parts,
    new_gnupg_home,
    part_body,
)

from e2email import (
    ConfigError,
    CryptoError,
    KeyReason,
    Message,
    OpenPGPEngine,
    PassphraseError,
    Protection,
    RecipientKeyError,
    Scheme,
    SignerKeyError,
)
from e2email.certstore import CertStore
from e2email.crypto import sequoia
from e2email.crypto.base import engine_name, protector_for
from e2email.crypto.gpg import GpgProtector
from e2email.crypto.openpgp import dearmor, encrypted_to_key_ids
from e2email.crypto.sequoia import SequoiaProtector
from e2email.keystore import Keystore

SEQUOIA = Protection(engine=OpenPGPEngine.SEQUOIA)


def _add_subkey(
    factory: Path,
    key: TestKey,
    algo: str,
    usage: str,
    expire: str = "0",
    *,
    faked_time: str | None = None,
) -> None:
    extra = ["--faked-system-time", faked_time] if faked_time else []
    pw = ["--pinentry-mode", "loopback", "--passphrase", ""]
    gpg(factory, *extra, *pw, "--quick-add-key", key.fingerprint, algo, usage, expire)
    key.cert.write_bytes(gpg(factory, "--armor", "--export", key.fingerprint).stdout)
    assert key.secret is not None
    key.secret.write_bytes(gpg(factory, "--armor", "--export-secret-keys", key.fingerprint).stdout)


@pytest.fixture(scope="module")
def odd_keys() -> Iterator[tuple[TestKey, TestKey]]:
    """``multi``: a signing primary made in 2025, then (now) a second encryption subkey and a
    signing subkey, so pysequoia alone would encrypt to two subkeys and might sign with the
    primary. ``stale``: a live primary whose only encryption subkey expired in 2020."""
    factory = new_gnupg_home("e2q")
    out = new_gnupg_home("e2o")
    try:
        multi = generate_key(factory, out, "multi@example.com", faked_time="20250101T000000")
        _add_subkey(factory, multi, "cv25519", "encr")
        _add_subkey(factory, multi, "ed25519", "sign")
        stale = generate_key(
            factory,
            out,
            "stale@example.com",
            encryption_subkey=False,
            faked_time="20190101T000000",
        )
        _add_subkey(factory, stale, "cv25519", "encr", "1d", faked_time="20200101T000000")
        yield multi, stale
    finally:
        kill_agent(factory)


@pytest.fixture(scope="module")
def store(
    keys: Keys, odd_keys: tuple[TestKey, TestKey], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keystore]:
    home = new_gnupg_home("e2y")
    made = Keystore(home)
    for key in (keys.alice, keys.bob, keys.carol, *odd_keys):
        made.import_file(key.cert)
    for key in (keys.alice, *odd_keys):
        assert key.secret is not None
        made.import_file(key.secret)
    yield made
    made.shutdown_agent()


def _armored(raw: bytes) -> bytes:
    _, (_, encrypted) = multipart_parts(raw)
    return part_body(encrypted)


def test_engine_choice_maps_each_policy_to_one_engine(keys: Keys, store: Keystore) -> None:
    """AUTO is the in-process engine when pysequoia is installed (it is, with the test extra);
    "gpg" and "sequoia" are what they say; S/MIME has its own engine; a name is accepted and
    a wrong one is a ConfigError naming the choices."""
    assert engine_name(Protection()) == "openpgp-sequoia"
    assert engine_name(Protection(engine=OpenPGPEngine.SEQUOIA)) == "openpgp-sequoia"
    assert engine_name(Protection(engine=OpenPGPEngine.GPG)) == "openpgp"
    assert engine_name(Protection(engine="gpg")) == "openpgp"  # type: ignore[arg-type]
    assert engine_name(Protection(scheme=Scheme.SMIME)) == "smime"
    with pytest.raises(ConfigError, match="auto, sequoia or gpg"):
        Protection(engine="pgpy")  # type: ignore[arg-type]
    for engine in ("sequoia", "gpg"):  # an OpenPGP engine with S/MIME is a mistake, said so
        with pytest.raises(ConfigError, match="chooses an OpenPGP engine"):
            Protection(scheme=Scheme.SMIME, engine=engine)  # type: ignore[arg-type]
    assert Protection(scheme=Scheme.SMIME, engine="auto").engine is OpenPGPEngine.AUTO  # type: ignore[arg-type]
    certstore = CertStore(store.home / "certs")
    engine = protector_for(Protection(), keystore=store, certstore=certstore)
    assert isinstance(engine, SequoiaProtector) and engine.keystore is store
    gpg_engine = protector_for(
        Protection(engine=OpenPGPEngine.GPG), keystore=store, certstore=certstore
    )
    assert isinstance(gpg_engine, GpgProtector)


def test_without_pysequoia_auto_is_gpg_and_sequoia_says_how_to_install_it(
    store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pysequoia: the default falls back to gpg; asking for Sequoia is a clear error
    before any key is looked at."""
    monkeypatch.setitem(sys.modules, "pysequoia", None)  # import raises ImportError
    sequoia.available.cache_clear()
    try:
        assert engine_name(Protection()) == "openpgp"
        message = Message(sender="alice@example.org", to=["bob@example.net"], text="x")
        with pytest.raises(CryptoError, match=r"pip install 'e2email\[sequoia\]'"):
            asyncio.run(SequoiaProtector(store).protect(message.finalized(), SEQUOIA))
    finally:
        sequoia.available.cache_clear()


def test_an_expired_only_subkey_is_refused_although_pysequoia_would_use_it(
    odd_keys: tuple[TestKey, TestKey], store: Keystore
) -> None:
    """pysequoia's encrypt() falls back to an expired subkey (the caveat, shown here with the
    raw call); the engine refuses the recipient first, naming why."""
    _, stale = odd_keys
    raw = pysequoia.encrypt(b"x", [pysequoia.Cert.from_file(str(stale.cert))])
    assert len(encrypted_to_key_ids(raw)[0]) == 1  # pysequoia encrypted to the expired subkey
    message = Message(sender="alice@example.org", to=["stale@example.com"], text="x")
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(SequoiaProtector(store).protect(message.finalized(), SEQUOIA))
    ((address, reason),) = [(p.address, p.reason) for p in info.value.problems]
    assert (address, reason) == ("stale@example.com", KeyReason.NO_ENCRYPTION_KEY)


def test_only_the_subkeys_the_keystore_chose_are_used(
    keys: Keys, odd_keys: tuple[TestKey, TestKey], store: Keystore, tmp_path: Path
) -> None:
    """A certificate with two live encryption subkeys: pysequoia alone encrypts to both, the
    engine to the one the keystore chose only. A key whose primary can sign and that has a
    signing subkey: the signature is made by the subkey the keystore chose."""
    multi, _ = odd_keys
    chosen = store.get(multi.fingerprint)
    assert chosen is not None
    enc, sig = chosen.encryption_subkey(), chosen.signing_subkey()
    assert enc is not None and sig is not None
    assert len(chosen.encryption_subkeys()) == 2 and sig.fingerprint != multi.fingerprint
    raw = pysequoia.encrypt(b"x", [pysequoia.Cert.from_file(str(multi.cert))])
    assert len(encrypted_to_key_ids(raw)[0]) == 2

    engine = SequoiaProtector(store)
    message = Message(sender="multi@example.com", to=["multi@example.com"], text="x")
    (copy,) = asyncio.run(
        engine.protect(message.finalized(), Protection(engine=OpenPGPEngine.SEQUOIA))
    )
    assert list_packet_key_ids(store.gnupg_home, _armored(copy.raw)) == {enc.key_id}

    (signed,) = asyncio.run(
        engine.protect(message.finalized(), Protection(encrypt=False, engine="sequoia"))  # type: ignore[arg-type]
    )
    _, (part, signature) = multipart_parts(signed.raw)
    assert gpg_verify(store.gnupg_home, part_body(signature), part, tmp_path) == sig.fingerprint


def test_keys_are_exported_from_gpg_once_not_per_message(
    keys: Keys, store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gpg export of each certificate and of the secret key is paid once per key: a run
    of messages after the first costs no gpg process at all."""
    calls: list[str] = []
    real_export = Keystore.export

    def counting(self: Keystore, spec: str, *, armor: bool = True) -> bytes:
        calls.append(spec)
        return real_export(self, spec, armor=armor)

    monkeypatch.setattr(Keystore, "export", counting)
    fresh = Keystore(store.home)  # a new keystore object: an empty cache
    engine = SequoiaProtector(fresh)
    message = Message(
        sender="alice@example.org", to=["bob@example.net"], cc=["carol@example.com"], text="x"
    )
    for _ in range(3):
        asyncio.run(engine.protect(message.finalized(), SEQUOIA))
    assert sorted(calls) == sorted(
        [keys.alice.fingerprint, keys.bob.fingerprint, keys.carol.fingerprint]
    )


def test_cli_engine_option_chooses_the_engine(keys: Keys, tmp_path: Path) -> None:
    """`e2email send --engine sequoia|gpg` makes the message with that engine (Sequoia's
    signatures carry its salt notation, gpg's do not); --engine is refused with --smime in
    one line."""
    home = tmp_path / "home"
    cli_store = Keystore(home)
    assert keys.alice.secret is not None
    cli_store.import_file(keys.alice.secret)
    env = {**os.environ, "E2EMAIL_HOME": str(home)}
    base = ["send", "--from", "alice@example.org", "--to", "bob@example.net", "--body", "x"]

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "e2email", *base, *args],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )

    salts = {}
    for engine in ("sequoia", "gpg"):
        done = run("--no-encrypt", "--engine", engine, "--output", "-")
        assert done.returncode == 0, done.stderr
        _, (_, signature) = multipart_parts(done.stdout)
        salts[engine] = b"salt@notations.sequoia-pgp.org" in dearmor(part_body(signature))
    assert salts == {"sequoia": True, "gpg": False}
    cli_store.shutdown_agent()

    done = run("--smime", "--engine", "sequoia", "--output", "-")
    assert done.returncode == 2
    assert "--engine chooses an OpenPGP engine" in done.stderr.decode()
    assert b"Traceback" not in done.stderr


def test_a_passphrase_protected_key_is_unlocked_by_each_messages_passphrase(
    sender_store: Keystore,
) -> None:
    """The secret key is exported once, but stays protected in the cache: after a message
    signed with the right passphrase, a wrong one or none is still refused (no unlocked key is
    kept for a protected key, unlike for one without a passphrase)."""
    engine = SequoiaProtector(sender_store)
    message = Message(sender="locked@example.org", to=["bob@example.net"], text="x").finalized()
    (copy,) = asyncio.run(engine.protect(message, SEQUOIA, passphrase=LOCKED_PASSPHRASE))
    assert copy.signed
    with pytest.raises(PassphraseError) as wrong:
        asyncio.run(engine.protect(message, SEQUOIA, passphrase="wrong"))
    assert not wrong.value.missing
    with pytest.raises(PassphraseError) as missing:
        asyncio.run(engine.protect(message, SEQUOIA))
    assert missing.value.missing
    (again,) = asyncio.run(engine.protect(message, SEQUOIA, passphrase=LOCKED_PASSPHRASE))
    assert again.signed


def _protected_copy(factory: Path, key: TestKey, passphrase: str) -> bytes:
    """``key``'s secret key under ``passphrase``, made in a home of its own."""
    home = new_gnupg_home("e2p")
    try:
        assert key.secret is not None
        gpg(home, "--import", str(key.secret))
        gpg(home, "--passphrase", passphrase, "--passwd", key.fingerprint)
        return gpg(
            home, "--passphrase", passphrase, "--armor", "--export-secret-keys", key.fingerprint
        ).stdout
    finally:
        kill_agent(home)


@pytest.fixture(scope="module")
def renewed_keys() -> Iterator[tuple[TestKey, TestKey, bytes, bytes]]:
    """An unprotected sender key, a recipient, and the sender's secret key under "pw1" and
    under "pw2"."""
    factory = new_gnupg_home("e2q")
    out = new_gnupg_home("e2o")
    try:
        sender = generate_key(factory, out, "renew@example.org")
        rcpt = generate_key(factory, out, "rcpt@example.net")
        yield (
            sender,
            rcpt,
            _protected_copy(factory, sender, "pw1"),
            _protected_copy(factory, sender, "pw2"),
        )
    finally:
        kill_agent(factory)


def _replace_secret(store: Keystore, key: TestKey, secret: bytes) -> None:
    gpg(store.gnupg_home, "--delete-secret-keys", key.fingerprint)
    gpg(store.gnupg_home, "--import", input=secret)


def test_a_secret_key_re_imported_under_a_new_passphrase_is_not_kept_from_before(
    renewed_keys: tuple[TestKey, TestKey, bytes, bytes],
) -> None:
    """The secret key and the unlocked signer are kept only while gpg's secret-key file is the
    one they came from: after the key is re-imported under a new passphrase, the new one signs
    and the old one is refused; an unprotected key re-imported protected needs its passphrase;
    a deleted secret key signs nothing."""
    sender, rcpt, pw1, pw2 = renewed_keys
    store = Keystore(new_gnupg_home("e2y"))
    try:
        store.import_file(rcpt.cert)
        gpg(store.gnupg_home, "--import", input=pw1)
        engine = SequoiaProtector(store)
        message = Message(sender=sender.address, to=[rcpt.address], text="x").finalized()
        (copy,) = asyncio.run(engine.protect(message, SEQUOIA, passphrase="pw1"))
        assert copy.signed
        _replace_secret(store, sender, pw2)
        (copy,) = asyncio.run(engine.protect(message, SEQUOIA, passphrase="pw2"))
        assert copy.signed
        with pytest.raises(PassphraseError) as old:
            asyncio.run(engine.protect(message, SEQUOIA, passphrase="pw1"))
        assert not old.value.missing

        # An open (unprotected) key's signer is not kept once the key is protected.
        assert sender.secret is not None
        _replace_secret(store, sender, sender.secret.read_bytes())
        (copy,) = asyncio.run(engine.protect(message, SEQUOIA))
        assert copy.signed
        _replace_secret(store, sender, pw2)
        with pytest.raises(PassphraseError) as missing:
            asyncio.run(engine.protect(message, SEQUOIA))
        assert missing.value.missing

        gpg(store.gnupg_home, "--delete-secret-keys", sender.fingerprint)
        with pytest.raises(SignerKeyError) as gone:
            asyncio.run(engine.protect(message, SEQUOIA, passphrase="pw2"))
        assert gone.value.problem.reason == KeyReason.NO_SECRET_KEY
    finally:
        store.shutdown_agent()


def test_the_secret_key_export_never_starts_a_pinentry(keys: Keys, tmp_path: Path) -> None:
    """A protected key asked for with no passphrase (or an empty one): the engine says a
    passphrase is needed, and gpg-agent's pinentry is never started (loopback on stdin)."""
    assert keys.locked.secret is not None
    store = Keystore(new_gnupg_home("e2y"))
    try:
        store.import_file(keys.bob.cert)
        store.import_file(keys.locked.secret)
        store.shutdown_agent()
        log = tmp_path / "pinentry.log"
        stub = tmp_path / "pinentry.sh"
        stub.write_text(
            "#!/bin/sh\n"
            f'echo launched >> "{log}"\n'
            'echo "OK Pleased to meet you"\n'
            "while read cmd rest; do\n"
            '  case "$cmd" in\n'
            f'    GETPIN) echo "D {LOCKED_PASSPHRASE}"; echo OK;;\n'
            "    BYE) echo OK; exit 0;;\n"
            "    *) echo OK;;\n"
            "  esac\n"
            "done\n"
        )
        stub.chmod(0o755)
        (store.gnupg_home / "gpg-agent.conf").write_text(f"pinentry-program {stub}\n")
        message = Message(sender=keys.locked.address, to=["bob@example.net"], text="x").finalized()
        for passphrase in (None, ""):
            with pytest.raises(PassphraseError):
                asyncio.run(
                    SequoiaProtector(store).protect(message, SEQUOIA, passphrase=passphrase)
                )
        assert not log.exists()
    finally:
        store.shutdown_agent()


@pytest.fixture(scope="module")
def gpg_only_keys() -> Iterator[tuple[TestKey, TestKey, TestKey]]:
    """Keys gpg can encrypt to and Sequoia cannot as the keystore chose them: a sender, a
    brainpoolP256r1 key ("no suitable encryption subkey" in Sequoia), and an RSA key whose
    primary can sign and encrypt, with a cv25519 encryption subkey (pysequoia would encrypt
    to both)."""
    factory = new_gnupg_home("e2q")
    out = new_gnupg_home("e2o")
    pw = ["--passphrase", ""]

    def made(address: str, algo: str, usage: str, *extra: str) -> TestKey:
        gpg(factory, *extra, *pw, "--quick-gen-key", address, algo, usage, "0")
        listing = gpg(factory, "--with-colons", "--list-keys", address).stdout.decode()
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        return TestKey(address, fpr, out / f"{address}.cert", out / f"{address}.key")

    try:
        sender = generate_key(factory, out, "gpgonly-sender@example.org")
        brainpool = made("brainpool@example.net", "brainpoolP256r1", "sign")
        gpg(factory, *pw, "--quick-add-key", brainpool.fingerprint, "brainpoolP256r1", "encr")
        # Made earlier, so that the keystore chooses the newer subkey.
        dual = made(
            "dual@example.net", "rsa2048", "sign,encr", "--faked-system-time", "20250101T000000"
        )
        gpg(factory, *pw, "--quick-add-key", dual.fingerprint, "cv25519", "encr")
        for key in (brainpool, dual):
            key.cert.write_bytes(gpg(factory, "--armor", "--export", key.fingerprint).stdout)
        assert brainpool.secret is not None
        brainpool.secret.write_bytes(
            gpg(factory, *pw, "--armor", "--export-secret-keys", brainpool.fingerprint).stdout
        )
        yield sender, brainpool, dual
    finally:
        kill_agent(factory)


def test_keys_only_gpg_can_use_are_named_or_served_by_gpg_under_auto(
    gpg_only_keys: tuple[TestKey, TestKey, TestKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """engine=SEQUOIA: one RecipientKeyError naming every such recipient (UNSUPPORTED, with
    the hint --engine gpg), nothing encrypted. AUTO (the default engine): the message is
    made by the GnuPG engine, with one warning naming the key."""
    sender, brainpool, dual = gpg_only_keys
    store = Keystore(new_gnupg_home("e2y"))
    try:
        assert sender.secret is not None
        store.import_file(sender.secret)
        store.import_file(brainpool.cert)
        store.import_file(dual.cert)
        message = Message(
            sender=sender.address, to=[brainpool.address, dual.address], text="x"
        ).finalized()
        with pytest.raises(RecipientKeyError) as info:
            asyncio.run(SequoiaProtector(store).protect(message, SEQUOIA))
        problems = {p.address: p for p in info.value.problems}
        assert set(problems) == {brainpool.address, dual.address}
        for problem in problems.values():
            assert problem.reason is KeyReason.UNSUPPORTED
            assert "--engine gpg" in problem.detail

        engine = protector_for(Protection(), keystore=store, certstore=CertStore(store.home / "c"))
        with caplog.at_level("WARNING", logger="e2email.crypto.sequoia"):
            (copy,) = asyncio.run(engine.protect(message, Protection()))
        assert set(copy.encrypted_to) == {
            sender.fingerprint,
            brainpool.fingerprint,
            dual.fingerprint,
        }
        assert copy.signed
        assert b"salt@notations.sequoia-pgp.org" not in copy.raw
        (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "GnuPG engine" in warning.getMessage()
        assert brainpool.fingerprint in warning.getMessage()

        # A signer key Sequoia cannot use: named with an accurate hint, or served by gpg.
        assert brainpool.secret is not None
        store.import_file(brainpool.secret)
        signed = Message(sender=brainpool.address, to=[sender.address], text="x").finalized()
        only_sign = Protection(encrypt=False, engine=OpenPGPEngine.SEQUOIA)
        with pytest.raises(SignerKeyError) as signer:
            asyncio.run(SequoiaProtector(store).protect(signed, only_sign))
        assert signer.value.problem.reason is KeyReason.BACKEND
        assert "smartcard or of an algorithm" in signer.value.problem.detail
        assert "--engine gpg" in signer.value.problem.detail
        (copy,) = asyncio.run(engine.protect(signed, Protection(encrypt=False)))
        assert copy.signed and copy.signer == brainpool.fingerprint
    finally:
        store.shutdown_agent()
