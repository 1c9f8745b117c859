"""Autocrypt on the wire (issue 10 §3): what a real SMTP server received from e2email.

Every OpenPGP copy carries the sender's ``Autocrypt:`` header in its outer header block (the
minimal key: primary, encryption subkey, the From user ID; ``prefer-encrypt=mutual`` when the
policy encrypts; within 10 KiB), a signed-only message too, outside the signed part. A
message encrypted to two or more To/Cc recipients carries one ``Autocrypt-Gossip`` header
per To/Cc recipient in the root header block *inside* the encryption, with the key it is
encrypted to; the Bcc copies carry none, and no copy names a Bcc recipient anywhere, not
even decrypted. S/MIME and plain messages never carry either; ``Protection(autocrypt=False)``
and ``send --no-autocrypt`` turn both off. Everything is cut out of the received bytes and
checked with gpg, sqop and gosop.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_pgp import ENGINES, Keys
from pgp_helpers import (
    gpg,
    gpg_decrypt,
    gpg_verify,
    kill_agent,
    list_packet_key_ids,
    multipart_parts,
    new_gnupg_home,
    part_body,
    sop_verify,
    split_head,
    subkey_ids,
)

from e2email import AsyncMailer, Message, OpenPGPEngine, Protection, Scheme, SMTPSettings
from e2email.certstore import CertStore
from e2email.discovery.autocrypt import AutocryptHeader, parse_autocrypt
from e2email.errors import MessageError
from e2email.keystore import Keystore
from e2email.message import HP, build_payload, stream_payload
from e2email.testing import LoopbackSMTPServer

ServerFactory = Callable[..., LoopbackSMTPServer]

ALICE = "alice@example.org"
BCC = ("dave@example.com", "erin@example.com")


def _pgp(engine: OpenPGPEngine = OpenPGPEngine.AUTO, **policy: bool) -> Protection:
    """An OpenPGP policy on ``engine`` (AUTO: the in-process engine when installed). Both
    engines add the Autocrypt headers through ``autocrypt_fields``; the shared message below
    is sent once per engine."""
    return Protection(engine=engine, **policy)


# -- helpers: everything from the received bytes -----------------------------------------------


def _fields(head: bytes, name: str) -> list[bytes]:
    """Every field ``name`` of a header block, exactly as received (folds kept)."""
    found = re.findall(rb"(?im)^([!-9;-~]+):((?:[^\r\n]*)(?:\r\n[ \t][^\r\n]*)*)\r\n", head)
    return [
        name_ + b":" + value for name_, value in found if name_.lower() == name.lower().encode()
    ]


def _value(field: bytes) -> str:
    return field.split(b":", 1)[1].decode("ascii").strip()


def _sent(mailer: AsyncMailer, message: Message) -> str:
    result = asyncio.run(mailer.send(message))
    return result.message_id


def _copies(server: LoopbackSMTPServer, message_id: str) -> dict[tuple[str, ...], bytes]:
    """The received copies of one message, by their envelope recipients."""
    found = {m.rcpt_tos: m.data for m in server.messages if f"<{message_id}>".encode() in m.data}
    assert found, f"nothing received for {message_id}"
    return found


def _ciphertext(raw: bytes) -> bytes:
    _, (_, enc) = multipart_parts(raw)
    return part_body(enc)


@dataclass(frozen=True)
class Shown:
    """A key as gpg sees it after ``gpg --import`` into an empty home."""

    fingerprints: list[str]  # primary first, then subkeys
    user_ids: list[str]


def _imported(keydata: bytes) -> Shown:
    home = new_gnupg_home("e2ac")
    try:
        gpg(home, "--import", input=keydata)
        listing = gpg(home, "--with-colons", "--list-keys").stdout.decode()
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    fprs = re.findall(r"^fpr:+([0-9A-F]{40}):", listing, re.M)
    uids = [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("uid:")]
    return Shown(fprs, uids)


def _packets(data: bytes) -> list[str]:
    home = new_gnupg_home("e2ap")
    try:
        out = gpg(home, "--list-packets", input=data).stdout.decode()
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    return [line.split(":")[1] for line in out.splitlines() if line.startswith(":")]


def _check_sender_header(head: bytes, keys: Keys, store: Keystore, *, mutual: bool) -> bytes:
    """Exactly one ``Autocrypt:`` field that parses by Level 1 and holds Alice's minimal key."""
    (field,) = _fields(head, "Autocrypt")
    assert len(field) + 2 <= 10 * 1024  # with its CRLF and folding whitespace
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    value = _value(field)
    names = [a.strip().split("=", 1)[0] for a in value.split(";")]
    assert names == (["addr", "prefer-encrypt", "keydata"] if mutual else ["addr", "keydata"])
    parsed = parse_autocrypt(value)
    assert parsed == AutocryptHeader(
        ALICE, parsed.keydata if parsed else b"", "mutual" if mutual else "nopreference"
    )
    assert parsed is not None
    # Read by hand too: keydata is base64 (whitespace dropped) of exactly the five packets
    # Level 1 asks for: primary, user ID, its self-signature, subkey, its binding signature.
    keydata = base64.b64decode("".join(value.split("keydata=", 1)[1].split()), validate=True)
    assert keydata == parsed.keydata
    assert _packets(keydata) == [
        "public key packet",
        "user ID packet",
        "signature packet",
        "public sub key packet",
        "signature packet",
    ]
    alice = store.get(keys.alice.fingerprint)
    assert alice is not None
    sub = alice.encryption_subkey()
    assert sub is not None
    shown = _imported(parsed.keydata)
    assert shown.fingerprints == [keys.alice.fingerprint, sub.fingerprint]
    assert shown.user_ids == [u.text for u in alice.user_ids if u.address == ALICE]
    return field


