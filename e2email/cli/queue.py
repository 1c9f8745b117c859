"""``e2email queue status``: where the copies queued for Celery workers stand (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from e2email.cli.app import EXIT_CONNECTION, EXIT_USAGE, State, cli, fail
from e2email.errors import ConfigError


@cli.group("queue")
def queue_group() -> None:
    """Delivery through Celery workers (`celery -A e2email.celery worker`).

    The broker and result backend come from E2EMAIL_CELERY_BROKER / E2EMAIL_CELERY_BACKEND or
    the `[celery]` table of the accounts file (`broker = "redis://..."`)."""


@queue_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.option("--broker", metavar="URL", help="The broker (default: as the workers find it).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The accounts file with the [celery] table (default: the group's --config, "
    "$E2EMAIL_CONFIG, or the default file).",
)
@click.pass_obj
def status(state: State, as_json: bool, broker: str | None, config_path: Path | None) -> None:
    """Recipients per state in the result backend: queued (waiting or being retried),
    sending (a worker is at the end of the data now), delivered, maybe-delivered (the
    connection was lost after the final "."; not sent again by itself: check with the
    recipient), failed (refused for good, with the server's reply); and the tasks waiting in
    the broker."""
    try:
        import redis

        from e2email.celery import STATES, make_app, queue_status
    except ImportError:
        fail("the Celery queue needs Celery: pip install 'e2email[celery]'", EXIT_USAGE)
    try:
        app = make_app(config=config_path or state.config_path, broker=broker)
        counts = queue_status(app)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except redis.RedisError as exc:
        fail(f"cannot read the result backend: {exc}", EXIT_CONNECTION)
    if as_json:
        click.echo(json.dumps(counts, sort_keys=True))
        return
    width = max(len(s) for s in (*STATES, "tasks waiting"))
    for name in STATES:
        click.echo(f"{name:<{width}}  {counts[name]}")
    if "tasks" in counts:
        click.echo(f"{'tasks waiting':<{width}}  {counts['tasks']}")
