"""Where each OpenPGP key came from: a small private record beside the GnuPG home.

GnuPG does not remember how a certificate entered the keyring. When two keys claim one
address, the user must be told which came from where (issue 8 item 1: a ``bob.asc`` that also
carried a key for ``carol@...``), so e2email writes down, per primary fingerprint, the first
source it saw: a file it imported, a key it generated. Keys it finds in a user-supplied GnuPG
home without a record are described as coming from that home. Later sources (WKD, keyservers,
Autocrypt) are further :class:`SourceKind` values, and every key also carries when it was last
*confirmed*: seen again at its source (the same key served again by WKD or a keyserver, a newer
Autocrypt header with it) or accepted by hand (``e2email keys accept``), so that ``keys list``
shows how fresh the evidence for each key is (issue 10, trust policy).

The record is ``key-sources.json`` in the e2email home, written 0600 and atomically (a temporary
file renamed over the old one), so a crash never leaves half a record.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from e2email.private import check_private, ensure_private_dir, open_private

__all__ = ["KeySource", "KeySources", "SourceKind"]

FILE_NAME = "key-sources.json"
#: Read-modify-write of the record happens from several threads at once (discovered keys of
#: one message are imported side by side).
_LOCK = threading.RLock()
#: Writes made by this process, per record file (bumped under :data:`_LOCK`): a pinned
#: reading (:meth:`KeySources.pinned`) is read again when any instance wrote since.
_WRITES: dict[str, int] = {}
#: The record of a home that has none, as :meth:`KeySources.snapshot` gives it (never changed).
_NOTHING: Mapping[str, object] = {}
_VERSION = 1


class SourceKind(enum.Enum):
    """How a key entered the keyring."""

    FILE = "file"  #: imported from a file (``detail`` is its absolute path)
    DATA = "data"  #: imported from bytes handed to the library (``detail`` says by whom)
    GENERATED = "generated"  #: made here by ``keys generate``
    GNUPG_HOME = "gnupg-home"  #: found in a user-supplied GnuPG home (``detail`` is its path)
    WKD = "wkd"  #: served by the address's own domain, Web Key Directory (``detail``: the URL)
    KEYSERVER = "keyserver"  #: served by a keyserver (``detail``: the URL asked)
    AUTOCRYPT = "autocrypt"  #: an Autocrypt header of received mail (``detail``: the message)
    GOSSIP = "gossip"  #: an Autocrypt-Gossip header inside received encrypted mail
    ACCEPTED = "accepted"  #: accepted by hand with ``e2email keys accept`` (``detail``: address)


#: Sources that a program found, as opposed to keys a person handed to e2email.
DISCOVERED = frozenset(
    {SourceKind.WKD, SourceKind.KEYSERVER, SourceKind.AUTOCRYPT, SourceKind.GOSSIP}
)


@dataclass(frozen=True)
class KeySource:
    """One key's origin and when e2email first saw it there."""

    kind: SourceKind
    detail: str = ""
    at: datetime | None = None
    #: When the key was last seen again at a source or accepted (None: only when first seen).
    confirmed: datetime | None = None

    @property
    def last_confirmed(self) -> datetime | None:
        """The newest evidence for the key: its last confirmation, else when it came in."""
        return self.confirmed or self.at

    def __str__(self) -> str:
        when = f" on {self.at:%Y-%m-%d %H:%M} UTC" if self.at else ""
        if self.kind in _NAMES:
            return f"{_NAMES[self.kind]}{' ' + self.detail if self.detail else ''}{when}"
        if self.kind is SourceKind.FILE:
            return f"imported from {self.detail}{when}"
        if self.kind is SourceKind.GENERATED:
            return f"generated here{when}"
        if self.kind is SourceKind.GNUPG_HOME:
            return f"found in the GnuPG home {self.detail}"
        return f"imported{' by ' + self.detail if self.detail else ''}{when}"


_NAMES = {
    SourceKind.WKD: "from WKD",
    SourceKind.KEYSERVER: "from the keyserver",
    SourceKind.AUTOCRYPT: "from an Autocrypt header in",
    SourceKind.GOSSIP: "from Autocrypt gossip in",
    SourceKind.ACCEPTED: "accepted by hand for",
}


