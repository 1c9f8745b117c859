"""The Sequoia engine's large copies: the payload is fed to Sequoia by a child process
(e2email.feed), never held whole in this process, and a feeder that does not feed it whole
(killed mid-way, failed, or not started) never lets a truncated copy out.

What the server received is decrypted and verified by gpg (a tool we did not write)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email import (
    Attachment,
    Mailer,
    Message,
    OpenPGPEngine,
    Protection,
    SMTPSettings,
    TLSMode,
    feed,
)
from e2email.crypto import sequoia
from e2email.crypto.base import protector_for
from e2email.keystore import Keystore
from e2email.message import PayloadStream, stream_payload
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

#: Over the in-memory limit (1 MiB) and many pipe buffers (64 KiB) and base64 blocks.
SIZE = 6_000_000 + 17

#: A feeder killed mid-way: it writes about 200 KB of the payload, then SIGKILLs itself.
KILLED_MIDWAY = """
import os, pickle, signal, sys
sys.path[:] = pickle.load(sys.stdin.buffer)
payload = pickle.load(sys.stdin.buffer)
written = 0
for piece in payload:
    os.write(3, piece)
    written += len(piece)
    if written > 200_000:
        os.kill(os.getpid(), signal.SIGKILL)
"""

#: A feeder that exits 0 but reports fewer bytes than the payload has.
SHORT_REPORT = """
import os, pickle, sys
sys.path[:] = pickle.load(sys.stdin.buffer)
payload = pickle.load(sys.stdin.buffer)
os.write(3, next(iter(payload)))
os.write(2, b"wrote 10 1000\\n")
"""


@pytest.fixture(autouse=True)
def feed_from_1_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The feeder from 1 MiB up (8 MiB by default), so that a few megabytes exercise it."""
    monkeypatch.setattr(sequoia, "FEED_MIN", 1 << 20)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("feed") / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def _message(keys: Keys, attachment: Attachment) -> Message:
    return Message(
        sender=keys.alice.address,
        to=[keys.bob.address],
        subject="large",
        text="The file is attached.\n",
        attachments=[attachment],
    )


def _stream(keys: Keys, attachment: Attachment) -> PayloadStream:
    return stream_payload(_message(keys, attachment), hp=None)


def _drain(fd: int) -> bytes:
    out = bytearray()
    while piece := os.read(fd, 1 << 16):
        out += piece
    return bytes(out)


