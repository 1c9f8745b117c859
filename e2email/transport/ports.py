"""Which port to submit on when only a host is given, when to try the next one, and the memory
of what worked for each host.

The order (``SMTPSettings.port_order``, by default 465, 587, 2525) follows RFC 8314 §3.3, which
prefers implicit TLS (465) for submission, then RFC 6409 submission on 587 with STARTTLS
*required*, then 2525, the usual stand-in where hosting providers block 587. Port 25 and
plaintext are never in it unless configured, and a remembered port is only ever moved to the
front of the configured candidates: the memory file cannot add a port or a weaker mode.

When the next port is tried (:data:`FALLBACK_OUTCOMES`): when *this port could not be used
and nothing was risked on it*:

* it could not be reached: connection refused, timed out, host or network unreachable, closed
  before or instead of a greeting, a greeting other than 220. That is what port blocking looks
  like;
* it answered in clear but did not offer STARTTLS, or refused it (e.g. ``454 TLS not
  available``). Where 587 is reachable but its STARTTLS offer is removed on the way (a
  middlebox "securing" SMTP, or an attacker), 2525 is the classic way out, and the next port
  is held to exactly the same checks: verified certificate, TLS 1.2 or newer, before anything
  but EHLO (and STARTTLS) is sent. Nothing but EHLO was sent to the stripped port (then QUIT,
  or the connection is just closed), so nothing was risked there. Because a stripped offer is
  also what an attack looks like, it is never passed over quietly: each such port is logged
  as a warning (the CLI shows it), it is in the ``attempts`` of the connection or error, and
  when no port works the error is a :class:`~e2email.errors.TLSError` (not transient) listing
  every port, rather than "cannot reach".

When the search stops: as soon as a server took part in a TLS handshake that could not be
completed safely: a certificate that does not verify or is for another host, TLS older than
1.2, a failed handshake. Going on would be safe as far as secrecy goes (every candidate still
requires verified TLS), but these are not blocked ports: an attacker who can break TLS on 465
can as easily block it, and a wrong certificate is usually a wrong host name that every port
shares. Quietly succeeding on the next port would hide an attack or a misconfiguration the
user needs to see. A name that does not resolve stops the search too (every port shares it).
Failures after TLS (EHLO refused, AUTH) also stop it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from e2email.config import TLSMode

__all__ = [
    "FALLBACK_OUTCOMES",
    "NO_TLS_OUTCOMES",
    "HostMemory",
    "Outcome",
    "PortAttempt",
    "describe_mode",
    "order_candidates",
]

log = logging.getLogger(__name__)

Outcome = Literal[
    "ok",
    "refused",
    "timed out",
    "unreachable",
    "dropped",
    "greeting",
    "name",
    "no starttls",
    "certificate",
    "tls",
    "error",
]

#: Failures that mean "this port cannot be used here": the next candidate is tried.
FALLBACK_OUTCOMES: frozenset[str] = frozenset(
    {"refused", "timed out", "unreachable", "dropped", "greeting", "no starttls"}
)

#: Fall-back outcomes that are also security signals: reported loudly, and when no port works
#: the search ends in a TLS error, not in "cannot reach".
NO_TLS_OUTCOMES: frozenset[str] = frozenset({"no starttls"})

_FILE_VERSION = 1


def describe_mode(mode: TLSMode) -> str:
    return {
        TLSMode.IMPLICIT: "implicit TLS",
        TLSMode.STARTTLS: "STARTTLS",
        TLSMode.INSECURE_PLAINTEXT: "no TLS",
    }[mode]


@dataclass(frozen=True)
class PortAttempt:
    """One connection attempt: the port, its TLS mode, how it ended and the error text."""

    port: int
    tls: TLSMode
    outcome: Outcome
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def may_fall_back(self) -> bool:
        """Does this failure let the next port be tried (see the module docstring)?"""
        return self.outcome in FALLBACK_OUTCOMES

    def __str__(self) -> str:
        head = f"port {self.port} ({describe_mode(self.tls)})"
        if self.ok:
            return f"{head}: ok"
        return (
            f"{head}: {self.outcome}: {self.detail}" if self.detail else f"{head}: {self.outcome}"
        )


def order_candidates(
    candidates: Sequence[tuple[int, TLSMode]], remembered: tuple[int, TLSMode] | None
) -> tuple[tuple[int, TLSMode], ...]:
    """``candidates`` with ``remembered`` moved to the front, if it is one of them.

    A remembered pair that is not a candidate is ignored: the memory can reorder the
    configured ports, never add one (so a tampered file cannot bring in port 25 or plaintext).
    """
    ordered = tuple(candidates)
    if remembered is not None and remembered in ordered:
        return (remembered, *(c for c in ordered if c != remembered))
    return ordered


class HostMemory:
    """What worked per host: a small JSON file, read when asked and replaced atomically.

    Format: ``{"version": 1, "hosts": {"smtp.example.org": {"port": 587, "tls":
    "starttls", "updated": "2025-01-31T12:00:00Z"}}}``. A missing or unreadable file means
    nothing is remembered; a failure to write is logged, never raised (remembering only saves
    time). Concurrent writers: the last one wins, and the file is never half-written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable host memory %s: %s", self.path, exc)
            return {}
        hosts = data.get("hosts") if isinstance(data, dict) else None
        return hosts if isinstance(hosts, dict) else {}

    @staticmethod
    def _key(host: str) -> str:
        return host.strip().rstrip(".").lower()

    def recall(self, host: str) -> tuple[int, TLSMode] | None:
        """The (port, TLS mode) that last worked for ``host``, if remembered and well-formed."""
        entry = self._load().get(self._key(host))
        if not isinstance(entry, dict):
            return None
        port, tls = entry.get("port"), entry.get("tls")
        if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(tls, str):
            return None
        try:
            mode = TLSMode(tls)
        except ValueError:
            return None
        return port, mode

    def remember(self, host: str, port: int, tls: TLSMode) -> None:
        """Record that ``port`` with ``tls`` worked for ``host`` (only writes on a change)."""
        key = self._key(host)
        with self._lock:
            hosts = self._load()
            old = hosts.get(key)
            if isinstance(old, dict) and old.get("port") == port and old.get("tls") == tls.value:
                return
            hosts[key] = {
                "port": port,
                "tls": tls.value,
                "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            try:
                self._write({"version": _FILE_VERSION, "hosts": hosts})
            except OSError as exc:
                log.warning("cannot remember the port for %s in %s: %s", host, self.path, exc)

    def forget(self, host: str) -> None:
        """Drop what is remembered for ``host``."""
        key = self._key(host)
        with self._lock:
            hosts = self._load()
            if hosts.pop(key, None) is None:
                return
            try:
                self._write({"version": _FILE_VERSION, "hosts": hosts})
            except OSError as exc:
                log.warning("cannot update %s: %s", self.path, exc)

    def _write(self, data: dict[str, Any]) -> None:
        """Write to a temporary file in the same directory, then rename it over the old one
        (atomic on POSIX), so readers see the old file or the new one, never a torn one."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
