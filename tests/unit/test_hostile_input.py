"""Hostile and surprising input, end to end through the command line (in process).

- The one YAML reader (``orchestrator/config/safeyaml.py``): its limits (aliases, depth,
  size), the YAML 1.2 core schema (none of YAML 1.1's ``yes``/``no``, ``0777``, ``1:20``
  surprises), the tags it refuses, and that no other code reads YAML.
- Every problem of every file is listed, one line each (``FILE:LINE: field: message``),
  and as objects with ``--json``.
- Property-based tests (hypothesis): generated YAML documents (random structures,
  random scalars and keys, raw YAML-ish text, mutations of valid files) for families,
  providers, release manifests and orch.yaml, and generated command lines for commands
  that read them: the answer is always exit 0 or 2, never a traceback or an internal
  error (70), within 5 s a command; bad input (exit 2) names the file and line (or the
  option) on lines of their own and leaves ``.orch/state.db`` byte-identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

from orchestrator.cli.app import main
from orchestrator.config import safeyaml
from orchestrator.workspace import Workspace
from tests.helpers.workspace import REPO, file_digest, primes_workspace

HYPOTHESIS_HOME = Path(tempfile.gettempdir()) / f"orch-hypothesis-{os.getpid()}"  # made when first used
configuration.set_hypothesis_home_dir(HYPOTHESIS_HOME)  # its caches, not in the checkout's .hypothesis/


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home() -> Iterator[None]:
    """Hypothesis keeps its caches (unicode data, constants) in a temporary folder, removed
    after the module; no example database is kept (``database=None``)."""
    yield
    configuration.set_hypothesis_home_dir(None)
    shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)


# -- running orch in process -----------------------------------------------------------------------


@dataclass
class Answer:
    args: tuple[str, ...]
    code: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:
        return f"orch {' '.join(map(repr, self.args))}: exit {self.code} in {self.seconds:.2f} s\n{self.out}{self.err}"


def run(ws: Workspace, *args: str) -> Answer:
    """``orch -w WS ARGS`` in this process, stdout and stderr captured."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace")  # `job result` writes bytes
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-w", str(ws.root), *args])
    seconds = time.monotonic() - started
    out.flush()
    return Answer(args, code, out.buffer.getvalue().decode("utf-8", "replace"), err.getvalue(), seconds)  # type: ignore[attr-defined]


def check(answer: Answer, state_before: str, ws: Workspace) -> None:
    """What every answer to generated input must be."""
    assert answer.code in (0, 2), str(answer)
    assert "Traceback" not in answer.out + answer.err, str(answer)
    assert "internal error" not in answer.err, str(answer)
    assert answer.seconds < 5, str(answer)
    if answer.code == 2:
        lines = [line for line in answer.err.splitlines() if line.strip()]
        assert lines and all(line.startswith("error: ") for line in lines), str(answer)
        assert file_digest(ws.state_db) == state_before, f"bad input changed the state store: {answer}"
        if "--json" in answer.args and answer.out.strip():
            report = json.loads(answer.out)
            assert report["ok"] is False and report["problems"], str(answer)
            assert all(isinstance(p["text"], str) and "\n" not in p["text"] for p in report["problems"])


# -- the YAML reader: limits ------------------------------------------------------------------------

LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
"""A billion laughs: ten levels of ten aliases each, 10^10 values once expanded."""


