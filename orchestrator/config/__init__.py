"""Desired configuration: pydantic models of the workspace's YAML, loaded with lines (through
``safeyaml``, the one YAML reader: YAML 1.2 core schema, with limits)."""

from __future__ import annotations

from orchestrator.config import safeyaml
from orchestrator.config.drivers import OWN_DRIVERS, known_drivers
from orchestrator.config.load import load_model, validate_document
from orchestrator.config.models import (
    SCHEMAS,
    BootstrapConfig,
    Demands,
    NodeFamily,
    Placement,
    ProviderConfig,
    ReleaseManifest,
    Scaling,
    WorkFunction,
    WorkspaceSettings,
)
from orchestrator.config.source import LineMap, YamlDocument, load_yaml, parse_yaml
from orchestrator.config.workspace import (
    RELEASE_MANIFEST,
    WorkspaceConfig,
    load_family,
    load_provider,
    load_settings,
    load_workspace_config,
    provider_labels,
    validate_release_manifest_text,
)

__all__ = [
    "OWN_DRIVERS",
    "RELEASE_MANIFEST",
    "SCHEMAS",
    "BootstrapConfig",
    "Demands",
    "LineMap",
    "NodeFamily",
    "Placement",
    "ProviderConfig",
    "ReleaseManifest",
    "Scaling",
    "WorkFunction",
    "WorkspaceConfig",
    "WorkspaceSettings",
    "YamlDocument",
    "known_drivers",
    "load_family",
    "load_model",
    "load_provider",
    "provider_labels",
    "load_settings",
    "load_workspace_config",
    "load_yaml",
    "parse_yaml",
    "safeyaml",
    "validate_document",
    "validate_release_manifest_text",
]
