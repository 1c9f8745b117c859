"""`e2email-sendmail`'s command line, input and exit statuses, without a server.

The end-to-end runs with real callers (git send-email, neomutt, PHP, cron's flags) are in
test_sendmail_callers.py.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pgp_helpers import kill_agent
from test_sendmail_callers import keys_home, sendmail_cmd  # noqa: F401 (keys_home: a fixture)

from e2email.config import TLSMode
from e2email.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CryptoError,
    DeliveryError,
    InsecurePathError,
    KeyProblem,
    KeyReason,
    MessageError,
    PassphraseError,
    RecipientKeyError,
    RecipientsRefusedError,
    SignerKeyError,
    SMTPReply,
    TLSError,
)
from e2email.sendmail import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOHOST,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_PROTOCOL,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Invocation,
    SendmailError,
    exit_code_for,
    parse_args,
    prepare,
    read_message,
)

SCRIPT = Path(sys.executable).parent / "e2email-sendmail"


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default home and accounts file (platformdirs) are in the test's folder, never the
    user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.delenv("E2EMAIL_HOME", raising=False)
    monkeypatch.delenv("E2EMAIL_CONFIG", raising=False)


# -- The command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # mutt / neomutt: `sendmail -oem -oi -- rcpt...`
        (["-oem", "-oi", "--", "bob@example.net", "carol@example.com"],
         Invocation(recipients=("bob@example.net", "carol@example.com"))),
        # git send-email: `-i rcpt...` and `-f sender`
        (["-i", "-f", "alice@example.org", "bob@example.net"],
         Invocation(recipients=("bob@example.net",),
                    envelope_from="alice@example.org")),
        # PHP: `sendmail -t -i`, plus `-f` from mail()'s fifth argument
        (["-t", "-i", "-falice@example.org"],
         Invocation(read_recipients=True, envelope_from="alice@example.org")),
        # Debian cron
        (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "bob@example.net"],
         Invocation(recipients=("bob@example.net",), full_name="CronDaemon")),
        # Vixie cron
        (["-FCronDaemon", "-odi", "-oem", "-oi", "-t"],
         Invocation(read_recipients=True, full_name="CronDaemon")),
        # grouped flags and attached values, as getopt reads them
        (["-ti", "-r", "<alice@example.org>", "-F", "Alice Demo"],
         Invocation(read_recipients=True, envelope_from="alice@example.org",
                    full_name="Alice Demo")),
        # accepted and ignored (msmtp's list)
        (["-bm", "-G", "-h", "17", "-L", "tag", "-m", "-n", "-O", "x=y", "-B", "7BIT", "-v",
          "-oQ/var/spool", "bob@example.net"],
         Invocation(recipients=("bob@example.net",))),
        # recipients before options, as GNU getopt permutes
        (["bob@example.net", "-i"], Invocation(recipients=("bob@example.net",))),
        # "--" makes what follows recipients even when it looks like an option
        (["--", "-t"], Invocation(recipients=("-t",))),
        (["--account=work", "--config", "/etc/e2.toml", "--read-envelope-from", "x@example.org"],
         Invocation(recipients=("x@example.org",), account="work", config=Path("/etc/e2.toml"),
                    read_envelope_from=True)),
        (["-a", "work", "-C", "/etc/e2.toml", "--read-recipients"],
         Invocation(account="work", config=Path("/etc/e2.toml"), read_recipients=True)),
        (["--host=mail.example.org", "--port", "465", "--tls-starttls=off",
          "--tls-trust-file=/ca.pem", "--user=alice", "--from=alice@example.org", "--tls"],
         Invocation(host="mail.example.org", port=465, tls=TLSMode.IMPLICIT,
                    ca_file=Path("/ca.pem"), user="alice", envelope_from="alice@example.org")),
    ],
)  # fmt: skip
def test_callers_command_lines_parse(argv: list[str], expected: Invocation) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-x", "bob@example.net"], "unknown option -x"),
        (["-tx"], "unknown option -x"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (["-f"], "option -f needs a value"),
        (["-bs"], "mode -bs is not supported"),
        (["-bp"], "mode -bp is not supported"),
        (["-f", "<>", "bob@example.net"], "null sender"),
        (["-f", "a@example.org", "--read-envelope-from"], "either -f/--from or"),
        (["--host=h", "--account=a"], "not both"),
        (["--port=99999"], "out of range"),
        (["--port=abc"], "takes a number"),
        (["--read-recipients=yes"], "takes no value"),
        (["-F", "x\nBcc: eve@example.com", "bob@example.net"], "one line"),
        (["bob@example.net\nBcc: eve@example.com"], "one line"),
        (["--tls-starttls=maybe"], "on or off"),
    ],
)
def test_bad_command_lines_are_usage_errors(argv: list[str], says: str) -> None:
    with pytest.raises(SendmailError, match=says) as caught:
        parse_args(argv)
    assert caught.value.code == EX_USAGE


def test_tls_off_is_refused_as_configuration() -> None:
    with pytest.raises(SendmailError, match="never sends without TLS") as caught:
        parse_args(["--tls=off", "bob@example.net"])
    assert caught.value.code == EX_CONFIG


# -- Standard input -----------------------------------------------------------------------

MESSAGE = b"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: hi\n\nline one\n"


@pytest.mark.parametrize("argv", [[], ["-i"], ["-oi"]])
def test_lone_dot_is_content_with_or_without_i(argv: list[str]) -> None:
    """mutt calls a `sendmail` the user sets with `-- rcpt` only (no -oi): a lone dot in the
    body must not cut the message short there, whatever the flags (msmtp's rule)."""
    parse_args([*argv, "bob@example.net"])
    data = MESSAGE + b".\nafter the dot\n"
    assert read_message(io.BytesIO(data)) == data
    crlf = data.replace(b"\n", b"\r\n")
    assert read_message(io.BytesIO(crlf)) == crlf


def test_mbox_from_line_is_dropped() -> None:
    data = b"From alice@example.org Thu Jan  1 00:00:00 2026\n" + MESSAGE
    assert read_message(io.BytesIO(data)) == MESSAGE


@pytest.mark.parametrize("data", [b"", b"From alice@example.org Thu Jan  1\n"])
def test_no_input_is_66(data: bytes) -> None:
    with pytest.raises(SendmailError, match="no message") as caught:
        read_message(io.BytesIO(data))
    assert caught.value.code == EX_NOINPUT


@pytest.mark.parametrize("data", [b"\n\n", b"\r\n", b" \n\t\n"])
def test_only_blank_lines_is_65_malformed(data: bytes) -> None:
    """Input without a header is a malformed message (65), not a missing one (66)."""
    with pytest.raises(SendmailError, match="no header") as caught:
        read_message(io.BytesIO(data))
    assert caught.value.code == EX_DATAERR


# -- Recipients, envelope sender, From ------------------------------------------------------

HEADERS = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>, carol@example.com\r\n"
    b"Cc: =?utf-8?q?Dav=C3=A9?= <dave@example.com>\r\n"
    b"Bcc: erin@example.com\r\n"
    b"Subject: hi\r\n\r\nbody\r\n"
)


