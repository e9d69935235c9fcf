"""The project's own errors. ``ray_gpt.py`` prints each as one message (no traceback) and exits 2.

* :class:`ConfigError`: bad configuration, every problem found (not just the first), before anything starts.
* :class:`RunFailed`: a run that could not go on; its kinds say why (a deliberate stop, a dead or silent
  worker, a cluster that would not start).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Raised once with all configuration problems; each names key, value, rule and fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")

    def __reduce__(self):  # raised in a Ray worker, it reaches the driver by pickle: rebuild it from its problems
        return type(self), (self.problems,)


class RunFailed(RuntimeError):
    """A run could not go on; the message says why and what to do.

    ``resumable``: a checkpoint of this run exists, so rerunning with ``training.resume=auto`` continues it."""

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable

    def __reduce__(self):  # keyword arguments survive the trip from a Ray worker
        return _rebuild_run_failed, (type(self), str(self), self.resumable)


class TrainingStopped(RunFailed):
    """A run stopped mid-training on purpose: a non-finite step, a failed worker, Ctrl-C."""


class Interrupted(TrainingStopped):
    """The user pressed Ctrl-C (SIGINT) during training (exit status 130, as for any interrupted command)."""


class WorkerFailed(RunFailed):
    """A rank of a worker group died, raised, or did not answer within ``ray.call_timeout_s``; the message names
    the role, the rank, its process and where its log is."""


class ClusterUnavailable(RunFailed):
    """Ray could not be started (or joined) within its time budget."""


class NothingToDo(Exception):
    """The run asked for is finished already (its output directory says so); not a failure (exit 0)."""


def _rebuild_run_failed(kind: type, message: str, resumable: bool) -> RunFailed:
    return kind(message, resumable=resumable)
