"""Settings: small frozen dataclasses, validated when they are made.

Imports only :mod:`e2email.errors`, so every layer may use them.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import os
import random as _random
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import idna
import platformdirs

from e2email.errors import ConfigError, InsecureTransportError

__all__ = [
    "DEFAULT_PORTS",
    "DEFAULT_PORT_ORDER",
    "HOME_ENV",
    "SMIME_DIGESTS",
    "DiscoveryPolicy",
    "OpenPGPEngine",
    "PasswordSource",
    "Protection",
    "RetryPolicy",
    "RevocationPolicy",
    "SMIMECipher",
    "SMTPSettings",
    "Scheme",
    "TLSMode",
    "default_home",
    "host_for_connecting",
    "password_from_command",
    "password_from_env",
]

HOME_ENV = "E2EMAIL_HOME"


def default_home() -> Path:
    """``$E2EMAIL_HOME`` if set, else the user's data directory (``~/.local/share/e2email``)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("e2email", appauthor=False))


class TLSMode(enum.Enum):
    """How the SMTP connection is protected."""

    #: TLS from the first byte (RFC 8314 §3.3), the standard for port 465.
    IMPLICIT = "implicit"
    #: Plain connect, then STARTTLS, which is *required*: a server that does not offer it is
    #: refused, never used in clear (RFC 3207; no opportunistic mode exists here).
    STARTTLS = "starttls"
    #: No TLS at all. Only for test rigs; needs ``allow_insecure_plaintext=True`` and never
    #: carries credentials.
    INSECURE_PLAINTEXT = "insecure-plaintext"


#: Ports whose TLS mode is implied when the user does not name one. 25 is here because naming it
#: is asking for it; STARTTLS is still required there.
DEFAULT_PORTS: Mapping[int, TLSMode] = {
    465: TLSMode.IMPLICIT,
    587: TLSMode.STARTTLS,
    2525: TLSMode.STARTTLS,
    25: TLSMode.STARTTLS,
}

#: The ports tried, in order, when only a host is given: implicit TLS first (RFC 8314 §3.3
#: prefers it), then submission with STARTTLS required (RFC 6409), then 2525, a common
#: non-standard alternative where 587 is blocked. Never 25 and never plaintext unless asked.
DEFAULT_PORT_ORDER: tuple[int, ...] = (465, 587, 2525)

#: One label of a host name once in ASCII: letters, digits, hyphens (not at either end) and,
#: leniently, underscores (found in local and container service names), 1 to 63 octets
#: (RFC 1035 §2.3.4, RFC 5890 §2.3.1).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def host_for_connecting(host: str, *, what: str = "SMTP host", port_hint: str | None = None) -> str:
    """Check ``host`` (a host name or an IP address) and return the form to connect with.

    A name is checked and converted to A-labels with IDNA 2008 and the UTS #46 mapping
    (non-transitional), as every address domain is: ``faß.de`` becomes ``xn--fa-hia.de``, never
    the IDNA 2003 ``fass.de`` that the standard library's codec (used by ``socket`` and ``ssl``
    for a non-ASCII name) would look up. An IPv4 or IPv6 address is taken as is; an IPv6 one
    may be written in brackets (``[::1]``). A port glued to the host (``localhost:587``,
    ``[::1]:587``) is refused with a pointer to the separate port setting, instead of being
    looked up as a name that does not exist. Everything else that is not a valid name (empty
    labels, a label over 63 octets, characters that are not UTF-8) is a :class:`ConfigError`.
    ``what`` names the setting and ``port_hint`` says where a port belongs instead, in it.
    """
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{what} is empty")
    # What the user gave, printable: bytes that were not UTF-8 (surrogate escapes from argv)
    # as \\udcXX, so the error itself cannot fail to print.
    shown = _printable(host)
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is not None:
        if literal is not host and address.version != 6:
            raise ConfigError(f"{what} {shown!r}: only IPv6 addresses are written in brackets")
        return address.compressed
    glued = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):(\w*)", host)
    if glued is not None:
        name, port = glued.groups()
        if port_hint is None:
            port_hint = f"the port separately (--port {port if port.isdigit() else 'PORT'})"
        raise ConfigError(
            f"{what} {shown!r} contains a port: give the host alone ({name.strip('[]')!r}) "
            f"and {port_hint}"
        )
    if ":" in host:
        raise ConfigError(f"{what} {shown!r} is neither a host name nor an IP address")
    name = host[:-1] if host.endswith(".") else host
    try:
        if not name.isascii() or "xn--" in name.lower():
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        why = _printable(str(exc))
        raise ConfigError(f"{what} {shown!r} is not a valid host name: {why}") from None
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{what} {shown!r} is not a valid host name")
    return name.lower() + ("." if host.endswith(".") else "")