def test_t_adds_to_cc_bcc_to_the_command_line_recipients() -> None:
    got = prepare(parse_args(["-t", "x@example.org", "BOB@example.net"]), HEADERS)
    assert got.recipients == (
        "x@example.org",
        "BOB@example.net",
        "carol@example.com",
        "dave@example.com",
        "erin@example.com",
    )
    assert got.raw == HEADERS
    assert got.envelope_from is None


def test_without_t_only_the_command_line_counts() -> None:
    got = prepare(parse_args(["bob@example.net"]), HEADERS)
    assert got.recipients == ("bob@example.net",)


def test_a_recipient_argument_may_hold_a_list() -> None:
    got = prepare(parse_args(["Bob <bob@example.net>, carol@example.com"]), HEADERS)
    assert got.recipients == ("bob@example.net", "carol@example.com")


def test_no_recipients() -> None:
    with pytest.raises(SendmailError) as caught:
        prepare(parse_args([]), HEADERS)
    assert caught.value.code == EX_USAGE
    bare = b"From: alice@example.org\nSubject: x\n\nbody\n"
    with pytest.raises(SendmailError, match="names no recipients") as caught:
        prepare(parse_args(["-t"]), bare)
    assert caught.value.code == EX_DATAERR


def test_local_user_recipient_is_no_user() -> None:
    """cron's default MAILTO is the crontab's owner ("root"): it has no key and there is no
    local delivery, so it is refused as sendmail refuses an unknown user (67)."""
    with pytest.raises(SendmailError, match="root: not a full email address") as caught:
        prepare(parse_args(["-oem", "root"]), HEADERS)
    assert caught.value.code == EX_NOUSER


