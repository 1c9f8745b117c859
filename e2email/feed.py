"""A payload fed into a pipe by a small child process, piece by piece, for a reader in this
process that holds the GIL while it reads (the Sequoia engine's large copies).

pysequoia's ``encrypt_file`` reads its input while holding this process's GIL, so no Python
code of this process can run to feed it: it used to get the payload as one ``bytes`` (34 MB
for a 25 MB attachment) written by a thread in one ``write(2)``. Here a child process gets
the :class:`~e2email.message.PayloadStream` pickled over its standard input (a file attached
with ``Attachment.from_path`` travels as its path, size and identity, and is read again, and
checked unchanged, by the child; an attachment given as bytes travels as those bytes, written
from the object itself, not from a copy), and writes the stream's pieces to its descriptor
:data:`DATA_FD` (not its standard output, where anything else may write too): the write end
of the pipe the reader reads. The child is ``python -I -c`` a bootstrap that first takes
this process's module search path (its absolute entries) from its standard input, then
imports this module: it runs the same e2email and the same libraries as this process,
however they were found (an editable install, a checkout, PYTHONPATH, which ``-I`` would
ignore). The payload is never held whole in this process, and never touches the disk.

It fails closed: the reader sees the end of its input when the child exits, whether it
finished or was killed mid-way, so :meth:`Feeder.finish` says the payload went in whole only
when the child exited 0 *and* reported, in one line and nothing else, that it wrote exactly
the payload's length; anything else raises :class:`FeedError` and the reader's output must
not be used.

The child gets no secret (keys stay in this process: it only writes plaintext the reader
encrypts), a minimal environment, and a command line that says nothing of the message (the
process table is readable by every user). Its peak memory is its own, not this process's: it
reports it (:attr:`FeedResult.peak_rss`) with what it wrote.

This module is imported by the child: it must import nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import select
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FeedError", "FeedResult", "Feeder", "available"]

#: The child's environment: nothing of this process's (which may hold passwords, e.g. an
#: SMTP password in a variable); only what the interpreter itself may need to start.
_KEPT_ENV = ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "SYSTEMROOT")

#: At most this much of the child's report (its standard error) is kept.
_REPORT_MAX = 4096


class FeedError(OSError):
    """The child did not feed the whole payload (it failed, was killed, or could not start):
    whatever the reader produced from its input must not be used."""


@dataclass(frozen=True)
class FeedResult:
    """What the child did: bytes written, and its peak resident set size in bytes (its own
    ``VmHWM``, or 0 where the system does not say)."""

    written: int
    peak_rss: int


def available() -> bool:
    """Whether a feeder child can be started here: a POSIX ``posix_spawn``, and
    ``sys.executable`` a Python interpreter (in a program that embeds Python, e.g. uWSGI, it
    is that program, which must not be run with the child's arguments; in a frozen program,
    e.g. PyInstaller's, it is the program itself)."""
    if getattr(sys, "frozen", False):
        return False
    name = os.path.basename(sys.executable or "").lower()
    return hasattr(os, "posix_spawn") and name.startswith("python")


#: The child's descriptor for the payload (the write end of the reader's pipe). Not its
#: standard output: whatever else writes there (a ``sitecustomize``, a ``.pth`` file's import
#: line, a module imported while unpickling) would go into the payload ahead of it and be
#: signed. Its standard output and error are the report pipe, where stray output makes a
#: report that :meth:`Feeder.finish` refuses.
DATA_FD = 3

#: What the child runs: first every descriptor but 0 to :data:`DATA_FD` closed (posix_spawn
#: passes on every inheritable descriptor of this process), then this process's module search
#: path (the first pickle on its standard input), then :func:`_main`.
_BOOTSTRAP = (
    "import os; os.closerange(4, os.sysconf('SC_OPEN_MAX')); "
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "import e2email.feed; sys.exit(e2email.feed._main())"
)

#: Descriptors handed to the child are first moved at least this high: posix_spawn's dup2
#: actions onto 0 to 3 then never overwrite one another's source (in a process started with
#: 0, 1 or 2 closed, a new pipe may get those numbers).
_HIGH_FD = 10


def _command() -> list[str]:
    """The child's command line: nothing of the message (the process table is public)."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP]


def _env() -> dict[str, str]:
    return {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}


def _search_path() -> list[str]:
    """The module search path the child gets: the directory this e2email was imported from
    first, then this process's absolute entries. Never a relative one (``''``, the current
    directory): the child starts there too, and a file in it must not stand in for e2email."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = [e for e in sys.path if isinstance(e, str) and os.path.isabs(e) and e != home]
    return [home, *rest]


