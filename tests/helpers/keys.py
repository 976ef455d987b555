"""SSH key pairs for the fleet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str


def make_key_pair(folder: Path, name: str = "fleet_key") -> KeyPair:
    """An ed25519 key pair, the private half in OpenSSH format (0600) under ``folder``."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / name
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return KeyPair(private, public.decode())
