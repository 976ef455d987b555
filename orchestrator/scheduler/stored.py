"""A job's work as the store keeps it, read back for a resume.

The store holds the scheduler's batches as blobs (task frames as sent, result frames
as accepted) and never reads them; decoding them is the scheduler's, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.agent.frames import decode_results, decode_tasks
from orchestrator.state import Store


@dataclass
class StoredWork:
    """A job's tasks and results in the store, by seq."""

    tasks: dict[int, tuple[float, bytes]] = field(default_factory=dict)
    results: dict[int, bytes] = field(default_factory=dict)
    attempts: dict[int, tuple[int, str]] = field(default_factory=dict)
    failed: dict[int, tuple[int, str]] = field(default_factory=dict)

    def pending(self) -> list[int]:
        """Seqs made but neither done nor given up."""
        return sorted(set(self.tasks) - set(self.results) - set(self.failed))


def stored_work(store: Store, job_id: str, *, from_seq: int = 0) -> StoredWork:
    """What a resume needs from ``from_seq`` on: the tasks made, their results (the
    first stored wins), the attempts of the ones that failed a try, the ones given up."""
    stored = store.stored_batches(job_id, from_seq=from_seq)
    work = StoredWork(attempts=stored.attempts, failed=stored.failed)
    for blob in stored.task_batches:
        for seq, _attempt, size, data in decode_tasks(blob):
            if seq >= from_seq:
                work.tasks[seq] = (size, data)
    for blob in stored.result_batches:
        results, _ = decode_results(blob)
        for result in results:
            if result.seq >= from_seq:
                work.results.setdefault(result.seq, result.payload)
    return work
