"""The Django email backend (``e2email.django.EmailBackend``) with real Django, a real TLS
server, real keys, and the received bytes checked by gpg, sqop and openssl as a receiving MUA
would. Django is configured once for the session here (no project needed)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
from collections.abc import Callable
from email.message import EmailMessage as PyEmailMessage
from email.mime.image import MIMEImage
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

from asgiref.sync import sync_to_async
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.test import override_settings
from fixtures_pgp import LOCKED_PASSPHRASE, Keys
from fixtures_smime import PKI
from pgp_helpers import (
    gpg_decrypt,
    gpg_verify,
    list_packet_key_ids,
    multipart_parts,
    part_body,
    run,
    sop_decrypt,
    split_head,
    subkey_ids,
)

from e2email.certstore import CertStore
from e2email.config import Scheme, TLSMode
from e2email.django import EmailBackend, load_settings, protection_for
from e2email.errors import ConfigError, InsecureTransportError, RecipientKeyError, TLSError
from e2email.keystore import Keystore
from e2email.outbox import Outbox
from e2email.testing import LoopbackSMTPServer, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d4944415478da63f8cfc0f01f0005000201a5f2d8e90000000049454e44ae426082"
)


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
    with (
        _configured(E2EMAIL=keys_only, EMAIL_USE_TLS=True, EMAIL_SSL_CERTFILE="/c.pem"),
        pytest.raises(ConfigError, match="client certificates"),
    ):
        load_settings()
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


# -- sending -------------------------------------------------------------------------------


def _received_for(server: LoopbackSMTPServer, address: str) -> list[bytes]:
    return [m.data for m in server.messages if address in m.rcpt_tos]


def _decrypt(raw: bytes, home: Path) -> email.message.Message:
    plain, status = gpg_decrypt(home, _pgp_payload(raw))
    assert "GOODSIG" in status or "VALIDSIG" in status, status
    return email.message_from_bytes(plain, policy=email.policy.default)


def _rich_message(tmp_path: Path) -> EmailMultiAlternatives:
    """An HTML alternative, two attachments (one by attach_file), an inline image, Cc, Bcc,
    Reply-To and an extra header: what a Django project sends."""
    report = tmp_path / "report.csv"
    report.write_bytes(b"id,amount\r\n1,42\r\n2,\xe2\x82\xac7\r\n")
    msg = EmailMultiAlternatives(
        subject="Quarterly numbers (confidential)",
        body="Hello Bob,\n\nthe numbers are attached.\n",
        from_email="Alice <alice@example.org>",
        to=["Bob <bob@example.net>"],
        cc=["carol@example.com"],
        bcc=["dave@example.com"],
        reply_to=["alice+replies@example.org"],
        headers={"X-Campaign": "q3-2026"},
    )
    msg.attach_alternative('<p>Hello Bob,</p><p><img src="cid:logo@e2"></p>', "text/html")
    msg.attach("notes.txt", "Grüße: ünïcödé notes\n", "text/plain")
    msg.attach_file(str(report), "text/csv")
    image = MIMEImage(PNG, "png")
    image.add_header("Content-ID", "<logo@e2>")
    image.add_header("Content-Disposition", "inline", filename="logo.png")
    msg.attach(image)
    return msg


def test_multi_alternatives_with_attachments_and_bcc_arrive_encrypted_and_intact(
    conf: dict[str, Any],
    server: LoopbackSMTPServer,
    recipients_home: Path,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The server gets only ciphertext; the Bcc recipient gets a separate copy (its key ID is
    in no other copy); each copy decrypts (gpg; sqop for Bob's) to the same MIME structure
    Django built, part for part, with the same decoded content."""
    msg = _rich_message(tmp_path)
    expected = email.message_from_bytes(msg.message().as_bytes(), policy=email.policy.default)
    with _configured(E2EMAIL=conf):
        assert msg.send() == 1
    assert len(server.messages) == 2
    for received in server.messages:
        assert b"multipart/encrypted" in received.data
        for secret in (b"numbers are attached", b"Quarterly", b"q3-2026", b"notes.txt", b"dave@"):
            assert secret not in received.data
    main = _received_for(server, "bob@example.net")
    bcc = _received_for(server, "dave@example.com")
    assert len(main) == 1
    assert len(bcc) == 1
    assert sorted(next(m for m in server.messages if m.data is main[0]).rcpt_tos) == [
        "bob@example.net",
        "carol@example.com",
    ]
    assert next(m for m in server.messages if m.data is bcc[0]).rcpt_tos == ("dave@example.com",)
    dave_ids = subkey_ids(recipients_home, keys.dave.fingerprint)
    assert not dave_ids & list_packet_key_ids(recipients_home, _pgp_payload(main[0]))
    assert dave_ids & list_packet_key_ids(recipients_home, _pgp_payload(bcc[0]))

    for raw in (main[0], bcc[0]):
        inner = _decrypt(raw, recipients_home)
        assert inner["Subject"] == "Quarterly numbers (confidential)"
        assert inner["Reply-To"] == "alice+replies@example.org"
        assert inner["X-Campaign"] == "q3-2026"
        assert "Bcc" not in inner
        assert b"dave@example.com" not in inner.as_bytes()
        assert _structure(inner) == _structure(expected)
        assert _leaves(inner) == _leaves(expected)
        assert {p.get_filename() for p in inner.walk()} >= {"notes.txt", "report.csv", "logo.png"}
    plain, verifications = sop_decrypt(
        "sqop", _pgp_payload(main[0]), keys.bob.secret, keys.alice.cert, tmp_path
    )
    assert keys.alice.fingerprint[-16:].lower() in verifications.lower()
    inner = email.message_from_bytes(plain, policy=email.policy.default)
    assert _leaves(inner) == _leaves(expected)


