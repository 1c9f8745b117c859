"""Deliver through Celery workers: protect where the message is made, deliver anywhere.

The producer (an application with :class:`~e2email.client.AsyncMailer`, the Django backend,
``e2email send --queue celery``) protects each message as always; what goes into the broker
is only the protected copies (ciphertext when the policy encrypts), each with its envelope,
and the *name* of the account to deliver through. Never a password, a passphrase, a private
key or, for encrypted mail, the text or subject (RFC 9788 keeps the real subject inside).
Workers hold SMTP credentials (the accounts file, :mod:`e2email.accounts`), never private keys.

Start a worker with one config file (the accounts file, whose ``[celery]`` table holds the
broker; or ``E2EMAIL_CELERY_BROKER``)::

    E2EMAIL_CONFIG=/etc/e2email/config.toml celery -A e2email.celery worker -c 4

    # config.toml
    [celery]
    broker = "redis://127.0.0.1:6379/0"     # the result backend defaults to the same
    [accounts.app]
    host = "smtp.example.org"
    user = "app@example.org"
    password-env = "SMTP_PASSWORD"

Produce::

    from e2email.celery import CeleryQueue, app, send_via_celery
    queue = CeleryQueue(app)
    queued = await send_via_celery(mailer, message, queue=queue, account="app")
    queue.wait(queued)            # per-recipient states, once the workers are done

**No duplicates.** Each (Message-ID, copy, recipient) has an idempotency key in the result
backend (Redis), whose state goes ``queued -> sending -> delivered | maybe-delivered |
failed``. A worker claims a copy (a lock naming its host, boot, PID namespace and process,
whose lease it renews while it works), and marks its recipients ``sending`` *just before* the
end-of-data line is written (the SMTP connection's ``before_end`` hook, as the SQLite outbox
does), and only while the claim is still its own. So a task delivered again (a worker killed,
Redis's visibility timeout, a retry) skips what the server has, and a copy found ``sending``
whose claimer is gone was interrupted after the final "." (RFC 5321 §6.1): it is reported
``maybe-delivered`` and never resent by itself; so is a copy whose key is missing (the
producer writes ``queued`` before it publishes: a missing key was lost, and with it the
outcome). Use Redis with ``appendonly yes`` (and ``appendfsync always`` for no window at all)
so a Redis restart keeps the states, and ``maxmemory-policy noeviction`` (a worker warns).

**Retries.** Tasks are ``acks_late`` and ``reject_on_worker_lost``. A 4xx reply or a
connection fault is retried with exponential back-off (``[celery] retries``, ``retry-delay``,
``retry-max-delay``) for the recipients it concerns; a 5xx reply (and refused credentials) is
final and recorded with the server's reply. Waiting for a copy another worker holds is not
counted as an attempt. Each worker process keeps one open connection per account from task to
task (RSET between messages, replaced when the server closed it). Use the ``prefork`` (the
default) or ``solo`` pool: a process runs one task at a time on its own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

# Absolute imports: this module is e2email.celery, and these are the real Celery and redis-py.
import redis
from celery import Celery
from celery.result import AsyncResult
from celery.signals import worker_process_shutdown
from kombu.exceptions import OperationalError as KombuOperationalError

from e2email.accounts import CONFIG_ENV, Account, Config, default_config_path, load_config
from e2email.client import AsyncMailer, ProtectedCopy
from e2email.config import Protection, RetryPolicy
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    DeliveryError,
    E2EmailError,
    MessageError,
    TransportError,
)
from e2email.message import Message
from e2email.outcome import CopyOutcome
from e2email.transport.smtp import SMTPConnection, SMTPTransport

__all__ = [
    "BACKEND_ENV",
    "BROKER_ENV",
    "STATES",
    "TASK_NAME",
    "CeleryQueue",
    "CelerySettings",
    "Enqueued",
    "RecipientState",
    "app",
    "load_celery_settings",
    "make_app",
    "queue_status",
    "send_via_celery",
]

log = logging.getLogger(__name__)

BROKER_ENV = "E2EMAIL_CELERY_BROKER"
BACKEND_ENV = "E2EMAIL_CELERY_BACKEND"
TASK_NAME = "e2email.deliver"
#: The payload's format version: a worker refuses what it does not know.
_PAYLOAD_VERSION = 1

State = Literal["queued", "sending", "delivered", "maybe-delivered", "failed"]
STATES: tuple[State, ...] = ("queued", "sending", "delivered", "maybe-delivered", "failed")
_FINAL = frozenset({"delivered", "maybe-delivered", "failed"})

_STATE_PREFIX = "e2email:state:"
_CLAIM_PREFIX = "e2email:claim:"


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CelerySettings:
    """The ``[celery]`` table of the config file, with the environment over it."""

    broker: str
    #: Result backend; holds the idempotency keys, so it must be Redis.
    backend: str
    #: The Celery queue the tasks go to.
    queue: str = "e2email"
    #: Redis transport: an unacknowledged task is delivered again after this many seconds.
    visibility_timeout: float = 3600.0
    #: How long a worker's claim on a copy holds when its process cannot be checked (another
    #: host or PID namespace), renewed while the holder works: longer than one SMTP
    #: transaction can take (checked against each account's timeouts).
    claim_lease: float = 900.0
    #: How long the idempotency keys (and results) are kept.
    state_ttl: int = 7 * 24 * 3600
    #: Copies per task for a campaign (``e2email send --to-file --queue celery``).
    batch_size: int = 50
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=9, base_delay=30.0, max_delay=3600.0)
    )
    #: The accounts file the workers read (None: $E2EMAIL_CONFIG or the default).
    config: Path | None = None
    #: Seconds between the broker's sweeps that put back tasks whose visibility timeout ran
    #: out (kombu's ``unacked_restore_interval``, every sweep scanning); None: kombu's.
    restore_interval: float | None = None


_CELERY_KEYS = (
    "broker",
    "backend",
    "queue",
    "visibility-timeout",
    "claim-lease",
    "state-ttl",
    "batch-size",
    "retries",
    "retry-delay",
    "retry-max-delay",
    "restore-interval",
)


def _config_path(config: os.PathLike[str] | str | None) -> Path | None:
    if config is not None:
        return Path(config)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def load_celery_settings(
    config: os.PathLike[str] | str | None = None,
    *,
    broker: str | None = None,
    backend: str | None = None,
) -> CelerySettings:
    """Broker and delivery settings: the arguments, else ``E2EMAIL_CELERY_BROKER`` /
    ``E2EMAIL_CELERY_BACKEND``, else the config file's ``[celery]`` table (the file named by
    ``config``, ``$E2EMAIL_CONFIG`` or the default one). Raises ConfigError naming the
    mistake."""
    named = _config_path(config)
    path = named if named is not None else default_config_path()
    table: Mapping[str, Any] = {}
    if path.exists():
        # The accounts file is checked as a whole (ownership, every account) by load_config.
        load_config(path)
        with path.open("rb") as f:
            doc = tomllib.load(f)
        raw = doc.get("celery", {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: celery: must be a table ([celery])")
        table = raw
    elif named is not None:
        raise ConfigError(f"{path}: no such config file")
    unknown = sorted(k for k in table if k not in _CELERY_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: [celery] {unknown[0]}: unknown key (known: {', '.join(_CELERY_KEYS)})"
        )

    def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = table.get(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is not default and (
            not isinstance(value, kinds) or isinstance(value, bool) or value is None
        ):
            raise ConfigError(f"{path}: [celery] {key}: must be {kinds[0].__name__}")
        return value

    broker = broker or os.environ.get(BROKER_ENV) or get("broker", str, None)
    if not broker:
        raise ConfigError(
            f"no Celery broker: set {BROKER_ENV} or `broker` in the [celery] table of {path}"
        )
    backend = backend or os.environ.get(BACKEND_ENV) or get("backend", str, None) or broker
    if not backend.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"the Celery result backend must be Redis (it holds the idempotency keys), "
            f"not {backend.split(':', 1)[0]}"
        )
    retries = get("retries", int, 8)
    number = (int, float)
    try:
        retry = RetryPolicy(
            max_attempts=retries + 1,
            base_delay=float(get("retry-delay", number, 30.0)),
            max_delay=float(get("retry-max-delay", number, 3600.0)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: [celery] retries: {exc}") from exc
    settings = CelerySettings(
        broker=broker,
        backend=backend,
        queue=get("queue", str, "e2email"),
        visibility_timeout=float(get("visibility-timeout", number, 3600.0)),
        claim_lease=float(get("claim-lease", number, 900.0)),
        state_ttl=int(get("state-ttl", int, 7 * 24 * 3600)),
        batch_size=int(get("batch-size", int, 50)),
        retry=retry,
        config=path if path.exists() else None,
        restore_interval=(
            float(get("restore-interval", number, 0.0)) if "restore-interval" in table else None
        ),
    )
    if settings.batch_size < 1 or settings.claim_lease <= 0 or settings.state_ttl <= 0:
        raise ConfigError(f"{path}: [celery] batch-size, claim-lease and state-ttl must be > 0")
    if path.exists():
        _check_lease(path, settings.claim_lease)
    return settings


def _check_lease(path: Path, lease: float) -> None:
    """A claim that can run out in the middle of one SMTP transaction lets a second worker
    take the copy over and send it again: the lease must be longer than the longest
    transaction an account's timeouts allow (connect + a command + the data)."""
    for account in load_config(path).accounts.values():
        smtp = account.smtp
        longest = (
            smtp.effective_connect_timeout
            + smtp.effective_command_timeout
            + smtp.effective_data_timeout
        )
        if lease <= longest:
            raise ConfigError(
                f"{path}: [celery] claim-lease ({lease:g} s) must be longer than account "
                f"{account.name!r}'s SMTP timeouts added up ({longest:g} s: connect + "
                "command + data), or a second worker may send a copy still being sent"
            )


