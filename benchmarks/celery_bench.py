"""Delivery through Celery workers (issue 12): throughput with 1, 2 and 4 worker processes
against a local TLS SMTP server that takes 50 ms to answer each message, and what 10,000
queued copies cost the broker (Redis memory) and the producer (time to queue them).

    .venv/bin/python benchmarks/celery_bench.py [--copies 200] [--queued 10000]

Needs redis-server (Debian: redis-server) and the celery extra. Starts its own redis-server on
a free loopback port (no persistence), its own TLS server, and real `celery -A e2email.celery
worker --pool prefork -c N` processes; stops them all at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from e2email.celery import CeleryQueue, make_app
from e2email.client import ProtectedCopy
from e2email.testing import Fault, LoopbackSMTPServer

CELERY = Path(sys.executable).with_name("celery")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _copy(n: int, tag: str, size: int) -> ProtectedCopy:
    """A copy the size of a small encrypted message (random armor-like text)."""
    mid = f"{tag}{n}.{os.getpid()}@bench.test"
    body = base64.encodebytes(secrets.token_bytes(size * 3 // 4)).replace(b"\n", b"\r\n")
    raw = (
        f"From: app@example.org\r\nTo: user{n}@example.net\r\nMessage-ID: <{mid}>\r\n"
        "Subject: [...]\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + body
    return ProtectedCopy(
        raw=raw,
        mail_from="app@example.org",
        recipients=(f"user{n}@example.net",),
        kind="main",
        message_id=mid,
        signed=False,
    )


def _wait(check: object, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=200, help="copies per throughput run")
    parser.add_argument("--queued", type=int, default=10_000, help="copies for the memory run")
    parser.add_argument("--size", type=int, default=2048, help="bytes per copy")
    parser.add_argument("--batch", type=int, default=5, help="copies per task")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")

    work = Path(tempfile.mkdtemp(prefix="e2celery-bench-"))
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    rproc = subprocess.Popen(
        [
            redis_bin,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(work),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(broker)
    _wait(lambda: _ping(client), 10)
    # 50 ms before each DATA reply: a provider's realistic answer time.
    smtp = LoopbackSMTPServer(
        tls="implicit", faults=[Fault("data-end", "stall", seconds=0.05, times=None)]
    ).start()
    config = work / "config.toml"
    config.write_text(
        f'[celery]\nbroker = "{broker}"\nretry-delay = 0.1\n\n'
        f'[accounts.app]\nhost = "127.0.0.1"\nport = {smtp.port}\ntls = "implicit"\n'
        f'ca-file = "{smtp.ca_file}"\nfrom = "app@example.org"\n'
    )
    config.chmod(0o600)
    queue = CeleryQueue(make_app(config=config))
    rows: list[tuple[int, float, float]] = []
    try:
        for workers in (1, 2, 4):
            proc = subprocess.Popen(
                [
                    str(CELERY),
                    "-A",
                    "e2email.celery",
                    "worker",
                    "--pool",
                    "prefork",
                    "-c",
                    str(workers),
                    "--loglevel",
                    "error",
                    "-n",
                    f"bench{workers}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env={**os.environ, "E2EMAIL_CONFIG": str(config)},
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                # Warm up: every process has its TLS connection open before timing.
                start_count = len(smtp.messages)
                warm = [[_copy(n, f"warm{workers}-", args.size)] for n in range(workers * 4)]
                queue.enqueue(warm, account="app", batch_size=1)
                _wait_received(smtp, start_count + len(warm))
                before = len(smtp.messages)
                copies = [[_copy(n, f"run{workers}-", args.size)] for n in range(args.copies)]
                t0 = time.perf_counter()
                queue.enqueue(copies, account="app", batch_size=args.batch)
                _wait_received(smtp, before + args.copies)
                elapsed = time.perf_counter() - t0
                rows.append((workers, elapsed, args.copies / elapsed))
                print(
                    f"{workers} worker process(es): {args.copies} copies in {elapsed:.2f} s "
                    f"= {args.copies / elapsed:.1f}/s",
                    flush=True,
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

        # 10,000 copies queued with no worker running: the broker's memory, the producer's time.
        client.flushdb()
        base = int(client.info("memory")["used_memory"])
        copies = [[_copy(n, "mem-", args.size)] for n in range(args.queued)]
        t0 = time.perf_counter()
        queued = queue.enqueue(copies, account="app", batch_size=50)
        producer = time.perf_counter() - t0
        used = int(client.info("memory")["used_memory"]) - base
    finally:
        smtp.stop()
        rproc.terminate()
        rproc.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    one = rows[0][2]
    print()
    print("| worker processes | copies/s | speed-up |")
    print("|---|---|---|")
    for workers, _, rate in rows:
        print(f"| {workers} | {rate:.1f} | {rate / one:.2f}x |")
    print()
    print(
        f"{args.queued} copies of {args.size} bytes queued in {len(queued.task_ids)} tasks: "
        f"producer {producer:.2f} s ({args.queued / producer:.0f} copies/s), "
        f"Redis memory +{used / 1e6:.1f} MB ({used / args.queued:.0f} bytes per copy)"
    )


def _wait_received(smtp: LoopbackSMTPServer, count: int) -> None:
    _wait(lambda: len(smtp.messages) >= count)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
