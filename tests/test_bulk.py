"""Bulk sending: template + CSV rows -> one individually encrypted message per row, bad rows
reported without stopping the others, a per-recipient report, and reruns that send only what
is missing. The CLI runs as a real process against a real TLS server."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import (
    gpg_decrypt,
    kill_agent,
    list_packet_key_ids,
    multipart_parts,
    new_gnupg_home,
    part_body,
    subkey_ids,
)
from test_cli import e2email, send_args

from e2email.bulk import (
    BadRow,
    ReportWriter,
    Row,
    Template,
    batch_digest,
    build_messages,
    read_rows,
    row_key,
)
from e2email.errors import ConfigError
from e2email.keystore import Keystore
from e2email.outbox import NewItem, Outbox
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


# -- templates and rows ------------------------------------------------------------------------


def test_template_file_format_and_placeholders() -> None:
    """A template is 'Subject:', a blank line and the body; $name and ${name} are
    placeholders, $$ a dollar sign; without a header line the whole text is the body."""
    tpl = Template.parse("Subject: Hi $name\n\nDear ${name}, you owe $$${amount}.\n")
    assert tpl.placeholders == {"name", "amount"}
    assert tpl.render({"name": "Bob", "amount": "5"}) == ("Hi Bob", "Dear Bob, you owe $5.\n", None)
    plain = Template.parse("Dear $name,\nhello\n")
    assert plain.subject == "" and plain.body == "Dear $name,\nhello\n"
    assert Template.parse("\nNote: a body\n").body == "Note: a body\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("To: x@example.org\n\nbody", "only Subject"),
        ("Subject: a\nSubject: b\n\nbody", "twice"),
        ("Subject: a\nno blank line", "not a header line"),
        ("Subject: a", "blank line"),
        ("Subject: 100$\n\nbody", "$$"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(text: str, needle: str) -> None:
    """Unsupported headers, a missing blank line or a stray '$' stop before anything is
    sent, with a message that says what to fix."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Template.parse(text)


def test_placeholders_must_name_columns() -> None:
    """A placeholder that names no CSV column is an error listing it (and the columns)."""
    tpl = Template(subject="$name", body="$amount $nope")
    tpl.check_columns(["email", "name", "amount", "nope"])
    with pytest.raises(ConfigError, match=r"\$nope.*columns: email, name, amount"):
        tpl.check_columns(["email", "name", "amount"])


def test_format_style_braces_naming_columns_are_refused_when_no_dollar_placeholder() -> None:
    """`{name}` is not a placeholder (only `$name`/`${name}` are): a template that writes
    column names in braces and no `$` placeholder would send the same literal text to every
    row (the old code did), so it is refused naming them and the spelling to use. Braces that
    name no column, or a template that uses `$` placeholders, are left alone."""
    tpl = Template.parse("Subject: Invoice for {Name}\n\nDear {name}, you owe { amount }.\n")
    with pytest.raises(ConfigError, match=r"\{Name\}, \{amount\}, \{name\}.*\$amount, \$name"):
        tpl.check_columns(["email", "name", "amount"])
    Template(body="function f() {return 1;} {nocolumn}").check_columns(["email", "name"])
    Template(body="Dear ${name}, {literal}").check_columns(["email", "name", "literal"])


def test_rows_are_read_lazily_and_bad_rows_reported() -> None:
    """Rows come one at a time; a row with the wrong number of fields or no address is a
    BadRow with its number; blank lines are skipped; column names are case-insensitive."""
    text = (
        "\ufeffEmail,Name\nbob@example.net,Bob\n\ncarol@example.com\n,Nobody\ndave@example.com,D\n"
    )
    columns, rows = read_rows(io.StringIO(text.lstrip("\ufeff")))
    assert columns == ["email", "name"]
    got = list(rows)
    assert got[0] == Row(1, {"email": "bob@example.net", "name": "Bob"})
    assert isinstance(got[1], BadRow) and got[1].number == 2 and "2" in got[1].reason
    assert isinstance(got[2], BadRow) and got[2].reason == "no email address"
    assert isinstance(got[3], Row) and got[3].number == 4
    with pytest.raises(ConfigError, match="no 'email' column"):
        read_rows(io.StringIO("name\nBob\n"))
    with pytest.raises(ConfigError, match="repeats"):
        read_rows(io.StringIO("email,Email\n"))


