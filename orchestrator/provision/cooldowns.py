"""Cooldowns: placement stays off a (provider, location, size) for a while after a
capacity error, and off a whole provider after a quota error; kept in the store.
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.provision.placement import NodeRequest
from orchestrator.state import Store

COOLDOWN_SCOPE = "cooldown"
COOLDOWN_SECONDS = 600.0


def mark_unavailable(store: Store, request: NodeRequest, reason: str, *, whole_provider: bool = False,
                     seconds: float = COOLDOWN_SECONDS) -> None:
    """Keep placement off (provider, location, size) for a while after a capacity error,
    or off the whole provider (``*/*``) after a quota error."""
    where = "*/*" if whole_provider else f"{request.location}/{request.size}"
    key = f"{request.provider}/{where}"
    with store.transaction():
        store.kv_put(key, {"until": time.time() + seconds, "reason": reason}, scope=COOLDOWN_SCOPE)
        store.record_event("provider.cooldown", provider=request.provider,
                           reason=f"{where} unavailable for {seconds:.0f} s: {reason}")


def active_cooldowns(store: Store, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Active cooldowns: "provider/location/size" -> {"until", "reason"}."""
    moment = time.time() if now is None else now
    return {k: v for k, v in store.kv_items(scope=COOLDOWN_SCOPE).items() if v["until"] > moment}


def unavailable(store: Store, provider: str) -> frozenset[tuple[str, str]]:
    found = set()
    for key in active_cooldowns(store):
        name, location, size = key.split("/", 2)
        if name == provider:
            found.add((location, size))
    return frozenset(found)
