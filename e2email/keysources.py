"""Where each OpenPGP key came from: a small private record beside the GnuPG home.

GnuPG does not remember how a certificate entered the keyring. When two keys claim one
address, the user must be told which came from where (issue 8 item 1: a ``bob.asc`` that also
carried a key for ``carol@...``), so e2email writes down, per primary fingerprint, the first
source it saw: a file it imported, a key it generated. Keys it finds in a user-supplied GnuPG
home without a record are described as coming from that home. Later sources (WKD, keyservers,
Autocrypt) are further :class:`SourceKind` values.

The record is ``key-sources.json`` in the e2email home, written 0600 and atomically (a temporary
file renamed over the old one), so a crash never leaves half a record.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from e2email.private import check_private, ensure_private_dir, open_private

__all__ = ["KeySource", "KeySources", "SourceKind"]

FILE_NAME = "key-sources.json"
_VERSION = 1


class SourceKind(enum.Enum):
    """How a key entered the keyring."""

    FILE = "file"  #: imported from a file (``detail`` is its absolute path)
    DATA = "data"  #: imported from bytes handed to the library (``detail`` says by whom)
    GENERATED = "generated"  #: made here by ``keys generate``
    GNUPG_HOME = "gnupg-home"  #: found in a user-supplied GnuPG home (``detail`` is its path)


@dataclass(frozen=True)
class KeySource:
    """One key's origin and when e2email first saw it there."""

    kind: SourceKind
    detail: str = ""
    at: datetime | None = None

    def __str__(self) -> str:
        when = f" on {self.at:%Y-%m-%d %H:%M} UTC" if self.at else ""
        if self.kind is SourceKind.FILE:
            return f"imported from {self.detail}{when}"
        if self.kind is SourceKind.GENERATED:
            return f"generated here{when}"
        if self.kind is SourceKind.GNUPG_HOME:
            return f"found in the GnuPG home {self.detail}"
        return f"imported{' by ' + self.detail if self.detail else ''}{when}"


class KeySources:
    """The fingerprint -> :class:`KeySource` record of one e2email home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / FILE_NAME

    def _load(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        # In a named GnuPG home a recorded source vouches for a key: whoever may write the
        # record could vouch for theirs, so a loose or foreign one is refused.
        check_private(self.home, what="e2email home")
        check_private(self.path, what="record of key sources")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged record only loses the "where from" notes, never a key or a decision:
            # unknown sources are shown as such.
            return {}
        keys = data.get("keys") if isinstance(data, dict) else None
        return (
            {k: v for k, v in keys.items() if isinstance(v, dict)} if isinstance(keys, dict) else {}
        )

    def get(self, fingerprint: str) -> KeySource | None:
        entry = self._load().get(fingerprint.upper())
        if entry is None:
            return None
        try:
            kind = SourceKind(entry.get("source", ""))
        except ValueError:
            return None
        at = entry.get("at")
        try:
            when = datetime.fromisoformat(at) if at else None
        except ValueError:
            when = None
        return KeySource(kind, str(entry.get("detail", "")), when)

    def record(self, fingerprints: Iterable[str], source: KeySource) -> None:
        """Note ``source`` for each fingerprint that has no record yet (the first source is
        the one that matters: a later import of the same key changes nothing about it)."""
        entries = self._load()
        at = (source.at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
        added = False
        for fpr in fingerprints:
            if fpr.upper() not in entries:
                entries[fpr.upper()] = {
                    "source": source.kind.value,
                    "detail": source.detail,
                    "at": at,
                }
                added = True
        if not added:
            return
        ensure_private_dir(self.home, what="e2email home")
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            with open_private(tmp) as fh:
                json.dump({"version": _VERSION, "keys": entries}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