def test_a_row_that_would_break_the_message_is_a_bad_row() -> None:
    """Header injection through a value used in the Subject, or an invalid address, makes
    that row bad; the next row is still built."""
    tpl = Template(subject="Hello $name", body="x")
    _, rows = read_rows(
        io.StringIO(
            'email,name\nbob@example.net,"Bob\r\nBcc: eve@example.org"\n'
            "not-an-address,X\ncarol@example.com,Carol\n"
        )
    )
    out = list(build_messages(rows, tpl, sender="alice@example.org"))
    assert isinstance(out[0], BadRow) and out[0].email == "bob@example.net"
    assert isinstance(out[1], BadRow) and "not-an-address" in out[1].reason
    _, message = out[2]  # type: ignore[misc]
    assert message.to[0].display_name == "Carol" and message.subject == "Hello Carol"


def test_batch_digest_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    """The batch identity of a Protection with several trusted self-signed fingerprints (a
    frozenset) is the same under different PYTHONHASHSEED values, so a rerun of an
    interrupted batch finds its ledger rows instead of resending every row."""
    code = textwrap.dedent(
        """
        from e2email.bulk import Template, batch_digest
        from e2email.config import Protection, Scheme
        fprs = frozenset(c * 64 for c in "0123456789ABCDEF")
        prot = Protection(scheme=Scheme.SMIME, smime_trust_self_signed=fprs)
        print(batch_digest(secret=b"k" * 32, sender="a@example.org", template=Template(body="x"),
                           options={"protection": prot, "batch": ""}))
        """
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1 and len(next(iter(digests))) == 64


def test_ledger_digests_are_keyed_so_the_outbox_is_no_plaintext_oracle() -> None:
    """The batch and row digests are HMACs under a secret: without it, neither a guessed
    template nor a guessed row value can be confirmed from the ledger (the old code stored
    plain SHA-256 of both, so a small value fell to brute force in under a second)."""
    template = Template(subject="Salary", body="Your salary is $amount.")
    row = Row(1, {"email": "b@example.net", "amount": "4200"})

    def keys(secret: bytes) -> tuple[str, str]:
        batch = batch_digest(secret=secret, sender="a@example.org", template=template)
        return batch, row_key(batch, row, secret=secret)

    one, two = keys(b"1" * 32), keys(b"2" * 32)
    assert one == keys(b"1" * 32)  # stable for a rerun with the same secret
    assert one[0] != two[0] and one[1] != two[1]
    # What an unkeyed digest of the same inputs would be matches nothing stored.
    plain_batch = hashlib.sha256(
        json.dumps(
            {
                "sender": "a@example.org",
                "subject": template.subject,
                "body": template.body,
                "html": None,
                "attachments": [],
                "options": {},
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    assert plain_batch not in one
    guesses = {
        hashlib.sha256(
            one[0].encode() + json.dumps(sorted({**row.values, "amount": str(n)}.items())).encode()
        ).hexdigest()
        for n in range(10_000)
    }
    assert one[1] not in guesses


def test_report_writer_streams_csv_and_json() -> None:
    """The report is valid CSV or JSON with the same fields, written entry by entry."""
    for as_json in (False, True):
        out = io.StringIO()
        writer = ReportWriter(out, as_json=as_json)
        writer.write(row=1, email="b@example.net", status="delivered", message_id="m@x")
        writer.write(row=2, email="c@example.com", status="failed", detail="552", outbox_ids=["ab"])
        writer.close()
        if as_json:
            entries = json.loads(out.getvalue())
        else:
            entries = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert [e["status"] for e in entries] == ["delivered", "failed"]
        assert entries[1]["outbox_ids"] in (["ab"], "ab")


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_report_cells_that_would_start_a_formula_are_escaped(start: str) -> None:
    """OWASP CSV injection: a value from the CSV file or a server reply that begins with
    `=`, `+`, `-`, `@`, tab or CR is written with a leading `'` so a spreadsheet shows it as
    text; the JSON report keeps values as they are."""
    evil = f'{start}HYPERLINK("http://evil.example/","x")'
    out = io.StringIO()
    writer = ReportWriter(out)
    writer.write(row=1, email=evil, status="failed", detail=evil, message_id=evil)
    writer.close()
    (entry,) = list(csv.DictReader(io.StringIO(out.getvalue())))
    for key in ("email", "detail", "message_id"):
        assert entry[key] == "'" + evil
    assert entry["row"] == "1" and entry["status"] == "failed"
    out = io.StringIO()
    writer = ReportWriter(out, as_json=True)
    writer.write(row=1, email=evil, status="failed")
    writer.close()
    assert json.loads(out.getvalue())[0]["email"] == evil


def test_the_report_file_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    """The report names every recipient: 0600 even under umask 0 (the old code: 0666 less
    the umask)."""
    old = os.umask(0)
    try:
        writer, fh = ReportWriter.for_path(tmp_path / "report.csv")
        writer.close()
        fh.close()
    finally:
        os.umask(old)
    assert (tmp_path / "report.csv").stat().st_mode & 0o777 == 0o600


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bulk_home(keys: Keys) -> Iterator[Path]:
    """An e2email home with Alice's secret key and Bob's, Carol's and Dave's certificates."""
    path = new_gnupg_home("e2b")
    store = Keystore(path)
    assert keys.alice.secret
    for f in (keys.alice.secret, keys.bob.cert, keys.carol.cert, keys.dave.cert):
        store.import_file(f)
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


def test_to_file_sends_one_encrypted_message_per_row_and_reports_each(
    bulk_home: Path,
    smtp_server: ServerFactory,
    recipients_home: Path,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Each good row gets its own message, personalised and encrypted only to that recipient
    (and the sender); a bad address and a recipient without a key are reported per row (exit
    3: a key problem), the rest are delivered; the JSON report has one entry per row; a rerun
    sends nothing twice."""
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "email,name,code\n"
        "bob@example.net,Bob,B-17\n"
        "carol@example.com,Carol,C-42\n"
        "not an address,X,X-0\n"
        "nobody@example.com,Nobody,N-1\n"
        "dave@example.com,Dave,D-99\n"
    )
    template = tmp_path / "t.txt"
    template.write_text("Subject: Code for $name\n\nDear $name,\nyour code is $code.\n")
    report = tmp_path / "report.json"
    args = send_args(
        server, "--to-file", str(rows), "--template", str(template), "--report", str(report)
    )
    done = e2email(*args, home=bulk_home)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    entries = {e["row"]: e for e in json.loads(report.read_text())}
    assert {n: e["status"] for n, e in entries.items()} == {
        1: "delivered",
        2: "delivered",
        3: "invalid",
        4: "not-sent",
        5: "delivered",
    }
    assert "no key found" in entries[4]["detail"]
    assert "row 3" in done.stdout and "row 4" in done.stdout
    assert "3 delivered" in done.stderr
    by_rcpt = {m.rcpt_tos: m.data for m in server.messages}
    assert set(by_rcpt) == {("bob@example.net",), ("carol@example.com",), ("dave@example.com",)}
    alice_ids = subkey_ids(recipients_home, keys.alice.fingerprint)
    for (rcpt,), raw in by_rcpt.items():
        code = {"bob": "B-17", "carol": "C-42", "dave": "D-99"}[rcpt.split("@")[0]]
        assert code.encode() not in raw  # encrypted, and so is the subject
        _, (_, encrypted) = multipart_parts(raw)
        plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
        assert f"your code is {code}.".encode() in plaintext and "VALIDSIG" in status
        own = getattr(keys, rcpt.split("@")[0])
        packet_ids = list_packet_key_ids(recipients_home, part_body(encrypted))
        assert packet_ids <= alice_ids | subkey_ids(recipients_home, own.fingerprint)
        assert packet_ids & alice_ids and len(packet_ids) == 2
    assert entries[1]["message_id"] and entries[1]["outbox_ids"] == []

    again = e2email(*args, home=bulk_home)
    assert len(server.messages) == 3  # nothing sent twice
    statuses = {e["row"]: e["status"] for e in json.loads(report.read_text())}
    assert statuses == {1: "skipped", 2: "skipped", 3: "invalid", 4: "not-sent", 5: "skipped"}
    assert "3 already sent earlier" in again.stderr

    fresh = e2email(*args, "--batch", "second round", home=bulk_home)
    assert fresh.returncode == 3
    assert len(server.messages) == 6  # a new batch name sends the rows again


def test_to_file_csv_report_and_refused_recipient_stays_in_the_outbox(
    bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """With --subject/--body as the template and a CSV report: a recipient the server refuses
    (550) is reported 'failed' with the reply and its outbox ID (exit 6); `outbox list` shows
    it; the others are delivered."""
    server = smtp_server(refuse_recipients={"carol@example.com": (550, "5.1.1 no such user")})
    rows = tmp_path / "rows.csv"
    rows.write_text("email\nbob@example.net\ncarol@example.com\n")
    report = tmp_path / "report.csv"
    args = send_args(
        server,
        "--to-file",
        str(rows),
        "--subject",
        "For $email",
        "--body",
        "Hello $email",
        "--report",
        str(report),
    )
    done = e2email(*args, home=bulk_home)
    assert done.returncode == 6, done.stderr
    entries = list(csv.DictReader(report.open()))
    assert [(e["email"], e["status"]) for e in entries if e["status"] != "delivered"] == [
        ("carol@example.com", "failed")
    ]
    failed = next(e for e in entries if e["status"] == "failed")
    assert "550" in failed["detail"] and failed["outbox_ids"]
    listing = e2email("outbox", "list", home=bulk_home)
    assert failed["outbox_ids"] in listing.stdout and "no such user" in listing.stdout
    dropped = e2email("outbox", "drop", failed["outbox_ids"], home=bulk_home)
    assert dropped.returncode == 0 and "dropped" in dropped.stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--to", "bob@example.net"], "leave out --to"),
        (["--body", "hi $missing"], "$missing"),
        (["--template", "/dev/null", "--body", "x"], "give the body once"),
    ],
)
def test_to_file_usage_errors_send_nothing(
    extra: list[str], needle: str, bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Contradictory options and unknown placeholders are usage errors (exit 2) before any
    connection is made."""
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email\nbob@example.net\n")
    done = e2email(*send_args(server, "--to-file", str(rows), *extra), home=bulk_home)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert server.transcript == []


def test_a_non_utf8_byte_anywhere_stops_the_batch_before_sending_and_names_its_line(
    bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A latin-1 byte after 600 good rows (past the CSV reader's first decode chunk) is found
    before anything is sent: exit 2, one line naming the physical line with the bad byte,
    no connection made (before, rows were silently lost and the wrong row was named)."""
    rows = tmp_path / "latin1.csv"
    good = [f"r{i}@example.net,R{i}\n".encode() for i in range(600)]
    tail = [f"s{i}@example.net,S{i}\n".encode() for i in range(5)]
    rows.write_bytes(
        b"email,name\n" + b"".join(good) + b"bad@example.net,Caf\xe9\n" + b"".join(tail)
    )
    with pytest.raises(ConfigError, match=r"line 602 is not UTF-8 \(byte\(s\) e9\)"):
        read_rows(rows)
    server = smtp_server()
    done = e2email(*send_args(server, "--to-file", str(rows), "--body", "hi $name"), home=bulk_home)
    assert done.returncode == 2, done.stderr
    assert "line 602" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert server.transcript == []


def test_duplicate_rows_are_sent_once_and_reported_as_duplicates(
    bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """12 rows cycling over 3 equal rows: each address gets exactly one message; the repeats
    are 'duplicate of row N' (the first row with those values), never 'already sent
    earlier' on a first run; a rerun reports all 12 as handled, sending nothing."""
    server = smtp_server()
    rows = tmp_path / "dup.csv"
    rows.write_text("email,name\n" + "".join(f"d{i % 3}@example.net,D{i % 3}\n" for i in range(12)))
    report = tmp_path / "report.json"
    args = send_args(
        server,
        "--to-file",
        str(rows),
        "--body",
        "hi $name",
        "--no-encrypt",
        "--no-sign",
        "--report",
        str(report),
        "--connections",
        "3",
    )
    done = e2email(*args, home=bulk_home)
    assert done.returncode == 0, done.stderr
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [f"d{i}@example.net" for i in range(3)]
    entries = {e["row"]: e for e in json.loads(report.read_text())}
    for n in range(4, 13):
        assert entries[n]["status"] == "duplicate"
        assert entries[n]["detail"] == f"duplicate of row {(n - 1) % 3 + 1}"
    assert "3 delivered, 9 duplicate" in done.stdout and "earlier" not in done.stdout
    again = e2email(*args, home=bulk_home)
    assert again.returncode == 0 and len(server.messages) == 3
    assert "3 already sent earlier, 9 duplicate" in again.stdout


def test_row_values_with_cr_lf_are_escaped_when_echoed(
    bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A quoted CSV value with CR/LF in it cannot forge a line of e2email's output: the
    bad-row line shows it escaped (\\r\\n), on one line."""
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_bytes(b'email\n"bad\r\nrow 9 forged@example.net: delivered"\n')
    done = e2email(*send_args(server, "--to-file", str(rows), "--body", "x"), home=bulk_home)
    assert done.returncode == 2, done.stderr
    assert "bad\\r\\nrow 9 forged" in done.stdout
    assert not any(line.startswith("row 9") for line in done.stdout.splitlines())
    assert server.messages == []


def test_a_format_style_template_stops_the_batch_before_anything_is_sent(
    bulk_home: Path, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """`--template` written with `{name}`: exit 2 with one line naming `$name`, no connection
    made (the old code sent "Dear {name}" literally to every row)."""
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name\nbob@example.net,Bob\n")
    template = tmp_path / "t.txt"
    template.write_text("Subject: For {name}\n\nDear {name},\nhello.\n")
    done = e2email(
        *send_args(server, "--to-file", str(rows), "--template", str(template), "--no-encrypt"),
        home=bulk_home,
    )
    assert done.returncode == 2, done.stderr
    assert "write $name" in done.stderr and "Traceback" not in done.stderr
    assert server.transcript == []


def test_a_batch_sent_whole_leaves_one_keyed_ledger_entry_and_reruns_send_nothing(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Once every row is delivered the row entries are dropped: the ledger keeps one entry
    for the batch, keyed with the secret in HOME/ledger.key (0600, not in the database), and
    no digest of the text or a row that could be checked without it. A rerun of the same
    command sends nothing; a rerun with a changed file under the same batch identity is
    refused (exit 2, pointing at --batch) instead of sending every row again."""
    home = tmp_path / "home"
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email,amount\nb@example.net,4200\nc@example.com,3900\n")
    args = send_args(
        server, "--to-file", str(rows), "--body", "you get $amount", "--no-encrypt", "--no-sign"
    )
    done = e2email(*args, home=home)
    assert done.returncode == 0, done.stderr
    assert len(server.messages) == 2
    key_file = home / "ledger.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    with sqlite3.connect(home / "outbox.sqlite3") as db:
        ledger = db.execute("SELECT key, state FROM ledger").fetchall()
    assert len(ledger) == 1 and ledger[0][0].startswith("complete:") and ledger[0][1] == "done"
    stored = (home / "outbox.sqlite3").read_bytes()
    assert key_file.read_bytes() not in stored

    again = e2email(*args, home=home)
    assert again.returncode == 0, again.stderr
    assert "2 already sent earlier" in again.stdout and len(server.messages) == 2

    rows.write_text("email,amount\nb@example.net,4200\nc@example.com,3900\nd@example.org,1\n")
    changed = e2email(*args, home=home)
    assert changed.returncode == 2 and "--batch NAME" in changed.stderr, changed.stderr
    assert len(server.messages) == 2
    new_name = e2email(*args, "--batch", "with d", home=home)
    assert new_name.returncode == 0 and len(server.messages) == 5


def test_an_old_unkeyed_ledger_is_not_reused_and_its_queued_copies_are_kept(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """An outbox of schema 2 (unkeyed SHA-256 ledger): upgrading deletes the old ledger
    (never taken for keyed entries) and keeps every queued copy, marked as of an old batch.
    A batch run then refuses to start (it could not tell those rows from unsent ones)
    until `outbox retry` has sent them."""
    home = tmp_path / "home"
    with Outbox.in_home(home) as box:
        box.add(
            [NewItem(b"x\r\n", "a@example.org", ("b@example.net",), "m@x")],
            claim=False,
            ledger=("0123456789abcdef", "ab" * 32),
        )
    with sqlite3.connect(home / "outbox.sqlite3") as db:
        db.execute("ALTER TABLE items DROP COLUMN maybe_since")
        db.execute("INSERT INTO ledger VALUES (?, 'old', 'done', ?)", ("cd" * 32, time.time()))
        db.execute("PRAGMA user_version=2")
    with Outbox.in_home(home) as box:
        (kept,) = box.items()
        assert kept.ledger_key == "legacy" and kept.pending == ("b@example.net",)
        assert box.ledger_state("ab" * 32) is None and box.ledger_state("cd" * 32) is None
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email\nc@example.com\n")
    args = send_args(server, "--to-file", str(rows), "--body", "hi", "--no-encrypt", "--no-sign")
    refused = e2email(*args, home=home)
    assert refused.returncode == 2 and "outbox retry" in refused.stderr, refused.stderr
    assert server.messages == []
    retried = e2email(
        "outbox", "retry", *args[args.index("--host") : args.index("--to-file")], home=home
    )
    assert retried.returncode == 0, retried.stderr
    assert e2email(*args, home=home).returncode == 0
    assert sorted(m.rcpt_tos for m in server.messages) == [("b@example.net",), ("c@example.com",)]


def test_the_subject_comes_from_a_file_not_the_command_line(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A confidential subject need not be in the process table: with --to-file it comes from
    the --template file's header block or from --subject-file (which the old code ignored in
    a batch: every message went out without the subject); giving it twice is refused."""
    home = tmp_path / "home"
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name\nb@example.net,Bob\n")
    subject = tmp_path / "subject.txt"
    subject.write_text("Layoffs for $name\n")
    base = ["--to-file", str(rows), "--no-encrypt", "--no-sign"]
    by_file = e2email(
        *send_args(server, *base, "--body", "hi", "--subject-file", str(subject)), home=home
    )
    assert by_file.returncode == 0, by_file.stderr
    assert b"\r\nSubject: Layoffs for Bob\r\n" in server.messages[-1].data
    template = tmp_path / "t.txt"
    template.write_text("Subject: Salary review, $name\n\nDear $name\n")
    by_template = e2email(
        *send_args(server, *base, "--template", str(template), "--batch", "t"), home=home
    )
    assert by_template.returncode == 0, by_template.stderr
    assert b"\r\nSubject: Salary review, Bob\r\n" in server.messages[-1].data
    twice = e2email(
        *send_args(server, *base, "--template", str(template), "--subject-file", str(subject)),
        home=home,
    )
    assert twice.returncode == 2 and "subject is given twice" in twice.stderr
    assert len(server.messages) == 2


def test_a_lost_ledger_key_is_noticed_instead_of_sending_rows_again(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """HOME/ledger.key lost while a batch is unfinished: with a new key no entry would match
    and the rerun would send the delivered rows again. It is refused (exit 2) naming the way
    out; `outbox forget-batches` starts a new ledger, after which the rows are sent again."""
    home = tmp_path / "home"
    server = smtp_server()
    rows = tmp_path / "rows.csv"
    rows.write_text("email\nb@example.net\nnot an address\n")  # the bad row keeps it unfinished
    args = send_args(server, "--to-file", str(rows), "--body", "hi", "--no-encrypt", "--no-sign")
    assert e2email(*args, home=home).returncode == 2
    assert len(server.messages) == 1
    (home / "ledger.key").unlink()
    lost = e2email(*args, home=home)
    assert lost.returncode == 2 and "forget-batches" in lost.stderr, lost.stderr
    assert len(server.messages) == 1
    forgot = e2email("outbox", "forget-batches", home=home)
    assert forgot.returncode == 0 and "forgot 1 ledger entry" in forgot.stdout
    assert e2email(*args, home=home).returncode == 2
    assert len(server.messages) == 2
