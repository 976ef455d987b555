"""The provider registry: YAML files under ``providers/``, their records in the store,
and the libcloud drivers made from them (credentials resolved, declared options given).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config import ProviderConfig, load_provider, safeyaml
from orchestrator.errors import ConfigError, ConflictError, InputError, NotFoundError, ProviderUnavailable
from orchestrator.provision.catalogue import locations_by_key, sizes_by_key
from orchestrator.provision.cloud_errors import map_libcloud_errors
from orchestrator.provision.credentials import resolve_credentials
from orchestrator.provision.drivers import driver_class, features_of
from orchestrator.state import Store
from orchestrator.workspace import Workspace


@dataclass(frozen=True)
class SizeInfo:
    id: str
    name: str
    cpus: int | None
    ram_mb: int
    disk_gb: int
    price: float | None


@dataclass(frozen=True)
class ProviderCheck:
    """What ``orch provider check`` found: the driver works and offers these."""

    provider: str
    driver: str
    sizes: list[SizeInfo]
    locations: list[str]


def provider_path(ws: Workspace, name: str) -> Path:
    return ws.providers_dir / f"{name}.yaml"


def build_provider_config(
    name: str,
    *,
    driver: str,
    options: Mapping[str, Any] | None = None,
    credentials: Mapping[str, str] | None = None,
    labels: Sequence[str] = (),
    priority: int | None = None,
    max_nodes: int | None = None,
    image: str | None = None,
    ssh_user: str | None = None,
    prices: Mapping[str, str] | None = None,
    bootstrap: bool | None = None,
) -> ProviderConfig:
    """A validated registration from command-line values (errors name the option)."""
    data: dict[str, Any] = {"name": name, "driver": driver}
    for key, value in (("image", image), ("ssh_user", ssh_user), ("bootstrap", bootstrap)):
        if value is not None:
            data[key] = value
    if prices:
        data["prices"] = dict(prices)
    if options:
        data["options"] = dict(options)
    if credentials:
        data["credentials"] = dict(credentials)
    if labels:
        data["labels"] = list(labels)
    if priority is not None:
        data["priority"] = priority
    if max_nodes is not None:
        data["max_nodes"] = max_nodes
    try:
        return ProviderConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        option = {"name": "NAME", "driver": "--driver", "labels": "--label", "priority": "--priority",
                  "max_nodes": "--max-nodes", "image": "--image", "ssh_user": "--ssh-user", "prices": "--price",
                  "bootstrap": "--no-bootstrap"}.get(str(err["loc"][0]), f"--{err['loc'][0]}".rstrip("s"))
        raise ConfigError(str(err["msg"]).removeprefix("Value error, "), field=f"{option} ({field})") from None


def add_provider(ws: Workspace, store: Store, config: ProviderConfig, *, replace: bool = False) -> Path:
    """Write ``providers/NAME.yaml`` and register it in the store."""
    path = provider_path(ws, config.name)
    if path.exists() and not replace:
        raise ConflictError(f"provider {config.name!r} already exists ({ws.relative(path)})",
                            hint="pass --replace to overwrite it, or choose another name")
    data = config.model_dump(mode="json", exclude_defaults=True)
    data.pop("name", None)
    text = f"# Provider {config.name}: registered with `orch provider add`.\n"
    text += safeyaml.dump({"driver": config.driver, **data})  # reads back as written, in YAML 1.1 and 1.2
    tmp = path.with_suffix(".yaml.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)
    register_provider(store, config)
    return path


def register_provider(store: Store, config: ProviderConfig) -> None:
    """Record the registration (references only: the config holds no secrets)."""
    store.upsert_provider(config.name, config.driver, config.model_dump(mode="json"))


def remove_provider(ws: Workspace, store: Store, name: str) -> None:
    path = provider_path(ws, name)
    registered = {p.name for p in store.list_providers()}
    if not path.exists() and name not in registered:
        raise NotFoundError(f"no provider {name!r}", hint="see `orch provider list`")
    if name in registered:
        store.remove_provider(name)  # refuses while nodes live there
    path.unlink(missing_ok=True)


def sync_registrations(store: Store, configs: Mapping[str, ProviderConfig]) -> None:
    """Bring the store's records in line with the YAML files (YAML is desired config)."""
    for name, config in configs.items():
        try:
            current = store.get_provider(name)
        except NotFoundError:
            current = None
        if current is None or current.config != config.model_dump(mode="json"):
            register_provider(store, config)


