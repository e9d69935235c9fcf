"""Worker groups: N processes of one role, driven by RPCs with declared dispatch.

A worker method declares how a call is spread over the group with
:func:`dpo_rl.dispatch.register`:

* ``Dispatch.ALL`` — every rank gets the same arguments; the group returns the result of
  the first output rank (TP rank 0, last PP stage of DP rank 0).
* ``Dispatch.DP`` — the first argument is a :class:`~dpo_rl.batch.Batch`; it is padded to
  a multiple of the data-parallel size, split into contiguous equal shards, and every
  rank of DP group ``d`` (all its TP/PP ranks) gets shard ``d``. Results come from each
  DP group's output rank, in DP order: Batches are concatenated and trimmed back to the
  input's row count; anything else (metrics) comes from DP rank 0.

:class:`RayWorkerGroup` runs the ranks as Ray actors in a :class:`RolePool`'s placement
groups. :class:`LocalWorkerGroup` wraps one in-process worker (world size 1) with the
same interface, so drivers and tests can run a role without Ray.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from dpo_rl.batch import Batch
from dpo_rl.dispatch import Dispatch, dispatch_of
from dpo_rl.runtime.failures import RankProcess, gather

logger = logging.getLogger(__name__)


def split_for_dp(batch: Batch, dp_size: int) -> tuple[list[Batch], int]:
    """Pad ``batch`` to a multiple of ``dp_size`` and split it; returns (shards, original rows)."""
    padded, _ = batch.pad_to_multiple(dp_size)
    return padded.chunk(dp_size), len(batch)


def collect_dp(outputs_by_dp: list[Any], rows: int) -> Any:
    if outputs_by_dp and isinstance(outputs_by_dp[0], Batch):
        return Batch.concat(outputs_by_dp).trim(rows)
    return outputs_by_dp[0]


class _WorkerGroup:
    """What both group kinds share: ``group.method(...)`` calls a registered worker method."""

    worker_cls: type
    #: whether the workers run in the driver's process (objects pass by reference, no collective across roles)
    in_process: bool = False

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the group following its declared dispatch; blocks for the result."""
        return wait_for(self.call_async(method, *args, **kwargs))

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getattr__(self, method: str) -> Callable:
        if method.startswith("_"):
            raise AttributeError(method)
        dispatch_of(self.worker_cls, method)
        return functools.partial(self.call, method)


class RayWorkerGroup(_WorkerGroup):
    """One role's ranks as Ray actors placed in ``pool``'s bundles."""

    def __init__(self, worker_cls: type, pool, worker_kwargs: dict[str, Any], *, num_threads: int = 1,
                 cpu_niceness: int = 0, call_timeout_s: float = 0.0) -> None:
        """``call_timeout_s``: how long any call (set-up included) may wait for a rank (0 = no limit), after which
        the ranks that did not answer are named (:func:`dpo_rl.runtime.failures.gather`); ``cpu_niceness``: added
        to each rank's process niceness (``lower_cpu_priority``) before it builds its model."""
        import ray  # deferred: Ray, only when a run uses it
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # deferred: Ray, only when a run uses it

        self.worker_cls = worker_cls
        self.role = pool.role
        self.call_timeout_s = call_timeout_s
        world = pool.world_size
        self.world_size = world
        remote_cls = ray.remote(worker_cls)
        self.actors = []
        for rank, (pg, bundle) in enumerate(pool.slots()):
            options: dict[str, Any] = {
                "num_cpus": pool.cpus_per_worker,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle
                ),
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(num_threads)}},
            }
            if pool.device_resource == "GPU":
                options["num_gpus"] = 1
            elif pool.device_resource != "CPU":
                options["resources"] = {pool.device_resource: 1}
            self.actors.append(remote_cls.options(**options).remote(rank=rank, world_size=world, **worker_kwargs))
        unnamed = [RankProcess(self.role, rank) for rank in range(world)]  # named by rank until they answer
        where = gather([a.process_info.remote() for a in self.actors], unnamed,
                       f"{worker_cls.__name__}.process_info", call_timeout_s)
        self.processes = [RankProcess(self.role, rank, pid, node) for rank, (pid, node) in enumerate(where)]
        if cpu_niceness:
            self._gather([a.lower_cpu_priority.remote(cpu_niceness) for a in self.actors], "lower_cpu_priority")
        address, port = self._gather([self.actors[0].rendezvous_endpoint.remote()], "rendezvous_endpoint")[0]
        logger.info("%s: torch.distributed rendezvous at %s:%d (the address of rank 0's node, %s); ranks on nodes %s",
                    self.role, address, port, self.processes[0].node, [p.node for p in self.processes])
        self.ranks = self._gather([a.init_distributed.remote(address, port) for a in self.actors], "init_distributed")
        self.dp_size = self.ranks[0].dp_size
        self._output_actor_by_dp = {r.dp_rank: a for a, r in zip(self.actors, self.ranks) if r.is_output_rank}

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> "_Pending":
        """Start ``method`` on every rank; collect it later with :func:`wait_for`."""
        mode = dispatch_of(self.worker_cls, method)
        if mode is Dispatch.ALL:
            refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
            return _Pending(refs, [self.actors.index(self._output_actor_by_dp[0])], rows=None,
                            what=self._what(method), group=self)
        batch, rest = args[0], args[1:]
        shards, rows = split_for_dp(batch, self.dp_size)
        refs = [getattr(a, method).remote(shards[r.dp_rank], *rest, **kwargs) for a, r in zip(self.actors, self.ranks)]
        order = [self.actors.index(self._output_actor_by_dp[d]) for d in range(self.dp_size)]
        return _Pending(refs, order, rows=rows, what=self._what(method), group=self)

    def _what(self, method: str) -> str:
        return f"{self.worker_cls.__name__}.{method}"

    def _gather(self, refs: list, method: str) -> list:
        """Results of one ref per rank (in rank order), a dead, failing or silent rank named."""
        return gather(refs, self.processes[:len(refs)], f"{self.worker_cls.__name__}.{method}", self.call_timeout_s)

    def shutdown(self, close_timeout_s: float = 60.0) -> None:
        """Let every rank release what outlives a killed process (``close``: e.g. a vLLM engine's files),
        within ``close_timeout_s`` (a rank still busy with a failed run's call never gets to it: the caller gives a
        short one then), then kill the actors."""
        import ray  # deferred: Ray, only when a run uses it

        try:
            ray.get([a.close.remote() for a in self.actors], timeout=close_timeout_s)
        except Exception:  # noqa: BLE001 - a dead or stuck rank must not keep the others alive
            pass
        for actor in self.actors:
            ray.kill(actor)


