"""Large messages go through the streaming paths intact (functional tests; the memory and time
they take are measured by benchmarks/run.py, not here).

A multi-megabyte attachment is base64-encoded block by block while gpg reads it, gpg's armored
output is converted to CRLF as it arrives, the outbox stores the copy through SQLite's blob I/O
and DATA is written in dot-stuffed pieces. Each test checks the bytes at the far end with tools
we did not write: gpg decrypts or verifies what the server received, aiosmtpd un-stuffs DATA.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import os
import re
import sqlite3
import tracemalloc
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from fixtures_smime import PKI
from pgp_helpers import (
    gpg_decrypt,
    gpg_verify,
    header_value,
    multipart_parts,
    part_body,
    run,
    sop_decrypt,
)
from test_smime import openssl_decrypt, openssl_verify

from e2email import Attachment, Mailer, Message, Protection, Scheme, SMTPSettings, TLSMode
from e2email.certstore import CertStore
from e2email.crypto import openpgp, sequoia, smime
from e2email.crypto.smime import SMIMEProtector
from e2email.errors import CryptoError, MessageError
from e2email.keystore import Keystore
from e2email.message import build_payload, check_wire_safe, stream_payload
from e2email.outbox import NewItem, Outbox
from e2email.spool import Spool
from e2email.testing import LoopbackSMTPServer
from e2email.transport import SMTPTransport

ServerFactory = Callable[..., LoopbackSMTPServer]

#: Over a few of every internal piece size: base64 blocks (228 KiB of input), gpg pipe pieces
#: (64 KiB), DATA pieces (256 KiB), outbox blob pieces and the inline limit (1 MiB).
SIZE = 6_000_000 + 1234


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(SIZE)


def _settings(server: LoopbackSMTPServer) -> SMTPSettings:
    assert server.ca_file is not None
    return SMTPSettings(
        host=server.host, port=server.port, tls=TLSMode.IMPLICIT, ca_file=server.ca_file, timeout=60
    )


def _attachment_of(entity: bytes) -> tuple[bytes, list[bytes]]:
    """The attachment's decoded bytes and its raw base64 lines, from a MIME entity."""
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    (part,) = list(msg.iter_attachments())
    assert part.get_filename() == "big.bin"
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    raw_body = entity[entity.rindex(b"Content-Transfer-Encoding: base64\r\n\r\n") :]
    lines = raw_body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0].split(b"\r\n")
    return content, lines


