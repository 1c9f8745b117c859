"""Delivery through Celery workers (issue 12), with real components only: a redis-server
started here on a loopback port (persistence on), real `celery -A e2email.celery worker`
processes, a real TLS SMTP server with AUTH, real gpg keys."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")
import redis
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email.celery import (
    TASK_NAME,
    CeleryQueue,
    Enqueued,
    _claim_key,
    _copy_payload,
    _Run,
    _States,
    load_celery_settings,
    make_app,
    send_via_celery,
    state_key,
)
from e2email.client import AsyncMailer, ProtectedCopy
from e2email.config import Protection
from e2email.errors import ConfigError, ConnectError
from e2email.keystore import Keystore
from e2email.message import Message
from e2email.testing import Fault, LoopbackSMTPServer, TestCA

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")

PASSWORD = "worker-only-s3cret-PASSWORD"
PASSWORD_ENV = "E2EMAIL_TEST_CELERY_SMTP_PASSWORD"
BODY_MARKER = "BODY-MARKER-4f1c2a"
SUBJECT_MARKER = "SUBJECT-MARKER-9b3e7d"
SIGNED = "SIGNED-ONLY-MARKER-77aa01"
CELERY = Path(sys.executable).with_name("celery")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on 127.0.0.1, appendonly with fsync always, in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.025)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis writes its data and exits
            self.proc.wait(30)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class Worker:
    """A real `celery -A e2email.celery worker` process (solo pool: one process)."""

    def __init__(self, config: Path, folder: Path) -> None:
        self.config = config
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        if self.proc is not None:
            return
        self.runs += 1
        env = {**os.environ, "E2EMAIL_CONFIG": str(self.config), PASSWORD_ENV: PASSWORD}
        env.pop("E2EMAIL_CELERY_BROKER", None)
        log = (self.folder / f"worker{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "e2email.celery",
                "worker",
                "--pool",
                "solo",
                "--loglevel",
                "warning",
                "-n",
                f"w{self.runs}-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    made = TestCA()
    yield made
    made.cleanup()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("celery")


@pytest.fixture(scope="module")
def redis_server(folder: Path) -> Iterator[RedisServer]:
    (folder / "redis").mkdir()
    server = RedisServer(folder / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smtp(ca: TestCA) -> Iterator[LoopbackSMTPServer]:
    server = LoopbackSMTPServer(
        tls="implicit",
        ca=ca,
        credentials={"app": PASSWORD},
        refuse_recipients={"nobody@example.net": (550, "5.1.1 no such user here")},
        faults=[
            Fault("rcpt", "reply", 451, "4.7.1 greylisted, come back", address="grey@example.net")
        ],
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def config(folder: Path, redis_server: RedisServer, smtp: LoopbackSMTPServer) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f"""
[celery]
broker = "{redis_server.url}"
visibility-timeout = 3
restore-interval = 0.5
retry-delay = 0.1
retry-max-delay = 0.5
retries = 4
claim-lease = 30
batch-size = 10

