"""`e2email relay`: real SMTP clients (smtplib, swaks, logging's SMTPHandler) submit to the
relay in-process; it protects with real gpg keys and delivers to a real TLS server; what arrives
upstream is decrypted and verified with gpg and sqop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import logging.handlers
import shutil
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    gpg_decrypt,
    header_value,
    multipart_parts,
    part_body,
    sop_decrypt,
    split_head,
)

from e2email.client import AsyncMailer
from e2email.config import Protection, RetryPolicy, SMTPSettings, TLSMode
from e2email.errors import ConfigError, KeyProblem, KeyReason
from e2email.keystore import Keystore
from e2email.message import Message
from e2email.outbox import NewItem, Outbox
from e2email.relay import Relay, _problem_reply, self_signed_certificate
from e2email.testing import Fault, LoopbackSMTPServer, ReceivedMessage, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]


def upstream_settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.IMPLICIT,
        ca_file=server.ca_file,
        timeout=30,
    )


class RelayThread:
    """A :class:`Relay` on 127.0.0.1 and a free port, run by its own event loop in a thread."""

    def __init__(self, make: Callable[[], Relay]) -> None:
        self._make = make
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.relay: Relay | None = None

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=120)

    def start(self) -> RelayThread:
        self._thread.start()

        async def start() -> Relay:
            relay = self._make()
            await relay.start()
            return relay

        self.relay = self._call(start())
        return self

    @property
    def port(self) -> int:
        assert self.relay is not None
        return self.relay.address[1]

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self.relay is not None:
            self._call(self.relay.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        self._loop.close()


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def run_relay(sender_store: Keystore, outbox_path: Path) -> Iterator[Callable[..., RelayThread]]:
    """Start a relay (stopped after the test) delivering to ``upstream``."""
    started: list[RelayThread] = []
    mailers: list[AsyncMailer] = []

    def start(upstream: LoopbackSMTPServer, **kwargs: Any) -> RelayThread:
        protection = kwargs.pop("protection", Protection())
        mailer = AsyncMailer(
            smtp=upstream_settings(upstream),
            keystore=sender_store,
            protection=protection,
            outbox=outbox_path,
            retry=RetryPolicy(max_attempts=2, base_delay=0.05, max_delay=0.1),
        )
        mailers.append(mailer)
        thread = RelayThread(lambda: Relay(mailer, host="127.0.0.1", port=0, **kwargs)).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()
    for mailer in mailers:
        mailer.close()


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def plain_message(subject: str, body: str, *, to: str = "bob@example.net") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice Demo <alice@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def decrypt_as_bob(
    received: ReceivedMessage, keys: Keys, recipients_home: Path, tmp_path: Path
) -> bytes:
    """The plaintext of a PGP/MIME message, decrypted by gpg and by sqop (which must agree),
    with Alice's signature verified by both."""
    head, _ = split_head(received.data)
    assert "multipart/encrypted" in header_value(head, "Content-Type")
    _, (_, encrypted) = multipart_parts(received.data)
    armored = part_body(encrypted)
    plaintext, status = gpg_decrypt(recipients_home, armored)
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    assert keys.bob.secret is not None
    sop_plain, verifications = sop_decrypt(
        "sqop", armored, keys.bob.secret, keys.alice.cert, tmp_path
    )
    assert sop_plain == plaintext
    assert keys.alice.fingerprint in verifications.upper()
    return plaintext


# -- smtplib ---------------------------------------------------------------------------------


