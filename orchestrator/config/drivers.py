"""The driver names a provider's ``driver`` field accepts: the one table of them.

It imports no libcloud (``known_drivers`` reads libcloud's list of stock drivers only
when called), so that configuration can name drivers without loading any, and
``provision.drivers`` finds its classes here.  What a driver *does* differently is not
told by its name: each declares its features (``provision.drivers.features``).
"""

from __future__ import annotations

import os

OWN_DRIVERS: dict[str, str] = {
    "local": "orchestrator.provision.drivers.local:LocalNodeDriver",
    "netns": "orchestrator.provision.drivers.netns:NetnsNodeDriver",
    "hosts": "orchestrator.provision.drivers.hosts:HostsNodeDriver",
}
"""orch's own libcloud drivers: name -> ``module:Class``, imported when first asked for."""

PLUGINS_ENV = "ORCH_DRIVER_PLUGINS"


def plugin_drivers() -> dict[str, str]:
    """Extra libcloud drivers named in ``ORCH_DRIVER_PLUGINS``: ``name=module:Class,...``.

    For drivers that live outside orch and libcloud (a site's own, or a test adapter
    for a local API emulator); they are registered with ``set_driver`` like ours.

    >>> os.environ[PLUGINS_ENV] = "lab=site.drivers:LabDriver"
    >>> plugin_drivers()
    {'lab': 'site.drivers:LabDriver'}
    >>> del os.environ[PLUGINS_ENV]
    """
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, _, target = item.partition("=")
        module, _, cls = target.partition(":")
        if name.strip() and module.strip() and cls.strip():
            found[name.strip()] = f"{module.strip()}:{cls.strip()}"
    return found


def registered_drivers() -> dict[str, str]:
    """Ours and the plugins: name -> ``module:Class`` (a plugin may replace one of ours)."""
    return {**OWN_DRIVERS, **plugin_drivers()}


def known_drivers() -> tuple[str, ...]:
    """Names accepted in a provider's ``driver`` field: ours, plugins, then libcloud's."""
    from libcloud.compute.types import Provider as LibcloudProvider  # only the names; only when asked

    own = tuple(OWN_DRIVERS)
    plugins = tuple(sorted(plugin_drivers()))
    stock = sorted({str(v) for k, v in vars(LibcloudProvider).items() if not k.startswith("_")})
    return own + plugins + tuple(d for d in stock if d not in own and d not in plugins)
