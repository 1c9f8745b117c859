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
        assert bad.returncode == 3
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