# -- one message to To, Cc and two Bcc recipients, sent once -----------------------------------


@dataclass(frozen=True)
class Sent:
    main: bytes
    bcc: dict[str, bytes]  # Bcc address -> its copy
    plain: dict[str, bytes]  # "main" or a Bcc address -> the decrypted payload


@pytest.fixture(scope="module", params=ENGINES, ids=[e.value for e in ENGINES])
def sent(
    request: pytest.FixtureRequest,
    keys: Keys,
    sender_store: Keystore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
) -> Sent:
    mailer = AsyncMailer(
        smtp=smtp_settings, keystore=sender_store, protection=_pgp(engine=request.param)
    )
    message_id = _sent(
        mailer,
        Message(
            sender=f"Alice Demo <{ALICE}>",
            to=[f"Bob <{keys.bob.address}>"],
            cc=[keys.carol.address],
            bcc=list(BCC),
            subject="Gossip test",
            text="Hello all\n",
        ),
    )
    copies = _copies(tls_server, message_id)
    main = copies.pop((keys.bob.address, keys.carol.address))
    bcc = {rcpts[0]: raw for rcpts, raw in copies.items()}
    assert set(bcc) == set(BCC)
    plain = {
        name: gpg_decrypt(recipients_home, _ciphertext(raw))[0]
        for name, raw in [("main", main), *bcc.items()]
    }
    return Sent(main, bcc, plain)


def test_every_encrypted_copy_carries_the_senders_autocrypt_header(
    sent: Sent, keys: Keys, sender_store: Keystore
) -> None:
    """The To/Cc copy and each Bcc copy: one Autocrypt field in the outer header block, the
    same in all (Level 1: not varied by recipients), ``prefer-encrypt=mutual`` since the
    policy encrypts; never inside the encryption (not even as an HP-Outer record)."""
    fields = []
    for raw in (sent.main, *sent.bcc.values()):
        head, _ = split_head(raw)
        assert b"multipart/encrypted" in head
        fields.append(_check_sender_header(head, keys, sender_store, mutual=True))
    assert len(set(fields)) == 1
    for plaintext in sent.plain.values():
        assert b"autocrypt:" not in plaintext.lower()


