"""What a cloud node is told at its first boot: cloud-init user data carrying the SSH
host key orch made for it.

orch never accepts a host key first seen on the network.  Its own drivers report each
node's key; a cloud's node gets one orch generated before asking for the node, through
the user data every cloud passes to cloud-init (``ssh_keys``), and the record holds
the public half from the moment the node is requested.  The node then offers that key
and no other (``ssh_genkeytypes: []``, ``ssh_deletekeys``).

The private half travels in the create call and stays readable through the cloud's
API and the node's metadata service, as any user data does: it identifies the node to
orch, and grants nothing on any other machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator.provision.drivers import DriverFeatures


@dataclass(frozen=True)
class HostKey:
    """An ed25519 host key: ``private`` in OpenSSH PEM form, ``public`` as the line
    ``ssh-ed25519 AAAA...`` that orch pins."""

    private: str
    public: str

    @classmethod
    def generate(cls) -> HostKey:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        return cls(private, public)


def cloud_config(host_key: HostKey) -> str:
    """The ``#cloud-config`` document that installs ``host_key`` as the node's only one.

    >>> text = cloud_config(HostKey("-----BEGIN X-----\\nabc\\n-----END X-----\\n", "ssh-ed25519 AAAA"))
    >>> print(text)  # doctest: +NORMALIZE_WHITESPACE
    #cloud-config
    # orch: the host key orch pinned for this node before it existed
    ssh_deletekeys: true
    ssh_genkeytypes: []
    ssh_keys:
      ed25519_private: |
        -----BEGIN X-----
        abc
        -----END X-----
      ed25519_public: ssh-ed25519 AAAA
    """
    private = "".join(f"    {line}\n" for line in host_key.private.strip().splitlines())
    return ("#cloud-config\n"
            "# orch: the host key orch pinned for this node before it existed\n"
            "ssh_deletekeys: true\n"
            "ssh_genkeytypes: []\n"
            "ssh_keys:\n"
            "  ed25519_private: |\n"
            f"{private}"
            f"  ed25519_public: {host_key.public.strip()}\n")


def user_data_arguments(features: DriverFeatures, text: str) -> dict[str, Any]:
    """``create_node`` keywords passing ``text`` as the node's user data, as the driver
    declares it takes it (GCE: the ``user-data`` item of its metadata)."""
    if features.user_data is None:
        return {}
    if features.user_data == "ex_metadata":
        return {"ex_metadata": {"user-data": text}}
    if features.user_data == "ex_customdata":  # Azure's driver base64-encodes it: bytes (and simplejson)
        return {"ex_customdata": text.encode()}
    return {features.user_data: text}


def merged(*arguments: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments from several sources as one: two dicts for one keyword (the
    metadata that carries both the fleet key and the user data) are merged; any other
    keyword given twice is a bug.

    >>> merged({"ex_metadata": {"ssh-keys": "k"}}, {"ex_metadata": {"user-data": "u"}}, {"auth": 1})
    {'ex_metadata': {'ssh-keys': 'k', 'user-data': 'u'}, 'auth': 1}
    """
    out: dict[str, Any] = {}
    for args in arguments:
        for key, value in args.items():
            if key not in out:
                out[key] = value
            elif isinstance(out[key], dict) and isinstance(value, dict) and not out[key].keys() & value.keys():
                out[key] = {**out[key], **value}
            else:
                raise ValueError(f"create_node argument {key!r} given twice")
    return out
