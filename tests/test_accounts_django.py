"""The Django backend with `E2EMAIL = {"account": NAME, "config": FILE}`: the server, policy,
keystore and outbox come from the accounts file (e2email.accounts)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Configures Django for the session (as the backend's own tests do).
test_django = pytest.importorskip("test_django")

from django.core import mail  # noqa: E402

from e2email.keystore import Keystore  # noqa: E402
from e2email.outbox import Outbox  # noqa: E402
from e2email.testing import LoopbackSMTPServer  # noqa: E402


def test_django_sends_through_an_account(
    tmp_path: Path,
    smtp_server: test_django.ServerFactory,
    sender_store: Keystore,
    recipients_home: Path,
) -> None:
    server: LoopbackSMTPServer = smtp_server(tls="implicit")
    assert server.ca_file is not None
    outbox = tmp_path / "outbox.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[accounts.work]\n"
        f'host = "{server.host}"\nport = {server.port}\ntls = "implicit"\n'
        f'ca-file = "{server.ca_file}"\nhome = "{sender_store.home}"\noutbox = "{outbox}"\n'
        "retries = 0\n",
        encoding="utf-8",
    )
    cfg.chmod(0o600)
    with test_django._configured(E2EMAIL={"account": "work", "config": str(cfg)}):
        assert mail.send_mail("Hi", "through the account\n", None, ["bob@example.net"]) == 1
    (received,) = server.messages
    assert b"through the account" not in received.data
    assert test_django._decrypt(received.data, recipients_home)["Subject"] == "Hi"
    assert outbox.exists()  # the account's outbox, not HOME's
    with Outbox(outbox) as box:
        assert len(box) == 0  # stored there, then delivered
