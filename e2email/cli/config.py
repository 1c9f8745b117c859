"""``e2email config``: check the accounts file (``check``) and show what it means (``show``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from e2email.accounts import Account, Config, ConfigFileError, load_config
from e2email.cli.app import EXIT_USAGE, State, cli

_CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The accounts file (default: the group's --config, $E2EMAIL_CONFIG, or "
    "$XDG_CONFIG_HOME/e2email/config.toml).",
)


@cli.group("config")
def config_group() -> None:
    """The accounts file: TOML, $XDG_CONFIG_HOME/e2email/config.toml unless --config FILE or
    E2EMAIL_CONFIG names another.

    Named accounts like msmtp's, `[accounts.NAME]`, each inheriting `[defaults]`; the default
    account is `default = "NAME"` at the top (or `default = true` in one account). Keys: host,
    port, tls (implicit|starttls), insecure-plaintext, user, auth (password|xoauth2), one of
    password-command, password-env, password-keyring (a keyring service name) or password
    (only in a file readable by you alone), token-command or token-env (XOAUTH2), ca-file,
    require-tls, timeout, connect-timeout, command-timeout, data-timeout, retries, from,
    from-patterns, scheme (openpgp|smime), sign, encrypt, encrypt-to-self, smime-cipher,
    smime-digest, rsa-pss, trust-self-signed, revocation, discover (off|wkd|wkd+keyserver),
    keys (a table address = fingerprint),
    home, gnupg-home, outbox, passphrase-env, passphrase-command.

    `send`, `outbox retry` and `doctor` take --account NAME; without it, `send -f ADDRESS`
    uses the account whose `from` (or `from-patterns`) matches, else the default account;
    --host on the command line uses no account. Options given on the command line win over
    the account's.
    """


@config_group.command("check")
@_CONFIG_OPTION
@click.pass_obj
def check(state: State, config_path: Path | None) -> None:
    """Check the accounts file: one line per mistake on stdout, `FILE:LINE: key: problem`.

    Exit status 0 when the file is right, 2 when it has mistakes (or cannot be read)."""
    try:
        config = load_config(config_path or state.config_path)
    except ConfigFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem))
        count = len(exc.problems)
        click.echo(
            f"e2email: error: {count} mistake{'s' if count != 1 else ''} in {exc.problems[0].path}",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    if not config.accounts:
        click.echo(f"{config.path}: no accounts (the file does not exist or defines none)")
        return
    default = f"; default: {config.default}" if config.default else "; no default account"
    click.echo(
        f"{config.path}: ok ({len(config.accounts)} account(s): {', '.join(config.names)}{default})"
    )


@config_group.command("show")
@click.option("--account", "name", metavar="NAME", help="Show only this account.")
@_CONFIG_OPTION
@click.pass_obj
def show(state: State, name: str | None, config_path: Path | None) -> None:
    """Print each account's effective settings ([defaults] applied), a literal password
    masked. Commands, variable names and keyring services are shown: they are not secrets."""
    config = state.config(config_path)
    accounts = [config.account(name)] if name else list(config.accounts.values())
    if not accounts:
        click.echo(f"{config.path}: no accounts")
        return
    for n, account in enumerate(accounts):
        if n:
            click.echo("")
        click.echo(_describe(account, config))


def _describe(account: Account, config: Config) -> str:
    mark = "  # the default account" if account.name == config.default else ""
    lines = [f"[accounts.{account.name}]{mark}"]
    shown = dict(account.shown)
    if "port" not in shown:
        ports = ", ".join(f"{p} ({m.value})" for p, m in account.smtp.candidates)
        lines.append(f"# ports tried: {ports}")
    lines += [f"{key} = {value}" for key, value in account.shown]
    return "\n".join(lines)
