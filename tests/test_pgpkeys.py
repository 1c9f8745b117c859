"""The gpg-free key judge (issue 9 part 3): e2email.pgpkeys reads certificate bytes with
pysequoia and must judge every key exactly as the keystore does from gpg's listing, and must
not be fooled by packets anyone can append (forged bindings, revocations, user IDs)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import TestKey, generate_key, gpg, kill_agent, new_gnupg_home

from e2email import pgpkeys
from e2email.errors import KeyReason, KeystoreError
from e2email.keystore import Keystore, OpenPGPKey
from e2email.pgpkeys import key_from_cert, keys_from_bytes

sq = pytest.importorskip("pysequoia")
from pysequoia.packet import PacketPile, Tag  # noqa: E402

PW = ["--pinentry-mode", "loopback", "--passphrase", ""]


def _export(factory: Path, key: TestKey) -> TestKey:
    key.cert.write_bytes(gpg(factory, "--armor", "--export", key.fingerprint).stdout)
    assert key.secret is not None
    key.secret.write_bytes(
        gpg(factory, *PW, "--armor", "--export-secret-keys", key.fingerprint).stdout
    )
    return key


def _fingerprints(factory: Path, spec: str) -> list[str]:
    listing = gpg(factory, "--with-colons", "--list-keys", spec).stdout.decode()
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]


def _add_subkey(
    factory: Path, key: TestKey, algo: str, usage: str, expire: str = "0", *, at: str | None = None
) -> None:
    extra = ["--faked-system-time", at] if at else []
    gpg(factory, *extra, *PW, "--quick-add-key", key.fingerprint, algo, usage, expire)
    _export(factory, key)


@pytest.fixture(scope="module")
def made() -> Iterator[dict[str, TestKey]]:
    """Keys beyond the session fixtures: RSA 3072, an expired encryption subkey under a live
    primary, a revoked subkey, a revoked user ID, several encryption subkeys, and plain keys
    that the attack tests tamper with (one each, so gpg never merges two of them)."""
    factory = new_gnupg_home("e2jf")
    out = new_gnupg_home("e2jo")
    try:
        keys: dict[str, TestKey] = {}
        keys["rsa3072"] = generate_key(factory, out, "rsa3072@example.com", key_type="rsa3072")
        for name in ("stale", "revive"):
            keys[name] = generate_key(
                factory,
                out,
                f"{name}@example.com",
                encryption_subkey=False,
                faked_time="20190101T000000",
            )
            _add_subkey(factory, keys[name], "cv25519", "encr", "1d", at="20200101T000000")
        revsub = keys["revsub"] = generate_key(factory, out, "revsub@example.com")
        gpg(
            factory,
            *PW,
            "--command-fd",
            "0",
            "--edit-key",
            revsub.fingerprint,
            input=b"key 1\nrevkey\ny\n0\n\ny\nsave\n",
        )
        _export(factory, revsub)
        revuid = keys["revuid"] = generate_key(factory, out, "revuid@example.com")
        gpg(factory, *PW, "--quick-add-uid", revuid.fingerprint, "Other <other@example.com>")
        gpg(factory, *PW, "--quick-revoke-uid", revuid.fingerprint, "Other <other@example.com>")
        _export(factory, revuid)
        multi = keys["multi"] = generate_key(
            factory, out, "multi@example.com", faked_time="20240101T000000"
        )
        _add_subkey(factory, multi, "cv25519", "encr", at="20250101T000000")
        _add_subkey(factory, multi, "ed25519", "sign", at="20250101T000000")
        # Genuine SHA-1 signatures on an Ed25519 key: self-signatures, and a subkey revocation.
        keys["sha1ed"] = generate_key(factory, out, "sha1ed@example.com", cert_digest="SHA1")
        sha1rev = keys["sha1rev"] = generate_key(factory, out, "sha1rev@example.com")
        gpg(
            factory,
            *PW,
            "--cert-digest-algo",
            "SHA1",
            "--command-fd",
            "0",
            "--edit-key",
            sha1rev.fingerprint,
            input=b"key 1\nrevkey\ny\n0\n\ny\nsave\n",
        )
        _export(factory, sha1rev)
        # Expired in 2020, its expiry (primary and subkey) extended since: usable again.
        revived = keys["revived"] = generate_key(
            factory, out, "revived@example.com", expire="1d", faked_time="20200101T000000"
        )
        gpg(factory, *PW, "--quick-set-expire", revived.fingerprint, "2y")
        (sub_fpr,) = _fingerprints(factory, revived.fingerprint)[1:]
        gpg(factory, *PW, "--quick-set-expire", revived.fingerprint, "2y", sub_fpr)
        _export(factory, revived)
        # A secret key whose primary secret is a stub (gpg --export-secret-subkeys), with a
        # signing subkey: it signs with the subkey, never with the primary.
        stub = keys["stub"] = generate_key(factory, out, "stub@example.com")
        _add_subkey(factory, stub, "ed25519", "sign")
        assert stub.secret is not None
        stub.secret.write_bytes(
            gpg(factory, *PW, "--armor", "--export-secret-subkeys", stub.fingerprint).stdout
        )
        for name in ("forged", "spliced", "fakerev", "weakrev", "fakeuid", "sha1uid"):
            keys[name] = generate_key(factory, out, f"{name}@example.com")
        # DSA-1024 with SHA-1 self-signatures (an old GnuPG default): refused as WEAK.
        gpg(
            factory,
            *PW,
            "--cert-digest-algo",
            "SHA1",
            "--quick-gen-key",
            "Test Dsa <dsa1024@example.com>",
            "dsa1024",
            "sign",
            "0",
        )
        dsa_fpr = _fingerprints(factory, "dsa1024@example.com")[0]
        keys["dsa1024"] = _export(
            factory, TestKey("dsa1024@example.com", dsa_fpr, out / "dsa.cert", out / "dsa.key")
        )
        # ECDSA P-256, for the signature check's ECDSA path.
        gpg(
            factory, *PW, "--quick-gen-key", "Test P256 <p256@example.com>", "nistp256", "sign", "0"
        )
        p256_fpr = _fingerprints(factory, "p256@example.com")[0]
        keys["p256"] = _export(
            factory, TestKey("p256@example.com", p256_fpr, out / "p256.cert", out / "p256.key")
        )
        # A key and, beside it (laterrev.rev), the revocation certificate gpg made for it.
        later = keys["laterrev"] = generate_key(factory, out, "laterrev@example.com")
        rev = (factory / "openpgp-revocs.d" / f"{later.fingerprint}.rev").read_text()
        later.cert.with_suffix(".rev").write_text(rev.replace(":-----BEGIN", "-----BEGIN"))
        yield keys
    finally:
        kill_agent(factory)
        shutil.rmtree(factory, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


# -- Forging packets as an attacker would: valid digest prefix, wrong signature ----------------


def _packets(data: bytes) -> list[Any]:
    return list(PacketPile.from_bytes(data))


def _frame(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 192:
        head = bytes([n])
    else:
        n -= 192
        head = bytes([(n >> 8) + 192, n & 0xFF])
    return bytes([0xC0 | tag]) + head + body


def _key_hash(packet: Any) -> bytes:
    body = packet.body
    return b"\x99" + len(body).to_bytes(2, "big") + body


def _uid_hash(text: bytes) -> bytes:
    return b"\xb4" + len(text).to_bytes(4, "big") + text


def _subpackets(area: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(area):
        n = area[i]
        assert n < 192, "long subpackets are not needed here"
        out.append((area[i + 1], area[i + 2 : i + 1 + n]))
        i += 1 + n
    return out


def _forge(
    sig: Any,
    signed: bytes,
    *,
    sig_type: int | None = None,
    hash_algo: int | None = None,
    drop: frozenset[int] = frozenset(),
    created: datetime | None = None,
) -> Any:
    """A copy of ``sig`` with its hashed subpackets edited (``drop`` removes types, e.g. 9 =
    key expiration time; ``created`` sets type 2) and the digest prefix recomputed over
    ``signed`` so that only a real signature check can refuse it: the MPIs are the old ones."""
    body = sig.body
    assert body[0] == 4
    hl = int.from_bytes(body[4:6], "big")
    rest = body[6 + hl :]
    ul = int.from_bytes(rest[:2], "big")
    unhashed, mpis = rest[: 2 + ul], rest[4 + ul :]
    subs = []
    for typ, data in _subpackets(body[6 : 6 + hl]):
        if typ & 0x7F in drop:
            continue
        if typ & 0x7F == 2 and created is not None:
            data = int(created.timestamp()).to_bytes(4, "big")
        subs.append(bytes([len(data) + 1, typ]) + data)
    hashed = b"".join(subs)
    head = (
        bytes(
            [
                4,
                sig_type if sig_type is not None else body[1],
                body[2],
                hash_algo if hash_algo is not None else body[3],
            ]
        )
        + len(hashed).to_bytes(2, "big")
        + hashed
    )
    algo = {2: hashlib.sha1, 8: hashlib.sha256, 10: hashlib.sha512}[head[3]]
    digest = algo(signed + head + b"\x04\xff" + len(head).to_bytes(4, "big")).digest()
    forged = _packets(_frame(2, head + unhashed + digest[:2] + mpis))
    assert len(forged) == 1
    return forged[0]


def _flip_last_mpi_byte(sig: Any) -> Any:
    raw = bytearray(bytes(sig))
    raw[-3] ^= 0x01
    return _packets(bytes(raw))[0]


def _binary(packets: list[Any]) -> bytes:
    return b"".join(bytes(p) for p in packets)


def _parts(key: TestKey) -> tuple[Any, Any, Any, Any, Any]:
    """primary, user ID, its self-signature, encryption subkey, its binding (gpg's order)."""
    pk = _packets(key.cert.read_bytes())
    assert [p.tag for p in pk] == [
        Tag.PublicKey,
        Tag.UserID,
        Tag.Signature,
        Tag.PublicSubkey,
        Tag.Signature,
    ]
    return pk[0], pk[1], pk[2], pk[3], pk[4]


# -- The comparison with gpg -------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(keys: Keys, made: dict[str, TestKey]) -> Iterator[Keystore]:
    home = new_gnupg_home("e2js")
    ks = Keystore(home)
    for key in [*keys.all(), *made.values()]:
        ks.import_file(key.cert)
    for key in (keys.alice, keys.locked, *(made[name] for name in sorted(SECRET) if name in made)):
        assert key.secret is not None
        ks.import_file(key.secret)
    yield ks
    ks.shutdown_agent()
    shutil.rmtree(home, ignore_errors=True)


def _summary(key: OpenPGPKey, *, secret: bool) -> dict[str, object]:
    now = datetime.now(UTC)
    enc = key.encryption_subkey()
    sign = key.signing_subkey() if secret else None
    return {
        "fingerprint": key.fingerprint,
        "addresses": key.addresses,
        "encryption_problem": key.encryption_problem(),
        "signing_problem": key.signing_problem() if secret else None,
        "encryption_subkey": enc.fingerprint if enc else None,
        "signing_subkey": sign.fingerprint if sign else None,
        "expires": key.expires,
        # Every encryption-capable subkey with its expiry and why it may not be used.
        "encryption_subkeys": {
            s.fingerprint: (s.expires, s.problem(now)) for s in key.subkeys if "e" in s.capabilities
        },
        "has_secret": key.has_secret,
        "status": key.status(),
    }


SESSION = ["alice", "bob", "carol", "expired", "revoked", "weak", "signonly", "locked", "sha1"]
MADE = [
    "rsa3072",
    "stale",
    "revsub",
    "revuid",
    "multi",
    "sha1ed",
    "sha1rev",
    "revived",
    "stub",
    "dsa1024",
    "p256",
]
SECRET = {"alice", "locked", "multi", "rsa3072", "revsub", "stub"}


@pytest.mark.parametrize("name", SESSION + MADE)
def test_judgement_equals_gpgs(
    name: str, keys: Keys, made: dict[str, TestKey], store: Keystore
) -> None:
    """For every kind of key the fixtures make, the judgement from the bytes alone equals the
    keystore's judgement from gpg's listing: fingerprint, addresses, why it cannot encrypt
    (or sign, for secret keys), which subkey is chosen, and the expiry dates."""
    key = getattr(keys, name) if name in SESSION else made[name]
    secret = name in SECRET
    source = key.secret if secret else key.cert
    assert source is not None
    (ours,) = keys_from_bytes(source.read_bytes())
    theirs = store.get(key.fingerprint)
    assert theirs is not None
    assert _summary(ours, secret=secret) == _summary(theirs, secret=secret)


def test_expected_verdicts(keys: Keys, made: dict[str, TestKey]) -> None:
    """The verdicts themselves (so the table above cannot pass by both sides being wrong)."""

    def verdict(key: TestKey, secret: bool = False) -> OpenPGPKey:
        path = key.secret if secret else key.cert
        assert path is not None
        return keys_from_bytes(path.read_bytes())[0]

    def reason(key: TestKey) -> KeyReason | None:
        problem = verdict(key).encryption_problem()
        return problem[0] if problem else None

    assert reason(keys.bob) is None
    assert reason(keys.expired) is KeyReason.EXPIRED
    assert reason(keys.revoked) is KeyReason.REVOKED
    assert verdict(keys.weak).encryption_problem() == (KeyReason.WEAK, "rsa1024 is below 2048 bits")
    assert verdict(keys.sha1).encryption_problem() == (
        KeyReason.WEAK,
        "SHA-1 self-signature on the user ID",
    )
    assert reason(keys.signonly) is KeyReason.NO_ENCRYPTION_KEY
    assert reason(made["stale"]) is KeyReason.NO_ENCRYPTION_KEY
    assert reason(made["revsub"]) is KeyReason.NO_ENCRYPTION_KEY
    assert verdict(made["revuid"]).addresses == ("revuid@example.com",)
    rsa = verdict(made["rsa3072"])
    assert rsa.primary.algorithm == "rsa3072" and rsa.encryption_problem() is None
    assert verdict(keys.bob).encryption_subkey().algorithm == "cv25519"  # type: ignore[union-attr]
    multi = verdict(made["multi"], secret=True)
    newest = max((s for s in multi.subkeys if "e" in s.capabilities), key=lambda s: s.created)
    assert multi.encryption_subkey() == newest
    assert multi.signing_problem() is None and multi.has_secret
    assert not verdict(made["multi"]).has_secret
    revived = verdict(made["revived"])
    assert revived.encryption_problem() is None and revived.expires is not None
    # ``now`` decides which expiry dates have passed (the validity letters, as gpg's listing).
    later = revived.expires + timedelta(days=1)
    (aged,) = keys_from_bytes(made["revived"].cert.read_bytes(), now=later)
    assert aged.primary.validity == "e"
    assert aged.encryption_problem(later) == revived.encryption_problem(later)
    assert aged.encryption_problem(later)[0] is KeyReason.EXPIRED  # type: ignore[index]
    stub = verdict(made["stub"], secret=True)
    assert not stub.primary.has_secret and stub.signing_problem() is None
    assert stub.signing_subkey() is not None and stub.signing_subkey() != stub.primary


# -- Attacks: packets anyone can append must never make a key usable ---------------------------


def _judge_and_gpg(data: bytes, tmp_path: Path) -> tuple[OpenPGPKey, OpenPGPKey | None]:
    (ours,) = keys_from_bytes(data)
    ks = Keystore(tmp_path / "gpg")
    try:
        ks.import_keys(data)
    except KeystoreError:
        return ours, None
    return ours, ks.get(ours.fingerprint)


def test_forged_binding_signature_binds_no_subkey(made: dict[str, TestKey], tmp_path: Path) -> None:
    """A subkey whose binding signature is forged (one MPI byte changed, digest prefix still
    right) is not usable: the naive reading of its key flags would encrypt to it."""
    primary, uid, uid_sig, sub, binding = _parts(made["forged"])
    forged = _flip_last_mpi_byte(binding)
    assert forged.key_flags.transport_encryption  # what a naive judge would believe
    ours, theirs = _judge_and_gpg(_binary([primary, uid, uid_sig, sub, forged]), tmp_path)
    assert ours.encryption_subkey() is None
    assert ours.encryption_problem() is not None
    assert ours.encryption_problem()[0] is KeyReason.NO_ENCRYPTION_KEY  # type: ignore[index]
    assert theirs is not None and theirs.encryption_subkey() is None


def test_forged_signing_binding_binds_no_signing_subkey(made: dict[str, TestKey]) -> None:
    """The same for signing: a secret signing subkey whose binding is forged is never the key
    to sign with (here the primary's secret is a stub, so nothing can sign)."""
    assert made["stub"].secret is not None
    packets = _packets(made["stub"].secret.read_bytes())
    assert packets[-2].tag == Tag.SecretSubkey and packets[-1].key_flags.signing
    (good,) = keys_from_bytes(_binary(packets))
    assert good.signing_problem() is None
    (ours,) = keys_from_bytes(_binary([*packets[:-1], _flip_last_mpi_byte(packets[-1])]))
    assert ours.signing_subkey() is None
    assert ours.signing_problem() is not None
    assert ours.signing_problem()[0] is KeyReason.NO_SIGNING_KEY  # type: ignore[index]


def test_binding_spliced_from_another_key_binds_nothing(
    keys: Keys, made: dict[str, TestKey], tmp_path: Path
) -> None:
    """Another key's encryption subkey with its genuine binding (made by that other primary),
    spliced into this certificate, and this key's own genuine binding moved under a foreign
    subkey: neither subkey is bound to this key."""
    primary, uid, uid_sig, _sub, own_binding = _parts(made["spliced"])
    *_, other_sub, other_binding = _parts(keys.carol)
    ours, _ = _judge_and_gpg(_binary([primary, uid, uid_sig, other_sub, other_binding]), tmp_path)
    assert ours.subkeys == () and ours.encryption_subkey() is None
    moved = _binary([primary, uid, uid_sig, other_sub, own_binding])
    (ours,) = keys_from_bytes(moved)
    assert ours.subkeys == ()


def test_forged_newer_binding_does_not_revive_an_expired_subkey(
    made: dict[str, TestKey], tmp_path: Path
) -> None:
    """The only encryption subkey expired in 2020. A newer binding without the expiry (a
    forgery with a correct digest prefix) is what a naive judge, taking the newest binding,
    would use; it must stay expired, and gpg agrees."""
    primary, uid, uid_sig, sub, binding = _parts(made["revive"])
    assert binding.key_validity_period is not None
    forged = _forge(
        binding,
        _key_hash(primary) + _key_hash(sub),
        drop=frozenset({9}),
        created=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert (
        forged.key_validity_period is None and forged.signature_created > binding.signature_created
    )
    data = _binary([primary, uid, uid_sig, sub, binding, forged])
    ours, theirs = _judge_and_gpg(data, tmp_path)
    assert ours.encryption_subkey() is None
    problem = ours.encryption_problem()
    assert problem is not None and problem[0] is KeyReason.NO_ENCRYPTION_KEY
    assert "expired" in problem[1]
    (sub_judged,) = ours.subkeys
    assert sub_judged.expires is not None and sub_judged.expires.year == 2020
    # gpg's import drops a subkey that carries a bad self-signature: refused there too.
    assert theirs is not None and theirs.encryption_subkey() is None


def test_only_encryption_subkey_expired_is_never_used(made: dict[str, TestKey]) -> None:
    """pysequoia's encrypt() falls back to an expired subkey when no live one exists; the
    judge says the certificate has no usable encryption subkey (the expiry comes from the
    verified binding, not from that fallback)."""
    data = made["stale"].cert.read_bytes()
    sq.encrypt(b"x", [sq.Cert.from_bytes(data)])  # pysequoia alone would encrypt to it
    (ours,) = keys_from_bytes(data)
    assert ours.encryption_subkey() is None
    assert ours.encryption_problem() == (
        KeyReason.NO_ENCRYPTION_KEY,
        f"key expired: {ours.subkeys[0].key_id} expired on 2020-01-02",
    )


def test_forged_revocations_are_ignored(made: dict[str, TestKey]) -> None:
    """A forged subkey revocation and a forged key revocation (strong hash, correct digest
    prefix, wrong signature) prove nothing and are ignored (RFC 9580 §5.2.4: a signature that
    does not verify counts for nothing), as Sequoia ignores them: honouring them would let
    anyone switch a key off by appending a packet. (gpg's import instead drops a subkey that
    carries a bad self-signature; neither makes anything usable that was not.)"""
    primary, uid, uid_sig, sub, binding = _parts(made["fakerev"])
    sub_rev = _forge(
        binding, _key_hash(primary) + _key_hash(sub), sig_type=0x28, drop=frozenset({9, 27})
    )
    key_rev = _forge(uid_sig, _key_hash(primary), sig_type=0x20, drop=frozenset({9, 27}))
    data = _binary([primary, key_rev, uid, uid_sig, sub, binding, sub_rev])
    (ours,) = keys_from_bytes(data)
    assert ours.encryption_problem() is None
    chosen = ours.encryption_subkey()
    assert chosen is not None and chosen.fingerprint == str(sub.fingerprint).upper()
    assert not sq.Cert.from_bytes(data).is_revoked  # Sequoia's own view agrees
    sq.encrypt(b"x", [sq.Cert.from_bytes(data)])


def test_sha1_signatures_are_checked_before_they_count(made: dict[str, TestKey]) -> None:
    """Sequoia's policy will not check SHA-1 signatures at all, so pgpkeys checks them itself
    before letting them count towards a refusal. A genuine SHA-1 subkey revocation revokes
    (and gpg agrees, in the table); forged SHA-1 revocations of the subkey and of the key, and
    a forged SHA-1 user ID self-signature newer than the real one, count for nothing (they
    would otherwise let anyone switch a key off)."""
    (genuine,) = keys_from_bytes(made["sha1rev"].cert.read_bytes())
    assert [s.validity for s in genuine.subkeys] == ["r"]
    primary, uid, uid_sig, sub, binding = _parts(made["weakrev"])
    sub_rev = _forge(
        binding,
        _key_hash(primary) + _key_hash(sub),
        sig_type=0x28,
        hash_algo=2,
        drop=frozenset({9, 27}),
        created=datetime(2026, 1, 3, tzinfo=UTC),
    )
    key_rev = _forge(
        uid_sig, _key_hash(primary), sig_type=0x20, hash_algo=2, drop=frozenset({9, 27})
    )
    newer_uid_sig = _forge(
        uid_sig,
        _key_hash(primary) + _uid_hash(uid.body),
        hash_algo=2,
        created=datetime(2026, 1, 3, tzinfo=UTC),
    )
    data = _binary([primary, key_rev, uid, uid_sig, newer_uid_sig, sub, binding, sub_rev])
    (ours,) = keys_from_bytes(data)
    assert ours.encryption_problem() is None
    assert ours.user_ids[0].self_sig_hash == 8  # the genuine SHA-256 one is in force
    chosen = ours.encryption_subkey()
    assert chosen is not None and chosen.fingerprint == str(sub.fingerprint).upper()


def test_forged_sha1_user_id_is_not_listed(made: dict[str, TestKey]) -> None:
    """A user ID appended with a forged SHA-1 self-signature (which Sequoia's policy will not
    check) is not taken at its word: it names no address of the key."""
    primary, uid, uid_sig, sub, binding = _parts(made["sha1uid"])
    text = b"Mallory <victim@example.com>"
    fake_uid = _packets(_frame(13, text))[0]
    fake_sig = _forge(uid_sig, _key_hash(primary) + _uid_hash(text), hash_algo=2)
    (ours,) = keys_from_bytes(_binary([primary, uid, uid_sig, fake_uid, fake_sig, sub, binding]))
    assert ours.addresses == ("sha1uid@example.com",)
    assert ours.encryption_problem() is None


def test_forged_user_id_is_not_listed(made: dict[str, TestKey], tmp_path: Path) -> None:
    """A user ID for someone else's address, appended with a forged self-signature, does not
    file the key under that address."""
    primary, uid, uid_sig, sub, binding = _parts(made["fakeuid"])
    text = b"Mallory <victim@example.com>"
    fake_uid = _packets(_frame(13, text))[0]
    fake_sig = _forge(
        uid_sig, _key_hash(primary) + _uid_hash(text), created=datetime(2026, 1, 2, tzinfo=UTC)
    )
    data = _binary([primary, uid, uid_sig, fake_uid, fake_sig, sub, binding])
    ours, theirs = _judge_and_gpg(data, tmp_path)
    assert ours.addresses == ("fakeuid@example.com",)
    assert theirs is not None and theirs.addresses == ours.addresses


# -- Input handling -----------------------------------------------------------------------------


def test_revocation_certificate_after_its_certificate_revokes_it(
    made: dict[str, TestKey], tmp_path: Path
) -> None:
    """A bare revocation certificate (gpg's openpgp-revocs.d file) after the certificate, in
    armor or binary, revokes it as importing it into gpg does; a certificate given twice is
    one key."""
    key = made["laterrev"]
    cert = key.cert.read_bytes()
    rev = key.cert.with_suffix(".rev").read_bytes()
    (before,) = keys_from_bytes(cert)
    assert before.encryption_problem() is None
    assert len(keys_from_bytes(cert + cert)) == 1
    revoked = (KeyReason.REVOKED, before.primary.key_id)
    for data in (cert + rev, _binary(_packets(cert)) + _binary(_packets(rev))):
        (after,) = keys_from_bytes(data)
        assert after.encryption_problem() == revoked
    ks = Keystore(tmp_path / "gpg")
    ks.import_keys(cert)
    ks.import_keys(rev)
    theirs = ks.get(key.fingerprint)
    assert theirs is not None and theirs.encryption_problem() == revoked


@pytest.mark.parametrize("data", [b"", b"not a key", b"-----BEGIN PGP MESSAGE-----\n\nabc\n"])
def test_no_certificate_is_a_one_line_keystore_error(data: bytes) -> None:
    with pytest.raises(KeystoreError) as info:
        keys_from_bytes(data)
    assert "\n" not in str(info.value)


def test_concatenated_armored_and_binary_certificates(keys: Keys) -> None:
    armored = keys.bob.cert.read_bytes() + keys.carol.cert.read_bytes()
    assert [k.fingerprint for k in keys_from_bytes(armored)] == [
        keys.bob.fingerprint,
        keys.carol.fingerprint,
    ]
    binary = bytes(sq.Cert.from_bytes(keys.bob.cert.read_bytes())) + bytes(
        sq.Cert.from_bytes(keys.carol.cert.read_bytes())
    )
    assert [k.fingerprint for k in keys_from_bytes(binary)] == [
        keys.bob.fingerprint,
        keys.carol.fingerprint,
    ]


def test_without_pysequoia_a_keystore_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, keys: Keys
) -> None:
    monkeypatch.setitem(sys.modules, "pysequoia", None)
    with pytest.raises(KeystoreError, match=r"pip install 'e2email\[sequoia\]'"):
        keys_from_bytes(keys.bob.cert.read_bytes())


def test_key_from_cert_counts_the_secrets_of_a_tsk(keys: Keys) -> None:
    assert keys.alice.secret is not None
    secret = key_from_cert(sq.Tsk.from_bytes(keys.alice.secret.read_bytes()))
    assert secret.fingerprint == keys.alice.fingerprint and secret.has_secret
    assert secret.signing_problem() is None
    public = key_from_cert(sq.Cert.from_bytes(keys.alice.cert.read_bytes()))
    assert not public.has_secret and public.fingerprint == secret.fingerprint
    enc = secret.encryption_subkey()
    assert enc is not None and public.encryption_subkey() == replace(enc, has_secret=False)


@pytest.mark.parametrize("profile", ["RFC4880", "RFC9580"])
def test_keys_made_by_sequoia_v4_and_v6(profile: str) -> None:
    """Keys a gpg-free keystore makes with pysequoia (v4, and RFC 9580 v6 keys): usable, the
    encryption subkey chosen, signing with the signing subkey, the expiry read."""
    tsk = sq.Tsk.generate(
        "Nova <nova@example.com>", profile=getattr(sq.Profile, profile), validity_seconds=86400
    )
    judged = key_from_cert(tsk)
    assert judged.addresses == ("nova@example.com",)
    assert judged.encryption_problem() is None and judged.signing_problem() is None
    enc, sign = judged.encryption_subkey(), judged.signing_subkey()
    assert enc is not None and enc.algorithm == "cv25519" and enc.has_secret
    assert sign is not None and sign in judged.subkeys and "s" in sign.capabilities
    assert judged.expires is not None
    assert judged.encryption_problem(judged.expires + timedelta(seconds=1)) is not None
    public = key_from_cert(tsk.extract_certificate())
    assert not public.has_secret and public.encryption_subkey() == replace(enc, has_secret=False)


@pytest.mark.parametrize("name", ["sha1", "sha1ed", "weak", "dsa1024", "p256", "rsa3072"])
def test_signature_check_by_algorithm(name: str, keys: Keys, made: dict[str, TestKey]) -> None:
    """pgpkeys' own signature check (for what Sequoia's policy will not check) accepts gpg's
    genuine user ID self-signatures (RSA, EdDSA, DSA, ECDSA; SHA-1 and SHA-2) and refuses
    each with one bit of its signature changed."""
    key = getattr(keys, name) if name in SESSION else made[name]
    primary, uid, uid_sig = _packets(key.cert.read_bytes())[:3]
    signed = pgpkeys._signed(primary, uid)
    assert pgpkeys._check_signature(uid_sig, primary, signed) is True
    assert pgpkeys._check_signature(_flip_last_mpi_byte(uid_sig), primary, signed) is False
