"""Messages made by real programs' conventions, through e2email.inbound.submit, checked on the
bytes a real TLS SMTP server received with gpg and sqop (nothing re-serialised on the way)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from fixtures_smime import PKI, Identity
from pgp_helpers import (
    gpg,
    gpg_decrypt,
    gpg_verify,
    list_packet_key_ids,
    multipart_parts,
    part_body,
    sop_decrypt,
    sop_verify,
    split_head,
    subkey_ids,
)

from e2email import AsyncMailer, Mailer, Protection, Scheme, SMTPSettings, TLSMode
from e2email.certstore import CertStore
from e2email.errors import KeyReason, MessageError, RecipientKeyError
from e2email.inbound import protect, recipients_without_keys, submit, submit_sync
from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

PATCH = (
    "From 1a2b3c Mon Sep 17 00:00:00 2001\n"
    "From: A U Thor <alice@example.org>\n"
    "To: Bob <bob@example.net>\n"
    "Cc: carol@example.com\n"
    "Subject: [PATCH 1/2] =?UTF-8?q?gr=C3=BC=C3=9Fe:?= fix the greeting\n"
    "Date: Sun, 6 Dec 2026 11:00:00 +0100\n"
    "Message-ID: <20261206100000.1-1-alice@example.org>\n"
    "In-Reply-To: <cover.1@example.org>\n"
    "References: <cover.1@example.org>\n"
    "X-Mailer: git-send-email 2.39.5\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "The greeting said Gruesse; it is Grüße.\n"
    "From now on it is right.\n"
    "\n"
    "Signed-off-by: A U Thor <alice@example.org>\n"
    "---\n"
    " hello.c | 2 +-\n"
    " 1 file changed, 1 insertion(+), 1 deletion(-)\n"
    "\n"
    "diff --git a/hello.c b/hello.c\n"
    "--- a/hello.c\n"
    "+++ b/hello.c\n"
    "@@ -1,3 +1,3 @@\n"
    " int main(void) {\n"
    '-\tputs("Gruesse"); \n'
    '+\tputs("Grüße");\n'
    " \n"
    "-- \n"
    "2.39.5\n"
    "\n"
)
PATCH_BODY = PATCH.split("\n\n", 1)[1]


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


def _mailer(store: Keystore, server: LoopbackSMTPServer, **prot: object) -> AsyncMailer:
    return AsyncMailer(
        smtp=_settings(server),
        keystore=store,
        protection=Protection(**prot),  # type: ignore[arg-type]
    )


def _armored(raw: bytes) -> bytes:
    _, (version, encrypted) = multipart_parts(raw)
    assert part_body(version).strip() == b"Version: 1"
    return part_body(encrypted)


def _decrypt(home: Path, raw: bytes, keys: Keys) -> EmailMessage:
    plaintext, status = gpg_decrypt(home, _armored(raw))
    assert "DECRYPTION_OKAY" in status
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    parsed = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _no_bcc_line(data: bytes) -> bool:
    """No Bcc header line anywhere in ``data`` (the letters alone may occur by chance in an
    armored ciphertext's base64)."""
    return not any(line.lower().startswith(b"bcc:") for line in data.split(b"\r\n"))


def test_git_send_email_patch_decrypts_to_the_exact_patch(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """An 8bit UTF-8 patch as git send-email writes it (LF, mbox From line, trailing spaces,
    "From " in the text) arrives encrypted; gpg and sqop decrypt it, the text decodes to the
    patch byte for byte, and the headers are protected per RFC 9788."""
    server = smtp_server(tls="implicit")
    mailer = _mailer(sender_store, server)
    result = asyncio.run(
        submit(
            mailer,
            PATCH.encode(),
            envelope_from="alice@example.org",
            recipients=["bob@example.net", "carol@example.com"],
        )
    )
    assert sorted(result.accepted) == ["bob@example.net", "carol@example.com"]
    (received,) = server.messages
    raw = received.data
    assert received.mail_from == "alice@example.org"
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert outer["Subject"] == "[...]"
    # Threading stays readable outside (RFC 9788 baseline); the mailer does not.
    assert outer["In-Reply-To"] == "<cover.1@example.org>"
    assert outer["References"] == "<cover.1@example.org>"
    assert b"X-Mailer" not in raw and b"git-send-email" not in raw
    assert b"greeting" not in raw
    raw.decode("ascii")  # 7-bit on the wire

    inner = _decrypt(recipients_home, raw, keys)
    assert inner["Subject"] == "[PATCH 1/2] grüße: fix the greeting"
    assert inner["X-Mailer"] == "git-send-email 2.39.5"
    assert inner["Message-ID"] == "<20261206100000.1-1-alice@example.org>"
    assert 'hp="cipher"' in inner["Content-Type"]
    assert inner.get_content_type() == "text/plain"
    assert inner.get_content_charset() == "utf-8"
    payload = inner.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == PATCH_BODY.encode()
    # Not only decoded: the entity's body is the patch as written (8-bit, "-- ", " "), line
    # ends CRLF, nothing re-encoded (OpenPGP literal data needs no 7-bit form).
    plaintext = gpg_decrypt(recipients_home, _armored(raw))[0]
    assert plaintext.split(b"\r\n\r\n", 1)[1] == PATCH_BODY.encode().replace(b"\n", b"\r\n")
    # sqop reads the same bytes.
    assert keys.bob.secret is not None
    plain, _ = sop_decrypt("sqop", _armored(raw), keys.bob.secret, keys.alice.cert, tmp_path)
    assert plain == gpg_decrypt(recipients_home, _armored(raw))[0]


def test_envelope_recipient_not_in_the_header_gets_a_separate_copy_without_bcc(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """mutt passes Bcc recipients on the command line and strips the header: each gets a
    copy of its own, encrypted only to them (and the sender); a Bcc header is never sent and
    a Bcc header address that is not an envelope recipient gets nothing."""
    server = smtp_server(tls="implicit")
    raw = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nBcc: erin@example.com\r\n"
        b"Subject: hi\r\n\r\nsecret text\r\n"
    )
    mailer = _mailer(sender_store, server)
    submit_result = asyncio.run(
        submit(mailer, raw, recipients=["bob@example.net", "dave@example.com"])
    )
    assert sorted(submit_result.accepted) == ["bob@example.net", "dave@example.com"]
    by_rcpts = {m.rcpt_tos: m.data for m in server.messages}
    assert set(by_rcpts) == {("bob@example.net",), ("dave@example.com",)}
    dave_ids = subkey_ids(recipients_home, keys.dave.fingerprint)
    for rcpts, data in by_rcpts.items():
        # The address and a Bcc header line, not the bare letters: "Bcc" or "erin" may
        # occur by chance in the armored ciphertext's base64.
        assert b"erin@example.com" not in data and _no_bcc_line(data)
        packet_ids = list_packet_key_ids(recipients_home, _armored(data))
        assert bool(packet_ids & dave_ids) == (rcpts == ("dave@example.com",))
        inner = _decrypt(recipients_home, data, keys)
        assert inner["Bcc"] is None and "erin@example.com" not in inner.as_string()
        assert inner.get_content().strip() == "secret text"


def test_recipient_without_key_sends_nothing(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    server = smtp_server(tls="implicit")
    raw = b"From: alice@example.org\nTo: bob@example.net, nobody@example.com\nSubject: x\n\nhi\n"
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert info.value.addresses == ("nobody@example.com",)
    assert server.messages == [] and server.transcript == []


def test_recipients_without_keys_names_each_with_its_reason(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    mailer = _mailer(sender_store, smtp_server(tls="implicit"))
    missing = recipients_without_keys(
        mailer, ["bob@example.net", "Nobody@Example.COM", "expired@example.com", "not an address"]
    )
    # Each keyed as the caller wrote it (a relay looks up the RCPT address it has).
    assert set(missing) == {"Nobody@Example.COM", "expired@example.com", "not an address"}
    assert missing["Nobody@Example.COM"].startswith(KeyReason.NOT_FOUND.value)
    assert missing["expired@example.com"].startswith(KeyReason.EXPIRED.value)
    assert (
        recipients_without_keys(
            mailer, ["nobody@example.com"], protection=Protection(encrypt=False)
        )
        == {}
    )


def _encrypted_by_the_program(keys: Keys, home: Path, *to: str, hidden: bool = False) -> bytes:
    """A PGP/MIME message as mutt makes it (encrypted with gpg by the calling program)."""
    inner = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nencrypted by mutt\r\n"
    args = [a for k in to for a in ("--recipient", k)] + (["--throw-keyids"] if hidden else [])
    armored = gpg(
        home, "--trust-model", "always", "--armor", "--encrypt", *args, input=inner
    ).stdout.replace(b"\n", b"\r\n")
    return (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
        b"Bcc: dave@example.com\r\nSubject: mutt\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="mutt1"\r\n\r\n'
        b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
        b"--mutt1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b'--mutt1\r\nContent-Type: application/octet-stream; name="msg.asc"\r\n\r\n'
        + armored
        + b"\r\n--mutt1--\r\n"
    )


def test_the_engine_reading_a_programs_encryption_is_chosen_by_its_content_type(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """A PGP/MIME message whose Subject names another scheme is still read as PGP/MIME (the
    parsed Content-Type decides, not a word anywhere in the header)."""
    raw = _encrypted_by_the_program(keys, recipients_home, "bob@example.net", "dave@example.com")
    raw = raw.replace(b"Subject: mutt", b"Subject: Re: pkcs7-mime or pgp?")
    server = smtp_server(tls="implicit")
    result = asyncio.run(submit(_mailer(sender_store, server), raw))
    assert sorted(result.accepted) == ["bob@example.net", "dave@example.com"]


@pytest.mark.parametrize("before", [b"x", b""], ids=["inside a line", "at a line start"])
def test_an_armored_block_in_the_preamble_does_not_stand_in_for_the_encrypted_part(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    before: bytes,
) -> None:
    """RFC 3156 §4: the OpenPGP message is the second body part. A decoy block in the
    preamble, encrypted to every recipient, must not hide that the real part is encrypted
    to bob only: dave is refused, nothing is sent."""
    decoy = _encrypted_by_the_program(keys, recipients_home, "bob@example.net", "dave@example.com")
    decoy_armor = decoy[decoy.index(b"-----BEGIN PGP") : decoy.index(b"-----END PGP")]
    decoy_armor += b"-----END PGP MESSAGE-----\r\n"
    real = _encrypted_by_the_program(keys, recipients_home, "bob@example.net")
    marker = b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
    raw = real.replace(marker, marker + before + decoy_armor)
    server = smtp_server(tls="implicit")
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert [(p.address, p.reason) for p in info.value.problems] == [
        ("dave@example.com", KeyReason.NOT_ENCRYPTED_TO)
    ]
    assert server.messages == []


def test_already_encrypted_message_is_sent_as_it_is(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """Encrypted by the program to every envelope recipient: sent byte for byte (only the
    Bcc header dropped and a Date and Message-ID added), not wrapped again."""
    raw = _encrypted_by_the_program(keys, recipients_home, "bob@example.net", "dave@example.com")
    server = smtp_server(tls="implicit")
    result = asyncio.run(submit(_mailer(sender_store, server), raw))
    assert sorted(result.accepted) == ["bob@example.net", "dave@example.com"]
    (received,) = server.messages
    data = received.data
    assert _no_bcc_line(data)
    body_start = raw.index(b"MIME-Version")
    assert data.endswith(raw[body_start:])
    assert data.count(b"multipart/encrypted") == 1
    head = split_head(data)[0]
    assert b"\r\nDate: " in b"\r\n" + head and b"Message-ID: <" in head


def test_already_encrypted_but_not_to_a_recipient_is_refused(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    raw = _encrypted_by_the_program(keys, recipients_home, "bob@example.net")
    server = smtp_server(tls="implicit")
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    (problem,) = info.value.problems
    assert problem.address == "dave@example.com"
    assert problem.reason is KeyReason.NOT_ENCRYPTED_TO
    assert server.transcript == []


def test_signed_only_message_with_an_encrypt_policy_is_refused(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    raw = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n"
        b"Content-Type: multipart/signed; micalg=pgp-sha256;\r\n"
        b' protocol="application/pgp-signature"; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n"
    )
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError, match="already PGP/MIME signed but not encrypted"):
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert server.transcript == []


def test_submit_sync_sends_through_the_facade(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    server = smtp_server(tls="implicit")
    raw = b"To: bob@example.net\nSubject: cron\n\nno From header\n"
    with Mailer(smtp=_settings(server), keystore=sender_store) as mailer:
        result = submit_sync(mailer, raw, envelope_from="alice@example.org")
    assert result.accepted == ("bob@example.net",)
    inner = _decrypt(recipients_home, server.messages[0].data, keys)
    assert inner["From"] == "alice@example.org"
    assert inner["Date"] is not None and inner["Message-ID"] is not None


# -- Messages made by the real programs, end to end ---------------------------------------------

CAPTURE = """#!/bin/sh
# Stands in for sendmail: keeps the arguments and the message each call hands over.
n=$(date +%s%N)
printf '%s\\n' "$@" > "$(dirname "$0")/$n.args"
cat > "$(dirname "$0")/$n.eml"
"""


@dataclass(frozen=True)
class Sample:
    raw: bytes
    #: The sendmail command line's recipients (None: ``-t``, from the header).
    recipients: tuple[str, ...] | None = None
    #: ``-f`` (or the account's ``from``, as the sendmail command fills it in).
    envelope_from: str | None = None


def _capture(tmp_path: Path) -> Path:
    folder = tmp_path / "captured"
    folder.mkdir()
    script = folder / "sendmail"
    script.write_text(CAPTURE)
    script.chmod(0o755)
    return script


def _captured(script: Path) -> list[Sample]:
    out = []
    for eml in sorted(script.parent.glob("*.eml")):
        args = eml.with_suffix(".args").read_text().split()
        rcpts = tuple(a for a in args if not a.startswith("-"))
        out.append(Sample(eml.read_bytes(), rcpts or None))
    return out


def _need(program: str) -> str:
    path = shutil.which(program) or (
        f"/usr/lib/git-core/{program}" if Path(f"/usr/lib/git-core/{program}").exists() else None
    )
    if path is None:
        pytest.skip(f"{program} is not installed (tools/install.sh --test installs it)")
    return path


def _program_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "GIT_CONFIG_NOSYSTEM": "1",
        "LANG": "C.UTF-8",
    }


def git_send_email_series(tmp_path: Path) -> list[Sample]:
    """Two patches as `git send-email` pipes them to sendmail: 8bit UTF-8 patch text with a
    trailing space, an in-body From, threading fields, the author in Cc, a Bcc on the
    command line only."""
    _need("git-send-email")
    script = _capture(tmp_path)
    env = _program_env(tmp_path)
    repo = tmp_path / "repo"

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)

    repo.mkdir()
    git("init", "-q")
    git("config", "user.name", "Alice Ä")
    git("config", "user.email", "alice@example.org")
    (repo / "hello.c").write_text('int main(void) {\n\tputs("Gruesse"); \n}\n')
    git("add", ".")
    git("commit", "-qm", "init")
    (repo / "hello.c").write_text('int main(void) {\n\tputs("Grüße");\n}\n')
    git("commit", "-qam", "grüße: fix the greeting\n\nFrom now on it is right.")
    (repo / "hello.c").write_text('int main(void) {\n\tputs("Grüße");\n}\n' + "x" * 1200 + "\n")
    git("commit", "-qam", "second: a very long line")
    git(
        "send-email", f"--sendmail-cmd={script}", "--to=bob@example.net",
        "--cc=carol@example.com", "--bcc=dave@example.com", "--from=Alice <alice@example.org>",
        "--confirm=never", "--quiet", "-2",
    )  # fmt: skip
    samples = _captured(script)
    assert len(samples) == 2
    return samples


def neomutt_attachment(tmp_path: Path) -> Sample:
    """neomutt in batch mode: multipart/mixed (8bit text, base64 attachment), Bcc stripped
    from the header and given on the command line (`-oem -oi -- rcpt...` style)."""
    program = _need("neomutt")
    script = _capture(tmp_path)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 20)
    subprocess.run(
        [
            program, "-n", "-F", "/dev/null", "-e", f'set sendmail="{script}"',
            "-e", 'set from="Alice <alice@example.org>"', "-e", "set use_from=yes",
            "-e", "set send_charset=utf-8", "-s", "Dätei", "-c", "carol@example.com",
            "-b", "dave@example.com", "-a", str(data), "--", "bob@example.net",
        ],
        input="See the attached file, Zoë.\nFrom me, with trailing space \n".encode(),
        env=_program_env(tmp_path),
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    (sample,) = _captured(script)
    return sample


def php_mail(tmp_path: Path) -> Sample:
    """PHP's mail() with `sendmail_path = "... -t -i"`: CRLF header, LF body (mixed line
    ends), recipients from the header."""
    program = _need("php")
    script = _capture(tmp_path)
    code = (
        'mail("bob@example.net", "Kontakt", "Name: Jörg\\nLine two   \\nFrom here\\n",'
        ' "From: alice@example.org\\r\\nCc: carol@example.com\\r\\n'
        'X-Mailer: PHP/" . phpversion());'
    )
    subprocess.run(
        [program, "-d", f"sendmail_path={script} -t -i", "-r", code],
        env=_program_env(tmp_path),
        check=True,
        capture_output=True,
        timeout=60,
    )
    (sample,) = _captured(script)
    return Sample(sample.raw, None)


CRON = Sample(
    b"From: root (Cron Daemon)\nTo: bob@example.net\nSubject: Cron <root@host> run-parts\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n"
    b"X-Cron-Env: <LOGNAME=root>\n\n/etc/cron.daily/backup:\n\xe2\x9c\x93 done  \n",
    ("bob@example.net",),
    # cron names no envelope sender and an unqualified From: the account's address fills it.
    "alice@example.org",
)


def django_like() -> Sample:
    """The structure Django's EmailMultiAlternatives builds (mixed > alternative + two
    attachments; 8bit UTF-8 text; a Bcc only in the envelope)."""
    alt = MIMEMultipart("alternative")
    text = MIMEText("", "plain", "utf-8")
    text.replace_header("Content-Transfer-Encoding", "8bit")
    text.set_payload("Grüße, Zoë\nFrom the shop\n".encode())
    alt.attach(text)
    alt.attach(MIMEText("<p>Grüße, <b>Zoë</b></p>", "html", "utf-8"))
    outer = MIMEMultipart("mixed")
    outer.attach(alt)
    pdf = MIMEApplication(b"%PDF-1.4\n" + bytes(range(256)) * 16, "pdf")
    pdf.add_header("Content-Disposition", "attachment", filename="invoice.pdf")
    outer.attach(pdf)
    csv = MIMEText("a;b\n1;2\n", "csv", "utf-8")
    csv.add_header("Content-Disposition", "attachment", filename=("utf-8", "", "Zahlen é.csv"))
    outer.attach(csv)
    outer["Subject"] = Header("Rechnung für Mai", "utf-8").encode()
    outer["From"] = "Shop <alice@example.org>"
    outer["To"] = "bob@example.net"
    outer["Reply-To"] = "support@example.org"
    outer["Date"] = email.utils.formatdate(localtime=True)
    outer["Message-ID"] = email.utils.make_msgid(domain="example.org")
    return Sample(outer.as_bytes(), ("bob@example.net", "erin@example.com"))


def smtphandler_like() -> Sample:
    """What logging.handlers.SMTPHandler.emit builds: an EmailMessage with set_content."""
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.net"
    msg["Subject"] = "Error in app"
    msg["Date"] = email.utils.localtime()
    msg.set_content('Traceback (most recent call last):\n  File "x.py"\nValueError: ü\n')
    return Sample(msg.as_bytes(), None)


PROGRAMS: dict[str, Callable[[Path], list[Sample]]] = {
    "git-send-email": git_send_email_series,
    "neomutt": lambda tmp: [neomutt_attachment(tmp)],
    "php-mail": lambda tmp: [php_mail(tmp)],
    "cron": lambda tmp: [CRON],
    "django": lambda tmp: [django_like()],
    "smtphandler": lambda tmp: [smtphandler_like()],
}


def _leaves(raw: bytes) -> list[tuple[str, bytes | None, str | None]]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return [
        (p.get_content_type(), None if p.is_multipart() else p.get_payload(decode=True),
         None if p.is_multipart() else p.get_filename())
        for p in parsed.walk()
    ]  # fmt: skip


def _crlf(raw: bytes) -> bytes:
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw)


def _expected_copies(sample: Sample) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Envelope of each copy -> whose keys it must be encrypted to (besides the sender)."""
    parsed = email.message_from_bytes(sample.raw, policy=email.policy.default)
    shown = [
        a.addr_spec
        for name in ("To", "Cc")
        for a in (parsed[name].addresses if parsed[name] is not None else ())
    ]
    shown = list(dict.fromkeys(shown))
    given = (
        list(sample.recipients)
        if sample.recipients is not None
        else shown
        + [a.addr_spec for a in (parsed["Bcc"].addresses if parsed["Bcc"] is not None else ())]
    )
    main = tuple(a for a in shown if a in given)
    copies = {main: tuple(shown)}
    for extra in given:
        if extra not in shown:
            copies[(extra,)] = (extra,)
    return copies


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_real_programs_messages_arrive_encrypted_with_their_mime_intact(
    program: str,
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """What git send-email, neomutt and PHP really pipe to sendmail (and what cron, Django and
    SMTPHandler build) arrives as ciphertext only, one copy for To/Cc and one per recipient
    only in the envelope (no Bcc header anywhere), each encrypted to exactly its recipients
    and the sender; gpg (and sqop) decrypt it, Alice's signature is good, and every part
    decodes to exactly what the program made (patch text byte for byte)."""
    ids = {k.address: subkey_ids(recipients_home, k.fingerprint) for k in keys.all()[:5]}
    by_address = {k.address: k for k in keys.all()}
    for sample in PROGRAMS[program](tmp_path):
        server = smtp_server(tls="implicit")
        mailer = _mailer(sender_store, server)
        asyncio.run(
            submit(
                mailer,
                sample.raw,
                recipients=sample.recipients,
                envelope_from=sample.envelope_from,
            )
        )
        expected = _expected_copies(sample)
        got = {m.rcpt_tos: m.data for m in server.messages}
        assert set(got) == set(expected)
        for rcpts, data in got.items():
            data.decode("ascii")
            assert b"\nBcc:" not in data
            owners = {
                a
                for a, sub in ids.items()
                if list_packet_key_ids(recipients_home, _armored(data)) & sub
            }
            assert owners == {"alice@example.org", *expected[rcpts]}, rcpts
            inner = _decrypt(recipients_home, data, keys)
            assert inner["Bcc"] is None
            # Header confidentiality: the Subject and the programs' X- fields only inside;
            # threading fields on both sides.
            outer = email.message_from_bytes(data, policy=email.policy.default)
            assert outer["Subject"] == "[...]"
            assert not [k for k in outer if k.lower().startswith("x-")]
            assert [k for k in inner if k.lower().startswith("x-")] == [
                k for k in email.message_from_bytes(sample.raw) if k.lower().startswith("x-")
            ]
            assert outer["In-Reply-To"] == inner["In-Reply-To"]
            plaintext = gpg_decrypt(recipients_home, _armored(data))[0]
            shown = set(next(iter(expected.values())))
            for hidden in {a for k in expected for a in k} - shown - set(rcpts):
                # A recipient only in the envelope is named in no other copy.
                assert hidden.encode() not in plaintext and hidden.encode() not in data
            original = _crlf(sample.raw)
            assert _leaves(plaintext) == _leaves(original)
            if program == "git-send-email":
                # git sends the patch 8bit, or quoted-printable when a line is too long.
                made = email.message_from_bytes(sample.raw, policy=email.policy.default)
                patch = made.get_payload(decode=True)
                text = inner.get_payload(decode=True)
                assert isinstance(text, bytes) and isinstance(patch, bytes)
                assert text.replace(b"\r\n", b"\n") == patch.replace(b"\r\n", b"\n")
                if b"Content-Transfer-Encoding: 8bit" in sample.raw:
                    assert patch == sample.raw.split(b"\n\n", 1)[1]
            first = by_address[rcpts[0]]
            if first.address == "bob@example.net":
                assert first.secret is not None
                work = tmp_path / f"sqop-{len(list(tmp_path.glob('sqop-*')))}"
                work.mkdir()
                plain, verified = sop_decrypt(
                    "sqop", _armored(data), first.secret, keys.alice.cert, work
                )
                assert keys.alice.fingerprint.lower() in verified.lower()
                assert plain == plaintext
        server.stop()


@pytest.mark.parametrize("program", ["git-send-email", "neomutt", "django"])
def test_real_programs_messages_signed_only_verify_with_gpg_and_sqop(
    program: str,
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """Signed only, the program's own MIME body (re-encoded where 8-bit) is what the
    signature covers: gpg and sqop verify the signed part cut from the received bytes, and
    its parts decode to what the program made."""
    sample = PROGRAMS[program](tmp_path)[0]
    server = smtp_server(tls="implicit")
    mailer = _mailer(sender_store, server, encrypt=False)
    asyncio.run(submit(mailer, sample.raw, recipients=sample.recipients))
    assert server.messages
    for received in server.messages:
        assert b"\r\nBcc:" not in received.data
        head, (signed, signature_part) = multipart_parts(received.data)
        assert b"multipart/signed" in head
        signature = part_body(signature_part)
        assert gpg_verify(recipients_home, signature, signed, tmp_path) == keys.alice.fingerprint
        sop_verify("sqop", signature, signed, keys.alice.cert, tmp_path)
        assert _leaves(signed) == _leaves(_crlf(sample.raw))
        assert b'hp="clear"' in signed.split(b"\r\n\r\n", 1)[0]


# -- S/MIME ----------------------------------------------------------------------------------------


def _smime_mailer(store: CertStore, server: LoopbackSMTPServer, **prot: object) -> AsyncMailer:
    return AsyncMailer(
        smtp=_settings(server),
        keystore=Keystore(store.home),
        certstore=store,
        protection=Protection(scheme=Scheme.SMIME, **prot),  # type: ignore[arg-type]
    )


def _openssl(*args: str) -> bytes:
    done = subprocess.run(["openssl", *args], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_smime_program_message_decrypts_and_verifies_with_openssl(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """S/MIME sign+encrypt of a Django-like message: openssl decrypts it for Bob, verifies
    Alice's signature over the program's own MIME body, and every part decodes the same."""
    sample = django_like()
    server = smtp_server(tls="implicit")
    result = asyncio.run(
        submit(_smime_mailer(smime_store, server), sample.raw, recipients=["bob@example.net"])
    )
    assert result.accepted == ("bob@example.net",)
    (received,) = server.messages
    enc = tmp_path / "enc.eml"
    enc.write_bytes(received.data)
    inner = _openssl(
        "cms", "-decrypt", "-in", str(enc), "-recip", str(pki.bob.cert_pem),
        "-inkey", str(pki.bob.key_pem),
    )  # fmt: skip
    signed_file = tmp_path / "inner.eml"
    signed_file.write_bytes(inner)
    content = _openssl(
        "cms", "-verify", "-in", str(signed_file), "-CAfile", str(pki.root_pem),
        "-purpose", "smimesign",
    )  # fmt: skip
    assert _leaves(content) == _leaves(_crlf(sample.raw))
    assert b'hp="cipher"' in content.split(b"\r\n\r\n", 1)[0]


def _smime_encrypted_by_the_program(pki: PKI, tmp_path: Path, *to: Identity) -> bytes:
    """An S/MIME enveloped message as a mail program makes it (openssl cms -encrypt)."""
    plain = tmp_path / "plain.eml"
    plain.write_bytes(b"Content-Type: text/plain\r\n\r\nencrypted by the program\r\n")
    out = _openssl(
        "cms", "-encrypt", "-aes256", "-in", str(plain), "-from", "alice@example.org",
        "-to", "bob@example.net", "-subject", "smime", *(str(i.cert_pem) for i in to),
    )  # fmt: skip
    return b"Cc: carol@example.com\n" + out


def test_smime_encrypted_by_the_program_is_checked_against_the_recipients_certificates(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """An S/MIME message the program encrypted is sent as it is when its RecipientInfos name
    every recipient's certificate (issuer and serial), and refused naming the one missing."""
    server = smtp_server(tls="implicit")
    mailer = _smime_mailer(smime_store, server)
    missing_carol = _smime_encrypted_by_the_program(pki, tmp_path, pki.bob)
    with pytest.raises(RecipientKeyError) as info:
        asyncio.run(submit(mailer, missing_carol))
    (problem,) = info.value.problems
    assert (problem.address, problem.reason) == ("carol@example.com", KeyReason.NOT_ENCRYPTED_TO)
    assert server.transcript == []

    both = _smime_encrypted_by_the_program(pki, tmp_path, pki.bob, pki.carol)
    result = asyncio.run(submit(mailer, both))
    assert sorted(result.accepted) == ["bob@example.net", "carol@example.com"]
    (received,) = server.messages
    assert received.data.endswith(re.sub(rb"\r?\n", b"\r\n", both).split(b"\r\n\r\n", 1)[1])


# -- Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kwargs", "match"),
    [
        (b"From: alice@example.org\nTo: bob@example.net\nno blank line\n", {}, "line 3 is not"),
        (b"From: alice@example.org\nTo: bob@example.net\nX: \0\n\nx", {}, "NUL"),
        (b"From: alice@example.org\nTo: bob@example\xff.net\n\nx", {}, "UTF-8"),
        (b"From: alice@example.org\nTo: root\n\nx", {}, "not a full address"),
        (b"Subject: nobody\n\nx", {"envelope_from": "alice@example.org"}, "recipient"),
        (b"From: alice@example.org\n\nx", {"recipients": []}, "no recipients"),
        (b"From: alice@example.org\n\nx", {"recipients": ["bad address"]}, "recipients"),
        (b"To: bob@example.net\n\nx", {"envelope_from": "not-an-address"}, "envelope sender"),
        (b"To: bob@example.net\n\nx", {}, "no From header and no envelope sender"),
    ],
)
def test_malformed_messages_are_refused_before_connecting(
    raw: bytes,
    kwargs: dict[str, object],
    match: str,
    sender_store: Keystore,
    smtp_server: ServerFactory,
) -> None:
    server = smtp_server(tls="implicit")
    with pytest.raises(MessageError, match=match) as info:
        asyncio.run(submit(_mailer(sender_store, server), raw, **kwargs))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert server.transcript == []


def test_header_recipient_not_in_the_envelope_is_not_sent_to(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """sendmail without -t sends only to the command line's recipients, even when the
    header names others (they stay in the header; the mailer's envelope sender is used)."""
    server = smtp_server(tls="implicit")
    raw = b"To: bob@example.net, carol@example.com\nSubject: s\n\nx\n"
    mailer = _mailer(sender_store, server)
    mailer.envelope_from = "alice@example.org"
    result = asyncio.run(submit(mailer, raw, recipients=["carol@example.com"]))
    assert result.accepted == ("carol@example.com",)
    (received,) = server.messages
    assert received.rcpt_tos == ("carol@example.com",)
    assert received.mail_from == "alice@example.org"
    assert _decrypt(recipients_home, received.data, keys)["To"] == (
        "bob@example.net, carol@example.com"
    )


def test_protect_returns_the_copies_submit_would_send_without_connecting(
    sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    """For a relay that stores before it answers: the copies and their envelopes, nothing
    sent; an already encrypted message is one copy, as it is."""
    server = smtp_server(tls="implicit")
    mailer = _mailer(sender_store, server)
    raw = b"From: alice@example.org\nTo: bob@example.net\nBcc: carol@example.com\n\nhi\n"
    copies = asyncio.run(protect(mailer, raw, envelope_from="bounce@example.org", recipients=None))
    assert [(c.kind, c.recipients, c.mail_from) for c in copies] == [
        ("main", ("bob@example.net",), "bounce@example.org"),
        ("bcc", ("carol@example.com",), "bounce@example.org"),
    ]
    assert all(_no_bcc_line(c.raw) and b"-----BEGIN PGP MESSAGE" in c.raw for c in copies)
    assert server.transcript == []


def test_hidden_recipient_key_ids_cannot_show_the_policy_is_met(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    raw = _encrypted_by_the_program(
        keys, recipients_home, "bob@example.net", "dave@example.com", hidden=True
    )
    server = smtp_server(tls="implicit")
    with pytest.raises(RecipientKeyError, match="hidden") as info:
        asyncio.run(submit(_mailer(sender_store, server), raw))
    assert {p.reason for p in info.value.problems} == {KeyReason.NOT_ENCRYPTED_TO}
    assert server.transcript == []


def test_already_protected_messages_pass_as_they_are_when_the_policy_does_not_encrypt(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    """Sign-only policy: a message the program signed, or encrypted even to someone without
    a key here, goes as it is (never wrapped again), without its Bcc header."""
    signed = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nBcc: erin@example.com\r\n"
        b"Subject: s\r\nDate: Wed, 6 May 2026 07:08:09 +0200\r\nMessage-ID: <s.1@example.org>\r\n"
        b"Content-Type: multipart/signed; micalg=pgp-sha256;\r\n"
        b' protocol="application/pgp-signature"; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nFrom me \r\n--b\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n"
    )
    encrypted = _encrypted_by_the_program(keys, recipients_home, "bob@example.net")
    for raw in (signed, encrypted):
        server = smtp_server(tls="implicit")
        mailer = _mailer(sender_store, server, encrypt=False)
        asyncio.run(submit(mailer, raw, recipients=["bob@example.net", "nobody@example.com"]))
        (received,) = server.messages
        assert received.rcpt_tos == ("bob@example.net", "nobody@example.com")
        body = raw.split(b"\r\nContent-Type: multipart/", 1)[1]
        assert received.data.endswith(body)
        assert _no_bcc_line(received.data)
        if raw is signed:
            assert received.data == raw.replace(b"Bcc: erin@example.com\r\n", b"")
