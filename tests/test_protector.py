"""The protection interface (issue 9 part 1): engines return complete copies of one shape, the
client uses whichever engine the registry or the caller gives it and holds no scheme-specific
code, and the passphrase source is asked in one place."""

from __future__ import annotations

import ast
import asyncio
import email
import email.policy
import inspect
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg, kill_agent, new_gnupg_home

import e2email.client
from e2email import (
    AsyncMailer,
    Mailer,
    Message,
    PassphraseError,
    Protection,
    RecipientKeyError,
    RecipientsRefusedError,
    Scheme,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertStore
from e2email.config import OpenPGPEngine, RetryPolicy
from e2email.crypto import base
from e2email.crypto.base import (
    ProtectedCopy,
    Protector,
    copy_plans,
    make_copy,
    protector_for,
    register_engine,
)
from e2email.crypto.gpg import GpgProtector
from e2email.crypto.smime import SMIMEProtector
from e2email.errors import ConfigError, KeyProblem, KeyReason
from e2email.keystore import Keystore
from e2email.message import build_message, build_payload
from e2email.outbox import NewItem, Outbox
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
    )


class ToyProtector(Protector):
    """An engine made in a test: "protects" by upper-casing the body, one copy per plan."""

    name: ClassVar[str] = "openpgp"
    instances: ClassVar[list[ToyProtector]] = []

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self.rechecked: list[tuple[str, ...]] = []
        ToyProtector.instances.append(self)

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        payload = build_payload(message, hp=None).replace(b"secret", b"SECRET")
        raw = build_message(message, payload=payload, hp=None)
        return tuple(
            make_copy(
                raw,
                message,
                kind,
                rcpts,
                signed=False,
                encrypted_to=[f"TOY:{a.addr_spec}" for a in rcpts],
                scheme=self.name,
            )
            for kind, rcpts in copy_plans(message)
        )

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        self.rechecked.append(tuple(encrypted_to))
        return [
            KeyProblem(f.removeprefix("TOY:"), KeyReason.REVOKED, "toy", f)
            for f in encrypted_to
            if "bob" in f
        ]


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    ToyProtector.instances.clear()


def test_an_engine_registered_outside_the_client_is_used_for_protect_send_and_recheck(
    engines: None, sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """An engine registered from a test file (no change to client.py) makes the copies the
    mailer sends, one per plan (To/Cc, each Bcc), and judges its own queued copies on retry."""
    register_engine("openpgp", lambda ctx: ToyProtector(ctx.keystore), replace=True)
    server = smtp_server(tls="implicit")
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        bcc=["carol@example.com"],
        text="a secret",
    )
    box = Outbox(tmp_path / "o.sqlite3")
    gpg_policy = Protection(engine=OpenPGPEngine.GPG)  # "openpgp" names the GnuPG engine
    with Mailer(
        smtp=_settings(server), keystore=sender_store, outbox=box, protection=gpg_policy
    ) as mailer:
        result = mailer.send(message)
        assert [c.copy.kind for c in result.copies] == ["main", "bcc"]
        (toy,) = ToyProtector.instances
        assert toy.keystore is sender_store
        ids = box.add(
            [
                NewItem(
                    b"x\r\n",
                    "alice@example.org",
                    ("bob@example.net",),
                    "m1",
                    meta={"encrypted_to": ["TOY:bob@example.net"], "scheme": "openpgp"},
                )
            ],
            claim=False,
        )
        (problem,) = mailer._async.recheck_keys(box.get(ids[0]))
    box.close()
    assert problem.reason is KeyReason.REVOKED and problem.address == "bob@example.net"
    assert toy.rechecked == [("TOY:bob@example.net",)]
    assert len(server.messages) == 2
    assert all(b"a SECRET" in m.data for m in server.messages)


def test_registry_refuses_a_second_engine_of_the_same_name_and_unknown_names(
    engines: None, sender_store: Keystore, smime_store: CertStore
) -> None:
    """Replacing an engine must be asked for; an unknown engine name is a ConfigError; the
    built-in engines are the GnuPG one for OpenPGP and the S/MIME one."""
    with pytest.raises(ConfigError, match="registered already"):
        register_engine("smime", lambda ctx: ToyProtector(ctx.keystore))
    with pytest.raises(ConfigError, match="no protection engine named 'nope'"):
        protector_for("nope", keystore=sender_store, certstore=smime_store)
    gpg_engine = protector_for(
        Protection(engine=OpenPGPEngine.GPG), keystore=sender_store, certstore=smime_store
    )
    smime_engine = protector_for(
        Protection(scheme=Scheme.SMIME), keystore=sender_store, certstore=smime_store
    )
    assert isinstance(gpg_engine, GpgProtector) and gpg_engine.keystore is sender_store
    assert isinstance(smime_engine, SMIMEProtector) and smime_engine.certstore is smime_store


