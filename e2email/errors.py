"""Every error e2email raises, in one tree.

Nothing here imports from the rest of the package, so any layer may raise these::

    E2EmailError
    ├── ConfigError                settings that cannot work (bad port/TLS mode, no password source)
    │   ├── InsecureTransportError plaintext or AUTH without TLS, not explicitly allowed
    │   └── InsecurePathError      a private file or folder owned by another user, or loose
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
        │   └── RequireTLSError    REQUIRETLS (RFC 8689) asked for, the server does not offer it
        ├── AuthenticationError    the server refused our credentials
        └── DeliveryError          the server refused the sender, the data, or recipients
            └── RecipientsRefusedError  some or all recipients refused (carries the results)

Each error carries what a user needs to act on it (the recipient, the reason, the server's reply)
as attributes, and its ``str()`` is one readable line. Lower-level exceptions are chained with
``raise ... from`` at the boundary where they are translated.

Every :class:`TransportError` says whether trying again later may help
(:attr:`TransportError.transient`): a 4xx reply, a timeout or a dropped or refused connection is
transient; a 5xx reply, a TLS or certificate problem and refused credentials are not.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    # For the types of ``result`` and ``unsent`` only: at run time this module imports nothing
    # from the package, so every layer can import it without a cycle.
    from e2email.crypto.base import ProtectedCopy
    from e2email.outcome import BatchResult, CopyOutcome, MessageOutcome

#: What an error says was done before it, as the one outcome type of :mod:`e2email.outcome`:
#: one message's (:meth:`AsyncMailer.send`, and one message of a batch in the Django backend),
#: one transaction's (the transport), a batch (:meth:`AsyncMailer.send_many`) or the copies of
#: an outbox run (:meth:`AsyncMailer.send_outbox`); None when nothing was attempted.
ErrorResult: TypeAlias = (
    "MessageOutcome | CopyOutcome | BatchResult | tuple[CopyOutcome, ...] | None"
)

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "CryptoError",
    "DeliveryError",
    "E2EmailError",
    "ErrorResult",
    "HeldError",
    "InsecurePathError",
    "InsecureTransportError",
    "KeyErrorBase",
    "KeyProblem",
    "KeyReason",
    "KeystoreError",
    "MessageError",
    "PassphraseError",
    "RecipientKeyError",
    "RecipientsRefusedError",
    "RequireTLSError",
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
    #: A user-supplied GnuPG home's own validity says "no assurance" (unknown, undefined or
    #: never) for the user ID with this address.
    UNVALIDATED = "key not validated in the GnuPG home"
    BACKEND = "rejected by the crypto backend"
    # X.509 certificates (S/MIME, RFC 8550):
    NOT_YET_VALID = "certificate not yet valid"
    UNTRUSTED = "certificate not trusted"
    WRONG_USAGE = "certificate not issued for this use"
    UNSUPPORTED = "key type not supported"
    #: S/MIME revocation status required (``--revocation require``) but not established.
    REVOCATION_UNKNOWN = "revocation status unknown"
    #: A message the calling program encrypted already is not encrypted to this key.
    NOT_ENCRYPTED_TO = "message not encrypted to this recipient's key"
    # Key discovery (WKD, keyservers, Autocrypt: e2email.discovery):
    #: The lookup itself failed (timeout, TLS, host not found, response too large, ...).
    LOOKUP_FAILED = "key lookup failed"
    #: A key was found for an address that already has a different key: never used silently.
    DIFFERENT_KEY = "a different key was found"
    #: A key found only where nobody checks that the address is its owner's (an HKP
    #: keyserver): held back until ``keys accept``.
    UNVERIFIED = "key found only on a keyserver that does not verify addresses"


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
    """Root of every error e2email raises on purpose.

    When the client raises an error after the message was protected (and stored in the
    outbox, if any), ``result`` says what was delivered so far (with the outbox IDs ``kept``)
    and ``unsent`` holds the protected copies not delivered: the message is never lost.
    """

    result: ErrorResult = None
    unsent: tuple[ProtectedCopy, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        # Many subclasses' __init__ takes other arguments than ``args`` (the problems, the
        # refusals, keywords) and builds the message from them, so pickle's default (calling
        # the class with ``args``) fails or garbles the message. Rebuild without __init__:
        # the same ``args`` (the message), then every attribute (``result``, ``refused``...).
        return (_rebuild_error, (type(self), self.args), self.__dict__)

    @property
    def unsent_recipients(self) -> tuple[str, ...]:
        """The recipients not delivered: those of the ``unsent`` copies, each once."""
        return tuple(dict.fromkeys(a for c in self.unsent for a in c.recipients))


def _rebuild_error(cls: type[E2EmailError], args: tuple[Any, ...]) -> E2EmailError:
    """An unpickled error: made with ``args`` as they were, not through ``cls.__init__``."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class ConfigError(E2EmailError, ValueError):
    """Settings that cannot work as given."""