@pytest.mark.parametrize("engine", ["gpg", "sequoia", "sequoia-fed"])
def test_large_attachment_encrypted_arrives_and_decrypts_to_the_same_bytes(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    blob: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
) -> None:
    """A 6 MB attachment, signed and encrypted with either engine, To one recipient and Bcc
    another (two copies, each spooled: written to a file as made, stored in the outbox and sent
    from there a piece at a time), sent with the outbox: both copies arrive,
    gpg decrypts each to a MIME entity whose attachment is the original bytes (base64 in
    76-character lines), with Alice's good signature; the two plaintexts are identical; the
    outbox is empty afterwards (the large bodies removed with their items). "sequoia-fed":
    each payload fed to Sequoia by a child process (e2email.feed, from 8 MiB up by default)."""
    if engine == "sequoia-fed":
        monkeypatch.setattr(sequoia, "FEED_MIN", 1 << 20)
        engine = "sequoia"
    server = smtp_server(tls="implicit")
    message = Message(
        sender=keys.alice.address,
        to=[keys.bob.address],
        bcc=[keys.carol.address],
        subject="large",
        text="The file is attached.\n",
        attachments=[Attachment("big.bin", blob, "application/octet-stream")],
    )
    outbox = tmp_path / "outbox.sqlite3"
    with Mailer(
        smtp=_settings(server),
        keystore=sender_store,
        outbox=outbox,
        protection=Protection(engine=engine),
    ) as mailer:
        result = mailer.send(message)
    assert sorted(result.accepted) == sorted([keys.bob.address, keys.carol.address])
    assert len(server.messages) == 2

    plaintexts = []
    for received in server.messages:
        check_wire_safe(received.data)
        head, (version_part, encrypted_part) = multipart_parts(received.data)
        assert header_value(head, "Content-Type").startswith("multipart/encrypted;")
        assert part_body(version_part).strip() == b"Version: 1"
        armored = part_body(encrypted_part)
        assert armored.startswith(b"-----BEGIN PGP MESSAGE-----\r\n")
        assert armored.endswith(b"-----END PGP MESSAGE-----\r\n")
        plaintext, status = gpg_decrypt(recipients_home, armored)
        assert "DECRYPTION_OKAY" in status
        assert f"VALIDSIG {keys.alice.fingerprint}" in status
        content, lines = _attachment_of(plaintext)
        assert content == blob
        assert all(len(line) == 76 for line in lines[:-1]) and 0 < len(lines[-1]) <= 76
        plaintexts.append(plaintext)
        if received.rcpt_tos == (keys.bob.address,):
            # The armor written block by block into the spool: the SOP tools read it too.
            for tool in ("sqop", "gosop"):
                sop_plain, verified = sop_decrypt(
                    tool, armored, keys.bob.secret, keys.alice.cert, tmp_path
                )
                # Debian 12's gosop writes every decrypted CRLF as LF (as in the interop
                # tests); the bytes are otherwise identical.
                expected = plaintext.replace(b"\r\n", b"\n") if tool == "gosop" else plaintext
                assert sop_plain == expected, tool
                assert keys.alice.fingerprint[-16:].lower() in verified.lower(), tool
    assert plaintexts[0] == plaintexts[1]
    with Outbox(outbox) as box:
        assert len(box) == 0
    with sqlite3.connect(outbox) as db:
        assert db.execute("SELECT count(*) FROM bodies").fetchone() == (0,)


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_large_attachment_signed_only_verifies(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    blob: bytes,
    tmp_path: Path,
    engine: str,
) -> None:
    """Signed only (the message assembled in one piece around the payload; with the GnuPG
    engine in a spool): gpg verifies the signed part cut out of the received bytes, and it
    carries the attachment unchanged."""
    server = smtp_server(tls="implicit")
    message = Message(
        sender=keys.alice.address,
        to=[keys.bob.address],
        subject="large, signed",
        text="Signed, not sealed.\n",
        attachments=[Attachment("big.bin", blob, "application/octet-stream")],
    )
    protection = Protection(sign=True, encrypt=False, engine=engine)
    with Mailer(smtp=_settings(server), keystore=sender_store, protection=protection) as mailer:
        (copy,) = mailer.protect(message)
        assert copy.spooled  # both engines write a large signed entity into a spool
        mailer.send(message)
    (received,) = server.messages
    head, (signed, signature_part) = multipart_parts(received.data)
    assert header_value(head, "Content-Type").startswith("multipart/signed;")
    signature = part_body(signature_part)
    assert gpg_verify(recipients_home, signature, signed, tmp_path) == keys.alice.fingerprint
    content, _ = _attachment_of(signed)
    assert content == blob


def test_stream_payload_is_build_payload_for_a_large_attachment(blob: bytes) -> None:
    """The streamed payload (attachment base64-encoded block by block) is exactly the bytes
    of build_payload, every time it is iterated, and its base64 body is the standard library's
    encoding with CRLF line ends."""
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        attachments=[Attachment("big.bin", blob)],
    ).finalized()
    stream = stream_payload(message, hp=None)
    first = b"".join(stream)
    assert b"".join(stream) == first == bytes(stream)
    assert len(stream) == len(first)
    assert max(len(chunk) for chunk in stream) < 1_000_000
    expected = base64.encodebytes(blob).replace(b"\n", b"\r\n").removesuffix(b"\r\n")
    assert expected in first
    # build_payload chooses new boundaries; the rest is the same.
    other = build_payload(message, hp=None)
    assert re.sub(rb"=_e2email_\w+", b"B", other) == re.sub(rb"=_e2email_\w+", b"B", first)


