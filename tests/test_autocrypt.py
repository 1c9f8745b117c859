"""Autocrypt Level 1 (issue 10): the sender's header parses by the spec and its keydata is the
sender's minimal key; gossip names only the recipients it is given; received mail teaches
peers' keys by the peer-state rules (the latest message wins, older ones never replace),
gossip only from inside encrypted mail; ``keys import --autocrypt``, ``keys list`` sources,
``keys accept``."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from fixtures_pgp import Keys
from pgp_helpers import TestKey, generate_key, gpg, kill_agent, new_gnupg_home

from e2email.discovery.autocrypt import (
    autocrypt_header,
    gossip_headers,
    learn_from_message,
    parse_autocrypt,
)
from e2email.keysources import SourceKind
from e2email.keystore import Keystore, OpenPGPKey


@pytest.fixture
def alice_store(tmp_path: Path, keys: Keys) -> Iterator[Keystore]:
    store = Keystore(tmp_path / "home")
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    yield store
    store.shutdown_agent()


@pytest.fixture(scope="module")
def bob2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestKey]:
    """A second key for bob@example.net (a peer who made a new key)."""
    factory = new_gnupg_home("e2af")
    out = tmp_path_factory.mktemp("bob2")
    yield generate_key(factory, out, "bob@example.net")
    kill_agent(factory)


def _key(store: Keystore, fpr: str) -> OpenPGPKey:
    key = store.get(fpr)
    assert key is not None
    return key


def _packets(home: Path, data: bytes) -> list[str]:
    out = gpg(home, "--list-packets", input=data).stdout.decode()
    return [line.split(":")[1] for line in out.splitlines() if line.startswith(":")]


def test_autocrypt_header_parses_by_the_spec_and_imports_as_the_senders_key(
    alice_store: Keystore, keys: Keys, tmp_path: Path
) -> None:
    alice = _key(alice_store, keys.alice.fingerprint)
    value = autocrypt_header(alice_store, alice, "alice@example.org", prefer_encrypt=True)
    field = f"Autocrypt: {value}"
    lines = field.split("\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])  # folded
    assert len(field.encode()) <= 10 * 1024
    attrs = [a.strip().split("=", 1)[0] for a in value.split(";")]
    assert attrs == ["addr", "prefer-encrypt", "keydata"]  # keydata last
    parsed = parse_autocrypt(value)
    assert parsed is not None
    assert parsed.addr == "alice@example.org"
    assert parsed.prefer_encrypt == "mutual"
    # The keydata is the minimal key: primary, one user ID, one subkey and their signatures.
    home = new_gnupg_home("e2ai")
    try:
        assert _packets(home, parsed.keydata) == [
            "public key packet",
            "user ID packet",
            "signature packet",
            "public sub key packet",
            "signature packet",
        ]
        gpg(home, "--import", input=parsed.keydata)
        listing = gpg(home, "--with-colons", "--list-keys").stdout.decode()
        fprs = re.findall(r"^fpr:+([0-9A-F]{40}):", listing, re.M)
        assert fprs[0] == keys.alice.fingerprint
        assert [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("uid")] == [
            ln for ln in [_uid(alice)]
        ]
        sub = alice.encryption_subkey()
        assert sub is not None and fprs[1:] == [sub.fingerprint]
    finally:
        kill_agent(home)
    no_pref = autocrypt_header(alice_store, alice, "alice@example.org")
    assert "prefer-encrypt" not in no_pref


def _uid(key: OpenPGPKey) -> str:
    return next(u.text for u in key.user_ids if u.address == "alice@example.org")


def test_parse_refuses_invalid_headers() -> None:
    good = "addr=a@x.org; keydata=" + base64.b64encode(b"x").decode()
    assert parse_autocrypt(good) is not None
    assert parse_autocrypt(good + "; _extra=1") is not None  # unknown, non-critical
    assert parse_autocrypt(good + "; critical=1") is None
    assert parse_autocrypt("addr=a@x.org") is None
    assert parse_autocrypt("keydata=AAAA") is None


def test_gossip_names_exactly_the_recipients_given(sender_store: Keystore, keys: Keys) -> None:
    to_cc = {
        "bob@example.net": _key(sender_store, keys.bob.fingerprint),
        "carol@example.com": _key(sender_store, keys.carol.fingerprint),
    }
    headers = gossip_headers(sender_store, to_cc)
    assert [name for name, _ in headers] == ["Autocrypt-Gossip"] * 2
    parsed = [parse_autocrypt(v) for _, v in headers]
    assert [p.addr for p in parsed if p] == ["bob@example.net", "carol@example.com"]
    # dave (a Bcc recipient the caller does not pass) is never named, in any form.
    assert all("dave" not in v for _, v in headers)
    # One recipient: nothing to gossip (a Bcc copy is one recipient, too).
    assert gossip_headers(sender_store, {"bob@example.net": to_cc["bob@example.net"]}) == []


def _mail(
    sender: str, autocrypt: str | None, date: datetime, *, to: str = "alice@example.org"
) -> bytes:
    head = [f"From: Peer <{sender}>", f"To: {to}", f"Date: {format_datetime(date)}", "Subject: hi"]
    if autocrypt is not None:
        head.append(f"Autocrypt: {autocrypt}")
    return ("\r\n".join(head) + "\r\n\r\nhello\r\n").encode()


def _header_for(store: Keystore, cert: Path, address: str) -> str:
    """An Autocrypt header as the peer's client would send it (made from their public key)."""
    summary = store.import_file(cert)
    value = autocrypt_header(store, _key(store, summary.fingerprints[0]), address)
    return value


