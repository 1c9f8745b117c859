"""The discovery hook and the trust policy: which found key may be used, and when.

:func:`discover_missing` is the one call the protect path makes before it resolves the
recipients' keys. For each address with no usable local key it asks, side by side for all
addresses, the sources the policy names (WKD, then keyservers), judges what they serve with
the keystore's own rules (:func:`e2email.keystore.vet_key`), and imports a good key with its
source recorded. It never decides to send: it only adds keys. The keystore's resolution runs
after it as always, and every address it could not serve comes back as a
:class:`~e2email.errors.KeyProblem` naming the reason, so the message is refused (fail
closed), never sent in clear.

A key found for an address that already has a *different* key (expired, revoked, ...) is not
put into the keyring: it waits in the discovery cache and sending is refused, naming both
fingerprints, until ``e2email keys accept ADDRESS FINGERPRINT`` (or
``DiscoverySettings.replace_on_wkd`` for keys served by the address's own domain). A key
that only an HKP keyserver serves is held back the same way: HKP servers do not check that
an address belongs to whoever uploaded the key (WKD is the address's own domain; the VKS of
keys.openpgp.org mails the address before serving it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from e2email.config import DiscoveryPolicy
from e2email.discovery.cache import DiscoveryCache
from e2email.discovery.keyserver import keyserver_url
from e2email.discovery.net import (
    DiscoverySettings,
    FetchError,
    HostNotFound,
    fetch,
    open_pool,
    system_resolver,
)
from e2email.discovery.wkd import wkd_urls
from e2email.errors import KeyProblem, KeyReason, KeystoreError, MessageError
from e2email.keysources import KeySource, SourceKind
from e2email.keystore import Keystore, VettedKey, vet_key

__all__ = ["accept_key", "adopt", "discover_missing"]

#: Imports into one keyring, one at a time (each compares listings before and after).
_ADOPT_LOCK = threading.Lock()
#: Lookups under way, per event loop and (home, address): a second message of a bulk send
#: waits for the first one's lookup instead of asking again.
_INFLIGHT: dict[tuple[int, str, str], asyncio.Future[KeyProblem | None]] = {}

#: Keystore reasons that mean "no usable key here": discovery may help. AMBIGUOUS is a choice
#: the user must make, never one a lookup makes for them.
_MISSING = frozenset(KeyReason) - {KeyReason.AMBIGUOUS}


@dataclass(frozen=True)
class _Found:
    source: KeySource
    data: bytes
    #: Whether the source vouches that the address is the key owner's: WKD (the address's
    #: own domain) and VKS (keys.openpgp.org mails the address before serving it) do; an
    #: HKP keyserver serves whatever anyone uploaded.
    verified: bool = True


def _source_name(source: KeySource) -> str:
    if source.kind is SourceKind.WKD:
        return f"WKD ({source.detail})"
    return f"{source.kind.value} {source.detail}".strip()


async def discover_missing(
    keystore: Keystore,
    addresses: Iterable[str],
    policy: DiscoveryPolicy | str,
    *,
    settings: DiscoverySettings | None = None,
    key_map: Mapping[str, str] | None = None,
) -> dict[str, KeyProblem]:
    """Look up keys for the ``addresses`` that have no usable key in ``keystore`` (and are not
    in ``key_map``), import the good ones with their source, and return a problem per address
    that could not be served (lower-cased address -> problem). Never raises for a lookup
    failure: that is the address's problem. ``policy`` OFF does nothing."""
    policy = DiscoveryPolicy(policy)
    if policy is DiscoveryPolicy.OFF:
        return {}
    settings = settings or DiscoverySettings()
    # Keys are found by the lower-cased address; WKD's ``l=`` gets the local part as written.
    written: dict[str, str] = {}
    for given in addresses:
        written.setdefault(given.strip().lower(), given.strip())
    wanted = [a for a in written if a and a not in (key_map or {})]

    def missing() -> list[str]:
        todo = []
        for addr in wanted:
            choice = keystore.encryption_key(addr)
            if isinstance(choice, KeyProblem) and choice.reason in _MISSING:
                todo.append(addr)
        return todo

    todo = await asyncio.to_thread(missing)
    if not todo:
        return {}
    cache = DiscoveryCache(keystore.home)
    found: dict[str, KeyProblem | None] = {}
    for addr in todo:
        # Remembered outcomes first: a bulk send's later rows open no connection at all.
        entry = _cached(cache, addr, policy, settings)
        if entry is not None:
            found[addr] = _cached_problem(addr, entry)
    ask = [a for a in todo if a not in found]
    if ask:
        found.update(await _ask(keystore, ask, written, policy, settings, cache))
    return {a: p for a in todo if (p := found[a]) is not None}