[accounts.app]
host = "127.0.0.1"
port = {smtp.port}
tls = "implicit"
user = "app"
password-env = "{PASSWORD_ENV}"
ca-file = "{smtp.ca_file}"
from = "alice@example.org"
timeout = 5
data-timeout = 15
"""
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def worker(config: Path, folder: Path) -> Iterator[Worker]:
    made = Worker(config, folder)  # started by the tests, after what they check before it
    yield made
    made.stop()


@pytest.fixture(scope="module")
def queue(config: Path) -> CeleryQueue:
    return CeleryQueue(make_app(config=config))


@pytest.fixture(scope="module")
def mailer(sender_store: Keystore) -> AsyncMailer:
    return AsyncMailer(keystore=sender_store, protection=Protection())


# -- helpers ---------------------------------------------------------------------------------


def _layers(blob: bytes, depth: int = 0) -> Iterator[bytes]:
    """``blob`` and what it may hide: JSON strings inside it, base64 decoded (kombu stores
    task bodies base64-encoded, and our copies are base64 inside that)."""
    yield blob
    if depth > 5:
        return
    try:
        value = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        value = None
    strings: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    if value is None:
        strings.append(blob.decode("latin-1"))
    for s in strings:
        compact = s.strip()
        if len(compact) >= 16:
            try:
                decoded = base64.b64decode(compact, validate=True)
            except (binascii.Error, ValueError):
                decoded = None
            if decoded:
                yield from _layers(decoded, depth + 1)
        if s.encode("utf-8", "replace") != blob:
            yield from _layers(s.encode("utf-8", "replace"), depth + 1)


def _everything(client: redis.Redis) -> list[bytes]:
    """Every key and every value in Redis, whatever its type."""
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key) or b"")
        elif kind == "list":
            out.extend(client.lrange(key, 0, -1))
        elif kind == "hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif kind == "set":
            out.extend(client.smembers(key))
        elif kind == "zset":
            out.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    return out


def _found(client: redis.Redis, markers: list[bytes]) -> set[bytes]:
    seen: set[bytes] = set()
    for blob in _everything(client):
        for layer in _layers(blob):
            seen.update(m for m in markers if m in layer)
    return seen


def _wait_for(
    check: Callable[[], bool], seconds: float = 45.0, describe: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the workers did not finish in time: {describe()}")
        time.sleep(0.1)


def _final(queue: CeleryQueue, queued: Enqueued) -> Callable[[], bool]:
    def check() -> bool:
        return all(
            s.state in ("delivered", "failed", "maybe-delivered") for s in queue.lookup(queued)
        )

    return check


def _message(keys: Keys, n: int | str, **extra: Any) -> Message:
    return Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        subject=f"{SUBJECT_MARKER} {n}",
        text=f"{BODY_MARKER} number {n}\n",
        **extra,
    )


def _by_id(server: LoopbackSMTPServer, message_id: str) -> list[bytes]:
    return [m.data for m in list(server.messages) if _mid(m.data) == message_id]


# -- tests -------------------------------------------------------------------------------------


def test_only_ciphertext_reaches_the_broker_and_a_worker_delivers_what_decrypts(
    keys: Keys,
    mailer: AsyncMailer,
    queue: CeleryQueue,
    worker: Worker,
    smtp: LoopbackSMTPServer,
    redis_server: RedisServer,
    recipients_home: Path,
) -> None:
    message = _message(keys, "enc", cc=["carol@example.com"], bcc=["dave@example.com"])
    queued = asyncio.run(send_via_celery(mailer, message, queue=queue, account="app"))
    assert queued.count == 3  # bob and carol (main copy), dave (his own copy)
    # The tasks wait in the broker (no worker yet): nothing readable there, no secret.
    client = redis_server.client()
    markers = [
        BODY_MARKER.encode(),
        SUBJECT_MARKER.encode(),
        PASSWORD.encode(),
        b"PRIVATE KEY",
        b"BEGIN PGP PRIVATE",
    ]
    assert b"bob@example.net" in b"".join(_everything(client))  # the scan sees the queue
    assert _found(client, markers) == set()
    # The scan would see a marker that is there: a signed-only message is readable.
    signed = Message(
        sender="alice@example.org", to=["bob@example.net"], subject="s", text=f"{SIGNED}\n"
    )
    signed_queued = asyncio.run(
        send_via_celery(
            mailer, signed, queue=queue, account="app", protection=Protection(encrypt=False)
        )
    )
    assert _found(client, [SIGNED.encode()]) == {SIGNED.encode()}

    worker.start()
    states = _wait_states(queue, queued)
    assert {s.recipient: s.state for s in states} == {
        "bob@example.net": "delivered",
        "carol@example.com": "delivered",
        "dave@example.com": "delivered",
    }
    assert all(s.reply and s.reply.startswith("250") for s in states)
    received = _by_id(smtp, states[0].message_id)
    assert len(received) == 2
    assert all(m.auth_user == "app" for m in smtp.messages if m.data in received)
    for raw in received:
        _, parts = multipart_parts(raw)
        plain, status = gpg_decrypt(recipients_home, part_body(parts[1]))
        assert "GOODSIG" in status or "VALIDSIG" in status
        inner = email.message_from_bytes(plain, policy=email.policy.default)
        assert BODY_MARKER in inner.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    # The producer reads per-recipient results through AsyncResult too.
    from celery.result import AsyncResult

    result = AsyncResult(queued.task_ids[0], app=queue.app).get(timeout=30)
    assert sorted((r["recipient"], r["state"]) for r in result["recipients"]) == [
        ("bob@example.net", "delivered"),
        ("carol@example.com", "delivered"),
        ("dave@example.com", "delivered"),
    ]
    # After the run too: no plaintext, no password, no private key anywhere in Redis.
    _wait_states(queue, signed_queued)
    assert _found(client, [*markers, SIGNED.encode()]) == set()
    client.close()


def _wait_states(queue: CeleryQueue, queued: Enqueued) -> tuple[Any, ...]:
    _wait_for(_final(queue, queued))
    return queue.lookup(queued)


def _plain_copy(n: int, *, to: str = "bob@example.net", tag: str = "b") -> ProtectedCopy:
    mid = f"{tag}{n}.{os.getpid()}@celery.test"
    raw = (
        f"From: alice@example.org\r\nTo: {to}\r\nMessage-ID: <{mid}>\r\n"
        f"Subject: {n}\r\n\r\nhello {n}\r\n"
    ).encode()
    return ProtectedCopy(
        raw=raw,
        mail_from="alice@example.org",
        recipients=(to,),
        kind="main",
        message_id=mid,
        signed=False,
    )


def test_5xx_is_failed_with_the_reply_4xx_retried_and_a_message_queued_twice_goes_once(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer
) -> None:
    worker.start()
    refused = _plain_copy(1, to="nobody@example.net", tag="r")
    grey = _plain_copy(2, to="grey@example.net", tag="g")
    twice = _plain_copy(3, tag="t")
    queued = queue.enqueue([[refused], [grey], [twice]], account="app", batch_size=1)
    again = queue.enqueue([twice], account="app")
    _wait_for(_final(queue, queued))
    _wait_for(_final(queue, again))
    states = {s.recipient: s for s in queue.lookup(queued)}
    assert states["nobody@example.net"].state == "failed"
    assert states["nobody@example.net"].reply == "550 5.1.1 no such user here"
    assert states["grey@example.net"].state == "delivered"
    assert states["grey@example.net"].attempts >= 2  # the 451 was retried
    assert states["bob@example.net"].state == "delivered"
    assert len(_by_id(smtp, twice.message_id)) == 1
    assert len(_by_id(smtp, refused.message_id)) == 0


def test_a_reply_lost_after_the_final_dot_is_maybe_delivered_and_not_resent(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer
) -> None:
    worker.start()
    smtp.faults = (*smtp.faults, Fault("data-end", "accept-drop"))
    smtp._fault_budget.append(1)
    copy = _plain_copy(1, tag="lost")
    queued = queue.enqueue([copy], account="app")
    _wait_for(_final(queue, queued))
    (state,) = queue.lookup(queued)
    assert state.state == "maybe-delivered"
    assert "not sent again" in (state.error or "")
    assert len(_by_id(smtp, copy.message_id)) == 1


def test_a_worker_killed_after_the_final_dot_leaves_the_copy_maybe_delivered_not_resent(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer
) -> None:
    """The worker marks the copy "sending" just before the end of data; killed while the
    server sits on its reply, the redelivered task finds that mark and its claimer gone."""
    worker.start()
    smtp.faults = (*smtp.faults, Fault("data-end", "stall", seconds=20))
    smtp._fault_budget.append(1)
    copy = _plain_copy(1, tag="dot")
    queued = queue.enqueue([copy], account="app")
    _wait_for(lambda: queue.lookup(queued)[0].state == "sending")
    worker.kill()
    worker.start()
    _wait_for(_final(queue, queued))
    (state,) = queue.lookup(queued)
    assert state.state == "maybe-delivered"
    assert "stopped after the end of data" in (state.error or "")
    assert len(_by_id(smtp, copy.message_id)) <= 1


def test_a_worker_killed_mid_batch_and_a_redis_restart_lose_nothing_and_send_nothing_twice(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer, redis_server: RedisServer
) -> None:
    worker.start()
    copies = [_plain_copy(n, tag="k") for n in range(500)]
    queued = queue.enqueue([[c] for c in copies], account="app", batch_size=10)
    ids = {c.message_id for c in copies}

    def arrived() -> int:
        return sum(1 for m in list(smtp.messages) if _mid(m.data) in ids)

    _wait_for(lambda: arrived() >= 120)
    worker.kill()  # SIGKILL in the middle of a task of 10
    redis_server.stop()  # and Redis goes down and comes back with its data
    redis_server.start()
    worker.start()
    _wait_for(
        _final(queue, queued),
        seconds=60,
        describe=lambda: Counter(s.state for s in queue.lookup(queued)),
    )
    states = queue.lookup(queued)
    counts = Counter(_mid(m.data) for m in list(smtp.messages))
    by_state = Counter(s.state for s in states)
    assert set(by_state) <= {"delivered", "maybe-delivered"}, by_state
    assert by_state["maybe-delivered"] <= 1  # at most the one copy in flight when killed
    for s in states:
        if s.state == "delivered":
            assert counts[s.message_id] == 1, s
        else:
            assert counts[s.message_id] <= 1, s
    assert worker.runs >= 2


def _mid(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().strip(b"<>").decode()
    return ""


def test_the_django_backend_queues_for_a_worker_and_the_message_decrypts(
    config: Path,
    sender_store: Keystore,
    worker: Worker,
    smtp: LoopbackSMTPServer,
    recipients_home: Path,
    queue: CeleryQueue,
    tmp_path: Path,
) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        # Configured here, not at import: tests/test_django.py configures Django when it is
        # collected, and only the first configuration counts.
        settings.configure(
            EMAIL_BACKEND="e2email.django.EmailBackend",
            DEFAULT_FROM_EMAIL="Alice <alice@example.org>",
            E2EMAIL={},
            USE_TZ=True,
        )
        django.setup()
    from django.core import mail
    from django.test import override_settings

    from e2email.django import load_settings

    worker.start()
    conf = {
        "account": "app",
        "config": str(config),
        "queue": "celery",
        "home": str(sender_store.home),
        "outbox": str(tmp_path / "outbox.sqlite3"),
    }
    subject = "django through celery"
    with override_settings(E2EMAIL=conf):
        sent = mail.send_mail(subject, f"{BODY_MARKER} from django\n", None, ["bob@example.net"])
    assert sent == 1

    def found() -> bytes | None:
        for m in list(smtp.messages):
            if m.rcpt_tos != ("bob@example.net",) or b"multipart/encrypted" not in m.data:
                continue
            _, parts = multipart_parts(m.data)
            plain, _ = gpg_decrypt(recipients_home, part_body(parts[1]))
            if subject.encode() in plain:
                return plain
        return None

    _wait_for(lambda: found() is not None)
    plain = found()
    assert plain is not None and f"{BODY_MARKER} from django".encode() in plain
    with pytest.raises(ConfigError, match="'queue': 'celery' needs 'account'"):
        load_settings({"queue": "celery", "host": "127.0.0.1", "tls": "implicit"})
    with pytest.raises(ConfigError, match="'queue' must be 'celery'"):
        load_settings({**conf, "queue": "rabbit"})


def _cli(*args: str, config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "E2EMAIL_HOME": str(home), "E2EMAIL_CONFIG": str(config)}
    env.pop(PASSWORD_ENV, None)  # the producer has no SMTP password
    return subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_bulk_send_queues_a_campaign_in_tasks_and_queue_status_counts_it(
    config: Path,
    sender_store: Keystore,
    worker: Worker,
    smtp: LoopbackSMTPServer,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    worker.start()
    before = len(smtp.messages)
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "email,name,code\nbob@example.net,Bob,B-17\ncarol@example.com,Carol,C-42\n"
        "erin@example.com,Erin,E-99\nnokey@example.com,No Key,N-1\n"
    )
    home = sender_store.home
    args = (
        "send",
        "--account",
        "app",
        "--to-file",
        str(rows),
        "--subject",
        "code $code",
        "--body",
        "Your code: $code",
        "--queue",
        "celery",
        "--queue-batch",
        "2",
        "--report",
        str(tmp_path / "report.csv"),
    )
    done = _cli(*args, config=config, home=home)
    assert done.returncode == 3, done.stderr  # the row without a key is not queued
    assert "row 4 nokey@example.com: not-sent" in done.stdout
    assert "queued 3 message(s) in 2 task(s)" in done.stderr
    report = (tmp_path / "report.csv").read_text()
    assert report.count(",queued,") == 3

    def codes() -> Counter[str]:
        found: Counter[str] = Counter()
        for m in list(smtp.messages):
            if b"multipart/encrypted" not in m.data or b"celery.test" in m.data:
                continue
            _, parts = multipart_parts(m.data)
            plain, _ = gpg_decrypt(recipients_home, part_body(parts[1]))
            for code in ("B-17", "C-42", "E-99"):
                if f"Your code: {code}".encode() in plain:
                    found[code] += 1
        return found

    _wait_for(lambda: len(smtp.messages) >= before + 3)
    # Rerun: the same rows have the same Message-IDs, so nothing is delivered twice.
    again = _cli(*args, config=config, home=home)
    assert again.returncode == 3, again.stderr
    status = _cli("queue", "status", "--json", config=config, home=home)
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert set(counts) >= {"queued", "sending", "delivered", "maybe-delivered", "failed", "tasks"}
    assert counts["delivered"] >= 3
    shown = _cli("queue", "status", config=config, home=home)
    assert shown.returncode == 0 and "maybe-delivered" in shown.stdout

    def idle() -> bool:
        now = json.loads(_cli("queue", "status", "--json", config=config, home=home).stdout)
        return bool(now["tasks"] == 0 and now["queued"] == 0 and now["sending"] == 0)

    _wait_for(idle)
    assert codes() == {"B-17": 1, "C-42": 1, "E-99": 1}


def test_queue_status_without_a_reachable_backend_is_one_line_and_exit_4(
    config: Path, tmp_path: Path
) -> None:
    done = _cli(
        "queue",
        "status",
        "--broker",
        f"redis://127.0.0.1:{_free_port()}/0",
        config=config,
        home=tmp_path / "home",
    )
    assert done.returncode == 4
    assert done.stderr.startswith("e2email: error: cannot read the result backend:")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_queue_options_outside_a_campaign_are_usage_errors(config: Path, tmp_path: Path) -> None:
    done = _cli(
        "send",
        "--account",
        "app",
        "--to",
        "bob@example.net",
        "--body",
        "x",
        "--queue",
        "celery",
        config=config,
        home=tmp_path / "home",
    )
    assert done.returncode == 2
    assert "--queue goes with --to-file" in done.stderr


# -- review fixes -----------------------------------------------------------------------------


def _config_with(folder: Path, name: str, source: Path, **changes: str) -> Path:
    """A copy of the module's config file with ``key = value`` lines replaced."""
    lines = []
    for line in source.read_text().splitlines():
        key = line.split(" = ", 1)[0]
        lines.append(f"{key} = {changes[key]}" if key in changes else line)
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


