"""Accounts in a configuration file, as msmtp has them: ``config.toml``.

The file is TOML at ``$XDG_CONFIG_HOME/e2email/config.toml`` (:func:`default_config_path`);
``E2EMAIL_CONFIG`` or ``--config FILE`` name another. It holds named accounts,
``[accounts.NAME]``, each a server, credentials *sources*, a sender and a protection policy,
and an optional ``[defaults]`` table every account inherits (msmtp's ``defaults``)::

    default = "work"              # the account used when none is named

    [defaults]
    encrypt-to-self = true

    [accounts.work]
    host = "smtp.example.org"
    port = 465
    user = "alice@example.org"
    password-command = "pass show smtp/work"
    from = "alice@example.org"
    from-patterns = ["alice+*@example.org"]

**The default account** is the one named by the top-level ``default = "NAME"``, or the one
account marked ``default = true``; giving both, or marking two, is a mistake. A file with a
single account needs neither.

**Choosing by sender** (:meth:`Config.for_sender`, ``-f ADDRESS``), msmtp's rule: the first
account, in file order, whose ``from`` is the address or one of whose ``from-patterns``
(shell wildcards ``*``, ``?``, ``[...]``) matches it, case-insensitively; failing that, the
same with the address's ``+detail`` removed (``alice+git@example.org`` picks the account of
``alice@example.org``); failing that, the default account.

**Secrets**: a password is best given as a source that is not in the file:
``password-command`` (its first output line, like msmtp's ``passwordeval``),
``password-env`` or ``password-keyring`` (the system keyring, through the optional
``keyring`` package: ``keyring.get_password(SERVICE, user)``). A literal ``password`` is
accepted only in a file that is yours and readable by nobody else (0600; msmtp's rule), and
the file is refused otherwise. Whatever it holds, a file another user owns or that group or
others may write is refused (:func:`e2email.private.check_private`): it names commands that
are run and the keys mail is encrypted to.

**Where mistakes are**: :mod:`tomllib` gives the line of a syntax error but not the line of a
key. A light scan of the text (:class:`_LineIndex`) records the line of every ``[table]``
header and every ``key =`` line under it, so each mistake is reported as ``FILE:LINE: key:
problem``; a key the scan cannot place (a multi-line value, an inline table) is reported at
its table's line. Every mistake in the file is collected before :class:`ConfigFileError` is
raised, one line each.

This module is a bottom layer beside :mod:`e2email.config`: it reads the one file and does
nothing else (no network, no command is run, nothing is written). Settings are made with the
frozen dataclasses of :mod:`e2email.config`, whose own checks decide what is valid.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from e2email.config import (
    DiscoveryPolicy,
    OpenPGPEngine,
    PasswordSource,
    Protection,
    RetryPolicy,
    RevocationPolicy,
    Scheme,
    SMIMECipher,
    SMTPSettings,
    TLSMode,
    host_for_connecting,
    password_from_command,
    password_from_env,
)
from e2email.errors import ConfigError
from e2email.private import check_private

__all__ = [
    "CONFIG_ENV",
    "Account",
    "Config",
    "ConfigFileError",
    "ConfigProblem",
    "default_config_path",
    "load_config",
    "password_from_keyring",
]

#: The environment variable naming the configuration file.
CONFIG_ENV = "E2EMAIL_CONFIG"


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/e2email/config.toml`` (``~/.config/e2email/config.toml``)."""
    return Path(platformdirs.user_config_path("e2email", appauthor=False)) / "config.toml"


# -- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in a configuration file, where it is and what is wrong."""

    path: Path
    line: int | None
    key: str | None
    problem: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


class ConfigFileError(ConfigError):
    """A configuration file with mistakes: every one in :attr:`problems`, one per line in
    ``str()``."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# -- password sources ------------------------------------------------------------------------


class _FromKeyring:
    """A password in the system keyring, read (through the optional ``keyring`` package) when
    AUTH needs it, so after TLS is verified, like a command's."""

    def __init__(self, service: str, user: str) -> None:
        self.service = service
        self.user = user

    def __call__(self) -> str:
        try:
            import keyring
            import keyring.errors
        except ImportError:
            raise ConfigError(
                "password-keyring needs the keyring package: pip install 'e2email[keyring]'"
            ) from None
        try:
            secret = keyring.get_password(self.service, self.user)
        except keyring.errors.KeyringError as exc:
            raise ConfigError(f"the system keyring failed: {exc}") from exc
        if secret is None:
            raise ConfigError(
                f"no password in the system keyring for service {self.service!r} and user "
                f"{self.user!r} (store it with: keyring set {self.service} {self.user})"
            )
        return str(secret)


