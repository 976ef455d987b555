"""Our own libcloud NodeDrivers, registered with libcloud's ``set_driver``.

The engine looks every provider's driver up with ``driver_class(name)``, which is
libcloud's ``get_driver`` once ours are registered: EC2 and ``local`` alike.
"""

from __future__ import annotations

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
    "local": ("orchestrator.drivers.local", "LocalNodeDriver"),
    "netns": ("orchestrator.drivers.netns", "NetnsNodeDriver"),
    "hosts": ("orchestrator.drivers.hosts", "HostsNodeDriver"),
}


def driver_class(name: str) -> type[NodeDriver]:
    """The libcloud driver class for ``name``: ours are registered with libcloud's
    ``set_driver`` on first use (which imports them), libcloud's are looked up."""
    if name in OWN_DRIVERS:
        try:
            get_driver(name)
        except AttributeError:  # not registered yet
            module, cls = OWN_DRIVERS[name]
            # libcloud documents dotted-path strings here; its annotations say module/type.
            set_driver(name, module, cls)  # type: ignore[arg-type]
    driver: type[NodeDriver] = get_driver(name)
    return driver