# -- 1. the broker unreachable at the producer ---------------------------------------------


@pytest.fixture
def down_config(folder: Path, config: Path) -> Path:
    return _config_with(folder, "down", config, broker=f'"redis://127.0.0.1:{_free_port()}/0"')


def test_enqueue_with_redis_down_is_a_transient_connect_error(down_config: Path) -> None:
    queue = CeleryQueue(make_app(config=down_config))
    with pytest.raises(ConnectError, match="unreachable") as caught:
        queue.enqueue([_plain_copy(1, tag="down")], account="app")
    assert caught.value.transient
    assert isinstance(caught.value.__cause__, redis.RedisError)


def test_bulk_queue_with_redis_down_reports_the_rows_and_exits_4(
    down_config: Path, sender_store: Keystore, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name\nbob@example.net,Bob\ncarol@example.com,Carol\n")
    report = tmp_path / "report.csv"
    done = _cli(
        "send",
        "--account",
        "app",
        "--to-file",
        str(rows),
        "--subject",
        "s $name",
        "--body",
        "b",
        "--queue",
        "celery",
        "--queue-batch",
        "1",
        "--report",
        str(report),
        config=down_config,
        home=sender_store.home,
    )
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith("e2email: error: cannot queue for the Celery workers")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    text = report.read_text()
    assert "bob@example.net" in text and "carol@example.com" in text
    assert text.count("not queued") == 2


def test_django_queue_with_redis_down_keeps_the_message_in_the_outbox(
    down_config: Path, sender_store: Keystore, tmp_path: Path
) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            EMAIL_BACKEND="e2email.django.EmailBackend",
            DEFAULT_FROM_EMAIL="Alice <alice@example.org>",
            E2EMAIL={},
            USE_TZ=True,
        )
        django.setup()
    from django.core import mail
    from django.test import override_settings

    from e2email.outbox import Outbox

    outbox = tmp_path / "outbox.sqlite3"
    conf = {
        "account": "app",
        "config": str(down_config),
        "queue": "celery",
        "home": str(sender_store.home),
        "outbox": str(outbox),
        "drafts": None,
    }
    with override_settings(E2EMAIL=conf), pytest.raises(ConnectError) as caught:
        mail.send_mail("subj", "body\n", None, ["bob@example.net"])
    assert "kept in the outbox" in " ".join(getattr(caught.value, "__notes__", ()))
    with override_settings(E2EMAIL=conf):
        assert mail.send_mail("subj", "body\n", None, ["bob@example.net"], fail_silently=True) == 0
    box = Outbox(outbox)
    try:
        items = box.items()
        assert len(items) == 2
    finally:
        box.close()