@pytest.mark.parametrize(("text", "words", "line"), [
    (LAUGHS, "more than 50000 values once aliases are expanded (the limit)", 1),
    ("count: " + "[" * 5000 + "]" * 5000 + "\n", "nest", 1),  # libyaml's own limit (1000) may speak first
    ("release: primes\ncount:\n" + "".join("  " * i + "- \n" for i in range(1, 80)), "nested more than 64", 66),
    ("a: &a\n  b: *a\n", "a recursive alias", 1),
    ("release: primes\ncount: !!python/object/apply:os.system [echo hi]\n", "the tag !!python/object/apply:os.system"
     " is not allowed", 2),
    ("release: primes\ncount: !!binary aGk=\n", "the tag !!binary is not allowed", 2),
    ("release: primes\ncount: !!timestamp 2024-01-02\n", "the tag !!timestamp is not allowed", 2),
    ("release: primes\nlabels: !!set {a, b}\ncount: 1\n", "the tag !!set is not allowed", 2),
    ("release: primes\ncount: !local 3\n", "the tag !local is not allowed", 2),
    ("release: primes\ncount: *nowhere\n", "found undefined alias 'nowhere'", 2),
    ("release: primes\ncount: 1\n---\ncount: 2\n", "expected a single document in the stream, but found another", 3),
    ("release: primes\ncount: 1\nlabels: [a\x00]\n", "unacceptable character #x0000", 3),
    ("release: primes\ncount: " + "9" * 5000 + "\n", "an integer with too many digits", 2),
])
def test_the_loader_refuses_hostile_yaml_in_one_line_quickly(ws: Workspace, text: str, words: str,
                                                            line: int) -> None:
    (ws.families_dir / "evil.yaml").write_text(text)
    before = file_digest(ws.state_db)
    answer = run(ws, "validate")
    assert answer.code == 2, str(answer)
    assert answer.err.splitlines() == [answer.err.splitlines()[0]], str(answer)  # one line
    assert answer.err.startswith(f"error: node_families/evil.yaml:{line}: "), str(answer)
    assert words in answer.err, str(answer)
    assert answer.seconds < 5, str(answer)
    assert file_digest(ws.state_db) == before


def test_files_too_large_not_regular_or_not_utf8_are_refused_unread(ws: Workspace) -> None:
    big = ws.families_dir / "big.yaml"
    big.write_text("release: primes\ncount: 1\ndescription: '" + "x" * safeyaml.MAX_BYTES + "'\n")
    answer = run(ws, "validate")
    assert answer.err == "error: node_families/big.yaml: larger than 1024 KiB (the limit for a YAML file)\n", \
        str(answer)
    big.unlink()
    os.mkfifo(ws.families_dir / "pipe.yaml")  # opening it for reading would wait for a writer forever
    answer = run(ws, "validate")
    assert answer.err == "error: node_families/pipe.yaml: not a regular file (make it a plain YAML file)\n", \
        str(answer)
    assert answer.seconds < 5
    (ws.families_dir / "pipe.yaml").unlink()
    (ws.families_dir / "latin.yaml").write_bytes(b"release: primes\ncount: 1\nlabels: [caf\xe9]\n")
    answer = run(ws, "validate")
    assert answer.err == "error: node_families/latin.yaml:3: not UTF-8 text (save the file as UTF-8)\n", str(answer)


def test_a_document_at_the_limits_is_read_in_good_time() -> None:
    """Just under the limits: a pool of 5000 hosts (about 600 KB, 45000 values), deep
    nesting, many aliases; each is read within a few seconds on a busy machine."""
    pool = "options:\n  hosts:\n" + "".join(
        f"    - {{address: 10.0.{i // 250}.{i % 250}, port: 22, user: orch, key: ssh-ed25519 AAAA{i:040d}}}\n"
        for i in range(5000))
    deep = "a: " + "[" * 63 + "]" * 63 + "\n"
    aliases = "x: &x {a: 1}\nlist:\n" + "  - *x\n" * safeyaml.MAX_ALIASES
    for text in (pool, deep, aliases):
        started = time.monotonic()
        safeyaml.compose(text)
        assert time.monotonic() - started < 5
    assert len(pool) > 500_000


# -- the YAML reader: scalars as YAML 1.2 reads them, strictly as the schema says -------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("y", "y"), ("N", "N"),
    ("true", True), ("False", False), ("~", None), ("null", None), ("", None),
    ("0777", "0777"), ("-012", "-012"), ("0o17", 15), ("0x1f", 31), ("0", 0), ("-0", 0), ("+12", 12),
    ("1e3", 1000.0), ("1.10", 1.1), (".5", 0.5), ("1:20", "1:20"), ("1_000", "1_000"), ("0b101", "0b101"),
    ("2024-01-02", "2024-01-02"), ("<<", "<<"), ("=", "="),
])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text: str, expected: Any) -> None:
    value = safeyaml.load(f"k: {text}\n")["k"]
    assert value == expected and type(value) is type(expected)