def test_outbox_keeps_a_large_copy_exactly(tmp_path: Path, blob: bytes) -> None:
    """A copy over the inline limit is stored in the outbox's bodies table and comes back
    byte for byte when claimed, also after its state was updated (a retry); its reported size
    is its length; it leaves with its item."""
    raw = b"Subject: big\r\n\r\n" + base64.encodebytes(blob).replace(b"\n", b"\r\n")
    with Outbox(tmp_path / "o.sqlite3") as box:
        (item_id,) = box.add(
            [NewItem(raw=raw, mail_from="a@example.org", recipients=("b@example.net",),
                     message_id="m@example.org")],
            claim=False,
        )  # fmt: skip
        (claimed,) = box.claim([item_id])
        assert claimed.raw == raw and claimed.size == len(raw)
        assert not box.settle(item_id, pending={"b@example.net": None}, release=True)
        (again,) = box.claim([item_id])
        assert again.raw == raw
        assert box.settle(item_id, delivered={"b@example.net": None})
        assert len(box) == 0
    with sqlite3.connect(tmp_path / "o.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM bodies").fetchone() == (0,)


def test_data_with_dot_lines_across_pieces_arrives_intact(smtp_server: ServerFactory) -> None:
    """DATA is written in pieces: a 3 MB message made only of lines that start with "." (so
    every piece starts with one) arrives byte for byte, and the bytes on the wire are exactly
    the RFC 5321 §4.5.2 dot-stuffed message plus the end-of-data line."""
    lines = [b".", b"..", b".x" * 30, b". " + b"y" * 70, b"...z", b"." + b"w" * 997]
    body = b"\r\n".join(lines[i % len(lines)] for i in range(30_000))
    raw = b"Subject: dots\r\n\r\n" + body + b"\r\n"
    assert len(raw) > 3_000_000
    server = smtp_server(tls="implicit")
    asyncio.run(
        SMTPTransport(_settings(server)).send(
            raw, mail_from="alice@example.org", recipients=["bob@example.net"]
        )
    )
    assert [m.data for m in server.messages] == [raw]
    wire = b"".join(data for _tls, data in server.transcript)
    stuffed = re.sub(rb"(?m)^\.", b"..", raw)
    assert wire.count(b"DATA\r\n") == 1
    assert wire.split(b"DATA\r\n", 1)[1] == stuffed + b".\r\nQUIT\r\n"


def test_armor_conversion_in_pieces_equals_converting_the_whole(tmp_path: Path) -> None:
    """gpg's output, converted to CRLF piece by piece as it arrives, is what converting it
    whole gives however it is cut (a CRLF split between two pieces included), and trailing
    line ends become exactly one CRLF, in memory and in a spool file."""
    text = (
        b"-----BEGIN PGP MESSAGE-----\n\nab\r\ncd\nef\r\n\r\n=xy\n-----END PGP MESSAGE-----\n\r\n"
    )
    expected = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts.append([text[i : i + 1] for i in range(len(text))])
    for n, pieces in enumerate(cuts):
        out = Spool(tmp_path / "spool", memory_max=(0, 20, 1000)[n % 3])
        out.write(b"head\r\n")
        writer = openpgp._ArmorWriter(out)
        for piece in [*pieces, b""]:  # python-gnupg ends with an empty piece
            assert writer(piece) is False  # not kept again in python-gnupg's result
        writer.finish()
        assert out.getvalue() == b"head\r\n" + expected, pieces
        assert out.in_memory is (n % 3 == 2), n


def test_key_id_check_decodes_only_the_first_packets() -> None:
    """The check of gpg's output (session keys, integrity-protected data) decodes only the
    first armor lines: it works on a view of a large buffer whose later lines are not even
    base64, and still refuses output whose first packets are wrong."""
    key_id = "0123456789ABCDEF"
    pkesk_body = bytes([3]) + bytes.fromhex(key_id) + bytes([1]) + b"\x00" * 300
    pkesk = bytes([0xC1, 0xFF]) + len(pkesk_body).to_bytes(4, "big") + pkesk_body
    seipd = bytes([0xD2, 0xEA]) + b"\x01" + os.urandom(6000)  # partial body length
    encoded = base64.b64encode(pkesk + seipd).decode()
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    bulk = ["!" * 64] * 50_000  # 3 MB that would not decode
    armored = "\r\n".join(["-----BEGIN PGP MESSAGE-----", "", *lines, *bulk, "=abcd"])
    data = (armored + "\r\n-----END PGP MESSAGE-----\r\n").encode()
    with memoryview(data) as view:
        assert openpgp.encrypted_to_key_ids(view) == ([key_id], 18)
    sed = base64.b64encode(pkesk + bytes([0xC9, 4]) + b"abcd").decode()
    with pytest.raises(CryptoError, match="integrity"):
        openpgp._check_encrypted(
            f"-----BEGIN PGP MESSAGE-----\n\n{sed}\n-----END PGP MESSAGE-----\n".encode(), []
        )