async def _ask(
    keystore: Keystore,
    addresses: list[str],
    written: Mapping[str, str],
    policy: DiscoveryPolicy,
    settings: DiscoverySettings,
    cache: DiscoveryCache,
) -> dict[str, KeyProblem | None]:
    """Look ``addresses`` up side by side; an address already being looked up (by another
    message of the same bulk send) waits for that lookup instead of asking again."""
    loop = asyncio.get_running_loop()
    pool = open_pool(settings)
    async with pool:

        async def one(addr: str) -> KeyProblem | None:
            key = (id(loop), str(keystore.home), addr)
            running = _INFLIGHT.get(key)
            if running is not None:
                return await asyncio.shield(running)
            future: asyncio.Future[KeyProblem | None] = loop.create_future()
            _INFLIGHT[key] = future
            try:
                result = await _lookup(keystore, addr, written[addr], policy, settings, cache, pool)
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, no "never retrieved"
                raise
            finally:
                _INFLIGHT.pop(key, None)
            future.set_result(result)
            return result

        results = await asyncio.gather(*(one(a) for a in addresses))
    return dict(zip(addresses, results, strict=True))


def _scope(policy: DiscoveryPolicy, settings: DiscoverySettings) -> dict[str, Any]:
    """What a lookup asked (recorded with its outcome): the policy, and the keyservers when
    the policy asks them."""
    servers = list(settings.keyservers) if policy is DiscoveryPolicy.WKD_KEYSERVER else []
    return {"policy": policy.value, "keyservers": servers}


def _cached(
    cache: DiscoveryCache,
    addr: str,
    policy: DiscoveryPolicy,
    settings: DiscoverySettings,
    now: float | None = None,
) -> dict[str, Any] | None:
    """The fresh cache entry that answers this lookup, or None. A failure is an answer only
    to the same question: an outcome recorded under another policy or other keyservers (a
    ``wkd`` 404, then a send with ``wkd+keyserver``) is asked again. "No key" is remembered
    for ``failure_ttl`` only, a found key for ``cache_ttl``: a key published since shows up
    soon. Found and held-back keys are answers whatever asked (the key is the keystore's or
    waits for ``keys accept``)."""
    entry = cache.get(addr, ttl=settings.cache_ttl, failure_ttl=settings.failure_ttl, now=now)
    if entry is None or entry.get("outcome") in ("found", "different"):
        return entry
    if {k: entry.get(k) for k in ("policy", "keyservers")} != _scope(policy, settings):
        return None
    age = (now or time.time()) - float(entry.get("at", 0))
    if entry.get("reason") == KeyReason.NOT_FOUND.value and age >= settings.failure_ttl:
        return None
    return entry


def _cached_problem(address: str, entry: dict[str, Any]) -> KeyProblem | None:
    if entry.get("outcome") == "found":
        return None
    try:
        reason = KeyReason(entry.get("reason"))
    except ValueError:
        reason = KeyReason.NOT_FOUND
    return KeyProblem(
        address, reason, str(entry.get("detail", "")), entry.get("fingerprint") or None
    )


