"""Accounts from the command line, as a user runs it: a real accounts file (0600), real
processes, real keys and real TLS SMTP servers (trustme CA given as the account's ca-file)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, kill_agent, multipart_parts, new_gnupg_home, part_body

from e2email.outbox import Outbox
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


def e2email(
    *args: str, home: Path, xdg: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    outer = {k: v for k, v in os.environ.items() if k != "E2EMAIL_CONFIG"}
    full_env = {
        **outer,
        "E2EMAIL_HOME": str(home),
        # Never the user's own config file: an empty XDG config folder of the test's.
        "XDG_CONFIG_HOME": str(xdg),
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        input=b"",
        capture_output=True,
        env=full_env,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


@pytest.fixture(scope="module")
def home(keys: Keys) -> Iterator[Path]:
    """An e2email home with Alice's secret key and Bob's certificate."""
    path = new_gnupg_home("e2x")
    assert keys.alice.secret
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2email",
            "keys",
            "import",
            str(keys.alice.secret),
            str(keys.bob.cert),
        ],
        env={**os.environ, "E2EMAIL_HOME": str(path)},
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


def account(name: str, server: LoopbackSMTPServer, *extra: str) -> str:
    assert server.ca_file is not None
    lines = [
        f"[accounts.{name}]",
        f'host = "{server.host}"',
        f"port = {server.port}",
        'tls = "implicit"',
        f'ca-file = "{server.ca_file}"',
        *extra,
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def decrypted(recipients_home: Path, raw: bytes) -> bytes:
    _, (_, encrypted) = multipart_parts(raw)
    plain, _ = gpg_decrypt(recipients_home, part_body(encrypted))
    return plain


MESSAGE = ["--to", "bob@example.net", "--subject", "s"]


def test_send_account_delivers_a_protected_message(
    tmp_path: Path, home: Path, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """`send --account work` takes the server, the TLS trust (ca-file), the sender and the
    policy from the account: no server option on the command line."""
    work = smtp_server(tls="implicit")
    other = smtp_server(tls="implicit")
    cfg = write(
        tmp_path / "config.toml",
        'default = "other"\n'
        + account("other", other, 'from = "alice@example.org"')
        + account("work", work, 'from = "alice@example.org"', "encrypt-to-self = false"),
    )
    done = e2email(
        "send",
        "--account",
        "work",
        "--config",
        str(cfg),
        *MESSAGE,
        "--body",
        "via-work",
        home=home,
        xdg=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert other.messages == []
    (received,) = work.messages
    assert received.mail_from == "alice@example.org"
    assert b"via-work" not in received.data
    assert b"via-work" in decrypted(recipients_home, received.data)
    # The group's --config works the same, and E2EMAIL_CONFIG too.
    done = e2email(
        "--config",
        str(cfg),
        "send",
        "--account",
        "work",
        *MESSAGE,
        "--body",
        "x",
        home=home,
        xdg=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = e2email(
        "send",
        *MESSAGE,
        "--body",
        "to-default",
        home=home,
        xdg=tmp_path,
        env={"E2EMAIL_CONFIG": str(cfg)},
    )
    assert done.returncode == 0, done.stderr
    assert len(other.messages) == 1 and len(work.messages) == 2


def test_from_picks_the_account_whose_from_matches(
    tmp_path: Path, home: Path, smtp_server: ServerFactory
) -> None:
    """-f ADDRESS with no --account: the account whose `from` (or pattern, or the address
    without its +detail) matches; the default otherwise (msmtp's rule). The default config
    file ($XDG_CONFIG_HOME/e2email/config.toml) is used without naming it."""
    personal = smtp_server(tls="implicit")
    lists = smtp_server(tls="implicit")
    (tmp_path / "e2email").mkdir()
    write(
        tmp_path / "e2email" / "config.toml",
        account("personal", personal, 'from = "alice@example.org"', "default = true")
        + account(
            "lists", lists, 'from-patterns = ["*@lists.example.org"]', "encrypt-to-self = false"
        ),
    )
    done = e2email(
        "send",
        "-f",
        "Alice <alice@lists.example.org>",
        *MESSAGE,
        "--body",
        "b",
        "--no-sign",
        home=home,
        xdg=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert len(lists.messages) == 1 and personal.messages == []
    assert lists.messages[0].mail_from == "alice@lists.example.org"
    done = e2email(
        "send",
        "-f",
        "alice+git@example.org",
        *MESSAGE,
        "--body",
        "b",
        "--no-sign",
        "--no-encrypt-to-self",
        home=home,
        xdg=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert len(personal.messages) == 1


def test_command_line_options_override_the_account(
    tmp_path: Path, home: Path, smtp_server: ServerFactory
) -> None:
    """An option given on the command line wins over the account's value: here the account's
    port is wrong (nothing listens there) and --port gives the right one."""
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    closed = LoopbackSMTPServer(tls="implicit").start()
    dead_port = closed.port
    closed.stop()
    cfg = write(
        tmp_path / "c.toml",
        "[accounts.w]\n"
        f'host = "{server.host}"\nport = {dead_port}\ntls = "implicit"\n'
        f'ca-file = "{server.ca_file}"\nfrom = "alice@example.org"\nconnect-timeout = 5\n',
    )
    done = e2email(
        "send",
        "--config",
        str(cfg),
        "--port",
        str(server.port),
        *MESSAGE,
        "--body",
        "b",
        "--retries",
        "0",
        home=home,
        xdg=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert len(server.messages) == 1


def test_outbox_retry_needs_no_server_options(
    tmp_path: Path, home: Path, smtp_server: ServerFactory
) -> None:
    """A message kept after a temporary failure remembers its account; `outbox retry` with
    no server options delivers it through that account. An item whose account is gone from
    the file is reported and left (exit 2)."""
    box_home = tmp_path / "home"
    shutil.copytree(home, box_home, ignore=shutil.ignore_patterns("S.*"))
    try:
        _retry_through_the_account(tmp_path, box_home, smtp_server)
    finally:
        kill_agent(box_home / "gnupg")


def _retry_through_the_account(tmp_path: Path, box_home: Path, smtp_server: ServerFactory) -> None:
    server = smtp_server(tls="implicit", faults=[Fault("mail", "reply", 451, "4.3.2 busy")])
    cfg = write(tmp_path / "config.toml", account("work", server, 'from = "alice@example.org"'))
    env = {"E2EMAIL_CONFIG": str(cfg)}
    done = e2email(
        "send",
        "--account",
        "work",
        *MESSAGE,
        "--body",
        "b",
        "--retries",
        "0",
        home=box_home,
        xdg=tmp_path,
        env=env,
    )
    assert done.returncode == 6, done.stderr  # 451: refused for now, kept
    assert "kept in the outbox" in done.stderr
    with Outbox.in_home(box_home) as box:
        (item,) = box.items()
    assert item.account == "work"
    assert server.messages == []
    listed = e2email("outbox", "list", "--json", home=box_home, xdg=tmp_path)
    assert '"account": "work"' in listed.stdout
    listed = e2email("outbox", "list", home=box_home, xdg=tmp_path)
    assert "(account work)" in listed.stdout
    done = e2email("outbox", "retry", "--now", home=box_home, xdg=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"{item.id}: delivered" in done.stdout
    assert len(server.messages) == 1
    # The account is renamed in the file: the item stored for the old name stays.
    with Outbox.in_home(box_home) as box:
        box.add([_new_item()], account="old-name", claim=False)
    done = e2email("outbox", "retry", "--now", home=box_home, xdg=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert "account 'old-name', which is no longer in" in done.stderr
    with Outbox.in_home(box_home) as box:
        assert len(box) == 1


def _new_item():  # type: ignore[no-untyped-def]
    from e2email.outbox import NewItem

    return NewItem(
        raw=b"Subject: x\r\n\r\nx\r\n",
        mail_from="alice@example.org",
        recipients=("bob@example.net",),
        message_id="<x@example.org>",
    )


MISTAKES = """\
default = "nosuch"
colour = "blue"

[defaults]
encrpyt = true

[accounts.a]
host = "a.example"
port = 70000

[accounts.b]
port = 587

[accounts.c]
host = "c.example"
user = "c"
password-env = "PW"
password-command = "pass c"
from = "not an address"

[accounts.d]
host = "d.example"
sign = "yes"

[accounts.e]
host = "e.example"
tls = "sometimes"
"""


def test_config_check_names_every_mistake_with_file_and_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", MISTAKES)
    done = e2email("config", "check", "--config", str(cfg), home=tmp_path, xdg=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    expected = [
        (2, "colour: unknown key"),
        (5, "encrpyt: unknown key (did you mean encrypt?)"),
        (9, "port: port 70000 is out of range"),
        (11, "host: missing: every account needs a host"),
        (18, "password-command: the password given two ways"),
        (19, "from: 'not an address' is not an email address"),
        (23, "sign: must be true or false, not a string"),
        (27, "tls: must be one of implicit, starttls, not 'sometimes'"),
        (1, "default: no account named 'nosuch'"),
    ]
    for line, text in expected:
        assert any(ln.startswith(f"{cfg}:{line}: {text}") for ln in lines), (line, text, lines)
    assert len(lines) == len(expected)
    assert done.stderr.strip() == f"e2email: error: 9 mistakes in {cfg}"
    # A syntax error: its line, one line.
    broken = write(tmp_path / "broken.toml", '[accounts.a]\nhost = "a.example"\nport = \n')
    done = e2email("config", "check", "--config", str(broken), home=tmp_path, xdg=tmp_path)
    assert done.returncode == 2
    assert re.fullmatch(rf"{re.escape(str(broken))}:3: invalid TOML: .+\n", done.stdout)
    # And a right file says so.
    good = write(tmp_path / "good.toml", '[accounts.a]\nhost = "a.example"\n')
    done = e2email("config", "check", "--config", str(good), home=tmp_path, xdg=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "ok (1 account(s): a; default: a)" in done.stdout
    # A command using the broken file: the same lines on stderr, exit 2.
    done = e2email(
        "send",
        "--config",
        str(cfg),
        *MESSAGE,
        "--from",
        "a@example.org",
        "--body",
        "b",
        home=tmp_path,
        xdg=tmp_path,
    )
    assert done.returncode == 2
    assert f"e2email: error: {cfg}:9: port: port 70000 is out of range" in done.stderr


def test_config_show_masks_a_literal_password(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.toml",
        "[defaults]\nencrypt-to-self = false\n"
        '[accounts.w]\nhost = "smtp.example.org"\nuser = "alice"\npassword = "hunter2"\n'
        '[accounts.v]\nhost = "smtp.example.net"\nuser = "bob"\n'
        'password-command = "pass show smtp"\n',
    )
    done = e2email("config", "show", "--config", str(cfg), home=tmp_path, xdg=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    assert "password = ********" in done.stdout
    assert 'password-command = "pass show smtp"' in done.stdout  # a command is not a secret
    assert done.stdout.count("encrypt-to-self = false") == 2  # inherited from [defaults]
    one = e2email(
        "config", "show", "--account", "v", "--config", str(cfg), home=tmp_path, xdg=tmp_path
    )
    assert "[accounts.v]" in one.stdout and "[accounts.w]" not in one.stdout


def test_a_readable_file_with_a_literal_password_is_refused(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.toml",
        '[accounts.w]\nhost = "smtp.example.org"\nuser = "alice"\npassword = "hunter2"\n',
        0o644,
    )
    for args in (
        ["config", "check", "--config", str(cfg)],
        [
            "send",
            "--config",
            str(cfg),
            "--account",
            "w",
            *MESSAGE,
            "--from",
            "a@example.org",
            "--body",
            "b",
        ],
    ):
        done = e2email(*args, home=tmp_path, xdg=tmp_path)
        assert done.returncode == 2, done.stderr
        out = done.stdout + done.stderr
        assert f"{cfg}:4: password: a password in a file readable by group or others" in out
        assert f"chmod 600 {cfg}" in out
        assert "hunter2" not in out


def test_doctor_checks_the_accounts_server_with_its_ca_file(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """`doctor --account NAME` probes the account's host and trusts its ca-file: without
    that CA the test server's certificate would not verify (exit 4)."""
    server = smtp_server(tls="implicit")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    cfg = write(tmp_path / "c.toml", account("w", server))
    ports = [f"--port-map={p}={dead}" for p in (25, 587, 2525)]
    args = ["doctor", "--config", str(cfg), "--timeout", "2", *ports]
    done = e2email(
        *args, "--account", "w", f"--port-map=465={server.port}", home=tmp_path, xdg=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Use port 465" in done.stdout
    # The only account is the default one: no HOST and no --account needed.
    done = e2email(*args, f"--port-map=465={server.port}", home=tmp_path, xdg=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_to_file_batch_goes_through_the_account_and_records_it(
    tmp_path: Path, home: Path, smtp_server: ServerFactory
) -> None:
    """`send --to-file` with an account: the account's server and sender; the copies it
    keeps after a temporary refusal remember the account, and `outbox retry --account NAME`
    sends them through it."""
    box_home = tmp_path / "home"
    shutil.copytree(home, box_home, ignore=shutil.ignore_patterns("S.*"))
    server = smtp_server(
        tls="implicit",
        faults=[Fault("rcpt", "reply", 451, "4.3.2 later", address="bob@example.net")],
    )
    cfg = write(
        tmp_path / "config.toml",
        account("w", server, 'from = "alice@example.org"', "encrypt-to-self = false"),
    )
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name\nbob@example.net,Bob\n", encoding="utf-8")
    try:
        done = e2email(
            "send",
            "--config",
            str(cfg),
            "--account",
            "w",
            "--to-file",
            str(rows),
            "--subject",
            "s",
            "--body",
            "hi $name",
            "--retries",
            "0",
            home=box_home,
            xdg=tmp_path,
        )
        assert done.returncode != 0, done.stdout
        with Outbox.in_home(box_home) as box:
            (item,) = box.items()
        assert item.account == "w" and item.mail_from == "alice@example.org"
        done = e2email(
            "outbox",
            "retry",
            "--now",
            "--account",
            "w",
            "--config",
            str(cfg),
            home=box_home,
            xdg=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert len(server.messages) == 1
        assert server.messages[0].rcpt_tos == ("bob@example.net",)
    finally:
        kill_agent(box_home / "gnupg")


def test_account_credentials_log_in_over_tls(
    tmp_path: Path, home: Path, smtp_server: ServerFactory
) -> None:
    """The account's user and password source (a variable here, a literal password in a
    0600 file there) authenticate over the verified TLS connection."""
    server = smtp_server(tls="implicit", credentials={"alice": "s3cret"})
    cfg = write(
        tmp_path / "c.toml",
        account(
            "env",
            server,
            'from = "alice@example.org"',
            'user = "alice"',
            'password-env = "E2E_ACCOUNT_PW"',
        )
        + account(
            "literal", server, 'from = "alice@example.org"', 'user = "alice"', 'password = "s3cret"'
        ),
    )
    for name, env in (
        ("env", {"E2EMAIL_CONFIG": str(cfg), "E2E_ACCOUNT_PW": "s3cret"}),
        ("literal", {"E2EMAIL_CONFIG": str(cfg)}),
    ):
        done = e2email(
            "send",
            "--account",
            name,
            *MESSAGE,
            "--body",
            "b",
            "--no-sign",
            "--no-encrypt-to-self",
            home=home,
            xdg=tmp_path,
            env=env,
        )
        assert done.returncode == 0, (name, done.stderr)
    assert [m.auth_user for m in server.messages] == ["alice", "alice"]
    # A wrong password from the account: refused by the server, exit 5.
    done = e2email(
        "send",
        "--account",
        "env",
        *MESSAGE,
        "--body",
        "b",
        "--no-sign",
        "--no-encrypt-to-self",
        "--retries",
        "0",
        home=home,
        xdg=tmp_path,
        env={"E2EMAIL_CONFIG": str(cfg), "E2E_ACCOUNT_PW": "wrong"},
    )
    assert done.returncode == 5, done.stderr
    # Leave the module's home as it was: the refused message is kept in its outbox.
    with Outbox.in_home(home) as box:
        for item in box.items():
            box.drop(item.id)