def test_gpg_failing_early_on_a_large_payload_is_a_crypto_error(
    keys: Keys, sender_store: Keystore
) -> None:
    """gpg refusing to start (here: a recipient key it does not have) while a large payload
    is being piped to it: a CryptoError with gpg's own reason, not a broken pipe."""
    bob = sender_store.get(keys.bob.fingerprint)
    assert bob is not None
    unknown = dataclasses.replace(
        bob,
        primary=dataclasses.replace(bob.primary, fingerprint="0" * 40),
        subkeys=tuple(dataclasses.replace(s, fingerprint="1" * 40) for s in bob.subkeys),
    )
    payload = [b"Content-Type: text/plain\r\n\r\n", *[b"x" * 76 + b"\r\n"] * 100_000]
    with pytest.raises(CryptoError, match="No public key"):
        openpgp.encrypt(sender_store, payload, recipients=[unknown])


def test_a_payload_that_cannot_be_read_to_the_end_is_never_encrypted(
    keys: Keys, sender_store: Keystore
) -> None:
    """A payload whose pieces fail part way (gpg then sees a short input and encrypts it):
    CryptoError, never a truncated message."""
    bob = sender_store.get(keys.bob.fingerprint)
    assert bob is not None

    def pieces() -> Iterator[bytes]:
        yield b"Content-Type: text/plain\r\n\r\n"
        yield b"x" * 76 + b"\r\n"
        raise OSError("the disk went away")

    with pytest.raises(CryptoError, match="could not pass the message to gpg"):
        openpgp.encrypt(sender_store, pieces(), recipients=[bob])


# -- No compression of what is encrypted (issue 9 part 5) ----------------------------------------