async def _lookup(
    keystore: Keystore,
    addr: str,
    as_written: str,
    policy: DiscoveryPolicy,
    settings: DiscoverySettings,
    cache: DiscoveryCache,
    pool: Any,
) -> KeyProblem | None:
    cached = _cached(cache, addr, policy, settings)
    if cached is not None:
        return _cached_problem(addr, cached)
    failures: list[str] = []
    refusals: list[KeyProblem] = []
    held: list[KeyProblem] = []
    network = False
    try:
        async with asyncio.timeout(settings.timeout):
            candidates = _candidates(as_written, policy, settings, pool, failures)
            async with contextlib.aclosing(candidates) as sources:
                async for found in sources:
                    vetted = await asyncio.to_thread(vet_key, found.data, addr)
                    if isinstance(vetted, KeyProblem):
                        refusals.append(
                            KeyProblem(
                                addr,
                                vetted.reason,
                                f"{_source_name(found.source)}: "
                                + (vetted.detail or vetted.reason.value),
                                vetted.fingerprint,
                            )
                        )
                        continue
                    if not found.verified and (
                        keystore.sources.accepted(addr) != vetted.fingerprint
                    ):
                        # Only `keys accept` makes such a key the address's; a later source
                        # that verifies addresses may still serve one.
                        held.append(_hold(cache, vetted, found.source, _scope(policy, settings)))
                        continue
                    replace = settings.replace_on_wkd and found.source.kind is SourceKind.WKD
                    problem = await asyncio.to_thread(
                        adopt, keystore, vetted, found.source, replace=replace, cache=cache
                    )
                    if problem is None:
                        cache.put(addr, {"outcome": "found", "fingerprint": vetted.fingerprint})
                    return problem
    except TimeoutError:
        failures.append(f"the lookup timed out after {settings.timeout:g} s")
        network = True
    network = network or any(not f.endswith("404 not found") for f in failures)
    if held:
        return held[0]
    if refusals:
        problem = refusals[0]
        detail = "; ".join([*(p.detail for p in refusals), *failures])
        problem = KeyProblem(addr, problem.reason, detail, problem.fingerprint)
        outcome = "refused"
    elif network:
        problem = KeyProblem(addr, KeyReason.LOOKUP_FAILED, "; ".join(failures))
        outcome = "failed"
    else:
        problem = KeyProblem(addr, KeyReason.NOT_FOUND, "; ".join(failures))
        outcome = "refused"
    cache.put(
        addr,
        {
            "outcome": outcome,
            "reason": problem.reason.value,
            "detail": problem.detail,
            "fingerprint": problem.fingerprint,
            **_scope(policy, settings),
        },
    )
    return problem


async def _candidates(
    addr: str,
    policy: DiscoveryPolicy,
    settings: DiscoverySettings,
    pool: Any,
    failures: list[str],
) -> AsyncGenerator[_Found, None]:
    """Key data from each source in turn, failures appended to ``failures``."""
    try:
        location = wkd_urls(addr)
    except MessageError as exc:
        failures.append(f"WKD: {exc}")
        location = None
    if location is not None:
        resolver = settings.resolver or system_resolver
        # Draft §3.1: the direct method only when the advanced method's host does not exist.
        try:
            await resolver(location.advanced_host, 443)
            url = location.advanced
        except HostNotFound:
            url = location.direct
        try:
            got = await fetch(pool, url, settings)
        except HostNotFound:
            failures.append(
                f"WKD: neither {location.advanced_host} nor {location.direct_host} exists"
            )
        except FetchError as exc:
            failures.append(f"WKD {url}: {exc}")
        else:
            # The source is the URL that served the key (a redirect may lead elsewhere).
            yield _Found(KeySource(SourceKind.WKD, got.url), got.data)
    if policy is not DiscoveryPolicy.WKD_KEYSERVER:
        return
    for server in settings.keyservers:
        url = keyserver_url(server, addr)
        try:
            got = await fetch(pool, url, settings)
        except HostNotFound as exc:
            failures.append(f"keyserver {server}: host not found ({exc})")
        except FetchError as exc:
            failures.append(f"keyserver {url}: {exc}")
        else:
            hkp = urlsplit(server).scheme == "hkps"
            yield _Found(KeySource(SourceKind.KEYSERVER, got.url), got.data, verified=not hkp)


def _hold(
    cache: DiscoveryCache, vetted: VettedKey, source: KeySource, scope: Mapping[str, Any]
) -> KeyProblem:
    """Keep a key from a source that does not verify addresses in the cache for ``keys
    accept`` (never in the keyring) and say so."""
    addr = vetted.address
    detail = (
        f"{_source_name(source)} serves {vetted.fingerprint}, but HKP keyservers do not check "
        f"that an address belongs to whoever uploaded the key; if it is theirs (check with "
        f"them), use it: e2email keys accept {addr} {vetted.fingerprint}"
    )
    cache.put(
        addr,
        {
            "outcome": "held",
            "reason": KeyReason.UNVERIFIED.value,
            "detail": detail,
            "fingerprint": vetted.fingerprint,
            "keydata": base64.b64encode(vetted.data).decode("ascii"),
            "source": source.kind.value,
            "source_detail": source.detail,
            **scope,
        },
    )
    return KeyProblem(addr, KeyReason.UNVERIFIED, detail, vetted.fingerprint)