def _top_content_type(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return parsed.get_content_type()


@pytest.mark.parametrize("encrypt", [False, True])
def test_both_engines_return_complete_messages_of_the_same_shape(
    encrypt: bool, sender_store: Keystore, smime_store: CertStore
) -> None:
    """The GnuPG and the S/MIME engine both return complete messages (outer header block,
    MIME-Version, the protected entity) with the same envelope and metadata: one copy for
    To/Cc and one per Bcc when encrypting, each encrypted to its recipients and the sender."""
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        bcc=["carol@example.com"],
        subject="shape",
        text="same shape",
    ).finalized()
    protection = Protection(encrypt=encrypt)
    engines: list[Protector] = [GpgProtector(sender_store), SMIMEProtector(smime_store)]
    shapes = []
    for engine in engines:
        copies = asyncio.run(engine.protect(message, protection))
        for copy in copies:
            head, _, _ = copy.raw.partition(b"\r\n\r\n")
            assert copy.raw.startswith(b"Date: ") and b"\r\nMIME-Version: 1.0\r\n" in head
            assert b"\r\nFrom: alice@example.org\r\n" in head
            # No Bcc field (a random boundary or keydata may contain the letters "bcc").
            assert not re.search(rb"(?im)^bcc:", head) and b"carol" not in head
            assert copy.message_id == message.message_id and copy.signed
            assert copy.signer is not None and copy.mail_from == "alice@example.org"
            assert copy.scheme == (engine.name if encrypt else None)
        shapes.append(
            [(c.kind, c.recipients, len(c.encrypted_to), _top_content_type(c.raw)) for c in copies]
        )
    gpg_shape, smime_shape = shapes
    if encrypt:
        assert [s[:3] for s in gpg_shape] == [s[:3] for s in smime_shape]
        assert [s[:3] for s in gpg_shape] == [
            ("main", ("bob@example.net",), 2),
            ("bcc", ("carol@example.com",), 2),
        ]
        assert {s[3] for s in gpg_shape} == {"multipart/encrypted"}
        assert {s[3] for s in smime_shape} == {"application/pkcs7-mime"}
    else:
        expected = [("main", ("bob@example.net", "carol@example.com"), 0, "multipart/signed")]
        assert gpg_shape == smime_shape == expected


def test_client_has_no_scheme_specific_code() -> None:
    """client.py never asks which scheme is at work: it imports no crypto module but the
    interface, no key or certificate lookups, names no Scheme and no engine."""
    source = inspect.getsource(e2email.client)
    tree = ast.parse(source)
    imported: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    crypto = {m for m in imported if m.startswith("e2email.crypto")}
    assert crypto == {"e2email.crypto.base"}
    assert not {n for n in names if n.startswith("e2email.certstore.")} - {
        "e2email.certstore.CertStore"
    }
    assert not {n for n in names if n.startswith("e2email.keystore.")} - {
        "e2email.keystore.Keystore"
    }
    assert "e2email.config.Scheme" not in names
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "Scheme" not in identifiers
    assert not {"SMIME", "OPENPGP", "signing_key", "signer_cert", "resolve_recipients"} & (
        attributes
    )
    strings = {
        n.value.lower()
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) < 40
    }
    assert not {"openpgp", "smime", "pkcs7-mime"} & strings


# -- Passphrases: one place ----------------------------------------------------------------------


def test_a_given_passphrase_is_checked_even_when_a_named_gnupg_home_has_one_cached(
    keys: Keys, smtp_server: ServerFactory
) -> None:
    """A passphrase given as a string (not a prompt) is the one that must unlock the signing
    key: with a user's GnuPG home whose agent holds the right one, a wrong one given to the
    mailer is refused and nothing is sent (the old client tried first without it, so the
    agent's cache signed). The right one sends."""
    home = new_gnupg_home("e2pp")
    gnupg_home = home / "user-gnupg"
    gnupg_home.mkdir(mode=0o700)
    assert keys.locked.secret and keys.locked.passphrase
    server = smtp_server(tls="implicit")
    message = Message(sender="locked@example.org", to=["bob@example.net"], text="locked")
    try:
        gpg(gnupg_home, "--import", str(keys.locked.secret))
        gpg(gnupg_home, "--import", str(keys.bob.cert))
        gpg(gnupg_home, "--import-ownertrust", input=f"{keys.bob.fingerprint}:6:\n".encode())
        gpg(gnupg_home, "--import-ownertrust", input=f"{keys.locked.fingerprint}:6:\n".encode())
        cached = gpg(
            gnupg_home, "--passphrase", keys.locked.passphrase, "--detach-sign", input=b"x"
        )
        assert cached.returncode == 0
        store = Keystore(home / "e2", gnupg_home=gnupg_home)
        prot = Protection(encrypt=False)
        with (
            Mailer(
                smtp=_settings(server), keystore=store, protection=prot, passphrase="wrong"
            ) as m,
            pytest.raises(PassphraseError) as wrong,
        ):
            m.send(message)
        assert not wrong.value.missing
        assert server.transcript == []
        right = keys.locked.passphrase
        with Mailer(smtp=_settings(server), keystore=store, protection=prot, passphrase=right) as m:
            assert m.send(message).accepted == ("bob@example.net",)
    finally:
        kill_agent(gnupg_home)
        shutil.rmtree(home, ignore_errors=True)


