"""``e2email demo``: the whole round trip on this machine, no network and no configuration.

Alice signs and encrypts a message with an attachment to Bob; e2email submits it over implicit
TLS (with AUTH) to a real SMTP server on 127.0.0.1 whose certificate comes from a throwaway CA;
then, as Bob would, the bytes the server received are decrypted and the signature verified with
Bob's own keystore. Every step is shown. No gpg is needed: the keys live in certificate
stores (:mod:`e2email.certd`), Alice's engine is the in-process one and Bob decrypts with
pysequoia. The keys are the public demo keys shipped in
``e2email/demo_keys/`` (made by ``keys/make-demo-keys.sh``).

Then the same with S/MIME: a local test CA issues X.509 identities to Alice and Bob (moved into
their stores as PKCS#12 files), Alice sends signed-then-encrypted mail (AES-256-CBC), and Bob
decrypts it and verifies the CMS signature and the certificate chain with ``cryptography`` only
(e2email's own verifier; ``openssl cms -verify`` is asked for a second opinion when installed).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import importlib.resources
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from e2email.certstore import CertStore, describe
from e2email.client import AsyncMailer
from e2email.config import Protection, Scheme, SMTPSettings, TLSMode
from e2email.crypto import smime
from e2email.errors import ConfigError, CryptoError, E2EmailError, KeyProblem
from e2email.keystore import Keystore
from e2email.message import Attachment, Message
from e2email.testing import LoopbackSMTPServer

__all__ = ["DemoOutcome", "demo_key", "run_demo"]

ALICE = "Alice Demo <alice@example.org>"
BOB = "Bob Demo <bob@example.net>"
_SMTP_USER, _SMTP_PASSWORD = "alice", "demo-password"

_BODY = """Hi Bob,

here are the quarterly numbers, as promised. Only you (and I) can read this:
the server in the middle sees ciphertext, and the signature proves it is from me.

From here on the plan is unchanged.
  -- Alice
"""
_ATTACHMENT = b"quarter,revenue,cost\r\nQ1,120,80\r\nQ2,135,82\r\nQ3,150,90\r\n"


def demo_key(name: str) -> bytes:
    """The bytes of one public demo key file (``alice.sec.asc``, ``bob.pub.asc``, ...).

    Read as package data through :mod:`importlib.resources`, never as a filesystem path: an
    installed package may not be a plain folder (a zip, or a namespace package whose
    ``files()`` is a MultiplexedPath on Python 3.11), and a checkout is not installed at all."""
    resource = importlib.resources.files("e2email").joinpath("demo_keys").joinpath(name)
    try:
        return resource.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"the demo key {name} is missing from this installation of e2email "
            f"({exc.strerror or exc}): reinstall the package"
        ) from exc


@dataclass(frozen=True)
class DemoOutcome:
    ok: bool
    tls_version: str | None
    signer: str | None
    decrypted_text: str


def _demo_message(work: Path, subject: str) -> Message:
    """Alice's message to Bob, with the CSV attachment read from a file as a user's would be."""
    attachment_path = work / "quarterly-report-2026-q3-final-numbers.csv"
    attachment_path.write_bytes(_ATTACHMENT)
    return Message(
        sender=ALICE,
        to=(BOB,),
        subject=subject,
        text=_BODY,
        attachments=(Attachment.from_path(attachment_path),),
    )


def _server_settings(server: LoopbackSMTPServer) -> SMTPSettings:
    """Alice's submission settings for the loopback server: implicit TLS, AUTH, its CA."""
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host,
        port=server.port,
        tls=TLSMode.IMPLICIT,
        username=_SMTP_USER,
        password=_SMTP_PASSWORD,
        ca_file=server.ca_file,
        timeout=30,
    )


def _show(console: Console, title: str, body: str | Text) -> None:
    console.print(Panel(body, title=title, title_align="left", expand=True))


def _ciphertext_view(raw: bytes, *, lines: int = 40) -> Text:
    # 40: the header block (a dozen lines of them the Autocrypt key) and the start of the armor.
    shown = raw.decode("ascii", errors="replace").split("\r\n")
    text = Text("\n".join(shown[:lines]))
    if len(shown) > lines:
        text.append(f"\n... ({len(shown) - lines} more lines, {len(raw)} bytes in all)", "dim")
    return text


