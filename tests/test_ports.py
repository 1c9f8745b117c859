"""Port choice without a configured port: the order, when the next port is tried (only past
ports that cannot be reached), what is reported, and the per-host memory."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2email.config import DEFAULT_PORT_ORDER, SMTPSettings, TLSMode
from e2email.errors import ConfigError, ConnectError, TLSError
from e2email.testing import Fault, HostileSMTPServer, LoopbackSMTPServer, TestCA
from e2email.transport.ports import HostMemory, PortAttempt, order_candidates
from e2email.transport.smtp import SMTPConnection, SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

RAW = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: ports\r\n\r\nHi.\r\n"
USER = "alice"
PASSWORD = "correct horse battery"

MODE = {"implicit": TLSMode.IMPLICIT, "starttls": TLSMode.STARTTLS}


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says anything."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def entry(server: LoopbackSMTPServer) -> tuple[int, TLSMode]:
    return (server.port, MODE[server.tls])


def settings(order: list[tuple[int, TLSMode]], module_ca: TestCA, **kwargs: Any) -> SMTPSettings:
    kwargs.setdefault("timeout", 5)
    return SMTPSettings(
        host="127.0.0.1", port_order=tuple(order), ca_file=module_ca.ca_file, **kwargs
    )


def open_and_send(settings: SMTPSettings) -> tuple[PortAttempt, ...]:
    async def run() -> tuple[PortAttempt, ...]:
        conn: SMTPConnection
        async with SMTPTransport(settings).connect() as conn:
            await conn.send(RAW, mail_from="alice@example.org", recipients=["bob@example.net"])
            return conn.attempts

    return asyncio.run(run())


def connect_error(settings: SMTPSettings) -> BaseException:
    with pytest.raises((ConnectError, TLSError)) as info:
        open_and_send(settings)
    return info.value


# -- the order ----------------------------------------------------------------------------------


def test_default_order_is_465_587_2525_never_25() -> None:
    """Only a host given: 465 implicit TLS, then 587 and 2525 with STARTTLS required; 25 and
    plaintext are not candidates."""
    plain = SMTPSettings(host="smtp.example.org")
    assert DEFAULT_PORT_ORDER == (465, 587, 2525)
    assert plain.candidates == (
        (465, TLSMode.IMPLICIT),
        (587, TLSMode.STARTTLS),
        (2525, TLSMode.STARTTLS),
    )
    assert plain.effective_port == 465
    assert plain.effective_tls is TLSMode.IMPLICIT
    starttls = SMTPSettings(host="smtp.example.org", tls=TLSMode.STARTTLS)
    assert starttls.candidates == ((587, TLSMode.STARTTLS), (2525, TLSMode.STARTTLS))
    assert starttls.effective_port == 587
    assert SMTPSettings(host="h", port=25).candidates == ((25, TLSMode.STARTTLS),)
    assert SMTPSettings(host="h", port_order=(587, 25)).candidates[-1] == (25, TLSMode.STARTTLS)


@pytest.mark.parametrize(
    "order",
    [
        (),
        (465, 465),
        (10025,),
        ((2500, TLSMode.INSECURE_PLAINTEXT),),
        (0,),
        ((465, "implicit"),),
    ],
)
def test_bad_port_order_refused(order: tuple[Any, ...]) -> None:
    """An empty order, a repeated port, a non-standard port without a mode, plaintext, an
    invalid port or a mode that is not a TLSMode: ConfigError."""
    with pytest.raises(ConfigError):
        SMTPSettings(host="smtp.example.org", port_order=order)


def test_memory_only_reorders_configured_candidates() -> None:
    """A remembered port moves to the front only if it is a candidate: a memory file naming
    port 25 or plaintext cannot add either."""
    candidates = ((465, TLSMode.IMPLICIT), (587, TLSMode.STARTTLS))
    assert order_candidates(candidates, (587, TLSMode.STARTTLS)) == (
        (587, TLSMode.STARTTLS),
        (465, TLSMode.IMPLICIT),
    )
    assert order_candidates(candidates, (25, TLSMode.STARTTLS)) == candidates
    assert order_candidates(candidates, (587, TLSMode.INSECURE_PLAINTEXT)) == candidates
    assert order_candidates(candidates, None) == candidates


# -- falling back -------------------------------------------------------------------------------


def test_refused_port_falls_back_and_is_remembered(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tmp_path: Path
) -> None:
    """First candidate refused: the second is used, both attempts are reported, the choice is
    written to the hosts file and tried first next time (the refused port is not tried again)."""
    server = smtp_server(tls="starttls", credentials={USER: PASSWORD})
    hosts = tmp_path / "home" / "hosts.json"
    config = settings(
        [(closed_port, TLSMode.IMPLICIT), entry(server)],
        module_ca,
        hosts_file=hosts,
        username=USER,
        password=PASSWORD,
    )
    attempts = open_and_send(config)

    assert [(a.port, a.outcome) for a in attempts] == [
        (closed_port, "refused"),
        (server.port, "ok"),
    ]
    assert "refused" in str(attempts[0]).lower()
    assert len(server.messages) == 1
    stored = json.loads(hosts.read_text())
    assert stored["hosts"]["127.0.0.1"]["port"] == server.port
    assert stored["hosts"]["127.0.0.1"]["tls"] == "starttls"
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o600

    again = open_and_send(config)
    assert [(a.port, a.outcome) for a in again] == [(server.port, "ok")]
    assert len(server.messages) == 2


def test_memory_can_be_injected(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tmp_path: Path
) -> None:
    """The memory can be passed to the transport instead of a path in the settings."""
    server = smtp_server(tls="implicit")
    memory = HostMemory(tmp_path / "m.json")
    config = settings([(closed_port, TLSMode.IMPLICIT), entry(server)], module_ca)
    assert SMTPTransport(config, memory=memory).candidates()[0][0] == closed_port

    async def run() -> None:
        async with SMTPTransport(config, memory=memory).connect():
            pass

    asyncio.run(run())
    assert memory.recall("127.0.0.1") == (server.port, TLSMode.IMPLICIT)
    assert SMTPTransport(config, memory=memory).candidates()[0] == entry(server)


def test_silent_port_times_out_then_falls_back(
    smtp_server: ServerFactory, module_ca: TestCA, silent_port: int
) -> None:
    """A port that accepts but never greets (a black hole) times out after connect_timeout, and
    the next port is used."""
    server = smtp_server(tls="implicit")
    config = settings(
        [(silent_port, TLSMode.STARTTLS), entry(server)], module_ca, connect_timeout=0.3
    )
    attempts = open_and_send(config)
    assert [a.outcome for a in attempts] == ["timed out", "ok"]
    assert "timed out" in attempts[0].detail


def test_greeting_refusal_falls_back(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A port whose server greets with 554 (no service here) counts as unavailable."""
    busy = smtp_server(tls="starttls", faults=[Fault("connect", "reply", 554, "5.3.2 go away")])
    server = smtp_server(tls="implicit")
    attempts = open_and_send(settings([entry(busy), entry(server)], module_ca))
    assert [a.outcome for a in attempts] == ["greeting", "ok"]