def test_an_interactive_source_is_asked_only_when_the_key_needs_it_and_once() -> None:
    """A prompt (``interactive = True``) is not asked for a key without a passphrase, and asked
    once when one is needed; any other source is read before the first attempt."""
    from e2email.crypto.base import Passphrase
    from e2email.errors import PassphraseError as PE

    asked: list[int] = []

    class Prompt:
        interactive = True

        def __call__(self) -> str:
            asked.append(1)
            return "pw"

    seen: list[str | None] = []

    async def needs(passphrase: str | None) -> str:
        seen.append(passphrase)
        if passphrase is None:
            raise PE("needed", missing=True)
        return passphrase

    async def free(passphrase: str | None) -> str:
        seen.append(passphrase)
        return "ok"

    prompt = Passphrase(Prompt())
    assert asyncio.run(prompt.run(free)) == "ok" and asked == [] and seen == [None]
    assert asyncio.run(prompt.run(needs)) == "pw" and asked == [1]
    assert asyncio.run(prompt.run(needs)) == "pw" and asked == [1]
    seen.clear()
    command = Passphrase(lambda: "cmd")
    assert asyncio.run(command.run(free)) == "ok" and seen == ["cmd"]


def test_retry_rechecks_through_the_engine_that_made_the_copy(
    sender_store: Keystore, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """A queued OpenPGP copy is re-checked by the GnuPG engine (the keystore): a fingerprint
    no longer in the keystore holds it; the mailer never sniffs the scheme itself."""
    server = smtp_server(tls="implicit", faults=[Fault("rcpt", "reply", 451, "4.3.2 busy")])
    box = Outbox(tmp_path / "o.sqlite3")
    mailer = AsyncMailer(
        smtp=_settings(server),
        keystore=sender_store,
        outbox=box,
        retry=RetryPolicy(max_attempts=1),
    )
    message = Message(sender="alice@example.org", to=["bob@example.net"], text="x")
    with pytest.raises(RecipientsRefusedError):  # the 451: kept in the outbox
        asyncio.run(mailer.send(message))
    (item,) = box.items()
    assert item.meta["scheme"] == "openpgp"
    assert mailer.recheck_keys(box.get(item.id)) == ()
    assert isinstance(mailer.protector_for(Protection(engine=OpenPGPEngine.GPG)), GpgProtector)
    box.close()


def test_the_gpg_engines_discovery_hook_explains_addresses_it_could_not_serve(
    engines: None, sender_store: Keystore
) -> None:
    """The GnuPG engine calls its discovery hook once per message before resolving keys; the
    reason the hook gives for an address it could not serve replaces "no key found", and the
    other recipients' problems are kept (the hook the key discovery of issue 10 fills in)."""
    calls: list[tuple[str, ...]] = []

    class Discovering(GpgProtector):
        async def discover(self, message: Message, protection: Protection) -> dict[str, KeyProblem]:
            calls.append(tuple(a.addr_spec for a in message.recipients))
            return {
                "nobody@example.com": KeyProblem(
                    "nobody@example.com", KeyReason.BACKEND, "WKD: 404"
                )
            }

    register_engine("openpgp", lambda ctx: Discovering(ctx.keystore), replace=True)
    message = Message(
        sender="alice@example.org",
        to=["nobody@example.com", "bob@example.net"],
        cc=["expired@example.com"],
        text="x",
    )
    gpg_policy = Protection(engine=OpenPGPEngine.GPG)
    with (
        Mailer(keystore=sender_store, protection=gpg_policy) as mailer,
        pytest.raises(RecipientKeyError) as info,
    ):
        mailer.protect(message)
    assert [(p.address, p.reason, p.detail) for p in info.value.problems] == [
        ("nobody@example.com", KeyReason.BACKEND, "WKD: 404"),
        ("expired@example.com", KeyReason.EXPIRED, info.value.problems[1].detail),
    ]
    assert calls == [("nobody@example.com", "bob@example.net", "expired@example.com")]
