"""What key discovery found per address, remembered for a while (HOME/discovery-cache.json).

One send never asks the network twice for an address, and a bulk send asks once per address
however many rows name it: outcomes are kept here (0600, written atomically) for
``cache_ttl`` seconds (a key found, refused), network failures and "no key found" for
``failure_ttl`` (the policy layer decides which outcome is which). A key
that differs from the stored one is kept here too (``keydata``) until ``keys accept`` takes it
or the entry ages out: it is never in the keyring before that.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from e2email.private import check_private, ensure_private_dir, open_private

__all__ = ["DiscoveryCache"]

FILE_NAME = "discovery-cache.json"
_LOCK = threading.RLock()
#: Outcomes that are network failures (remembered briefly: the next send may get through).
FAILURES = frozenset({"failed"})


class DiscoveryCache:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / FILE_NAME
        self._data: dict[str, dict[str, Any]] = {}
        self._stamp: tuple[int, int] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._data, self._stamp = {}, None
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._data
        # The cache can hold keys waiting to be accepted: a loose one is refused, like the
        # record of key sources.
        check_private(self.path, what="discovery cache")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}  # a damaged cache only costs lookups
        entries = data.get("addresses") if isinstance(data, dict) else None
        self._data = (
            {k: v for k, v in entries.items() if isinstance(v, dict)}
            if isinstance(entries, dict)
            else {}
        )
        self._stamp = stamp
        return self._data

    def get(
        self, address: str, *, ttl: float, failure_ttl: float, now: float | None = None
    ) -> dict[str, Any] | None:
        """The fresh entry for ``address``, or None."""
        with _LOCK:
            entry = self._load().get(address)
        if entry is None:
            return None
        age = (now or time.time()) - float(entry.get("at", 0))
        limit = failure_ttl if entry.get("outcome") in FAILURES else ttl
        return dict(entry) if 0 <= age < limit else None

    def entry(self, address: str) -> dict[str, Any] | None:
        """The entry for ``address`` however old (``keys accept`` reads a pending key)."""
        with _LOCK:
            found = self._load().get(address)
        return dict(found) if found is not None else None

    def put(self, address: str, entry: dict[str, Any]) -> None:
        with _LOCK:
            data = dict(self._load())
            data[address] = {**entry, "at": entry.get("at", time.time())}
            self.put_all(data)

    def forget(self, address: str) -> None:
        with _LOCK:
            if address in self._load():
                data = dict(self._data)
                del data[address]
                self._data = data
                self.put_all(data)

    def put_all(self, data: dict[str, dict[str, Any]]) -> None:
        with _LOCK:
            ensure_private_dir(self.home, what="e2email home")
            tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                with open_private(tmp) as fh:
                    json.dump({"version": 1, "addresses": data}, fh, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self._data = data
            st = self.path.stat()
            self._stamp = (st.st_mtime_ns, st.st_size)
