"""Pydantic models of the workspace's YAML files, in DESIGN.md's vocabulary.

Every model forbids unknown keys.  Validation that needs more than one file (does the
family's release exist? is ``depends_on`` acyclic?) lives in ``config.workspace``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from orchestrator.config.drivers import known_drivers

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"  # providers, families, releases
FAMILY_NAME_MAX = 56
"""A family's name at most: its node ids (``NAME-`` and 6 hex digits) fit GCE's 63."""
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""Lower-case names of providers, families and releases: they become paths and tags."""

Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}(=[A-Za-z0-9_.:/-]{0,63})?$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]
ReleaseRef = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}(@[0-9A-Za-z][0-9A-Za-z.+_-]{0,63})?$")]
Command = Annotated[str, StringConstraints(min_length=1)]

CREDENTIAL_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")


def _credential_reference(value: str) -> str:
    if not CREDENTIAL_REF.match(value):
        # Never echo the value: it may be the secret itself.
        raise ValueError(
            "a literal value; literal secrets are refused: write env:VAR or file:PATH (a 0600 file)"
        )
    return value


CredentialRef = Annotated[str, AfterValidator(_credential_reference)]


def _not_a_secret_key(key: str) -> str:
    if SECRET_KEY.search(key):
        raise ValueError(f"option {key!r} looks like a secret; move it to credentials as {key}: env:VAR or file:PATH")
    return key


OptionKey = Annotated[str, AfterValidator(_not_a_secret_key)]
# Option keys that name a secret: their values belong in `credentials` as references.
SECRET_KEY = re.compile(r"(secret|passw|token|api_?key|access_?key|private_?key|credential)", re.I)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# -- providers -------------------------------------------------------------------


class ProviderConfig(StrictModel):
    """A provider registration: ``providers/NAME.yaml``.

    Credentials are references only: ``env:VAR`` or ``file:PATH`` (the file 0600).
    ``priority``: lower is preferred by the ``ordered`` placement policy.
    """

    name: Name
    driver: str = Field(description="libcloud driver name, or one of ours: local, netns, hosts")
    options: dict[OptionKey, Any] = Field(default_factory=dict, description="driver options (not secrets)")
    credentials: dict[str, CredentialRef] = Field(
        default_factory=dict, description="driver arguments taken from env:VAR or file:PATH"
    )
    labels: list[Label] = Field(default_factory=list)
    priority: int = Field(default=100, ge=0, le=10_000)
    max_nodes: int | None = Field(default=None, ge=0, description="quota: nodes at most")
    prices: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="hourly price per size id, overriding the driver's"
    )
    image: str | None = Field(default=None, description="image id or name to boot")
    bootstrap: bool = Field(default=True, description="bootstrap nodes over SSH after boot")
    ssh_user: Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = Field(
        default="root", description="the login user on the cloud's image (ubuntu, debian, azureuser...)")

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        drivers = known_drivers()
        if value not in drivers:
            sample = ", ".join(drivers[:12])
            raise ValueError(f"unknown driver {value!r}; use one of {sample}, ... (see `orch provider drivers`)")
        return value


# -- node families ---------------------------------------------------------------


class Demands(StrictModel):
    """What each node of a family needs; matched against provider capabilities."""

    cpus: int = Field(default=1, ge=1, le=1024)
    ram_mb: int = Field(default=0, ge=0)
    disk_gb: int = Field(default=0, ge=0)
    arch: str | None = None
    labels: list[Label] = Field(default_factory=list, description="required provider labels")
    prefer_labels: list[Label] = Field(default_factory=list)
    locations: list[str] = Field(default_factory=list, description="location names or globs")
    max_price: float | None = Field(default=None, ge=0, description="hourly price ceiling per node")


class Placement(StrictModel):
    policy: Literal["ordered", "cheapest", "spread", "pack"] = "ordered"
    providers: list[Name] = Field(default_factory=list, description="preference order; empty: all")
    colocate_with: Name | None = None
    avoid: list[Name] = Field(default_factory=list, description="families to keep away from")


class BootstrapConfig(StrictModel):
    strategy: Literal["parallel", "rolling", "seed_first"] = "parallel"
    concurrency: int = Field(default=16, ge=1, le=1024)
    batch_size: int = Field(default=2, ge=1, description="rolling: nodes per batch")
    depends_on: list[Name] = Field(default_factory=list)
    retries: int = Field(default=2, ge=0, le=100, description="replacements per failed node")
    timeout_seconds: float = Field(default=600, gt=0)
    pre: list[Command] = Field(default_factory=list, description="commands before the release")
    post: list[Command] = Field(default_factory=list, description="commands after setup")


