"""Settings: small frozen dataclasses, validated when they are made.

Imports only :mod:`e2email.errors`, so every layer may use them.
"""

from __future__ import annotations

import enum
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from e2email.errors import ConfigError, InsecureTransportError

__all__ = [
    "DEFAULT_PORTS",
    "HOME_ENV",
    "PasswordSource",
    "Protection",
    "SMTPSettings",
    "Scheme",
    "TLSMode",
    "default_home",
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

#: A password, or a zero-argument callable that returns one when it is first needed.
PasswordSource = str | Callable[[], str]


def password_from_env(name: str) -> Callable[[], str]:
    """A password source that reads environment variable ``name`` when the password is needed."""

    def read() -> str:
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"environment variable {name} (the SMTP password) is not set")
        return value

    return read


def password_from_command(command: str) -> Callable[[], str]:
    """A password source that runs ``command`` through ``sh -c`` (like msmtp's ``passwordeval``)
    and takes the first line it prints."""

    def run() -> str:
        try:
            done = subprocess.run(  # noqa: S602 - the user's own command, as in msmtp
                command, shell=True, capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"password command failed: {exc}") from exc
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else "no message"
            raise ConfigError(f"password command exited with {done.returncode}: {why}")
        lines = done.stdout.decode("utf-8", errors="strict").splitlines()
        if not lines or not lines[0]:
            raise ConfigError("password command printed nothing")
        return lines[0]

    return run


@dataclass(frozen=True, kw_only=True)
class SMTPSettings:
    """Where and how to submit mail.

    ``port`` and ``tls`` imply each other for 465 (implicit), 587/2525/25 (STARTTLS required);
    any other port needs ``tls`` named. With neither, port 465 and implicit TLS are used.
    """

    host: str
    port: int | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password: PasswordSource | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 60.0
    #: The name given in EHLO. Not the machine's host name by default: servers copy it into
    #: the Received header, which would tell every recipient what the sender's machine is
    #: called. An address literal (RFC 5321 §4.1.3) is what Thunderbird sends.
    local_hostname: str = "[127.0.0.1]"
    #: The loudly named opt-in for a connection without TLS (test rigs only). Even then no
    #: credentials are ever sent over it.
    allow_insecure_plaintext: bool = False

    def __post_init__(self) -> None:
        if not self.host or any(c in self.host for c in "\r\n\0 /"):
            raise ConfigError(f"invalid SMTP host {self.host!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"invalid SMTP port {self.port}")
        if self.timeout <= 0:
            raise ConfigError("timeout must be positive")
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
            if self.username is not None or self.password is not None:
                raise InsecureTransportError("credentials are never sent without TLS")
        if self.username is not None and ("\0" in self.username or "\n" in self.username):
            raise ConfigError("invalid character in SMTP user name")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"CA file {self.ca_file} does not exist or is not a file")

    @property
    def effective_tls(self) -> TLSMode:
        if self.tls is not None:
            return self.tls
        if self.port is None:
            return TLSMode.IMPLICIT
        return DEFAULT_PORTS[self.port]

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return {TLSMode.IMPLICIT: 465, TLSMode.STARTTLS: 587}.get(self.effective_tls, 25)

    def resolve_password(self) -> str | None:
        """The password, running its source now if it is a callable."""
        if self.password is None or isinstance(self.password, str):
            return self.password
        return self.password()


class Scheme(enum.Enum):
    """Which end-to-end standard protects the message."""

    OPENPGP = "openpgp"
    SMIME = "smime"


@dataclass(frozen=True, kw_only=True)
class Protection:
    """What to do to each message. The default signs and encrypts with OpenPGP."""

    sign: bool = True
    encrypt: bool = True
    #: Also encrypt to the sender, so the sent copy stays readable to them.
    encrypt_to_self: bool = True
    scheme: Scheme = Scheme.OPENPGP
    #: Explicit address -> key (fingerprint) choices that override lookup by address.
    key_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Addresses compare case-insensitively; store the map normalised so lookups are simple.
        object.__setattr__(
            self, "key_map", {k.strip().lower(): v.strip() for k, v in self.key_map.items()}
        )
