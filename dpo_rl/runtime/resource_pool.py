"""Placement groups for each role's processes, with a bounded wait.

A role's pool lists processes per node (``[2]``: two on one node; ``[8, 8]``: eight on each
of two nodes). Each node entry becomes one STRICT_PACK placement group whose bundles ask
for the configured device resource (``GPU``/``NPU``: one each) plus CPUs. If the cluster
cannot hold every pool, :func:`create_pools` fails within ``timeout_s`` naming what is
missing; it never hangs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpo_rl.errors import ConfigError


@dataclass
class RolePool:
    """One role's processes and where they run."""

    role: str
    processes_per_node: list[int]
    device_resource: str = "CPU"
    cpus_per_worker: float = 1.0
    placement_groups: list[Any] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(self.processes_per_node)

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.device_resource != "CPU":
            bundle[self.device_resource] = 1.0
        return bundle

    def demand(self) -> dict[str, float]:
        """Total resources this pool asks for."""
        return {k: v * self.world_size for k, v in self.bundle().items()}

    def slots(self) -> list[tuple[Any, int]]:
        """(placement group, bundle index) of every rank, in rank order."""
        return [(pg, i) for pg, n in zip(self.placement_groups, self.processes_per_node) for i in range(n)]


def total_demand(pools: list[RolePool]) -> dict[str, float]:
    total: dict[str, float] = {}
    for pool in pools:
        for key, value in pool.demand().items():
            total[key] = total.get(key, 0.0) + value
    return total


def _describe(pools: list[RolePool]) -> str:
    return ", ".join(f"{p.role}={p.processes_per_node} x {p.bundle()}" for p in pools)


def check_fits(pools: list[RolePool]) -> None:
    """Raise ConfigError at once when ``pools`` together ask for more than the Ray cluster holds."""
    import ray  # deferred: Ray, only when a run uses it

    cluster = ray.cluster_resources()
    demand = total_demand(pools)
    short = {k: (v, cluster.get(k, 0.0)) for k, v in demand.items() if cluster.get(k, 0.0) < v}
    if short:
        missing = "; ".join(f"{k}: need {need:g}, cluster has {have:g}" for k, (need, have) in short.items())
        raise ConfigError([
            f"resource_pool asks for more than the Ray cluster holds ({missing}); pools: {_describe(pools)}. "
            "Shrink resource_pool, add nodes (ray start --address=...), or raise ray.num_cpus for a local cluster"
        ])


def create_pools(pools: list[RolePool], timeout_s: float) -> None:
    """Create and wait for every pool's placement groups; raise ConfigError if they cannot fit."""
    import ray  # deferred: Ray, only when a run uses it
    from ray.exceptions import GetTimeoutError  # deferred: Ray, only when a run uses it
    from ray.util.placement_group import placement_group, remove_placement_group  # deferred: Ray, only when a run uses it

    check_fits(pools)
    cluster = ray.cluster_resources()
    demand = total_demand(pools)
    created = []
    for pool in pools:
        pool.placement_groups = [
            placement_group([pool.bundle()] * n, strategy="STRICT_PACK", name=f"dpo_rl_{pool.role}_{i}")
            for i, n in enumerate(pool.processes_per_node) if n > 0
        ]
        pool.processes_per_node = [n for n in pool.processes_per_node if n > 0]
        created.extend(pool.placement_groups)
    try:
        ray.get([pg.ready() for pg in created], timeout=timeout_s)
    except GetTimeoutError:
        available = ray.available_resources()
        for pg in created:
            remove_placement_group(pg)
        raise ConfigError([
            f"placement groups were not ready within ray.resource_timeout_s={timeout_s:g}s: pools "
            f"{_describe(pools)} need {demand} in total (each pool's node entry on one node); the cluster has "
            f"{ {k: cluster[k] for k in demand if k in cluster} } with {available} free. Free resources, shrink "
            "the pools or add nodes"
        ]) from None


def remove_pools(pools: list[RolePool]) -> None:
    from ray.util.placement_group import remove_placement_group  # deferred: Ray, only when a run uses it

    for pool in pools:
        for pg in pool.placement_groups:
            remove_placement_group(pg)
        pool.placement_groups = []
