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
    """The error output is exactly one line starting with 'e2email: error:' (besides the
    one-line warnings an explicit --no-sign or --no-encrypt prints before anything is done)."""
    assert "Traceback" not in done.stderr
    lines = [
        ln
        for ln in done.stderr.splitlines()
        if ln.strip() and not ln.startswith("e2email: WARNING: ")
    ]
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


# -- issue 8: the first ten minutes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["send", "--frm", "alice@example.org"], "No such option '--frm'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["keys", "frob"], "No such command 'frob'"),
        (["send", "--to", "bob@example.net"], "Missing option '--from'"),
        (["send", "--from", "a@example.org", "--tls", "sometimes"], "'sometimes' is not one of"),
        (["send", "--from", "a@example.org", "--port", "0"], "--port"),
        (["send", "--from", "a@example.org", "--body", "x"], "no recipients"),
        (["keys", "import"], "give FILES to import"),
        (
            [
                "send",
                "--from",
                "a@example.org",
                "--to",
                "b@example.net",
                "--subject",
                "s",
                "--subject-file",
                "f",
                "--output",
                "o",
            ],
            "give the subject once",
        ),
    ],
)
def test_every_usage_error_is_exactly_one_line_on_stderr(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    """click's usage errors are three lines (Usage, Try, Error); the README promises one line
    on stderr for every error: exit 2, one `e2email: error:` line naming the problem and where
    the help is, nothing on stdout. `--help` itself is unchanged."""
    done = e2email(*args, home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("e2email: error: ")
    assert needle in done.stderr
    assert "--help`)" in done.stderr
    helped = e2email("send", "--help", home=tmp_path)
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: ") and "--subject-file FILE" in helped.stdout


def test_a_permanent_refusal_does_not_promise_that_a_retry_sends_it(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """After a 5xx the error says the refusal is permanent and how to give the kept message
    up, not that `outbox retry` sends it again; after a 4xx (no retries left) it does offer
    `outbox retry`, which is then what helps."""
    refusing = smtp_server(refuse_recipients={"bob@example.net": (550, "5.1.1 unknown user")})
    done = e2email(*plain_send_args(refusing, "--body", "x", "--retries", "0"), home=tmp_path)
    assert done.returncode == 6
    line = one_line_error(done)
    item_id = e2email("outbox", "list", home=tmp_path).stdout.split()[0]
    assert "550 5.1.1 unknown user" in line
    assert "outbox retry` sends it again" not in line
    assert "refused it permanently" in line and f"`e2email outbox drop {item_id}`" in line
    e2email("outbox", "drop", item_id, home=tmp_path)

    busy = smtp_server(refuse_recipients={"bob@example.net": (450, "4.2.1 try later")})
    done = e2email(*plain_send_args(busy, "--body", "x", "--retries", "0"), home=tmp_path)
    assert done.returncode == 6
    line = one_line_error(done)
    assert "`e2email outbox retry` sends it again" in line
    assert "permanently" not in line


def test_ctrl_c_during_keys_generate_says_only_interrupted(tmp_path: Path) -> None:
    """SIGINT while `keys generate --ask-passphrase` waits for the passphrase: exit 130 and one
    line that does not send the user to the outbox or to --to-file (nothing was sending)."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "e2email", "keys", "generate", "new@example.org",
         "--ask-passphrase"],
        env={**os.environ, "E2EMAIL_HOME": str(tmp_path / "home")},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # no controlling terminal: getpass asks on stderr/stdin
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    while b"Passphrase for the new key" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 130, seen + rest
    last = (seen + rest).decode().strip().splitlines()[-1]
    assert last == "e2email: error: interrupted"


def test_ctrl_c_during_the_demo_says_only_interrupted() -> None:
    """SIGINT in the middle of `e2email demo` (delivered to the process as its loopback server
    starts): exit 130, one line, no outbox or --to-file hint."""
    script = (
        "import os, signal, e2email.demo as demo\n"
        "class Interrupted(demo.LoopbackSMTPServer):\n"
        "    def __enter__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        return super().__enter__()\n"
        "demo.LoopbackSMTPServer = Interrupted\n"
        "from e2email.cli import main\n"
        "main(['demo'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=120, check=False
    )
    stderr = done.stderr.decode()
    assert done.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["e2email: error: interrupted"]


def test_the_passphrase_variable_is_named_as_a_passphrase(keys: Keys, tmp_path: Path) -> None:
    """An unset --passphrase-env is reported as the signing key passphrase, not as "the SMTP
    password"."""
    assert keys.locked.secret is not None
    home = new_gnupg_home("e2p")
    try:
        e2email("keys", "import", str(keys.locked.secret), str(keys.bob.cert), home=home)
        done = e2email(
            "send", "--from", "locked@example.org", "--to", "bob@example.net", "--body", "x",
            "--passphrase-env", "E2EMAIL_TEST_UNSET_PW", "--output", str(tmp_path / "o.eml"),
            home=home,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        line = one_line_error(done)
        assert "E2EMAIL_TEST_UNSET_PW (the signing key passphrase) is not set" in line
        assert "SMTP" not in line
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def _umask_002() -> None:
    os.umask(0o002)


def test_home_drafts_and_output_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """With umask 002 (group-writable by default), a new HOME (and the folder made for it) is
    0700, a saved draft 0700/0600 and an --output file 0600, a file that existed too."""

    def run(*args: str, home: Path, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "e2email", *args],
            input=input,
            capture_output=True,
            env={**os.environ, "E2EMAIL_HOME": str(home)},
            preexec_fn=_umask_002,  # only sets the umask: safe before exec
            timeout=120,
            check=False,
        )

    home = tmp_path / "made" / "home"
    out = tmp_path / "plain.eml"
    done = run(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--body", "x",
        "--no-sign", "--no-encrypt", "--output", str(out), home=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (home.stat().st_mode & 0o777) == 0o700
    assert (home.parent.stat().st_mode & 0o777) == 0o700
    assert (out.stat().st_mode & 0o777) == 0o600
    existing = tmp_path / "existing.eml"
    existing.write_bytes(b"old")
    existing.chmod(0o664)
    done = run(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--body", "x",
        "--no-sign", "--no-encrypt", "--output", str(existing), home=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (existing.stat().st_mode & 0o777) == 0o600 and b"old" not in existing.read_bytes()
    # No key for anyone here: fail closed, and the body read from stdin is kept as a draft.
    done = run(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--output",
        str(tmp_path / "never.eml"), home=home, input=b"private words\n",
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    (draft,) = (home / "drafts").iterdir()
    assert draft.read_text() == "private words\n"
    assert ((home / "drafts").stat().st_mode & 0o777) == 0o700
    assert (draft.stat().st_mode & 0o777) == 0o600


def test_a_loose_or_foreign_home_is_refused(tmp_path: Path) -> None:
    """A HOME that group or others may write, or that another user owns, is refused with one
    line and exit 2 (as ssh refuses a loose ~/.ssh): whoever can write there can swap keys
    or queued messages."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o775)
    done = e2email("keys", "list", home=home)
    assert done.returncode == 2
    line = one_line_error(done)
    assert str(home) in line and "writable by group or others" in line
    assert f"chmod go-w {home}" in line
    if os.geteuid() == 0:
        home.chmod(0o700)
        os.chown(home, 65534, 65534)
        done = e2email("keys", "list", home=home)
        assert done.returncode == 2
        assert "owned by another user" in one_line_error(done)


@pytest.mark.parametrize(
    ("flags", "warning"),
    [
        (["--no-sign", "--no-encrypt"], "e2email: WARNING: neither signed nor encrypted"),
        (["--no-encrypt"], "e2email: WARNING: NOT encrypted (--no-encrypt)"),
    ],
)
def test_plaintext_is_never_written_without_a_warning(
    flags: list[str], warning: str, home: Path, tmp_path: Path
) -> None:
    """A message that is not encrypted is readable on its way: an explicit --no-encrypt (with
    or without --no-sign) says so in one line on stderr; encryption is the default."""
    out = tmp_path / "plain.eml"
    done = e2email(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--body",
        "readable words", *flags, "--output", str(out), home=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(warning)
    assert b"readable words" in out.read_bytes()
    default = e2email(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--body",
        "readable words", "--output", str(out), home=home,
    )  # fmt: skip
    assert default.returncode == 0 and default.stderr == ""
    assert b"readable words" not in out.read_bytes()
    assert b"-----BEGIN PGP MESSAGE-----" in out.read_bytes()


def _subject_of(path: Path) -> str:
    import email
    import email.policy

    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return str(parsed["Subject"])


def test_subject_file_keeps_the_subject_out_of_the_process_table(
    home: Path, recipients_home: Path, tmp_path: Path
) -> None:
    """--subject-file FILE gives the subject (one trailing newline stripped) without putting
    it on the command line; it is hidden in the encrypted message like --subject."""
    subject = tmp_path / "subject.txt"
    subject.write_text("Salaries 2027: confidential\n")
    out = tmp_path / "msg.eml"
    args = ["send", "--from", "alice@example.org", "--to", "bob@example.net", "--output",
            str(out)]  # fmt: skip
    done = e2email(*args, "--subject-file", str(subject), "--body", "x", home=home)
    assert done.returncode == 0, done.stderr
    assert "Salaries" not in " ".join(done.args)
    assert _subject_of(out) == "[...]"
    _, (_, enc) = multipart_parts(out.read_bytes())
    plaintext, _ = gpg_decrypt(recipients_home, part_body(enc))
    assert b"Subject: Salaries 2027: confidential\r\n" in plaintext

    # `-`: the subject from stdin, when the body comes from a file.
    body = tmp_path / "body.txt"
    body.write_text("the body\n")
    plain = [*args, "--no-sign", "--no-encrypt"]
    done = e2email(
        *plain, "--subject-file", "-", "--body-file", str(body), home=home, input=b"From stdin\r\n"
    )
    assert done.returncode == 0, done.stderr
    assert _subject_of(out) == "From stdin"


def test_a_template_gives_one_message_its_subject_from_a_file(
    home: Path, recipients_home: Path, tmp_path: Path
) -> None:
    """--template FILE without --to-file: the file's header block gives the Subject and the
    rest is the body, so a confidential Subject need not appear on the command line; a
    template with $placeholders needs rows (--to-file) and is refused here."""
    template = tmp_path / "message.txt"
    template.write_text("Subject: Layoffs list Q3\n\nThe body costs $$5.\n")
    out = tmp_path / "msg.eml"
    args = ["send", "--from", "alice@example.org", "--to", "bob@example.net", "--output",
            str(out)]  # fmt: skip
    done = e2email(*args, "--template", str(template), home=home)
    assert done.returncode == 0, done.stderr
    assert "Layoffs" not in " ".join(done.args)
    assert _subject_of(out) == "[...]"
    _, (_, enc) = multipart_parts(out.read_bytes())
    plaintext, _ = gpg_decrypt(recipients_home, part_body(enc))
    assert b"Subject: Layoffs list Q3\r\n" in plaintext
    assert b"The body costs $5." in plaintext
    template.write_text("Subject: Hello $name\n\nHi\n")
    refused = e2email(*args, "--template", str(template), home=home)
    assert refused.returncode == 2
    assert "placeholders ($name)" in refused.stderr


@pytest.mark.parametrize(
    ("extra", "input", "needle"),
    [
        (["--subject-file", "-"], b"subject\n", "--subject-file - reads standard input"),
        (["--subject-file", "SUBJ", "--subject", "x", "--body", "x"], b"", "subject once"),
        (["--subject-file", "/nonexistent/subject", "--body", "x"], b"", "/nonexistent/subject"),
        (["--subject-file", "SUBJ", "--body", "x"], b"", "LF is not allowed in the subject"),
    ],
)
def test_subject_file_mistakes_are_one_line_and_write_nothing(
    extra: list[str], input: bytes, needle: str, tmp_path: Path
) -> None:
    """Both --subject and --subject-file, `-` when stdin gives the body, a missing file, and a
    file whose second line would inject a header: exit 2, one line, nothing written."""
    subject = tmp_path / "subject.txt"
    subject.write_bytes(b"hello\nBcc: eve@example.com\n")
    out = tmp_path / "msg.eml"
    done = e2email(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--no-sign",
        "--no-encrypt", "--output", str(out),
        *[str(subject) if a == "SUBJ" else a for a in extra],
        home=tmp_path / "home", input=input,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert needle in one_line_error(done)
    assert not out.exists()


def test_a_loose_drafts_folder_is_not_written_and_the_first_error_still_shows(
    tmp_path: Path,
) -> None:
    """A drafts folder others may write is not used for a plaintext body: the one error line
    says why the message failed and why its body could not be kept."""
    home = tmp_path / "home"
    (home / "drafts").mkdir(parents=True)
    home.chmod(0o700)
    (home / "drafts").chmod(0o777)
    done = e2email(
        "send", "--from", "alice@example.org", "--to", "bob@example.net", "--output",
        str(tmp_path / "never.eml"), home=home, input=b"private words\n",
    )  # fmt: skip
    assert done.returncode == 3
    line = one_line_error(done)
    assert "alice@example.org: no key found" in line
    assert "could not be saved" in line and "writable by group or others" in line
    assert list((home / "drafts").iterdir()) == []
