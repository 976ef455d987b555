"""Load YAML files into models, turning every problem into a ``ConfigError``
that names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.config.source import Loc, YamlDocument, load_yaml
from orchestrator.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def validate_document(model: type[M], doc: YamlDocument, *, name_from: str | None = None) -> M:
    """Validate ``doc`` as ``model``.

    ``name_from``: the name the file's stem gives; used when the document has no
    ``name`` and checked against it when it has one.
    """
    data = doc.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of keys to values, found {type(data).__name__}",
            file=doc.file,
            line=1,
        )
    if name_from is not None:
        given = data.get("name")
        if given is None:
            data = {**data, "name": name_from}
        elif given != name_from:
            raise ConfigError(
                f"name {given!r} does not match the file name",
                file=doc.file,
                line=doc.lines.line_of(("name",)),
                field="name",
                hint=f"rename the file to {given}.yaml or set name: {name_from}",
            )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _config_error(model, exc, doc) from None


def load_model(model: type[M], path: Path, *, shown_as: str | None = None, name_from_stem: bool = False) -> M:
    doc = load_yaml(path, shown_as)
    return validate_document(model, doc, name_from=path.stem if name_from_stem else None)


def _config_error(model: type[BaseModel], exc: ValidationError, doc: YamlDocument) -> ConfigError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    # pydantic marks errors in a dict's keys with a trailing "[key]"
    loc: Loc = tuple(p for p in first["loc"] if p != "[key]")
    message = _message(model, first)
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(
        message,
        file=doc.file,
        line=doc.lines.line_of(loc),
        field=".".join(str(p) for p in loc) or None,
    )


def _message(model: type[BaseModel], error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, tuple(error["loc"][:-1]))
        suffix = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key{suffix}"
    if kind == "missing":
        return "required key is missing"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


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
