"""``e2email send --to-file rows.csv``: one individually protected message per CSV row.

Rows are read, protected and sent as a stream (bounded memory), over a pool of connections,
with the outbox underneath: every protected message is stored before it is sent, and a ledger
of finished rows lets a rerun of the same command (after a crash, a kill or a failure) send
only the rows that are not delivered yet. A progress bar shows on a terminal; ``--report``
writes one line per recipient (CSV or JSON) as results come in.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from e2email.bulk import (
    BadRow,
    ReportWriter,
    Row,
    Template,
    batch_digest,
    build_messages,
    completion_key,
    printable,
    read_rows,
    row_key,
)
from e2email.cli.app import (
    EXIT_AUTH,
    EXIT_CONNECTION,
    EXIT_KEY,
    EXIT_REJECTED,
    EXIT_USAGE,
    State,
    exit_code_for,
    fail,
)
from e2email.cli.send import (
    ACCOUNT,
    _read_body,
    _read_html,
    outbox_for,
    protection_options,
    retry_policy,
    smtp_settings,
)
from e2email.client import BatchItem, Mailer, MessageOutcome, ProtectedCopy
from e2email.config import PasswordSource, Protection, SMTPSettings
from e2email.errors import ConfigError, E2EmailError
from e2email.message import Attachment
from e2email.outbox import Outbox

__all__ = ["send_bulk"]

#: When several kinds of failure happened, the exit status names the first kind present.
_EXIT_PRIORITY = (EXIT_CONNECTION, EXIT_AUTH, EXIT_REJECTED, EXIT_KEY, EXIT_USAGE)
#: Row statuses that need nothing more: delivered now, by an earlier run, or a repeat of a
#: row of this file that was (reported "duplicate of row N", so the user sees it).
_OK_STATUSES = ("delivered", "skipped", "duplicate")


def _template(opts: dict[str, Any]) -> Template:
    html = _read_html(opts["html_file"])
    if opts["template"] is None:
        body, _ = _read_body(opts["body"], opts["body_file"])
        return Template(subject=opts["subject"], body=body, html=html)
    if opts["body"] is not None or opts["body_file"] is not None:
        raise click.UsageError("give the body once: --template or --body/--body-file")
    try:
        text = opts["template"].read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the template {opts['template']}: {exc}") from exc
    template = Template.parse(text, html=html)
    if opts["subject"]:
        if template.subject:
            raise click.UsageError(
                "the subject is given twice: --subject (or --subject-file) and in --template"
            )
        template = replace(template, subject=opts["subject"])
    return template


def _count_rows(path: Path) -> int | None:
    """Data rows in the file (for the progress bar), or None if it cannot be read."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return max(0, sum(1 for rec in csv.reader(fh) if any(v.strip() for v in rec)) - 1)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _detail(outcome: MessageOutcome) -> str:
    if outcome.detail:
        return outcome.detail
    problems = [
        f"{r.address}: {r.error or r.reply}" for r in outcome.recipients if r.status != "delivered"
    ]
    if problems:
        return "; ".join(problems)
    reply = next((r.reply for r in outcome.recipients if r.reply is not None), None)
    return str(reply) if reply is not None else ""


def _exit_code(outcome: MessageOutcome) -> int:
    if isinstance(outcome.error, E2EmailError) and outcome.status in ("not-sent", "deferred"):
        return exit_code_for(outcome.error)
    return EXIT_REJECTED


def send_bulk(state: State, opts: dict[str, Any]) -> None:
    for name in ("to", "cc", "bcc"):
        if opts[name]:
            raise click.UsageError(f"--to-file gives the recipients: leave out --{name}")
    if opts["output"] is not None:
        raise click.UsageError("--to-file sends; it cannot be combined with --output")
    if not opts["host"] and opts.get(ACCOUNT) is None:
        raise click.UsageError("give --host or --account NAME to send")
    template = _template(opts)
    to_file: Path = opts["to_file"]
    columns, rows = read_rows(to_file)
    template.check_columns(columns)
    attachments = tuple(Attachment.from_path(p) for p in opts["attach"])
    protection, passphrase = protection_options(opts)
    if opts.get("queue_batch") is not None and opts.get("queue") is None:
        raise click.UsageError("--queue-batch goes with --queue celery")
    if opts.get("queue") == "celery":
        queue_rows(state, opts, template, rows, attachments, protection, passphrase)
        return
    smtp = smtp_settings(state, opts)
    box = outbox_for(state, opts)
    try:
        _send_rows(state, opts, box, template, rows, attachments, protection, passphrase, smtp)
    finally:
        box.close()


