"""Sampling ahead of the update: the staleness bound and check, and the queue of started and resumed batches."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.trainer.rollout_ahead import InFlightSampling, RolloutQueue, oldest_allowed_version, staleness_metrics


def test_a_batch_one_step_ahead_needs_the_current_weights_at_max_staleness_1():
    # at step 5 (before its update) the actor holds version 4; step 6 trains at version <= 5
    assert oldest_allowed_version(4, step=5, target=6, max_staleness=1) == 4
    assert oldest_allowed_version(4, step=5, target=7, max_staleness=2) == 4
    assert oldest_allowed_version(4, step=5, target=6, max_staleness=2) == 3
    # steps without pairs applied no update: the bound follows the actor's version, not the step
    assert oldest_allowed_version(2, step=5, target=6, max_staleness=1) == 2


def test_staleness_metrics_and_the_refusal_of_older_samples():
    versions = torch.tensor([3, 3, 2, 2])
    assert staleness_metrics(5, 3, versions, 1) == {"async/staleness_mean": 0.5, "async/staleness_max": 1.0}
    assert staleness_metrics(5, 3, torch.tensor([3, 3]), 0) == {"async/staleness_mean": 0.0,
                                                                 "async/staleness_max": 0.0}
    with pytest.raises(RuntimeError, match=r"step 5: .*versions \[2, 3\].*staleness 1 .*max_staleness=0"):
        staleness_metrics(5, 3, versions, 0)
    with pytest.raises(RuntimeError, match="staleness 2"):
        staleness_metrics(5, 4, versions, 1)
    with pytest.raises(RuntimeError, match="outside"):  # sampled by weights newer than the trainer's: a bug too
        staleness_metrics(5, 1, versions, 1)


def test_the_queue_gives_each_step_its_own_batch_and_records_what_is_in_flight():
    queue = RolloutQueue()
    assert queue.pop(1) is None and queue.next_target(1) == 2
    queue.push(InFlightSampling(2, [4, 5], ["call"]))
    queue.push(InFlightSampling(3, [6, 7], ["call"]))
    assert queue.next_target(1) == 4 and len(queue) == 2
    assert queue.record() == [[4, 5], [6, 7]]
    with pytest.raises(RuntimeError, match="queued after step 3"):
        queue.push(InFlightSampling(5, [8], []))
    with pytest.raises(RuntimeError, match="step 3 found the sampling started for step 2"):
        queue.pop(3)
    assert queue.pop(2).prompts == [4, 5] and queue.pop(3).prompts == [6, 7] and queue.pop(4) is None


def test_a_restored_queue_drops_started_sampling_and_keeps_the_recorded_prompts_first():
    queue = RolloutQueue()
    queue.push(InFlightSampling(2, [0, 1], ["call of the run that wrote the checkpoint"]))
    queue.restore([[4, 5], [6, 7]])
    assert len(queue) == 0 and queue.record() == [[4, 5], [6, 7]]
    assert queue.next_resumed() == [4, 5]
    queue.push(InFlightSampling(3, [4, 5], []))  # a save now records the started batch, then the one left
    assert queue.record() == [[4, 5], [6, 7]]
    assert queue.next_resumed() == [6, 7] and queue.next_resumed() is None


def test_settled_sampling_is_collected_at_once():
    from dpo_rl.runtime.worker_group import _Done, wait_for

    queue = RolloutQueue()
    queue.push(InFlightSampling(2, [0], [_Done("samples")]))
    queue.settle()
    assert [wait_for(p) for p in queue.pop(2).pending] == ["samples"]
