"""A Django email backend that signs and encrypts every message: ``e2email.django.EmailBackend``.

``settings.py``::

    EMAIL_BACKEND = "e2email.django.EmailBackend"
    E2EMAIL = {
        "host": "smtp.example.org", "port": 465, "username": "app@example.org",
        "password_env": "SMTP_PASSWORD",
        "passphrase_env": "E2EMAIL_PASSPHRASE",   # unlocks the sender's signing key
    }

``send_mail``, ``send_mass_mail``, ``mail_admins``, ``EmailMessage`` and
``EmailMultiAlternatives`` work unchanged: each message is the MIME structure Django builds
(``message().as_bytes()``: alternatives, attachments, inline images, Reply-To, extra headers),
protected as it is, with its header fields protected per RFC 9788. ``recipients()`` is the
envelope: a Bcc recipient (Django leaves Bcc out of the header) gets a copy of its own, encrypted
only to them and the sender.

**Fail closed.** A message that cannot be protected as the policy says (a recipient without a
usable key, a missing signing key) is never sent, not even with ``fail_silently=True``: it is
written to the drafts folder (``HOME/drafts``, private) for ``e2email-sendmail -t < FILE``
once the keys are there. A protected message the server did not take (unreachable, 4xx) waits
in the outbox (``HOME/outbox.sqlite3``) for ``e2email outbox retry``. The return value of
``send_messages`` counts only messages delivered to every recipient. With ``fail_silently=False``
the e2email error (an :class:`~e2email.errors.E2EmailError`) is raised at the first message that
was not delivered, after which the rest of the batch is not tried (as Django's SMTP backend);
with ``fail_silently=True`` every message is tried and each failure is logged on the
``e2email.django`` logger.

**Settings** (one ``E2EMAIL`` dict, checked once when the backend is made; mistakes raise
``ImproperlyConfigured`` naming each key):

* server: ``account`` (and ``config``, the accounts file) or ``host``, ``port``, ``tls``
  (``"implicit"``, ``"starttls"``), ``username``, ``password`` / ``password_env`` /
  ``password_command``, ``ca_file``, ``timeout``, ``require_tls``; without ``host`` or
  ``account``, Django's ``EMAIL_HOST``, ``EMAIL_PORT``, ``EMAIL_HOST_USER``,
  ``EMAIL_HOST_PASSWORD`` and ``EMAIL_TIMEOUT`` are used, with ``EMAIL_USE_SSL`` meaning implicit
  TLS and ``EMAIL_USE_TLS`` STARTTLS *required*; with neither, nothing is sent in clear: the
  backend refuses to start unless ``tls`` is given (``"insecure-plaintext"`` only together with
  ``"allow_insecure_plaintext": True``, for test rigs).
* policy: ``sign``, ``encrypt``, ``encrypt_to_self`` (default: all on), ``scheme``
  (``"openpgp"`` or ``"smime"``), ``key_map`` (address -> fingerprint), ``smime_cipher``,
  ``smime_digest``, ``smime_trust_self_signed``, ``revocation``.
* keys and storage: ``home`` (default ``$E2EMAIL_HOME`` or the user data directory),
  ``gnupg_home``, ``passphrase`` / ``passphrase_env`` / ``passphrase_command``, ``outbox``
  (a path; default ``HOME/outbox.sqlite3``), ``drafts`` (a folder, default ``HOME/drafts``;
  ``None`` keeps no plaintext draft of a message that could not be protected), ``retries``.

Backend keyword arguments (``get_connection(...)``, Django 6.1 ``MAILERS`` ``OPTIONS``) take the
same names and override the dict; Django's own ``use_tls``/``use_ssl`` are understood too.

**Through Celery workers** (``"queue": "celery"``, with ``"account"``): each message is
protected here as above, and its protected copies are queued for ``celery -A e2email.celery
worker`` processes that deliver them through that account (:mod:`e2email.celery`); the broker
never sees plaintext or a secret. ``send_messages`` then counts the messages queued.
``"celery_app"`` names the Celery app (an app or ``"module:attribute"``); by default one is
made from the accounts file's ``[celery]`` table (or ``E2EMAIL_CELERY_BROKER``).

**Per message**, without subclassing: set the attribute ``e2email`` on the message to a dict of
policy fields (``sign``, ``encrypt``, ``encrypt_to_self``, ``scheme``)::

    msg = EmailMessage(...); msg.e2email = {"encrypt": False}   # a signed-only newsletter
    msg.send()

An attribute, not a header: nothing of it can reach the wire, and it survives pickling (Celery).

**Connections.** Between ``open()`` and ``close()`` (Django calls them around each
``send_messages``, or hold a connection with ``get_connection()``), one SMTP connection per
policy in use carries message after message (RSET between them). The async core runs on a
private event loop thread of the backend, so the backend works the same from a sync view, a
thread of ``sync_to_async``, or code already running inside an event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import EmailMessage

from e2email.client import AsyncMailer, BatchItem, MessageOutcome
from e2email.config import (
    PasswordSource,
    Protection,
    RetryPolicy,
    RevocationPolicy,
    Scheme,
    SMIMECipher,
    SMTPSettings,
    TLSMode,
    default_home,
    password_from_command,
    password_from_env,
)
from e2email.errors import (
    ConfigError,
    DeliveryError,
    E2EmailError,
    InsecureTransportError,
    RecipientsRefusedError,
    TransportError,
)
from e2email.inbound import protect as inbound_protect
from e2email.inbound import submit
from e2email.keystore import Keystore
from e2email.message import Address, Message, existing_protection
from e2email.outcome import RecipientOutcome
from e2email.private import ensure_private_dir, write_private

__all__ = ["EmailBackend", "load_settings"]

log = logging.getLogger("e2email.django")

_T = TypeVar("_T")

#: Policy fields a single message may override (``msg.e2email = {...}``).
OVERRIDABLE = ("sign", "encrypt", "encrypt_to_self", "scheme")

_SERVER_KEYS = frozenset(
    {
        "host",
        "port",
        "tls",
        "username",
        "password",
        "password_env",
        "password_command",
        "ca_file",
        "timeout",
        "require_tls",
        "allow_insecure_plaintext",
    }
)
_POLICY_KEYS = frozenset(
    {
        "sign",
        "encrypt",
        "encrypt_to_self",
        "scheme",
        "key_map",
        "smime_cipher",
        "smime_digest",
        "smime_trust_self_signed",
        "revocation",
        "smime_rsa_pss",
    }
)
_OTHER_KEYS = frozenset(
    {
        "account",
        "config",
        "home",
        "gnupg_home",
        "passphrase",
        "passphrase_env",
        "passphrase_command",
        "outbox",
        "drafts",
        "retries",
        # Issue 12: protect here, deliver through Celery workers (e2email.celery).
        "queue",
        "celery_app",
    }
)
KNOWN_KEYS = _SERVER_KEYS | _POLICY_KEYS | _OTHER_KEYS


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackendSettings:
    """The checked settings of the backend (made by :func:`load_settings`)."""

    smtp: SMTPSettings
    protection: Protection
    home: Path
    gnupg_home: Path | None = None
    passphrase: PasswordSource | None = dataclasses.field(default=None, repr=False)
    outbox: Path
    #: Where a message that could not be protected is kept (plaintext, private); None: not.
    drafts: Path | None
    retry: RetryPolicy
    #: The accounts-file account these settings come from, if any.
    account: str | None = None
    #: ``"celery"``: protected copies are queued for Celery workers (see :mod:`e2email.celery`)
    #: instead of sent from this process. None: sent from here.
    queue: str | None = None
    #: The Celery app (or ``"module:attribute"``) to queue on; None: one made from ``config``.
    celery_app: Any = None
    #: The accounts file (``config``), when given.
    config: Path | None = None


class _Reader:
    """Reads typed values from the merged settings, collecting every mistake."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values
        self.mistakes: list[str] = []
        #: The error behind the only mistake, raised as it is (its class says more).
        self.error: ConfigError | None = None

    def get(self, key: str, kind: type[_T] | tuple[type, ...], default: Any = None) -> Any:
        value = self.values.get(key, default)
        if value is None or value is default:
            return value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int: a port of True is a mistake, not port 1.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            self.mistakes.append(f"{key!r} must be {names}, not {type(value).__name__}")
            return default
        return value

    def path(self, key: str) -> Path | None:
        value = self.get(key, (str, Path))
        return Path(value).expanduser() if value is not None else None

    def secret(self, key: str, what: str) -> PasswordSource | None:
        """``key``, ``key_env`` or ``key_command``: at most one of them."""
        given = [k for k in (key, f"{key}_env", f"{key}_command") if self.values.get(k)]
        if len(given) > 1:
            self.mistakes.append(f"{what} given {len(given)} ways ({', '.join(given)}): give one")
            return None
        plain = self.get(key, str)
        env = self.get(f"{key}_env", str)
        command = self.get(f"{key}_command", str)
        if plain:
            return str(plain)
        if env:
            return password_from_env(env, what=what)
        if command:
            return password_from_command(command, what=what)
        return None

    def check(self, what: str, make: Any) -> Any:
        """``make()``, with a ConfigError it raises recorded as a mistake."""
        try:
            return make()
        except ConfigError as exc:
            self.mistakes.append(f"{what}: {exc}")
            self.error = exc if len(self.mistakes) == 1 else None
            return None


