"""Real programs send through `e2email-sendmail`, unchanged, to a real TLS server.

git send-email (a two-patch series), neomutt in batch mode (a message with an attachment),
PHP's mail() and cron's way of calling sendmail each run the console script as their
sendmail; the loopback server must receive ciphertext only, which gpg and sqop decrypt (and
verify Alice's signature in) to exactly what the program produced. Then the refusals, each
with its sysexits status: a recipient without a key (nothing reaches the server, the message
is kept), a 4xx (queued in the outbox), a 5xx, a certificate that does not verify, refused
credentials, a server name that does not exist.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    TestKey,
    gpg_decrypt,
    header_value,
    kill_agent,
    multipart_parts,
    part_body,
    sop_decrypt,
    split_head,
)

from e2email.keystore import Keystore
from e2email.outbox import Outbox
from e2email.testing import Fault, LoopbackSMTPServer, TestCA

BIN = Path(sys.executable).parent
SCRIPT = BIN / "e2email-sendmail"
ALICE = "Alice Demo <alice@example.org>"

Server = Callable[..., LoopbackSMTPServer]


def _need(program: str) -> None:
    # A failure, not a skip: the real callers are the point of these tests.
    if shutil.which(program) is None and not Path(program).exists():
        pytest.fail(f"{program} is not installed: run `bash tools/install.sh --test`")


@pytest.fixture(scope="module")
def keys_home(keys: Keys) -> Iterator[Path]:
    """An e2email home as Alice's: her secret key, the certificates of bob, carol, dave and
    of an expired key."""
    home = Path(tempfile.mkdtemp(prefix="e2sm", dir="/tmp")) / "h"
    store = Keystore(home)
    assert keys.alice.secret is not None
    store.import_file(keys.alice.secret)
    for key in (keys.bob, keys.carol, keys.dave, keys.expired):
        store.import_file(key.cert)
    store.shutdown_agent()
    yield home
    shutil.rmtree(home.parent, ignore_errors=True)


@pytest.fixture
def home(keys_home: Path) -> Iterator[Path]:
    """A copy of Alice's home for one test (its own outbox and drafts). Short path: gpg-agent
    puts its socket in the GnuPG home."""
    base = Path(tempfile.mkdtemp(prefix="e2sm", dir="/tmp"))
    copy = base / "h"
    shutil.copytree(keys_home, copy, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    yield copy
    kill_agent(copy / "gnupg")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default home and accounts file (platformdirs) are in the test's folder, never the
    user's: a failure before an account is known keeps its message in the default home."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.delenv("E2EMAIL_HOME", raising=False)
    monkeypatch.delenv("E2EMAIL_CONFIG", raising=False)


@pytest.fixture
def server(smtp_server: Server) -> LoopbackSMTPServer:
    return smtp_server(tls="implicit")


def server_options(server: LoopbackSMTPServer) -> list[str]:
    """msmtp's command-line server settings, as a sendmail line in a config would hold."""
    return [
        f"--host={server.host}",
        f"--port={server.port}",
        "--tls-starttls=off",
        f"--tls-trust-file={server.ca_file}",
    ]


def sendmail_cmd(home: Path, server: LoopbackSMTPServer, *extra: str) -> list[str]:
    return [str(SCRIPT), f"--home={home}", *server_options(server), *extra]


def write_config(
    path: Path, home: Path, accounts: dict[str, LoopbackSMTPServer], **extra: str
) -> Path:
    """An accounts file (config.toml): one account per server, all with Alice's home; the
    first is the default. ``extra`` adds ``key = "value"`` lines to every account."""
    lines = [f'default = "{next(iter(accounts))}"', ""]
    for name, server in accounts.items():
        lines += [
            f"[accounts.{name}]",
            f'host = "{server.host}"',
            f"port = {server.port}",
            'tls = "implicit"',
            f'ca-file = "{server.ca_file}"',
            f'home = "{home}"',
            *(f'{key} = "{value}"' for key, value in extra.items()),
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def caller_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for the calling program: its own HOME (no user config), the
    venv's bin first on PATH (where the console script is)."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "TZ": "UTC",
    }
    return env


