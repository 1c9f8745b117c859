"""What the protection path's shortcuts must never change (issue 9, CPU per message).

The Sequoia engine checks the binary packets it got before armoring them, instead of
decoding its own armor again; the check stays as strong (who each copy is encrypted to,
integrity-protected data)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    generate_key,
    gpg,
    gpg_decrypt,
    kill_agent,
    multipart_parts,
    new_gnupg_home,
    part_body,
    revoke,
)

from e2email import (
    CryptoError,
    KeyReason,
    Mailer,
    Message,
    OpenPGPEngine,
    Protection,
    RecipientKeyError,
    keystore,
)
from e2email.crypto import openpgp, sequoia
from e2email.keystore import Keystore, OpenPGPKey

SEQUOIA = Protection(engine=OpenPGPEngine.SEQUOIA)


def _message(keys: Keys, *, to: str | None = None, bcc: tuple[str, ...] = ()) -> Message:
    return Message(
        sender=keys.alice.address,
        to=[to or keys.bob.address],
        bcc=list(bcc),
        subject="speed",
        text="speed test " * 400,
    )


def _armored(raw: bytes) -> bytes:
    _, (_, encrypted) = multipart_parts(raw)
    return part_body(encrypted)


class _ExtraRecipient:
    """pysequoia, but every encryption also goes to ``extra``: what the packet check exists
    to catch (a copy readable by a key nobody chose)."""

    def __init__(self, real: Any, extra: Any) -> None:
        self._real, self._extra = real, extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def encrypt(self, data: bytes, certs: list[Any], **kwargs: Any) -> Any:
        return self._real.encrypt(data, [*certs, self._extra], **kwargs)


def test_a_small_copy_is_checked_on_sequoias_packets_without_decoding_its_armor(
    keys: Keys,
    sender_store: Keystore,
    recipients_home: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packet check of a usual (in-memory) copy reads the binary message Sequoia
    returned: the armored copy is never decoded again, and what the armor carries is exactly
    the packets that were checked (gpg decrypts it as bob)."""
    with Mailer(keystore=sender_store, protection=SEQUOIA) as mailer:
        mailer.protect(_message(keys))  # keys exported and judged once

        def no_dearmoring(*args: object, **kwargs: object) -> None:
            raise AssertionError("the engine decoded its own armor again")

        with monkeypatch.context() as patch:
            patch.setattr(openpgp, "_dearmored", no_dearmoring)
            (copy,) = mailer.protect(_message(keys))
    armored = _armored(copy.raw)
    key_ids, tag = openpgp.encrypted_to_key_ids(armored)
    assert tag == 18
    bob = sender_store.get(keys.bob.fingerprint)
    alice = sender_store.get(keys.alice.fingerprint)
    assert bob is not None and alice is not None
    chosen = [k.encryption_subkey() for k in (bob, alice)]
    assert sorted(key_ids) == sorted(s.key_id for s in chosen if s is not None)
    assert openpgp.packet_key_ids(openpgp.dearmor(armored)) == (key_ids, tag)
    plain, _ = gpg_decrypt(recipients_home, armored)
    assert b"speed test speed test" in plain


@pytest.mark.parametrize("bcc", [False, True], ids=["main copy", "bcc copy"])
def test_the_binary_packet_check_still_refuses_a_copy_for_an_unchosen_key(
    keys: Keys, sender_store: Keystore, monkeypatch: pytest.MonkeyPatch, bcc: bool
) -> None:
    """A copy Sequoia encrypted to one more key than the keystore chose (a Bcc recipient's
    key in the main copy, say) is refused before anything is returned."""
    dave = sender_store.get(keys.dave.fingerprint)
    assert dave is not None
    with Mailer(keystore=sender_store, protection=SEQUOIA) as mailer:
        message = _message(keys, bcc=(keys.carol.address,) if bcc else ())
        mailer.protect(message)
        extra, _ = sequoia._Keys(sender_store).recipient(dave)
        real = sequoia._sq()
        monkeypatch.setattr(sequoia, "_sq", lambda: _ExtraRecipient(real, extra))
        with pytest.raises(CryptoError, match="unexpected set of keys"):
            mailer.protect(message)


