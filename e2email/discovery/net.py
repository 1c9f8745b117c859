"""HTTPS GET for key discovery: verified TLS only, bounded in size, time and redirects.

Built on httpcore (the transport under httpx; the ``discovery`` extra) rather than the standard
library: urllib cannot bound a whole request in time, follows redirects to other schemes
unless taught not to, and resolves names behind our back; a hand-written HTTP client over
asyncio streams would be ours to get right. httpcore gives streaming bodies (so a 50 MB answer
is cut off after the first MiB, never read whole), per-phase timeouts, no redirect following
of its own, and a pluggable network backend, through which every host name is resolved by
*our* resolver: the WKD rule "direct method only when the advanced host does not exist"
needs to see a name-resolution failure as such, and tests map names to 127.0.0.1 without
touching /etc/hosts. Proxies from the environment are not used.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from e2email.errors import ConfigError

if typing.TYPE_CHECKING:
    import httpcore

__all__ = [
    "DiscoverySettings",
    "FetchError",
    "Fetched",
    "HostNotFound",
    "Resolver",
    "fetch",
    "hosts_resolver",
    "open_pool",
    "system_resolver",
]

#: Resolves (host, port) to the addresses to connect to, in order; raises HostNotFound when
#: the name does not exist.
Resolver = Callable[[str, int], Awaitable[Sequence[tuple[str, int]]]]

DEFAULT_KEYSERVERS = ("https://keys.openpgp.org",)
MIB = 1024 * 1024


class HostNotFound(LookupError):
    """The host name does not exist (NXDOMAIN or no address)."""


class FetchError(Exception):
    """Why one URL gave no usable answer; ``kind`` is a short word for the reason (timeout,
    tls, not-found, http, too-large, redirect, host, connect) and ``str()`` says it all."""

    def __init__(self, kind: str, message: str, *, url: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.url = url


async def system_resolver(host: str, port: int) -> Sequence[tuple[str, int]]:
    """The system's resolver (getaddrinfo), every address it gives, in its order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostNotFound(f"{host}: {exc.strerror or exc}") from exc
    found = [(str(info[4][0]), int(info[4][1])) for info in infos]
    if not found:
        raise HostNotFound(f"{host}: no address")
    return list(dict.fromkeys(found))


def hosts_resolver(hosts: Mapping[str, tuple[str, int]]) -> Resolver:
    """A resolver that knows only ``hosts`` (name -> (address, port)), for tests: every other
    name does not exist, so nothing leaves the machine. TLS still verifies the *name*."""
    table = {k.lower().rstrip("."): v for k, v in hosts.items()}

    async def resolve(host: str, port: int) -> Sequence[tuple[str, int]]:
        try:
            return [table[host.lower().rstrip(".")]]
        except KeyError:
            raise HostNotFound(f"{host}: not known") from None

    return resolve


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    """How keys are looked up on the network (the policy itself is
    :class:`e2email.config.DiscoveryPolicy`)."""

    #: Trust these CA certificates (PEM) instead of the system store. The system store honours
    #: the standard ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` variables too.
    ca_file: Path | None = None
    #: Seconds for TCP connect plus TLS handshake, per address tried.
    connect_timeout: float = 5.0
    #: Seconds for one whole lookup of one address (every URL and redirect it takes).
    timeout: float = 15.0
    #: The largest answer read; a larger one is refused without reading the rest.
    max_bytes: int = MIB
    #: Redirects followed per URL (HTTPS to HTTPS only).
    max_redirects: int = 3
    #: Keyservers asked by ``wkd+keyserver``, in order: ``https://HOST`` speaks the VKS API
    #: (keys.openpgp.org), ``hkps://HOST[:PORT]`` the HKP ``/pks/lookup`` interface.
    keyservers: tuple[str, ...] = DEFAULT_KEYSERVERS
    #: Use a key served by the address's own domain (WKD) even when the keystore holds a
    #: different one for the address (the old one is kept; the new one is accepted).
    replace_on_wkd: bool = False
    #: Seconds a lookup's outcome is remembered (HOME/discovery-cache.json): found and
    #: refused keys. Thunderbird looks each address up at most once a day.
    cache_ttl: float = 86400.0
    #: Seconds a network failure (timeout, TLS, connection) or "no key found" is remembered
    #: (a key published since is found soon). Failures and refusals answer only a lookup
    #: with the same policy and keyservers.
    failure_ttl: float = 600.0
    #: Name resolution (tests map names to 127.0.0.1 with :func:`hosts_resolver`).
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "timeout", "cache_ttl", "failure_ttl"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"discovery {name} must be positive")
        if self.max_bytes < 1024 or self.max_redirects < 0:
            raise ConfigError("discovery max_bytes must be at least 1024, max_redirects >= 0")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"CA file {self.ca_file} does not exist or is not a file")
        object.__setattr__(self, "keyservers", tuple(self.keyservers))
        for url in self.keyservers:
            parts = urlsplit(url)
            if parts.scheme not in ("https", "hkps") or not parts.hostname:
                raise ConfigError(
                    f"keyserver {url!r}: give https://HOST (VKS) or hkps://HOST (HKP over TLS); "
                    "keys are never fetched without TLS"
                )

    def ssl_context(self) -> ssl.SSLContext:
        return _ssl_context(
            str(self.ca_file) if self.ca_file is not None else None,
            os.environ.get("SSL_CERT_FILE"),
            os.environ.get("SSL_CERT_DIR"),
        )