def run(
    cmd: list[str],
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cmd, input=stdin, capture_output=True, timeout=120, check=False, env=env, cwd=cwd
    )


def decrypt(
    data: bytes, keys: Keys, recipients_home: Path, tmp_path: Path, *, key: TestKey | None = None
) -> bytes:
    """The plaintext of one received copy, checked: PGP/MIME, only "[...]" as Subject, and
    gpg and sqop (with ``key``, bob's by default) agree on the plaintext and on Alice's good
    signature."""
    head, (version_part, encrypted_part) = multipart_parts(data)
    assert header_value(head, "Content-Type").startswith("multipart/encrypted;")
    assert 'protocol="application/pgp-encrypted"' in header_value(head, "Content-Type")
    assert part_body(version_part).strip() == b"Version: 1"
    assert header_value(head, "Subject") == "[...]"
    armored = part_body(encrypted_part)
    plaintext, status = gpg_decrypt(recipients_home, armored)
    assert "DECRYPTION_OKAY" in status
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    secret = (key or keys.bob).secret
    assert secret is not None
    # A folder per call: sqop refuses to overwrite its verifications file.
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    sop_plain, verifications = sop_decrypt("sqop", armored, secret, keys.alice.cert, out)
    assert sop_plain == plaintext
    assert keys.alice.fingerprint.lower() in verifications.lower()
    return plaintext


def parse(entity: bytes) -> EmailMessage:
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(msg: EmailMessage) -> bytes:
    """The decoded bytes of the message's text/plain body, with LF line ends."""
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.replace(b"\r\n", b"\n")


def body_after_head(raw: bytes) -> bytes:
    """What follows the header block of a message file, LF line ends."""
    raw = raw.replace(b"\r\n", b"\n")
    return raw.split(b"\n\n", 1)[1]


def assert_ciphertext_only(server: LoopbackSMTPServer, *secrets: bytes) -> None:
    for message in server.messages:
        for secret in secrets:
            assert secret not in message.data, secret
    # Nothing at all outside TLS (implicit TLS: not even EHLO).
    assert server.cleartext() == b""


# -- git send-email -------------------------------------------------------------------------


