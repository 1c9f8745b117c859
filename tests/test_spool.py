"""A large protected copy is never held whole: it lives in a spool (e2email.spool), an unnamed
0600 file in e2email's home, that the outbox stores and DATA sends a piece at a time; nothing
of it outlives the copy or a failed protection (issue 9 part 5, the memory target).

The memory tests send to a server in another process, so that what it receives is not counted
by this process's tracemalloc, and compare Python's peak allocations with the copy's size.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import gc
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from fixtures_smime import PKI
from pgp_helpers import gpg_decrypt, multipart_parts, part_body

from e2email import Attachment, Mailer, Message, Protection, Scheme, SMTPSettings, TLSMode
from e2email.certstore import CertStore
from e2email.crypto import gpg as gpg_engine
from e2email.crypto import openpgp, sequoia, smime
from e2email.crypto.base import ProtectedCopy
from e2email.errors import CryptoError, MessageError
from e2email.keystore import Keystore
from e2email.message import HP, check_wire_safe, stream_payload
from e2email.outbox import NewItem, Outbox
from e2email.spool import Spool, spool_dir
from e2email.transport.smtp import _dot_stuffed

ROOT = Path(__file__).resolve().parents[1]
#: The attachment: over every piece size (spool reads, DATA pieces, blob pieces, armor blocks).
SIZE = 6_000_000


def _spool_fds(folder: Path) -> list[str]:
    """This process's open files in ``folder`` (an unnamed file shows as "folder/#n (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder) + "/"):
            found.append(target)
    return found


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spool") / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(scope="module")
def far_server() -> Iterator[tuple[SMTPSettings, Callable[[str], dict[str, Any]]]]:
    """The benchmarks' TLS SMTP server, in a process of its own: (settings, command)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "loopback_server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    info = json.loads(stdout.readline())

    def command(text: str) -> dict[str, Any]:
        stdin.write(text + "\n")
        stdin.flush()
        return dict(json.loads(stdout.readline()))

    settings = SMTPSettings(
        host=info["host"],
        port=info["port"],
        tls=TLSMode.IMPLICIT,
        ca_file=Path(info["ca_file"]),
        timeout=120,
    )
    try:
        yield settings, command
    finally:
        stdin.write("quit\n")
        stdin.flush()
        proc.wait(30)


# -- The spool itself -----------------------------------------------------------------------------


def test_a_small_spool_stays_in_memory_and_a_large_one_is_an_unnamed_private_file(
    tmp_path: Path,
) -> None:
    """Up to its memory limit a spool is plain bytes (and makes no folder); beyond, its bytes
    are in a 0600 file with no name (no entry in the 0700 folder, no link to it) that is gone
    when the spool is closed. Reads work from any offset, from several threads at once."""
    folder = tmp_path / "spool"
    small = Spool(folder, memory_max=100)
    small.write(b"x" * 100)
    assert small.in_memory and small.contents() == b"x" * 100
    assert not folder.exists()

    data = b"".join(b"line %d\r\n" % i for i in range(2000))
    big = Spool(folder, memory_max=100)
    for start in range(0, len(data), 333):
        big.write(data[start : start + 333])
    assert not big.in_memory and big.contents() is big
    assert len(big) == big.size == len(data)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert os.listdir(folder) == []
    (target,) = _spool_fds(folder)
    assert target.endswith("(deleted)")
    fd = next(
        int(n)
        for n in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{n}") and os.readlink(f"/proc/self/fd/{n}") == target
    )
    st = os.fstat(fd)
    assert st.st_mode & 0o777 == 0o600 and st.st_nlink == 0

    assert big.getvalue() == data
    assert b"".join(big.chunks(1000)) == data
    assert big.read(5000, 17) == data[5000:5017]
    assert big.endswith(b"line 1999\r\n") and not big.endswith(b"line 1998\r\n")
    results: list[bytes] = []
    readers = [
        threading.Thread(target=lambda: results.append(b"".join(big.chunks(777)))) for _ in range(4)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert results == [data] * 4

    big.truncate(len(data) - 11)
    big.write(b"the end\r\n")
    assert big.getvalue() == data[:-11] + b"the end\r\n"
    big.close()
    assert _spool_fds(folder) == []
    with pytest.raises(ValueError, match="closed"):
        big.read(0, 1)


def test_a_spool_that_cannot_have_its_file_stays_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder that cannot be made (a read-only home; here a file is in the way) or that
    group or others may write: the bytes stay in memory, as before spools, with a warning;
    nothing is written in the loose folder."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    for folder in (blocker / "spool", loose):
        spool = Spool(folder, memory_max=10)
        spool.write(b"x" * 100)
        assert spool.in_memory and spool.contents() == b"x" * 100
        assert str(folder) in caplog.text
    assert os.listdir(loose) == []


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_an_engine_without_a_spool_folder_makes_large_copies_in_memory(
    keys: Keys,
    sender_store: Keystore,
    recipients_home: Path,
    big_file: Path,
    tmp_path: Path,
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no usable spool folder a large copy is made in memory, as before spools, and
    decrypts as usual."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    monkeypatch.setattr(gpg_engine if engine == "gpg" else sequoia, "spool_dir", lambda h: blocker)
    with Mailer(keystore=sender_store, protection=Protection(engine=engine)) as mailer:
        (copy,) = mailer.protect(_big_message(keys.alice.address, keys.bob.address, None, big_file))
    assert not copy.spooled
    _head, (_version, encrypted) = multipart_parts(copy.raw)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    assert big_file.read_bytes() in _attachment(plaintext)


def test_data_and_the_wire_check_read_a_spool_as_they_read_bytes(tmp_path: Path) -> None:
    """DATA's dot-stuffed pieces of a spooled copy are those of the same bytes (a dot line
    at every possible place against the piece size), and the wire check finds the same
    problem at the same offset, reading the spool a piece at a time."""
    lines = [b".dot\r\n", b"plain\r\n", b"..two\r\n", b"x" * 70 + b"\r\n"]
    data = b"".join(lines[i % 4] for i in range(30000))
    spool = Spool(tmp_path / "spool", memory_max=0)
    spool.write(data)
    for size in (64, 100, 1000, 4096):
        assert b"".join(_dot_stuffed(spool, size)) == b"".join(_dot_stuffed(data, size))
    check_wire_safe(spool)
    bad = data[:150_000] + b"bare\nLF\r\n" + data[150_000:]
    bad_spool = Spool(tmp_path / "spool", memory_max=0)
    bad_spool.write(bad)
    with pytest.raises(MessageError) as from_bytes:
        check_wire_safe(bad)
    with pytest.raises(MessageError) as from_spool:
        check_wire_safe(bad_spool)
    assert str(from_spool.value) == str(from_bytes.value)
    assert "offset 150004" in str(from_spool.value)


def test_the_outbox_stores_a_spooled_copy_piece_by_piece(tmp_path: Path) -> None:
    """A spooled copy stored in the outbox comes back byte for byte (large: in the bodies
    table; small: inline); storing it allocates pieces, not the copy, and so does claiming
    it for a retry: a large body is copied back into a spool beside the outbox."""
    data = os.urandom(6_000_000)
    spool = Spool(tmp_path / "spool", memory_max=0)
    spool.write(data)
    small = Spool(tmp_path / "spool", memory_max=0)
    small.write(b"small copy\r\n")
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        tracemalloc.start()
        try:
            ids = box.add(
                [
                    NewItem(raw=spool, mail_from="a@example.org", recipients=("b@example.net",),
                            message_id="<1@example.org>"),
                    NewItem(raw=small, mail_from="a@example.org", recipients=("b@example.net",),
                            message_id="<2@example.org>"),
                ],
                claim=False,
            )  # fmt: skip
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000  # a piece or two, not the 6 MB copy
        tracemalloc.start()
        try:
            claimed = box.claim(ids)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000  # a retry reads the large copy back into a spool, piecewise
        got = {item.id: item.content for item in claimed}
        assert isinstance(got[ids[0]], Spool) and got[ids[1]] == b"small copy\r\n"
        assert {item.id: item.raw for item in claimed} == {
            ids[0]: data,
            ids[1]: b"small copy\r\n",
        }
        assert _spool_fds(tmp_path / "spool") != []
        del claimed, got
        gc.collect()


def test_a_copy_made_with_raw_bytes_or_a_spool_reads_the_same(tmp_path: Path) -> None:
    """ProtectedCopy is made with ``raw=`` as before (bytes or a spool); ``raw`` is the bytes
    either way, ``chunks()``/``size`` read them in pieces, and dataclasses.replace keeps them."""
    import dataclasses

    data = b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n"
    spool = Spool(tmp_path / "spool", memory_max=0)
    spool.write(data)
    for content in (data, spool):
        copy = ProtectedCopy(
            raw=content,
            mail_from="a@example.org",
            recipients=("b@example.net",),
            kind="main",
            message_id="<m@example.org>",
            signed=False,
        )
        assert copy.raw == data and copy.size == len(data)
        assert b"".join(copy.chunks(999)) == data
        assert copy.spooled is (content is spool)
        moved = dataclasses.replace(copy, mail_from="c@example.org")
        assert moved.content is copy.content and moved.mail_from == "c@example.org"
        assert "yyyy" not in repr(copy)


def test_armor_written_block_by_block_is_sequoias_armor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The armor e2email writes a block at a time (RFC 9580 §6.2) is byte for byte what
    Sequoia writes for the whole (CRLF line ends aside), whatever the data's length against
    the line and block sizes: base64 lines, and the CRC-24 combined from the blocks' CRCs as
    Sequoia computes them, or computed in Python; from bytes or from pieces of any size."""
    pysequoia = pytest.importorskip("pysequoia")
    monkeypatch.setattr(openpgp, "_ARMOR_BLOCK", 48 * 5)
    for size in (1, 47, 48, 239, 240, 241, 1000, 4803):
        data = os.urandom(size)
        expected = pysequoia.armor(data, pysequoia.ArmorKind.Message).replace("\n", "\r\n")
        assert openpgp.crc24(data) == openpgp.crc24_combine(
            openpgp.crc24(data[: size // 3]), openpgp.crc24(data[size // 3 :]), size - size // 3
        )
        for source in (data, [data[i : i + 100] for i in range(0, size, 100)]):
            for block_crc in (sequoia._armor_crc, None):
                out = Spool()
                openpgp.armor_into(out, source, block_crc=block_crc)
                assert out.getvalue() == expected.encode(), (size, block_crc)


# -- Engines: large copies are spooled, and nothing outlives them ------------------------------


def _big_message(sender: str, to: str, bcc: str | None, path: Path) -> Message:
    return Message(
        sender=sender,
        to=[to],
        bcc=[bcc] if bcc else [],
        subject="large",
        text="The file is attached.\n",
        attachments=[Attachment.from_path(path)],
    )


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_openpgp_copies_of_a_large_message_are_spooled_and_small_ones_are_bytes(
    keys: Keys, sender_store: Keystore, big_file: Path, engine: str
) -> None:
    """Each engine writes a large copy into an unnamed file in HOME/spool (two copies, To and
    Bcc: two files), a 4 KB one stays plain bytes (the throughput path is unchanged), and the
    files are gone with the copies."""
    folder = spool_dir(sender_store.home)
    protection = Protection(engine=engine)
    with Mailer(keystore=sender_store, protection=protection) as mailer:
        copies = mailer.protect(
            _big_message(keys.alice.address, keys.bob.address, keys.carol.address, big_file)
        )
        assert [c.spooled for c in copies] == [True, True]
        assert all(
            c.size > 8_000_000 and c.chunks().__next__().startswith(b"Date:") for c in copies
        )
        assert all(c.content.endswith(b"--\r\n") for c in copies)  # type: ignore[union-attr]
        assert len(_spool_fds(folder)) == 2 and os.listdir(folder) == []
        small = mailer.protect(
            Message(sender=keys.alice.address, to=[keys.bob.address], text="hi\n" * 1000)
        )
        assert [type(c.content) for c in small] == [bytes]
        del copies
        gc.collect()
        assert _spool_fds(folder) == []


@pytest.mark.parametrize("how", ["no /proc", "the pipe fails"])
def test_sequoia_without_streaming_still_spools_a_large_copy_that_decrypts(
    keys: Keys,
    sender_store: Keystore,
    recipients_home: Path,
    big_file: Path,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where Sequoia cannot stream between a pipe and a file (no /proc/self/fd, or the call
    failing), the large copy is made in memory and still armored into a spool: gpg decrypts
    it, with Alice's good signature, to the attachment."""
    if how == "no /proc":
        monkeypatch.setattr(sequoia, "_PROC_FD", Path("/nonexistent/fd"))
    else:

        def broken(*args: object) -> None:
            raise OSError("no pipes today")

        monkeypatch.setattr(sequoia, "_encrypt_through_pipe", broken)
    with Mailer(keystore=sender_store, protection=Protection(engine="sequoia")) as mailer:
        (copy,) = mailer.protect(_big_message(keys.alice.address, keys.bob.address, None, big_file))
    assert copy.spooled
    _head, (_version, encrypted) = multipart_parts(copy.raw)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    assert big_file.read_bytes() in _attachment(plaintext)


def test_a_payload_write_cut_short_is_never_encrypted_in_part(
    keys: Keys,
    sender_store: Keystore,
    recipients_home: Path,
    big_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feeding thread's one write(2) returning short (the process stopped and continued
    while it ran: Ctrl-Z, SIGSTOP, a debugger) ends Sequoia's input early: the part it read
    must not become the copy. The copy is made again in memory and decrypts, with Alice's
    good signature, to the whole attachment."""
    real_write = os.write
    cut: list[int] = []

    def short_write(fd: int, data: bytes) -> int:
        if threading.current_thread().name == "e2email-sequoia-feed":
            cut.append(len(data))
            return real_write(fd, memoryview(data)[: len(data) // 3])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_write)
    with Mailer(keystore=sender_store, protection=Protection(engine="sequoia")) as mailer:
        (copy,) = mailer.protect(_big_message(keys.alice.address, keys.bob.address, None, big_file))
    monkeypatch.undo()
    assert cut, "the payload did not go through the pipe"
    _head, (_version, encrypted) = multipart_parts(copy.raw)
    plaintext, status = gpg_decrypt(recipients_home, part_body(encrypted))
    assert f"VALIDSIG {keys.alice.fingerprint}" in status
    assert big_file.read_bytes() in _attachment(plaintext)


def test_sequoia_refusing_before_it_reads_the_pipe_ends_the_feeding_thread(
    tmp_path: Path,
) -> None:
    """Sequoia refusing before it reads its input (here: nobody to encrypt to), while a
    thread is blocked writing a large payload into the pipe: the refusal, as a CryptoError,
    and the thread ends (the pipe's reader is gone), no file left open."""
    pytest.importorskip("pysequoia")
    folder = tmp_path / "spool"
    with (
        pytest.raises(CryptoError, match="Sequoia could not encrypt"),
        sequoia._encrypted_binary(b"x" * 3_000_000, [], None, directory=folder),
    ):
        pass
    assert not [t for t in threading.enumerate() if t.name == "e2email-sequoia-feed"]
    assert _spool_fds(folder) == []


def _attachment(entity: bytes) -> bytes:
    parsed = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    (part,) = list(parsed.iter_attachments())
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return content


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_a_failed_openpgp_protection_keeps_no_spool(
    keys: Keys,
    sender_store: Keystore,
    big_file: Path,
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packet check refusing a large copy after its ciphertext was spooled: the error,
    and no file left open in the spool folder, even while the error (and its traceback, which
    references the spool) is kept."""
    folder = spool_dir(sender_store.home)

    def refuse(armored: object, subkeys: object) -> None:
        for _ in armored:  # type: ignore[attr-defined]
            pass  # read it, as the check does
        raise CryptoError("refused by the test")

    monkeypatch.setattr(openpgp if engine == "gpg" else sequoia, "_check_encrypted", refuse)
    with Mailer(keystore=sender_store, protection=Protection(engine=engine)) as mailer:
        with pytest.raises(CryptoError, match="refused by the test") as failure:
            mailer.protect(
                _big_message(keys.alice.address, keys.bob.address, keys.carol.address, big_file)
            )
        assert failure.value is not None
        assert _spool_fds(folder) == []


def test_a_failed_smime_protection_keeps_no_spool(
    pki: PKI, smime_store: CertStore, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second S/MIME copy failing after the first was spooled: no spool is left open."""
    folder = spool_dir(smime_store.home)
    calls = []
    check = smime._check_enveloped

    def second_fails(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise CryptoError("refused by the test")
        check(*args)

    monkeypatch.setattr(smime, "_check_enveloped", second_fails)
    protector = smime.SMIMEProtector(smime_store)
    message = _big_message(pki.alice.address, pki.bob.address, pki.carol.address, big_file)
    with pytest.raises(CryptoError, match="refused by the test") as failure:
        asyncio.run(protector.protect(message.finalized(), Protection(scheme=Scheme.SMIME)))
    assert failure.value is not None and len(calls) == 2
    assert _spool_fds(folder) == []


# -- Memory: protect, store and send hold pieces, not the copy ---------------------------------


def _peak_while(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


@pytest.mark.parametrize("engine", ["gpg", "sequoia"])
def test_sending_a_large_openpgp_message_holds_pieces_not_the_copy(
    keys: Keys,
    sender_store: Keystore,
    big_file: Path,
    far_server: tuple[SMTPSettings, Callable[[str], dict[str, Any]]],
    tmp_path: Path,
    engine: str,
) -> None:
    """Protect, store in the outbox and send a message with a 6 MB file attached by path
    (an 8 MB copy): Python's peak allocations stay within a few pieces with the GnuPG engine
    (before: the whole copy, at least), and within the payload (which pysequoia takes whole)
    and a few pieces with Sequoia (before: the payload, the binary output, the armored output
    and its CRLF conversion)."""
    settings, command = far_server
    command("clear")
    message = _big_message(keys.alice.address, keys.bob.address, None, big_file)
    payload = len(stream_payload(message.finalized(), hp=HP.CIPHER, canonical=False))
    protection = Protection(engine=engine)
    with Mailer(
        smtp=settings, keystore=sender_store, outbox=tmp_path / "o.sqlite3", protection=protection
    ) as mailer:
        peak = _peak_while(lambda: mailer.send(message))
    stats = command("stats")
    assert stats["messages"] == 1 and stats["bytes"] > 8_000_000
    held = 0 if engine == "gpg" else payload
    # A few pieces: payload blocks and their base64, gpg's pipe pieces, DATA pieces and the
    # TLS buffers (about 3 MB whatever the size); the copy is 11 MB.
    assert peak < held + 4_000_000, (peak, stats["bytes"])  # before: 14 MB, 31 MB


def test_sending_a_large_smime_message_does_not_hold_its_base64(
    pki: PKI,
    smime_store: CertStore,
    big_file: Path,
    far_server: tuple[SMTPSettings, Callable[[str], dict[str, Any]]],
    tmp_path: Path,
) -> None:
    """S/MIME: a large copy is signed and encrypted piece by piece (``crypto/cms.py``) and its
    base64 is spooled: the peak stays at a few pieces, far below the signed entity (before:
    the signed entity and the CMS blob whole, plus the 11 MB base64 buffer)."""
    settings, command = far_server
    command("clear")
    message = _big_message(pki.alice.address, pki.bob.address, None, big_file)
    signed = len(stream_payload(message.finalized(), hp=HP.CIPHER))
    with Mailer(
        smtp=settings,
        keystore=Keystore(smime_store.home),
        certstore=smime_store,
        outbox=tmp_path / "o.sqlite3",
        protection=Protection(scheme=Scheme.SMIME),
    ) as mailer:
        peak = _peak_while(lambda: mailer.send(message))
    stats = command("stats")
    assert stats["messages"] == 1 and stats["bytes"] > 10_000_000
    assert peak < signed // 2, (peak, signed)  # 3.2 MB here; 19 MB with whole buffers, 30 MB before
