"""orchestrator.scheduler work modules (workmodules, builtin_modules, module_loader): cutting inputs into tasks,
resuming, refusing bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import InputError, StateError
from orchestrator.scheduler.builtin_modules import UINT64_MAX, LinesModule
from orchestrator.scheduler.module_loader import check_work_module, load_work_module
from orchestrator.scheduler.workmodules import WorkModule, WorkModuleError


def drain(module: WorkModule, sizes: list[float], *, cycle: bool = True, limit: int = 10_000_000) -> list[bytes]:
    """Every task the module gives, asking with ``sizes`` in turn (cycled, or until they run out)."""
    tasks = []
    for i in range(limit):
        if not cycle and i >= len(sizes):
            break
        data = module.next(sizes[i % len(sizes)])
        if data is None:
            break
        tasks.append(data)
    return tasks


# -- cutting: (module, input or file content, options, sizes) -> tasks ---------------------------


@dataclass
class Cut:
    module: str
    input: str | bytes  # range: the input; lines/chunks: the file's content
    options: dict[str, Any]
    sizes: list[float]
    expect: list[bytes]


CUTS: dict[str, Cut] = {
    "range: whole tasks": Cut("range", "0:10", {"max_span": 4}, [1.0], [b"0 4", b"4 8", b"8 10"]),
    "range: space form": Cut("range", "0 10", {"max_span": 5}, [1.0], [b"0 5", b"5 10"]),
    "range: spaces around": Cut("range", "  3 : 7 ", {"max_span": 10}, [1.0], [b"3 7"]),
    "range: one number": Cut("range", "41:42", {}, [1.0], [b"41 42"]),
    "range: empty": Cut("range", "5:5", {}, [1.0], []),
    "range: size rounds to zero -> 1": Cut("range", "0:3", {"max_span": 10}, [0.04], [b"0 1", b"1 2", b"2 3"]),
    "range: size rounds up": Cut("range", "0:6", {"max_span": 10}, [0.26], [b"0 3", b"3 6"]),
    "range: mixed sizes": Cut("range", "100:200", {"max_span": 100}, [0.1, 0.5, 0.01, 1.0],
                              [b"100 110", b"110 160", b"160 161", b"161 200"]),
    "range: default span": Cut("range", "0:2500000", {}, [1.0], [b"0 1000000", b"1000000 2000000",
                                                                  b"2000000 2500000"]),
    "range: the top of uint64": Cut("range", f"{UINT64_MAX - 3}:{UINT64_MAX}", {"max_span": 2}, [1.0],
                                    [b"%d %d" % (UINT64_MAX - 3, UINT64_MAX - 1), b"%d %d" % (UINT64_MAX - 1,
                                                                                             UINT64_MAX)]),
    "range: float option": Cut("range", "0:4", {"max_span": 2.0}, [1.0], [b"0 2", b"2 4"]),
    "lines: whole tasks": Cut("lines", b"a\nb\nc\n", {"max_lines": 2}, [1.0], [b"a\nb\n", b"c\n"]),
    "lines: last line without newline": Cut("lines", b"a\nb\nc", {"max_lines": 2}, [1.0], [b"a\nb\n", b"c"]),
    "lines: empty file": Cut("lines", b"", {}, [1.0], []),
    "lines: empty lines are lines": Cut("lines", b"\n\n\n", {"max_lines": 2}, [1.0], [b"\n\n", b"\n"]),
    "lines: CRLF kept": Cut("lines", b"a\r\nb\r\n", {"max_lines": 1}, [1.0], [b"a\r\n", b"b\r\n"]),
    "lines: one unterminated line": Cut("lines", b"only", {}, [0.001], [b"only"]),
    "lines: size picks the count": Cut("lines", b"1\n2\n3\n4\n5\n6\n", {"max_lines": 10}, [0.2, 0.3, 0.01],
                                       [b"1\n2\n", b"3\n4\n5\n", b"6\n"]),
    "lines: binary bytes": Cut("lines", b"\x00\xff\n\x80", {"max_lines": 1}, [1.0], [b"\x00\xff\n", b"\x80"]),
    "chunks: whole tasks": Cut("chunks", b"abcdefghij", {"max_bytes": 4}, [1.0], [b"abcd", b"efgh", b"ij"]),
    "chunks: size halves": Cut("chunks", b"abcdef", {"max_bytes": 4}, [0.5], [b"ab", b"cd", b"ef"]),
    "chunks: tiny size -> 1 byte": Cut("chunks", b"xyz", {"max_bytes": 1000}, [1e-9], [b"x", b"y", b"z"]),
    "chunks: empty file": Cut("chunks", b"", {}, [1.0], []),
}


def _input(cut: Cut, tmp_path: Path) -> str:
    if isinstance(cut.input, str):
        return cut.input
    path = tmp_path / "input"
    path.write_bytes(cut.input)
    return str(path)


@pytest.mark.parametrize("name", list(CUTS))
def test_cutting(name: str, tmp_path: Path) -> None:
    cut = CUTS[name]
    with load_work_module(cut.module, _input(cut, tmp_path), cut.options) as module:
        assert drain(module, cut.sizes) == cut.expect
        assert module.next(1.0) is None, "an exhausted module stays exhausted"
        done, total = module.progress()
        assert done == total
        if isinstance(cut.input, bytes):
            assert b"".join(cut.expect) == cut.input


@pytest.mark.parametrize("count", [1, 2, 3, 1000])
@pytest.mark.parametrize("name", list(CUTS))
def test_next_many_cuts_as_next_does(name: str, count: int, tmp_path: Path) -> None:
    cut = CUTS[name]
    with load_work_module(cut.module, _input(cut, tmp_path), cut.options) as module:
        got: list[bytes] = []
        for turn in range(10_000):
            batch = module.next_many(cut.sizes[turn % len(cut.sizes)], count)  # one size per batch
            got += batch
            if len(batch) < count:
                break
        assert module.next_many(1.0, count) == [], "an exhausted module stays exhausted"
    with load_work_module(cut.module, _input(cut, tmp_path), cut.options) as single:
        sizes = [cut.sizes[(i // count) % len(cut.sizes)] for i in range(len(got) + 1)]
        assert got == drain(single, sizes, cycle=False)


@pytest.mark.parametrize(("module", "input", "options", "min_size"), [
    ("range", "0:10", {"max_span": 4}, 0.25),
    ("range", "0:10", {}, 1e-6),
    ("lines", b"x\n", {"max_lines": 8}, 0.125),
    ("chunks", b"x", {}, 1 / (1 << 20)),
])
def test_min_size_is_one_unit(module: str, input: str | bytes, options: dict[str, Any], min_size: float,
                              tmp_path: Path) -> None:
    with load_work_module(module, _input(Cut(module, input, options, [], []), tmp_path), options) as loaded:
        assert loaded.min_size == pytest.approx(min_size)


@pytest.mark.parametrize("size", [0.0, -0.5, 1.0000001, 2.0, math.nan, math.inf])
@pytest.mark.parametrize("module", ["range", "lines", "chunks"])
def test_sizes_outside_0_1_are_a_caller_bug(module: str, size: float, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"a\nb\n")
    with load_work_module(module, "0:10" if module == "range" else str(tmp_path / "f"), {}) as loaded, \
            pytest.raises(ValueError, match=r"task size must be in \(0, 1\]"):
        loaded.next(size)


def test_progress_counts_units(tmp_path: Path) -> None:
    with load_work_module("range", "10:20", {"max_span": 4}) as module:
        assert module.progress() == (0, 10)
        module.next(1.0)
        assert module.progress() == (4, 10)
        assert module.unit == "numbers"
    (tmp_path / "f").write_bytes(b"aa\nbbb\n")
    with load_work_module("lines", str(tmp_path / "f"), {"max_lines": 1}) as lines:
        assert lines.progress() == (0, 7)
        lines.next(1.0)
        assert lines.progress() == (3, 7)
        assert lines.unit == "bytes"
        assert isinstance(lines, LinesModule) and lines.lines_done == 1


# -- resume: a module built from position() gives exactly the remaining tasks ---------------------


RESUMABLE = {
    "range": ("range", "7:1007", {"max_span": 50}),
    "lines": ("lines", b"".join(b"line %d\n" % i for i in range(500)) + b"no newline at the end", {"max_lines": 40}),
    "chunks": ("chunks", bytes(range(256)) * 7, {"max_bytes": 64}),
}


@pytest.mark.parametrize("after", [0, 1, 5, 17, 10_000])
@pytest.mark.parametrize("kind", list(RESUMABLE))
def test_resume_gives_the_same_remaining_tasks(kind: str, after: int, tmp_path: Path) -> None:
    name, input, options = RESUMABLE[kind]
    source = _input(Cut(name, input, options, [], []), tmp_path)
    sizes = [random.Random(after).choice([0.01, 0.1, 0.33, 0.5, 1.0]) for _ in range(1000)]
    with load_work_module(name, source, options) as reference:
        everything = drain(reference, sizes)
    with load_work_module(name, source, options) as first:
        head = drain(first, sizes[:after], cycle=False)
        stored = json.loads(json.dumps(first.position()))  # the store keeps JSON
        progress = first.progress()
    with load_work_module(name, source, options, stored) as resumed:
        assert resumed.progress() == progress
        tail = drain(resumed, sizes[len(head):], cycle=False)
    assert head + tail == everything
    if isinstance(input, bytes):
        assert b"".join(head + tail) == input


def test_lines_resume_seeks_without_reading_a_huge_file(tmp_path: Path) -> None:
    """A 6 GiB sparse file: resuming near its end answers at once (the file is never read whole)."""
    path = tmp_path / "huge"
    size = 6 << 30
    tail = b"\nsecond to last\nlast\n"
    with open(path, "wb") as out:
        out.write(b"first\n")
        out.seek(size - len(tail))
        out.write(tail)
    offset = size - len(tail) + 1  # just after the "\n" that ends the long run of NULs
    position = {"offset": offset, "lines": 123_456, "size": size}
    with load_work_module("lines", str(path), {"max_lines": 10}, position) as module:
        assert module.progress() == (offset, size)
        assert module.next(1.0) == b"second to last\nlast\n"
        assert module.next(1.0) is None
        assert module.position() == {"offset": size, "lines": 123_458, "size": size}
    with load_work_module("chunks", str(path), {"max_bytes": 4}, {"offset": size - 5, "size": size}) as chunks:
        assert drain(chunks, [1.0]) == [b"last", b"\n"]


def test_a_million_lines_in_random_sizes(tmp_path: Path) -> None:
    path = tmp_path / "million"
    content = b"".join(b"%d\n" % i for i in range(1_000_000))
    path.write_bytes(content)
    rng = random.Random(7)
    sizes = [rng.choice([1e-4, 0.003, 0.05, 0.2, 1.0]) for _ in range(997)]
    digest, count, tasks, position = hashlib.sha256(), 0, 0, None
    while True:  # stop and resume every 50 tasks, as a job interrupted again and again would
        with load_work_module("lines", str(path), {"max_lines": 10_000}, position) as module:
            for _ in range(50):
                data = module.next(sizes[tasks % len(sizes)])
                if data is None:
                    break
                assert data.endswith(b"\n")
                digest.update(data)
                count += data.count(b"\n")
                tasks += 1
            else:
                position = module.position()
                continue
            final = module.position()
            break
    assert count == 1_000_000
    assert digest.digest() == hashlib.sha256(content).digest()
    assert final == {"offset": len(content), "lines": 1_000_000, "size": len(content)}


def test_a_line_longer_than_a_task_can_carry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LinesModule, "max_task_bytes", 10)
    path = tmp_path / "f"
    path.write_bytes(b"abcd\nefgh\n" + b"x" * 20 + b"\nend\n")
    with load_work_module("lines", str(path), {"max_lines": 100}) as module:
        assert module.next(1.0) == b"abcd\nefgh\n", "exactly the budget fits"
        before = module.position()
        with pytest.raises(WorkModuleError, match=r"^--input: line 3 of .* is longer than 10 bytes.*chunks"):
            module.next(1.0)
        assert module.position() == before, "a refused task moves nothing"
    path.write_bytes(b"abc\nefghij\n")
    with load_work_module("lines", str(path), {"max_lines": 100}) as module:
        assert drain(module, [1.0]) == [b"abc\n", b"efghij\n"], "a task stops before the line that does not fit"


# -- stored positions that no longer fit -------------------------------------------------------


@pytest.mark.parametrize(("module", "content", "position", "expect"), [
    ("range", None, {"next": 99}, r"stored position .* does not fit"),
    ("range", None, {"next": "3"}, r"stored position"),
    ("range", None, {}, r"stored position"),
    ("lines", b"ab\ncd\n", {"offset": 1, "lines": 0, "size": 6}, r"not at the start of a line"),
    ("lines", b"ab\ncd\n", {"offset": 3, "lines": 1, "size": 5}, r"changed since the job started"),
    ("lines", b"ab\ncd\n", {"offset": 9, "lines": 1, "size": 6}, r"stored position"),
    ("lines", b"ab\ncd\n", {"offset": 3, "lines": 7, "size": 6}, r"stored position"),
    ("chunks", b"abcdef", {"offset": 7, "size": 6}, r"stored position"),
    ("chunks", b"abcdef", {"offset": 2}, r"changed since the job started"),
])
def test_a_position_that_does_not_fit_is_a_state_error(module: str, content: bytes | None, position: dict[str, Any],
                                                       expect: str, tmp_path: Path) -> None:
    source = "0:10"
    if content is not None:
        (tmp_path / "f").write_bytes(content)
        source = str(tmp_path / "f")
    with pytest.raises(StateError, match=expect) as caught:
        load_work_module(module, source, {}, position)
    assert "\n" not in str(caught.value)


# -- bad input: one line, the field first, and the fix ----------------------------------------


@dataclass
class Bad:
    module: str
    input: str  # "{tmp}" is replaced by the test's folder
    options: dict[str, Any] = field(default_factory=dict)
    expect: str = ""
    prepare: Callable[[Path], None] | None = None


BAD: dict[str, Bad] = {
    "unknown module": Bad("ranges", "0:1", expect=r'^--module: unknown work module "ranges"; use range, lines, chunks'),
    "start after end": Bad("range", "5:2", expect=r'^--input: range "5:2": START is after END; write START:END '
                                                  r"with START <= END$"),
    "not a range": Bad("range", "abc", expect=r'^--input: range "abc" is not START:END; write'),
    "three numbers": Bad("range", "1:2:3", expect=r"^--input: range .* is not START:END"),
    "empty range text": Bad("range", "", expect=r"^--input: range \"\" is not START:END"),
    "negative start": Bad("range", "-1:5", expect=r"^--input: .*negative.*0 to 18446744073709551615"),
    "end past uint64": Bad("range", f"0:{UINT64_MAX + 1}", expect=r"^--input: .*END does not fit in 64 bits"),
    "max_span zero": Bad("range", "0:9", {"max_span": 0}, r"^--option max_span: must be a whole number from 1 .*"
                                                          r"got 0; write for example --option max_span=1000000"),
    "max_span text": Bad("range", "0:9", {"max_span": "lots"}, r"^--option max_span: .*got 'lots'"),
    "max_span bool": Bad("range", "0:9", {"max_span": True}, r"^--option max_span: .*got True"),
    "max_span fraction": Bad("range", "0:9", {"max_span": 2.5}, r"^--option max_span: .*got 2\.5"),
    "unknown option": Bad("range", "0:9", {"span": 3}, r"^--option span: the range work module has no such option; "
                                                       r"its options: max_span$"),
    "lines: missing file": Bad("lines", "{tmp}/nothere", expect=r'^--input: no file ".*nothere"; give the path'),
    "lines: no file given": Bad("lines", "", expect=r"^--input: no file given"),
    "lines: a folder": Bad("lines", "{tmp}", expect=r"^--input: .* is a folder; give the path of a file"),
    "lines: a fifo": Bad("lines", "{tmp}/fifo", expect=r"^--input: .* is not a regular file",
                         prepare=lambda tmp: os.mkfifo(tmp / "fifo")),
    "lines: max_lines negative": Bad("lines", "{tmp}/f", {"max_lines": -3}, r"^--option max_lines: .*got -3",
                                     prepare=lambda tmp: (tmp / "f").write_text("x\n")),
    "lines: chunk option": Bad("lines", "{tmp}/f", {"max_bytes": 3}, r"^--option max_bytes: the lines work module",
                               prepare=lambda tmp: (tmp / "f").write_text("x\n")),
    "chunks: missing file": Bad("chunks", "{tmp}/nothere", expect=r"^--input: no file"),
    "chunks: over the frame limit": Bad("chunks", "{tmp}/f", {"max_bytes": (64 << 20) + 1},
                                        r"^--option max_bytes: must be a whole number from 1 to 67108864",
                                        prepare=lambda tmp: (tmp / "f").write_text("x")),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_naming_the_field(name: str, tmp_path: Path) -> None:
    bad = BAD[name]
    if bad.prepare:
        bad.prepare(tmp_path)
    source = bad.input.replace("{tmp}", str(tmp_path))
    with pytest.raises(WorkModuleError) as caught:
        check_work_module(bad.module, source, bad.options)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(bad.expect, message), f"{message!r} does not match {bad.expect!r}"
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
    assert caught.value.field == message.split(":", 1)[0]


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    (tmp_path / "secret").write_text("x\n")
    (tmp_path / "secret").chmod(0)
    with pytest.raises(WorkModuleError, match=r"^--input: cannot read .*permission denied"):
        check_work_module("lines", str(tmp_path / "secret"), {})


@pytest.mark.parametrize("module", ["range", "lines", "chunks"])
def test_check_accepts_good_input(module: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x\n")
    check_work_module(module, "0:100" if module == "range" else str(tmp_path / "f"), {})


def test_a_file_module_closes_its_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a\nb\n")
    module = load_work_module("lines", str(tmp_path / "f"), {"max_lines": 1})
    assert module.next(1.0) == b"a\n"
    module.close()
    assert module.next(1.0) is None
    module.close()  # twice is fine
    exhausted = load_work_module("chunks", str(tmp_path / "f"), {})
    assert drain(exhausted, [1.0]) == [b"a\nb\n"]
    assert getattr(exhausted, "_file", "gone") is None, "an exhausted module closes its file by itself"


# -- a release's own work module ---------------------------------------------------------------

WORDS = b'''
from orchestrator.scheduler.workmodules import WorkModule


class Words(WorkModule):
    """The input's words, up to max_words per task, separated by single spaces."""

    name = "words"
    option_names = frozenset({"max_words"})

    def __init__(self, input, options, position=None):
        super().__init__(input, options, position)
        self.words = input.split()
        self.max_words = int(self.options.get("max_words", 4))
        self.min_size = 1 / self.max_words
        self.at = position["at"] if position else 0

    def next(self, size):
        if self.at >= len(self.words):
            return None
        count = max(1, round(size * self.max_words))
        taken = self.words[self.at:self.at + count]
        self.at += len(taken)
        return " ".join(taken).encode()

    def position(self):
        return {"at": self.at}

    def progress(self):
        return float(self.at), float(len(self.words))


