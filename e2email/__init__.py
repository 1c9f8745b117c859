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

# Every public name is imported when first used (PEP 562), not by ``import e2email``: the
# OpenPGP paths then never load ``cryptography`` (about 10 MB of every process's memory, needed
# only by S/MIME and the certificate store), and a module such as e2email.message can be
# imported alone (the Sequoia engine's payload feeder, e2email.feed, needs only that).
import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from e2email.certstore import CertStore
    from e2email.client import (
        AsyncMailer,
        BatchItem,
        BatchResult,
        Mailer,
        MessageOutcome,
        ProtectedCopy,
    )
    from e2email.client import (
        CopyResult as CopyResult,  # deprecated: CopyOutcome
    )
    from e2email.client import (
        SendResult as SendResult,  # deprecated: MessageOutcome
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
    from e2email.transport.smtp import DeliveryResult as DeliveryResult  # deprecated
    from e2email.transport.smtp import RecipientResult as RecipientResult  # deprecated
    from e2email.transport.smtp import TLSInfo

__version__ = "0.1.0"

#: public name -> the module that defines it.
_MODULES = {
    "CertStore": "e2email.certstore",
    "AsyncMailer": "e2email.client",
    "BatchItem": "e2email.client",
    "BatchResult": "e2email.client",
    "CopyResult": "e2email.client",
    "Mailer": "e2email.client",
    "MessageOutcome": "e2email.client",
    "ProtectedCopy": "e2email.client",
    "SendResult": "e2email.client",
    "OpenPGPEngine": "e2email.config",
    "Protection": "e2email.config",
    "RetryPolicy": "e2email.config",
    "RevocationPolicy": "e2email.config",
    "Scheme": "e2email.config",
    "SMIMECipher": "e2email.config",
    "SMTPSettings": "e2email.config",
    "TLSMode": "e2email.config",
    "password_from_command": "e2email.config",
    "password_from_env": "e2email.config",
    "AuthenticationError": "e2email.errors",
    "ConfigError": "e2email.errors",
    "ConnectError": "e2email.errors",
    "CryptoError": "e2email.errors",
    "DeliveryError": "e2email.errors",
    "E2EmailError": "e2email.errors",
    "HeldError": "e2email.errors",
    "InsecurePathError": "e2email.errors",
    "InsecureTransportError": "e2email.errors",
    "KeyErrorBase": "e2email.errors",
    "KeyProblem": "e2email.errors",
    "KeyReason": "e2email.errors",
    "KeystoreError": "e2email.errors",
    "MessageError": "e2email.errors",
    "PassphraseError": "e2email.errors",
    "RecipientKeyError": "e2email.errors",
    "RecipientsRefusedError": "e2email.errors",
    "RequireTLSError": "e2email.errors",
    "SignerKeyError": "e2email.errors",
    "SMTPReply": "e2email.errors",
    "TLSError": "e2email.errors",
    "TransportError": "e2email.errors",
    "Keystore": "e2email.keystore",
    "Address": "e2email.message",
    "Attachment": "e2email.message",
    "Message": "e2email.message",
    "Outbox": "e2email.outbox",
    "OutboxError": "e2email.outbox",
    "CopyOutcome": "e2email.outcome",
    "RecipientOutcome": "e2email.outcome",
    "HostMemory": "e2email.transport.ports",
    "PortAttempt": "e2email.transport.ports",
    "DeliveryResult": "e2email.transport.smtp",
    "RecipientResult": "e2email.transport.smtp",
    "TLSInfo": "e2email.transport.smtp",
}


#: Deprecated names (the same types under their new names), kept for one release.
_DEPRECATED = {
    "CopyResult": "CopyOutcome",
    "DeliveryResult": "CopyOutcome",
    "RecipientResult": "RecipientOutcome",
    "SendResult": "MessageOutcome",
}


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        return _submodule(name)
    if name in _DEPRECATED:
        # Not cached, so that each reading outside e2email warns (DeprecationWarning).
        from e2email.outcome import deprecated_name

        value = getattr(_importlib.import_module("e2email.outcome"), _DEPRECATED[name])
        names = {name: (value, f"e2email.{_DEPRECATED[name]}")}
        return deprecated_name("e2email", name, names)
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def _submodule(name: str) -> object:
    """``e2email.errors`` and the like after a bare ``import e2email``: a submodule, imported
    now (the import binds it here, so this runs once per submodule)."""
    missing = AttributeError(f"module 'e2email' has no attribute {name!r}")
    if not name.isidentifier() or name.startswith("__"):
        raise missing
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists but something it imports is missing
        raise missing from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES} - _DEPRECATED.keys())


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
    "CryptoError",
    "DeliveryError",
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
    "RecipientsRefusedError",
    "RequireTLSError",
    "RetryPolicy",
    "RevocationPolicy",
    "SMIMECipher",
    "SMTPReply",
    "SMTPSettings",
    "Scheme",
    "SignerKeyError",
    "TLSError",
    "TLSInfo",
    "TLSMode",
    "TransportError",
    "password_from_command",
    "password_from_env",
]