@functools.lru_cache(maxsize=8)
def _ssl_context(cafile: str | None, env_file: str | None, env_dir: str | None) -> ssl.SSLContext:
    """Verifying, TLS 1.2 or newer. Made once per CA setting (loading the system store takes
    milliseconds; a bulk send asks for it per message). The environment's SSL_CERT_FILE and
    SSL_CERT_DIR are part of the key: OpenSSL reads them when the store is loaded."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _import_httpcore() -> typing.Any:
    try:
        import httpcore
    except ImportError:
        raise ConfigError(
            "key discovery needs the discovery extra: pip install 'e2email[discovery]'"
        ) from None
    return httpcore


def open_pool(settings: DiscoverySettings) -> httpcore.AsyncConnectionPool:
    """A connection pool for one discovery run (connections to one host are reused)."""
    hc = _import_httpcore()
    resolver = settings.resolver or system_resolver

    class Backend(hc.AsyncNetworkBackend):  # type: ignore[misc,name-defined]
        """Connects to what our resolver says; TLS still verifies the URL's host name."""

        def __init__(self) -> None:
            self.inner = hc.AnyIOBackend()

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[typing.Any] | None = None,
        ) -> typing.Any:
            last: BaseException | None = None
            for address, real_port in await resolver(host, port):
                try:
                    return await self.inner.connect_tcp(
                        address, real_port, timeout=timeout, local_address=local_address
                    )
                except hc.ConnectError as exc:
                    last = exc
            raise last or hc.ConnectError(f"{host}: no address")

        async def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
            raise hc.ConnectError("no unix sockets here")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    pool: httpcore.AsyncConnectionPool = hc.AsyncConnectionPool(
        ssl_context=settings.ssl_context(),
        network_backend=Backend(),
        retries=0,
        http1=True,
        http2=False,
        max_connections=20,
    )
    return pool


@dataclass(frozen=True)
class Fetched:
    """A body and the URL that served it (after redirects: the one a key's source names)."""

    data: bytes
    url: str


async def fetch(
    pool: httpcore.AsyncConnectionPool, url: str, settings: DiscoverySettings
) -> Fetched:
    """GET ``url`` (HTTPS) and return its body and final URL, or raise FetchError saying why
    not.

    Follows at most ``max_redirects`` redirects, each to HTTPS only; reads at most
    ``max_bytes``; each phase is bounded by the connect/read timeouts (the caller bounds the
    whole lookup). HostNotFound passes through for ``url``'s own host (the WKD method choice
    needs it); a redirect target that does not exist is a FetchError ("host")."""
    hc = _import_httpcore()
    timeouts = {
        "connect": settings.connect_timeout,
        "read": settings.timeout,
        "write": settings.timeout,
        "pool": settings.timeout,
    }
    current = url
    for _ in range(settings.max_redirects + 1):
        if urlsplit(current).scheme != "https":
            raise FetchError("redirect", f"refused to follow a redirect to {current}", url=url)
        try:
            async with pool.stream(
                "GET",
                current,
                headers=[
                    (b"Accept", b"application/octet-stream, */*"),
                    (b"User-Agent", b"e2email"),
                ],
                extensions={"timeout": timeouts},
            ) as response:
                status = int(response.status)
                headers = {k.decode("latin-1").lower(): v for k, v in response.headers}
                if status in (301, 302, 303, 307, 308):
                    location = headers.get("location", b"").decode("latin-1").strip()
                    if not location:
                        raise FetchError("http", f"HTTP {status} without a Location", url=url)
                    current = urljoin(current, location)
                    continue
                if status == 404:
                    raise FetchError("not-found", "404 not found", url=url)
                if status != 200:
                    raise FetchError("http", f"HTTP {status}", url=url)
                length = headers.get("content-length", b"").strip()
                if length.isdigit() and int(length) > settings.max_bytes:
                    raise FetchError(
                        "too-large",
                        f"the answer is too large ({int(length)} bytes, at most "
                        f"{settings.max_bytes})",
                        url=url,
                    )
                body = bytearray()
                async for chunk in response.aiter_stream():
                    body += chunk
                    if len(body) > settings.max_bytes:
                        raise FetchError(
                            "too-large",
                            f"the answer is too large (over {settings.max_bytes} bytes)",
                            url=url,
                        )
                return Fetched(bytes(body), current)
        except HostNotFound as exc:
            if current != url:  # the first host exists: it redirected to one that does not
                host = urlsplit(current).hostname or current
                raise FetchError(
                    "host", f"the redirect target {host} does not exist", url=url
                ) from exc
            raise
        except FetchError:
            raise
        except hc.TimeoutException as exc:
            raise FetchError("timeout", "timed out", url=url) from exc
        except (hc.ConnectError, hc.NetworkError, hc.ProtocolError) as exc:
            raise _connect_failure(exc, url) from exc
        except hc.UnsupportedProtocol as exc:
            raise FetchError("redirect", f"unsupported URL {current}", url=url) from exc
    raise FetchError("redirect", f"more than {settings.max_redirects} redirects", url=url)


def _connect_failure(exc: BaseException, url: str) -> FetchError:
    """A TLS failure (certificate not verified, old protocol) told apart from others."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or str(seen)
            return FetchError("tls", f"TLS certificate not verified: {why}", url=url)
        if isinstance(seen, ssl.SSLError):
            return FetchError("tls", f"TLS failed: {seen.reason or seen}", url=url)
        seen = seen.__cause__ or seen.__context__
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return FetchError("tls", f"TLS certificate not verified: {text}", url=url)
    if "SSL" in text or "TLS" in text:
        return FetchError("tls", f"TLS failed: {text}", url=url)
    return FetchError("connect", f"connection failed: {text}", url=url)