class NotAModule:
    pass


class Incomplete(WorkModule):
    name = "incomplete"

    def next(self, size):
        return None


class Fussy(Words):
    def __init__(self, input, options, position=None):
        raise ValueError("fussy wants something else")


class Tiny(Words):
    def __init__(self, input, options, position=None):
        super().__init__(input, options, position)
        self.min_size = 0
'''

SOURCES: dict[str, bytes] = {
    "modules/words.py": WORDS,
    "modules/broken.py": b"def oops(:\n",
    "modules/raises.py": b"raise RuntimeError('cannot import here')\n",
    "modules/nul.py": b"x = 1\0\n",
}


def release_source(path: str) -> bytes:
    return SOURCES[path]


def test_a_release_module_cuts_and_resumes() -> None:
    name = "release:modules/words.py:Words"
    text = "the quick brown fox jumps over the lazy dog"
    check_work_module(name, text, {"max_words": 4}, release_source=release_source)
    with load_work_module(name, text, {"max_words": 4}, release_source=release_source) as module:
        assert module.next(0.5) == b"the quick"
        position = module.position()
        assert drain(module, [1.0]) == [b"brown fox jumps over", b"the lazy dog"]
    resumed = load_work_module(name, text, {"max_words": 4}, position, release_source=release_source)
    assert drain(resumed, [1.0]) == [b"brown fox jumps over", b"the lazy dog"]
    again = load_work_module(name, text, {}, release_source=release_source)
    assert type(again) is type(resumed), "the release file is executed once per content"


@pytest.mark.parametrize(("name", "source", "expect"), [
    ("release:words.py", True, r'^--module: "release:words\.py" is not release:PATH\.py:CLASS'),
    ("release:/etc/words.py:Words", True, r"is not release:PATH\.py:CLASS"),
    ("release:../words.py:Words", True, r"is not release:PATH\.py:CLASS"),
    ("release:modules/words.txt:Words", True, r"is not release:PATH\.py:CLASS"),
    ("release:modules/words.py:9Words", True, r"is not release:PATH\.py:CLASS"),
    ("release:modules/words.py:Words", False, r"no release is at hand"),
    ("release:modules/nothere.py:Words", True, r'^--module: the release has no file "modules/nothere\.py"'),
    ("release:modules/broken.py:X", True, r'^--module: "modules/broken\.py" of the release, line 1: .*syntax'),
    ("release:modules/nul.py:X", True, r"is not Python source"),
    ("release:modules/raises.py:X", True, r"importing .* failed: RuntimeError: cannot import here"),
    ("release:modules/words.py:Nothing", True, r'defines no "Nothing"'),
    ("release:modules/words.py:NotAModule", True, r"is not a subclass of .*WorkModule"),
    ("release:modules/words.py:WorkModule", True, r"does not implement next, position, progress"),
    ("release:modules/words.py:Incomplete", True, r"does not implement position, progress"),
    ("release:modules/words.py:Fussy", True, r"^--module: Fussy\('a b'\) failed: ValueError: fussy wants"),
    ("release:modules/words.py:Tiny", True, r"Tiny\.min_size is 0; it must be in \(0, 1\]"),
])
def test_a_bad_release_module_is_refused(name: str, source: bool, expect: str) -> None:
    with pytest.raises(WorkModuleError, match=expect) as caught:
        check_work_module(name, "a b", {}, release_source=release_source if source else None)
    assert "\n" not in str(caught.value)


def test_release_source_errors_of_its_own_pass_through() -> None:
    def refuses(path: str) -> bytes:
        raise InputError(f"release r@1 has no member {path}")

    with pytest.raises(InputError, match=r"has no member x\.py"):
        load_work_module("release:x.py:X", "", {}, release_source=refuses)


def test_modules_are_json_positions() -> None:
    positions: list[Mapping[str, Any]] = []
    with load_work_module("range", "0:5", {"max_span": 2}) as module:
        while module.next(1.0) is not None:
            positions.append(module.position())
    assert positions == [{"next": 2}, {"next": 4}, {"next": 5}]
    assert json.loads(json.dumps(positions)) == positions
