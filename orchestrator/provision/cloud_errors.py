"""Errors at the libcloud boundary: the one translation of libcloud's and the network's
errors into orch's ``ProviderError`` tree.

A cloud API's error is read by its code (which libcloud puts first in its message),
never by its free text: capacity, quota and throttling codes decide failover, cooldown
and retry; anything else is classified by its HTTP status (5xx and 429 transient,
other 4xx final).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError, LibcloudError

from orchestrator.errors import (
    OrchError,
    ProviderAuthError,
    ProviderCapacityError,
    ProviderError,
    ProviderQuotaError,
    ProviderTransientError,
    ProviderUnavailable,
)
from orchestrator.provision.drivers import CapacityError, QuotaError
from orchestrator.provision.drivers.features import ErrorCodes, Meaning

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
_SHARED: tuple[tuple[Meaning, frozenset[str]], ...] = (
    ("capacity", CAPACITY_CODES), ("quota", QUOTA_CODES), ("transient", TRANSIENT_CODES), ("final", FINAL_CODES))
_API_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_BRACKETED_CODE = re.compile(r"\[([A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\]")


def api_error_code(exc: BaseException) -> str | None:
    """The cloud API's error code: the code libcloud put at the front of its message
    (EC2's drivers and those that echo them), a code the exception carries (GCE's
    ``GoogleBaseError.code``), or the code in a JSON error body (Azure's and GCE's
    ``{"error": {"code": ...}}``, DigitalOcean's ``{"id": ...}``, OpenStack's
    ``{"overLimit": {...}}``).

    >>> api_error_code(Exception("InvalidKeyPair.Duplicate: The keypair 'k' already exists."))
    'InvalidKeyPair.Duplicate'
    >>> api_error_code(Exception('{"error": {"code": "SkuNotAvailable", "message": "..."}}'))
    'SkuNotAvailable'
    >>> api_error_code(Exception("[SkuNotAvailable] The requested size ..."))  # libcloud's Azure driver
    'SkuNotAvailable'
    >>> api_error_code(Exception("could not connect: refused")) is None
    True
    """
    carried = getattr(exc, "code", None)
    if isinstance(carried, str) and _API_CODE.fullmatch(carried) and not carried.isdigit():
        return carried
    text = str(getattr(exc, "message", None) or getattr(exc, "value", None) or exc).strip()
    from_json = _json_code(text)
    if from_json is not None:
        return from_json
    bracketed = _BRACKETED_CODE.match(text)  # libcloud's Azure driver: "[Code] message"
    if bracketed is not None:
        return bracketed.group(1)
    code, sep, _ = text.partition(":")
    return code if sep and _API_CODE.fullmatch(code) else None


def _json_code(text: str) -> str | None:
    """The error code in a JSON error body, where ``text`` is (or ends with) one."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        body = json.loads(text[start:])
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        errors = error.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("reason"):
            return str(errors[0]["reason"])  # GCE: the reason names the kind
        if isinstance(error.get("code"), str):
            return str(error["code"])  # Azure
    if isinstance(body.get("id"), str):
        return str(body["id"])  # DigitalOcean
    if len(body) == 1:
        (key, value), = body.items()
        if isinstance(value, dict) and "message" in value:
            return str(key)  # OpenStack: {"overLimit": {"message": ..., "code": 413}}
    return None


@contextmanager
def map_libcloud_errors(provider: str, codes: ErrorCodes | None = None) -> Iterator[None]:
    """Translate libcloud and network errors from ``provider`` into ProviderErrors;
    ``codes``: what its driver declares its API's codes and statuses mean."""
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
        raise _classified(provider, exc, _http_status(exc.code), codes) from exc
    except LibcloudError as exc:
        raise _classified(provider, exc, _http_status(getattr(exc, "http_code", None)), codes) from exc
    except OrchError:
        raise
    except Exception as exc:  # a driver failing in its own way is still the provider's failure
        raise ProviderError(f"provider {provider!r}: the driver failed: {type(exc).__name__}: {_short(exc)}") from exc


def _http_status(code: Any) -> int | None:
    try:
        return int(code)
    except (TypeError, ValueError):
        return None


def _classified(provider: str, exc: BaseException, status: int | None, codes: ErrorCodes | None = None
                ) -> ProviderError:
    """An API error by its code (capacity, quota, throttling, credentials), then by what
    the driver declares of its status, else by its HTTP status: 5xx and 429 are
    transient (retried), anything else (validation...) is final."""
    code = api_error_code(exc)
    text = _short(exc)
    meaning = _meaning(code, status, codes or ErrorCodes())
    if meaning == "capacity":
        return ProviderCapacityError(f"provider {provider!r} is out of capacity: {text}")
    if meaning == "quota":
        return ProviderQuotaError(f"provider {provider!r} quota is used up: {text}",
                                  hint=f"raise the quota, or lower max_nodes in providers/{provider}.yaml")
    if meaning == "transient":
        return ProviderTransientError(f"provider {provider!r} is throttling us or failed for now: {text}")
    if meaning == "auth":
        return ProviderAuthError(f"provider {provider!r} rejected the credentials: {text}",
                                 hint=f"check the credential references in providers/{provider}.yaml")
    if meaning is None and status is not None and (status >= 500 or status == 429):
        return ProviderTransientError(f"provider {provider!r} answered HTTP {status}: {text}")
    if status is not None:
        return ProviderError(f"provider {provider!r} answered HTTP {status}: {text}")
    return ProviderError(f"provider {provider!r}: {text}")


def _meaning(code: str | None, status: int | None, codes: ErrorCodes) -> Meaning | None:
    """What the code means (the driver's table, then the codes all drivers share), else
    what the driver declares of the status; None: nothing known."""
    if code is not None:
        if code in codes.codes:
            return codes.codes[code]
        for meaning, shared in _SHARED:
            if code in shared:
                return meaning
    if code is None and status is not None and status in codes.uncoded:
        return codes.uncoded[status]
    if status is not None and status in codes.statuses:
        return codes.statuses[status]
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "value", None) or exc).split())
    return text[:300] or type(exc).__name__
