"""The state store: SQLite in WAL mode, the only writer of runtime state.

Every change is one transaction (``BEGIN IMMEDIATE``, so two ``orch`` processes
queue on the write lock instead of failing midway), and every change that matters
to an operator appends an event in the same transaction.

>>> with Store.open(Path(".orch/state.db")) as store:       # doctest: +SKIP
...     store.record_event("note", reason="hello")
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.errors import ConflictError, NotFoundError, StateError
from orchestrator.state.jobstore import JobStore
from orchestrator.state.kvstore import KeyValueStore
from orchestrator.state.migrations import MIGRATIONS
from orchestrator.state.records import (
    NODE_TRANSITIONS,
    ArtifactRecord,
    EventRecord,
    JobState,
    Migration,
    NodeRecord,
    NodeState,
    ProviderRecord,
    ReleaseRecord,
    row_to_artifact,
    row_to_event,
    row_to_node,
    row_to_provider,
    row_to_release,
)

BUSY_TIMEOUT_S = 30.0
_NODE_FIELDS = frozenset(
    {
        "location", "size", "image", "provider_node_id", "address", "port", "ssh_user",
        "host_key", "release", "config_hash", "hourly_price", "labels", "extra", "ready_at",
    }
)


class Store(JobStore, KeyValueStore):
    """A connection to one workspace's state database."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._depth = 0
        # One connection shared by a command's threads: a transaction holds the lock
        # from BEGIN to COMMIT so that threads never interleave inside one.
        self._lock = threading.RLock()

    # -- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, migrate: bool = True) -> Store:
        """Open (creating when missing) and bring the schema up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot open the state store {path}: {exc}") from exc
        store = cls(conn, path)
        if migrate:
            store.migrate()
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one."""
        with self._lock, self._transaction() as conn:
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StateError(f"the state store is busy or unusable ({exc})", hint="retry") from exc
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            self._depth = 0

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state store query failed: {exc}") from exc

    # -- migrations ---------------------------------------------------------------------

    def applied_migrations(self) -> set[int]:
        exists = self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'")
        if not exists:
            return set()
        return {row["version"] for row in self._query("SELECT version FROM schema_migrations")}

    def pending_migrations(self) -> list[Migration]:
        """Migrations not applied yet; reading this never writes."""
        applied = self.applied_migrations()
        return [m for m in MIGRATIONS if m.version not in applied]

    def migrate(self) -> list[Migration]:
        pending = self.pending_migrations()
        if not pending:
            return []
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            # Another process may have migrated while we waited for the lock.
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for migration in pending:
                if migration.version in done:
                    continue
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                if migration.version == 1:
                    conn.execute("INSERT INTO meta VALUES ('workspace_id', ?)", (uuid.uuid4().hex[:12],))
        return pending

    @property
    def workspace_id(self) -> str:
        rows = self._query("SELECT value FROM meta WHERE key='workspace_id'")
        return str(rows[0]["value"])

    # -- events -------------------------------------------------------------------------

    def record_event(
        self,
        kind: str,
        *,
        reason: str = "",
        node: str | None = None,
        family: str | None = None,
        job: str | None = None,
        provider: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> int:
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO events (at, kind, reason, node, family, job, provider, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), kind, reason, node, family, job, provider, json.dumps(data or {})),
            )
            return int(cur.lastrowid or 0)

    def events(
        self,
        *,
        after: int = 0,
        limit: int = 1000,
        node: str | None = None,
        job: str | None = None,
        kind: str | None = None,
    ) -> list[EventRecord]:
        where: list[str] = ["id > ?"]
        params: list[Any] = [after]
        for column, value in (("node", node), ("job", job), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._query(
            f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*params, limit)
        )
        return [row_to_event(r) for r in rows]

    # -- providers ------------------------------------------------------------------------

    def upsert_provider(self, name: str, driver: str, config: dict[str, Any]) -> ProviderRecord:
        now = time.time()
        with self.transaction() as conn:
            existed = conn.execute("SELECT 1 FROM providers WHERE name=?", (name,)).fetchone()
            conn.execute(
                "INSERT INTO providers VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "driver=excluded.driver, config=excluded.config, updated_at=excluded.updated_at",
                (name, driver, json.dumps(config, sort_keys=True), now, now),
            )
            self.record_event("provider.updated" if existed else "provider.registered", provider=name,
                              data={"driver": driver})
        return self.get_provider(name)

    def get_provider(self, name: str) -> ProviderRecord:
        rows = self._query("SELECT * FROM providers WHERE name=?", (name,))
        if not rows:
            raise NotFoundError(f"no provider {name!r} is registered", hint="see `orch provider list`")
        return row_to_provider(rows[0])

    def list_providers(self) -> list[ProviderRecord]:
        return [row_to_provider(r) for r in self._query("SELECT * FROM providers ORDER BY name")]

    def remove_provider(self, name: str) -> None:
        with self.transaction() as conn:
            live = self._live_nodes(conn, "provider = ?", (name,))
            if live:
                raise ConflictError(
                    f"provider {name!r} still has {len(live)} node(s): {', '.join(live[:5])}",
                    hint="stop them first with `orch stop`",
                )
            if conn.execute("DELETE FROM providers WHERE name=?", (name,)).rowcount == 0:
                raise NotFoundError(f"no provider {name!r} is registered", hint="see `orch provider list`")
            self.record_event("provider.removed", provider=name)

    # -- releases ---------------------------------------------------------------------------

    def add_release(self, name: str, version: str, sha256: str, size: int, manifest: dict[str, Any],
                    *, force: bool = False) -> tuple[ReleaseRecord, bool]:
        """Register name@version; returns (record, changed).

        The same content again changes nothing; other content under the same
        name@version is refused unless ``force``.
        """
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM releases WHERE name=? AND version=?", (name, version)).fetchone()
            if row is not None and row["sha256"] == sha256:
                return row_to_release(row), False
            if row is not None and not force:
                raise ConflictError(
                    f"release {name}@{version} is already registered with other content "
                    f"(sha256 {row['sha256'][:12]}, new {sha256[:12]})",
                    hint="bump the version in release.yaml, or pass --force to replace it",
                )
            conn.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name, version) DO UPDATE SET "
                "sha256=excluded.sha256, size=excluded.size, manifest=excluded.manifest, "
                "uploaded_at=excluded.uploaded_at",
                (name, version, sha256, size, json.dumps(manifest, sort_keys=True), time.time()),
            )
            # builds of other content are not builds of this release
            conn.execute("DELETE FROM artifacts WHERE name=? AND version=? AND source_sha256!=?",
                         (name, version, sha256))
            self.record_event("release.replaced" if row is not None else "release.uploaded",
                              data={"release": f"{name}@{version}", "sha256": sha256})
        return self.get_release(name, version), True

    def get_release(self, name: str, version: str | None = None) -> ReleaseRecord:
        """name@version, or the most recently uploaded version of ``name``."""
        if version is None:
            rows = self._query(
                "SELECT * FROM releases WHERE name=? ORDER BY uploaded_at DESC, rowid DESC LIMIT 1", (name,)
            )
        else:
            rows = self._query("SELECT * FROM releases WHERE name=? AND version=?", (name, version))
        if not rows:
            shown = f"{name}@{version}" if version else name
            raise NotFoundError(f"no release {shown} is uploaded", hint="see `orch release list`")
        return row_to_release(rows[0])

    def list_releases(self) -> list[ReleaseRecord]:
        rows = self._query("SELECT * FROM releases ORDER BY name, uploaded_at, rowid")
        return [row_to_release(r) for r in rows]

    def release_sha_in_use(self, sha256: str) -> bool:
        """Whether a release or an artifact is stored under ``sha256``."""
        return bool(self._query("SELECT 1 FROM releases WHERE sha256=? UNION ALL "
                                "SELECT 1 FROM artifacts WHERE sha256=? LIMIT 1", (sha256, sha256)))

    def add_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        """Record a build of name@version for its platform (replacing an earlier one);
        refused when the release's content is not what it was built from."""
        with self.transaction() as conn:
            release = self.get_release(artifact.name, artifact.version)
            if release.sha256 != artifact.source_sha256:
                raise ConflictError(
                    f"release {release.ref} changed while it was built (built {artifact.source_sha256[:12]}, "
                    f"now {release.sha256[:12]})", hint=f"build it again: orch release build {release.ref}")
            conn.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name, version, platform) DO UPDATE SET sha256=excluded.sha256, size=excluded.size, "
                "source_sha256=excluded.source_sha256, abi=excluded.abi, compiler=excluded.compiler, "
                "flags=excluded.flags, builder=excluded.builder, built_at=excluded.built_at",
                (artifact.name, artifact.version, artifact.platform, artifact.sha256, artifact.size,
                 artifact.source_sha256, artifact.abi, artifact.compiler, artifact.flags, artifact.builder,
                 artifact.built_at),
            )
            self.record_event("release.built", data={"release": artifact.ref, "platform": artifact.platform,
                                                     "sha256": artifact.sha256, "builder": artifact.builder})
        return self.get_artifact(artifact.name, artifact.version, artifact.platform)

    def get_artifact(self, name: str, version: str, platform: str) -> ArtifactRecord:
        rows = self._query("SELECT * FROM artifacts WHERE name=? AND version=? AND platform=?",
                           (name, version, platform))
        if not rows:
            raise NotFoundError(f"release {name}@{version} is not built for {platform}",
                                hint=f"orch release build {name}@{version} --platform {platform}")
        return row_to_artifact(rows[0])

    def list_artifacts(self, name: str | None = None, version: str | None = None) -> list[ArtifactRecord]:
        """Builds, by release and platform (of one release, or of one release's version)."""
        rows = self._query(
            "SELECT * FROM artifacts WHERE (? IS NULL OR name=?) AND (? IS NULL OR version=?) "
            "ORDER BY name, version, platform", (name, name, version, version))
        return [row_to_artifact(r) for r in rows]

    def remove_release(self, name: str, version: str) -> ReleaseRecord:
        with self.transaction() as conn:
            record = self.get_release(name, version)
            users = self._live_nodes(conn, "release = ?", (record.ref,))
            if users:
                raise ConflictError(
                    f"release {record.ref} is running on {len(users)} node(s): {', '.join(users[:5])}",
                    hint="stop those nodes, or roll the family to another release first",
                )
            jobs = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE release = ? AND state != ? ORDER BY created_at, id",
                (record.ref, JobState.DONE.value)).fetchall()]
            if jobs:  # their nodes may have moved on, but the jobs keep this release to their end
                raise ConflictError(
                    f"release {record.ref} is the release of {len(jobs)} unfinished job(s): {', '.join(jobs[:5])}",
                    hint="let them finish, or delete them (`orch job delete JOB`) first",
                )
            conn.execute("DELETE FROM releases WHERE name=? AND version=?", (name, version))
            self.record_event("release.removed", data={"release": record.ref})
        return record

    # -- nodes ------------------------------------------------------------------------------

    def add_node(self, node_id: str, *, family: str, provider: str, reason: str = "requested",
                 **fields: Any) -> NodeRecord:
        """Record the intent to create a node, before any provider call."""
        unknown = set(fields) - _NODE_FIELDS
        if unknown:
            raise TypeError(f"unknown node fields: {sorted(unknown)}")
        now = time.time()
        columns = ["id", "family", "provider", "state", "created_at", "updated_at", "reason"]
        values: list[Any] = [node_id, family, provider, NodeState.REQUESTED.value, now, now, reason]
        for key, value in fields.items():
            columns.append(key)
            values.append(json.dumps(value) if key in ("labels", "extra") else value)
        with self.transaction() as conn:
            try:
                conn.execute(
                    f"INSERT INTO nodes ({', '.join(columns)}) VALUES ({', '.join('?' * len(values))})", values
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"node {node_id!r} already exists") from exc
            self.record_event("node.requested", node=node_id, family=family, provider=provider, reason=reason)
        return self.get_node(node_id)

    def set_node_state(self, node_id: str, state: NodeState, *, reason: str = "", **fields: Any) -> NodeRecord:
        """Move a node to ``state`` (only along NODE_TRANSITIONS) and update fields."""
        unknown = set(fields) - _NODE_FIELDS
        if unknown:
            raise TypeError(f"unknown node fields: {sorted(unknown)}")
        with self.transaction() as conn:
            current = self.get_node(node_id)
            if state != current.state and state not in NODE_TRANSITIONS[current.state]:
                raise StateError(f"node {node_id}: cannot go from {current.state} to {state}")
            sets = ["state = ?", "updated_at = ?", "reason = ?"]
            values: list[Any] = [state.value, time.time(), reason]
            for key, value in fields.items():
                sets.append(f"{key} = ?")
                values.append(json.dumps(value) if key in ("labels", "extra") else value)
            conn.execute(f"UPDATE nodes SET {', '.join(sets)} WHERE id = ?", (*values, node_id))
            if state != current.state:
                self.record_event(f"node.{state.value}", node=node_id, family=current.family,
                                  provider=current.provider, reason=reason)
        return self.get_node(node_id)

    def get_node(self, node_id: str) -> NodeRecord:
        rows = self._query("SELECT * FROM nodes WHERE id=?", (node_id,))
        if not rows:
            raise NotFoundError(f"no node {node_id!r}", hint="see `orch nodes`")
        return row_to_node(rows[0])

    def list_nodes(self, *, family: str | None = None, provider: str | None = None,
                   states: Iterable[NodeState] | None = None) -> list[NodeRecord]:
        where, params = ["1=1"], []
        if family is not None:
            where.append("family = ?")
            params.append(family)
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if states is not None:
            wanted = [s.value for s in states]
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        rows = self._query(f"SELECT * FROM nodes WHERE {' AND '.join(where)} ORDER BY created_at, id", params)
        return [row_to_node(r) for r in rows]

    def _live_nodes(self, conn: sqlite3.Connection, condition: str, params: Sequence[Any]) -> list[str]:
        rows = conn.execute(
            f"SELECT id FROM nodes WHERE {condition} AND state != ? ORDER BY id",
            (*params, NodeState.STOPPED.value),
        ).fetchall()
        return [r[0] for r in rows]