def test_gossip_is_only_inside_the_to_cc_copy_and_never_names_a_bcc_recipient(
    sent: Sent, keys: Keys, recipients_home: Path
) -> None:
    # Outside the encryption: no gossip anywhere in any copy (the armor cannot hide a "-").
    for raw in (sent.main, *sent.bcc.values()):
        assert b"autocrypt-gossip" not in raw.lower()
    # Inside the To/Cc copy: one per To/Cc recipient, in the payload's root header block,
    # each with the key the message is encrypted to.
    root, body = split_head(sent.plain["main"])
    assert b"autocrypt-gossip" not in body.lower()
    gossip = [parse_autocrypt(_value(f)) for f in _fields(root, "Autocrypt-Gossip")]
    assert all(g is not None and g.prefer_encrypt == "nopreference" for g in gossip)
    by_addr = {g.addr: g for g in gossip if g is not None}
    assert len(gossip) == 2 and set(by_addr) == {keys.bob.address, keys.carol.address}
    pkesk = list_packet_key_ids(recipients_home, _ciphertext(sent.main))
    for who in (keys.bob, keys.carol):
        shown = _imported(by_addr[who.address].keydata)
        assert shown.fingerprints[0] == who.fingerprint
        assert [u for u in shown.user_ids if who.address not in u] == []
        assert {f[-16:] for f in shown.fingerprints[1:]} & pkesk  # the key encrypted to
    # The Bcc copies: no gossip inside either.
    for address in BCC:
        assert b"autocrypt-gossip" not in sent.plain[address].lower()
    # No copy names a Bcc recipient other than its own, neither its address (anywhere, even
    # decrypted) nor its key IDs (encrypted-to packets, gossip keydata).
    gossip_ids = {f[-16:] for g in by_addr.values() for f in _imported(g.keydata).fingerprints}
    for address, fpr in ((BCC[0], keys.dave.fingerprint), (BCC[1], keys.erin.fingerprint)):
        ids = subkey_ids(recipients_home, fpr)
        for name, raw in [("main", sent.main), *sent.bcc.items()]:
            assert address.encode() not in raw.lower()
            assert address.encode() not in sent.plain[name].lower()
            if name != address:
                assert not ids & list_packet_key_ids(recipients_home, _ciphertext(raw))
        assert not ids & gossip_ids


def test_one_recipient_gets_no_gossip_and_a_programs_own_header_stays_the_only_one(
    keys: Keys,
    sender_store: Keystore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
) -> None:
    mailer = AsyncMailer(smtp=smtp_settings, keystore=sender_store, protection=_pgp())
    one = _sent(mailer, Message(sender=ALICE, to=[keys.bob.address], subject="1", text="x\n"))
    (raw,) = _copies(tls_server, one).values()
    _check_sender_header(split_head(raw)[0], keys, sender_store, mutual=True)
    plaintext, _ = gpg_decrypt(recipients_home, _ciphertext(raw))
    assert b"autocrypt-gossip" not in plaintext.lower()  # nothing to gossip to one recipient
    # Level 1 allows one Autocrypt header: a program that wrote its own keeps it alone.
    own = "addr=alice@example.org; _from=the-program; keydata=AAAA"
    mine = _sent(
        mailer,
        Message(
            sender=ALICE,
            to=[keys.bob.address],
            subject="2",
            text="x\n",
            headers=[("Autocrypt", own)],
        ),
    )
    (raw,) = _copies(tls_server, mine).values()
    assert [_value(f) for f in _fields(split_head(raw)[0], "Autocrypt")] == [own]


