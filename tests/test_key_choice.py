"""Choosing keys safely (issue 8): refusing ambiguity, respecting a GnuPG home's validity,
re-checking keys after queueing, revocation certificates, and what `keys import` reports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import generate_key, gpg, kill_agent, new_gnupg_home

from e2email.errors import KeyProblem, KeyReason
from e2email.keystore import Keystore


@pytest.fixture
def store() -> Iterator[Keystore]:
    home = new_gnupg_home("e2kc")
    ks = Keystore(home)
    yield ks
    ks.shutdown_agent()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def factory() -> Iterator[Path]:
    home = new_gnupg_home("e2kf")
    yield home
    kill_agent(home)
    shutil.rmtree(home, ignore_errors=True)


def test_check_fingerprints_reports_keys_revoked_or_gone_since(
    store: Keystore, factory: Path, tmp_path: Path, keys: Keys
) -> None:
    """A queued copy's keys are re-checked: fine ones give no problem, a key revoked since
    (bare revocation certificate imported later) and a key no longer present are named."""
    victim = generate_key(factory, tmp_path, "later@example.com")
    store.import_file(keys.bob.cert)
    store.import_file(victim.cert)
    fprs = [keys.bob.fingerprint, victim.fingerprint.lower()]
    assert store.check_fingerprints(fprs) == []
    rev = (factory / "openpgp-revocs.d" / f"{victim.fingerprint}.rev").read_text()
    rev = rev.replace(":-----BEGIN PGP PUBLIC", "-----BEGIN PGP PUBLIC")
    store.import_keys(rev.encode())
    problems = store.check_fingerprints([*fprs, "AB" * 20])
    assert [(p.fingerprint, p.reason) for p in problems] == [
        (victim.fingerprint, KeyReason.REVOKED),
        ("AB" * 20, KeyReason.NOT_FOUND),
    ]
    assert problems[0].address == "later@example.com"
    assert isinstance(problems[0], KeyProblem)
