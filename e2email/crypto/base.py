"""The protection interface: a finalised message and a policy in, complete protected copies out.

An engine (:class:`Protector`) owns everything scheme-specific: which keys or certificates
the message needs (and the refusal naming every recipient that has none), the signing and
encryption, and the assembly of each copy's complete bytes from :mod:`e2email.message`'s
payload and header block. The client only composes, asks the engine, and delivers what it
returns; it never asks which scheme is at work. Engines are found by name in a small
registry (:func:`register_engine`, :func:`protector_for`), so adding one touches
``e2email/crypto/`` only.

The shapes every engine shares live here too: the copy plans (one copy for To and Cc, one
per Bcc recipient, RFC 5322 §3.6.3 blind copies), the key resolution that collects every
problem across To, Cc, Bcc and the sender before refusing (fail closed, naming each one),
and the passphrase source, asked at most once.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, Protocol, TypeVar

from e2email.config import OpenPGPEngine, PasswordSource, Protection, Scheme
from e2email.errors import (
    ConfigError,
    KeyProblem,
    MessageError,
    PassphraseError,
    RecipientKeyError,
    SignerKeyError,
)
from e2email.message import Address, Message, build_message, build_payload
from e2email.spool import READ_CHUNK, Spool, chunks_of

if TYPE_CHECKING:
    from e2email.certstore import CertStore
    from e2email.discovery.net import DiscoverySettings
    from e2email.keystore import Keystore

__all__ = [
    "CopyKind",
    "EngineContext",
    "Passphrase",
    "Plan",
    "ProtectedCopy",
    "Protector",
    "Resolved",
    "copy_plans",
    "engine_for_copy",
    "engine_name",
    "engine_names",
    "make_copy",
    "plain_copy",
    "protector_for",
    "register_engine",
    "resolve_keys",
    "unregister_engine",
]

CopyKind = Literal["main", "bcc"]


@dataclass(frozen=True, init=False)
class ProtectedCopy:
    """One copy of a message, ready to submit: the exact bytes and its envelope.

    The bytes are :attr:`content`: plain ``bytes`` for the usual message, a
    :class:`~e2email.spool.Spool` for a large one (kept in a private anonymous file, never
    held whole: the outbox stores it and DATA sends it a piece at a time through
    :meth:`chunks`). :attr:`raw` gives them as ``bytes`` either way (reading a spooled copy
    whole). Made with ``raw=`` (bytes or a spool) as before spools existed."""

    #: Left out of repr(): megabytes for a large message. (asyncio.run() formats the repr of
    #: its result in Python 3.11 when it restores the SIGINT handler.)
    content: bytes | Spool = field(repr=False)
    mail_from: str
    recipients: tuple[str, ...]
    #: "main" carries To and Cc (and, when not encrypting, Bcc in the envelope only);
    #: "bcc" is the separate copy for one Bcc recipient.
    kind: CopyKind
    message_id: str
    signed: bool
    #: Fingerprints of the keys this copy is encrypted to (empty when not encrypted); for
    #: S/MIME the certificates' SHA-256 fingerprints.
    encrypted_to: tuple[str, ...] = ()
    #: Fingerprint of the signing key (S/MIME: of the signer's certificate).
    signer: str | None = None
    #: The outbox item that holds this copy, when it is kept there (e.g. in an error's
    #: ``unsent``): sending the copy again then sends that item instead of storing it twice.
    outbox_id: str | None = None
    #: The engine whose keys ``encrypted_to`` names (:attr:`Protector.name`: "openpgp" for
    #: primary-key fingerprints, "smime" for certificate fingerprints); None when not
    #: encrypted. The outbox records it, so a retry re-checks those keys with that engine.
    scheme: str | None = None

    def __init__(
        self,
        raw: bytes | Spool | None = None,
        *,
        mail_from: str,
        recipients: tuple[str, ...],
        kind: CopyKind,
        message_id: str,
        signed: bool,
        encrypted_to: tuple[str, ...] = (),
        signer: str | None = None,
        outbox_id: str | None = None,
        scheme: str | None = None,
        content: bytes | Spool | None = None,
    ) -> None:
        # ``content`` is the field's name (dataclasses.replace passes it); ``raw`` the name
        # every caller used before spools.
        data = content if content is not None else raw
        if data is None:
            raise TypeError("ProtectedCopy needs its bytes (raw=...)")
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        setattr_ = object.__setattr__
        setattr_(self, "content", data)
        setattr_(self, "mail_from", mail_from)
        setattr_(self, "recipients", tuple(recipients))
        setattr_(self, "kind", kind)
        setattr_(self, "message_id", message_id)
        setattr_(self, "signed", signed)
        setattr_(self, "encrypted_to", tuple(encrypted_to))
        setattr_(self, "signer", signer)
        setattr_(self, "outbox_id", outbox_id)
        setattr_(self, "scheme", scheme)

    @property
    def raw(self) -> bytes:
        """The exact bytes, whole (a spooled copy is read into memory for this: the outbox
        and SMTP use :meth:`chunks` instead)."""
        data = self.content
        return data if isinstance(data, bytes) else data.getvalue()

    @property
    def size(self) -> int:
        """The length of the copy in bytes."""
        return len(self.content)

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The bytes, ``size`` at a time (a spooled copy read from its file as it goes)."""
        return chunks_of(self.content, size)

    def discard(self) -> None:
        """Free a spooled copy's file now (it goes anyway when the copy is garbage); its bytes
        can no longer be read. Nothing to do for bytes."""
        if isinstance(self.content, Spool):
            self.content.close()

    @property
    def spooled(self) -> bool:
        """Whether the bytes are in a spool file rather than in memory."""
        return isinstance(self.content, Spool)