def _batch_identity(
    box: Outbox, opts: dict[str, Any], batch: str, secret: bytes
) -> tuple[str, bool]:
    """The key that marks this batch sent whole with the rows of the file as it is now, and
    whether the ledger has it (a rerun of a finished batch: nothing to send)."""
    _, rows = read_rows(opts["to_file"])
    keys = (row_key(batch, r, secret=secret) for r in rows if isinstance(r, Row))
    completion = completion_key(batch, keys, secret=secret)
    done = box.batch_completions(batch[:16])
    if done and completion not in done:
        when = datetime.fromtimestamp(max(done.values())).astimezone()
        raise ConfigError(
            "this batch (the same template, sender and options) was sent whole on "
            f"{when:%Y-%m-%d %H:%M} to the rows of a different recipients file, and its rows "
            "are no longer remembered one by one, so nothing was sent: give --batch NAME to "
            "send this file as a new batch"
        )
    return completion, completion in done


def _send_rows(
    state: State,
    opts: dict[str, Any],
    box: Outbox,
    template: Template,
    rows: Iterator[Row | BadRow],
    attachments: tuple[Attachment, ...],
    protection: Protection,
    passphrase: PasswordSource | None,
    smtp: SMTPSettings,
) -> None:
    to_file: Path = opts["to_file"]
    legacy = box.legacy_batch_items()
    if legacy:
        raise ConfigError(
            f"the outbox holds {len(legacy)} message(s) of a batch started by an older e2email "
            f"({', '.join(legacy[:5])}{', ...' if len(legacy) > 5 else ''}), whose ledger "
            "could not be kept: send them with `e2email outbox retry` (or drop them) first, "
            "then rerun; nothing was sent"
        )
    secret = box.ledger_secret()
    batch = batch_digest(
        secret=secret,
        sender=opts["sender"],
        template=template,
        attachments=attachments,
        options={"protection": protection, "batch": opts["batch_name"]},
    )
    completion, finished = _batch_identity(box, opts, batch, secret)

    report: ReportWriter | None = None
    report_fh: IO[str] | None = None
    if opts["report"] is not None:
        report, report_fh = ReportWriter.for_path(opts["report"])

    counts: Counter[str] = Counter()
    codes: set[int] = set()
    #: Rows handed to the mailer that have no outcome yet.
    waiting: dict[int, str] = {}
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    task = progress.add_task(
        "send",
        total=_count_rows(to_file) if console.is_terminal else None,
        status="",
    )

    def record(
        number: int,
        email: str,
        status: str,
        detail: str = "",
        message_id: str | None = None,
        kept: tuple[str, ...] = (),
    ) -> None:
        counts[status] += 1
        if report is not None:
            report.write(
                row=number,
                email=email,
                status=status,
                detail=detail,
                message_id=message_id,
                outbox_ids=kept,
            )
        if status not in ("delivered", "skipped"):
            where = f" (outbox {' '.join(kept)})" if kept else ""
            line = printable(f"row {number} {email}: {status}: {detail}{where}")
            if console.is_terminal:
                # Above the progress bar, which owns the terminal while it runs.
                progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                click.echo(line)
        done = sum(counts[s] for s in _OK_STATUSES)
        progress.update(task, advance=1, status=f"{done} ok, {sum(counts.values()) - done} not")

    def items() -> Iterator[BatchItem]:
        for entry in build_messages(
            rows,
            template,
            sender=opts["sender"],
            attachments=attachments,
            reply_to=opts["reply_to"],
        ):
            if isinstance(entry, BadRow):
                codes.add(EXIT_USAGE)
                record(entry.number, entry.email, "invalid", entry.reason)
                continue
            row, message = entry
            waiting[row.number] = row.email
            yield BatchItem(message=message, key=row_key(batch, row, secret=secret), tag=row)

    def on_outcome(outcome: MessageOutcome) -> None:
        row: Row = outcome.tag
        waiting.pop(row.number, None)
        if outcome.status == "duplicate":
            first: Row = outcome.duplicate_of
            record(row.number, row.email, "duplicate", f"duplicate of row {first.number}")
            return
        if outcome.status not in ("delivered", "skipped"):
            codes.add(_exit_code(outcome))
        record(
            row.number,
            row.email,
            outcome.status,
            _detail(outcome),
            outcome.message_id,
            outcome.kept,
        )

    def already_sent() -> None:
        """Every row of a batch sent whole before (with this very file): nothing to send."""
        first: dict[str, int] = {}
        with progress:
            for entry in rows:
                if isinstance(entry, BadRow):
                    codes.add(EXIT_USAGE)
                    record(entry.number, entry.email, "invalid", entry.reason)
                    continue
                key = row_key(batch, entry, secret=secret)
                if key in first:
                    detail = f"duplicate of row {first[key]}"
                    record(entry.number, entry.email, "duplicate", detail)
                    continue
                first[key] = entry.number
                record(entry.number, entry.email, "skipped", "sent by an earlier run")

    def run_mailer(source: Iterator[BatchItem]) -> E2EmailError | None:
        with (
            progress,
            Mailer(
                smtp=smtp,
                keystore=state.keystore(),
                protection=protection,
                passphrase=passphrase,
                outbox=box,
                retry=retry_policy(opts),
                connections=opts["connections"],
            ) as mailer,
        ):
            try:
                mailer.send_many(source, batch=batch[:16], on_outcome=on_outcome)
            except E2EmailError as exc:
                return exc
        return None

    stopped: E2EmailError | None = None
    source = items()
    try:
        if finished:
            already_sent()
        else:
            stopped = run_mailer(source)
        if stopped is not None:
            # Rows read but not started, and rows never read: nothing of them was sent or
            # stored; a rerun of the same command sends them.
            why = f"not sent: sending stopped: {stopped}"
            for number, email in sorted(waiting.items()):
                record(number, email, "not-sent", why)
            waiting.clear()
            for item in source:
                row = item.tag
                waiting.pop(row.number, None)
                record(row.number, row.email, "not-sent", why)
    finally:
        if report is not None and report_fh is not None:
            report.close()
            with contextlib.suppress(OSError):
                report_fh.close()

    total = sum(counts.values())
    ok = sum(counts[s] for s in _OK_STATUSES)
    parts = [f"{counts['delivered']} delivered"]
    labels = {
        "skipped": "already sent earlier",
        "duplicate": "duplicate row(s), not sent again",
        "maybe-delivered": "maybe-delivered (not sent again by itself)",
    }
    for status in (
        "skipped",
        "duplicate",
        "partial",
        "deferred",
        "maybe-delivered",
        "failed",
        "not-sent",
        "invalid",
    ):
        if counts[status]:
            parts.append(f"{counts[status]} {labels.get(status, status)}")
    summary = f"{total} row(s): " + ", ".join(parts)
    if counts["deferred"] or counts["partial"] or counts["failed"] or counts["maybe-delivered"]:
        summary += " (undelivered messages stay in the outbox: `e2email outbox list`)"
    if opts["report"] is not None:
        summary += f"; report: {opts['report']}"
    if stopped is not None:
        fail(f"{stopped}; {summary}", exit_code_for(stopped))
    if ok == total:
        if total and not finished:
            # Sent whole: one ledger entry for the batch replaces those of its rows.
            box.finish_batch(batch[:16], completion)
        click.echo(summary)
        return
    code = next((c for c in _EXIT_PRIORITY if c in codes), EXIT_REJECTED)
    fail(summary, code)