# -- 2. a claim held in another PID namespace; 3. a claim lost before the end of data --------


def test_a_claim_from_another_pid_namespace_or_boot_is_not_taken_over(
    redis_server: RedisServer,
) -> None:
    states = _States(redis_server.client(), ttl=60, lease=30)
    dead = 2**22 + 12345  # above pid_max's default: no such process here
    key = _claim_key("ns@celery.test", 0)
    client = redis_server.client()
    for boot, pidns in (
        (states._boot, "4026531999"),  # another container, same host name
        ("another-boot", states._pidns),
    ):
        client.set(key, f"{states._host}|{dead}|abc|{boot}|{pidns}", px=30000)
        assert states.claim(key) is None
    # The same boot and namespace: a dead PID is known gone, its claim taken over.
    client.set(key, f"{states._host}|{dead}|abc|{states._boot}|{states._pidns}", px=30000)
    token = states.claim(key)
    assert token is not None and client.get(key) == token.encode()
    client.delete(key)


def test_the_sending_mark_is_written_only_while_the_claim_is_held(
    redis_server: RedisServer,
) -> None:
    states = _States(redis_server.client(), ttl=60, lease=30)
    key = _claim_key("lease@celery.test", 0)
    token = states.claim(key)
    assert token is not None
    mark = {state_key("lease@celery.test", 0, "bob@example.net"): {"state": "sending"}}
    assert states.mark_if_held(key, token, mark)
    # The lease ran out and another worker claimed the copy.
    redis_server.client().set(key, "elsewhere|1|x|y|z")
    redis_server.client().delete(*mark)
    assert not states.mark_if_held(key, token, mark)
    assert redis_server.client().get(next(iter(mark))) is None
    redis_server.client().delete(key)