def test_received_autocrypt_latest_message_wins(
    alice_store: Keystore, keys: Keys, bob2: TestKey, tmp_path: Path
) -> None:
    maker = Keystore(tmp_path / "maker")
    old_header = _header_for(maker, keys.bob.cert, "bob@example.net")
    new_header = _header_for(maker, bob2.cert, "bob@example.net")
    now = datetime.now(UTC)
    first = learn_from_message(
        alice_store, _mail("bob@example.net", old_header, now - timedelta(days=2)), origin="m1"
    )
    assert [(x.outcome, x.fingerprint) for x in first] == [("imported", keys.bob.fingerprint)]
    source = alice_store.source_of(_key(alice_store, keys.bob.fingerprint))
    assert source is not None and source.kind is SourceKind.AUTOCRYPT
    # A newer message with a new key: the latest wins (over an earlier Autocrypt key).
    second = learn_from_message(
        alice_store, _mail("bob@example.net", new_header, now - timedelta(days=1)), origin="m2"
    )
    assert [x.outcome for x in second] == ["imported"]
    assert getattr(alice_store.encryption_key("bob@example.net"), "fingerprint", None) == (
        bob2.fingerprint
    )
    # An older message (its Date before the last seen) replaces nothing.
    third = learn_from_message(
        alice_store, _mail("bob@example.net", old_header, now - timedelta(days=3)), origin="m3"
    )
    assert [x.outcome for x in third] == ["older"]
    assert getattr(alice_store.encryption_key("bob@example.net"), "fingerprint", None) == (
        bob2.fingerprint
    )


def test_received_autocrypt_header_counts_only_for_the_from_address(
    alice_store: Keystore, keys: Keys, tmp_path: Path
) -> None:
    maker = Keystore(tmp_path / "maker")
    carol_header = _header_for(maker, keys.carol.cert, "carol@example.com")
    learnt = learn_from_message(
        alice_store, _mail("bob@example.net", carol_header, datetime.now(UTC)), origin="m"
    )
    assert [x.outcome for x in learnt] == ["none"]
    assert alice_store.find("carol@example.com") == ()


def test_an_autocrypt_key_never_replaces_a_key_from_elsewhere(
    alice_store: Keystore, keys: Keys, bob2: TestKey, tmp_path: Path
) -> None:
    alice_store.import_file(keys.bob.cert)  # bob's key, handed over as a file
    maker = Keystore(tmp_path / "maker")
    header = _header_for(maker, bob2.cert, "bob@example.net")
    learnt = learn_from_message(
        alice_store, _mail("bob@example.net", header, datetime.now(UTC)), origin="m"
    )
    assert [x.outcome for x in learnt] == ["refused"]
    assert keys.bob.fingerprint in learnt[0].detail and bob2.fingerprint in learnt[0].detail
    assert alice_store.get(bob2.fingerprint) is None
    assert getattr(alice_store.encryption_key("bob@example.net"), "fingerprint", None) == (
        keys.bob.fingerprint
    )


