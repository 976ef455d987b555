from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import SCHEMAS, parse_yaml, validate_document
from orchestrator.errors import ConfigError

CASES: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "config_cases.yaml").read_text())


def _load(case: dict[str, Any]) -> Any:
    model = SCHEMAS[case["kind"]]
    doc = parse_yaml(case["text"], case["file"])
    name_from = Path(case["file"]).stem if case["kind"] in ("provider", "family") else None
    return validate_document(model, doc, name_from=name_from)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_config_case(case: dict[str, Any]) -> None:
    if "message" not in case:
        _load(case)
        return
    with pytest.raises(ConfigError) as info:
        _load(case)
    err = info.value
    text = str(err)
    assert err.file == case["file"]
    assert err.line == case["line"], text
    if "field" in case:
        assert err.field == case["field"], text
    assert case["message"] in text
    assert text.startswith(f"{case['file']}:{case['line']}: ")
    assert "\n" not in text
    if "absent" in case:
        assert case["absent"] not in text


def test_there_are_enough_cases() -> None:
    assert sum(1 for c in CASES if "message" in c) >= 20


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_kind_has_a_json_schema(kind: str) -> None:
    schema = SCHEMAS[kind].model_json_schema()
    assert schema["type"] == "object"
    assert schema.get("additionalProperties") is False