def test_the_binary_packet_walk_agrees_with_the_armored_one() -> None:
    """packet_key_ids on the binary message, whole or in pieces cut anywhere, gives what
    encrypted_to_key_ids gives on its armor; a passphrase session key and the legacy SED
    packet are refused as before."""
    import warnings

    import pysequoia

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        certs = [pysequoia.Cert.generate(f"r{i} <r{i}@example.org>") for i in range(3)]
    binary = bytes(pysequoia.encrypt(b"y" * 3000, certs, armor=False))
    armored = sequoia._crlf(bytes(pysequoia.encrypt(b"y" * 3000, certs)))
    ids, tag = openpgp.encrypted_to_key_ids(armored)
    assert len(ids) == 3 and tag == 18
    assert sorted(openpgp.packet_key_ids(binary)[0]) == sorted(ids)
    for cut in (1, 7, 100, 200):
        pieces = [binary[i : i + cut] for i in range(0, len(binary), cut)]
        assert sorted(openpgp.packet_key_ids(pieces)[0]) == sorted(ids)
    armored_again = sequoia._armored(pysequoia, binary)
    assert openpgp.dearmor(armored_again) == binary
    assert armored_again.startswith(b"-----BEGIN PGP MESSAGE-----\r\n")
    assert b"\r\n=" in armored_again  # the CRC-24 line GnuPG 2.2 wants
    assert b"\n" not in armored_again.replace(b"\r\n", b"")
    _, start, length = openpgp._packet_header(binary, 0)
    assert length is not None
    pkesk = binary[: start + length]
    with pytest.raises(CryptoError, match="passphrase"):
        openpgp.packet_key_ids(bytes([0xC3, 4]) + b"\x04\x09\x03\x00" + binary)
    with pytest.raises(CryptoError, match="integrity"):
        sequoia._check_binary(pkesk + bytes([0xC9, 4]) + b"abcd", ["0" * 24 + ids[0]])
    with pytest.raises(CryptoError, match="no encrypted data packet"):
        openpgp.packet_key_ids(pkesk)


# -- Key resolution: judged once per keystore state ----------------------------------------


@dataclass(frozen=True)
class _Made:
    """Certificates made for this module: ``rita`` (before and after her revocation), two
    keys for ``twin@example.com``, and ``soon@example.com`` (expires in a day)."""

    rita: bytes
    rita_revoked: bytes
    rita_fpr: str
    twin1: bytes
    twin1_fpr: str
    twin2: bytes
    twin2_fpr: str
    soon: bytes
    soon_fpr: str


