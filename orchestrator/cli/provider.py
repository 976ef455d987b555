"""``orch provider``: register clouds and machine pools, and check that they work."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from orchestrator.cli.common import (
    JsonFlag,
    console,
    open_store,
    print_fields,
    print_json,
    print_table,
    workspace,
)
from orchestrator.cli.lazy import lazy
from orchestrator.cli.workspace_cmds import existing_store
from orchestrator.config import known_drivers, load_provider, load_workspace_config, safeyaml
from orchestrator.errors import ConfigError
from orchestrator.provision.cooldowns import active_cooldowns

if TYPE_CHECKING:
    from orchestrator.provision import handle
    from orchestrator.provision import registry as engine
else:
    engine, handle = lazy("orchestrator.provision.registry"), lazy("orchestrator.provision.handle")

app = typer.Typer(help="Register providers (clouds, machine pools) and check them.", no_args_is_help=True)


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} is not KEY=VALUE", field=option, hint=f"write {option} key=value")
        pairs[key.strip()] = value
    return pairs


def _scalar(text: str) -> Any:
    """Option values typed the way orch reads YAML (``5000`` -> 5000, ``false`` -> False,
    ``no`` -> "no": YAML 1.2, see config/safeyaml.py)."""
    try:
        return safeyaml.load(text) if text else ""
    except yaml.YAMLError:
        return text


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Provider name (lower case), also the file name.")],
    driver: Annotated[str, typer.Option("--driver", "-d", help="libcloud driver, or local/netns/hosts.")],
    option: Annotated[list[str], typer.Option("--option", "-o", help="Driver option KEY=VALUE.")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option("--label", "-l", help="Label offered to placement.")] = [],  # noqa: B006
    priority: Annotated[int | None, typer.Option(help="Lower is preferred by ordered placement.")] = None,
    max_nodes: Annotated[int | None, typer.Option("--max-nodes", help="Quota: nodes at most.")] = None,
    credential: Annotated[
        list[str], typer.Option("--credential", "-c", help="KEY=env:VAR or KEY=file:PATH (0600).")
    ] = [],  # noqa: B006
    image: Annotated[str | None, typer.Option(help="Image id or name the nodes boot.")] = None,
    ssh_user: Annotated[str | None, typer.Option("--ssh-user", help="The image's login user (default root).")] = None,
    price: Annotated[
        list[str], typer.Option("--price", help="SIZE=DOLLARS an hour, overriding the driver's price.")
    ] = [],  # noqa: B006
    no_bootstrap: Annotated[
        bool, typer.Option("--no-bootstrap", help="Create and track nodes, never connect to them.")
    ] = False,
    replace: Annotated[bool, typer.Option(help="Overwrite an existing registration.")] = False,
) -> None:
    """Register a provider: write providers/NAME.yaml and record it."""
    ws = workspace(ctx)
    options = {k: _scalar(v) for k, v in _pairs(option, "--option").items()}
    config = engine.build_provider_config(
        name, driver=driver, options=options, credentials=_pairs(credential, "--credential"),
        labels=label, priority=priority, max_nodes=max_nodes, image=image, ssh_user=ssh_user,
        prices=_pairs(price, "--price"), bootstrap=False if no_bootstrap else None,
    )
    with open_store(ws) as store:
        path = engine.add_provider(ws, store, config, replace=replace)
    console.print(f"provider {name} registered ({ws.relative(path)}); check it with `orch provider check {name}`")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the workspace's providers."""
    ws = workspace(ctx)
    cfg = load_workspace_config(ws)
    if cfg.errors and not cfg.providers:
        cfg.raise_first()
    configs = sorted(cfg.providers.values(), key=lambda p: (p.priority, p.name))
    with existing_store(ws) as store:
        cooling = active_cooldowns(store) if store else {}

    def cooling_for(name: str) -> dict[str, Any]:
        return {k.split("/", 1)[1]: v for k, v in cooling.items() if k.split("/", 1)[0] == name}

    if as_json:
        print_json([{**c.model_dump(mode="json"), "cooldowns": cooling_for(c.name)} for c in configs])
        return
    now = time.time()
    rows = [
        (c.name, c.driver, c.priority, "" if c.max_nodes is None else c.max_nodes, ", ".join(c.labels),
         ", ".join(f"{k}={v}" for k, v in c.credentials.items()),
         ", ".join(f"{where} ({v['until'] - now:.0f}s)" for where, v in cooling_for(c.name).items()))
        for c in configs
    ]
    print_table("providers", ["name", "driver", "priority", "max nodes", "labels", "credentials", "cooling down"],
                rows, empty="no providers; add one with `orch provider add NAME --driver local`")


@app.command("show")
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Provider name.")],
         as_json: JsonFlag = False) -> None:
    """Show one provider's registration (credential references, never values)."""
    config = load_provider(workspace(ctx), name)
    if as_json:
        print_json(config)
        return
    data = config.model_dump(mode="json")
    print_fields(f"provider {name}", [(k, v) for k, v in data.items() if v not in ({}, [], None)])


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Provider name.")]) -> None:
    """Unregister a provider (refused while it has nodes)."""
    ws = workspace(ctx)
    with open_store(ws) as store:
        engine.remove_provider(ws, store, name)
    console.print(f"provider {name} removed")


@app.command("check")
def check(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Provider name.")],
          as_json: JsonFlag = False) -> None:
    """Build the provider's driver and list its sizes and locations, or say what is wrong."""
    result = engine.check_provider(workspace(ctx), name)
    if as_json:
        print_json(result)
        return
    rows = [(s.id, s.name, s.cpus or "", s.ram_mb, s.disk_gb, "" if s.price is None else s.price)
            for s in result.sizes]
    print_table(f"provider {name} ({result.driver}): sizes", ["id", "name", "cpus", "ram MB", "disk GB", "$/h"],
                rows, empty="no sizes offered")
    console.print(f"locations: {', '.join(result.locations) or 'none'}")
    console.print(f"provider {name} OK")


@app.command("refresh")
def refresh(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Providers to refresh (default: all).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fetch each provider's sizes, images and locations now and cache them for planning."""
    ws = workspace(ctx)
    configs = [load_provider(ws, n) for n in names] if names else list(load_workspace_config(ws).providers.values())
    with open_store(ws) as store:
        catalogues = handle.refresh_catalogues(ws, store, configs)
    if as_json:
        print_json({name: {"sizes": len(c.sizes), "locations": list(c.locations), "images": len(c.images),
                           "fetched_at": c.fetched_at} for name, c in catalogues.items()})
        return
    for name, catalogue in catalogues.items():
        console.print(f"{name}: {len(catalogue.sizes)} sizes, {len(catalogue.images)} images, "
                      f"locations {', '.join(catalogue.locations) or 'none'}")


@app.command("drivers")
def drivers(as_json: JsonFlag = False) -> None:
    """List the driver names a provider may use."""
    names = list(known_drivers())
    if as_json:
        print_json(names)
        return
    console.print("\n".join(names))