def _git_series(tmp_path: Path, env: dict[str, str]) -> list[Path]:
    """A tiny repository with two commits, and `git format-patch -2` of them."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        done = run(["git", *args], env=env, cwd=repo)
        assert done.returncode == 0, done.stderr.decode()

    git("init", "-q")
    git("config", "user.name", "Alice Demo")
    git("config", "user.email", "alice@example.org")
    (repo / "notes.txt").write_bytes(b"line 1\n")
    git("add", "notes.txt")
    git("commit", "-qm", "base")
    # Lines that break naive mail code: "From " at a line start, the "-- " signature marker
    # with its trailing space, a lone dot, trailing blanks, non-ASCII text.
    (repo / "notes.txt").write_bytes(
        "line 1\nFrom here on\n-- \nZoë ünïcode: secret-patch-one\n".encode()
    )
    git("commit", "-qam", "notes: first change, Zoë")
    with (repo / "notes.txt").open("ab") as fh:
        fh.write(b".\ntrailing blanks   \n\tsecret-patch-two\n")
    git("commit", "-qam", "notes: second change")
    git("format-patch", "-q", "-2", "-o", str(tmp_path / "series"))
    patches = sorted((tmp_path / "series").iterdir())
    assert len(patches) == 2
    return patches


def _check_series(
    server: LoopbackSMTPServer,
    patches: list[Path],
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    # Per patch: one copy for To and Cc, and one of its own for the Bcc recipient (git
    # passes Bcc on the command line only), which names dave nowhere else.
    assert len(server.messages) == 4
    assert_ciphertext_only(server, b"secret-patch-one", b"secret-patch-two", b"first change")
    got = []
    bcc_copies = []
    raw_bodies: dict[str, bytes] = {}
    for message in server.messages:
        assert message.mail_from == "alice@example.org"
        if message.rcpt_tos == ("dave@example.com",):
            inner = decrypt(message.data, keys, recipients_home, tmp_path, key=keys.dave)
            bcc_copies.append(parse(inner))
            continue
        assert sorted(message.rcpt_tos) == ["bob@example.net", "carol@example.com"]
        assert b"dave@example.com" not in message.data
        plaintext = decrypt(message.data, keys, recipients_home, tmp_path)
        assert b"dave@example.com" not in plaintext
        got.append(parse(plaintext))
        raw_bodies[str(got[-1]["Subject"])] = plaintext.split(b"\r\n\r\n", 1)[1]
    assert sorted(str(m["Subject"]) for m in bcc_copies) == sorted(str(m["Subject"]) for m in got)
    got.sort(key=lambda m: str(m["Subject"]))
    for inner, patch in zip(got, patches, strict=True):
        # The decrypted entity's body as git wrote it, not re-encoded (no =20 for "-- ",
        # no =C3=AB): only line ends CRLF (OpenPGP literal data needs no 7-bit form).
        assert raw_bodies[str(inner["Subject"])] == body_after_head(patch.read_bytes()).replace(
            b"\n", b"\r\n"
        )
        original = parse(patch.read_bytes())
        assert inner["Subject"] == original["Subject"]
        assert inner["From"] == ALICE
        assert inner["To"] == "bob@example.net"
        assert inner["Cc"] == "carol@example.com"
        # The patch text, byte for byte (line ends aside: canonical CRLF on the wire).
        assert text_of(inner) == body_after_head(patch.read_bytes())
    # The series stays a thread: the second answers the first.
    assert got[1]["In-Reply-To"] == got[0]["Message-ID"]


@pytest.mark.parametrize("style", ["sendmail-cmd", "smtp-server-path", "smtp-server-option"])
def test_git_send_email_two_patch_series(
    style: str,
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    _need("/usr/lib/git-core/git-send-email")
    env = caller_env(tmp_path)
    patches = _git_series(tmp_path, env)
    if style == "sendmail-cmd":
        how = [f"--sendmail-cmd={shlex.join(sendmail_cmd(home, server))}"]
    elif style == "smtp-server-path":
        # The older form: an absolute path, run as `PATH -i rcpt...`; the account comes from
        # the accounts file E2EMAIL_CONFIG names (msmtp's way: a config file, no options).
        how = [f"--smtp-server={SCRIPT}"]
        config = write_config(tmp_path / "config.toml", home, {"work": server})
        env["E2EMAIL_CONFIG"] = str(config)
    else:
        # The same, with the server's settings as --smtp-server-option (one per argument).
        how = [f"--smtp-server={SCRIPT}"]
        how += [f"--smtp-server-option={opt}" for opt in server_options(server)]
        env["E2EMAIL_HOME"] = str(home)
    done = run(
        [
            "git",
            "send-email",
            *how,
            "--from=Alice Demo <alice@example.org>",
            "--to=bob@example.net",
            "--cc=carol@example.com",
            "--bcc=dave@example.com",
            "--confirm=never",
            "--suppress-cc=all",
            "--8bit-encoding=UTF-8",
            "--quiet",
            *map(str, patches),
        ],
        env=env,
        cwd=tmp_path / "repo",
    )
    assert done.returncode == 0, done.stderr.decode()
    _check_series(server, patches, keys, recipients_home, tmp_path)
    assert Outbox.in_home(home).items() == ()


# -- neomutt --------------------------------------------------------------------------------


def test_neomutt_batch_message_with_attachment(
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    _need("neomutt")
    env = caller_env(tmp_path)
    # The account (server, from) from the accounts file, as the README has it.
    env["E2EMAIL_CONFIG"] = str(write_config(tmp_path / "config.toml", home, {"work": server}))
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        "\n".join(
            [
                # As msmtp's documentation has it: mutt then calls it with `-- rcpt...` only
                # (no -oi), so the lone dot in the body below must not end the input.
                'set sendmail="e2email-sendmail"',
                f'set from="{ALICE}"',
                "set use_from=yes",
                "set envelope_from=yes",
                'set record=""',
                'set charset="utf-8"',
                'set send_charset="utf-8"',
                'set hostname="example.org"',
                f'set folder="{tmp_path}/Mail"',
                f'set spoolfile="{tmp_path}/Mail/inbox"',
                "",
            ]
        )
    )
    attachment = tmp_path / "report.bin"
    attachment.write_bytes(bytes(range(256)) * 8 + b"secret-attachment")
    body = "Hello Bob,\nZoë's report is attached: secret-body.\n.\nbye\n".encode()
    done = run(
        [
            "neomutt",
            "-n",
            "-F",
            str(muttrc),
            "-s",
            "Quarterly report",
            "-a",
            str(attachment),
            "--",
            "bob@example.net",
        ],
        stdin=body,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert len(server.messages) == 1
    assert_ciphertext_only(server, b"secret-body", b"Quarterly report")
    assert server.messages[0].rcpt_tos == ("bob@example.net",)
    inner = parse(decrypt(server.messages[0].data, keys, recipients_home, tmp_path))
    assert inner["Subject"] == "Quarterly report"
    assert inner.get_content_type() == "multipart/mixed"
    assert text_of(inner) == body
    files = {p.get_filename(): p.get_payload(decode=True) for p in inner.iter_attachments()}
    assert files == {"report.bin": attachment.read_bytes()}


# -- PHP mail() -----------------------------------------------------------------------------

PHP_MAIL = """
$ok = mail(
    "bob@example.net",
    "Grüße: secret-subject",
    "Hello Bob,\\nsecret-php-body\\n.\\nend\\n",
    "From: Alice Demo <alice@example.org>\\r\\nCc: carol@example.com\\r\\n"
    . "Bcc: dave@example.com\\r\\nContent-Type: text/plain; charset=UTF-8"
);
exit($ok ? 0 : 1);
"""


def test_php_mail(
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    _need("php")
    env = caller_env(tmp_path)
    # What PHP hands its sendmail, byte for byte (it adds nothing that varies).
    captured = tmp_path / "php.eml"
    done = run(["php", "-n", "-d", f"sendmail_path=cat > {captured}", "-r", PHP_MAIL], env=env)
    assert done.returncode == 0, done.stderr.decode()

    # As the README has it: the account from the accounts file.
    env["E2EMAIL_CONFIG"] = str(write_config(tmp_path / "config.toml", home, {"work": server}))
    done = run(["php", "-n", "-d", "sendmail_path=e2email-sendmail -t -i", "-r", PHP_MAIL], env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert_ciphertext_only(server, b"secret-php-body", b"secret-subject")
    # To/Cc in one copy; the Bcc recipient gets a copy of their own.
    by_rcpts = {m.rcpt_tos: m for m in server.messages}
    assert set(by_rcpts) == {("bob@example.net", "carol@example.com"), ("dave@example.com",)}
    original = parse(captured.read_bytes())
    for rcpts, message in by_rcpts.items():
        assert b"dave@example.com" not in message.data or rcpts == ("dave@example.com",)
        key = keys.dave if rcpts == ("dave@example.com",) else keys.bob
        inner = parse(decrypt(message.data, keys, recipients_home, tmp_path, key=key))
        assert inner["Subject"] == original["Subject"] == "Grüße: secret-subject"
        assert "Bcc" not in inner
        assert text_of(inner) == body_after_head(captured.read_bytes())


# -- cron -----------------------------------------------------------------------------------

CRON_MESSAGE = (
    b"From: root (Cron Daemon)\n"
    b"To: bob@example.net\n"
    b"Subject: Cron <root@backup> /usr/local/bin/nightly\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\n"
    b"X-Cron-Env: <HOME=/root>\n"
    b"\n" + "nightly: 3 files copied, Zoë's secret-cron-output\n".encode()
)


@pytest.mark.parametrize("settings", ["account", "options"])
def test_cron_style_invocation(
    settings: str,
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """Debian cron runs `sendmail -FCronDaemon -i -B8BITMIME -oem MAILTO` with a `From: root`
    message, and no -f; here through `e2email sendmail`, with an account whose `from` is
    Alice's (or msmtp's --from option). The local name gives way to that address, with
    cron's name."""
    if settings == "account":
        config = write_config(
            tmp_path / "config.toml", home, {"cron": server}, **{"from": "alice@example.org"}
        )
        group = ["--config", str(config)]
        options: list[str] = []
    else:
        group = ["--home", str(home)]
        options = [*server_options(server), "--from=alice@example.org"]
    cmd = [
        str(BIN / "e2email"),
        *group,
        "sendmail",
        *options,
        "-FCronDaemon",
        "-i",
        "-B8BITMIME",
        "-oem",
        "bob@example.net",
    ]
    done = run(cmd, stdin=CRON_MESSAGE)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert_ciphertext_only(server, b"secret-cron-output", b"nightly")
    (message,) = server.messages
    assert message.mail_from == "alice@example.org"
    inner = parse(decrypt(message.data, keys, recipients_home, tmp_path))
    assert inner["From"] == "CronDaemon <alice@example.org>"
    assert inner["Subject"] == "Cron <root@backup> /usr/local/bin/nightly"
    assert text_of(inner) == body_after_head(CRON_MESSAGE)