def test_the_claim_is_renewed_while_its_copy_is_worked_on(redis_server: RedisServer) -> None:
    states = _States(redis_server.client(), ttl=60, lease=1.0)
    key = _claim_key("renew@celery.test", 0)
    token = states.claim(key)
    assert token is not None
    run = _Run(SimpleNamespace(states=states), attempt=1, last=False)  # type: ignore[arg-type]

    async def work() -> None:
        beat = asyncio.ensure_future(run._heartbeat(key, token))
        await asyncio.sleep(3.0)  # three leases long
        beat.cancel()

    asyncio.run(work())
    assert redis_server.client().get(key) == token.encode()
    redis_server.client().delete(key)


def test_a_claim_lease_not_longer_than_the_smtp_timeouts_is_refused(
    folder: Path, config: Path
) -> None:
    # The module's accounts: 5 s to connect, 5 s per command, 15 s for the data.
    short = _config_with(folder, "short", config, **{"claim-lease": "25"})
    with pytest.raises(ConfigError, match=r"claim-lease \(25 s\) must be longer"):
        load_celery_settings(short)
    assert load_celery_settings(config).claim_lease == 30


# -- 4. a lost idempotency key; 6. a failed copy queued again -------------------------------


def test_a_lost_idempotency_key_is_maybe_delivered_not_resent(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer, redis_server: RedisServer
) -> None:
    worker.start()
    c = _plain_copy(1, tag="evict")
    queued = queue.enqueue([c], account="app")
    _wait_for(_final(queue, queued))
    assert queue.lookup(queued)[0].state == "delivered"
    redis_server.client().delete(state_key(c.message_id, 0, "bob@example.net"))
    # The same task delivered again (a redelivery), its state evicted meanwhile.
    again = queue.app.send_task(
        TASK_NAME,
        args=({"v": 1, "account": "app", "copies": [_copy_payload(c, 0)]},),
        queue=queue.conf.queue,
    )
    again.get(timeout=60, propagate=False)
    (state,) = queue.lookup(queued)
    assert state.state == "maybe-delivered"
    assert "delivery state lost" in (state.error or "")
    assert len(_by_id(smtp, c.message_id)) == 1