def test_send_mass_mail_and_a_held_connection_use_one_tls_connection(
    conf: dict[str, Any], server: LoopbackSMTPServer, recipients_home: Path
) -> None:
    datatuple = [
        ("One", "first", "alice@example.org", ["bob@example.net"]),
        ("Two", "second", "alice@example.org", ["carol@example.com"]),
        ("Three", "third", "alice@example.org", ["erin@example.com", "bob@example.net"]),
    ]
    with _configured(E2EMAIL=conf):
        assert mail.send_mass_mail(datatuple) == 3
        assert server.connections == 1
        assert len(server.messages) == 3
        # A connection held open by the application carries message after message.
        with mail.get_connection() as connection:
            for n in range(2):
                sent = EmailMessage(
                    f"held {n}",
                    "body",
                    "alice@example.org",
                    ["bob@example.net"],
                    connection=connection,
                ).send()
                assert sent == 1
    assert server.connections == 2
    assert len(server.messages) == 5
    commands = server.received_commands()
    assert commands.count("QUIT") == 2
    for received in server.messages:
        assert received.tls_version in ("TLSv1.2", "TLSv1.3")
        _decrypt(received.data, recipients_home)


def test_send_mail_and_mail_admins(
    conf: dict[str, Any], server: LoopbackSMTPServer, recipients_home: Path
) -> None:
    with _configured(E2EMAIL=conf):
        assert mail.send_mail("Hi", "plain body\n", None, ["bob@example.net"]) == 1
        mail.mail_admins("Server error", "traceback text\n", html_message="<pre>tb</pre>")
    assert len(server.messages) == 2
    first, admins = (_decrypt(m.data, recipients_home) for m in server.messages)
    assert first["Subject"] == "Hi"
    assert first["From"] == "Alice <alice@example.org>"  # DEFAULT_FROM_EMAIL
    assert server.messages[1].rcpt_tos == ("bob@example.net",)
    assert admins["Subject"].endswith("Server error")
    assert {p.get_content_type() for p in admins.walk()} >= {"text/plain", "text/html"}


