"""Key-value entries in the store (a part of ``Store``, kept in its own file).

Scoped keys with JSON values and versions: the catalogue cache and cooldowns of
``provision``, ``GET|PUT|DELETE /kv`` of the API, ``Cloud.mutate_store``'s
optimistic transactions (``kv_read``, then ``kv_apply``), and each family's release
history (scope ``release-history``, key the family: ``fleet.upgrade``'s deploy and
rollback read it, every spawn that leaves a family wholly on a release appends to it).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from orchestrator.errors import StateError
from orchestrator.state.records import DeployedRelease

RELEASE_HISTORY_SCOPE = "release-history"
RELEASE_HISTORY_KEEP = 100
"""Entries kept per family (the oldest go first)."""


class KeyValueStore:
    """The key-value methods of ``Store``."""

    if TYPE_CHECKING:  # provided by Store
        def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]: ...
        def record_event(self, kind: str, *, reason: str = "", node: str | None = None, family: str | None = None,
                         job: str | None = None, provider: str | None = None,
                         data: dict[str, Any] | None = None) -> int: ...

    def kv_get(self, key: str, *, scope: str = "", default: Any = None) -> Any:
        rows = self._query("SELECT value FROM kv WHERE scope=? AND key=?", (scope, key))
        return json.loads(rows[0]["value"]) if rows else default

    def kv_put(self, key: str, value: Any, *, scope: str = "") -> int:
        """Store ``value`` (JSON-able); returns the key's new version."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO kv (scope, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(scope, key) DO UPDATE SET value=excluded.value, version=kv.version+1, "
                "updated_at=excluded.updated_at",
                (scope, key, json.dumps(value), time.time()),
            )
            row = conn.execute("SELECT version FROM kv WHERE scope=? AND key=?", (scope, key)).fetchone()
            return int(row[0])

    def kv_delete(self, key: str, *, scope: str = "") -> bool:
        with self.transaction() as conn:
            return conn.execute("DELETE FROM kv WHERE scope=? AND key=?", (scope, key)).rowcount > 0

    def kv_items(self, *, scope: str = "", prefix: str = "") -> dict[str, Any]:
        rows = self._query(
            "SELECT key, value FROM kv WHERE scope=? AND substr(key, 1, ?) = ? ORDER BY key",
            (scope, len(prefix), prefix),
        )
        return {r["key"]: json.loads(r["value"]) for r in rows}

    # Optimistic transactions over the kv table (``orchestrator.sdk.Cloud.mutate_store``):
    # read with ``kv_read``, then ``kv_apply`` checks in one write transaction that
    # nothing read has changed and writes everything, or writes nothing.

    def kv_read(self, key: str, *, scope: str = "") -> tuple[str, int] | None:
        """The key's stored JSON text and version, or None when absent."""
        rows = self._query("SELECT value, version FROM kv WHERE scope=? AND key=?", (scope, key))
        return (str(rows[0]["value"]), int(rows[0]["version"])) if rows else None

    def kv_apply(self, expected: Mapping[tuple[str, str], tuple[str, int] | None],
                 writes: Mapping[tuple[str, str], str]) -> bool:
        """Write ``writes`` ((scope, key) -> JSON text) if every (scope, key) in ``expected``
        still holds what ``kv_read`` returned then (text and version; None: absent), all
        in one ``BEGIN IMMEDIATE`` transaction.  False, and nothing written, otherwise.

        Comparing the text as well as the version makes a key deleted and made again
        (which starts again at version 1) count as changed only when its value differs.
        """
        now = time.time()
        try:
            with self.transaction() as conn:
                for (scope, key), seen in expected.items():
                    row = conn.execute("SELECT value, version FROM kv WHERE scope=? AND key=?", (scope, key)).fetchone()
                    current = (str(row[0]), int(row[1])) if row is not None else None
                    if current != seen:
                        return False
                conn.executemany(
                    "INSERT INTO kv (scope, key, value, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(scope, key) DO UPDATE SET value=excluded.value, version=kv.version+1, "
                    "updated_at=excluded.updated_at",
                    [(scope, key, text, now) for (scope, key), text in writes.items()],
                )
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state store write failed: {exc}", hint="retry") from exc
        return True

    def kv_clear(self, *, scope: str) -> int:
        """Delete every key of ``scope``; returns how many there were."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM kv WHERE scope=?", (scope,)).rowcount

    # A family's release history (``fleet.upgrade``): what it ran, one entry per change.

    def record_family_release(self, family: str, release: str, sha256: str, *, cause: str,
                              nodes: Sequence[str]) -> bool:
        """Append ``release`` (name@version, its sha256) to ``family``'s history, with the
        event ``family.deployed``, unless the history already ends with it; in one
        transaction.  True when appended."""
        with self.transaction():
            history = self.family_release_history(family)
            last = history[-1] if history else None
            if last is not None and (last.release, last.sha256) == (release, sha256):
                return False
            entry = DeployedRelease(release, sha256, time.time(), cause, sorted(nodes))
            kept = [*history, entry][-RELEASE_HISTORY_KEEP:]
            self.kv_put(family, [_entry_json(e) for e in kept], scope=RELEASE_HISTORY_SCOPE)
            was = f"; was {last.release}" if last is not None else ""
            self.record_event("family.deployed", family=family,
                              reason=f"{family} runs {release} on {len(entry.nodes)} node(s) ({cause}{was})",
                              data={**_entry_json(entry), "previous": last.release if last else None})
        return True

    def family_release_history(self, family: str) -> list[DeployedRelease]:
        """``family``'s release history, oldest first (empty when it has none)."""
        entries = self.kv_get(family, scope=RELEASE_HISTORY_SCOPE, default=[])
        return [DeployedRelease(str(e["release"]), str(e["sha256"]), float(e["at"]), str(e["cause"]),
                                [str(n) for n in e.get("nodes", [])]) for e in entries]


def _entry_json(entry: DeployedRelease) -> dict[str, Any]:
    return {"release": entry.release, "sha256": entry.sha256, "at": entry.at, "cause": entry.cause,
            "nodes": list(entry.nodes)}
