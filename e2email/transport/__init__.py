"""Getting finished message bytes to an SMTP server over verified TLS.

Nothing here knows about keys or MIME: it takes bytes and envelope addresses.
"""

from e2email.outcome import CopyOutcome, RecipientOutcome, deprecated_name
from e2email.transport.smtp import SMTPConnection, SMTPTransport, TLSInfo

__all__ = [
    "SMTPConnection",
    "SMTPTransport",
    "TLSInfo",
]

#: The former names of the outcome types (e2email.outcome), kept for one release.
_DEPRECATED: dict[str, tuple[object, str]] = {
    "DeliveryResult": (CopyOutcome, "e2email.CopyOutcome"),
    "RecipientResult": (RecipientOutcome, "e2email.RecipientOutcome"),
}


def __getattr__(name: str) -> object:  # PEP 562: the deprecated names above warn
    return deprecated_name(__name__, name, _DEPRECATED)