def test_yaml_1_1_words_stay_text_where_the_schema_wants_text(ws: Workspace) -> None:
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 1\nlabels: [no, on, yes, off, 'y', 1.10, 0777, 1e3, 1:20, true]\n")
    (ws.providers_dir / "local.yaml").write_text("driver: local\nlabels: [no]\noptions: {mode: no, when: 1:20}\n")
    manifest = ws.releases_src_dir / "primes" / "release.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.1.0", "version: 1.10"))
    answer = run(ws, "validate", "--json")
    assert answer.code == 0, str(answer)
    family = json.loads(run(ws, "family", "show", "workers", "--json").out)
    assert family["labels"] == ["no", "on", "yes", "off", "y", "1.10", "0777", "1e3", "1:20", "true"]
    provider = json.loads(run(ws, "provider", "show", "local", "--json").out)
    assert provider["labels"] == ["no"] and provider["options"] == {"mode": "no", "when": "1:20"}
    from orchestrator.config import load_workspace_config
    assert load_workspace_config(ws).release_sources["primes"].version == "1.10"  # not 1.1


@pytest.mark.parametrize(("line", "field", "words"), [
    ("count: 0777", "count", "0777 has a leading zero: write 777, or 0o777 for octal"),
    ("count: 1e3", "count", "write a whole number: 1000"),
    ("count: 3.0", "count", "write a whole number: 3"),
    ("count: 1:20", "count", "1:20 is text, YAML 1.2 has no base-60 numbers"),
    ("count: '3'", "count", "write 3 without quotes"),
    ("count: yes", "count", "'yes' is text in YAML 1.2"),
    ("count: true", "count", "Input should be a valid integer"),
    ("scaling: {min: 0, max: 2, replace_lost: off}", "scaling.replace_lost",
     "write true or false; 'off' is text in YAML 1.2"),
    ("scaling: {min: 0, max: 2, replace_lost: 'true'}", "scaling.replace_lost", "write true without quotes"),
    ("bootstrap: {timeout_seconds: 1:20}", "bootstrap.timeout_seconds", "YAML 1.2 has no base-60 numbers"),
])
def test_a_number_or_flag_written_otherwise_is_refused_saying_what_to_write(ws: Workspace, line: str, field: str,
                                                                            words: str) -> None:
    text = "release: primes\n" + (line if line.startswith("count") else f"count: 1\n{line}") + "\n"
    (ws.families_dir / "workers.yaml").write_text(text)
    answer = run(ws, "validate")
    number = text.splitlines().index(line) + 1
    assert answer.code == 2 and answer.err.startswith(f"error: node_families/workers.yaml:{number}: {field}: "), \
        str(answer)
    assert words in answer.err and len(answer.err.splitlines()) == 1, str(answer)