# -- Copy plans --------------------------------------------------------------------------------

#: One copy to make: its kind and the recipients it goes to.
Plan = tuple[CopyKind, tuple[Address, ...]]


def copy_plans(message: Message) -> list[Plan]:
    """The encrypted copies: one for To and Cc, then one per Bcc recipient, so that no copy
    names (or is encrypted to) a Bcc recipient other than its own."""
    plans: list[Plan] = []
    if message.to or message.cc:
        plans.append(("main", (*message.to, *message.cc)))
    plans.extend(("bcc", (b,)) for b in message.bcc)
    return plans


def make_copy(
    raw: bytes | Spool,
    message: Message,
    kind: CopyKind,
    recipients: Iterable[Address],
    *,
    signed: bool,
    encrypted_to: Sequence[str] = (),
    signer: str | None = None,
    scheme: str | None = None,
) -> ProtectedCopy:
    """A copy of the finalised ``message``, from its sender to ``recipients``."""
    if message.message_id is None:
        raise ValueError("protect a finalised message (Message.finalized())")
    if isinstance(raw, Spool):
        raw = raw.contents()  # a small copy is plain bytes, as it always was
    return ProtectedCopy(
        raw=raw,
        mail_from=message.sender.addr_spec,
        recipients=tuple(a.addr_spec for a in recipients),
        kind=kind,
        message_id=message.message_id,
        signed=signed,
        encrypted_to=tuple(encrypted_to),
        signer=signer,
        scheme=scheme if encrypted_to else None,
    )


def plain_copy(message: Message) -> ProtectedCopy:
    """The message neither signed nor encrypted: one copy, Bcc in the envelope only."""
    raw = build_message(message, payload=build_payload(message, hp=None), hp=None)
    return make_copy(raw, message, "main", message.recipients, signed=False)


# -- Key resolution ----------------------------------------------------------------------------


class _Keyed(Protocol):
    @property
    def fingerprint(self) -> str: ...


K = TypeVar("K", bound=_Keyed)


@dataclass(frozen=True)
class Resolved(Generic[K]):
    """The keys (or certificates) one message needs: found for every address, or refused."""

    signer: K | None
    #: Lower-cased address -> its encryption key, for every recipient (To, Cc, Bcc).
    recipients: Mapping[str, K]
    #: The sender's own encryption key, when encrypting to self.
    own: K | None

    def keys_for(self, addresses: Iterable[Address]) -> list[K]:
        """The keys one copy is encrypted to: its recipients' and the sender's own, each once."""
        keys = [self.recipients[a.addr_spec.lower()] for a in addresses]
        if self.own is not None:
            keys.append(self.own)
        return list({k.fingerprint: k for k in keys}.values())


