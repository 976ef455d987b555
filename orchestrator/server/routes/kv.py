"""The workspace's key-value store: ``GET /kv?prefix=`` and ``GET``/``PUT``/``DELETE
/kv/{key}``; a value is any JSON, sent as ``application/json`` (else 415)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from orchestrator.errors import NotFoundError
from orchestrator.server.deps import SECURED, StoreDep
from orchestrator.server.middleware import UnsupportedMediaType

router = APIRouter(tags=["kv"], dependencies=SECURED)
_MISSING = object()  # tells a key that is absent from one that holds null


@router.get("/kv")
def kv_list(db: StoreDep, prefix: str = "") -> dict[str, Any]:
    """Every key (with its value) that starts with ``prefix``."""
    return db.kv_items(prefix=prefix)


@router.get("/kv/{key}")
def kv_get(key: str, db: StoreDep) -> dict[str, Any]:
    """A key's value."""
    value = db.kv_get(key, default=_MISSING)
    if value is _MISSING:
        raise NotFoundError(f"no key {key!r}", hint="see GET /kv")
    return {"key": key, "value": value}


@router.put("/kv/{key}")
def kv_put(key: str, db: StoreDep, request: Request,
           value: Annotated[Any, Body(description="any JSON value", media_type="application/json")]
           ) -> dict[str, Any]:
    """Store a JSON value (sent as application/json) under ``key``; answers the key's new version."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"the value must be sent as application/json, not {media or 'no type'}",
                                   hint="set `Content-Type: application/json`")
    return {"key": key, "version": db.kv_put(key, value)}


@router.delete("/kv/{key}")
def kv_delete(key: str, db: StoreDep) -> dict[str, Any]:
    """Remove a key."""
    if not db.kv_delete(key):
        raise NotFoundError(f"no key {key!r}", hint="see GET /kv")
    return {"key": key, "deleted": True}
