"""Key discovery (issue 10): WKD and keyservers against local HTTPS servers with a test CA,
the trust policy (a different key is refused until accepted), the cache, and the send path
(nothing reaches the SMTP server when discovery cannot serve a recipient)."""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from fixtures_pgp import Keys
from pgp_helpers import TestKey, generate_key, gpg, kill_agent, new_gnupg_home

from e2email.client import AsyncMailer
from e2email.config import DiscoveryPolicy, Protection, SMTPSettings
from e2email.discovery import DiscoverySettings, accept_key, discover_missing, hosts_resolver
from e2email.discovery.keyserver import keyserver_url
from e2email.discovery.wkd import wkd_hash, wkd_urls
from e2email.errors import KeyReason, RecipientKeyError
from e2email.keysources import SourceKind
from e2email.keystore import Keystore
from e2email.message import Message

# ---------------------------------------------------------------------------------------
# A loopback HTTPS server that answers per (host, path) and counts what it was asked.


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    location: str | None = None
    #: Announce and stream this many bytes (a huge answer); None: send ``body``.
    huge: int | None = None
    #: Announce no length for the huge answer (read until the connection closes).
    no_length: bool = False
    #: Never answer (until the server stops).
    hang: bool = False


@dataclass
class HTTPSServer:
    context: ssl.SSLContext
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    hits: Counter[tuple[str, str]] = field(default_factory=Counter)
    queries: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def start(self) -> HTTPSServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                path, _, query = self.path.partition("?")
                owner.hits[(host, path)] += 1
                owner.queries.append(query)
                route = owner.routes.get((host, path), Route(status=404))
                if route.hang:
                    owner.stop_event.wait(30)
                    return
                self.send_response(route.status)
                if route.location:
                    self.send_header("Location", route.location)
                if route.huge is not None:
                    if not route.no_length:
                        self.send_header("Content-Length", str(route.huge))
                    self.end_headers()
                    chunk = b"\0" * 65536
                    try:
                        for _ in range(route.huge // len(chunk)):
                            self.wfile.write(chunk)
                    except OSError:
                        pass  # the client hung up, as it should
                    return
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The TLS handshake in the request's own thread, not in the accept loop.
                request.settimeout(30)
                with owner.context.wrap_socket(request, server_side=True) as tls:
                    super().finish_request(tls, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # failed handshakes of the bad-certificate tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def serve_key(self, host: str, address: str, data: bytes, *, advanced: bool = True) -> str:
        loc = wkd_urls(address)
        url = loc.advanced if advanced else loc.direct
        path = url.split(host, 1)[1].partition("?")[0]
        self.routes[(host, path)] = Route(body=data)
        return path


HOSTS = ["openpgpkey.adv.test", "adv.test", "direct.test", "keys.test"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture
def server(ca: trustme.CA) -> Iterator[HTTPSServer]:
    srv = HTTPSServer(_context(ca, *HOSTS)).start()
    yield srv
    srv.stop()


@pytest.fixture
def settings(server: HTTPSServer, ca_file: Path) -> DiscoverySettings:
    return DiscoverySettings(
        ca_file=ca_file,
        connect_timeout=2,
        timeout=5,
        keyservers=("https://keys.test",),
        resolver=hosts_resolver({h: ("127.0.0.1", server.port) for h in HOSTS}),
    )


@dataclass(frozen=True)
class Peers:
    ann: TestKey  # ann@adv.test, served by the advanced method
    dan: TestKey  # dan@direct.test, served by the direct method
    stranger: TestKey  # someone@else.test: served for a WKD address it does not carry
    old: TestKey  # old@adv.test, expired
    bob_old: TestKey  # bob@adv.test, the key the keystore has (expired)
    bob_new: TestKey  # bob@adv.test, the key WKD serves
    multi: TestKey  # multi@adv.test with a second user ID other@else.test
    secrets: Path  # a GnuPG home with every peer's secret key (the receiving side)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    factory = new_gnupg_home("e2df")
    out = new_gnupg_home("e2do")
    secrets = new_gnupg_home("e2ds")
    try:
        made = Peers(
            ann=generate_key(factory, out, "ann@adv.test"),
            dan=generate_key(factory, out, "dan@direct.test"),
            stranger=generate_key(factory, out, "someone@else.test"),
            old=generate_key(
                factory, out, "old@adv.test", expire="1d", faked_time="20200101T000000"
            ),
            bob_old=_renamed(
                generate_key(
                    factory, out, "bob@adv.test", expire="1d", faked_time="20200101T000000"
                ),
                out,
                "bobold",
            ),
            bob_new=_renamed(generate_key(factory, out, "bob@adv.test"), out, "bobnew"),
            multi=generate_key(factory, out, "multi@adv.test"),
            secrets=secrets,
        )
        gpg(factory, "--quick-add-uid", made.multi.fingerprint, "Other <other@else.test>")
        made.multi.cert.write_bytes(
            gpg(factory, "--armor", "--export", made.multi.fingerprint).stdout
        )
        for key in (made.ann, made.dan, made.bob_new, made.multi):
            assert key.secret
            gpg(secrets, "--import", str(key.secret))
        yield made
    finally:
        for home in (factory, out, secrets):
            kill_agent(home)
            shutil.rmtree(home, ignore_errors=True)


def _renamed(key: TestKey, out: Path, stem: str) -> TestKey:
    """generate_key names files by the local part: keep a second key for one address."""
    cert = out / f"{stem}.cert"
    shutil.copy(key.cert, cert)
    secret = out / f"{stem}.key"
    assert key.secret
    shutil.copy(key.secret, secret)
    return TestKey(key.address, key.fingerprint, cert, secret)


@pytest.fixture
def store(tmp_path: Path, keys: Keys) -> Iterator[Keystore]:
    """A sender's keystore: alice's secret key and nothing about the peers."""
    ks = Keystore(tmp_path / "home")
    assert keys.alice.secret
    ks.import_file(keys.alice.secret)
    yield ks
    ks.shutdown_agent()


def _discover(
    store: Keystore, addresses: list[str], settings: DiscoverySettings, policy: str = "wkd"
) -> dict[str, Any]:
    return asyncio.run(discover_missing(store, addresses, policy, settings=settings))


# ---------------------------------------------------------------------------------------


def test_wkd_hash_vector_and_urls() -> None:
    assert wkd_hash("Joe.Doe") == "iy9q119eutrkn8s1mk4r39qejnbu3n5q"
    loc = wkd_urls("Joe.Doe@Example.ORG")
    assert loc.advanced == (
        "https://openpgpkey.example.org/.well-known/openpgpkey/example.org/hu/"
        "iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe"
    )
    assert loc.direct == (
        "https://example.org/.well-known/openpgpkey/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe"
    )
    # The local part is sent percent-encoded; only ASCII letters are folded for the hash.
    assert wkd_urls("a+b/c@example.org").advanced.endswith("?l=a%2Bb%2Fc")
    assert wkd_hash("ÄB") == wkd_hash("Äb") != wkd_hash("äb")
    assert keyserver_url("https://keys.openpgp.org", "a+b@x.org") == (
        "https://keys.openpgp.org/vks/v1/by-email/a%2Bb%40x.org"
    )
    assert keyserver_url("hkps://keys.test:8443", "a@x.org") == (
        "https://keys.test:8443/pks/lookup?op=get&options=mr&search=a@x.org"
    )


def test_wkd_advanced_imports_only_the_matching_user_id_with_its_source(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    path = server.serve_key("openpgpkey.adv.test", "multi@adv.test", peers.multi.cert.read_bytes())
    assert _discover(store, ["Multi@adv.test"], settings) == {}
    key = store.get(peers.multi.fingerprint)
    assert key is not None
    assert key.addresses == ("multi@adv.test",)  # other@else.test was dropped
    assert store.encryption_key("multi@adv.test") == key
    source = store.source_of(key)
    assert source is not None and source.kind is SourceKind.WKD
    assert "openpgpkey.adv.test" in source.detail
    assert server.hits[("openpgpkey.adv.test", path)] == 1
    assert server.queries == ["l=Multi"]
    # The direct host was never asked: the advanced host exists.
    assert not any(host == "adv.test" for host, _ in server.hits)


def test_wkd_direct_only_when_the_advanced_host_does_not_exist(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers, ca_file: Path
) -> None:
    server.serve_key("direct.test", "dan@direct.test", peers.dan.cert.read_bytes(), advanced=False)
    # openpgpkey.direct.test is not in the resolver: it does not exist.
    assert _discover(store, ["dan@direct.test"], settings) == {}
    assert store.get(peers.dan.fingerprint) is not None
    # adv.test serves ann's key by the direct method, but its advanced host exists and
    # answers 404: the advanced answer counts, the direct one is not asked.
    server.serve_key("adv.test", "ann@adv.test", peers.ann.cert.read_bytes(), advanced=False)
    problems = _discover(store, ["ann@adv.test"], settings)
    assert problems["ann@adv.test"].reason is KeyReason.NOT_FOUND
    assert "404" in problems["ann@adv.test"].detail
    assert not any(host == "adv.test" for host, _ in server.hits)


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("404", KeyReason.NOT_FOUND, "404"),
        ("mismatch", KeyReason.ADDRESS_MISMATCH, "no user ID"),
        ("expired", KeyReason.EXPIRED, "expired"),
        ("redirect-http", KeyReason.LOOKUP_FAILED, "redirect to http://"),
        ("huge", KeyReason.LOOKUP_FAILED, "too large"),
        ("huge-unannounced", KeyReason.LOOKUP_FAILED, "too large"),
        ("hang", KeyReason.LOOKUP_FAILED, "timed out"),
    ],
)
def test_wkd_refusals_name_the_reason(
    case: str,
    reason: KeyReason,
    words: str,
    server: HTTPSServer,
    settings: DiscoverySettings,
    store: Keystore,
    peers: Peers,
) -> None:
    addr = {"mismatch": "ann@adv.test", "expired": "old@adv.test"}.get(case, "x@adv.test")
    loc = wkd_urls(addr)
    path = loc.advanced.split("openpgpkey.adv.test", 1)[1].partition("?")[0]
    route = {
        "404": Route(status=404),
        "mismatch": Route(body=peers.stranger.cert.read_bytes()),
        "expired": Route(body=peers.old.cert.read_bytes()),
        "redirect-http": Route(status=302, location="http://adv.test/key"),
        "huge": Route(huge=50 * 1024 * 1024),
        "huge-unannounced": Route(huge=50 * 1024 * 1024, no_length=True),
        "hang": Route(hang=True),
    }[case]
    server.routes[("openpgpkey.adv.test", path)] = route
    if case == "hang":
        settings = DiscoverySettings(
            ca_file=settings.ca_file, timeout=0.5, connect_timeout=0.5, resolver=settings.resolver
        )
    problems = _discover(store, [addr], settings)
    assert set(problems) == {addr}
    assert problems[addr].reason is reason, problems[addr]
    assert words in str(problems[addr])
    assert store.find(addr, include_revoked=True) == ()  # nothing imported
    assert server.hits[("openpgpkey.adv.test", path)] == 1


def test_certificate_that_does_not_verify_is_refused(
    settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    other_ca = trustme.CA()
    bad = HTTPSServer(_context(other_ca, *HOSTS)).start()
    try:
        bad.serve_key("openpgpkey.adv.test", "ann@adv.test", peers.ann.cert.read_bytes())
        resolver = hosts_resolver({h: ("127.0.0.1", bad.port) for h in HOSTS})
        problems = _discover(
            store,
            ["ann@adv.test"],
            DiscoverySettings(ca_file=settings.ca_file, resolver=resolver, timeout=5),
        )
    finally:
        bad.stop()
    assert problems["ann@adv.test"].reason is KeyReason.LOOKUP_FAILED
    assert "certificate" in problems["ann@adv.test"].detail
    assert store.find("ann@adv.test") == ()


def test_ssl_cert_file_is_honoured(
    server: HTTPSServer,
    settings: DiscoverySettings,
    store: Keystore,
    peers: Peers,
    ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.serve_key("openpgpkey.adv.test", "ann@adv.test", peers.ann.cert.read_bytes())
    no_ca = DiscoverySettings(resolver=settings.resolver, timeout=5)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    problems = _discover(store, ["ann@adv.test"], no_ca)
    assert problems["ann@adv.test"].reason is KeyReason.LOOKUP_FAILED  # system store: no
    # The failure is remembered briefly; a fresh home asks again, trusting SSL_CERT_FILE.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    store2 = Keystore(store.home.parent / "home2")
    assert _discover(store2, ["ann@adv.test"], no_ca) == {}
    assert store2.get(peers.ann.fingerprint) is not None


def test_keyserver_is_the_second_source(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    server.routes[("keys.test", "/vks/v1/by-email/dan%40direct.test")] = Route(
        body=peers.dan.cert.read_bytes()
    )
    # wkd alone: nobody serves dan (direct.test has no WKD route: 404).
    problems = _discover(store, ["dan@direct.test"], settings)
    assert problems["dan@direct.test"].reason is KeyReason.NOT_FOUND
    store2 = Keystore(store.home.parent / "home2")
    assert _discover(store2, ["dan@direct.test"], settings, "wkd+keyserver") == {}
    key = store2.get(peers.dan.fingerprint)
    assert key is not None
    source = store2.source_of(key)
    assert source is not None and source.kind is SourceKind.KEYSERVER
    assert server.hits[("keys.test", "/vks/v1/by-email/dan%40direct.test")] == 1


def test_a_different_key_is_refused_until_accepted(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    store.import_file(peers.bob_old.cert)  # expired: bob has no usable key
    server.serve_key("openpgpkey.adv.test", "bob@adv.test", peers.bob_new.cert.read_bytes())
    problems = _discover(store, ["bob@adv.test"], settings)
    problem = problems["bob@adv.test"]
    assert problem.reason is KeyReason.DIFFERENT_KEY
    assert peers.bob_new.fingerprint in problem.detail
    assert peers.bob_old.fingerprint in problem.detail
    assert store.get(peers.bob_new.fingerprint) is None  # not in the keyring
    # Asked again: the answer is remembered, the network is not asked twice.
    assert _discover(store, ["bob@adv.test"], settings)["bob@adv.test"].reason is (
        KeyReason.DIFFERENT_KEY
    )
    assert sum(server.hits.values()) == 1
    line = accept_key(store, "bob@adv.test", peers.bob_new.fingerprint)
    assert "accepted" in line
    chosen = store.encryption_key("bob@adv.test")
    assert not isinstance(chosen, Exception) and getattr(chosen, "fingerprint", None) == (
        peers.bob_new.fingerprint
    )


def test_replace_on_wkd_takes_the_new_key(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    store.import_file(peers.bob_old.cert)
    server.serve_key("openpgpkey.adv.test", "bob@adv.test", peers.bob_new.cert.read_bytes())
    replace = DiscoverySettings(
        ca_file=settings.ca_file, resolver=settings.resolver, replace_on_wkd=True
    )
    assert _discover(store, ["bob@adv.test"], replace) == {}
    chosen = store.encryption_key("bob@adv.test")
    assert getattr(chosen, "fingerprint", None) == peers.bob_new.fingerprint


def test_bulk_of_1000_rows_across_10_domains_asks_once_per_address(
    ca: trustme.CA, ca_file: Path, store: Keystore, peers: Peers
) -> None:
    domains = [f"d{i}.test" for i in range(10)]
    names = [f"openpgpkey.{d}" for d in domains]
    srv = HTTPSServer(_context(ca, *names)).start()
    try:
        resolver = hosts_resolver({h: ("127.0.0.1", srv.port) for h in names})
        settings = DiscoverySettings(ca_file=ca_file, resolver=resolver, timeout=20)
        addresses = [f"user{i // 10 % 5}@{domains[i % 10]}" for i in range(1000)]  # 50 distinct
        assert len(set(addresses)) == 50

        async def bulk() -> list[dict[str, Any]]:
            # Rows are sent side by side, each message calling the hook for its recipient.
            sem = asyncio.Semaphore(64)

            async def row(addr: str) -> dict[str, Any]:
                async with sem:
                    return await discover_missing(store, [addr], "wkd", settings=settings)

            return await asyncio.gather(*(row(a) for a in addresses))

        results = asyncio.run(bulk())
        assert all(set(r) == {a} for r, a in zip(results, addresses, strict=True))
        reasons = Counter(str(r[a]) for r, a in zip(results, addresses, strict=True))
        odd = [text for text in reasons if not text.endswith(": 404 not found)")]
        assert odd == []
        assert len(srv.hits) == 50
        assert max(srv.hits.values()) == 1
        # A second bulk run within the TTL asks nothing at all.
        asyncio.run(bulk())
        assert sum(srv.hits.values()) == 50
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------
# The send path: found keys are used, every refusal keeps the SMTP server untouched.


def _mailer(smtp: SMTPSettings, store: Keystore, settings: DiscoverySettings) -> AsyncMailer:
    mailer = AsyncMailer(smtp=smtp, keystore=store)
    mailer.discovery_settings = settings
    return mailer


def test_send_encrypts_to_the_key_found_by_wkd(
    server: HTTPSServer,
    settings: DiscoverySettings,
    store: Keystore,
    peers: Peers,
    keys: Keys,
    smtp_server: Callable[..., Any],
) -> None:
    from pgp_helpers import gpg_decrypt, list_packet_key_ids, subkey_ids

    gpg(peers.secrets, "--import", str(keys.alice.cert))  # to check the signature

    smtp = smtp_server(tls="implicit")
    server.serve_key("openpgpkey.adv.test", "ann@adv.test", peers.ann.cert.read_bytes())
    msg = Message(
        sender="alice@example.org", to=["ann@adv.test"], subject="hi", text="secret words"
    )
    prot = Protection(discovery=DiscoveryPolicy.WKD)
    settings_smtp = SMTPSettings(
        host=smtp.host, port=smtp.port, tls=smtp_tls(), ca_file=smtp.ca_file, timeout=30
    )
    asyncio.run(_mailer(settings_smtp, store, settings).send(msg, protection=prot))
    assert len(smtp.messages) == 1
    data = smtp.messages[0].data
    assert b"secret words" not in data
    armored = data[data.index(b"-----BEGIN PGP MESSAGE-----") :]
    armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
    plain, _ = gpg_decrypt(peers.secrets, armored)
    assert b"secret words" in plain
    assert list_packet_key_ids(peers.secrets, armored) & subkey_ids(
        peers.secrets, peers.ann.fingerprint
    )


def smtp_tls() -> Any:
    from e2email.config import TLSMode

    return TLSMode.IMPLICIT


@pytest.mark.parametrize("case", ["404", "hang", "different", "off"])
def test_send_refusals_reach_no_smtp_server(
    case: str,
    server: HTTPSServer,
    settings: DiscoverySettings,
    store: Keystore,
    peers: Peers,
    smtp_server: Callable[..., Any],
) -> None:
    smtp = smtp_server(tls="implicit")
    addr = "bob@adv.test" if case == "different" else "x@adv.test"
    path = wkd_urls(addr).advanced.split("openpgpkey.adv.test", 1)[1].partition("?")[0]
    if case == "different":
        store.import_file(peers.bob_old.cert)
        server.routes[("openpgpkey.adv.test", path)] = Route(body=peers.bob_new.cert.read_bytes())
    elif case == "hang":
        server.routes[("openpgpkey.adv.test", path)] = Route(hang=True)
        settings = DiscoverySettings(
            ca_file=settings.ca_file, resolver=settings.resolver, timeout=0.5, connect_timeout=0.5
        )
    policy = DiscoveryPolicy.OFF if case == "off" else DiscoveryPolicy.WKD
    msg = Message(sender="alice@example.org", to=[addr, "ann@adv.test"], subject="s", text="body")
    smtp_settings = SMTPSettings(
        host=smtp.host, port=smtp.port, tls=smtp_tls(), ca_file=smtp.ca_file, timeout=30
    )
    with pytest.raises(RecipientKeyError) as err:
        asyncio.run(
            _mailer(smtp_settings, store, settings).send(
                msg, protection=Protection(discovery=policy)
            )
        )
    assert addr in err.value.addresses
    expected = {
        "404": "404",
        "hang": "timed out",
        "different": peers.bob_new.fingerprint,
        "off": "no key found",
    }[case]
    assert expected in str(err.value)
    assert smtp.messages == []
    assert smtp.connections == 0
    if case == "off":
        assert sum(server.hits.values()) == 0  # the library default asks no network


# ---------------------------------------------------------------------------------------
# The CLI option, without any network: an address-literal domain has no WKD to ask.


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home)},
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def test_send_discover_option(store: Keystore, keys: Keys, tmp_path: Path) -> None:
    store.import_file(keys.bob.cert)
    out = tmp_path / "out.eml"
    base = ["send", "--from", "alice@example.org", "--subject", "s", "--body", "b"]
    bad = _cli(*base, "--to", "bob@example.net", "--discover", "dns", home=store.home)
    assert bad.returncode == 2 and "--discover" in bad.stderr
    # bob has a key: nothing is looked up, the message is written.
    ok = _cli(
        *base, "--to", "bob@example.net", "--discover", "wkd", "--output", str(out),
        home=store.home,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert out.exists()
    out.unlink()


def test_send_discover_refusal_from_the_cli(
    store: Keystore, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    """In process, so that the system resolver can be replaced by one that knows no name
    (no DNS query leaves the machine): the refusal names the address and why, nothing is
    written, and the exit status is the one for key problems."""
    import e2email.discovery.net as net
    import e2email.discovery.policy as policy
    from e2email.cli import exit_code_for, main

    nowhere = hosts_resolver({})
    monkeypatch.setattr(net, "system_resolver", nowhere)
    monkeypatch.setattr(policy, "system_resolver", nowhere)
    monkeypatch.setenv("E2EMAIL_HOME", str(store.home))
    store.import_file(keys.bob.cert)
    out = tmp_path / "out.eml"
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "send", "--from", "alice@example.org", "--to", "bob@example.net",
                "--cc", "x@nowhere.test", "--subject", "s", "--body", "b",
                "--discover", "wkd", "--output", str(out),
            ]
        )  # fmt: skip
    err = capfd.readouterr().err
    assert exited.value.code == exit_code_for(RecipientKeyError([]))
    assert "x@nowhere.test: key lookup failed (WKD: neither openpgpkey.nowhere.test nor " in err
    assert not out.exists()


def test_protection_discovery_setting() -> None:
    assert Protection().discovery is DiscoveryPolicy.OFF  # the library default
    assert Protection(discovery="wkd+keyserver").discovery is DiscoveryPolicy.WKD_KEYSERVER  # type: ignore[arg-type]
    from e2email.errors import ConfigError

    with pytest.raises(ConfigError, match="discovery must be"):
        Protection(discovery="dns")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keyserver"):
        DiscoverySettings(keyservers=("http://keys.example",))


def test_https_redirects_are_followed_a_few_times_only(
    server: HTTPSServer, settings: DiscoverySettings, store: Keystore, peers: Peers
) -> None:
    path = wkd_urls("ann@adv.test").advanced.split("openpgpkey.adv.test", 1)[1].partition("?")[0]
    server.routes[("openpgpkey.adv.test", path)] = Route(
        status=301, location="https://adv.test/moved"
    )
    server.routes[("adv.test", "/moved")] = Route(body=peers.ann.cert.read_bytes())
    assert _discover(store, ["ann@adv.test"], settings) == {}
    assert store.get(peers.ann.fingerprint) is not None
    # A loop of redirects ends after max_redirects with a reason.
    path = wkd_urls("x@adv.test").advanced.split("openpgpkey.adv.test", 1)[1].partition("?")[0]
    server.routes[("openpgpkey.adv.test", path)] = Route(status=302, location="/loop")
    server.routes[("openpgpkey.adv.test", "/loop")] = Route(status=302, location="/loop")
    problem = _discover(store, ["x@adv.test"], settings)["x@adv.test"]
    assert problem.reason is KeyReason.LOOKUP_FAILED
    assert "more than 3 redirects" in problem.detail
    assert server.hits[("openpgpkey.adv.test", "/loop")] == 3
