"""How a worker method's calls spread over its group: the contract between workers and worker groups.

Worker classes (:mod:`dpo_rl.workers`) declare each remote method with :func:`register`; the
driver's worker groups (:mod:`dpo_rl.runtime.worker_group`) read the declaration with
:func:`dispatch_of`. Neither side imports the other.

* ``Dispatch.ALL``: every rank gets the same arguments; the group returns the result of the
  first output rank (TP rank 0, last PP stage of DP rank 0).
* ``Dispatch.DP``: the first argument is a :class:`~dpo_rl.batch.Batch`, split over the
  data-parallel ranks; each DP group's output rank returns its shard's result.

**One ownership rule.** Whatever a worker method returns to the driver is owned by the output
rank (TP rank 0 of the last pipeline stage) of its DP group: forward outputs, losses,
metrics, exported weights and checksums alike. Other ranks may return anything (their
results are dropped). The worker groups enforce it: an output rank that returns ``None``
is an error naming the method and the rank, never a ``None`` handed on to the caller.
"""

from __future__ import annotations

import enum
from typing import Callable


class Dispatch(enum.Enum):
    ALL = "all"
    DP = "dp"


def register(dispatch: Dispatch) -> Callable:
    """Declare how a worker method's calls are dispatched."""

    def decorate(fn: Callable) -> Callable:
        fn.dispatch = dispatch  # type: ignore[attr-defined]
        return fn

    return decorate


def dispatch_of(worker_cls: type, method: str) -> Dispatch:
    """The declared dispatch of ``worker_cls.method``; AttributeError when it is not a worker method."""
    fn = getattr(worker_cls, method, None)
    mode = getattr(fn, "dispatch", None)
    if mode is None:
        raise AttributeError(f"{worker_cls.__name__}.{method} is not a registered worker method")
    return mode
