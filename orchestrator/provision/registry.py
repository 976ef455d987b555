"""Provider registration: YAML files under ``providers/``, their records in the store,
credentials resolved from references, and libcloud drivers made from them.

Secrets are read from ``env:VAR`` or ``file:PATH`` (0600) only when a driver is
built, and never returned in anything that is printed, logged or stored.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError, LibcloudError
from pydantic import ValidationError

from orchestrator.config import ProviderConfig, load_provider
from orchestrator.config.models import OWN_DRIVERS
from orchestrator.errors import (
    ConfigError,
    ConflictError,
    CredentialError,
    InputError,
    NotFoundError,
    OrchError,
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
    ProviderUnavailable,
)
from orchestrator.provision.drivers import CapacityError, QuotaError, driver_class
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


# -- errors at the libcloud boundary ---------------------------------------------------


# Cloud API error codes (EC2's, which other clouds' libcloud drivers echo) by meaning.
# libcloud puts the API's code first in its message ("Code: text"); we read that code,
# never the free text.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
})
QUOTA_CODES = frozenset({"InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"})
TRANSIENT_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError", "InternalFailure",
    "ServiceUnavailable", "Unavailable", "RequestTimeout",
})


# Codes that mean "this request will never work as sent": never retried, whatever the status.
FINAL_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch", "OptInRequired",
    "InvalidParameterValue", "InvalidParameterCombination", "MissingParameter", "InvalidAMIID.NotFound",
    "InvalidAMIID.Malformed", "InvalidKeyPair.NotFound", "InvalidKeyPair.Duplicate", "Unsupported",
})
_API_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z0-9]+)*")


def api_error_code(exc: BaseException) -> str | None:
    """The cloud API's error code that libcloud put at the front of its message.

    >>> api_error_code(Exception("InvalidKeyPair.Duplicate: The keypair 'k' already exists."))
    'InvalidKeyPair.Duplicate'
    >>> api_error_code(Exception("could not connect: refused")) is None
    True
    """
    text = str(getattr(exc, "message", None) or getattr(exc, "value", None) or exc)
    code, sep, _ = text.strip().partition(":")
    return code if sep and _API_CODE.fullmatch(code) else None


@contextmanager
def map_libcloud_errors(provider: str) -> Iterator[None]:
    """Translate libcloud and network errors from ``provider`` into ProviderErrors."""
    try:
        yield
    except QuotaError as exc:
        raise ProviderQuotaError(f"provider {provider!r} quota is used up: {_short(exc)}") from exc
    except CapacityError as exc:
        raise ProviderCapacityError(f"provider {provider!r} is out of capacity: {_short(exc)}") from exc
    except RateLimitReachedError as exc:
        raise ProviderTransientError(f"provider {provider!r} is throttling us: {_short(exc)}") from exc
    except InvalidCredsError as exc:
        raise ProviderAuthError(
            f"provider {provider!r} rejected the credentials: {_short(exc)}",
            hint="check the credential references in providers/" f"{provider}.yaml",
        ) from exc
    except (TimeoutError, ConnectionError, socket.gaierror, ssl.SSLError) as exc:
        raise ProviderUnavailable(f"provider {provider!r} cannot be reached: {_short(exc)}") from exc
    except BaseHTTPError as exc:
        raise _classified(provider, exc, _http_status(exc.code)) from exc
    except LibcloudError as exc:
        raise _classified(provider, exc, None) from exc
    except OrchError:
        raise
    except Exception as exc:  # a driver failing in its own way is still the provider's failure
        raise ProviderError(f"provider {provider!r}: the driver failed: {type(exc).__name__}: {_short(exc)}") from exc


def _http_status(code: Any) -> int | None:
    try:
        return int(code)
    except (TypeError, ValueError):
        return None


def _classified(provider: str, exc: BaseException, status: int | None) -> ProviderError:
    """An API error by its code (capacity, quota, throttling), else by its HTTP status:
    5xx and 429 are transient (retried), anything else (auth, validation) is final."""
    code = api_error_code(exc)
    text = _short(exc)
    if code in CAPACITY_CODES:
        return ProviderCapacityError(f"provider {provider!r} is out of capacity: {text}")
    if code in QUOTA_CODES:
        return ProviderQuotaError(f"provider {provider!r} quota is used up: {text}",
                                  hint=f"raise the quota, or lower max_nodes in providers/{provider}.yaml")
    if code in TRANSIENT_CODES:
        return ProviderTransientError(f"provider {provider!r} is throttling us or failed for now: {text}")
    if code not in FINAL_CODES and status is not None and (status >= 500 or status == 429):
        return ProviderTransientError(f"provider {provider!r} answered HTTP {status}: {text}")
    if status is not None:
        return ProviderError(f"provider {provider!r} answered HTTP {status}: {text}")
    return ProviderError(f"provider {provider!r}: {text}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "value", None) or exc).split())
    return text[:300] or type(exc).__name__


# -- credentials ------------------------------------------------------------------------


def resolve_credentials(ws: Workspace, config: ProviderConfig) -> dict[str, str]:
    """The secret values behind ``config.credentials``; never print the result."""
    return {key: _resolve(ws, config.name, key, ref) for key, ref in config.credentials.items()}


def _resolve(ws: Workspace, provider: str, key: str, ref: str) -> str:
    kind, _, target = ref.partition(":")
    where = f"providers/{provider}.yaml: credentials.{key}"
    if kind == "env":
        value = os.environ.get(target)
        if value is None:
            raise CredentialError(f"{where}: environment variable {target} is not set", hint=f"export {target}")
        return value
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = ws.root / path
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialError(f"{where}: file {path} does not exist", hint="create it with mode 0600") from None
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise CredentialError(f"{where}: {path} is not a regular file")
    if mode & 0o077:
        raise CredentialError(
            f"{where}: {path} is readable by others (mode {stat.S_IMODE(mode):04o})", hint=f"chmod 600 {path}"
        )
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read {path}: {exc.strerror}") from exc


# -- registration -----------------------------------------------------------------------


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
) -> ProviderConfig:
    """A validated registration from command-line values (errors name the option)."""
    data: dict[str, Any] = {"name": name, "driver": driver}
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
                  "max_nodes": "--max-nodes"}.get(str(err["loc"][0]), f"--{err['loc'][0]}".rstrip("s"))
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
    text += yaml.safe_dump({"driver": config.driver, **data}, sort_keys=False)
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


# -- drivers ----------------------------------------------------------------------------


def driver_root(ws: Workspace, config: ProviderConfig) -> Path:
    """Where one of our own drivers keeps its nodes' folders for this provider."""
    return ws.runtime_dir / "drivers" / config.driver / config.name