def test_t_with_an_address_listed_twice_keeps_to_and_cc_as_written(
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """`-t` with bob in To twice (case differs) and in Cc: one envelope recipient, one copy,
    but the decrypted header keeps To and Cc as the program wrote them."""
    message = (
        f"From: {ALICE}\nTo: bob@example.net, BOB@example.net\nCc: bob@example.net\n"
        "Subject: twice\n\nsecret-twice\n"
    ).encode()
    done = run(sendmail_cmd(home, server, "-t", "-i"), stdin=message)
    assert done.returncode == 0, done.stderr.decode()
    assert_ciphertext_only(server, b"secret-twice")
    (received,) = server.messages
    assert received.rcpt_tos == ("bob@example.net",)
    inner = parse(decrypt(received.data, keys, recipients_home, tmp_path))
    assert inner["To"] == "bob@example.net, BOB@example.net"
    assert inner["Cc"] == "bob@example.net"


# -- Refusals, each with its status ---------------------------------------------------------

PLAIN = f"From: {ALICE}\nTo: bob@example.net\nSubject: secret-subject\n\nsecret-body\n".encode()


def _drafts(home: Path) -> list[Path]:
    folder = home / "drafts"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_recipient_without_key_is_67_nothing_reaches_the_server(
    home: Path, server: LoopbackSMTPServer
) -> None:
    done = run(
        sendmail_cmd(home, server, "-oi", "bob@example.net", "nokey@example.com",
                     "expired@example.com"),
        stdin=PLAIN,
    )  # fmt: skip
    assert done.returncode == 67
    err = done.stderr.decode()
    assert err.count("\n") == 1
    assert "nokey@example.com: no key found" in err
    assert "expired@example.com: key expired" in err
    assert "bob@example.net" not in err.split("no usable key")[1].split("(the message")[0]
    # Nothing reached the server: not even a connection.
    assert server.connections == 0
    assert server.transcript == []
    # The message is kept (readable only by its owner), and said where.
    (draft,) = _drafts(home)
    assert draft.read_bytes() == PLAIN
    assert draft.stat().st_mode & 0o077 == 0
    assert str(draft) in err
    assert Outbox.in_home(home).items() == ()


def test_4xx_is_75_and_the_message_waits_in_the_outbox(home: Path, smtp_server: Server) -> None:
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "reply", 451, "try later")])
    done = run(sendmail_cmd(home, server, "bob@example.net"), stdin=PLAIN)
    assert done.returncode == 75, done.stderr.decode()
    err = done.stderr.decode()
    assert err.count("\n") == 1
    assert "451" in err
    (item,) = Outbox.in_home(home).items()
    assert item.id in err
    assert item.pending == ("bob@example.net",)
    assert server.messages == []
    assert b"secret-body" not in b"".join(d for _, d in server.transcript)
    assert _drafts(home) == []
    # The outbox is the queue (as msmtpq's): `e2email outbox retry` delivers it later.
    done = run(
        [
            str(BIN / "e2email"),
            "--home",
            str(home),
            "outbox",
            "retry",
            "--now",
            "--host",
            server.host,
            "--port",
            str(server.port),
            "--tls",
            "implicit",
            "--ca-file",
            str(server.ca_file),
        ]
    )
    assert done.returncode == 0, done.stderr.decode()
    (message,) = server.messages
    assert message.rcpt_tos == ("bob@example.net",)
    assert b"secret-body" not in message.data
    assert Outbox.in_home(home).items() == ()