# -- issue 12: --queue celery ------------------------------------------------------------------


def queue_rows(
    state: State,
    opts: dict[str, Any],
    template: Template,
    rows: Iterator[Row | BadRow],
    attachments: tuple[Attachment, ...],
    protection: Protection,
    passphrase: PasswordSource | None,
) -> None:
    """Protect each row's message here and queue the copies for Celery workers, in tasks of
    ``--queue-batch`` copies. Each row's Message-ID is derived from the batch and the row's
    values (keyed, as the ledger's keys), so rerunning the same command queues the same
    idempotency keys again and the workers deliver nothing twice."""
    account = opts.get(ACCOUNT)
    if account is None:
        raise click.UsageError(
            "--queue celery needs --account NAME: the workers deliver through it"
        )
    try:
        from e2email.celery import CeleryQueue, make_app
    except ImportError:
        fail("--queue celery needs Celery: pip install 'e2email[celery]'", EXIT_USAGE)
    queue = CeleryQueue(make_app(config=state.config_path))
    size = opts.get("queue_batch") or queue.conf.batch_size
    box = outbox_for(state, opts)
    try:
        secret = box.ledger_secret()
    finally:
        box.close()
    batch = batch_digest(
        secret=secret,
        sender=opts["sender"],
        template=template,
        attachments=attachments,
        options={"protection": protection, "batch": opts["batch_name"]},
    )
    domain = opts["sender"].rpartition("@")[2] or "e2email.invalid"
    report: ReportWriter | None = None
    report_fh: IO[str] | None = None
    if opts["report"] is not None:
        report, report_fh = ReportWriter.for_path(opts["report"])
    counts: Counter[str] = Counter()
    pending: list[tuple[ProtectedCopy, ...]] = []
    pending_rows: list[tuple[Row, str]] = []
    tasks = 0
    #: The broker or result backend unreachable: every row from there on is not queued.
    unreachable: E2EmailError | None = None
    not_queued = "not queued: the Celery broker or result backend is unreachable"

    def record(
        number: int,
        email: str,
        status: str,
        detail: str = "",
        mid: str | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        counts[status] += 1
        if report is not None:
            report.write(row=number, email=email, status=status, detail=detail, message_id=mid)
        if status != "queued" and not quiet:
            click.echo(printable(f"row {number} {email}: {status}: {detail}"))

    def flush() -> None:
        nonlocal tasks, unreachable
        if not pending:
            return
        try:
            queued = queue.enqueue(pending, account=account.name, batch_size=size)
        except E2EmailError as exc:
            # Part of this flush may have been queued: running the campaign again queues
            # each row's copies under the same idempotency keys, so nothing goes twice.
            unreachable = exc
            for row, mid in pending_rows:
                record(row.number, row.email, "not-sent", not_queued, mid, quiet=True)
            pending.clear()
            pending_rows.clear()
            return
        tasks += len(queued.task_ids)
        for row, mid in pending_rows:
            record(row.number, row.email, "queued", mid=mid)
        pending.clear()
        pending_rows.clear()

    mailer = Mailer(
        keystore=state.keystore(),
        protection=protection,
        passphrase=passphrase,
    )
    try:
        built = build_messages(
            rows,
            template,
            sender=opts["sender"],
            attachments=attachments,
            reply_to=opts["reply_to"],
        )
        for entry in built:
            if isinstance(entry, BadRow):
                record(entry.number, entry.email, "invalid", entry.reason)
                continue
            row, message = entry
            mid = f"{row_key(batch, row, secret=secret)[:40]}@{domain}"
            if unreachable is not None:
                record(row.number, row.email, "not-sent", not_queued, mid, quiet=True)
                continue
            try:
                copies = mailer.protect(replace(message, message_id=mid))
            except E2EmailError as exc:
                record(row.number, row.email, "not-sent", str(exc))
                continue
            pending.append(copies)
            pending_rows.append((row, mid))
            if sum(len(c) for c in pending) >= size:
                flush()
        flush()
    finally:
        mailer.close()
        if report is not None and report_fh is not None:
            report.close()
            with contextlib.suppress(OSError):
                report_fh.close()
    if unreachable is not None:
        fail(
            f"{unreachable}; queued {counts['queued']} message(s) before; "
            f"{counts['not-sent']} row(s) not queued (in the report; run the campaign again "
            "to queue them: what was queued is not sent twice)",
            EXIT_CONNECTION,
        )
    click.echo(
        f"queued {counts['queued']} message(s) in {tasks} task(s) for the workers of "
        f"account {account.name}; not queued: {sum(counts.values()) - counts['queued']}",
        err=True,
    )
    if counts["queued"] != sum(counts.values()):
        sys.exit(EXIT_KEY if counts["not-sent"] else EXIT_USAGE)
