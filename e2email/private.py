"""Private files and folders: created 0700/0600 whatever the umask, refused when loose.

e2email keeps things at rest that the mail itself hides (the outbox holds ciphertext and
envelopes, drafts hold plaintext bodies, a report names recipients, a keystore holds secret
keys). Like ssh with ``~/.ssh``, it creates each of them private and refuses to use one that
another user owns or that group or others may write: whoever can write there can swap a key
or a queued message. Only the standard library is used here; errors are :mod:`e2email.errors`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Literal, overload

from .errors import InsecurePathError

__all__ = [
    "check_private",
    "ensure_private_dir",
    "open_private",
    "write_private",
]

_LOOSE = stat.S_IWGRP | stat.S_IWOTH


def check_private(path: Path, *, what: str) -> None:
    """Refuse ``path`` (which exists) when another user owns it or group/others may write it.

    Symbolic links are followed: what counts is the file or folder really used."""
    try:
        st = path.stat()
    except OSError as exc:
        raise InsecurePathError(f"cannot check {what} {path}: {exc.strerror}", path=path) from exc
    uid = os.geteuid()
    if st.st_uid != uid:
        raise InsecurePathError(
            f"{what} {path} is owned by another user (uid {st.st_uid}): refusing to use it; "
            "it must belong to you",
            path=path,
        )
    if st.st_mode & _LOOSE:
        raise InsecurePathError(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            f": refusing to use it; run: chmod go-w {path}",
            path=path,
        )


def ensure_private_dir(path: Path, *, what: str) -> Path:
    """Create ``path`` (and any missing parents) with mode 0700 whatever the umask, or check an
    existing one with :func:`check_private`. Returns ``path``."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made by a concurrent process: checked below like any existing folder
        except OSError as exc:
            raise InsecurePathError(
                f"cannot create {what} {folder}: {exc.strerror}", path=folder
            ) from exc
        else:
            # mkdir's mode is reduced by the umask; a strict umask (0277, say) would leave a
            # folder we cannot use, a lax one cannot add bits. Set it exactly.
            folder.chmod(0o700)
    check_private(path, what=what)
    return path


@overload
def open_private(
    path: Path,
    mode: Literal["w", "a"] = "w",
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
) -> IO[str]: ...
@overload
def open_private(path: Path, mode: Literal["wb", "ab"]) -> IO[bytes]: ...
def open_private(
    path: Path,
    mode: Literal["w", "a", "wb", "ab"] = "w",
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
) -> IO[str] | IO[bytes]:
    """Open ``path`` for writing, creating it 0600 (an existing file is truncated or appended to
    and narrowed to 0600 too). A symbolic link is not followed: it could point at another
    user's file."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise InsecurePathError(f"cannot write {path}: {exc.strerror}", path=path) from exc
    try:
        os.fchmod(fd, 0o600)
        if "b" in mode:
            return os.fdopen(fd, mode)
        return os.fdopen(fd, mode, encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file (see :func:`open_private`)."""
    with open_private(path, "wb") as fh:
        fh.write(data)
