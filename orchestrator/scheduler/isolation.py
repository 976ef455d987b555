"""Poison isolation: a task that fails every attempt is cut in halves that run again,
recursively, down to a floor, so a job loses only the smallest failing pieces.

A task of seq S that used its last attempt (and whose work module can cut tasks:
``range``, ``lines``, ``chunks``) becomes a *split*: its items [0, units) in *leaves*,
first two halves; each leaf runs as a *piece*, a task of its own with a seq from
``PIECE_BASE`` up (its *wire* seq: S stays the output's place, which the pieces never
take) and attempts of its own.  A piece that fails all of them is cut in halves again
while it holds more than ``isolate_floor`` items; at the floor it is *failed*, named in
input terms (``WorkModule.locate``: numbers, lines from 1, byte offsets).  Once every
leaf of S is ok or failed, S's record is written in its place: the ok pieces' outputs
in input order (``ok``), or, when no piece was ok, a failed record.  So output order and
exactly-once hold as before: one record per seq, in seq order.

Bounds, so that a work that fails on everything does not run a task's every item alone:
at most ``MAX_FAILED_RUNS`` pieces of one task may fail all their attempts (then its
failing pieces are failed as they are), and after ``HOPELESS_TASKS`` tasks of which no
piece was ok, the job stops isolating (event ``job.isolation_stopped``).  With
``--on-task-failure fail`` nothing is isolated: the first failed task fails the job.

The store keeps each split as a key-value entry (scope ``isolation:JOB``, key the seq
as 20 digits; ``save``), written when it is made and whenever a piece fails an attempt
or is cut, and once more when it settles; a piece's result is stored as a result batch
whose ``max_seq`` is S, so it goes when S is written.  A resume (``restore``) rebuilds
the splits of the seqs not yet written from them.  ``failed_pieces`` is what `orch job
status` shows, and it outlives the job's run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from orchestrator.scheduler.sinks import Record
from orchestrator.scheduler.workmodules import WorkModule
from orchestrator.state import Store

PIECE_BASE = 1 << 63
"""Pieces' wire seqs start here (a work function sees it as ``task->seq``); tasks' seqs never get there."""
MAX_FAILED_RUNS = 64
"""Pieces of one task that may fail all their attempts; past it, failing pieces are failed as they are."""
HOPELESS_TASKS = 3
"""Split tasks of which no piece was ok, after which the job stops isolating."""

PENDING, OK, FAILED = "pending", "ok", "failed"


def scope(job_id: str) -> str:
    """The store's key-value scope of a job's splits."""
    return f"isolation:{job_id}"


def describe(where: Mapping[str, Any]) -> str:
    """``numbers 123457`` or ``lines 12-13``: a piece's place in the input, as text."""
    first, last = where.get("first"), where.get("last")
    span = f"{first}" if first == last else f"{first}-{last}"
    return f"{where.get('unit', 'items')} {span}"


@dataclass(eq=False)
class Leaf:
    """Items [lo, hi) of a split task, run as the piece ``wire``."""

    lo: int
    hi: int
    wire: int
    state: str = PENDING
    attempts: int = 0
    error: str = ""
    where: dict[str, Any] | None = None
    payload: bytes = b""  # an ok piece's output (in memory; the store has it as a result)

    def to_json(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "wire": self.wire, "state": self.state, "attempts": self.attempts,
                "error": self.error, "where": self.where}


@dataclass(eq=False)
class Split:
    """A task cut in pieces: its seq, its data and where it starts, its leaves in input order."""

    seq: int
    size: float
    data: bytes
    origin: int | None
    units: int
    leaves: list[Leaf] = field(default_factory=list)
    failed_runs: int = 0  # pieces (and the task itself) that failed all their attempts

    def settled(self) -> bool:
        return all(leaf.state != PENDING for leaf in self.leaves)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "size": self.size, "origin": self.origin, "units": self.units,
                "failed_runs": self.failed_runs, "leaves": [leaf.to_json() for leaf in self.leaves]}


class Piece(NamedTuple):
    """A piece to run: what the engine makes a task of (``Task.make``)."""

    wire: int
    size: float
    data: bytes
    attempts: int
    avoid: str | None = None


