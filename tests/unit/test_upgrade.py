"""The pieces of upgrades in place that need no node: rewriting a family's release line,
the release history in the store, what "previous" means, pinning a job's release, nodes
that serve while they are rolled, and a release kept while a job uses it.  The rolls
themselves run on real nodes in tests/integration/test_upgrade.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.config.source import set_top_level_scalar
from orchestrator.deploy.releases import remove_release, upload_release
from orchestrator.errors import ConfigError, ConflictError, InputError
from orchestrator.scheduler import jobs
from orchestrator.state import JobState, NodeState, Store
from orchestrator.workspace import Workspace


@pytest.fixture
def store(ws: Workspace) -> Iterator[Store]:
    """The workspace's store with primes 1.1.0 and 1.2.0 uploaded (the source says 1.2.0)."""
    source = ws.releases_src_dir / "primes"
    with Store.open(ws.state_db) as opened:
        upload_release(ws, opened, source)
        manifest = source / "release.yaml"
        manifest.write_text(manifest.read_text().replace("version: 1.1.0", "version: 1.2.0"))
        upload_release(ws, opened, source)
        yield opened


def family(ws: Workspace, release: str, name: str = "workers") -> None:
    (ws.families_dir / f"{name}.yaml").write_text(f"# mine\nrelease: {release}  # kept\ncount: 2\n")


def ready_node(store: Store, node_id: str, release: str, family: str = "workers") -> None:
    store.add_node(node_id, family=family, provider="local", release=release)
    for state in (NodeState.CREATING, NodeState.BOOTING, NodeState.BOOTSTRAPPING):
        store.set_node_state(node_id, state)
    store.set_node_state(node_id, NodeState.READY, ready_at=time.time())


# -- the release line ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("# c\nrelease: primes   # pinned\ncount: 4\n", "# c\nrelease: primes@1.2.0   # pinned\ncount: 4\n"),
    ('release: "primes@1.1.0"\n', 'release: "primes@1.2.0"\n'),
    ("release: 'primes'\n", "release: 'primes@1.2.0'\n"),
    ("count: 4\nrelease:    primes\nbootstrap: {release: x}\n",
     "count: 4\nrelease:    primes@1.2.0\nbootstrap: {release: x}\n"),
    ("{count: 4, release: primes}", "{count: 4, release: primes@1.2.0}"),
])
def test_only_the_release_value_changes(text: str, expected: str) -> None:
    assert set_top_level_scalar(text, "release", "primes@1.2.0", "w.yaml") == expected


@pytest.mark.parametrize(("text", "message"), [
    ("count: 4\n", "no top-level 'release'"),
    ("release: [a]\n", "not a plain string"),
    ("release: |\n  primes\n", "not a plain string"),
    ("- release: primes\n", "expected a mapping"),
    ("release: [\n", "YAML syntax error"),
])
def test_a_release_line_that_cannot_be_rewritten_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        set_top_level_scalar(text, "release", "primes@1.2.0", "w.yaml")


# -- history and "previous" ------------------------------------------------------------------


def test_history_appends_changes_only_and_says_so_in_an_event(store: Store) -> None:
    assert store.record_family_release("workers", "primes@1.1.0", "a" * 64, cause="spawn", nodes=["w2", "w1"])
    assert not store.record_family_release("workers", "primes@1.1.0", "a" * 64, cause="spawn", nodes=["w1"])
    assert store.record_family_release("workers", "primes@1.2.0", "b" * 64, cause="deploy", nodes=["w1", "w2"])
    entries = fleet.history(store, "workers")
    assert [(e.release, e.cause, e.nodes) for e in entries] == [
        ("primes@1.1.0", "spawn", ["w1", "w2"]), ("primes@1.2.0", "deploy", ["w1", "w2"])]
    assert fleet.history(store, "others") == []
    events = store.events(kind="family.deployed")
    assert [e.reason for e in events][-1] == "workers runs primes@1.2.0 on 2 node(s) (deploy; was primes@1.1.0)"


@pytest.mark.parametrize(("ran", "file", "previous"), [
    (["1.1.0", "1.2.0"], "primes@1.2.0", "primes@1.1.0"),      # the last roll went through
    (["1.1.0", "1.2.0", "1.1.0"], "primes@1.1.0", "primes@1.2.0"),  # after a rollback: forward again
    (["1.1.0", "1.2.0"], "primes@1.1.0", "primes@1.2.0"),      # edited by hand, not spawned: what the nodes run
    (["1.1.0"], "primes", "primes@1.1.0"),                      # `primes` is the source's 1.2.0: its roll failed
])
def test_previous_is_what_the_nodes_ran(ws: Workspace, store: Store, ran: list[str], file: str, previous: str) -> None:
    family(ws, file)
    for version in ran:
        store.record_family_release("workers", f"primes@{version}", version * 8, cause="spawn", nodes=["w1"])
    assert fleet.previous_release(ws, store, "workers") == previous


