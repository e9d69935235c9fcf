"""Take a local Ray cluster's processes down with the driver, however the driver ends.

Ray ties its head processes to the driver that started them (the kernel ends them with it), but not
their children: after a SIGKILL of the driver its dashboard and runtime-env agents lived on for about a
minute, and busy workers until they noticed. So every process of a cluster this project starts carries
a mark in its environment (:data:`MARK_ENV`, set only while ``ray.init`` spawns them; Ray's processes
pass their environment to the workers they start), and a small watcher process, in its own session so
a terminal's Ctrl-C does not reach it, holds the read end of a pipe from the driver. When the pipe
closes (the driver stopped Ray, exited, or was killed) the watcher kills every process still carrying
the mark, then exits.

Run as a script (``python reaper.py MARK``): it imports nothing of the project, only psutil.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

#: Environment variable whose value marks one cluster's processes.
MARK_ENV = "DPO_RL_RAY_CLUSTER"


def marked_processes(mark: str, exclude: tuple[int, ...] = ()) -> list:
    """Live processes whose (initial) environment holds ``MARK_ENV=mark``."""
    import psutil  # deferred: only the watcher and tests scan processes

    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid in exclude:
            continue
        try:
            if process.environ().get(MARK_ENV) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_marked(mark: str, budget_s: float = 10.0, exclude: tuple[int, ...] = ()) -> int:
    """SIGKILL every process marked ``mark`` (again, for ones started meanwhile) until none is left or
    ``budget_s`` passes; returns how many were killed."""
    import psutil  # deferred: only the watcher and tests scan processes

    killed, deadline = 0, time.monotonic() + budget_s
    while time.monotonic() < deadline:
        processes = marked_processes(mark, exclude)
        if not processes:
            break
        for process in processes:
            try:
                process.kill()
                killed += 1
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=1.0)
    return killed


class Reaper:
    """The driver's side: start the watcher, and (on a clean stop) close the pipe and wait for it."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
        self.process: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mark], stdin=subprocess.PIPE, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def finish(self, timeout_s: float = 15.0) -> None:
        """Close the pipe: the watcher kills what is left of the cluster and exits (waited for here)."""
        if self.process is None:
            return
        try:
            self.process.stdin.close()
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None


def watch(mark: str) -> None:
    """The watcher: block until the driver's end of stdin closes, then kill the marked processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()
    kill_marked(mark, exclude=(os.getpid(),))


if __name__ == "__main__":
    watch(sys.argv[1])
