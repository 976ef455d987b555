"""The real ``ansible`` (ansible-core, installed with the dev extras) with a config, home,
temp and ControlPath folders of its own, so that nothing lands in ~/.ansible, and host
keys checked against the pinned known_hosts that ``orch inventory`` writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ANSIBLE = Path(sys.executable).with_name("ansible")


def ansible_env(home: Path, **extra: str) -> dict[str, str]:
    """Make ``home``'s folders (``home``, ``local-tmp``, ``remote-tmp``, ``cp`` for the ssh
    ControlPath) and its ``ansible.cfg``; the environment that runs ansible there (no
    ANSIBLE_* variable of ours), with ``extra`` added."""
    for name in ("home", "local-tmp", "remote-tmp", "cp"):
        (home / name).mkdir(parents=True, exist_ok=True)
    config = home / "ansible.cfg"
    config.write_text("[defaults]\nhost_key_checking = True\nretry_files_enabled = False\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_HOME=str(home / "home"),
        ANSIBLE_LOCAL_TEMP=str(home / "local-tmp"),
        # Ansible expands ~ as ~user (the passwd home: the real one for local nodes), not $HOME.
        ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
        ANSIBLE_SSH_CONTROL_PATH_DIR=str(home / "cp"),
        ANSIBLE_HOST_KEY_CHECKING="True",
        ANSIBLE_NOCOLOR="1",
    )
    env.update(extra)
    return env


def close_control_masters(control_dir: Path) -> None:
    """Close the ssh ControlPersist masters ansible left in ``control_dir``."""
    if not control_dir.is_dir():
        return
    for socket_path in control_dir.iterdir():
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "orch-node"],
                       capture_output=True, timeout=10, check=False)
