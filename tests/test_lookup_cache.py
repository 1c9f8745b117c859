"""The caches on the per-message lookup path never serve what a fresh read would refuse or
see differently: the key-sources record (followed through symlinks, re-checked after a
chmod) and a pinned keystore listing (dropped when another thread changes the keystore)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fixtures_pgp import Keys

from e2email.errors import InsecurePathError
from e2email.keysources import KeySources
from e2email.keystore import Keystore


def test_the_key_sources_cache_follows_a_symlink_and_rechecks_after_chmod(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    target = tmp_path / "record.json"
    target.write_text('{"accepted": {"bob@example.net": "AAAA"}}')
    target.chmod(0o600)
    (home / "key-sources.json").symlink_to(target)
    sources = KeySources(home)
    assert sources.accepted("bob@example.net") == "AAAA"
    target.write_text('{"accepted": {"bob@example.net": "BBBB"}}')
    assert sources.accepted("bob@example.net") == "BBBB"
    target.chmod(0o666)
    with pytest.raises(InsecurePathError):
        sources.accepted("bob@example.net")


def test_a_pinned_listing_sees_an_import_made_by_another_thread(keys: Keys, tmp_path: Path) -> None:
    store = Keystore(tmp_path / "home", backend="certd")
    store.import_file(keys.alice.cert)
    with store.pinned():
        assert store.find(keys.bob.address) == ()
        other = threading.Thread(target=store.import_file, args=(keys.bob.cert,))
        other.start()
        other.join()
        assert [k.fingerprint for k in store.find(keys.bob.address)] == [keys.bob.fingerprint]
