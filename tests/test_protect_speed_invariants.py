"""What the protection path's shortcuts must never change (issue 9, CPU per message).

The Sequoia engine checks the binary packets it got before armoring them, instead of
decoding its own armor again; the check stays as strong (who each copy is encrypted to,
integrity-protected data)."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email import CryptoError, Mailer, Message, OpenPGPEngine, Protection
from e2email.crypto import openpgp, sequoia
from e2email.keystore import Keystore

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
