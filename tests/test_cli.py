"""The command line as a user runs it: a real process, real keys, a real TLS SMTP server.

Errors must be one line on stderr (no traceback) with the documented exit status.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, kill_agent, multipart_parts, new_gnupg_home, part_body

from e2email.testing import LoopbackSMTPServer, TestCA

ServerFactory = Callable[..., LoopbackSMTPServer]


def e2email(
    *args: str, home: Path, input: bytes | None = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "E2EMAIL_HOME": str(home), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        input=input,
        capture_output=True,
        env=full_env,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error output is exactly one line starting with 'e2email: error:'."""
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("e2email: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def home(keys: Keys) -> Iterator[Path]:
    """An e2email home with Alice's secret key and the recipients' certificates, imported
    through the CLI itself."""
    path = new_gnupg_home("e2c")
    assert keys.alice.secret
    files = [keys.alice.secret, keys.bob.cert, keys.carol.cert, keys.dave.cert, keys.expired.cert]
    done = e2email("keys", "import", *map(str, files), home=path)
    assert done.returncode == 0, done.stderr
    assert keys.alice.fingerprint in done.stdout
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


def send_args(server: LoopbackSMTPServer, *extra: str) -> list[str]:
    assert server.ca_file is not None
    return [
        "send",
        "--from",
        "Alice Demo <alice@example.org>",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--tls",
        "implicit",
        "--ca-file",
        str(server.ca_file),
        *extra,
    ]


# -- keys ------------------------------------------------------------------------------------


def test_keys_list_shows_address_fingerprint_algorithm_expiry_and_status(
    home: Path, keys: Keys
) -> None:
    """`keys list` names each key's address, fingerprint, algorithm, expiry and whether it is
    usable, or why not."""
    done = e2email("keys", "list", home=home)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if "@" in line}
    assert keys.alice.fingerprint in rows["alice@example.org"]
    assert "ed25519/cv25519" in rows["alice@example.org"]
    assert "never" in rows["alice@example.org"]
    assert "usable" in rows["bob@example.net"]
    assert "key expired" in rows["expired@example.com"]
    assert "2020-01-02" in rows["expired@example.com"]


def test_keys_export_gives_an_importable_certificate(
    home: Path, keys: Keys, tmp_path: Path
) -> None:
    """`keys export ADDRESS` writes an armored public certificate another gpg can import."""
    done = e2email("keys", "export", "bob@example.net", home=home)
    assert done.returncode == 0
    assert done.stdout.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE" not in done.stdout
    other = new_gnupg_home("e2x")
    try:
        imported = subprocess.run(
            ["gpg", "--homedir", str(other), "--batch", "--status-fd", "1", "--import"],
            input=done.stdout.encode(),
            capture_output=True,
            check=True,
        )
        assert f"IMPORT_OK 1 {keys.bob.fingerprint}" in imported.stdout.decode()
    finally:
        shutil.rmtree(other, ignore_errors=True)
    missing = e2email("keys", "export", "nobody@example.com", home=home)
    assert missing.returncode == 3
    assert "nobody@example.com" in one_line_error(missing)