def _statements(script: str) -> Iterator[str]:
    """Split a script into complete statements (triggers hold ';' inside BEGIN...END)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statement = buffer.strip()
            buffer = ""
            if statement:
                yield statement
    if buffer.strip():
        yield buffer.strip()


def _wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (once; it sticks).  Two processes opening a new
    database at once can find its lock taken in a way SQLite answers at once with
    "database is locked" rather than through the busy timeout: wait and try again."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class StorePool:
    """Open stores of one database lent to threads one at a time (``orch serve``'s
    requests): opening a store reads the schema and checks the migrations, a
    millisecond of CPU that a request would otherwise pay each time."""

    def __init__(self, path: Path, *, keep: int = 8) -> None:
        self.path = path
        self.keep = keep
        self._idle: list[Store] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def store(self) -> Iterator[Store]:
        """A store of this thread's own until the block ends."""
        with self._lock:
            lent = self._idle.pop() if self._idle else None
        if lent is None:
            lent = Store.open(self.path)
        try:
            yield lent
        finally:
            with self._lock:
                if not self._closed and len(self._idle) < self.keep and not lent._conn.in_transaction:
                    self._idle.append(lent)
                    lent = None
            if lent is not None:
                lent.close()

    def close(self) -> None:
        """Close the idle stores; stores still lent are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()
