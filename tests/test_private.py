"""Private files and folders (e2email.private): made 0700/0600 whatever the umask, refused when
another user owns them or group/others may write them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2email import InsecurePathError
from e2email.private import check_private, ensure_private_dir, open_private, write_private


@pytest.fixture
def lax_umask() -> Iterator[None]:
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("lax_umask")
def test_folders_and_parents_are_made_0700(tmp_path: Path) -> None:
    """Every folder it creates, parents included, is 0700 although the umask would allow 0775."""
    target = tmp_path / "a" / "b" / "home"
    ensure_private_dir(target, what="the e2email home")
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert _mode(folder) == 0o700, folder


def test_strict_umask_still_gives_a_usable_folder(tmp_path: Path) -> None:
    """A umask that would take the owner's own bits away does not leave an unusable folder."""
    old = os.umask(0o277)
    try:
        ensure_private_dir(tmp_path / "home", what="home")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "home") == 0o700


@pytest.mark.usefixtures("lax_umask")
def test_files_are_0600_and_narrowed_when_they_exist(tmp_path: Path) -> None:
    path = tmp_path / "report.csv"
    path.write_text("old")
    path.chmod(0o666)
    with open_private(path) as fh:
        fh.write("new")
    assert _mode(path) == 0o600
    assert path.read_text() == "new"
    write_private(tmp_path / "out.eml", b"x")
    assert _mode(tmp_path / "out.eml") == 0o600


def test_symlink_is_not_followed_for_writing(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(InsecurePathError, match="cannot write"):
        open_private(tmp_path / "link")
    assert victim.read_text() == "keep"


def test_group_or_world_writable_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(InsecurePathError, match=r"writable by group or others.*chmod go-w"):
        ensure_private_dir(folder, what="the outbox folder")
    folder.chmod(0o755)  # readable by others is not refused: ssh's rule
    ensure_private_dir(folder, what="the outbox folder")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(InsecurePathError, match="owned by another user") as info:
        check_private(folder, what="the keystore")
    assert info.value.path == folder