def test_octal_and_hex_integers_are_read_as_such(ws: Workspace) -> None:
    (ws.families_dir / "workers.yaml").write_text("release: primes\ncount: 0o10\ndemands: {cpus: 0x2}\n")
    family = json.loads(run(ws, "family", "show", "workers", "--json").out)
    assert family["count"] == 8 and family["demands"]["cpus"] == 2


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["yes", "no", "on", "0777", "1:20", "1e3", "~", "null", "0o7", ".inf", "2024-01-02", "1_0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20))
@settings(max_examples=100, deadline=timedelta(seconds=2), database=None)
def test_what_orch_writes_as_yaml_reads_back_the_same_in_yaml_1_2_and_1_1(data: Any) -> None:
    text = safeyaml.dump({"v": data})
    assert safeyaml.load(text) == {"v": data}
    assert yaml.safe_load(text) == {"v": data}  # and by YAML 1.1 readers (Ansible, editors)


def test_no_code_reads_yaml_but_the_one_reader() -> None:
    """``safeyaml`` is the only reader: nothing else in orchestrator/ parses YAML."""
    readers = re.compile(r"(?<![\w.])yaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all|compose|parse"
                         r"|scan)\b|\b(Safe|Full|Unsafe|CSafe|CFull|CUnsafe|Base|C)Loader\b")
    found = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        if path.name == "safeyaml.py":
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if readers.search(text):
                found.append(f"{path.relative_to(REPO)}:{number}: {text.strip()}")
    assert found == []


# -- every problem of every file, one line each --------------------------------------------------------


def test_every_problem_of_every_file_is_listed_one_line_each(ws: Workspace) -> None:
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: many\nlabels: [ok, 'not a label']\nbootstrap:\n  strategy: fast\n"
        "  retries: -1\nnodes: 3\n")
    (ws.providers_dir / "local.yaml").write_text("driver: local\npriority: high\nmax_nodes: -2\n")
    manifest = ws.releases_src_dir / "primes" / "release.yaml"
    manifest.write_text("name: primes\nversion: 1.0.0\nlibrary: /abs.so\nfunctions: []\n")
    ws.settings_file.write_text("scheduler_port: 70000\nrelease_max_bytes: 0\n")
    before = file_digest(ws.state_db)
    answer = run(ws, "validate")
    assert answer.code == 2 and file_digest(ws.state_db) == before
    expected = [
        "error: orch.yaml:1: scheduler_port: Input should be less than or equal to 65535",
        "error: orch.yaml:2: release_max_bytes: Input should be greater than 0",
        "error: providers/local.yaml:2: priority: Input should be a valid integer",
        "error: providers/local.yaml:3: max_nodes: Input should be greater than or equal to 0",
        "error: releases/primes/release.yaml:3: library: must be a relative path inside the release, without '..'",
        "error: releases/primes/release.yaml:4: functions: List should have at least 1 item after validation, not 0",
        "error: node_families/workers.yaml:2: count: Input should be a valid integer",
        "error: node_families/workers.yaml:3: labels.1: String should match pattern ",
        "error: node_families/workers.yaml:5: bootstrap.strategy: Input should be 'parallel', 'rolling' or "
        "'seed_first'",
        "error: node_families/workers.yaml:6: bootstrap.retries: Input should be greater than or equal to 0",
        "error: node_families/workers.yaml:7: nodes: unknown key; allowed keys: bootstrap, count, demands, labels, "
        "name, placement, release, scaling, workers_per_node",
        "error: 11 problems in the workspace",
    ]
    lines = answer.err.splitlines()
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected, strict=True)), \
        answer.err
    report = json.loads(run(ws, "validate", "--json").out)
    assert report["ok"] is False and report["exit_code"] == 2 and len(report["problems"]) == 11
    assert report["problems"][6] == {
        "file": "node_families/workers.yaml", "line": 2, "field": "count", "message": "Input should be a valid integer",
        "hint": None, "text": "node_families/workers.yaml:2: count: Input should be a valid integer"}
    shown = run(ws, "family", "show", "workers", "--json")  # one file's problems, from any command that loads it
    assert shown.code == 2 and shown.err.splitlines()[-1] == "error: 5 problems in node_families/workers.yaml"
    assert [p["line"] for p in json.loads(shown.out)["problems"]] == [2, 3, 5, 6, 7]


def test_one_problem_is_one_line_and_json_has_one_object(ws: Workspace) -> None:
    (ws.families_dir / "workers.yaml").write_text("release: primes\ncount: 2\ndemands:\n  cpus: 0\n")
    answer = run(ws, "validate", "--json")
    assert answer.err == ("error: node_families/workers.yaml:4: demands.cpus: "
                          "Input should be greater than or equal to 1\n")
    assert [p["field"] for p in json.loads(answer.out)["problems"]] == ["demands.cpus"]
    plain = run(ws, "plan", "workers")
    assert plain.code == 2 and plain.err == answer.err and plain.out == ""