def test_gossip_is_read_only_inside_encrypted_mail_and_only_for_its_recipients(
    alice_store: Keystore, keys: Keys, tmp_path: Path
) -> None:
    maker = Keystore(tmp_path / "maker")
    carol = _header_for(maker, keys.carol.cert, "carol@example.com")
    dave = _header_for(maker, keys.dave.cert, "dave@example.com")
    inner = (
        "Content-Type: text/plain; charset=utf-8\r\n"
        "To: alice@example.org, carol@example.com\r\n"
        f"Autocrypt-Gossip: {carol}\r\n"
        f"Autocrypt-Gossip: {dave}\r\n"  # dave is not a recipient: ignored
        "\r\nhello\r\n"
    ).encode()
    # In clear, gossip teaches nothing.
    clear = _mail("bob@example.net", None, datetime.now(UTC), to="carol@example.com").replace(
        b"Subject: hi\r\n", f"Subject: hi\r\nAutocrypt-Gossip: {carol}\r\n".encode()
    )
    assert all(not x.gossip for x in learn_from_message(alice_store, clear, origin="clear"))
    assert alice_store.find("carol@example.com") == ()
    outer = _encrypted_mail(alice_store, keys.alice.fingerprint, inner, keys.bob)
    learnt = learn_from_message(alice_store, outer, origin="enc")
    gossip = [x for x in learnt if x.gossip]
    assert [(x.address, x.outcome) for x in gossip] == [("carol@example.com", "imported")]
    key = _key(alice_store, keys.carol.fingerprint)
    source = alice_store.source_of(key)
    assert source is not None and source.kind is SourceKind.GOSSIP
    assert alice_store.find("dave@example.com") == ()


def _encrypted_mail(store: Keystore, to_fpr: str, inner: bytes, signer: TestKey) -> bytes:
    """A PGP/MIME encrypted message (RFC 3156 §4) from bob whose inside is ``inner``, signed
    then encrypted by ``signer`` (gossip counts only from mail signed by the From address's
    key, which ``store`` is given)."""
    assert signer.secret
    store.import_file(signer.cert)
    home = new_gnupg_home("e2as")
    try:
        gpg(home, "--import", str(signer.secret))
        gpg(home, "--import", "-", input=gpg(store.gnupg_home, "--export", to_fpr).stdout)
        armored = gpg(
            home, "--trust-model", "always", "--armor", "--sign", "-u", signer.fingerprint,
            "--encrypt", "-r", to_fpr, input=inner,
        ).stdout  # fmt: skip
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    boundary = "b1"
    return (
        "From: bob@example.net\r\nTo: alice@example.org, carol@example.com\r\n"
        "Date: " + format_datetime(datetime.now(UTC)) + "\r\nSubject: ...\r\n"
        f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        f'boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        + armored.decode()
        + f"\r\n--{boundary}--\r\n"
    ).encode()


def test_a_peers_own_header_replaces_a_gossip_key(
    alice_store: Keystore, keys: Keys, bob2: TestKey, tmp_path: Path
) -> None:
    maker = Keystore(tmp_path / "maker")
    gossip = _header_for(maker, keys.bob.cert, "bob@example.net")
    inner = (
        "Content-Type: text/plain\r\nTo: alice@example.org, bob@example.net\r\n"
        f"Autocrypt-Gossip: {gossip}\r\n\r\nhi\r\n"
    ).encode()
    mail = (
        _encrypted_mail(alice_store, keys.alice.fingerprint, inner, keys.carol)
        .replace(b"From: bob@example.net", b"From: carol@example.com")
        .replace(
            b"To: alice@example.org, carol@example.com", b"To: alice@example.org, bob@example.net"
        )
    )
    learnt = learn_from_message(alice_store, mail, origin="gossip")
    assert [(x.address, x.outcome, x.gossip) for x in learnt if x.gossip] == [
        ("bob@example.net", "imported", True)
    ]
    own = _header_for(maker, bob2.cert, "bob@example.net")
    learnt = learn_from_message(
        alice_store, _mail("bob@example.net", own, datetime.now(UTC)), origin="own"
    )
    assert [x.outcome for x in learnt] == ["imported"]
    assert getattr(alice_store.encryption_key("bob@example.net"), "fingerprint", None) == (
        bob2.fingerprint
    )


