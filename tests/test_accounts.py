"""Accounts in config.toml (e2email.accounts): loading, the default account, msmtp's `from`
rule, secrets and their sources, located mistakes, and a mailer made from an account that
delivers to a real TLS server."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_pgp import Keys
from pgp_helpers import gpg_decrypt, multipart_parts, new_gnupg_home, part_body

from e2email.accounts import (
    Account,
    Config,
    ConfigFileError,
    default_config_path,
    load_config,
)
from e2email.client import AsyncMailer, Mailer
from e2email.config import DiscoveryPolicy, OpenPGPEngine, RevocationPolicy, Scheme, TLSMode
from e2email.errors import ConfigError, InsecurePathError
from e2email.keystore import Keystore
from e2email.message import Message
from e2email.outbox import Outbox
from e2email.testing import LoopbackSMTPServer, TestCA


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# -- loading ---------------------------------------------------------------------------------


def test_accounts_inherit_defaults_and_map_onto_the_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here beyond existing\n")
    cfg = write_config(
        tmp_path / "config.toml",
        f"""
default = "work"

[defaults]
encrypt-to-self = false
timeout = 20

[accounts.work]
host = "smtp.example.org"
port = 465
user = "alice@example.org"
password-command = "echo secret"
from = "alice@example.org"
from-patterns = ["alice+*@example.org", "*@alice.example"]
ca-file = "{ca}"
retries = 4
keys = {{ "bob@example.net" = "0123456789ABCDEF0123456789ABCDEF01234567" }}
home = "e2home"

