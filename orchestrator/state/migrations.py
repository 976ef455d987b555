"""The schema, as an ordered registry of migrations.

Each migration runs in one transaction together with its row in ``schema_migrations``,
so a crash leaves either both or neither.  Append new migrations; never edit one that
has shipped.
"""

from __future__ import annotations

from orchestrator.state.records import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE providers (
            name          TEXT PRIMARY KEY,
            driver        TEXT NOT NULL,
            config        TEXT NOT NULL,          -- JSON, references only: no secrets
            registered_at REAL NOT NULL,
            updated_at    REAL NOT NULL
        );
        CREATE TABLE releases (
            name        TEXT NOT NULL,
            version     TEXT NOT NULL,
            sha256      TEXT NOT NULL,
            size        INTEGER NOT NULL,
            manifest    TEXT NOT NULL,            -- JSON of release.yaml
            uploaded_at REAL NOT NULL,
            PRIMARY KEY (name, version)
        );
        CREATE TABLE nodes (
            id               TEXT PRIMARY KEY,
            family           TEXT NOT NULL,
            provider         TEXT NOT NULL,
            state            TEXT NOT NULL,
            location         TEXT NOT NULL DEFAULT '',
            size             TEXT NOT NULL DEFAULT '',
            image            TEXT NOT NULL DEFAULT '',
            provider_node_id TEXT,
            address          TEXT,
            port             INTEGER,
            ssh_user         TEXT,
            host_key         TEXT,
            release          TEXT,               -- name@version
            config_hash      TEXT,
            hourly_price     REAL NOT NULL DEFAULT 0,
            labels           TEXT NOT NULL DEFAULT '[]',
            extra            TEXT NOT NULL DEFAULT '{}',
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL,
            ready_at         REAL,
            reason           TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX nodes_family ON nodes (family, state);
        CREATE INDEX nodes_provider ON nodes (provider, state);
        CREATE TABLE events (
            id       INTEGER PRIMARY KEY AUTOINCREMENT,
            at       REAL NOT NULL,
            kind     TEXT NOT NULL,
            reason   TEXT NOT NULL DEFAULT '',
            node     TEXT,
            family   TEXT,
            job      TEXT,
            provider TEXT,
            data     TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX events_node ON events (node);
        CREATE INDEX events_job ON events (job);
        -- append-only: the log is history, not state
        CREATE TRIGGER events_no_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
        CREATE TRIGGER events_no_delete BEFORE DELETE ON events
            WHEN OLD.job IS NULL
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
        CREATE TABLE jobs (
            id         TEXT PRIMARY KEY,
            release    TEXT NOT NULL,
            function   TEXT NOT NULL,
            state      TEXT NOT NULL,
            spec       TEXT NOT NULL,             -- JSON: input, work module, sink, targets
            reason     TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE tasks (
            job      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq      INTEGER NOT NULL,
            state    TEXT NOT NULL,
            size     REAL NOT NULL,
            data     BLOB NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            node     TEXT,
            result   BLOB,
            error    TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (job, seq)
        );
        CREATE INDEX tasks_state ON tasks (job, state);
        CREATE TABLE kv (
            scope      TEXT NOT NULL DEFAULT '',
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,             -- JSON
            version    INTEGER NOT NULL DEFAULT 1,
            updated_at REAL NOT NULL,
            PRIMARY KEY (scope, key)
        );
        """,
    ),
    Migration(
        2,
        "job progress",
        """
        -- JSON: the work module's position, tasks generated, the sink's checkpoint and
        -- the counters (done, failed, retried, discarded); changed with the tasks it counts
        ALTER TABLE jobs ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
        CREATE INDEX jobs_state ON jobs (state, created_at);
        """,
    ),
    Migration(
        3,
        "tasks and results stored in batches",
        """
        -- One row per batch, not per task: a dispatch round's new tasks as the task frames
        -- sent to ports, one RESULTS message's accepted results as result frames (see
        -- worker_native/PROTOCOL.md). A few rows per thousand tasks keep the store off
        -- the scheduler's hot path.
        DROP TABLE tasks;
        CREATE TABLE task_batches (
            job       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            first_seq INTEGER NOT NULL,
            last_seq  INTEGER NOT NULL,
            frames    BLOB NOT NULL,
            PRIMARY KEY (job, first_seq)
        ) WITHOUT ROWID;
        CREATE TABLE result_batches (
            job     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            id      INTEGER NOT NULL,
            max_seq INTEGER NOT NULL,
            node    TEXT,
            frames  BLOB NOT NULL,
            PRIMARY KEY (job, id)
        ) WITHOUT ROWID;
        -- Tries that ended without a result (rare): the attempts so far and the last
        -- reason; failed = 1 once the task is given up (kept for `orch job status`).
        CREATE TABLE task_attempts (
            job      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq      INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            error    TEXT NOT NULL,
            failed   INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job, seq)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        4,
        "built artifacts of releases, one per platform",
        """
        -- A release is built once per platform (architecture and C library, e.g.
        -- linux-x86_64-glibc2.36); nodes get the artifact of theirs, never the source.
        -- An artifact belongs to the source it was built from: replacing the release's
        -- content drops its artifacts.
        CREATE TABLE artifacts (
            name          TEXT NOT NULL,
            version       TEXT NOT NULL,
            platform      TEXT NOT NULL,
            sha256        TEXT NOT NULL,
            size          INTEGER NOT NULL,
            source_sha256 TEXT NOT NULL,
            abi           INTEGER NOT NULL,
            compiler      TEXT NOT NULL,
            flags         TEXT NOT NULL,
            builder       TEXT NOT NULL,          -- "local", or the node it was built on
            built_at      REAL NOT NULL,
            PRIMARY KEY (name, version, platform),
            FOREIGN KEY (name, version) REFERENCES releases (name, version) ON DELETE CASCADE
        );
        """,
    ),
)