def test_duplicate_keys_and_bad_keys_are_listed_with_the_rest(ws: Workspace) -> None:
    (ws.families_dir / "workers.yaml").write_text(
        "release: primes\ncount: 1\ncount: 2\n? [a, b]\n: 1\n\"odd\\nkey\": 3\n")
    answer = run(ws, "validate")
    assert answer.err.splitlines() == [
        "error: node_families/workers.yaml:3: count: duplicate key (first on line 2) (keep one of them)",
        "error: node_families/workers.yaml:4: a key must be a plain value, not a list or a mapping",
        'error: node_families/workers.yaml:6: "odd\\nkey": unknown key; allowed keys: bootstrap, count, demands, '
        "labels, name, placement, release, scaling, workers_per_node",
        "error: 3 problems in the workspace",
    ], answer.err


# -- property-based: generated documents ---------------------------------------------------------------

VALID = {
    "family": ("node_families/fuzz.yaml",
               "release: primes\ncount: 2\nworkers_per_node: 1\nlabels: [fast, zone=a]\ndemands:\n  cpus: 1\n"
               "  ram_mb: 256\n  labels: []\n  max_price: 0.5\nplacement:\n  policy: ordered\n  providers: [local]\n"
               "  avoid: [workers]\nbootstrap:\n  strategy: rolling\n  batch_size: 1\n  retries: 1\n"
               "  timeout_seconds: 120\n  pre: [\"true\"]\n  depends_on: [workers]\nscaling:\n  min: 0\n  max: 3\n"
               "  idle_seconds: 30\n  replace_lost: true\n"),
    "provider": ("providers/fuzz.yaml",
                 "driver: local\nlabels: [private]\npriority: 10\nmax_nodes: 4\noptions:\n  first_address: 100\n"
                 "credentials:\n  token: env:FUZZ_TOKEN\nprices:\n  local-1: 0.01\nimage: null\nbootstrap: true\n"),
    "release": ("releases/fuzz/release.yaml",
                "name: fuzz\nversion: 1.0.0\ndescription: a release\nbuild: [make]\nbuild_on: builder\n"
                "library: build/libfuzz.so\nartifact: [data]\nfunctions:\n  - name: f\n    symbol: f_impl\n"
                "    work_module: range\n    timeout_seconds: 30\nsetup: []\n"),
    "workspace": ("orch.yaml",
                  "release_max_bytes: 67108864\nscheduler_address: 127.0.0.1\nscheduler_port: 23456\nbuilders:\n"
                  "  linux-x86_64-glibc2.36: workers\n"),
}
COMMANDS: dict[str, list[list[str]]] = {
    "family": [["validate", "--json"], ["family", "show", "fuzz"], ["plan", "fuzz"]],
    "provider": [["validate"], ["provider", "show", "fuzz", "--json"]],
    "release": [["validate", "--json"]],  # (not `release upload`: its build commands would run)
    "workspace": [["validate", "--json"], ["release", "upload", "{ws}/releases/primes"]],  # reads release_max_bytes
}
KEYS = sorted({line.split(":")[0].strip(" -") for _, text in VALID.values() for line in text.splitlines()} - {""})
WORDS = ["yes", "no", "on", "off", "y", "n", "true", "False", "~", "null", "0777", "-012", "0o17", "0x1f", "1e3",
         "1.10", ".inf", "-.inf", ".nan", "1:20", "1_000", "2024-01-02", "12:30:00", "0", "-1", "65536", "1e400",
         "9" * 40, "", " ", "primes", "primes@1.1.0", "local", "workers", "fuzz", "env:X", "file:/etc/passwd",
         "../..", "/abs", "a b", "<<", "=", "zone=a", "*", "&", "!", "|", ">", "#", "%", "@", "`", "\t", "é", "\u202e"]
FRAGMENTS = ["\n", "\n  ", "\n- ", ": ", ", ", "[", "]", "{", "}", "- ", "? ", "&a ", "*a", "*b", "!!str ", "!!int ",
             "!!float ", "!!bool ", "!!null ", "!!map ", "!!seq ", "!!binary ", "!!python/object:os.system ",
             "!local ", "|\n  ", ">-\n  ", "'", '"', "# c\n", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,1:\n",
             "<<: *a\n", "\t", "\\", "\x00", "\x7f", "\ufeff", "\u2028", "[" * 90, "{a: " * 90, LAUGHS,
             "x: &x\n  y: *x\n", *KEYS, *WORDS]

