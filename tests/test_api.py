"""The public surface: what `import e2email` offers, and the error tree."""

from __future__ import annotations

import inspect

import e2email
from e2email import errors


def test_all_lists_exactly_the_public_names() -> None:
    """`e2email.__all__` names every public attribute and nothing that does not exist."""
    public = {
        name
        for name, value in vars(e2email).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(e2email.__all__) == public
    assert len(e2email.__all__) == len(set(e2email.__all__))


def test_every_error_descends_from_e2email_error() -> None:
    """One exception tree: every exception class in e2email.errors derives from E2EmailError,
    and the errors module imports nothing else from the package."""
    classes = [
        v for v in vars(errors).values() if inspect.isclass(v) and issubclass(v, BaseException)
    ]
    assert len(classes) >= 15
    assert all(issubclass(c, e2email.E2EmailError) for c in classes)
    source = inspect.getsource(errors)
    assert "from e2email" not in source and "import e2email" not in source


def test_sync_and_async_mailers_share_names_and_arguments() -> None:
    """Mailer mirrors AsyncMailer: the same public methods with the same parameters."""
    for name in ("protect", "send", "send_copies"):
        a = inspect.signature(getattr(e2email.AsyncMailer, name))
        s = inspect.signature(getattr(e2email.Mailer, name))
        assert list(a.parameters) == list(s.parameters), name
    assert list(inspect.signature(e2email.AsyncMailer).parameters) == list(
        inspect.signature(e2email.Mailer).parameters
    )
