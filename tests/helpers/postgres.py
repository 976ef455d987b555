"""PostgreSQL for tests: a throwaway database per test on this machine's Debian cluster.

The fixtures are in tests/conftest.py, built on what is here:

``postgres_server`` (session): finds the cluster with ``pg_lsclusters``; if it is down,
starts it with ``pg_ctlcluster`` and stops it again at the end of the session (only a
cluster this session started).  It creates one login role with a random password for
the session and drops it at the end.  Administration goes through ``psql`` run as the
``postgres`` OS user (``runuser``, peer authentication), so it needs root; the tests
themselves connect like any client, over TCP to 127.0.0.1 with the password.

``postgres_url`` (function): a new database owned by that role, as a
``postgresql://USER:PASSWORD@127.0.0.1:PORT/DB`` URL; dropped afterwards
(``WITH (FORCE)``: connections a failed test left open do not keep it alive).

Skips, saying why, only when not root or when PostgreSQL is not installed
(``scripts/setup.sh`` installs and starts it when run as root).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import glob


@dataclass(frozen=True)
class PostgresServer:
    version: str
    cluster: str
    port: int
    role: str
    password: str

    def psql(self, *commands: str, database: str = "postgres") -> str:
        """Run SQL as the postgres superuser; each command in its own implicit transaction."""
        args = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-p", str(self.port), "-d", database]
        for command in commands:
            args += ["-c", command]
        done = subprocess.run(args, cwd="/", capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def url(self, database: str) -> str:
        return f"postgresql://{self.role}:{self.password}@127.0.0.1:{self.port}/{database}"


def clusters() -> list[tuple[str, str, int, str]]:
    """(version, name, port, status) of each cluster ``pg_lsclusters`` lists."""
    done = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30, check=True)
    found = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit():
            found.append((fields[0], fields[1], int(fields[2]), fields[3]))
    return found


def ctl(version: str, name: str, action: str) -> None:
    subprocess.run(["pg_ctlcluster", version, name, action], capture_output=True, text=True, timeout=120, check=True)


def unavailable() -> str | None:
    """Why the tests cannot have PostgreSQL here (to skip, saying so), or None."""
    if os.geteuid() != 0:
        return "PostgreSQL tests need root (they administer the cluster as the postgres OS user)"
    if not shutil.which("pg_lsclusters") or not glob("/usr/lib/postgresql/*/bin/postgres"):
        return "PostgreSQL is not installed (scripts/setup.sh installs it as root: apt-get install postgresql)"
    if not clusters():
        return "PostgreSQL is installed but has no cluster (create one: pg_createcluster --start VERSION main)"
    return None


@contextmanager
def cluster_with_role() -> Iterator[PostgresServer]:
    """The machine's cluster (started if it was down, and then stopped again afterwards)
    with a login role of our own for the block (dropped afterwards)."""
    version, name, port, status = sorted(clusters(), key=lambda c: not c[3].startswith("online"))[0]
    started = not status.startswith("online")
    if started:
        ctl(version, name, "start")
    role = f"orch_test_{os.getpid()}_{secrets.token_hex(3)}"
    server = PostgresServer(version, name, port, role, secrets.token_hex(16))
    try:
        server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{server.password}'")
        try:
            yield server
        finally:
            server.psql(f"DROP ROLE IF EXISTS {role}")
    finally:
        if started:
            ctl(version, name, "stop")



@contextmanager
def throwaway_database(server: PostgresServer) -> Iterator[str]:
    """A new database owned by the server's role, as a URL; dropped afterwards."""
    database = f"orch_test_{secrets.token_hex(6)}"
    server.psql(f"CREATE DATABASE {database} OWNER {server.role}")
    try:
        yield server.url(database)
    finally:
        server.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
