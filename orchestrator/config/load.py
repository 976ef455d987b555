"""Load YAML files into models, turning every problem into a ``ConfigError`` that names
the file, the line and the field: one error for one problem, ``ValidationFailed`` with
each of them (sorted by line) for several.

Scalars are read strictly as the schema says (pydantic's strict mode over the YAML 1.2
data of :mod:`safeyaml`): a count is an integer written as one (``3``, not ``"3"``,
``3.0``, ``1e3`` or ``0777``), a flag is ``true`` or ``false`` (not ``yes``/``no``/
``on``/``off``).  Where a field wants text, a plain scalar is its text as written:
``version: 1.10`` is ``"1.10"`` and ``name: true`` is ``"true"`` (never ``1.1`` or
``True``); only ``null``/``~`` stays a null.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.config import safeyaml
from orchestrator.config.safeyaml import Loc, Scalar
from orchestrator.config.source import YamlDocument, field_text, load_yaml
from orchestrator.errors import ConfigError, ValidationFailed

M = TypeVar("M", bound=BaseModel)


def validate_document(model: type[M], doc: YamlDocument, *, name_from: str | None = None) -> M:
    """Validate ``doc`` as ``model``: the model, or every problem of the document at once.

    ``name_from``: the name the file's stem gives; used when the document has no
    ``name`` and checked against it when it has one.
    """
    data = doc.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of keys to values, found {_kind(data)}",
            file=doc.file,
            line=1,
            hint="write `key: value` lines",
        )
    problems = list(doc.problems)
    data = copy.deepcopy(data)
    if name_from is not None:
        given = data.get("name")
        scalar = doc.scalars.get(("name",))
        if scalar is not None and scalar.plain and given is not None:
            given = scalar.text
        if given is None:
            data["name"] = name_from
        elif given != name_from:
            problems.append(ConfigError(
                f"name {given!r} does not match the file name",
                file=doc.file,
                line=doc.lines.line_of(("name",)),
                field="name",
                hint=f"rename the file to {given}.yaml or set name: {name_from}",
            ))
            data["name"] = name_from  # checked once: not again as a pattern
    result, errors = _validate(model, data, doc)
    problems += _config_errors(model, errors, doc)
    if not problems:
        assert result is not None
        return result
    raise _raised(problems, doc.file)


def load_model(model: type[M], path: Path, *, shown_as: str | None = None, name_from_stem: bool = False) -> M:
    doc = load_yaml(path, shown_as)
    return validate_document(model, doc, name_from=path.stem if name_from_stem else None)


def _raised(problems: list[ConfigError], file: str) -> ConfigError:
    """One problem as itself; several as ValidationFailed, in the order of their lines."""
    unique: dict[str, ConfigError] = {}
    for problem in sorted(problems, key=lambda p: (p.line or 0, p.field or "")):
        unique.setdefault(str(problem), problem)
    found = list(unique.values())
    return found[0] if len(found) == 1 else ValidationFailed(found, where=file)


def _validate(model: type[M], data: dict[str, Any], doc: YamlDocument) -> tuple[M | None, list[Any]]:
    """Strict validation; where a string is wanted and a plain scalar read as a number
    or a boolean stands, its text is taken (a schema-directed read), and again."""
    errors: list[Any] = []
    for _ in range(4):
        try:
            return model.model_validate(data, strict=True), []
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        texts = [(loc, scalar) for loc, scalar in ((tuple(e["loc"]), doc.scalars.get(tuple(e["loc"])))
                                                     for e in errors if e["type"] == "string_type")
                 if _as_text(scalar) and _set(data, loc, None, check=True)]
        if not texts:
            break
        for loc, scalar in texts:
            assert scalar is not None
            _set(data, loc, scalar.text)
    return None, errors


def _as_text(scalar: Scalar | None) -> bool:
    return scalar is not None and scalar.plain and isinstance(scalar.value, bool | int | float)


def _set(data: Any, loc: Loc, value: Any, *, check: bool = False) -> bool:
    """Put ``value`` at ``loc`` in ``data`` (with ``check``: only say whether ``loc`` is there)."""
    current = data
    for part in loc[:-1]:
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            return False
    last = loc[-1] if loc else None
    if (isinstance(current, dict) and isinstance(last, str) and last in current) or (
            isinstance(current, list) and isinstance(last, int) and 0 <= last < len(current)):
        if not check:
            current[last] = value  # type: ignore[index]
        return True
    return False


def _config_errors(model: type[BaseModel], errors: list[Any], doc: YamlDocument) -> list[ConfigError]:
    found = []
    for error in errors:
        # pydantic marks errors in a dict's keys with a trailing "[key]"
        loc: Loc = tuple(p for p in error["loc"] if p != "[key]")
        found.append(ConfigError(
            _message(model, error),
            file=doc.file,
            line=doc.lines.line_of(loc),
            field=field_text(loc) or None,
            hint=_hint(error, doc.scalars.get(loc)),
        ))
    return found


def _message(model: type[BaseModel], error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, tuple(error["loc"][:-1]))
        suffix = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key{suffix}"
    if kind == "missing":
        return "required key is missing"
    msg = str(error["msg"])
    return " ".join(msg.removeprefix("Value error, ").split())


def _hint(error: Any, scalar: Scalar | None) -> str | None:
    """What to write instead, for a scalar the strict read refused."""
    kind = error["type"]
    if scalar is None or kind not in ("int_type", "float_type", "bool_type"):
        return None
    text = scalar.text
    if not scalar.plain:
        if isinstance(scalar.value, str) and safeyaml.core_tag(text) != safeyaml.STR:
            return f"write {text} without quotes"
        return None
    if kind == "bool_type":
        if safeyaml.YAML11_BOOL.match(text):
            return f"write true or false; {text!r} is text in YAML 1.2"
        return "write true or false"
    if safeyaml.YAML11_BOOL.match(text):
        return f"write a number; {text!r} is text in YAML 1.2"
    if safeyaml.LEADING_ZERO.match(text):
        sign = text[0] if text[0] in "+-" else ""
        digits = text.lstrip("+-").lstrip("0") or "0"
        return f"{text} has a leading zero: write {sign}{digits}, or {sign}0o{digits} for octal"
    if safeyaml.SEXAGESIMAL.match(text):
        return f"write a number; {text} is text, YAML 1.2 has no base-60 numbers"
    if kind == "int_type" and isinstance(scalar.value, float):
        if abs(scalar.value) < 1e15 and scalar.value == int(scalar.value):
            return f"write a whole number: {int(scalar.value)}"
        return "write a whole number"
    return None


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def _allowed_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The field names of the sub-model at ``loc``, when it is one."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside ``annotation`` (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
