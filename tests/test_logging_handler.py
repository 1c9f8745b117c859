"""`e2email.logging.EncryptedSMTPHandler`: log records as protected mail, off the calling
thread, never dropped (real gpg keys, a real TLS server; decrypted with gpg and sqop)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import logging.config
import logging.handlers
import pkgutil
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import kill_agent, new_gnupg_home
from test_relay import decrypt_as_bob, upstream_settings

import e2email
from e2email.client import AsyncMailer
from e2email.config import RetryPolicy
from e2email.errors import ConfigError
from e2email.keystore import Keystore
from e2email.logging import EncryptedSMTPHandler
from e2email.outbox import Outbox
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


@pytest.fixture
def log_home(keys: Keys) -> Iterator[Path]:
    """An e2email home with Alice's secret key and Bob's certificate."""
    path = new_gnupg_home("e2l")
    store = Keystore(path)
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.bob.cert)
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def attach() -> Iterator[Callable[[logging.Handler], logging.Logger]]:
    """A fresh logger with the handler on it; the handler is closed after the test."""
    made: list[tuple[logging.Logger, logging.Handler]] = []

    def make(handler: logging.Handler) -> logging.Logger:
        logger = logging.getLogger(f"test_logging_handler.{len(made)}.{id(handler)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        made.append((logger, handler))
        return logger

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()


def handler_for(server: LoopbackSMTPServer, home: Path, **kwargs: Any) -> EncryptedSMTPHandler:
    assert server.ca_file is not None
    return EncryptedSMTPHandler(
        (server.host, server.port),
        "alice@example.org",
        ["bob@example.net"],
        kwargs.pop("subject", "app error"),
        tls="implicit",
        ca_file=server.ca_file,
        home=home,
        **kwargs,
    )


def test_a_record_arrives_encrypted_with_its_subject_and_traceback_hidden(
    log_home: Path,
    smtp_server: ServerFactory,
    attach: Callable[[logging.Handler], logging.Logger],
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    upstream = smtp_server()
    handler = handler_for(upstream, log_home, subject="payment failed for card 4111-1111")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = attach(handler)
    try:
        raise RuntimeError("token sk_live_abc123 rejected")
    except RuntimeError:
        logger.exception("charging customer 42 failed")
    handler.flush()
    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    for secret in (b"4111-1111", b"sk_live_abc123", b"customer 42"):
        assert secret not in received.data
    plaintext = decrypt_as_bob(received, keys, recipients_home, tmp_path)
    assert b"payment failed for card 4111-1111" in plaintext  # the hidden Subject
    assert b"ERROR charging customer 42 failed" in plaintext
    assert b"RuntimeError: token sk_live_abc123 rejected" in plaintext


def test_emit_returns_while_the_worker_is_still_waiting_to_send(
    log_home: Path,
    smtp_server: ServerFactory,
    attach: Callable[[logging.Handler], logging.Logger],
) -> None:
    """The SMTP password comes from a source that answers only when the test says so: the
    worker waits there, and logging returns all the same; the records reach the server only
    after that, and flush() waits for them."""
    upstream = smtp_server(credentials={"app": "pw"})
    gate = threading.Event()

    def password() -> str:
        assert gate.wait(60)
        return "pw"

    settings = dataclasses.replace(upstream_settings(upstream), username="app", password=password)
    handler = EncryptedSMTPHandler(
        None,
        "alice@example.org",
        ["bob@example.net"],
        "s",
        mailer=AsyncMailer(
            smtp=settings, keystore=Keystore(log_home), outbox=Outbox.in_home(log_home)
        ),
    )
    logger = attach(handler)
    logger.error("first")
    logger.error("second")
    assert upstream.messages == []  # a blocking handler would still be in the first call
    gate.set()
    handler.flush()
    assert len(upstream.messages) == 2


def test_a_record_that_cannot_be_protected_is_kept_and_reported_once_not_raised(
    log_home: Path,
    smtp_server: ServerFactory,
    attach: Callable[[logging.Handler], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    upstream = smtp_server()
    assert upstream.ca_file is not None
    handler = EncryptedSMTPHandler(
        (upstream.host, upstream.port),
        "alice@example.org",
        "nokey@example.com",
        "secret subject",
        tls="implicit",
        ca_file=upstream.ca_file,
        home=log_home,
    )
    logger = attach(handler)
    logger.error("record one: password hunter2")
    logger.error("record two")
    handler.flush()
    assert upstream.messages == []
    assert upstream.connections == 0
    drafts = sorted((log_home / "drafts").iterdir())
    assert len(drafts) == 2
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in drafts)
    texts = [p.read_text() for p in drafts]
    assert any("record one: password hunter2" in t for t in texts)
    err = capfd.readouterr().err
    reports = [line for line in err.splitlines() if line.startswith("e2email.logging:")]
    assert len(reports) == 1, err
    assert "nokey@example.com" in reports[0]
    assert "hunter2" not in err  # the report does not repeat the record


def test_a_record_the_server_cannot_take_waits_in_the_outbox_and_goes_with_the_next(
    log_home: Path,
    smtp_server: ServerFactory,
    attach: Callable[[logging.Handler], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """421 for the first record: it is kept protected in the outbox (no plaintext there) and
    reported once; the next record finds the server working and takes the first along."""
    busy = smtp_server(faults=[Fault("mail", "reply", code=421, text="busy", times=1)])
    mailer = AsyncMailer(
        smtp=upstream_settings(busy),
        keystore=Keystore(log_home),
        outbox=Outbox.in_home(log_home),
        retry=RetryPolicy(max_attempts=1),
    )
    handler = EncryptedSMTPHandler(
        None,
        "alice@example.org",
        ["bob@example.net"],
        "subject",
        mailer=mailer,
        retry_interval=0,
    )
    logger = attach(handler)
    logger.error("first record 1234")
    handler.flush()
    assert busy.messages == []
    assert mailer.outbox is not None
    (item,) = mailer.outbox.items()
    stored = mailer.outbox.get(item.id).raw
    assert stored is not None
    assert b"BEGIN PGP MESSAGE" in stored
    assert b"1234" not in stored
    assert "e2email.logging:" in capfd.readouterr().err
    logger.error("second record")
    handler.flush()
    assert len(busy.messages) == 2
    assert stored in [m.data for m in busy.messages]
    assert len(mailer.outbox) == 0


def test_close_waits_for_the_queue(
    log_home: Path,
    smtp_server: ServerFactory,
) -> None:
    upstream = smtp_server()
    handler = handler_for(upstream, log_home)
    logger = logging.getLogger("test_logging_handler.close")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for n in range(3):
            logger.warning("record %d", n)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert len(upstream.messages) == 3


def test_records_e2email_logs_while_sending_are_not_sent_again(
    log_home: Path,
    smtp_server: ServerFactory,
) -> None:
    """On e2email's own logger at DEBUG too, the handler sees the records e2email logs while
    it sends (a retry after 421): sending those would send more and loop. One record in, one
    message out."""
    busy = smtp_server(faults=[Fault("mail", "reply", code=421, text="busy", times=1)])
    handler = handler_for(busy, log_home)
    loggers = [logging.getLogger("e2email.delivery"), logging.getLogger("app")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    try:
        logging.getLogger("app").error("the one record")
        handler.flush()
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
    assert len(busy.faults_fired) == 1  # e2email retried (and logged that at DEBUG) ...
    assert len(busy.messages) == 1  # ... and only the application's record was sent


def test_it_is_a_drop_in_for_smtphandler_in_dictconfig(
    log_home: Path, smtp_server: ServerFactory
) -> None:
    """The same arguments as SMTPHandler (credentials -> AUTH after TLS), from dictConfig."""
    upstream = smtp_server(credentials={"app": "app-password"})
    assert upstream.ca_file is not None
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mail": {
                    "class": "e2email.logging.EncryptedSMTPHandler",
                    "level": "ERROR",
                    "mailhost": [upstream.host, upstream.port],
                    "fromaddr": "alice@example.org",
                    "toaddrs": ["bob@example.net"],
                    "subject": "alert",
                    "credentials": ["app", "app-password"],
                    "secure": [],
                    "tls": "implicit",
                    "ca_file": str(upstream.ca_file),
                    "home": str(log_home),
                }
            },
            "loggers": {"dictconfig_app": {"handlers": ["mail"], "propagate": False}},
        }
    )
    logger = logging.getLogger("dictconfig_app")
    (handler,) = logger.handlers
    try:
        logger.warning("below the level: not sent")
        logger.error("sent")
        handler.flush()
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert [m.auth_user for m in upstream.messages] == ["app"]


def test_bad_settings_are_refused_when_the_handler_is_made(log_home: Path) -> None:
    with pytest.raises(ConfigError, match="one of mailhost"):
        EncryptedSMTPHandler(None, "alice@example.org", ["bob@example.net"], "s")
    with pytest.raises(ConfigError, match="client certificates"):
        EncryptedSMTPHandler(
            "mail.example.org", "alice@example.org", "bob@example.net", "s", None, ("k", "c")
        )
    with pytest.raises(ConfigError, match="tls must be"):
        EncryptedSMTPHandler(
            "mail.example.org", "alice@example.org", "bob@example.net", "s", tls="none"
        )
    with pytest.raises(ConfigError, match="outbox"):
        EncryptedSMTPHandler(
            None, "alice@example.org", "bob@example.net", "s", mailer=AsyncMailer()
        )


def test_e2email_logging_does_not_shadow_the_standard_library() -> None:
    """Every e2email module that imports ``logging`` gets the standard library's, also after
    e2email.logging is imported (in this process and in a fresh one)."""
    stdlib = logging
    for info in pkgutil.walk_packages(e2email.__path__, "e2email."):
        if info.name == "e2email.__main__":
            continue  # runs the CLI
        module = importlib.import_module(info.name)
        if "logging" in vars(module) and info.name != "e2email":
            assert vars(module)["logging"] is stdlib, info.name
    assert importlib.import_module("e2email.logging")._logging is stdlib
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import e2email.logging, e2email.relay, e2email.delivery, logging, logging.handlers;"
            "assert e2email.delivery.logging is logging;"
            "assert e2email.relay.logging is logging;"
            "assert logging.handlers.SMTPHandler;"
            "assert not logging.__file__.startswith(e2email.logging.__file__.rsplit('/', 1)[0])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


_EXIT_WITHOUT_SHUTDOWN = """
import logging, sys
from e2email.config import OpenPGPEngine, Protection
from e2email.logging import EncryptedSMTPHandler

