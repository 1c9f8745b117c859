"""Web Key Directory lookup (draft-koch-openpgp-webkey-service-19 §3.1).

The key for ``local@domain`` is at
``https://openpgpkey.DOMAIN/.well-known/openpgpkey/DOMAIN/hu/HASH?l=LOCAL`` (the advanced
method) or, only when that host does not exist, at
``https://DOMAIN/.well-known/openpgpkey/hu/HASH?l=LOCAL`` (the direct method). HASH is the
z-base-32 encoding (RFC 6189 §5.1.6) of the SHA-1 of the local part with ASCII upper case
mapped to lower case; ``l=`` carries the local part as written, percent-encoded, for servers
that serve by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote

from e2email.config import host_for_connecting
from e2email.errors import ConfigError, MessageError

__all__ = ["WKDLocation", "wkd_hash", "wkd_urls", "zbase32"]

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def zbase32(data: bytes) -> str:
    """z-base-32 (RFC 6189 §5.1.6), no padding: 160 bits give 32 characters."""
    bits = int.from_bytes(data, "big")
    count = len(data) * 8
    out = []
    for shift in range(count - 5, -5, -5):
        index = (bits >> shift) & 31 if shift >= 0 else (bits << -shift) & 31
        out.append(_ZBASE32[index])
    return "".join(out)


def wkd_hash(local_part: str) -> str:
    """The WKD hash of a local part: ``Joe.Doe`` -> ``iy9q119eutrkn8s1mk4r39qejnbu3n5q``."""
    # Only ASCII letters are folded (draft §3.1): "ß" and "Ä" stay as they are.
    return zbase32(hashlib.sha1(local_part.translate(_ASCII_LOWER).encode("utf-8")).digest())  # noqa: S324 - the draft's hash


@dataclass(frozen=True)
class WKDLocation:
    advanced_host: str
    advanced: str
    direct_host: str
    direct: str


def wkd_urls(address: str) -> WKDLocation:
    """The advanced and direct URLs for ``address`` (MessageError for a bad address)."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        raise MessageError(f"invalid address {address!r}")
    try:
        host = host_for_connecting(domain, what="address domain").rstrip(".")
    except ConfigError as exc:
        raise MessageError(str(exc)) from exc
    if ":" in host or host.replace(".", "").isdigit():
        raise MessageError(f"{address}: WKD needs a domain name, not an address literal")
    digest = wkd_hash(local)
    query = f"?l={quote(local, safe='')}"
    advanced_host = f"openpgpkey.{host}"
    return WKDLocation(
        advanced_host=advanced_host,
        advanced=f"https://{advanced_host}/.well-known/openpgpkey/{host}/hu/{digest}{query}",
        direct_host=host,
        direct=f"https://{host}/.well-known/openpgpkey/hu/{digest}{query}",
    )