def _script(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    monkeypatch.setattr(feed, "_command", lambda: [sys.executable, "-I", "-c", script])


@pytest.mark.parametrize("source", ["from_path", "bytes"])
def test_the_feeder_writes_the_payload_whole_and_says_so(
    keys: Keys, big_file: Path, source: str
) -> None:
    """The child writes exactly the payload's bytes (an attachment read from its path by the
    child, or given as bytes) and reports their number and its own peak memory."""
    attachment = (
        Attachment.from_path(big_file)
        if source == "from_path"
        else Attachment("big.bin", big_file.read_bytes())
    )
    stream = _stream(keys, attachment)
    with feed.Feeder(stream, len(stream)) as feeder:
        received = _drain(feeder.fd)
        result = feeder.finish()
    assert received == bytes(stream)
    assert result.written == len(stream) > SIZE
    assert result.peak_rss > 1 << 20  # its own VmHWM: a Python process


def test_an_attachment_given_as_bytes_is_not_copied_to_reach_the_feeder(keys: Keys) -> None:
    """Pickling the payload into the child's pipe writes a large bytes attachment from the
    object itself: this process never makes a second copy of it."""
    data = os.urandom(8_000_000)
    stream = _stream(keys, Attachment("big.bin", data))
    tracemalloc.start()
    try:
        with feed.Feeder(stream, len(stream)) as feeder:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            received = _drain(feeder.fd)
            feeder.finish()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert received == bytes(stream)


def test_a_feeder_killed_mid_way_is_a_feed_error(
    keys: Keys, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader sees the end of its input early (the child is gone): finish() refuses."""
    _script(monkeypatch, KILLED_MIDWAY)
    stream = _stream(keys, Attachment.from_path(big_file))
    with feed.Feeder(stream, len(stream)) as feeder:
        received = _drain(feeder.fd)
        with pytest.raises(feed.FeedError, match="killed by signal 9"):
            feeder.finish()
    assert 200_000 < len(received) < len(stream)


def test_a_feeder_reporting_fewer_bytes_is_a_feed_error(
    keys: Keys, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script(monkeypatch, SHORT_REPORT)
    stream = _stream(keys, Attachment.from_path(big_file))
    with feed.Feeder(stream, len(stream)) as feeder:
        _drain(feeder.fd)
        with pytest.raises(feed.FeedError, match="did not feed the whole payload"):
            feeder.finish()


def test_the_feeder_imports_from_this_process_s_module_search_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child finds what this process finds (here a module only on this process's
    sys.path, as with PYTHONPATH, which the child's -I would ignore): it unpickles the same
    classes from the same code."""
    (tmp_path / "feed_probe_pieces.py").write_text(
        "class Pieces:\n    def __iter__(self):\n        return iter([b'only ', b'here'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import feed_probe_pieces  # type: ignore[import-not-found]

    with feed.Feeder(feed_probe_pieces.Pieces(), 9) as feeder:
        assert _drain(feeder.fd) == b"only here"
        assert feeder.finish().written == 9


def test_the_feeder_gets_no_secret_and_its_command_line_shows_nothing(
    keys: Keys, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Process-table privacy: the child's command line is the interpreter and the module,
    nothing of the message, and its environment holds nothing of this process's secrets."""
    monkeypatch.setenv("SMTP_PASSWORD", "hunter2-secret")
    message = _message(keys, Attachment.from_path(big_file))
    stream = stream_payload(message, hp=None)
    with feed.Feeder(stream, len(stream)) as feeder:
        # Once its first bytes arrive it runs Python (its command line is set), and it is
        # still there to be looked at: blocked on the full pipe.
        first = os.read(feeder.fd, 1)
        cmdline = Path(f"/proc/{feeder.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{feeder.pid}/environ").read_bytes()
        assert first + _drain(feeder.fd) == bytes(stream)
        feeder.finish()
    assert cmdline[1:] == [b"-I", b"-c", feed._BOOTSTRAP.encode(), b""]
    assert b"hunter2" not in environ
    for shown in (keys.bob.address, "large", str(big_file), "big.bin"):
        assert shown.encode() not in b" ".join(cmdline)


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=60
    )


def _sent_attachment(server: LoopbackSMTPServer, recipients_home: Path, keys: Keys) -> bytes:
    (received,) = server.messages
    _, (_, encrypted_part) = multipart_parts(received.data)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted_part))
    assert "DECRYPTION_OKAY" in status
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    import email
    import email.policy

    entity = email.message_from_bytes(plaintext, policy=email.policy.default)
    (part,) = list(entity.iter_attachments())  # type: ignore[attr-defined]
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return content


def _send(server: LoopbackSMTPServer, sender_store: Keystore, message: Message) -> None:
    with Mailer(
        smtp=_settings(server),
        keystore=sender_store,
        protection=Protection(engine=OpenPGPEngine.SEQUOIA),
    ) as mailer:
        result = mailer.send(message)
    assert len(result.accepted) == 1


@pytest.mark.parametrize("feed_min", [1 << 20, sequoia.FEED_MIN])
def test_a_copy_fed_by_the_child_arrives_whole_and_verifies(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    big_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    feed_min: int,
) -> None:
    """gpg decrypts what the server received to the whole file, with Alice's good signature:
    fed by the child (over FEED_MIN), or, below it, from the payload whole as before."""
    monkeypatch.setattr(sequoia, "FEED_MIN", feed_min)
    server = smtp_server(tls="implicit")
    with caplog.at_level(logging.DEBUG, logger="e2email.crypto.sequoia"):
        _send(server, sender_store, _message(keys, Attachment.from_path(big_file)))
    assert _sent_attachment(server, recipients_home, keys) == big_file.read_bytes()
    fed = [r for r in caplog.records if getattr(r, "feeder_peak_rss", 0)]
    assert len(fed) == (1 if feed_min < SIZE else 0)
    assert "made again" not in caplog.text


@pytest.mark.parametrize("failure", ["killed mid-way", "cannot start"])
def test_a_feeder_that_fails_never_lets_a_truncated_copy_out(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    big_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """Sequoia signs and encrypts whatever it read before its input ended: with the feeder
    killed mid-way that is a truncated payload, which must never be sent. The copy is made
    again from the payload whole, and what arrives decrypts to the whole file."""
    if failure == "killed mid-way":
        _script(monkeypatch, KILLED_MIDWAY)
    else:
        monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    server = smtp_server(tls="implicit")
    with (
        caplog.at_level(logging.WARNING, logger="e2email.crypto.sequoia"),
        Mailer(
            smtp=_settings(server),
            keystore=sender_store,
            protection=Protection(engine=OpenPGPEngine.SEQUOIA),
        ) as mailer,
    ):
        result = mailer.send(_message(keys, Attachment.from_path(big_file)))
    assert list(result.accepted) == [keys.bob.address]
    assert _sent_attachment(server, recipients_home, keys) == big_file.read_bytes()
    assert "made again in memory" in caplog.text


def test_sequoia_never_holds_a_large_payload_whole(
    keys: Keys, sender_store: Keystore, big_file: Path
) -> None:
    """With the file attached by path, the Sequoia engine makes a large copy without this
    process ever holding its payload (4 MB of base64 MIME) or the ciphertext whole: Python's
    own allocations stay far below the payload's size (the old code held the payload whole,
    about 1.5 times it at its peak)."""
    engine = protector_for(
        Protection(engine=OpenPGPEngine.SEQUOIA),
        keystore=sender_store,
        certstore=None,  # type: ignore[arg-type]
    )
    message = _message(keys, Attachment.from_path(big_file)).finalized()
    protection = Protection(engine=OpenPGPEngine.SEQUOIA)
    keys_for = engine.resolve(message, protection)
    engine.protect_sync(message, protection, keys_for, None)  # type: ignore[attr-defined]
    tracemalloc.start()
    try:
        (copy,) = engine.protect_sync(message, protection, keys_for, None)  # type: ignore[attr-defined]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    payload = len(stream_payload(message, hp=None))
    assert copy.size > payload
    assert peak < payload // 2, (peak, payload)


def test_no_feeder_where_python_is_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under uWSGI (or any program embedding Python) sys.executable is that program: it is
    never started with the feeder's arguments; the copy is made as before instead."""
    monkeypatch.setattr(sys, "executable", "/usr/bin/uwsgi")
    assert not feed.available()
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    assert feed.available()


# Review findings (round 4): what else runs in the child, signals, descriptors, search path.

#: A child whose start writes to its standard output (as a sitecustomize, a .pth file's
#: import line or a module imported while unpickling may): never part of the payload.
STRAY_AT_START = "import os; os.write(1, b'EXTRA\\n'); "


def test_stray_output_of_the_child_never_reaches_the_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its standard output is not the payload's pipe: the reader gets the payload exactly,
    and the stray line makes a report that finish() refuses (the copy is then made again)."""
    monkeypatch.setattr(
        feed, "_command", lambda: [sys.executable, "-I", "-c", STRAY_AT_START + feed._BOOTSTRAP]
    )
    with feed.Feeder([b"the payload"], 11) as feeder:
        received = _drain(feeder.fd)
        with pytest.raises(feed.FeedError, match="did not feed the whole payload"):
            feeder.finish()
    assert received == b"the payload"


def test_the_child_is_in_this_process_s_process_group() -> None:
    """A Ctrl-C at the terminal (SIGINT to the foreground process group) reaches the child
    too: it stops, and Sequoia, waiting on it, sees the end of its input."""
    with feed.Feeder([b"x"], 1) as feeder:
        assert os.getpgid(feeder.pid) == os.getpgrp()
        assert _drain(feeder.fd) == b"x"
        feeder.finish()


CLOSED_STDIO = """
import os, sys
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
os.dup2(out, 20)
for fd in (0, 1, 2, out):
    os.close(fd)
from e2email import feed
with feed.Feeder([b"abc", b"def"], 6) as feeder:
    received = b""
    while piece := os.read(feeder.fd, 65536):
        received += piece
    result = feeder.finish()
os.write(20, repr((received, result.written)).encode())
"""


def test_a_process_started_with_0_1_2_closed_feeds_its_payload(tmp_path: Path) -> None:
    """New pipes then take the numbers 0, 1 and 2: moved high before the child's
    descriptors are set up, none overwrites another."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_STDIO, str(out)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.read_text() == repr((b"abcdef", 6)), done.stderr


SIGPIPE_DEFAULT = """
import signal, sys
from e2email import feed
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line programs do
# A child gone before it read its payload (here it exits at once).
feed._command = lambda: [sys.executable, "-I", "-c", "import sys; sys.exit(3)"]
payload = [b"x" * 4_000_000]
try:
    with feed.Feeder(payload, len(payload[0])) as feeder:
        feeder.finish()
except OSError as exc:
    print("refused:", type(exc).__name__)
print("alive")
"""


def test_a_child_gone_early_never_kills_a_process_with_sigpipe_at_its_default() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGPIPE_DEFAULT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.splitlines()[-1] == "alive"
    assert "refused" in done.stdout


def test_the_child_never_takes_e2email_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative entry of sys.path ('' is the current directory) is not passed on: an
    e2email package in a hostile current directory never stands in for this one."""
    hostile = tmp_path / "e2email"
    hostile.mkdir()
    (hostile / "__init__.py").write_text("raise SystemExit(7)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", "relative", *sys.path])
    with feed.Feeder([b"payload"], 7) as feeder:
        assert _drain(feeder.fd) == b"payload"
        assert feeder.finish().written == 7
    assert feed._search_path()[0] == str(Path(feed.__file__).parent.parent)
    assert all(os.path.isabs(entry) for entry in feed._search_path())


def test_the_child_inherits_no_other_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inheritable descriptor of this process (a socket, a file) is closed in the child
    before anything of it runs."""
    (tmp_path / "feed_probe_fd.py").write_text(
        "import os\n"
        "class FdProbe:\n"
        "    def __init__(self, fd):\n        self.fd = fd\n"
        "    def __iter__(self):\n"
        "        try:\n            os.fstat(self.fd)\n"
        "        except OSError:\n            return iter([b'shut'])\n"
        "        return iter([b'open'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import feed_probe_fd  # type: ignore[import-not-found]

    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        os.set_inheritable(fd, True)
        with feed.Feeder(feed_probe_fd.FdProbe(fd), 4) as feeder:
            assert _drain(feeder.fd) == b"shut"
            feeder.finish()
    finally:
        os.close(fd)


def test_with_sigchld_ignored_an_exact_report_is_trusted() -> None:
    """With SIGCHLD ignored the system reaps the child itself and its exit status cannot be
    had: its one-line exact report is trusted (the copy is not made twice); a short one is
    still refused."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with feed.Feeder([b"abc"], 3) as feeder:
            assert _drain(feeder.fd) == b"abc"
            assert feeder.finish().written == 3
        with feed.Feeder([b"abc"], 4) as feeder:
            _drain(feeder.fd)
            with pytest.raises(feed.FeedError, match="exit status unknown"):
                feeder.finish()
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_no_feeder_in_a_frozen_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert not feed.available()


#: A child that never starts feeding (stalled before it writes anything).
NEVER_WRITES = "import time; time.sleep(120)"

#: A child that fails with a report naming the attachment's file.
FAILS_NAMING_THE_FILE = (
    "import os, sys; os.write(2, b'failed after 0 bytes: MessageError: "
    "/secret/dir/contract.pdf changed since it was attached\\n'); sys.exit(1)"
)


@pytest.mark.parametrize("child", ["never writes", "fails naming the file"])
def test_a_stalled_or_failed_feeder_is_given_up_on_and_the_log_names_no_file(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    big_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    child: str,
) -> None:
    """A child that writes nothing is given up on after FEED_START_TIMEOUT (waited for with
    the GIL released, before Sequoia is called) and the copy is made in memory; the warning
    never repeats the child's words, which may name the attachment's file."""
    monkeypatch.setattr(sequoia, "FEED_START_TIMEOUT", 0.5)
    _script(monkeypatch, NEVER_WRITES if child == "never writes" else FAILS_NAMING_THE_FILE)
    server = smtp_server(tls="implicit")
    with caplog.at_level(logging.DEBUG, logger="e2email.crypto.sequoia"):
        _send(server, sender_store, _message(keys, Attachment.from_path(big_file)))
    assert _sent_attachment(server, recipients_home, keys) == big_file.read_bytes()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "made again in memory" in warnings[0]
    assert "contract.pdf" not in warnings[0]
    if child == "never writes":
        assert "wrote nothing in 0.5 seconds" in caplog.text


def test_a_default_socket_timeout_does_not_reach_the_feeder() -> None:
    """socket.setdefaulttimeout() (a program's, for its own sockets) would make the pickles'
    socket non-blocking in the child: it is not applied."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        payload = [os.urandom(3_000_000)]
        with feed.Feeder(payload, 3_000_000) as feeder:
            assert _drain(feeder.fd) == payload[0]
            assert feeder.finish().written == 3_000_000
    finally:
        socket.setdefaulttimeout(previous)