class Isolation:
    """A running job's splits (``JobRun.isolation``): the engine moves the tasks, this keeps
    the books, by seq (a task's) and wire seq (a piece's)."""

    def __init__(self, module: WorkModule, *, floor: int) -> None:
        self.module = module
        self.floor = floor
        self.splits: dict[int, Split] = {}
        self.pieces: dict[int, tuple[Split, Leaf]] = {}  # wire -> its split and leaf, while pending
        self.next_wire = PIECE_BASE
        self.hopeless = 0
        self.stopped = ""  # why the job no longer isolates

    def origins(self, datas: Iterable[bytes], origin: int) -> list[int]:
        """Where each of a dispatch round's new tasks starts, the first at ``origin`` (file modules)."""
        units = self.module.units
        found = []
        for data in datas:
            found.append(origin)
            origin += units(data)
        return found

    # -- the engine's calls -----------------------------------------------------------------------

    def piece_of(self, wire: int) -> tuple[Split, Leaf] | None:
        return self.pieces.get(wire) if wire >= PIECE_BASE else None

    def label(self, seq: int) -> str:
        """A task as reports name it: its seq, or a piece's task and its place in the input."""
        found = self.piece_of(seq)
        if found is None:
            return str(seq)
        return f"{found[0].seq} (its piece {self.place(seq)})"

    def place(self, wire: int) -> str:
        """A pending piece's place in the input: ``numbers 5000-9999``."""
        split, leaf = self.pieces[wire]
        return describe(self._where(split, leaf))

    def split_task(self, seq: int, size: float, data: bytes, origin: int | None, avoid: str | None
                   ) -> tuple[Split, list[Piece]] | None:
        """Cut a task that used its last attempt in halves: its split and the pieces, in
        input order; None when it is not cut (at the floor, or isolation stopped)."""
        if self.stopped:
            return None
        units = self.module.units(data)
        if units <= self.floor:
            return None
        split = Split(seq, size, data, origin, units, failed_runs=1)
        self.splits[seq] = split
        return split, self._halve(split, 0, 0, units, avoid)

    def split_piece(self, wire: int, avoid: str | None) -> tuple[Split, list[Piece]] | None:
        """The same for a piece; None at the floor, over the task's budget, or stopped."""
        split, leaf = self.pieces[wire]
        if self.stopped or leaf.hi - leaf.lo <= self.floor or split.failed_runs >= MAX_FAILED_RUNS:
            return None
        split.failed_runs += 1
        del self.pieces[wire]
        return split, self._halve(split, split.leaves.index(leaf), leaf.lo, leaf.hi, avoid)

    def piece_ok(self, wire: int, payload: bytes) -> tuple[Split, bool]:
        """A piece's output arrived (first completion): its split, and whether that settled it."""
        split, leaf = self.pieces.pop(wire)
        leaf.state, leaf.payload = OK, bytes(payload)
        return split, split.settled()

    def piece_attempt(self, wire: int, attempts: int, error: str) -> Split:
        """A piece failed an attempt that was not its last."""
        split, leaf = self.pieces[wire]
        leaf.attempts, leaf.error = attempts, error
        return split

    def piece_failed(self, wire: int, attempts: int, error: str) -> tuple[Split, Leaf]:
        """A piece failed its last attempt and is not cut again: it is failed."""
        split, leaf = self.pieces.pop(wire)
        split.failed_runs += 1
        leaf.state, leaf.attempts, leaf.error = FAILED, attempts, error
        leaf.where = self._where(split, leaf)
        return split, leaf

    def whole_failed(self, seq: int, size: float, data: bytes, origin: int | None, attempts: int,
                     error: str) -> Split:
        """A task failed its last attempt and was not cut (at the floor, or isolation
        stopped): kept as a split of one failed leaf, so that it is named like a piece."""
        units = self.module.units(data)
        split = Split(seq, size, data, origin, units, failed_runs=1)
        leaf = Leaf(0, units, 0, FAILED, attempts, error)
        leaf.where = self._where(split, leaf)
        split.leaves.append(leaf)
        return split

    def settle(self, split: Split) -> tuple[Record, str]:
        """The settled split's record (its ok pieces' output in input order; failed when
        none was ok) and, for a failed record, its message."""
        self.splits.pop(split.seq, None)
        ok = [leaf for leaf in split.leaves if leaf.state == OK]
        if ok:
            return Record(split.seq, True, b"".join(leaf.payload for leaf in ok)), ""
        failed = [leaf for leaf in split.leaves if leaf.state == FAILED]
        self.hopeless += 1
        if self.hopeless >= HOPELESS_TASKS and not self.stopped:
            self.stopped = (f"{self.hopeless} split tasks had no piece that succeeded: the work fails on "
                            "(almost) everything, so failing tasks are no longer cut in pieces")
        shown = ", ".join(describe(leaf.where or {}) for leaf in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        message = f"every piece failed ({len(failed)}: {shown}{more}); last: {failed[-1].error}"
        return Record(split.seq, False, message.encode()), message

    # -- internals --------------------------------------------------------------------------------

    def _halve(self, split: Split, at: int, low: int, high: int, avoid: str | None) -> list[Piece]:
        middle = (low + high) // 2
        halves = [Leaf(low, middle, self._wire()), Leaf(middle, high, self._wire())]
        split.leaves[at:at + (1 if split.leaves else 0)] = halves
        return [self._piece(split, leaf, avoid) for leaf in halves]

    def _wire(self) -> int:
        wire, self.next_wire = self.next_wire, self.next_wire + 1
        return wire

    def _piece(self, split: Split, leaf: Leaf, avoid: str | None = None) -> Piece:
        self.pieces[leaf.wire] = (split, leaf)
        size = min(1.0, max(split.size * (leaf.hi - leaf.lo) / split.units, 1e-300))
        return Piece(leaf.wire, size, self.module.cut(split.data, leaf.lo, leaf.hi), leaf.attempts, avoid)

    def _where(self, split: Split, leaf: Leaf) -> dict[str, Any]:
        return self.module.locate(split.data, split.origin, leaf.lo, leaf.hi)

    # -- a resume ---------------------------------------------------------------------------------

    def restore(self, stored: Mapping[str, Any], data: bytes, results: Mapping[int, bytes]
                ) -> tuple[Split, list[Piece]]:
        """A split as ``save`` stored it, of a task whose ``data`` the store still holds;
        leaves whose piece's result is in ``results`` are ok.  The split and the pieces to run."""
        split = Split(int(stored["seq"]), float(stored["size"]), data, stored.get("origin"), int(stored["units"]),
                      failed_runs=int(stored.get("failed_runs", 1)))
        for item in stored["leaves"]:
            leaf = Leaf(int(item["lo"]), int(item["hi"]), int(item["wire"]), str(item["state"]),
                        int(item.get("attempts", 0)), str(item.get("error", "")), item.get("where"))
            if leaf.state != FAILED and leaf.wire in results:
                leaf.state, leaf.payload = OK, bytes(results[leaf.wire])
            elif leaf.state == OK:
                leaf.state = PENDING  # its result is not in the store: it runs again
            split.leaves.append(leaf)
            self.next_wire = max(self.next_wire, leaf.wire + 1)
        self.splits[split.seq] = split
        return split, [self._piece(split, leaf) for leaf in split.leaves if leaf.state == PENDING]


def origins(module: WorkModule, tasks: Mapping[int, tuple[float, bytes]], generated: int) -> dict[int, int]:
    """Where each stored task starts in the input (file modules), counted back from the
    module's position (the next task's origin) over the tasks stored before it; empty when
    the module's data says it, or the stored tasks do not reach back without a gap."""
    origin = module.origin()
    found: dict[int, int] = {}
    if origin is None or not tasks:
        return found
    for seq in range(generated - 1, min(tasks) - 1, -1):
        if seq not in tasks:
            return {}
        origin -= module.units(tasks[seq][1])
        found[seq] = origin
    return found


def save(store: Store, job_id: str, split: Split) -> None:
    store.kv_put(f"{split.seq:020d}", split.to_json(), scope=scope(job_id))


def load(store: Store, job_id: str) -> dict[int, dict[str, Any]]:
    """The stored splits of a job, by seq."""
    return {int(key): value for key, value in store.kv_items(scope=scope(job_id)).items()}


def failed_pieces(store: Store, job_id: str) -> list[dict[str, Any]]:
    """Every failed piece of the job, in input order: ``task`` (its seq), ``unit``,
    ``first``, ``last`` (both included), ``items``, ``attempts``, ``error``, ``text``."""
    pieces = []
    for seq, stored in sorted(load(store, job_id).items()):
        for leaf in stored.get("leaves", []):
            if leaf.get("state") != FAILED:
                continue
            where = leaf.get("where") or {}
            pieces.append({"task": seq, "unit": where.get("unit"), "first": where.get("first"),
                           "last": where.get("last"), "items": leaf["hi"] - leaf["lo"],
                           "attempts": leaf.get("attempts", 0), "error": leaf.get("error", ""),
                           "text": describe(where)})
    return pieces
