"""Names of dependencies that are not (documented) public API but that e2email uses, each with
an upper version bound in pyproject.toml. When a new version renames or drops one, the test
that pins it fails here, naming it, instead of mail silently failing in production."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import aiosmtpd.smtp
import aiosmtplib
import aiosmtplib.protocol
import gnupg
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dependencies() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    deps = {}
    for spec in data["project"]["dependencies"]:
        name = spec.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        deps[name] = spec
    return deps


@pytest.mark.parametrize(
    ("package", "bound"),
    [("python-gnupg", "<0.6"), ("aiosmtplib", "<6"), ("aiosmtpd", "<1.5")],
)
def test_packages_used_beyond_their_public_api_have_an_upper_bound(
    package: str, bound: str
) -> None:
    """Each dependency pinned below is bounded in pyproject.toml, so an untested major or
    minor version is never installed under e2email."""
    assert bound in _dependencies()[package]


def test_python_gnupg_result_map_crypt_and_the_io_hooks() -> None:
    """crypto/openpgp.py: ``GPG.result_map["crypt"]`` makes the result object of an encryption
    from the GPG instance (wrapped to keep it when python-gnupg raises after gpg ended);
    ``on_data`` and ``buffer_size`` are per-instance attributes read by each call."""
    assert isinstance(gnupg.GPG.result_map, dict)
    make = gnupg.GPG.result_map["crypt"]
    assert make is gnupg.Crypt
    assert list(inspect.signature(make).parameters) == ["gpg"]
    assert isinstance(gnupg.GPG.buffer_size, int)
    source = inspect.getsource(gnupg.GPG)
    assert "self.on_data" in source and "self.result_map['crypt'](self)" in source


def test_aiosmtplib_protocol_streaming_names() -> None:
    """transport/smtp.py streams the DATA body piece by piece: ``SMTP.protocol`` (the
    SMTPProtocol or None), ``SMTPProtocol.write``, the private ``_drain_helper()`` (flow
    control, awaited after each piece) and ``read_response(timeout=...)``; ``SMTP.transport``
    for an abort."""
    proto = aiosmtplib.protocol.SMTPProtocol
    assert inspect.iscoroutinefunction(proto._drain_helper)
    assert list(inspect.signature(proto._drain_helper).parameters) == ["self"]
    assert inspect.iscoroutinefunction(proto.read_response)
    assert "timeout" in inspect.signature(proto.read_response).parameters
    assert callable(proto.write)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1")
    assert smtp.protocol is None and smtp.transport is None


def test_aiosmtpd_internals_the_test_server_overrides() -> None:
    """e2email.testing's server subclasses aiosmtpd's SMTP: it wraps ``_handle_client``,
    reads with ``_reader``, resets with ``_create_envelope`` and clears
    ``_auth_require_tls`` for its no-TLS mode."""
    smtp = aiosmtpd.smtp.SMTP
    assert inspect.iscoroutinefunction(smtp._handle_client)
    assert callable(smtp._create_envelope)
    source = inspect.getsource(smtp)
    assert "self._reader" in source and "self._auth_require_tls" in source
