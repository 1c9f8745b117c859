"""Protection engines: each turns a finalised message into complete protected copies; no sockets.

:mod:`e2email.crypto.base` defines the interface (:class:`Protector`) and the registry the
client finds engines in; :mod:`~e2email.crypto.gpg` (OpenPGP through GnuPG) and
:mod:`~e2email.crypto.smime` (S/MIME through ``cryptography``) are the built-in engines, over
the format modules :mod:`~e2email.crypto.openpgp` and :mod:`~e2email.crypto.smime`.
"""

from e2email.crypto.base import (
    EngineContext,
    Passphrase,
    ProtectedCopy,
    Protector,
    protector_for,
    register_engine,
    unregister_engine,
)

__all__ = [
    "EngineContext",
    "Passphrase",
    "ProtectedCopy",
    "Protector",
    "protector_for",
    "register_engine",
    "unregister_engine",
]