def test_smtplib_submission_arrives_upstream_encrypted_and_signed(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """250 from the relay; upstream gets only a PGP/MIME message that gpg and sqop decrypt,
    whose hidden Subject and body are what the client sent (the Subject not in clear)."""
    upstream = smtp_server()
    relay = run_relay(upstream)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        refused = client.send_message(plain_message("secret plans", "The vault code is 4711.\n"))
    assert refused == {}
    wait_for(lambda: len(upstream.messages) == 1, "the upstream delivery")
    received = upstream.messages[0]
    assert received.rcpt_tos == ("bob@example.net",)
    assert b"4711" not in received.data
    assert b"secret plans" not in received.data
    plaintext = decrypt_as_bob(received, keys, recipients_home, tmp_path)
    assert b"The vault code is 4711." in plaintext
    assert b"secret plans" in plaintext
    assert relay.relay is not None
    wait_for(lambda: relay.relay is not None and relay.relay.delivered == 1, "the outcome")


def test_a_recipient_without_a_key_is_refused_at_rcpt_and_nothing_goes_upstream(
    run_relay: Callable[..., RelayThread], smtp_server: ServerFactory, outbox_path: Path
) -> None:
    upstream = smtp_server()
    relay = run_relay(upstream)
    with (
        smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        client.send_message(plain_message("hi", "text\n", to="nokey@example.com"))
    code, text = refused.value.recipients["nokey@example.com"]
    assert code == 550
    assert text.startswith(b"5.7.1 <nokey@example.com>: ")
    with Outbox(outbox_path) as box:
        assert len(box) == 0
    assert relay.relay is not None
    # Nothing to deliver: the relay's delivery task has nothing queued, the server saw nothing.
    assert upstream.messages == []
    assert upstream.connections == 0


def test_a_message_that_cannot_be_protected_is_refused_at_end_of_data_naming_the_address(
    run_relay: Callable[..., RelayThread], smtp_server: ServerFactory, outbox_path: Path
) -> None:
    """Every RCPT has a key, but the policy also needs the sender's own key (encrypt-to-self)
    and the From address has none: 550 5.7.1 at the end of DATA names it; nothing is stored
    or sent."""
    upstream = smtp_server()
    relay = run_relay(upstream, protection=Protection(sign=False))
    msg = plain_message("hi", "text\n")
    del msg["From"]
    msg["From"] = "nokey@example.com"
    with (
        smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client,
        pytest.raises(smtplib.SMTPDataError) as refused,
    ):
        client.send_message(msg)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 <nokey@example.com>: ")
    with Outbox(outbox_path) as box:
        assert len(box) == 0
    assert upstream.messages == []
    assert upstream.connections == 0


def test_every_refused_recipient_gets_its_own_line_in_a_multiline_reply() -> None:
    reply = _problem_reply(
        [
            KeyProblem("a@example.com", KeyReason.NOT_FOUND),
            KeyProblem("b@example.com\r\n250 OK", KeyReason.EXPIRED),
        ]
    )
    lines = reply.split("\r\n")
    assert len(lines) == 2
    assert lines[0].startswith("550-5.7.1 <a@example.com>: ")
    assert lines[1].startswith("550 5.7.1 <b@example.com 250 OK>: ")


# -- listening anywhere but loopback -----------------------------------------------------------


def test_listening_beyond_loopback_without_tls_and_auth_is_refused(
    sender_store: Keystore, outbox_path: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    mailer = AsyncMailer(
        smtp=upstream_settings(smtp_server()), keystore=sender_store, outbox=outbox_path
    )
    try:
        with pytest.raises(ConfigError, match=r"not loopback.*TLS.*AUTH"):
            Relay(mailer, host="0.0.0.0", port=0)
        tls = self_signed_certificate(tmp_path / "tls", "192.0.2.1").context()
        with pytest.raises(ConfigError, match="AUTH credentials"):
            Relay(mailer, host="0.0.0.0", port=0, tls_context=tls)
        with pytest.raises(ConfigError, match="TLS"):
            Relay(mailer, host="0.0.0.0", port=0, credentials={"u": "p"})
        # On loopback, credentials without TLS would be AUTH in clear: refused too.
        with pytest.raises(ConfigError, match="AUTH needs TLS"):
            Relay(mailer, host="127.0.0.1", port=0, credentials={"u": "p"})
    finally:
        mailer.close()


def test_auth_is_offered_only_after_starttls_and_required_before_mail(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    tmp_path: Path,
) -> None:
    upstream = smtp_server()
    files = self_signed_certificate(tmp_path / "tls", "127.0.0.1")
    relay = run_relay(upstream, tls_context=files.context(), credentials={"app": "s3cret-pass"})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, _ = client.mail("alice@example.org")
        assert code == 530  # STARTTLS first
        context = ssl.create_default_context(cafile=str(files.cert))
        client.starttls(context=context)
        client.ehlo()
        assert client.has_extn("auth")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("app", "wrong")
        client.login("app", "s3cret-pass")
        assert client.send_message(plain_message("hi", "over TLS\n")) == {}
    wait_for(lambda: len(upstream.messages) == 1, "the upstream delivery")
    # The fingerprint printed for pinning is the certificate's.
    assert len(files.fingerprint.split(":")) == 32


# -- other real clients ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_submits_through_the_relay_and_a_keyless_recipient_gets_5xx(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    upstream = smtp_server()
    relay = run_relay(upstream)
    base = ["swaks", "--server", "127.0.0.1", "--port", str(relay.port), "--from"]
    sent = subprocess.run(
        [
            *base,
            "alice@example.org",
            "--to",
            "bob@example.net",
            "--header",
            "Subject: from swaks",
            "--body",
            "swaks body line",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: len(upstream.messages) == 1, "the upstream delivery")
    plaintext = decrypt_as_bob(upstream.messages[0], keys, recipients_home, tmp_path)
    assert b"swaks body line" in plaintext
    assert b"swaks body line" not in upstream.messages[0].data

    refused = subprocess.run(
        [*base, "alice@example.org", "--to", "nokey@example.com"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "550 5.7.1 <nokey@example.com>" in refused.stdout
    assert len(upstream.messages) == 1


def test_logging_smtphandler_pointed_at_the_relay_sends_an_encrypted_record(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    upstream = smtp_server()
    relay = run_relay(upstream)
    handler = logging.handlers.SMTPHandler(
        ("127.0.0.1", relay.port),
        "alice@example.org",
        ["bob@example.net"],
        "app failure: db password hunter2",
    )
    logger = logging.getLogger("test_relay.smtphandler")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error("connection to db failed with password hunter2")
    finally:
        logger.removeHandler(handler)
        handler.close()
    wait_for(lambda: len(upstream.messages) == 1, "the upstream delivery")
    received = upstream.messages[0]
    assert b"hunter2" not in received.data
    plaintext = decrypt_as_bob(received, keys, recipients_home, tmp_path)
    assert b"connection to db failed with password hunter2" in plaintext
    assert b"app failure: db password hunter2" in plaintext


def test_a_message_the_upstream_server_defers_stays_in_the_outbox_for_the_next_start(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    outbox_path: Path,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """The client's 250 means stored: the upstream server says 421 to every attempt, the
    relay stops, and the protected copy waits in the outbox (ciphertext only); the next relay
    delivers exactly that copy."""
    # Two attempts (the relay's retry policy) get 421; the restarted relay, delivering to the
    # same upstream (host and port: only its own copies), finds it working.
    busy = smtp_server(faults=[Fault("mail", "reply", code=421, text="busy", times=2)])
    first = run_relay(busy)
    with smtplib.SMTP("127.0.0.1", first.port, timeout=60) as client:
        assert client.send_message(plain_message("kept", "wait for me 8086\n")) == {}
    wait_for(lambda: len(busy.faults_fired) >= 2, "the retries")
    first.stop()
    with Outbox(outbox_path) as box:
        (item,) = box.items()
        stored = box.get(item.id).raw
    assert stored is not None
    assert b"BEGIN PGP MESSAGE" in stored
    assert b"8086" not in stored
    assert busy.messages == []

    good = busy
    run_relay(good)
    wait_for(lambda: len(good.messages) == 1, "the delivery after the restart")
    assert good.messages[0].data == stored
    assert b"wait for me 8086" in decrypt_as_bob(good.messages[0], keys, recipients_home, tmp_path)
    with Outbox(outbox_path) as box:
        wait_for(lambda: len(box) == 0, "the outbox to empty")


def test_a_programs_own_mime_with_8bit_text_and_an_attachment_is_kept_and_bcc_gets_its_copy(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """The client's multipart/mixed (8-bit UTF-8 text, a binary attachment) is the protected
    payload as it was built; an envelope recipient not in To gets a copy of its own, and Bob's
    copy does not name them. EHLO announces SIZE and 8BITMIME, not SMTPUTF8."""
    upstream = smtp_server()
    relay = run_relay(upstream)
    msg = plain_message("report", "")
    msg.set_content("Grüße aus Köln: 8-bit text\n", cte="8bit")
    blob = bytes(range(256)) * 4
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="d.bin")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        assert client.has_extn("size")
        assert not client.has_extn("smtputf8")
        refused = client.send_message(msg, to_addrs=["bob@example.net", "carol@example.com"])
    assert refused == {}
    wait_for(lambda: len(upstream.messages) == 2, "both copies")
    by_rcpt = {m.rcpt_tos: m for m in upstream.messages}
    assert set(by_rcpt) == {("bob@example.net",), ("carol@example.com",)}
    to_bob = by_rcpt[("bob@example.net",)]
    assert b"carol" not in to_bob.data.lower()
    inner = BytesParser(policy=email_policy.default).parsebytes(
        decrypt_as_bob(to_bob, keys, recipients_home, tmp_path)
    )
    assert inner.get_content_type() == "multipart/mixed"
    text_part, attachment = list(inner.iter_parts())
    # Canonical CRLF line ends (RFC 3156 §5): the same text.
    assert text_part.get_content().replace("\r\n", "\n") == "Grüße aus Köln: 8-bit text\n"
    assert attachment.get_filename() == "d.bin"
    assert attachment.get_content() == blob
    _, (_, encrypted) = multipart_parts(by_rcpt[("carol@example.com",)].data)
    carol_plain, _ = gpg_decrypt(recipients_home, part_body(encrypted))
    assert b"d.bin" in carol_plain


def test_a_message_the_program_encrypted_itself_goes_upstream_as_it_is(
    run_relay: Callable[..., RelayThread],
    smtp_server: ServerFactory,
    sender_store: Keystore,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """Not wrapped again: the PGP/MIME message a program made (here: e2email itself, to Bob)
    passes through the relay byte for byte in its body."""
    upstream = smtp_server()
    relay = run_relay(upstream)
    own = asyncio.run(
        AsyncMailer(keystore=sender_store).protect(
            Message(
                sender="alice@example.org",
                to="bob@example.net",
                subject="pre-encrypted",
                text="already protected\n",
            )
        )
    )[0].raw
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        assert client.sendmail("alice@example.org", ["bob@example.net"], own) == {}
    wait_for(lambda: len(upstream.messages) == 1, "the upstream delivery")
    received = upstream.messages[0].data
    assert split_head(received)[1] == split_head(own)[1]
    assert b"already protected" in decrypt_as_bob(
        upstream.messages[0], keys, recipients_home, tmp_path
    )


def test_too_many_recipients_get_452_and_a_too_large_message_552_and_nothing_is_stored(
    run_relay: Callable[..., RelayThread], smtp_server: ServerFactory, outbox_path: Path
) -> None:
    upstream = smtp_server()
    relay = run_relay(upstream, max_recipients=2, max_message_size=4096)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "4096"
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("bob@example.net")[0] == 250
        assert client.rcpt("carol@example.com")[0] == 250
        code, text = client.rcpt("dave@example.com")
        assert (code, text) == (452, b"4.5.3 Too many recipients")
        client.rset()
        big = plain_message("big", "x" * 70 + "\n")
        big.set_content(("x" * 70 + "\n") * 100)
        with pytest.raises(smtplib.SMTPException) as refused:
            client.send_message(big)
        assert "552" in str(refused.value)
    with Outbox(outbox_path) as box:
        assert len(box) == 0
    assert upstream.messages == []


def test_header_recipients_without_keys_are_each_named_in_a_multiline_550_at_end_of_data(
    run_relay: Callable[..., RelayThread], smtp_server: ServerFactory, outbox_path: Path
) -> None:
    """The envelope names only Bob, but To also names two addresses without keys: the
    message would show them, so it must be encrypted to them too; it cannot, so the end of
    DATA gets one 550 5.7.1 line per address, and nothing is stored or sent."""
    upstream = smtp_server()
    relay = run_relay(upstream)
    msg = plain_message("hi", "text\n", to="bob@example.net, x@example.com, y@example.com")
    with (
        smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client,
        pytest.raises(smtplib.SMTPDataError) as refused,
    ):
        client.send_message(msg, to_addrs=["bob@example.net"])
    assert refused.value.smtp_code == 550
    lines = refused.value.smtp_error.split(b"\n")
    assert len(lines) == 2
    assert lines[0].startswith(b"5.7.1 <x@example.com>: no key found")
    assert lines[1].startswith(b"5.7.1 <y@example.com>: no key found")
    with Outbox(outbox_path) as box:
        assert len(box) == 0
    assert upstream.messages == []
    assert upstream.connections == 0


def test_an_upstream_server_whose_certificate_does_not_verify_gets_nothing(
    run_relay: Callable[..., RelayThread],
    sender_store: Keystore,
    smtp_server: ServerFactory,
    outbox_path: Path,
) -> None:
    """Upstream TLS is e2email's: a certificate from an unknown CA stops delivery (no
    fallback, nothing in clear); the accepted message waits in the outbox."""
    other_ca = TestCA()
    try:
        impostor = smtp_server(ca=other_ca)
        # The relay trusts the module's CA, not the impostor's.
        trusted = smtp_server()
        settings = dataclasses.replace(upstream_settings(impostor), ca_file=trusted.ca_file)
        mailer = AsyncMailer(smtp=settings, keystore=sender_store, outbox=outbox_path)
        relay = RelayThread(lambda: Relay(mailer, host="127.0.0.1", port=0)).start()
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
                assert client.send_message(plain_message("tls", "never in clear 5150\n")) == {}
            wait_for(lambda: bool(impostor.errors) or impostor.connections > 0, "an attempt")
        finally:
            relay.stop()
            mailer.close()
        assert impostor.messages == []
        assert b"5150" not in b"".join(data for _, data in impostor.transcript)
        with Outbox(outbox_path) as box:
            assert len(box) == 1
    finally:
        other_ca.cleanup()


def _plant(box: Outbox, tag: str, *, route: str | None, account: str | None, meta: Any) -> str:
    """An item another program stored in the same outbox (not protected: it must never go)."""
    (item_id,) = box.add(
        [
            NewItem(
                raw=f"Subject: {tag}\r\n\r\nnot for this relay\r\n".encode(),
                mail_from="alice@example.org",
                recipients=("bob@example.net",),
                message_id=f"<{tag}@example.org>",
                meta=meta,
            )
        ],
        route=route,
        claim=False,
        account=account,
    )
    return item_id


@pytest.mark.parametrize("account", [None, "work"])
def test_the_relay_delivers_only_its_own_copies_from_a_shared_outbox(
    sender_store: Keystore,
    smtp_server: ServerFactory,
    outbox_path: Path,
    account: str | None,
) -> None:
    """Copies other programs queued in the same outbox (another account, another port of
    the same host, no account, or stored by `e2email send` without a port) stay there for
    their own server: the relay delivers only what was stored for it."""
    upstream = smtp_server()
    with Outbox(outbox_path) as box:
        planted = [
            _plant(box, "other-account", route="127.0.0.1", account="other", meta={}),
            _plant(box, "other-port", route="127.0.0.1", account=None, meta={"port": 1}),
            _plant(box, "no-port", route="127.0.0.1", account=None, meta={}),
            _plant(box, "no-route", route=None, account=None, meta={"port": upstream.port}),
        ]
        if account is not None:  # the relay's own upstream, but stored without its account
            planted.append(
                _plant(box, "mine", route="127.0.0.1", account=None, meta={"port": upstream.port})
            )
    mailer = AsyncMailer(
        smtp=upstream_settings(upstream),
        keystore=sender_store,
        protection=Protection(),
        outbox=outbox_path,
        retry=RetryPolicy(max_attempts=1),
    )
    assert mailer.outbox is not None
    mailer.outbox.account = account
    relay = RelayThread(lambda: Relay(mailer, host="127.0.0.1", port=0)).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
            assert client.send_message(plain_message("ours", "from the relay\n")) == {}
        wait_for(lambda: len(upstream.messages) == 1, "the relay's own message")
    finally:
        relay.stop()
        mailer.close()
    assert len(upstream.messages) == 1
    assert b"not for this relay" not in upstream.messages[0].data
    with Outbox(outbox_path) as box:
        assert sorted(i.id for i in box.items()) == sorted(planted)
