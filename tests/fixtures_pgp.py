"""Session-scoped OpenPGP fixtures: keys made once per test run, and the homes that hold them.

Imported by conftest.py. Keys:

* alice (sender, the public demo key) and bob (recipient, demo key)
* carol, dave, erin: more recipients (Cc/Bcc)
* expired (expired in 2020), revoked, weak (RSA-1024), signonly (no encryption subkey),
  sha1 (RSA-2048 whose self-signatures use SHA-1)
* locked: a sender key protected by the passphrase ``LOCKED_PASSPHRASE``
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pgp_helpers import (
    TestKey,
    demo_key,
    generate_key,
    gpg,
    kill_agent,
    new_gnupg_home,
    revoke,
)

from e2email.config import OpenPGPEngine, SMTPSettings, TLSMode
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer, TestCA

LOCKED_PASSPHRASE = "correct horse battery staple"

#: The OpenPGP engines the interop and fail-closed tests run against (issue 9): the gpg
#: program, and Sequoia in process. Both use the same keystore and must give the same results.
ENGINES = (OpenPGPEngine.GPG, OpenPGPEngine.SEQUOIA)


@pytest.fixture(params=ENGINES, ids=[e.value for e in ENGINES])
def openpgp_engine(request: pytest.FixtureRequest) -> OpenPGPEngine:
    """Each OpenPGP engine in turn (a test taking it runs once per engine)."""
    engine: OpenPGPEngine = request.param
    return engine


@dataclass(frozen=True)
class Keys:
    alice: TestKey
    bob: TestKey
    carol: TestKey
    dave: TestKey
    erin: TestKey
    expired: TestKey
    revoked: TestKey
    weak: TestKey
    signonly: TestKey
    locked: TestKey
    sha1: TestKey

    def all(self) -> list[TestKey]:
        return [getattr(self, name) for name in self.__dataclass_fields__]


@pytest.fixture(scope="session")
def keys() -> Iterator[Keys]:
    factory = new_gnupg_home("e2f")
    out = new_gnupg_home("e2k")
    try:
        made = Keys(
            alice=demo_key("alice", "alice@example.org"),
            bob=demo_key("bob", "bob@example.net"),
            carol=generate_key(factory, out, "carol@example.com"),
            dave=generate_key(factory, out, "dave@example.com"),
            erin=generate_key(factory, out, "erin@example.com"),
            expired=generate_key(
                factory, out, "expired@example.com", expire="1d", faked_time="20200101T000000"
            ),
            revoked=revoke(factory, generate_key(factory, out, "revoked@example.com")),
            weak=generate_key(factory, out, "weak@example.com", key_type="rsa1024"),
            signonly=generate_key(factory, out, "signonly@example.com", encryption_subkey=False),
            locked=generate_key(factory, out, "locked@example.org", passphrase=LOCKED_PASSPHRASE),
            sha1=generate_key(
                factory, out, "sha1@example.com", key_type="rsa2048", cert_digest="SHA1"
            ),
        )
        yield made
    finally:
        kill_agent(factory)
        shutil.rmtree(factory, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def sender_store(keys: Keys) -> Iterator[Keystore]:
    """An e2email keystore as a sender has it: own secret keys, everyone's certificates."""
    home = new_gnupg_home("e2s")
    store = Keystore(home)
    for key in keys.all():
        store.import_file(key.cert)
    assert keys.alice.secret and keys.locked.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.locked.secret)
    yield store
    store.shutdown_agent()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def recipients_home(keys: Keys) -> Iterator[Path]:
    """A plain GnuPG home holding the recipients' secret keys, for gpg as the receiving side."""
    home = new_gnupg_home("e2r")
    for key in (keys.bob, keys.carol, keys.dave, keys.erin):
        assert key.secret
        gpg(home, "--import", str(key.secret))
    gpg(home, "--import", str(keys.alice.cert))
    yield home
    kill_agent(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def session_ca() -> Iterator[TestCA]:
    ca = TestCA()
    yield ca
    ca.cleanup()


@pytest.fixture(scope="session")
def tls_server(session_ca: TestCA) -> Iterator[LoopbackSMTPServer]:
    """One implicit-TLS server for the whole run; tests find their message by Message-ID."""
    server = LoopbackSMTPServer(tls="implicit", ca=session_ca).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smtp_settings(tls_server: LoopbackSMTPServer) -> SMTPSettings:
    assert tls_server.ca_file is not None
    return SMTPSettings(
        host=tls_server.host,
        port=tls_server.port,
        tls=TLSMode.IMPLICIT,
        ca_file=tls_server.ca_file,
        timeout=30,
    )
