"""The Sequoia engine's packet check reads only the head of the armor when the session keys
fit in it, and all of it when they do not: the same verdict either way."""

from __future__ import annotations

import warnings

import pysequoia
import pytest

from e2email.crypto import sequoia
from e2email.crypto.openpgp import encrypted_to_key_ids
from e2email.errors import CryptoError


def _certs(n: int) -> list[object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [pysequoia.Cert.generate(f"r{i} <r{i}@example.org>") for i in range(n)]


@pytest.mark.parametrize("count", [2, 24], ids=["in the head", "past the head"])
def test_the_packet_check_sees_every_session_key(count: int) -> None:
    certs = _certs(count)
    # Above 64 KiB of armor (smaller armor is decoded whole, in one step).
    armored = sequoia._crlf(bytes(pysequoia.encrypt(b"x" * 70_000, certs)))
    key_ids, _ = encrypted_to_key_ids(armored)
    assert len(key_ids) == count
    small = sequoia._crlf(bytes(pysequoia.encrypt(b"x" * 4000, certs)))
    assert sequoia._armor_head(small) is None
    small_ids, small_tag = encrypted_to_key_ids(small)
    assert sorted(small_ids) == sorted(key_ids) and small_tag == 18
    head = sequoia._armor_head(armored)
    assert head is not None and len(head) < len(armored)
    if count > 2:
        # 24 X25519 session keys are about 2.3 KB of packets: more than the head holds.
        with pytest.raises(CryptoError):
            encrypted_to_key_ids(head)
    subkeys = ["0" * 24 + k for k in key_ids]  # only the key ID part is compared
    sequoia._check_encrypted(armored, subkeys)
    with pytest.raises(CryptoError, match="unexpected set of keys"):
        sequoia._check_encrypted(armored, subkeys[1:])
    with pytest.raises(CryptoError, match="unexpected set of keys"):
        sequoia._check_encrypted(armored, [*subkeys, "0" * 24 + "0123456789ABCDEF"])


def test_small_armor_is_decoded_whole_whatever_its_layout() -> None:
    """Armor headers, LF or CRLF, with or without the CRC line: the one-step decoding of a
    small block gives the packets the line-by-line reader gives; a block without its END
    line is left to that reader (which then says what is wrong)."""
    from e2email.crypto import openpgp

    (cert,) = _certs(1)
    lf = bytes(pysequoia.encrypt(b"x" * 4000, [cert]))
    begin, rest = lf.split(b"\n", 1)
    variants = [lf, sequoia._crlf(lf), begin + b"\nComment: hi\nVersion: 1\n" + rest]
    reference = b"".join(openpgp._dearmored(memoryview(lf), 64))
    for armored in variants:
        assert openpgp._dearmored_whole(armored) == reference
        assert encrypted_to_key_ids(armored) == encrypted_to_key_ids(memoryview(lf))
    no_crc = b"\n".join(ln for ln in lf.split(b"\n") if not ln.startswith(b"="))
    assert openpgp._dearmored_whole(no_crc) == reference
    assert openpgp._dearmored_whole(lf.split(b"-----END")[0]) is None
    with pytest.raises(CryptoError):
        encrypted_to_key_ids(lf.replace(b"\n", b"\n!", 3))


def test_the_one_step_decoding_leaves_any_unusual_layout_to_the_line_reader() -> None:
    """Only a block laid out exactly as RFC 9580 §6.2 says is decoded in one step; anything
    else (BEGIN inside a line, a whitespace-only "blank" line, spaces in the base64) is
    left to the line reader, so the two never disagree."""
    from e2email.crypto import openpgp

    (cert,) = _certs(1)
    lf = bytes(pysequoia.encrypt(b"x" * 4000, [cert]))
    begin, rest = lf.split(b"\n", 1)
    assert openpgp._dearmored_whole(lf) is not None
    for odd in (
        b"decoy " + lf,
        begin + b"\n \x0b\n" + rest,
        lf.replace(b"\n", b" \n", 4),
        lf.replace(b"-----END", b"x-----END"),
    ):
        assert openpgp._dearmored_whole(odd) is None
