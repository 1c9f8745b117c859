"""Keyserver lookup: the VKS API of keys.openpgp.org (``GET /vks/v1/by-email/ADDR``), and HKP
over TLS (``/pks/lookup?op=get&options=mr&search=ADDR``, draft-shaw-openpgp-hkp §3) for
other servers. keys.openpgp.org serves an address only after its owner verified it, and only
that user ID; other servers serve whatever was uploaded, which is why every answer is vetted
(only user IDs naming the address are kept) like any other found key.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

__all__ = ["keyserver_url"]


def keyserver_url(server: str, address: str) -> str:
    """The lookup URL for ``address`` at ``server`` (``https://HOST`` = VKS, ``hkps://HOST``
    = HKP over TLS; the settings refuse anything else)."""
    parts = urlsplit(server)
    addr = quote(address.strip(), safe="@")
    if parts.scheme == "hkps":
        netloc = parts.netloc
        return f"https://{netloc}/pks/lookup?op=get&options=mr&search={addr}"
    base = server.rstrip("/")
    return f"{base}/vks/v1/by-email/{quote(address.strip(), safe='')}"