def _type_name(kind: type) -> str:
    return {
        "str": "a string",
        "int": "an integer",
        "bool": "True or False",
        "float": "a number",
    }.get(kind.__name__, f"a {kind.__name__}")


def _tls_from_django(values: dict[str, Any], django: Any, options: Mapping[str, Any]) -> None:
    """Fill the server fields missing from ``values`` with Django's EMAIL_* settings (backend
    options ``host``, ``use_tls``... first), mapped so that nothing is weaker than asked:
    EMAIL_USE_SSL is implicit TLS, EMAIL_USE_TLS is STARTTLS *required*, and with neither
    the TLS mode must be named in E2EMAIL (Django's default is plaintext; never ours)."""

    def pick(option: str, setting: str, default: Any) -> Any:
        value = options.get(option)
        return value if value is not None else getattr(django, setting, default)

    if getattr(django, "EMAIL_SSL_CERTFILE", None) or getattr(django, "EMAIL_SSL_KEYFILE", None):
        # Ignoring them would make a server that asks for the certificate refuse us later.
        raise ConfigError("TLS client certificates (EMAIL_SSL_CERTFILE/KEYFILE) are not supported")
    values.setdefault("host", pick("host", "EMAIL_HOST", "localhost"))
    if values.get("port") is None:
        values["port"] = pick("port", "EMAIL_PORT", 25)
    if values.get("username") is None and not values.get("password_env"):
        user = pick("username", "EMAIL_HOST_USER", "")
        if user:
            values["username"] = user
    if not any(values.get(k) for k in ("password", "password_env", "password_command")):
        password = pick("password", "EMAIL_HOST_PASSWORD", "")
        if password and values.get("username"):
            values["password"] = password
    if values.get("timeout") is None:
        timeout = pick("timeout", "EMAIL_TIMEOUT", None)
        if timeout is not None:
            values["timeout"] = float(timeout)
    if values.get("tls") is None:
        use_ssl = pick("use_ssl", "EMAIL_USE_SSL", False)
        use_tls = pick("use_tls", "EMAIL_USE_TLS", False)
        if use_ssl and use_tls:
            raise ConfigError("EMAIL_USE_TLS and EMAIL_USE_SSL are mutually exclusive")
        if use_ssl:
            values["tls"] = TLSMode.IMPLICIT.value
        elif use_tls:
            values["tls"] = TLSMode.STARTTLS.value
        else:
            raise InsecureTransportError(
                "EMAIL_USE_SSL and EMAIL_USE_TLS are both off, and e2email never sends in "
                "clear: set EMAIL_USE_SSL = True (implicit TLS, port 465) or EMAIL_USE_TLS = "
                "True (STARTTLS, required), or E2EMAIL['tls']"
            )