def test_all_unreachable_lists_every_attempt(
    module_ca: TestCA, closed_port: int, silent_port: int
) -> None:
    """No candidate reachable: one ConnectError (transient) whose message and attempts name
    every port tried and why."""
    config = settings(
        [(closed_port, TLSMode.IMPLICIT), (silent_port, TLSMode.STARTTLS)],
        module_ca,
        connect_timeout=0.3,
    )
    err = connect_error(config)
    assert isinstance(err, ConnectError)
    assert err.transient is True
    assert [(a.port, a.outcome) for a in err.attempts] == [
        (closed_port, "refused"),
        (silent_port, "timed out"),
    ]
    text = str(err)
    assert "any port" in text
    assert f"port {closed_port} (implicit TLS)" in text
    assert f"port {silent_port} (STARTTLS)" in text


# -- not falling back: security signals stop the search --------------------------------------


def test_stripped_starttls_is_reported_and_the_next_port_is_used(
    smtp_server: ServerFactory, module_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    """STARTTLS stripped on the first candidate (what a middlebox does, the reason 2525
    exists): the next port is tried under the same checks and carries the message; the
    stripped port saw nothing but EHLO (and QUIT), and the skip is reported as a warning and in
    the attempts."""
    stripped = smtp_server(tls="starttls", offer_starttls=False, credentials={USER: PASSWORD})
    good = smtp_server(tls="starttls", credentials={USER: PASSWORD})
    with caplog.at_level("WARNING", logger="e2email.transport.smtp"):
        attempts = open_and_send(
            settings([entry(stripped), entry(good)], module_ca, username=USER, password=PASSWORD)
        )
    assert [a.outcome for a in attempts] == ["no starttls", "ok"]
    assert "does not offer STARTTLS" in attempts[0].detail
    assert stripped.received_commands() in (["EHLO"], ["EHLO", "QUIT"])
    assert stripped.messages == [] and stripped.auth_attempts == []
    assert b"alice" not in stripped.cleartext() and b"bob@" not in stripped.cleartext()
    (message,) = good.messages
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert good.auth_attempts == [(USER, True)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"port {stripped.port} (STARTTLS): no starttls" in w for w in warnings), warnings


def test_starttls_refused_with_454_goes_on_to_the_next_port(
    module_ca: TestCA, smtp_server: ServerFactory
) -> None:
    """A 454 to STARTTLS (RFC 3207 §4) is a port without TLS, like a stripped offer: the next
    port carries the message; the refusing port saw EHLO and STARTTLS only."""
    refusing = HostileSMTPServer(
        tls="starttls", ca=module_ca, starttls_reply=(454, "4.7.0 TLS not available")
    ).start()
    try:
        good = smtp_server(tls="implicit")
        attempts = open_and_send(settings([entry(refusing), entry(good)], module_ca))
        assert [a.outcome for a in attempts] == ["no starttls", "ok"]
        assert "454" in attempts[0].detail
        assert refusing.received_commands() in (["EHLO", "STARTTLS"], ["EHLO", "STARTTLS", "QUIT"])
        assert refusing.messages == [] and len(good.messages) == 1
    finally:
        refusing.stop()


def test_no_port_with_starttls_is_a_tls_error_naming_every_port(
    module_ca: TestCA, smtp_server: ServerFactory, closed_port: int
) -> None:
    """Every port unreachable, stripped or refusing STARTTLS: one TLSError (exit 4, not
    transient: a retry loop must not turn it into "deferred") naming each port and why."""
    stripped = smtp_server(tls="starttls", offer_starttls=False)
    refusing = HostileSMTPServer(
        tls="starttls", ca=module_ca, starttls_reply=(454, "4.7.0 TLS not available")
    ).start()
    try:
        err = connect_error(
            settings([(closed_port, TLSMode.IMPLICIT), entry(stripped), entry(refusing)], module_ca)
        )
    finally:
        refusing.stop()
    assert isinstance(err, TLSError)
    assert err.transient is False
    assert [a.outcome for a in err.attempts] == ["refused", "no starttls", "no starttls"]
    text = str(err)
    assert "could be used with TLS" in text
    assert f"port {stripped.port} (STARTTLS): no starttls" in text
    assert "454 4.7.0 TLS not available" in text
    assert stripped.messages == [] and refusing.messages == []


def test_a_certificate_failure_after_a_stripped_port_still_stops_the_search(
    smtp_server: ServerFactory, module_ca: TestCA
) -> None:
    """Past a stripped port the same checks apply: a certificate for another host stops the
    search there (TLSError), and the port after it is never contacted."""
    stripped = smtp_server(tls="starttls", offer_starttls=False)
    wrong = smtp_server(tls="starttls", identities=("wrong.example",))
    good = smtp_server(tls="implicit")
    err = connect_error(settings([entry(stripped), entry(wrong), entry(good)], module_ca))
    assert isinstance(err, TLSError)
    assert err.transient is False
    assert [a.outcome for a in err.attempts] == ["no starttls", "certificate"]
    assert "not trying other ports" in str(err)
    assert good.connections == 0
    assert wrong.received_commands() in (["EHLO", "STARTTLS"], ["EHLO", "STARTTLS", "QUIT"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_old_tls_version_after_a_stripped_port_still_stops_the_search(
    smtp_server: ServerFactory, module_ca: TestCA
) -> None:
    """Likewise a TLS-1.0-only server after a stripped port: TLSError, no further port."""
    import ssl

    v1 = ssl.TLSVersion.TLSv1
    old_ctx = module_ca.server_context("127.0.0.1", minimum_version=v1, maximum_version=v1)
    stripped = smtp_server(tls="starttls", offer_starttls=False)
    old = smtp_server(tls="implicit", ssl_context=old_ctx)
    good = smtp_server(tls="implicit")
    err = connect_error(settings([entry(stripped), entry(old), entry(good)], module_ca))
    assert isinstance(err, TLSError)
    assert [a.outcome for a in err.attempts] == ["no starttls", "tls"]
    assert good.connections == 0


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_certificate_failure_stops_the_search(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tls: str
) -> None:
    """A certificate for another host on a reachable port: TLSError naming the certificate
    problem and the ports tried before it; the remaining port is never contacted."""
    wrong = smtp_server(tls=tls, identities=("wrong.example",))
    good = smtp_server(tls="implicit")
    err = connect_error(
        settings([(closed_port, TLSMode.IMPLICIT), entry(wrong), entry(good)], module_ca)
    )
    assert isinstance(err, TLSError)
    assert err.transient is False
    assert [a.outcome for a in err.attempts] == ["refused", "certificate"]
    assert "mismatch" in str(err)
    assert "not trying other ports" in str(err)
    assert good.connections == 0


def test_explicit_port_never_falls_back(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tmp_path: Path
) -> None:
    """With a port configured only that port is tried (port_order is ignored) and nothing is
    remembered."""
    good = smtp_server(tls="implicit")
    hosts = tmp_path / "hosts.json"
    config = SMTPSettings(
        host="127.0.0.1",
        port=closed_port,
        tls=TLSMode.IMPLICIT,
        port_order=(entry(good),),
        ca_file=module_ca.ca_file,
        hosts_file=hosts,
        timeout=5,
    )
    err = connect_error(config)
    assert isinstance(err, ConnectError)
    assert len(err.attempts) == 1
    assert good.connections == 0
    assert not hosts.exists()


def test_remembered_port_failing_falls_back_and_is_updated(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tmp_path: Path
) -> None:
    """A remembered port that now refuses: tried first, then the others in order; the memory is
    updated to the port that worked."""
    server = smtp_server(tls="implicit")
    memory = HostMemory(tmp_path / "hosts.json")
    memory.remember("127.0.0.1", closed_port, TLSMode.STARTTLS)
    config = settings(
        [entry(server), (closed_port, TLSMode.STARTTLS)],
        module_ca,
        hosts_file=memory.path,
    )
    attempts = open_and_send(config)
    assert [(a.port, a.outcome) for a in attempts] == [
        (closed_port, "refused"),
        (server.port, "ok"),
    ]
    assert memory.recall("127.0.0.1") == entry(server)


# -- the memory file ----------------------------------------------------------------------------


def test_host_memory_file(tmp_path: Path) -> None:
    """HostMemory: case-insensitive host keys, a private file replaced atomically (no temporary
    files left), unchanged entries not rewritten, forget() removes an entry."""
    path = tmp_path / "sub" / "hosts.json"
    memory = HostMemory(path)
    assert memory.recall("smtp.example.org") is None
    memory.remember("SMTP.Example.org.", 587, TLSMode.STARTTLS)
    assert memory.recall("smtp.example.org") == (587, TLSMode.STARTTLS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    memory.remember("smtp.example.org", 587, TLSMode.STARTTLS)
    assert path.stat().st_mtime_ns == before - 10**9  # not rewritten
    memory.remember("other.example", 465, TLSMode.IMPLICIT)
    assert sorted(json.loads(path.read_text())["hosts"]) == ["other.example", "smtp.example.org"]
    memory.forget("smtp.example.org")
    assert memory.recall("smtp.example.org") is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["hosts.json"]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"hosts": []}',
        '{"hosts": {"h": {"port": "x", "tls": "starttls"}}}',
        '{"hosts": {"h": {"port": 587, "tls": "carrier-pigeon"}}}',
        '{"hosts": {"h": {"port": 70000, "tls": "starttls"}}}',
    ],
)
def test_bad_memory_file_is_ignored(tmp_path: Path, content: str) -> None:
    """An unreadable or malformed memory file means nothing is remembered (no exception), and
    remembering replaces it with a valid one."""
    path = tmp_path / "hosts.json"
    path.write_text(content)
    memory = HostMemory(path)
    assert memory.recall("h") is None
    memory.remember("h", 465, TLSMode.IMPLICIT)
    assert memory.recall("h") == (465, TLSMode.IMPLICIT)


def test_unwritable_memory_does_not_fail_the_send(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int, tmp_path: Path
) -> None:
    """When the memory cannot be written (its folder is a file) the message still goes out."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    server = smtp_server(tls="implicit")
    config = settings(
        [(closed_port, TLSMode.IMPLICIT), entry(server)],
        module_ca,
        hosts_file=blocker / "hosts.json",
    )
    open_and_send(config)
    assert len(server.messages) == 1