@pytest.fixture(scope="module")
def made() -> Iterator[_Made]:
    factory = new_gnupg_home("e2v")
    out = new_gnupg_home("e2w")
    try:
        rita = generate_key(factory, out, "rita@example.com")
        before = rita.cert.read_bytes()
        revoke(factory, rita)
        twin1 = generate_key(factory, out, "twin@example.com")
        twin1_cert = twin1.cert.read_bytes()  # the file is the next key's below
        twin2 = generate_key(factory, out, "twin@example.com")
        soon = generate_key(factory, out, "soon@example.com", expire="1d")
        yield _Made(
            before,
            rita.cert.read_bytes(),
            rita.fingerprint,
            twin1_cert,
            twin1.fingerprint,
            twin2.cert.read_bytes(),
            twin2.fingerprint,
            soon.cert.read_bytes(),
            soon.fingerprint,
        )
    finally:
        kill_agent(factory)
        shutil.rmtree(factory, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


TWIN = "twin@example.com"
SOON = "soon@example.com"


def _store(keys: Keys, home: Path, *certs: bytes, backend: str | None = None) -> Keystore:
    store = Keystore(home, backend=backend)
    store.import_file(keys.alice.cert)
    assert keys.alice.secret is not None
    store.import_file(keys.alice.secret, unprotected=True)
    for cert in certs:
        store.import_keys(cert)
    return store


def _protect(store: Keystore, keys: Keys, to: str) -> str:
    """The key the copy to ``to`` is encrypted to, besides the sender's own."""
    with Mailer(keystore=store, protection=SEQUOIA) as mailer:
        (copy,) = mailer.protect(_message(keys, to=to))
    (key,) = set(copy.encrypted_to) - {keys.alice.fingerprint}
    return key


def _refusal(store: Keystore, keys: Keys, to: str) -> KeyReason:
    with pytest.raises(RecipientKeyError) as refused:
        _protect(store, keys, to)
    (problem,) = refused.value.problems
    assert problem.address == to
    return problem.reason


def test_the_keys_of_a_message_are_judged_once_per_keystore_state(
    keys: Keys, tmp_path: Path, made: _Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second message to the same people judges no key again (the answer is kept for
    the keystore state); another address is judged anew; the other engine uses the same
    judgment."""
    store = _store(keys, tmp_path, keys.bob.cert.read_bytes(), made.rita)
    judged: list[str] = []
    for name in ("encryption_problem", "signing_problem"):
        real = getattr(OpenPGPKey, name)

        def counted(self: OpenPGPKey, *args: Any, _real: Any = real, **kw: Any) -> Any:
            judged.append(self.fingerprint)
            return _real(self, *args, **kw)

        monkeypatch.setattr(OpenPGPKey, name, counted)
    with Mailer(keystore=store, protection=SEQUOIA) as mailer:
        mailer.protect(_message(keys, to=keys.bob.address))
        assert judged
        judged.clear()
        mailer.protect(_message(keys, to=keys.bob.address))
        assert judged == []
        mailer.protect(_message(keys, to="rita@example.com"))
        assert made.rita_fpr in judged
    judged.clear()
    with Mailer(keystore=store, protection=Protection(engine=OpenPGPEngine.GPG)) as mailer:
        for to in (keys.bob.address, "rita@example.com"):  # the one judgment, both engines
            mailer.protect(_message(keys, to=to))
    assert judged == []


@pytest.mark.parametrize(
    "writer", ["this object", "another object", "gpg", "another object, certificate store"]
)
def test_a_revocation_deletion_or_second_key_written_between_two_messages_counts(
    keys: Keys, tmp_path: Path, made: _Made, writer: str
) -> None:
    """What is kept never outlives a change to the keystore: a revocation, a deletion and
    a second usable key for an address, each written between two messages by this Keystore
    object, by another on the same home (a GnuPG home or a certificate store), or by gpg
    itself, decide the next message."""
    certd = writer.endswith("certificate store")
    backend = "certd" if certd else None
    store = _store(keys, tmp_path, made.rita, made.twin1, backend=backend)
    other = Keystore(tmp_path, backend=backend)

    def delete(fingerprint: str) -> None:
        if certd:
            store.certd.path_for(fingerprint).unlink()
        else:
            gpg(store.gnupg_home, "--delete-keys", fingerprint)

    def write(data: bytes) -> None:
        if writer == "this object":
            store.import_keys(data)
        elif writer == "gpg":
            gpg(store.gnupg_home, "--import", input=data)
        else:
            other.import_keys(data)

    for _ in range(2):  # the second time from what was kept
        assert _protect(store, keys, "rita@example.com") == made.rita_fpr
        assert _protect(store, keys, TWIN) == made.twin1_fpr
    write(made.rita_revoked)
    assert _refusal(store, keys, "rita@example.com") is KeyReason.REVOKED
    write(made.twin2)
    assert _refusal(store, keys, TWIN) is KeyReason.AMBIGUOUS
    if writer != "this object":  # deleted by hand (the library has no deletion)
        delete(made.twin2_fpr)
        assert _protect(store, keys, TWIN) == made.twin1_fpr
        delete(made.twin1_fpr)
        assert _refusal(store, keys, TWIN) is KeyReason.NOT_FOUND


def test_a_key_accepted_by_another_object_between_two_messages_counts(
    keys: Keys, tmp_path: Path, made: _Made
) -> None:
    """The key accepted for an address (the record of key sources, written by another
    object on the same home) decides the next message, and again when it changes back."""
    store = _store(keys, tmp_path, made.twin1, made.twin2)
    assert _refusal(store, keys, TWIN) is KeyReason.AMBIGUOUS
    other = Keystore(tmp_path)
    for chosen in (made.twin1_fpr, made.twin2_fpr, made.twin1_fpr):
        other.sources.accept(TWIN, chosen)
        for _ in range(2):
            assert _protect(store, keys, TWIN) == chosen


def test_a_key_expiring_between_two_messages_is_refused_and_a_clock_set_back_counts(
    keys: Keys, tmp_path: Path, made: _Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time passing a key's expiry decides the next message, though nothing was written;
    the clock set back before it makes the key usable again."""
    store = _store(keys, tmp_path, made.soon)
    for _ in range(2):
        assert _protect(store, keys, SOON) == made.soon_fpr
    real = datetime

    class _Later(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return real.now(tz) + timedelta(days=2)

    monkeypatch.setattr(keystore, "datetime", _Later)
    for _ in range(2):
        assert _refusal(store, keys, SOON) is KeyReason.EXPIRED
    monkeypatch.setattr(keystore, "datetime", real)
    assert _protect(store, keys, SOON) == made.soon_fpr


def test_a_keys_subkey_choice_is_made_once_per_span_of_time(
    keys: Keys, tmp_path: Path, made: _Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encryption and signing (sub)key of a key are chosen once while the clock stays
    between two of its times (asked several times per message), and again once it passes
    an expiry, or is set back before it."""
    store = _store(keys, tmp_path, made.soon)
    soon, alice = store.get(made.soon_fpr), store.get(keys.alice.fingerprint)
    assert soon is not None and alice is not None
    chosen = soon.encryption_subkey()
    signing = alice.signing_subkey()
    assert chosen is not None and chosen.expires is not None and signing is not None
    asked: list[str] = []
    real_usable = OpenPGPKey._usable

    def usable(self: OpenPGPKey, capability: str, now: datetime, **kw: Any) -> Any:
        asked.append(capability)
        return real_usable(self, capability, now, **kw)

    monkeypatch.setattr(OpenPGPKey, "_usable", usable)
    for _ in range(3):
        assert soon.encryption_subkey() == chosen
        assert alice.signing_subkey() == signing
    assert asked == []
    real = datetime

    class _Later(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return real.now(tz) + timedelta(days=2)

    monkeypatch.setattr(keystore, "datetime", _Later)
    assert soon.encryption_subkey() is None
    assert soon.encryption_subkey() is None
    assert asked == ["e"]
    monkeypatch.setattr(keystore, "datetime", real)
    assert soon.encryption_subkey() == chosen
    assert asked == ["e", "e"]
    # A changed copy of the key (replace) never shares what was kept.
    from dataclasses import replace

    assert replace(soon, subkeys=()).encryption_subkey() is None
    assert soon.encryption_subkey() == chosen


@pytest.mark.parametrize("odd", [" ", "\t", "\n", "\x00", "\x7f", "\u00a0", "\u2028", "\u200b"])
def test_an_address_for_a_gpg_filter_still_refuses_whitespace_and_unprintables(odd: str) -> None:
    """The address check made in one call per string refuses what the check per character
    refused: any whitespace, any unprintable character."""
    from e2email.errors import MessageError

    assert keystore._filter_address(" Bob@Example.NET ") == "bob@example.net"
    with pytest.raises(MessageError):
        keystore._filter_address(f"bob{odd}x@example.net")


# -- Review findings (rev5-p) ------------------------------------------------------------------


def test_the_kept_question_holds_only_the_key_map_entries_of_the_message(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account's key map may be large: the question kept per message names only the
    entries its addresses use, not a sorted copy of the whole map."""
    from e2email.crypto.gpg import GpgProtector

    store = _store(keys, tmp_path, keys.bob.cert.read_bytes())
    asked: list[Any] = []
    real = Keystore.judged

    def spy(self: Keystore, question: Any, answer: Any) -> Any:
        asked.append(question)
        return real(self, question, answer)

    monkeypatch.setattr(Keystore, "judged", spy)
    big = {f"user{j}@example.net": keys.bob.fingerprint for j in range(5000)}
    big[keys.bob.address] = keys.bob.fingerprint
    msg = Message(sender=keys.alice.address, to=[keys.bob.address], subject="s", text="x")
    found = GpgProtector(store).resolve(msg, Protection(key_map=big))
    assert found.recipients[keys.bob.address].fingerprint == keys.bob.fingerprint
    (question,) = asked
    assert len(repr(question)) < 1000
    # A changed entry for this message's address is another question.
    other = dict(big, **{keys.bob.address: keys.alice.fingerprint})
    GpgProtector(store).resolve(msg, Protection(key_map=other))
    assert asked[1] != asked[0]


def test_a_message_to_many_addresses_is_judged_but_not_kept(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2email.crypto import gpg as gpg_engine

    store = _store(keys, tmp_path, keys.bob.cert.read_bytes())
    monkeypatch.setattr(gpg_engine, "_KEPT_ADDRESSES", 1)
    msg = Message(sender=keys.alice.address, to=[keys.bob.address], subject="s", text="x")
    gpg_engine.GpgProtector(store).resolve(msg, SEQUOIA)
    assert store._answers is None or not store._answers.answers


def test_a_keybox_write_with_the_same_size_and_mtime_is_seen(keys: Keys, tmp_path: Path) -> None:
    """A keybox deletion only marks its record (same size, same inode); written within the
    same mtime tick (here: its mtime set back) it is still seen, by its change time."""
    import os

    store = _store(keys, tmp_path, keys.bob.cert.read_bytes(), backend="gnupg")
    assert _protect(store, keys, keys.bob.address) == keys.bob.fingerprint
    kbx = store.gnupg_home / "pubring.kbx"
    before = kbx.stat()
    gpg(store.gnupg_home, "--batch", "--yes", "--delete-keys", keys.bob.fingerprint)
    after = kbx.stat()
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)
    os.utime(kbx, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _refusal(store, keys, keys.bob.address) is KeyReason.NOT_FOUND


def test_a_truncated_v6_session_key_is_refused_as_such() -> None:
    with pytest.raises(CryptoError, match="truncated"):
        openpgp.packet_key_ids(bytes([0xC1, 1, 6, 0xD2, 2, 1, 0]))


def test_packet_key_ids_takes_any_bytes_like() -> None:
    with pytest.raises(CryptoError):  # not a TypeError from iterating ints
        openpgp.packet_key_ids(bytearray(b"\xc1\x00"))
    with pytest.raises(CryptoError):
        openpgp.packet_key_ids(memoryview(b"\xc1\x00"))


def test_a_plaintext_packet_before_the_encrypted_data_is_refused() -> None:
    import pysequoia

    bob = pysequoia.Cert.from_file(str(Path(sequoia.__file__).parents[1] / "demo_keys/bob.pub.asc"))
    binary = bytes(pysequoia.encrypt(b"secret", [bob], armor=False))
    (kid,), _ = openpgp.packet_key_ids(binary)
    _, start, length = openpgp._packet_header(binary, 0)
    assert length is not None
    literal = b"b\x00\x00\x00\x00\x00PLAINTEXT"
    leak = bytes([0xCB, len(literal)]) + literal
    for bad in (leak + binary, binary[: start + length] + leak + binary[start + length :]):
        with pytest.raises(CryptoError, match="before the encrypted data"):
            sequoia._check_binary(bad, ["0" * 24 + kid])
    marker = bytes([0xCA, 3]) + b"PGP"  # the marker packet (RFC 9580 §5.8) is allowed
    assert openpgp.packet_key_ids(marker + binary)[0] == [kid]


def test_sequoias_armor_writer_gives_the_bytes_encrypt_armors_for_v4_recipients() -> None:
    import pysequoia

    bob = pysequoia.Cert.from_file(str(Path(sequoia.__file__).parents[1] / "demo_keys/bob.pub.asc"))
    for size in (0, 1, 57, 4000, 70_000):
        armored = pysequoia.encrypt(b"x" * size, [bob])
        text = armored.decode() if isinstance(armored, bytes) else armored
        binary = openpgp._dearmored_whole(sequoia._crlf(text.encode()))
        assert sequoia._armored(pysequoia, binary) == sequoia._crlf(text.encode())