def _celery_conf(s: CelerySettings) -> dict[str, Any]:
    """Celery settings (lower-case names) for ``s``; ``e2email_*`` are our own."""
    transport: dict[str, Any] = {"visibility_timeout": s.visibility_timeout}
    if s.restore_interval is not None:
        transport["unacked_restore_interval"] = s.restore_interval
        transport["unacked_restore_throttle"] = 1
    return {
        "broker_url": s.broker,
        "result_backend": s.backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        "result_expires": s.state_ttl,
        "task_default_queue": s.queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Never keep a task's arguments in the result backend (they are the copies).
        "result_extended": False,
        # acks_late tasks: take one at a time, so a crash leaves at most one to redeliver.
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "e2email_settings": _settings_dict(s),
    }


def _settings_dict(s: CelerySettings) -> dict[str, Any]:
    return {
        "queue": s.queue,
        "claim_lease": s.claim_lease,
        "state_ttl": s.state_ttl,
        "batch_size": s.batch_size,
        "retries": s.retry.max_attempts - 1,
        "retry_delay": s.retry.base_delay,
        "retry_max_delay": s.retry.max_delay,
        "config": str(s.config) if s.config is not None else None,
        "backend": s.backend,
    }


@dataclass(frozen=True)
class _Conf:
    """What a task and a queue read back from ``app.conf``."""

    queue: str
    claim_lease: float
    state_ttl: int
    batch_size: int
    retry: RetryPolicy
    config: Path | None
    backend: str

    @classmethod
    def of(cls, app: Celery) -> _Conf:
        raw = app.conf.get("e2email_settings")
        if not isinstance(raw, Mapping):
            # An application's own Celery app (not made by make_app): defaults, its backend.
            raw = {**_settings_dict(_defaults_for(str(app.conf.result_backend or "")))}
        return cls(
            queue=str(raw["queue"]),
            claim_lease=float(raw["claim_lease"]),
            state_ttl=int(raw["state_ttl"]),
            batch_size=int(raw["batch_size"]),
            retry=RetryPolicy(
                max_attempts=int(raw["retries"]) + 1,
                base_delay=float(raw["retry_delay"]),
                max_delay=float(raw["retry_max_delay"]),
            ),
            config=Path(raw["config"]) if raw.get("config") else None,
            backend=str(raw["backend"]),
        )


