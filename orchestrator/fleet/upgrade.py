"""Upgrades in place: move a family to another version of its release, back again, and
the history of what it ran (hot code loading, as Erlang releases and Wombat do it).

A node keeps every release it was given side by side (``~/orch/releases/NAME-VERSION/``,
``current`` linked to the family's).  A spawn rolls a node whose config changed *in
place* (``spawn._Spawner._roll``), by the family's bootstrap strategy (``parallel``,
``rolling`` in batches of ``batch_size``, ``seed_first``): the same node gets the new
build beside the old one and ``current`` moves; its agent is left running when its code
and config did not change, so the ports it runs for a job on the old release finish
their tasks from the old folder, while the next job (whose release is pinned to
``name@version`` when it is submitted) LOADs the new one.  A roll that fails before the
node switches releases leaves the node ready on the old one.

``deploy(ws, store, FAMILY, VERSION)`` rewrites only the value of ``release:`` in the
family's file (to ``NAME@VERSION``: comments and layout stay) and runs the spawn, both
under the family's lock (one change of a family at a time).  A version that is neither
uploaded nor the version of the release's source under ``releases/`` is refused before
anything changes.  ``rollback(ws, store, FAMILY)`` does the same with the version
``previous_release`` names.

History: every spawn that leaves all of a family's ready nodes on one release records
it (``Store.record_family_release``: the store's kv, scope ``release-history``), whoever
started it: ``orch spawn`` after a hand edit of the file, a deploy, a rollback, health's
replacements, the autoscaler.  So *previous* is about what the nodes ran, not about
the file:

- when the family's file names the release its history ends with (the last roll went
  through), previous is the latest release before that one: a rollback after a
  rollback goes forward again, as ``cd -`` does;
- otherwise (a roll to what the file names failed half-way, or the file was edited and
  not spawned), previous is the release the history ends with: what every node ran last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import NodeFamily, WorkspaceConfig, load_workspace_config, parse_yaml, validate_document
from orchestrator.config.source import set_top_level_scalar
from orchestrator.errors import InputError, NotFoundError
from orchestrator.fleet.spawn import FleetEvents, SpawnReport, check_family_name, family_lock, spawn_locked
from orchestrator.state import DeployedRelease, Store
from orchestrator.workspace import Workspace


@dataclass
class UpgradeReport:
    """What ``deploy`` or ``rollback`` did: the file's change, then the spawn's report."""

    family: str
    release: str  # name@version the family's file names now
    was: str  # what it named before, as written (``primes``, ``primes@1.1.0``)
    file: str  # the family's file, relative to the workspace
    changed: bool  # whether the file changed
    spawn: SpawnReport


def history(store: Store, family_name: str) -> list[DeployedRelease]:
    """The releases ``family_name`` ran, oldest first: one entry per change."""
    return store.family_release_history(family_name)


def previous_release(ws: Workspace, store: Store, family_name: str) -> str:
    """The ``name@version`` a rollback of ``family_name`` moves to (see the module's
    docstring); InputError when there is none."""
    family, _path, cfg = _family(ws, store, family_name)
    return _previous(store, cfg, family)


def deploy(ws: Workspace, store: Store, family_name: str, version: str, *,
           events: FleetEvents | None = None) -> UpgradeReport:
    """Set the family's release to ``version`` (``VERSION`` or ``NAME@VERSION``) in its
    file and roll its nodes in place."""
    return _move(ws, store, family_name, lambda cfg, family: _known(store, cfg, family, version), "deploy", events)


def rollback(ws: Workspace, store: Store, family_name: str, *, events: FleetEvents | None = None) -> UpgradeReport:
    """Return the family to the release it ran before its last roll (``previous_release``)."""

    def choose(cfg: WorkspaceConfig, family: NodeFamily) -> str:
        ref = _previous(store, cfg, family)
        return _known(store, cfg, family, ref, rolling_back=True)

    return _move(ws, store, family_name, choose, "rollback", events)


# -- the change -------------------------------------------------------------------------


Choose = Callable[[WorkspaceConfig, NodeFamily], str]


def _move(ws: Workspace, store: Store, family_name: str, choose: Choose, cause: str,
          events: FleetEvents | None) -> UpgradeReport:
    note = (events or FleetEvents()).note
    family, path, cfg = _family(ws, store, family_name)
    _rewritten(ws, path, family, choose(cfg, family))  # bad input fails here, before the lock and any change
    with family_lock(ws, family_name, events):
        family, path, cfg = _family(ws, store, family_name)  # again: a change may have come first
        ref = choose(cfg, family)
        text, new = _rewritten(ws, path, family, ref)
        shown = ws.relative(path)
        if new != text:
            _replace_file(path, new)
            note(f"{shown}: release {family.release} -> {ref}")
        report = spawn_locked(ws, store, family_name, events=events, cause=cause)
    return UpgradeReport(family_name, ref, family.release, shown, new != text, report)


def _family(ws: Workspace, store: Store, family_name: str) -> tuple[NodeFamily, Path, WorkspaceConfig]:
    """The family, its file, and the workspace's config (refused when any file is invalid:
    the spawn would refuse it after the file had changed)."""
    check_family_name(family_name)
    paths = [p for p in (ws.families_dir / f"{family_name}.yaml", ws.families_dir / f"{family_name}.yml")
             if p.is_file()]
    cfg = load_workspace_config(ws, known_releases={r.name for r in store.list_releases()})
    family = cfg.families.get(family_name)
    if not paths or (family is None and not cfg.errors):
        raise NotFoundError(f"no node family {family_name!r}", hint="see `orch family list`")
    cfg.raise_first()
    assert family is not None
    return family, paths[0], cfg


def _known(store: Store, cfg: WorkspaceConfig, family: NodeFamily, version: str, *,
           rolling_back: bool = False) -> str:
    """``name@version`` of the family's release, when that version is uploaded or is the
    version of the release's source under ``releases/`` (spawn uploads it)."""
    name = family.release_name
    given, sep, number = version.rpartition("@")
    if not sep:
        number = version
    elif given != name:
        raise InputError(f"family {family.name} runs release {name}, not {given}",
                         hint=f"name a version of {name}; see `orch release list`")
    source = cfg.release_sources.get(name)
    versions = {r.version for r in store.list_releases() if r.name == name} | ({source.version} if source else set())
    if number not in versions:
        known = ", ".join(sorted(versions)) or "none"
        if rolling_back:
            message = f"family {family.name} ran {name}@{number} before, which is no longer uploaded (known: {known})"
        else:
            message = f"release {name} has no version {number!r} (known: {known})"
        raise NotFoundError(message, hint="see `orch release list`")
    return f"{name}@{number}"


