"""Where a protected copy's bytes live while they wait to be stored and sent.

A copy of a large message (a 25 MB attachment is a 47 MB signed and encrypted copy) is held
neither by the engine that makes it nor by the outbox and SMTP DATA that take it: an engine
writes it into a :class:`Spool`, which keeps it in memory up to :data:`MEMORY_MAX` (the usual
few kilobytes cost nothing more than ``bytes``) and beyond that in an anonymous private file
in e2email's home. The outbox copies it into SQLite and DATA sends it, each a piece at a time
(:meth:`Spool.chunks`), so the process never holds the copy whole (issue 9 part 5).

What a spool holds is only what goes on the wire: the outer header block and the signed or
encrypted entity (ciphertext when encrypting), the same bytes the outbox keeps at rest. The
file is created 0600 in a 0700 folder (:mod:`e2email.private`) and has no name from the
start (``O_TMPFILE``, or created and unlinked at once where that is missing): nothing can
open it, and the system frees it when the spool is closed or the process ends however it
ends (``kill -9`` included), so it never outlives the copy, a failed protection or a crash.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from e2email.errors import ConfigError, InsecurePathError
from e2email.private import ensure_private_dir

__all__ = [
    "MEMORY_MAX",
    "READ_CHUNK",
    "Spool",
    "SpoolError",
    "chunks_of",
    "line_pieces",
    "open_spool_file",
    "spool_dir",
]

log = logging.getLogger(__name__)

#: A spool stays in memory up to this many bytes (and its copy is then plain ``bytes``).
MEMORY_MAX = 1 << 20
#: Readers take a spool this many bytes at a time unless they ask otherwise.
READ_CHUNK = 1 << 18
#: The folder of a home that large copies are spooled in.
SPOOL_DIRNAME = "spool"


class SpoolError(ConfigError):
    """A large copy cannot be spooled (its folder cannot be made or written): a local setup
    problem, like the outbox's."""


class Spool:
    """The bytes of one copy: written once, front to back (:meth:`write`, with
    :meth:`truncate` to drop a tail just written), then read any number of times, from any
    thread, a piece at a time (:meth:`chunks`, :meth:`read`), never moved.

    In memory up to ``memory_max`` bytes; beyond that, an anonymous 0600 file in
    ``directory`` (made 0700 when missing). Without ``directory`` it stays in memory."""

    def __init__(self, directory: Path | None = None, *, memory_max: int = MEMORY_MAX) -> None:
        self._directory = directory
        self._memory_max = memory_max
        self._buffer: io.BytesIO | None = io.BytesIO()
        self._file: IO[bytes] | None = None
        self._size = 0
        self._closed = False
        self._value: bytes | None = None

    def __repr__(self) -> str:
        where = "memory" if self._file is None else "file"
        return f"Spool({self._size} bytes in {where}{', closed' if self._closed else ''})"

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns its length."""
        self._check_open()
        self._value = None
        size = len(data)
        if self._file is None and self._size + size > self._memory_max and self._directory:
            self._roll_over()
        try:
            if self._file is not None:
                self._file.write(data)
            else:
                assert self._buffer is not None
                self._buffer.write(data)
        except OSError as exc:
            raise SpoolError(f"cannot spool a large message in {self._directory}: {exc}") from exc
        self._size += size
        return size

    def truncate(self, size: int) -> None:
        """Drop everything after the first ``size`` bytes; writing goes on from there."""
        self._check_open()
        self._value = None
        size = min(size, self._size)
        target: IO[bytes] | io.BytesIO | None = self._file if self._file else self._buffer
        assert target is not None
        target.truncate(size)
        target.seek(size)
        self._size = size

    def _roll_over(self) -> None:
        assert self._directory is not None
        assert self._buffer is not None
        handle = open_spool_file(self._directory)
        if handle is None:
            self._directory = None  # stays in memory, as every copy did before spools
            return
        try:
            handle.write(self._buffer.getbuffer())
        except OSError as exc:
            handle.close()
            raise SpoolError(f"cannot spool a large message in {self._directory}: {exc}") from exc
        except BaseException:
            handle.close()
            raise
        self._file = handle
        self._buffer = None

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end). Safe from several threads:
        it never moves a shared position."""
        self._check_open()
        if offset >= self._size or size <= 0:
            return b""
        size = min(size, self._size - offset)
        if self._file is None:
            assert self._buffer is not None
            with self._buffer.getbuffer() as view:
                return bytes(view[offset : offset + size])
        self._file.flush()
        parts: list[bytes] = []
        fd = self._file.fileno()
        while size > 0:
            try:
                piece = os.pread(fd, size, offset)
            except OSError as exc:
                raise SpoolError(f"cannot read a spooled message: {exc}") from exc
            if not piece:
                raise SpoolError("a spooled message ended early")
            parts.append(piece)
            offset += len(piece)
            size -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self, size: int = READ_CHUNK, *, start: int = 0) -> Iterator[bytes]:
        """The bytes from ``start`` to the end, ``size`` at a time (read as they are asked
        for: a reader that stops early reads no more)."""
        offset = start
        while offset < self._size:
            piece = self.read(offset, size)
            offset += len(piece)
            yield piece

    def endswith(self, suffix: bytes) -> bool:
        end = self._size - len(suffix)
        return end >= 0 and self.read(end, len(suffix)) == suffix

    def getvalue(self) -> bytes:
        """All of it as one ``bytes`` (for the callers that need it whole: this holds a large
        copy in memory, which the outbox and SMTP never do)."""
        self._check_open()
        if self._value is not None:
            return self._value
        if self._file is None:
            assert self._buffer is not None
            value = self._buffer.getvalue()
            self._value = value  # kept: getvalue() of a finished buffer is asked again
            return value
        return self.read(0, self._size)

    def contents(self) -> bytes | Spool:
        """What a copy carries: plain ``bytes`` when in memory (the usual small message,
        no different from before spools), else this spool."""
        return self.getvalue() if self._file is None else self

    # -- closing ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the bytes (the file is gone with its last descriptor). Idempotent."""
        self._closed = True
        self._value = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buffer = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the spool is closed")


