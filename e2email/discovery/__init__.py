"""Finding recipients' OpenPGP keys: WKD, keyservers, Autocrypt (issue 10).

* :func:`discover_missing`: the hook the protect path calls before resolving keys.
* :class:`DiscoverySettings`: CA file, timeouts, size bound, keyservers, cache TTLs.
* :mod:`e2email.discovery.autocrypt`: ``Autocrypt:`` / ``Autocrypt-Gossip:`` headers out,
  and learning peers' keys from received mail.

Network code needs the ``discovery`` extra (httpcore); it is imported only when a lookup runs.
"""

from e2email.discovery.net import DiscoverySettings, hosts_resolver
from e2email.discovery.policy import accept_key, discover_missing
from e2email.discovery.wkd import wkd_hash, wkd_urls

__all__ = [
    "DiscoverySettings",
    "accept_key",
    "discover_missing",
    "hosts_resolver",
    "wkd_hash",
    "wkd_urls",
]