def make_driver(ws: Workspace, config: ProviderConfig) -> Any:
    """An instance of the provider's libcloud driver, credentials resolved."""
    secrets = resolve_credentials(ws, config)
    kwargs: dict[str, Any] = {**config.options, **secrets}
    if config.driver in OWN_DRIVERS:
        kwargs.setdefault("root", str(driver_root(ws, config)))
        if config.max_nodes is not None:
            kwargs.setdefault("max_nodes", config.max_nodes)
        if config.driver == "hosts":  # existing machines are cleaned over SSH with the fleet key
            kwargs.setdefault("key_file", str(ws.ssh_key))
    try:
        cls = driver_class(config.driver)
    except (AttributeError, ImportError) as exc:
        raise ProviderUnavailable(
            f"provider {config.name!r}: driver {config.driver!r} is not available: {exc}"
        ) from exc
    key = kwargs.pop("key", None)
    with map_libcloud_errors(config.name):
        try:
            return cls(key, **kwargs) if key is not None else cls(**kwargs)
        except (TypeError, ValueError) as exc:  # the driver refused its arguments
            raise InputError(
                f"providers/{config.name}.yaml: options do not fit driver {config.driver!r}: {exc}",
                hint="see the driver's documentation for its arguments",
            ) from exc


def check_provider(ws: Workspace, name: str) -> ProviderCheck:
    """Instantiate the driver and ask it for sizes and locations."""
    config = load_provider(ws, name)
    driver = make_driver(ws, config)
    with map_libcloud_errors(name):
        sizes = driver.list_sizes()
        locations = driver.list_locations()
    return ProviderCheck(
        provider=name,
        driver=config.driver,
        sizes=[_size_info(s, config) for s in sizes],
        locations=sorted(locations_by_key(locations)),
    )


_LOCATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def locations_by_key(locations: Sequence[Any]) -> dict[str, Any]:
    """A driver's NodeLocations by the key orch uses in resource paths, plans and globs.

    That is the location's id, unless the id is only its position in the list (EC2's
    ``list_locations`` numbers availability zones "0", "1", ...): then its name, such as
    ``us-east-1a``, when every location has a distinct one that fits in a path.
    """
    ids = [str(loc.id) for loc in locations]
    names = [str(getattr(loc, "name", "") or "") for loc in locations]
    positional = bool(ids) and all(i.isdigit() for i in ids)
    if positional and all(_LOCATION_NAME.fullmatch(n) for n in names) and len(set(names)) == len(names):
        return dict(zip(names, locations, strict=True))
    return dict(zip(ids, locations, strict=True))


def _size_info(size: Any, config: ProviderConfig) -> SizeInfo:
    extra = size.extra or {}
    cpus = extra.get("cpus") or extra.get("vcpu") or extra.get("vcpus") or getattr(size, "vcpus", None)
    price = config.prices.get(str(size.id), size.price)
    return SizeInfo(
        id=str(size.id),
        name=str(size.name),
        cpus=int(cpus) if cpus else None,
        ram_mb=int(size.ram or 0),
        disk_gb=int(size.disk or 0),
        price=float(price) if price is not None else None,
    )
