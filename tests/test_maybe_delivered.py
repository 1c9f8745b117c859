"""'Maybe delivered': a copy interrupted after its final "." (a lost reply, a crash) may be at
the server already, so it is never sent again by itself; `outbox list` shows it and `outbox
retry --maybe-delivered` sends it on request. Real processes, a real TLS server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from test_cli import e2email, send_args

from e2email.outbox import ItemState, NewItem, Outbox
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

PLAIN = ("--no-sign", "--no-encrypt")


def test_a_drop_after_the_final_dot_sends_one_copy_and_the_cli_shows_and_resends_it(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """`send` to a server that takes the message and hangs up before its 250: exactly one
    copy at the server (the old code made three with the default retries), exit 4 saying the
    server may have it; `outbox list` (text and JSON) shows it maybe-delivered; a plain
    `outbox retry` leaves it and says so; `outbox retry --maybe-delivered` sends it."""
    home = tmp_path / "home"
    server = smtp_server(faults=[Fault("data-end", "accept-drop", times=None)])
    done = e2email(*send_args(server, "--to", "bob@example.net", "--body", "hi", *PLAIN), home=home)
    assert done.returncode == 4, done.stderr
    assert "may or may not have accepted" in done.stderr
    assert "--maybe-delivered" in done.stderr and "do not send it anew" not in done.stderr
    assert len(server.messages) == 1
    (raw,) = [m.data for m in server.messages]

    listing = e2email("outbox", "list", home=home)
    assert "maybe-delivered" in listing.stdout, listing.stdout
    assert "--maybe-delivered" in listing.stdout
    (shown,) = json.loads(e2email("outbox", "list", "--json", home=home).stdout)
    assert shown["state"] == "maybe-delivered" and shown["maybe_delivered_since"] is not None

    fine = smtp_server()
    args = send_args(fine)[send_args(fine).index("--host") :]
    plain = e2email("outbox", "retry", "--now", *args, home=home)
    assert plain.returncode == 2 and "may have been delivered" in plain.stderr, plain.stderr
    assert fine.messages == []

    forced = e2email("outbox", "retry", "--maybe-delivered", *args, home=home)
    assert forced.returncode == 0, forced.stderr
    assert [m.data for m in fine.messages] == [raw]
    assert e2email("outbox", "list", home=home).stdout.startswith("the outbox is empty")


_IN_FLIGHT = textwrap.dedent(
    """
    import sys, time
    from e2email.outbox import NewItem, Outbox
    box = Outbox(sys.argv[1])
    (item_id,) = box.add([NewItem(raw=b"x", mail_from="a@example.org",
                                  recipients=("b@example.net",), message_id="m@x")])
    box.mark_in_flight(item_id)  # the end of data is on its way ...
    print(item_id, flush=True)
    time.sleep(60)  # ... and the process dies before the reply is recorded
    """
)


def test_a_copy_in_flight_when_its_sender_is_killed_is_maybe_delivered(tmp_path: Path) -> None:
    """A process marks its copy in flight (just before the final "."), then is killed with
    SIGKILL: the next run finds the copy maybe-delivered, not an ordinary claim of a dead
    process to take over and resend; only an explicit request claims it. A copy of the same
    dead process that was not in flight is taken over as before."""
    path = tmp_path / "o.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _IN_FLIGHT, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        item_id = proc.stdout.readline().strip()
        box = Outbox(path)
        assert box.get(item_id, raw=False).state is ItemState.SENDING  # its owner lives
        assert box.claim() == ()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (other,) = box.add(
        [
            NewItem(
                raw=b"y", mail_from="a@example.org", recipients=("c@example.com",), message_id="n@x"
            )
        ],
        claim=False,
    )
    found = box.get(item_id, raw=False)
    assert found.state is ItemState.MAYBE_DELIVERED and found.maybe_since is not None
    assert [i.id for i in box.claim()] == [other]
    box.release([other])
    assert [i.id for i in box.claim(maybe_delivered=True)] == [item_id, other]
    box.close()


def test_settling_clears_the_in_flight_mark_and_release_keeps_it(tmp_path: Path) -> None:
    """A known outcome (the server answered) clears the mark; a release without one (Ctrl-C
    after the ".") keeps it: the item is then maybe-delivered."""
    box = Outbox(tmp_path / "o.sqlite3")
    new = NewItem(
        raw=b"x", mail_from="a@example.org", recipients=("b@example.net",), message_id="m"
    )
    (answered,) = box.add([new])
    box.mark_in_flight(answered)
    box.settle(answered, error="451 later", release=True, maybe_delivered=False)
    assert box.get(answered, raw=False).state is ItemState.QUEUED
    (cut,) = box.add([new])
    box.mark_in_flight(cut)
    box.release([cut], error="interrupted")
    assert box.get(cut, raw=False).state is ItemState.MAYBE_DELIVERED
    assert [i.id for i in box.claim()] == [answered]
    box.close()


def test_a_delivery_that_cannot_be_recorded_is_maybe_delivered_not_queued_again(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The server accepted the copy but recording that in the outbox failed (disk full): the
    copy is left maybe-delivered, so no later retry sends it a second time by itself (the
    old code left it queued, claimed by a process that, once gone, no longer held it)."""
    import asyncio

    from e2email import AsyncMailer, Message, SMTPSettings, TLSMode
    from e2email.config import Protection
    from e2email.outbox import OutboxError

    server = smtp_server()
    assert server.ca_file is not None
    box = Outbox(tmp_path / "o.sqlite3")
    settle = box.settle

    def full_disk(item_id: str, **kwargs: object) -> bool:
        if kwargs.get("delivered"):
            raise OutboxError("database or disk is full")
        return settle(item_id, **kwargs)  # type: ignore[arg-type]

    box.settle = full_disk  # type: ignore[method-assign]
    m = AsyncMailer(
        smtp=SMTPSettings(
            host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
        ),
        outbox=box,
        protection=Protection(sign=False, encrypt=False),
    )
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="x")
    result = asyncio.run(m.send(message))
    assert result.accepted == ("bob@example.net",)  # true: the server said 250
    assert len(server.messages) == 1
    (item,) = box.items()
    assert item.state is ItemState.MAYBE_DELIVERED
    assert box.claim() == ()
    box.close()