def open_spool_file(directory: Path) -> IO[bytes] | None:
    """A new 0600 file with no name in ``directory`` (made 0700 when missing): ``O_TMPFILE``
    where the system has it, else created and unlinked before this returns (tempfile's own
    fallback). None, with a warning, when that cannot be done (a read-only home, a folder
    that group or others may write): the caller then keeps the bytes in memory, as before
    spools, rather than fail a message or write where others could look."""
    try:
        folder = ensure_private_dir(directory, what="the spool folder")
        return tempfile.TemporaryFile(dir=folder)
    except (InsecurePathError, OSError) as exc:
        log.warning(
            "e2email: cannot spool a large message in %s (%s): kept in memory", directory, exc
        )
        return None


def spool_dir(home: Path) -> Path:
    """The folder large copies made with the stores in ``home`` are spooled in."""
    return Path(home) / SPOOL_DIRNAME


def chunks_of(data: bytes | Spool, size: int = READ_CHUNK) -> Iterator[bytes]:
    """``data`` a piece at a time (memoryview slices of ``bytes`` are copied per piece only)."""
    if isinstance(data, Spool):
        yield from data.chunks(size)
        return
    if len(data) <= size:
        if data:
            yield data
        return
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def line_pieces(data: bytes | Spool, size: int = READ_CHUNK) -> Iterator[tuple[int, bytes]]:
    """``data`` as (offset, piece) pairs of about ``size`` bytes, each piece but the last
    ending just after a LF, so every piece starts a line (what DATA's dot-stuffing and the
    line checks need). A piece runs past ``size`` only to reach its line's end."""
    if isinstance(data, Spool):
        yield from _spool_line_pieces(data, size)
        return
    start, total = 0, len(data)
    while start < total:
        end = start + size
        if end >= total:
            end = total
        else:
            cut = data.rfind(b"\n", start, end)
            if cut < 0:  # no line end in the window (lines are < 1000 octets: not seen)
                cut = data.find(b"\n", end)
            end = total if cut < 0 else cut + 1
        yield start, data[start:end]
        start = end


def _spool_line_pieces(spool: Spool, size: int) -> Iterator[tuple[int, bytes]]:
    offset = 0
    carry = b""
    for chunk in spool.chunks(size):
        piece = carry + chunk if carry else chunk
        cut = piece.rfind(b"\n")
        if cut < 0 and len(piece) <= 4 * size:
            carry = piece  # a line longer than a piece: take more before cutting
            continue
        end = len(piece) if cut < 0 else cut + 1
        yield offset, piece[:end] if end < len(piece) else piece
        offset += end
        carry = piece[end:]
    if carry:
        yield offset, carry
