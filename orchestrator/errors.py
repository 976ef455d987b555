"""Every error orch raises on purpose, as one tree.

Each class carries the exit code the CLI uses for it; the CLI decides exit codes in
one place (``orchestrator.cli.app.main``) by reading ``exit_code``.  Third-party
errors are translated at the boundary where they occur and re-raised ``from`` the
original, so callers only ever catch ``OrchError``.

    OrchError                      1  anything orch reports on purpose
    ├── FleetIncomplete            1  a family did not reach its count
    ├── InputError                 2  bad input: nothing was changed
    │   ├── ConfigError            2    a YAML file fails validation (file, line, field)
    │   │   └── ValidationFailed   2      several ConfigErrors at once, one line each
    │   ├── WorkspaceError         2    no workspace here, or a malformed one
    │   ├── CredentialError        2    a credential reference cannot be resolved
    │   ├── ReleaseError           2    a release cannot be accepted
    │   │   └── UnsafeReleaseError 2      a path, link or file type that could escape
    │   ├── NotFoundError          2    a named provider, release, node... does not exist
    │   ├── ConflictError          2    the request contradicts what is already there
    │   ├── PlacementError         2    (placement) no capacity matches the demands
    │   ├── WorkModuleError        2    (scheduler.workmodules) a job's input or module options
    │   └── SinkError              2    (scheduler.sinks) a bad sink URL, or a sink another job owns
    ├── ProviderError              3  a provider (cloud API, driver) failed
    │   ├── ProviderAuthError      3    credentials rejected: never retried
    │   ├── ProviderCapacityError  3    out of capacity for a size here: fail over elsewhere
    │   │   └── ProviderQuotaError 3      the account's quota is used up: the whole provider
    │   ├── ProviderTransientError 3    throttled, 5xx, timed out: retried with backoff
    │   └── ProviderUnavailable    3    driver missing, endpoint unreachable
    ├── StateError                 4  the state store or stored artefacts are unusable
    │   ├── IntegrityError         4    a stored artefact fails its checksum
    │   ├── PKIError               4    (pki) the workspace's CA or certificates are unusable
    │   └── SinkFailed             4    (scheduler.sinks) writing or committing output failed
    └── RemoteError                5  a command or connection on a node failed
        ├── NodeUnreachable        5    (ssh) connection refused, reset, timed out
        ├── HostKeyMismatch        5    (ssh) the node's host key is not the pinned one
        ├── AuthenticationFailed   5    (ssh) the node refused the fleet key
        ├── CommandFailed          5    (ssh) a checked command exited non-zero
        ├── CommandTimeout         5    (ssh) a command ran past its timeout
        ├── RemoteFileError        5    (ssh) an SFTP transfer failed
        └── BootstrapFailed        5    (bootstrap) a bootstrap step failed; carries the log

Classes marked (module) live in that module, beside the code that raises them.
"""

from __future__ import annotations


class OrchError(Exception):
    """Base of every error orch reports on purpose.

    ``str(err)`` is a complete one-line message for the user: what went wrong, where,
    and, when there is one, the fix.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    @property
    def problems(self) -> list[OrchError]:
        """The problems this error reports, one line each: itself, or several."""
        return [self]

    def to_dict(self) -> dict[str, object]:
        """One problem as JSON (``--json`` output, API bodies)."""
        return {"message": self.message, "hint": self.hint, "text": str(self)}


class InputError(OrchError):
    """Bad input from the user; the command changed nothing."""

    exit_code = 2


class ConfigError(InputError):
    """A YAML file of the workspace fails validation.

    >>> str(ConfigError("count must be >= 1", file="node_families/w.yaml", line=3, field="count"))
    'node_families/w.yaml:3: count: count must be >= 1'
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{super().__str__()}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "field": self.field, **super().to_dict()}


class ValidationFailed(ConfigError):
    """Several configuration problems, reported one line each (``errors``); ``where``
    names what was read (a file, or the workspace).

    >>> one = ConfigError("unknown key", file="w.yaml", line=3, field="nodes")
    >>> str(ValidationFailed([one, one], where="w.yaml"))
    '2 problems in w.yaml'
    """

    def __init__(self, errors: list[ConfigError], *, where: str = "the workspace") -> None:
        self.errors: list[ConfigError] = [p for e in errors for p in (e.errors if isinstance(e, ValidationFailed)
                                                                      else [e])]
        count = len(self.errors)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in {where}")

    def __str__(self) -> str:
        return self.message

    @property
    def problems(self) -> list[OrchError]:
        return list(self.errors)

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message, "hint": None, "text": str(self),
                "problems": [e.to_dict() for e in self.errors]}


class WorkspaceError(InputError):
    """No workspace where one was expected, or a malformed one."""


class CredentialError(InputError):
    """A credential reference (env:VAR or file:PATH) cannot be resolved safely."""


class ReleaseError(InputError):
    """A release (directory or tarball) cannot be accepted."""


class UnsafeReleaseError(ReleaseError):
    """A release member could escape its folder or is not a plain file, folder or link."""


class NotFoundError(InputError):
    """A named thing (provider, release, node, ...) does not exist."""


class ConflictError(InputError):
    """The request contradicts what already exists (same version, other content...)."""


class FleetIncomplete(OrchError):
    """A node family did not reach its count; the failures' log tails were shown."""


class ProviderError(OrchError):
    """A provider's API or driver failed."""

    exit_code = 3


class ProviderAuthError(ProviderError):
    """The provider rejected the credentials."""


class ProviderCapacityError(ProviderError):
    """The provider has no capacity (or quota) for this size here: try elsewhere."""


class ProviderQuotaError(ProviderCapacityError):
    """The account's quota at the provider is used up: no size will fit there."""


class ProviderTransientError(ProviderError):
    """Throttling, a 5xx, a timeout: the same call may well work a little later."""


class ProviderUnavailable(ProviderError):
    """The driver is missing or the provider cannot be reached."""


class StateError(OrchError):
    """The state store or a stored artefact is unusable."""

    exit_code = 4


class IntegrityError(StateError):
    """A stored artefact does not match its recorded checksum."""


class RemoteError(OrchError):
    """A command or connection on a node failed."""

    exit_code = 5