#: A password, or a zero-argument callable that returns one when it is first needed.
PasswordSource = str | Callable[[], str]


class _FromEnvironment:
    """A secret in an environment variable: already inside this process, so reading it early
    (``in_process``) exposes nothing. The transport reads other sources only after TLS is
    verified."""

    in_process = True

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.what = what

    def __call__(self) -> str:
        value = os.environ.get(self.name)
        if value is None:
            raise ConfigError(f"environment variable {self.name} ({self.what}) is not set")
        return value


def password_from_env(name: str, *, what: str = "the SMTP password") -> Callable[[], str]:
    """A password source that reads environment variable ``name`` when the password is needed.
    ``what`` names the secret in error messages (e.g. ``"the OAuth2 access token"``)."""
    return _FromEnvironment(name, what)


def password_from_command(command: str, *, what: str = "password") -> Callable[[], str]:
    """A password source that runs ``command`` through ``sh -c`` (like msmtp's ``passwordeval``)
    and takes the first line it prints. ``what`` names the secret in error messages."""

    def run() -> str:
        try:
            done = subprocess.run(  # noqa: S602 - the user's own command, as in msmtp
                command, shell=True, capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{what} command failed: {exc}") from exc
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else "no message"
            raise ConfigError(f"{what} command exited with {done.returncode}: {why}")
        try:
            lines = done.stdout.decode("utf-8", errors="strict").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} command printed something that is not UTF-8") from exc
        if not lines or not lines[0]:
            raise ConfigError(f"{what} command printed nothing")
        return lines[0]

    return run