scalars = (st.sampled_from(WORDS) | st.integers(-(10**12), 10**12) | st.floats() | st.booleans() | st.none()
           | st.text(alphabet=string.printable + "éあ\u202e", max_size=16))
keys = st.sampled_from(KEYS) | st.text(alphabet=string.ascii_letters + string.digits + "_-. :", max_size=12)
structures = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=6),
                          max_leaves=25)


def _dumped(data: Any, style: bool | None) -> str:
    return yaml.safe_dump(data, default_flow_style=style, allow_unicode=True, sort_keys=False)


@st.composite
def documents(draw: st.DrawFn, kind: str) -> str:
    """YAML text for a file of ``kind``: a random structure (with the schema's keys), raw
    YAML-ish text, or the valid file mutated a few times."""
    how = draw(st.sampled_from(["structure", "schema keys", "fragments", "text", "bomb", "mutated", "mutated",
                                "mutated"]))
    if how == "bomb":  # the valid file with a billion laughs or a deep nest beside its keys
        return draw(mutation(VALID[kind][1], bomb=True))
    if how == "structure":
        return _dumped(draw(structures), draw(st.sampled_from([None, True, False])))
    if how == "schema keys":
        data = draw(st.dictionaries(st.sampled_from(KEYS), structures, min_size=1, max_size=8))
        return _dumped(data, draw(st.sampled_from([None, False])))
    if how == "fragments":
        return "".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=40)))
    if how == "text":
        return draw(st.text(max_size=200))
    text = VALID[kind][1]
    for _ in range(draw(st.integers(1, 4))):
        text = draw(mutation(text))
    return text


@st.composite
def mutation(draw: st.DrawFn, text: str, bomb: bool = False) -> str:
    lines = text.splitlines(keepends=True)
    at = draw(st.integers(0, max(0, len(lines) - 1)))
    what = "bomb" if bomb else draw(st.sampled_from(["value", "value", "key", "insert", "delete", "duplicate",
                                                      "indent", "cut", "bomb"]))
    line = lines[at] if lines else ""
    if what == "bomb":  # a billion laughs, or nesting deeper than Python's stack, as top-level keys
        nest = draw(st.sampled_from([LAUGHS, "deep: " + "[" * 400 + "]" * 400 + "\n",
                                     "deep:\n" + "".join("  " * i + "- \n" for i in range(1, 400))]))
        return nest + text if draw(st.booleans()) else text.rstrip("\n") + "\n" + nest
    if what == "value" and ":" in line:
        head = line.split(":", 1)[0]
        value = draw(st.sampled_from(WORDS) | st.builds(lambda v: json.dumps(v), scalars)
                     | st.builds(lambda d: _dumped(d, True).strip(), structures))
        lines[at] = f"{head}: {value}\n"
    elif what == "key" and ":" in line:
        indent = line[:len(line) - len(line.lstrip())]
        lines[at] = f"{indent}{draw(keys)}:{line.split(':', 1)[1]}"
    elif what == "insert":
        lines.insert(at, "".join(draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6))) + "\n")
    elif what == "delete" and lines:
        del lines[at]
    elif what == "duplicate" and lines:
        lines.insert(at, line)
    elif what == "indent" and lines:
        lines[at] = draw(st.sampled_from([" ", "  ", "\t", "    "])) + line
    else:
        joined = "".join(lines)
        start = draw(st.integers(0, len(joined)))
        return joined[:start] + joined[start + draw(st.integers(0, 12)):]
    return "".join(lines)


@pytest.fixture(scope="module")
def fuzz_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A workspace with the primes release uploaded, the local provider and a family
    ``workers`` (never spawned: no node ever runs here)."""
    ws = primes_workspace(tmp_path_factory.mktemp("fuzz") / "ws", count=1)
    (ws.releases_src_dir / "fuzz").mkdir()
    return ws


@contextlib.contextmanager
def written(ws: Workspace, relative: str, text: str) -> Iterator[Path]:
    """``text`` as the workspace's file ``relative`` for the block; the file as it was after."""
    path = ws.root / relative
    old = path.read_bytes() if path.exists() else None
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        yield path
    finally:
        if old is None:
            path.unlink()
        else:
            path.write_bytes(old)