def driver_root(ws: Workspace, config: ProviderConfig) -> Path:
    """Where one of our own drivers keeps its nodes' folders for this provider."""
    return ws.runtime_dir / "drivers" / config.driver / config.name


def make_driver(ws: Workspace, config: ProviderConfig) -> Any:
    """An instance of the provider's libcloud driver, credentials resolved, and the
    arguments its declared features ask for (``root``, ``max_nodes``, ``key_file``)."""
    try:
        cls = driver_class(config.driver)
    except (AttributeError, ImportError) as exc:
        raise ProviderUnavailable(
            f"provider {config.name!r}: driver {config.driver!r} is not available: {exc}"
        ) from exc
    features = features_of(cls)
    missing = sorted(features.required_options - set(config.options))
    if missing:  # (Azure: the resource group and network its VMs go in)
        raise ConfigError(f"driver {config.driver!r} needs the option {missing[0]}",
                          file=f"providers/{config.name}.yaml", field="options",
                          hint=f"add `{missing[0]}: ...` under options")
    secrets = resolve_credentials(ws, config)
    kwargs: dict[str, Any] = {k: v for k, v in config.options.items() if k not in features.create_options}
    kwargs.update(secrets)
    for option, value in features.driver_options.items():  # (OpenStack: its 2.x driver)
        kwargs.setdefault(option, value)
    if features.node_folders:
        kwargs.setdefault("root", str(driver_root(ws, config)))
        if config.max_nodes is not None:
            kwargs.setdefault("max_nodes", config.max_nodes)
    if features.fleet_key_file:  # it reaches machines itself (the hosts driver cleans them) with the fleet key
        kwargs.setdefault("key_file", str(ws.ssh_key))
    if features.token_cache:  # its access token cached in the workspace (0600), not in ~ for every workspace
        tokens = ws.runtime_dir / "tokens"
        tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
        kwargs.setdefault(features.token_cache, str(tokens / f"{config.name}.json"))
    key = kwargs.pop("key", None)
    with map_libcloud_errors(config.name, features.errors):
        try:
            if key is not None and _key_is_not_first(cls):  # Azure: (tenant_id, subscription_id, key, secret)
                return cls(key=key, **kwargs)
            return cls(key, **kwargs) if key is not None else cls(**kwargs)
        except (TypeError, ValueError) as exc:  # the driver refused its arguments
            raise InputError(
                f"providers/{config.name}.yaml: options do not fit driver {config.driver!r}: {exc}",
                hint="see the driver's documentation for its arguments",
            ) from exc


def _key_is_not_first(cls: type) -> bool:
    """Whether the driver's constructor names ``key`` after another positional
    parameter, so that the credential ``key`` must go by name."""
    try:
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    names = [p.name for p in params]
    return "key" in names and names[0] != "key"


def check_provider(ws: Workspace, name: str) -> ProviderCheck:
    """Instantiate the driver and ask it for sizes and locations."""
    config = load_provider(ws, name)
    driver = make_driver(ws, config)
    with map_libcloud_errors(name, features_of(driver_class(config.driver)).errors):
        sizes = driver.list_sizes()
        locations = driver.list_locations()
    return ProviderCheck(
        provider=name,
        driver=config.driver,
        sizes=[_size_info(s, config, key) for key, s in sizes_by_key(sizes).items()],
        locations=sorted(locations_by_key(locations)),
    )


def _size_info(size: Any, config: ProviderConfig, key: str) -> SizeInfo:
    extra = size.extra or {}
    cpus = extra.get("cpus") or extra.get("vcpu") or extra.get("vcpus") or extra.get("guestCpus") or \
        extra.get("numberOfCores") or getattr(size, "vcpus", None)  # (Azure: numberOfCores)
    price = config.prices.get(key, size.price)
    return SizeInfo(
        id=key,
        name=str(size.name),
        cpus=int(cpus) if cpus else None,
        ram_mb=int(size.ram or 0),
        disk_gb=int(size.disk or 0),
        price=float(price) if price is not None else None,
    )
