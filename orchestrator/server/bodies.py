"""The request bodies of ``orch serve``'s API, one pydantic model a route that takes one.

They are the OpenAPI schemas of those bodies (the model's name is the schema's name),
and their validation is FastAPI's 422: a body of the wrong shape never reaches a route.
"""

from __future__ import annotations

import shlex

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    # An unknown field is a typo the client should hear about, not something to ignore.
    model_config = ConfigDict(extra="forbid")


class SpawnRequest(_Body):
    family: str = Field(min_length=1, description="the node family (node_families/FAMILY.yaml)")
    count: int | None = Field(default=None, ge=0, le=10_000, description="nodes wanted (default: the family's)")


_TARGETS = "targets: all, a family, node ids, globs, resource paths with glob segments (as the CLI's)"
_LABELS = "label selectors narrowing the targets: key=value, key, key!=value, !key"


class StopRequest(_Body):
    family: str | None = Field(default=None, min_length=1, description="stop this family's nodes")
    nodes: list[str] | None = Field(default=None, min_length=1, description="node ids or resource paths")
    targets: list[str] | None = Field(default=None, min_length=1, description=_TARGETS)
    labels: list[str] = Field(default_factory=list, description=_LABELS)
    all: bool = Field(default=False, description="stop every node of the workspace")

    @model_validator(mode="after")
    def _one_target(self) -> StopRequest:
        if sum((self.family is not None, self.nodes is not None, self.targets is not None, self.all)) != 1:
            raise ValueError("give exactly one of family, nodes, targets, all")
        return self

    def named(self) -> list[str]:
        return ["all"] if self.all else [self.family] if self.family else list(self.targets or self.nodes or [])


class ExecRequest(_Body):
    command: str | None = Field(default=None, min_length=1, description="the shell command line run on each node")
    argv: list[str] | None = Field(default=None, min_length=1,
                                   description="instead of command: a program and its arguments, each quoted")
    family: str | None = Field(default=None, min_length=1, description="run on this family's ready nodes")
    nodes: list[str] | None = Field(default=None, min_length=1, description="node ids or resource paths")
    targets: list[str] | None = Field(default=None, min_length=1, description=_TARGETS)
    labels: list[str] = Field(default_factory=list, description=_LABELS)
    timeout: float | None = Field(default=None, gt=0, le=86_400, description="seconds each node may take")

    @model_validator(mode="after")
    def _one_target(self) -> ExecRequest:
        if sum((self.family is not None, self.nodes is not None, self.targets is not None)) != 1:
            raise ValueError("give exactly one of family, nodes, targets")
        if (self.command is None) == (self.argv is None):
            raise ValueError("give exactly one of command, argv")
        return self

    def named(self) -> list[str]:
        return [self.family] if self.family else list(self.targets or self.nodes or [])

    def line(self) -> str:
        return self.command if self.command is not None else shlex.join(self.argv or [])


class JobRequest(_Body):
    work: str = Field(description="RELEASE[@VERSION]:FUNCTION, e.g. primes:count_primes")
    input: str = Field(description="the work module's input: START:END for range, a file for lines and chunks")
    family: str | None = None
    sink: str | None = None
    work_module: str | None = None
    module_options: dict[str, int | float | str] = Field(default_factory=dict)
    target_task_seconds: float | None = None
    task_size: float | None = None
    task_timeout: float | None = None
    max_attempts: int | None = None
    on_task_failure: str | None = None
    ports_per_node: int | None = None