def _check_document(ws: Workspace, kind: str, text: str) -> None:
    relative = VALID[kind][0]
    with written(ws, relative, text):
        for args in COMMANDS[kind]:
            before = file_digest(ws.state_db)
            answer = run(ws, *(a.format(ws=ws.root) for a in args))
            check(answer, before, ws)
            if args[0] == "validate" and answer.code == 2:
                _check_problem_lines(answer, relative, text)


def _check_problem_lines(answer: Answer, relative: str, text: str) -> None:
    """``validate``'s problems name the file (and a line inside it), one a line, and the
    summary counts them."""
    lines = answer.err.splitlines()
    problems = lines if len(lines) == 1 else lines[:-1]
    if len(lines) > 1:
        assert lines[-1] == f"error: {len(problems)} problems in the workspace", str(answer)
    shown = re.escape(relative)
    for line in problems:
        found = re.match(rf"^error: {shown}(?::(\d+))?: \S", line)
        assert found, f"{line!r} does not name {relative}: {answer}"
        if found.group(1):
            assert 1 <= int(found.group(1)) <= text.count("\n") + 2, str(answer)


SETTINGS = settings(deadline=timedelta(seconds=20), database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("kind", sorted(VALID))
def test_the_valid_documents_are_valid(fuzz_ws: Workspace, kind: str) -> None:
    relative, text = VALID[kind]
    with written(fuzz_ws, relative, text):
        for args in COMMANDS[kind]:
            answer = run(fuzz_ws, *(a.format(ws=fuzz_ws.root) for a in args))
            assert answer.code == 0, str(answer)


@given(text=documents("family"))
@settings(SETTINGS, max_examples=25)
def test_generated_family_files(fuzz_ws: Workspace, text: str) -> None:
    _check_document(fuzz_ws, "family", text)


@given(text=documents("provider"))
@settings(SETTINGS, max_examples=15)
def test_generated_provider_files(fuzz_ws: Workspace, text: str) -> None:
    _check_document(fuzz_ws, "provider", text)


@given(text=documents("release"))
@settings(SETTINGS, max_examples=20)
def test_generated_release_manifests(fuzz_ws: Workspace, text: str) -> None:
    _check_document(fuzz_ws, "release", text)


@given(text=documents("workspace"))
@settings(SETTINGS, max_examples=15)
def test_generated_orch_yaml(fuzz_ws: Workspace, text: str) -> None:
    _check_document(fuzz_ws, "workspace", text)


# -- property-based: generated command lines ------------------------------------------------------------

words = st.sampled_from(WORDS) | st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", "") + "é",
                                         max_size=16)
numbers = st.sampled_from(["0", "-1", "1", "0.5", "1e3", "nan", "inf", "-inf", "1e400", "0777", "x", "", "10**9",
                           "99999999999999999999"]) | st.builds(str, st.integers(-(10**6), 10**9) | st.floats())


def _check_args(ws: Workspace, args: list[str]) -> None:
    before = file_digest(ws.state_db)
    check(run(ws, *args), before, ws)


@given(target=st.sampled_from(["all", "workers", "work*", "/local/*/workers/*", "/", "//", "*", "[", "]", "-x",
                               "--", "..", "/a/b/c/d/e/f", "", "=", "node-1", "a,b", "!x"]) | words,
       labels=st.lists(st.sampled_from(["zone=a", "k", "k!=v", "!k", "=", "", ",", "a,b=c", "k=v=w"]) | words,
                       max_size=2),
       timeout=st.none() | numbers, as_json=st.booleans(), command=st.lists(words, min_size=1, max_size=3))
