"""The newcomer's path: the README's two commands, and `e2email demo` itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
