"""The whole desired configuration of a workspace, checked across files."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config.load import load_model, validate_document
from orchestrator.config.models import NAME_PATTERN, NodeFamily, ProviderConfig, ReleaseManifest, WorkspaceSettings
from orchestrator.config.source import load_yaml, parse_yaml
from orchestrator.errors import ConfigError, InputError, NotFoundError, ValidationFailed
from orchestrator.workspace import Workspace

RELEASE_MANIFEST = "release.yaml"


@dataclass
class WorkspaceConfig:
    """Providers, families and release sources of one workspace, by name."""

    settings: WorkspaceSettings
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    families: dict[str, NodeFamily] = field(default_factory=dict)
    release_sources: dict[str, ReleaseManifest] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)

    def raise_first(self) -> None:
        """Raise the problems found, if any: the one, or every one (ValidationFailed).
        (The name is older than the listing of every problem.)"""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ValidationFailed(self.errors)


def load_settings(ws: Workspace) -> WorkspaceSettings:
    return load_model(WorkspaceSettings, ws.settings_file, shown_as=ws.relative(ws.settings_file))


def _named_file(folder: Path, name: str, kind: str, listing: str) -> Path:
    """``folder/NAME.yaml`` for a name of the names' shape: never a path out of ``folder``."""
    if not re.fullmatch(NAME_PATTERN.strip("^$"), name):
        raise InputError(f"{name!r} is not a {kind} name (lower-case letters, digits, '-', '_')",
                         hint=f"see `{listing}`")
    return folder / f"{name}.yaml"


def load_provider(ws: Workspace, name: str) -> ProviderConfig:
    path = _named_file(ws.providers_dir, name, "provider", "orch provider list")
    if not path.is_file():
        raise NotFoundError(f"no provider {name!r}", hint=f"see `orch provider list`; expected {ws.relative(path)}")
    return load_model(ProviderConfig, path, shown_as=ws.relative(path), name_from_stem=True)


def provider_labels(ws: Workspace, names: Iterable[str]) -> dict[str, list[str]]:
    """The labels of providers ``names`` (for label selectors); a provider whose file is gone
    has none, so its nodes keep only their family's labels."""
    found = {}
    for name in sorted(set(names)):
        path = ws.providers_dir / f"{name}.yaml"
        if path.is_file():
            found[name] = list(load_provider(ws, name).labels)
    return found


def load_family(ws: Workspace, name: str) -> NodeFamily:
    path = _named_file(ws.families_dir, name, "node family", "orch family list")
    if not path.is_file():
        raise NotFoundError(f"no node family {name!r}", hint=f"see `orch family list`; expected {ws.relative(path)}")
    return load_model(NodeFamily, path, shown_as=ws.relative(path), name_from_stem=True)


def load_workspace_config(ws: Workspace, *, known_releases: Iterable[str] = ()) -> WorkspaceConfig:
    """Load every file, collecting errors instead of stopping at the first one.

    ``known_releases``: release names registered in the store, which families may
    use even without a source folder under ``releases/``.
    """
    errors: list[ConfigError] = []
    try:
        settings = load_settings(ws)
    except ConfigError as exc:
        errors.extend(_each(exc))
        settings = WorkspaceSettings()
    cfg = WorkspaceConfig(settings=settings, errors=errors)

    for path in _yaml_files(ws.providers_dir):
        try:
            provider = load_model(ProviderConfig, path, shown_as=ws.relative(path), name_from_stem=True)
            cfg.providers[provider.name] = provider
        except ConfigError as exc:
            errors.extend(_each(exc))

    for path in sorted(ws.releases_src_dir.glob(f"*/{RELEASE_MANIFEST}")):
        try:
            manifest = load_model(ReleaseManifest, path, shown_as=ws.relative(path))
            cfg.release_sources[manifest.name] = manifest
        except ConfigError as exc:
            errors.extend(_each(exc))

    family_lines: dict[str, Path] = {}
    for path in _yaml_files(ws.families_dir):
        try:
            family = load_model(NodeFamily, path, shown_as=ws.relative(path), name_from_stem=True)
            cfg.families[family.name] = family
            family_lines[family.name] = path
        except ConfigError as exc:
            errors.extend(_each(exc))

    releases = set(cfg.release_sources) | set(known_releases)
    for name, family in cfg.families.items():
        errors.extend(_check_family(ws, family, family_lines[name], cfg, releases))
    errors.extend(_check_cycles(ws, cfg, family_lines))
    return cfg


def _each(exc: ConfigError) -> list[ConfigError]:
    return list(exc.errors) if isinstance(exc, ValidationFailed) else [exc]


def _yaml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def _check_family(
    ws: Workspace, family: NodeFamily, path: Path, cfg: WorkspaceConfig, releases: set[str]
) -> list[ConfigError]:
    doc = load_yaml(path, ws.relative(path))
    problems: list[ConfigError] = []

    def report(loc: tuple[str | int, ...], message: str, hint: str) -> None:
        problems.append(
            ConfigError(message, file=doc.file, line=doc.lines.line_of(loc), field=".".join(map(str, loc)), hint=hint)
        )

    if family.release_name not in releases:
        report(("release",), f"unknown release {family.release_name!r}",
               f"add releases/{family.release_name}/release.yaml or upload it")
    for i, provider in enumerate(family.placement.providers):
        if provider not in cfg.providers:
            report(("placement", "providers", i), f"unknown provider {provider!r}", "see `orch provider list`")
    refs: list[tuple[tuple[str | int, ...], str]] = [
        (("bootstrap", "depends_on", i), name) for i, name in enumerate(family.bootstrap.depends_on)
    ]
    refs += [(("placement", "avoid", i), name) for i, name in enumerate(family.placement.avoid)]
    if family.placement.colocate_with:
        refs.append((("placement", "colocate_with"), family.placement.colocate_with))
    for loc, name in refs:
        if name == family.name:
            report(loc, "a family cannot refer to itself", "remove it")
        elif name not in cfg.families:
            report(loc, f"unknown node family {name!r}", "see `orch family list`")
    return problems


def _check_cycles(ws: Workspace, cfg: WorkspaceConfig, paths: dict[str, Path]) -> list[ConfigError]:
    """One error per dependency cycle among families' ``depends_on``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    problems: list[ConfigError] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in cfg.families[name].bootstrap.depends_on:
            if dep not in cfg.families or dep == name:
                continue
            if state.get(dep) == 1:
                cycle = " -> ".join([*trail[trail.index(dep):], dep]) if dep in trail else f"{name} -> {dep}"
                doc = load_yaml(paths[name], ws.relative(paths[name]))
                problems.append(ConfigError(
                    f"dependency cycle: {cycle}",
                    file=doc.file, line=doc.lines.line_of(("bootstrap", "depends_on")),
                    field="bootstrap.depends_on", hint="remove one of the dependencies",
                ))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(cfg.families):
        if name not in state:
            visit(name, [name])
    return problems


def validate_release_manifest_text(text: str, file: str) -> ReleaseManifest:
    """Validate a manifest's text (from a directory or from inside a tarball)."""
    return validate_document(ReleaseManifest, parse_yaml(text, file))


__all__ = [
    "RELEASE_MANIFEST",
    "WorkspaceConfig",
    "load_family",
    "load_provider",
    "load_settings",
    "load_workspace_config",
    "validate_release_manifest_text",
]
