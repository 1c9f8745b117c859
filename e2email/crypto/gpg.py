"""The GnuPG engine: PGP/MIME (RFC 3156) with the keys of a :class:`~e2email.keystore.Keystore`.

Looks up and judges every key through the keystore (fail closed: all problems named at once),
then signs or signs and encrypts with :mod:`e2email.crypto.openpgp` (gpg through
python-gnupg), each copy a complete message: the outer header block, then the entity.

Every copy also carries the sender's ``Autocrypt:`` header in its outer header block, and the
To/Cc copy of a message encrypted to several recipients their ``Autocrypt-Gossip`` headers
inside the encryption (Autocrypt Level 1; :mod:`e2email.discovery.autocrypt`).
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
from collections.abc import Sequence
from typing import ClassVar

from e2email.config import DiscoveryPolicy, Protection
from e2email.crypto import openpgp
from e2email.crypto.base import (
    CopyKind,
    ProtectedCopy,
    Protector,
    Resolved,
    copy_plans,
    make_copy,
    plain_copy,
    resolve_keys,
)
from e2email.discovery.autocrypt import autocrypt_fields
from e2email.discovery.net import DiscoverySettings
from e2email.errors import CryptoError, KeyProblem, KeyReason, MessageError, RecipientKeyError
from e2email.keystore import Keystore, OpenPGPKey
from e2email.message import HP, Address, Message, build_payload, message_head, stream_payload
from e2email.spool import Spool, spool_dir

__all__ = ["GpgProtector"]


def _encrypted_part(head: bytes, body: bytes) -> bytes:
    """The second body part of a ``multipart/encrypted`` message, the one RFC 3156 §4 says
    holds the OpenPGP message: only it is read (an armored block in the preamble or the
    version part must not stand in for it)."""
    parsed = email.message_from_bytes(head + b"\r\n" + body, policy=email.policy.compat32)
    parts = parsed.get_payload() if parsed.is_multipart() else None
    if not isinstance(parts, list) or len(parts) != 2:
        raise MessageError(
            "not a PGP/MIME encrypted message (RFC 3156 §4: exactly two parts)", field="message"
        )
    second = parts[1]
    payload = second.get_payload() if isinstance(second, email.message.Message) else None
    if not isinstance(payload, str):
        raise MessageError("the encrypted part of the message is not a leaf part", field="message")
    return payload.encode("ascii", "surrogateescape")


#: The most addresses (sender and recipients) a message may have for the keys it needs to be
#: kept per keystore state (:meth:`~e2email.keystore.Keystore.judged`).
_KEPT_ADDRESSES = 32


class GpgProtector(Protector):
    """OpenPGP through gpg. Each copy's gpg runs in a worker thread, the copies side by side."""

    name: ClassVar[str] = "openpgp"
    protections_per_cpu: ClassVar[int] = 2  # the work is in gpg's processes

    def __init__(
        self, keystore: Keystore, *, discovery_settings: DiscoverySettings | None = None
    ) -> None:
        self.keystore = keystore
        #: Network settings for key discovery (None: the defaults); discovery itself runs
        #: only when ``Protection.discovery`` is not OFF.
        self.discovery_settings = discovery_settings

    def __repr__(self) -> str:
        return f"GpgProtector({self.keystore!r})"

    def resolve(self, message: Message, protection: Protection) -> Resolved[OpenPGPKey]:
        """Every key ``message`` needs, or RecipientKeyError/SignerKeyError naming every
        address without one. Blocking (gpg)."""
        store = self.keystore
        key_map = protection.key_map
        # Everything the keys of a message are chosen and judged from: the same question
        # is answered once per keystore state (Keystore.judged: a write to the keystore or
        # to the record of key sources, by any process, or the clock passing a key's
        # creation or expiry time, asks it again). A refusal is never kept.
        addresses = (message.sender.addr_spec, *(a.addr_spec for a in message.recipients))
        question = (
            "resolve",
            addresses,
            protection.sign,
            protection.encrypt,
            protection.encrypt_to_self,
            # Only the key map's entries for this message's addresses (all the lookups
            # read): not a sort and a copy of the whole map (an account's may be large).
            tuple(key_map.get(a.strip().lower()) for a in addresses) if key_map else (),
        )

        def resolve() -> Resolved[OpenPGPKey]:
            return resolve_keys(
                message,
                protection,
                signer=lambda sender: store.signing_key(sender, key_map=key_map),
                recipients=lambda addresses: store.resolve_recipients(addresses, key_map=key_map),
                own=lambda sender: store.encryption_key(sender, key_map=key_map),
            )

        with store.pinned():  # one look at the keyring for all of this message's lookups
            # A message to a great many addresses is judged afresh: kept, its answer would
            # hold all of them (the saving is per message, the same either way).
            many = len(addresses) > _KEPT_ADDRESSES
            found = resolve() if many else store.judged(question, resolve)
        # Each message its own mapping (the one kept is never handed out).
        return Resolved(signer=found.signer, recipients=dict(found.recipients), own=found.own)

    def missing_keys(self, addresses: Sequence[str], protection: Protection) -> list[KeyProblem]:
        """Each address without a usable key in the keystore or the policy's key map."""
        _, problems = self.keystore.resolve_recipients(addresses, key_map=protection.key_map)
        return problems

    def check_encrypted(
        self, head: bytes, body: bytes, addresses: Sequence[str], protection: Protection
    ) -> tuple[str, ...]:
        """Each recipient's usable encryption subkey among the PKESK key IDs of a program's
        PGP/MIME-encrypted message (RFC 3156 section 4); refuses one without integrity
        protection (EFAIL: a Symmetrically Encrypted Data packet, tag 9)."""
        keys, problems = self.keystore.resolve_recipients(addresses, key_map=protection.key_map)
        try:
            key_ids, data_tag = openpgp.encrypted_to_key_ids(_encrypted_part(head, body))
        except CryptoError as exc:
            raise MessageError(f"cannot read the encrypted part: {exc}", field="message") from None
        if data_tag == 9:
            raise MessageError(
                "the message is encrypted without integrity protection; refusing it",
                field="message",
            )
        ids = set(key_ids)
        matched: list[str] = []
        for address, key in keys.items():
            subkeys = {s.key_id for s in key.encryption_subkeys()}
            if subkeys & ids:
                matched.append(key.fingerprint)
                continue
            detail = (
                "its recipients are hidden (wildcard key IDs)"
                if ids == {"0" * 16}
                else f"encrypted to {', '.join(sorted(ids))}, not to {key.fingerprint}"
            )
            problems.append(
                KeyProblem(address, KeyReason.NOT_ENCRYPTED_TO, detail, key.fingerprint)
            )
        if problems:
            raise RecipientKeyError(problems)
        return tuple(matched)

    async def discover(self, message: Message, protection: Protection) -> dict[str, KeyProblem]:
        """The key discovery hook (issue 10), run once per message before the keys are
        resolved: look up keys for recipients that have none and import the good ones;
        returns, by lower-cased address, why it could not serve the others (their reason
        then replaces "no key found"). Never sends, never relaxes a refusal."""
        if not protection.encrypt or protection.discovery is DiscoveryPolicy.OFF:
            return {}
        from e2email.discovery import discover_missing

        return await discover_missing(
            self.keystore,
            (a.addr_spec for a in message.recipients),
            protection.discovery,
            settings=self.discovery_settings,
            key_map=protection.key_map,
        )

    async def protect(
        self, message: Message, protection: Protection, *, passphrase: str | None = None
    ) -> tuple[ProtectedCopy, ...]:
        msg = message
        if not protection.sign and not protection.encrypt:
            return (plain_copy(msg),)
        discovered = await self.discover(msg, protection)
        try:
            keys = await asyncio.to_thread(self.resolve, msg, protection)
        except RecipientKeyError as exc:
            if not discovered:
                raise
            # A lookup's reason (404, timeout, TLS, a different key) says more than "no key".
            raise RecipientKeyError([discovered.get(p.address, p) for p in exc.problems]) from None
        signer = keys.signer
        autocrypt = await asyncio.to_thread(
            autocrypt_fields,
            self.keystore,
            msg,
            protection,
            own=keys.own,
            recipients=keys.recipients,
        )

        if not protection.encrypt:
            assert signer is not None
            # The outer header block goes in as openpgp's prefix: the message is assembled
            # once, in its spool (a private file when large), not as an entity and then
            # again as a message.
            spool = Spool(spool_dir(self.keystore.home))
            try:
                await asyncio.to_thread(
                    openpgp.sign_into,
                    spool,
                    self.keystore,
                    build_payload(msg, hp=HP.CLEAR),
                    signer=signer,
                    passphrase=passphrase,
                    # Autocrypt in the outer header block (Level 1), outside the signed part:
                    # the signature covers that part only (RFC 3156 §5) and still verifies.
                    prefix=message_head(msg, hp=HP.CLEAR) + autocrypt["main"][0],
                )
            except BaseException:
                spool.close()
                raise
            return (
                make_copy(
                    spool, msg, "main", msg.recipients, signed=True, signer=signer.fingerprint
                ),
            )

        # Made once (one set of boundaries), read by each copy's gpg as it goes: a large
        # attachment's base64 is produced block by block and never held whole.
        # Encrypted (alone or signed inside, RFC 3156 §6.2): binary literal data, so a
        # program's own MIME body goes in as it wrote it, not re-encoded for signing.
        payload = stream_payload(msg, hp=HP.CIPHER, canonical=False)
        head = message_head(msg, hp=HP.CIPHER)

        async def one(kind: CopyKind, rcpts: tuple[Address, ...]) -> ProtectedCopy:
            unique = keys.keys_for(rcpts)
            outer, gossip = autocrypt[kind]
            # A large copy goes to a private anonymous file as gpg writes it, never whole in
            # memory; the outbox and DATA read it from there (e2email.spool).
            spool = Spool(spool_dir(self.keystore.home))
            try:
                await asyncio.to_thread(
                    openpgp.encrypt_into,
                    spool,
                    self.keystore,
                    # Gossip goes in this copy's own payload, inside the encryption (Level 1
                    # "Key Gossip"); the shared payload (Bcc copies) has none.
                    (
                        stream_payload(msg, hp=HP.CIPHER, canonical=False, extra_fields=gossip)
                        if gossip
                        else payload
                    ),
                    recipients=unique,
                    signer=signer,
                    passphrase=passphrase,
                    prefix=head + outer,
                )
            except BaseException:
                spool.close()  # nothing of a failed copy is kept, not even its ciphertext
                raise
            return make_copy(
                spool,
                msg,
                kind,
                rcpts,
                signed=signer is not None,
                encrypted_to=[k.fingerprint for k in unique],
                signer=signer.fingerprint if signer else None,
                scheme=self.name,
            )

        # gpg work is a subprocess per copy: run the copies side by side. Every one ends
        # before this returns or raises: a copy made beside one that failed is discarded
        # (its spool closed), not left to a task nobody awaits.
        made = await asyncio.gather(
            *(one(kind, rcpts) for kind, rcpts in copy_plans(msg)), return_exceptions=True
        )
        copies = [c for c in made if isinstance(c, ProtectedCopy)]
        if len(copies) < len(made):
            for copy in copies:
                copy.discard()
            raise next(e for e in made if isinstance(e, BaseException))
        return tuple(copies)

    def recheck(self, encrypted_to: Sequence[str]) -> list[KeyProblem]:
        """The keys judged as for a new message (revoked, expired, disabled, gone)."""
        return list(self.keystore.check_fingerprints(list(encrypted_to)))

    @classmethod
    def recognises(cls, head: bytes) -> bool:
        return b"application/pgp-encrypted" in head or b"application/pgp-signature" in head