host, port, ca_file, home, engine = sys.argv[1:]
handler = EncryptedSMTPHandler(
    (host, int(port)), "alice@example.org", ["bob@example.net"], "at exit",
    tls="implicit", ca_file=ca_file, home=home,
    protection=Protection(engine=OpenPGPEngine(engine)),
)
logger = logging.getLogger("app")
logger.addHandler(handler)
logger.error("first record")
logger.error("second record")
# No handler.close(), no logging.shutdown(): the atexit hook must still send both.
"""


def test_records_queued_at_exit_are_sent_without_an_explicit_shutdown(
    log_home: Path,
    smtp_server: ServerFactory,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
    openpgp_engine: Any,
) -> None:
    """logging's atexit hook runs after the interpreter stopped thread pools: the worker must
    still protect and send what is queued (it used to keep it as a plaintext draft)."""
    upstream = smtp_server()
    assert upstream.ca_file is not None
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _EXIT_WITHOUT_SHUTDOWN,
            upstream.host,
            str(upstream.port),
            str(upstream.ca_file),
            str(log_home),
            openpgp_engine.value,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not (log_home / "drafts").exists() or not any((log_home / "drafts").iterdir())
    texts = []
    for n, received in enumerate(upstream.messages):
        (tmp_path / str(n)).mkdir()
        texts.append(decrypt_as_bob(received, keys, recipients_home, tmp_path / str(n)))
    assert len(texts) == 2
    assert [b"first record" in t for t in texts].count(True) == 1
    assert [b"second record" in t for t in texts].count(True) == 1
    for received in upstream.messages:
        assert b"record" not in received.data


class _CannotMarkDelivered(Outbox):
    """An outbox that cannot record an acceptance (as a thread pool refusing work at exit
    made it fail): the server has the message, the outbox does not know it."""

    broken = True

    def settle(self, item_id: str, **kwargs: Any) -> bool:
        if self.broken and kwargs.get("delivered"):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return super().settle(item_id, **kwargs)


def test_a_record_delivered_but_not_marked_is_neither_a_draft_nor_sent_again(
    log_home: Path,
    smtp_server: ServerFactory,
    attach: Callable[[logging.Handler], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A failure after the protected copy is in the outbox leaves it there (the outbox's
    "maybe delivered" rule keeps it from going twice) and writes no plaintext draft."""
    upstream = smtp_server()
    outbox = _CannotMarkDelivered.in_home(log_home)
    assert isinstance(outbox, _CannotMarkDelivered)
    mailer = AsyncMailer(
        smtp=upstream_settings(upstream),
        keystore=Keystore(log_home),
        outbox=outbox,
        retry=RetryPolicy(max_attempts=1),
    )
    handler = EncryptedSMTPHandler(
        None, "alice@example.org", ["bob@example.net"], "subject", mailer=mailer
    )
    logger = attach(handler)
    logger.error("first record")
    handler.flush()
    assert len(upstream.messages) == 1
    assert not (log_home / "drafts").exists()
    assert len(outbox) == 1  # kept, protected: `outbox retry --maybe-delivered` decides
    assert "e2email.logging:" in capfd.readouterr().err
    outbox.broken = False
    logger.error("second record")
    handler.flush()
    assert len(upstream.messages) == 2  # the second; the first is not sent again
    assert not (log_home / "drafts").exists()