def test_5xx_is_69(home: Path, smtp_server: Server) -> None:
    server = smtp_server(tls="implicit", faults=[Fault("data-end", "reply", 554, "no way")])
    done = run(sendmail_cmd(home, server, "bob@example.net"), stdin=PLAIN)
    assert done.returncode == 69, done.stderr.decode()
    err = done.stderr.decode()
    assert "554" in err
    assert server.messages == []
    # Kept, but a retry is not offered as the way out of a permanent refusal alone.
    (item,) = Outbox.in_home(home).items()
    assert f"in the outbox as {item.id}: the refusal is permanent" in err
    assert f"`e2email outbox drop {item.id}`" in err


def test_unverified_certificate_is_76(home: Path, smtp_server: Server) -> None:
    other = TestCA()
    try:
        server = smtp_server(tls="implicit", ca=other)
        trusted = TestCA()
        try:
            cmd = [
                str(SCRIPT),
                f"--home={home}",
                f"--host={server.host}",
                f"--port={server.port}",
                "--tls-starttls=off",
                f"--tls-trust-file={trusted.ca_file}",
                "bob@example.net",
            ]
            done = run(cmd, stdin=PLAIN)
        finally:
            trusted.cleanup()
    finally:
        other.cleanup()
    assert done.returncode == 76, done.stderr.decode()
    assert done.stderr.decode().count("\n") == 1
    assert server.messages == []
    (item,) = Outbox.in_home(home).items()
    assert f"{item.id}: `e2email outbox retry` sends it once" in done.stderr.decode()