def e2email(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "e2email", *args],
        capture_output=True,
        env={**os.environ, "E2EMAIL_HOME": str(home)},
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def test_cli_import_autocrypt_list_and_accept(keys: Keys, bob2: TestKey, tmp_path: Path) -> None:
    home = tmp_path / "clihome"
    maker = Keystore(tmp_path / "maker")
    now = datetime.now(UTC)
    maildir = tmp_path / "Maildir"
    (maildir / "cur").mkdir(parents=True)
    (maildir / "new").mkdir()
    (maildir / "cur" / "1").write_bytes(
        _mail("bob@example.net", _header_for(maker, keys.bob.cert, "bob@example.net"), now)
    )
    done = e2email("keys", "import", "--autocrypt", str(maildir), home=home)
    assert done.returncode == 0, done.stderr
    assert f"bob@example.net: Autocrypt key {keys.bob.fingerprint} imported" in done.stdout
    listed = e2email("keys", "list", home=home)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if keys.bob.fingerprint in line)
    assert "autocrypt" in row and f"{now:%Y-%m-%d}" in row
    # bob's hand-given file makes a second key: refused until one is accepted.
    assert e2email("keys", "import", str(bob2.cert), home=home).returncode == 0
    done = e2email("keys", "accept", "bob@example.net", bob2.fingerprint, home=home)
    assert done.returncode == 0, done.stderr
    listed = e2email("keys", "list", home=home)
    row = next(line for line in listed.stdout.splitlines() if bob2.fingerprint in line)
    assert "accepted for bob@example.net" in row
    bad = e2email("keys", "accept", "bob@example.net", "0" * 40, home=home)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_autocrypt_for_copy_applies_the_rules(sender_store: Keystore, keys: Keys) -> None:
    from e2email.discovery.autocrypt import autocrypt_for_copy

    alice = _key(sender_store, keys.alice.fingerprint)
    to_cc = {
        "bob@example.net": _key(sender_store, keys.bob.fingerprint),
        "carol@example.com": _key(sender_store, keys.carol.fingerprint),
    }
    common = {"sender": "alice@example.org", "sender_key": alice, "prefer_encrypt": True}
    outer, gossip = autocrypt_for_copy(
        sender_store, kind="main", to_cc_keys=to_cc, encrypted=True, **common
    )
    assert outer.startswith(b"Autocrypt: addr=alice@example.org; prefer-encrypt=mutual; keydata=")
    assert outer.endswith(b"\r\n") and b"Gossip" not in outer
    assert [parse_autocrypt(v).addr for _, v in gossip] == list(to_cc)  # type: ignore[union-attr]
    # A Bcc copy: the sender's header, no gossip at all.
    outer_bcc, gossip_bcc = autocrypt_for_copy(
        sender_store, kind="bcc", to_cc_keys=to_cc, encrypted=True, **common
    )
    assert outer_bcc == outer and gossip_bcc == []
    # Signed only: nothing to hide gossip in.
    assert (
        autocrypt_for_copy(sender_store, kind="main", to_cc_keys=to_cc, encrypted=False, **common)[
            1
        ]
        == []
    )
    # A sender key without encryption: no header, and no error.
    signonly = _key(sender_store, keys.signonly.fingerprint)
    assert (
        autocrypt_for_copy(
            sender_store,
            sender="signonly@example.com",
            sender_key=signonly,
            kind="main",
            to_cc_keys=to_cc,
            encrypted=True,
            prefer_encrypt=False,
        )[0]
        == b""
    )
