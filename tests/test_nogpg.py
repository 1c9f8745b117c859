"""e2email with no gpg program at all (issue 9 parts 3 and 4): the command line run with a PATH
that holds the virtualenv's programs and nothing else, as after `pip install e2email` on a
machine without GnuPG. The demo, key generation, import, listing, export and a real send to a
TLS server work; what the server received is then read by gpg here in the test process, where
it exists, as a recipient would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg, gpg_decrypt, kill_agent, multipart_parts, new_gnupg_home, part_body

from e2email.testing import LoopbackSMTPServer

BIN = Path(sys.executable).parent


def _no_gpg_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GNUPG", "E2EMAIL_", "GPG_"))}
    env.update(PATH=str(BIN), E2EMAIL_HOME=str(home), **extra)
    return env


@pytest.fixture(scope="module")
def no_gpg() -> Callable[..., subprocess.CompletedProcess[str]]:
    if shutil.which("gpg", path=str(BIN)) or shutil.which("gpgconf", path=str(BIN)):
        pytest.skip(f"{BIN} holds a gpg program")

    def run(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "e2email"), *args],
            capture_output=True,
            env=_no_gpg_env(home, **extra),
            timeout=180,
            check=False,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_the_demo_runs_without_gpg(
    no_gpg: Callable[..., subprocess.CompletedProcess[str]], home: Path
) -> None:
    done = no_gpg(home, "demo")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Round trip complete" in done.stdout
    assert "signature: GOOD" in done.stdout
    assert "S/MIME round trip complete" in done.stdout


def test_keys_and_a_send_work_without_gpg_and_gpg_reads_what_was_sent(
    no_gpg: Callable[..., subprocess.CompletedProcess[str]],
    home: Path,
    keys: Keys,
    recipients_home: Path,
    smtp_server: Callable[..., LoopbackSMTPServer],
    tmp_path: Path,
) -> None:
    """keys generate / import / list / export and send, with no gpg on PATH; then, with gpg,
    the recipient decrypts the bytes the server received and the signature is the new key's."""
    pw = {"NEW_KEY_PW": "a long passphrase"}
    made = no_gpg(home, "keys", "generate", "sender@example.org", "--name", "Sender")
    assert made.returncode != 0  # the store needs a passphrase, or --unprotected, said in one line
    assert "--unprotected" in made.stderr and "Traceback" not in made.stderr
    made = no_gpg(
        home, "keys", "generate", "sender@example.org", "--passphrase-env", "NEW_KEY_PW", **pw
    )
    assert made.returncode == 0, made.stderr
    fpr = re.search(r"generated ([0-9A-F]{40})", made.stdout)
    assert fpr, made.stdout
    sender_fpr = fpr.group(1)
    assert (home / "pgp.cert.d" / sender_fpr.lower()[:2] / sender_fpr.lower()[2:]).is_file()
    assert not (home / "gnupg").exists()

    imported = no_gpg(home, "keys", "import", str(keys.bob.cert))
    assert imported.returncode == 0, imported.stderr
    assert keys.bob.fingerprint in imported.stdout

    listed = no_gpg(home, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {ln.split()[0]: ln for ln in listed.stdout.splitlines() if "@" in ln}
    assert keys.bob.fingerprint in rows["bob@example.net"] and "usable" in rows["bob@example.net"]
    assert sender_fpr in rows["sender@example.org"]

    exported = no_gpg(home, "keys", "export", "sender@example.org")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

    wrong_engine = no_gpg(
        home, "send", "--from", "sender@example.org", "--to", "bob@example.net", "--body", "x",
        "--engine", "gpg", "--output", "-",
    )  # fmt: skip
    assert wrong_engine.returncode != 0
    assert "--engine sequoia" in wrong_engine.stderr and "Traceback" not in wrong_engine.stderr

    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    sent = no_gpg(
        home,
        "send",
        "--from", "Sender <sender@example.org>",
        "--to", "bob@example.net",
        "--subject", "no gpg here",
        "--body", "sent by a machine without gpg",
        "--host", server.host,
        "--port", str(server.port),
        "--tls", "implicit",
        "--ca-file", str(server.ca_file),
        "--passphrase-env", "NEW_KEY_PW",
        **pw,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    received = server.messages[-1].data
    assert b"sent by a machine without gpg" not in received

    # The recipient's side, with gpg: Bob's secret key and the sender's exported certificate.
    reader = new_gnupg_home("e2n")
    try:
        assert keys.bob.secret is not None
        gpg(reader, "--import", str(keys.bob.secret))
        gpg(reader, "--import", input=exported.stdout.encode())
        _, (_, encrypted) = multipart_parts(received)
        plain, status = gpg_decrypt(reader, part_body(encrypted))
        assert b"sent by a machine without gpg" in plain
        assert re.search(rf"VALIDSIG [0-9A-F]{{40}} .* {sender_fpr}\b", status) or (
            f"VALIDSIG {sender_fpr}" in status
        ), status
    finally:
        kill_agent(reader)
        shutil.rmtree(reader, ignore_errors=True)


def test_doctor_says_gpg_is_missing_as_information_only(
    no_gpg: Callable[..., subprocess.CompletedProcess[str]],
    home: Path,
    smtp_server: Callable[..., LoopbackSMTPServer],
) -> None:
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    done = no_gpg(
        home, "doctor", server.host, "--timeout", "2", "--ca-file", str(server.ca_file),
        "--port-map", f"465={server.port}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # the report is still a good one
    assert "note: gpg is not installed, which only --engine gpg" in done.stdout
    assert "in-process engine (pysequoia)" in done.stdout


def test_a_home_still_in_its_gnupg_home_says_what_to_do_without_gpg(
    no_gpg: Callable[..., subprocess.CompletedProcess[str]], home: Path, keys: Keys
) -> None:
    """An e2email home from before the store (HOME/gnupg), on a machine without gpg: one
    line naming the GnuPG home, GnuPG and `keys migrate`."""
    from e2email.keystore import Keystore

    old = Keystore(home)
    assert old.backend == "gnupg"
    old.import_file(keys.bob.cert)
    old.shutdown_agent()
    done = no_gpg(home, "keys", "list")
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is not installed" in lines[0] and "keys migrate" in lines[0]