def resolve_keys(
    message: Message,
    protection: Protection,
    *,
    signer: Callable[[str], K | KeyProblem],
    recipients: Callable[[list[str]], tuple[dict[str, K], list[KeyProblem]]],
    own: Callable[[str], K | KeyProblem],
) -> Resolved[K]:
    """Find every key a message needs with an engine's own lookups, or raise naming every
    address without one (fail closed).

    ``signer(sender)`` finds the signing key; ``recipients(addresses)`` the encryption keys of
    the lower-cased recipient addresses (To, Cc and Bcc, each once) with a problem for each
    one it cannot serve; ``own(sender)`` the sender's encryption key for encrypt-to-self.
    Raises SignerKeyError for the signer, else RecipientKeyError listing every recipient's
    problem and the sender's own (the sender's saying why its key was needed)."""
    sender = message.sender.addr_spec
    signing: K | None = None
    if protection.sign:
        choice = signer(sender)
        if isinstance(choice, KeyProblem):
            raise SignerKeyError(choice)
        signing = choice
    found: dict[str, K] = {}
    self_key: K | None = None
    if protection.encrypt:
        addresses = list(dict.fromkeys(a.addr_spec.lower() for a in message.recipients))
        found, problems = recipients(addresses)
        problems = list(problems)
        if protection.encrypt_to_self:
            mine = own(sender)
            if isinstance(mine, KeyProblem):
                problems.append(_encrypt_to_self_problem(mine))
            else:
                self_key = mine
        if problems:
            raise RecipientKeyError(problems)
    return Resolved(signer=signing, recipients=found, own=self_key)


def _encrypt_to_self_problem(own: KeyProblem) -> KeyProblem:
    """The sender's own key problem, saying why the sender's key was needed at all."""
    return KeyProblem(
        own.address,
        own.reason,
        "sender, for encrypt-to-self; turn it off to send without a readable sent copy"
        + (f"; {own.detail}" if own.detail else ""),
        fingerprint=own.fingerprint,
    )


# -- The interface -----------------------------------------------------------------------------


class Protector(abc.ABC):
    """An engine: turns a finalised message into the protected copies to submit.

    :meth:`protect` returns every copy (one for To and Cc, one per Bcc recipient when
    encrypting) as complete messages, or raises before producing any: RecipientKeyError
    naming every recipient without a usable key, SignerKeyError, PassphraseError or
    CryptoError. A signing key that needs a passphrase and got none raises
    ``PassphraseError(missing=True)``: the caller then asks its source (:class:`Passphrase`)
    and calls again. Engines never open sockets.
    """

    #: The name recorded with each encrypted copy (:attr:`ProtectedCopy.scheme`) and the
    #: registry key: for the built-in engines the :class:`~e2email.config.Scheme` value.
    name: ClassVar[str]
    #: How many messages :meth:`~e2email.AsyncMailer.send_many` protects at once per CPU by
    #: default. One for an engine that holds the GIL while it works (Sequoia in process,
    #: ``cryptography``'s S/MIME): more only make the event loop wait for the GIL between its
    #: SMTP exchanges (measured: 5-20% fewer messages per second over one connection with
    #: two per CPU); two for one whose work runs in other processes (gpg), which the CPUs
    #: then share.
    protections_per_cpu: ClassVar[int] = 1

    @abc.abstractmethod
    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        """The copies of ``message`` (finalised) as ``protection`` asks."""

    def missing_keys(self, addresses: Sequence[str], protection: Protection) -> list[KeyProblem]:
        """Why each of ``addresses`` (bare, lower-cased) could not be encrypted to under
        ``protection``, found as :meth:`protect` finds keys (the store and the policy's key
        map): for a relay to refuse a recipient at RCPT already. Empty when every address
        has a usable key, or when the engine cannot tell before protecting (the default): the
        RCPT check is only the early answer, :meth:`protect` still refuses the message.
        Blocking (run it in a thread)."""
        return []

    def check_encrypted(
        self, head: bytes, body: bytes, addresses: Sequence[str], protection: Protection
    ) -> tuple[str, ...]:
        """For a message a program encrypted itself (``head``: its header block, ``body``:
        the rest): the fingerprints of ``addresses``' keys it is encrypted to. Raises
        RecipientKeyError naming each address without a usable key or not encrypted to,
        MessageError when the encrypted part cannot be read or is not integrity-protected.
        The default cannot read any format: it refuses. Blocking."""
        raise MessageError(f"the {self.name} engine cannot check who a message is encrypted to")

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        """Why a copy this engine encrypted to the keys ``encrypted_to`` (fingerprints, as in
        :attr:`ProtectedCopy.encrypted_to`) must not be sent now: each key no longer fit
        (revoked, expired, gone). Empty: send it. Blocking (run it in a thread)."""
        return []

    @classmethod
    def recognises(cls, head: bytes) -> bool:
        """Whether a copy whose header block is ``head`` (lower-cased) was made by this engine,
        for outbox copies stored before the engine's name was recorded with them."""
        return False


# -- Passphrases -------------------------------------------------------------------------------

T = TypeVar("T")


