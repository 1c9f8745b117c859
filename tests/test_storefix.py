"""Review findings on the certificate store (issue 9 part 3): each test fails on the store as
first merged. gpg is used only as the other side (the GnuPG home being migrated, the tool that
extends a key's expiry)."""

from __future__ import annotations

from pathlib import Path

from fixtures_pgp import Keys
from pgp_helpers import gpg

from e2email import KeyReason
from e2email.errors import KeyProblem
from e2email.keystore import Keystore


def test_a_key_disabled_in_gpg_stays_disabled_after_migrate(keys: Keys, tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = Keystore(home)
    try:
        old.import_file(keys.bob.cert)
        gpg(home / "gnupg", "--edit-key", keys.bob.fingerprint, "disable", "quit")
        old.invalidate()
        refused = old.encryption_key("bob@example.net")
        assert isinstance(refused, KeyProblem) and refused.reason is KeyReason.DISABLED
        Keystore(home, backend="certd").migrate()
        now = Keystore(home)
        assert now.backend == "certd"
        choice = now.encryption_key("bob@example.net")
        assert isinstance(choice, KeyProblem) and choice.reason is KeyReason.DISABLED
    finally:
        old.shutdown_agent()
