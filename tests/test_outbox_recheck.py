"""`outbox retry` re-checks the keys a queued copy was encrypted to: a copy encrypted to a key
revoked since it was queued is held (not sent), naming the key. Real gpg, a real TLS server,
the CLI as a real process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from fixtures_smime import PKI
from pgp_helpers import generate_key, kill_agent, new_gnupg_home, revoke
from test_cli import e2email, send_args

from e2email import (
    Mailer,
    Message,
    Protection,
    RecipientsRefusedError,
    Scheme,
    SMTPSettings,
    TLSMode,
)
from e2email.certstore import CertStore
from e2email.config import RetryPolicy
from e2email.errors import HeldError
from e2email.keystore import Keystore
from e2email.outbox import ItemState, Outbox
from e2email.testing import Fault, LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]


@pytest.fixture
def factory() -> Iterator[Path]:
    path = new_gnupg_home("e2r")
    yield path
    kill_agent(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_copy_encrypted_to_a_key_revoked_since_it_was_queued_is_held(
    keys: Keys, smtp_server: ServerFactory, factory: Path, tmp_path: Path
) -> None:
    """Queued (the server said 451), then the recipient's key is revoked and the revocation
    imported: `outbox retry` does not send the copy (the old code did), exits 3 naming the
    address, the reason and the fingerprint, and keeps it in the outbox with that reason. The
    outbox recorded which keys and which scheme the copy was encrypted to."""
    home = new_gnupg_home("e2h")
    try:
        rev = generate_key(factory, tmp_path, "rev@example.com")
        store = Keystore(home)
        assert keys.alice.secret
        store.import_file(keys.alice.secret)
        store.import_file(rev.cert)
        busy = smtp_server(faults=[Fault("rcpt", "reply", 451, "4.3.2 busy", times=None)])
        queued = e2email(
            *send_args(busy, "--to", "rev@example.com", "--body", "hi", "--retries", "1"),
            home=home,
        )
        assert queued.returncode == 6, queued.stderr
        with Outbox.in_home(home) as box:
            (item,) = box.items()
        assert rev.fingerprint in item.meta["encrypted_to"]
        assert item.meta["scheme"] == "openpgp"

        revoke(factory, rev)
        imported = e2email("keys", "import", str(rev.cert), home=home)
        assert imported.returncode == 0, imported.stderr

        fine = smtp_server()
        args = send_args(fine)[send_args(fine).index("--host") :]
        held = e2email("outbox", "retry", "--now", *args, home=home)
        assert held.returncode == 3, (held.stdout, held.stderr)
        assert fine.messages == []
        assert "held" in held.stdout and "rev@example.com" in held.stdout
        assert "revoked" in held.stdout and rev.fingerprint[-16:] in held.stdout
        (shown,) = json.loads(e2email("outbox", "list", "--json", home=home).stdout)
        assert shown["id"] == item.id and shown["state"] == ItemState.QUEUED.value
        assert "held" in shown["last_error"] and "revoked" in shown["last_error"]
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_a_copy_whose_keys_are_still_good_is_sent(
    keys: Keys, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """The re-check lets a copy whose keys are all still fit go out as stored."""
    home = new_gnupg_home("e2g")
    try:
        store = Keystore(home)
        assert keys.alice.secret
        store.import_file(keys.alice.secret)
        store.import_file(keys.bob.cert)
        busy = smtp_server(faults=[Fault("rcpt", "reply", 451, "4.3.2 busy", times=None)])
        e2email(
            *send_args(busy, "--to", "bob@example.net", "--body", "hi", "--retries", "1"),
            home=home,
        )
        fine = smtp_server()
        args = send_args(fine)[send_args(fine).index("--host") :]
        done = e2email("outbox", "retry", "--now", *args, home=home)
        assert done.returncode == 0, done.stderr
        assert len(fine.messages) == 1
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)


def test_the_recheck_knows_smime_copies_and_old_items_without_a_recorded_scheme(
    sender_store: Keystore, tmp_path: Path
) -> None:
    """An S/MIME copy's certificate fingerprints are looked up in the certificate store (not
    in the keyring); an item queued before the scheme was recorded is judged by its
    Content-Type. A certificate that is gone is a reason to hold."""
    from e2email.client import AsyncMailer
    from e2email.errors import KeyReason
    from e2email.outbox import NewItem

    box = Outbox(tmp_path / "o.sqlite3")
    mailer = AsyncMailer(keystore=sender_store, outbox=box)
    gone = "AB" * 32
    smime_raw = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\nMII\r\n"
    ids = box.add(
        [
            NewItem(
                smime_raw,
                "a@example.org",
                ("b@example.net",),
                "m1",
                meta={"encrypted_to": [gone], "scheme": "smime"},
            ),
            NewItem(
                smime_raw, "a@example.org", ("b@example.net",), "m2", meta={"encrypted_to": [gone]}
            ),
            NewItem(b"x\r\n", "a@example.org", ("b@example.net",), "m3", meta={"encrypted_to": []}),
        ],
        claim=False,
    )
    for item_id in ids[:2]:
        (problem,) = mailer.recheck_keys(box.get(item_id))
        assert problem.reason is KeyReason.NOT_FOUND and "certificate store" in problem.detail
    assert mailer.recheck_keys(box.get(ids[2])) == ()
    box.close()


def test_an_smime_copy_to_a_certificate_revoked_since_by_an_imported_crl_is_held(
    pki: PKI, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    """S/MIME: queued to Carol (the server said 451), then a CRL listing Carol's certificate
    is imported: the retry holds the copy, naming Carol and the revocation; nothing is sent."""
    from test_revocation import make_crl, write_crl

    store = CertStore(tmp_path / "home")
    store.import_files([pki.alice.chain_pem, pki.alice.key_pem, pki.carol.cert_pem])
    store.import_files([pki.root_pem], trust=True)
    busy = smtp_server(faults=[Fault("rcpt", "reply", 451, "4.3.2 busy", times=None)])
    fine = smtp_server()

    def mailer(server: LoopbackSMTPServer) -> Mailer:
        assert server.ca_file is not None
        return Mailer(
            smtp=SMTPSettings(
                host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file
            ),
            keystore=Keystore(store.home),
            certstore=store,
            protection=Protection(scheme=Scheme.SMIME),
            outbox=tmp_path / "outbox.sqlite3",
            retry=RetryPolicy(max_attempts=1),
        )

    message = Message(sender="alice@example.org", to=["carol@example.com"], text="figures")
    with mailer(busy) as m, pytest.raises(RecipientsRefusedError):
        m.send(message)
    crl = make_crl(pki.intermediate, pki.intermediate_key, ((pki.carol.cert, None),))
    store.import_crls([write_crl(tmp_path / "inter.crl", crl)])
    with mailer(fine) as m:
        assert m.outbox is not None
        (item,) = m.outbox.items()
        assert item.meta["scheme"] == "smime"
        assert pki.carol.fingerprint in item.meta["encrypted_to"]
        (outcome,) = m.send_outbox()
        assert outcome.status == "deferred" and isinstance(outcome.error, HeldError)
        assert "carol@example.com: key revoked" in str(outcome.error)
        assert fine.messages == [] and len(m.outbox) == 1


def test_rerunning_a_batch_holds_its_stored_copy_to_a_key_revoked_since(
    keys: Keys, smtp_server: ServerFactory, factory: Path, tmp_path: Path
) -> None:
    """A batch row stored encrypted to a key that is revoked before the rerun: the rerun
    (which sends the stored copy, not a new one) holds it too, reporting the row deferred
    with the reason (exit 3), and sends nothing for it."""
    home = new_gnupg_home("e2b")
    try:
        rev = generate_key(factory, tmp_path, "rev@example.com")
        store = Keystore(home)
        assert keys.alice.secret
        store.import_file(keys.alice.secret)
        store.import_file(rev.cert)
        rows = tmp_path / "rows.csv"
        rows.write_text("email\nrev@example.com\n")
        busy = smtp_server(faults=[Fault("rcpt", "reply", 451, "4.3.2 busy", times=None)])
        extra = ("--to-file", str(rows), "--body", "hi", "--retries", "1")
        first = e2email(*send_args(busy, *extra), home=home)
        assert first.returncode == 6, first.stderr
        revoke(factory, rev)
        assert e2email("keys", "import", str(rev.cert), home=home).returncode == 0
        fine = smtp_server()
        again = e2email(*send_args(fine, *extra), home=home)
        assert again.returncode == 3, (again.stdout, again.stderr)
        assert "row 1 rev@example.com: deferred" in again.stdout
        assert "held" in again.stdout and "revoked" in again.stdout
        assert fine.messages == []
    finally:
        kill_agent(home / "gnupg")
        shutil.rmtree(home, ignore_errors=True)
