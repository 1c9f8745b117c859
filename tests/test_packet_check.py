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
    armored = sequoia._crlf(bytes(pysequoia.encrypt(b"x" * 4000, certs)))
    key_ids, _ = encrypted_to_key_ids(armored)
    assert len(key_ids) == count
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
