"""The Django email backend (``e2email.django.EmailBackend``) with real Django, a real TLS
server, real keys, and the received bytes checked by gpg, sqop and openssl as a receiving MUA
would. Django is configured once for the session here (no project needed)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        EMAIL_BACKEND="e2email.django.EmailBackend",
        DEFAULT_FROM_EMAIL="Alice <alice@example.org>",
        SERVER_EMAIL="alice@example.org",
        # Django 6 takes plain addresses; 5.2 (name, address) pairs.
        ADMINS=(["bob@example.net"] if django.VERSION >= (6, 0) else [("Bob", "bob@example.net")]),
        E2EMAIL={},
        USE_TZ=True,
    )
    django.setup()

from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from pgp_helpers import (
    multipart_parts,
    part_body,
)

from e2email.config import Scheme, TLSMode
from e2email.django import EmailBackend, load_settings, protection_for
from e2email.errors import (
    ConfigError,
    InsecureTransportError,
)
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d4944415478da63f8cfc0f01f0005000201a5f2d8e90000000049454e44ae426082"
)
HAS_MIME = hasattr(__import__("e2email.message", fromlist=["Message"]).Message, "from_bytes")
needs_inbound = pytest.mark.skipif(not HAS_MIME, reason="needs e2email.inbound (branch i11-mime)")


@pytest.fixture
def server(smtp_server: ServerFactory) -> LoopbackSMTPServer:
    return smtp_server(tls="implicit")


@pytest.fixture
def conf(server: LoopbackSMTPServer, sender_store: Keystore, tmp_path: Path) -> dict[str, Any]:
    """E2EMAIL for the loopback server, with the session's sender keystore as home."""
    return {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "ca_file": str(server.ca_file),
        "timeout": 30,
        "home": str(sender_store.home),
        "outbox": str(tmp_path / "outbox.sqlite3"),
        "drafts": str(tmp_path / "drafts"),
        "retries": 0,
    }


def _configured(**overrides: Any) -> Any:
    return override_settings(**overrides)


def _pgp_payload(raw: bytes) -> bytes:
    """The armored OpenPGP message of a received PGP/MIME encrypted message (RFC 3156 §4)."""
    head, parts = multipart_parts(raw)
    assert b"multipart/encrypted" in head
    assert len(parts) == 2
    return part_body(parts[1])


def _leaves(msg: email.message.Message) -> list[tuple[str, str | None, bytes]]:
    """Every leaf part as (content type, file name, decoded bytes); text normalised to LF."""
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        if part.get_content_maintype() == "text":
            data = data.replace(b"\r\n", b"\n")
        out.append((part.get_content_type(), part.get_filename(), data))
    return out


def _structure(msg: email.message.Message) -> list[str]:
    return [p.get_content_type() for p in msg.walk()]


# -- settings ------------------------------------------------------------------------------


def test_inline_settings_are_checked_once_with_every_mistake_named(conf: dict[str, Any]) -> None:
    bad = {
        **conf,
        "port": "465",
        "sign": "yes",
        "password": "x",
        "password_env": "X",
        "hots": "typo",
    }
    with _configured(E2EMAIL=bad), pytest.raises(ImproperlyConfigured) as info:
        EmailBackend()
    assert "unknown key 'hots'" in str(info.value)
    assert isinstance(info.value.__cause__, ConfigError)
    bad.pop("hots")
    with _configured(E2EMAIL=bad), pytest.raises(ImproperlyConfigured) as info:
        EmailBackend()
    text = str(info.value)
    assert "'port' must be an integer" in text
    assert "the SMTP password given 2 ways" in text
    assert "'sign' must be True or False" in text
    with (
        _configured(E2EMAIL={**conf, "scheme": "pgp"}),
        pytest.raises(ImproperlyConfigured) as info,
    ):
        EmailBackend()
    assert "scheme must be one of 'openpgp', 'smime'" in str(info.value)


def test_django_email_settings_map_without_downgrade(conf: dict[str, Any]) -> None:
    """Without 'host', Django's EMAIL_* settings name the server: EMAIL_USE_SSL is implicit
    TLS, EMAIL_USE_TLS is STARTTLS (required), neither is refused (Django's default would
    be plaintext) unless E2EMAIL names the TLS mode."""
    keys_only = {k: v for k, v in conf.items() if k not in ("host", "port", "tls", "timeout")}
    django_server = {
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": 2465,
        "EMAIL_HOST_USER": "app",
        "EMAIL_HOST_PASSWORD": "secret",
        "EMAIL_TIMEOUT": 7,
    }
    with _configured(E2EMAIL=keys_only, EMAIL_USE_SSL=True, **django_server):
        smtp = load_settings().smtp
    assert (smtp.host, smtp.port, smtp.tls) == ("127.0.0.1", 2465, TLSMode.IMPLICIT)
    assert (smtp.username, smtp.password, smtp.timeout) == ("app", "secret", 7.0)
    with _configured(E2EMAIL=keys_only, EMAIL_USE_TLS=True, **django_server):
        assert load_settings().smtp.tls is TLSMode.STARTTLS
    with _configured(E2EMAIL=keys_only, **django_server), pytest.raises(InsecureTransportError):
        load_settings()
    with _configured(E2EMAIL=keys_only), pytest.raises(ImproperlyConfigured) as info:
        EmailBackend()  # Django's defaults: localhost:25 in clear
    assert "never sends in clear" in str(info.value)
    # Backend options (get_connection(...), Django 6.1 MAILERS OPTIONS) come first.
    with _configured(E2EMAIL=keys_only, EMAIL_USE_TLS=True, **django_server):
        backend = EmailBackend(host="localhost", port=587, use_tls=False, use_ssl=True)
    assert (backend.settings.smtp.host, backend.settings.smtp.tls) == (
        "localhost",
        TLSMode.IMPLICIT,
    )
    plaintext = {**keys_only, "tls": "insecure-plaintext"}
    with _configured(E2EMAIL=plaintext, **django_server), pytest.raises(InsecureTransportError):
        load_settings()


def test_per_message_policy_is_checked() -> None:
    base = load_settings(
        {"host": "127.0.0.1", "port": 465, "home": "/nonexistent"}, django=object()
    ).protection
    assert protection_for(base, None) is base
    signed = protection_for(base, {"encrypt": False})
    assert (signed.sign, signed.encrypt) == (True, False)
    assert protection_for(base, {"scheme": "smime"}).scheme is Scheme.SMIME
    with pytest.raises(ConfigError, match="cannot set 'key_map'"):
        protection_for(base, {"key_map": {}})
    with pytest.raises(ConfigError, match="must be True or False"):
        protection_for(base, {"encrypt": "no"})