class Passphrase:
    """The passphrase of the sender's signing key, from a source asked at most once.

    A source that asks a person (a callable marked ``interactive = True``, like the CLI's
    prompt) is asked only when the key turns out to need one, so unprotected keys and a warm
    agent never trigger it. Any other source (a string, an environment variable, a command)
    is resolved before the first attempt: a passphrase given for the message must be the one
    that unlocks the key, never hidden by one a GnuPG agent has cached (issue 8 item 18,
    :meth:`~e2email.keystore.Keystore.forget_passphrase`)."""

    def __init__(self, source: PasswordSource | None) -> None:
        self._source = source
        self._value: str | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Passphrase(given={self._source is not None})"

    async def _resolve(self) -> str:
        async with self._lock:
            if self._value is None:
                source = self._source
                assert source is not None
                self._value = await asyncio.to_thread(
                    lambda: source if isinstance(source, str) else source()
                )
                if not isinstance(self._value, str):
                    raise ConfigError("the passphrase source gave no text")
        return self._value

    async def run(self, attempt: Callable[[str | None], Awaitable[T]]) -> T:
        """``attempt(passphrase)``; when it needs a passphrase it did not get, ask the source
        and try once more."""
        source = self._source
        if source is not None and self._value is None and not getattr(source, "interactive", False):
            await self._resolve()
        try:
            return await attempt(self._value)
        except PassphraseError as exc:
            if not exc.missing or source is None or self._value is not None:
                raise
        return await attempt(await self._resolve())


# -- The registry ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, init=False)
class EngineContext:
    """What an engine factory may use to make its engine (grows with keyword fields).

    The certificate store is given as ``certstore_source`` or, as before that field was
    added, ``certstore`` (either one: a store or a function that gives it)."""

    keystore: Keystore
    #: The S/MIME certificate store, or a function that gives it when it is first asked for
    #: (:attr:`certstore`): importing it loads ``cryptography``, which OpenPGP never needs.
    certstore_source: CertStore | Callable[[], CertStore]
    #: Network settings for OpenPGP key discovery (issue 10); None: the defaults.
    discovery_settings: DiscoverySettings | None = None

    def __init__(
        self,
        *,
        keystore: Keystore,
        certstore_source: CertStore | Callable[[], CertStore] | None = None,
        certstore: CertStore | Callable[[], CertStore] | None = None,
        discovery_settings: DiscoverySettings | None = None,
    ) -> None:
        # A custom __init__ (the class stays a frozen dataclass) for the old keyword
        # ``certstore=``, which code written before ``certstore_source`` passes.
        # (Neither is accepted, as before: an engine that needs no store never asks for it.)
        if certstore_source is not None and certstore is not None:
            raise TypeError("EngineContext() takes certstore_source= or certstore=, not both")
        source = certstore_source if certstore_source is not None else certstore
        object.__setattr__(self, "keystore", keystore)
        object.__setattr__(self, "certstore_source", source)
        object.__setattr__(self, "discovery_settings", discovery_settings)

    @functools.cached_property
    def certstore(self) -> CertStore:
        source = self.certstore_source
        return source() if callable(source) else source


EngineFactory = Callable[[EngineContext], Protector]


def _gpg(ctx: EngineContext) -> Protector:
    from e2email.crypto.gpg import GpgProtector

    return GpgProtector(ctx.keystore, discovery_settings=ctx.discovery_settings)


def _smime(ctx: EngineContext) -> Protector:
    from e2email.crypto.smime import SMIMEProtector

    return SMIMEProtector(ctx.certstore)


def _sequoia(ctx: EngineContext) -> Protector:
    from e2email.crypto.gpg import GpgProtector
    from e2email.crypto.sequoia import SequoiaProtector

    # Key lookup, judgment and discovery are the GnuPG engine's, made as _gpg makes it.
    lookup = _gpg(ctx)
    assert isinstance(lookup, GpgProtector)
    return SequoiaProtector(ctx.keystore, lookup=lookup)


def _gpg_recognises(head: bytes) -> bool:
    from e2email.crypto.gpg import GpgProtector

    return GpgProtector.recognises(head)


def _smime_recognises(head: bytes) -> bool:
    from e2email.crypto.smime import SMIMEProtector

    return SMIMEProtector.recognises(head)


#: name -> (factory, recognises): the built-in engines are imported only when first used.
_ENGINES: dict[str, tuple[EngineFactory, Callable[[bytes], bool]]] = {
    "smime": (_smime, _smime_recognises),
    "openpgp": (_gpg, _gpg_recognises),
    # The in-process OpenPGP engine (issue 9 part 2). Its copies record the scheme "openpgp"
    # (the same keys, re-checked the same way), so it recognises nothing of its own.
    "openpgp-sequoia": (_sequoia, lambda head: False),
}