class _NoSignalWriter:
    """Writes to a socket with ``MSG_NOSIGNAL``: a child gone before it read everything is an
    EPIPE here (an OSError), never a SIGPIPE, which kills a process that set SIGPIPE back to
    its default (as many command-line programs do)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._sock.sendall(data, socket.MSG_NOSIGNAL)
        return len(data)


class Feeder:
    """A child process writing ``payload``'s pieces to a pipe; :attr:`fd` is its read end.

    Use it as a context manager: the read end is closed and the child reaped on the way out,
    whatever happened (a child still writing then gets EPIPE and ends)."""

    def __init__(self, payload: Iterable[bytes], size: int) -> None:
        self.size = size
        self.pid = 0
        self._reaped = False
        data_r, data_w = os.pipe()
        report_r, report_w = os.pipe()
        # A socket, not a pipe, for the pickles: see _NoSignalWriter.
        ours, theirs = socket.socketpair()
        # Blocking, whatever socket.setdefaulttimeout() says: a timeout would make the
        # child's end non-blocking, and cut a slow child's pickle short here.
        ours.settimeout(None)
        theirs.settimeout(None)
        self.fd = data_r
        self._report = report_r
        # The child's ends: its standard input, its data descriptor, its report.
        child = [theirs.detach(), data_w, report_w]
        try:
            for i, fd in enumerate(child):
                child[i] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
                os.close(fd)
            child_in, child_data, child_report = child
            # -I: no environment variables, no user site, no current directory on sys.path.
            # The child is in this process's process group: a Ctrl-C at the terminal reaches
            # it too, and it stops (the reader sees the end of its input, finish() refuses).
            # setsigmask: no signal blocked in the child, whatever this (worker) thread blocks.
            self.pid = os.posix_spawn(
                sys.executable,
                _command(),
                _env(),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, child_in, 0),
                    (os.POSIX_SPAWN_DUP2, child_report, 1),
                    (os.POSIX_SPAWN_DUP2, child_report, 2),
                    (os.POSIX_SPAWN_DUP2, child_data, DATA_FD),
                ],
                setsigmask=(),
            )
        except BaseException:
            ours.close()
            for fd in (data_r, report_r):
                os.close(fd)
            self.fd = self._report = -1
            raise
        finally:
            # Only the child may hold the pipe's write end, so that the reader sees the end
            # of its input exactly when the child is gone.
            for fd in child:
                os.close(fd)
        try:
            # Pickled straight into the socket: pickle writes a large bytes object (an
            # attachment given as bytes) from the object itself, never a second copy.
            with ours:
                pickler = pickle.Pickler(_NoSignalWriter(ours), protocol=pickle.HIGHEST_PROTOCOL)
                pickler.dump(_search_path())
                pickler.clear_memo()  # two pickles, each read by an unpickler of its own
                pickler.dump(payload)
        except BaseException:
            self.close(kill=True)
            raise

    def started(self, timeout: float) -> bool:
        """Wait (the GIL released) until the reader has something to read: the payload's
        first bytes, or the end of its input (the child is gone). False after ``timeout``
        seconds of neither: a child that never starts feeding."""
        # poll, not select: a descriptor above 1023 (a busy server process) is fine.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)

    def close(self, *, kill: bool = False) -> None:
        """Close the read end and reap the child (killed first when ``kill``)."""
        for fd in (self.fd, self._report):
            # Both ends closed first: a child still writing either gets EPIPE and ends.
            if fd >= 0:
                os.close(fd)
        self.fd = self._report = -1
        if self.pid and not self._reaped:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self._wait()

    def _wait(self) -> int | None:
        """The child's exit code; None where it cannot be known: with SIGCHLD ignored
        (SIG_IGN) the system reaps children itself, and waitpid fails (ECHILD)."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            self._reaped = True
            return None
        self._reaped = True
        return os.waitstatus_to_exitcode(status)

    def finish(self) -> FeedResult:
        """After the reader has read to the end of its input: the child's result, or
        FeedError unless it exited 0 having written exactly :attr:`size` bytes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        report = bytearray()
        # Read to its end (the child's exit) before waiting, so a child with much to say is
        # never blocked on a full pipe.
        while piece := os.read(self._report, 65536):
            if len(report) < _REPORT_MAX:
                report += piece
        os.close(self._report)
        self._report = -1
        code = self._wait()
        said = report.decode("utf-8", "replace").strip()
        lines = said.splitlines()
        done = lines[0].split() if len(lines) == 1 else []
        # Its exit code unknown (see _wait), a one-line exact report is trusted: the child
        # writes it last, only once everything was written.
        if (
            code in (0, None)
            and len(done) == 3
            and done[:2] == ["wrote", str(self.size)]
            and done[2].isdigit()
        ):
            return FeedResult(self.size, int(done[2]))
        why = lines[-1] if lines else "no report"
        if code is None:
            how = "exit status unknown"
        else:
            how = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
        raise FeedError(f"the payload feeder did not feed the whole payload ({how}; {why})")


def _main() -> int:
    """The child, once :data:`_BOOTSTRAP` has read the module search path: the pickled
    payload from standard input, its pieces to standard output, then ``wrote N PEAK`` on
    standard error."""
    written = 0
    try:
        # From the parent that started this process, over a pipe only it holds; the same
        # buffered reader as the bootstrap's, which may have read ahead.
        payload = pickle.load(sys.stdin.buffer)  # noqa: S301
        for piece in payload:
            view = memoryview(piece)
            while view:
                done = os.write(DATA_FD, view)
                written += done
                view = view[done:]
        os.close(DATA_FD)
    except BaseException as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        os.write(2, f"failed after {written} bytes: {type(exc).__name__}: {first}\n".encode())
        return 1
    os.write(2, f"wrote {written} {_peak_rss()}\n".encode())
    return 0


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``; 0 where unknown). Not
    ``ru_maxrss``: a child started with vfork (as ``posix_spawn`` does) shares its parent's
    memory until it runs this interpreter, and ``ru_maxrss`` counts that."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
