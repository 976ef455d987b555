"""The workspace's certificate authority: TLS between the scheduler and node agents.

Each workspace has its own CA in ``.orch/pki/`` (made on first use, EC P-256)::

    ca.crt, ca.key              the CA (the key 0600, never leaves this folder)
    scheduler.crt, scheduler.key  the scheduler's server certificate (CN "orch-scheduler")

Node certificates are issued per node (CN = node id, clientAuth only) and shipped to
the node with its agent; the orchestrator keeps no copy of a node's key.  Both sides
trust this CA only, so an agent of another workspace, or a scheduler of another
workspace, is refused during the TLS handshake.  The extended key usages keep the
roles apart: a node certificate cannot serve, the scheduler's cannot be a client.

>>> ws = Workspace.find()                                        # doctest: +SKIP
>>> cert_pem, key_pem = issue_node_cert(ws, "w1-5d0c")           # doctest: +SKIP
>>> server = await asyncio.start_server(handle, "127.0.0.1", 0,
...                                     ssl=server_ssl_context(ws))  # doctest: +SKIP
>>> peer_node_id(writer.get_extra_info("ssl_object"))            # doctest: +SKIP
'w1-5d0c'
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.agent.protocol import SCHEDULER_NAME
from orchestrator.errors import StateError
from orchestrator.locks import exclusive
from orchestrator.workspace import Workspace

CA_NAME = "orch workspace CA"
VALIDITY = dt.timedelta(days=3653)  # about ten years
RENEW_BEFORE = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clocks a little behind ours


class PKIError(StateError):
    """The workspace's CA or the scheduler's certificate cannot be read or made."""


def pki_dir(ws: Workspace) -> Path:
    return ws.runtime_dir / "pki"


def ca_cert_path(ws: Workspace) -> Path:
    """The CA certificate file (PEM) that nodes and the scheduler trust; the CA is made
    first when the workspace has none."""
    _ensure_ca(ws)
    return _ca_path(ws)


def ca_cert_pem(ws: Workspace) -> bytes:
    """The CA certificate (PEM), making the CA first when the workspace has none."""
    return ca_cert_path(ws).read_bytes()


def _ca_path(ws: Workspace) -> Path:
    return pki_dir(ws) / "ca.crt"


def issue_node_cert(ws: Workspace, node_id: str) -> tuple[bytes, bytes]:
    """A new certificate and key for ``node_id``: (cert PEM, key PEM), CN = the node id,
    clientAuth only, valid about ten years.  Nothing is kept here."""
    if not node_id or len(node_id) > 64:
        raise ValueError(f"a node id of 1-64 characters is needed for a certificate, not {node_id!r}")
    ca_cert, ca_key = _ensure_ca(ws)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(ca_cert, ca_key, key, node_id, ExtendedKeyUsageOID.CLIENT_AUTH)
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def scheduler_cert(ws: Workspace) -> tuple[Path, Path]:
    """The scheduler's certificate and key files (CN ``protocol.SCHEDULER_NAME``,
    serverAuth), issued on first use and again when missing, issued by another CA, or
    near their end."""
    folder = pki_dir(ws)
    crt, key_path = folder / "scheduler.crt", folder / "scheduler.key"
    ca_cert, ca_key = _ensure_ca(ws)
    with _locked(ws):
        if not _current(crt, key_path, ca_cert):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(ca_cert, ca_key, key, SCHEDULER_NAME, ExtendedKeyUsageOID.SERVER_AUTH)
            _write_private(key_path, _key_pem(key))
            _write_private(crt, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return crt, key_path


def server_ssl_context(ws: Workspace) -> ssl.SSLContext:
    """A server context for ``asyncio.start_server``: presents the scheduler's
    certificate, requires a client certificate issued by this workspace's CA (only),
    TLS 1.2 or later."""
    crt, key = scheduler_cert(ws)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(_ca_path(ws)))
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A client context as the agent makes it (for tools and tests that dial the
    scheduler): trusts only ``ca``, presents ``cert``; check the peer's CN yourself."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def peer_node_id(ssl_object: Any) -> str:
    """The node id (the CN) of the verified client certificate of a TLS connection
    (``writer.get_extra_info("ssl_object")``); raises PKIError when there is none."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise PKIError("the peer presented no verified certificate")
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and value:
                return str(value)
    raise PKIError("the peer's certificate has no common name")


# -- the CA -----------------------------------------------------------------------------


def _locked(ws: Workspace) -> contextlib.AbstractContextManager[None]:
    return exclusive(pki_dir(ws) / ".lock")


def _ensure_ca(ws: Workspace) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt, key_path = _ca_path(ws), pki_dir(ws) / "ca.key"
    if not crt.is_file():
        with _locked(ws):
            if not crt.is_file():  # another thread or process may have made it meanwhile
                _make_ca(crt, key_path)
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PKIError(
            f"the workspace CA in {pki_dir(ws)} is unreadable: {exc}",
            hint="remove .orch/pki/ to make a new CA, then bootstrap the nodes again",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path} is not an EC private key", hint="remove .orch/pki/ to make a new CA")
    return cert, key


def _make_ca(crt: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME} {secrets.token_hex(4)}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "orch"),
    ])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))  # the key first: a ca.crt always has its key
    _write_private(crt, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
           common_name: str, usage: x509.ObjectIdentifier) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _current(crt: Path, key_path: Path, ca_cert: x509.Certificate) -> bool:
    """Whether the scheduler's files exist, belong together, come from this CA and are
    not near their end."""
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    if cert.issuer != ca_cert.subject or not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    same_key = key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    return same_key and cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write atomically; the file has ``mode`` from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "PKIError",
    "ca_cert_path",
    "ca_cert_pem",
    "client_ssl_context",
    "issue_node_cert",
    "peer_node_id",
    "pki_dir",
    "scheduler_cert",
    "server_ssl_context",
]