def register_engine(
    name: str,
    factory: EngineFactory,
    *,
    recognises: Callable[[bytes], bool] | None = None,
    replace: bool = False,
) -> None:
    """Make ``factory`` the engine for ``name`` (a :class:`~e2email.config.Scheme` value for
    :func:`protector_for`). An existing name is replaced only with ``replace=True``."""
    if name in _ENGINES and not replace:
        raise ConfigError(f"an engine named {name!r} is registered already")
    _ENGINES[name] = (factory, recognises or (lambda head: False))


def unregister_engine(name: str) -> None:
    """Forget the engine ``name`` (the built-in ones come back with :func:`register_engine`)."""
    _ENGINES.pop(name, None)


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def engine_name(protection: Protection) -> str:
    """The name of the engine that protects under ``protection``: the one place a policy is
    mapped to an engine. OpenPGP: "openpgp-sequoia" (in process) for
    :attr:`~e2email.config.OpenPGPEngine.SEQUOIA`, and for ``AUTO`` when pysequoia is
    installed; "openpgp" (GnuPG) otherwise. Other schemes: the scheme's value."""
    if protection.scheme is Scheme.OPENPGP:
        choice = protection.engine
        if choice is OpenPGPEngine.SEQUOIA or (
            choice is OpenPGPEngine.AUTO and _sequoia_available()
        ):
            return "openpgp-sequoia"
        if choice is OpenPGPEngine.GPG and not _gpg_installed():
            # Said before any key is looked at, in one line, with what works instead.
            raise ConfigError(
                "--engine gpg needs the gpg program, which is not installed: use "
                "--engine sequoia (in process), or install GnuPG"
            )
    return str(protection.scheme.value)


def _gpg_installed() -> bool:
    import shutil

    return shutil.which("gpg") is not None


def _check_gpg_engine(protection: Protection, keystore: Keystore) -> None:
    """The GnuPG engine chosen for a new message needs the gpg program: say so in one line
    before any key is looked at. (A stored copy's re-check, by engine name, does not: the
    keystore judges keys without gpg.)"""
    import shutil

    if shutil.which(keystore.gpg_binary) is None:
        raise ConfigError(
            "no OpenPGP engine: pysequoia cannot be imported and gpg is not installed "
            "(pip install pysequoia, or install GnuPG)"
        )


def _sequoia_available() -> bool:
    from e2email.crypto.sequoia import available

    return available()


def protector_for(
    protection: Protection | str,
    *,
    keystore: Keystore,
    certstore: CertStore | Callable[[], CertStore],
    discovery_settings: DiscoverySettings | None = None,
) -> Protector:
    """The engine for ``protection`` (its scheme) or for an engine name. ``certstore`` may be
    a function that gives the store: it is then called only by an engine that needs it."""
    name = protection if isinstance(protection, str) else engine_name(protection)
    if name == "openpgp" and isinstance(protection, Protection):
        _check_gpg_engine(protection, keystore)
    entry = _ENGINES.get(name)
    if entry is None:
        raise ConfigError(f"no protection engine named {name!r}")
    context = EngineContext(
        keystore=keystore, certstore_source=certstore, discovery_settings=discovery_settings
    )
    return entry[0](context)


#: The engine that reads each kind of protection a program may have applied itself
#: (:func:`e2email.message.existing_protection`, which parses the top-level Content-Type).
_KIND_ENGINES: dict[str, str] = {
    "pgp-encrypted": "openpgp",
    "pgp-signed": "openpgp",
    "smime-encrypted": "smime",
    "smime-signed": "smime",
}


def engine_for_kind(kind: str) -> str:
    """The engine name for a message a program protected itself, by its parsed kind."""
    try:
        return _KIND_ENGINES[kind]
    except KeyError:
        raise ConfigError(f"no protection engine reads {kind!r} messages") from None


def engine_for_copy(scheme: str | None, raw: bytes | Spool | None) -> str:
    """The engine name of a stored copy: as recorded, else recognised from its header block
    (copies stored before the name was recorded), else "openpgp" (the only engine then)."""
    if scheme:
        return scheme
    start = raw.read(0, 1 << 14) if isinstance(raw, Spool) else (raw or b"")[: 1 << 14]
    head = start.split(b"\r\n\r\n", 1)[0].lower()
    for name, (_, recognises) in _ENGINES.items():
        if recognises(head):
            return name
    return "openpgp"
