"""``e2email doctor`` against loopback servers: implicit TLS, STARTTLS, no TLS, closed and
silent ports, bad certificates and old TLS; the JSON report, the advice, and proof (from the
servers' own records) that it never sends AUTH or MAIL."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from e2email.cli import cli
from e2email.doctor import DoctorReport, PortReport, _host_matches, diagnose_sync
from e2email.testing import LoopbackSMTPServer, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]

HOST = "127.0.0.1"
PROBE_VERBS = {"EHLO", "STARTTLS", "QUIT"}


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def by_port(report: DoctorReport | dict[str, Any]) -> dict[int, Any]:
    if isinstance(report, DoctorReport):
        return {p.port: p for p in report.ports}
    return {p["port"]: p for p in report["ports"]}


def only_probe_commands(*servers: LoopbackSMTPServer) -> None:
    for server in servers:
        assert set(server.received_commands()) <= PROBE_VERBS, server.received_commands()
        assert server.auth_attempts == []
        assert server.messages == []


def test_json_for_implicit_starttls_plain_and_closed(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int
) -> None:
    """The CLI's --json report for an implicit-TLS server (465), a STARTTLS server with
    REQUIRETLS and XOAUTH2 (587), a server without TLS (25) and a closed port (2525): mode,
    version, cipher, verified certificate with names and expiry, extensions read inside TLS,
    usability, and a recommendation of 465. Exit status 0. Only EHLO/STARTTLS/QUIT reached the
    servers, although all of them require AUTH."""
    implicit = smtp_server(
        tls="implicit", credentials={"u": "p"}, offer_pipelining=True, offer_chunking=True
    )
    starttls = smtp_server(
        tls="starttls", credentials={"u": "p"}, xoauth2_tokens={"u": "t"}, offer_requiretls=True
    )
    plain = smtp_server(tls="none")
    result = CliRunner().invoke(
        cli,
        [
            "doctor",
            HOST,
            "--json",
            "--timeout",
            "3",
            "--ca-file",
            str(module_ca.ca_file),
            "--port-map",
            f"465={implicit.port}",
            "--port-map",
            f"587={starttls.port}",
            "--port-map",
            f"25={plain.port}",
            "--port-map",
            f"2525={closed_port}",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    ports = by_port(data)
    assert data["host"] == HOST and data["ok"] is True
    assert sorted(ports) == [25, 465, 587, 2525]

    p465 = ports[465]
    assert p465["connected_port"] == implicit.port
    assert p465["reachable"] is True and p465["tls"] == "implicit" and p465["usable"] is True
    assert p465["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert p465["cipher"]
    cert = p465["certificate"]
    assert cert["verified"] is True and cert["host_matches"] is True
    assert "127.0.0.1" in cert["names"] and "localhost" in cert["names"]
    assert "trustme" in cert["issuer"]
    assert cert["not_after"].startswith("3000-01-01") and cert["days_left"] > 300_000
    assert p465["auth_mechanisms"] == ["PLAIN", "LOGIN"]
    assert p465["size_limit"] == 33554432 and p465["eightbitmime"] is True
    assert p465["requiretls"] is False and p465["problems"] == []
    assert p465["pipelining"] is True and p465["chunking"] is True

    p587 = ports[587]
    assert p587["tls"] == "starttls" and p587["usable"] is True
    assert "STARTTLS" in p587["extensions_before_tls"]
    assert "STARTTLS" not in p587["extensions"]  # the EHLO after TLS
    assert "REQUIRETLS" not in p587["extensions_before_tls"]
    assert p587["requiretls"] is True
    assert p587["pipelining"] is False and p587["chunking"] is False
    assert p587["auth_mechanisms"] == ["PLAIN", "LOGIN", "XOAUTH2"]

    p25 = ports[25]
    assert p25["reachable"] is True and p25["tls"] == "none" and p25["usable"] is False
    assert p25["certificate"] is None
    assert any("no TLS" in p for p in p25["problems"])

    p2525 = ports[2525]
    assert p2525["reachable"] is False and p2525["error"] == "connection refused"

    assert data["recommendation"]["port"] == 465
    assert data["recommendation"]["tls"] == "implicit"
    assert "Use port 465" in data["recommendation"]["text"]
    only_probe_commands(implicit, starttls, plain)
    assert starttls.received_commands() == ["EHLO", "STARTTLS", "EHLO", "QUIT"]


def test_bad_certificates_are_read_but_not_trusted(
    smtp_server: ServerFactory, module_ca: TestCA
) -> None:
    """A wrong-host certificate (STARTTLS) and one from an untrusted CA (implicit): reported
    as not verified, with the reason and the certificate details read by a second,
    non-verifying handshake; host_matches tells the two apart; neither is usable, and the
    advice says no port can be used."""
    wrong_host = smtp_server(tls="starttls", identities=("wrong.example",))
    with TestCA() as other:
        untrusted = smtp_server(tls="implicit", ca=other)
        report = diagnose_sync(
            HOST,
            ports={465: untrusted.port, 587: wrong_host.port},
            ca_file=module_ca.ca_file,
            timeout=3,
        )
    ports = by_port(report)
    p587: PortReport = ports[587]
    assert p587.tls == "starttls" and not p587.usable
    assert p587.certificate is not None
    assert p587.certificate.verified is False
    assert p587.certificate.host_matches is False
    assert p587.certificate.names == ("wrong.example",)
    assert "mismatch" in (p587.certificate.verify_error or "")
    assert any("not for 127.0.0.1" in p for p in p587.problems)

    p465: PortReport = ports[465]
    assert p465.tls == "implicit" and not p465.usable
    assert p465.certificate is not None and p465.certificate.verified is False
    assert p465.certificate.host_matches is True
    assert "certificate" in (p465.certificate.verify_error or "")

    assert report.ok is False
    assert report.recommendation.port is None
    assert "No port" in report.recommendation.text
    only_probe_commands(wrong_host, untrusted)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_is_named(smtp_server: ServerFactory, module_ca: TestCA) -> None:
    """A TLS-1.0-only server: the version is read (without verification) and named as the
    problem; not usable."""
    v1 = ssl.TLSVersion.TLSv1
    old = smtp_server(tls="implicit", tls_versions=(v1, v1))
    report = diagnose_sync(HOST, ports={465: old.port}, ca_file=module_ca.ca_file, timeout=3)
    (p465,) = report.ports
    assert p465.tls == "implicit" and p465.tls_version == "TLSv1"
    assert p465.usable is False
    assert any("TLS 1.2" in p for p in p465.problems)
    assert p465.certificate is not None and p465.certificate.verified is False


def test_fallback_advice_and_unusual_modes(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int
) -> None:
    """465 closed and 587 answering with STARTTLS: the advice is 587 and says why not 465. A
    STARTTLS server on 2525 is detected as such; an implicit-TLS server on the 25 slot is found
    after the plain greeting never comes, and flagged as unusual."""
    starttls = smtp_server(tls="starttls")
    implicit = smtp_server(tls="implicit")
    report = diagnose_sync(
        HOST,
        ports={465: closed_port, 587: starttls.port, 25: implicit.port},
        ca_file=module_ca.ca_file,
        timeout=0.5,
    )
    ports = by_port(report)
    assert ports[587].tls == "starttls" and ports[587].usable
    assert ports[25].tls == "implicit" and ports[25].usable
    assert any("--tls implicit" in p for p in ports[25].problems)
    assert report.recommendation.port == 587
    assert "port 465: not reachable (connection refused)" in report.recommendation.text
    assert "--port 587" in report.recommendation.text


def test_silent_ports_probed_concurrently(silent_port: int) -> None:
    """Ports that accept but never speak: reachable, no SMTP and no TLS found, each within the
    timeout; the four probes run at the same time (far less than four times one probe)."""
    start = time.monotonic()
    report = diagnose_sync(
        HOST, ports=dict.fromkeys((25, 465, 587, 2525), silent_port), timeout=0.5
    )
    elapsed = time.monotonic() - start
    assert elapsed < 4 * 1.0
    for port in report.ports:
        assert port.reachable is True and port.tls is None and not port.usable
        assert "neither SMTP nor TLS" in port.problems[0]


def test_cli_human_output_and_exit_status(
    smtp_server: ServerFactory, module_ca: TestCA, closed_port: int
) -> None:
    """Without --json the report is readable text ending in the advice; with no usable port the
    exit status is 4."""
    implicit = smtp_server(tls="implicit")
    runner = CliRunner()
    args = ["doctor", HOST, "--timeout", "2", "--ca-file", str(module_ca.ca_file)]
    ok = runner.invoke(
        cli, [*args, "--port-map", f"465={implicit.port}", "--port-map", f"587={closed_port}"]
    )
    assert ok.exit_code == 0, ok.output
    assert "port 465" in ok.output and "usable" in ok.output and "Use port 465" in ok.output
    none = runner.invoke(
        cli,
        [
            *args,
            *(f"--port-map={p}={closed_port}" for p in (25, 465, 587, 2525)),
        ],
    )
    assert none.exit_code == 4
    assert "No port" in none.output


@pytest.mark.parametrize("bad", ["465", "465=x", "110=1000", "465=70000"])
def test_cli_port_map_checked(bad: str) -> None:
    """--port-map accepts only STANDARD=PORT for the four probed ports: usage error (2)."""
    result = CliRunner().invoke(cli, ["doctor", HOST, "--port-map", bad])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("host", "names", "expected"),
    [
        ("smtp.example.org", ("smtp.example.org",), True),
        ("SMTP.Example.org", ("smtp.example.org",), True),
        ("smtp.example.org", ("*.example.org",), True),
        ("a.smtp.example.org", ("*.example.org",), False),
        ("example.org", ("*.example.org",), False),
        ("smtp.example.org", ("mail.example.org",), False),
        ("127.0.0.1", ("127.0.0.1",), True),
        ("127.0.0.1", ("localhost",), False),
        ("::1", ("0:0:0:0:0:0:0:1",), True),
    ],
)
def test_host_name_matching(host: str, names: tuple[str, ...], expected: bool) -> None:
    """The report's own host-name match (used when verification failed): exact names,
    one-label wildcards (RFC 6125 §6.4.3), IP addresses compared as addresses."""
    assert _host_matches(host, names) is expected


def test_a_greeting_line_over_64_kib_is_a_port_problem_not_a_crash(closed_port: int) -> None:
    """A server whose greeting is one line longer than StreamReader's 64 KiB limit: the
    probe of that port reports a problem; doctor neither raises nor loses the other ports."""
    import threading

    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        port = int(listener.getsockname()[1])

        def serve() -> None:
            for _ in range(4):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.sendall(b"220-" + b"x" * 70_000 + b"\r\n")
                        conn.settimeout(1)
                        conn.recv(10)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        report = diagnose_sync(HOST, ports={587: port, 25: closed_port}, timeout=2)
    ports = by_port(report)
    assert not ports[587].usable
    assert ports[25].reachable is False


def test_bytes_in_clear_after_the_starttls_220_are_an_injection_not_extensions(
    module_ca: TestCA,
) -> None:
    """A server (or a man in the middle) that sends EHLO lines in clear right after STARTTLS's
    220: doctor reports a STARTTLS injection problem for that port, does not call it usable,
    and never shows the injected AUTH PLAIN / REQUIRETLS as offered inside TLS."""
    import threading

    ctx = module_ca.server_context(HOST, "localhost")
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        port = int(listener.getsockname()[1])

        def serve() -> None:
            for _ in range(2):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    with conn, conn.makefile("rb") as lines:
                        conn.sendall(b"220 evil ESMTP\r\n")
                        lines.readline()  # EHLO
                        conn.sendall(b"250-evil\r\n250 STARTTLS\r\n")
                        lines.readline()  # STARTTLS
                        conn.sendall(
                            b"220 go ahead\r\n250-injected\r\n250-AUTH PLAIN\r\n250 REQUIRETLS\r\n"
                        )
                        conn.settimeout(2)
                        with ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(100)
                            tls.sendall(b"250-real\r\n250 SIZE 10\r\n")
                            tls.recv(100)
                except (OSError, ssl.SSLError):
                    pass

        threading.Thread(target=serve, daemon=True).start()
        report = diagnose_sync(HOST, ports={587: port}, ca_file=module_ca.ca_file, timeout=2)
    found = by_port(report)[587]
    assert not found.usable and not found.requiretls
    assert found.auth_mechanisms == () and "REQUIRETLS" not in found.extensions
    assert any("STARTTLS injection" in p for p in found.problems), found.problems