def _packets(home: Path, armored: bytes) -> str:
    """``gpg --list-packets`` of an encrypted message, decrypting it with ``home``'s keys: the
    packets inside the encryption are listed too."""
    done = run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
         "", "--list-packets"],
        input=armored,
    )  # fmt: skip
    return done.stdout.decode(errors="replace")


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_encrypted_attachments_are_not_compressed(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    recipients_home: Path,
    tmp_path: Path,
    engine: str,
) -> None:
    """A message with zip, jpeg and pdf attachments, signed and encrypted with either engine:
    the received ciphertext holds no Compressed Data packet (RFC 9580 §5.6, tag 8; gpg's
    default is ZIP), only the literal data inside the encryption; gpg and sqop decrypt it and
    verify Alice's signature, and the attachments come back unchanged."""
    files = {
        "a.zip": b"PK\x03\x04" + os.urandom(150_000),
        "b.jpg": b"\xff\xd8\xff\xe0" + os.urandom(150_000),
        "c.pdf": b"%PDF-1.7\n" + os.urandom(150_000),
    }
    server = smtp_server(tls="implicit")
    message = Message(
        sender=keys.alice.address,
        to=[keys.bob.address],
        subject="compressed already",
        text="Three files, already compressed.\n" * 50,
        attachments=[Attachment.from_path(_write(tmp_path, n, d)) for n, d in files.items()],
    )
    protection = Protection(sign=True, encrypt=True, engine=engine)
    with Mailer(smtp=_settings(server), keystore=sender_store, protection=protection) as mailer:
        mailer.send(message)
    (received,) = server.messages
    _head, (_version, encrypted_part) = multipart_parts(received.data)
    armored = part_body(encrypted_part)
    packets = _packets(recipients_home, armored)
    assert ":literal data packet:" in packets  # the listing did look inside the encryption
    assert ":compressed packet:" not in packets
    plaintext, status = gpg_decrypt(recipients_home, armored)
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    sop_plain, verifications = sop_decrypt(
        "sqop", armored, keys.bob.secret, keys.alice.cert, tmp_path
    )
    assert sop_plain == plaintext
    assert keys.alice.fingerprint[-16:].lower() in verifications.lower()
    parsed = email.message_from_bytes(plaintext, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    got = {p.get_filename(): p.get_payload(decode=True) for p in parsed.iter_attachments()}
    assert got == files


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# -- Attachment.from_path reads the file as the payload is produced (issue 9 part 5) -------------


def test_from_path_reads_the_file_block_by_block_as_the_payload_is_produced(
    tmp_path: Path, blob: bytes
) -> None:
    """Attaching a 6 MB file allocates next to nothing (the file is not read then); producing
    the payload reads it block by block, never holding it whole (peak well under its size),
    and gives exactly the bytes of the same attachment held in memory."""
    path = _write(tmp_path, "big.bin", blob)
    tracemalloc.start()
    try:
        attachment = Attachment.from_path(path)
        made, _ = tracemalloc.get_traced_memory()
        assert made < 1_000_000  # (the MIME type table, loaded on first use) not the 6 MB
        assert attachment.size == len(blob)
        message = Message(
            sender="alice@example.org", to=["bob@example.net"], attachments=[attachment]
        ).finalized()
        stream = stream_payload(message, hp=None)
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        total = sum(len(chunk) for chunk in stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == len(stream)
    assert peak - before < 3_000_000  # a block and its base64 lines, not the 6 MB file
    in_memory = dataclasses.replace(message, attachments=[Attachment("big.bin", blob)])
    held = build_payload(in_memory, hp=None)  # new boundaries; the rest is the same
    boundary = rb"=_e2email_\w+"
    assert re.sub(boundary, b"B", bytes(stream)) == re.sub(boundary, b"B", held)
    assert attachment.content == blob
    assert "bytes>" in repr(attachment) and len(repr(attachment)) < 200


def _changes() -> list[tuple[str, Callable[[Path], None]]]:
    def append(path: Path) -> None:
        with path.open("ab") as file:
            file.write(b"more")

    def truncate(path: Path) -> None:
        os.truncate(path, 1_000_000)

    def rewrite_same_size(path: Path) -> None:
        info = path.stat()
        with path.open("r+b") as file:
            file.write(b"changed")
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))

    return [("append", append), ("truncate", truncate), ("rewrite", rewrite_same_size)]


@pytest.mark.parametrize(("how", "change"), _changes(), ids=[name for name, _ in _changes()])
def test_a_file_changed_while_the_payload_is_read_is_refused(
    tmp_path: Path, blob: bytes, how: str, change: Callable[[Path], None]
) -> None:
    """The file changes after its first blocks were read (appended to, truncated, rewritten
    in place): MessageError naming the file, never a payload half old, half new;
    the same change before the payload is produced is refused too."""
    path = _write(tmp_path, "big.bin", blob)
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        attachments=[Attachment.from_path(path)],
    ).finalized()
    read = 0

    def consume() -> None:
        nonlocal read
        changed = False
        for chunk in stream_payload(message, hp=None):
            read += len(chunk)
            if read > 1_000_000 and not changed:
                change(path)
                changed = True

    with pytest.raises(MessageError, match=r"big\.bin changed after it was attached"):
        consume()
    assert read < len(stream_payload(message, hp=None))
    with pytest.raises(MessageError, match="changed after it was attached"):
        build_payload(message, hp=None)


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_a_file_changed_before_the_send_is_refused_and_nothing_is_sent(
    keys: Keys,
    sender_store: Keystore,
    smtp_server: ServerFactory,
    tmp_path: Path,
    engine: str,
) -> None:
    """Attached, then appended to before the message is sent (signed and encrypted, with the
    outbox): the send fails with the MessageError naming the file (with the gpg engine it is
    raised while the payload is piped to gpg), nothing reaches the server, the outbox is
    empty; attached again, the changed file is sent."""
    path = _write(tmp_path, "report.pdf", b"%PDF-1.7\n" + os.urandom(700_000))
    server = smtp_server(tls="implicit")
    protection = Protection(sign=True, encrypt=True, engine=engine)
    outbox = tmp_path / "outbox.sqlite3"

    def message() -> Message:
        return Message(
            sender=keys.alice.address,
            to=[keys.bob.address],
            subject="report",
            text="Attached.\n",
            attachments=[Attachment.from_path(path)],
        )

    stale = message()
    with path.open("ab") as file:
        file.write(b"%%EOF\n")
    with Mailer(
        smtp=_settings(server), keystore=sender_store, protection=protection, outbox=outbox
    ) as mailer:
        with pytest.raises(MessageError, match=r"report\.pdf changed after it was attached"):
            mailer.send(stale)
        assert server.messages == []
        with Outbox(outbox) as box:
            assert len(box) == 0
        mailer.send(message())
    assert len(server.messages) == 1


