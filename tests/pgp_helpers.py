"""Test helpers for OpenPGP: key factories and independent verifiers (gpg, sqop, gosop).

Everything here works on raw bytes as a receiving MUA would: the MIME parts are cut out of the
received message by byte offsets, never re-serialised.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_KEYS = REPO / "keys"


def run(
    cmd: list[str], *, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(cmd, input=input, capture_output=True, timeout=120, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{cmd[0]} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    return done


def gpg(
    home: Path, *args: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    return run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--no-tty",
            "--yes",
            "--pinentry-mode",
            "loopback",
            *args,
        ],
        input=input,
        check=check,
    )


def new_gnupg_home(prefix: str = "e2t") -> Path:
    # Short paths: gpg-agent puts its socket in the home when /run/user/UID does not exist.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o700)
    return path


def kill_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False
    )


@dataclass(frozen=True)
class TestKey:
    """A key made for the tests: its address, fingerprint, public cert and secret key."""

    __test__ = False  # not a test class

    address: str
    fingerprint: str
    cert: Path  # armored public key
    secret: Path | None  # armored secret key (unprotected unless passphrase is set)
    passphrase: str | None = None


def generate_key(
    factory: Path,
    out: Path,
    address: str,
    *,
    key_type: str = "ed25519",
    passphrase: str | None = None,
    expire: str = "0",
    faked_time: str | None = None,
    encryption_subkey: bool = True,
    cert_digest: str | None = None,
) -> TestKey:
    """Generate a key in the factory GnuPG home and export it to files in ``out``."""
    if key_type == "ed25519":
        params = ["Key-Type: EDDSA", "Key-Curve: ed25519"]
        sub = ["Subkey-Type: ECDH", "Subkey-Curve: cv25519"]
    else:  # rsaNNNN
        bits = key_type[3:]
        params = ["Key-Type: RSA", f"Key-Length: {bits}"]
        sub = ["Subkey-Type: RSA", f"Subkey-Length: {bits}"]
    lines = [*params, "Key-Usage: sign"]
    if encryption_subkey:
        lines += [*sub, "Subkey-Usage: encrypt"]
    lines += [
        f"Name-Real: Test {address.split('@')[0].title()}",
        f"Name-Email: {address}",
        f"Expire-Date: {expire}",
        f"Passphrase: {passphrase}" if passphrase else "%no-protection",
        "%commit",
    ]
    extra = ["--faked-system-time", faked_time] if faked_time else []
    if cert_digest:
        extra += ["--cert-digest-algo", cert_digest]
    done = gpg(
        factory, *extra, "--status-fd", "1", "--gen-key", input=("\n".join(lines) + "\n").encode()
    )
    m = re.search(rb"KEY_CREATED \w ([0-9A-F]{40})", done.stdout)
    assert m, done.stdout
    fpr = m.group(1).decode()
    stem = address.split("@")[0]
    cert = out / f"{stem}.cert"
    cert.write_bytes(gpg(factory, "--armor", "--export", fpr).stdout)
    secret = out / f"{stem}.key"
    pw = ["--passphrase", passphrase] if passphrase else []
    secret.write_bytes(gpg(factory, *pw, "--armor", "--export-secret-keys", fpr).stdout)
    return TestKey(
        address=address, fingerprint=fpr, cert=cert, secret=secret, passphrase=passphrase
    )


def revoke(factory: Path, key: TestKey) -> TestKey:
    """Revoke ``key`` with the revocation certificate gpg made at generation time."""
    rev = (factory / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_text()
    # gpg puts a colon before the armor so the file cannot be imported by accident.
    rev = rev.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----"
    )
    gpg(factory, "--import", input=rev.encode())
    key.cert.write_bytes(gpg(factory, "--armor", "--export", key.fingerprint).stdout)
    return key


def demo_key(name: str, address: str) -> TestKey:
    home = new_gnupg_home()
    try:
        gpg(home, "--import", str(DEMO_KEYS / f"{name}.sec.asc"))
        out = gpg(home, "--with-colons", "--list-keys", address).stdout.decode()
        fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    return TestKey(
        address=address,
        fingerprint=fpr,
        cert=DEMO_KEYS / f"{name}.pub.asc",
        secret=DEMO_KEYS / f"{name}.sec.asc",
    )


# -- Cutting MIME by bytes ---------------------------------------------------------------------


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no header/body separator"
    return head + b"\r\n", body


def header_value(head: bytes, name: str) -> str:
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head).decode("ascii")
    for line in unfolded.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise KeyError(name)


def boundary_of(head: bytes) -> str:
    ctype = header_value(head, "Content-Type")
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    assert m, ctype
    return m.group(1)


def multipart_parts(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The entity's header block and its body parts, exactly as on the wire.

    Per RFC 2046 §5.1.1 the CRLF before each boundary delimiter belongs to the delimiter, so
    each part is the bytes between "--boundary CRLF" and the next "CRLF --boundary".
    """
    head, body = split_head(raw)
    delim = b"--" + boundary_of(head).encode()
    pieces = (b"\r\n" + body).split(b"\r\n" + delim)
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        assert piece.startswith(b"\r\n"), piece[:20]
        parts.append(piece[2:])
    return head, parts


