"""Static checks as tests, so CI keeps main typed and linted: mypy --strict and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean() -> None:
    """The package type-checks under mypy --strict (the config is in pyproject.toml)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "e2email"], cwd=REPO, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_ruff_is_clean() -> None:
    """ruff finds nothing in the package or the tests."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "e2email", "tests"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
