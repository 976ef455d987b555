from __future__ import annotations

import inspect

import pytest

from orchestrator import errors


def _error_classes() -> list[type[errors.OrchError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.OrchError)]


def test_every_error_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in _error_classes():
        assert cls.__name__ in doc, f"{cls.__name__} missing from the tree in errors.py"


@pytest.mark.parametrize(
    ("cls", "code"),
    [(errors.InputError, 2), (errors.ConfigError, 2), (errors.UnsafeReleaseError, 2),
     (errors.ProviderAuthError, 3), (errors.IntegrityError, 4), (errors.RemoteError, 5), (errors.OrchError, 1)],
)
def test_exit_codes_follow_the_tree(cls: type[errors.OrchError], code: int) -> None:
    assert cls.exit_code == code


def test_config_error_names_file_line_and_field() -> None:
    err = errors.ConfigError("must be >= 1", file="node_families/w.yaml", line=3, field="count", hint="fix it")
    assert str(err) == "node_families/w.yaml:3: count: must be >= 1 (fix it)"
