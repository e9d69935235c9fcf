"""Waiting for a worker group's ranks, and naming the one that failed.

A rank can fail three ways while the driver waits: its process dies (the OOM killer, a signal, a crash),
its code raises, or it stops answering (a hung collective, a deadlock). :func:`gather` waits for one
result at a time, so a dead rank is reported at once even while its peers hang in a collective waiting
for it, and raises one :class:`~dpo_rl.errors.WorkerFailed` naming the role, the rank, its process,
the likely cause and its log. Errors a worker raises on purpose (:class:`~dpo_rl.errors.ConfigError`,
:class:`~dpo_rl.errors.TrainingStopped`, ``FloatingPointError``) reach the caller as themselves,
without the remote traceback.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from dpo_rl.config.resolution import ROLE_SECTIONS
from dpo_rl.errors import ConfigError, TrainingStopped, WorkerFailed

#: Worker exceptions that carry a message meant for the user: re-raised as they are.
MEANT_FOR_THE_USER = (ConfigError, TrainingStopped, WorkerFailed, FloatingPointError)


@dataclass(frozen=True)
class RankProcess:
    """Where one rank of a role runs (for messages)."""

    role: str
    rank: int
    pid: Optional[int] = None
    node: Optional[str] = None

    def describe(self) -> str:
        where = f", pid {self.pid} on {self.node}" if self.pid is not None else ""
        return f"the {self.role} group's rank {self.rank}{where}"


def worker_logs(pid: Optional[int], logs_dir: Optional[str]) -> list[str]:
    """Ray's stderr log of the worker process ``pid`` (``worker-*-<pid>.err``, its stdout ``.out`` beside it) in
    ``logs_dir``."""
    if pid is None or not logs_dir:
        return []
    return sorted(glob.glob(os.path.join(logs_dir, f"worker-*-{pid}.err")))


def ray_logs_dir() -> Optional[str]:
    """This Ray session's log directory on the driver's node, if the driver started or joined one."""
    try:
        import ray  # deferred: Ray, only when a run uses it

        return ray._private.worker.global_worker.node.get_logs_dir_path()  # noqa: SLF001 - no public accessor
    except Exception:  # noqa: BLE001 - a message helper: no log directory is not an error
        return None


def exit_detail(error_text: str) -> str:
    """Ray's one-line reason a worker process ended ("Worker exit detail: ..."), without its advice."""
    marker = "Worker exit detail:"
    if marker not in error_text:
        return error_text.strip().splitlines()[0] if error_text.strip() else "no reason given"
    detail = error_text.split(marker, 1)[1].strip()
    return detail.split(" Some common causes", 1)[0].strip().rstrip(".")


def config_section(role: str) -> str:
    """The config section of a group's role (the online actor's ``actor`` and ``rollout`` groups are
    ``actor_rollout``'s ranks)."""
    return ROLE_SECTIONS.get({"actor": "actor_rollout", "rollout": "actor_rollout"}.get(role, role), role)


def death_message(process: RankProcess, what: str, error_text: str, logs: list[str]) -> str:
    """One message for a rank whose process died during ``what``."""
    log = f"; its log: {' and '.join(logs)} (and .out)" if logs else ""
    return (f"{process.describe()} died during {what} ({exit_detail(error_text)}): most often the kernel's OOM killer "
            f"(check `dmesg | grep -i -e oom -e killed`; lower {config_section(process.role)}.micro_batch_size or use "
            f"more ranks) or a signal sent to it{log}")


def stuck_message(stuck: list[RankProcess], done: list[RankProcess], what: str, timeout_s: float,
                  logs: list[str]) -> str:
    """One message for ranks that did not answer ``what`` within ``timeout_s``."""
    names = ", ".join(p.describe() for p in stuck)
    finished = f" ({len(done)} other rank(s) finished)" if done else ""
    pids = " ".join(str(p.pid) for p in stuck if p.pid is not None)
    dump = f"; `py-spy dump --pid {pids}` shows where it waits" if pids else ""
    log = f"; log: {' and '.join(logs)}" if logs else ""
    return (f"{names} did not answer {what} within ray.call_timeout_s={timeout_s:g} s{finished}: a hung collective "
            f"(a peer died or never joined), a deadlock or a stalled disk{dump}{log}; if the call is only slow, raise "
            "ray.call_timeout_s (0 waits forever)")


def raised_message(process: RankProcess, what: str, cause: BaseException) -> str:
    return f"{process.describe()} raised {type(cause).__name__} in {what}: {cause}"


def gather(refs: list, processes: list[RankProcess], what: str, timeout_s: float = 0.0) -> list[Any]:
    """``ray.get(refs)`` (one ref per rank, in the order of ``processes``), failing fast and by name.

    Waits for one ref at a time: the first rank to die or raise ends the wait, even while the others are
    blocked in a collective with it; when ``timeout_s`` (> 0) passes first, the ranks still silent are named.
    """
    import ray  # deferred: Ray, only when a run uses it
    from ray.exceptions import RayActorError, RayTaskError  # deferred: Ray, only when a run uses it

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    remaining = list(refs)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while remaining:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=left, fetch_local=False)
        if not ready:
            stuck = [processes[index[r]] for r in remaining]
            done = [p for p in processes if p not in stuck]
            logs_dir = ray_logs_dir()
            raise WorkerFailed(stuck_message(stuck, done, what, timeout_s,
                                             [f for p in stuck for f in worker_logs(p.pid, logs_dir)]))
        for ref in ready:
            process = processes[index[ref]]
            try:
                results[index[ref]] = ray.get(ref)
            except RayActorError as err:
                raise WorkerFailed(death_message(process, what, str(err), worker_logs(process.pid, ray_logs_dir()))
                                   ) from None
            except RayTaskError as err:
                cause = err.cause
                if isinstance(cause, MEANT_FOR_THE_USER):
                    raise cause from None
                raise WorkerFailed(raised_message(process, what, cause) + f"\n{err}") from None
    return results