def password_from_keyring(service: str, user: str) -> Callable[[], str]:
    """A password source reading ``keyring.get_password(service, user)`` when it is needed."""
    return _FromKeyring(service, user)


# -- accounts --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Account:
    """One named account: where to submit, as whom, and what to do to each message."""

    name: str
    smtp: SMTPSettings
    #: The sender address (``from``), also the one ``-f`` matches.
    sender: str | None = None
    #: More addresses ``-f`` picks this account for (shell wildcards).
    from_patterns: tuple[str, ...] = ()
    protection: Protection = field(default_factory=Protection)
    #: Address -> key fingerprint (the ``keys`` table); also in ``protection.key_map``.
    key_map: Mapping[str, str] = field(default_factory=dict)
    #: Where the signing key's passphrase comes from (``passphrase-env``/``-command``).
    passphrase: PasswordSource | None = field(default=None, repr=False)
    #: e2email's home (keys, certificates, outbox) for this account; None: the default.
    home: Path | None = None
    gnupg_home: Path | None = None
    #: The outbox file; None: HOME/outbox.sqlite3.
    outbox: Path | None = None
    #: ``retries``: how transient failures are retried; None: the default policy.
    retry: RetryPolicy | None = None
    #: The effective settings as ``e2email config show`` prints them: (key, value) with a
    #: literal password masked. Commands and variable names are shown: they are not secrets.
    shown: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    def matches(self, address: str) -> bool:
        """Is ``address`` this account's ``from`` or matched by one of its ``from-patterns``
        (case-insensitive)?"""
        wanted = address.strip().casefold()
        if self.sender is not None and self.sender.casefold() == wanted:
            return True
        return any(fnmatch.fnmatchcase(wanted, p.casefold()) for p in self.from_patterns)


@dataclass(frozen=True)
class Config:
    """The accounts of one configuration file (in file order) and which is the default."""

    path: Path | None
    accounts: Mapping[str, Account]
    default: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.accounts)

    def account(self, name: str | None = None) -> Account:
        """The account ``name``, or the default one (``None``). Raises ConfigError naming the
        accounts there are."""
        where = str(self.path) if self.path is not None else str(default_config_path())
        if not self.accounts:
            raise ConfigError(
                f"no accounts configured: {where} has none (see `e2email config --help`)"
            )
        if name is None:
            if self.default is None:
                raise ConfigError(
                    f"no default account in {where}: name one with --account "
                    f'({", ".join(self.names)}) or set default = "NAME" there'
                )
            name = self.default
        try:
            return self.accounts[name]
        except KeyError:
            raise ConfigError(
                f"no account {name!r} in {where} (accounts: {', '.join(self.names)})"
            ) from None

    def match_sender(self, address: str) -> Account | None:
        """The account ``address`` selects by msmtp's rule (see the module docstring), or
        None when none does."""
        for candidate in (address, _without_detail(address)):
            if candidate is None:
                continue
            for account in self.accounts.values():
                if account.matches(candidate):
                    return account
        return None

    def for_sender(self, address: str) -> Account:
        """The account for sender ``address``: :meth:`match_sender`, else the default."""
        found = self.match_sender(address)
        return found if found is not None else self.account(None)


def _without_detail(address: str) -> str | None:
    local, at, domain = address.strip().rpartition("@")
    if not at or "+" not in local:
        return None
    return f"{local.split('+', 1)[0]}@{domain}"


# -- the schema ------------------------------------------------------------------------------

_STR, _INT, _NUM, _BOOL, _STRS, _TABLE = (
    "a string",
    "an integer",
    "a number",
    "true or false",
    ("a list of strings"),
    "a table of strings",
)