@pytest.mark.parametrize("fail_silently", [True, False])
def test_a_recipient_without_a_key_gets_nothing_and_the_message_is_kept(
    conf: dict[str, Any],
    server: LoopbackSMTPServer,
    tmp_path: Path,
    fail_silently: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    msg = EmailMessage(
        "Secret",
        "nobody may read this\n",
        "alice@example.org",
        ["bob@example.net"],
        bcc=["nokey@example.com"],
    )
    with _configured(E2EMAIL=conf):
        if fail_silently:
            assert mail.get_connection(fail_silently=True).send_messages([msg]) == 0
            # Silent for the caller, never for the operator.
            assert "nokey@example.com: no key found" in caplog.text
            assert "kept as a draft" in caplog.text
        else:
            with pytest.raises(RecipientKeyError) as info:
                msg.send()
            assert info.value.addresses == ("nokey@example.com",)
            assert any("kept as a draft" in n for n in info.value.__notes__)
    assert server.messages == []
    assert server.connections == 0
    drafts = list((tmp_path / "drafts").iterdir())
    assert len(drafts) == 1
    assert drafts[0].stat().st_mode & 0o777 == 0o600
    kept = drafts[0].read_bytes()
    assert b"nobody may read this" in kept
    assert b"Bcc: nokey@example.com" in kept  # so `e2email-sendmail -t` sends it to them too
    assert len(Outbox(tmp_path / "outbox.sqlite3")) == 0


def test_per_message_sign_only_override(
    conf: dict[str, Any], server: LoopbackSMTPServer, recipients_home: Path, tmp_path: Path
) -> None:
    """``msg.e2email = {"encrypt": False}`` (a newsletter to readers without keys): signed,
    not encrypted; the other message of the batch is still encrypted."""
    news = EmailMessage("News", "Public news\n", "alice@example.org", ["nokey@example.com"])
    news.e2email = {"encrypt": False}  # type: ignore[attr-defined]
    private = EmailMessage("Private", "secret\n", "alice@example.org", ["bob@example.net"])
    with _configured(E2EMAIL=conf):
        assert mail.get_connection().send_messages([news, private]) == 2
    by_rcpt = {m.rcpt_tos: m.data for m in server.messages}
    signed = by_rcpt[("nokey@example.com",)]
    head, parts = multipart_parts(signed)
    assert b"multipart/signed" in head
    assert b"Public news" in parts[0]
    assert gpg_verify(recipients_home, part_body(parts[1]), parts[0], tmp_path)
    # The override is an attribute of the Python object: no trace of it on the wire.
    assert b"x-e2email" not in signed.lower()
    assert b"encrypt" not in signed.lower()
    assert b"multipart/encrypted" in by_rcpt[("bob@example.net",)]


def test_a_server_that_cannot_be_verified_keeps_the_message_in_the_outbox(
    conf: dict[str, Any], smtp_server: ServerFactory, tmp_path: Path
) -> None:
    other_ca = TestCA()
    try:
        rogue = smtp_server(tls="implicit", ca=other_ca)
        bad = {**conf, "port": rogue.port}  # our CA file does not vouch for its certificate
        msg = EmailMessage("S", "body\n", "alice@example.org", ["bob@example.net"])
        with _configured(E2EMAIL=bad):
            assert mail.get_connection(fail_silently=True).send_messages([msg]) == 0
            with pytest.raises(TLSError) as info:
                msg.send()
        assert any("kept in the outbox" in n for n in info.value.__notes__)
        assert rogue.messages == []
        assert len(Outbox(tmp_path / "outbox.sqlite3")) == 2
    finally:
        other_ca.cleanup()


def test_works_from_inside_a_running_event_loop_and_sync_to_async(
    conf: dict[str, Any], server: LoopbackSMTPServer
) -> None:
    async def view() -> tuple[int, int]:
        # An async view calling send_mail directly (blocking, but it must work) and the
        # recommended way, through sync_to_async in a worker thread.
        direct = mail.send_mail("a", "b\n", None, ["bob@example.net"])
        threaded = await sync_to_async(mail.send_mail)("c", "d\n", None, ["bob@example.net"])
        return direct, threaded

    with _configured(E2EMAIL=conf):
        assert asyncio.run(view()) == (1, 1)
    assert len(server.messages) == 2


def test_smime_through_the_same_backend(
    conf: dict[str, Any],
    server: LoopbackSMTPServer,
    pki: PKI,
    smime_store: CertStore,
    tmp_path: Path,
) -> None:
    smime = {**conf, "scheme": "smime", "home": str(smime_store.home)}
    msg = EmailMultiAlternatives(
        "S/MIME", "plain\n", "alice@example.org", ["bob@example.net"], bcc=["carol@example.com"]
    )
    msg.attach_alternative("<b>html</b>", "text/html")
    msg.attach("a.bin", b"\x00\x01binary", "application/octet-stream")
    with _configured(E2EMAIL=smime):
        assert msg.send() == 1
    assert len(server.messages) == 2
    main = _received_for(server, "bob@example.net")[0]
    head, _ = split_head(main)
    assert b"application/pkcs7-mime" in head
    assert b"binary" not in main
    path = tmp_path / "smime.eml"
    path.write_bytes(main)
    plain = run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-in",
            str(path),
            "-recip",
            str(pki.bob.cert_pem),
            "-inkey",
            str(pki.bob.key_pem),
        ]
    ).stdout
    assert b"multipart/signed" in plain
    inner = email.message_from_bytes(plain, policy=email.policy.default)
    signed = next(
        p
        for p in inner.walk()
        if p.get_content_type() == "multipart/mixed"
        or p.get_content_type() == "multipart/alternative"
    )
    assert signed is not None
    expected = email.message_from_bytes(msg.message().as_bytes(), policy=email.policy.default)
    got = [leaf for leaf in _leaves(inner) if leaf[0] != "application/pkcs7-signature"]
    assert got == _leaves(expected)


