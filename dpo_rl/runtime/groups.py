"""Creating and releasing a run's worker groups, as Ray actors in placement groups or in-process."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from dpo_rl.config.resolution import ResolvedConfig
from dpo_rl.errors import ConfigError
from dpo_rl.runtime.cluster import (
    machine_cores,
    oversubscription_warning,
    start_ray,
    stop_ray,
)
from dpo_rl.runtime.resource_pool import (
    check_fits,
    create_pools,
    remove_pools,
    total_demand,
)
from dpo_rl.runtime.worker_group import LocalWorkerGroup, RayWorkerGroup

logger = logging.getLogger(__name__)

#: How long ranks get to ``close`` when the run is being torn down after a failure (a rank still busy with the
#: failed call never gets to it, so this only bounds the wait).
CLOSE_AFTER_FAILURE_S = 5.0


class GroupFactory:
    """Creates a run's worker groups, as Ray actors in placement groups or in this process, and releases them.

    Used as a context manager: Ray starts on entry (sized for every pool of the run) and every
    group still alive, its placement group and Ray itself are released on exit.
    """

    def __init__(self, c: ResolvedConfig, pools: dict, *, use_ray: bool, coexisting: bool = True) -> None:
        """``coexisting``: all pools are held at once (checked against the cluster together on entry);
        otherwise each must fit on its own (a group is released before the next is created)."""
        self.c, self.pools, self.use_ray, self.coexisting = c, pools, use_ray, coexisting
        self.groups: dict[str, Any] = {}

    def __enter__(self) -> "GroupFactory":
        if self.use_ray:
            pools = list(self.pools.values())
            demand = total_demand(pools) if self.coexisting else {
                k: max(p.demand().get(k, 0.0) for p in pools) for k in total_demand(pools)}
            c = self.c
            if not (c.ray.address or os.environ.get("RAY_ADDRESS")):
                warning = oversubscription_warning(demand.get("CPU", 0.0), machine_cores(), c.ray.num_cpus)
                if warning:
                    logger.warning("%s", warning)
            start_ray(address=c.ray.address, num_cpus=c.ray.num_cpus or math.ceil(demand.get("CPU", 1)),
                      include_dashboard=c.ray.include_dashboard, dashboard_host=c.ray.dashboard_host,
                      home_dir=c.ray.home_dir, connect_timeout_s=c.ray.connect_timeout_s,
                      start_timeout_s=c.ray.start_timeout_s)
            try:
                for together in ([pools] if self.coexisting else [[p] for p in pools]):
                    check_fits(together)
            except ConfigError:
                stop_ray()  # __exit__ does not run when __enter__ raises
                raise
        return self

    def create(self, name: str, worker_cls: type, kwargs: dict[str, Any]):
        if self.use_ray:
            create_pools([self.pools[name]], self.c.ray.resource_timeout_s)
            role = kwargs["role"]
            group = RayWorkerGroup(worker_cls, self.pools[name], kwargs, num_threads=role.num_threads,
                                   cpu_niceness=role.cpu_niceness, call_timeout_s=self.c.ray.call_timeout_s)
        else:
            p = kwargs["parallel"]
            if p.tensor_model_parallel_size * p.pipeline_model_parallel_size != 1:
                raise ConfigError([f"running {name} in-process needs TP = PP = 1; use Ray for parallel roles"])
            group = LocalWorkerGroup(worker_cls, kwargs)
        self.groups[name] = group
        return group

    def release(self, name: str, close_timeout_s: float = 60.0) -> None:
        """Shut a group down and free its placement group (its devices are free for the next group)."""
        group = self.groups.pop(name)
        group.shutdown(close_timeout_s)
        if self.use_ray:
            remove_pools([self.pools[name]])

    def __exit__(self, exc_type, *exc) -> None:
        close_timeout_s = 60.0 if exc_type is None else CLOSE_AFTER_FAILURE_S
        try:
            for name in list(self.groups):
                self.release(name, close_timeout_s)
        finally:
            if self.use_ray:
                stop_ray()