@dataclass(frozen=True, kw_only=True)
class SMTPSettings:
    """Where and how to submit mail.

    ``port`` and ``tls`` imply each other for 465 (implicit), 587/2525/25 (STARTTLS required);
    any other port needs ``tls`` named. With a ``port``, only that port is used. Without one,
    the ports of ``port_order`` are tried in turn (465, 587, 2525; only those of ``tls`` when
    it is named), the one that worked last time for this host first (remembered in
    ``hosts_file``): see :mod:`e2email.transport.ports` for when the next port is tried.
    """

    host: str
    port: int | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password: PasswordSource | None = field(default=None, repr=False)
    #: An OAuth2 access token (or a source of one) for AUTH XOAUTH2, as Gmail and Microsoft
    #: 365 want, instead of a password. Needs ``username``; asked for only inside TLS.
    oauth_token: PasswordSource | None = field(default=None, repr=False)
    ca_file: Path | None = None
    #: The default for the connect and command timeouts below when they are not set, and
    #: for ``data_timeout=None`` (seconds).
    timeout: float = 60.0
    #: TCP connect, implicit-TLS handshake and the server's greeting, per port tried.
    connect_timeout: float | None = None
    #: Each command's reply (EHLO, STARTTLS with its handshake, AUTH, MAIL, RCPT, QUIT).
    command_timeout: float | None = None
    #: The reply to DATA, each piece of the message and the final reply after it. Its own
    #: default, 10 minutes: RFC 5321 §4.5.3.2.6 asks the client to wait that long for the reply
    #: to the final ".", since the server may be filtering the message; giving up sooner makes
    #: the retry deliver it twice.
    data_timeout: float | None = 600.0
    #: Ports tried when ``port`` is not set: a port (whose TLS mode is implied: 465 implicit,
    #: 587/2525/25 STARTTLS) or a (port, TLSMode) pair. Plaintext is never allowed here.
    port_order: tuple[int | tuple[int, TLSMode], ...] = DEFAULT_PORT_ORDER
    #: Where to remember which port worked for each host (a JSON file, e.g. HOME/hosts.json);
    #: ``None``: nothing is remembered.
    hosts_file: Path | None = None
    #: REQUIRETLS (RFC 8689): ask every relay on the way to the recipient to use verified TLS,
    #: and refuse to send (before MAIL) when the submission server does not offer it.
    require_tls: bool = False
    #: The name given in EHLO. Not the machine's host name by default: servers copy it into
    #: the Received header, which would tell every recipient what the sender's machine is
    #: called. An address literal (RFC 5321 §4.1.3) is what Thunderbird sends.
    local_hostname: str = "[127.0.0.1]"
    #: The loudly named opt-in for a connection without TLS (test rigs only). Even then no
    #: credentials are ever sent over it.
    allow_insecure_plaintext: bool = False

    def __post_init__(self) -> None:
        # Checked once here, so that every user of the settings can rely on it (a bad name is
        # a usage error, never a lookup retried three times or an internal error).
        host_for_connecting(self.host)
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"invalid SMTP port {self.port}")
        for name in ("timeout", "connect_timeout", "command_timeout", "data_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive")
        object.__setattr__(self, "port_order", tuple(self.port_order))
        self._check_port_order()
        if self.tls is None and self.port is not None and self.port not in DEFAULT_PORTS:
            raise ConfigError(
                f"port {self.port} has no standard TLS mode: say which (implicit TLS or STARTTLS)"
            )
        if self.effective_tls is TLSMode.INSECURE_PLAINTEXT:
            if not self.allow_insecure_plaintext:
                raise InsecureTransportError(
                    "plaintext SMTP refused: it needs the explicit allow_insecure_plaintext "
                    "option (--insecure-plaintext)"
                )
            if (
                self.username is not None
                or self.password is not None
                or self.oauth_token is not None
            ):
                raise InsecureTransportError("credentials are never sent without TLS")
            if self.require_tls:
                raise InsecureTransportError("REQUIRETLS cannot be asked for without TLS")
        if self.username is not None and ("\0" in self.username or "\n" in self.username):
            raise ConfigError("invalid character in SMTP user name")
        if self.oauth_token is not None:
            if self.password is not None:
                raise ConfigError("give a password or an OAuth2 token (XOAUTH2), not both")
            if self.username is None:
                raise ConfigError("XOAUTH2 needs the user name (the account's address)")
        if self.username is not None and any(c in self.username for c in "\x01\r"):
            # \x01 separates the fields of an XOAUTH2 response; CR would end an AUTH line.
            raise ConfigError("invalid character in SMTP user name")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"CA file {self.ca_file} does not exist or is not a file")

    def _check_port_order(self) -> None:
        if not self.port_order:
            raise ConfigError("port_order is empty")
        seen: set[int] = set()
        for entry in self.port_order:
            mode: TLSMode | None
            if isinstance(entry, tuple):
                if len(entry) != 2 or not isinstance(entry[1], TLSMode):
                    raise ConfigError(f"port_order entry {entry!r} is not (port, TLSMode)")
                port, mode = entry
            else:
                port, mode = entry, DEFAULT_PORTS.get(entry)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"invalid port {port!r} in port_order")
            if mode is None:
                raise ConfigError(f"port {port} in port_order has no standard TLS mode: say which")
            if mode is TLSMode.INSECURE_PLAINTEXT:
                # Falling back must never lose TLS; plaintext exists only as an explicit port.
                raise ConfigError("port_order cannot contain plaintext ports")
            if port in seen:
                raise ConfigError(f"port {port} appears twice in port_order")
            seen.add(port)
        if self.port is None and not self.candidates:
            assert self.tls is not None  # only a named mode can filter every port out
            raise ConfigError(f"no port in port_order uses TLS mode {self.tls.value}")

    @property
    def candidates(self) -> tuple[tuple[int, TLSMode], ...]:
        """The (port, TLS mode) pairs to try, in order (before the host memory reorders them)."""
        if self.port is not None:
            return ((self.port, self.effective_tls),)
        if self.tls is TLSMode.INSECURE_PLAINTEXT:
            return ((25, TLSMode.INSECURE_PLAINTEXT),)
        pairs = []
        for entry in self.port_order:
            port, mode = entry if isinstance(entry, tuple) else (entry, DEFAULT_PORTS[entry])
            if self.tls is None or mode is self.tls:
                pairs.append((port, mode))
        return tuple(pairs)

    @functools.cached_property
    def connect_host(self) -> str:
        """The host to connect to and to verify the certificate for: ``host`` with a name in
        A-labels (IDNA 2008, UTS #46) and an IPv6 address without brackets."""
        return host_for_connecting(self.host)

    @property
    def effective_tls(self) -> TLSMode:
        """The TLS mode of the first port tried."""
        if self.tls is not None:
            return self.tls
        if self.port is None:
            return self.candidates[0][1]
        return DEFAULT_PORTS[self.port]

    @property
    def effective_port(self) -> int:
        """The first port tried."""
        if self.port is not None:
            return self.port
        return self.candidates[0][0]

    @property
    def effective_connect_timeout(self) -> float:
        return self.connect_timeout if self.connect_timeout is not None else self.timeout

    @property
    def effective_command_timeout(self) -> float:
        return self.command_timeout if self.command_timeout is not None else self.timeout

    @property
    def effective_data_timeout(self) -> float:
        return self.data_timeout if self.data_timeout is not None else self.timeout

    def resolve_password(self) -> str | None:
        """The password, running its source now if it is a callable."""
        if self.password is None or isinstance(self.password, str):
            return self.password
        return self.password()

    def resolve_oauth_token(self) -> str | None:
        """The OAuth2 access token, running its source now if it is a callable."""
        if self.oauth_token is None or isinstance(self.oauth_token, str):
            return self.oauth_token
        return self.oauth_token()