def load_settings(
    e2email: Mapping[str, Any] | None = None,
    *,
    django: Any = None,
    options: Mapping[str, Any] | None = None,
) -> BackendSettings:
    """Check and assemble the backend's settings: ``e2email`` (default ``settings.E2EMAIL``),
    overridden by the backend's keyword ``options``; the server from an account, the inline
    keys, or ``django``'s EMAIL_* settings (default ``django.conf.settings``). Raises
    :class:`ConfigError` naming every mistake."""
    if django is None:
        django = settings
    if e2email is None:
        e2email = getattr(django, "E2EMAIL", None) or {}
    if not isinstance(e2email, Mapping):
        raise ConfigError(f"E2EMAIL must be a dict, not {type(e2email).__name__}")
    options = dict(options or {})
    values: dict[str, Any] = dict(e2email)
    for key in KNOWN_KEYS:
        if options.get(key) is not None:
            values[key] = options[key]
    unknown = sorted(str(k) for k in values if k not in KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    read = _Reader(values)
    account_name = read.get("account", str)
    account: Any = None
    if account_name is not None:
        inline = sorted(k for k in _SERVER_KEYS if values.get(k) is not None)
        if inline:
            raise ConfigError(
                f"'account' names the server; remove {', '.join(map(repr, inline))} "
                "(or drop 'account' and give the server inline)"
            )
        account = _load_account(account_name, read.path("config"))
    elif values.get("host") is None:
        _tls_from_django(values, django, options)
    elif values.get("tls") is None and (options.get("use_ssl") or options.get("use_tls")):
        # Django's SMTP backend options, given with an inline host (get_connection(...)).
        if options.get("use_ssl") and options.get("use_tls"):
            raise ConfigError("use_tls and use_ssl are mutually exclusive")
        values["tls"] = (TLSMode.IMPLICIT if options.get("use_ssl") else TLSMode.STARTTLS).value

    # -- server
    smtp: SMTPSettings | None
    if account is not None:
        smtp = account.smtp
    else:
        tls_name = read.get("tls", (str, TLSMode))
        tls = None
        if tls_name is not None:
            tls = read.check("'tls'", lambda: _enum(TLSMode, tls_name, "tls"))
        password = read.secret("password", "the SMTP password")
        port = read.get("port", int)
        host = read.get("host", str)
        timeout = read.get("timeout", (int, float), 60.0)
        smtp = None
        if password is not None and not values.get("username"):
            read.mistakes.append("a password without 'username': give the user name too")
        if host is None:
            read.mistakes.append("no server: give 'host' (or 'account')")
        elif not read.mistakes:
            smtp = read.check(
                "server",
                lambda: SMTPSettings(
                    host=host,
                    port=port,
                    tls=tls,
                    username=read.get("username", str) or None,
                    password=password,
                    ca_file=read.path("ca_file"),
                    timeout=float(timeout),
                    require_tls=bool(read.get("require_tls", bool, False)),
                    allow_insecure_plaintext=bool(
                        read.get("allow_insecure_plaintext", bool, False)
                    ),
                ),
            )

    # -- policy: the account's, then the keys given here
    base = account.protection if account is not None else Protection()
    fields: dict[str, Any] = {}
    for key in ("sign", "encrypt", "encrypt_to_self", "smime_rsa_pss"):
        if key in values:
            value = read.get(key, bool)
            if value is not None:
                fields[key] = value
    if values.get("scheme") is not None:
        fields["scheme"] = read.check(
            "'scheme'", lambda: _enum(Scheme, read.get("scheme", (str, Scheme)), "scheme")
        )
    if values.get("smime_cipher") is not None:
        fields["smime_cipher"] = read.check(
            "'smime_cipher'",
            lambda: _enum(
                SMIMECipher, read.get("smime_cipher", (str, SMIMECipher)), "smime_cipher"
            ),
        )
    if values.get("revocation") is not None:
        fields["revocation"] = read.check(
            "'revocation'",
            lambda: _enum(
                RevocationPolicy, read.get("revocation", (str, RevocationPolicy)), "revocation"
            ),
        )
    if values.get("smime_digest") is not None:
        fields["smime_digest"] = read.get("smime_digest", str)
    if values.get("smime_trust_self_signed") is not None:
        trusted = read.get("smime_trust_self_signed", (list, tuple, set, frozenset))
        fields["smime_trust_self_signed"] = frozenset(trusted or ())
    key_map = read.get("key_map", Mapping)
    if key_map is not None:
        bad = [k for k, v in key_map.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            read.mistakes.append("'key_map' must map addresses to fingerprints (strings)")
        else:
            fields["key_map"] = {**base.key_map, **key_map}
    protection = None
    if not read.mistakes:
        protection = read.check("policy", lambda: dataclasses.replace(base, **fields))

    # -- keys and storage
    home = read.path("home") or (account.home if account is not None else None) or default_home()
    gnupg_home = read.path("gnupg_home") or (account.gnupg_home if account is not None else None)
    passphrase = read.secret("passphrase", "the signing key passphrase")
    if passphrase is None and account is not None:
        passphrase = account.passphrase
    outbox = read.path("outbox") or (account.outbox if account is not None else None)
    drafts: Path | None = home / "drafts"
    if "drafts" in values:
        drafts = read.path("drafts")
    retries = read.get("retries", int, 2)
    retry = None
    if isinstance(retries, int):
        retry = read.check("'retries'", lambda: RetryPolicy(max_attempts=retries + 1))

    queue = read.get("queue", str)
    if queue is not None and queue != "celery":
        read.mistakes.append(f"'queue' must be 'celery' (or left out), not {queue!r}")
    elif queue == "celery" and account_name is None:
        read.mistakes.append(
            "'queue': 'celery' needs 'account': the account the workers deliver through"
        )

    if len(read.mistakes) == 1 and read.error is not None:
        raise read.error
    if read.mistakes:
        raise ConfigError("; ".join(read.mistakes))
    assert smtp is not None
    assert protection is not None
    assert retry is not None
    return BackendSettings(
        smtp=smtp,
        protection=protection,
        home=home,
        gnupg_home=gnupg_home,
        passphrase=passphrase,
        outbox=outbox or home / "outbox.sqlite3",
        drafts=drafts,
        retry=retry,
        account=account_name,
        queue=queue,
        celery_app=values.get("celery_app"),
        config=read.path("config"),
    )


def _enum(kind: Any, value: Any, key: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{key} must be one of {choices}, not {value!r}") from None


def _load_account(name: str, config: Path | None) -> Any:
    """The named account of the accounts file (``e2email config``)."""
    from e2email import accounts

    return accounts.load_config(config).account(name)


def protection_for(base: Protection, override: Any) -> Protection:
    """``base`` with a message's ``e2email`` override applied (a dict of policy fields)."""
    if override is None:
        return base
    if not isinstance(override, Mapping):
        raise ConfigError(
            f"a message's e2email policy must be a dict, not {type(override).__name__}"
        )
    fields: dict[str, Any] = {}
    for key, value in override.items():
        if key not in OVERRIDABLE:
            raise ConfigError(
                f"a message's e2email policy cannot set {key!r} (only {', '.join(OVERRIDABLE)})"
            )
        if key == "scheme":
            fields[key] = _enum(Scheme, value, "scheme")
        elif not isinstance(value, bool):
            raise ConfigError(f"a message's e2email policy: {key!r} must be True or False")
        else:
            fields[key] = value
    return dataclasses.replace(base, **fields)


# -- the private event loop ----------------------------------------------------------------


class _LoopThread:
    """An event loop of our own in a daemon thread: the caller's thread may have a running
    loop of its own (an async view), where ``asyncio.run`` is not allowed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="e2email-django", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:  # pragma: no cover - a misuse
            coro.close()
            raise RuntimeError("the e2email backend was called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


class _Pipeline:
    """One :meth:`AsyncMailer.send_many` run fed one message at a time, for one policy: its
    delivery engine keeps one SMTP connection open from message to message (RSET between
    them) for as long as the backend stays open. Each message is protected on its own and
    fails closed on its own; its :class:`MessageOutcome` comes back to its sender."""

    _tags = itertools.count()

    def __init__(self, mailer: AsyncMailer, protection: Protection) -> None:
        self._queue: asyncio.Queue[BatchItem | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[MessageOutcome]] = {}
        self._mailer = mailer
        self._protection = protection
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def _items(self) -> AsyncIterator[BatchItem]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def _outcome(self, outcome: MessageOutcome) -> None:
        waiter = self._waiting.pop(outcome.tag, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def _run(self) -> None:
        try:
            await self._mailer.send_many(
                self._items(), protection=self._protection, connections=1, on_outcome=self._outcome
            )
        except BaseException as exc:  # the run stopped: TLS, credentials, a cancelled loop
            self.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            # Messages the run never took (or took but stopped on) get the reason.
            reason = self.error or E2EmailError("not sent: the connection was closed")
            while not self._queue.empty():
                self._queue.get_nowait()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(reason)
            self._waiting.clear()

    async def send(self, message: Any) -> MessageOutcome:
        tag = next(self._tags)
        waiter: asyncio.Future[MessageOutcome] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = waiter
        await self._queue.put(BatchItem(message=message, tag=tag))
        return await waiter

    async def close(self) -> None:
        if self.alive:
            await self._queue.put(None)
        await asyncio.gather(self.task, return_exceptions=True)


# -- the backend ---------------------------------------------------------------------------


class EmailBackend(BaseEmailBackend):
    """Django's ``EMAIL_BACKEND`` for end-to-end protected mail (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOWN_KEYS}
        for name in ("use_tls", "use_ssl"):
            if name in kwargs:
                options[name] = kwargs.pop(name)
        super().__init__(*args, **kwargs)
        try:
            self.settings = load_settings(options=options)
            ensure_private_dir(self.settings.home, what="the e2email home")
        except ConfigError as exc:
            raise ImproperlyConfigured(f"E2EMAIL: {exc}") from exc
        self._lock = threading.RLock()
        self._loop: _LoopThread | None = None
        self._mailer: AsyncMailer | None = None
        self._pipelines: dict[tuple[Any, ...], _Pipeline] = {}
        self._celery: Any = None
        if self.settings.queue == "celery":
            self._celery = _celery_queue(self.settings)

    # -- connection --------------------------------------------------------------------

    def open(self) -> bool:
        """Get ready to send (keys, outbox, an event loop); True when this call did it. The
        SMTP connection itself is opened by the first message and kept until :meth:`close`."""
        with self._lock:
            if self._mailer is not None:
                return False
            s = self.settings
            try:
                mailer = AsyncMailer(
                    smtp=s.smtp,
                    keystore=Keystore(s.home, gnupg_home=s.gnupg_home),
                    protection=s.protection,
                    passphrase=s.passphrase,
                    # A path, not an Outbox: the mailer then owns it and closes it.
                    outbox=s.outbox,
                    retry=s.retry,
                    connections=1,
                )
            except ConfigError as exc:  # e.g. an outbox folder others may write
                raise ImproperlyConfigured(f"E2EMAIL: {exc}") from exc
            self._loop = _LoopThread()
            self._mailer = mailer
            return True

    def close(self) -> None:
        """QUIT every connection and stop the event loop."""
        with self._lock:
            loop, mailer, pipelines = self._loop, self._mailer, list(self._pipelines.values())
            self._loop = self._mailer = None
            self._pipelines.clear()
            if loop is None:
                return
            try:
                for pipeline in pipelines:
                    loop.run(pipeline.close())
            finally:
                loop.stop()
                if mailer is not None:
                    mailer.close()

    # -- sending -----------------------------------------------------------------------

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Protect and send each message; the number delivered to every recipient."""
        if not email_messages:
            return 0
        fail_silently = bool(getattr(self, "fail_silently", False))
        with self._lock:
            opened = self.open()
            try:
                return self._send_all(email_messages, fail_silently)
            finally:
                if opened:
                    self.close()

    def _send_all(self, email_messages: Sequence[EmailMessage], fail_silently: bool) -> int:
        loop = self._loop
        assert loop is not None
        prepared: list[_Prepared | E2EmailError] = []
        for message in email_messages:
            if not message.recipients():
                continue  # as Django's SMTP backend: nothing to do, not counted
            try:
                prepared.append(self._prepare(message))
            except E2EmailError as exc:
                prepared.append(exc)
        sent = 0
        if fail_silently:
            # Every message is tried anyway: protected side by side, sent over one connection.
            async def all_of() -> list[MessageOutcome | BaseException]:
                jobs = [self._submit(p) for p in prepared if isinstance(p, _Prepared)]
                return list(await asyncio.gather(*jobs, return_exceptions=True))

            results = iter(loop.run(all_of()))
            for p in prepared:
                outcome = next(results) if isinstance(p, _Prepared) else p
                failed = self._settle(p, outcome)
                if failed is None:
                    sent += 1
                else:
                    # The error object may be shared by several messages (the run's stop):
                    # its notes are logged, never added to it.
                    error, notes = failed
                    log.error("e2email: %s", "; ".join([str(error), *notes]))
            return sent
        for p in prepared:
            result: MessageOutcome | BaseException
            if isinstance(p, _Prepared):
                try:
                    result = loop.run(self._submit(p))
                except E2EmailError as exc:
                    result = exc
            else:
                result = p
            failed = self._settle(p, result)
            if failed is not None:
                error, notes = failed
                if sent:
                    notes.append(f"{sent} earlier message(s) of this batch were sent")
                for note in notes:
                    error.add_note(note)
                raise error
            sent += 1
        return sent

    def _prepare(self, message: EmailMessage) -> _Prepared:
        """What the event loop needs, made in the caller's thread (Django's ``message()`` may
        read the caller's time zone)."""
        override = getattr(message, "e2email", None)
        protection = protection_for(self.settings.protection, override)
        if not (protection.sign or protection.encrypt):
            log.warning(
                "e2email: sending a message neither signed nor encrypted, as its policy says"
            )
        raw = message.message().as_bytes()
        envelope_from = Address.parse(str(message.from_email)).addr_spec
        recipients = list(
            dict.fromkeys(Address.parse(str(r)).addr_spec for r in message.recipients())
        )
        bcc = [Address.parse(str(r)).addr_spec for r in message.bcc if r]
        return _Prepared(
            raw=raw,
            envelope_from=envelope_from,
            recipients=recipients,
            bcc=bcc,
            protection=protection,
            policy_key=_hashable(override or {}),
        )

    async def _submit(self, p: _Prepared) -> MessageOutcome:
        """Protect and send one message: over the policy's kept connection, or (an already
        protected message, or a From or To/Cc header that differs from the envelope) by
        :func:`e2email.inbound.submit` over a connection of its own."""
        mailer = self._mailer
        assert mailer is not None
        if self._celery is not None:
            return await _enqueue(self._celery, mailer, p, account=self.settings.account)
        parsed = Message.from_bytes(p.raw, sender=p.envelope_from)
        wanted = {r.lower() for r in p.recipients}
        shown = {a.addr_spec.lower() for a in (*parsed.to, *parsed.cc, *parsed.bcc)}
        simple = (
            existing_protection(p.raw) is None
            and parsed.sender.addr_spec.lower() == p.envelope_from.lower()
            and shown <= wanted
        )
        if not simple:
            result = await submit(
                mailer,
                p.raw,
                envelope_from=p.envelope_from,
                recipients=p.recipients,
                protection=p.protection,
            )
            return result  # delivered to every recipient (else submit raised)
        # Given recipients not in the header are Bcc (Django leaves Bcc out of the header):
        # each gets a copy of its own, encrypted to them alone (and the sender).
        extra = tuple(Address.parse(r) for r in p.recipients if r.lower() not in shown)
        if extra:
            parsed = dataclasses.replace(parsed, bcc=(*parsed.bcc, *extra))
        pipeline = self._pipelines.get(p.policy_key)
        if pipeline is None or not pipeline.alive:
            pipeline = self._pipelines[p.policy_key] = _Pipeline(mailer, p.protection)
        return await pipeline.send(parsed)

    def _settle(
        self, p: _Prepared | E2EmailError, outcome: MessageOutcome | BaseException
    ) -> tuple[E2EmailError, list[str]] | None:
        """None when the message was delivered to every recipient; otherwise the error to
        raise or log and notes saying where the message is kept (outbox or drafts)."""
        if isinstance(outcome, MessageOutcome) and outcome.status == "delivered":
            return None
        error = _error_of(outcome)
        notes: list[str] = []
        kept = _kept_ids(outcome, error)
        if kept:
            notes.append(
                f"the protected message is kept in the outbox as {', '.join(kept)}; "
                "`e2email outbox retry` sends it (do not send it anew)"
            )
        elif isinstance(p, _Prepared) and self.settings.drafts is not None:
            try:
                path = _save_draft(self.settings.drafts, p)
            except E2EmailError as unsaved:
                notes.append(f"the message could not be kept as a draft: {unsaved}")
            else:
                notes.append(
                    f"nothing was sent; the message is kept as a draft in {path} "
                    f"(to send it later: e2email-sendmail -t < {path})"
                )
        return error, notes


@dataclasses.dataclass(frozen=True)
class _Prepared:
    raw: bytes = dataclasses.field(repr=False)
    envelope_from: str
    recipients: list[str]
    #: Django's Bcc list (left out of ``raw``), for a draft.
    bcc: list[str]
    protection: Protection
    #: The message's policy override, hashable: one pipeline (connection) per policy.
    policy_key: Any


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        items = [_hashable(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, set | frozenset) else items)
    return value


def _error_of(outcome: MessageOutcome | BaseException) -> E2EmailError:
    """The E2EmailError saying why a message was not delivered to everyone."""
    if isinstance(outcome, E2EmailError):
        return outcome
    if isinstance(outcome, BaseException):
        wrapped = E2EmailError(f"not sent: {outcome!r}")
        wrapped.__cause__ = outcome
        return wrapped
    if outcome.status == "not-sent" and isinstance(outcome.error, E2EmailError):
        return outcome.error
    refused = [
        (r.address, r.reply)
        for r in outcome.recipients
        if r.status != "delivered" and r.reply is not None
    ]
    accepted = [r.address for r in outcome.recipients if r.status == "delivered"]
    cause = outcome.error
    if isinstance(cause, E2EmailError) and not (refused and isinstance(cause, DeliveryError)):
        return cause  # e.g. the TLS or connection failure that stopped the run
    error: E2EmailError
    if refused:
        error = RecipientsRefusedError(refused, accepted=accepted)
    else:
        error = TransportError(f"not delivered: {outcome.detail or outcome.status}")
    error.result = outcome
    return error


def _kept_ids(outcome: MessageOutcome | BaseException, error: E2EmailError) -> tuple[str, ...]:
    if isinstance(outcome, MessageOutcome):
        return tuple(outcome.kept)
    kept = getattr(getattr(error, "result", None), "kept", None)
    return tuple(kept) if isinstance(kept, tuple | list) else ()


def _with_notes(error: BaseException) -> str:
    notes = getattr(error, "__notes__", ())
    return "; ".join([str(error), *notes])


def _save_draft(folder: Path, p: _Prepared) -> Path:
    """Keep a message that could not be protected, private (0600 in a 0700 folder), as a
    message that ``e2email-sendmail -t`` reads: with its Bcc recipients in a Bcc field."""
    ensure_private_dir(folder, what="the drafts folder")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"{stamp}-{secrets.token_hex(4)}.eml"
    newline = b"\r\n" if b"\r\n" in p.raw[:1000] else b"\n"
    head = b"Bcc: " + ", ".join(p.bcc).encode() + newline if p.bcc else b""
    write_private(path, head + p.raw)
    return path


# -- issue 12: queue for Celery workers instead of sending from here ----------------------


def _celery_queue(s: BackendSettings) -> Any:
    """The :class:`e2email.celery.CeleryQueue` of ``E2EMAIL["celery_app"]`` (an app, or
    ``"module:attribute"``), else of an app made from the accounts file's ``[celery]``."""
    try:
        from celery.utils.imports import symbol_by_name

        from e2email.celery import CeleryQueue, make_app
    except ImportError as exc:
        raise ImproperlyConfigured(
            "E2EMAIL: 'queue': 'celery' needs Celery (pip install 'e2email[celery]')"
        ) from exc
    app = s.celery_app
    if isinstance(app, str):
        try:
            app = symbol_by_name(app)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImproperlyConfigured(f"E2EMAIL: 'celery_app': cannot import {app!r}") from exc
    if app is None:
        app = make_app(config=s.config)
    return CeleryQueue(app)


async def _enqueue(
    queue: Any, mailer: AsyncMailer, p: _Prepared, *, account: str | None
) -> MessageOutcome:
    """Protect here (fail closed as when sending), then queue the copies: the broker carries
    only them, their envelopes and the account's name. Counted as sent once queued."""
    copies = await inbound_protect(
        mailer,
        p.raw,
        envelope_from=p.envelope_from,
        recipients=p.recipients,
        protection=p.protection,
    )
    try:
        queued = await asyncio.to_thread(queue.enqueue, copies, account=account)
    except TransportError as exc:
        # The broker or result backend unreachable: the protected copies are kept in the
        # local outbox (`e2email outbox retry` delivers them), else the caller keeps a draft.
        kept = await _keep_protected(mailer, copies, account=account)
        if not kept:
            raise
        return MessageOutcome(
            status="not-sent",
            message_id=copies[0].message_id,
            # Each recipient waits in the outbox (deferred) for `e2email outbox retry`.
            recipients=tuple(
                RecipientOutcome(a, "deferred", None, str(exc))
                for c in copies
                for a in c.recipients
            ),
            error=exc,
            kept=kept,
        )
    return MessageOutcome(
        status="delivered", message_id=copies[0].message_id, detail=f"queued ({queued.count})"
    )


async def _keep_protected(
    mailer: AsyncMailer, copies: Any, *, account: str | None
) -> tuple[str, ...]:
    """Store protected copies that could not be queued in the mailer's outbox, unclaimed;
    () when there is no outbox (or no SMTP settings to deliver them with)."""
    from e2email.client import outbox_item
    from e2email.delivery import route_of

    outbox, smtp = mailer.outbox, mailer.smtp
    if outbox is None or smtp is None:
        return ()
    items = [outbox_item(c, smtp) for c in copies]
    try:
        return await asyncio.to_thread(
            outbox.add, items, route=route_of(smtp), claim=False, account=account
        )
    except E2EmailError:
        log.exception("e2email: the protected copies could not be kept in the outbox")
        return ()