def part_body(part: bytes) -> bytes:
    return split_head(part)[1]


# -- Independent verifiers ---------------------------------------------------------------------


def gpg_verify(home: Path, signature: bytes, signed: bytes, tmp: Path) -> str:
    """VALIDSIG fingerprint from ``gpg --verify`` of a detached signature."""
    sig = tmp / "sig.asc"
    data = tmp / "part1.eml"
    sig.write_bytes(signature)
    data.write_bytes(signed)
    done = gpg(home, "--status-fd", "1", "--trust-model", "always", "--verify", str(sig), str(data))
    m = re.search(rb"\[GNUPG:\] VALIDSIG ([0-9A-F]{40})", done.stdout)
    assert m, done.stdout.decode()
    return m.group(1).decode()


def gpg_decrypt(home: Path, armored: bytes, passphrase: str | None = None) -> tuple[bytes, str]:
    """Plaintext and the status lines of ``gpg --decrypt``."""
    pw = ["--passphrase", passphrase] if passphrase else []
    done = run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            *pw,
            "--status-fd",
            "2",
            "--trust-model",
            "always",
            "--decrypt",
        ],
        input=armored,
    )
    return done.stdout, done.stderr.decode(errors="replace")


def list_packet_key_ids(home: Path, armored: bytes) -> set[str]:
    """The key IDs the message is encrypted to, as ``gpg --list-packets`` shows them."""
    done = run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--list-packets",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ],
        input=armored,
        check=False,
    )
    text = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    return set(re.findall(r":pubkey enc packet: version \d+, algo \d+, keyid ([0-9A-F]{16})", text))


def sop_verify(tool: str, signature: bytes, signed: bytes, cert: Path, tmp: Path) -> None:
    sig = tmp / f"{tool}-sig.asc"
    sig.write_bytes(signature)
    run([tool, "verify", str(sig), str(cert)], input=signed)


def sop_decrypt(tool: str, armored: bytes, key: Path, cert: Path, tmp: Path) -> tuple[bytes, str]:
    """Plaintext and verifications from a SOP implementation (sqop or gosop)."""
    out = tmp / f"{tool}-verifications.txt"
    # gosop implements an older SOP draft, where the option was called --verify-out.
    out_flag = "--verify-out" if tool == "gosop" else "--verifications-out"
    done = run(
        [tool, "decrypt", f"--verify-with={cert}", f"{out_flag}={out}", str(key)],
        input=armored,
    )
    return done.stdout, out.read_text() if out.exists() else ""


def subkey_ids(home: Path, fingerprint: str) -> set[str]:
    out = gpg(home, "--with-colons", "--list-keys", fingerprint).stdout.decode()
    ids = set()
    for line in out.splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sub"):
            ids.add(f[4])
    return ids
