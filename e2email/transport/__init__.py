"""Getting finished message bytes to an SMTP server over verified TLS.

Nothing here knows about keys or MIME: it takes bytes and envelope addresses.
"""

from e2email.transport.smtp import (
    DeliveryResult,
    RecipientResult,
    SMTPConnection,
    SMTPTransport,
    TLSInfo,
)

__all__ = [
    "DeliveryResult",
    "RecipientResult",
    "SMTPConnection",
    "SMTPTransport",
    "TLSInfo",
]