def test_resent_fields_with_t_are_refused() -> None:
    resent = b"Resent-To: eve@example.com\r\n" + HEADERS
    with pytest.raises(SendmailError, match="Resent-") as caught:
        prepare(parse_args(["-t"]), resent)
    assert caught.value.code == EX_DATAERR


def test_read_envelope_from() -> None:
    got = prepare(parse_args(["--read-envelope-from", "bob@example.net"]), HEADERS)
    assert got.envelope_from == "alice@example.org"
    with pytest.raises(SendmailError, match="no From") as caught:
        prepare(parse_args(["--read-envelope-from", "bob@example.net"]), b"Subject: x\n\nb\n")
    assert caught.value.code == EX_DATAERR


def test_missing_from_is_added_with_the_F_name() -> None:
    raw = b"To: bob@example.net\nSubject: x\n\nbody\n"
    crlf = raw.replace(b"\n", b"\r\n")
    got = prepare(parse_args(["-F", "Zoë Demo", "-f", "alice@example.org", "-t"]), raw)
    first, rest = got.raw.split(b"\r\n", 1)
    assert rest == crlf
    parsed = email.message_from_bytes(got.raw, policy=email.policy.default)
    assert (first.isascii(), parsed["From"]) == (True, "Zoë Demo <alice@example.org>")
    # Without -f, the account's own address.
    got = prepare(parse_args(["-t"]), raw, sender="alice@example.org")
    assert got.raw == b"From: alice@example.org\r\n" + crlf
    with pytest.raises(SendmailError, match="no From field and no sender") as caught:
        prepare(parse_args(["-t"]), raw)
    assert caught.value.code == EX_DATAERR


def test_present_from_is_kept_and_F_ignored() -> None:
    got = prepare(parse_args(["-FCronDaemon", "-f", "x@example.org", "bob@example.net"]), HEADERS)
    assert got.raw == HEADERS
    assert got.envelope_from == "x@example.org"


def test_cron_from_root_becomes_the_sender_with_its_name() -> None:
    """Debian cron writes `From: root (Cron Daemon)`: a local name cannot sign; the account's
    address takes its place, with the name the field gave (or -F's)."""
    raw = (
        b"From: root (Cron Daemon)\nTo: bob@example.net\n \nSubject: Cron <root@host> true\n\nout\n"
    )
    got = prepare(parse_args(["-i", "bob@example.net"]), raw, sender="alice@example.org")
    assert got.raw == (
        b"From: Cron Daemon <alice@example.org>\r\nTo: bob@example.net\r\n"
        b" \r\nSubject: Cron <root@host> true\r\n\r\nout\r\n"
    )
    got = prepare(parse_args(["-FCronDaemon", "bob@example.net"]), raw, sender="a@example.org")
    assert got.raw.startswith(b"From: CronDaemon <a@example.org>\r\nTo:")
    encoded = b"From: =?utf-8?q?Zo=C3=AB?= <zoe>\n" + raw.split(b"\n", 1)[1]
    got = prepare(parse_args(["bob@example.net"]), encoded, sender="a@example.org")
    parsed = email.message_from_bytes(got.raw, policy=email.policy.default)
    assert parsed["From"] == "Zoë <a@example.org>"


# -- Exit statuses ------------------------------------------------------------------------


