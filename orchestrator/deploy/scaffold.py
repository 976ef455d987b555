"""A new C release to start from (``orch release new NAME``).

``new_release(parent, name)`` writes ``parent/NAME/``, a release that builds, uploads and
runs as it is::

    release.yaml    name, version 0.1.0, build [make], library build/libNAME.so, one function
    Makefile        builds build/libNAME.so against orch_work.h in $(ORCH_INCLUDE): set by
                    orch's builds, else asked of `orch release include-dir`, so `make` works
    NAME.c          sum_range: task data "START END" -> the sum of the integers in
                    [START, END), in decimal, then "\\n" (one line a task)
    README.md       how to build, upload and run it

The files are written into a hidden folder beside the target and renamed into place, so
the release appears whole or not at all; an existing ``parent/NAME`` (a folder or
anything else) is refused and left as it is.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.models import NAME_PATTERN
from orchestrator.errors import ConflictError, ReleaseError

VERSION = "0.1.0"
FUNCTION = "sum_range"


@dataclass(frozen=True)
class NewRelease:
    folder: Path
    files: list[str]  # relative to folder, in the order written


def new_release(parent: Path, name: str) -> NewRelease:
    """Write a working C release ``name`` into ``parent/name`` (``parent`` is made if missing)."""
    if not re.match(NAME_PATTERN, name):
        raise ReleaseError(f"{name!r} is not a release name",
                           hint="lower-case letters, digits, '-' and '_', starting with a letter, at most 63")
    folder = parent / name
    if folder.exists() or folder.is_symlink():
        raise ConflictError(f"{folder} exists already: nothing was written",
                            hint="choose another name, or another parent with --dir")
    files = render(name)
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.new-"))
    try:
        for relative, text in files.items():
            (scratch / relative).write_text(text)
        scratch.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        if folder.exists() or folder.is_symlink():  # made while we wrote
            raise ConflictError(f"{folder} exists already: nothing was written",
                                hint="choose another name, or another parent with --dir")
        os.rename(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return NewRelease(folder, list(files))


def render(name: str) -> dict[str, str]:
    """The new release's files: path -> text."""
    return {
        "release.yaml": _MANIFEST.format(name=name, version=VERSION, function=FUNCTION),
        "Makefile": _MAKEFILE.format(name=name),
        f"{name}.c": _SOURCE.replace("@NAME@", name).replace("@FUNCTION@", FUNCTION),
        "README.md": _README.format(name=name, version=VERSION, function=FUNCTION),
    }


_MANIFEST = """\
# {name}: a C release made by `orch release new` (see README.md).
name: {name}
version: {version}
description: Sum ranges of integers; a starting point for work functions of your own.
build:
  - make
library: build/lib{name}.so
functions:
  - name: {function}
    work_module: range
    description: the sum of the integers in [START, END), in decimal
"""

# Recipes start with a tab; {name} is the only placeholder (make's own braces are doubled).
_MAKEFILE = """\
# Builds the work library named in release.yaml against orch_work.h, the work-function
# ABI header. orch sets ORCH_INCLUDE to the header's folder when it builds the release;
# a plain `make` asks `orch release include-dir` (or: make ORCH_INCLUDE=/path/to/include).
ORCH_INCLUDE ?= $(shell orch release include-dir 2>/dev/null)
ifeq ($(strip $(ORCH_INCLUDE)),)
ifneq ($(MAKECMDGOALS),clean)
$(error cannot find orch_work.h: put orch on PATH, or run make ORCH_INCLUDE=/path/to/include)
endif
endif
CC ?= cc
CFLAGS ?= -O2
CFLAGS += -fPIC -Wall -Wextra -Werror -std=c11 -I$(ORCH_INCLUDE)
LDFLAGS += -shared

build/lib{name}.so: {name}.c $(ORCH_INCLUDE)/orch_work.h
\tmkdir -p build
\t$(CC) $(CFLAGS) $(LDFLAGS) -o $@ {name}.c

.PHONY: clean
clean:
\trm -rf build
"""

_SOURCE = """\
/*
 * @NAME@: a work function over ranges of integers, made by `orch release new`.
 *
 * Task data (the `range` work module): ASCII "START END", two decimal integers
 * separated by spaces, the half-open range [START, END) with START <= END.
 *
 *   @FUNCTION@   writes the sum of the integers in the range, in decimal, then "\\n".
 *                A job's output is one such line per task, in order; their sum is the
 *                sum over the job's whole input.
 *
 * The contract (orch_work.h): read the task, hand the output over with orch_write(),
 * return ORCH_WORK_OK; or call orch_fail() with a one-line reason and return
 * ORCH_WORK_FAILED. Keep no state between calls: a task may run more than once.
 */
#include <inttypes.h>
#include <stdio.h>

#include "orch_work.h"

ORCH_WORK_DEFINE_ABI_VERSION;

int @FUNCTION@(const orch_task *task, orch_output *out)
{
    uint64_t start, end, sum = 0;
    char text[128];

    if (orch_parse_range(task, &start, &end, text, sizeof text) != 0) { /* orch_work.h */
        orch_fail(out, text);
        return ORCH_WORK_FAILED;
    }
    for (uint64_t n = start; n < end; n++) {
        if (sum > UINT64_MAX - n) {
            orch_fail(out, "the sum does not fit in 64 bits: cut the input into smaller tasks");
            return ORCH_WORK_FAILED;
        }
        sum += n;
    }
    int len = snprintf(text, sizeof text, "%" PRIu64 "\\n", sum);
    if (orch_write(out, text, (size_t)len) != 0) {
        orch_fail(out, "the runtime refused the output");
        return ORCH_WORK_FAILED;
    }
    return ORCH_WORK_OK;
}
"""

_README = """\
# {name}

A C release made by `orch release new`: one work function, `{function}`, that gets a
range "START END" (the `range` work module cuts a job's `--input START:END` into such
tasks) and writes the sum of the integers in [START, END), one line per task.

- `release.yaml`: the release: name, version ({version}), how it builds, its library and functions.
- `{name}.c`: the work function, written against `orch_work.h` (the ABI; its comment
  says the whole contract). Add functions here and list them in `release.yaml`.
- `Makefile`: builds `build/lib{name}.so`.

Build it here to try it (`orch release upload` builds it too). The Makefile finds
`orch_work.h` by asking `orch release include-dir`, so orch must be on PATH; else pass
the folder that command prints:

```sh
make                                # or: make ORCH_INCLUDE=/path/to/include
```

Upload it to the workspace (this builds it for this machine's platform; nodes get the
build and need no compiler), describe a family that runs it, and run a job:

```sh
orch release upload releases/{name}        # or wherever this folder is
cat > node_families/{name}.yaml <<'EOF'
release: {name}
count: 2
placement:
  providers: [local]
EOF
orch spawn {name}
orch job run {name}:{function} --input 0:100000    # prints the job id, runs the job here
orch job result JOB | awk '{{ s += $1 }} END {{ printf "%.0f\\n", s }}'   # 4999950000
orch stop {name}
```

After a change, raise `version` in `release.yaml` and run `orch spawn {name}` again: a
release under the workspace's `releases/` is uploaded by spawn when it changed, and the
nodes roll over to the new version.
"""