def _defaults_for(backend: str) -> CelerySettings:
    return CelerySettings(broker="", backend=backend)


def make_app(
    *,
    broker: str | None = None,
    backend: str | None = None,
    config: os.PathLike[str] | str | None = None,
    main: str = "e2email",
) -> Celery:
    """A Celery app with e2email's delivery task. Its settings are read when first needed
    (not when this is called): ``broker``/``backend``, else the environment, else the config
    file's ``[celery]`` table (see :func:`load_celery_settings`)."""
    celery_app = Celery(main, set_as_current=False)
    celery_app.add_defaults(
        lambda: _celery_conf(load_celery_settings(config, broker=broker, backend=backend))
    )
    register_tasks(celery_app)
    return celery_app


def register_tasks(celery_app: Celery) -> None:
    """Register the delivery task on an application's own Celery app (made by make_app
    already)."""
    celery_app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,  # counted by us, per the [celery] retries setting
        ignore_result=False,
    )(_deliver_task)


# -- the idempotency keys -------------------------------------------------------------------


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def state_key(message_id: str, copy: int, recipient: str) -> str:
    """The idempotency key of one recipient of one copy of one message."""
    return _STATE_PREFIX + _digest(message_id, str(copy), recipient.lower())


def _claim_key(message_id: str, copy: int) -> str:
    return _CLAIM_PREFIX + _digest(message_id, str(copy))


@dataclass(frozen=True)
class RecipientState:
    """Where one recipient of one queued copy stands."""

    message_id: str
    copy: int
    recipient: str
    state: State | None
    #: The server's reply (DATA's 250 when delivered, the refusal when failed).
    reply: str | None = None
    error: str | None = None
    attempts: int = 0