class InsecureTransportError(ConfigError):
    """A setting would send mail or credentials without TLS and was not explicitly allowed."""


class InsecurePathError(ConfigError):
    """A private file or folder (home, outbox, keystore, drafts, a report) cannot be made
    private, is owned by another user, or may be written by group or others."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


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


class HeldError(RecipientKeyError):
    """A queued copy is held, not sent: a key (or certificate) it was encrypted to has been
    revoked, has expired or is gone since it was queued. ``problems`` names each."""

    def __init__(self, problems: Iterable[KeyProblem]) -> None:
        super().__init__(problems)
        listed = "; ".join(str(p) for p in self.problems)
        self.args = (
            f"held, not sent: encrypted to a key that is no longer fit since it was queued: "
            f"{listed} (`e2email outbox drop` it and send the message again)",
        )


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
    ``attempts`` lists each connection attempt (port, TLS mode, outcome) when more than one
    port was tried (:class:`e2email.transport.ports.PortAttempt`).
    """

    #: Whether an error of this class without a server reply is worth retrying later.
    _transient_without_reply = False
    #: True when the failure came after the end-of-data line was sent (a lost DATA reply, a
    #: dropped connection, a timeout): the server may have accepted the message (RFC 5321
    #: §6.1, RFC 1047), so sending it again may deliver a second copy. Set by the transport.
    maybe_delivered: bool = False

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        reply: SMTPReply | None = None,
        result: ErrorResult = None,
        transient: bool | None = None,
    ) -> None:
        if reply is not None:
            message = f"{message}: server said {reply}"
        super().__init__(message)
        self.host = host
        self.reply = reply
        self.result = result
        self.unsent = ()
        self.attempts: tuple[Any, ...] = ()
        self._transient = transient

    @property
    def transient(self) -> bool:
        """May the same attempt succeed later (so a retry with back-off makes sense)?

        Decided, in order, by: an explicit ``transient=`` given when raised; else the server's
        reply (4xx transient, 5xx permanent: RFC 5321 §4.2.1); else the class: timeouts,
        refused and dropped connections (:class:`ConnectError`) are transient; TLS and
        certificate problems, refused credentials and anything else are not.
        """
        if self._transient is not None:
            return self._transient
        if self.reply is not None:
            return self.reply.is_transient
        return self._transient_without_reply


class ConnectError(TransportError, ConnectionError):
    """The server could not be reached, timed out, or dropped the connection. Transient unless
    the server answered with a 5xx (e.g. a ``554`` greeting)."""

    _transient_without_reply = True


class TLSError(TransportError):
    """TLS could not be established safely: no STARTTLS, certificate or host name not verified,
    or a protocol older than TLS 1.2. No credentials and no message data were sent. Not
    transient (unless the server itself said 4xx, e.g. ``454`` to STARTTLS): a certificate that
    does not verify is a configuration problem or an attack, and waiting fixes neither."""


class RequireTLSError(TLSError):
    """REQUIRETLS (RFC 8689) was asked for, but the server does not offer it (its EHLO after
    TLS lacks the keyword), so the message was not sent: MAIL was never issued."""


class AuthenticationError(TransportError):
    """The server refused the credentials, or offers no mechanism we will use. Not transient,
    except when the server says so with a 4xx (``454 4.7.0`` temporary failure, RFC 4954 §6):
    repeating refused credentials only brings a lock-out closer."""


class DeliveryError(TransportError):
    """The server refused the sender, the message data or recipients."""


class RecipientsRefusedError(DeliveryError):
    """The server refused some or all recipients. ``refused`` maps each address to the reply."""

    def __init__(
        self,
        refused: Sequence[tuple[str, SMTPReply]],
        *,
        host: str | None = None,
        result: ErrorResult = None,
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

    @property
    def transient(self) -> bool:
        """True when every refusal was a 4xx (so retrying the refused recipients may work).
        Decide per recipient with ``refused[address].is_transient``."""
        if self._transient is not None:
            return self._transient
        return bool(self.refused) and all(r.is_transient for r in self.refused.values())
