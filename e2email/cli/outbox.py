"""``e2email outbox``: what waits to be delivered (``list``), send it again (``retry``), or give
it up (``drop``). The outbox is HOME/outbox.sqlite3; it holds only protected messages."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import click

from e2email.bulk import printable
from e2email.cli.app import EXIT_KEY, EXIT_REJECTED, EXIT_USAGE, State, cli, exit_code_for, fail
from e2email.cli.send import (
    ACCOUNT,
    SMTP_OPTION_NAMES,
    account_options,
    delivery_options,
    given,
    outbox_for,
    retry_policy,
    send,
    smtp_settings,
)
from e2email.client import Mailer
from e2email.config import SMTPSettings
from e2email.delivery import route_of
from e2email.errors import ConfigError, E2EmailError, KeyErrorBase
from e2email.keystore import Keystore
from e2email.outbox import (
    ItemState,
    Outbox,
    OutboxError,
    OutboxItem,
    RecipientState,
    same_route,
)
from e2email.outcome import CopyOutcome
from e2email.transport.smtp import SMTPTransport


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _recipients(item: OutboxItem) -> str:
    parts = []
    for r in item.recipients:
        if r.state is RecipientState.PENDING:
            parts.append(r.address + (f" (pending: {r.reply})" if r.reply else ""))
        elif r.state is RecipientState.FAILED:
            parts.append(f"{r.address} (refused: {r.reply})")
        else:
            parts.append(f"{r.address} (delivered)")
    return ", ".join(parts)


def _as_json(item: OutboxItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "state": item.state.value,
        "message_id": item.message_id,
        "kind": item.kind,
        "mail_from": item.mail_from,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "reply": str(r.reply) if r.reply else None,
            }
            for r in item.recipients
        ],
        "attempts": item.attempts,
        "created": item.created,
        "next_attempt": item.next_attempt,
        "last_error": item.last_error,
        "route": item.route,
        # The account of the config file it was stored for (null: none).
        "account": item.account,
        "size": item.size,
        # When the end of its data was sent in the attempt that was interrupted (state
        # "maybe-delivered"); null otherwise.
        "maybe_delivered_since": item.maybe_since
        if item.state is ItemState.MAYBE_DELIVERED
        else None,
    }


@cli.group()
def outbox() -> None:
    """Messages not yet delivered to every recipient (HOME/outbox.sqlite3).

    Every message is stored here, already protected, before it is sent, and removed once the
    server accepted it for every recipient. What is left after a failure, a crash or a kill is
    sent again by `outbox retry` (or, for --to-file batches, by rerunning the same command),
    except a message interrupted after it was sent whole (maybe-delivered: the server may
    have it), which is sent again only with `outbox retry --maybe-delivered`. Before a retry
    the keys each message was encrypted to are checked again: one revoked since holds it.
    """


@outbox.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per item.")
@click.pass_obj
def list_items(state: State, as_json: bool) -> None:
    """List what waits: ID, state, attempts, recipients and the last error."""
    with Outbox.in_home(state.home) as box:
        items = box.items()
    if as_json:
        click.echo(json.dumps([_as_json(i) for i in items], indent=2))
        return
    if not items:
        click.echo("the outbox is empty")
        return
    for item in items:
        state_text = item.state.value
        if item.state is ItemState.SENDING:
            state_text += f" (by {item.claimed_by})"
        click.echo(
            f"{item.id}  {state_text}  {item.attempts} attempt(s)  {_when(item.created)}  "
            f"{item.size} bytes  via {item.route or '?'}"
            + (f" (account {item.account})" if item.account else "")
        )
        click.echo(printable(f"    to: {_recipients(item)}"))
        if item.last_error:
            click.echo(printable(f"    last error: {item.last_error}"))
        if item.state is ItemState.MAYBE_DELIVERED and item.maybe_since is not None:
            click.echo(
                f"    maybe delivered: interrupted after the message was sent at "
                f"{_when(item.maybe_since)}; the server may have it. Check with the "
                "recipient, then `e2email outbox retry --maybe-delivered "
                f"{item.id}` sends it again or `e2email outbox drop {item.id}` forgets it"
            )
    click.echo(f"{len(items)} item(s)")


@outbox.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option(
    "--all-servers",
    is_flag=True,
    help="Without IDs: also items first sent through another server or user.",
)
@click.option(
    "--include-failed",
    is_flag=True,
    help="Also send again to recipients the server refused permanently (5xx).",
)
@click.option(
    "--now",
    is_flag=True,
    help="Also items whose next retry time has not come yet.",
)
@click.option(
    "--maybe-delivered",
    "maybe_delivered",
    is_flag=True,
    help="Also send items that may have been delivered already (interrupted after the "
    "message was sent, see `outbox list`): the recipient may get it twice.",
)
@delivery_options
@account_options
@click.pass_obj
def retry(
    state: State,
    /,
    ids: tuple[str, ...],
    all_servers: bool,
    include_failed: bool,
    now: bool,
    maybe_delivered: bool,
    **opts: Any,
) -> None:
    """Send again what waits in the outbox: the items IDS (or unique prefixes), or every item
    whose retry time has come (--now: any). Recipients the server refused with 5xx are left
    alone unless --include-failed, and so are items that may have been delivered already
    unless --maybe-delivered.

    An item stored through an account of the config file needs no server options: it goes
    through that account again (one that is no longer in the file is reported and left).
    With --account NAME or --host (and the other server options, as for `send`), the items
    meant for that account or server go through it instead."""
    flags = _Flags(all_servers, include_failed, now, maybe_delivered)
    if opts["account"] is not None:
        account = state.config(opts["config_file"]).account(opts["account"])
        state.use_account(account)
        opts[ACCOUNT] = account
    elif not opts["host"]:
        stray = [name for name in SMTP_OPTION_NAMES if given(name)]
        if stray:
            raise click.UsageError(
                f"--{stray[0].replace('_', '-')} needs --host (or --account NAME); without "
                "server options, each item goes through the account it was stored for"
            )
        _retry_by_account(state, ids, flags, opts)
        return
    smtp = smtp_settings(state, opts)
    try:
        # Incomplete server options (a user without a password source, ...) are a usage
        # error whatever the outbox holds, not "the outbox is empty" and exit 0.
        SMTPTransport(smtp)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    box = outbox_for(state, opts)
    try:
        account_name = opts[ACCOUNT].name if opts.get(ACCOUNT) else None
        chosen, held_back = _select(box, ids, route_of(smtp), flags, account=account_name)
    except E2EmailError:
        box.close()
        raise
    if chosen is None:
        box.close()
        click.echo("the outbox is empty")
        return
    _say_held_back(held_back)
    with box:
        failures = _send_items(state, box, smtp, state.keystore(), chosen, flags, opts)
        _finish(box, failures)


@dataclass(frozen=True)
class _Flags:
    all_servers: bool
    include_failed: bool
    now: bool
    maybe_delivered: bool


def _say_held_back(held_back: list[str]) -> None:
    if held_back:
        click.echo(
            f"{len(held_back)} item(s) may have been delivered already and are not sent again "
            f"({', '.join(held_back)}): see `e2email outbox list`; --maybe-delivered sends them",
            err=True,
        )


def _send_items(
    state: State,
    box: Outbox,
    smtp: SMTPSettings,
    keystore: Keystore,
    chosen: list[str],
    flags: _Flags,
    opts: dict[str, Any],
) -> list[CopyOutcome]:
    """Send the items ``chosen`` through ``smtp``; the outcomes that were not delivered."""
    failures: list[CopyOutcome] = []

    def show(outcome: CopyOutcome) -> None:
        item = outcome.tag
        status = outcome.status
        text = ", ".join(
            r.address if r.status == "delivered" else f"{r.address}: {r.status}: {r.error}"
            for r in outcome.recipients
        )
        click.echo(printable(f"{item.id}: {status}: {text}"))
        if status != "delivered":
            failures.append(outcome)

    with Mailer(
        smtp=smtp,
        # To re-check the keys each copy was encrypted to: one revoked since is held.
        keystore=keystore,
        outbox=box,
        retry=retry_policy(opts),
        connections=opts["connections"],
    ) as mailer:
        try:
            mailer.send_outbox(
                chosen,
                on_outcome=show,
                include_failed=flags.include_failed,
                due_only=not flags.now,
                maybe_delivered=flags.maybe_delivered,
            )
        except E2EmailError as exc:
            fail(f"{exc} (what was not sent stays in the outbox)", exit_code_for(exc))
    return failures


def _finish(box: Outbox, failures: list[CopyOutcome], *, left_alone: int = 0) -> None:
    """Exit as the outcome says: a refusal (3 held, 6 refused) if any; 2 when items were left
    alone for want of an account or server options (a usage/config matter); else 0."""
    left = len(box)
    if failures:
        held = any(isinstance(o.error, KeyErrorBase) for o in failures)
        fail(
            f"{len(failures) + left_alone} item(s) not delivered to every recipient; {left} "
            "item(s) in the outbox",
            EXIT_KEY if held else EXIT_REJECTED,
        )
    if left_alone:
        fail(
            f"{left_alone} item(s) not sent: no account or server to send them through "
            f"(see above); {left} item(s) in the outbox",
            EXIT_USAGE,
        )
    click.echo(f"{left} item(s) left in the outbox")


def _retry_by_account(
    state: State, ids: tuple[str, ...], flags: _Flags, opts: dict[str, Any]
) -> None:
    """`outbox retry` without server options: each item through the account it was stored
    for, found again in the config file."""
    with Outbox.in_home(state.home) as box:
        chosen, held_back = _select(box, ids, "", replace(flags, all_servers=True))
        if chosen is None:
            click.echo("the outbox is empty")
            return
        _say_held_back(held_back)
        by_account: dict[str, list[str]] = {}
        unnamed: list[str] = []
        for item_id in chosen:
            name = box.get(item_id, raw=False).account
            (unnamed if name is None else by_account.setdefault(name, [])).append(item_id)
        left_alone = 0
        if unnamed:
            left_alone += len(unnamed)
            click.echo(
                f"{', '.join(unnamed)}: stored without an account: give --host (and the server "
                "options, as for `send`) or --account NAME to send it; left in the outbox",
                err=True,
            )
        config = state.config(opts["config_file"]) if by_account else None
        failures: list[CopyOutcome] = []
        for name, item_ids in by_account.items():
            assert config is not None
            account = config.accounts.get(name)
            if account is None:
                left_alone += len(item_ids)
                click.echo(
                    printable(
                        f"{', '.join(item_ids)}: stored for account {name!r}, which is no "
                        f"longer in {config.path}: left in the outbox (--account NAME or "
                        "--host sends it through another)"
                    ),
                    err=True,
                )
                continue
            account_opts = {**opts, ACCOUNT: account}
            smtp = smtp_settings(state, account_opts)
            home = state.home if state.home_given or account.home is None else account.home
            gnupg_home = (
                state.gnupg_home
                if state.gnupg_home_given or account.gnupg_home is None
                else account.gnupg_home
            )
            keystore = Keystore(home, gnupg_home=gnupg_home)
            failures += _send_items(state, box, smtp, keystore, item_ids, flags, account_opts)
        _finish(box, failures, left_alone=left_alone)


def _select(
    box: Outbox,
    ids: tuple[str, ...],
    route: str,
    flags: _Flags,
    *,
    account: str | None = None,
) -> tuple[list[str] | None, list[str]]:
    """The IDs `outbox retry` sends (None when the outbox is empty), and those of the matching
    items left alone because they may have been delivered. Raises OutboxError (one line, exit
    2) when items wait but none matches the IDs, the route and the flags."""
    items = box.items()
    if not items:
        return None, []
    if ids:
        named = {box.get(i, raw=False).id for i in ids}
        items = tuple(i for i in items if i.id in named)
    elif not flags.all_servers:
        # An item stored for an account goes with that account (or its server and user).
        items = tuple(
            i
            for i in items
            if (account is not None and i.account == account)
            or ((i.account is None or account is None) and same_route(i.route, route))
        )
        if not items:
            raise OutboxError(
                f"nothing in the outbox is for {printable(route)} (see `e2email outbox list`; "
                "--all-servers sends the items of other servers and users too)"
            )
    held_back: list[str] = []
    if not flags.maybe_delivered:
        held_back = [i.id for i in items if i.state is ItemState.MAYBE_DELIVERED]
        items = tuple(i for i in items if i.state is not ItemState.MAYBE_DELIVERED)
    if not flags.include_failed:
        items = tuple(i for i in items if i.state is not ItemState.FAILED)
    if not flags.now:
        due = time.time()
        items = tuple(i for i in items if i.next_attempt <= due)
    if not items:
        if held_back:
            raise OutboxError(
                f"nothing to retry: {len(held_back)} item(s) may have been delivered already "
                f"({', '.join(held_back)}; see `e2email outbox list`): check with the "
                "recipients; --maybe-delivered sends them again"
            )
        raise OutboxError(
            "nothing to retry: the matching items are refused permanently (5xx; "
            "--include-failed sends them again) or not due yet (--now sends them anyway)"
        )
    return [i.id for i in items], held_back


# `outbox retry` reaches the server exactly as `send` does: share its options.
retry.params[:0] = [p for p in send.params if p.name in SMTP_OPTION_NAMES]


@outbox.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.pass_obj
def drop(state: State, ids: tuple[str, ...]) -> None:
    """Delete items from the outbox unsent (IDs or unique prefixes, from `outbox list`)."""
    with Outbox.in_home(state.home) as box:
        for item_id in ids:
            item = box.drop(item_id)
            click.echo(f"dropped {item.id} ({item.message_id} to {', '.join(item.pending)})")


@outbox.command("forget-batches")
@click.pass_obj
def forget_batches(state: State) -> None:
    """Forget which rows of --to-file batches were sent (the ledger); queued messages stay.

    Needed only when HOME/ledger.key, which keys the ledger, was lost or replaced: rerunning
    an unfinished batch afterwards sends every row of it again."""
    with Outbox.in_home(state.home) as box:
        count = box.forget_batches()
    click.echo(f"forgot {count} ledger entr{'y' if count == 1 else 'ies'}")