def test_a_signed_only_message_carries_it_outside_the_signed_part_and_still_verifies(
    keys: Keys,
    sender_store: Keystore,
    smime_store: CertStore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """OpenPGP signed only: the header (no prefer-encrypt: the policy does not encrypt) is in
    the outer header block, not in the signed part, and gpg, sqop and gosop verify the
    signature. The same message as S/MIME, or unprotected, carries no Autocrypt at all, though
    the sender's OpenPGP key is at hand."""
    message = Message(sender=ALICE, to=[keys.bob.address], cc=[keys.carol.address], text="hi\n")
    signed = AsyncMailer(smtp=smtp_settings, keystore=sender_store, protection=_pgp(encrypt=False))
    (raw,) = _copies(tls_server, _sent(signed, message)).values()
    head, (part, signature) = multipart_parts(raw)
    assert b"multipart/signed" in head
    _check_sender_header(head, keys, sender_store, mutual=False)
    assert b"autocrypt" not in part.lower()
    assert gpg_verify(recipients_home, part_body(signature), part, tmp_path) == (
        keys.alice.fingerprint
    )
    for tool in ("sqop", "gosop"):
        sop_verify(tool, part_body(signature), part, keys.alice.cert, tmp_path)

    for protection in (
        Protection(scheme=Scheme.SMIME, encrypt=False),
        Protection(scheme=Scheme.SMIME),
        Protection(sign=False, encrypt=False),
    ):
        other = AsyncMailer(
            smtp=smtp_settings,
            keystore=sender_store,
            certstore=smime_store,
            protection=protection,
        )
        (raw,) = _copies(tls_server, _sent(other, message)).values()
        assert b"autocrypt" not in raw.lower(), protection


def test_neither_header_when_turned_off_or_without_the_senders_secret_key(
    keys: Keys,
    sender_store: Keystore,
    smtp_settings: SMTPSettings,
    tls_server: LoopbackSMTPServer,
    recipients_home: Path,
    tmp_path: Path,
) -> None:
    """``Protection(autocrypt=False)``: no Autocrypt header, no gossip. And Level 1 sends the
    sender's header only for a sender with secret key material: a store with Alice's
    certificate only (encrypting to her as to self, not signing) advertises no key for her,
    though it still gossips the recipients' keys to each other."""
    message = Message(sender=ALICE, to=[keys.bob.address], cc=[keys.carol.address], text="x\n")
    mailer = AsyncMailer(
        smtp=smtp_settings, keystore=sender_store, protection=_pgp(autocrypt=False)
    )
    (raw,) = _copies(tls_server, _sent(mailer, message)).values()
    assert b"autocrypt" not in raw.lower()
    plaintext, _ = gpg_decrypt(recipients_home, _ciphertext(raw))
    assert b"autocrypt" not in plaintext.lower()

    public_only = Keystore(tmp_path / "home")
    try:
        for cert in (keys.alice.cert, keys.bob.cert, keys.carol.cert):
            public_only.import_file(cert)
        mailer = AsyncMailer(smtp=smtp_settings, keystore=public_only, protection=_pgp(sign=False))
        (raw,) = _copies(tls_server, _sent(mailer, message)).values()
        assert _fields(split_head(raw)[0], "Autocrypt") == []
        plaintext, _ = gpg_decrypt(recipients_home, _ciphertext(raw))
        assert len(_fields(split_head(plaintext)[0], "Autocrypt-Gossip")) == 2
        # The same store with Alice's secret key: the header and the gossip are there.
        assert keys.alice.secret
        public_only.import_file(keys.alice.secret)
        mailer = AsyncMailer(smtp=smtp_settings, keystore=public_only, protection=_pgp())
        (raw,) = _copies(tls_server, _sent(mailer, message)).values()
        _check_sender_header(split_head(raw)[0], keys, sender_store, mutual=True)
    finally:
        public_only.shutdown_agent()


# -- the command line --------------------------------------------------------------------------


def _e2email(*args: str, home: Path, body: bytes = b"") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        input=body,
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home)},
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


@pytest.fixture(scope="module")
def cli_home(keys: Keys) -> Iterator[Path]:
    path = new_gnupg_home("e2acc")
    assert keys.alice.secret
    files = [keys.alice.secret, keys.bob.cert, keys.carol.cert]
    done = _e2email("keys", "import", *map(str, files), home=path)
    assert done.returncode == 0, done.stderr
    yield path
    kill_agent(path / "gnupg")
    shutil.rmtree(path, ignore_errors=True)


