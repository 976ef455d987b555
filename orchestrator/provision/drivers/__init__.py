"""Our own libcloud NodeDrivers, registered with libcloud's ``set_driver``.

The engine looks every provider's driver up with ``driver_class(name)``, which is
libcloud's ``get_driver`` once ours are registered: EC2 and ``local`` alike.
"""

from __future__ import annotations

import os

from libcloud.common.types import LibcloudError
from libcloud.compute.base import NodeDriver
from libcloud.compute.providers import get_driver, set_driver


class CapacityError(LibcloudError):
    """Raised by our drivers when they are out of capacity or quota for a request:
    the engine fails over to the next choice instead of giving up."""


class QuotaError(CapacityError):
    """Raised by our drivers when the provider's node quota is used up."""


# name -> (module, class); imported only when asked for, like libcloud's own.
OWN_DRIVERS: dict[str, tuple[str, str]] = {
    "local": ("orchestrator.provision.drivers.local", "LocalNodeDriver"),
    "netns": ("orchestrator.provision.drivers.netns", "NetnsNodeDriver"),
    "hosts": ("orchestrator.provision.drivers.hosts", "HostsNodeDriver"),
}


PLUGINS_ENV = "ORCH_DRIVER_PLUGINS"


def plugin_drivers() -> dict[str, tuple[str, str]]:
    """Extra libcloud drivers named in ``ORCH_DRIVER_PLUGINS``: ``name=module:Class,...``.

    For drivers that live outside orch and libcloud (a site's own, or a test adapter
    for a local API emulator); they are registered with ``set_driver`` like ours.
    """
    found: dict[str, tuple[str, str]] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, _, target = item.partition("=")
        module, _, cls = target.partition(":")
        if name and module and cls:
            found[name.strip()] = (module.strip(), cls.strip())
    return found


def driver_class(name: str) -> type[NodeDriver]:
    """The libcloud driver class for ``name``: ours (and plugins) are registered with
    libcloud's ``set_driver`` on first use (which imports them), libcloud's are looked up."""
    extra = {**OWN_DRIVERS, **plugin_drivers()}
    if name in extra:
        try:
            get_driver(name)
        except AttributeError:  # not registered yet
            module, cls = extra[name]
            # libcloud documents dotted-path strings here; its annotations say module/type.
            set_driver(name, module, cls)  # type: ignore[arg-type]
    driver: type[NodeDriver] = get_driver(name)
    return driver