[accounts.smime]
host = "mail.example.com"
tls = "starttls"
port = 2526
scheme = "smime"
revocation = "require"
smime-cipher = "aes128"
discover = "wkd"
encrypt-to-self = true
""",
    )
    config = load_config(cfg)
    work = config.account()
    assert work.name == "work"
    assert work.smtp.host == "smtp.example.org"
    assert work.smtp.port == 465
    assert work.smtp.effective_tls is TLSMode.IMPLICIT
    assert work.smtp.username == "alice@example.org"
    assert work.smtp.resolve_password() == "secret"
    assert work.smtp.timeout == 20.0
    assert work.smtp.ca_file == ca
    assert work.protection.encrypt_to_self is False
    assert work.key_map == {"bob@example.net": "0123456789ABCDEF0123456789ABCDEF01234567"}
    assert work.protection.key_map == work.key_map
    assert work.retry is not None and work.retry.max_attempts == 5
    assert work.home == tmp_path / "e2home"  # relative to the file's folder
    smime = config.account("smime")
    assert smime.protection.scheme is Scheme.SMIME
    assert smime.protection.revocation is RevocationPolicy.REQUIRE
    assert smime.protection.discovery is DiscoveryPolicy.WKD
    assert work.protection.discovery is DiscoveryPolicy.OFF
    assert smime.protection.encrypt_to_self is True
    assert smime.smtp.port == 2526 and smime.smtp.tls is TLSMode.STARTTLS
    # The password is a source, never in repr.
    assert "secret" not in repr(work) and "echo" not in repr(work)


def test_default_account_rules(tmp_path: Path) -> None:
    one = write_config(tmp_path / "one.toml", '[accounts.only]\nhost = "a.example"\n')
    assert load_config(one).account().name == "only"
    marked = write_config(
        tmp_path / "marked.toml",
        '[accounts.a]\nhost = "a.example"\n[accounts.b]\nhost = "b.example"\ndefault = true\n',
    )
    assert load_config(marked).account().name == "b"
    none = write_config(
        tmp_path / "none.toml", '[accounts.a]\nhost = "a.example"\n[accounts.b]\nhost = "b.x"\n'
    )
    with pytest.raises(ConfigError, match="no default account"):
        load_config(none).account()
    with pytest.raises(ConfigError, match=r"no account 'c'.*accounts: a, b"):
        load_config(none).account("c")
    both = write_config(
        tmp_path / "both.toml",
        'default = "a"\n[accounts.a]\nhost = "a.example"\n'
        '[accounts.b]\nhost = "b.example"\ndefault = true\n',
    )
    with pytest.raises(
        ConfigFileError, match=r"both.toml:6: default: give the default account once"
    ):
        load_config(both)


def test_from_rule_is_msmtps(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        """
default = "home"
[accounts.home]
host = "h.example"
from = "me@home.example"
[accounts.work]
host = "w.example"
from = "Alice@Work.example"
[accounts.lists]
host = "l.example"
from-patterns = ["*@lists.example", "bot-?@work.example"]
""",
    )
    config = load_config(cfg)
    assert config.for_sender("alice@work.example").name == "work"  # case-insensitive
    assert config.for_sender("news@lists.example").name == "lists"  # wildcard
    assert config.for_sender("bot-1@work.example").name == "lists"
    assert config.for_sender("alice+git@work.example").name == "work"  # +detail dropped
    assert config.match_sender("stranger@else.example") is None
    assert config.for_sender("stranger@else.example").name == "home"  # the default


def test_missing_default_file_is_no_accounts_but_a_named_one_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("E2EMAIL_CONFIG", raising=False)
    assert default_config_path() == tmp_path / "xdg" / "e2email" / "config.toml"
    empty = load_config()
    assert empty.accounts == {}
    with pytest.raises(ConfigError, match="no accounts configured"):
        empty.account()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    monkeypatch.setenv("E2EMAIL_CONFIG", str(tmp_path / "env.toml"))
    with pytest.raises(ConfigError, match=r"env\.toml does not exist"):
        load_config()
    write_config(tmp_path / "env.toml", '[accounts.e]\nhost = "e.example"\n')
    assert load_config().account().name == "e"


# -- secrets ---------------------------------------------------------------------------------

LITERAL = '[accounts.work]\nhost = "smtp.example.org"\nuser = "u"\npassword = "hunter2"\n'


def test_literal_password_only_in_a_0600_file(tmp_path: Path) -> None:
    ok = write_config(tmp_path / "ok.toml", LITERAL, 0o600)
    assert load_config(ok).account().smtp.resolve_password() == "hunter2"
    loose = write_config(tmp_path / "loose.toml", LITERAL, 0o644)
    with pytest.raises(ConfigFileError) as info:
        load_config(loose)
    text = str(info.value)
    assert "loose.toml:4: password:" in text
    assert "readable by group or others (mode 0644)" in text
    assert f"chmod 600 {loose}" in text
    assert "hunter2" not in text
    # Commands, variables and the keyring are not secrets: a 0644 file may name them.
    fine = write_config(
        tmp_path / "fine.toml",
        '[accounts.w]\nhost = "h.example"\nuser = "u"\npassword-env = "SMTP_PW"\n',
        0o644,
    )
    assert load_config(fine).account().smtp.password is not None


def test_a_config_file_others_may_write_is_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", '[accounts.w]\nhost = "h.example"\n', 0o664)
    with pytest.raises(InsecurePathError, match="writable by group or others"):
        load_config(cfg)


def test_password_given_two_ways_is_refused(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        '[accounts.w]\nhost = "h.example"\nuser = "u"\n'
        'password-env = "PW"\npassword-command = "pass smtp"\n',
    )
    with pytest.raises(
        ConfigFileError,
        match=r"c\.toml:5: password-command: the password "
        r"given two ways \(password-env, password-command\)",
    ):
        load_config(cfg)


def test_an_account_password_replaces_the_inherited_one(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        '[defaults]\nuser = "u"\npassword-command = "echo from-defaults"\n'
        '[accounts.w]\nhost = "h.example"\npassword-env = "E2E_TEST_PW"\n',
    )
    account = load_config(cfg).account()
    with pytest.raises(ConfigError, match="E2E_TEST_PW"):
        account.smtp.resolve_password()


class MemoryKeyring:
    """A tiny in-memory keyring backend (keyring's public KeyringBackend API), test only."""

    def __init__(self) -> None:
        import keyring.backend

        class Backend(keyring.backend.KeyringBackend):
            priority = 1  # type: ignore[assignment]
            store: dict[tuple[str, str], str] = {}  # noqa: RUF012

            def get_password(self, service: str, username: str) -> str | None:
                return self.store.get((service, username))

            def set_password(self, service: str, username: str, password: str) -> None:
                self.store[(service, username)] = password

            def delete_password(self, service: str, username: str) -> None:
                self.store.pop((service, username), None)

        self.backend = Backend()


@pytest.fixture
def memory_keyring() -> Iterator[Any]:
    import keyring

    previous = keyring.get_keyring()
    backend = MemoryKeyring().backend
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_password_from_the_system_keyring(tmp_path: Path, memory_keyring: Any) -> None:
    memory_keyring.set_password("smtp.example.org", "alice@example.org", "from-keyring")
    cfg = write_config(
        tmp_path / "c.toml",
        '[accounts.w]\nhost = "smtp.example.org"\nuser = "alice@example.org"\n'
        'password-keyring = "smtp.example.org"\n'
        '[accounts.other]\nhost = "smtp.example.org"\nuser = "nobody@example.org"\n'
        'password-keyring = "smtp.example.org"\n',
        0o644,  # a keyring entry is not a secret in the file
    )
    config = load_config(cfg)
    assert config.account("w").smtp.resolve_password() == "from-keyring"
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "no password in the system keyring for service 'smtp.example.org' and user "
            "'nobody@example.org'"
        ),
    ):
        config.account("other").smtp.resolve_password()


