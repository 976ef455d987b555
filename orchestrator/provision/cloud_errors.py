"""Errors at the libcloud boundary: the one translation of libcloud's and the network's
errors into orch's ``ProviderError`` tree.

A cloud API's error is read by its code (which libcloud puts first in its message),
never by its free text: capacity, quota and throttling codes decide failover, cooldown
and retry; anything else is classified by its HTTP status (5xx and 429 transient,
other 4xx final).
"""

from __future__ import annotations

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