def test_send_no_autocrypt_removes_both_headers(
    cli_home: Path, smtp_server: ServerFactory, recipients_home: Path
) -> None:
    server = smtp_server(tls="implicit")
    assert server.ca_file is not None
    base = [
        "send",
        "--from",
        ALICE,
        "--to",
        "bob@example.net",
        "--cc",
        "carol@example.com",
        "--subject",
        "cli",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--tls",
        "implicit",
        "--ca-file",
        str(server.ca_file),
        "--engine",
        "gpg",  # the other tests use the default (in-process) engine
    ]
    for extra in ([], ["--no-autocrypt"]):
        done = _e2email(*base, *extra, home=cli_home, body=b"hello\n")
        assert done.returncode == 0, done.stderr
    with_it, without = (m.data for m in server.messages)
    assert len(_fields(split_head(with_it)[0], "Autocrypt")) == 1
    plaintext, _ = gpg_decrypt(recipients_home, _ciphertext(with_it))
    assert len(_fields(split_head(plaintext)[0], "Autocrypt-Gossip")) == 2
    assert b"autocrypt" not in without.lower()
    plaintext, _ = gpg_decrypt(recipients_home, _ciphertext(without))
    assert b"autocrypt" not in plaintext.lower()


# -- the payload's extra header fields ---------------------------------------------------------

FOLDED = "addr=bob@example.net; keydata=\r\n AAAA\r\n\tBBBB"


def test_extra_fields_go_byte_exact_into_the_payloads_root_header_block() -> None:
    message = Message(
        sender=ALICE, to=["bob@example.net"], subject="s", text="hi\n", headers=[("X-A", "1")]
    ).finalized()
    fields = [("Autocrypt-Gossip", FOLDED), ("Autocrypt-Gossip", "addr=c@example.com; keydata=C")]
    payload = build_payload(message, hp=HP.CIPHER, extra_fields=fields)
    assert payload == bytes(stream_payload(message, hp=HP.CIPHER, extra_fields=fields))
    head, body = split_head(payload)
    rendered = (
        b"Autocrypt-Gossip: addr=bob@example.net; keydata=\r\n AAAA\r\n\tBBBB\r\n"
        b"Autocrypt-Gossip: addr=c@example.com; keydata=C\r\n"
    )
    # After the protected fields (the extra X-A among them), before the HP-Outer records.
    assert rendered in head
    assert head.index(b"X-A: 1\r\n") < head.index(rendered) < head.index(b"HP-Outer:")
    assert b"Gossip" not in body
    plain = build_payload(message, hp=HP.CIPHER)
    assert b"Gossip" not in plain
    # A MIME body given as it is (Message.body) gets them the same way.
    parsed = Message.from_bytes(
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n"
    ).finalized()
    assert rendered in build_payload(parsed, hp=HP.CLEAR, extra_fields=fields)


@pytest.mark.parametrize(
    "field",
    [
        ("Autocrypt-Gossip", "a\nb"),  # bare LF
        ("Autocrypt-Gossip", "a\rb"),  # bare CR
        ("Autocrypt-Gossip", "a\r\nb"),  # a new field, not a fold
        ("Autocrypt-Gossip", "a\r\n \r\n b"),  # a blank continuation line
        ("Autocrypt-Gossip", "a\r\n"),  # a trailing fold with nothing after it
        ("Autocrypt-Gossip", ""),
        ("Autocrypt-Gossip", "a\x00b"),
        ("Autocrypt-Gossip", "grüße"),
        ("Autocrypt-Gossip", "x" * 990),  # over 998 with the name
        ("Subject", "x"),
        ("Content-Type", "text/html"),
        ("HP-Outer", "Subject: x"),
        ("Bad Name", "x"),
    ],
)
def test_extra_fields_are_refused_unless_well_formed(field: tuple[str, str]) -> None:
    message = Message(sender=ALICE, to=["bob@example.net"], text="hi\n").finalized()
    with pytest.raises(MessageError, match="extra_fields"):
        build_payload(message, hp=HP.CIPHER, extra_fields=[field])


def test_extra_fields_need_a_protected_payload() -> None:
    message = Message(sender=ALICE, to=["bob@example.net"], text="hi\n").finalized()
    with pytest.raises(ValueError, match="hp"):
        build_payload(message, hp=None, extra_fields=[("Autocrypt-Gossip", "a=b")])
