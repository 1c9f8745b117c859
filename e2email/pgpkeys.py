"""Judging OpenPGP certificates without gpg: the keystore's model from certificate bytes.

:func:`keys_from_bytes` reads certificates (public or secret, armored or binary, several in a
row) and returns the same :class:`~e2email.keystore.OpenPGPKey` model that the keystore builds
from gpg's colon listing, so that every rule e2email applies to a key (expired, revoked, RSA
below 2048 bits, SHA-1 self-signatures, no live encryption subkey, which subkey to encrypt to:
``SubKey.problem``, ``OpenPGPKey.encryption_problem`` and ``Keystore._choose``) gives the same
answer with no gpg program at all (issue 9 part 3).

Why it is sound. Everything that decides who a message is encrypted to comes from a signature,
and a signature is only read after Sequoia has checked it cryptographically:

* pysequoia's raw packets (:class:`pysequoia.packet.PacketPile`) are *not* verified: anyone
  can append a binding signature, a revocation or a newer self-signature that removes an
  expiry. So each candidate signature is put, alone, into a *reduced certificate* built with
  ``Cert.from_packets`` (the primary key, the one component, that one signature; for a subkey
  also the user IDs with their genuine self-signatures, so that the primary key is valid), and
  Sequoia is asked whether it accepts it under its StandardPolicy at the current time: for a
  user ID, whether ``Cert.user_ids`` lists it; for an encryption subkey, whether
  ``pysequoia.encrypt`` encrypts to exactly that subkey (the PKESK's key ID is checked, so an
  encryption-capable primary cannot stand in); for a signing subkey with its secret, whether
  ``Tsk.signer()`` picks it (which also needs the subkey's back-signature, RFC 9580 §5.2.1
  0x19). Sequoia verifies self-signatures before it uses them (its
  ``LazySignatures`` checks each one against the primary key before handing it out), so a
  forged or spliced signature never binds anything. Only a signature so accepted is read for
  key flags, key expiry and hash algorithm.
* ``encrypt()`` falls back to *expired* subkeys when none is live, so the encryption test says
  only "this binding is genuine"; expiry is computed from that verified binding's key
  expiration time (RFC 9580 §5.2.3.13) plus the subkey's creation time, never from the fallback.
  Of several genuine bindings the newest is in force (RFC 9580 §5.2.3.10), as gpg does.
* The primary key's expiry and revocation come from Sequoia's own policy-checked views of the
  whole certificate (``Cert.expiration``, ``Cert.is_revoked``).
* Revocations: a subkey or user ID revocation is tested the same way (the reduced certificate
  with the genuine binding plus that one revocation: does Sequoia still use the component?).
  A revocation Sequoia refuses is forged (or not about that component) and is ignored, as
  RFC 9580 §5.2.4 and Sequoia ignore any signature that does not verify: honouring it would
  let anyone who can append a packet switch a key off. Where Sequoia cannot decide (a soft
  revocation made in the same second as the only bindings, which gpg counts and Sequoia does
  not) the revocation is honoured: failing closed costs at most a refusal.
* What Sequoia's policy will not check at all: MD5, SHA-1 and RIPEMD-160 self-signatures,
  and every signature of a key too short for e2email (RSA/DSA/Elgamal below 2048 bits). gpg
  checks them and e2email then refuses the key as WEAK ("SHA-1 self-signature on the user
  ID", "rsa1024 is below 2048 bits"); users must see the same reason, not "no key". Such a
  signature is checked here (:func:`_check_signature`, with ``cryptography``: RSA, DSA,
  ECDSA, EdDSA over the RFC 9580 §5.2.4 hash) and counts only if it is genuine, or if it
  cannot be checked (an algorithm not handled: fail closed). It counts *only towards
  refusing*: it can mark a user ID's ``self_sig_hash`` or a subkey's ``binding_hash`` weak,
  revoke, or name the addresses of a key refused as WEAK anyway, but a component it is the
  only evidence for is always WEAK, so it never makes a key, user ID or subkey usable. A
  mistake in that check can therefore change only which refusal a user reads.

Where this differs from gpg, it refuses where gpg would not, never the other way:

* Algorithms Sequoia does not support (brainpool and secp256k1 keys, Elgamal subkeys) cannot
  be tested, so nothing they carry is bound: such a key reads "key invalid" or "no valid
  encryption-capable (sub)key". The in-process engine could not use it anyway.
* A subkey whose binding can be shown genuine neither by encrypting nor by signing is left out:
  authentication-only subkeys, signing subkeys of public certificates (e2email signs only with
  its own secret keys), expired signing subkeys (``Tsk.signer()`` wants a live one), and a
  signing-capable subkey without its back-signature (Sequoia rejects the whole binding; gpg
  would still encrypt to it).
* gpg's import drops a subkey that carries any bad self-signature; here a forged signature is
  ignored and the genuine ones still count (tests/test_pgpkeys.py shows both refuse the
  forgeries that matter).
* Revocations by a designated third-party revoker are not honoured (gpg honours them only when
  it holds the revoker's key). Sequoia's policy time is the wall clock; ``now`` decides only
  which expiry dates have passed.

Nothing is cached between calls and nothing is written: these are pure functions of the bytes.
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from e2email.errors import KeystoreError
from e2email.keystore import MIN_RSA_BITS, WEAK_HASHES, OpenPGPKey, SubKey, UserID

if TYPE_CHECKING:
    import pysequoia

__all__ = ["key_from_cert", "keys_from_bytes"]

#: Signature types (RFC 9580 §5.2.1).
_CERTIFICATIONS = {0x10, 0x11, 0x12, 0x13}
_SUBKEY_BINDING = 0x18
_DIRECT_KEY = 0x1F
_KEY_REVOCATION = 0x20
_SUBKEY_REVOCATION = 0x28
_CERT_REVOCATION = 0x30

#: Curve OIDs (RFC 9580 §9.2, RFC 6637) as gpg names them in a colon listing (field 17), with
#: the bit length gpg shows.
_CURVES = {
    "2b06010401da470f01": ("ed25519", 255),
    "2b060104019755010501": ("cv25519", 255),
    "2a8648ce3d030107": ("nistp256", 256),
    "2b81040022": ("nistp384", 384),
    "2b81040023": ("nistp521", 521),
    "2b2403030208010107": ("brainpoolP256r1", 256),
    "2b240303020801010b": ("brainpoolP384r1", 384),
    "2b240303020801010d": ("brainpoolP512r1", 512),
    "2b8104000a": ("secp256k1", 256),
    "2b6571": ("ed448", 448),
    "2b656f": ("cv448", 448),
}
#: RFC 9580 algorithms with a fixed curve: X25519, X448, Ed25519, Ed448.
_FIXED_CURVES = {
    25: ("cv25519", 255, 32),
    26: ("cv448", 448, 56),
    27: ("ed25519", 255, 32),
    28: ("ed448", 448, 57),
}
#: Algorithms whose strength is their length, exactly those ``SubKey.problem`` refuses as WEAK
#: below MIN_RSA_BITS (RSA, Elgamal, DSA); Sequoia's policy refuses the shortest outright.
_LENGTH_BOUND = {1, 2, 3, 16, 17}
#: Number of MPIs in the public part of RSA, Elgamal and DSA keys (RFC 9580 §5.5.5).
_MPI_COUNT = {1: 2, 2: 2, 3: 2, 16: 3, 20: 3, 17: 4}

_ARMOR = re.compile(
    rb"-----BEGIN PGP (?:PUBLIC|PRIVATE) KEY BLOCK-----.*?-----END PGP (?:PUBLIC|PRIVATE) KEY "
    rb"BLOCK-----",
    re.DOTALL,
)


def _sq() -> Any:
    try:
        import pysequoia
    except ImportError as exc:
        raise KeystoreError(
            "judging keys without gpg needs pysequoia: pip install 'e2email[sequoia]'"
        ) from exc
    return pysequoia


def _first_line(exc: BaseException) -> str:
    # pysequoia's errors carry a Rust backtrace after the first line.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- Reading packets (only facts that need no signature: key material, creation time) ----------


@dataclass(frozen=True)
class _KeyMaterial:
    algorithm_id: int
    length: int
    curve: str
    version: int
    has_secret: bool


def _mpi_end(body: bytes, pos: int) -> int:
    bits = int.from_bytes(body[pos : pos + 2], "big")
    return pos + 2 + (bits + 7) // 8


def _public_end(body: bytes) -> int | None:
    """Where the public part of a key packet's body ends (RFC 9580 §5.5.2, §5.5.5); None when
    the algorithm or layout is not understood."""
    version = body[0] if body else 0
    algo = body[5] if len(body) > 5 else 0
    if version in (5, 6):
        return 10 + int.from_bytes(body[6:10], "big") if len(body) >= 10 else None
    if version != 4:
        return None
    try:
        if algo in _MPI_COUNT:
            end = 6
            for _ in range(_MPI_COUNT[algo]):
                end = _mpi_end(body, end)
        elif algo in (18, 19, 22):
            end = _mpi_end(body, 7 + body[6])
            if algo == 18:  # ECDH: KDF parameters follow (RFC 9580 §5.5.5.6)
                end = end + 1 + body[end]
        elif algo in _FIXED_CURVES:
            end = 6 + _FIXED_CURVES[algo][2]
        else:
            return None
    except IndexError:
        return None
    return end if end <= len(body) else None


def _key_material(packet: Any, *, secret_tag: bool) -> _KeyMaterial:
    """Algorithm, size and curve from a key packet's body (RFC 9580 §5.5.2), and whether it
    carries usable secret material (not a GnuPG stub: S2K type 101, "gnu-dummy" or a
    smartcard, which gpg lists without its '+')."""
    body: bytes = packet.body
    version = body[0] if body else 0
    algo = body[5] if len(body) > 5 else 0
    pos = 10 if version in (5, 6) else 6
    length, curve = 0, ""
    if algo in _MPI_COUNT:
        length = int.from_bytes(body[pos : pos + 2], "big")
    elif algo in (18, 19, 22) and len(body) > pos:
        curve, length = _CURVES.get(body[pos + 1 : pos + 1 + body[pos]].hex(), ("", 0))
    elif algo in _FIXED_CURVES:
        curve, length, _ = _FIXED_CURVES[algo]
    end = _public_end(body)
    has_secret = secret_tag
    if secret_tag and end is not None and end < len(body):
        usage = body[end]
        s2k = end + (2 if version == 4 else 3)
        if usage in (254, 255) and s2k < len(body) and body[s2k] == 101:
            has_secret = False  # gnu-dummy / divert-to-card stub: the secret is not here
    return _KeyMaterial(algo, length, curve, version, has_secret)


def _too_short(material: _KeyMaterial) -> bool:
    return material.algorithm_id in _LENGTH_BOUND and material.length < MIN_RSA_BITS


def _sig_fields(packet: Any) -> tuple[int, int] | None:
    """(signature type, hash algorithm ID) of a v4/v6 signature packet (RFC 9580 §5.2.3)."""
    body: bytes = packet.body
    if len(body) < 4 or body[0] not in (4, 5, 6):
        return None
    return body[1], body[3]


def _by_primary(packet: Any, fingerprint: str) -> bool:
    """Whether a signature claims to be made by the primary key. Sequoia checks every such
    signature as a self-signature (an issuer-less one too); others are third-party
    certifications it cannot check, so they are never read here."""
    issuer = packet.issuer_fingerprint
    if issuer:
        return str(issuer).upper() == fingerprint
    key_id = packet.issuer_key_id
    if key_id:
        return str(key_id).upper() == fingerprint[-16:]
    return True


@dataclass
class _Component:
    packet: Any
    sigs: list[Any] = field(default_factory=list)


@dataclass
class _Parsed:
    primary: Any
    direct: list[Any] = field(default_factory=list)  # primary-key signatures
    user_ids: list[_Component] = field(default_factory=list)
    subkeys: list[_Component] = field(default_factory=list)
    others: list[_Component] = field(default_factory=list)  # user attributes

    @property
    def fingerprint(self) -> str:
        return str(self.primary.fingerprint).upper()

    def packets(self) -> list[Any]:
        out = [self.primary, *self.direct]
        for comp in (*self.user_ids, *self.others, *self.subkeys):
            out += [comp.packet, *comp.sigs]
        return out


def _split(packets: Sequence[Any]) -> list[_Parsed]:
    """The certificates in a packet sequence (RFC 9580 §10.1), in order of first appearance.
    A certificate given twice (an update after the original, say) is merged, and a direct-key
    signature or key revocation is filed with its primary key wherever it appears (a bare
    revocation certificate appended after the subkeys): both are checked against the primary
    key alone, so where they stood does not matter."""
    from pysequoia.packet import Tag

    found: dict[str, _Parsed] = {}
    current: _Parsed | None = None
    target: list[Any] | None = None
    for packet in packets:
        tag = packet.tag
        if tag in (Tag.PublicKey, Tag.SecretKey):
            fpr = str(packet.fingerprint).upper()
            current = found.get(fpr)
            if current is None:
                current = found[fpr] = _Parsed(primary=packet)
            elif tag == Tag.SecretKey:
                current.primary = packet  # the copy with the secret
            target = current.direct
        elif current is None:
            continue
        elif tag == Tag.UserID:
            target = _component(current.user_ids, packet, _body).sigs
        elif tag == Tag.UserAttribute:
            target = _component(current.others, packet, _body).sigs
        elif tag in (Tag.PublicSubkey, Tag.SecretSubkey):
            secret = tag == Tag.SecretSubkey
            target = _component(current.subkeys, packet, _fingerprint, secret=secret).sigs
        elif tag == Tag.Signature and target is not None:
            fields = _sig_fields(packet)
            if fields is not None and fields[0] in (_DIRECT_KEY, _KEY_REVOCATION):
                current.direct.append(packet)
            else:
                target.append(packet)
    return list(found.values())


def _body(packet: Any) -> object:
    return bytes(packet.body)


def _fingerprint(packet: Any) -> object:
    return str(packet.fingerprint).upper()


def _component(
    components: list[_Component],
    packet: Any,
    ident: Callable[[Any], object],
    *,
    secret: bool = False,
) -> _Component:
    """The component ``packet`` starts: the one already seen with the same identity, else a
    new one. A secret subkey replaces its public copy."""
    key = ident(packet)
    for comp in components:
        if ident(comp.packet) == key:
            if secret:
                comp.packet = packet
            return comp
    components.append(_Component(packet))
    return components[-1]


def _packets(data: bytes) -> list[Any]:
    """All packets in ``data``: binary, or one or more armored key blocks (a certificate and a
    revocation certificate for it, say), in order."""
    from pysequoia.packet import PacketPile

    blocks = _ARMOR.findall(data) if b"-----BEGIN PGP" in data else [data]
    packets: list[Any] = []
    for block in blocks:
        try:
            packets += list(PacketPile.from_bytes(block))
        except (RuntimeError, ValueError) as exc:
            raise KeystoreError(f"cannot read OpenPGP data: {_first_line(exc)}") from exc
    return packets


# -- Asking Sequoia -----------------------------------------------------------------------------


def _cert(packets: Sequence[Any]) -> Any | None:
    try:
        return _sq().Cert.from_packets(list(packets))
    except (RuntimeError, ValueError):
        return None


def _lists_user_id(packets: Sequence[Any], text: str) -> bool:
    """Whether Sequoia, under its policy, lists the user ID ``text`` as valid and unrevoked."""
    cert = _cert(packets)
    if cert is None:
        return False
    try:
        return any(str(u) == text for u in cert.user_ids)
    except (RuntimeError, ValueError):
        return False


def _encrypts_to(packets: Sequence[Any], key_id: str) -> bool:
    """Whether Sequoia encrypts to the (sub)key ``key_id`` of this certificate: a genuine,
    unrevoked binding with encryption flags (expired or not: pysequoia falls back)."""
    from pysequoia.packet import PacketPile, Tag

    cert = _cert(packets)
    if cert is None:
        return False
    try:
        message = _sq().encrypt(b"", [cert], armor=False)
        for packet in PacketPile.from_bytes(bytes(message)):
            if packet.tag == Tag.PKESK and _pkesk_key_id(packet.body) == key_id:
                return True
    except (RuntimeError, ValueError):
        return False
    return False


def _pkesk_key_id(body: bytes) -> str:
    """The recipient of a PKESK (RFC 9580 §5.1): v3 carries a key ID, v6 a fingerprint."""
    if body[:1] == b"\x03":
        return body[1:9].hex().upper()
    if body[:1] == b"\x06" and len(body) > 2 and body[1]:
        fpr = body[3 : 2 + body[1]].hex().upper()
        return fpr[:16] if body[2] == 6 else fpr[-16:]
    return ""


def _signs_with(packets: Sequence[Any]) -> bool:
    """Whether Sequoia picks the one secret key in ``packets`` to sign: a genuine, live,
    unrevoked binding with signing flags and a valid back-signature. A key it picks but cannot
    unlock without its passphrase was still picked (``Tsk.signer()`` selects the key, then
    fails to use its encrypted secret); any other failure means it was not (fail closed)."""
    try:
        tsk = _sq().Tsk.from_packets(list(packets))
        tsk.signer()
    except (RuntimeError, ValueError) as exc:
        return "secret key material is encrypted" in _first_line(exc)
    return True


def _key_id(packet: Any, material: _KeyMaterial) -> str:
    fpr = str(packet.fingerprint).upper()
    return fpr[:16] if material.version == 6 else fpr[-16:]


# -- Checking what Sequoia's policy will not --------------------------------------------------

#: Hash algorithm IDs (RFC 9580 §9.5) to hashlib names, for signatures checked here.
_HASHLIB = {
    1: "md5",
    2: "sha1",
    3: "ripemd160",
    8: "sha256",
    9: "sha384",
    10: "sha512",
    11: "sha224",
    12: "sha3_256",
    14: "sha3_512",
}


def _hashed_key(packet: Any) -> bytes:
    """A v4 key as a signature hashes it (RFC 9580 §5.2.4): 0x99, two-octet length, the
    public part of the body."""
    body: bytes = packet.body
    end = _public_end(body)
    if end is None:
        raise ValueError("key packet not understood")
    return b"\x99" + end.to_bytes(2, "big") + body[:end]


def _hashed_user_id(packet: Any) -> bytes:
    body: bytes = packet.body
    return b"\xb4" + len(body).to_bytes(4, "big") + body


def _mpis(data: bytes, count: int) -> list[int]:
    out, pos = [], 0
    for _ in range(count):
        end = _mpi_end(data, pos)
        if end > len(data):
            raise ValueError("truncated MPI")
        out.append(int.from_bytes(data[pos + 2 : end], "big"))
        pos = end
    return out


def _check_signature(sig: Any, signer: Any, signed: bytes) -> bool | None:
    """Whether the v4 signature ``sig`` by the key packet ``signer`` over ``signed`` (the
    hashed key and component, RFC 9580 §5.2.4) is mathematically valid: True, False, or None
    when it cannot be checked here (not v4, an algorithm or hash not handled).

    Used only for what Sequoia's policy refuses to check at all (MD5, SHA-1 and RIPEMD-160
    signatures, keys too short for e2email), and only to decide whether such a signature
    counts towards refusing the key: a signature found genuine here never makes anything
    usable, and one found forged is ignored as Sequoia ignores forged signatures."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

    body: bytes = sig.body
    key: bytes = signer.body
    if len(body) < 6 or body[0] != 4 or len(key) < 7 or key[0] != 4:
        return None
    hash_name = _HASHLIB.get(body[3])
    pk_algo = body[2]
    if hash_name is None:
        return None
    if pk_algo != key[5]:
        return False
    hashed_len = 6 + int.from_bytes(body[4:6], "big")
    trailer = body[:hashed_len] + b"\x04\xff" + hashed_len.to_bytes(4, "big")
    try:
        h = hashlib.new(hash_name)
    except ValueError:
        return None  # this OpenSSL lacks the hash (RIPEMD-160)
    h.update(signed + trailer)
    digest = h.digest()
    unhashed_len = int.from_bytes(body[hashed_len : hashed_len + 2], "big")
    rest = body[hashed_len + 2 + unhashed_len :]
    if rest[:2] != digest[:2]:
        return False  # the digest prefix (RFC 9580 §5.2.3) already disagrees
    values = rest[2:]
    # MD5 and SHA-1 are named only to check old signatures, so that the key can be refused.
    hash_algorithm: hashes.HashAlgorithm | None = {
        "md5": hashes.MD5(),  # noqa: S303
        "sha1": hashes.SHA1(),  # noqa: S303
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }.get(hash_name)
    if hash_algorithm is None and pk_algo not in (22, 27):
        return None  # EdDSA signs the digest itself; the others need the hash named
    prehashed = Prehashed(hash_algorithm or hashes.SHA256())
    try:
        if pk_algo in (1, 3):  # RSA, PKCS #1 v1.5 (RFC 9580 §5.2.3.1)
            n, e = _mpis(key[6:], 2)
            (s_value,) = _mpis(values, 1)
            size = (n.bit_length() + 7) // 8
            rsa.RSAPublicNumbers(e, n).public_key().verify(
                s_value.to_bytes(size, "big"), digest, padding.PKCS1v15(), prehashed
            )
        elif pk_algo == 17:  # DSA (deprecated in cryptography: it may warn, or one day go)
            p, q, g, y = _mpis(key[6:], 4)
            r, s_value = _mpis(values, 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    public = dsa.DSAPublicNumbers(y, dsa.DSAParameterNumbers(p, q, g)).public_key()
                except (AttributeError, NotImplementedError):
                    return None
                public.verify(encode_dss_signature(r, s_value), digest, prehashed)
        elif pk_algo == 19:  # ECDSA
            oid = key[7 : 7 + key[6]].hex()
            curve: ec.EllipticCurve | None = {
                "2a8648ce3d030107": ec.SECP256R1(),
                "2b81040022": ec.SECP384R1(),
                "2b81040023": ec.SECP521R1(),
                "2b2403030208010107": ec.BrainpoolP256R1(),
                "2b240303020801010b": ec.BrainpoolP384R1(),
                "2b240303020801010d": ec.BrainpoolP512R1(),
                "2b8104000a": ec.SECP256K1(),
            }.get(oid)
            if curve is None:
                return None
            point_at = 7 + key[6]
            point = key[point_at + 2 : _mpi_end(key, point_at)]
            r, s_value = _mpis(values, 2)
            ec.EllipticCurvePublicKey.from_encoded_point(curve, point).verify(
                encode_dss_signature(r, s_value), digest, ec.ECDSA(prehashed)
            )
        elif pk_algo == 22:  # EdDSA (legacy, Ed25519 only): signs the digest itself
            oid = key[7 : 7 + key[6]].hex()
            if oid != "2b06010401da470f01":
                return None
            point_at = 7 + key[6]
            point = key[point_at + 2 : _mpi_end(key, point_at)]
            if len(point) != 33 or point[0] != 0x40:
                return False
            r, s_value = _mpis(values, 2)
            ed25519.Ed25519PublicKey.from_public_bytes(point[1:]).verify(
                r.to_bytes(32, "big") + s_value.to_bytes(32, "big"), digest
            )
        elif pk_algo == 27:  # Ed25519 (RFC 9580 §5.2.3.4)
            ed25519.Ed25519PublicKey.from_public_bytes(key[6:38]).verify(values[:64], digest)
        else:
            return None
    except InvalidSignature:
        return False
    except (ValueError, TypeError, OverflowError, IndexError):
        return False  # malformed key or signature values: nothing genuine about them
    return True


def _signed(primary: Any, component: Any | None) -> bytes:
    """What a self-signature on ``component`` (a user ID, a subkey, or None for the primary
    key itself) hashes before its own fields (RFC 9580 §5.2.4)."""
    from pysequoia.packet import Tag

    data = _hashed_key(primary)
    if component is None:
        return data
    if component.tag == Tag.UserID:
        return data + _hashed_user_id(component)
    return data + _hashed_key(component)


def _counts(sig: Any, primary: Any, signed: Callable[[], bytes]) -> bool:
    """Whether a self-signature that Sequoia's policy refuses to check (a weak hash, or a key
    too short for e2email) counts towards refusing the key: yes when it checks out here, or
    when it cannot be checked here (fail closed); no when it is shown to be forged."""
    try:
        return _check_signature(sig, primary, signed()) is not False
    except (ValueError, IndexError):
        return True


# -- Judging ------------------------------------------------------------------------------------


def _created(sig: Any) -> datetime:
    created = sig.signature_created
    return created if created is not None else datetime.min.replace(tzinfo=UTC)


def _expiry(key: Any, sig: Any) -> datetime | None:
    period: timedelta | None = sig.key_validity_period
    created: datetime | None = key.key_created
    if period is None or created is None or not period:
        return None
    return created + period


def _caps(sig: Any) -> str:
    flags = sig.key_flags
    if flags is None:
        return ""
    caps = ""
    if flags.transport_encryption or flags.storage_encryption:
        caps += "e"
    if flags.signing:
        caps += "s"
    if flags.certification:
        caps += "c"
    if flags.authentication:
        caps += "a"
    return caps


def _weak(sig: Any) -> bool:
    fields = _sig_fields(sig)
    return fields is not None and fields[1] in WEAK_HASHES


def _hash_id(sig: Any) -> int | None:
    fields = _sig_fields(sig)
    return fields[1] if fields else None


def _of_type(sigs: Sequence[Any], types: set[int], fingerprint: str) -> list[Any]:
    out = []
    for sig in sigs:
        fields = _sig_fields(sig)
        if fields is not None and fields[0] in types and _by_primary(sig, fingerprint):
            out.append(sig)
    return out


def _revoked(
    rev: Any, genuine: Sequence[Any], in_use: Callable[[Sequence[Any]], bool], *, hard: bool
) -> bool:
    """Whether the revocation ``rev`` of a component is genuine and in force. ``genuine`` are
    the component's verified self-signatures; ``in_use(sigs)`` asks Sequoia whether it still
    uses the component bound by ``sigs`` (a reduced certificate).

    A hard revocation of a subkey (no reason, or "key compromised": RFC 9580 §5.2.3.31) is in
    force whatever its date, so Sequoia's answer with every genuine binding decides it: used
    means forged. Otherwise Sequoia is asked with one genuine binding older than the
    revocation: if it still uses the component, the revocation is forged (or not about it)
    and is ignored; a genuine one is in force unless a newer genuine self-signature
    supersedes it (Sequoia decides with all of them). gpg counts a revocation made in the same
    second as the binding; Sequoia does not, so when only such bindings exist nothing can be
    checked and the revocation is honoured (fail closed)."""
    if hard:
        return not in_use([*genuine, rev])
    when = _created(rev)
    older = [s for s in genuine if _created(s) < when]
    newer = [s for s in genuine if _created(s) > when]
    if older:
        if in_use([max(older, key=_created), rev]):
            return False
        return not newer or not in_use([*genuine, rev])
    if newer:
        return not in_use([*genuine, rev])
    return True


def _uid_in_use(primary: Any, uid: Any, text: str, sigs: Sequence[Any]) -> bool:
    return _lists_user_id([primary, uid, *sigs], text)


def _hashed_subpackets(sig: Any) -> Iterator[tuple[int, bytes]]:
    """(type, body) of each hashed subpacket of a v4 signature (RFC 9580 §5.2.3.7)."""
    body: bytes = sig.body
    if body[:1] != b"\x04" or len(body) < 6:
        return
    area = body[6 : 6 + int.from_bytes(body[4:6], "big")]
    i = 0
    while i < len(area):
        first = area[i]
        if first < 192:
            n, i = first, i + 1
        elif first < 255:
            if i + 1 >= len(area):
                return
            n, i = ((first - 192) << 8) + area[i + 1] + 192, i + 2
        else:
            n, i = int.from_bytes(area[i + 1 : i + 5], "big"), i + 5
        if n < 1 or i + n > len(area):
            return
        yield area[i] & 0x7F, area[i + 1 : i + n]
        i += n


def _hard(rev: Any) -> bool:
    """A revocation that is not "superseded", "retired" or "user ID no longer valid" (RFC
    9580 §5.2.3.31: those are soft; no reason or any other is hard)."""
    for typ, data in _hashed_subpackets(rev):
        if typ == 29 and data:
            return data[0] not in (1, 3, 32)
    return True


@dataclass(frozen=True)
class _Judged:
    uids: tuple[UserID, ...]
    #: The primary key, its direct-key signatures and each user ID with its genuine
    #: self-signatures (no revocations): the base every subkey is tested on.
    base: tuple[Any, ...]
    #: Genuine (or weak, see the module docstring) self-signatures on the primary, newest last.
    primary_sigs: tuple[Any, ...]


def _judge_user_ids(parsed: _Parsed, *, face_value: bool) -> _Judged:
    """The user IDs bound to the primary key. With ``face_value`` (the primary key is refused
    as WEAK whatever its signatures say) the self-signatures are not checked: they can only
    name the addresses the refusal is reported for."""
    fpr = parsed.fingerprint
    direct_sigs = _of_type(parsed.direct, {_DIRECT_KEY}, fpr)
    uids: list[UserID] = []
    base: list[Any] = [parsed.primary, *direct_sigs]
    primary_sigs: list[Any] = []
    for comp in parsed.user_ids:
        text = comp.packet.body.decode("utf-8", errors="replace")
        genuine = [
            s
            for s in _of_type(comp.sigs, _CERTIFICATIONS, fpr)
            if not face_value
            and not _weak(s)
            and _lists_user_id([parsed.primary, comp.packet, s], text)
        ]
        signed = functools.partial(_signed, parsed.primary, comp.packet)
        weak = [
            s
            for s in _of_type(comp.sigs, _CERTIFICATIONS, fpr)
            if (face_value or _weak(s)) and _counts(s, parsed.primary, signed)
        ]
        if not genuine and not weak:
            continue  # no self-signature binds it: gpg drops such a user ID on import
        newest = max((*genuine, *weak), key=_created)
        revoked = False
        for rev in _of_type(comp.sigs, {_CERT_REVOCATION}, fpr):
            if face_value or _weak(rev):
                revoked = revoked or _counts(rev, parsed.primary, signed)
            elif genuine:
                in_use = functools.partial(_uid_in_use, parsed.primary, comp.packet, text)
                revoked = revoked or _revoked(rev, genuine, in_use, hard=False)
        uids.append(UserID(text, "r" if revoked else "-", _hash_id(newest)))
        base += [comp.packet, *genuine]
        primary_sigs += [*genuine, *weak]
    primary_sigs += [s for s in direct_sigs if not _weak(s)]
    primary_sigs.sort(key=_created)
    return _Judged(tuple(uids), tuple(base), tuple(primary_sigs))


def _judge_subkey(
    parsed: _Parsed,
    comp: _Component,
    judged: _Judged,
    public: dict[str, Any],
    now: datetime,
    *,
    face_value: bool,
) -> SubKey | None:
    fpr = parsed.fingerprint
    material = _key_material(comp.packet, secret_tag="Secret" in str(comp.packet.tag))
    # A subkey refused as WEAK for its own length (Sequoia's policy refuses it too, so it cannot
    # be tested) is taken at face value: its bindings only decide how the refusal reads.
    face_value = face_value or _too_short(material)
    key_id = _key_id(comp.packet, material)
    base_public = [
        public.get(str(p.fingerprint).upper(), p) if p is parsed.primary else p for p in judged.base
    ]

    def accepted(extra: Sequence[Any], caps: str) -> bool:
        if "e" in caps and _encrypts_to([*judged.base, comp.packet, *extra], key_id):
            return True
        return (
            "s" in caps and material.has_secret and _signs_with([*base_public, comp.packet, *extra])
        )

    bindings = _of_type(comp.sigs, {_SUBKEY_BINDING}, fpr)
    genuine = [b for b in bindings if not face_value and not _weak(b) and accepted([b], _caps(b))]
    signed = functools.partial(_signed, parsed.primary, comp.packet)
    weak = [b for b in bindings if (face_value or _weak(b)) and _counts(b, parsed.primary, signed)]
    if not genuine and not weak:
        return None  # nothing shows the primary key bound it: never a candidate
    newest = max((*genuine, *weak), key=_created)
    revoked = False
    in_force = _caps(max(genuine, key=_created)) if genuine else ""

    def in_use(sigs: Sequence[Any]) -> bool:
        return accepted(sigs, in_force)

    for rev in _of_type(comp.sigs, {_SUBKEY_REVOCATION}, fpr):
        if face_value or _weak(rev):
            revoked = revoked or _counts(rev, parsed.primary, signed)
        elif genuine:
            revoked = revoked or _revoked(rev, genuine, in_use, hard=_hard(rev))
    expires = _expiry(comp.packet, newest)
    validity = "r" if revoked else ("e" if expires is not None and expires <= now else "")
    return SubKey(
        fingerprint=str(comp.packet.fingerprint).upper(),
        algorithm_id=material.algorithm_id,
        length=material.length,
        curve=material.curve,
        capabilities=_caps(newest),
        validity=validity,
        created=comp.packet.key_created,
        expires=expires,
        has_secret=material.has_secret,
        binding_hash=_hash_id(newest),
    )


def _public_packets(parsed: _Parsed) -> dict[str, Any]:
    """Fingerprint -> public key packet, for a certificate given with its secrets."""
    from pysequoia.packet import PacketPile, Tag

    cert = _cert(parsed.packets())
    if cert is None:
        return {}
    return {
        str(p.fingerprint).upper(): p
        for p in PacketPile.from_bytes(bytes(cert))
        if p.tag in (Tag.PublicKey, Tag.PublicSubkey)
    }


def _judge(parsed: _Parsed, now: datetime) -> OpenPGPKey:
    fpr = parsed.fingerprint
    material = _key_material(parsed.primary, secret_tag="Secret" in str(parsed.primary.tag))
    # A primary key too short for e2email is refused as WEAK whatever else holds; Sequoia's
    # policy refuses it outright, so nothing on it can be tested: read at face value.
    face_value = _too_short(material)
    judged = _judge_user_ids(parsed, face_value=face_value)
    public = (
        _public_packets(parsed)
        if material.has_secret or any("Secret" in str(c.packet.tag) for c in parsed.subkeys)
        else {}
    )

    # The primary key: Sequoia's policy-checked view of the whole certificate.
    whole = _cert(
        [
            *judged.base,
            *(p for c in parsed.subkeys for p in [c.packet, *c.sigs]),
            *_of_type(parsed.direct, {_KEY_REVOCATION}, fpr),
        ]
    )
    valid = False
    expires: datetime | None = None
    revoked = False
    if whole is not None:
        try:
            expires = whole.expiration
            valid = True
        except (RuntimeError, ValueError):
            valid = False
        revoked = bool(whole.is_revoked)
    signed = functools.partial(_signed, parsed.primary, None)
    if any(
        (face_value or _weak(r)) and _counts(r, parsed.primary, signed)
        for r in _of_type(parsed.direct, {_KEY_REVOCATION}, fpr)
    ):
        revoked = True
    # Sequoia cannot validate the key, but e2email refuses it as WEAK whatever the rest says: a
    # key too short, or every user ID bound only by a (genuine) weak-hash self-signature. Any
    # other key Sequoia cannot validate is invalid.
    weak_only = not valid and (
        face_value or bool(judged.uids and all(u.weak_self_signature for u in judged.uids))
    )
    if weak_only and judged.primary_sigs:
        # Refused as WEAK whatever this says (module docstring); shown as gpg shows it.
        expires = _expiry(parsed.primary, judged.primary_sigs[-1])
    if revoked:
        validity = "r"
    elif not valid and not weak_only:
        validity = "i"
    elif expires is not None and expires <= now:
        validity = "e"
    else:
        validity = ""

    # Primary capabilities: flags of its newest self-signature, encryption and signing
    # confirmed by Sequoia (encrypting to the primary itself, in a certificate without
    # subkeys; picking it as the one secret key to sign with). A key Sequoia cannot validate
    # keeps no capability: what its signatures claim must not make it usable.
    caps = _caps(judged.primary_sigs[-1]) if judged.primary_sigs else ""
    if not valid:
        caps = caps.replace("e", "").replace("s", "")
    elif "e" in caps and not _encrypts_to(judged.base, _key_id(parsed.primary, material)):
        caps = caps.replace("e", "")
    if "s" in caps and validity == "" and material.has_secret and not _signs_with(judged.base):
        # (Only a live key can be tested; an expired or revoked one is refused for that.)
        caps = caps.replace("s", "")
    primary = SubKey(
        fingerprint=fpr,
        algorithm_id=material.algorithm_id,
        length=material.length,
        curve=material.curve,
        capabilities=caps,
        validity=validity,
        created=parsed.primary.key_created,
        expires=expires,
        has_secret=material.has_secret,
    )
    subkeys = []
    for comp in parsed.subkeys:
        sub = _judge_subkey(parsed, comp, judged, public, now, face_value=face_value)
        if sub is not None:
            subkeys.append(sub)
    uids = judged.uids
    if revoked:
        # gpg lists every user ID and subkey of a revoked key as revoked too (doc/DETAILS).
        uids = tuple(UserID(u.text, "r", u.self_sig_hash) for u in uids)
        subkeys = [replace(s, validity="r") for s in subkeys]
    return OpenPGPKey(primary=primary, subkeys=tuple(subkeys), user_ids=uids)


def keys_from_bytes(data: bytes, *, now: datetime | None = None) -> list[OpenPGPKey]:
    """Every certificate (public or secret, armored or binary, concatenated) in ``data``,
    judged by e2email's policy without gpg. Secret material present => ``SubKey.has_secret``.
    A certificate given more than once is merged into one judgement; a bare revocation
    certificate counts when its certificate comes before it in ``data``. KeystoreError when
    ``data`` holds no certificate."""
    _sq()
    when = now or datetime.now(UTC)
    keys = [_judge(parsed, when) for parsed in _split(_packets(data))]
    if not keys:
        raise KeystoreError("no OpenPGP certificate found in the data")
    return keys


def key_from_cert(
    cert: pysequoia.Cert | pysequoia.Tsk, *, now: datetime | None = None
) -> OpenPGPKey:
    """The judgement of one pysequoia certificate. A ``Tsk`` counts its secret keys; a
    ``Cert`` is judged as the public certificate it serialises to (pysequoia deprecates
    reading secrets from a ``Cert``, and ``Tsk.extract_certificate()`` is meant as public)."""
    return keys_from_bytes(bytes(cert), now=now)[0]