def _decrypt_as_bob(
    bob: Keystore, raw: bytes, sender_fingerprint: str
) -> tuple[EmailMessage, str | None, bool]:
    """Cut the encrypted part out of the received bytes and decrypt it with Bob's key (from
    his certificate store, in this process: no gpg needed); the signature counts only if it
    is valid and made by the sender's key, which Bob has in his store."""
    import pysequoia

    bob_key = bob.find("bob@example.net")[0]
    secret = bob.secret_key_bytes(bob_key.fingerprint)
    sender = bob.get(sender_fingerprint)
    if secret is None or sender is None:
        raise ValueError("Bob's keystore lacks his secret key or Alice's certificate")
    alice_cert = pysequoia.Cert.from_bytes(bob.export(sender_fingerprint, armor=False))
    assert sender.user_ids
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(outer, EmailMessage)
    parts = outer.get_payload()
    if outer.get_content_type() != "multipart/encrypted" or not isinstance(parts, list):
        raise ValueError(f"expected multipart/encrypted, got {outer.get_content_type()}")
    encrypted = parts[1]
    assert isinstance(encrypted, EmailMessage)
    armored = encrypted.get_payload(decode=True)
    assert isinstance(armored, bytes)
    try:
        result = pysequoia.decrypt(
            armored,
            decryptor=pysequoia.Tsk.from_bytes(secret).decryptor(None),
            store=lambda key_ids: [alice_cert],
        )
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"decryption failed: {str(exc).splitlines()[0]}") from exc
    inner = email.message_from_bytes(bytes(result.bytes or b""), policy=email.policy.default)
    assert isinstance(inner, EmailMessage)
    signed_by = {str(sig.certificate).upper() for sig in result.valid_sigs}
    good = sender_fingerprint in signed_by
    return inner, sender.user_ids[0].text if good else None, good


async def _run(console: Console, work: Path) -> DemoOutcome:
    # Certificate stores (pgp.cert.d and protected secret keys): the same whether or not gpg
    # is installed, and the engine is the in-process one (pysequoia, a dependency).
    alice = Keystore(work / "alice", backend="certd")
    bob = Keystore(work / "bob", backend="certd")
    try:
        for store, files in (
            (alice, ("alice.sec.asc", "bob.pub.asc")),
            (bob, ("bob.sec.asc", "alice.pub.asc")),
        ):
            for name in files:
                # The demo keys are public test material without a passphrase: stored as
                # they are, which the certificate store does only when told to.
                store.import_keys(demo_key(name), unprotected=True)
        alice_fpr = alice.find("alice@example.org")[0].fingerprint
        _show(
            console,
            "1. Identities (public demo keys: never use them for real mail)",
            f"sender    {ALICE}  signs with {alice_fpr}\n"
            f"recipient {BOB}  encrypts to {alice.find('bob@example.net')[0].fingerprint}",
        )

        message = _demo_message(work, "Quarterly numbers — confidential")

        with LoopbackSMTPServer(tls="implicit", credentials={_SMTP_USER: _SMTP_PASSWORD}) as server:
            assert server.ca_file is not None
            _show(
                console,
                "2. A real SMTP server on loopback",
                f"listening on {server.host}:{server.port} with implicit TLS (like port 465),\n"
                f"certificate from a throwaway CA ({server.ca_file}), AUTH required after TLS",
            )
            mailer = AsyncMailer(
                smtp=_server_settings(server),
                keystore=alice,
                protection=Protection(sign=True, encrypt=True),
            )
            result = await mailer.send(message)
            delivery = result.copies[0]
            tls = delivery.tls
            _show(
                console,
                "3. Signed, encrypted and submitted",
                f"TLS {tls.version if tls else '?'} ({tls.cipher if tls else '?'}), "
                f"certificate and host name verified\n"
                f"accepted for {', '.join(result.accepted)}: {delivery.data_reply}",
            )
            received = server.messages[-1]

        _show(
            console,
            f"4. What the server received ({received.tls_version}): ciphertext only",
            _ciphertext_view(received.data),
        )
        plain_leaks = [
            needle
            for needle in (b"quarterly numbers", b"Quarterly", b"Q3,150", b"revenue")
            if needle in received.data
        ]

        inner, signer, good = _decrypt_as_bob(bob, received.data, alice_fpr)
        body_part = inner.get_body(preferencelist=("plain",))
        # The wire form is CRLF; compare and show text with Python's newlines.
        text = body_part.get_content().replace("\r\n", "\n") if body_part is not None else ""
        expected = hashlib.sha256(_ATTACHMENT).digest()
        names: list[str] = []
        attachment_ok = False
        for part in inner.iter_attachments():
            names.append(part.get_filename() or "")
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and hashlib.sha256(data).digest() == expected:
                attachment_ok = True
        verdict = Text()
        verdict.append("signature: ")
        verdict.append(
            f"GOOD, by {signer}\n" if good else "NOT VERIFIED\n", "green" if good else "bold red"
        )
        verdict.append(f"protected subject: {inner['subject']}\n")
        verdict.append(f"attachments: {', '.join(names) or 'none'}")
        verdict.append(" (bytes match)\n" if attachment_ok else " (MISMATCH)\n")
        verdict.append("\n" + text)
        _show(console, "5. Decrypted and verified by Bob", verdict)

        ok = good and attachment_ok and text == _BODY and not plain_leaks
        if plain_leaks:
            console.print(f"[bold red]plaintext visible to the server: {plain_leaks}[/]")
        console.print(
            "[bold green]Round trip complete: only Bob could read it, and he knows Alice sent "
            "it.[/]"
            if ok
            else "[bold red]Round trip FAILED[/]"
        )
        return DemoOutcome(
            ok=ok,
            tls_version=received.tls_version,
            signer=signer,
            decrypted_text=text,
        )
    finally:
        alice.shutdown_agent()
        bob.shutdown_agent()