def test_envelope_and_header_overrides_are_honoured(
    conf: dict[str, Any], server: LoopbackSMTPServer, recipients_home: Path
) -> None:
    """A From header other than the envelope sender (a bounce address), and a To header that
    names fewer people than ``to=`` (a list alias): the envelope is what Django would use,
    and whoever is not shown in the header gets a separate copy."""
    bounce = EmailMessage(
        "Bounce",
        "b\n",
        "bounces@example.org",
        ["bob@example.net"],
        headers={"From": "Alice <alice@example.org>"},
    )
    alias = EmailMessage(
        "Alias",
        "a\n",
        "alice@example.org",
        ["bob@example.net", "carol@example.com"],
        headers={"To": "Team <bob@example.net>"},
    )
    with _configured(E2EMAIL=conf):
        assert mail.get_connection().send_messages([bounce, alias]) == 2
    first = server.messages[0]
    assert (first.mail_from, first.rcpt_tos) == ("bounces@example.org", ("bob@example.net",))
    assert _decrypt(first.data, recipients_home)["From"] == "Alice <alice@example.org>"
    rest = sorted(server.messages[1:], key=lambda m: m.rcpt_tos)
    assert [m.rcpt_tos for m in rest] == [("bob@example.net",), ("carol@example.com",)]
    for m in rest:
        assert _decrypt(m.data, recipients_home)["To"] == "Team <bob@example.net>"


def test_an_account_and_inline_server_settings_are_refused_together() -> None:
    """`account` names the server: a `host` beside it is a mistake, named at start-up."""
    both = pytest.raises(ImproperlyConfigured, match="'account' names the server; remove 'host'")
    with _configured(E2EMAIL={"account": "work", "host": "x.example"}), both:
        EmailBackend()


class _ModernMessage(EmailMessage):
    """What Django 6's ``message()`` returns: an ``email.message.EmailMessage`` under the
    modern policy, whose text parts may be 8bit (Python 3.11 cannot run Django 6, so its
    shape is made here with the standard library, as Django 6 makes it)."""

    def message(self, **kwargs: Any) -> Any:
        msg = PyEmailMessage(policy=email.policy.default)
        msg["Subject"] = str(self.subject)
        msg["From"] = str(self.from_email)
        msg["To"] = ", ".join(self.to)
        msg["Date"] = email.utils.formatdate()
        msg["Message-ID"] = email.utils.make_msgid(domain="example.org")
        msg.set_content(self.body, cte="8bit")
        msg.add_alternative("<p>Grüße, ünïcödé ✓</p>\n", subtype="html", cte="8bit")
        msg.add_attachment(
            b"\x00\x01\xffbinary", maintype="application", subtype="octet-stream", filename="x.bin"
        )
        return msg


def test_a_django_6_style_message_with_8bit_parts(
    conf: dict[str, Any], server: LoopbackSMTPServer, recipients_home: Path
) -> None:
    msg = _ModernMessage("Modern", "Grüße aus Köln ✓\n", "alice@example.org", ["bob@example.net"])
    built = msg.message().as_bytes()
    assert b"8bit" in built
    expected = email.message_from_bytes(built, policy=email.policy.default)
    with _configured(E2EMAIL=conf):
        assert msg.send() == 1
    (received,) = server.messages
    assert all(byte < 128 for byte in received.data)  # 7-bit on the wire
    inner = _decrypt(received.data, recipients_home)
    assert _structure(inner) == _structure(expected)
    assert _leaves(inner) == _leaves(expected)


def test_a_signing_key_passphrase_from_the_environment(
    conf: dict[str, Any],
    server: LoopbackSMTPServer,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DJANGO_TEST_PASSPHRASE", LOCKED_PASSPHRASE)
    locked = {**conf, "passphrase_env": "DJANGO_TEST_PASSPHRASE", "encrypt_to_self": False}
    msg = EmailMessage(
        "Locked", "signed by a protected key\n", "locked@example.org", ["bob@example.net"]
    )
    with _configured(E2EMAIL=locked):
        assert msg.send() == 1
    assert keys.bob.secret is not None
    plain, verifications = sop_decrypt(
        "sqop", _pgp_payload(server.messages[0].data), keys.bob.secret, keys.locked.cert, tmp_path
    )
    assert b"signed by a protected key" in plain
    assert verifications.strip()  # a good signature by the locked key


def test_the_readme_settings_work(tmp_path: Path) -> None:
    """The settings.py snippet of the README, as it is (only the home differs)."""
    readme = {
        "host": "smtp.example.org",
        "port": 465,
        "username": "app@example.org",
        "password_env": "SMTP_PASSWORD",
        "passphrase_env": "E2EMAIL_PASSPHRASE",
        "home": str(tmp_path / "e2email"),
    }
    with _configured(E2EMAIL=readme, DEFAULT_FROM_EMAIL="App <app@example.org>"):
        backend = mail.get_connection()
    assert isinstance(backend, EmailBackend)
    smtp = backend.settings.smtp
    assert (smtp.host, smtp.port, smtp.effective_tls) == ("smtp.example.org", 465, TLSMode.IMPLICIT)
    assert backend.settings.outbox == tmp_path / "e2email" / "outbox.sqlite3"
    assert (tmp_path / "e2email").stat().st_mode & 0o777 == 0o700