def test_a_failed_copy_is_queued_again_and_a_delivered_one_is_reported_not_requeued(
    queue: CeleryQueue, worker: Worker, smtp: LoopbackSMTPServer
) -> None:
    worker.start()
    smtp.faults = (*smtp.faults, Fault("data-end", "reply", 554, "5.6.0 content rejected"))
    smtp._fault_budget.append(1)
    c = _plain_copy(1, tag="refail")
    queued = queue.enqueue([c], account="app")
    _wait_for(_final(queue, queued))
    assert queue.lookup(queued)[0].state == "failed"
    again = queue.enqueue([c], account="app")
    assert again.skipped == ()
    _wait_for(_final(queue, again))
    assert queue.lookup(again)[0].state == "delivered"
    assert len(_by_id(smtp, c.message_id)) == 1
    third = queue.enqueue([c], account="app")
    assert [s[3] for s in third.skipped] == ["delivered"]


# -- 5. claim waits are not attempts; 7. refused credentials are final ------------------


class _OwnWorker(Worker):
    """A worker of its own: a given SMTP password, logging at INFO (Celery's retries)."""

    def __init__(self, config: Path, folder: Path, *, name: str, password: str) -> None:
        super().__init__(config, folder)
        self.name = name
        self.password = password

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}{self.runs}.log"

    def start(self) -> None:
        if self.proc is not None:
            return
        self.runs += 1
        env = {**os.environ, "E2EMAIL_CONFIG": str(self.config), PASSWORD_ENV: self.password}
        env.pop("E2EMAIL_CELERY_BROKER", None)
        log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "e2email.celery",
                "worker",
                "--pool",
                "solo",
                "--loglevel",
                "info",
                "-n",
                f"{self.name}{self.runs}-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def retries(self) -> int:
        return self.log.read_text(errors="replace").count("Retry in")


