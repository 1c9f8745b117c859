"""Regression tests for the security review of key discovery (issue 10): a key served for one
address must never become another address's key, gossip counts only from signed mail, an
S/MIME bag brings no strangers' certificates, the cache answers only the question it was
asked, and redirects name where the key really came from."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_discovery
from fixtures_pgp import Keys
from fixtures_smime import PKI
from pgp_helpers import TestKey, generate_key, gpg, kill_agent, new_gnupg_home, run
from test_discovery import HTTPSServer, Peers, Route, _discover

from e2email.certstore import CertStore, fingerprint
from e2email.discovery import DiscoverySettings, accept_key
from e2email.discovery.autocrypt import learn_from_message
from e2email.discovery.cache import DiscoveryCache
from e2email.discovery.smime import import_signer
from e2email.discovery.wkd import wkd_urls
from e2email.errors import KeyReason
from e2email.keystore import Keystore, _uid_address, vet_key

# The HTTPS server, its settings and the sender's keystore of tests/test_discovery.py.
ca = test_discovery.ca
ca_file = test_discovery.ca_file
server = test_discovery.server
settings = test_discovery.settings
store = test_discovery.store
peers = test_discovery.peers


def _path(addr: str, host: str = "openpgpkey.adv.test") -> str:
    return wkd_urls(addr).advanced.split(host, 1)[1].partition("?")[0]


@pytest.fixture(scope="module")
def mallory() -> Iterator[tuple[Path, TestKey, bytes]]:
    """mallory@adv.test's key with a second user ID smuggling carol@victim.test after it, as
    ``X <mallory@adv.test> <carol@victim.test>``: gpg's ``mbox`` of that user ID is mallory;
    the factory home (with the secret key) stays for signing."""
    factory = new_gnupg_home("e2xf")
    out = new_gnupg_home("e2xo")
    key = generate_key(factory, out, "mallory@adv.test")
    plain = gpg(factory, "--export", key.fingerprint).stdout
    gpg(factory, "--quick-add-uid", key.fingerprint, "X <mallory@adv.test> <carol@victim.test>")
    smuggling = gpg(factory, "--export", key.fingerprint).stdout
    assert plain != smuggling
    yield factory, TestKey(key.address, key.fingerprint, key.cert, key.secret), smuggling
    for home in (factory, out):
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


# -- 1. a user ID naming two addresses -------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "address"),
    [
        ("Ann <Ann@Example.org>", "ann@example.org"),
        ("ann@example.org", "ann@example.org"),
        ("X <mallory@adv.test> <carol@victim.test>", None),  # ambiguous: no address
        ("<mallory@adv.test> <carol@victim.test>", None),
        ("X <mallory@adv.test> carol@victim.test>", None),
        ("carol@victim.test <x>", None),
        ("Ann <ann@@example.org>", None),
        ("Ann <@example.org>", None),
        ("Ann <ann@example..org>", None),
        ("Ann <ann@example.org.>", None),
        ("Ann <ann @example.org>", None),
        ("Ann <>", None),
        (" ann@example.org", None),  # gpg's bare form is the whole user ID
        ("Ann ann@example.org", None),
    ],
)
def test_uid_address_follows_gpg_mbox_and_fails_closed(uid: str, address: str | None) -> None:
    assert _uid_address(uid) == address


def test_uid_smuggles_carol_through_wkd(
    server: HTTPSServer,
    settings: DiscoverySettings,
    store: Keystore,
    mallory: tuple[Path, TestKey, bytes],
) -> None:
    _, key, data = mallory
    server.routes[("openpgpkey.adv.test", _path("mallory@adv.test"))] = Route(body=data)
    problem = _discover(store, ["mallory@adv.test"], settings)["mallory@adv.test"]
    assert problem.reason is KeyReason.ADDRESS_MISMATCH
    assert "carol@victim.test" in problem.detail
    assert store.get(key.fingerprint) is None
    assert getattr(store.encryption_key("carol@victim.test"), "fingerprint", None) is None


def test_vet_key_refuses_a_user_id_that_names_another_address(
    mallory: tuple[Path, TestKey, bytes],
) -> None:
    _, _, data = mallory
    vetted = vet_key(data, "mallory@adv.test")
    assert getattr(vetted, "reason", None) is KeyReason.ADDRESS_MISMATCH
    # Nothing for carol either: the smuggled user ID carries no address of its own.
    assert getattr(vet_key(data, "carol@victim.test"), "reason", None) is (
        KeyReason.ADDRESS_MISMATCH
    )


def test_autocrypt_uid_smuggle(store: Keystore, mallory: tuple[Path, TestKey, bytes]) -> None:
    _, key, data = mallory
    kd = base64.b64encode(data).decode()
    raw = (
        "From: mallory@adv.test\r\nTo: alice@example.org\r\nSubject: hi\r\n"
        f"Autocrypt: addr=mallory@adv.test; keydata={kd}\r\n\r\nhello\r\n"
    ).encode()
    learnt = learn_from_message(store, raw, origin="m.eml")
    assert [(x.address, x.outcome) for x in learnt] == [("mallory@adv.test", "refused")]
    assert getattr(store.encryption_key("carol@victim.test"), "fingerprint", None) != (
        key.fingerprint
    )
    assert store.get(key.fingerprint) is None


def test_a_hand_imported_smuggling_key_is_nobodys_key_for_carol(
    store: Keystore, mallory: tuple[Path, TestKey, bytes]
) -> None:
    _, key, data = mallory
    summary = store.import_keys(data)
    assert summary.conflicts == ()
    stored = store.get(key.fingerprint)
    assert stored is not None and stored.addresses == ("mallory@adv.test",)
    assert getattr(store.encryption_key("carol@victim.test"), "reason", None) is (
        KeyReason.NOT_FOUND
    )


# -- 2. gossip only from signed mail --------------------------------------------------------


def _encrypted(factory: Path, to: TestKey, inner: bytes, *, sender: str, sign: str | None) -> bytes:
    gpg(factory, "--import", str(to.cert))
    args = ["--armor", "--trust-model", "always", "--encrypt", "-r", to.fingerprint]
    if sign:
        args = [*args, "--sign", "-u", sign]
    enc = gpg(factory, *args, input=inner).stdout
    return (
        (
            f"From: {sender}\r\nTo: alice@example.org, carol@victim.test\r\nSubject: x\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
            'protocol="application/pgp-encrypted"; boundary=BB\r\n\r\n'
            "--BB\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
            "--BB\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + enc
        + b"\r\n--BB--\r\n"
    )


def _gossip_inner(sender: str, keydata: bytes) -> bytes:
    b64 = base64.b64encode(keydata).decode()
    return (
        f"From: {sender}\r\nTo: alice@example.org, carol@victim.test\r\n"
        f"Autocrypt-Gossip: addr=carol@victim.test; keydata={b64}\r\n"
        "Content-Type: text/plain\r\n\r\nhi\r\n"
    ).encode()


@pytest.fixture(scope="module")
def fake_carol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestKey]:
    factory = new_gnupg_home("e2xc")
    yield generate_key(factory, tmp_path_factory.mktemp("carol"), "carol@victim.test")
    kill_agent(factory)
    shutil.rmtree(factory, ignore_errors=True)


def test_gossip_in_unsigned_encrypted_mail_is_ignored(
    store: Keystore, keys: Keys, fake_carol: TestKey, mallory: tuple[Path, TestKey, bytes]
) -> None:
    factory, _, _ = mallory
    inner = _gossip_inner("bob@example.net", fake_carol.cert.read_bytes())
    raw = _encrypted(factory, keys.alice, inner, sender="bob@example.net", sign=None)
    learnt = learn_from_message(store, raw, origin="forged.eml")
    said = [str(x) for x in learnt if x.gossip]
    assert said == [
        "bob@example.net: gossip key ignored: the encrypted message carries no valid signature"
    ]
    assert store.find("carol@victim.test", include_revoked=True) == ()


def test_gossip_signed_by_a_key_not_of_the_from_address_is_ignored(
    store: Keystore, keys: Keys, fake_carol: TestKey, mallory: tuple[Path, TestKey, bytes]
) -> None:
    factory, key, _ = mallory
    store.import_keys(key.cert.read_bytes())  # mallory is known, but From says bob
    inner = _gossip_inner("bob@example.net", fake_carol.cert.read_bytes())
    raw = _encrypted(factory, keys.alice, inner, sender="bob@example.net", sign=key.fingerprint)
    learnt = learn_from_message(store, raw, origin="forged.eml")
    said = [str(x) for x in learnt if x.gossip]
    assert said and "is not a key of bob@example.net" in said[0]
    assert store.find("carol@victim.test", include_revoked=True) == ()


def test_gossip_signed_by_the_senders_key_is_read(
    store: Keystore, keys: Keys, fake_carol: TestKey, mallory: tuple[Path, TestKey, bytes]
) -> None:
    factory, key, _ = mallory
    store.import_keys(key.cert.read_bytes())
    inner = _gossip_inner("mallory@adv.test", fake_carol.cert.read_bytes())
    raw = _encrypted(factory, keys.alice, inner, sender="mallory@adv.test", sign=key.fingerprint)
    learnt = learn_from_message(store, raw, origin="signed.eml")
    assert [(x.address, x.outcome) for x in learnt if x.gossip] == [
        ("carol@victim.test", "imported")
    ]


# -- 3. the S/MIME certificate bag ------------------------------------------------------------


def test_smime_bag_brings_only_the_signers_chain(pki: PKI, tmp_path: Path) -> None:
    home = tmp_path / "h"
    CertStore(home).import_files([pki.root_pem], trust=True)
    extra = tmp_path / "extra.pem"
    extra.write_bytes(
        pki.intermediate_pem.read_bytes()
        + pki.carol.cert_pem.read_bytes()
        + pki.bad["wrong"].cert_pem.read_bytes()
        + pki.partner_ca_pem.read_bytes()
    )
    body = tmp_path / "body.txt"
    body.write_bytes(b"Content-Type: text/plain\r\n\r\nhello\r\n")
    out = tmp_path / "m.eml"
    run(
        [
            "openssl", "cms", "-sign", "-in", str(body), "-signer", str(pki.bob.cert_pem),
            "-inkey", str(pki.bob.key_pem), "-certfile", str(extra), "-from", pki.bob.address,
            "-to", "alice@example.org", "-subject", "hi", "-out", str(out),
        ]
    )  # fmt: skip
    taken = import_signer(CertStore(home), out)
    assert taken.fingerprint == pki.bob.fingerprint
    stored = CertStore(home)
    assert stored.get(pki.bob.fingerprint) is not None
    assert stored.get(fingerprint(pki.intermediate)) is not None  # on bob's chain
    assert stored.get(pki.carol.fingerprint) is None
    assert stored.get(pki.bad["wrong"].fingerprint) is None
    assert stored.get(fingerprint(pki.partner_ca)) is None  # a CA, but not bob's


# -- 4. the cache answers only the question it was asked ------------------------------------


def test_cache_ignores_policy(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    server.routes[("keys.test", "/vks/v1/by-email/dan%40direct.test")] = Route(
        body=peers.dan.cert.read_bytes()
    )
    first = _discover(store, ["dan@direct.test"], settings)
    assert first["dan@direct.test"].reason is KeyReason.NOT_FOUND
    assert _discover(store, ["dan@direct.test"], settings, "wkd+keyserver") == {}
    assert server.hits[("keys.test", "/vks/v1/by-email/dan%40direct.test")] == 1
    assert store.get(peers.dan.fingerprint) is not None


def test_cache_keyservers_are_part_of_the_question(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    other = dataclasses.replace(settings, keyservers=("https://keys.test/other",))
    assert "dan@direct.test" in _discover(store, ["dan@direct.test"], settings, "wkd+keyserver")
    server.routes[("keys.test", "/other/vks/v1/by-email/dan%40direct.test")] = Route(
        body=peers.dan.cert.read_bytes()
    )
    assert _discover(store, ["dan@direct.test"], other, "wkd+keyserver") == {}


def test_not_found_is_remembered_for_the_failure_ttl_only(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    short = dataclasses.replace(settings, cache_ttl=86400, failure_ttl=600)
    assert "ann@adv.test" in _discover(store, ["ann@adv.test"], short)
    cache = DiscoveryCache(store.home)
    entry = cache.entry("ann@adv.test")
    assert entry is not None and entry["reason"] == KeyReason.NOT_FOUND.value
    cache.put("ann@adv.test", {**entry, "at": time.time() - 601})  # older than failure_ttl
    server.routes[("openpgpkey.adv.test", _path("ann@adv.test"))] = Route(
        body=peers.ann.cert.read_bytes()
    )
    assert _discover(store, ["ann@adv.test"], short) == {}
    assert store.get(peers.ann.fingerprint) is not None


# -- 5. redirects ------------------------------------------------------------------------------


def test_a_redirect_names_the_url_that_served_the_key(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    server.routes[("openpgpkey.adv.test", _path("ann@adv.test"))] = Route(
        status=301, location="https://adv.test/moved"
    )
    server.routes[("adv.test", "/moved")] = Route(body=peers.ann.cert.read_bytes())
    assert _discover(store, ["ann@adv.test"], settings) == {}
    key = store.get(peers.ann.fingerprint)
    assert key is not None
    source = store.source_of(key)
    assert source is not None and source.detail == "https://adv.test/moved"


def test_a_redirect_to_a_host_that_does_not_exist_says_so(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore
) -> None:
    server.routes[("openpgpkey.adv.test", _path("ann@adv.test"))] = Route(
        status=302, location="https://nowhere.test/key"
    )
    problem = _discover(store, ["ann@adv.test"], settings)["ann@adv.test"]
    assert problem.reason is KeyReason.LOOKUP_FAILED
    assert "the redirect target nowhere.test does not exist" in problem.detail
    assert "neither" not in problem.detail


# -- 6. HKP keyservers do not verify addresses ---------------------------------------------------


def test_a_key_only_an_hkp_keyserver_serves_waits_for_keys_accept(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    hkp = dataclasses.replace(settings, keyservers=("hkps://keys.test",))
    server.routes[("keys.test", "/pks/lookup")] = Route(body=peers.dan.cert.read_bytes())
    problem = _discover(store, ["dan@direct.test"], hkp, "wkd+keyserver")["dan@direct.test"]
    assert problem.reason is KeyReason.UNVERIFIED
    assert problem.fingerprint == peers.dan.fingerprint
    assert f"e2email keys accept dan@direct.test {peers.dan.fingerprint}" in problem.detail
    assert store.get(peers.dan.fingerprint) is None
    # Asked again (the cache answers): still held back, nothing imported.
    again = _discover(store, ["dan@direct.test"], hkp, "wkd+keyserver")["dan@direct.test"]
    assert again.reason is KeyReason.UNVERIFIED
    assert server.hits[("keys.test", "/pks/lookup")] == 1
    assert "accepted" in accept_key(store, "dan@direct.test", peers.dan.fingerprint)
    choice = store.encryption_key("dan@direct.test")
    assert getattr(choice, "fingerprint", None) == peers.dan.fingerprint
    assert _discover(store, ["dan@direct.test"], hkp, "wkd+keyserver") == {}


def test_a_vks_key_after_an_hkp_one_is_taken(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    both = dataclasses.replace(settings, keyservers=("hkps://keys.test", "https://keys.test"))
    server.routes[("keys.test", "/pks/lookup")] = Route(body=peers.dan.cert.read_bytes())
    server.routes[("keys.test", "/vks/v1/by-email/dan%40direct.test")] = Route(
        body=peers.dan.cert.read_bytes()
    )
    assert _discover(store, ["dan@direct.test"], both, "wkd+keyserver") == {}
    key = store.get(peers.dan.fingerprint)
    assert key is not None
    source = store.source_of(key)
    assert source is not None and "/vks/v1/" in source.detail
