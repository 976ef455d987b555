"""Every cloud's protocol peer at once, each registered the way its page in docs/clouds/
says, for the multi-cloud example and the tests that span the clouds.

    clouds = start_clouds(folder)                  # aws, openstack, gce, azure, do
    write_registrations(ws, clouds)                # providers/NAME.yaml for each
    env = environment(clouds)                      # what orch needs to reach them
    ...
    stop_clouds(clouds)                            # every peer and its nodes gone

As a process (``python -m tests.peers.clouds --folder DIR --workspace WS``, what
examples/multi-cloud/run.sh starts): the peers start, the registrations are written
into WS/providers/, DIR/env.sh exports the environment, ``ready`` is printed, and on
SIGTERM every peer stops, its nodes with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.moto_ec2 import FAKE_CREDENTIALS, ec2_provider_yaml, start_moto
from tests.helpers.moto_ec2 import PLUGIN as EC2_PLUGIN

REPO = Path(__file__).resolve().parents[2]
NAMES = ("aws", "openstack", "gce", "azure", "do")
"""The provider names the clouds are registered under."""


@dataclass
class Cloud:
    """One running peer: the provider it is registered as, and how to reach it."""

    provider: str
    registration: dict[str, Any]  # providers/NAME.yaml, as YAML's JSON subset
    env: dict[str, str] = field(default_factory=dict)  # what the registration's references need
    plugins: list[str] = field(default_factory=list)  # ORCH_DRIVER_PLUGINS entries (test adapters)
    stops: list[Callable[[], None]] = field(default_factory=list)  # in order


def _aws(folder: Path) -> Cloud:
    from tests.peers.ec2 import BackedEC2

    moto = start_moto(folder=folder / "moto")
    proxy = BackedEC2(moto.port, folder / "instances").start()
    registration = json.loads(ec2_provider_yaml(proxy.port, backed=True))
    return Cloud("aws", registration, dict(FAKE_CREDENTIALS), [EC2_PLUGIN], [proxy.stop, moto.stop])


def _openstack(folder: Path) -> Cloud:
    from tests.peers.openstack import PASSWORD, PROJECT, USER, start_peer

    peer = start_peer(folder)
    secret = folder / "openstack-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    registration = {"driver": "openstack",
                    "options": {"ex_force_auth_url": peer.auth_url, "ex_force_auth_version": "3.x_password",
                                "ex_tenant_name": PROJECT, "ex_domain_name": "Default",
                                "ex_force_service_region": "RegionOne"},
                    "credentials": {"key": "env:OS_USERNAME", "secret": f"file:{secret}"}}
    return Cloud("openstack", registration, {"OS_USERNAME": USER}, [], [peer.stop])


def _gce(folder: Path) -> Cloud:
    from tests.peers.gce import ServiceAccount, registration, start_peer

    account = ServiceAccount.generate("orch-multi-cloud")
    peer = start_peer(folder, account)
    return Cloud("gce", registration(peer, account, folder / "service-account.json"), {}, [], [peer.stop])


def _azure(folder: Path) -> Cloud:
    from tests.peers.azure import start_azure

    peer = start_azure(folder)
    env = {"ORCH_AZURE_CLIENT_ID": peer.client_id, "SSL_CERT_FILE": str(peer.ca_file)}
    return Cloud("azure", peer.registration("ORCH_AZURE_CLIENT_ID", ssh_user="root"), env, [], [peer.stop])


def _do(folder: Path) -> Cloud:
    from tests.peers.digitalocean import IMAGES, start_peer
    from tests.peers.digitalocean import PLUGIN as DO_PLUGIN

    peer = start_peer(folder)
    image = next(slug for slug, *_ in IMAGES.values())
    registration = {"driver": "dopeer", "image": image, "credentials": {"key": "env:DO_TOKEN"},
                    "options": {"host": "127.0.0.1", "port": peer.port, "secure": False}}
    return Cloud("do", registration, {"DO_TOKEN": peer.token}, [DO_PLUGIN], [peer.stop])


_STARTERS: dict[str, Callable[[Path], Cloud]] = {
    "aws": _aws, "openstack": _openstack, "gce": _gce, "azure": _azure, "do": _do}


def start_clouds(folder: Path, names: Sequence[str] = NAMES) -> list[Cloud]:
    """Start the peers of ``names`` under ``folder`` (a subfolder each), in parallel;
    if one fails, the others are stopped and the error raised."""
    started: dict[str, Cloud] = {}
    failed: list[BaseException] = []

    def start(name: str) -> None:
        try:
            started[name] = _STARTERS[name](folder / name)
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clouds = [started[name] for name in names if name in started]
    if failed:
        stop_clouds(clouds)
        raise failed[0]
    return clouds


def stop_clouds(clouds: Sequence[Cloud]) -> None:
    """Stop every peer (each stops its nodes), whatever fails on the way."""
    problems = []
    for cloud in clouds:
        for stop in cloud.stops:
            try:
                stop()
            except Exception as exc:
                problems.append(f"{cloud.provider}: {exc}")
    if problems:
        raise RuntimeError("; ".join(problems))


def environment(clouds: Sequence[Cloud]) -> dict[str, str]:
    """The environment variables orch needs (set beside os.environ): each cloud's, the
    test adapters as plugins, the repository on PYTHONPATH (the adapters live in tests/)."""
    env: dict[str, str] = {}
    for cloud in clouds:
        env.update(cloud.env)
    plugins = [p for cloud in clouds for p in cloud.plugins]
    if plugins:
        env["ORCH_DRIVER_PLUGINS"] = ",".join(plugins)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def write_registrations(providers_dir: Path, clouds: Sequence[Cloud],
                        extra: dict[str, dict[str, Any]] | None = None) -> None:
    """``providers/NAME.yaml`` for each cloud, with ``extra[NAME]``'s fields on top
    (priority, labels, prices, max_nodes...)."""
    for cloud in clouds:
        data = {**cloud.registration, **(extra or {}).get(cloud.provider, {})}
        (providers_dir / f"{cloud.provider}.yaml").write_text(
            f"# {cloud.provider}: libcloud's stock driver, served on this machine by tests/peers\n"
            + json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.clouds", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="where the peers keep their state and nodes")
    parser.add_argument("--workspace", type=Path, required=True, help="the workspace whose providers/ to write")
    parser.add_argument("--extra", type=Path, help="a JSON file: provider name -> fields to add to its registration")
    parser.add_argument("--names", default=",".join(NAMES), help=f"which clouds (default {','.join(NAMES)})")
    args = parser.parse_args(argv)
    extra = json.loads(args.extra.read_text()) if args.extra else None
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    clouds = start_clouds(args.folder, [n for n in args.names.split(",") if n])
    try:
        write_registrations(args.workspace / "providers", clouds, extra)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in environment(clouds).items())
        (args.folder / "env.sh").write_text(exports)
        print("ready", flush=True)
        done.wait()
    finally:
        stop_clouds(clouds)


if __name__ == "__main__":
    main()