def _gaierror(code: int) -> ConnectError:
    try:
        try:
            raise socket.gaierror(code, "lookup failed")
        except socket.gaierror as exc:
            raise ConnectError("cannot reach mail.example.invalid") from exc
    except ConnectError as error:
        return error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MessageError("bad header"), EX_DATAERR),
        (RecipientKeyError([KeyProblem("bob@example.net", KeyReason.NOT_FOUND)]), EX_NOUSER),
        (SignerKeyError(KeyProblem("alice@example.org", KeyReason.NO_SECRET_KEY)), EX_CONFIG),
        (PassphraseError("wrong passphrase"), EX_NOPERM),
        (ConfigError("bad"), EX_CONFIG),
        (InsecurePathError("loose", path=Path("/x")), EX_CONFIG),
        (CryptoError("gpg failed"), EX_SOFTWARE),
        (TLSError("certificate not verified"), EX_PROTOCOL),
        (TLSError("STARTTLS", reply=SMTPReply(454, "later")), EX_TEMPFAIL),
        (AuthenticationError("refused", reply=SMTPReply(535, "no")), EX_NOPERM),
        (AuthenticationError("later", reply=SMTPReply(454, "try later")), EX_TEMPFAIL),
        (DeliveryError("refused", reply=SMTPReply(554, "no")), EX_UNAVAILABLE),
        (DeliveryError("later", reply=SMTPReply(451, "later")), EX_TEMPFAIL),
        (RecipientsRefusedError([("b@x.org", SMTPReply(550, "no"))]), EX_UNAVAILABLE),
        (
            RecipientsRefusedError(
                [("b@x.org", SMTPReply(450, "later")), ("c@x.org", SMTPReply(550, "no"))]
            ),
            EX_UNAVAILABLE,
        ),
        (RecipientsRefusedError([("b@x.org", SMTPReply(450, "later"))]), EX_TEMPFAIL),
        (
            RecipientsRefusedError([("b@x.org", SMTPReply(530, "5.7.0 Authentication required"))]),
            EX_NOPERM,
        ),
        (
            RecipientsRefusedError([("b@x.org", SMTPReply(550, "5.7.0 Authentication needed"))]),
            EX_NOPERM,
        ),
        (DeliveryError("mail", reply=SMTPReply(530, "5.7.0 Authentication required")), EX_NOPERM),
        # 5.7.0 is any security refusal: a spam filter's is not "authentication required".
        (DeliveryError("data", reply=SMTPReply(554, "5.7.0 Reject, spam")), EX_UNAVAILABLE),
        (
            RecipientsRefusedError(
                [("b@x.org", SMTPReply(530, "5.7.0 auth")), ("c@x.org", SMTPReply(550, "no"))]
            ),
            EX_UNAVAILABLE,
        ),
        (ConnectError("refused"), EX_TEMPFAIL),
        (ConnectError("greeting", reply=SMTPReply(554, "go away")), EX_UNAVAILABLE),
        (_gaierror(socket.EAI_NONAME), EX_NOHOST),
        (_gaierror(socket.EAI_AGAIN), EX_TEMPFAIL),
        (RuntimeError("a bug"), EX_SOFTWARE),
    ],
)
def test_exit_code_for_each_error(error: BaseException, code: int) -> None:
    assert exit_code_for(error) == code


# -- The commands, as processes -----------------------------------------------------------


def _run(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [*args], input=stdin, capture_output=True, timeout=60, check=False, env=env
    )
    return done.returncode, done.stderr.decode()


def test_console_script_unknown_flag_is_64_with_one_line() -> None:
    code, err = _run(str(SCRIPT), "-q", "bob@example.net", stdin=MESSAGE)
    assert code == EX_USAGE
    assert err == "e2email-sendmail: error: unknown option -q (see `e2email-sendmail --help`)\n"


def test_subcommand_passes_sendmail_flags_through(tmp_path: Path) -> None:
    """`e2email sendmail` hands its arguments to the sendmail parser untouched (click would
    refuse -oem or -FCronDaemon), and exits with the same statuses."""
    e2email = str(Path(sys.executable).parent / "e2email")
    code, err = _run(e2email, "--home", str(tmp_path / "h"), "sendmail", "-oem", "-oi", "--")
    assert (code, err.count("\n")) == (EX_NOINPUT, 1), err
    code, err = _run(e2email, "sendmail", "-FCronDaemon", "-Z")
    assert code == EX_USAGE
    assert "unknown option -Z" in err
    done = subprocess.run([e2email, "sendmail", "--help"], capture_output=True, check=False)
    assert done.returncode == 0
    assert b"-t, --read-recipients" in done.stdout