_P12_PASSPHRASE = "demo-p12-passphrase"


def _smime_identities(console: Console, work: Path) -> tuple[CertStore, CertStore, Path]:
    """A local test CA issues Alice's and Bob's identities; each imports their own PKCS#12 and
    the CA certificate as a trust anchor, and Alice imports Bob's certificate."""
    ca = CertStore(work / "smime-ca")
    alice_store, bob_store = CertStore(work / "alice"), CertStore(work / "bob")
    files: dict[str, tuple[Path, Path]] = {}
    for who, address in (("alice", "alice@example.org"), ("bob", "bob@example.net")):
        made = ca.generate_identity(
            address, name=f"{who.title()} Demo", algorithm="rsa2048", test_ca=True, lifetime="30d"
        )
        p12, pem = work / f"{who}.p12", work / f"{who}.crt.pem"
        p12.write_bytes(ca.export_pkcs12(made, passphrase=None, export_passphrase=_P12_PASSPHRASE))
        pem.write_bytes(ca.export_pem(made))
        files[who] = (p12, pem)
    ca_pem = ca.test_ca_cert()
    assert ca_pem is not None
    alice_store.import_files([files["alice"][0], files["bob"][1]], passphrase=_P12_PASSPHRASE)
    bob_store.import_files([files["bob"][0]], passphrase=_P12_PASSPHRASE)
    for store in (alice_store, bob_store):
        store.import_files([ca_pem], trust=True)
    alice_cert = alice_store.signer_cert("alice@example.org")
    bob_cert = alice_store.recipient_cert("bob@example.net")
    if isinstance(alice_cert, KeyProblem) or isinstance(bob_cert, KeyProblem):
        raise CryptoError(f"demo identities unusable: {alice_cert} / {bob_cert}")
    rows = [f"CA        {alice_cert.issuer}"]
    for label, cert in (("sender   ", alice_cert), ("recipient", bob_cert)):
        rows.append(
            f"{label} {describe(cert.certificate)}  {cert.algorithm}, "
            f"SHA-256 {cert.fingerprint[:16]}..."
        )
    rows.append("each imported their own PKCS#12 (key kept under its passphrase) and trusts the CA")
    _show(
        console,
        "6. S/MIME: identities from a local test CA (keys generate --smime --test-ca)",
        "\n".join(rows),
    )
    return alice_store, bob_store, ca_pem


def _openssl_opinion(raw: bytes, ca_pem: Path, work: Path) -> str:
    """``openssl cms -verify`` on the decrypted entity, when openssl is installed."""
    if shutil.which("openssl") is None:
        return "openssl not installed: no second opinion"
    entity = work / "smime-inner.eml"
    entity.write_bytes(raw)
    done = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-in",
            str(entity),
            "-CAfile",
            str(ca_pem),
            "-purpose",
            "smimesign",
            "-out",
            "/dev/null",
        ],
        capture_output=True,
        check=False,
    )
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return f"openssl cms -verify: {said[-1] if said else done.returncode}"


