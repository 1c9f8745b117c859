"""The newcomer's path: the README's two commands, and `e2email demo` itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_the_whole_round_trip() -> None:
    """`e2email demo` needs no network or configuration, exits 0, shows the server saw only
    ciphertext with the Subject hidden over TLS, and that Bob decrypted and verified it."""
    done = subprocess.run(
        [sys.executable, "-m", "e2email", "demo"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert "Subject: [...]" in out
    assert "-----BEGIN PGP MESSAGE-----" in out
    assert re.search(r"TLSv1\.[23]", out)
    assert "signature: GOOD" in out
    assert "(bytes match)" in out
    assert "Round trip complete" in out


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    """The README's first two code blocks are the install+demo and install+test commands, and
    .ci/run runs exactly the second."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    demo_cmd, test_cmd = (b.strip() for b in blocks[:2])
    assert demo_cmd.endswith("e2email demo")
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_cmd


@pytest.mark.slow
def test_a_built_wheel_in_a_fresh_venv_runs_the_demo(tmp_path: Path) -> None:
    """What a user gets from `pip install e2email`: a wheel built from this tree (in a copy, so
    no stale build/ of the checkout leaks in), installed into a fresh venv (dependencies from
    the configured index), carries the demo keys, LICENSE and the metadata, and its
    `e2email demo`, run from another directory, completes the round trip."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"
        ),
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("e2email-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_name) == (REPO / "LICENSE").read_bytes()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(metadata_name).decode()
    for key in ("alice.sec.asc", "alice.pub.asc", "bob.sec.asc", "bob.pub.asc"):
        assert f"e2email/demo_keys/{key}" in names
    assert "e2email/py.typed" in names
    assert not any(n.startswith("keys/") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Changelog, " in metadata

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--quiet", str(wheel)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import e2email; print(e2email.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        check=True,
    )
    assert where.stdout.decode().startswith(str(venv)), where.stdout
    done = subprocess.run(
        [str(venv / "bin" / "e2email"), "demo"],
        cwd=elsewhere,
        env={**env, "COLUMNS": "100"},
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "signature: GOOD" in out
    assert "Round trip complete" in out
    assert "S/MIME round trip complete" in out


def test_license_changelog_and_project_urls() -> None:
    """The Apache-2.0 text the metadata names, a changelog with an Unreleased section, and
    project URLs that point at the project (no package registry named)."""
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    urls = project["urls"]
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") and "pypi" not in u for u in urls.values())
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(r"^## \[0\.1\.0\]", changelog, flags=re.M)
