"""Shared fixtures."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Session-scoped OpenPGP keys and homes (see fixtures_pgp.py).
from fixtures_pgp import (  # noqa: F401
    keys,
    openpgp_engine,
    recipients_home,
    sender_store,
    session_ca,
    smtp_settings,
    tls_server,
)

# Session-scoped S/MIME test PKI and a sender's certificate store (see fixtures_smime.py).
from fixtures_smime import pki, smime_store  # noqa: F401

from e2email.testing import LoopbackSMTPServer, TestCA


@pytest.fixture(scope="module")
def module_ca() -> Iterator[TestCA]:
    """One throw-away CA per test module (making CAs and certificates costs time)."""
    ca = TestCA()
    yield ca
    ca.cleanup()


@pytest.fixture
def smtp_server(module_ca: TestCA) -> Iterator[Callable[..., LoopbackSMTPServer]]:
    """A factory for started :class:`LoopbackSMTPServer` instances (certificates from
    ``module_ca`` unless ``ca``/``ssl_context`` is given); all are stopped after the test."""
    servers: list[LoopbackSMTPServer] = []

    def make(**kwargs: Any) -> LoopbackSMTPServer:
        if "ssl_context" not in kwargs:
            kwargs.setdefault("ca", module_ca)
        server = LoopbackSMTPServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _stop_gpg_agents_in_tmp_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """gpg starts a gpg-agent daemon per GnuPG home; a test's homes under its ``tmp_path``
    (keystores made there, and their ``gnupg-engine`` copies) get their agents stopped when it
    ends, so no test leaves a process behind. Homes are found by their keyring files (the
    agent's socket may live in /run/user/UID instead of the home)."""
    yield
    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp is None:
        return
    homes = {p.parent for p in Path(tmp).rglob("private-keys-v1.d")}
    homes |= {p.parent for p in Path(tmp).rglob("S.gpg-agent")}
    for home in homes:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
                timeout=10,
            )