class Scaling(StrictModel):
    min: int = Field(ge=0)
    max: int = Field(ge=1)
    queued_tasks_per_node: float = Field(default=8, gt=0, description="scale up above this")
    idle_seconds: float = Field(default=300, gt=0, description="scale down nodes idle this long")
    cooldown_seconds: float = Field(default=60, ge=0)
    replace_lost: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class NodeFamily(StrictModel):
    """A node family: ``node_families/NAME.yaml``."""

    name: Name
    release: ReleaseRef = Field(description="release name, or name@version")
    count: int = Field(ge=0, le=100_000)
    workers_per_node: int | None = Field(default=None, ge=1, description="ports per node; default cpus")
    labels: list[Label] = Field(default_factory=list, description="labels given to the nodes")
    demands: Demands = Field(default_factory=Demands)
    placement: Placement = Field(default_factory=Placement)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    scaling: Scaling | None = None

    @field_validator("name")
    @classmethod
    def _cloud_name(cls, value: str) -> str:
        """A node is named ``FAMILY-xxxxxx``, and every cloud takes that as the instance's
        name and a label's value: GCE's rules (``[a-z]([-a-z0-9]*[a-z0-9])?``, 63 characters
        at most) are the narrowest, so they hold for every family."""
        if "_" in value or len(value) > FAMILY_NAME_MAX:
            raise ValueError(f"family name {value!r} must have no '_' and at most {FAMILY_NAME_MAX} characters "
                             "(its nodes' names, NAME-xxxxxx, are cloud instance names and label values); "
                             "rename the file")
        return value

    @property
    def release_name(self) -> str:
        return self.release.split("@", 1)[0]

    @property
    def release_version(self) -> str | None:
        return self.release.split("@", 1)[1] if "@" in self.release else None


# -- releases --------------------------------------------------------------------


def _relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not value:
        raise ValueError("must be a relative path inside the release, without '..'")
    return value


RelativePath = Annotated[str, Field(min_length=1)]


class WorkFunction(StrictModel):
    name: Identifier
    symbol: Identifier | None = Field(default=None, description="C symbol; default: name")
    work_module: str = Field(default="range", description="cuts the input into tasks")
    timeout_seconds: float = Field(default=60, gt=0, description="per task")
    description: str = ""

    @property
    def c_symbol(self) -> str:
        return self.symbol or self.name


class ReleaseManifest(StrictModel):
    """A release's ``release.yaml``."""

    name: Name
    version: Version
    description: str = ""
    build: list[Command] = Field(default_factory=lambda: ["make"],
                                 description="commands that build the library, in the release folder, "
                                             "with ORCH_INCLUDE set to the folder of orch_work.h")
    build_on: Literal["builder", "node"] = Field(
        default="builder",
        description="builder: built once per platform (`orch release build`) and nodes get binaries, "
                    "no compiler needed; node: every node builds the source itself (it needs a compiler)")
    library: RelativePath = Field(description="the work library the build produces (.so)")
    artifact: list[RelativePath] = Field(
        default_factory=list, description="files or folders besides the library that a build carries to nodes")
    functions: list[WorkFunction] = Field(min_length=1)
    setup: list[Command] = Field(default_factory=list, description="run on each node once the release is there")

    @field_validator("library")
    @classmethod
    def _library_inside(cls, value: str) -> str:
        return _relative_path(value)

    @field_validator("artifact")
    @classmethod
    def _artifact_inside(cls, value: list[str]) -> list[str]:
        return [_relative_path(v) for v in value]

    @field_validator("functions")
    @classmethod
    def _unique_functions(cls, value: list[WorkFunction]) -> list[WorkFunction]:
        seen: set[str] = set()
        for fn in value:
            if fn.name in seen:
                raise ValueError(f"function {fn.name!r} is declared twice")
            seen.add(fn.name)
        return value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def function(self, name: str) -> WorkFunction | None:
        return next((fn for fn in self.functions if fn.name == name), None)


# -- workspace settings ------------------------------------------------------------


class WorkspaceSettings(StrictModel):
    """``orch.yaml`` at the workspace root."""

    release_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="largest release tarball")
    scheduler_address: str | None = Field(default=None, min_length=1, description="what remote agents dial")
    scheduler_port: int | None = Field(default=None, ge=1, le=65535, description="default: from the workspace id")
    builders: dict[Annotated[str, StringConstraints(pattern=r"^linux-[A-Za-z0-9_]+-[A-Za-z0-9.]+$")], Name] = Field(
        default_factory=dict,
        description="platform -> family whose ready nodes build releases for it (`orch release build --platform`)")


SCHEMAS: dict[str, type[StrictModel]] = {
    "provider": ProviderConfig,
    "family": NodeFamily,
    "release": ReleaseManifest,
    "workspace": WorkspaceSettings,
}
