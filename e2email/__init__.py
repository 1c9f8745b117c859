"""e2email: send end-to-end encrypted email.

OpenPGP (PGP/MIME, RFC 3156) signed and encrypted messages, submitted over SMTP with verified
TLS. The async core is :class:`AsyncMailer`; :class:`Mailer` is the same API, synchronous::

    from e2email import Mailer, Message, SMTPSettings, password_from_env

    smtp = SMTPSettings(host="smtp.example.org", port=465, username="alice@example.org",
                        password=password_from_env("SMTP_PASSWORD"))
    with Mailer(smtp=smtp) as mailer:
        mailer.send(Message(sender="alice@example.org", to=["bob@example.net"],
                            subject="Hello", text="Only Bob can read this."))
"""

from e2email.client import AsyncMailer, CopyResult, Mailer, ProtectedCopy, SendResult
from e2email.config import (
    Protection,
    Scheme,
    SMTPSettings,
    TLSMode,
    password_from_command,
    password_from_env,
)
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CryptoError,
    DeliveryError,
    E2EmailError,
    InsecureTransportError,
    KeyErrorBase,
    KeyProblem,
    KeyReason,
    KeystoreError,
    MessageError,
    PassphraseError,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPReply,
    TLSError,
    TransportError,
)
from e2email.keystore import Keystore
from e2email.message import Address, Attachment, Message
from e2email.transport.smtp import DeliveryResult, RecipientResult, TLSInfo

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncMailer",
    "Attachment",
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "CopyResult",
    "CryptoError",
    "DeliveryError",
    "DeliveryResult",
    "E2EmailError",
    "InsecureTransportError",
    "KeyErrorBase",
    "KeyProblem",
    "KeyReason",
    "Keystore",
    "KeystoreError",
    "Mailer",
    "Message",
    "MessageError",
    "PassphraseError",
    "ProtectedCopy",
    "Protection",
    "RecipientKeyError",
    "RecipientResult",
    "RecipientsRefusedError",
    "SMTPReply",
    "SMTPSettings",
    "Scheme",
    "SendResult",
    "SignerKeyError",
    "TLSError",
    "TLSInfo",
    "TLSMode",
    "TransportError",
    "password_from_command",
    "password_from_env",
]
