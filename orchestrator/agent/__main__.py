"""``python3 -m orch_agent COMMAND [--config agent.json] [--current]`` (``orchestrator.agent`` here).

    run        the agent itself, in the foreground (the supervisor's child)
    supervise  the supervisor: runs the agent and starts it again when it dies
    ensure     start a supervisor unless one runs this code and config ("running"/"started")
    status     exit 0 while a supervisor runs (``--current``: this code and config, else 3)
    stop       end the supervisor, the agent and its ports

``--config`` defaults to ``agent.json`` in the folder above this package, which is
where bootstrap puts it on a node (``~/orch/agent/agent.json``).  The arguments are
parsed by hand: argparse alone would double the start-up time, which every node's
bootstrap pays.
"""

from __future__ import annotations

import os
import sys

COMMANDS = ("run", "supervise", "ensure", "status", "stop")
USAGE = f"usage: python3 -m orch_agent {{{','.join(COMMANDS)}}} [--config agent.json] [--current]"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agent.json")
    command, current = None, False
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(__doc__.strip() if __doc__ else USAGE)
            return 0
        if arg == "--config" and args:
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--current":
            current = True
        elif arg in COMMANDS and command is None:
            command = arg
        else:
            print(f"{USAGE}\norch_agent: unexpected argument {arg!r}", file=sys.stderr)
            return 2
    if command is None:
        print(USAGE, file=sys.stderr)
        return 2
    from .config import ConfigError

    try:
        if command == "run":
            from .launch import run

            return run(config)
        from . import supervisor

        if command == "supervise":
            return supervisor.supervise(config)
        if command == "ensure":
            return supervisor.ensure(config)
        if command == "status":
            return supervisor.status(config, current=current)
        return supervisor.stop(config)
    except ConfigError as exc:
        print(f"orch_agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
