"""Bulk sending: one individually protected message per row of a CSV file, from a template.

The recipients file is CSV (RFC 4180; UTF-8, a byte-order mark is ignored) with a header row.
One column must be ``email``; ``name``, if present, becomes the display name in To. Every column
can be used in the template::

    email,name,amount
    bob@example.net,Bob,12.50
    carol@example.com,"Carol, PhD",7.00

The template is a text file: optional header lines (only ``Subject:``), a blank line, then the
body. Placeholders are Python :class:`string.Template` ones, ``$name`` or ``${name}``, and
``$$`` is a literal dollar sign::

    Subject: Your invoice, $name

    Dear $name,
    the amount due is ${amount} EUR.

A placeholder that names no column stops everything before anything is sent. A row that cannot
become a message (no or bad address, wrong number of fields, a value that would break a header)
is reported as a bad row and the others go on. Rows are read one at a time, so a file of any
length is handled in bounded memory.

Each row also gets a *key*: a digest of the template, the sender, the attachments, the
protection options and the row's values, keyed with a secret kept outside the outbox (so the
ledger is no oracle for guessed texts or values). With the outbox's ledger it lets a rerun of
an interrupted batch send only the rows that are missing (:meth:`AsyncMailer.send_many`); once
a batch is sent whole, its row entries give way to one entry for the whole batch.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import enum
import hashlib
import hmac
import json
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from e2email.errors import ConfigError, E2EmailError, InsecurePathError, MessageError
from e2email.message import Address, Attachment, Message
from e2email.private import open_private

__all__ = [
    "REPORT_FIELDS",
    "BadRow",
    "ReportWriter",
    "Row",
    "Template",
    "batch_digest",
    "build_messages",
    "canonical",
    "check_utf8",
    "completion_key",
    "csv_cell",
    "printable",
    "read_rows",
    "row_key",
]

#: Header names a template may set.
_TEMPLATE_HEADERS = ("subject",)
_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]?(.*)$")
#: A ``{name}`` (Python format style) not part of a ``${name}`` placeholder.
_BRACED = re.compile(r"(?<!\$)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")


@dataclass(frozen=True)
class Template:
    """A subject and body with ``$placeholders``, checked when made."""

    subject: str = ""
    body: str = ""
    html: str | None = None

    def __post_init__(self) -> None:
        for name, text in (("subject", self.subject), ("body", self.body), ("html", self.html)):
            if text is None:
                continue
            tpl = string.Template(text)
            if not tpl.is_valid():
                raise ConfigError(
                    f"template {name}: a '$' that starts no placeholder (write $$ for a dollar "
                    "sign, $name or ${name} for a column)"
                )

    @classmethod
    def parse(cls, text: str, *, html: str | None = None) -> Template:
        """Read the template file format: ``Subject:`` header, blank line, body. When the first
        line does not look like a header (``Word: ...``), the whole text is the body; a first
        line that is empty is dropped (so a body may begin with ``Word:``)."""
        text = text.replace("\r\n", "\n")
        first, _, rest = text.partition("\n")
        if first == "":
            # An empty header block: the body may then begin with "Word:".
            return cls(body=rest, html=html)
        if _HEADER_LINE.match(first) is None:
            return cls(body=text, html=html)
        headers: dict[str, str] = {}
        lines = text.split("\n")
        for n, line in enumerate(lines):
            if line == "":
                body = "\n".join(lines[n + 1 :])
                break
            match = _HEADER_LINE.match(line)
            if match is None:
                raise ConfigError(
                    f"template line {n + 1}: {line[:40]!r} is not a header line; end the "
                    "header lines with a blank line (or start the file with a blank line if "
                    "the body itself begins with 'Word:')"
                )
            key = match.group(1).lower()
            if key not in _TEMPLATE_HEADERS:
                raise ConfigError(
                    f"template line {n + 1}: header {match.group(1)!r} is not supported "
                    "(only Subject; recipients come from the CSV file)"
                )
            if key in headers:
                raise ConfigError(f"template line {n + 1}: Subject given twice")
            headers[key] = match.group(2)
        else:
            raise ConfigError("template: the header lines must be followed by a blank line")
        return cls(subject=headers.get("subject", ""), body=body, html=html)

    @property
    def placeholders(self) -> frozenset[str]:
        names: set[str] = set()
        for text in (self.subject, self.body, self.html):
            if text is not None:
                names.update(string.Template(text).get_identifiers())
        return frozenset(names)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raise ConfigError naming every placeholder that is not a column, or when the
        template has no ``$`` placeholder but ``{column}`` ones (Python's format style, which
        is not substituted: every row would get the same literal text).

        Only one spelling is supported, on purpose: with both, a literal ``{...}`` in a body
        (code, JSON, CSS in an HTML part) that happens to name a column would be replaced
        silently, and ``$$`` would not be the only escape to learn."""
        if not self.placeholders:
            wanted = {c.lower() for c in columns}
            braced = sorted(
                {
                    name
                    for text in (self.subject, self.body, self.html)
                    if text is not None
                    for name in _BRACED.findall(text)
                    if name.lower() in wanted
                }
            )
            if braced:
                listed = ", ".join(f"{{{n}}}" for n in braced)
                dollars = ", ".join(sorted({f"${n.lower()}" for n in braced}))
                raise ConfigError(
                    f"the template writes {listed}, which is not a placeholder here: write "
                    f"{dollars} (or ${{name}}) for the column values (nothing was sent)"
                )
        missing = sorted(self.placeholders - set(columns))
        if missing:
            listed = ", ".join(f"${m}" for m in missing)
            raise ConfigError(
                f"template placeholder(s) {listed} name no column of the recipients file "
                f"(columns: {printable(', '.join(columns))})"
            )

    def render(self, values: Mapping[str, str]) -> tuple[str, str, str | None]:
        """(subject, body, html) for one row."""
        subject = string.Template(self.subject).substitute(values)
        body = string.Template(self.body).substitute(values)
        html = None
        if self.html is not None:
            html = string.Template(self.html).substitute(values)
        return subject, body, html


