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


def test_a_pinned_operation_reads_the_key_sources_record_once(tmp_path: Path) -> None:
    """Within one pinned operation (one message's key lookups) the record is read once: a
    change by another process counts from the next operation; a write by this process, at
    once."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    sources = KeySources(home)
    sources.accept("bob@example.net", "A" * 40)
    reads = 0
    real = sources._read

    def counting() -> dict[str, object]:
        nonlocal reads
        reads += 1
        return real()

    sources._read = counting  # type: ignore[method-assign]
    with sources.pinned():
        assert sources.accepted("bob@example.net") == "A" * 40
        assert sources.accepted("carol@example.net") is None
        assert sources.get("A" * 40) is None
        assert reads == 1
        # Another process writes (the file replaced behind this process's back).
        record = home / "key-sources.json"
        record.write_text(record.read_text().replace("A" * 40, "B" * 40))
        assert sources.accepted("bob@example.net") == "A" * 40  # pinned: the first reading
        sources.accept("carol@example.net", "C" * 40)  # this process writes: seen at once
        assert sources.accepted("carol@example.net") == "C" * 40
        assert sources.accepted("bob@example.net") == "B" * 40
    assert sources.accepted("bob@example.net") == "B" * 40
    before = reads
    sources.accepted("bob@example.net")
    assert reads == before + 1  # not pinned: every lookup looks at the record


def test_a_pinned_reading_sees_a_write_by_another_instance_for_the_same_home(
    tmp_path: Path,
) -> None:
    """Another KeySources (another Keystore, client or CLI path) for the same home in this
    process: its write counts at the next lookup too (review finding: only the writing
    instance's own pins saw it)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    a, b = KeySources(home), KeySources(home)
    a.accept("bob@example.net", "A" * 40)
    with a.pinned():
        assert a.accepted("bob@example.net") == "A" * 40
        b.accept("bob@example.net", "B" * 40)
        assert a.accepted("bob@example.net") == "B" * 40
