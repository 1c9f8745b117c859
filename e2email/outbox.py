"""The durable outbox: protected copies waiting for the server to accept them, in SQLite.

A copy is stored *before* the first byte goes to the server and removed only when the server
has accepted it for every recipient, in one transaction each, so a crash or ``kill -9`` at any
moment loses nothing: what was not confirmed is still here and is sent again by the next run.

Except what may have arrived already: just before the end of a copy's data (the final ".")
goes to the server, the copy is marked in flight (``maybe_since``, durably). A copy whose
outcome was then never recorded (its 250 reply lost, a timeout, a drop, Ctrl-C, a crash, a
failed write of the outcome) is :attr:`ItemState.MAYBE_DELIVERED`: RFC 5321 §6.1 leaves the
client unable to know, and sending it again by itself would deliver a second copy whenever
the server had it. It stays here, shown as such, until the user resends it
(``claim(maybe_delivered=True)``, ``e2email outbox retry --maybe-delivered``) or drops it.

Only protected bytes are stored (when encrypting: ciphertext), with their envelope, so the
outbox holds no plaintext of an encrypted message. The file is created 0600 in a 0700 directory
(whatever the umask, :mod:`e2email.private`), and one that another user owns or that group or
others may write is refused; SQLite gives its ``-wal`` and ``-shm`` files the same mode.

Layout (``PRAGMA user_version`` 4; older files are upgraded in place, see :func:`_migrate`):

* ``items``: one row per protected copy: the exact bytes (up to 1 MiB), MAIL FROM, a JSON
  ``meta`` (kind, Message-ID, signer, the fingerprints and scheme of the keys it is encrypted
  to, re-checked before a retry), state (``queued``, ``sending`` or ``failed``), attempts,
  next-attempt time, the last error, the route (server and user) it was meant for, who has
  claimed it, ``maybe_since`` (new in version 3: in flight past its end of data) and
  ``account`` (new in version 4: the name of the configured account it was stored for, so
  ``outbox retry`` finds its server again; a name, never a secret).
* ``bodies`` (new in version 2): the bytes of larger copies (their ``items.raw`` is empty), in
  a row of their own with the blob as its last column. SQLite then writes and reads them piece
  by piece (incremental blob I/O), and an update of the item's state does not rewrite them: a
  large message is never copied whole in memory (inline, storing 36 MB took 72 MB more, and so
  did each update of the row).
* ``recipients``: one row per (copy, address): ``pending``, ``delivered`` or ``failed``, with
  the server's last reply. Only pending recipients are sent to again.
* ``ledger``: for bulk sending, a digest per row of a batch (never the row's content) and
  whether its message is queued or done, so re-running an interrupted batch sends only what is
  missing. The digests are keyed (HMAC) with a random secret kept *outside* the database, in
  ``ledger.key`` beside it (0600): the outbox alone confirms no guessed template or value.
  Once a batch is sent whole, its row entries are replaced by one entry for the batch
  (:meth:`Outbox.finish_batch`).

Two processes never send the same copy at the same time: a copy is *claimed* (state
``sending``, ``claimed_by`` the process) in an ``IMMEDIATE`` transaction before it is sent. A
claim is taken over only when its owner is gone: a process on this machine that no longer
exists (checked by PID and start time, so ``kill -9`` is noticed at once), or a claim older than
its lease.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2email.errors import ConfigError, SMTPReply
from e2email.private import check_private, ensure_private_dir, open_private, write_private
from e2email.spool import READ_CHUNK, Spool, spool_dir

__all__ = [
    "DEFAULT_FILENAME",
    "LEDGER_KEY_FILENAME",
    "LEGACY_LEDGER_KEY",
    "ItemState",
    "LedgerTaken",
    "NewItem",
    "Outbox",
    "OutboxError",
    "OutboxItem",
    "OutboxRecipient",
    "RecipientState",
    "same_route",
]

#: The outbox's file name in e2email's home directory.
DEFAULT_FILENAME = "outbox.sqlite3"
#: The secret that keys the ledger's digests, beside the outbox but not in it.
LEDGER_KEY_FILENAME = "ledger.key"
_LEDGER_KEY_SIZE = 32

_SCHEMA_VERSION = 4

#: How long a claim holds when its owner cannot be checked (another machine sharing the home).
_DEFAULT_LEASE = 15 * 60.0

#: Ledger entries of finished batch rows are kept this long, so re-running a batch within it
#: does not send a row twice.
_LEDGER_DAYS = 30

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id            TEXT PRIMARY KEY,
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'failed')),
    raw           BLOB NOT NULL,
    mail_from     TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    meta          TEXT NOT NULL,
    route         TEXT,
    ledger_key    TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL,
    last_error    TEXT,
    claimed_by    TEXT,
    claimed_until REAL,
    maybe_since   REAL,
    account       TEXT
);
CREATE INDEX IF NOT EXISTS items_ledger ON items (ledger_key);
CREATE TABLE IF NOT EXISTS bodies (
    item_id TEXT PRIMARY KEY REFERENCES items (id) ON DELETE CASCADE,
    raw     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    item_id    TEXT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    address    TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    reply_code INTEGER,
    reply_text TEXT,
    PRIMARY KEY (item_id, address)
);
CREATE TABLE IF NOT EXISTS ledger (
    key     TEXT PRIMARY KEY,
    batch   TEXT NOT NULL,
    state   TEXT NOT NULL CHECK (state IN ('queued', 'done')),
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_key (
    checksum TEXT NOT NULL
);
"""


