"""What a job is asked to do: the validated, stored form of `orch job run`'s options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.config.models import StrictModel


class JobSpec(StrictModel):
    """A job's specification, stored with the job (``jobs.spec``) and never changed."""

    release: str = Field(description="name@version of an uploaded release")
    function: str = Field(description="the work function (release.yaml `functions[].name`)")
    symbol: str = Field(description="the C symbol the port calls")
    work_module: str = Field(description="cuts the input into tasks: range, lines, chunks, or a release's own")
    input: str = Field(description="the work module's input: START:END for range, a file for lines/chunks")
    module_options: dict[str, Any] = Field(default_factory=dict)
    family: str | None = Field(default=None, description="run on this family's nodes only")
    sink: str = Field(description="file:PATH | sqlite:PATH | postgresql://...")
    target_task_seconds: float = Field(default=0.2, gt=0, description="the task time each node's size adapts to")
    task_size: float | None = Field(default=None, gt=0, le=1, description="a fixed task size: no adaptation")
    initial_task_size: float | None = Field(default=None, gt=0, le=1, description="where adaptation starts")
    task_timeout: float = Field(default=60, gt=0, description="seconds a task may run before its port is killed")
    max_attempts: int = Field(default=3, ge=1, description="tries of a task before it is failed")
    on_task_failure: Literal["continue", "fail"] = Field(
        default="continue", description="a failed task: keep going (the rest of the output intact) or fail the job")
    isolate_failures: bool = Field(
        default=True, description="cut a task that failed every attempt in halves that run again, down to "
        "isolate_floor items (range, lines, chunks), so only the failing pieces are lost")
    isolate_floor: int = Field(default=1, ge=1, description="the most items a failing piece may hold without "
                               "being cut again (numbers, lines or bytes)")
    ports_per_node: int | None = Field(default=None, ge=1, description="default: the agent's slots (its cpus)")
    max_unflushed_bytes: int = Field(default=64 << 20, gt=0, description="pause dispatch past this much output")
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    agent_wait_seconds: float = Field(default=30, gt=0, description="how long to wait for a first agent")