class Scheme(enum.Enum):
    """Which end-to-end standard protects the message."""

    OPENPGP = "openpgp"
    SMIME = "smime"


class SMIMECipher(enum.Enum):
    """The content cipher of S/MIME enveloped-data (RFC 8551 §2.7). CBC, not GCM: Outlook and
    most clients cannot read authEnveloped-data, and the inner signature protects integrity."""

    AES256_CBC = "aes256"
    AES128_CBC = "aes128"


#: S/MIME signature digests we make (RFC 8551 §2.1: SHA-256 MUST; SHA-1 and MD5 never).
SMIME_DIGESTS = ("sha256", "sha384", "sha512")


class RevocationPolicy(enum.Enum):
    """Whether S/MIME revocation status is fetched (OCSP, RFC 6960; CRL distribution points,
    RFC 5280 §4.2.1.13) for every certificate of a chain, recipients' and the signer's.

    CRLs imported with ``keys import`` are used whatever the policy: a certificate they list
    is refused. ``OFF`` fetches nothing; ``PREFER`` fetches and refuses a revoked
    certificate, but goes on when no status can be had (responder unreachable, answer
    invalid or stale); ``REQUIRE`` refuses a certificate whose status cannot be established.
    An expired imported CRL (nextUpdate passed) still revokes what it lists, but says nothing
    about the rest: it counts as no CRL, so ``REQUIRE`` then needs a fresh answer."""

    OFF = "off"
    PREFER = "prefer"
    REQUIRE = "require"


class OpenPGPEngine(enum.Enum):
    """Which engine makes OpenPGP messages (issue 9 part 4). Both give the same PGP/MIME with
    the same keys and the same key judgment; they differ in where the cryptography runs."""

    #: In process, through Sequoia (pysequoia), when it is installed; else GnuPG.
    AUTO = "auto"
    #: In process, through Sequoia (the ``e2email[sequoia]`` extra): no process per copy.
    SEQUOIA = "sequoia"
    #: Through the gpg program (python-gnupg): smartcards and gpg-agent keys.
    GPG = "gpg"


class DiscoveryPolicy(enum.Enum):
    """Where keys are looked up for recipients with no usable local key (issue 10).

    ``OFF`` (the library default) asks no network; ``WKD`` asks each recipient's own domain
    (Web Key Directory); ``WKD_KEYSERVER`` then a keyserver (keys.openpgp.org's VKS API, or
    HKPS). See :mod:`e2email.discovery`: a found key is still judged by the keystore's rules,
    and one that differs from a key already stored is refused until accepted."""

    OFF = "off"
    WKD = "wkd"
    WKD_KEYSERVER = "wkd+keyserver"