# length() of a blob reads only its record header (SQLite does not load the blob for it).
_COLUMNS = (
    "id, state, mail_from, message_id, kind, attempts, created, next_attempt, last_error, route,"
    " ledger_key, length(raw) + ifnull((SELECT length(b.raw) FROM bodies b"
    " WHERE b.item_id = items.id), 0), meta, claimed_by, maybe_since, claimed_until, account"
)
_SELECT = f"SELECT {_COLUMNS} FROM items WHERE id = ?"  # noqa: S608 - constants only
_SELECT_WITH_RAW = (
    f"SELECT {_COLUMNS}, raw, (SELECT b.rowid FROM bodies b WHERE b.item_id = items.id)"  # noqa: S608
    " FROM items WHERE id = ?"
)

#: Copies up to this size are stored inline (``items.raw``): one INSERT, the cheapest for the
#: usual message. Larger ones go to ``bodies`` (see the layout above).
_INLINE_MAX = 1 << 20
#: Bodies are written through SQLite's incremental blob I/O this many bytes at a time.
_BLOB_CHUNK = 1 << 20


def _inline(data: bytes | Spool) -> bytes:
    """What ``items.raw`` holds of a copy: the copy when small, else nothing (see bodies)."""
    if len(data) > _INLINE_MAX:
        return b""
    return data if isinstance(data, bytes) else data.getvalue()


def _write_body(db: sqlite3.Connection, item_id: str, data: bytes | Spool) -> None:
    """Store ``data`` as the body of ``item_id``: a zeroblob (SQLite does not materialise it in
    the last column) filled piece by piece; a spooled copy is read a piece at a time, so
    storing it never holds it whole."""
    cursor = db.execute(
        "INSERT INTO bodies (item_id, raw) VALUES (?, zeroblob(?))", (item_id, len(data))
    )
    assert cursor.lastrowid is not None
    with db.blobopen("bodies", "raw", cursor.lastrowid) as blob:
        if isinstance(data, Spool):
            for piece in data.chunks():  # read from its file: smaller pieces cost nothing
                blob.write(piece)
            return
        view = memoryview(data)
        for start in range(0, len(view), _BLOB_CHUNK):
            blob.write(view[start : start + _BLOB_CHUNK])


class OutboxError(ConfigError):
    """The outbox file cannot be opened, read or written, or an item ID is unknown. A
    ConfigError: something about the local setup (permissions, disk), not the message."""


class LedgerTaken(OutboxError):
    """:meth:`Outbox.add` with a ``ledger`` key that another run (or another task of this one)
    has already stored or sent: nothing was stored. ``state`` is the ledger's ``"queued"`` or
    ``"done"``."""

    def __init__(self, key: str, state: str) -> None:
        super().__init__(f"batch row {key[:16]} is already {state} in the outbox's ledger")
        self.key = key
        self.state = state


class ItemState(enum.Enum):
    #: Waiting for a run to send it (after a transient failure, or never tried).
    QUEUED = "queued"
    #: Claimed by a running process that is sending it now (or waiting to retry it).
    SENDING = "sending"
    #: The server refused it permanently for every recipient not yet delivered (5xx); kept
    #: until the user retries or drops it.
    FAILED = "failed"
    #: Interrupted after the end of its data was sent (a lost or late reply to the final
    #: ".", a dropped connection, a crash, Ctrl-C, or the acceptance could not be recorded):
    #: the server may have it already, so it is not sent again unless asked for
    #: (``claim(maybe_delivered=True)``, ``e2email outbox retry --maybe-delivered``).
    #: Never stored as such: an item with ``maybe_since`` set that no live process is sending.
    MAYBE_DELIVERED = "maybe-delivered"


class RecipientState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class OutboxRecipient:
    address: str
    state: RecipientState
    #: The server's last reply about this recipient (a refusal, or DATA's 250).
    reply: SMTPReply | None = None


@dataclass(frozen=True)
class NewItem:
    """A protected copy to store: the exact bytes (or the spool of a large copy, stored a
    piece at a time) and the envelope."""

    raw: bytes | Spool
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    kind: str = "main"
    #: JSON-serialisable details kept with the copy (signer, key fingerprints, ...).
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutboxItem:
    """A stored copy. Its bytes are loaded only by the calls that send (``claim``, ``get``):
    :attr:`content` is ``bytes`` for the usual copy and, for a large one, a
    :class:`~e2email.spool.Spool` it was copied into piece by piece (an unnamed private file
    beside the outbox), which DATA reads a piece at a time; :attr:`raw` gives ``bytes``
    either way."""

    id: str
    state: ItemState
    mail_from: str
    message_id: str
    kind: str
    recipients: tuple[OutboxRecipient, ...]
    attempts: int
    created: float
    next_attempt: float
    last_error: str | None
    route: str | None
    ledger_key: str | None
    size: int
    meta: Mapping[str, Any]
    claimed_by: str | None = None
    content: bytes | Spool | None = field(default=None, repr=False)
    #: When the end of its data was (about to be) sent in the attempt whose result is not
    #: known; ``None`` when no such attempt is outstanding. See ItemState.MAYBE_DELIVERED.
    maybe_since: float | None = None
    #: The configured account (``[accounts.NAME]``) it was stored for; None: stored without
    #: one (server options on the command line, or an outbox older than schema 4).
    account: str | None = None

    @property
    def raw(self) -> bytes | None:
        """The exact bytes, whole (a large copy is read from its spool for this), or None
        when they were not loaded."""
        data = self.content
        return data if data is None or isinstance(data, bytes) else data.getvalue()

    @property
    def pending(self) -> tuple[str, ...]:
        """The recipients still to deliver to."""
        return tuple(r.address for r in self.recipients if r.state is RecipientState.PENDING)

    @property
    def failed(self) -> tuple[OutboxRecipient, ...]:
        return tuple(r for r in self.recipients if r.state is RecipientState.FAILED)

    @property
    def delivered(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.state is RecipientState.DELIVERED)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc (Linux),
    or None when unknown. With the PID, the start time names a process uniquely, even after
    the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) <= 19:
        return None
    return fields[0].decode(), fields[19].decode()