def adopt(
    keystore: Keystore,
    vetted: VettedKey,
    source: KeySource,
    *,
    replace: bool = False,
    cache: DiscoveryCache | None = None,
) -> KeyProblem | None:
    """Put a vetted key found for ``vetted.address`` into the keystore, recording ``source``,
    unless the address already has a different key that was not replaced by an explicit
    decision: then the key waits in the discovery cache and the problem names both
    fingerprints (the trust policy: a found key is never used silently instead of a known
    one). The same key found again only confirms it (and merges any update)."""
    addr = vetted.address
    with _ADOPT_LOCK:
        others = [
            k
            for k in keystore.find(addr, include_revoked=True)
            if k.fingerprint != vetted.fingerprint
        ]
        pinned = keystore.sources.accepted(addr)
        if others and pinned != vetted.fingerprint and not replace:
            detail = (
                f"{_source_name(source)} serves {vetted.fingerprint}, the keystore has "
                f"{keystore.describe_keys(others, with_status=True)}; if the new key is "
                f"theirs (check with them), use it: e2email keys accept {addr} "
                f"{vetted.fingerprint}"
            )
            (cache or DiscoveryCache(keystore.home)).put(
                addr,
                {
                    "outcome": "different",
                    "reason": KeyReason.DIFFERENT_KEY.value,
                    "detail": detail,
                    "fingerprint": vetted.fingerprint,
                    "keydata": base64.b64encode(vetted.data).decode("ascii"),
                    "source": source.kind.value,
                    "source_detail": source.detail,
                },
            )
            return KeyProblem(addr, KeyReason.DIFFERENT_KEY, detail, vetted.fingerprint)
        keystore.import_keys(vetted.data, source=source)
        keystore.sources.confirm(vetted.fingerprint)
        if others:  # replaced on WKD: the new key is the one for the address from now on
            keystore.sources.accept(addr, vetted.fingerprint)
    return None


def accept_key(keystore: Keystore, address: str, fingerprint: str) -> str:
    """``e2email keys accept``: make ``fingerprint`` the key for ``address``: a key already in
    the keystore that carries the address, or one discovery found and holds back. It is
    judged again (an expired or revoked key cannot be accepted). Returns a line saying what
    was done; KeystoreError when there is no such key or it is unusable."""
    addr = address.strip().lower()
    fpr = fingerprint.replace(" ", "").upper()
    key = keystore.get(fpr)
    if key is not None and key.fingerprint == fpr:
        if not key.carries(addr):
            raise KeystoreError(f"{fpr} does not carry {addr}")
        problem = key.encryption_problem()
        if problem is not None:
            raise KeystoreError(f"{fpr} cannot be used: {problem[0].value} ({problem[1]})")
        keystore.sources.accept(addr, fpr)
        DiscoveryCache(keystore.home).forget(addr)
        return f"accepted {fpr} for {addr} (already in the keystore)"
    cache = DiscoveryCache(keystore.home)
    entry = cache.entry(addr)
    if (
        entry is None
        or entry.get("outcome") not in ("different", "held")
        or entry.get("fingerprint") != fpr
    ):
        raise KeystoreError(
            f"no key {fpr} for {addr} in the keystore or waiting from discovery "
            "(send to the address with --discover to look it up, or import the key file)"
        )
    data = base64.b64decode(str(entry.get("keydata", "")))
    vetted = vet_key(data, addr)
    if isinstance(vetted, KeyProblem):
        raise KeystoreError(f"{fpr} cannot be used: {vetted}")
    try:
        kind = SourceKind(entry.get("source", ""))
    except ValueError:
        kind = SourceKind.DATA
    source = KeySource(kind, str(entry.get("source_detail", "")))
    with _ADOPT_LOCK:
        keystore.import_keys(vetted.data, source=source)
        keystore.sources.accept(addr, vetted.fingerprint)
    cache.put(addr, {"outcome": "found", "fingerprint": vetted.fingerprint, "at": time.time()})
    return f"accepted {fpr} for {addr} ({source})"
