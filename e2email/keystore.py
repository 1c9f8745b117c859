"""Where keys live, how they are found by address, and whether they may be used.

The keystore is a directory (``--home`` / ``$E2EMAIL_HOME``, by default the user's data
directory) whose OpenPGP keys live in one of two backends behind one interface:

* ``certd``, the certificate store (:mod:`e2email.certd`): public certificates in the OpenPGP
  certificate directory ``pgp.cert.d/`` (draft-nwjw-openpgp-cert-d), secret keys
  passphrase-protected in ``secret/``, judged without gpg (:mod:`e2email.pgpkeys`).
* ``gnupg``, a GnuPG home: e2email's own ``gnupg/``, or an existing one named with
  ``--gnupg-home`` (smartcards and keys held by gpg-agent), read through gpg's colon listing.

Why the certificate store: it needs no program besides this process (``pip install e2email``
runs anywhere pysequoia has a wheel), the in-process engine reads keys without a gpg export,
and its layout is a shared standard rather than e2email's own: ``sq`` and other tools read and
write the same directory, with its lock and merge rules, so keys are not locked into e2email.
Secret keys stay in OpenPGP's own protected form (S2K), the form gpg imports and exports, so a
key moves between the two backends unchanged. Why keep GnuPG homes: smartcards and agent-held
keys exist only there, and a user's existing keys must keep working until they choose to
migrate (``keys migrate`` copies, compares both sides, then switches; the old home is kept).
Which backend: a named GnuPG home; else a home's store when it has one; else its old
``gnupg/``; a new home gets the store when gpg is missing (or ``E2EMAIL_KEYSTORE=certd``), a
GnuPG home otherwise, as before: existing ways of working (secret keys without a passphrase,
which the store accepts only when told) stay as they were until a user moves.
Both engines read either backend: the in-process one reads the store directly, or keys exported
from gpg; the GnuPG engine reads a store through a GnuPG home of its own (``gnupg-engine/``)
that the store is imported into whenever it changed, so the store stays the one place keys are
kept and judged. Without gpg, ``--engine gpg`` is a one-line error naming ``--engine sequoia``.

Keys are judged by our own rules, not by GnuPG's web of trust: a key you import
into the keystore is a key you chose, but it must still be current, unrevoked, strong enough and
able to do the job (standards checklist item 14). Lookups fail closed with a reason per address.

Choosing is never guessing: when more than one usable key carries an address, the lookup is
refused naming each key and where it came from (:mod:`e2email.keysources`) until a key map
(``--key``) decides. In a named GnuPG home, which may hold keys nobody vouched for, a key found
by address must also have gpg's own validity for that user ID (marginal, full or ultimate),
unless it is the user's own (secret) key or came in through e2email.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import gnupg

from e2email.certd import (
    CERT_DIR,
    SECRET_DIR,
    CertDirectory,
    SecretKeys,
    generate_key,
    is_protected,
    protect,
    secret_fingerprints,
)
from e2email.config import default_home
from e2email.errors import (
    ConfigError,
    InsecurePathError,
    KeyProblem,
    KeyReason,
    KeystoreError,
    MessageError,
    PassphraseError,
)
from e2email.keysources import KeySource, KeySources, SourceKind
from e2email.message import Address
from e2email.private import check_private, ensure_private_dir, open_private

_log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "AddressConflict",
    "GeneratedKey",
    "ImportSummary",
    "KeyChange",
    "Keystore",
    "MigratedKey",
    "Migration",
    "OpenPGPKey",
    "SubKey",
    "VettedKey",
    "check_expiry",
    "vet_key",
]

#: OpenPGP public-key algorithm IDs (RFC 9580 §9.1) to names; RSA, DSA and Elgamal need a length.
_ALGORITHMS = {
    1: "rsa",
    2: "rsa",
    3: "rsa",
    16: "elg",
    17: "dsa",
    18: "ecdh",
    19: "ecdsa",
    22: "eddsa",
    25: "x25519",
    26: "x448",
    27: "ed25519",
    28: "ed448",
}
_LENGTH_BOUND = {1, 2, 3, 16, 17}

#: Where a keystore keeps OpenPGP keys: the certificate store or a GnuPG home.
BACKENDS = ("certd", "gnupg")
#: Below this an RSA, DSA or Elgamal key is refused (NIST SP 800-131A; standards item 14).
MIN_RSA_BITS = 2048

#: Hash algorithm IDs (RFC 9580 §9.5) too weak for self-signatures: MD5, SHA-1, RIPEMD-160.
#: A SHA-1 self-signature can be forged by a chosen-prefix collision (SHA-1 is a Shambles, 2020).
WEAK_HASHES = {1: "MD5", 2: "SHA-1", 3: "RIPEMD-160"}
_USER_ID_CERTIFICATIONS = {"10x", "11x", "12x", "13x"}

#: GnuPG colon-listing validity letters that make a key or subkey unusable (doc/DETAILS).
_BAD_VALIDITY = {
    "r": KeyReason.REVOKED,
    "e": KeyReason.EXPIRED,
    "d": KeyReason.DISABLED,
    "i": KeyReason.INVALID,
}

#: User-ID validity letters (doc/DETAILS, field 2) that carry an assurance that the key belongs
#: to the address: marginal, full, ultimate. Anything else ("-" unknown, "q" undefined, "n"
#: never, "o" not yet computed) is what gpg calls "no assurance this key belongs to the named
#: user", and gpg itself will not encrypt to it in batch mode.
_ASSURED = {"m", "f", "u"}
_VALIDITY_NAMES = {"-": "unknown", "q": "undefined", "n": "never", "o": "not yet computed"}

#: The files (and the secret-key folder) a GnuPG home keeps keys and ownertrust in.
_KEYRING_FILES = ("pubring.kbx", "pubring.gpg", "secring.gpg", "trustdb.gpg", "private-keys-v1.d")

#: gpg-agent settings for the GnuPG home e2email manages: no passphrase is kept in the agent's
#: cache, so the passphrase given for a message is the one that unlocks the key, and a wrong one
#: is refused even right after a right one (issue 8 item 18).
_AGENT_CONF = ("default-cache-ttl 0", "max-cache-ttl 0")

#: What ``Expire-Date`` accepts that we pass on: 0/never, days, Nd/Nw/Nm/Ny, or an ISO date.
_EXPIRY = re.compile(r"^(?:0|never|\d{1,5}[dwmy]?|\d{4}-\d{2}-\d{2})$", re.IGNORECASE)

#: Characters gpg accepts in a bare addr-spec user ID (gnupg common/mbox-util.c,
#: ``has_invalid_email_chars``): these and non-ASCII before the '@', only the first set after.
_MBOX_CHARS = frozenset("0123456789_-.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MBOX_LOCAL_EXTRA = frozenset("!#$%&'*+/=?^`{|}~")


def _bare_mailbox(text: str) -> bool:
    """gnupg's ``is_valid_mailbox``: a whole user ID that is an addr-spec."""
    at_seen = False
    for c in text:
        if ord(c) >= 0x80:
            continue
        if c == "@":
            at_seen = True
        elif c not in _MBOX_CHARS and (at_seen or c not in _MBOX_LOCAL_EXTRA):
            return False
    return (
        text.count("@") == 1
        and not text.startswith("@")
        and not text.endswith(("@", "."))
        and ".." not in text
    )


def _uid_address(uid: str) -> str | None:
    """The address a user ID carries, as gpg's ``mbox`` property computes it (gnupg
    common/mbox-util.c ``mailbox_from_userid``): the text in the first ``<...>``, or the
    whole user ID when it is a bare addr-spec; None when there is none. gpg's import and
    export filters (``keep-uid=mbox = ADDR``) select user IDs by that rule, so the keystore
    must file a user ID under the very same address, or a key vetted for one address could
    be filed under another (``X <mallory@adv.test> <carol@victim.test>``). A user ID with
    more than one '<' or '>' is ambiguous and carries no address at all (fail closed)."""
    if "<" in uid or ">" in uid:
        if uid.count("<") != 1 or uid.count(">") != 1:
            return None
        inner, closed, _ = uid.partition("<")[2].partition(">")
        if not closed or not inner:
            return None
        # mailbox_from_userid's checks on the bracketed part.
        if (
            inner.count("@") != 1
            or inner.startswith("@")
            or inner.endswith(("@", "."))
            or any(c.isspace() or not c.isprintable() for c in inner)
            or ".." in inner.partition("@")[2]
        ):
            return None
        return inner.lower()
    return uid.lower() if _bare_mailbox(uid) else None


def _unescape_colons(text: str) -> str:
    # Colon listings escape ':' and control characters as \xHH (doc/DETAILS, field 10).
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _timestamp(text: str) -> datetime | None:
    if not text:
        return None
    if "T" in text:  # ISO form; GnuPG uses it only with --fixed-list-mode off
        return datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(text), tz=UTC)


@dataclass(frozen=True)
class SubKey:
    """A primary key or subkey as GnuPG lists it."""

    fingerprint: str
    algorithm_id: int
    length: int
    curve: str
    capabilities: str
    validity: str
    created: datetime | None
    expires: datetime | None
    has_secret: bool = False
    #: Hash algorithm of the newest subkey binding signature (None for a primary key).
    binding_hash: int | None = None

    @property
    def key_id(self) -> str:
        return self.fingerprint[-16:]

    @property
    def algorithm(self) -> str:
        """A short readable name: ``ed25519``, ``cv25519``, ``rsa3072``, ``dsa1024``."""
        if self.algorithm_id in _LENGTH_BOUND:
            return f"{_ALGORITHMS[self.algorithm_id]}{self.length}"
        return self.curve or _ALGORITHMS.get(self.algorithm_id, f"algo{self.algorithm_id}")

    def problem(self, now: datetime) -> tuple[KeyReason, str] | None:
        """Why this (sub)key may not be used at ``now``, or None."""
        reason = _BAD_VALIDITY.get(self.validity)
        if reason is KeyReason.EXPIRED or (self.expires is not None and self.expires <= now):
            when = f"on {self.expires:%Y-%m-%d}" if self.expires else ""
            return KeyReason.EXPIRED, f"{self.key_id} expired {when}".strip()
        if reason is not None:
            return reason, self.key_id
        if self.algorithm_id in _LENGTH_BOUND and self.length < MIN_RSA_BITS:
            return KeyReason.WEAK, f"{self.algorithm} is below {MIN_RSA_BITS} bits"
        if self.binding_hash in WEAK_HASHES:
            return (
                KeyReason.WEAK,
                f"{WEAK_HASHES[self.binding_hash]} binding signature on {self.key_id}",
            )
        return None


@dataclass(frozen=True)
class UserID:
    """A user ID, its validity letter and the hash of its newest self-signature."""

    text: str
    validity: str
    self_sig_hash: int | None = None

    @functools.cached_property
    def address(self) -> str | None:
        # Computed once per listing, not once per lookup (the user ID never changes).
        return _uid_address(self.text)

    @property
    def weak_self_signature(self) -> bool:
        return self.self_sig_hash in WEAK_HASHES


