"""A rank that dies, raises or goes silent is named at once, by role, rank and process (dpo_rl.runtime.failures)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dpo_rl.errors import ConfigError, WorkerFailed
from dpo_rl.runtime.failures import RankProcess, death_message, exit_detail, gather, stuck_message

RAY_DEATH = ("The actor died unexpectedly before finishing this task.\n\tclass_name: W\n\tpid: 4017\nThe actor is dead "
             "because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
             "unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) ...")


def test_messages_name_role_rank_process_cause_and_log():
    reward = RankProcess("reward", 0, 4017, "127.0.0.1")
    assert exit_detail(RAY_DEATH) == "Worker unexpectedly exits with a connection error code 2. End of file"
    message = death_message(reward, "RewardWorker.score", RAY_DEATH, ["/tmp/ray/logs/worker-ab-01-4017.err"])
    assert message.startswith("the reward group's rank 0, pid 4017 on 127.0.0.1 died during RewardWorker.score "
                              "(Worker unexpectedly exits with a connection error code 2. End of file)")
    assert "OOM killer" in message and "its log: /tmp/ray/logs/worker-ab-01-4017.err" in message
    assert "lower reward.micro_batch_size" in message
    rollout = death_message(RankProcess("rollout", 1), "PolicyWorker.generate", RAY_DEATH, [])
    assert "lower actor_rollout_ref.actor_rollout.micro_batch_size" in rollout
    stuck = stuck_message([RankProcess("actor_rollout", 1, 77, "10.0.0.2")], [RankProcess("actor_rollout", 0, 76)],
                          "ActorWorker.update", 30, [])
    assert stuck.startswith("the actor_rollout group's rank 1, pid 77 on 10.0.0.2 did not answer ActorWorker.update "
                            "within ray.call_timeout_s=30 s (1 other rank(s) finished)")
    assert "py-spy dump --pid 77" in stuck


class Toy:
    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self, kind: str) -> None:
        if kind == "config":
            raise ConfigError(["reward.load='x' is a causal LM"])
        raise ValueError("a bug")


@pytest.fixture(scope="module")
def toys():
    import ray

    from dpo_rl.runtime import cluster
    from dpo_rl.runtime.reaper import marked_processes

    cluster.start_ray(num_cpus=2)
    mark = cluster._reaper.mark
    actors = [ray.remote(Toy).options(num_cpus=0).remote() for _ in range(2)]
    processes = [RankProcess("toy", rank, pid, "127.0.0.1") for rank, pid in enumerate(ray.get([a.pid.remote()
                                                                                               for a in actors]))]
    yield actors, processes
    cluster.stop_ray()
    assert marked_processes(mark) == []  # stop_ray leaves nothing of the cluster behind


def test_a_rank_that_raises_on_purpose_or_by_a_bug(toys):
    actors, processes = toys
    with pytest.raises(ConfigError) as err:  # the worker's own message, not a remote traceback
        gather([actors[0].fail.remote("config")], processes, "Toy.fail")
    assert "Traceback" not in str(err.value) and "reward.load='x' is a causal LM" in str(err.value)
    with pytest.raises(WorkerFailed, match=r"the toy group's rank 1, pid \d+ on 127.0.0.1 raised ValueError in "
                                           r"Toy.fail: a bug"):
        gather([actors[0].sleep.remote(0), actors[1].fail.remote("bug")], processes, "Toy.fail")


def test_a_silent_rank_is_named_after_the_timeout(toys):
    actors, processes = toys
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as err:
        gather([actors[0].sleep.remote(0), actors[1].sleep.remote(8)], processes, "Toy.sleep", timeout_s=1)
    assert time.monotonic() - start < 5
    assert str(err.value).startswith(f"the toy group's rank 1, pid {processes[1].pid} on 127.0.0.1 did not answer "
                                     "Toy.sleep within ray.call_timeout_s=1 s (1 other rank(s) finished)")
    assert gather([actors[0].sleep.remote(0.1)], processes, "Toy.sleep", timeout_s=30) == [0.1]


def test_a_dead_rank_is_named_at_once_while_its_peer_still_waits(toys):
    actors, processes = toys
    refs = [actors[0].sleep.remote(600), actors[1].sleep.remote(600)]  # as peers blocked in a collective
    time.sleep(1)
    os.kill(processes[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as err:
        gather(refs, processes, "Toy.sleep")  # no timeout: only the death ends the wait
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert message.startswith(f"the toy group's rank 1, pid {processes[1].pid} on 127.0.0.1 died during Toy.sleep (")
    assert "OOM killer" in message and f"-{processes[1].pid}.err" in message  # the worker's own log file


def test_the_projects_errors_survive_the_trip_from_a_worker():
    import pickle

    from dpo_rl.errors import TrainingStopped

    problems = ["reward.load='x' is a causal LM", "reward.model is not set"]
    assert pickle.loads(pickle.dumps(ConfigError(problems))).problems == problems
    stopped = pickle.loads(pickle.dumps(TrainingStopped("step 3: stopped", resumable=True)))
    assert (type(stopped), str(stopped), stopped.resumable) == (TrainingStopped, "step 3: stopped", True)
