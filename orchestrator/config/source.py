"""YAML that remembers where each value came from.

``load_yaml`` returns the plain data and a ``LineMap`` from field paths to line
numbers, so a pydantic error at ``("demands", "cpus")`` can be reported as
``node_families/workers.yaml:7: demands.cpus: ...``.

>>> doc = parse_yaml("count: 3\\ndemands:\\n  cpus: two\\n", "w.yaml")
>>> doc.lines.line_of(("demands", "cpus"))
3
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.reader import ReaderError

from orchestrator.config import safeyaml
from orchestrator.config.safeyaml import Loc, Scalar
from orchestrator.errors import ConfigError


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
    """A parsed file: its data, the line of each field path, its scalars as written (for
    messages and for reading a plain ``1.10`` as text where a string is wanted), and
    the problems found while reading that did not stop it (duplicate keys...)."""

    data: Any
    lines: LineMap
    file: str
    scalars: dict[Loc, Scalar] = field(default_factory=dict)
    problems: list[ConfigError] = field(default_factory=list)


def parse_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document with :mod:`safeyaml` (YAML 1.2 core schema, limits);
    a syntax error or a limit is a ConfigError with its line; duplicate keys are kept
    as the document's ``problems``."""
    try:
        composed = safeyaml.compose(text, file)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, file, text) from None
    problems = [
        ConfigError(message, file=file, line=line, field=field_text(loc) or None,
                    hint="keep one of them" if message.startswith("duplicate") else None)
        for loc, line, message in composed.problems
    ]
    return YamlDocument(data=composed.data, lines=LineMap(composed.lines), file=file, scalars=composed.scalars,
                        problems=problems)


def yaml_error(exc: yaml.YAMLError, file: str, text: str = "") -> ConfigError:
    """A PyYAML error as one line naming the file and line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = one_line(exc.problem or exc.context or "invalid YAML")
        if isinstance(exc, ComposerError):  # the limits, tags, aliases, documents: said as they are
            said = ", ".join(one_line(p) for p in (exc.context, exc.problem) if p)
            return ConfigError(said, file=file, line=line)
        return ConfigError(f"YAML syntax error: {problem}", file=file, line=line)
    if isinstance(exc, ReaderError):
        line = text.count("\n", 0, exc.position) + 1 if text else None
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return ConfigError(f"YAML syntax error: unacceptable character {char}: {exc.reason}", file=file, line=line,
                           hint="remove control characters; save the file as UTF-8 text")
    return ConfigError(one_line(str(exc)), file=file)


def load_yaml(path: Path, shown_as: str | None = None) -> YamlDocument:
    """Read and parse ``path``; ``shown_as`` is the name used in messages.  Only a regular
    file of at most ``safeyaml.MAX_BYTES`` is read (a FIFO or a device is refused unread)."""
    name = shown_as or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=name) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=name) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("not a regular file", file=name, hint="make it a plain YAML file")
        with os.fdopen(fd, "rb", closefd=False) as source:
            raw = source.read(safeyaml.MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=name) from exc
    finally:
        os.close(fd)
    if len(raw) > safeyaml.MAX_BYTES:
        raise ConfigError(f"larger than {safeyaml.MAX_BYTES // 1024} KiB (the limit for a YAML file)", file=name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("not UTF-8 text", file=name, line=line, hint="save the file as UTF-8") from None
    return parse_yaml(text, name)


def field_text(loc: Loc) -> str:
    """``demands.cpus``; a key with spaces, dots or control characters is quoted, so the
    message stays one line."""
    return ".".join(str(p) if isinstance(p, int) or _PLAIN_KEY.match(p) else json.dumps(p) for p in loc)


def one_line(text: str) -> str:
    return " ".join(text.split())


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_/:@+-]{1,200}$")


def set_top_level_scalar(text: str, key: str, value: str, file: str) -> str:
    """``text`` with the top-level mapping's ``key`` set to ``value``, changing only the
    characters of its old value: comments, order, layout and the value's quoting stay.

    ``value`` is written as a plain scalar (or in the old value's quotes), so it must be
    one that YAML reads back as the same string (the caller checks by parsing again).

    >>> set_top_level_scalar("# mine\\nrelease: primes   # pinned later\\ncount: 4\\n", "release", "primes@1.2.0", "w")
    '# mine\\nrelease: primes@1.2.0   # pinned later\\ncount: 4\\n'
    """
    try:
        root = safeyaml.compose_node(text)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, file, text) from None
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