def _decrypt_and_verify_smime(
    bob: CertStore, raw: bytes, sender: str
) -> tuple[EmailMessage, bytes, str | None, str]:
    """As Bob: decrypt the received bytes, verify the inner CMS signature over the exact signed
    part, judge the signer's certificate (chain to the trusted CA, usage, and that it names
    the From address). Returns the signed part, its bytes, the signer (if good) and a verdict."""
    identity = bob.signer_cert("bob@example.net")
    if isinstance(identity, KeyProblem):
        raise CryptoError(str(identity))
    key = bob.signer_key(identity, _P12_PASSPHRASE).private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    inner = smime.decrypt(smime.entity_der(raw), certificate=identity.certificate, private_key=key)
    signed, signature = smime.parse_multipart_signed(inner)
    check = smime.verify_detached(signed, signature)
    entity = email.message_from_bytes(signed, policy=email.policy.default)
    assert isinstance(entity, EmailMessage)
    problem = bob.check(check.certificate, sender, purpose="sign", intermediates=check.certificates)
    from_header = entity["From"].addresses[0].addr_spec if entity["From"] else ""
    if problem is not None:
        return entity, inner, None, f"signature valid but the certificate is refused: {problem}"
    if from_header.lower() != sender:
        return entity, inner, None, f"signed by {sender} but From says {from_header}"
    signer = describe(check.certificate)
    return entity, inner, signer, f"GOOD, by {signer} ({check.digest}, chain to the test CA)"


async def _run_smime(console: Console, work: Path) -> bool:
    alice_store, bob_store, ca_pem = await asyncio.to_thread(_smime_identities, console, work)
    message = _demo_message(work, "Quarterly numbers — confidential (S/MIME)")
    with LoopbackSMTPServer(tls="implicit", credentials={_SMTP_USER: _SMTP_PASSWORD}) as server:
        assert server.ca_file is not None
        mailer = AsyncMailer(
            smtp=_server_settings(server),
            keystore=Keystore(work / "alice"),
            certstore=alice_store,
            protection=Protection(scheme=Scheme.SMIME),
            passphrase=_P12_PASSPHRASE,
        )
        result = await mailer.send(message)
        delivery = result.copies[0]
        tls = delivery.tls
        _show(
            console,
            "7. S/MIME: signed, then encrypted to Bob and Alice (AES-256-CBC), submitted",
            f"TLS {tls.version if tls else '?'}; accepted for {', '.join(result.accepted)}: "
            f"{delivery.data_reply}",
        )
        received = server.messages[-1]
    _show(
        console,
        "8. What the server received: application/pkcs7-mime, ciphertext only",
        _ciphertext_view(received.data, lines=18),
    )
    leaks = [n for n in (b"Quarterly", b"Q3,150", b"revenue") if n in received.data]
    entity, inner, signer, verdict = await asyncio.to_thread(
        _decrypt_and_verify_smime, bob_store, received.data, "alice@example.org"
    )
    body_part = entity.get_body(preferencelist=("plain",))
    text = body_part.get_content().replace("\r\n", "\n") if body_part is not None else ""
    expected = hashlib.sha256(_ATTACHMENT).digest()
    attachment_ok = any(
        isinstance(data := part.get_payload(decode=True), bytes)
        and hashlib.sha256(data).digest() == expected
        for part in entity.iter_attachments()
    )
    good = signer is not None
    shown = Text()
    shown.append("signature: ")
    shown.append(verdict + "\n", "green" if good else "bold red")
    shown.append(_openssl_opinion(inner, ca_pem, work) + "\n", "dim")
    shown.append(f"protected subject: {entity['subject']}\n")
    shown.append("attachment bytes match\n" if attachment_ok else "attachment MISMATCH\n")
    shown.append("\n" + text)
    _show(console, "9. Decrypted and verified by Bob (S/MIME)", shown)
    ok = good and attachment_ok and text == _BODY and not leaks
    if leaks:
        console.print(f"[bold red]plaintext visible to the server: {leaks}[/]")
    console.print(
        "[bold green]S/MIME round trip complete: encrypted to Bob's certificate, signed with "
        "Alice's, both checked against the CA.[/]"
        if ok
        else "[bold red]S/MIME round trip FAILED[/]"
    )
    return ok


def run_demo(console: Console | None = None) -> int:
    """Run the demo (OpenPGP, then S/MIME); 0 when every check passed."""
    console = console or Console()
    # A short path: gpg-agent's socket lives in the GnuPG home and socket paths are limited.
    work = Path(tempfile.mkdtemp(prefix="e2e-demo-"))
    try:
        outcome = asyncio.run(_run(console, work))
        smime_ok = asyncio.run(_run_smime(console, work))
    except E2EmailError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if outcome.ok and smime_ok else 1
