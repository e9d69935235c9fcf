"""Running ``ray_gpt.py`` as a user does, and checking that nothing of the run is left behind.

Every process the command starts (Hydra, Ray's head processes, agents, workers) inherits the environment,
so a mark put there finds them all afterwards, even those reparented to init.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "DPO_RL_TEST_RUN"
#: A message fits on one screen.
SCREEN_LINES = 25


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    mark: str

    def message(self) -> str:
        """The lines ``ray_gpt.py`` itself printed last (from its ``ray_gpt.py:`` line on): on stderr, or on stdout
        for "nothing to do"."""
        for text in (self.stderr, self.stdout):
            start = text.rfind("ray_gpt.py:")
            if start >= 0:
                return text[start:]
        return ""


def start_cli(*args: str, cwd: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """``python ray_gpt.py ARGS`` in its own session (a terminal's Ctrl-C reaches its whole process group),
    with SIGINT's default disposition, as a terminal's shell starts a command: a child inherits an ignored
    SIGINT from its parent (Python then installs no KeyboardInterrupt), and this test process may have been
    left ignoring it by a library an earlier test loaded."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: mark})
    # set for the fork (sigaction, whatever Python believes is installed: C code may have changed it), restored after
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        process = subprocess.Popen([sys.executable, str(ROOT / "ray_gpt.py"), *args], cwd=cwd, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    return process, mark


def run_cli(*args: str, timeout: float = 120.0) -> CliResult:
    start = time.monotonic()
    process, mark = start_cli(*args)
    stdout, stderr = process.communicate(timeout=timeout)
    return CliResult(process.returncode, stdout, stderr, time.monotonic() - start, mark)


def finish(process: subprocess.Popen, mark: str, started: float, timeout: float = 120.0) -> CliResult:
    stdout, stderr = process.communicate(timeout=timeout)
    return CliResult(process.returncode, stdout, stderr, time.monotonic() - started, mark)


def leftover_processes(mark: str, wait_s: float = 20.0) -> list[str]:
    """Processes still carrying ``mark`` after up to ``wait_s`` (empty: the run left nothing behind)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get(MARK) == mark and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.pid} {process.name()}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


def assert_one_clear_message(result: CliResult, *names: str, returncode: int = 2, within_s: float = 60.0) -> str:
    """The run ended with ``returncode`` in time, printed one message (no traceback, one screen) naming every
    one of ``names``, and left no process behind; returns the message."""
    message = result.message()
    assert result.returncode == returncode, (result.returncode, result.stderr[-3000:])
    assert result.seconds < within_s, result.seconds
    assert message, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(message.splitlines()) <= SCREEN_LINES, message
    for name in names:
        assert name in message, (name, message)
    assert leftover_processes(result.mark) == []
    return message
