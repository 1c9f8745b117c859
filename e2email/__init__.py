"""e2email: send end-to-end encrypted email.

OpenPGP (PGP/MIME, RFC 3156) or S/MIME (RFC 8551) signed and encrypted messages, submitted over
SMTP with verified TLS. The async core is :class:`AsyncMailer`; :class:`Mailer` is the same
API, synchronous::

    from e2email import Mailer, Message, SMTPSettings, password_from_env

    smtp = SMTPSettings(host="smtp.example.org", port=465, username="alice@example.org",
                        password=password_from_env("SMTP_PASSWORD"))
    with Mailer(smtp=smtp) as mailer:
        mailer.send(Message(sender="alice@example.org", to=["bob@example.net"],
                            subject="Hello", text="Only Bob can read this."))
"""

from e2email.certstore import CertStore
from e2email.client import (
    AsyncMailer,
    BatchItem,
    BatchResult,
    CopyResult,
    Mailer,
    MessageOutcome,
    ProtectedCopy,
    SendResult,
)
from e2email.config import (
    OpenPGPEngine,
    Protection,
    RetryPolicy,
    RevocationPolicy,
    Scheme,
    SMIMECipher,
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
    HeldError,
    InsecurePathError,
    InsecureTransportError,
    KeyErrorBase,
    KeyProblem,
    KeyReason,
    KeystoreError,
    MessageError,
    PassphraseError,
    RecipientKeyError,
    RecipientsRefusedError,
    RequireTLSError,
    SignerKeyError,
    SMTPReply,
    TLSError,
    TransportError,
)
from e2email.keystore import Keystore
from e2email.message import Address, Attachment, Message
from e2email.outbox import Outbox, OutboxError
from e2email.outcome import CopyOutcome, RecipientOutcome
from e2email.transport.ports import HostMemory, PortAttempt
from e2email.transport.smtp import DeliveryResult, RecipientResult, TLSInfo

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncMailer",
    "Attachment",
    "AuthenticationError",
    "BatchItem",
    "BatchResult",
    "CertStore",
    "ConfigError",
    "ConnectError",
    "CopyOutcome",
    "CopyResult",
    "CryptoError",
    "DeliveryError",
    "DeliveryResult",
    "E2EmailError",
    "HeldError",
    "HostMemory",
    "InsecurePathError",
    "InsecureTransportError",
    "KeyErrorBase",
    "KeyProblem",
    "KeyReason",
    "Keystore",
    "KeystoreError",
    "Mailer",
    "Message",
    "MessageError",
    "MessageOutcome",
    "OpenPGPEngine",
    "Outbox",
    "OutboxError",
    "PassphraseError",
    "PortAttempt",
    "ProtectedCopy",
    "Protection",
    "RecipientKeyError",
    "RecipientOutcome",
    "RecipientResult",
    "RecipientsRefusedError",
    "RequireTLSError",
    "RetryPolicy",
    "RevocationPolicy",
    "SMIMECipher",
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
