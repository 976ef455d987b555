"""Time to plan N nodes over many providers: `python bench/plan.py [--nodes 10000] [--quick]`.

Builds 50 providers x 200 sizes (3 locations each, mixed labels, quotas and prices),
then times `plan_placement` for every policy, best of --repeat runs, and prints a
table with the target (<= 100 ms for 10,000 nodes).  ``--quick`` (what CI runs,
tests/integration/test_benches.py): every policy on a small plan, once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from rich.console import Console
from rich.table import Table

from orchestrator.config import NodeFamily
from orchestrator.provision.placement import FleetNode, ProviderCapabilities, SizeOffer, plan_placement

TARGET_MS = 100.0
QUICK = {"nodes": 500, "providers": 10, "sizes": 20, "repeat": 1}
"""``--quick``: every policy, as small as it goes."""


def make_providers(n_providers: int, n_sizes: int, seed: int = 1) -> list[ProviderCapabilities]:
    rng = random.Random(seed)
    providers = []
    for p in range(n_providers):
        sizes = tuple(
            SizeOffer(id=f"s{s}", name=f"s{s}", cpus=rng.choice([1, 2, 4, 8, 16]), ram_mb=rng.choice([512, 2048, 8192]),
                      disk_gb=rng.choice([10, 50, 200]), arch="x86_64", hourly_price=round(rng.uniform(0, 2), 3))
            for s in range(n_sizes)
        )
        providers.append(ProviderCapabilities(
            name=f"p{p:02d}", driver="dummy", labels=frozenset(rng.sample(["private", "public", "eu", "us"], 2)),
            priority=rng.randint(1, 100), max_nodes=rng.choice([None, 200, 500]),
            locations=(f"r{p}-a", f"r{p}-b", f"r{p}-c"), sizes=sizes, image="img",
        ))
    return providers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--providers", type=int, default=50)
    parser.add_argument("--sizes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="every policy, as small as it goes (CI): "
                        + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args(argv)
    providers = make_providers(args.providers, args.sizes)
    fleet = [FleetNode(f"n{i}", "other", f"p{i % args.providers:02d}", f"r{i % args.providers}-a")
             for i in range(1000)]
    table = Table(title=f"plan {args.nodes} nodes over {args.providers} providers x {args.sizes} sizes "
                        f"(1,000 existing nodes; best of {args.repeat})", title_justify="left")
    for column in ("policy", "best ms", "median ms", "nodes planned", f"target <= {TARGET_MS:.0f} ms"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for policy in ("ordered", "cheapest", "spread", "pack"):
        family = NodeFamily.model_validate({
            "name": "workers", "release": "primes", "count": args.nodes,
            "demands": {"cpus": 2, "ram_mb": 1024, "prefer_labels": ["eu"]}, "placement": {"policy": policy},
        })
        times = []
        planned = 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan = plan_placement(family, args.nodes, providers, fleet)
            times.append((time.perf_counter() - start) * 1000)
            planned = len(plan.requests)
        best = min(times)
        table.add_row(policy, f"{best:.1f}", f"{statistics.median(times):.1f}", str(planned),
                      "met" if best <= TARGET_MS else "MISSED")
    Console().print(table)


if __name__ == "__main__":
    main()