def _this_process() -> str:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{socket.gethostname()}:{pid}:{stat[1] if stat else ''}"


def _owner_alive(owner: str) -> bool | None:
    """Is the process that made claim ``owner`` still running? ``None`` when it ran on another
    machine and cannot be checked."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the PID exists, trust it
    state, started = stat
    # "Z": killed, not yet reaped by its parent; another start time: the PID was reused.
    return state not in ("Z", "X") and (not start or started == start)


#: ``items.ledger_key`` of the copies of a batch stored by e2email before schema 3, whose
#: ledger held unkeyed digests (see :func:`_migrate`).
LEGACY_LEDGER_KEY = "legacy"


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring an outbox of schema ``version`` up to the current one, in the caller's
    transaction; queued items are kept as they are.

    Version 4: items get ``account`` (NULL for those stored before).

    Version 3: items get ``maybe_since``. The ledger of earlier versions holds unkeyed SHA-256
    digests of batch texts and row values (a plaintext oracle), which must not be taken for
    the keyed ones now used: its rows are deleted, and the copies of an unfinished batch stay
    queued but lose their digest (their ``ledger_key`` becomes :data:`LEGACY_LEDGER_KEY`):
    ``outbox retry`` sends them, and a batch run refuses to start while they wait, since it
    could not tell their rows from unsent ones.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    if "maybe_since" not in columns:
        db.execute("ALTER TABLE items ADD COLUMN maybe_since REAL")
    if "account" not in columns:
        # Version 4: the account an item was stored for. Existing items keep their route.
        db.execute("ALTER TABLE items ADD COLUMN account TEXT")
    if version < 3:
        db.execute("DELETE FROM ledger")
        db.execute(
            "UPDATE items SET ledger_key = ? WHERE ledger_key IS NOT NULL", (LEGACY_LEDGER_KEY,)
        )


def same_route(stored: str | None, route: str) -> bool:
    """Is a copy stored for route ``stored`` (``user@host`` or ``host``) meant for ``route``?
    Host names compare case-insensitively (RFC 5321 §2.4; DNS names are), and so does the
    user name here, as submission servers treat it. A copy without a route fits any."""
    return stored is None or stored.casefold() == route.casefold()


def _reply_of(code: int | None, text: str | None) -> SMTPReply | None:
    return None if code is None else SMTPReply(code, text or "")


class Outbox:
    """The outbox in SQLite file ``path`` (created if missing).

    Thread-safe (one connection, used under a lock); every method is blocking and short, so
    async callers run them with ``asyncio.to_thread``. Several processes may use the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = _DEFAULT_LEASE,
        account: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.lease = lease
        #: The account name recorded with each item stored (see :meth:`add`); None: none.
        self.account = account
        self.owner = _this_process()
        self._lock = threading.RLock()
        self._db = self._open()

    @classmethod
    def in_home(cls, home: str | os.PathLike[str]) -> Outbox:
        """The outbox in e2email's home directory: ``HOME/outbox.sqlite3``."""
        return cls(Path(home) / DEFAULT_FILENAME)

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # Whoever may write the folder or the file can swap or add a queued message (and read
        # envelopes): like ssh with ~/.ssh, refuse a loose or foreign one (InsecurePathError).
        ensure_private_dir(self.path.parent, what="the outbox folder")
        for companion in (self.path, *(Path(f"{self.path}{s}") for s in ("-wal", "-shm"))):
            if companion.exists():
                check_private(companion, what="the outbox")
        if not self.path.exists():
            # Created here 0600 whatever the umask: SQLite would use 0644 (less the umask),
            # and it gives the -wal and -shm files the mode of the database file.
            open_private(self.path, "ab").close()
        try:
            db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
        try:
            # Free pages go back to the file system (by incremental_vacuum below), so a large
            # message once sent does not keep the file large. Takes effect only for a new file.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            # WAL: readers (``outbox list``) never block the sender, and a commit is one append.
            # synchronous=FULL: a committed "stored" survives a power cut, not only a crash.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise OutboxError(
                    f"the outbox {self.path} was made by a newer e2email (schema {version})"
                )
            with self._transaction(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                # Read again inside the write lock: another process may have upgraded it.
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if 0 < version < _SCHEMA_VERSION:
                    _migrate(db, version)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                db.execute(
                    "DELETE FROM ledger WHERE state = 'done' AND updated < ?",
                    (time.time() - _LEDGER_DAYS * 86400,),
                )
            # executescript steps the pragma to the end (execute() frees only one page).
            db.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            db.close()
            raise OutboxError(f"cannot use the outbox {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock at once, so two processes claiming items are
        # serialised instead of both reading the same free item.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._transaction(self._db) as db:
                    yield db
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- storing ---------------------------------------------------------------------------

    def add(
        self,
        items: Sequence[NewItem],
        *,
        route: str | None = None,
        claim: bool = True,
        ledger: tuple[str, str] | None = None,
        account: str | None = None,
    ) -> tuple[str, ...]:
        """Store ``items`` in one transaction and return their IDs.

        With ``claim`` (the default) they are stored already claimed by this process, which is
        about to send them. ``ledger`` is ``(batch, key)``: the items are recorded as that batch
        row's message, in the same transaction, so a rerun knows the row is taken care of;
        when the ledger already has that key (done, or with items stored) nothing is stored
        and :class:`LedgerTaken` is raised. ``account`` (default: :attr:`account`) is the
        configured account they are meant for, recorded with them.
        """
        account = account if account is not None else self.account
        now = time.time()
        ids: list[str] = []
        with self._write() as db:
            if ledger is not None:
                # Check and store in this one IMMEDIATE transaction: two runs of the same batch
                # (or two equal rows) cannot both see the key free and both send the row.
                taken = db.execute(
                    "SELECT state FROM ledger WHERE key = ?", (ledger[1],)
                ).fetchone()
                if taken is not None:
                    stored = db.execute(
                        "SELECT 1 FROM items WHERE ledger_key = ? LIMIT 1", (ledger[1],)
                    ).fetchone()
                    # A "queued" entry whose items are all gone is stale: store anew.
                    if taken[0] == "done" or stored is not None:
                        raise LedgerTaken(ledger[1], str(taken[0]))
            for item in items:
                if not item.recipients:
                    raise ConfigError("an outbox item needs at least one recipient")
                item_id = self._new_id(db)
                db.execute(
                    "INSERT INTO items (id, created, updated, state, raw, mail_from, message_id,"
                    " kind, meta, route, ledger_key, next_attempt, claimed_by, claimed_until,"
                    " account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item_id,
                        now,
                        now,
                        "sending" if claim else "queued",
                        _inline(item.raw),
                        item.mail_from,
                        item.message_id,
                        item.kind,
                        json.dumps(dict(item.meta), sort_keys=True),
                        route,
                        ledger[1] if ledger else None,
                        now,
                        self.owner if claim else None,
                        now + self.lease if claim else None,
                        account,
                    ),
                )
                db.executemany(
                    "INSERT INTO recipients (item_id, position, address, state)"
                    " VALUES (?, ?, ?, 'pending')",
                    [(item_id, n, a) for n, a in enumerate(dict.fromkeys(item.recipients))],
                )
                if len(item.raw) > _INLINE_MAX:
                    _write_body(db, item_id, item.raw)
                ids.append(item_id)
            if ledger is not None:
                db.execute(
                    "INSERT INTO ledger (key, batch, state, updated) VALUES (?, ?, 'queued', ?)"
                    " ON CONFLICT (key) DO UPDATE SET state = 'queued', updated = excluded.updated",
                    (ledger[1], ledger[0], now),
                )
        return tuple(ids)

    @staticmethod
    def _new_id(db: sqlite3.Connection) -> str:
        while True:
            # 48 random bits: short enough to type in `e2email outbox drop ID`.
            item_id = secrets.token_hex(6)
            if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                return item_id

    # -- claiming --------------------------------------------------------------------------

    def _claimable(self, state: str, claimed_by: str | None, claimed_until: float | None) -> bool:
        if state != "sending" or claimed_by is None:
            return True
        if claimed_by == self.owner:
            return False  # ours: another task of this process is on it
        alive = _owner_alive(claimed_by)
        if alive is None:
            return (claimed_until or 0.0) < time.time()
        return not alive

    def claim(
        self,
        ids: Iterable[str] | None = None,
        *,
        route: str | None = None,
        ledger_keys: Iterable[str] | None = None,
        include_failed: bool = True,
        due_only: bool = False,
        limit: int | None = None,
        maybe_delivered: bool = False,
    ) -> tuple[OutboxItem, ...]:
        """Claim items for sending (with their bytes) and return them, oldest first.

        ``ids`` (full IDs or unique prefixes) selects items; otherwise every item, or those for
        ``route``, or those of the given ``ledger_keys``. Items another live process has
        claimed are skipped. ``include_failed`` also takes items the server refused, resetting
        their refused recipients to pending; ``due_only`` only items whose retry time passed.
        Items that may have been delivered already (:attr:`ItemState.MAYBE_DELIVERED`, also
        one a crashed process left in flight) are left alone unless ``maybe_delivered``:
        sending them again may deliver a second copy.
        """
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                "SELECT id, state, claimed_by, claimed_until, route, ledger_key, next_attempt,"
                " maybe_since FROM items ORDER BY created, rowid"
            ).fetchall()
            wanted: set[str] | None = None
            if ids is not None:
                wanted = {self._resolve_id(db, i) for i in ids}
            keys = set(ledger_keys) if ledger_keys is not None else None
            chosen: list[str] = []
            for item_id, state, by, until, item_route, key, next_attempt, maybe in rows:
                if wanted is not None and item_id not in wanted:
                    continue
                if wanted is None and route is not None and not same_route(item_route, route):
                    continue
                if keys is not None and key not in keys:
                    continue
                if state == "failed" and not include_failed:
                    continue
                if due_only and next_attempt > now:
                    continue
                if not self._claimable(state, by, until):
                    continue
                if maybe is not None and not maybe_delivered:
                    continue
                chosen.append(item_id)
                if limit is not None and len(chosen) >= limit:
                    break
            for item_id in chosen:
                # A maybe-delivered item claimed on request is an ordinary one again: the next
                # attempt marks it anew just before its end of data (mark_in_flight).
                db.execute(
                    "UPDATE items SET state = 'sending', claimed_by = ?, claimed_until = ?,"
                    " updated = ?, maybe_since = NULL WHERE id = ?",
                    (self.owner, now + self.lease, now, item_id),
                )
                if include_failed:
                    db.execute(
                        "UPDATE recipients SET state = 'pending'"
                        " WHERE item_id = ? AND state = 'failed'",
                        (item_id,),
                    )
            return tuple(self._load(db, i, raw=True) for i in chosen)

    def _resolve_id(self, db: sqlite3.Connection, prefix: str) -> str:
        prefix = prefix.strip().lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise OutboxError(f"{prefix!r} is not an outbox item ID")
        found = [
            r[0]
            for r in db.execute(
                "SELECT id FROM items WHERE substr(id, 1, ?) = ?", (len(prefix), prefix)
            )
        ]
        if not found:
            raise OutboxError(f"no item {prefix} in the outbox")
        if len(found) > 1:
            raise OutboxError(f"{prefix} matches {len(found)} items: give more of the ID")
        return str(found[0])

    # -- recording outcomes ----------------------------------------------------------------

    def settle(
        self,
        item_id: str,
        *,
        delivered: Mapping[str, SMTPReply | None] | None = None,
        failed: Mapping[str, SMTPReply | None] | None = None,
        pending: Mapping[str, SMTPReply | None] | None = None,
        error: str | None = None,
        attempted: bool = True,
        retry_at: float | None = None,
        release: bool = False,
        maybe_delivered: bool | None = None,
        synced: bool = True,
    ) -> bool:
        """Record what one attempt did, in one transaction; True if the item is gone.

        ``delivered`` and ``failed`` (permanently refused) recipients are marked so, with the
        server's reply; ``pending`` ones get their latest reply. When no recipient is pending or
        failed any more the item is deleted (and its ledger row marked done): this is the only
        way an item leaves the outbox besides :meth:`drop`. Otherwise it stays claimed, or with
        ``release`` goes back to ``queued`` (or ``failed`` when nothing is pending).

        ``maybe_delivered``: True when the attempt was interrupted after the end of data (the
        item is released, :attr:`ItemState.MAYBE_DELIVERED`); False when its outcome is known
        (the in-flight mark of :meth:`mark_in_flight` is cleared); None leaves the mark as it
        is (a release without an attempt).

        ``synced=False`` commits without waiting for the disk to confirm it: the delivery
        engine records each attempt's outcome so, one fsync per message fewer.

        Why that keeps every promise: the commit is in SQLite's write-ahead log, in the
        operating system's hands, before this returns, so a crash or ``kill -9`` of this
        process cannot lose it; only a power cut or an OS crash can, and then only until the
        next durable commit (the next store or in-flight mark, which syncs the log up to and
        including this), a checkpoint, or the close of the file. What a lost outcome leaves
        behind is the item as the durable state before it said: a copy whose end of data was
        (about to be) sent is in flight, so :attr:`ItemState.MAYBE_DELIVERED`, never sent
        again by itself; any other is queued and claimed by a process that is gone, so sent
        again, which is right since the server does not have it. Nothing is lost, nothing is
        sent twice; at worst a delivered copy is shown as maybe delivered after a power cut,
        as it would have been had the cut come a moment earlier. Storing a copy and marking
        it in flight stay synchronous (``synchronous=FULL``).
        """
        now = time.time()
        with contextlib.nullcontext() if synced else self._unsynced(), self._write() as db:
            row = db.execute("SELECT ledger_key FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return True
            for state, replies in (("delivered", delivered), ("failed", failed)):
                for address, reply in (replies or {}).items():
                    db.execute(
                        "UPDATE recipients SET state = ?, reply_code = ?, reply_text = ?"
                        " WHERE item_id = ? AND address = ?",
                        (
                            state,
                            reply.code if reply else None,
                            reply.text if reply else None,
                            item_id,
                            address,
                        ),
                    )
            for address, reply in (pending or {}).items():
                if reply is not None:
                    db.execute(
                        "UPDATE recipients SET reply_code = ?, reply_text = ?"
                        " WHERE item_id = ? AND address = ? AND state = 'pending'",
                        (reply.code, reply.text, item_id, address),
                    )
            counts = dict(
                db.execute(
                    "SELECT state, count(*) FROM recipients WHERE item_id = ? GROUP BY state",
                    (item_id,),
                ).fetchall()
            )
            if not counts.get("pending") and not counts.get("failed"):
                db.execute("DELETE FROM items WHERE id = ?", (item_id,))
                key = row[0]
                if key is not None:
                    left = db.execute(
                        "SELECT 1 FROM items WHERE ledger_key = ? LIMIT 1", (key,)
                    ).fetchone()
                    if left is None:
                        db.execute(
                            "UPDATE ledger SET state = 'done', updated = ? WHERE key = ?",
                            (now, key),
                        )
                return True
            sets = ["updated = ?"]
            params: list[Any] = [now]
            if attempted:
                sets.append("attempts = attempts + 1")
            if error is not None:
                sets.append("last_error = ?")
                params.append(error)
            if retry_at is not None:
                sets.append("next_attempt = ?")
                params.append(retry_at)
            if maybe_delivered:
                sets.append("maybe_since = ifnull(maybe_since, ?)")
                params.append(now)
                release = True
            elif maybe_delivered is not None:
                sets.append("maybe_since = NULL")
            if release or not counts.get("pending"):
                state = "queued" if counts.get("pending") else "failed"
                sets.append("state = ?, claimed_by = NULL, claimed_until = NULL")
                params.append(state)
            else:
                sets.append("claimed_until = ?")
                params.append(max(now, retry_at or now) + self.lease)
            db.execute(f"UPDATE items SET {', '.join(sets)} WHERE id = ?", (*params, item_id))  # noqa: S608
            return False

    def mark_in_flight(self, item_id: str) -> None:
        """Record, durably, that the end of ``item_id``'s data is about to be sent: from now on
        the server may have it. Cleared by :meth:`settle` once the outcome is known; if the
        process dies (or cannot record the outcome) first, the item is found
        :attr:`ItemState.MAYBE_DELIVERED`, never sent again by itself."""
        with self._write() as db:
            db.execute("UPDATE items SET maybe_since = ? WHERE id = ?", (time.time(), item_id))

    def release(self, ids: Iterable[str], *, error: str | None = None) -> None:
        """Give claimed items back (state ``queued``, or ``failed`` if nothing is pending)
        without counting an attempt: e.g. when a run stops before trying them."""
        for item_id in ids:
            self.settle(item_id, error=error, attempted=False, release=True)

    # -- reading and dropping --------------------------------------------------------------

    def _load(self, db: sqlite3.Connection, item_id: str, *, raw: bool) -> OutboxItem:
        row = db.execute(_SELECT_WITH_RAW if raw else _SELECT, (item_id,)).fetchone()
        if row is None:
            raise OutboxError(f"no item {item_id} in the outbox")
        rcpts = tuple(
            OutboxRecipient(address=a, state=RecipientState(s), reply=_reply_of(c, t))
            for a, s, c, t in db.execute(
                "SELECT address, state, reply_code, reply_text FROM recipients"
                " WHERE item_id = ? ORDER BY position",
                (item_id,),
            )
        )
        state = ItemState(row[1])
        maybe_since = row[14]
        if maybe_since is not None and (
            state is not ItemState.SENDING or self._claimable(row[1], row[13], row[15])
        ):
            # In flight when its sender died, or released after an interrupted end of data.
            state = ItemState.MAYBE_DELIVERED
        return OutboxItem(
            id=row[0],
            state=state,
            mail_from=row[2],
            message_id=row[3],
            kind=row[4],
            recipients=rcpts,
            attempts=row[5],
            created=row[6],
            next_attempt=row[7],
            last_error=row[8],
            route=row[9],
            ledger_key=row[10],
            size=row[11],
            meta=json.loads(row[12]),
            claimed_by=row[13],
            content=(
                (bytes(row[17]) if row[18] is None else self._spool_body(db, row[18]))
                if raw
                else None
            ),
            maybe_since=maybe_since,
            account=row[16],
        )

    def _spool_body(self, db: sqlite3.Connection, rowid: int) -> Spool:
        """The large body in ``bodies`` row ``rowid``, copied a piece at a time into a spool
        beside the outbox (never whole in memory: a retried 47 MB copy costs pieces)."""
        spool = Spool(spool_dir(self.path.parent), memory_max=0)  # large: straight to a file
        try:
            with db.blobopen("bodies", "raw", rowid, readonly=True) as blob:
                while piece := blob.read(READ_CHUNK):
                    spool.write(piece)
        except BaseException:
            spool.close()
            raise
        return spool

    def get(self, item_id: str, *, raw: bool = True) -> OutboxItem:
        """One item (by ID or unique prefix), with its bytes unless ``raw=False``."""
        with self._read() as db:
            return self._load(db, self._resolve_id(db, item_id), raw=raw)

    def items(self, *, ledger_key: str | None = None) -> tuple[OutboxItem, ...]:
        """Every item (or those of one batch row), oldest first, without the bytes."""
        with self._read() as db:
            if ledger_key is None:
                cursor = db.execute("SELECT id FROM items ORDER BY created, rowid")
            else:
                cursor = db.execute(
                    "SELECT id FROM items WHERE ledger_key = ? ORDER BY created, rowid",
                    (ledger_key,),
                )
            ids = [r[0] for r in cursor]
            return tuple(self._load(db, i, raw=False) for i in ids)

    def __len__(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM items").fetchone()[0])

    def drop(self, item_id: str) -> OutboxItem:
        """Delete an item (by ID or unique prefix) unsent; returns what was dropped. An item
        another live process is sending right now cannot be dropped."""
        with self._write() as db:
            full = self._resolve_id(db, item_id)
            item = self._load(db, full, raw=False)
            if (
                item.state is ItemState.SENDING
                and item.claimed_by != self.owner
                and not self._claimable("sending", item.claimed_by, None)
            ):
                raise OutboxError(f"item {full} is being sent by {item.claimed_by} right now")
            db.execute("DELETE FROM items WHERE id = ?", (full,))
            if item.ledger_key is not None:
                # Dropped means "do not send": a rerun of its batch must not send it again.
                db.execute(
                    "UPDATE ledger SET state = 'done', updated = ? WHERE key = ?",
                    (time.time(), item.ledger_key),
                )
            return item

    # -- the batch ledger ------------------------------------------------------------------

    def ledger_secret(self) -> bytes:
        """The 32-byte secret that keys the ledger's digests (:func:`e2email.bulk.row_key`):
        the file ``ledger.key`` beside the outbox, created 0600 on first use. It is kept out
        of the database, so a copy of the outbox alone (a backup, a stolen disk image of the
        file) cannot confirm a guessed batch text or row value. Losing it only makes the
        ledger forget which rows were sent."""
        path = self.path.parent / LEDGER_KEY_FILENAME
        try:
            if not path.exists():
                # Written whole under a private name, then linked in place: a concurrent run
                # either wins the link or reads the winner's key, never half a file.
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
                write_private(tmp, secrets.token_bytes(_LEDGER_KEY_SIZE))
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink(missing_ok=True)
            check_private(path, what="the batch ledger key")
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)  # a secret: readable by us alone (checked ours above)
            data = path.read_bytes()
        except OSError as exc:
            raise OutboxError(f"cannot use the batch ledger key {path}: {exc}") from exc
        if len(data) != _LEDGER_KEY_SIZE:
            raise OutboxError(
                f"the batch ledger key {path} is damaged ({len(data)} bytes, not "
                f"{_LEDGER_KEY_SIZE}); move it away to start a new ledger (a rerun of an "
                "unfinished batch then sends every row again)"
            )
        self._check_ledger_key(data, path)
        return data

    def _check_ledger_key(self, secret: bytes, path: Path) -> None:
        """The ledger remembers (as a keyed checksum, never the key) which key made it: with
        another key (``ledger.key`` lost, or the outbox copied without it) no entry would
        match, and a rerun of an unfinished batch would send its sent rows again."""
        checksum = hmac.new(secret, b"e2email batch ledger key", hashlib.sha256).hexdigest()
        with self._write() as db:
            row = db.execute("SELECT checksum FROM ledger_key").fetchone()
            if row is not None and row[0] == checksum:
                return
            if row is not None and db.execute("SELECT 1 FROM ledger LIMIT 1").fetchone():
                raise OutboxError(
                    f"the batch ledger key {path} is not the one this outbox's ledger was made "
                    "with (lost or replaced?): reruns could not tell the rows already sent. "
                    "Put the right one back, or run `e2email outbox forget-batches` to start "
                    "a new ledger (a rerun of an unfinished batch then sends every row again)"
                )
            db.execute("DELETE FROM ledger_key")
            db.execute("INSERT INTO ledger_key (checksum) VALUES (?)", (checksum,))

    def forget_batches(self) -> int:
        """Forget every batch: the ledger's entries (and which key made them) are deleted,
        queued copies stay. Returns how many entries there were."""
        with self._write() as db:
            count = int(db.execute("SELECT count(*) FROM ledger").fetchone()[0])
            db.execute("DELETE FROM ledger")
            db.execute("DELETE FROM ledger_key")
            return count

    def finish_batch(self, batch: str, completion: str) -> bool:
        """Batch ``batch`` was sent whole: replace its per-row ledger entries with the one
        entry ``completion`` (see :func:`e2email.bulk.completion_key`), in one transaction.
        False (nothing changed) while a row of it is still queued or stored."""
        with self._write() as db:
            busy = db.execute(
                "SELECT 1 FROM ledger WHERE batch = ? AND (state = 'queued' OR key IN"
                " (SELECT ledger_key FROM items WHERE ledger_key IS NOT NULL)) LIMIT 1",
                (batch,),
            ).fetchone()
            if busy is not None:
                return False
            db.execute("DELETE FROM ledger WHERE batch = ?", (batch,))
            db.execute(
                "INSERT INTO ledger (key, batch, state, updated) VALUES (?, ?, 'done', ?)"
                " ON CONFLICT (key) DO UPDATE SET state = 'done', updated = excluded.updated",
                (completion, batch, time.time()),
            )
            return True

    def batch_completions(self, batch: str) -> dict[str, float]:
        """The completion entries (``complete:...`` keys, see :meth:`finish_batch`) of batch
        ``batch``, with when each was recorded."""
        with self._read() as db:
            return {
                str(key): float(updated)
                for key, updated in db.execute(
                    "SELECT key, updated FROM ledger WHERE batch = ? AND key LIKE 'complete:%'",
                    (batch,),
                )
            }

    def legacy_batch_items(self) -> tuple[str, ...]:
        """IDs of copies stored by a batch run of an e2email older than schema 3 (whose ledger
        was dropped when the outbox was upgraded, see :func:`_migrate`)."""
        with self._read() as db:
            return tuple(
                r[0]
                for r in db.execute(
                    "SELECT id FROM items WHERE ledger_key = ? ORDER BY created, rowid",
                    (LEGACY_LEDGER_KEY,),
                )
            )

    def ledger_state(self, key: str) -> str | None:
        """``"queued"``, ``"done"`` or ``None`` (never seen) for a batch row's key."""
        with self._read() as db:
            row = db.execute("SELECT state FROM ledger WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

    # -- writes that do not wait for the disk ----------------------------------------------

    @contextlib.contextmanager
    def _unsynced(self) -> Iterator[None]:
        """Commits made inside are not waited for on the disk (``synchronous=NORMAL``); the
        connection is back to ``FULL`` when it ends, or closed if that cannot be set: never
        left writing stores without syncing them."""
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc
            try:
                yield
            finally:
                try:
                    self._db.execute("PRAGMA synchronous=FULL")
                except sqlite3.Error as exc:
                    self._db.close()
                    raise OutboxError(f"outbox {self.path}: {exc}") from exc

    # -- several writes with one wait for the disk (group commit) -------------------------

    def write_group(
        self,
        ops: Sequence[GroupWrite],
        *,
        route: str | None = None,
        account: str | None = None,
    ) -> list[tuple[str, ...] | Exception | None]:
        """Several writes that must each be durable before the caller goes on (storing a
        message's copies, :meth:`add`; marking a copy in flight, :meth:`mark_in_flight`), with
        one wait for the disk for them all: a group commit. Per write its result (the IDs of
        an :class:`AddWrite`, None for a :class:`MarkWrite` or :class:`SettleWrite`) or the
        error that refused it, which leaves the others alone.

        Each write is a transaction of its own; all but the last are committed without
        waiting for the disk (``synchronous=NORMAL``), the last with it (``FULL``), and a
        synced commit in SQLite's write-ahead log makes every commit before it durable too
        (the log is synced up to its end; what a checkpoint moved out of it was synced
        then). Should the last write fail, a synced no-op update of an item written before
        does the same. So when this returns (or raises) every write in it is as durable as
        :meth:`add` and :meth:`mark_in_flight` make theirs.

        A :class:`SettleWrite` (an attempt's outcome, :meth:`settle` with ``synced=False``)
        needs no wait for the disk of its own: settles go first, unsynced, and become durable
        with the stores and marks after them; a group of settles alone waits for no disk,
        as ``settle(synced=False)`` does. (A settle and a store or mark of the same item never
        share a group: a copy is settled only after its transaction, whose mark was written
        and waited for before its end of data.)"""
        results: list[tuple[str, ...] | Exception | None] = [None] * len(ops)
        # Stable: the stores and marks keep their order (and the settles theirs).
        order = sorted(range(len(ops)), key=lambda i: not isinstance(ops[i], SettleWrite))
        durable = [i for i in order if not isinstance(ops[i], SettleWrite)]
        synced_at = durable[-1] if durable else -1
        unsynced: str | None = None  # an item written by a commit not synced yet
        with self._lock:
            try:
                for index in order:
                    op = ops[index]
                    last = index == synced_at
                    try:
                        result = self._group_write(op, route, account, sync=last)
                    except ConfigError as exc:  # OutboxError and LedgerTaken too
                        results[index] = exc
                        continue
                    except Exception as exc:
                        if not isinstance(op, SettleWrite):
                            raise
                        # An outcome that cannot be recorded is its own caller's failure,
                        # not the stores' and marks' that share its group.
                        results[index] = exc
                        continue
                    results[index] = result
                    if not isinstance(op, SettleWrite):
                        touched = result[0] if result else getattr(op, "item_id", None)
                        unsynced = None if last else (touched or unsynced)
            finally:
                if unsynced is not None:
                    with self._write() as db:
                        db.execute("UPDATE items SET updated = updated WHERE id = ?", (unsynced,))
        return results

    def _group_write(
        self, op: GroupWrite, route: str | None, account: str | None, *, sync: bool
    ) -> tuple[str, ...] | None:
        def write() -> tuple[str, ...] | None:
            if isinstance(op, MarkWrite):
                self.mark_in_flight(op.item_id)
                return None
            if isinstance(op, SettleWrite):
                # synced=True: the group's setting (NORMAL but for its last write) applies.
                self.settle(
                    op.item_id,
                    delivered=op.delivered,
                    failed=op.failed,
                    pending=op.pending,
                    error=op.error,
                    retry_at=op.retry_at,
                    release=op.release,
                    maybe_delivered=op.maybe_delivered,
                )
                return None
            return self.add(op.items, route=route, ledger=op.ledger, account=account)

        if sync:
            return write()
        with self._unsynced():
            return write()


@dataclass(frozen=True)
class AddWrite:
    """For :meth:`Outbox.write_group`: store ``items`` (claimed), as :meth:`Outbox.add`."""

    items: tuple[NewItem, ...]
    ledger: tuple[str, str] | None = None


@dataclass(frozen=True)
class MarkWrite:
    """For :meth:`Outbox.write_group`: :meth:`Outbox.mark_in_flight` of ``item_id``."""

    item_id: str


@dataclass(frozen=True)
class SettleWrite:
    """For :meth:`Outbox.write_group`: :meth:`Outbox.settle` of one attempt's outcome, with
    ``attempted=True`` and, as ``synced=False``, no wait for the disk of its own (it is
    durable once a later synced write of the group, or any later synced commit, is)."""

    item_id: str
    delivered: Mapping[str, SMTPReply | None] | None = None
    failed: Mapping[str, SMTPReply | None] | None = None
    pending: Mapping[str, SMTPReply | None] | None = None
    error: str | None = None
    retry_at: float | None = None
    release: bool = False
    maybe_delivered: bool | None = None


#: One write of a group commit (:meth:`Outbox.write_group`).
GroupWrite = AddWrite | MarkWrite | SettleWrite