#: Every key an account (or [defaults]) may hold, and its TOML type.
_ACCOUNT_KEYS: Mapping[str, str] = {
    "default": _BOOL,
    "host": _STR,
    "port": _INT,
    "tls": _STR,
    "insecure-plaintext": _BOOL,
    "user": _STR,
    "auth": _STR,
    "password": _STR,
    "password-command": _STR,
    "password-env": _STR,
    "password-keyring": _STR,
    "token-command": _STR,
    "token-env": _STR,
    "ca-file": _STR,
    "require-tls": _BOOL,
    "timeout": _NUM,
    "connect-timeout": _NUM,
    "command-timeout": _NUM,
    "data-timeout": _NUM,
    "retries": _INT,
    "from": _STR,
    "from-patterns": _STRS,
    "scheme": _STR,
    "sign": _BOOL,
    "encrypt": _BOOL,
    "encrypt-to-self": _BOOL,
    "smime-cipher": _STR,
    "smime-digest": _STR,
    "rsa-pss": _BOOL,
    "trust-self-signed": _STRS,
    "revocation": _STR,
    "discover": _STR,
    "engine": _STR,
    "autocrypt": _BOOL,
    "keys": _TABLE,
    "home": _STR,
    "gnupg-home": _STR,
    "outbox": _STR,
    "passphrase-env": _STR,
    "passphrase-command": _STR,
}
#: ``[celery]`` is read by :mod:`e2email.celery` (broker, retries), not here.
_TOP_KEYS = ("default", "defaults", "accounts", "celery")
_CHOICES: Mapping[str, tuple[str, ...]] = {
    "tls": tuple(m.value for m in TLSMode if m is not TLSMode.INSECURE_PLAINTEXT),
    "auth": ("password", "xoauth2"),
    "scheme": tuple(s.value for s in Scheme),
    "smime-cipher": tuple(c.value for c in SMIMECipher),
    "revocation": tuple(p.value for p in RevocationPolicy),
    "discover": tuple(p.value for p in DiscoveryPolicy),
    "engine": tuple(e.value for e in OpenPGPEngine),
}
#: msmtp's names, for a did-you-mean difflib cannot find.
_MSMTP_NAMES = {
    "passwordeval": "password-command",
    "tls_trust_file": "ca-file",
    "tls_starttls": 'tls = "starttls"',
    "account": "[accounts.NAME]",
    "email": "from",
    "login": "user",
}
_PASSWORD_KEYS = ("password", "password-command", "password-env", "password-keyring")
_TOKEN_KEYS = ("token-command", "token-env")
_PASSPHRASE_KEYS = ("passphrase-env", "passphrase-command")
#: Keys whose value is a path: ``~`` is expanded, a relative path is from the file's folder.
_PATH_KEYS = ("ca-file", "home", "gnupg-home", "outbox")
#: Where a ConfigError of SMTPSettings / Protection most likely comes from (see _blame).
_BLAME: Sequence[tuple[str, str]] = (
    ("REQUIRETLS", "require-tls"),
    ("XOAUTH2", "auth"),
    ("OAuth2", "auth"),
    ("credentials", "insecure-plaintext"),
    ("plaintext", "insecure-plaintext"),
    ("CA file", "ca-file"),
    ("user name", "user"),
    ("connect_timeout", "connect-timeout"),
    ("command_timeout", "command-timeout"),
    ("data_timeout", "data-timeout"),
    ("timeout", "timeout"),
    ("TLS mode", "tls"),
    ("port", "port"),
    ("host", "host"),
    ("digest", "smime-digest"),
    ("fingerprint", "trust-self-signed"),
    ("revocation", "revocation"),
    ("cipher", "smime-cipher"),
)
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64}")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    hint = _MSMTP_NAMES.get(key.lower())
    if hint is None:
        close = difflib.get_close_matches(key.lower().replace("_", "-"), known, n=1, cutoff=0.6)
        hint = close[0] if close else None
    return f" (did you mean {hint}?)" if hint else ""


# -- where keys are in the text --------------------------------------------------------------

_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART = re.compile(_BARE_OR_QUOTED)


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = []
    for match in _PART.finditer(text):
        part = match.group(0)
        if part[:1] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


class _LineIndex:
    """The line of every table header and ``key =`` line of a TOML text, by key path.

    A light scan, not a parser (tomllib keeps no positions): a line that opens a multi-line
    string or array may hide the keys inside it, and keys of an inline table are found at
    their table's line. Good enough to point at a mistake; the parse itself is tomllib's."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header is not None:
                table = _split_dotted(header.group(1))
                self.lines.setdefault(table, number)
                continue
            key = _KEY_LINE.match(line)
            if key is not None:
                self.lines.setdefault(table + _split_dotted(key.group(1)), number)

    def line(self, *path: str) -> int | None:
        """The line of ``path``, else of the nearest enclosing table that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


