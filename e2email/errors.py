"""Every error e2email raises, in one tree.

Nothing here imports from the rest of the package, so any layer may raise these::

    E2EmailError
    ├── ConfigError                settings that cannot work (bad port/TLS mode, no password source)
    │   └── InsecureTransportError plaintext or AUTH without TLS, not explicitly allowed
    ├── MessageError               bad input: header injection, invalid address, unreadable file
    ├── KeyErrorBase               something about keys
    │   ├── RecipientKeyError      one or more recipients have no usable key (lists every one)
    │   ├── SignerKeyError         the sender's own key is missing or unusable
    │   ├── PassphraseError        a secret key's passphrase is missing or wrong
    │   └── KeystoreError          importing, exporting or generating keys failed
    ├── CryptoError                the crypto backend failed or produced something unsafe
    └── TransportError             anything between us and the SMTP server
        ├── ConnectError           refused, timed out, name not found, dropped
        ├── TLSError               no STARTTLS, certificate or host name not verified, old TLS
        ├── AuthenticationError    the server refused our credentials
        └── DeliveryError          the server refused the sender, the data, or recipients
            └── RecipientsRefusedError  some or all recipients refused (carries the results)

Each error carries what a user needs to act on it (the recipient, the reason, the server's reply)
as attributes, and its ``str()`` is one readable line. Lower-level exceptions are chained with
``raise ... from`` at the boundary where they are translated.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "CryptoError",
    "DeliveryError",
    "E2EmailError",
    "InsecureTransportError",
    "KeyErrorBase",
    "KeyProblem",
    "KeyReason",
    "KeystoreError",
    "MessageError",
    "PassphraseError",
    "RecipientKeyError",
    "RecipientsRefusedError",
    "SMTPReply",
    "SignerKeyError",
    "TLSError",
    "TransportError",
]


@dataclass(frozen=True)
class SMTPReply:
    """An SMTP server reply: the three-digit code and its text (RFC 5321 §4.2)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()

    @property
    def is_transient(self) -> bool:
        """4xx replies are transient: the same command may succeed later (RFC 5321 §4.2.1)."""
        return 400 <= self.code < 500


class KeyReason(enum.Enum):
    """Why a key cannot be used. The value is the phrase shown to users."""

    NOT_FOUND = "no key found"
    EXPIRED = "key expired"
    REVOKED = "key revoked"
    DISABLED = "key disabled"
    INVALID = "key invalid"
    NO_ENCRYPTION_KEY = "no valid encryption-capable (sub)key"
    NO_SIGNING_KEY = "no valid signing-capable (sub)key"
    NO_SECRET_KEY = "secret key not available"
    WEAK = "key too weak"
    ADDRESS_MISMATCH = "key does not carry this address"
    AMBIGUOUS = "more than one key matches"
    BACKEND = "rejected by the crypto backend"


@dataclass(frozen=True)
class KeyProblem:
    """One address whose key cannot be used, and why."""

    address: str
    reason: KeyReason
    detail: str = ""
    fingerprint: str | None = None

    def __str__(self) -> str:
        text = f"{self.address}: {self.reason.value}"
        if self.detail:
            text += f" ({self.detail})"
        return text


class E2EmailError(Exception):
    """Root of every error e2email raises on purpose."""


class ConfigError(E2EmailError, ValueError):
    """Settings that cannot work as given."""


class InsecureTransportError(ConfigError):
    """A setting would send mail or credentials without TLS and was not explicitly allowed."""


class MessageError(E2EmailError, ValueError):
    """The message cannot be built as given (bad header, address, body or attachment)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class KeyErrorBase(E2EmailError):
    """Something about keys prevents protecting the message. Named so as not to shadow KeyError."""


class RecipientKeyError(KeyErrorBase):
    """Fail closed: at least one recipient (To, Cc or Bcc) has no usable key. Nothing was sent."""

    def __init__(self, problems: Iterable[KeyProblem]) -> None:
        self.problems: tuple[KeyProblem, ...] = tuple(problems)
        listed = "; ".join(str(p) for p in self.problems)
        count = len(self.problems)
        noun = "recipient has" if count == 1 else "recipients have"
        super().__init__(f"not sent: {count} {noun} no usable key: {listed}")

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(p.address for p in self.problems)


class SignerKeyError(KeyErrorBase):
    """The sender's signing key is missing or unusable."""

    def __init__(self, problem: KeyProblem) -> None:
        self.problem = problem
        super().__init__(f"cannot sign: {problem}")


class PassphraseError(KeyErrorBase):
    """A secret key needs a passphrase that was not given (``missing``), or the one given is
    wrong."""

    def __init__(
        self, message: str, *, fingerprint: str | None = None, missing: bool = False
    ) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint
        self.missing = missing


class KeystoreError(KeyErrorBase):
    """Importing, exporting, listing or generating keys failed."""


class CryptoError(E2EmailError):
    """The crypto backend failed, or its output did not meet our safety checks."""


class TransportError(E2EmailError):
    """Talking to the SMTP server failed. ``reply`` is the server's reply when there was one.

    When raised by the client, ``result`` holds what was delivered before the failure and
    ``unsent`` the protected copies that were not (ready to retry or write out: never lost).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        reply: SMTPReply | None = None,
        result: Any = None,
    ) -> None:
        if reply is not None:
            message = f"{message}: server said {reply}"
        super().__init__(message)
        self.host = host
        self.reply = reply
        self.result = result
        self.unsent: tuple[Any, ...] = ()


class ConnectError(TransportError, ConnectionError):
    """The server could not be reached, timed out, or dropped the connection."""


class TLSError(TransportError):
    """TLS could not be established safely: no STARTTLS, certificate or host name not verified,
    or a protocol older than TLS 1.2. No credentials and no message data were sent."""


class AuthenticationError(TransportError):
    """The server refused the credentials, or offers no mechanism we will use."""


class DeliveryError(TransportError):
    """The server refused the sender, the message data or recipients."""


class RecipientsRefusedError(DeliveryError):
    """The server refused some or all recipients. ``refused`` maps each address to the reply."""

    def __init__(
        self,
        refused: Sequence[tuple[str, SMTPReply]],
        *,
        host: str | None = None,
        result: Any = None,
        accepted: Sequence[str] = (),
    ) -> None:
        self.refused: dict[str, SMTPReply] = dict(refused)
        self.accepted: tuple[str, ...] = tuple(accepted)
        listed = "; ".join(f"{addr}: {reply}" for addr, reply in self.refused.items())
        if self.accepted:
            head = (
                f"partly delivered: accepted for {len(self.accepted)}, "
                f"refused for {len(self.refused)}"
            )
        else:
            head = "not delivered: every recipient was refused"
        super().__init__(f"{head}: {listed}", host=host, result=result)
