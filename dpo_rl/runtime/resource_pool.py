"""Placement groups for each role's processes, with a bounded wait.

A role's pool lists processes per node (``[2]``: two on one node; ``[8, 8]``: eight on each
of two nodes). Each node entry becomes one STRICT_PACK placement group whose bundles ask
for the configured device resource (``GPU``/``NPU``: one each) plus CPUs; a pool's entries
go to distinct nodes (each entry's group excludes, by Ray's ``ray.io/node-id`` label, the
nodes of the entries placed before it). Before anything is placed, an entry that no node
of the cluster could hold is an error naming the entry; if the cluster cannot hold every
pool at the time, :func:`create_pools` fails within ``timeout_s`` naming what is missing.
It never hangs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dpo_rl.errors import ConfigError

logger = logging.getLogger(__name__)

#: Ray's built-in node label holding each node's id (what a placement group's label selector can exclude).
NODE_ID_LABEL = "ray.io/node-id"


@dataclass
class RolePool:
    """One role's processes and where they run."""

    role: str
    processes_per_node: list[int]
    device_resource: str = "CPU"
    cpus_per_worker: float = 1.0
    config_key: str = ""
    """The config key of this pool's node list, for messages (default ``resource_pool.<role>``)."""
    placement_groups: list[Any] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    """Address of the node each placement group landed on (filled by :func:`create_pools`)."""

    def __post_init__(self) -> None:
        self.config_key = self.config_key or f"resource_pool.{self.role}"

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


@dataclass(frozen=True)
class NodeCapacity:
    """One alive node of the cluster: its address, Ray node id and total resources."""

    address: str
    node_id: str
    resources: dict[str, float]

    def holds(self, need: dict[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in need.items())

    def describe(self, keys) -> str:
        return f"{self.address} ({', '.join(f'{k}={self.resources.get(k, 0.0):g}' for k in keys)})"


def cluster_nodes() -> list[NodeCapacity]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray  # deferred: Ray, only when a run uses it

    return sorted((NodeCapacity(n["NodeManagerAddress"], n["NodeID"], dict(n["Resources"])) for n in ray.nodes()
                   if n["Alive"]), key=lambda node: (node.address, node.node_id))


def per_node_problems(pools: list[RolePool], nodes: list[NodeCapacity]) -> list[str]:
    """What no placement could fix: a node entry larger than every node, or more entries (each its own node) than
    nodes that can hold them. Each problem names the entry (``resource_pool.actor_rollout[1]``). Pure."""
    problems = []
    for pool in pools:
        entries = sorted(((n, i) for i, n in enumerate(pool.processes_per_node) if n > 0), reverse=True)
        keys = list(pool.bundle())
        listing = "; ".join(node.describe(keys) for node in nodes) or "none"
        for rank_by_size, (n, i) in enumerate(entries):
            need = {k: v * n for k, v in pool.bundle().items()}
            holders = [node for node in nodes if node.holds(need)]
            wanted = ", ".join(f"{k}={v:g}" for k, v in need.items())
            if not holders:
                problems.append(
                    f"{pool.config_key}[{i}]={n}: the {n} processes of this node entry need {wanted} on one node, and no "
                    f"node of the cluster has that much (nodes: {listing}). Each entry of {pool.config_key} is one "
                    f"node: split it over more entries (one per node), or give fewer processes")
            elif len(holders) <= rank_by_size:
                problems.append(
                    f"{pool.config_key}={pool.processes_per_node}: its {len(entries)} node entries each need their own "
                    f"node, but only {len(holders)} node(s) can hold {n} process(es) of {wanted} (nodes: {listing}). "
                    f"To run them on one node write [{sum(pool.processes_per_node)}]; otherwise add nodes")
                break
    return problems


def _describe(pools: list[RolePool]) -> str:
    return ", ".join(f"{p.role}={p.processes_per_node} x {p.bundle()}" for p in pools)


def check_fits(pools: list[RolePool]) -> None:
    """Raise ConfigError at once when ``pools`` together ask for more than the Ray cluster holds, or when some node
    entry can never be placed (:func:`per_node_problems`); every such problem in one error."""
    import ray  # deferred: Ray, only when a run uses it

    cluster = ray.cluster_resources()
    demand = total_demand(pools)
    short = {k: (v, cluster.get(k, 0.0)) for k, v in demand.items() if cluster.get(k, 0.0) < v}
    problems = []
    if short:
        missing = "; ".join(f"{k}: need {need:g}, cluster has {have:g}" for k, (need, have) in short.items())
        problems.append(
            f"resource_pool asks for more than the Ray cluster holds ({missing}); pools: {_describe(pools)}. "
            "Shrink resource_pool, add nodes (ray start --address=...), or raise ray.num_cpus for a local cluster")
    problems += per_node_problems(pools, cluster_nodes())
    if problems:
        raise ConfigError(problems)


def create_pools(pools: list[RolePool], timeout_s: float) -> None:
    """Create and wait for every pool's placement groups, one node entry at a time (so each entry can exclude the
    nodes of the entries before it); raise ConfigError if they cannot fit within ``timeout_s``."""
    import ray  # deferred: Ray, only when a run uses it
    from ray.exceptions import GetTimeoutError  # deferred: Ray, only when a run uses it

    check_fits(pools)
    cluster = ray.cluster_resources()
    demand = total_demand(pools)
    deadline = time.monotonic() + timeout_s
    address_of = {node.node_id: node.address for node in cluster_nodes()}
    try:
        for pool in pools:
            _place(pool, deadline, address_of)
    except GetTimeoutError:
        available = ray.available_resources()
        remove_pools(pools)
        raise ConfigError([
            f"placement groups were not ready within ray.resource_timeout_s={timeout_s:g}s: pools "
            f"{_describe(pools)} need {demand} in total (each pool's node entry on one node of its own); the cluster "
            f"has { {k: cluster[k] for k in demand if k in cluster} } with {available} free. Free resources, shrink "
            "the pools or add nodes"
        ]) from None


def _place(pool: RolePool, deadline: float, address_of: dict[str, str]) -> None:
    """Place ``pool``'s node entries in order, each on a node none of the earlier entries uses."""
    import ray  # deferred: Ray, only when a run uses it
    from ray.util.placement_group import placement_group, placement_group_table  # deferred: Ray, only when a run uses it

    pool.processes_per_node = [n for n in pool.processes_per_node if n > 0]
    used: list[str] = []
    for i, n in enumerate(pool.processes_per_node):
        selector = [{NODE_ID_LABEL: f"!in({','.join(used)})"}] * n if used else None
        pg = placement_group([pool.bundle()] * n, strategy="STRICT_PACK", name=f"dpo_rl_{pool.role}_{i}",
                             bundle_label_selector=selector)
        pool.placement_groups.append(pg)
        ray.get(pg.ready(), timeout=max(0.0, deadline - time.monotonic()))
        node_id = placement_group_table(pg)["bundles_to_node_id"][0]
        used.append(node_id)
        pool.nodes.append(address_of.get(node_id, node_id))
    logger.info("%s: %s", pool.config_key, ", ".join(f"{n} process(es) on node {address}"
                                                     for n, address in zip(pool.processes_per_node, pool.nodes)))


def remove_pools(pools: list[RolePool]) -> None:
    from ray.util.placement_group import remove_placement_group  # deferred: Ray, only when a run uses it

    for pool in pools:
        for pg in pool.placement_groups:
            remove_placement_group(pg)
        pool.placement_groups, pool.nodes = [], []