def _time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _iso(when: datetime | None) -> str:
    return (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")


class KeySources:
    """The fingerprint -> :class:`KeySource` record of one e2email home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / FILE_NAME
        #: The text last read and the (home, file) stat it was read under: a lookup per
        #: recipient per message re-reads and re-checks the file only when either changed.
        self._cache: tuple[tuple[int, ...], str] | None = None
        #: The record as parsed from that text (:meth:`snapshot`): one object per reading,
        #: never changed, so that whoever keeps a judgment made from it can tell by its
        #: identity that the record has not changed since.
        self._parsed: tuple[tuple[int, ...], Mapping[str, object]] | None = None
        self._home_name, self._path_name = os.fspath(home), os.fspath(self.path)
        #: Per thread, during :meth:`pinned`: the record as read at its first lookup.
        self._pin = threading.local()
        #: The key of this home's record in :data:`_WRITES` (every instance for the same
        #: file shares it).
        self._writes_key = os.path.realpath(self.path)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """One reading of the record for a whole operation in this thread (the lookups that
        resolve one message's keys: each recipient's accepted key, each key's source), as
        :meth:`e2email.keystore.Keystore.pinned` does for the listing: checked for changes at
        the first lookup, not at each. A write by this process (any thread, any instance for
        the same home) counts at the next lookup; another process's, from the next
        operation."""
        depth = getattr(self._pin, "depth", 0)
        self._pin.depth = depth + 1
        try:
            yield
        finally:
            self._pin.depth = depth
            if depth == 0:
                self._pin.data = None

    def snapshot(self) -> Mapping[str, object]:
        """The record as the read-only lookups see it: once per :meth:`pinned` operation.
        The same object for as long as the record is unchanged (its file, and the home's
        owner and mode: :meth:`_tag`), a new one after any change: a judgment made from it
        stands while the object is the same. Never to be changed (writes read the record
        afresh, under the lock)."""
        if getattr(self._pin, "depth", 0) == 0:
            return self._read()
        data: Mapping[str, object] | None = getattr(self._pin, "data", None)
        writes = _WRITES.get(self._writes_key, 0)
        if data is None or getattr(self._pin, "writes", None) != writes:
            data = self._pin.data = self._read()
            self._pin.writes = writes
        return data

    def _read(self) -> Mapping[str, object]:
        """The record, looked at for changes (:meth:`_tag`) and read again only after one:
        the same object while unchanged (read-only; writers use :meth:`_fresh`)."""
        tag = self._tag()
        parsed = self._parsed
        if tag is not None and parsed is not None and parsed[0] == tag:
            return parsed[1]
        if tag is None and not os.path.lexists(self._path_name):
            return _NOTHING  # no record: the same (empty) object each time
        data = self._fresh()
        cache = self._cache
        if tag is not None and cache is not None and cache[0] == tag:
            self._parsed = (tag, data)  # read under this very tag (see _fresh)
        return data

    def _tag(self) -> tuple[int, ...] | None:
        """What the checks and the read depend on: owner, mode, identity and, for the file,
        size and modification time; None when the file is absent."""
        try:
            # What check_private judges and what is read is what a symlink points to (stat),
            # the link itself is told by its inode (lstat); ctime moves with any chmod, chown
            # or write. A path that is no link is its own target: one lstat serves both.
            lhome, lst = os.lstat(self._home_name), os.lstat(self._path_name)
            home = os.stat(self._home_name) if stat.S_ISLNK(lhome.st_mode) else lhome
            st = os.stat(self._path_name) if stat.S_ISLNK(lst.st_mode) else lst
        except OSError:
            return None
        return (
            home.st_ino, home.st_uid, home.st_mode, home.st_ctime_ns, lhome.st_ino,
            st.st_ino, st.st_uid, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            lst.st_ino,
        )  # fmt: skip

    def _fresh(self) -> dict[str, object]:
        """The record parsed afresh: the caller may change it (the writers)."""
        tag = self._tag()
        if tag is not None and self._cache is not None and self._cache[0] == tag:
            return self._parse(self._cache[1])
        if not self.path.exists():
            return {}
        # In a named GnuPG home a recorded source vouches for a key: whoever may write the
        # record could vouch for theirs, so a loose or foreign one is refused.
        check_private(self.home, what="e2email home")
        check_private(self.path, what="record of key sources")
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}
        if tag is not None and tag == self._tag():  # unchanged while it was read
            self._cache = (tag, text)
        return self._parse(text)

    @staticmethod
    def _parse(text: str) -> dict[str, object]:
        try:
            data = json.loads(text)
        except ValueError:
            # A damaged record only loses the "where from" notes, never a key or a decision:
            # unknown sources are shown as such.
            return {}
        return data if isinstance(data, dict) else {}

    def _load(self) -> dict[str, dict[str, str]]:
        keys = self._fresh().get("keys")
        return (
            {k: v for k, v in keys.items() if isinstance(v, dict)} if isinstance(keys, dict) else {}
        )

    def get(self, fingerprint: str) -> KeySource | None:
        keys = self.snapshot().get("keys")
        entry = keys.get(fingerprint.upper()) if isinstance(keys, dict) else None
        if not isinstance(entry, dict):
            return None
        try:
            kind = SourceKind(entry.get("source", ""))
        except ValueError:
            return None
        return KeySource(
            kind,
            str(entry.get("detail", "")),
            _time(entry.get("at")),
            _time(entry.get("confirmed")),
        )

    def record(self, fingerprints: Iterable[str], source: KeySource) -> None:
        """Note ``source`` for each fingerprint that has no record yet (the first source is
        the one that matters: a later import of the same key changes nothing about it)."""
        with _LOCK:
            self._record(fingerprints, source)

    def _record(self, fingerprints: Iterable[str], source: KeySource) -> None:
        entries = self._load()
        at = _iso(source.at)
        added = False
        for fpr in fingerprints:
            if fpr.upper() not in entries:
                entries[fpr.upper()] = {
                    "source": source.kind.value,
                    "detail": source.detail,
                    "at": at,
                }
                if source.confirmed is not None:
                    entries[fpr.upper()]["confirmed"] = _iso(source.confirmed)
                added = True
        if added:
            self._save(entries)

    def replace(self, fingerprint: str, source: KeySource) -> None:
        """Record ``source`` for the key whatever was recorded before (a key accepted by hand
        is vouched for by that decision, not by where it was first seen)."""
        with _LOCK:
            self._replace(fingerprint, source)

    def _replace(self, fingerprint: str, source: KeySource) -> None:
        entries = self._load()
        entry = {"source": source.kind.value, "detail": source.detail, "at": _iso(source.at)}
        if source.confirmed is not None:
            entry["confirmed"] = _iso(source.confirmed)
        entries[fingerprint.upper()] = entry
        self._save(entries)

    def confirm(self, fingerprint: str, *, when: datetime | None = None) -> None:
        """Note that the key was seen again at its source (or accepted) at ``when`` (now)."""
        with _LOCK:
            entries = self._load()
            entry = entries.get(fingerprint.upper())
            if entry is None:
                return
            entry["confirmed"] = _iso(when)
            self._save(entries)

    def accepted(self, address: str) -> str | None:
        """The fingerprint accepted by hand for ``address`` (``keys accept``), if any."""
        pins = self.snapshot().get("accepted")
        value = pins.get(address.strip().lower()) if isinstance(pins, dict) else None
        return value if isinstance(value, str) else None

    def accept(self, address: str, fingerprint: str, *, when: datetime | None = None) -> None:
        """Make ``fingerprint`` the key for ``address`` (it decides between several keys that
        carry the address, and a discovered key that differs from it is refused again)."""
        with _LOCK:
            data = self._fresh()
            pins = data.get("accepted")
            pins = dict(pins) if isinstance(pins, dict) else {}
            pins[address.strip().lower()] = fingerprint.upper()
            entries = self._load()
            entry = entries.get(fingerprint.upper())
            if entry is not None:
                entry["confirmed"] = _iso(when)
            self._save(entries, accepted=pins)

    def disabled(self) -> frozenset[str]:
        """Fingerprints of keys disabled for use (a certificate store has no flag of its own
        for it: gpg's "disabled" is kept here when a GnuPG home is migrated)."""
        found = self._fresh().get("disabled")
        return (
            frozenset(f.upper() for f in found if isinstance(f, str))
            if isinstance(found, list)
            else frozenset()
        )

    def disable(self, fingerprints: Iterable[str]) -> None:
        """Note these keys as disabled: the keystore refuses them ("key disabled")."""
        with _LOCK:
            wanted = self.disabled() | {f.upper() for f in fingerprints}
            if wanted != self.disabled():
                self._save(self._load(), disabled=wanted)

    def _save(
        self,
        entries: dict[str, dict[str, str]],
        *,
        accepted: dict[str, str] | None = None,
        disabled: frozenset[str] | None = None,
    ) -> None:
        if accepted is None:
            pins = self._fresh().get("accepted")
            accepted = pins if isinstance(pins, dict) else {}
        if disabled is None:
            disabled = self.disabled()
        ensure_private_dir(self.home, what="e2email home")
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open_private(tmp) as fh:
                record: dict[str, object] = {
                    "version": _VERSION,
                    "keys": entries,
                    "accepted": accepted,
                }
                if disabled:
                    record["disabled"] = sorted(disabled)
                json.dump(record, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            _WRITES[self._writes_key] = _WRITES.get(self._writes_key, 0) + 1  # under _LOCK