def test_keys_generate_makes_a_usable_ed25519_key_pair(tmp_path: Path) -> None:
    """`keys generate` makes an Ed25519/Cv25519 key that can sign and be encrypted to."""
    home = new_gnupg_home("e2g")
    try:
        done = e2email("keys", "generate", "new@example.org", "--name", "New User", home=home)
        assert done.returncode == 0, done.stderr
        listing = e2email("keys", "list", home=home).stdout
        row = next(line for line in listing.splitlines() if "new@example.org" in line)
        assert "ed25519/cv25519" in row and "usable" in row and " yes " in row
        bad = e2email("keys", "import", str(tmp_path / "missing.asc"), home=home)
        assert bad.returncode == 2  # bad input (issue 8 item 13), not a key refusal
        assert "missing.asc" in one_line_error(bad)
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_an_existing_gnupg_home_can_be_named(recipients_home: Path, tmp_path: Path) -> None:
    """`--gnupg-home` uses the keys of an existing GnuPG home instead of HOME/gnupg."""
    done = e2email("--gnupg-home", str(recipients_home), "keys", "list", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bob@example.net" in done.stdout and "dave@example.com" in done.stdout
    assert not (tmp_path / "gnupg").exists()


# -- send ------------------------------------------------------------------------------------


def test_send_from_stdin_with_auth_delivers_a_message_bob_can_read(
    home: Path, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """The everyday command: body on stdin, password from an environment variable, implicit TLS
    with AUTH. The server gets ciphertext that Bob decrypts."""
    server = smtp_server(tls="implicit", credentials={"alice": "pw-123"})
    done = e2email(
        *send_args(
            server,
            "--to",
            "bob@example.net",
            "--subject",
            "CLI test",
            "--user",
            "alice",
            "--password-env",
            "SMTP_PW",
        ),
        home=home,
        input=b"Hello from the command line\n",
        env={"SMTP_PW": "pw-123"},
    )
    assert done.returncode == 0, done.stderr
    assert "accepted for bob@example.net" in done.stdout
    assert server.auth_attempts == [("alice", True)]
    (received,) = server.messages
    assert received.tls_version in ("TLSv1.2", "TLSv1.3")
    _, (_, enc) = multipart_parts(received.data)
    plaintext, status = gpg_decrypt(recipients_home, part_body(enc))
    assert b"Hello from the command line" in plaintext
    assert "VALIDSIG" in status


def test_missing_key_exits_3_names_the_recipient_and_keeps_the_stdin_body(
    home: Path, smtp_server: ServerFactory
) -> None:
    """Fail closed on the command line: exit 3, one line naming every offending recipient,
    nothing reaches the server, and a body read from stdin is saved, not lost."""
    server = smtp_server(tls="implicit")
    done = e2email(
        *send_args(
            server,
            "--to",
            "bob@example.net",
            "--cc",
            "nobody@example.com",
            "--bcc",
            "expired@example.com",
        ),
        home=home,
        input=b"precious words\n",
    )
    assert done.returncode == 3
    line = one_line_error(done)
    assert "nobody@example.com: no key found" in line
    assert "expired@example.com: key expired" in line
    assert server.transcript == []
    drafts = list((home / "drafts").glob("*.txt"))
    assert any(d.read_text() == "precious words\n" for d in drafts)
    assert all((d.stat().st_mode & 0o077) == 0 for d in drafts)


def test_untrusted_certificate_exits_4_and_keeps_the_protected_message(
    home: Path, smtp_server: ServerFactory, session_ca: TestCA
) -> None:
    """A server whose CA we do not trust: exit 4, nothing but the handshake reached it, and the
    protected (encrypted) message is kept in the outbox for a retry, and the error names it."""
    other_ca = TestCA()
    try:
        server = smtp_server(tls="implicit", ca=other_ca)
        args = send_args(server, "--to", "bob@example.net", "--body", "kept safe")
        args[args.index("--ca-file") + 1] = str(session_ca.ca_file)  # trusts another CA
        done = e2email(*args, home=home)
    finally:
        other_ca.cleanup()
    assert done.returncode == 4
    line = one_line_error(done)
    assert "certificate" in line.lower()
    assert server.transcript == []
    with sqlite3.connect(home / "outbox.sqlite3") as db:
        item_id, raw = db.execute(
            "SELECT id, raw FROM items ORDER BY created DESC LIMIT 1"
        ).fetchone()
        (rcpts,) = db.execute(
            "SELECT group_concat(address) FROM recipients WHERE item_id = ?", (item_id,)
        ).fetchone()
    assert item_id in line and "outbox retry" in line
    assert b"-----BEGIN PGP MESSAGE-----" in raw
    assert b"kept safe" not in raw
    assert rcpts == "bob@example.net"
    assert not (home / "unsent").exists()
    assert (home / "outbox.sqlite3").stat().st_mode & 0o077 == 0
    listing = e2email("outbox", "list", home=home)
    assert item_id in listing.stdout and "certificate" in listing.stdout
    e2email("outbox", "drop", item_id, home=home)


def test_wrong_password_exits_5(home: Path, smtp_server: ServerFactory) -> None:
    """A refused AUTH is exit 5 with the server's reply."""
    server = smtp_server(tls="implicit", credentials={"alice": "right"})
    done = e2email(
        *send_args(
            server,
            "--to",
            "bob@example.net",
            "--body",
            "x",
            "--user",
            "alice",
            "--password-command",
            "echo wrong",
        ),
        home=home,
    )
    assert done.returncode == 5
    assert "535" in one_line_error(done)
    assert server.messages == []


def test_refused_recipient_exits_6(home: Path, smtp_server: ServerFactory) -> None:
    """A recipient the server refuses is exit 6, naming it with the server's reply."""
    server = smtp_server(
        tls="implicit", refuse_recipients={"bob@example.net": (550, "5.1.1 unknown user")}
    )
    done = e2email(*send_args(server, "--to", "bob@example.net", "--body", "x"), home=home)
    assert done.returncode == 6
    line = one_line_error(done)
    assert "bob@example.net" in line and "550" in line


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--to", "bob@example.net", "--subject", "hi\r\nBcc: eve@example.com", "--body", "x"],
            "subject",
        ),
        (["--to", "bob@example.net\nRCPT TO:<eve@example.com>", "--body", "x"], "to"),
        (["--to", "not an address", "--body", "x"], "to"),
        (
            ["--to", "bob@example.net", "--body", "x", "--attach", "/nonexistent/file.pdf"],
            "/nonexistent/file.pdf",
        ),
        (["--to", "bob@example.net", "--body", "x", "--attach", "/"], "attachment"),
        (["--body", "x"], "no recipients"),
        (
            [
                "--to",
                "bob@example.net",
                "--body",
                "x",
                "--password-env",
                "A",
                "--password-command",
                "b",
            ],
            "either",
        ),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(
    extra: list[str], needle: str, home: Path, smtp_server: ServerFactory
) -> None:
    """Header injection, bad addresses, unreadable attachments and contradictory options are
    usage errors (exit 2): one line, no traceback, nothing sent."""
    server = smtp_server(tls="implicit")
    done = e2email(*send_args(server, *extra), home=home)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert needle.lower() in done.stderr.lower()
    assert server.transcript == []


def test_output_writes_one_file_per_copy_without_sending(
    home: Path, keys: Keys, recipients_home: Path, tmp_path: Path
) -> None:
    """`--output` writes the protected message instead of sending it; with a Bcc there is a
    second file whose copy is encrypted to the Bcc recipient only (and the sender)."""
    out = tmp_path / "msg.eml"
    done = e2email(
        "send",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--bcc",
        "dave@example.com",
        "--subject",
        "offline",
        "--body",
        "written, not sent",
        "--output",
        str(out),
        home=home,
    )
    assert done.returncode == 0, done.stderr
    bcc_copy = tmp_path / "msg.bcc1.eml"
    assert out.exists() and bcc_copy.exists()
    for path in (out, bcc_copy):
        _, (_, enc) = multipart_parts(path.read_bytes())
        plaintext, _ = gpg_decrypt(recipients_home, part_body(enc))
        assert b"written, not sent" in plaintext
    assert b"dave" not in out.read_bytes()


# -- review fixes: where the message is after any error, interrupts, last-resort errors -------


def plain_send_args(server: LoopbackSMTPServer, *extra: str) -> list[str]:
    """A `send` of an unprotected one-liner (no keys needed) to ``server``."""
    args = send_args(server, "--to", "bob@example.net", "--no-sign", "--no-encrypt", *extra)
    args[2] = "alice@example.org"
    return args


def test_an_unset_password_variable_stores_nothing_and_a_later_error_names_the_kept_id(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """--password-env naming an unset variable fails before the message is stored (so a
    resend cannot make `outbox retry` deliver it twice); a ConfigError after storing (the
    password prompt with no terminal) names the outbox ID instead of saving a draft."""
    server = smtp_server(credentials={"alice": "pw"})
    args = plain_send_args(server, "--user", "alice")
    done = e2email(*args, "--password-env", "E2EMAIL_TEST_UNSET", home=tmp_path, input=b"hi")
    assert done.returncode == 2
    line = one_line_error(done)
    assert "E2EMAIL_TEST_UNSET (the SMTP password) is not set" in line
    assert "the outbox is empty" in e2email("outbox", "list", home=tmp_path).stdout
    assert "the body read from stdin is saved in" in line  # nothing stored: keep the body
    done = e2email(*args, home=tmp_path, input=b"hi")
    line = one_line_error(done)
    (item_id,) = [
        ln.split()[0] for ln in e2email("outbox", "list", home=tmp_path).stdout.splitlines()[:1]
    ]
    assert f"kept in the outbox as {item_id}" in line
    assert "saved in" not in line
    assert server.messages == []


def test_ctrl_c_during_delivery_exits_130_and_names_the_kept_message(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGINT while the server sits on DATA: exit 130 (not 2 "aborted"), one line naming the
    outbox ID, and the item back in the queue with the interruption recorded."""
    import signal
    import time

    from e2email.testing import Fault

    server = smtp_server(faults=[Fault("data-end", "stall", seconds=5)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2email", *plain_send_args(server, "--body", "x")],
        env={**os.environ, "E2EMAIL_HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Wait until the whole message is in and the server sits on its reply (the stall fired):
    # the client is then waiting for the final reply, not in the middle of a write.
    deadline = time.monotonic() + 20
    while not server.faults_fired:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    stderr = err.decode()
    assert "Traceback" not in stderr
    listed = e2email("outbox", "list", home=tmp_path).stdout
    item_id = listed.split()[0]
    assert f"kept in the outbox as {item_id}" in stderr
    assert "last error: interrupted" in listed


def test_an_unexpected_exception_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug anywhere in a command is reported as one "e2email: internal error:" line with
    exit status 1, not a traceback; E2EMAIL_DEBUG=1 adds the traceback."""
    from e2email.cli import app

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(app.cli, "main", broken)
    monkeypatch.delenv("E2EMAIL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        app.main(["keys", "list"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("e2email: internal error: RuntimeError: boom")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("E2EMAIL_DEBUG", "1")
    with pytest.raises(SystemExit):
        app.main(["keys", "list"])
    assert "Traceback" in capsys.readouterr().err


def test_a_password_command_printing_non_utf8_is_one_clear_line(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """--password-command whose output is not UTF-8: exit 2 with one line, no traceback."""
    server = smtp_server(credentials={"alice": "pw"})
    args = plain_send_args(server, "--user", "alice", "--body", "x")
    done = e2email(*args, "--password-command", "printf '\\377\\376'", home=tmp_path)
    assert done.returncode == 2
    assert "not UTF-8" in one_line_error(done)


def test_keys_export_to_a_missing_directory_is_one_clear_line(home: Path) -> None:
    """`keys export -o` into a directory that does not exist: exit 2, one line, no traceback."""
    done = e2email("keys", "export", "bob@example.net", "-o", "/nonexistent/dir/x.asc", home=home)
    assert done.returncode == 2
    assert "cannot write /nonexistent/dir/x.asc" in one_line_error(done)


def test_encrypting_without_signing_warns_loudly(home: Path, tmp_path: Path) -> None:
    """`--no-sign` with encryption is allowed (an explicit choice) but says on stderr that the
    recipient cannot tell who sent it or whether it was altered."""
    out = tmp_path / "unsigned.eml"
    done = e2email(
        "send",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--body",
        "x",
        "--no-sign",
        "--output",
        str(out),
        home=home,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING: encrypted but NOT signed" in done.stderr
    assert b"multipart/encrypted" in out.read_bytes()
    signed = e2email(
        "send",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--body",
        "x",
        "--output",
        str(tmp_path / "signed.eml"),
        home=home,
    )
    assert "WARNING" not in signed.stderr