def test_waiting_for_another_workers_claim_uses_up_no_attempt(
    config: Path,
    queue: CeleryQueue,
    worker: Worker,
    smtp: LoopbackSMTPServer,
    redis_server: RedisServer,
    folder: Path,
) -> None:
    """The copy is held by a worker elsewhere through more task runs than there are attempts;
    once free, its first real attempt gets a 451 and is still retried, then delivered."""
    worker.stop()
    own = _OwnWorker(config, folder, name="waits", password=PASSWORD)
    own.start()
    try:
        smtp.faults = (
            *smtp.faults,
            Fault("rcpt", "reply", 451, "4.7.1 come back", address="waiter@example.net"),
        )
        smtp._fault_budget.append(1)
        c = _plain_copy(1, to="waiter@example.net", tag="wait")
        client = redis_server.client()
        key = _claim_key(c.message_id, 0)
        client.set(key, "elsewhere|1|x|y|z", px=60000)
        queued = queue.enqueue([c], account="app")
        # retries = 4: five attempts in all; the task runs more often than that, waiting.
        _wait_for(lambda: own.retries() >= 6, seconds=60)
        assert queue.lookup(queued)[0].state == "queued"
        client.delete(key)
        _wait_for(_final(queue, queued))
        (state,) = queue.lookup(queued)
        assert state.state == "delivered", state
        assert state.attempts == 2  # the 451, then delivered: the waits were not counted
    finally:
        own.stop()