@dataclass(frozen=True)
class Row:
    """One data row. ``number`` counts data rows from 1 (the header is not one)."""

    number: int
    values: Mapping[str, str]

    @property
    def email(self) -> str:
        return self.values.get("email", "")


@dataclass(frozen=True)
class BadRow:
    """A row that could not become a message, and why."""

    number: int
    email: str
    reason: str


def _column_name(raw: str) -> str:
    # A byte-order mark survives when the file was opened by the caller without utf-8-sig.
    return raw.replace("\ufeff", "").strip().lower()


#: The UTF-8 check reads the file this many bytes at a time (constant memory).
_CHECK_CHUNK = 1 << 16


def check_utf8(path: Path) -> None:
    """Raise ConfigError naming the line of the first byte of ``path`` that is not UTF-8.

    A decoding error in the middle of the CSV reader would lose the rest of the text decoded
    with it (its whole read chunk) and every row after, so the file is checked whole before a
    row is sent: streamed, in constant memory.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    try:
        with path.open("rb") as fh:
            while True:
                chunk = fh.read(_CHECK_CHUNK)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    # exc.object is the decoder's few held-back bytes (an unfinished sequence,
                    # never a newline) followed by this chunk.
                    line = lines + exc.object[: exc.start].count(b"\n") + 1
                    bad = exc.object[exc.start : exc.end].hex(" ")
                    raise ConfigError(
                        f"recipients file {path}: line {line} is not UTF-8 (byte(s) {bad}); "
                        "save it as UTF-8 (nothing was sent)"
                    ) from exc
                if not chunk:
                    return
                lines += chunk.count(b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_rows(source: Path | IO[str]) -> tuple[list[str], Iterator[Row | BadRow]]:
    """The header's column names (lower case) and a lazy iterator over the data rows.

    Raises ConfigError at once when the file cannot be read, is not UTF-8 throughout (checked
    before the first row, see :func:`check_utf8`), has no header or no ``email`` column, or
    repeats a column.
    """
    if isinstance(source, Path):
        check_utf8(source)
        try:
            fh: IO[str] = source.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from exc
    else:
        fh = source
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipients file: {exc}") from exc
    if header is None:
        raise ConfigError("the recipients file is empty: it needs a header row with 'email'")
    columns = [_column_name(h) for h in header]
    if "email" not in columns:
        raise ConfigError(
            "the recipients file has no 'email' column "
            f"(its header: {printable(', '.join(header))})"
        )
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise ConfigError(f"the recipients file repeats column(s) {printable(', '.join(dupes))}")

    def rows() -> Iterator[Row | BadRow]:
        number = 0
        try:
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    number += 1
                    yield BadRow(number, "", f"unreadable: {exc}")
                    # csv.Error leaves the reader usable at the next line; a decoding error
                    # does not: stop there (the rows after it are not read).
                    if isinstance(exc, UnicodeDecodeError):
                        return
                    continue
                if not record or all(not v.strip() for v in record):
                    continue  # blank line
                number += 1
                if len(record) != len(columns):
                    email = record[columns.index("email")] if len(record) > len(columns) else ""
                    yield BadRow(
                        number,
                        email.strip(),
                        f"has {len(record)} fields, the header has {len(columns)}",
                    )
                    continue
                values = dict(zip(columns, (v.strip() for v in record), strict=True))
                if not values["email"]:
                    yield BadRow(number, "", "no email address")
                    continue
                yield Row(number, values)
        finally:
            if isinstance(source, Path):
                fh.close()

    return columns, rows()


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data that is the same for equal values in every process:
    dataclasses become objects of their fields, enums their values, mappings objects with
    sorted keys, sets and frozensets sorted lists. (``repr`` of a frozenset lists it in hash
    order, which changes with the per-process hash seed, PYTHONHASHSEED.)"""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        items = [canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def batch_digest(
    *,
    secret: bytes,
    sender: str,
    template: Template,
    attachments: Sequence[Attachment] = (),
    options: Mapping[str, Any] | None = None,
) -> str:
    """A digest of everything that is the same for every row: the same digest on a rerun
    means "the same batch". ``options`` values may be dataclasses (e.g. the Protection):
    they are serialised with :func:`canonical`, never with ``repr``.

    Keyed (HMAC-SHA-256) with ``secret``, which is kept apart from the outbox
    (:meth:`e2email.outbox.Outbox.ledger_secret`): a plain hash of the template stored in
    the ledger would let anyone holding the outbox confirm a guessed text."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    parts: dict[str, Any] = {
        "sender": sender,
        "subject": template.subject,
        "body": template.body,
        "html": template.html,
        "attachments": [
            [a.filename, a.content_type, hashlib.sha256(a.content).hexdigest()] for a in attachments
        ],
        "options": canonical(dict(options or {})),
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()


def row_key(batch: str, row: Row, *, secret: bytes) -> str:
    """The ledger key of one row: the batch digest and the row's values (not its number, so
    inserting a row above does not make the rows below new), keyed with ``secret``
    (HMAC-SHA-256): an unkeyed digest of a row's values lets anyone holding the outbox
    brute-force small values (an amount, a code) in no time."""
    h = hmac.new(secret, batch.encode() + b"\0", hashlib.sha256)
    h.update(json.dumps(sorted(row.values.items())).encode())
    return h.hexdigest()


def completion_key(batch: str, row_keys: Iterable[str], *, secret: bytes) -> str:
    """The ledger key that says "batch ``batch`` was sent whole with exactly these rows": it
    replaces the batch's per-row entries once every row is done (so the ledger keeps no entry
    per row), and a rerun of the same command with the same file finds it."""
    h = hmac.new(secret, b"complete\0" + batch.encode() + b"\0", hashlib.sha256)
    for key in row_keys:
        h.update(key.encode())
    return f"complete:{h.hexdigest()}"


def build_messages(
    rows: Iterator[Row | BadRow],
    template: Template,
    *,
    sender: str,
    attachments: Sequence[Attachment] = (),
    reply_to: Sequence[str] = (),
) -> Iterator[tuple[Row, Message] | BadRow]:
    """Lazily turn rows into messages (To: the row's ``name`` and ``email``); a row whose
    message cannot be built becomes a :class:`BadRow` with the reason."""
    for row in rows:
        if isinstance(row, BadRow):
            yield row
            continue
        try:
            subject, body, html = template.render(row.values)
            to = Address(row.email, row.values.get("name", ""))
            message = Message(
                sender=sender,
                to=[to],
                reply_to=reply_to,
                subject=subject,
                text=body,
                html=html,
                attachments=attachments,
            )
        except (E2EmailError, KeyError, ValueError) as exc:
            reason = str(exc)
            if isinstance(exc, MessageError) and exc.field in (None, "to"):
                reason = f"address: {exc.reason}" if exc.field == "to" else reason
            yield BadRow(row.number, row.email, reason)
            continue
        yield row, message


def printable(text: str) -> str:
    """``text`` safe for one line of a terminal: CR, LF, ESC and the other control characters
    (from CSV values, server replies) are shown escaped, so a value cannot start a line of its
    own that looks like e2email's output or send terminal escape sequences."""
    return "".join(
        ch
        if ch == "\t" or (ch.isprintable() and ch not in "\u2028\u2029")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


#: A spreadsheet takes a cell starting with one of these for a formula (OWASP "CSV
#: injection"): "=", "+", "-", "@", and tab and carriage return, which some strip first.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """``value`` safe as a CSV cell opened in a spreadsheet: one that would start a formula
    (a row value such as ``=HYPERLINK(...)``, a server reply) gets a leading ``'``, which
    spreadsheets show as text, as OWASP's CSV injection guidance says."""
    return "'" + value if value.startswith(_FORMULA_START) else value


#: The report's columns, in order.
REPORT_FIELDS = ("row", "email", "status", "detail", "message_id", "outbox_ids")


class ReportWriter:
    """Writes the per-recipient report as it goes: CSV (``REPORT_FIELDS``), or with
    ``as_json`` a JSON array of objects with the same keys. Each entry is flushed at once, so
    an interrupted run leaves a report of everything finished before."""

    def __init__(self, fh: IO[str], *, as_json: bool = False) -> None:
        self._fh = fh
        self._json = as_json
        self._count = 0
        if as_json:
            fh.write("[")
        else:
            self._csv = csv.writer(fh, lineterminator="\n")
            self._csv.writerow(REPORT_FIELDS)
        fh.flush()

    @classmethod
    def for_path(cls, path: Path) -> tuple[ReportWriter, IO[str]]:
        """The report names every recipient and what happened: created 0600 (whatever the
        umask), as private as the outbox."""
        try:
            fh = open_private(path, "w", newline="")
        except InsecurePathError as exc:
            raise ConfigError(f"cannot write the report: {exc}") from exc
        return cls(fh, as_json=path.suffix.lower() == ".json"), fh

    def write(
        self,
        *,
        row: int,
        email: str,
        status: str,
        detail: str = "",
        message_id: str | None = None,
        outbox_ids: Sequence[str] = (),
    ) -> None:
        entry = {
            "row": row,
            "email": email,
            "status": status,
            "detail": detail,
            "message_id": message_id or "",
            "outbox_ids": list(outbox_ids),
        }
        if self._json:
            sep = "," if self._count else ""
            self._fh.write(f"{sep}\n  {json.dumps(entry, ensure_ascii=False)}")
        else:
            cells = (email, status, detail, message_id or "", " ".join(outbox_ids))
            self._csv.writerow([row, *(csv_cell(v) for v in cells)])
        self._count += 1
        self._fh.flush()

    def close(self) -> None:
        if self._json:
            self._fh.write("\n]\n")
        self._fh.flush()

    @property
    def count(self) -> int:
        return self._count