def test_refused_credentials_are_77(home: Path, smtp_server: Server) -> None:
    server = smtp_server(tls="implicit", credentials={"alice": "right"})
    done = run(
        sendmail_cmd(home, server, "--user=alice", "--passwordeval=echo wrong", "bob@example.net"),
        stdin=PLAIN,
    )
    assert done.returncode == 77, done.stderr.decode()
    assert server.auth_attempts == [("alice", False)]
    assert server.messages == []


@pytest.mark.parametrize(("errno", "code"), [(socket.EAI_NONAME, 68), (socket.EAI_AGAIN, 75)])
def test_server_name_not_found_is_68_lookup_failing_for_now_is_75(
    errno: int, code: int, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A name that does not exist is 68 (EX_NOHOST); a lookup that fails for now (offline) is
    75, queued. In-process, with the resolver answering as it would: no lookup leaves the
    machine."""
    from e2email.sendmail import run as run_sendmail

    def no_such_name(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(errno, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    status = run_sendmail(
        [f"--home={home}", "--host=mail.example.invalid", "--port=465", "bob@example.net"],
        stdin=io.BytesIO(PLAIN),
    )
    err = capsys.readouterr().err
    assert status == code, err
    assert err.count("\n") == 1
    assert "mail.example.invalid" in err
    (item,) = Outbox.in_home(home).items()
    assert f"in the outbox as {item.id}" in err
    assert ("queued" in err) == (code == 75)


def test_malformed_message_is_65(home: Path, server: LoopbackSMTPServer) -> None:
    bad = b"From: Alice <alice@example.org\nTo: bob@example.net\nSubject: x\n\nbody\n"
    done = run(sendmail_cmd(home, server, "bob@example.net"), stdin=bad)
    assert done.returncode == 65, done.stderr.decode()
    assert done.stderr.decode().count("\n") == 1
    assert server.connections == 0
    (draft,) = _drafts(home)
    assert draft.read_bytes() == bad


def test_protected_message_is_in_the_outbox_until_accepted(
    home: Path, server: LoopbackSMTPServer
) -> None:
    """The outbox holds the protected copies while they are sent (never plaintext), and
    nothing is left once the server accepted them."""
    done = run(sendmail_cmd(home, server, "bob@example.net"), stdin=PLAIN)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"" and done.stderr == b""
    assert Outbox.in_home(home).items() == ()
    assert _drafts(home) == []
    assert b"secret-body" not in (home / "outbox.sqlite3").read_bytes()
    head, _ = split_head(server.messages[0].data)
    assert b"secret-subject" not in head


def _pgp_mime(armored: bytes) -> bytes:
    """A PGP/MIME message (RFC 3156 §4) as mutt builds one when it encrypts itself."""
    return (
        (
            f"From: {ALICE}\nTo: bob@example.net\nSubject: already encrypted\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\n'
            ' boundary="b1"\n\n'
            "--b1\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n\n"
            "--b1\nContent-Type: application/octet-stream\n\n"
        ).encode()
        + armored.replace(b"\r\n", b"\n")
        + b"\n--b1--\n"
    )


def _gpg_encrypt(tmp_path: Path, *to: TestKey) -> bytes:
    ring = tmp_path / "ring"
    ring.mkdir(mode=0o700)
    for key in to:
        run(["gpg", "--homedir", str(ring), "--batch", "--import", str(key.cert)])
    done = run(
        ["gpg", "--homedir", str(ring), "--batch", "--trust-model", "always", "--armor",
         "--encrypt", *[a for key in to for a in ("-r", key.fingerprint)]],
        stdin=b"Content-Type: text/plain\n\nsecret-inner\n",
    )  # fmt: skip
    kill_agent(ring)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_already_encrypted_message_is_sent_as_it_is(
    home: Path,
    server: LoopbackSMTPServer,
    keys: Keys,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """A message the calling program encrypted itself (mutt can) to every recipient's key is
    not wrapped again: its ciphertext reaches the server unchanged and decrypts for bob."""
    armored = _gpg_encrypt(tmp_path, keys.bob, keys.alice)
    done = run(sendmail_cmd(home, server, "-oi", "bob@example.net"), stdin=_pgp_mime(armored))
    assert done.returncode == 0, done.stderr.decode()
    (message,) = server.messages
    _, (_, encrypted_part) = multipart_parts(message.data)
    received = part_body(encrypted_part).replace(b"\r\n", b"\n").strip()
    assert received == armored.replace(b"\r\n", b"\n").strip()
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted_part))
    assert "DECRYPTION_OKAY" in status
    assert b"secret-inner" in plaintext


def test_already_encrypted_but_not_to_the_recipient_is_67(
    home: Path, server: LoopbackSMTPServer, keys: Keys, recipients_home: Path, tmp_path: Path
) -> None:
    armored = _gpg_encrypt(tmp_path, keys.carol)
    done = run(sendmail_cmd(home, server, "-oi", "bob@example.net"), stdin=_pgp_mime(armored))
    assert done.returncode == 67, done.stderr.decode()
    assert "bob@example.net" in done.stderr.decode()
    assert server.connections == 0


# -- Accounts (config.toml) -----------------------------------------------------------------


def test_f_picks_the_account_whose_from_matches(
    home: Path, smtp_server: Server, tmp_path: Path
) -> None:
    """msmtp's rule: with no --account, -f (or --read-envelope-from) chooses the account
    whose `from` matches, else the default one; --account names one outright. The outbox
    records the account, so `e2email outbox retry` needs no server options."""
    default = smtp_server(tls="implicit")
    work = smtp_server(tls="implicit", refuse_recipients={"carol@example.com": (450, "later")})
    config = tmp_path / "config.toml"
    write_config(config, home, {"other": default})
    with config.open("a") as fh:
        fh.write(
            f'[accounts.work]\nhost = "{work.host}"\nport = {work.port}\ntls = "implicit"\n'
            f'ca-file = "{work.ca_file}"\nhome = "{home}"\nfrom = "alice@example.org"\n'
        )
    base = [str(SCRIPT), f"--config={config}"]
    for flags, server in [
        (["-f", "alice@example.org"], work),
        (["--read-envelope-from"], work),
        (["-f", "alice+git@example.org"], work),  # +detail removed, as msmtp does
        (["-f", "alice@example.org", "--account", "other"], default),
        ([], default),
    ]:
        before = (len(default.messages), len(work.messages))
        done = run([*base, *flags, "bob@example.net"], stdin=PLAIN)
        assert done.returncode == 0, (flags, done.stderr.decode())
        after = (len(default.messages), len(work.messages))
        expected = (before[0] + (server is default), before[1] + (server is work))
        assert after == expected, flags
    # A 4xx from the work server: the copy waits, recorded for that account.
    done = run([*base, "-f", "alice@example.org", "carol@example.com"], stdin=PLAIN)
    assert done.returncode == 75, done.stderr.decode()
    (item,) = Outbox.in_home(home).items()
    assert item.account == "work"


def test_config_mistakes_are_78_one_line_each_with_their_place(
    home: Path, server: LoopbackSMTPServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[accounts.work]\nhost = "127.0.0.1"\nport = "465"\nfrm = "alice@example.org"\n'
    )
    done = run(
        [str(SCRIPT), f"--config={config}", f"--home={home}", "bob@example.net"], stdin=PLAIN
    )
    assert done.returncode == 78, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"e2email-sendmail: error: {config}:3: ")
    assert "port" in lines[0]
    assert lines[1].startswith(f"e2email-sendmail: error: {config}:4: ")
    assert "frm" in lines[1]
    assert server.connections == 0
    # The message is kept; the last line says where.
    (draft,) = _drafts(home)
    assert draft.read_bytes() == PLAIN
    assert lines[1].endswith(f"(the message is saved in {draft})")


def test_server_down_is_75_queued(home: Path, smtp_server: Server) -> None:
    """Nothing listens on the port (the laptop is offline, the server restarts): 75, the
    protected message queued in the outbox, as msmtpq's users expect."""
    server = smtp_server(tls="implicit")
    server.stop()
    done = run(sendmail_cmd(home, server, "bob@example.net"), stdin=PLAIN)
    assert done.returncode == 75, done.stderr.decode()
    err = done.stderr.decode()
    assert err.count("\n") == 1
    (item,) = Outbox.in_home(home).items()
    assert f"in the outbox as {item.id}: queued" in err
    assert _drafts(home) == []