def test_no_history_or_only_one_release_is_nothing_to_roll_back_to(ws: Workspace, store: Store) -> None:
    family(ws, "primes@1.1.0")
    with pytest.raises(InputError, match="family workers has no release history"):
        fleet.previous_release(ws, store, "workers")
    store.record_family_release("workers", "primes@1.1.0", "a" * 64, cause="spawn", nodes=["w1"])
    with pytest.raises(InputError, match=r"family workers has run only primes@1\.1\.0"):
        fleet.rollback(ws, store, "workers")


def test_deploy_refuses_unknown_versions_and_families_before_changing_anything(ws: Workspace, store: Store) -> None:
    family(ws, "primes@1.1.0")
    path = ws.families_dir / "workers.yaml"
    text = path.read_text()
    with pytest.raises(InputError, match=r"release primes has no version '2\.0' \(known: 1\.1\.0, 1\.2\.0\)"):
        fleet.deploy(ws, store, "workers", "2.0")
    with pytest.raises(InputError, match="no node family 'absent'"):
        fleet.deploy(ws, store, "absent", "1.2.0")
    assert path.read_text() == text
    assert not (ws.runtime_dir / "locks").exists(), "refused before the family's lock"


# -- jobs and nodes during a roll -------------------------------------------------------------


def test_a_bare_release_name_is_pinned_to_the_version_the_nodes_run(ws: Workspace, store: Store) -> None:
    ready_node(store, "w1", "primes@1.1.0")
    ready_node(store, "w2", "primes@1.1.0")
    job = jobs.submit(ws, store, "primes:count_primes", input="0:100", family="workers")
    assert job.release == "primes@1.1.0"  # not 1.2.0, uploaded last: the family was rolled back to 1.1.0
    assert store.get_job(job.id).spec["release"] == "primes@1.1.0"
    assert jobs.submit(ws, store, "primes@1.2.0:count_primes", input="0:100").release == "primes@1.2.0"
    store.set_node_state("w2", NodeState.BOOTSTRAPPING, release="primes@1.2.0")  # rolled: both run
    store.set_node_state("w2", NodeState.READY, ready_at=time.time())
    assert jobs.submit(ws, store, "primes:count_primes", input="0:100").release == "primes@1.2.0"  # the latest


def test_a_node_rolled_in_place_goes_on_serving_jobs(store: Store) -> None:
    ready_node(store, "w1", "primes@1.1.0")
    rolling = store.set_node_state("w1", NodeState.BOOTSTRAPPING, release="primes@1.2.0")
    assert rolling.serving
    store.add_node("w2", family="workers", provider="local")
    for state in (NodeState.CREATING, NodeState.BOOTING, NodeState.BOOTSTRAPPING):
        first = store.set_node_state("w2", state)
    assert not first.serving, "a node bootstrapped for the first time serves once ready"
    spec = jobs.JobSpec(release="primes@1.1.0", function="count_primes", symbol="count_primes", work_module="range",
                        input="0:1", family="workers", sink="file:out")
    assert [n.id for n in jobs._job_nodes(store, spec)] == ["w1"]


def test_a_release_stays_while_an_unfinished_job_names_it(ws: Workspace, store: Store) -> None:
    job = jobs.submit(ws, store, "primes@1.1.0:count_primes", input="0:100")
    unfinished = rf"release primes@1\.1\.0 is the release of 1 unfinished job\(s\): {job.id}"
    with pytest.raises(ConflictError, match=unfinished):
        remove_release(ws, store, "primes@1.1.0")
    store.set_job_state(job.id, JobState.RUNNING)
    store.set_job_state(job.id, JobState.DONE)
    assert remove_release(ws, store, "primes@1.1.0").ref == "primes@1.1.0"


def test_the_family_file_keeps_its_mode(tmp_path: Path) -> None:
    from orchestrator.fleet.upgrade import _replace_file

    path = tmp_path / "w.yaml"
    path.write_text("release: primes\n")
    path.chmod(0o640)
    _replace_file(path, "release: primes@1.2.0\n")
    assert path.read_text() == "release: primes@1.2.0\n" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["w.yaml"]
