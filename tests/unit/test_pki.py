"""The workspace CA (orchestrator.deploy.pki): files and modes, certificates, and real TLS
handshakes over a socket pair between the contexts it makes."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.agent.protocol import SCHEDULER_NAME
from orchestrator.deploy import pki
from orchestrator.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


@pytest.fixture
def other_ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "other")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def node_files(ws: Workspace, folder: Path, node: str) -> tuple[Path, Path]:
    cert, key = pki.issue_node_cert(ws, node)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.crt").write_bytes(cert)
    (folder / "node.key").write_bytes(key)
    return folder / "node.crt", folder / "node.key"


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str | None, str | None, str]:
    """A real TLS handshake over a socket pair, then one byte from server to client.
    Returns (node id the server saw or None, the server's error, what the client saw)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    seen: dict[str, str | None] = {"node": None, "error": None}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                seen["node"] = pki.peer_node_id(tls)
                tls.sendall(b"!")
        except (ssl.SSLError, OSError, pki.PKIError) as exc:
            seen["error"] = str(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b) as tls:
            cn = pki.peer_node_id(tls)  # the CN of whichever side's verified certificate
            got = tls.recv(1)
            client_saw = f"ok {cn}" if got == b"!" else "closed"
    except (ssl.SSLError, OSError) as exc:
        client_saw = f"error {exc}"
    finally:
        thread.join(10)
        a.close()
        b.close()
    return seen["node"], seen["error"], client_saw


def test_the_ca_is_made_once_with_private_files(ws: Workspace) -> None:
    folder = pki.pki_dir(ws)
    assert not folder.exists()
    pem = pki.ca_cert_pem(ws)
    assert mode(folder) == 0o700 and mode(folder / "ca.key") == 0o600
    ca = x509.load_pem_x509_certificate(pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.ca_cert_pem(ws) == pem  # not made again
    crt, key = pki.scheduler_cert(ws)
    assert mode(key) == 0o600 and pki.scheduler_cert(ws) == (crt, key)
    assert crt.read_bytes() == pki.scheduler_cert(ws)[0].read_bytes()  # cached, not re-issued
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_threads_racing_for_the_first_ca_get_one(ws: Workspace) -> None:
    with ThreadPoolExecutor(8) as pool:
        pems = set(pool.map(lambda _: pki.ca_cert_pem(ws), range(16)))
    assert len(pems) == 1


def test_node_certificate_fields(ws: Workspace) -> None:
    cert_pem, key_pem = pki.issue_node_cert(ws, "w1-5d0c")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(pki.ca_cert_pem(ws))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "w1-5d0c"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3600) < life < dt.timedelta(days=3700)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert pki.issue_node_cert(ws, "w1-5d0c")[1] != key_pem  # a new key each time
    with pytest.raises(ValueError):
        pki.issue_node_cert(ws, "")


def test_scheduler_certificate_follows_a_new_ca(ws: Workspace) -> None:
    crt, _ = pki.scheduler_cert(ws)
    first = x509.load_pem_x509_certificate(crt.read_bytes())
    assert first.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SCHEDULER_NAME
    usage = first.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("ca.crt", "ca.key"):
        (pki.pki_dir(ws) / name).unlink()
    crt, _ = pki.scheduler_cert(ws)  # a new CA: the old scheduler cert is no longer current
    again = x509.load_pem_x509_certificate(crt.read_bytes())
    again.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert_pem(ws)))
    assert again.serial_number != first.serial_number


def test_mutual_tls_accepts_this_workspaces_node(ws: Workspace, tmp_path: Path) -> None:
    cert, key = node_files(ws, tmp_path / "n1", "n1")
    client = pki.client_ssl_context(pki.ca_cert_path(ws), cert, key)
    node, error, client_saw = handshake(pki.server_ssl_context(ws), client)
    assert (node, error, client_saw) == ("n1", None, f"ok {SCHEDULER_NAME}")


def test_a_node_of_another_workspace_is_refused(ws: Workspace, other_ws: Workspace, tmp_path: Path) -> None:
    cert, key = node_files(other_ws, tmp_path / "n1", "n1")
    client = pki.client_ssl_context(pki.ca_cert_path(ws), cert, key)  # trusts our scheduler
    node, error, client_saw = handshake(pki.server_ssl_context(ws), client)
    assert node is None and error is not None and "certificate" in error.lower()
    assert not client_saw.startswith("ok")


def test_a_client_without_a_certificate_is_refused(ws: Workspace) -> None:
    client = ssl.create_default_context(cafile=str(pki.ca_cert_path(ws)))
    client.check_hostname = False
    node, error, client_saw = handshake(pki.server_ssl_context(ws), client)
    assert node is None and error is not None and "certificate" in error.lower()
    assert not client_saw.startswith("ok")


def test_an_impostor_scheduler_is_refused_by_the_client(ws: Workspace, other_ws: Workspace,
                                                         tmp_path: Path) -> None:
    cert, key = node_files(ws, tmp_path / "n1", "n1")
    client = pki.client_ssl_context(pki.ca_cert_path(ws), cert, key)
    node, _, client_saw = handshake(pki.server_ssl_context(other_ws), client)
    assert node is None and "certificate verify failed" in client_saw


def test_a_node_certificate_cannot_serve(ws: Workspace, tmp_path: Path) -> None:
    """A stolen node key does not make a scheduler: its cert is for clients only."""
    cert, key = node_files(ws, tmp_path / "n1", "n1")
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor.load_cert_chain(cert, key)
    client_cert, client_key = node_files(ws, tmp_path / "n2", "n2")
    client = pki.client_ssl_context(pki.ca_cert_path(ws), client_cert, client_key)
    _, _, client_saw = handshake(impostor, client)
    assert client_saw.startswith("error") and "certificate" in client_saw


def test_tls_older_than_1_2_is_refused(ws: Workspace, tmp_path: Path) -> None:
    cert, key = node_files(ws, tmp_path / "n1", "n1")
    client = pki.client_ssl_context(pki.ca_cert_path(ws), cert, key)
    with warnings.catch_warnings():  # setting TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    node, error, client_saw = handshake(pki.server_ssl_context(ws), client)
    assert node is None and error is not None and client_saw.startswith("error")


def test_peer_node_id_needs_a_verified_certificate() -> None:
    class NoCert:
        def getpeercert(self) -> dict[str, object]:
            return {}

    with pytest.raises(pki.PKIError):
        pki.peer_node_id(NoCert())
    with pytest.raises(pki.PKIError):
        pki.peer_node_id(None)
