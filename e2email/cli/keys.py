"""``e2email keys``: import, list, export and generate keys."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import click

from e2email.cli.app import State, cli
from e2email.config import (
    password_from_env,
)
from e2email.errors import (
    ConfigError,
)


@cli.group()
def keys() -> None:
    """Import, list, export and generate OpenPGP keys in the keystore."""


@keys.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_obj
def keys_import(state: State, files: tuple[Path, ...]) -> None:
    """Import keys from FILES (armored or binary, public or secret)."""
    store = state.keystore()
    for path in files:
        summary = store.import_file(path)
        secret = f", {summary.secret_imported} secret" if summary.secret_imported else ""
        click.echo(
            f"{path}: {summary.imported} imported, {summary.unchanged} unchanged{secret}: "
            + ", ".join(summary.fingerprints)
        )


@keys.command("list")
@click.pass_obj
def keys_list(state: State) -> None:
    """List keys: address, fingerprint, algorithm, expiry, and usable or why not."""
    from rich.console import Console
    from rich.table import Table

    found = state.keystore().all_keys()
    if not found:
        click.echo(f"no keys in {state.home} (import some with `e2email keys import FILE`)")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("address", "fingerprint", "algorithm", "expires", "secret", "status"):
        table.add_column(col)
    for key in found:
        algos = "/".join(dict.fromkeys(k.algorithm for k in (key.primary, *key.subkeys)))
        expires = f"{key.expires:%Y-%m-%d}" if key.expires else "never"
        table.add_row(
            "\n".join(key.addresses) or "(no address)",
            key.fingerprint,
            algos,
            expires,
            "yes" if key.has_secret else "no",
            key.status(),
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@keys.command("export")
@click.argument("address")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def keys_export(state: State, address: str, output: Path | None) -> None:
    """Export the public key of ADDRESS (or a fingerprint), armored."""
    data = state.keystore().export(address)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
        click.echo(f"wrote {output}")


@keys.command("generate")
@click.argument("address")
@click.option("--name", default="", help="A real name for the user ID.")
@click.option(
    "--algorithm",
    type=click.Choice(["ed25519", "rsa3072", "rsa4096"]),
    default="ed25519",
    show_default=True,
)
@click.option("--expire", default="3y", show_default=True, help="e.g. 2y, 180d, 0 (never).")
@click.option(
    "--passphrase-env", metavar="VAR", help="Protect the key with the passphrase in $VAR."
)
@click.option("--ask-passphrase", is_flag=True, help="Ask for a passphrase on the terminal.")
@click.pass_obj
def keys_generate(
    state: State,
    address: str,
    name: str,
    algorithm: str,
    expire: str,
    passphrase_env: str | None,
    ask_passphrase: bool,
) -> None:
    """Generate a key pair for ADDRESS (Ed25519/Cv25519 by default)."""
    passphrase = None
    if passphrase_env:
        passphrase = password_from_env(passphrase_env)()
    elif ask_passphrase:
        passphrase = getpass.getpass("Passphrase for the new key: ")
        if getpass.getpass("Again: ") != passphrase:
            raise ConfigError("the passphrases differ")
    key = state.keystore().generate(
        address, name=name, algorithm=algorithm, passphrase=passphrase, expire=expire
    )
    click.echo(f"generated {key.fingerprint} {key.user_id}")