@dataclass(frozen=True)
class OpenPGPKey:
    """An OpenPGP certificate in the keystore, with everything needed to judge it."""

    primary: SubKey
    subkeys: tuple[SubKey, ...]
    user_ids: tuple[UserID, ...]
    disabled: bool = False
    #: The choices and judgments made at the present time (:meth:`_timed`): name -> (from,
    #: until, answer). Never copied to another key (``replace`` makes a new one).
    _now_answers: dict[str, tuple[datetime | None, datetime | None, object]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def fingerprint(self) -> str:
        return self.primary.fingerprint

    def _timed(self, name: str, answer: Callable[[datetime], _T]) -> _T:
        """``answer(now)``, given again while the clock stays between the same two of this
        key's creation and expiry times (the only moments its judgment can change:
        :meth:`SubKey.problem`); a clock set back counts as well."""
        now = datetime.now(UTC)
        held = self._now_answers.get(name)
        if (
            held is not None
            and (held[0] is None or held[0] <= now)
            and (held[1] is None or now < held[1])
        ):
            return cast(_T, held[2])
        value = answer(now)
        times = [
            t
            for sub in (self.primary, *self.subkeys)
            for t in (sub.created, sub.expires)
            if t is not None
        ]
        since = max((t for t in times if t <= now), default=None)
        until = min((t for t in times if t > now), default=None)
        self._now_answers[name] = (since, until, value)
        return value

    @property
    def has_secret(self) -> bool:
        return any(k.has_secret for k in (self.primary, *self.subkeys))

    @property
    def addresses(self) -> tuple[str, ...]:
        """Lower-cased addresses on user IDs that are not revoked."""
        found = []
        for uid in self.user_ids:
            addr = uid.address
            if addr and uid.validity != "r" and addr not in found:
                found.append(addr)
        return tuple(found)

    def carries(self, address: str, *, include_revoked: bool = False) -> bool:
        """Whether a user ID names ``address`` (lower-case); revoked user IDs count only when
        asked, so that a revoked key is reported as revoked rather than as missing."""
        return any(
            uid.address == address and (include_revoked or uid.validity != "r")
            for uid in self.user_ids
        )

    def user_id_problem(self, address: str | None = None) -> tuple[KeyReason, str] | None:
        """A weak (SHA-1) self-signature on the user ID naming ``address`` (on every current
        user ID when no address is given): such a binding can be forged (standards item 14)."""
        current = [
            u
            for u in self.user_ids
            if u.validity != "r" and (address is None or u.address == address)
        ]
        if current and all(u.weak_self_signature for u in current):
            name = WEAK_HASHES[current[0].self_sig_hash or 2]
            return KeyReason.WEAK, f"{name} self-signature on the user ID"
        return None

    @property
    def expires(self) -> datetime | None:
        return self.primary.expires

    def _key_problem(self, now: datetime) -> tuple[KeyReason, str] | None:
        if self.disabled:
            return KeyReason.DISABLED, "disabled in the keyring"
        return self.primary.problem(now)

    def _usable(self, capability: str, now: datetime, *, need_secret: bool) -> list[SubKey]:
        return [
            k
            for k in (self.primary, *self.subkeys)
            if capability in k.capabilities
            and k.problem(now) is None
            and (k.has_secret or not need_secret)
        ]

    def encryption_subkey(self, now: datetime | None = None) -> SubKey | None:
        """The (sub)key to encrypt to: the newest usable encryption-capable one (RFC 9580
        §5.5.2 leaves the choice to the sender; the newest is what GnuPG would pick among
        good ones, but here the refused ones are never candidates)."""
        if now is None:  # asked several times per message: once per span of time
            return self._timed("encryption_subkey", self.encryption_subkey)
        return self._newest(self.encryption_subkeys(now))

    def signing_subkey(self, now: datetime | None = None) -> SubKey | None:
        """The (sub)key to sign with: the newest usable signing-capable one with its secret."""
        if now is None:
            return self._timed("signing_subkey", self.signing_subkey)
        return self._newest(self._usable("s", now, need_secret=True))

    @staticmethod
    def _newest(keys: Sequence[SubKey]) -> SubKey | None:
        floor = datetime.min.replace(tzinfo=UTC)
        return max(keys, key=lambda k: k.created or floor, default=None)

    def encryption_subkeys(self, now: datetime | None = None) -> tuple[SubKey, ...]:
        """The (sub)keys GnuPG may pick to encrypt to this certificate."""
        return tuple(self._usable("e", now or datetime.now(UTC), need_secret=False))

    def encryption_problem(self, now: datetime | None = None) -> tuple[KeyReason, str] | None:
        """Why this certificate cannot be encrypted to, or None when it can."""
        now = now or datetime.now(UTC)
        problem = self._key_problem(now) or self.user_id_problem()
        if problem is not None:
            return problem
        if self._usable("e", now, need_secret=False):
            return None
        return KeyReason.NO_ENCRYPTION_KEY, self._why_none("e", now, need_secret=False)

    def signing_problem(self, now: datetime | None = None) -> tuple[KeyReason, str] | None:
        """Why this key cannot sign, or None when it can."""
        now = now or datetime.now(UTC)
        problem = self._key_problem(now) or self.user_id_problem()
        if problem is not None:
            return problem
        if self._usable("s", now, need_secret=True):
            return None
        if not self.has_secret:
            return KeyReason.NO_SECRET_KEY, self.fingerprint
        return KeyReason.NO_SIGNING_KEY, self._why_none("s", now, need_secret=True)

    def _why_none(self, capability: str, now: datetime, *, need_secret: bool) -> str:
        candidates = [k for k in (self.primary, *self.subkeys) if capability in k.capabilities]
        for k in candidates:
            problem = k.problem(now)
            if problem is not None:
                return f"{problem[0].value}: {problem[1]}"
            if need_secret and not k.has_secret:
                return f"no secret for {k.key_id}"
        return "the certificate has none"

    def status(self, now: datetime | None = None) -> str:
        """One phrase for ``keys list``: ``usable`` or why not."""
        enc = self.encryption_problem(now)
        if enc is None:
            if self.has_secret and self.signing_problem(now) is not None:
                return "usable for encryption only"
            return "usable"
        return f"{enc[0].value} ({enc[1]})" if enc[1] else enc[0].value


@dataclass(frozen=True)
class KeyChange:
    """What an import did to one certificate: new, or which user IDs it added or revoked, and
    whether it revoked the key itself."""

    fingerprint: str
    new: bool
    #: Every current user ID of the certificate after the import.
    user_ids: tuple[str, ...]
    added_user_ids: tuple[str, ...] = ()
    revoked_user_ids: tuple[str, ...] = ()
    #: The key was not revoked before the import and is now (e.g. a bare revocation
    #: certificate was imported).
    revoked: bool = False
    secret_added: bool = False
    #: Subkeys the import added (e.g. an encryption subkey, which can make the key usable).
    added_subkeys: tuple[str, ...] = ()
    #: Subkeys whose validity or expiry the import changed (revoked, extended, expired).
    changed_subkeys: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(
            self.new
            or self.added_user_ids
            or self.revoked_user_ids
            or self.revoked
            or self.secret_added
            or self.added_subkeys
            or self.changed_subkeys
        )


@dataclass(frozen=True)
class AddressConflict:
    """An address that, after an import, is carried by more than one key."""

    address: str
    fingerprints: tuple[str, ...]
    #: Each key with its source and status, as the refusal to choose between them says it.
    detail: str
    #: More than one of the keys is usable, so messages to the address are refused until a
    #: key map (``--key``) chooses one.
    ambiguous: bool = True

    def __str__(self) -> str:
        return f"{self.address} now has {len(self.fingerprints)} keys: {self.detail}"


@dataclass(frozen=True)
class ImportSummary:
    """What an import changed."""

    fingerprints: tuple[str, ...]
    imported: int
    unchanged: int
    secret_imported: int
    revoked: int = 0
    #: Per certificate touched: new, user IDs added or revoked, key revoked.
    changes: tuple[KeyChange, ...] = ()
    #: Addresses this import gave a further key (refused for sending until one is chosen).
    conflicts: tuple[AddressConflict, ...] = ()


@dataclass(frozen=True)
class GeneratedKey:
    fingerprint: str
    user_id: str


@dataclass(frozen=True)
class MigratedKey:
    """One key ``keys migrate`` moved (or found already moved) into the certificate store."""

    fingerprint: str
    addresses: tuple[str, ...]
    #: Fingerprints of the (sub)keys whose secret moved with it.
    secrets: tuple[str, ...]
    #: The certificate or secret key was not in the store before.
    moved: bool
    #: The secret key had no passphrase in the GnuPG home and is stored as it was.
    unprotected: bool = False
    #: What gpg could do with the key that the store cannot ("" when nothing), e.g. an
    #: algorithm Sequoia refuses: the key is in the store but will be refused there.
    lost: str = ""


@dataclass(frozen=True)
class Migration:
    """What ``keys migrate`` did: the store now serves the home; the GnuPG home is kept."""

    store: Path
    gnupg_home: Path
    keys: tuple[MigratedKey, ...]


@dataclass
class _Listing:
    stamp: tuple[object, ...]
    keys: tuple[OpenPGPKey, ...] = field(default_factory=tuple)


#: Answers kept per keystore state (:meth:`Keystore.judged`): past this many, new ones are
#: computed each time (a bulk run to a great many different addresses).
_MAX_ANSWERS = 1024

_T = TypeVar("_T")


@dataclass
class _Answers:
    """Answers made from one listing and one reading of the record of key sources, valid
    from ``since`` (the latest of the keys' creation and expiry times not after the moment
    they were made) until ``until`` (the earliest after it): the keystore's judgment of a
    key changes only as the clock passes one of those times (SubKey.problem)."""

    keys: tuple[OpenPGPKey, ...]
    record: Mapping[str, object]
    since: datetime | None
    until: datetime | None
    answers: dict[Hashable, object] = field(default_factory=dict)

    @classmethod
    def for_listing(
        cls, keys: tuple[OpenPGPKey, ...], record: Mapping[str, object], now: datetime
    ) -> _Answers:
        times = {
            t
            for key in keys
            for sub in (key.primary, *key.subkeys)
            for t in (sub.created, sub.expires)
            if t is not None
        }
        since = max((t for t in times if t <= now), default=None)
        until = min((t for t in times if t > now), default=None)
        return cls(keys, record, since, until)

    def holds(self, now: datetime) -> bool:
        return (self.since is None or self.since <= now) and (
            self.until is None or now < self.until
        )


def _lost(before: OpenPGPKey, after: OpenPGPKey) -> str:
    """What ``before`` (judged by gpg) could do that ``after`` (judged in the store) cannot."""
    gone = []
    if before.encryption_problem() is None and after.encryption_problem() is not None:
        gone.append("encryption")
    if (
        before.has_secret
        and before.signing_problem() is None
        and after.signing_problem() is not None
    ):
        gone.append("signing")
    if not gone:
        return ""
    return f"usable for {' and '.join(gone)} with gpg, not in the store: {after.status()}"


def check_expiry(expire: str) -> str:
    """``expire`` if GnuPG's ``Expire-Date`` takes it as we mean it, else ConfigError: ``0`` or
    ``never``, a number of days, ``Nd``/``Nw``/``Nm``/``Ny``, or a future ISO date."""
    value = expire.strip()
    if not _EXPIRY.match(value):
        raise ConfigError(
            f"invalid expiry {expire!r}: give 0 (never), a number of days, Nd, Nw, Nm or Ny "
            "(e.g. 2y), or a date YYYY-MM-DD"
        )
    if "-" in value:
        try:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise ConfigError(f"invalid expiry date {expire!r}") from None
        if day <= datetime.now(UTC):
            raise ConfigError(f"expiry date {expire} is not in the future")
    return value


def _parse_colons(public: str, secret_fprs: set[str]) -> list[OpenPGPKey]:
    """Parse ``gpg --with-colons --fixed-list-mode --check-sigs`` output (doc/DETAILS)."""
    keys: list[OpenPGPKey] = []
    primary: dict[str, str] | None = None
    subs: list[dict[str, str]] = []
    uids: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    # The record the following "sig" lines belong to (a uid or a sub), with the class of
    # self-signature that binds it.
    signed: tuple[dict[str, str], set[str]] | None = None

    def flush() -> None:
        if primary is None:
            return
        keys.append(
            OpenPGPKey(
                primary=_subkey(primary, secret_fprs),
                subkeys=tuple(_subkey(s, secret_fprs) for s in subs if s.get("fpr")),
                user_ids=tuple(
                    UserID(u["text"], u["validity"], int(u["hash"]) if u.get("hash") else None)
                    for u in uids
                ),
                disabled="D" in primary.get("caps", ""),
            )
        )

    for line in public.splitlines():
        f = line.split(":")
        kind = f[0]
        if kind == "pub":
            flush()
            primary, subs, uids = _record(f), [], []
            current, signed = primary, None
        elif kind == "sub" and primary is not None:
            current = _record(f)
            subs.append(current)
            signed = (current, {"18x"})
        elif kind == "fpr" and current is not None and "fpr" not in current:
            current["fpr"] = f[9]
        elif kind == "uid" and primary is not None:
            uid = {"text": _unescape_colons(f[9]), "validity": f[1]}
            uids.append(uid)
            current, signed = None, (uid, _USER_ID_CERTIFICATIONS)
        elif kind == "sig" and primary is not None and signed is not None and len(f) > 15:
            # --check-sigs marks a verified signature with "!"; anything else (bad "-", no
            # key "?", error "%") binds nothing, or a forged newer self-signature could hide
            # the real SHA-1 one.
            if f[1] != "!":
                continue
            target, classes = signed
            # A self-signature: issued by the primary key, of the class that binds the record.
            # The newest one is in force (RFC 9580 §5.2.3.10), so keep its hash.
            when = f[5].zfill(12)
            if f[4] == primary["keyid"] and f[10] in classes and when >= target.get("sigtime", ""):
                target["sigtime"], target["hash"] = when, f[15]
        elif kind == "uat":  # a user attribute (photo): its signatures bind nothing we read
            signed = None
    flush()
    return keys


def _record(f: list[str]) -> dict[str, str]:
    f = f + [""] * (20 - len(f))
    return {
        "validity": f[1],
        "length": f[2],
        "algo": f[3],
        "keyid": f[4],
        "created": f[5],
        "expires": f[6],
        "caps": f[11],
        "curve": f[16],
    }


def _subkey(r: dict[str, str], secret_fprs: set[str]) -> SubKey:
    return SubKey(
        fingerprint=r["fpr"],
        algorithm_id=int(r["algo"] or 0),
        length=int(r["length"] or 0),
        curve=r["curve"],
        # Lower-case letters are the subkey's own usage; the primary's upper-case letters sum up
        # the whole key and are not per-key capabilities.
        capabilities="".join(c for c in r["caps"] if c.islower()),
        validity=r["validity"],
        created=_timestamp(r["created"]),
        expires=_timestamp(r["expires"]),
        has_secret=r["fpr"] in secret_fprs,
        binding_hash=int(r["hash"]) if r.get("hash") else None,
    )


# -- Certificate store helpers -----------------------------------------------------------------


def _sq() -> Any:
    try:
        import pysequoia
    except ImportError as exc:
        raise KeystoreError(f"the certificate store needs pysequoia: {exc}") from exc
    return pysequoia


def _first_line(exc: BaseException) -> str:
    # pysequoia's errors may carry a Rust backtrace after the first line.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _file_tag(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _refuse_loose(path: str | Path, st: os.stat_result, *, what: str) -> None:
    """:func:`check_private` for a path already stat'ed: the same refusal and wording, with
    no second stat (nor a Path object, per lookup) for a path that is fine."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        check_private(Path(path), what=what)


def _judge(data: bytes) -> list[OpenPGPKey]:
    """Every certificate in ``data`` judged by e2email's rules without gpg."""
    from e2email.pgpkeys import keys_from_bytes  # type: ignore[import-not-found,unused-ignore]

    judged: list[OpenPGPKey] = keys_from_bytes(data)
    return judged


def _secret_fprs(tsk_bytes: bytes) -> set[str]:
    """Fingerprints of the (sub)keys whose secret key material ``tsk_bytes`` holds (a gpg
    stub for a key on a card has none: S2K usage 101 is a stub, RFC 9580 §3.7.2.1 / gpg)."""
    return secret_fingerprints(tsk_bytes)


def _certificate_chunks(data: bytes) -> list[list[Any]] | None:
    """The packets of ``data`` (armored or binary, concatenated certificates or secret keys)
    cut into one list per certificate, each from its primary key packet to the next; None
    when ``data`` is not OpenPGP packets at all."""
    from pysequoia.packet import PacketPile, Tag

    try:
        packets = list(PacketPile.from_bytes(data))
    except (RuntimeError, ValueError):
        return None
    chunks: list[list[Any]] = []
    for packet in packets:
        if packet.tag in (Tag.PublicKey, Tag.SecretKey):
            chunks.append([])
        if chunks:
            chunks[-1].append(packet)
    return chunks


def _secret_keys_in(data: bytes) -> dict[str, bytes]:
    """Each transferable secret key in ``data`` (armored or binary, concatenated), by
    upper-case primary fingerprint: the packets from one primary key to the next."""
    sq = _sq()
    from pysequoia.packet import Tag

    chunks = _certificate_chunks(data)
    if chunks is None:
        return {}
    found = {}
    for chunk in chunks:
        if chunk[0].tag != Tag.SecretKey and not any(p.tag == Tag.SecretSubkey for p in chunk):
            continue
        try:
            tsk = sq.Tsk.from_packets(chunk)
        except (RuntimeError, ValueError) as exc:
            raise KeystoreError(f"cannot read a secret key: {_first_line(exc)}") from exc
        found[(chunk[0].fingerprint or "").upper()] = bytes(tsk)
    return found


def _with_secret_packets(public: bytes, tsk_bytes: bytes) -> bytes:
    """The stored certificate ``public`` (with every signature merged into it since) with the
    key packets whose secret ``tsk_bytes`` holds replaced by those secret key packets: the
    current certificate, as a transferable secret key. ``public`` when that fails."""
    sq = _sq()
    from pysequoia.packet import PacketPile, Tag

    try:
        secret = {
            (p.fingerprint or "").upper(): p
            for p in PacketPile.from_bytes(tsk_bytes)
            if p.tag in (Tag.SecretKey, Tag.SecretSubkey)
        }
        out = [
            secret.get((p.fingerprint or "").upper(), p)
            if p.tag in (Tag.PublicKey, Tag.PublicSubkey)
            else p
            for p in PacketPile.from_bytes(public)
        ]
        return bytes(sq.Tsk.from_packets(out))
    except (RuntimeError, ValueError):
        return public


def _armor(data: bytes, *, secret: bool) -> bytes:
    sq = _sq()
    kind = sq.ArmorKind.SecretKey if secret else sq.ArmorKind.PublicKey
    text = sq.armor(data, kind)
    return text.encode("ascii") if isinstance(text, str) else bytes(text)


def _uid_text(packet: Any) -> str:
    value = packet.user_id
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value or "")