def test_no_server_configured_is_78_and_message_saved(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, err = _run(
        str(SCRIPT),
        f"--home={home}",
        "--config",
        str(tmp_path / "missing.toml"),
        "bob@example.net",
        stdin=MESSAGE,
    )
    assert code == EX_CONFIG, err
    assert err.count("\n") == 1
    drafts = list((home / "drafts").iterdir())
    assert len(drafts) == 1
    assert drafts[0].read_bytes() == MESSAGE
    assert drafts[0].stat().st_mode & 0o077 == 0
    assert str(drafts[0]) in err


def test_read_envelope_from_picks_the_account_as_f_does(tmp_path: Path) -> None:
    """The mailer (the account) is chosen with the From address the message gives, as with
    -f (msmtp's rule)."""
    from e2email.sendmail import run

    seen: list[Invocation] = []

    def factory(invocation: Invocation) -> Any:
        seen.append(invocation)
        raise ConfigError("stop here")

    argv = [f"--home={tmp_path}", "--read-envelope-from", "bob@example.net"]
    assert run(argv, stdin=io.BytesIO(HEADERS), mailer_factory=factory) == EX_CONFIG
    assert seen[0].envelope_from == "alice@example.org"
    argv = [f"--home={tmp_path}", "-f", "x@example.org", "bob@example.net"]
    assert run(argv, stdin=io.BytesIO(HEADERS), mailer_factory=factory) == EX_CONFIG
    assert seen[1].envelope_from == "x@example.org"


def test_usage_and_data_errors_come_before_the_configuration(tmp_path: Path) -> None:
    """No recipients is a usage error (64) and a header that is not one a data error (65),
    even where no server is configured (which would be 78): the real mistake is named."""
    home = tmp_path / "home"
    code, err = _run(str(SCRIPT), f"--home={home}", stdin=MESSAGE)
    assert code == EX_USAGE, err
    assert "no recipients" in err
    code, err = _run(
        str(SCRIPT), f"--home={home}", "bob@example.net", stdin=b"not a header\n\nbody\n"
    )
    assert code == EX_DATAERR, err
    assert err.count("\n") == 1
    # Both messages are kept.
    assert sorted(p.read_bytes() for p in (home / "drafts").iterdir()) == sorted(
        [MESSAGE, b"not a header\n\nbody\n"]
    )


def test_closed_stdin_is_66(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(SCRIPT), f"--home={tmp_path}", "bob@example.net"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    assert done.returncode == EX_NOINPUT
    closed = subprocess.run(
        [str(SCRIPT), f"--home={tmp_path}", "bob@example.net"],
        capture_output=True,
        check=False,
        # fd 0 closed, as some daemons start their children.
        preexec_fn=lambda: os.close(0),
    )
    assert closed.returncode == EX_NOINPUT, closed.stderr
    assert closed.stderr.decode().count("\n") == 1


# -- Authentication required, against a real server ---------------------------------------


@pytest.fixture
def alice_home(keys_home: Path) -> Iterator[Path]:  # noqa: F811 (the fixture, imported)
    """A copy of Alice's home (her key, Bob's certificate) for one test, as
    test_sendmail_callers.home; a short path: gpg-agent puts its socket in the GnuPG home."""
    base = Path(tempfile.mkdtemp(prefix="e2sm", dir="/tmp"))
    copy = base / "h"
    shutil.copytree(keys_home, copy, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    yield copy
    kill_agent(copy / "gnupg")
    shutil.rmtree(base, ignore_errors=True)


def test_a_server_that_requires_auth_given_no_credentials_is_77(
    alice_home: Path, smtp_server: Any
) -> None:
    """`530 5.7.0 Authentication required` at MAIL (RFC 4954 section 6) when no credentials
    are configured is a permission problem (77, as refused credentials are), not a refusal
    of every recipient (69); nothing is delivered and the protected message is kept."""
    server = smtp_server(tls="implicit", credentials={"app": "app-password"})
    done = subprocess.run(
        [*sendmail_cmd(alice_home, server), "bob@example.net"],
        input=MESSAGE,
        capture_output=True,
        timeout=120,
        check=False,
    )
    err = done.stderr.decode()
    assert done.returncode == EX_NOPERM, err
    assert server.messages == []