def _configured(store: Store, cfg: WorkspaceConfig, family: NodeFamily) -> str | None:
    """``name@version`` of what the family's file names: its version, else the source's
    under ``releases/`` (spawn uploads it), else the latest uploaded."""
    if family.release_version is not None:
        return family.release
    source = cfg.release_sources.get(family.release_name)
    if source is not None:
        return f"{source.name}@{source.version}"
    try:
        return store.get_release(family.release_name).ref
    except NotFoundError:
        return None


def _previous(store: Store, cfg: WorkspaceConfig, family: NodeFamily) -> str:
    entries = history(store, family.name)
    if not entries:
        raise InputError(f"family {family.name} has no release history: nothing to roll back to",
                         hint=f"a spawn that brings it up records one; see `orch release history {family.name}`")
    last = entries[-1].release
    if _configured(store, cfg, family) != last:
        return last  # the roll to what the file names did not go through, or has not run
    for entry in reversed(entries[:-1]):
        if entry.release != last:
            return entry.release
    raise InputError(f"family {family.name} has run only {last}: nothing to roll back to",
                     hint=f"see `orch release history {family.name}`")


def _rewritten(ws: Workspace, path: Path, family: NodeFamily, ref: str) -> tuple[str, str]:
    """The family file's text, and that text with ``release:`` set to ``ref`` (checked:
    it must read back as the same family but for its release)."""
    shown = ws.relative(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{shown}: cannot read it: {exc}") from exc
    new = set_top_level_scalar(text, "release", ref, shown)
    changed = validate_document(NodeFamily, parse_yaml(new, shown), name_from=family.name)
    if changed.release != ref or changed.model_copy(update={"release": family.release}) != family:
        raise InputError(f"{shown}: setting release to {ref} would change more than the release",
                         hint=f"edit the file by hand: release: {ref}")
    return text, new


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` at once (a file beside it, renamed over it), keeping its mode."""
    target = path.resolve()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["UpgradeReport", "deploy", "history", "previous_release", "rollback"]