class _Pending:
    """Refs of one group call and how to collect them."""

    def __init__(self, refs: list, output_indices: list[int], rows: int | None, what: str = "",
                 group: "RayWorkerGroup | None" = None) -> None:
        self.refs, self.output_indices, self.rows, self.what, self.group = refs, output_indices, rows, what, group


def owned_results(outputs: list[Any], what: str, ranks: list[int]) -> list[Any]:
    """The output ranks' results, checked: an output rank owns its result and never returns ``None``
    (:mod:`dpo_rl.dispatch`)."""
    for output, rank in zip(outputs, ranks):
        if output is None:
            raise RuntimeError(f"{what} returned None on its output rank (global rank {rank}); every worker "
                               "method returns its result on TP rank 0 of the last pipeline stage")
    return outputs


def wait_for(pending: "_Pending | _Done") -> Any:
    """Wait for a ``call_async`` result and collect it."""
    if isinstance(pending, _Done):
        return pending.value
    group = pending.group
    results = gather(pending.refs, group.processes, pending.what, group.call_timeout_s)
    return _collected([results[i] for i in pending.output_indices], pending.rows, pending.what, pending.output_indices)


def _collected(outputs: list[Any], rows: int | None, what: str, ranks: list[int]) -> Any:
    """The output ranks' results as the caller sees them: one result, or the DP shards joined."""
    outputs = owned_results(outputs, what, ranks)
    return outputs[0] if rows is None else collect_dp(outputs, rows)


def completed(pending: "_Pending | _Done") -> "_Done":
    """A started call, waited for and kept: :func:`wait_for` then gives its result at once."""
    return _Done(wait_for(pending))


class _Done:
    """An in-process call's result, already computed."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Deferred:
    """A started call's result handed to another group's call as an argument before it is ready; the
    receiving worker calls :meth:`resolve` when it needs the value, and computes meanwhile.

    Its Ray object refs travel inside this object, so Ray does not wait for them before the receiving
    call starts (it would for a ref passed as an argument itself). The receiving call's group must
    not be the one that computes the value unless that call was queued first (one actor runs its calls
    in order)."""

    def __init__(self, pending: "_Pending | _Done") -> None:
        if isinstance(pending, _Done):
            self.refs, self.rows, self.what, self.timeout_s, self._value = [], None, "", 0.0, (pending.value,)
            return
        self.refs = [pending.refs[i] for i in pending.output_indices]
        self.rows, self.what = pending.rows, pending.what
        self.timeout_s = pending.group.call_timeout_s
        self._value: tuple | None = None

    def resolve(self) -> Any:
        """The call's result (collected like :func:`wait_for`'s), waiting for it the first time."""
        if self._value is None:
            import ray  # deferred: Ray, only when a run uses it

            outputs = ray.get(self.refs, timeout=self.timeout_s or None)
            self._value = (_collected(outputs, self.rows, self.what, list(range(len(outputs)))),)
        return self._value[0]


class LocalWorkerGroup(_WorkerGroup):
    """A single in-process worker (world size 1) with the worker-group interface."""

    in_process = True

    def __init__(self, worker_cls: type, worker_kwargs: dict[str, Any]) -> None:
        self.worker_cls = worker_cls
        self.worker = worker_cls(rank=0, world_size=1, **worker_kwargs)
        self.world_size = 1
        address, port = self.worker.rendezvous_endpoint()
        ranks = self.worker.init_distributed(address, port)
        self.ranks = [ranks]
        self.dp_size = 1

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> _Done:
        """Runs the call now (one process); :func:`wait_for` returns its result."""
        dispatch_of(self.worker_cls, method)
        value = getattr(self.worker, method)(*args, **kwargs)
        return _Done(owned_results([value], f"{self.worker_cls.__name__}.{method}", [0])[0])

    def shutdown(self, close_timeout_s: float = 0.0) -> None:
        """Release the worker's resources (in this process: no wait to bound)."""
        self.worker.close()


