"""The platform a binary is built for: ``linux-<uname -m>-<libc><version>``.

The agent reports its node's in HELLO, and orch picks every binary it ships by it (a
release's build, the port runner).  Standard library only, like all of the agent.
"""

from __future__ import annotations

import os


def platform_of(machine: str, libc: str) -> str:
    """The platform of a machine from ``uname -m`` and ``getconf GNU_LIBC_VERSION``
    (``os.confstr("CS_GNU_LIBC_VERSION")``); a C library that is not glibc says so.

    >>> platform_of("x86_64", "glibc 2.36"), platform_of("aarch64", "")
    ('linux-x86_64-glibc2.36', 'linux-aarch64-unknownlibc')
    """
    lib = "".join(libc.split()) or "unknownlibc"
    return f"linux-{machine.strip()}-{lib}"


def host_platform() -> str:
    """This machine's platform."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    return platform_of(os.uname().machine, libc)