@dataclass(frozen=True, kw_only=True)
class Protection:
    """What to do to each message. The default signs and encrypts with OpenPGP."""

    sign: bool = True
    encrypt: bool = True
    #: Also encrypt to the sender, so the sent copy stays readable to them.
    encrypt_to_self: bool = True
    scheme: Scheme = Scheme.OPENPGP
    #: Explicit address -> key (fingerprint) choices that override lookup by address. With
    #: S/MIME the value is a certificate's SHA-256 (or SHA-1) fingerprint.
    key_map: Mapping[str, str] = field(default_factory=dict)
    #: S/MIME only: the content cipher (AES-256-CBC unless AES-128-CBC is asked for).
    smime_cipher: SMIMECipher = SMIMECipher.AES256_CBC
    #: S/MIME only: the signature digest, one of :data:`SMIME_DIGESTS`.
    smime_digest: str = "sha256"
    #: S/MIME only: RSASSA-PSS signatures (RFC 4056) instead of PKCS#1 v1.5 for RSA signers.
    smime_rsa_pss: bool = False
    #: S/MIME only: SHA-256 fingerprints of self-signed certificates accepted as their own trust
    #: anchor for these messages (the explicit, named exception to chain validation).
    smime_trust_self_signed: frozenset[str] = frozenset()
    #: S/MIME only: fetch revocation status (OCSP, CRL distribution points) for every
    #: certificate in the chains of the recipients and the signer. Imported CRLs are always
    #: used. See :class:`RevocationPolicy`.
    revocation: RevocationPolicy = RevocationPolicy.OFF
    #: OpenPGP only: look up keys of recipients who have none (see :class:`DiscoveryPolicy`).
    discovery: DiscoveryPolicy = DiscoveryPolicy.OFF
    #: OpenPGP only: which engine protects the message (a value or its name: "auto",
    #: "sequoia", "gpg"). See :class:`OpenPGPEngine`.
    engine: OpenPGPEngine = OpenPGPEngine.AUTO
    #: OpenPGP only: publish the sender's key in an ``Autocrypt:`` header of every message
    #: (and, when encrypting to several To/Cc recipients, their keys in ``Autocrypt-Gossip``
    #: headers inside the encryption), so that peers' mail programs can encrypt replies
    #: (Autocrypt Level 1). False for senders that must not publish keys (Level 1 "Account
    #: Preferences": Autocrypt can be disabled per account).
    autocrypt: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.engine, OpenPGPEngine):
            try:
                object.__setattr__(self, "engine", OpenPGPEngine(self.engine))
            except ValueError:
                raise ConfigError(
                    f"engine must be auto, sequoia or gpg, not {self.engine!r}"
                ) from None
        if self.engine is not OpenPGPEngine.AUTO and self.scheme is not Scheme.OPENPGP:
            # The engine chooses how OpenPGP is made; asking for one with S/MIME is a mistake
            # (the CLI refuses --engine with --smime the same way).
            raise ConfigError(
                f"engine={self.engine.value} chooses an OpenPGP engine; it cannot be used with "
                f"the {self.scheme.value} scheme"
            )
        # Addresses compare case-insensitively; store the map normalised so lookups are simple.
        object.__setattr__(
            self, "key_map", {k.strip().lower(): v.strip() for k, v in self.key_map.items()}
        )
        if not isinstance(self.smime_cipher, SMIMECipher):
            raise ConfigError(f"smime_cipher must be an SMIMECipher, not {self.smime_cipher!r}")
        if self.smime_digest not in SMIME_DIGESTS:
            raise ConfigError(
                f"S/MIME digest {self.smime_digest!r} is not one of {', '.join(SMIME_DIGESTS)}"
            )
        trusted = set()
        for fpr in self.smime_trust_self_signed:
            norm = fpr.replace(":", "").replace(" ", "").upper()
            if len(norm) != 64 or any(c not in "0123456789ABCDEF" for c in norm):
                raise ConfigError(f"{fpr!r} is not a SHA-256 certificate fingerprint")
            trusted.add(norm)
        object.__setattr__(self, "smime_trust_self_signed", frozenset(trusted))
        if not isinstance(self.revocation, RevocationPolicy):
            try:
                object.__setattr__(self, "revocation", RevocationPolicy(self.revocation))
            except ValueError:
                raise ConfigError(
                    f"revocation must be off, prefer or require, not {self.revocation!r}"
                ) from None
        if not isinstance(self.discovery, DiscoveryPolicy):
            try:
                object.__setattr__(self, "discovery", DiscoveryPolicy(self.discovery))
            except ValueError:
                raise ConfigError(
                    f"discovery must be off, wkd or wkd+keyserver, not {self.discovery!r}"
                ) from None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient failures (4xx replies, dropped connections, timeouts) are retried.

    Attempt ``n + 1`` waits ``min(max_delay, base_delay * 2 ** (n - 1))`` seconds after attempt
    ``n`` failed, less a random share of up to ``jitter`` of it, so that many senders (or many
    messages of one batch) do not come back at the same moment. ``max_attempts`` counts the
    first attempt, so ``max_attempts=1`` never retries. Permanent failures (5xx) are never
    retried (RFC 5321 §4.2.1). What is still undelivered after the last attempt stays in the
    outbox for ``e2email outbox retry``.
    """

    max_attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    #: 0 (no randomness) to 1 (a delay anywhere between 0 and the full back-off).
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError("retry delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("jitter must be between 0 and 1")

    def delay(self, failed_attempts: int, *, rand: Callable[[], float] | None = None) -> float:
        """Seconds to wait before the next attempt, after ``failed_attempts`` (1, 2, ...)."""
        exponent = max(0, failed_attempts - 1)
        # Cap the exponent too: 2 ** 2000 is an OverflowError as a float.
        full = min(self.max_delay, self.base_delay * 2.0 ** min(exponent, 64))
        share = (rand or _random.random)()
        return full * (1 - self.jitter * share)