def test_refused_worker_credentials_are_final_with_the_reply(
    folder: Path, config: Path, queue: CeleryQueue, worker: Worker
) -> None:
    worker.stop()  # the module's worker would take the task with the right password
    wrong = _OwnWorker(config, folder, name="wrongpw", password="wrong-" + PASSWORD)
    wrong.start()
    try:
        c = _plain_copy(1, tag="pw")
        queued = queue.enqueue([c], account="app")
        _wait_for(_final(queue, queued))
        (state,) = queue.lookup(queued)
        assert state.state == "failed"
        assert (state.reply or "").startswith("535"), state
        assert state.attempts == 1  # not retried: a lock-out is closer with each try
        assert "maxmemory-policy" not in wrong.log.read_text(errors="replace")
    finally:
        wrong.stop()


def test_a_worker_warns_when_redis_may_evict_the_idempotency_keys(
    folder: Path, config: Path, queue: CeleryQueue, worker: Worker, redis_server: RedisServer
) -> None:
    worker.stop()
    client = redis_server.client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    own = _OwnWorker(config, folder, name="evicting", password=PASSWORD)
    own.start()
    try:
        c = _plain_copy(1, tag="lru")
        queued = queue.enqueue([c], account="app")  # the worker process starts on its task
        _wait_for(_final(queue, queued))
        assert "maxmemory-policy is allkeys-lru, not noeviction" in own.log.read_text(
            errors="replace"
        )
    finally:
        own.stop()
        client.config_set("maxmemory-policy", "noeviction")