# -- a mailer from an account ----------------------------------------------------------------


@pytest.fixture(scope="module")
def account_home(keys: Keys) -> Iterator[Path]:
    """An e2email home with Alice's secret key and Bob's certificate."""
    path = new_gnupg_home("e2a")
    store = Keystore(path)
    assert keys.alice.secret
    store.import_file(keys.alice.secret)
    store.import_file(keys.bob.cert)
    yield path
    store.shutdown_agent()
    shutil.rmtree(path, ignore_errors=True)


def account_config(
    tmp_path: Path, server: LoopbackSMTPServer, home: Path, name: str = "work", **extra: str
) -> Path:
    assert server.ca_file is not None
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return write_config(
        tmp_path / "config.toml",
        f"""
[accounts.{name}]
host = "{server.host}"
port = {server.port}
tls = "implicit"
ca-file = "{server.ca_file}"
from = "alice@example.org"
home = "{home}"
{more}""",
    )


def test_mailer_from_account_delivers_protected_and_records_the_account(
    tmp_path: Path, account_home: Path, recipients_home: Path, module_ca: TestCA
) -> None:
    server = LoopbackSMTPServer(tls="implicit", ca=module_ca).start()
    try:
        cfg = account_config(tmp_path, server, account_home, outbox=f'"{tmp_path / "ob.db"}"')
        with Mailer.from_account("work", config=cfg) as mailer:
            assert mailer.outbox is not None and mailer.outbox.path == tmp_path / "ob.db"
            assert mailer.outbox.account == "work"
            result = mailer.send(
                Message(
                    sender="alice@example.org",
                    to=["bob@example.net"],
                    subject="s",
                    text="sent-through-work",
                )
            )
        assert result.accepted == ("bob@example.net",)
        raw = server.messages[0].data
        _, (_, encrypted) = multipart_parts(raw)
        plain, _ = gpg_decrypt(recipients_home, part_body(encrypted))
        assert b"sent-through-work" in plain
        assert b"sent-through-work" not in raw
    finally:
        server.stop()


def test_async_mailer_from_account_object_and_default(
    tmp_path: Path, account_home: Path, module_ca: TestCA
) -> None:
    server = LoopbackSMTPServer(tls="implicit", ca=module_ca).start()
    try:
        cfg = account_config(tmp_path, server, account_home)
        account = load_config(cfg).account()
        assert isinstance(account, Account)
        mailer = AsyncMailer.from_account(account, outbox=False)
        assert mailer.outbox is None
        assert mailer.smtp is not None and mailer.smtp.hosts_file == account_home / "hosts.json"
        assert mailer.keystore.home == account_home
        mailer.close()
        # None: the default account of the file named by E2EMAIL_CONFIG.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("E2EMAIL_CONFIG", str(cfg))
            default = AsyncMailer.from_account()
            assert default.outbox is not None and default.outbox.account == "work"
            assert default.outbox.path == account_home / "outbox.sqlite3"
            default.close()
    finally:
        server.stop()


