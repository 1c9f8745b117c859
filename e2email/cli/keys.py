"""``e2email keys``: import, list, export and generate keys (OpenPGP) and certificates (S/MIME)."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from e2email.cli.app import State, cli
from e2email.config import (
    password_from_env,
)
from e2email.errors import (
    ConfigError,
    KeyProblem,
    KeystoreError,
    MessageError,
    PassphraseError,
    SignerKeyError,
)
from e2email.keysources import SourceKind
from e2email.keystore import ImportSummary, Keystore, OpenPGPKey, check_expiry
from e2email.message import Address

if TYPE_CHECKING:
    # Imported where used: e2email.certstore loads `cryptography` (about 10 MB), which no
    # other command (e.g. `send` of an OpenPGP message) needs.
    from e2email.certstore import CertStore, StoredCert
from e2email.private import write_private


def _ask(prompt: str, option: str) -> Callable[[], str]:
    """A passphrase source that asks on the terminal, or says which option to use instead."""

    def ask() -> str:
        if not sys.stdin.isatty():
            raise ConfigError(f"a passphrase is needed and there is no terminal: use {option}")
        return getpass.getpass(f"{prompt}: ")

    return ask


def _new_passphrase(passphrase_env: str | None, ask_passphrase: bool) -> str | None:
    if passphrase_env:
        return password_from_env(passphrase_env, what="the new key's passphrase")()
    if ask_passphrase:
        passphrase = getpass.getpass("Passphrase for the new key: ")
        if getpass.getpass("Again: ") != passphrase:
            raise ConfigError("the passphrases differ")
        return passphrase
    return None


@cli.group()
def keys() -> None:
    """Import, list, export and generate OpenPGP keys and S/MIME certificates."""


@keys.command("import")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--trust",
    "trust_files",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="CERT",
    help="S/MIME: trust this CA certificate (or a self-signed certificate you checked) as a "
    "root for chain validation (repeatable).",
)
@click.option(
    "--passphrase-env",
    metavar="VAR",
    help="S/MIME: the passphrase of PKCS#12 files and encrypted PEM keys, from $VAR "
    "(otherwise asked on the terminal when needed). The key is stored under it. With "
    "--autocrypt: the passphrase of your OpenPGP key, to read gossip in encrypted mail. "
    "OpenPGP secret keys without a passphrase are stored under it (certificate store).",
)
@click.option(
    "--unprotected",
    is_flag=True,
    help="Store an OpenPGP secret key that has no passphrase as it is (the certificate store "
    "otherwise refuses it).",
)
@click.option(
    "--autocrypt",
    is_flag=True,
    help="FILES are received messages (or Maildir folders): learn the senders' keys from their "
    "Autocrypt headers (the latest message wins) and, in encrypted mail you can decrypt, "
    "the Autocrypt-Gossip keys of the other recipients.",
)
@click.pass_obj
def keys_import(
    state: State,
    files: tuple[Path, ...],
    trust_files: tuple[Path, ...],
    passphrase_env: str | None,
    autocrypt: bool,
    unprotected: bool,
) -> None:
    """Import keys and certificates from FILES.

    A received S/MIME signed message (MESSAGE.eml) gives its signer's certificate, once the
    signature verifies and the certificate passes the chain and address checks.
    OpenPGP keys (armored or binary, public or secret) go to the GnuPG keyring. X.509 files are
    for S/MIME and recognised by their content: PEM or DER certificates of recipients, PKCS#12
    bundles (.p12/.pfx) and PEM private keys with their certificate (in the same file or one
    given alongside) become your own identities; --trust adds a trusted CA. Certificate
    revocation lists (PEM or DER, signed by a CA already imported or given alongside) are kept,
    the newest per CA, and refuse every certificate they list when sending.
    """
    if not files and not trust_files:
        raise click.UsageError("give FILES to import, or --trust CERT")
    if autocrypt:
        if trust_files:
            raise click.UsageError("--trust does not go with --autocrypt")
        _import_autocrypt(state, files, passphrase_env)
        return
    from e2email.certstore import CertKind, CertStore, looks_like_x509
    from e2email.discovery.smime import import_signer, is_smime_signed_message

    # A received S/MIME signed message: its signer's certificate, once the signature and the
    # chain verify (how S/MIME users hand out certificates).
    messages = [p for p in files if is_smime_signed_message(p)]
    files = tuple(p for p in files if p not in messages)
    for path in messages:
        taken = import_signer(CertStore(state.home), path)
        done = ", ".join(
            f"{'imported' if i.new else 'unchanged'} {i.stored.fingerprint}" for i in taken.imported
        )
        click.echo(f"{path}: S/MIME signature verified; signer {taken.address}: {done}")
        if taken.status != "usable":
            click.echo(f"  note: {taken.status}")
    x509_files = [p for p in files if looks_like_x509(p)]
    openpgp_files = [p for p in files if p not in x509_files]
    if openpgp_files:
        store = state.keystore()
        # In the certificate store a secret key without a passphrase is stored under this one.
        protect_with = (
            password_from_env(passphrase_env, what="the passphrase to protect secret keys with")()
            if passphrase_env and store.is_certd
            else None
        )
        for path in openpgp_files:
            summary = store.import_file(path, passphrase=protect_with, unprotected=unprotected)
            _report_import(path, summary)
    if not (x509_files or trust_files):
        return
    from e2email.certstore import holds_crl

    certstore = CertStore(state.home)
    source = (
        password_from_env(passphrase_env, what="the passphrase of the PKCS#12 file or private key")
        if passphrase_env
        else _ask("Passphrase of the PKCS#12 file or private key", "--passphrase-env VAR")
    )
    results = (
        certstore.import_files(x509_files, passphrase=source, crls=False) if x509_files else []
    )
    if trust_files:
        results += certstore.import_files(trust_files, trust=True, crls=False)
    # CRLs last, so a CA certificate (even one given with --trust) and its CRL can come together.
    crl_files = [p for p in (*x509_files, *trust_files) if holds_crl(p)]
    crls = certstore.import_crls(crl_files) if crl_files else []
    for item in results:
        cert = item.stored
        who = ", ".join(cert.addresses) or cert.subject
        done = "imported" if item.new else "unchanged"
        click.echo(f"{item.source}: S/MIME {cert.kind.value} {who}: {done} {cert.fingerprint}")
        if item.new and cert.kind is not CertKind.INTERMEDIATE and not cert.is_ca:
            status = certstore.status(cert)
            if status != "usable":
                click.echo(f"  note: {status}")
    for crl in crls:
        done = {
            "imported": "imported",
            "unchanged": "unchanged",
            "older": "not imported, a newer CRL of this CA is kept",
        }[crl.outcome]
        until = f"{crl.next_update:%Y-%m-%d %H:%M} UTC" if crl.next_update else "no next update"
        click.echo(
            f"{crl.source}: S/MIME CRL of {crl.issuer}: {done} (issued "
            f"{crl.this_update:%Y-%m-%d %H:%M} UTC, next {until}, {crl.revoked} revoked)"
        )
        if crl.expired():
            click.echo(
                "  note: this CRL is out of date: it still revokes what it lists, but vouches "
                "for nothing else (--revocation require then needs a fresh status)"
            )


def _import_autocrypt(state: State, files: tuple[Path, ...], passphrase_env: str | None) -> None:
    """``keys import --autocrypt``: the messages in any order: Autocrypt's peer state rules
    make the latest Date win (an older message never replaces what a newer one brought)."""
    from e2email.discovery.autocrypt import learn_from_message, message_files

    passphrase = (
        password_from_env(passphrase_env, what="the passphrase of your OpenPGP key")()
        if passphrase_env
        else None
    )
    store = state.keystore()
    for path in message_files(files):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise MessageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        for learnt in learn_from_message(
            store, raw, origin=str(path.resolve()), passphrase=passphrase
        ):
            click.echo(f"{path}: {learnt}")


def _report_import(path: Path, summary: ImportSummary) -> None:
    """Every key the import touched and every user ID it added or revoked (so a file that
    carries more than it claims shows it), then a loud warning per address that now has more
    than one key (issue 8 item 1)."""
    secret = f", {summary.secret_imported} secret" if summary.secret_imported else ""
    revoked = f", {summary.revoked} revocation(s)" if summary.revoked else ""
    click.echo(
        f"{path}: {summary.imported} imported, {summary.unchanged} unchanged{secret}{revoked}: "
        + ", ".join(summary.fingerprints)
    )
    for change in summary.changes:
        if change.revoked:
            who = ", ".join(change.user_ids) or "(no user ID)"
            click.echo(f"  revoked key {change.fingerprint}: {who}")
            continue
        head = "new key" if change.new else "updated key"
        click.echo(
            f"  {head} {change.fingerprint}" + (" (with secret key)" if change.secret_added else "")
        )
        for uid in change.added_user_ids:
            click.echo(f"    user ID added: {uid}")
        for uid in change.revoked_user_ids:
            click.echo(f"    user ID revoked: {uid}")
        for sub in change.added_subkeys:
            click.echo(f"    subkey added: {sub}")
        for sub in change.changed_subkeys:
            click.echo(f"    subkey changed (validity or expiry): {sub}")
    for conflict in summary.conflicts:
        then = (
            f"Messages to {conflict.address} are refused until you choose one with "
            f"--key {conflict.address}=FINGERPRINT (check the fingerprint with its owner)."
            if conflict.ambiguous
            else "Check with its owner that the usable one is theirs."
        )
        click.echo(
            f"e2email: WARNING: {conflict.address} now has {len(conflict.fingerprints)} keys: "
            f"{conflict.detail}. {then}",
            err=True,
        )


@keys.command("list")
@click.pass_obj
def keys_list(state: State) -> None:
    """List keys: address, fingerprint, algorithm, expiry, and usable or why not; then S/MIME
    identities and certificates with subject, issuer and validity."""
    from rich.console import Console
    from rich.table import Table

    from e2email.certstore import CertStore

    found = state.keystore().all_keys()
    certstore = CertStore(state.home)
    certs = certstore.all_certs()
    if not found and not certs:
        click.echo(f"no keys in {state.home} (import some with `e2email keys import FILE`)")
        return
    if found:
        table = Table(box=None, pad_edge=False)
        columns = ("address", "fingerprint", "algorithm", "expires", "secret", "status")
        for col in (*columns, "source", "confirmed"):
            table.add_column(col)
        store = state.keystore()
        for key in found:
            algos = "/".join(dict.fromkeys(k.algorithm for k in (key.primary, *key.subkeys)))
            expires = f"{key.expires:%Y-%m-%d}" if key.expires else "never"
            source, confirmed = _source_cells(store, key)
            table.add_row(
                "\n".join(key.addresses) or "(no address)",
                key.fingerprint,
                algos,
                expires,
                "yes" if key.has_secret else "no",
                key.status(),
                source,
                confirmed,
            )
        Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if certs:
        _list_smime(certstore, certs, separate=bool(found))


def _source_cells(store: Keystore, key: OpenPGPKey) -> tuple[str, str]:
    """Where the key came from (the trust policy, shown: a key found by WKD or Autocrypt is
    not one a person handed over) and when that was last confirmed."""
    source = store.source_of(key)
    if source is None:
        return "not recorded", ""
    label = source.kind.value
    if source.kind is SourceKind.FILE:
        label = f"file {Path(source.detail).name}"
    elif source.kind is SourceKind.WKD:
        label = f"wkd {urlsplit(source.detail).hostname or ''}".strip()
    elif source.kind is SourceKind.KEYSERVER:
        label = f"keyserver {urlsplit(source.detail).hostname or ''}".strip()
    accepted = [a for a in key.addresses if store.sources.accepted(a) == key.fingerprint]
    if accepted:
        label += f", accepted for {', '.join(accepted)}"
    when = source.last_confirmed
    return label, f"{when:%Y-%m-%d %H:%M}" if when else ""


@keys.command("accept")
@click.argument("address")
@click.argument("fingerprint")
@click.pass_obj
def keys_accept(state: State, address: str, fingerprint: str) -> None:
    """Use FINGERPRINT as the key for ADDRESS: a key that discovery found but held back because
    ADDRESS already had a different key, or one of several keys in the keystore that carry
    it. Check the fingerprint with its owner first. The key is judged again (an expired or
    revoked key cannot be accepted)."""
    from e2email.discovery.policy import accept_key

    try:
        address = Address(address.strip()).addr_spec
    except MessageError as exc:
        raise MessageError(f"invalid address: {exc}") from exc
    fpr = fingerprint.replace(" ", "").upper()
    if len(fpr) != 40 or any(c not in "0123456789ABCDEF" for c in fpr):
        raise click.BadParameter("give the full 40-digit fingerprint", param_hint="FINGERPRINT")
    click.echo(accept_key(state.keystore(), address, fpr))


def _list_smime(certstore: CertStore, certs: tuple[StoredCert, ...], *, separate: bool) -> None:
    """One block per certificate: the address line first (address, kind, usable or why not),
    then subject, issuer, validity, key and SHA-256 fingerprint (the --key value)."""
    from e2email.certstore import CertKind, describe

    if separate:
        click.echo("")
    click.echo(f"S/MIME ({certstore.root}):")
    order = {
        CertKind.IDENTITY: 0,
        CertKind.CERTIFICATE: 1,
        CertKind.TRUSTED: 2,
        CertKind.INTERMEDIATE: 3,
    }
    now = datetime.now(UTC)
    groups: dict[str, list[StoredCert]] = {}
    for item in certs:
        # One block per certificate, even when it is stored twice (an identity you also trust).
        groups.setdefault(item.fingerprint, []).append(item)
    blocks = [sorted(group, key=lambda c: order[c.kind]) for group in groups.values()]
    blocks.sort(key=lambda g: (order[g[0].kind], g[0].addresses, g[0].subject))
    for group in blocks:
        cert = group[0]
        kinds = []
        for item in group:
            trusted_leaf = item.kind is CertKind.TRUSTED and not item.is_ca
            kinds.append("trusted" if trusted_leaf and len(group) > 1 else item.kind.value)
        kind = ", ".join(kinds)
        if cert.is_ca:
            kind = "trusted CA" if cert.kind is CertKind.TRUSTED else "untrusted CA, for chains"
        elif kind == CertKind.TRUSTED.value:
            kind = "trusted certificate"
        who = ", ".join(cert.addresses) or describe(cert.certificate)
        click.echo(f"  {who}  [{kind}]  {certstore.status(cert, now)}")
        click.echo(f"      subject  {cert.subject}")
        click.echo(
            f"      issuer   {cert.issuer}" + ("  (self-signed)" if cert.self_signed else "")
        )
        click.echo(
            f"      valid    {cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d}  "
            f"{cert.algorithm}"
        )
        click.echo(f"      sha256   {cert.fingerprint}")


@keys.command("export")
@click.argument("address")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--smime", is_flag=True, help="Export the S/MIME certificate (and chain) as PEM instead."
)
@click.option(
    "--pkcs12",
    is_flag=True,
    help="With --smime: export your identity (private key included) as PKCS#12 for a mail "
    "client; needs --output.",
)
@click.option("--legacy", is_flag=True, help="With --pkcs12: 3DES for older readers.")
@click.option("--passphrase-env", metavar="VAR", help="With --pkcs12: the stored key's passphrase.")
@click.option(
    "--export-passphrase-env", metavar="VAR", help="With --pkcs12: the bundle's passphrase."
)
@click.pass_obj
def keys_export(
    state: State,
    address: str,
    output: Path | None,
    smime: bool,
    pkcs12: bool,
    legacy: bool,
    passphrase_env: str | None,
    export_passphrase_env: str | None,
) -> None:
    """Export the public key of ADDRESS (or a fingerprint), armored; with --smime the
    certificate chain (PEM), or with --pkcs12 the whole identity."""
    if (pkcs12 or legacy) and not smime:
        raise click.UsageError("--pkcs12 and --legacy go with --smime")
    if not smime:
        data = state.keystore().export(address)
    else:
        from e2email.certstore import CertKind, CertStore

        certstore = CertStore(state.home)
        stored = certstore.get(address) if "@" not in address else None
        if stored is None:
            own = certstore.signer_cert(address) if pkcs12 else certstore.recipient_cert(address)
            if isinstance(own, KeyProblem):
                # Exporting does not need a usable certificate, only one for the address.
                candidates = [
                    c for c in certstore.find(address) if c.kind is CertKind.IDENTITY or not pkcs12
                ]
                if not candidates:
                    raise SignerKeyError(own) if pkcs12 else KeystoreError(str(own))
                stored = max(candidates, key=lambda c: c.not_after)
            else:
                stored = own
        if pkcs12:
            if output is None:
                raise click.UsageError("--pkcs12 writes a binary file: give --output FILE")
            key_pw = (
                password_from_env(passphrase_env, what="the private key's passphrase")()
                if passphrase_env
                else None
            )
            export_pw = (
                password_from_env(export_passphrase_env, what="the PKCS#12 file's passphrase")()
                if export_passphrase_env
                else _ask("Passphrase for the PKCS#12 file", "--export-passphrase-env VAR")()
            )
            data = certstore.export_pkcs12(
                stored, passphrase=key_pw, export_passphrase=export_pw, legacy=legacy
            )
        else:
            data = certstore.export_pem(stored)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        if pkcs12:
            # A PKCS#12 file holds the private key: created 0600 (never world-readable first),
            # and a planted symbolic link is not followed.
            write_private(output, data)
        else:
            try:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            except OSError as exc:
                raise MessageError(f"cannot write {output}: {exc.strerror or exc}") from exc
        click.echo(f"wrote {output}")


@keys.command("generate")
@click.argument("address")
@click.option("--name", default="", help="A real name for the user ID (or certificate).")
@click.option(
    "--smime",
    is_flag=True,
    help="Make an S/MIME identity (X.509 certificate + key) for trying S/MIME, self-signed "
    "unless --test-ca is given.",
)
@click.option(
    "--test-ca",
    is_flag=True,
    help="With --smime: have it issued by this home's local test CA (made on first use, "
    "trusted here; give its certificate to your test recipients).",
)
@click.option(
    "--algorithm",
    type=click.Choice(["ed25519", "rsa2048", "rsa3072", "rsa4096", "ecdsa-p256"]),
    default=None,
    help="OpenPGP: ed25519 (default), rsa3072, rsa4096. S/MIME: rsa3072 (default), rsa2048, "
    "rsa4096, ecdsa-p256 (signing only).",
)
@click.option("--expire", default="3y", show_default=True, help="e.g. 2y, 180d, 0 (never).")
@click.option(
    "--passphrase-env", metavar="VAR", help="Protect the key with the passphrase in $VAR."
)
@click.option("--ask-passphrase", is_flag=True, help="Ask for a passphrase on the terminal.")
@click.option(
    "--unprotected",
    is_flag=True,
    help="OpenPGP: make the key without a passphrase (the certificate store needs this said).",
)
@click.pass_obj
def keys_generate(
    state: State,
    address: str,
    name: str,
    smime: bool,
    test_ca: bool,
    algorithm: str | None,
    expire: str,
    passphrase_env: str | None,
    ask_passphrase: bool,
    unprotected: bool,
) -> None:
    """Generate a key pair for ADDRESS (Ed25519/Cv25519 by default), or with --smime an S/MIME
    identity for testing (RSA-3072 by default)."""
    if test_ca and not smime:
        raise click.UsageError("--test-ca goes with --smime")
    if smime:
        if algorithm == "ed25519":
            raise click.UsageError(
                "S/MIME identities are RSA (rsa2048, rsa3072, rsa4096) or ecdsa-p256"
            )
        passphrase = _new_passphrase(passphrase_env, ask_passphrase)
        from e2email.certstore import CertStore

        certstore = CertStore(state.home)
        made = certstore.generate_identity(
            address,
            name=name,
            algorithm=algorithm or "rsa3072",
            test_ca=test_ca,
            lifetime=expire,
            passphrase=passphrase,
        )
        if test_ca:
            how = f"issued by the local test CA {certstore.test_ca_cert()}"
        else:
            how = "self-signed, trusted here"
        click.echo(f"generated S/MIME identity {made.fingerprint} for {address} ({how})")
        click.echo(f"  status: {certstore.status(made)}; valid until {made.not_after:%Y-%m-%d}")
        click.echo(
            "  recipients need your certificate (`e2email keys export --smime ADDRESS`) and "
            "must trust " + ("the test CA certificate" if test_ca else "it (`keys import --trust`)")
        )
        return
    if algorithm not in (None, "ed25519", "rsa3072", "rsa4096"):
        raise click.UsageError(f"{algorithm} is for --smime; OpenPGP: ed25519, rsa3072, rsa4096")
    # Checked before a passphrase is asked for, and named as the option it came from.
    try:
        expire = check_expiry(expire)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--expire'") from exc
    try:
        Address(address.strip())
    except MessageError as exc:
        raise MessageError(f"invalid address: {exc}") from exc
    passphrase = _new_passphrase(passphrase_env, ask_passphrase)
    key = state.keystore().generate(
        address,
        name=name,
        algorithm=algorithm or "ed25519",
        passphrase=passphrase,
        expire=expire,
        unprotected=unprotected,
    )
    click.echo(f"generated {key.fingerprint} {key.user_id}")


@keys.command("migrate")
@click.option(
    "--passphrase-env",
    metavar="VAR",
    help="The passphrase of your secret keys, from $VAR (gpg exports a protected key only "
    "under it; it stays protected by it; a key without one is protected with it). Otherwise "
    "asked on the terminal when needed, and again for each key it does not open.",
)
@click.option(
    "--unprotected",
    is_flag=True,
    help="Store secret keys that have no passphrase in the GnuPG home as they are (without "
    "this, such a key needs a passphrase to be protected with).",
)
@click.pass_obj
def keys_migrate(state: State, passphrase_env: str | None, unprotected: bool) -> None:
    """Move this home's OpenPGP keys from its GnuPG home (HOME/gnupg) into the certificate
    store (HOME/pgp.cert.d and HOME/secret), which both engines read and no gpg is needed
    for. Every certificate and secret key is copied, both sides are compared, and only then
    does the home switch to the store. The GnuPG home is kept (use it with --gnupg-home).
    Running it again moves only what is new."""
    if state.gnupg_home is not None:
        raise click.UsageError("keys migrate moves HOME/gnupg; --gnupg-home does not go with it")
    store = Keystore(state.home, backend="certd")
    passphrase = (
        password_from_env(passphrase_env, what="the passphrase of your secret keys")()
        if passphrase_env
        else None
    )

    def ask(fingerprint: str) -> str | None:
        # Keys of one home may have different passphrases: each key gpg did not export is
        # asked for on a terminal (without one, the error names the key).
        if not sys.stdin.isatty():
            return None
        return getpass.getpass(f"Passphrase of the secret key {fingerprint}: ") or None

    try:
        done = store.migrate(passphrase=passphrase, ask=ask, unprotected=unprotected)
    except PassphraseError as exc:
        if not exc.missing or not sys.stdin.isatty():
            raise
        done = store.migrate(
            passphrase=_ask("Passphrase of your secret keys", "")(),
            ask=ask,
            unprotected=unprotected,
        )
    for key in done.keys:
        what = "moved" if key.moved else "already in the store"
        secret = f", secret for {len(key.secrets)} key(s)" if key.secrets else ""
        note = " (no passphrase, as in the GnuPG home)" if key.unprotected else ""
        who = ", ".join(key.addresses) or "(no address)"
        lost = f"; NOT USABLE HERE: {key.lost}" if key.lost else ""
        click.echo(f"{what}: {key.fingerprint} {who}{secret}{note}{lost}")
    moved = sum(1 for k in done.keys if k.moved)
    click.echo(
        f"{moved} of {len(done.keys)} key(s) moved; the home now uses {done.store}; "
        f"{done.gnupg_home} is kept as it was"
    )
    refused = [k for k in done.keys if k.lost]
    if refused:
        click.echo(
            f"warning: {len(refused)} key(s) gpg could use are refused in the store (see above): "
            f"replace them, or keep using them with --gnupg-home {done.gnupg_home}",
            err=True,
        )