def _validity_seconds(expire: str) -> int | None:
    """``Expire-Date`` (as :func:`check_expiry` accepts it) as seconds from now; None: never."""
    value = expire.strip().lower()
    if value in ("0", "never"):
        return None
    if "-" in value:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        return max(1, int((day - datetime.now(UTC)).total_seconds()))
    unit = value[-1] if value[-1] in "dwmy" else "d"
    count = int(value.rstrip("dwmy"))
    days = {"d": 1, "w": 7, "m": 30, "y": 365}[unit] * count
    return days * 86400 or None


def _filter_address(address: str) -> str:
    """``address`` for a gpg filter expression (``mbox = ADDR``): lower case, and nothing a
    filter would read as syntax (the expression ends at the line)."""
    addr = address.strip().lower()
    # Whitespace or anything unprintable: the only printable whitespace is the ASCII space
    # (str.isprintable: Unicode "Other" and "Separator" are unprintable but for it), and
    # the whole string is judged in one call rather than a character at a time.
    if not addr or not addr.isprintable() or " " in addr or "@" not in addr:
        raise MessageError(f"invalid address {address!r}")
    return addr


def _gpg_export(
    gpg_binary: str, home: Path, fingerprint: str, address: str, keep_subkey: str | None
) -> bytes:
    """Export ``fingerprint`` with only the user IDs carrying ``address`` (gpg compares the
    mailbox lower-cased) and no third-party signatures; with ``keep_subkey``, only that
    subkey (the primary's own fingerprint keeps none)."""
    cmd = [
        gpg_binary,
        "--homedir",
        str(home),
        "--no-options",
        "--batch",
        "--no-tty",
        "--export-options",
        "export-minimal",
        "--export-filter",
        f"keep-uid=mbox = {address}",
    ]
    if keep_subkey is not None:
        cmd += ["--export-filter", f"drop-subkey=fpr <> {keep_subkey}"]
    try:
        done = subprocess.run(
            [*cmd, "--export", fingerprint], capture_output=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeystoreError(f"cannot run {gpg_binary}: {exc}") from exc
    if done.returncode != 0:
        raise KeystoreError(f"gpg --export failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


@dataclass(frozen=True)
class VettedKey:
    """A key from outside (WKD, a keyserver, an Autocrypt header) that passed the keystore's
    rules for one address: ``data`` holds only the user IDs naming that address."""

    address: str
    fingerprint: str
    data: bytes
    key: OpenPGPKey


def vet_key(data: bytes, address: str, *, gpg_binary: str = "gpg") -> VettedKey | KeyProblem:
    """Judge key ``data`` found for ``address`` exactly as the keystore judges its own keys.

    The data goes into a throwaway GnuPG home, never into the user's keyring, with every user
    ID that does not name the address dropped (a WKD or keyserver answer may carry user IDs
    for other people, or a second key: Mailvelope keeps only the matching ones). Then the
    keystore's own choice runs there: expired, revoked, weak (RSA < 2048, SHA-1 bindings), no
    encryption subkey, several candidate keys are refused with the keystore's reasons; a key
    without a user ID for the address is ADDRESS_MISMATCH. The result is the key re-exported
    with only the matching user IDs and no third-party signatures."""
    import shutil
    import tempfile

    addr = _filter_address(address)
    if not data.strip():
        return KeyProblem(addr, KeyReason.NOT_FOUND, "the answer was empty")
    if shutil.which(gpg_binary) is None:
        return _vet_key_certd(data, addr)
    scratch_dir = Path(tempfile.mkdtemp(prefix="e2v"))
    scratch = Keystore(scratch_dir, gpg_binary=gpg_binary)
    secret = False
    try:
        result = scratch.gpg.import_keys(
            data, extra_args=["--import-filter", f"keep-uid=mbox = {addr}"]
        )
        scratch.invalidate()
        secret = bool(int(result.sec_imported or 0))
        if not any(r.get("fingerprint") for r in result.results):
            # gpg drops a key left without user IDs: was there a key for someone else?
            unfiltered = scratch.gpg.import_keys(data)
            if any(r.get("fingerprint") for r in unfiltered.results):
                return KeyProblem(addr, KeyReason.ADDRESS_MISMATCH, "no user ID with the address")
            return KeyProblem(addr, KeyReason.INVALID, "no OpenPGP key in the answer")
        choice = _vetted_choice(scratch, addr)
        if isinstance(choice, KeyProblem):
            return choice
        minimal = _gpg_export(gpg_binary, scratch.gnupg_home, choice.fingerprint, addr, None)
        return VettedKey(addr, choice.fingerprint, minimal, choice)
    finally:
        if secret:  # secret keys go through a gpg-agent, which must not outlive the home
            scratch.shutdown_agent()
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _vetted_choice(scratch: Keystore, addr: str) -> OpenPGPKey | KeyProblem:
    """The one usable key for ``addr`` in a throwaway store holding only what a discovery
    answer kept for it. The import filter kept the user IDs whose ``mbox`` is the address; the
    key must carry no other, or it would later be chosen for another address (a user ID
    naming two). Anything else is refused (fail closed)."""
    choice = scratch._choose(addr, None, purpose="encrypt")
    if isinstance(choice, KeyProblem):
        if choice.reason is KeyReason.NOT_FOUND:
            return KeyProblem(addr, KeyReason.ADDRESS_MISMATCH, "no user ID with the address")
        return choice
    strays = [u.text for u in choice.user_ids if u.validity != "r" and u.address != addr]
    if strays:
        return KeyProblem(
            addr,
            KeyReason.ADDRESS_MISMATCH,
            f"a user ID does not name only the address: {strays[0]!r}",
            choice.fingerprint,
        )
    return choice


def _vet_key_certd(data: bytes, addr: str) -> VettedKey | KeyProblem:
    """:func:`vet_key` without gpg: the same steps on a throwaway certificate store. User IDs
    whose address (gpg's ``mbox`` rule, :func:`_uid_address`) is not ``addr`` are dropped with
    their signatures before anything is judged, as gpg's ``keep-uid`` import filter does; a
    certificate left without one is dropped; secret key material is never kept."""
    import tempfile

    sq = _sq()
    from pysequoia.packet import Tag

    chunks = _certificate_chunks(data)
    if chunks is None:
        return KeyProblem(addr, KeyReason.INVALID, "no OpenPGP key in the answer")
    kept: list[bytes] = []
    for chunk in chunks:
        out: list[Any] = []
        keep = True
        has_uid = False
        for packet in chunk:
            if packet.tag == Tag.UserID:
                keep = _uid_address(_uid_text(packet)) == addr
                has_uid = has_uid or keep
            elif packet.tag == Tag.UserAttribute:
                keep = False
            elif packet.tag in (Tag.PublicSubkey, Tag.SecretSubkey):
                keep = True
            if keep:
                out.append(packet)
        if has_uid:
            try:
                kept.append(bytes(sq.Cert.from_packets(out)))  # public parts only
            except (RuntimeError, ValueError):
                continue
    if not kept:
        if chunks:
            return KeyProblem(addr, KeyReason.ADDRESS_MISMATCH, "no user ID with the address")
        return KeyProblem(addr, KeyReason.INVALID, "no OpenPGP key in the answer")
    scratch_dir = Path(tempfile.mkdtemp(prefix="e2v"))
    try:
        scratch = Keystore(scratch_dir, backend="certd")
        scratch.import_keys(b"".join(kept))
        choice = _vetted_choice(scratch, addr)
        if isinstance(choice, KeyProblem):
            return choice
        minimal = scratch._minimal_certd(choice.fingerprint, addr, None)
        return VettedKey(addr, choice.fingerprint, minimal, choice)
    except KeystoreError as exc:
        return KeyProblem(addr, KeyReason.INVALID, str(exc))
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _status_lines(result: object, keyword: str) -> list[list[str]]:
    prefix = f"[GNUPG:] {keyword} "
    text = getattr(result, "stderr", "") or ""
    return [ln[len(prefix) :].split() for ln in text.splitlines() if ln.startswith(prefix)]


def _change(old: OpenPGPKey | None, new: OpenPGPKey) -> KeyChange:
    """What happened to one certificate between two listings."""
    # A revoked key lists every user ID as revoked: it is still named by them.
    key_revoked = new.primary.validity == "r"
    current = tuple(u.text for u in new.user_ids if u.validity != "r" or key_revoked)
    if old is None:
        return KeyChange(
            new.fingerprint,
            True,
            current,
            added_user_ids=current,
            revoked=key_revoked,
            secret_added=new.has_secret,
        )
    old_ids = {u.text: u.validity for u in old.user_ids}
    added = tuple(t for t in current if t not in old_ids)
    revoked = tuple(
        u.text
        for u in new.user_ids
        if u.validity == "r" and old_ids.get(u.text, "r") != "r" and not key_revoked
    )
    old_subs = {k.fingerprint: (k.validity, k.expires) for k in old.subkeys}
    return KeyChange(
        new.fingerprint,
        False,
        current,
        added_user_ids=added,
        revoked_user_ids=revoked,
        revoked=key_revoked and old.primary.validity != "r",
        secret_added=new.has_secret and not old.has_secret,
        added_subkeys=tuple(k.fingerprint for k in new.subkeys if k.fingerprint not in old_subs),
        changed_subkeys=tuple(
            k.fingerprint
            for k in new.subkeys
            if k.fingerprint in old_subs and old_subs[k.fingerprint] != (k.validity, k.expires)
        ),
    )


class Keystore:
    """The user's keys: a GnuPG home under ``home`` (or the one named by ``gnupg_home``).

    Listings are cached and refreshed when the keyring files change, so looking up keys for
    many messages does not start a gpg process per message.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        gnupg_home: str | os.PathLike[str] | None = None,
        gpg_binary: str = "gpg",
        backend: str | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        #: False when an existing GnuPG home was named: then gpg's own validity counts, and its
        #: gpg-agent settings are the user's own.
        self.managed = gnupg_home is None
        self.gnupg_home = Path(gnupg_home) if gnupg_home is not None else self.home / "gnupg"
        self.gpg_binary = gpg_binary
        self.sources = KeySources(self.home)
        #: The certificate store of this home (public certificates, cert-d layout) and its
        #: passphrase-protected secret keys; used when :attr:`backend` is "certd".
        self.certd = CertDirectory(self.home / CERT_DIR)
        self.secret_keys = SecretKeys(self.home / SECRET_DIR)
        if backend is not None and backend not in BACKENDS:
            raise ConfigError(f"unknown keystore backend {backend!r} ({', '.join(BACKENDS)})")
        if backend == "certd" and gnupg_home is not None:
            raise ConfigError("a named GnuPG home is a GnuPG keystore, not a certificate store")
        #: "certd" (the certificate store) or "gnupg" (a GnuPG home): see the module docstring.
        self.backend: str = backend or self._pick_backend(gnupg_home is not None)
        #: Whether the backend was picked from what the home holds (not named): such a
        #: keystore follows the home to its store when ``keys migrate`` switches it.
        self._follows = backend is None and gnupg_home is None
        if self.backend == "certd":
            # Only the GnuPG engine uses a GnuPG home here: a copy of the store, made for it.
            self.gnupg_home = self.home / "gnupg-engine"
        self._gpg: gnupg.GPG | None = None
        self._lock = threading.Lock()
        self._listing: _Listing | None = None
        self._minimal: dict[tuple[object, ...], bytes] = {}
        #: Certificate files left out of the listing (unreadable), each warned about once.
        self._skipped: set[tuple[Path, object]] = set()
        #: (file tag of the record of key sources, the keys disabled in it).
        self._disabled_cache: tuple[object, frozenset[str]] | None = None
        #: The store's folder stamp when the GnuPG engine's copy was last brought in step.
        self._synced_folders: tuple[object, ...] | None = None
        #: The listing an address index was made from, and the index (see :meth:`find`).
        self._index: tuple[tuple[OpenPGPKey, ...], dict[str, tuple[OpenPGPKey, ...]]] | None = None
        #: Per thread: the listing an operation in :meth:`pinned` uses throughout, and the
        #: generation it was taken at (bumped by every change this process makes).
        self._pin = threading.local()
        self._generation = 0
        #: Certificate store: fingerprint -> (file tag, secret file tag, judged key).
        self._judged: dict[str, tuple[object, object, OpenPGPKey]] = {}
        #: The GnuPG home and the paths of the files :meth:`_stamp` looks at.
        self._stamp_paths: tuple[Path, list[str]] | None = None
        #: Answers kept for the keystore state they were made in (see :meth:`judged`).
        self._answers: _Answers | None = None

    def _pick_backend(self, named: bool) -> str:
        """A named GnuPG home is one; a home with a certificate store uses it; a home that
        still has only e2email's GnuPG home keeps it until ``keys migrate``; a new home gets
        the certificate store when gpg is not installed, else a GnuPG home (both engines use
        either; only a GnuPG home serves the GnuPG engine and smartcards)."""
        if named:
            return "gnupg"
        wanted = os.environ.get("E2EMAIL_KEYSTORE", "").strip().lower()
        if self.certd.exists():
            return "certd"
        if self.gnupg_home.exists():
            if wanted == "certd":
                # Said, not silently ignored: the keys are in the GnuPG home until moved.
                _log.warning(
                    "E2EMAIL_KEYSTORE=certd is not used for %s: its keys are in %s; "
                    "`e2email keys migrate` moves them to the certificate store",
                    self.home,
                    self.gnupg_home,
                )
            return "gnupg"
        if wanted in BACKENDS:
            return wanted
        return "gnupg" if shutil.which(self.gpg_binary) is not None else "certd"

    @property
    def is_certd(self) -> bool:
        return self.backend == "certd"

    def _follow_migration(self) -> None:
        """A process that started while the home still used its GnuPG home (a web app, the
        relay, a worker) switches to the store once ``keys migrate`` made one: the GnuPG home
        is no longer kept up to date (a revocation imported since is only in the store), so
        using it would send to keys the user has revoked. One stat per listing."""
        if self._follows and self.backend == "gnupg" and self.certd.exists():
            self._switch_to_store()

    def _switch_to_store(self) -> None:
        with self._lock:
            self.backend = "certd"
            self.gnupg_home = self.home / "gnupg-engine"
            self._gpg = None
            self._minimal.clear()
        self.invalidate()

    def __repr__(self) -> str:
        if self.is_certd:
            return f"Keystore(home={str(self.home)!r}, backend='certd')"
        return f"Keystore(home={str(self.home)!r}, gnupg_home={str(self.gnupg_home)!r})"

    # -- GnuPG plumbing ---------------------------------------------------------------------

    @property
    def gpg(self) -> gnupg.GPG:
        """The python-gnupg handle, creating the GnuPG home (mode 0700) on first use. With the
        certificate store: the GnuPG engine's copy of it (see :meth:`_sync_engine_home`)."""
        self._follow_migration()
        if shutil.which(self.gpg_binary) is None:
            if self.is_certd:
                raise KeystoreError(
                    f"the GnuPG engine needs the gpg program ({self.gpg_binary!r}), which is "
                    "not installed: use --engine sequoia"
                )
            raise KeystoreError(
                f"the OpenPGP keys of {self.home} are in the GnuPG home {self.gnupg_home}, and "
                f"the gpg program ({self.gpg_binary!r}) is not installed: install GnuPG "
                "(then `e2email keys migrate` moves the keys to a store that needs no gpg)"
            )
        with self._lock:
            if self._gpg is None:
                # gpg only warns about a loose home ("unsafe permissions"); whoever may write
                # it can swap a key, so it is refused (issue 8 item 6), as ssh refuses ~/.ssh.
                ensure_private_dir(self.gnupg_home, what="GnuPG home")
                self._check_keyring_files()
                if self.managed:
                    self._configure_agent()
                try:
                    self._gpg = gnupg.GPG(gpgbinary=self.gpg_binary, gnupghome=str(self.gnupg_home))
                except (OSError, ValueError, RuntimeError) as exc:
                    raise KeystoreError(f"cannot use GnuPG home {self.gnupg_home}: {exc}") from exc
                self._gpg.encoding = "utf-8"
            if self.is_certd:
                self._sync_engine_home(self._gpg)
            return self._gpg

    def _sync_engine_home(self, handle: gnupg.GPG) -> None:
        """Keep the GnuPG engine's home (``HOME/gnupg-engine``) in step with the certificate
        store, which stays the one place keys are kept and judged: a certificate or secret key
        whose file changed since it was last imported is imported again (gpg merges what it
        has; a protected secret key is imported as it is, and unlocked by each message's
        passphrase through loopback; a secret key file replaced, say under a new passphrase,
        replaces gpg's copy). The file tags last imported are noted in the folder, so another
        process imports only what changed since; while no folder of the store changed (one
        stat per folder) nothing is read at all."""
        folders = self._store_folders()
        if self._synced_folders == folders:
            return
        note = self.gnupg_home / "e2email-synced"
        try:
            done = json.loads(note.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if not isinstance(done, dict):
            done = {}
        old_certs: dict[str, Any] = done.get("certs") or {}
        old_secrets: dict[str, Any] = done.get("secrets") or {}
        if not isinstance(old_certs, dict) or not isinstance(old_secrets, dict):
            old_certs, old_secrets = {}, {}
        certs = {f: list(t) for f, t in self.certd.tags().items()}
        secrets = {
            f: list(t)
            for f in sorted(self.secret_keys.fingerprints())
            if (t := self.secret_keys.tag(f)) is not None
        }
        data = [self.certd.get(f) or b"" for f, t in sorted(certs.items()) if old_certs.get(f) != t]
        for fpr, tag in secrets.items():
            if old_secrets.get(fpr) == tag:
                continue
            if fpr in old_secrets:
                # gpg keeps the secret key it has on import ("not changed"): a replaced file
                # (a new passphrase) reaches gpg only once the old copy is gone.
                handle.delete_keys(fpr, secret=True, expect_passphrase=False)
            data.append(self.secret_keys.get(fpr) or b"")
        if any(data):
            result = handle.import_keys(b"".join(data))
            if not result.results:
                raise KeystoreError(
                    f"gpg did not take the certificate store into {self.gnupg_home}"
                )
        with open_private(note, "w") as fh:
            json.dump({"certs": certs, "secrets": secrets}, fh)
        self._synced_folders = folders

    def _check_keyring_files(self) -> None:
        """The files gpg reads keys and ownertrust from must be as private as the folder:
        whoever may write them can swap a key or trust one. In e2email's own home they are
        narrowed (gpg made them under the user's umask); in a named home a loose one is
        refused, as the folder is."""
        for name in _KEYRING_FILES:
            path = self.gnupg_home / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise KeystoreError(f"cannot check {path}: {exc.strerror or exc}") from exc
            if (
                self.managed
                and st.st_uid == os.geteuid()
                and not stat.S_ISLNK(st.st_mode)
                and stat.S_IMODE(st.st_mode) & 0o077
            ):
                path.chmod(0o700 if stat.S_ISDIR(st.st_mode) else 0o600)
            check_private(path, what="GnuPG keyring file")

    def _configure_agent(self) -> None:
        """Make the managed home's gpg-agent keep no passphrase in its cache.

        gpg-agent reads its configuration only when it starts or is told to reload: if the
        file had to be changed, a running agent is reloaded, which also flushes the
        passphrases it holds (gpg-agent(1), SIGHUP)."""
        conf = self.gnupg_home / "gpg-agent.conf"
        try:
            old = conf.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            old = []
        except OSError as exc:
            raise KeystoreError(f"cannot read {conf}: {exc.strerror or exc}") from exc
        kept = [
            ln for ln in old if ln.split()[:1] not in (["default-cache-ttl"], ["max-cache-ttl"])
        ]
        new = [*kept, *_AGENT_CONF]
        if new == old:
            return
        tmp = conf.with_name(".gpg-agent.conf.tmp")
        with open_private(tmp) as fh:
            fh.write("\n".join(new) + "\n")
        os.replace(tmp, conf)
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupg_home), "--reload", "gpg-agent"],
            capture_output=True,
            check=False,
        )

    def forget_passphrase(self, subkey_fingerprint: str) -> None:
        """Make gpg-agent ask for the passphrase of this (secret) subkey again.

        With a passphrase given for a message, what unlocks the key must be that passphrase:
        a passphrase cached by the agent of a named GnuPG home would otherwise hide a wrong one
        (issue 8 item 18). e2email's own home keeps no cache (``_AGENT_CONF``), so nothing is
        done there. The agent's cache entry is keyed by the keygrip (gpg-agent(1),
        CLEAR_PASSPHRASE); the passphrase that then unlocks the key is cached again as the
        user's agent settings say."""
        if self.managed:
            return
        listing = self._run_gpg("--with-keygrip", "--list-secret-keys", f"{subkey_fingerprint}!")
        grip = None
        current = None
        for line in listing.splitlines():
            fields = line.split(":")
            if fields[0] == "fpr" and len(fields) > 9:
                current = fields[9]
            elif fields[0] == "grp" and len(fields) > 9 and current == subkey_fingerprint:
                grip = fields[9]
                break
        if grip is None:
            return  # no secret for it here: gpg will say so when signing
        try:
            subprocess.run(
                [
                    "gpg-connect-agent",
                    "--homedir",
                    str(self.gnupg_home),
                    f"CLEAR_PASSPHRASE --mode=normal {grip}",
                    "/bye",
                ],
                capture_output=True,
                check=False,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeystoreError(f"cannot reach the gpg-agent of {self.gnupg_home}: {exc}") from exc

    def _run_gpg(self, *args: str) -> str:
        self.gpg  # noqa: B018 - ensures the home exists
        cmd = [
            self.gpg_binary,
            "--homedir",
            str(self.gnupg_home),
            # A gpg.conf must not change what we read: "trust-model always" there would hide
            # the validity a named GnuPG home's own web of trust gives (doc/DETAILS field 2).
            "--no-options",
            "--batch",
            "--no-tty",
            "--with-colons",
            "--fixed-list-mode",
            *args,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeystoreError(f"cannot run {self.gpg_binary}: {exc}") from exc
        if done.returncode not in (0, 2):  # 2: "some keys not found", still a valid listing
            raise KeystoreError(
                f"gpg {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout.decode("utf-8", errors="replace")

    def _pinned_stamp(self) -> tuple[object, ...]:
        """:meth:`_stamp`, taken once per :meth:`pinned` operation in this thread."""
        if getattr(self._pin, "depth", 0) == 0:
            return self._stamp()
        stamp: tuple[object, ...] | None = getattr(self._pin, "stamp", None)
        if stamp is None or getattr(self._pin, "stamp_generation", None) != self._generation:
            self._pin.stamp_generation = self._generation
            stamp = self._pin.stamp = self._stamp()
        return stamp

    def _stamp(self) -> tuple[object, ...]:
        if self.is_certd:
            return (
                tuple(sorted(self.certd.tags().items())),
                tuple(
                    sorted((f, self.secret_keys.tag(f)) for f in self.secret_keys.fingerprints())
                ),
            )
        home = self.gnupg_home
        paths = self._stamp_paths
        if paths is None or paths[0] is not home:
            # Joined strings, once per home: a Path (or a join) per file per message cost
            # more than the stat itself.
            names = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "private-keys-v1.d")
            paths = self._stamp_paths = (home, [os.path.join(home, n) for n in names])
        stamp: list[int] = []
        for path in paths[1]:
            try:
                st = os.stat(path)
            except OSError:
                stamp += [0, 0, 0, 0]
            else:
                # The inode and the change time too: a keybox deletion only marks its
                # record (same size), and a write in the same mtime tick, or one whose mtime
                # was set back, still moves ctime.
                stamp += [st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns]
        return tuple(stamp)

    def invalidate(self) -> None:
        """Forget the cached listing (done automatically when the keyring files change)."""
        self._listing = None
        self._judged.clear()
        self._answers = None
        self._pin.keys = None
        self._pin.stamp = None
        self._generation += 1  # other threads' pinned listings are dropped at their next look

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """One listing for a whole operation in this thread (all the lookups that resolve one
        message's keys): the keystore is checked for changes at the first lookup, not at each
        of them (a stat of every keyring file per lookup was a fifth of a small message's
        protection). A change made through this Keystore, in any thread (import, invalidate),
        still counts at the next lookup; another process's (or another Keystore object's)
        change to the keyring counts from the next operation: at worst one message's lookups
        see the keys as they were when it began. The key-sources record is pinned the same
        way, but sees a write by any of this process's objects at once."""
        depth = getattr(self._pin, "depth", 0)
        self._pin.depth = depth + 1
        try:
            with self.sources.pinned():  # the key-sources record: read once, the same way
                yield
        finally:
            self._pin.depth = depth
            if depth == 0:
                self._pin.keys = None
                self._pin.stamp = None

    def judged(self, question: Hashable, answer: Callable[[], _T]) -> _T:
        """``answer()``, given again for the same ``question`` for as long as nothing it
        may depend on has changed: the listing (any write to the keystore, by this process
        or another, gives a new one: :meth:`all_keys`), the record of key sources (any write
        gives a new reading: :meth:`KeySources.snapshot`), and the span of time between two
        of the listed keys' creation or expiry times that holds the present (a key expiring,
        or the clock set back, ends it). For answers made only from those (the keys one
        message needs: judged once per keystore state, not once per message); an exception
        is never kept. Meant for a :meth:`pinned` operation, where the listing is looked at
        once."""
        keys = self.all_keys()
        record = self.sources.snapshot()
        now = datetime.now(UTC)
        held = self._answers
        if (
            held is None
            or held.keys is not keys
            or held.record is not record
            or not held.holds(now)
        ):
            held = self._answers = _Answers.for_listing(keys, record, now)
        try:
            return cast(_T, held.answers[question])
        except KeyError:
            pass
        value = answer()
        # Kept only if it was made from that very state (the listing of this operation,
        # the same record, and still inside the span).
        if (
            self.all_keys() is keys
            and self.sources.snapshot() is record
            and held.holds(datetime.now(UTC))
            and len(held.answers) < _MAX_ANSWERS
        ):
            held.answers[question] = value
        return value

    # -- Listing and lookup -----------------------------------------------------------------

    def all_keys(self) -> tuple[OpenPGPKey, ...]:
        """Every certificate in the keystore."""
        pinned = getattr(self._pin, "depth", 0) > 0
        if pinned and getattr(self._pin, "generation", None) != self._generation:
            self._pin.keys = self._pin.stamp = None  # this process changed the keystore since
        if pinned and getattr(self._pin, "keys", None) is not None:
            keys: tuple[OpenPGPKey, ...] = self._pin.keys
            return keys
        generation = self._generation
        keys = self._all_keys()
        if pinned:
            self._pin.keys, self._pin.generation = keys, generation
        return keys

    def _all_keys(self) -> tuple[OpenPGPKey, ...]:
        self._follow_migration()
        if self.is_certd:
            return self._all_keys_certd()
        stamp = self._pinned_stamp()
        listing = self._listing
        if listing is not None and listing.stamp == stamp and stamp != (0,) * len(stamp):
            return listing.keys
        secret_out = self._run_gpg("--list-secret-keys")
        secret = set()
        fpr_owner: str | None = None
        for line in secret_out.splitlines():
            f = line.split(":")
            if f[0] in ("sec", "ssb"):
                # Field 15 is '+' when the secret is here, '#' for a stub (doc/DETAILS).
                fpr_owner = "+" if len(f) > 14 and f[14] == "+" else None
            elif f[0] == "fpr" and fpr_owner:
                secret.add(f[9])
                fpr_owner = None
        keys = tuple(_parse_colons(self._run_gpg("--check-sigs"), secret))
        self._listing = _Listing(stamp=stamp, keys=keys)
        return keys

    def get(self, key_spec: str) -> OpenPGPKey | None:
        """The certificate with this fingerprint or (long) key ID, or None."""
        spec = key_spec.replace(" ", "").upper().removeprefix("0X")
        for key in self.all_keys():
            if key.fingerprint == spec or (len(spec) >= 16 and key.fingerprint.endswith(spec)):
                return key
            for sub in key.subkeys:
                if sub.fingerprint == spec:
                    return key
        return None

    def find(self, address: str, *, include_revoked: bool = False) -> tuple[OpenPGPKey, ...]:
        """Certificates whose non-revoked user IDs carry ``address`` (case-insensitive)."""
        addr = address.strip().lower()
        keys = self.all_keys()
        # An address -> keys index, made once per listing: a lookup per recipient per message
        # must not parse every user ID of every key in a large store.
        index = self._index
        if index is None or index[0] is not keys:
            by_address: dict[str, list[OpenPGPKey]] = {}
            for k in keys:
                for a in dict.fromkeys(u.address for u in k.user_ids if u.address):
                    by_address.setdefault(a, []).append(k)
            index = (keys, {a: tuple(ks) for a, ks in by_address.items()})
            self._index = index
        found = index[1].get(addr, ())
        return tuple(k for k in found if k.carries(addr, include_revoked=include_revoked))

    def encryption_key(
        self, address: str, *, key_map: Mapping[str, str] | None = None
    ) -> OpenPGPKey | KeyProblem:
        """The key to encrypt to ``address``, or the problem that prevents it.

        ``key_map`` (address -> fingerprint) overrides lookup by address; the key it names need
        not carry the address (peers' complaint: user IDs that do not match, envelope#9).
        """
        return self._choose(address, key_map, purpose="encrypt")

    def signing_key(
        self, address: str, *, key_map: Mapping[str, str] | None = None
    ) -> OpenPGPKey | KeyProblem:
        """The secret key to sign as ``address``, or the problem that prevents it."""
        return self._choose(address, key_map, purpose="sign")

    def _choose(
        self, address: str, key_map: Mapping[str, str] | None, *, purpose: str
    ) -> OpenPGPKey | KeyProblem:
        addr = address.strip().lower()
        now = datetime.now(UTC)
        override = (key_map or {}).get(addr)
        if override is not None:
            key = self.get(override)
            if key is None:
                return KeyProblem(addr, KeyReason.NOT_FOUND, f"mapped key {override} not found")
            candidates: Sequence[OpenPGPKey] = (key,)
        else:
            candidates = self.find(addr, include_revoked=True)
            if not candidates:
                return KeyProblem(addr, KeyReason.NOT_FOUND)
            # A key accepted by hand for the address (``keys accept``) is the one to use when it
            # carries the address: it decides between keys like a key map, but is still judged.
            pinned = self.sources.accepted(addr) if purpose == "encrypt" else None
            chosen = [k for k in candidates if k.fingerprint == pinned]
            if chosen:
                candidates = chosen

        def problem_of(k: OpenPGPKey) -> tuple[KeyReason, str] | None:
            problem = k.encryption_problem(now) if purpose == "encrypt" else k.signing_problem(now)
            if problem is None and override is None:
                if not k.carries(addr):
                    return KeyReason.ADDRESS_MISMATCH, "the user ID with this address is revoked"
                problem = k.user_id_problem(addr) or self._assurance_problem(k, addr)
            elif problem is None and purpose == "sign" and not k.carries(addr):
                # The signing identity must match From even when chosen explicitly: a
                # signature by a key for another address invites "Johnny, you are fired"
                # confusion (standards item 15). Encryption keys may be mapped freely.
                return KeyReason.ADDRESS_MISMATCH, f"the key {k.fingerprint} does not carry it"
            return problem

        usable = [k for k in candidates if problem_of(k) is None]
        if len(usable) > 1:
            # Several good keys for one address: guessing (the newest, say) lets whoever slips
            # a key into an imported file choose where the message goes. Refuse, naming each
            # key and where it came from; a key map (--key) decides (issue 8 item 1).
            return KeyProblem(
                addr,
                KeyReason.AMBIGUOUS,
                f"{len(usable)} usable keys: {self.describe_keys(usable)}; "
                f"choose one with --key {addr}=FINGERPRINT",
            )
        if usable:
            return usable[0]
        newest = max(candidates, key=lambda k: k.primary.created or now)
        reason, detail = problem_of(newest) or (KeyReason.INVALID, "")
        return KeyProblem(addr, reason, detail, fingerprint=newest.fingerprint)

    def _assurance_problem(self, key: OpenPGPKey, address: str) -> tuple[KeyReason, str] | None:
        """In a named GnuPG home, a key found by address must have gpg's own assurance that it
        belongs to the address (marginal, full or ultimate validity of the user ID), unless
        it is one of the user's own (secret) keys or was imported or made through e2email.
        e2email's own home holds only keys the user chose, so there it is never a problem."""
        if self.managed or key.has_secret or self.sources.get(key.fingerprint) is not None:
            return None
        letters = [u.validity for u in key.user_ids if u.address == address and u.validity != "r"]
        if any(v in _ASSURED for v in letters):
            return None
        shown = ", ".join(dict.fromkeys(_VALIDITY_NAMES.get(v, v or "unknown") for v in letters))
        return (
            KeyReason.UNVALIDATED,
            f"{key.fingerprint}: validity {shown or 'unknown'} in {self.gnupg_home}, no "
            f"assurance it belongs to {address}; certify it there (gpg --lsign-key) or choose "
            f"it with --key {address}=FINGERPRINT",
        )

    def source_of(self, key: OpenPGPKey) -> KeySource | None:
        """Where the key came from, as far as e2email knows."""
        recorded = self.sources.get(key.fingerprint)
        if recorded is None and not self.managed:
            return KeySource(SourceKind.GNUPG_HOME, str(self.gnupg_home))
        return recorded

    def describe_keys(self, keys: Iterable[OpenPGPKey], *, with_status: bool = False) -> str:
        """Each key's fingerprint, creation date and source (and, if asked, whether it is
        usable), for messages that must let the user tell keys apart."""
        parts = []
        for key in keys:
            created = f"created {key.primary.created:%Y-%m-%d}, " if key.primary.created else ""
            source = self.source_of(key) or "source not recorded"
            status = f", {key.status()}" if with_status else ""
            parts.append(f"{key.fingerprint} ({created}{source}{status})")
        return ", ".join(parts)

    def resolve_recipients(
        self, addresses: Iterable[str], *, key_map: Mapping[str, str] | None = None
    ) -> tuple[dict[str, OpenPGPKey], list[KeyProblem]]:
        """Keys for every address, and a problem for each address that has none (fail closed:
        the caller sends nothing when the problem list is not empty)."""
        found: dict[str, OpenPGPKey] = {}
        problems: list[KeyProblem] = []
        for address in addresses:
            choice = self.encryption_key(address, key_map=key_map)
            if isinstance(choice, KeyProblem):
                problems.append(choice)
            else:
                found[address.strip().lower()] = choice
        return found, problems

    def check_fingerprints(
        self, fingerprints: Iterable[str], *, now: datetime | None = None
    ) -> list[KeyProblem]:
        """Re-check keys a message was already encrypted to (e.g. a queued copy's
        ``encrypted_to``, primary fingerprints): one problem per key that is no longer in the
        keystore, or that could not be encrypted to now (revoked, expired, disabled, no usable
        encryption subkey left, ...). An empty list means every key is still good.

        The keyring is read afresh when it changed, so a revocation imported since the copy
        was queued is seen (issue 8 item 3: a copy encrypted to a revoked key is held).
        """
        now = now or datetime.now(UTC)
        problems: list[KeyProblem] = []
        for spec in dict.fromkeys(f.replace(" ", "").upper() for f in fingerprints):
            key = self.get(spec) if spec else None
            if key is None:
                problems.append(
                    KeyProblem(spec, KeyReason.NOT_FOUND, "no longer in the keystore", spec)
                )
                continue
            problem = key.encryption_problem(now)
            if problem is not None:
                # A revoked key's user IDs are listed as revoked too: name it by any of them.
                named = [u.address for u in key.user_ids if u.address]
                who = key.addresses[0] if key.addresses else (named or [key.fingerprint])[0]
                problems.append(KeyProblem(who, problem[0], problem[1], key.fingerprint))
        return problems

    # -- Import, export, generate -----------------------------------------------------------

    def import_keys(
        self,
        data: bytes,
        *,
        source: KeySource | None = None,
        passphrase: str | None = None,
        unprotected: bool = False,
    ) -> ImportSummary:
        """Import armored or binary OpenPGP keys, public or secret, or a bare revocation
        certificate. The summary says, per certificate, which user IDs were added or revoked
        and whether the key was revoked, and which addresses now have more than one key.
        ``source`` is recorded as the origin of keys new to the keystore.

        The certificate store keeps secret keys only passphrase-protected: a secret key
        without protection is protected with ``passphrase``, or stored as it is only with
        ``unprotected=True``, else refused (a GnuPG home keeps them as gpg does)."""
        if not data.strip():
            raise KeystoreError("no key data given")
        if self.is_certd:
            return self._import_certd(
                data, source=source, passphrase=passphrase, unprotected=unprotected
            )
        # Where the key came from is recorded in the home: check it before gpg changes anything.
        ensure_private_dir(self.home, what="e2email home")
        before = {k.fingerprint: k for k in self.all_keys()}
        result = self.gpg.import_keys(data)
        self.invalidate()
        fprs = list(dict.fromkeys(r["fingerprint"] for r in result.results if r.get("fingerprint")))
        # A revocation certificate gets no IMPORT_OK line; KEY_CONSIDERED names its key.
        considered = [a[0] for a in _status_lines(result, "KEY_CONSIDERED") if a]
        after = {k.fingerprint: k for k in self.all_keys()}
        changes = [
            _change(before.get(fpr), after[fpr])
            for fpr in dict.fromkeys([*fprs, *considered])
            if fpr in after
        ]
        for change in changes:
            if change.fingerprint not in fprs and change.changed:
                fprs.append(change.fingerprint)
        if not fprs:
            texts = [str(r.get("text") or "").strip() for r in result.results]
            detail = "; ".join(t.replace("\n", " ") for t in texts if t and not t.isdigit())
            if considered and not changes:
                detail = f"a revocation certificate for {considered[0]}, which is not here"
            raise KeystoreError(
                f"no OpenPGP key found in the data{': ' + detail if detail else ''}"
            )
        new = [c.fingerprint for c in changes if c.new]
        if new:
            self.sources.record(new, source or KeySource(SourceKind.DATA))
        return ImportSummary(
            fingerprints=tuple(fprs),
            imported=int(result.imported or 0),
            unchanged=int(result.unchanged or 0),
            secret_imported=int(result.sec_imported or 0),
            revoked=int(result.n_revoc or 0),
            changes=tuple(c for c in changes if c.changed),
            conflicts=self._conflicts(changes, after),
        )

    def _conflicts(
        self, changes: Sequence[KeyChange], after: Mapping[str, OpenPGPKey]
    ) -> tuple[AddressConflict, ...]:
        """Addresses of keys this import changed (new user IDs, but also a new or changed
        subkey, which can make a key usable) that more than one key now carries."""
        touched: dict[str, None] = {}
        for change in changes:
            if not change.changed or change.revoked:
                continue
            for uid in change.user_ids:
                addr = _uid_address(uid)
                if addr:
                    touched[addr] = None
        found = []
        for addr in touched:
            holders = [k for k in after.values() if k.carries(addr)]
            if len(holders) > 1:
                usable = [k for k in holders if k.encryption_problem() is None]
                found.append(
                    AddressConflict(
                        addr,
                        tuple(k.fingerprint for k in holders),
                        self.describe_keys(holders, with_status=True),
                        ambiguous=len(usable) > 1,
                    )
                )
        return tuple(found)

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: str | None = None,
        unprotected: bool = False,
    ) -> ImportSummary:
        """Import the keys in a file (see :meth:`import_keys`); its path is recorded as the
        source of keys new to the keystore."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            # A file that is not there is bad input (exit 2), not a key refusal.
            raise MessageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        source = KeySource(SourceKind.FILE, str(Path(path).resolve()))
        try:
            return self.import_keys(
                data, source=source, passphrase=passphrase, unprotected=unprotected
            )
        except KeystoreError as exc:
            raise KeystoreError(f"{path}: {exc}") from exc

    def export(self, address_or_fingerprint: str, *, armor: bool = True) -> bytes:
        """The public certificate for an address or fingerprint."""
        key = self.get(address_or_fingerprint)
        if key is None:
            found = self.find(address_or_fingerprint)
            if not found:
                raise KeystoreError(f"no key for {address_or_fingerprint} in the keystore")
            usable = [k for k in found if k.encryption_problem() is None]
            if len(usable) > 1:
                # Handing out the wrong one of two keys is as bad as encrypting to it.
                raise KeystoreError(
                    f"{address_or_fingerprint} has {len(usable)} usable keys: "
                    f"{self.describe_keys(usable)}; export one by its fingerprint"
                )
            key = max(usable or found, key=lambda k: k.primary.created or datetime.now(UTC))
        if self.is_certd:
            raw = self.certd.get(key.fingerprint)
            if not raw:
                raise KeystoreError(f"no certificate for {key.fingerprint} in {self.certd.root}")
            return _armor(raw, secret=False) if armor else raw
        data = self.gpg.export_keys([key.fingerprint], armor=armor)
        out = data.encode("ascii") if isinstance(data, str) else bytes(data)
        if not out:
            raise KeystoreError(f"gpg exported nothing for {key.fingerprint}")
        return out

    def generate(
        self,
        address: str,
        *,
        name: str = "",
        algorithm: str = "ed25519",
        passphrase: str | None = None,
        expire: str = "3y",
        unprotected: bool = False,
    ) -> GeneratedKey:
        """Make a new key pair for ``address``: Ed25519 signing + Cv25519 encryption by default,
        or ``rsa3072`` / ``rsa4096`` (RSA signing primary + RSA encryption subkey)."""
        try:
            address = Address(address.strip()).addr_spec
        except MessageError as exc:
            raise MessageError(f"invalid address: {exc}") from exc
        expire = check_expiry(expire)
        if any(c in name for c in "\r\n\0<>"):
            raise MessageError(f"invalid character in name {name!r}")
        if passphrase is not None and any(c in passphrase for c in "\r\n\0"):
            raise KeystoreError("a passphrase cannot contain CR, LF or NUL")
        if algorithm == "ed25519":
            params = [
                "Key-Type: EDDSA",
                "Key-Curve: ed25519",
                "Subkey-Type: ECDH",
                "Subkey-Curve: cv25519",
            ]
        elif algorithm in ("rsa3072", "rsa4096"):
            bits = algorithm[3:]
            params = [
                "Key-Type: RSA",
                f"Key-Length: {bits}",
                "Subkey-Type: RSA",
                f"Subkey-Length: {bits}",
            ]
        else:
            raise KeystoreError(f"unknown algorithm {algorithm!r} (ed25519, rsa3072, rsa4096)")
        if self.is_certd:
            return self._generate_certd(
                address, name, algorithm, passphrase, expire, unprotected=unprotected
            )
        params += ["Key-Usage: sign", "Subkey-Usage: encrypt"]
        if name:
            params.append(f"Name-Real: {name}")
        params += [f"Name-Email: {address}", f"Expire-Date: {expire}"]
        params.append(f"Passphrase: {passphrase}" if passphrase else "%no-protection")
        params.append("%commit")
        ensure_private_dir(self.home, what="e2email home")
        result = self.gpg.gen_key("\n".join(params) + "\n")
        self.invalidate()
        fpr = getattr(result, "fingerprint", None)
        if not fpr:
            lines = (getattr(result, "stderr", "") or "").strip().splitlines()
            # gpg's own words, never its machine-readable status lines.
            detail = [ln.removeprefix("gpg: ") for ln in lines if not ln.startswith("[GNUPG:]")]
            raise KeystoreError("key generation failed" + (f": {detail[-1]}" if detail else ""))
        self.sources.record([str(fpr)], KeySource(SourceKind.GENERATED))
        uid = f"{name} <{address}>" if name else f"<{address}>"
        return GeneratedKey(fingerprint=str(fpr), user_id=uid)

    def export_minimal(self, key: OpenPGPKey, address: str) -> bytes:
        """The smallest certificate that lets a peer encrypt to ``key`` as ``address``: the
        primary key, the encryption subkey in use, the user ID with the address and their
        self-signatures only (binary; what Autocrypt Level 1 §2.1.1 asks for in ``keydata``).
        """
        addr = _filter_address(address)
        sub = key.encryption_subkey()
        if sub is None or not key.carries(addr):
            raise KeystoreError(f"{key.fingerprint} has no usable encryption key for {addr}")
        # Every message of a bulk send carries it: made once per key state, not per message.
        # Keyed on the certificate's own file (one stat) in a store, not on the whole store:
        # a listing of every certificate per message made the cost grow with the store.
        if self.is_certd:
            state: object = _file_tag(self.certd.path_for(key.fingerprint))
        else:
            state = self._pinned_stamp()
        memo = (key.fingerprint, addr, sub.fingerprint, state)
        cached = self._minimal.get(memo)
        if cached is not None:
            return cached
        if self.is_certd:
            data = self._minimal_certd(key.fingerprint, addr, sub.fingerprint)
        else:
            data = _gpg_export(
                self.gpg_binary, self.gnupg_home, key.fingerprint, addr, sub.fingerprint
            )
        if not data:
            raise KeystoreError(f"gpg exported nothing for {key.fingerprint}")
        if len(self._minimal) > 256:  # keys of one sender and its gossip peers: stay small
            self._minimal.clear()
        self._minimal[memo] = data
        return data

    def shutdown_agent(self) -> None:
        """Stop the gpg-agent of this GnuPG home (used for throwaway homes in demo and tests)."""
        if not self.gnupg_home.exists():
            return  # no agent was ever started for it
        with contextlib.suppress(OSError):  # no gpgconf: no agent either
            subprocess.run(
                ["gpgconf", "--homedir", str(self.gnupg_home), "--kill", "all"],
                capture_output=True,
                check=False,
            )

    # -- Migration from e2email's own GnuPG home ----------------------------------------------

    def migrate(
        self,
        *,
        passphrase: str | None = None,
        ask: Callable[[str], str | None] | None = None,
        unprotected: bool = False,
    ) -> Migration:
        """Copy every certificate and secret key of this home's GnuPG home (``HOME/gnupg``)
        into its certificate store, check both sides hold the same fingerprints and secrets,
        and only then switch the home to the store (the store folder appears last, by a
        rename). The GnuPG home is kept as it is (``--gnupg-home HOME/gnupg`` still uses it);
        running it again moves only what is new. Needs the gpg program.

        Protected secret keys are exported by gpg under ``passphrase`` (gpg 2.2 re-protects
        the export with it); when it does not open a key, ``ask(fingerprint)`` is asked for
        that key's own (None: give up, "wrong passphrase for FPR"). A secret key without a
        passphrase is protected with ``passphrase``, or stored as it is only when
        ``unprotected`` says so (as ``keys import``). A key gpg can use but the store judges
        unusable (DSA/Elgamal, brainpool...) is moved and reported in ``lost``."""
        import tempfile

        if not self.managed:
            raise ConfigError(
                "keys migrate moves e2email's own GnuPG home (HOME/gnupg), not a named one"
            )
        gnupg_home = self.home / "gnupg"
        if not gnupg_home.is_dir():
            raise KeystoreError(f"nothing to migrate: {gnupg_home} does not exist")
        if shutil.which(self.gpg_binary) is None:
            raise KeystoreError(f"keys migrate reads {gnupg_home} with gpg, which is not installed")
        if passphrase is not None and any(c in passphrase for c in "\r\n\0"):
            raise KeystoreError("a passphrase cannot contain CR, LF or NUL")
        source = Keystore(self.home, backend="gnupg", gpg_binary=self.gpg_binary)
        keys = source.all_keys()
        ensure_private_dir(self.home, what="e2email home")
        # A migration interrupted before its switch leaves a staging folder holding copies
        # of secret keys: never left lying about.
        for stale in self.home.glob(".migrate-*"):
            shutil.rmtree(stale, ignore_errors=True)
        existing = self.certd.exists()
        # A new store is built beside the home and renamed into place once checked, so a
        # failure half-way leaves the home on its GnuPG home, unchanged.
        staging = None if existing else Path(tempfile.mkdtemp(prefix=".migrate-", dir=self.home))
        target = Keystore(staging or self.home, backend="certd")
        try:
            before = {k.fingerprint: k for k in target.all_keys()} if existing else {}
            moved: list[MigratedKey] = []
            for key in keys:
                public = source.gpg.export_keys([key.fingerprint], armor=False)
                data = public if isinstance(public, bytes) else bytes(public, "latin-1")
                secret = b""
                if key.has_secret:
                    secret = self._export_asking(source, key, passphrase, ask)
                if secret and not is_protected(secret) and not passphrase and not unprotected:
                    raise KeystoreError(
                        f"the secret key {key.fingerprint} has no passphrase in {gnupg_home}, "
                        "and the certificate store keeps secret keys only under one: give a "
                        "passphrase to protect it with (--passphrase-env VAR), or --unprotected "
                        "to store it as it is; nothing was moved"
                    )
                target.import_keys(data + secret, passphrase=passphrase, unprotected=unprotected)
                now = target.get(key.fingerprint)
                if now is None:
                    raise KeystoreError(f"{key.fingerprint} did not reach the certificate store")
                held = (
                    _secret_fprs(target.secret_keys.get(key.fingerprint) or b"")
                    if key.has_secret
                    else set()
                )
                old = before.get(key.fingerprint)
                moved.append(
                    MigratedKey(
                        fingerprint=key.fingerprint,
                        addresses=key.addresses,
                        secrets=tuple(sorted(held)),
                        moved=old is None or (bool(held) and not old.has_secret),
                        unprotected=bool(secret) and not is_protected(secret) and not passphrase,
                    )
                )
            # Both sides: the same certificates, and every secret gpg has, in the store.
            target.invalidate()
            stored = {k.fingerprint: k for k in target.all_keys()}
            for key in keys:
                got = stored.get(key.fingerprint)
                want = {k.fingerprint for k in (key.primary, *key.subkeys) if k.has_secret}
                # The secrets in the stored file (what the store's judge makes of a key it
                # cannot use is compared below, as the verdict).
                have = (
                    _secret_fprs(target.secret_keys.get(key.fingerprint) or b"") if want else set()
                )
                if got is None or not want <= have:
                    raise KeystoreError(
                        f"migration check failed for {key.fingerprint}: "
                        + (
                            "not in the store"
                            if got is None
                            else f"secrets {sorted(want - have)} missing"
                        )
                        + "; the home still uses its GnuPG home"
                    )
            # The same verdict on both sides: a key gpg can use that the store cannot
            # (an algorithm or curve Sequoia refuses) is said, not silently "moved".
            moved = [
                replace(m, lost=_lost(k, stored[k.fingerprint]))
                for m, k in zip(moved, keys, strict=True)
            ]
            # gpg's "disabled" flag has no place in a certificate: kept in the home's record,
            # so a key the user disabled stays refused after the move.
            off = [k.fingerprint for k in keys if k.disabled]
            if off:
                self.sources.disable(off)
            if staging is not None:
                self._switch_in(target)
        except OSError as exc:
            raise KeystoreError(
                f"keys migrate failed: {exc.strerror or exc} ({exc.filename or self.home}); "
                "the home still uses its GnuPG home"
            ) from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        self._switch_to_store()
        return Migration(store=self.certd.root, gnupg_home=gnupg_home, keys=tuple(moved))

    def _switch_in(self, target: Keystore) -> None:
        """Rename the checked staging store into the home: secret keys first, the certificate
        folder last (its appearance is the switch). A ``secret/`` left by a migration that
        stopped between the two renames is merged into, not renamed over."""
        staged = target.secret_keys.root
        if staged.exists():
            if self.secret_keys.root.exists():
                ensure_private_dir(self.secret_keys.root, what="secret key folder")
                for item in staged.iterdir():
                    os.replace(item, self.secret_keys.root / item.name)
            else:
                os.replace(staged, self.secret_keys.root)
        target.certd.ensure()
        os.replace(target.certd.root, self.certd.root)  # the switch

    def _export_asking(
        self,
        source: Keystore,
        key: OpenPGPKey,
        passphrase: str | None,
        ask: Callable[[str], str | None] | None,
    ) -> bytes:
        """The secret key from gpg under ``passphrase``, else under what ``ask`` gives for
        this key (keys of one home may have different passphrases)."""
        tried = passphrase
        while True:
            try:
                return self._gpg_export_secret(source, key, tried)
            except PassphraseError:
                again = ask(key.fingerprint) if ask is not None else None
                if again is None:
                    raise
                if any(c in again for c in "\r\n\0"):
                    raise KeystoreError("a passphrase cannot contain CR, LF or NUL") from None
                tried = again

    @staticmethod
    def _gpg_export_secret(source: Keystore, key: OpenPGPKey, passphrase: str | None) -> bytes:
        """The secret key from gpg in loopback mode with the passphrase on stdin (never a
        pinentry); gpg 2.2 exports a protected key only under its passphrase."""
        source.gpg  # noqa: B018 - ensures the home exists
        cmd = [
            source.gpg_binary,
            "--homedir",
            str(source.gnupg_home),
            "--no-options",
            "--batch",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--export-secret-keys",
            key.fingerprint,
        ]
        try:
            done = subprocess.run(
                cmd,
                input=(passphrase or "").encode() + b"\n",
                capture_output=True,
                check=False,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeystoreError(f"cannot run {source.gpg_binary}: {exc}") from exc
        if done.returncode != 0 or not done.stdout:
            if passphrase:
                message = f"wrong passphrase for {key.fingerprint}: gpg did not export it"
            else:
                message = (
                    f"gpg did not export the secret key {key.fingerprint} "
                    "(give its passphrase: --passphrase-env VAR)"
                )
            raise PassphraseError(message, fingerprint=key.fingerprint, missing=passphrase is None)
        return done.stdout

    # -- The certificate store (backend "certd") ----------------------------------------------

    def secret_key_bytes(self, fingerprint: str) -> bytes | None:
        """The stored (protected) transferable secret key of primary ``fingerprint``, or None
        (certificate store only)."""
        return self.secret_keys.get(fingerprint) if self.is_certd else None

    def current_secret_key(self, fingerprint: str) -> bytes | None:
        """The stored secret key joined to the *current* certificate: the secret key packets
        of the secret key file in the stored certificate, with every signature merged into it
        since (a new expiry, a new subkey binding), as the keystore judged it. Signing with the
        secret file as it was first stored would use its old self-signatures: once the user
        extends the key's expiry elsewhere, it would look expired to Sequoia. None when no
        secret key is stored (certificate store only)."""
        stored = self.secret_key_bytes(fingerprint)
        if stored is None:
            return None
        public = self.certd.get(fingerprint)
        if public is None:
            return stored
        merged = _with_secret_packets(public, stored)
        return stored if merged is public else merged

    def secret_key_tag(self, fingerprint: str) -> tuple[int, int, int] | None:
        """The identity (inode, mtime, size) of that secret key's file, None when none."""
        return self.secret_keys.tag(fingerprint) if self.is_certd else None

    def _all_keys_certd(self) -> tuple[OpenPGPKey, ...]:
        """Every certificate in the store, judged without gpg (:mod:`e2email.pgpkeys`); a
        certificate is judged again only when its file (or its secret key's) changed.

        Every write to the store (ours, and ``sq``'s: cert-d §4) renames a file into its
        folder, which changes the folder's mtime: while no folder changed, the last listing
        stands, at the cost of a stat per folder rather than per certificate. A tool that
        rewrote a certificate file in place instead (against cert-d §4) changes no folder: a
        running process sees that change at the next change to the store, or when restarted
        (or :meth:`invalidate` is called)."""
        # The store has no flag for a disabled key: gpg's, carried over by ``keys migrate``,
        # is kept in the record of key sources (read again only when that file changed).
        off = self._disabled()
        folders = (*self._store_folders(), off)
        listing = self._listing
        if listing is not None and listing.stamp == folders:
            return listing.keys
        keys: list[OpenPGPKey] = []
        seen = set()
        secret_fprs = self.secret_keys.fingerprints()
        for fpr, path in self.certd.fingerprints():
            seen.add(fpr)
            try:
                st = path.stat()
            except OSError:
                continue  # gone since it was listed
            _refuse_loose(path, st, what="certificate file")
            tag = (st.st_ino, st.st_mtime_ns, st.st_size)
            sec_tag = self.secret_keys.tag(fpr) if fpr in secret_fprs else None
            cached = self._judged.get(fpr)
            if cached is not None and cached[0] == tag and cached[1] == sec_tag:
                keys.append(cached[2])
                continue
            try:
                data = path.read_bytes()
                if sec_tag is not None:
                    # Judged with its secret key material: a signing subkey is shown genuine
                    # by Sequoia picking it to sign (pgpkeys), which needs the secret.
                    data = _with_secret_packets(data, self.secret_keys.get(fpr) or b"")
                judged = [k for k in _judge(data) if k.fingerprint == fpr]
            except (OSError, KeystoreError) as exc:
                # One unreadable or damaged file must not stop every command: its key is left
                # out (its addresses fail closed as having no key), and the file is named.
                if isinstance(exc, InsecurePathError):
                    raise
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                if (path, tag) not in self._skipped:
                    self._skipped.add((path, tag))
                    _log.warning("left out the certificate %s: %s", path, why or exc)
                continue
            if not judged:
                continue  # not a certificate for its file name: never chosen
            key = judged[0]
            self._judged[fpr] = (tag, sec_tag, key)
            keys.append(key)
        for gone in set(self._judged) - seen:
            self._judged.pop(gone, None)
        if off:
            keys = [replace(k, disabled=True) if k.fingerprint in off else k for k in keys]
        self._listing = _Listing(stamp=folders, keys=tuple(keys))
        return self._listing.keys

    def _disabled(self) -> frozenset[str]:
        """The keys disabled in the record of key sources, read when the record changed."""
        tag = _file_tag(self.sources.path)
        if self._disabled_cache is None or self._disabled_cache[0] != tag:
            self._disabled_cache = (tag, self.sources.disabled() if tag else frozenset())
        return self._disabled_cache[1]

    def _store_folders(self) -> tuple[object, ...]:
        """(name, mtime) of the store's folders and of the secret key folder."""
        stamp: list[object] = []
        for folder in (self.certd.root, self.secret_keys.root):
            try:
                st = folder.stat()
            except OSError:
                stamp.append(0)
                continue
            stamp.append(st.st_mtime_ns)
            _refuse_loose(folder, st, what="certificate store folder")
        try:
            with os.scandir(self.certd.root) as entries:
                for entry in entries:
                    if len(entry.name) == 2 and entry.is_dir():
                        st = entry.stat()
                        # Whoever may write a folder of the store can swap a certificate in
                        # it: refused as a loose GnuPG home is. The stat is needed anyway.
                        _refuse_loose(entry.path, st, what="certificate store folder")
                        stamp.append((entry.name, st.st_mtime_ns))
        except OSError:
            pass
        return tuple(sorted(stamp, key=repr))

    def _import_certd(
        self,
        data: bytes,
        *,
        source: KeySource | None,
        passphrase: str | None,
        unprotected: bool,
    ) -> ImportSummary:
        sq = _sq()
        ensure_private_dir(self.home, what="e2email home")
        try:
            certs = list(sq.Cert.split_bytes(data))
        except (RuntimeError, ValueError) as exc:
            certs = []
            parse_error = _first_line(exc)
        else:
            parse_error = ""
        before = {k.fingerprint: k for k in self.all_keys()}
        if not certs:
            certs = self._revocations(data)
            if not certs:
                raise KeystoreError(
                    "no OpenPGP key found in the data" + (f": {parse_error}" if parse_error else "")
                )
        # Every secret key is checked before anything is written: all or nothing.
        secrets: dict[str, bytes] = {}
        for fpr, raw in _secret_keys_in(data).items():
            if not is_protected(raw):
                if passphrase:
                    raw = protect(raw, passphrase)
                elif not unprotected:
                    raise KeystoreError(
                        f"the secret key {fpr} has no passphrase, and the certificate store "
                        "keeps secret keys only under one: give a passphrase to protect it "
                        "with (--passphrase-env VAR), or --unprotected to store it as it is"
                    )
            secrets[fpr] = raw
        fprs: list[str] = []
        touched: set[str] = set()
        secret_imported = 0
        for cert in certs:
            fpr = str(cert.fingerprint).upper()
            old, new = self.certd.insert(cert)
            self._generation += 1  # pinned listings in every thread look again
            if old != new:
                touched.add(fpr)
            if fpr in secrets and self._store_secret(fpr, secrets.pop(fpr)):
                secret_imported += 1
                touched.add(fpr)
            fprs.append(fpr)
        fprs = list(dict.fromkeys(fprs))
        # As gpg counts them: keys new to the keystore, and keys the data did not change.
        written = sum(1 for f in fprs if f not in before)
        unchanged = sum(1 for f in fprs if f not in touched)
        self._minimal.clear()
        after = {k.fingerprint: k for k in self.all_keys()}
        changes = [_change(before.get(f), after[f]) for f in dict.fromkeys(fprs) if f in after]
        new_fprs = [c.fingerprint for c in changes if c.new]
        if new_fprs:
            self.sources.record(new_fprs, source or KeySource(SourceKind.DATA))
        return ImportSummary(
            fingerprints=tuple(fprs),
            imported=written,
            unchanged=unchanged,
            secret_imported=secret_imported,
            revoked=sum(1 for c in changes if c.revoked),
            changes=tuple(c for c in changes if c.changed),
            conflicts=self._conflicts(changes, after),
        )

    def _store_secret(self, fpr: str, raw: bytes) -> bool:
        """Keep the secret key ``raw`` in place of the stored one when it differs and holds
        every secret the stored one has: a key re-imported under a new passphrase (how a
        passphrase is changed: the old one may have leaked) or with newer self-signatures
        replaces the file, and is counted as a secret key imported. The same bytes again
        change nothing; fewer secrets (a copy with a key moved to a card) never replace
        more."""
        with self.certd.locked():  # two imports of one key at once: one wins, whole
            old = self.secret_keys.get(fpr)
            if old is not None and (raw == old or not _secret_fprs(old) <= _secret_fprs(raw)):
                return False
            self.secret_keys.put(fpr, raw)
        return True

    def _revocations(self, data: bytes) -> list[Any]:
        """A bare key revocation certificate (what ``gpg --gen-revoke`` writes): each one
        joined to the certificate it revokes (which must be here); Sequoia checks the
        signature when the certificate is read, so a forged one revokes nothing."""
        sq = _sq()
        from pysequoia.packet import PacketPile, SignatureType, Tag

        try:
            packets = list(PacketPile.from_bytes(data))
        except (RuntimeError, ValueError):
            return []
        found = []
        for packet in packets:
            if packet.tag != Tag.Signature or packet.signature_type != SignatureType.KeyRevocation:
                continue
            issuer = (packet.issuer_fingerprint or "").upper()
            key_id = (packet.issuer_key_id or "").upper()
            if len(issuer) == 40:
                named = [issuer]
            elif len(key_id) == 16:
                # Older revocations (gpg 1.x, RFC 4880 era) name the issuer by key ID only:
                # every stored certificate with that ID is a candidate, and Sequoia keeps the
                # revocation only on the one whose key made it.
                named = [f for f, _ in self.certd.fingerprints() if f[-16:] == key_id]
            else:
                named = []
            olds = [o for o in map(self.certd.get, named) if o is not None]
            if not olds:
                raise KeystoreError(
                    f"no OpenPGP key found in the data: a revocation certificate for "
                    f"{issuer or key_id}, which is not here"
                )
            for old in olds:
                try:
                    found.append(sq.Cert.from_packets([*PacketPile.from_bytes(old), packet]))
                except (RuntimeError, ValueError) as exc:
                    raise KeystoreError(f"cannot read the revocation: {_first_line(exc)}") from exc
        return found

    def _generate_certd(
        self,
        address: str,
        name: str,
        algorithm: str,
        passphrase: str | None,
        expire: str,
        *,
        unprotected: bool,
    ) -> GeneratedKey:
        """A new key made in this process (:func:`e2email.certd.generate_key`): a signing
        primary key and an encryption subkey, OpenPGP v4, as gpg makes them."""
        sq = _sq()
        if not passphrase and not unprotected:
            raise KeystoreError(
                "the certificate store keeps secret keys only under a passphrase: give one "
                "(--passphrase-env VAR or --ask-passphrase), or --unprotected for a key without"
            )
        suite = {"ed25519": "cv25519", "rsa3072": "rsa3k", "rsa4096": "rsa4k"}[algorithm]
        uid = f"{name} <{address}>" if name else f"<{address}>"
        validity = _validity_seconds(expire)
        if validity is not None and validity >= 2**32:
            # A key expiration time is 4 octets of seconds after creation (RFC 9580
            # §5.2.3.13): about 136 years is the most a key can be given.
            raise KeystoreError(
                f"expiry {expire!r} is too far away: OpenPGP can say at most about 136 years "
                "(or 0 for never)"
            )
        try:
            raw = generate_key(uid, suite=suite, validity_seconds=validity)
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise KeystoreError(f"key generation failed: {_first_line(exc)}") from exc
        if passphrase:
            raw = protect(raw, passphrase)
        cert = sq.Cert.from_bytes(raw)
        fpr = str(cert.fingerprint).upper()
        ensure_private_dir(self.home, what="e2email home")
        # The certificate first, then its secret (under the store's lock): a reader never
        # finds a secret key file whose certificate is not there yet.
        self.certd.insert(cert)
        with self.certd.locked():
            self.secret_keys.put(fpr, raw)
        self._generation += 1
        self.sources.record([fpr], KeySource(SourceKind.GENERATED))
        return GeneratedKey(fingerprint=fpr, user_id=uid)

    def _minimal_certd(self, fingerprint: str, address: str, subkey: str | None) -> bytes:
        """As ``gpg --export-options export-minimal`` with ``keep-uid=mbox = ADDRESS`` and
        only ``subkey`` (None: every subkey): the primary key, the user IDs whose address is
        ``address``, the subkeys, and only self-signatures (issued by the primary) on them."""
        sq = _sq()
        from pysequoia.packet import PacketPile, Tag

        raw = self.certd.get(fingerprint)
        if raw is None:
            return b""
        primary_id = fingerprint[-16:].upper()
        keep = True
        out = []
        for packet in PacketPile.from_bytes(raw):
            tag = packet.tag
            if tag == Tag.PublicKey:
                keep = True
            elif tag == Tag.UserID:
                keep = _uid_address(_uid_text(packet)) == address
            elif tag == Tag.UserAttribute:
                keep = False
            elif tag == Tag.PublicSubkey:
                keep = subkey is None or (packet.fingerprint or "").upper() == subkey.upper()
            elif tag == Tag.Signature:
                issuer = (packet.issuer_fingerprint or "").upper()
                issuer_id = (packet.issuer_key_id or "").upper()
                if keep and (issuer == fingerprint.upper() or issuer_id == primary_id):
                    out.append(packet)
                continue
            if keep:
                out.append(packet)
        try:
            return bytes(sq.Cert.from_packets(out))
        except (RuntimeError, ValueError) as exc:
            raise KeystoreError(f"cannot cut down {fingerprint}: {_first_line(exc)}") from exc
