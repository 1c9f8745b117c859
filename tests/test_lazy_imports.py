"""`cryptography` (about 10 MB of every process's memory) is loaded only by what needs it
(S/MIME, the certificate store, protecting a secret key, checking a server's certificate):
sending an OpenPGP message, through the API or the CLI, never loads it. Each check runs in a
fresh interpreter, where nothing else has imported it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_pgp import Keys

from e2email.keystore import Keystore
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

SEND = """
import json, sys
from pathlib import Path
info = json.loads(sys.argv[1])
from e2email import Mailer, Message, OpenPGPEngine, Protection, SMTPSettings, TLSMode
from e2email.keystore import Keystore
imported = {"import e2email": "cryptography" in sys.modules}
smtp = SMTPSettings(host=info["host"], port=info["port"], tls=TLSMode.IMPLICIT,
                    ca_file=Path(info["ca_file"]), timeout=60)
for engine in (OpenPGPEngine.SEQUOIA, OpenPGPEngine.GPG):
    with Mailer(smtp=smtp, keystore=Keystore(Path(info["home"])),
                protection=Protection(engine=engine)) as mailer:
        mailer.send(Message(sender=info["sender"], to=[info["to"]], subject="s", text="t\\n"))
    imported[f"API send, {engine.value}"] = "cryptography" in sys.modules
from e2email.cli import main
try:
    main(["--home", info["home"], "send", "--engine", "sequoia", "--from", info["sender"],
          "--to", info["to"], "--subject", "cli", "--body", "b", "--host", info["host"],
          "--port", str(info["port"]), "--tls", "implicit", "--ca-file", info["ca_file"]])
except SystemExit as exc:
    imported["CLI exit"] = exc.code
imported["CLI send"] = "cryptography" in sys.modules
from e2email import CertStore
imported["CertStore"] = CertStore.__module__
imported["after CertStore"] = "cryptography" in sys.modules
print(json.dumps(imported))
"""


def test_sending_openpgp_never_imports_cryptography(
    keys: Keys, sender_store: Keystore, smtp_server: ServerFactory
) -> None:
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    info = {
        "host": server.host,
        "port": server.port,
        "ca_file": str(server.ca_file),
        "home": str(sender_store.home),
        "sender": keys.alice.address,
        "to": keys.bob.address,
    }
    done = subprocess.run(
        [sys.executable, "-c", SEND, json.dumps(info)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == {
        "import e2email": False,
        "API send, sequoia": False,
        "API send, gpg": False,
        "CLI exit": 0,
        "CLI send": False,
        # The public names that need it still import (and then load it).
        "CertStore": "e2email.certstore",
        "after CertStore": True,
    }
    assert len(server.messages) == 3
    assert all(b"multipart/encrypted" in m.data for m in server.messages)


def test_the_payload_feeder_child_imports_little(tmp_path: Path) -> None:
    """What the Sequoia engine's payload feeder (``python -I -c`` a bootstrap that imports
    e2email.feed) imports to read its payload: e2email.message and what it needs, not the
    client, SMTP, SQLite, pysequoia or cryptography."""
    script = (
        "import sys, e2email.feed, e2email.message, json; "
        "print(json.dumps(sorted(m for m in ('cryptography', 'e2email.client', 'ssl', "
        "'sqlite3', 'pysequoia', 'aiosmtplib', 'e2email.crypto') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(done.stdout) == []


SUBMODULES = """
import json, sys
import e2email
seen = {}
for name in ("errors", "message", "client", "config", "crypto", "transport", "feed"):
    seen[name] = getattr(e2email, name).__name__
seen["MessageError"] = e2email.errors.MessageError.__name__
try:
    e2email.no_such_module
except AttributeError as exc:
    seen["missing"] = str(exc)
print(json.dumps(seen))
"""


def test_a_submodule_is_an_attribute_after_a_bare_import() -> None:
    """``import e2email; e2email.errors.MessageError`` works, as it did when ``import
    e2email`` imported everything: a submodule is imported when first used as an attribute."""
    done = subprocess.run(
        [sys.executable, "-c", SUBMODULES], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "errors": "e2email.errors",
        "message": "e2email.message",
        "client": "e2email.client",
        "config": "e2email.config",
        "crypto": "e2email.crypto",
        "transport": "e2email.transport",
        "feed": "e2email.feed",
        "MessageError": "MessageError",
        "missing": "module 'e2email' has no attribute 'no_such_module'",
    }


def test_an_engine_context_takes_certstore_as_before(sender_store: Keystore) -> None:
    """``certstore=`` (the keyword before ``certstore_source``) still makes the context;
    both is a TypeError."""
    from e2email.crypto.base import EngineContext

    store = object()
    old = EngineContext(keystore=sender_store, certstore=store)  # type: ignore[arg-type]
    new = EngineContext(keystore=sender_store, certstore_source=lambda: store)  # type: ignore[arg-type,return-value]
    assert old.certstore is store
    assert new.certstore is store
    assert old.certstore_source is store
    with pytest.raises(TypeError):
        EngineContext(keystore=sender_store, certstore=store, certstore_source=store)  # type: ignore[arg-type]


def test_a_mailer_s_certstore_can_be_set(sender_store: Keystore, tmp_path: Path) -> None:
    """AsyncMailer.certstore is settable, as when it was a plain attribute; engines made
    earlier are made again with it."""
    from e2email import AsyncMailer, CertStore

    mailer = AsyncMailer(keystore=sender_store)
    first = mailer.engine_named("smime")
    store = CertStore(tmp_path)
    mailer.certstore = store
    assert mailer.certstore is store
    assert mailer.engine_named("smime") is not first
