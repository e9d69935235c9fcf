"""Faults injected into a real online run on Ray, driven as a user drives it (``python ray_gpt.py``).

A worker killed with SIGKILL, Ctrl-C on the terminal, and a SIGKILL of the driver each end the run with one
message (or none, for the driver) in bounded time, leave no process behind, and the next run with
``resume: auto`` reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil

from dpo_rl.trainer.run import run
from tests.cli_runs import MARK, assert_one_clear_message, finish, leftover_processes, run_cli, start_cli
from tests.trainer.conftest import small_config, small_run_overrides

#: Each interruption (after steps 2, 4 and 6) leaves six or more steps to run (~0.3 s each), so it lands
#: while the run is still training.
STEPS = ("training.train_iters=12", "training.save_interval=1", "training.eval_interval=0")


def overrides(world, out) -> list[str]:
    """The small run's overrides with this test's step settings in place of its own."""
    replaced = {item.split("=", 1)[0] for item in STEPS}
    return [o for o in small_run_overrides(world, out) if o.split("=", 1)[0] not in replaced] + list(STEPS)


def logged_step(out) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(process, out, step: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while logged_step(out) < step:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"step {step} was not logged in {timeout_s} s"
        time.sleep(0.2)


def rank_process(mark: str, title: str) -> psutil.Process:
    """The run's Ray worker process whose title starts with ``title`` (Ray names them ``ray::<Class>...``)."""
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get(MARK) == mark and (process.cmdline() or [""])[0].startswith(title):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    raise AssertionError(f"no process {title}")


def test_killed_worker_ctrl_c_and_killed_driver_then_resume_equals_the_uninterrupted_run(world_dir, tmp_path):
    out = tmp_path / "faults"
    args = ["--config-name", "online_dpo_trainer_tiny", *overrides(world_dir, out)]

    # 1. SIGKILL of the reward worker after step 2: the driver names it and how to resume
    process, mark = start_cli(*args)
    started = time.monotonic()
    wait_for_step(process, out, 2)
    rank_process(mark, "ray::RewardWorker").kill()
    killed = time.monotonic()
    result = finish(process, mark, started)
    message = assert_one_clear_message(result, "the reward group's rank 0, pid", "died during RewardWorker.",
                                       "OOM killer", "the last checkpoint is step", "to resume: ", within_s=300)
    assert time.monotonic() - killed < 60
    assert message.splitlines()[-1].endswith("training.resume=auto")

    # 2. Ctrl-C (SIGINT to the terminal's process group) after step 4: one line, exit 130
    process, mark = start_cli(*args)
    started = time.monotonic()
    wait_for_step(process, out, 4)
    os.killpg(process.pid, signal.SIGINT)
    result = finish(process, mark, started)
    assert_one_clear_message(result, "interrupted (Ctrl-C) during step", "the last checkpoint is step",
                             returncode=130, within_s=300)

    # 3. SIGKILL of the driver after step 6: the run's Ray processes go with it
    process, mark = start_cli(*args)
    wait_for_step(process, out, 6)
    process.kill()
    process.communicate()
    assert leftover_processes(mark, wait_s=20) == []

    # 4. resume: auto finishes, and its metrics are the uninterrupted run's
    result = run_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert leftover_processes(result.mark) == []
    # the uninterrupted run with in-process workers: their metrics are a Ray run's (test_online_dpo_e2e.py's
    # test_in_process_workers_match_ray_workers), without a fifth cluster start-up (~25 s)
    straight = tmp_path / "straight"
    run(small_config(world_dir, straight, *[o for o in overrides(world_dir, straight)
                                           if not o.startswith(("training.output_dir",))]), use_ray=False)
    assert (out / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