def test_a_file_replaced_while_it_is_read_gives_the_old_bytes_then_is_refused(
    tmp_path: Path, blob: bytes
) -> None:
    """A new file put in the attached file's place while it is being read: the open file is
    still the one attached, so this payload is the attached bytes, whole; the next one (e.g.
    a Bcc copy's) is refused, since the name now holds another file."""
    path = _write(tmp_path, "big.bin", blob)
    message = Message(
        sender="alice@example.org",
        to=["bob@example.net"],
        attachments=[Attachment("big.bin", blob)],
    ).finalized()
    lazy = dataclasses.replace(message, attachments=[Attachment.from_path(path)])
    chunks: list[bytes] = []
    for chunk in stream_payload(lazy, hp=None):
        if sum(map(len, chunks)) > 1_000_000 and not path.with_suffix(".new").exists():
            new = path.with_suffix(".new")
            new.write_bytes(os.urandom(len(blob)))
            os.link(path, new.with_suffix(".old"))  # kept, so no inode number is reused
            os.replace(new, path)
            new.touch()
        chunks.append(chunk)
    boundary = rb"=_e2email_\w+"
    expected = re.sub(boundary, b"B", build_payload(message, hp=None))
    assert re.sub(boundary, b"B", b"".join(chunks)) == expected
    with pytest.raises(MessageError, match="changed after it was attached"):
        build_payload(lazy, hp=None)


# -- S/MIME holds one copy of a large message (issue 9 part 5) -----------------------------------


def test_large_smime_message_is_built_holding_the_message_about_once(
    pki: PKI, smime_store: CertStore, smtp_server: ServerFactory, tmp_path: Path, blob: bytes
) -> None:
    """A 6 MB file attached by path, S/MIME signed then encrypted: the Python memory protection
    takes beyond the message it returns is under twice the message: the signed entity (the
    payload streamed into it, its only copy) and the CMS blob while it is base64-encoded block
    by block into the returned buffer (before: 4x, from the payload, its line-end check copy,
    the signed join, three base64 copies and the outer join). What arrives decrypts and
    verifies with openssl and carries the file."""
    path = _write(tmp_path, "big.bin", blob)
    message = Message(
        sender=pki.alice.address,
        to=[pki.bob.address],
        subject="large S/MIME",
        text="The file is attached.\n",
        attachments=[Attachment.from_path(path)],
    )
    protection = Protection(scheme=Scheme.SMIME)
    protector = SMIMEProtector(smime_store)
    final = message.finalized()
    tracemalloc.start()
    try:
        (copy,) = asyncio.run(protector.protect(final, protection))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    wire = len(copy.raw)
    assert wire > 8_000_000
    assert peak - current < 2 * wire  # 1.65x here; 4x before
    server = smtp_server(tls="implicit")
    with Mailer(
        smtp=_settings(server),
        keystore=Keystore(smime_store.home),
        certstore=smime_store,
        protection=protection,
    ) as mailer:
        mailer.send(message)
    (received,) = server.messages
    entity = openssl_decrypt(received.data, pki.bob, tmp_path)
    assert entity is not None
    assert openssl_verify(entity, pki.root_pem, tmp_path) == pki.alice.cert_pem.read_bytes()
    signed, _signature = smime.parse_multipart_signed(entity)
    content, _ = _attachment_of(signed)
    assert content == blob