def test_the_outbox_records_the_account_and_migrates_version_3(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, account="work") as box:
        from e2email.outbox import NewItem

        (item_id,) = box.add(
            [
                NewItem(
                    raw=b"x",
                    mail_from="a@example.org",
                    recipients=("b@example.net",),
                    message_id="<m@x>",
                    kind="main",
                )
            ],
            claim=False,
        )
        assert box.get(item_id).account == "work"
    # An outbox of schema 3 (no account column) keeps its items and gets the column.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE items DROP COLUMN account")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    with Outbox(path) as box:
        (old,) = box.items()
        assert old.id == item_id and old.account is None
        assert old.pending == ("b@example.net",)


def test_config_is_importable_api() -> None:
    assert Config(path=None, accounts={}).names == ()


def test_keyring_not_installed_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        '[accounts.w]\nhost = "h.example"\nuser = "u"\npassword-keyring = "h.example"\n',
    )
    account = load_config(cfg).account()  # loading needs no keyring: only using it does
    monkeypatch.setitem(sys.modules, "keyring", None)  # `import keyring` fails
    with pytest.raises(ConfigError, match=re.escape("pip install 'e2email[keyring]'")):
        account.smtp.resolve_password()


def test_signing_passphrase_and_token_sources(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        '[accounts.w]\nhost = "h.example"\nuser = "u@h.example"\n'
        'token-command = "echo tok"\npassphrase-command = "echo pp"\n'
        '[accounts.x]\nhost = "h.example"\nauth = "xoauth2"\nuser = "u"\n',
    )
    with pytest.raises(ConfigFileError, match=r"c\.toml:8: auth: xoauth2 needs token-command"):
        load_config(cfg)
    write_config(cfg, cfg.read_text().split("[accounts.x]")[0])
    account = load_config(cfg).account()
    assert account.smtp.resolve_oauth_token() == "tok"
    assert account.smtp.password is None
    assert callable(account.passphrase) and account.passphrase() == "pp"


def test_mistakes_in_defaults_are_reported_once_at_their_line(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        '[defaults]\nport = "465"\nfrom = "nobody"\nretries = -1\n'
        '[accounts.a]\nhost = "a.example"\n[accounts.b]\nhost = "b.example"\n',
    )
    with pytest.raises(ConfigFileError) as info:
        load_config(cfg)
    lines = [str(p).removeprefix(f"{cfg}:") for p in info.value.problems]
    assert lines == [
        "2: port: must be an integer, not a string",
        "4: retries: must be 0 or more, not -1",
        # Inherited by a and b, found in [defaults], said once.
        "3: from: 'nobody' is not an email address",
    ]


def test_every_mistake_in_an_account_gets_its_line(tmp_path: Path) -> None:
    """A bad key does not stop the account's other checks: a port out of range and no host
    are two lines, and a wrong port type, a password given two ways and a bad sign value are
    three."""
    cfg = write_config(
        tmp_path / "c.toml",
        "[accounts.x]\nport = 99999\n"
        '[accounts.y]\nhost = "h"\nport = "abc"\npassword = "a"\npassword-env = "B"\n'
        'sign = "maybe"\n',
    )
    with pytest.raises(ConfigFileError) as info:
        load_config(cfg)
    lines = [str(p).removeprefix(f"{cfg}:") for p in info.value.problems]
    assert lines == [
        "2: port: port 99999 is out of range (1-65535)",
        "1: host: missing: every account needs a host",
        "5: port: must be an integer, not a string",
        "8: sign: must be true or false, not a string",
        "7: password-env: the password given two ways (password, password-env): give one",
    ]


def test_engine_and_autocrypt_keys_reach_the_policy(tmp_path: Path) -> None:
    """`engine` chooses the OpenPGP engine and `autocrypt = false` keeps the sender's key out
    of outgoing headers, as `--engine` and `--no-autocrypt` do; a bad engine is named."""
    cfg = write_config(
        tmp_path / "c.toml",
        '[accounts.a]\nhost = "smtp.example.org"\nengine = "gpg"\nautocrypt = false\n',
    )
    protection = load_config(cfg).account().protection
    assert protection.engine is OpenPGPEngine.GPG
    assert protection.autocrypt is False
    bad = write_config(tmp_path / "b.toml", '[accounts.a]\nhost = "h.example"\nengine = "pgp"\n')
    with pytest.raises(ConfigError, match="engine"):
        load_config(bad)
