"""Drivers: orch's own libcloud NodeDrivers, and every driver's declared features.

The engine looks every provider's driver up with ``driver_class(name)``, which is
libcloud's ``get_driver`` once ours (and plugins) are registered: EC2 and ``local``
alike.  ``features_of(cls)`` is what the engine asks instead of a driver's name.

    local.py   LocalNodeDriver: each node an sshd on its own loopback address
    netns.py   NetnsNodeDriver: each node in its own network namespace (root)
    hosts.py   HostsNodeDriver: a pool of existing machines reached over SSH
    features.py  DriverFeatures, the stock drivers' declarations, features_of
    nodefolders.py  node folders of local and netns: ids, meta.json, files, reservations
    processes.py    a node's processes: found in /proc, spawned, reaped and ended
    netplumbing.py  netns's host network: ip, names, our interfaces, the host lock
"""

from __future__ import annotations

from libcloud.common.types import LibcloudError
from libcloud.compute.base import NodeDriver
from libcloud.compute.providers import get_driver, set_driver

from orchestrator.config.drivers import registered_drivers
from orchestrator.provision.drivers.features import DriverFeatures, features_of


class CapacityError(LibcloudError):
    """Raised by our drivers when they are out of capacity or quota for a request:
    the engine fails over to the next choice instead of giving up."""


class QuotaError(CapacityError):
    """Raised by our drivers when the provider's node quota is used up."""


def driver_class(name: str) -> type[NodeDriver]:
    """The libcloud driver class for ``name``: ours (and plugins) are registered with
    libcloud's ``set_driver`` on first use (which imports them), libcloud's are looked up."""
    registered = registered_drivers()
    if name in registered:
        try:
            get_driver(name)
        except AttributeError:  # not registered yet
            module, _, cls = registered[name].partition(":")
            # libcloud documents dotted-path strings here; its annotations say module/type.
            set_driver(name, module, cls)  # type: ignore[arg-type]
    driver: type[NodeDriver] = get_driver(name)
    return driver


__all__ = ["CapacityError", "DriverFeatures", "QuotaError", "driver_class", "features_of"]