# -- loading ---------------------------------------------------------------------------------


def load_config(path: Path | str | None = None) -> Config:
    """Read the configuration file: ``path``, else ``$E2EMAIL_CONFIG``, else
    :func:`default_config_path`. A default file that does not exist gives a Config without
    accounts; a named one that does not exist is a ConfigError. Every mistake in the file
    is collected and raised as one :class:`ConfigFileError` (a ConfigError), one line each."""
    named = path is not None or bool(os.environ.get(CONFIG_ENV))
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else default_config_path()
    path = Path(path).expanduser()
    if not path.exists():
        if named:
            raise ConfigError(f"the config file {path} does not exist")
        return Config(path=path, accounts={})
    try:
        with path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise ConfigError(f"the config file {path} is not a file")
    # It names commands that are run and the keys mail is encrypted to: whoever may write it
    # can change both. Refused like a loose keystore (InsecurePathError, one line).
    check_private(path, what="the config file")
    return _Loader(path, data, stat.S_IMODE(mode)).load()


class _Loader:
    def __init__(self, path: Path, data: bytes, mode: int) -> None:
        self.path = path
        self.data = data
        self.mode = mode
        self.problems: list[ConfigProblem] = []
        self.index = _LineIndex("")

    def problem(self, where: tuple[str, ...], key: str | None, text: str) -> None:
        line = self.index.lines.get(where)
        if line is None and len(where) == 3 and where[0] == "accounts":
            # A key an account inherits is where [defaults] gives it.
            line = self.index.lines.get(("defaults", where[2]))
        if line is None:
            line = self.index.line(*where)
        self.problems.append(ConfigProblem(self.path, line, key, text))

    def load(self) -> Config:
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self.data[: exc.start].count(b"\n") + 1
            raise ConfigFileError(
                [ConfigProblem(self.path, line, None, "not UTF-8 text")]
            ) from None
        self.index = _LineIndex(text)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            found = re.search(r"\(at line (\d+), column \d+\)", message)
            where = int(found.group(1)) if found else None
            why = re.sub(r"\s*\(at (?:line \d+, column \d+|end of document)\)", "", message)
            raise ConfigFileError(
                [ConfigProblem(self.path, where, None, f"invalid TOML: {why}")]
            ) from None
        config = self._document(doc)
        if self.problems:
            # A mistake in [defaults] that every account inherits is one mistake.
            raise ConfigFileError(list(dict.fromkeys(self.problems)))
        return config

    def _document(self, doc: Mapping[str, Any]) -> Config:
        for key in doc:
            if key not in _TOP_KEYS:
                hint = _did_you_mean(key, [*_TOP_KEYS, *_ACCOUNT_KEYS])
                where = (
                    " (account settings go in [defaults] or [accounts.NAME])"
                    if key in _ACCOUNT_KEYS and key != "default"
                    else ""
                )
                self.problem((key,), key, f"unknown key{hint}{where}")
        defaults = doc.get("defaults", {})
        if not isinstance(defaults, dict):
            self.problem(("defaults",), "defaults", "must be a table ([defaults])")
            defaults = {}
        elif "default" in defaults:
            self.problem(("defaults", "default"), "default", "marks one account, not [defaults]")
        for bad in self._check_keys(("defaults",), defaults):
            # Reported once here, not again in every account that would inherit it.
            defaults = {k: v for k, v in defaults.items() if k != bad}
        raw_accounts = doc.get("accounts", {})
        if not isinstance(raw_accounts, dict):
            self.problem(("accounts",), "accounts", "must be tables ([accounts.NAME])")
            raw_accounts = {}
        accounts: dict[str, Account] = {}
        for name, table in raw_accounts.items():
            if not isinstance(table, dict):
                self.problem(
                    ("accounts", name),
                    name,
                    f"must be a table ([accounts.{name}]), not {_type_name(table)}",
                )
                continue
            if not name or any(c.isspace() or not c.isprintable() for c in name):
                self.problem(("accounts", name), None, f"account name {name!r} is not valid")
            account = self._account(name, defaults, table)
            if account is not None:
                accounts[name] = account
        default = self._default(doc, raw_accounts)
        self._check_secret(defaults, raw_accounts)
        return Config(path=self.path, accounts=accounts, default=default)

    def _default(self, doc: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
        top = doc.get("default")
        marked = [n for n, t in raw.items() if isinstance(t, dict) and t.get("default") is True]
        if top is not None and not isinstance(top, str):
            self.problem(("default",), "default", f"must be an account name, not {_type_name(top)}")
            top = None
        if len(marked) > 1:
            self.problem(
                ("accounts", marked[1], "default"),
                "default",
                f"two accounts are marked default = true ({', '.join(marked)}): mark one",
            )
            return None
        if top is not None and marked:
            self.problem(
                ("accounts", marked[0], "default"),
                "default",
                f'give the default account once: default = "{top}" at the top, or '
                "default = true in one account",
            )
            return None
        if top is not None:
            if top not in raw:
                hint = _did_you_mean(top, list(raw))
                self.problem(("default",), "default", f"no account named {top!r}{hint}")
                return None
            return str(top)
        if marked:
            return marked[0]
        return next(iter(raw)) if len(raw) == 1 else None

    def _check_keys(self, where: tuple[str, ...], table: Mapping[str, Any]) -> list[str]:
        """Report unknown keys and values of the wrong type or choice; the keys reported."""
        bad: list[str] = []
        for key, value in table.items():
            before = len(self.problems)
            self._check_key(where, key, value)
            if len(self.problems) > before:
                bad.append(key)
        return bad

    def _check_key(self, where: tuple[str, ...], key: str, value: Any) -> None:
        kind = _ACCOUNT_KEYS.get(key)
        if kind is None:
            self.problem(
                (*where, key), key, f"unknown key{_did_you_mean(key, list(_ACCOUNT_KEYS))}"
            )
        elif not _type_ok(kind, value):
            self.problem((*where, key), key, f"must be {kind}, not {_type_name(value)}")
        elif key in _CHOICES and value not in _CHOICES[key]:
            choices = ", ".join(_CHOICES[key])
            extra = (
                " (plaintext is insecure-plaintext = true)"
                if key == "tls" and value in ("none", "plain", TLSMode.INSECURE_PLAINTEXT.value)
                else ""
            )
            self.problem((*where, key), key, f"must be one of {choices}, not {value!r}{extra}")
        elif kind == _INT and key == "port" and not 0 < value < 65536:
            # SMTPSettings says so too, but reached only when everything else is right.
            self.problem((*where, key), key, f"port {value} is out of range (1-65535)")
        elif key == "retries" and value < 0:
            self.problem((*where, key), key, f"must be 0 or more, not {value}")

    def _check_secret(self, defaults: Mapping[str, Any], raw: Mapping[str, Any]) -> None:
        """msmtp's rule: a literal password only in a file nobody else may read."""
        holders: list[tuple[str, ...]] = (
            [("defaults",)] if isinstance(defaults.get("password"), str) else []
        )
        holders += [
            ("accounts", n)
            for n, t in raw.items()
            if isinstance(t, dict) and isinstance(t.get("password"), str)
        ]
        if holders and self.mode & 0o077:
            self.problem(
                (*holders[0], "password"),
                "password",
                f"a password in a file readable by group or others (mode {self.mode:04o}): "
                f"refusing it; run: chmod 600 {self.path} (or use password-command, "
                "password-env or password-keyring)",
            )

    def _account(
        self, name: str, defaults: Mapping[str, Any], table: Mapping[str, Any]
    ) -> Account | None:
        where = ("accounts", name)
        before = len(self.problems)
        # Every mistake gets its line: a bad key is reported and left out, and the checks
        # below (a host, a secret given two ways, ...) still run on the rest.
        bad = self._check_keys(where, table)
        table = {k: v for k, v in table.items() if k not in bad}
        # Inherit [defaults]; a secret given in the account replaces every inherited way of
        # giving it (a password-env here overrides a password-command there).
        merged = {k: v for k, v in defaults.items() if k in _ACCOUNT_KEYS and k != "default"}
        for group in (_PASSWORD_KEYS, _TOKEN_KEYS, _PASSPHRASE_KEYS):
            if any(k in table for k in group):
                for k in group:
                    merged.pop(k, None)
        merged.update(table)
        merged.pop("default", None)
        if not _type_ok(_STR, merged.get("host")):
            if "host" not in bad:  # a host of the wrong type is reported already
                self.problem(where, "host", "missing: every account needs a host")
            merged.pop("host", None)
        for key in _PATH_KEYS:
            if key in merged:
                merged[key] = self._path(merged[key])
        return self._build(name, where, merged, since=before)

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.path.parent / path

    def _one_of(
        self, where: tuple[str, ...], merged: Mapping[str, Any], keys: Sequence[str], what: str
    ) -> str | None:
        # In file order, so that the second one given is the one pointed at.
        given = sorted(
            (k for k in keys if k in merged), key=lambda k: self.index.line(*where, k) or 0
        )
        if len(given) > 1:
            self.problem(
                (*where, given[1]),
                given[1],
                f"{what} given two ways ({', '.join(given)}): give one",
            )
            return None
        return given[0] if given else None

    def _build(
        self, name: str, where: tuple[str, ...], m: Mapping[str, Any], *, since: int
    ) -> Account | None:
        """The account from its merged settings ``m``; None when any problem was reported
        since ``since`` (the number of problems when this account's checks began), after
        checking everything that can be checked without building it."""
        before = since
        user = m.get("user")
        password: PasswordSource | None = None
        token: PasswordSource | None = None
        pw_key = self._one_of(where, m, _PASSWORD_KEYS, "the password")
        token_key = self._one_of(where, m, _TOKEN_KEYS, "the OAuth2 token")
        auth = m.get("auth") or ("xoauth2" if token_key else "password")
        if auth == "xoauth2" and pw_key:
            self.problem(
                (*where, pw_key),
                pw_key,
                'auth = "xoauth2" takes token-command or token-env, not a password',
            )
        elif auth == "xoauth2" and not token_key:
            self.problem((*where, "auth"), "auth", "xoauth2 needs token-command or token-env")
        elif auth == "password" and token_key:
            self.problem((*where, token_key), token_key, 'goes with auth = "xoauth2"')
        if (pw_key or token_key) and not user:
            self.problem(
                (*where, pw_key or token_key or "user"), "user", "a password or token needs user"
            )
        if pw_key == "password":
            password = m["password"]
        elif pw_key == "password-command":
            password = password_from_command(m[pw_key], what=f"account {name}: SMTP password")
        elif pw_key == "password-env":
            password = password_from_env(m[pw_key], what=f"the SMTP password of account {name}")
        elif pw_key == "password-keyring":
            password = password_from_keyring(m[pw_key], str(user))
        if token_key == "token-command":
            token = password_from_command(m[token_key], what=f"account {name}: OAuth2 token")
        elif token_key == "token-env":
            token = password_from_env(m[token_key], what=f"the OAuth2 token of account {name}")
        pp_key = self._one_of(where, m, _PASSPHRASE_KEYS, "the signing key passphrase")
        passphrase: PasswordSource | None = None
        if pp_key == "passphrase-env":
            passphrase = password_from_env(m[pp_key], what="the signing key passphrase")
        elif pp_key == "passphrase-command":
            passphrase = password_from_command(m[pp_key], what="signing key passphrase")
        sender = m.get("from")
        if sender is not None and not _address_ok(sender):
            self.problem((*where, "from"), "from", f"{sender!r} is not an email address")
        patterns = tuple(m.get("from-patterns", ()))
        for pattern in patterns:
            if not _address_ok(pattern, pattern=True):
                self.problem(
                    (*where, "from-patterns"),
                    "from-patterns",
                    f"{pattern!r} is not an address pattern (LOCAL@DOMAIN, wildcards * ? [..])",
                )
        key_map = dict(m.get("keys", {}))
        for address, fpr in key_map.items():
            if not _address_ok(address):
                self.problem(
                    (*where, "keys", address), "keys", f"{address!r} is not an email address"
                )
            if not _FINGERPRINT.fullmatch(fpr.replace(" ", "").replace(":", "")):
                self.problem(
                    (*where, "keys", address),
                    "keys",
                    f"{fpr!r} (for {address}) is not a key fingerprint (40 or 64 hex digits)",
                )
        tls: TLSMode | None = TLSMode(m["tls"]) if "tls" in m else None
        if m.get("insecure-plaintext"):
            if tls is not None:
                self.problem((*where, "tls"), "tls", "contradicts insecure-plaintext = true")
            tls = TLSMode.INSECURE_PLAINTEXT
        if len(self.problems) > before:
            return None
        smtp_fields: dict[str, Any] = {
            "host": m["host"],
            "port": m.get("port"),
            "tls": tls,
            "username": user,
            "password": password,
            "oauth_token": token,
            "ca_file": m.get("ca-file"),
            "require_tls": m.get("require-tls", False),
            "allow_insecure_plaintext": bool(m.get("insecure-plaintext", False)),
        }
        for key in ("timeout", "connect-timeout", "command-timeout", "data-timeout"):
            if key in m:
                smtp_fields[key.replace("-", "_")] = float(m[key])
        smtp = self._make(where, m, SMTPSettings, smtp_fields)
        protection_fields: dict[str, Any] = {"key_map": key_map}
        for key, attr in (
            ("sign", "sign"),
            ("encrypt", "encrypt"),
            ("encrypt-to-self", "encrypt_to_self"),
            ("smime-digest", "smime_digest"),
            ("rsa-pss", "smime_rsa_pss"),
            ("autocrypt", "autocrypt"),
        ):
            if key in m:
                protection_fields[attr] = m[key]
        if "scheme" in m:
            protection_fields["scheme"] = Scheme(m["scheme"])
        if "smime-cipher" in m:
            protection_fields["smime_cipher"] = SMIMECipher(m["smime-cipher"])
        if "revocation" in m:
            protection_fields["revocation"] = RevocationPolicy(m["revocation"])
        if "discover" in m:
            protection_fields["discovery"] = DiscoveryPolicy(m["discover"])
        if "engine" in m:
            protection_fields["engine"] = OpenPGPEngine(m["engine"])
        if "trust-self-signed" in m:
            protection_fields["smime_trust_self_signed"] = frozenset(m["trust-self-signed"])
        protection = self._make(where, m, Protection, protection_fields)
        retry = None
        if "retries" in m:
            retry = self._make(where, m, RetryPolicy, {"max_attempts": m["retries"] + 1})
        if smtp is None or protection is None or ("retries" in m and retry is None):
            return None
        return Account(
            name=name,
            smtp=smtp,
            sender=sender,
            from_patterns=patterns,
            protection=protection,
            key_map=protection.key_map,
            passphrase=passphrase,
            home=m.get("home"),
            gnupg_home=m.get("gnupg-home"),
            outbox=m.get("outbox"),
            retry=retry,
            shown=_shown(m),
        )

    def _make(
        self,
        where: tuple[str, ...],
        merged: Mapping[str, Any],
        cls: Callable[..., Any],
        values: Mapping[str, Any],
    ) -> Any:
        """``cls(**values)``, its own ConfigError located at the key it most likely is about
        (its checks are the rule; this only says where)."""
        try:
            return cls(**values)
        except ConfigError as exc:
            text = str(exc)
            key = _blame(text, merged, cls)
            self.problem((*where, key) if key else where, key, text)
            return None


def _blame(text: str, merged: Mapping[str, Any], cls: Callable[..., Any]) -> str | None:
    if cls is RetryPolicy:
        return "retries"
    for needle, key in _BLAME:
        if needle in text and (key in merged or key in ("host", "port")):
            return key
    return None


def _address_ok(address: str, *, pattern: bool = False) -> bool:
    """A light check of LOCAL@DOMAIN (the message layer checks addresses fully when sending);
    a pattern may hold shell wildcards."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    if any(c.isspace() or not c.isprintable() or c in '<>(),;\\"' for c in address):
        return False
    if pattern:
        return True
    try:
        host_for_connecting(domain, what="domain")
    except ConfigError:
        return False
    return True


def _shown(merged: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The effective settings as TOML values, a literal password masked (``********``,
    unquoted, so it can never be mistaken for the password itself)."""
    out: list[tuple[str, str]] = []
    for key in _ACCOUNT_KEYS:
        if key in merged:
            text = "********" if key == "password" else _toml_value(merged[key])
            out.append((key, text))
    return tuple(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    # A JSON string is a TOML basic string (both escape \, " and control characters).
    return json.dumps(str(value), ensure_ascii=False)
