"""The public surface: what `import e2email` offers, and the error tree."""

from __future__ import annotations

import ast
import inspect
import typing

import e2email
from e2email import errors


def test_all_lists_exactly_the_public_names() -> None:
    """`e2email.__all__` names every public attribute and nothing that does not exist."""
    # dir(), not vars(): the public names are imported when first used (PEP 562).
    public = {
        name
        for name in dir(e2email)
        if not name.startswith("_") and not inspect.ismodule(getattr(e2email, name))
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
    assert _runtime_package_imports(errors) == []


def _runtime_package_imports(module: object) -> list[str]:
    """The e2email modules ``module`` imports when it runs (imports only for the type checker,
    under ``if TYPE_CHECKING:``, do not count: they create no import cycle)."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    found: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and ast.unparse(node.test) in (
                "TYPE_CHECKING",
                "typing.TYPE_CHECKING",
            ):
                visit(node.orelse)
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("e2email"):
                    found.append(sub.module or "")
                elif isinstance(sub, ast.Import):
                    found.extend(a.name for a in sub.names if a.name.startswith("e2email"))

    visit(tree.body)
    return found


def test_errors_carry_typed_results_and_unsent_copies() -> None:
    """``result`` and ``unsent`` name what they hold (the one outcome type of e2email.outcome:
    a message's, a transaction's, a batch's or an outbox run's copies; the protected copies),
    not ``Any``, with no import cycle at run time."""
    from e2email.outcome import BatchResult, CopyOutcome, MessageOutcome

    names = dict(
        vars(errors),
        BatchResult=BatchResult,
        MessageOutcome=MessageOutcome,
        CopyOutcome=CopyOutcome,
        ProtectedCopy=e2email.ProtectedCopy,
    )
    for cls in (errors.E2EmailError, errors.TransportError, errors.RecipientKeyError):
        hints = typing.get_type_hints(cls, globalns=names)
        assert hints["unsent"] == tuple[e2email.ProtectedCopy, ...]
        assert set(typing.get_args(hints["result"])) == {
            MessageOutcome,
            CopyOutcome,
            BatchResult,
            tuple[CopyOutcome, ...],
            type(None),
        }
    init = typing.get_type_hints(errors.TransportError.__init__, globalns=names)
    assert init["result"] == typing.get_type_hints(errors.E2EmailError, globalns=names)["result"]


def test_sync_and_async_mailers_share_names_and_arguments() -> None:
    """Mailer mirrors AsyncMailer: the same public methods with the same parameters."""
    for name in ("protect", "send", "send_copies"):
        a = inspect.signature(getattr(e2email.AsyncMailer, name))
        s = inspect.signature(getattr(e2email.Mailer, name))
        assert list(a.parameters) == list(s.parameters), name
    assert list(inspect.signature(e2email.AsyncMailer).parameters) == list(
        inspect.signature(e2email.Mailer).parameters
    )
