"""Autocrypt Level 1 (https://autocrypt.org/level1.html): headers for outgoing mail, and
learning peers' keys from received mail.

Outgoing: every OpenPGP message carries one ``Autocrypt:`` header in its outer header block,
``addr=FROM; [prefer-encrypt=mutual;] keydata=BASE64`` (keydata last, folded), whose key is
the minimal one (§2.1.1: primary key, the encryption subkey, the user ID with the From
address, their self-signatures); a message to several recipients carries one
``Autocrypt-Gossip:`` header per To/Cc recipient *inside* the encrypted part (§2.7), never
for a Bcc recipient and never in a Bcc copy (that would tell the others who got a copy).

Incoming (:func:`learn_from_message`): the per-peer state of §2.3: ``last_seen`` and
``autocrypt_timestamp`` (the effective date of the message that brought the key, its Date
but never in the future); a message older than what was seen does not replace anything; an
``Autocrypt`` header counts only when its addr is the message's (single) From address;
gossip only from the decrypted inside of encrypted mail that is validly signed by a key of
the From address, only for addresses among its To/Cc.
A key learnt this way is vetted like any other found key and recorded with its source; it
replaces an earlier Autocrypt key of the peer (the latest message wins) but never a key that
came from elsewhere without ``keys accept``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Literal

from e2email.config import Protection
from e2email.discovery.policy import adopt
from e2email.errors import KeyProblem, KeystoreError, MessageError
from e2email.keysources import KeySource, SourceKind
from e2email.keystore import Keystore, OpenPGPKey, vet_key
from e2email.message import Message
from e2email.private import check_private, ensure_private_dir, open_private

__all__ = [
    "AutocryptHeader",
    "CopyFields",
    "Learnt",
    "autocrypt_fields",
    "autocrypt_for_copy",
    "autocrypt_header",
    "gossip_headers",
    "learn_from_message",
    "parse_autocrypt",
]

#: §2.1: the header "MUST NOT exceed 10 KiB"; larger keys are not sent this way.
MAX_HEADER = 10 * 1024
_FOLD = 76


@functools.lru_cache(maxsize=64)  # the same sender's header on every message of a run
def _fold(attributes: str, keydata: bytes) -> str:
    """``attributes`` then ``keydata=`` and the base64 in lines of at most 76 characters,
    each continuation line starting with a space (RFC 5322 §2.2.3 folding; Autocrypt
    readers drop the whitespace from keydata)."""
    b64 = base64.b64encode(keydata).decode("ascii")
    lines = [b64[i : i + _FOLD] for i in range(0, len(b64), _FOLD)]
    return f"{attributes}keydata=\r\n " + "\r\n ".join(lines)


def autocrypt_header(
    keystore: Keystore, sender_key: OpenPGPKey, address: str, *, prefer_encrypt: bool = False
) -> str:
    """The value of the sender's ``Autocrypt:`` header (folded with CRLF + space, ready to
    follow ``Autocrypt: `` in the outer header block). ``address`` is the From addr-spec;
    ``prefer_encrypt`` adds ``prefer-encrypt=mutual``. KeystoreError when the key has no
    usable encryption key for the address or the header would exceed 10 KiB."""
    addr = address.strip()
    keydata = keystore.export_minimal(sender_key, addr)
    mutual = "prefer-encrypt=mutual; " if prefer_encrypt else ""
    value = _fold(f"addr={addr}; {mutual}", keydata)
    if len("Autocrypt: ") + len(value) > MAX_HEADER:
        raise KeystoreError(
            f"the Autocrypt header for {sender_key.fingerprint} would exceed 10 KiB"
        )
    return value


def gossip_headers(
    keystore: Keystore, recipient_keys: Mapping[str, OpenPGPKey]
) -> list[tuple[str, str]]:
    """``Autocrypt-Gossip`` (name, value) pairs for the encrypted part of a message to the
    To/Cc recipients in ``recipient_keys`` (address -> the key the message is encrypted to).

    Pass only the To and Cc recipients of the copy: never a Bcc recipient, and nothing for a
    Bcc copy (§2.7: gossip tells every recipient the others' keys). A message to one
    recipient has nothing to gossip: the result is empty."""
    if len(recipient_keys) < 2:
        return []
    headers = []
    for address, key in recipient_keys.items():
        keydata = keystore.export_minimal(key, address)
        headers.append(("Autocrypt-Gossip", _fold(f"addr={address.strip()}; ", keydata)))
    return headers


def autocrypt_for_copy(
    keystore: Keystore,
    *,
    sender: str,
    sender_key: OpenPGPKey | None,
    kind: str,
    to_cc_keys: Mapping[str, OpenPGPKey],
    encrypted: bool,
    prefer_encrypt: bool,
) -> tuple[bytes, list[tuple[str, str]]]:
    """Everything Autocrypt adds to one OpenPGP copy, with the rules applied in one place:
    the outer ``Autocrypt:`` field line (bytes ending in CRLF, for the outer header block; empty
    when the sender has no usable encryption key: a missing header never stops a message)
    and the ``Autocrypt-Gossip`` pairs for the header of the *encrypted* payload: only for the
    ``"main"`` copy (To and Cc, whose keys ``to_cc_keys`` holds), only when it is encrypted to
    two or more of them; never anything for a ``"bcc"`` copy, and Bcc recipients must not be
    in ``to_cc_keys``."""
    outer = b""
    if sender_key is not None:
        try:
            value = autocrypt_header(keystore, sender_key, sender, prefer_encrypt=prefer_encrypt)
        except KeystoreError:
            value = None
        if value is not None:
            outer = b"Autocrypt: " + value.encode("ascii") + b"\r\n"
    gossip: list[tuple[str, str]] = []
    if encrypted and kind == "main":
        try:
            gossip = gossip_headers(keystore, to_cc_keys)
        except KeystoreError:
            gossip = []
    return outer, gossip


#: What Autocrypt adds to one copy: the outer ``Autocrypt:`` field line (bytes, CRLF, or
#: empty) and the ``Autocrypt-Gossip`` fields for the encrypted payload's root header block.
CopyFields = tuple[bytes, list[tuple[str, str]]]


def autocrypt_fields(
    keystore: Keystore,
    message: Message,
    protection: Protection,
    *,
    own: OpenPGPKey | None,
    recipients: Mapping[str, OpenPGPKey],
) -> dict[Literal["main", "bcc"], CopyFields]:
    """Everything Autocrypt adds to an OpenPGP message, per kind of copy, for any OpenPGP
    engine: ``"main"`` (To and Cc) and ``"bcc"`` (each Bcc copy), each
    ``(outer_field_line, gossip_fields)``. Put the line at the end of the copy's outer header
    block (signed-only messages too, outside the signed part) and, when there are gossip
    fields, make that copy's payload with ``stream_payload(..., extra_fields=gossip)``.

    ``own`` is the sender's encryption key when the engine has it (encrypt-to-self), else it
    is looked up; ``recipients`` the keys the message is encrypted to, by lower-cased
    address. Nothing when ``protection.autocrypt`` is off or the message already carries a
    program's own ``Autocrypt`` header (Level 1 allows one). Blocking (gpg exports the
    minimal keys, once per key state); never raises for a key it cannot use."""
    none: dict[Literal["main", "bcc"], CopyFields] = {"main": (b"", []), "bcc": (b"", [])}
    if not protection.autocrypt or any(n.lower() == "autocrypt" for n, _ in message.headers):
        return none
    sender = message.sender.addr_spec
    if own is None:
        found = keystore.encryption_key(sender, key_map=protection.key_map)
        own = found if isinstance(found, OpenPGPKey) else None
    if own is not None and not own.has_secret:
        # Level 1 "Header injection in outbound mail": the header is for a sender that has
        # secret key material; no key is advertised for From that could not read the replies.
        own = None
    to_cc = (
        {a.addr_spec.lower(): recipients[a.addr_spec.lower()] for a in (*message.to, *message.cc)}
        if protection.encrypt
        else {}
    )
    fields = dict(none)
    # The "bcc" fields only when there is a Bcc copy to put them on.
    kinds: tuple[Literal["main", "bcc"], ...] = ("main", "bcc") if message.bcc else ("main",)
    fields.update(
        {
            kind: autocrypt_for_copy(
                keystore,
                sender=sender,
                sender_key=own,
                kind=kind,
                to_cc_keys=to_cc,
                encrypted=protection.encrypt,
                # Level 1 "prefer-encrypt": mutual states "an agreement to enable encryption by
                # default"; a policy that encrypts every message (and refuses rather than send in
                # clear) is that agreement. Signing only: no attribute, i.e. nopreference.
                prefer_encrypt=protection.encrypt,
            )
            for kind in kinds
        }
    )
    return fields


@dataclass(frozen=True)
class AutocryptHeader:
    addr: str
    keydata: bytes
    prefer_encrypt: str = "nopreference"


def parse_autocrypt(value: str) -> AutocryptHeader | None:
    """An ``Autocrypt`` (or ``Autocrypt-Gossip``) header value, or None when invalid (§2.1:
    addr and keydata required, an unknown attribute not starting with ``_`` makes the
    header invalid)."""
    attrs: dict[str, str] = {}
    for part in value.split(";"):
        name, eq, val = part.strip().partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if not eq or name in attrs:
            return None
        attrs[name] = val.strip()
    if any(n not in ("addr", "prefer-encrypt", "keydata") and not n.startswith("_") for n in attrs):
        return None
    if "addr" not in attrs or "keydata" not in attrs:
        return None
    try:
        keydata = base64.b64decode("".join(attrs["keydata"].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    prefer = attrs.get("prefer-encrypt", "nopreference")
    if prefer not in ("mutual", "nopreference"):
        prefer = "nopreference"
    return AutocryptHeader(attrs["addr"].strip().lower(), keydata, prefer)


# -- Learning from received mail -----------------------------------------------------------

PEERS_FILE = "autocrypt-peers.json"
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Learnt:
    """What one message taught (one line per address for ``keys import --autocrypt``)."""

    address: str
    outcome: str  # imported, unchanged, older, refused, none, ignored (unsigned gossip)
    fingerprint: str | None = None
    detail: str = ""
    gossip: bool = False

    def __str__(self) -> str:
        what = "gossip" if self.gossip else "Autocrypt"
        fpr = f" {self.fingerprint}" if self.fingerprint else ""
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.address}: {what} key{fpr} {self.outcome}{extra}"


class _Peers:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / PEERS_FILE

    def load(self) -> dict[str, dict[str, object]]:
        if not self.path.exists():
            return {}
        check_private(self.path, what="Autocrypt peer state")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        peers = data.get("peers") if isinstance(data, dict) else None
        return (
            {k: v for k, v in peers.items() if isinstance(v, dict)}
            if isinstance(peers, dict)
            else {}
        )

    def save(self, peers: dict[str, dict[str, object]]) -> None:
        ensure_private_dir(self.home, what="e2email home")
        tmp = self.path.with_name(f".{PEERS_FILE}.{os.getpid()}.tmp")
        try:
            with open_private(tmp) as fh:
                json.dump({"version": 1, "peers": peers}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _effective_date(msg: EmailMessage, now: datetime) -> datetime:
    """The message's Date, but never later than now (§2.3: a future Date must not pin the
    state), and now when there is none."""
    raw = msg.get("Date")
    try:
        when = email.utils.parsedate_to_datetime(str(raw)) if raw else None
    except (TypeError, ValueError):
        when = None
    if when is None:
        return now
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(when, now)


def _single_from(msg: EmailMessage) -> str | None:
    found = email.utils.getaddresses([str(v) for v in msg.get_all("From", [])])
    addrs = [a for _, a in found if "@" in a]
    return addrs[0].lower() if len(addrs) == 1 else None


def _recipients(msg: EmailMessage) -> set[str]:
    values = [str(v) for name in ("To", "Cc") for v in msg.get_all(name, [])]
    return {a.lower() for _, a in email.utils.getaddresses(values) if "@" in a}


def learn_from_message(
    keystore: Keystore,
    raw: bytes,
    *,
    origin: str,
    passphrase: str | None = None,
    now: datetime | None = None,
) -> list[Learnt]:
    """Update the Autocrypt peer state from one received message (``raw`` bytes; ``origin``
    names it in the recorded source) and import the keys it brings, by the rules of §2.3.
    Gossip is read only when the message is PGP/MIME encrypted, our secret key decrypts it
    and it is validly signed by a key of its From address (else a line says why not).
    MessageError for something that is not a mail message."""
    now = now or datetime.now(UTC)
    try:
        msg = BytesParser(policy=email_policy.default).parsebytes(raw)
    except Exception as exc:  # the parser's errors are many and untyped
        raise MessageError(f"{origin}: not a mail message ({exc})") from exc
    assert isinstance(msg, EmailMessage)
    sender = _single_from(msg)
    if sender is None:
        return [Learnt("(no single From)", "none", detail="no single From address")]
    if msg.get_content_type() == "multipart/report":
        return [Learnt(sender, "none", detail="a report (bounce), ignored by §2.3")]
    when = _effective_date(msg, now)
    headers = [parse_autocrypt(str(v)) for v in msg.get_all("Autocrypt", [])]
    valid = [h for h in headers if h is not None and h.addr == sender]
    # §2.3: exactly one valid header for the From address, else none counts.
    header = valid[0] if len(valid) == 1 else None
    results: list[Learnt] = []
    with _LOCK:
        store = _Peers(keystore.home)
        peers = store.load()
        state = peers.get(sender, {})
        last_seen = _number(state.get("last_seen"))
        autocrypt_timestamp = _number(state.get("autocrypt_timestamp"))
        stamp = when.timestamp()
        # §2.3: a message older than the one that brought the current key changes nothing;
        # last_seen only moves forward.
        if header is None:
            results.append(Learnt(sender, "none", detail="no Autocrypt header for From"))
        elif stamp < autocrypt_timestamp:
            results.append(
                Learnt(sender, "older", detail="a newer message brought the current key")
            )
        else:
            results.append(
                _take(keystore, sender, header.keydata, SourceKind.AUTOCRYPT, origin, state)
            )
            if results[-1].outcome in ("imported", "unchanged"):
                state["autocrypt_timestamp"] = stamp
                state["prefer_encrypt"] = header.prefer_encrypt
        if stamp > last_seen:
            state["last_seen"] = stamp
        peers[sender] = state
        store.save(peers)
    inner, unsigned = _decrypted(keystore, msg, passphrase, sender)
    if inner is not None and unsigned and inner.get_all("Autocrypt-Gossip"):
        # Anyone can encrypt to us and write any From: only a valid signature by a key the
        # keystore has for the From address makes the gossip the sender's word.
        results.append(Learnt(sender, "ignored", gossip=True, detail=unsigned))
    elif inner is not None:
        recipients = _recipients(inner) or _recipients(msg)
        for value in inner.get_all("Autocrypt-Gossip", []):
            gossip = parse_autocrypt(str(value))
            if gossip is None or gossip.addr not in recipients or gossip.addr == sender:
                continue
            if keystore.find(gossip.addr, include_revoked=True):
                # Gossip never replaces a key (§2.7 gossip is weaker than a peer's own header).
                results.append(
                    Learnt(gossip.addr, "unchanged", gossip=True, detail="already has a key")
                )
                continue
            learnt = _take(keystore, gossip.addr, gossip.keydata, SourceKind.GOSSIP, origin, {})
            results.append(
                Learnt(
                    learnt.address, learnt.outcome, learnt.fingerprint, learnt.detail, gossip=True
                )
            )
    return results


def _take(
    keystore: Keystore,
    address: str,
    keydata: bytes,
    kind: SourceKind,
    origin: str,
    state: dict[str, object],
) -> Learnt:
    vetted = vet_key(keydata, address)
    if isinstance(vetted, KeyProblem):
        return Learnt(
            address, "refused", vetted.fingerprint, f"{vetted.reason.value} ({vetted.detail})"
        )
    known = keystore.get(vetted.fingerprint) is not None
    # The latest message wins over the peer's earlier Autocrypt or gossip key (§2.3), but
    # never over a key that came from elsewhere: that takes ``keys accept``.
    replace = kind is SourceKind.AUTOCRYPT and (
        all(
            (src := keystore.sources.get(k.fingerprint)) is not None
            and src.kind in (SourceKind.AUTOCRYPT, SourceKind.GOSSIP)
            for k in keystore.find(address, include_revoked=True)
            if k.fingerprint != vetted.fingerprint
        )
    )
    problem = adopt(keystore, vetted, KeySource(kind, origin), replace=replace)
    if problem is not None:
        return Learnt(address, "refused", vetted.fingerprint, problem.detail)
    if kind is SourceKind.AUTOCRYPT:
        state["fingerprint"] = vetted.fingerprint
    return Learnt(address, "unchanged" if known else "imported", vetted.fingerprint)


def _decrypted(
    keystore: Keystore, msg: EmailMessage, passphrase: str | None, sender: str
) -> tuple[EmailMessage | None, str]:
    """The inner message of a PGP/MIME encrypted message (RFC 3156 §4), decrypted with our
    secret key, or None (not encrypted, or we cannot decrypt it); and, when the inside may
    not be trusted for gossip, why: gossip counts only from a message signed inside the
    encryption (RFC 3156 §6.2, signed then encrypted) with a valid signature by a key in the
    keystore that carries the From address ``sender``. Autocrypt Level 1 (§2.7, key gossip)
    does not ask for a signature, but an unsigned ciphertext can be made by anyone who has
    our public key, under any From; Delta Chat (chatmail core, mimeparser.rs) reads gossip
    "only if the mail was correctly signed", and so do we."""
    if msg.get_content_type() != "multipart/encrypted":
        return None, ""
    parts = list(msg.iter_parts())
    if len(parts) != 2 or parts[1].get_content_type() != "application/octet-stream":
        return None, ""
    armored = parts[1].get_payload(decode=True)
    if not isinstance(armored, bytes):
        return None, ""
    result = keystore.gpg.decrypt(armored, passphrase=passphrase)
    if not result.ok:
        return None, ""
    inner = BytesParser(policy=email_policy.default).parsebytes(bytes(result.data))
    if not isinstance(inner, EmailMessage):
        return None, ""
    signer = getattr(result, "pubkey_fingerprint", None) or getattr(result, "fingerprint", None)
    if not result.valid or not signer:
        return inner, "the encrypted message carries no valid signature"
    key = keystore.get(str(signer))
    if key is None or not key.carries(sender):
        return inner, f"the signing key {signer} is not a key of {sender} in the keystore"
    return inner, ""


def message_files(paths: Iterable[Path]) -> list[Path]:
    """Message files: each file as is, each Maildir folder's ``cur`` and ``new`` messages."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for sub in ("cur", "new"):
                folder = path / sub
                if folder.is_dir():
                    found.extend(sorted(p for p in folder.iterdir() if p.is_file()))
            if not (path / "cur").is_dir() and not (path / "new").is_dir():
                raise MessageError(f"{path} is not a Maildir folder (no cur/ or new/)")
        else:
            found.append(path)
    return found
