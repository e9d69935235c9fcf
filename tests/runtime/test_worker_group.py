"""The one ownership rule: a worker group hands on the output rank's result, and never a None."""

from __future__ import annotations

import pytest

from dpo_rl.dispatch import Dispatch, register
from dpo_rl.runtime.worker_group import LocalWorkerGroup, owned_results


class ToyWorker:
    def __init__(self, *, rank: int, world_size: int, value) -> None:
        self.value = value

    def rendezvous_endpoint(self):
        return "127.0.0.1", 0

    def init_distributed(self, address: str, port: int):
        return None

    @register(Dispatch.ALL)
    def result(self):
        return self.value


def test_a_result_is_handed_on_and_a_none_from_the_output_rank_is_an_error():
    assert LocalWorkerGroup(ToyWorker, {"value": {"w": 1}}).result() == {"w": 1}
    with pytest.raises(RuntimeError, match=r"ToyWorker.result returned None on its output rank \(global rank 0\)"):
        LocalWorkerGroup(ToyWorker, {"value": None}).result()
    # as the Ray group collects: one result per DP group's output rank
    assert owned_results(["a", "b"], "X.m", [1, 3]) == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"X.m returned None on its output rank \(global rank 3\)"):
        owned_results(["a", None], "X.m", [1, 3])
