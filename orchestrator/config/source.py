"""YAML that remembers where each value came from.

``load_yaml`` returns the plain data and a ``LineMap`` from field paths to line
numbers, so a pydantic error at ``("demands", "cpus")`` can be reported as
``node_families/workers.yaml:7: demands.cpus: ...``.

>>> doc = parse_yaml("count: 3\\ndemands:\\n  cpus: two\\n", "w.yaml")
>>> doc.lines.line_of(("demands", "cpus"))
3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError

Loc = tuple[str | int, ...]


@dataclass
class LineMap:
    """Field path -> 1-based line of the key (mappings) or item (sequences)."""

    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int:
        """The line of ``loc``, or of its nearest ancestor present in the file."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1


@dataclass
class YamlDocument:
    data: Any
    lines: LineMap
    file: str


def parse_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document, refusing syntax errors and duplicate keys with a line."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            lines = LineMap()
            if node is not None:
                _walk(node, (), lines, file)
                data = loader.construct_document(node)
            else:
                data = None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {problem}", file=file, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=file) from exc
    return YamlDocument(data=data, lines=lines, file=file)


def load_yaml(path: Path, shown_as: str | None = None) -> YamlDocument:
    """Read and parse ``path``; ``shown_as`` is the name used in messages."""
    name = shown_as or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=name) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=name, hint="save the file as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=name) from exc
    return parse_yaml(text, name)


def _walk(node: yaml.Node, loc: Loc, lines: LineMap, file: str) -> None:
    lines.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = ".".join(str(p) for p in (*loc, key))
                raise ConfigError(
                    f"duplicate key (first on line {seen[key]})",
                    file=file,
                    line=line,
                    field=where,
                    hint="keep one of them",
                )
            seen[key] = line
            lines.lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.lines[(*loc, index)] = item.start_mark.line + 1
            _walk(item, (*loc, index), lines, file)


def set_top_level_scalar(text: str, key: str, value: str, file: str) -> str:
    """``text`` with the top-level mapping's ``key`` set to ``value``, changing only the
    characters of its old value: comments, order, layout and the value's quoting stay.

    ``value`` is written as a plain scalar (or in the old value's quotes), so it must be
    one that YAML reads back as the same string (the caller checks by parsing again).

    >>> set_top_level_scalar("# mine\\nrelease: primes   # pinned later\\ncount: 4\\n", "release", "primes@1.2.0", "w")
    '# mine\\nrelease: primes@1.2.0   # pinned later\\ncount: 4\\n'
    """
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(f"YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}", file=file,
                          line=mark.line + 1 if mark is not None else None) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=file) from exc
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError("expected a mapping of keys to values", file=file, line=1)
    for key_node, value_node in root.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            if (not isinstance(value_node, yaml.ScalarNode) or value_node.tag != "tag:yaml.org,2002:str"
                    or value_node.style in ("|", ">")):
                raise ConfigError(f"{key} is not a plain string here", file=file, line=value_node.start_mark.line + 1,
                                  field=key, hint=f"write it as `{key}: VALUE`")
            quote = value_node.style if value_node.style in ("'", '"') else ""
            start, end = value_node.start_mark.index, value_node.end_mark.index
            return f"{text[:start]}{quote}{value}{quote}{text[end:]}"
    raise ConfigError(f"no top-level {key!r} to change", file=file, field=key, hint=f"add `{key}: VALUE`")