def _decode_state(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _redis(url: str, *, patient: bool = False) -> redis.Redis:
    """A Redis client. ``patient`` (the workers): each command is tried again with back-off
    for about 30 s, riding out a Redis restart (persistence on) in the middle of a delivery,
    whose outcome must be recorded. Otherwise (producers, status) a few quick tries."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 20 if patient else 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=10,
    )


# A claim is released only by its holder, and taken over only from a holder known gone.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_TAKE_OVER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) end return false"
)
# The holder's heartbeat: the lease is extended only while the claim is still its own.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
# The "sending" mark, written only while the claim (KEYS[1]) is still the writer's (ARGV[1]):
# a worker whose claim ran out must not end the DATA another may be sending too.
# KEYS[2..] get ARGV[3..] for ARGV[2] seconds.
_MARK_IF_HELD = (
    "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
    "for i = 2, #KEYS do redis.call('set', KEYS[i], ARGV[i + 1], 'EX', ARGV[2]) end "
    "return 1"
)
# Queue again: write "queued" where there is no state, and over "failed" (a copy may be
# queued again after a permanent failure); anything else is left and its state returned.
_REQUEUE = (
    "local out = {} "
    "for i = 1, #KEYS do "
    "  local v = redis.call('get', KEYS[i]) "
    "  local state = nil "
    "  if v then "
    "    local ok, d = pcall(cjson.decode, v) "
    "    if ok and type(d) == 'table' then state = d['state'] end "
    "  end "
    "  if (not v) or state == 'failed' then "
    "    redis.call('set', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) out[i] = '' "
    "  else out[i] = tostring(state) end "
    "end return out"
)


class _ClaimLost(Exception):
    """The worker's claim on a copy ran out (another worker may hold it): the DATA is not
    ended."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


class _States:
    """The idempotency keys of one backend."""

    def __init__(self, client: redis.Redis, *, ttl: int, lease: float) -> None:
        self.client = client
        self.ttl = ttl
        self.lease_ms = max(1, int(lease * 1000))
        self._release = client.register_script(_RELEASE)
        self._take_over = client.register_script(_TAKE_OVER)
        self._renew = client.register_script(_RENEW)
        self._mark = client.register_script(_MARK_IF_HELD)
        self._requeue = client.register_script(_REQUEUE)
        self._host = socket.gethostname()
        self._token = secrets.token_hex(8)
        # A PID names a process only within one boot and one PID namespace: containers on
        # one host may share a host name (and PIDs) without seeing each other's processes.
        self._boot = _boot_id()
        self._pidns = _pid_namespace()

    def get(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        return [_decode_state(v) for v in cast(list[Any], self.client.mget(list(keys)))]

    def put(self, items: Mapping[str, Mapping[str, Any]], *, only_new: bool = False) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, json.dumps(dict(value)), ex=self.ttl, nx=only_new)
        pipe.execute()

    def claim(self, key: str) -> str | None:
        """Hold the copy ``key``; None when a live worker holds it."""
        token = (
            f"{self._host}|{os.getpid()}|{self._token}{secrets.token_hex(4)}"
            f"|{self._boot}|{self._pidns}"
        )
        if self.client.set(key, token, nx=True, px=self.lease_ms):
            return token
        held = self.client.get(key)
        if held is None:
            return token if self.client.set(key, token, nx=True, px=self.lease_ms) else None
        text = held.decode() if isinstance(held, bytes) else str(held)
        if not self._gone(text):
            return None
        taken = self._take_over(keys=[key], args=[text, token, self.lease_ms])
        return token if taken else None

    def _gone(self, holder: str) -> bool:
        """Is the claim's holder a process of this host, boot and PID namespace that no
        longer runs? (Any other holder is waited for until its lease ends.)"""
        parts = holder.split("|")
        if len(parts) != 5:
            return False
        host, pid_text, token, boot, pidns = parts
        if (
            host != self._host
            or not pid_text.isdigit()
            or not self._boot
            or not self._pidns
            or boot != self._boot
            or pidns != self._pidns
        ):
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return not token.startswith(self._token)  # a process before us with our PID
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self, key: str, token: str) -> None:
        self._release(keys=[key], args=[token])

    def renew(self, key: str, token: str) -> bool:
        """Extend the lease of a claim still held; False when it is not."""
        return bool(self._renew(keys=[key], args=[token, self.lease_ms]))

    def mark_if_held(
        self, claim_key: str, token: str, items: Mapping[str, Mapping[str, Any]]
    ) -> bool:
        """Write ``items`` only if ``claim_key`` still holds ``token`` (atomically)."""
        keys = [claim_key, *items]
        args: list[str | int] = [token, self.ttl, *(json.dumps(dict(v)) for v in items.values())]
        return bool(self._mark(keys=keys, args=args))

    def requeue(self, items: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Write ``items`` where there is no state or a ``failed`` one; per key, "" when
        written, else the state found (left as it is)."""
        if not items:
            return []
        args: list[str | int] = [self.ttl, *(json.dumps(dict(v)) for v in items.values())]
        found = cast(list[Any], self._requeue(keys=list(items), args=args))
        return [v.decode() if isinstance(v, bytes) else str(v) for v in found]


# -- the producer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Enqueued:
    """What :meth:`CeleryQueue.enqueue` put on the queue."""

    task_ids: tuple[str, ...]
    #: (Message-ID, copy number, recipient) of every queued recipient.
    recipients: tuple[tuple[str, int, str], ...]
    #: (Message-ID, copy number, recipient, state) of the recipients not queued again: the
    #: copy was delivered (or maybe delivered) already, or is queued or being sent. A
    #: ``failed`` one is queued again.
    skipped: tuple[tuple[str, int, str, str], ...] = ()

    @property
    def count(self) -> int:
        return len(self.recipients)


class CeleryQueue:
    """Puts protected copies on the e2email Celery queue (``app`` made by :func:`make_app`,
    or the module's :data:`app`). Only the copies' bytes, envelopes and the account name go
    to the broker."""

    def __init__(self, celery_app: Celery | None = None, *, batch_size: int | None = None):
        self.app = celery_app if celery_app is not None else app
        self._batch_size = batch_size
        self._states: _States | None = None

    @property
    def conf(self) -> _Conf:
        return _Conf.of(self.app)

    @property
    def states(self) -> _States:
        if self._states is None:
            conf = self.conf
            self._states = _States(_redis(conf.backend), ttl=conf.state_ttl, lease=conf.claim_lease)
        return self._states

    def enqueue(
        self,
        copies: Sequence[ProtectedCopy] | Sequence[Sequence[ProtectedCopy]],
        *,
        account: str | None = None,
        batch_size: int | None = None,
    ) -> Enqueued:
        """Queue ``copies`` (the copies of one message, or of many: a sequence of such
        sequences) for delivery through ``account`` (None: the workers' default account), in
        tasks of ``batch_size`` copies. Each copy's number is its place among its message's
        copies, which, with the Message-ID and the recipient, makes its idempotency key: the
        same message queued twice is delivered once."""
        groups: list[Sequence[ProtectedCopy]]
        if copies and not isinstance(copies[0], ProtectedCopy):
            groups = list(cast(Sequence[Sequence[ProtectedCopy]], copies))
        else:
            groups = [cast(Sequence[ProtectedCopy], copies)]
        items: list[dict[str, Any]] = []
        for group in groups:
            for number, c in enumerate(group):
                items.append(_copy_payload(c, number))
        if not items:
            raise ConfigError("nothing to queue")
        conf = self.conf
        size = batch_size or self._batch_size or conf.batch_size
        recipients = tuple(
            (item["message_id"], item["copy"], r) for item in items for r in item["recipients"]
        )
        now = time.time()
        # "queued" is written before any task is published: a worker that finds no state
        # for a copy knows its record was lost (evicted, expired), not that it is new.
        try:
            found = self.states.requeue(
                {
                    state_key(mid, number, r): {
                        "state": "queued",
                        "message_id": mid,
                        "copy": number,
                        "recipient": r,
                        "updated": now,
                    }
                    for mid, number, r in recipients
                }
            )
            ids: list[str] = []
            for start in range(0, len(items), size):
                payload = {
                    "v": _PAYLOAD_VERSION,
                    "account": account,
                    "copies": items[start : start + size],
                }
                result = self.app.send_task(TASK_NAME, args=(payload,), queue=conf.queue)
                ids.append(str(result.id))
        except (redis.RedisError, KombuOperationalError, OSError) as exc:
            raise ConnectError(
                f"cannot queue for the Celery workers: the broker or result backend is "
                f"unreachable ({type(exc).__name__}: {exc}); nothing more was queued",
                transient=True,
            ) from exc
        skipped = tuple(
            (mid, number, r, state)
            for (mid, number, r), state in zip(recipients, found, strict=True)
            if state
        )
        return Enqueued(task_ids=tuple(ids), recipients=recipients, skipped=skipped)

    def lookup(self, queued: Enqueued) -> tuple[RecipientState, ...]:
        """The current state of every recipient ``queued`` holds."""
        keys = [state_key(m, n, r) for m, n, r in queued.recipients]
        found = self.states.get(keys)
        return tuple(
            _recipient_state(m, n, r, v)
            for (m, n, r), v in zip(queued.recipients, found, strict=True)
        )

    def wait(self, queued: Enqueued, *, timeout: float | None = None) -> tuple[RecipientState, ...]:
        """Wait for every task of ``queued`` (AsyncResult; retries included), then give each
        recipient's state."""
        for task_id in queued.task_ids:
            AsyncResult(task_id, app=self.app).get(timeout=timeout, propagate=False)
        return self.lookup(queued)

    def status(self) -> Mapping[str, int]:
        """Counts of recipients per state, and ``tasks`` waiting in the broker."""
        return queue_status(self.app)


def _copy_payload(c: ProtectedCopy, number: int) -> dict[str, Any]:
    return {
        "message_id": c.message_id,
        "copy": number,
        "kind": c.kind,
        "mail_from": c.mail_from,
        "recipients": list(c.recipients),
        # Base64: JSON carries text. These are the protected bytes exactly as signed.
        "raw": base64.b64encode(c.raw).decode("ascii"),
    }


def _recipient_state(
    message_id: str, copy: int, recipient: str, value: Mapping[str, Any] | None
) -> RecipientState:
    if value is None:
        return RecipientState(message_id, copy, recipient, None)
    state = value.get("state")
    return RecipientState(
        message_id,
        copy,
        recipient,
        cast(State, state) if state in STATES else None,
        reply=value.get("reply"),
        error=value.get("error"),
        attempts=int(value.get("attempts", 0)),
    )


async def send_via_celery(
    mailer: AsyncMailer,
    message: Message,
    *,
    queue: CeleryQueue,
    account: str | None = None,
    protection: Protection | None = None,
) -> Enqueued:
    """Protect ``message`` here (:meth:`AsyncMailer.protect`: fails closed, nothing queued
    when any recipient cannot be protected for) and queue its copies for the workers."""
    copies = await mailer.protect(message, protection=protection)
    return await asyncio.to_thread(queue.enqueue, copies, account=account)


def queue_status(celery_app: Celery | None = None) -> dict[str, int]:
    """Recipients per state in the result backend (``queued``, ``sending``, ``delivered``,
    ``maybe-delivered``, ``failed``) and ``tasks``: tasks waiting in the broker's queue."""
    celery_app = celery_app if celery_app is not None else app
    conf = _Conf.of(celery_app)
    client = _redis(conf.backend)
    counts: Counter[str] = Counter(dict.fromkeys(STATES, 0))
    batch: list[bytes] = []

    def flush() -> None:
        for value in cast(list[Any], client.mget(batch)):
            decoded = _decode_state(value)
            if decoded is not None and decoded.get("state") in STATES:
                counts[str(decoded["state"])] += 1
        batch.clear()

    for key in client.scan_iter(match=_STATE_PREFIX + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    result: dict[str, int] = {state: counts[state] for state in STATES}
    broker = str(celery_app.conf.broker_url or "")
    if broker.startswith(("redis://", "rediss://", "unix://")):
        result["tasks"] = int(cast(Any, _redis(broker).llen(conf.queue)))
    client.close()
    return result


# -- the worker -----------------------------------------------------------------------------


class _Slot:
    """One account's connection in this worker process: opened on first use, RSET before
    reuse (RFC 5321 §4.1.1.5: a clean state, and proof the server has not closed an idle
    connection), replaced when lost."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.transport = SMTPTransport(account.smtp)
        self._cm: contextlib.AbstractAsyncContextManager[SMTPConnection] | None = None
        self._conn: SMTPConnection | None = None
        self._used = False
        self._prepared = False
        self.opened = 0

    async def get(self) -> SMTPConnection:
        if not self._prepared:
            await self.transport.prepare()
            self._prepared = True
        conn = self._conn
        if conn is not None and self._used:
            if conn.is_connected:
                await conn._reset()
            if not conn.is_connected:
                await self.close()
                conn = None
        if conn is None:
            cm = self.transport.connect()
            conn = await cm.__aenter__()
            self._cm, self._conn, self._used = cm, conn, False
            self.opened += 1
        self._used = True
        return conn

    def abort(self) -> None:
        if self._conn is not None:
            self._conn._abort()
        self._cm = self._conn = None

    async def close(self) -> None:
        cm, self._cm, self._conn = self._cm, None, None
        if cm is not None:
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)


class _Worker:
    """Per worker process: an event loop, the accounts, one connection per account."""

    def __init__(self, conf: _Conf) -> None:
        self.conf = conf
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.config: Config = load_config(conf.config)
        self.states = _States(
            _redis(conf.backend, patient=True), ttl=conf.state_ttl, lease=conf.claim_lease
        )
        self.slots: dict[str, _Slot] = {}
        _warn_unless_noeviction(self.states.client)

    def slot(self, name: str | None) -> _Slot:
        account = self.config.account(name)
        slot = self.slots.get(account.name)
        if slot is None:
            slot = self.slots[account.name] = _Slot(account)
        return slot

    def close(self) -> None:
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(slot.close())
        self.slots.clear()
        self.loop.close()


def _warn_unless_noeviction(client: redis.Redis) -> None:
    """An evicted idempotency key makes a copy's outcome unknown (recorded maybe-delivered,
    not sent): Redis must not evict (``maxmemory-policy noeviction``)."""
    try:
        policy = cast(Mapping[str, Any], client.config_get("maxmemory-policy")).get(
            "maxmemory-policy"
        )
    except redis.RedisError:
        return  # CONFIG may be disallowed (managed Redis): nothing to check it with
    if policy is not None and str(policy) != "noeviction":
        log.warning(
            "e2email: the result backend's maxmemory-policy is %s, not noeviction: an evicted "
            "idempotency key leaves its copy maybe-delivered (not sent)",
            policy,
        )


_worker: _Worker | None = None


def _worker_for(celery_app: Celery) -> _Worker:
    global _worker
    if _worker is None or _worker.pid != os.getpid():
        _worker = _Worker(_Conf.of(celery_app))
    return _worker


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_worker(**_: Any) -> None:
    """QUIT every kept connection when a worker process ends."""
    global _worker
    worker, _worker = _worker, None
    if worker is not None and worker.pid == os.getpid():
        worker.close()


def _now() -> float:
    return time.time()


class _Run:
    """One task run: each copy claimed, sent (what is still to send), its states recorded."""

    def __init__(self, worker: _Worker, *, attempt: int, last: bool) -> None:
        self.worker = worker
        self.states = worker.states
        self.attempt = attempt
        self.last = last
        #: Recipients to try again later (a 4xx, a connection fault).
        self.again = 0
        #: Recipients of copies another worker holds: looked at again later, without
        #: counting as an attempt.
        self.waits = 0
        self.report: list[dict[str, Any]] = []

    def _record(
        self, c: Mapping[str, Any], recipients: Iterable[str], state: State, **extra: Any
    ) -> None:
        items = {}
        for r in recipients:
            value = {
                "state": state,
                "message_id": c["message_id"],
                "copy": c["copy"],
                "recipient": r,
                "updated": _now(),
                "attempts": self.attempt,
                **{k: v for k, v in extra.items() if v is not None},
            }
            items[state_key(c["message_id"], c["copy"], r)] = value
        if items:
            self.states.put(items)

    def _later(
        self,
        c: Mapping[str, Any],
        recipients: list[str],
        error: str | None,
        reply: str | None = None,
    ) -> None:
        """Not delivered now, may be later: back to queued, or failed after the last try."""
        if not recipients:
            return
        if self.last:
            why = f"gave up after {self.attempt} attempt(s): {error or reply}"
            self._record(c, recipients, "failed", reply=reply, error=why)
        else:
            self._record(c, recipients, "queued", reply=reply, error=error)
            self.again += len(recipients)

    async def copy(self, slot: _Slot, c: Mapping[str, Any]) -> None:
        mid, number = str(c["message_id"]), int(c["copy"])
        recipients = [str(r) for r in c["recipients"]]
        keys = [state_key(mid, number, r) for r in recipients]
        if all((v or {}).get("state") in _FINAL for v in self.states.get(keys)):
            return  # done already (a task delivered twice): nothing to claim
        claim_key = _claim_key(mid, number)
        token = self.states.claim(claim_key)
        if token is None:
            # Another live worker is on this copy right now: look again later.
            self.waits += len(recipients)
            return
        heartbeat = asyncio.ensure_future(self._heartbeat(claim_key, token))
        try:
            await self._claimed(slot, c, recipients, keys, claim_key, token)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
            self.states.release(claim_key, token)

    async def _heartbeat(self, claim_key: str, token: str) -> None:
        """Renew the claim's lease while its copy is worked on (a slow server must not let
        it run out mid-transaction); ``sending`` checks it is still held anyway."""
        every = max(0.05, self.states.lease_ms / 3000)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(redis.RedisError):
                if not await asyncio.to_thread(self.states.renew, claim_key, token):
                    return

    async def _claimed(
        self,
        slot: _Slot,
        c: Mapping[str, Any],
        recipients: list[str],
        keys: list[str],
        claim_key: str,
        token: str,
    ) -> None:
        todo: list[str] = []
        interrupted: list[str] = []
        lost: list[str] = []
        for r, value in zip(recipients, self.states.get(keys), strict=True):
            state = (value or {}).get("state")
            if value is None:
                lost.append(r)
            elif state == "sending":
                interrupted.append(r)
            elif state not in _FINAL:
                todo.append(r)
        if lost:
            # The producer writes "queued" before it publishes: no state at all means the
            # record was lost (evicted, expired, a Redis restart without persistence), and
            # with it whether the copy was delivered. Never resent on a guess.
            self._record(
                c,
                lost,
                "maybe-delivered",
                error="delivery state lost (evicted or expired from the result backend); "
                "the copy may have been delivered (not sent again)",
            )
        if interrupted:
            # Marked just before a final "." whose outcome was never recorded: the worker
            # died after it. The server may have it (RFC 5321 §6.1): never resent by itself.
            self._record(
                c,
                interrupted,
                "maybe-delivered",
                error="the delivering worker stopped after the end of data was sent; "
                "the server may or may not have the message (not sent again)",
            )
        if not todo:
            return
        raw = base64.b64decode(c["raw"], validate=True)

        async def sending() -> None:
            now = _now()
            items = {
                state_key(c["message_id"], c["copy"], r): {
                    "state": "sending",
                    "message_id": c["message_id"],
                    "copy": c["copy"],
                    "recipient": r,
                    "updated": now,
                    "attempts": self.attempt,
                }
                for r in todo
            }
            if not self.states.mark_if_held(claim_key, token, items):
                # Our lease ran out and another worker may be on this copy: the end of
                # data is never written (raising here leaves the DATA unfinished).
                raise _ClaimLost("the claim on the copy ran out before the end of data")

        try:
            conn = await slot.get()
        except AuthenticationError as exc:
            slot.abort()
            if exc.transient:
                self._later(c, todo, f"cannot connect: {exc}", _reply_text(exc))
            else:
                # Refused credentials (535): repeating them only brings a lock-out closer.
                self._record(
                    c, todo, "failed", reply=_reply_text(exc), error=f"cannot log in: {exc}"
                )
            return
        except E2EmailError as exc:
            # No connection (or no password: an unset variable, a failing command): tried
            # again with back-off, the reason recorded, until the last attempt fails it.
            slot.abort()
            self._later(c, todo, f"cannot connect: {exc}", _reply_text(exc))
            return
        try:
            result = await conn.send(
                raw,
                mail_from=str(c["mail_from"]),
                recipients=todo,
                require_tls=c.get("require_tls"),
                before_end=sending,
            )
        except TransportError as exc:
            if exc.maybe_delivered:
                slot.abort()
                self._record(c, todo, "maybe-delivered", error=f"{exc}; not sent again")
                return
            if not isinstance(exc, DeliveryError):
                slot.abort()
            reply = _reply_text(exc)
            if isinstance(exc, DeliveryError) and not exc.transient:
                self._record(c, todo, "failed", reply=reply, error=str(exc))
            else:
                self._later(c, todo, str(exc), reply)
            return
        except MessageError as exc:
            self._record(c, todo, "failed", error=str(exc))
            return
        except _ClaimLost:
            # Before the end of data: nothing delivered; the holder now decides.
            slot.abort()
            self.waits += len(todo)
            return
        except BaseException:
            # E.g. the state store unreachable in `sending` (before the "."): the connection
            # is mid-DATA and must not carry another message.
            ended = conn.end_of_data_sent
            slot.abort()
            if ended:
                with contextlib.suppress(Exception):
                    self._record(
                        c, todo, "maybe-delivered", error="interrupted after the end of data"
                    )
            raise
        self._apply(c, result)

    def _apply(self, c: Mapping[str, Any], result: CopyOutcome) -> None:
        data_reply = str(result.data_reply) if result.data_reply is not None else None
        delivered = list(result.delivered)
        failed: dict[str, str] = {}
        later: dict[str, str | None] = {}
        why: dict[str, str | None] = {}
        for r in result.recipients:
            if r.status == "delivered":
                continue
            why[r.address] = r.error
            if r.status == "failed":
                failed[r.address] = str(r.reply)
            else:
                later[r.address] = str(r.reply) if r.reply is not None else None
        self._record(c, delivered, "delivered", reply=data_reply)
        # The transport's own words (e.g. "refused the message data: 554 ..." for a refused
        # transaction); a refused RCPT says "refused: <reply>".
        for address, refusal in failed.items():
            error = why[address] or f"refused: {refusal}"
            self._record(c, [address], "failed", reply=refusal, error=error)
        for address, maybe in later.items():
            self._later(c, [address], why[address] or f"refused for now: {maybe}", maybe)


def _reply_text(exc: E2EmailError) -> str | None:
    reply = getattr(exc, "reply", None)
    return str(reply) if reply is not None else None


def _deliver_task(self: Any, payload: Mapping[str, Any], waits: int = 0) -> dict[str, Any]:
    """The Celery task: deliver the payload's copies through its account. ``waits``: how
    many of the task's earlier runs only waited for copies other workers held (not counted
    as attempts)."""
    if not isinstance(payload, Mapping) or payload.get("v") != _PAYLOAD_VERSION:
        raise ConfigError("not an e2email delivery payload of a version this worker knows")
    worker = _worker_for(self.app)
    retry = worker.conf.retry
    waits = max(0, int(waits))
    attempt = max(1, int(self.request.retries) + 1 - waits)
    run = _Run(worker, attempt=attempt, last=attempt >= retry.max_attempts)
    try:
        slot = worker.slot(payload.get("account"))
    except ConfigError as exc:
        # No such account here (or none by default): no retry can help; said per recipient.
        for c in payload["copies"]:
            rcpts = [str(r) for r in c["recipients"]]
            keys = [state_key(str(c["message_id"]), int(c["copy"]), r) for r in rcpts]
            found = worker.states.get(keys)
            open_ = [
                r for r, v in zip(rcpts, found, strict=True) if (v or {}).get("state") not in _FINAL
            ]
            run._record(c, open_, "failed", error=str(exc))
        raise

    async def all_copies() -> None:
        for c in payload["copies"]:
            await run.copy(slot, c)

    worker.loop.run_until_complete(all_copies())
    if run.again:
        raise self.retry(args=(payload,), kwargs={"waits": waits}, countdown=retry.delay(attempt))
    if run.waits:
        # Only waited for a claim another worker holds: looked at again soon, and the
        # attempts left for real failures are not used up.
        raise self.retry(args=(payload,), kwargs={"waits": waits + 1}, countdown=retry.delay(1))
    # Per recipient, as the idempotency keys say now (AsyncResult(...).get() gives this).
    wanted = [
        (str(c["message_id"]), int(c["copy"]), str(r))
        for c in payload["copies"]
        for r in c["recipients"]
    ]
    found = worker.states.get([state_key(*w) for w in wanted])
    return {
        "attempts": attempt,
        "recipients": [
            {
                "message_id": m,
                "copy": n,
                "recipient": r,
                **{k: (v or {}).get(k) for k in ("state", "reply", "error")},
            }
            for (m, n, r), v in zip(wanted, found, strict=True)
        ],
    }


#: The app ``celery -A e2email.celery worker`` runs: settings from the environment and the
#: config file, read when first needed (importing this module reads nothing).
app: Celery = make_app()