@settings(SETTINGS, max_examples=20)
def test_generated_exec_command_lines(fuzz_ws: Workspace, target: str, labels: list[str], timeout: str | None,
                                      as_json: bool, command: list[str]) -> None:
    """``orch exec``: no node is ready in this workspace, so nothing ever runs."""
    args = ["exec", *[a for label in labels for a in ("--label", label)]]
    args += ["--timeout", timeout] if timeout is not None else []
    args += ["--json"] if as_json else []
    _check_args(fuzz_ws, [*args, target, "--", *command])


SINKS = ["file:out/a.bin", "file:", "sqlite:out/a.db", "sqlite:", "sqlite:out/a.db?table=x;drop", "nope:x", "file",
         "postgresql://u@127.0.0.1:1/db", "postgresql://u:secret@h/db", "postgresql://[::1", "://", "file:../../x"]


@given(work=st.sampled_from(["primes:count_primes", "primes:list_primes", "primes@1.1.0:iterated_hash", "primes",
                             "nope:f", ":", "primes:", "primes@9:count_primes", "primes:count_primes:x"]) | words,
       input_=st.sampled_from(["0:10", "10:0", "0:0", "a:b", "0:1e3", "-5:5", "0:99999999999999999999", "0",
                               "", "0:10:2", "README.md"]) | words,
       options=st.lists(st.sampled_from(["max_span=100", "max_span=0", "max_span=x", "x=1", "=", "k", "max_span=-1"])
                        | words, max_size=3),
       extra=st.lists(st.tuples(st.sampled_from(["--task-size", "--target-task-seconds", "--task-timeout",
                                                 "--max-attempts", "--ports-per-node", "--on-task-failure",
                                                 "--family", "--work-module", "--sink"]),
                                numbers | words | st.sampled_from([*SINKS, "continue", "fail", "lines", "chunks"])),
                      max_size=4),
       as_json=st.booleans())
@settings(SETTINGS, max_examples=25)
def test_generated_job_run_command_lines(fuzz_ws: Workspace, work: str, input_: str, options: list[str],
                                         extra: list[tuple[str, str]], as_json: bool) -> None:
    """``orch job run ... --detach``: a job that passes is only queued (no node runs it here)."""
    args = ["job", "run", work, "--input", input_, "--detach"]
    args += [a for option in options for a in ("--option", option)]
    args += [a for pair in extra for a in pair]
    args += ["--json"] if as_json else []
    _check_args(fuzz_ws, args)


@given(command=st.sampled_from([["job", "status"], ["job", "result"], ["job", "delete"], ["family", "show"],
                                ["provider", "show"], ["release", "show"], ["plan"], ["plan", "workers", "--count"],
                                ["events", "--after"], ["events", "--job"], ["nodes", "--json"], ["inventory"]]),
       value=words | numbers | st.sampled_from(["workers", "local", "primes@1.1.0", "../orch", "../../etc/passwd",
                                               "primes@", "@1", "-1", "--json"]),
       as_json=st.booleans())
@settings(SETTINGS, max_examples=25)
def test_generated_arguments_of_commands_that_read(fuzz_ws: Workspace, command: list[str], value: str,
                                                   as_json: bool) -> None:
    takes_json = command[0] in ("job", "family", "provider", "release", "plan", "events") and command[-1] != "delete"
    _check_args(fuzz_ws, [*command, value, *(["--json"] if as_json and takes_json else [])])


def test_the_document_generator_makes_valid_and_invalid_files() -> None:
    """The generator is not all noise: of a seeded run of family files, some are valid
    and some are not (so the properties above see both kinds of answer)."""
    from orchestrator.config import NodeFamily, parse_yaml, validate_document
    from orchestrator.errors import ConfigError

    outcomes: list[str] = []

    @given(text=documents("family"))
    @settings(max_examples=80, database=None, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    def probe(text: str) -> None:
        try:
            validate_document(NodeFamily, parse_yaml(text, "fuzz.yaml"), name_from="fuzz")
            outcomes.append("valid")
        except ConfigError:
            outcomes.append("refused")

    probe()
    # Which examples hypothesis draws varies a little with the machine's speed, even derandomized.
    assert outcomes.count("valid") >= 1 and outcomes.count("refused") >= 30, outcomes
