"""TR-DPO's refresh schedule and what a checkpoint says of the reference (the streaming itself: the online and
offline end-to-end tests)."""

from __future__ import annotations

import logging

import pytest

from dpo_rl.checkpoint.training import REFERENCE_DIR
from dpo_rl.config.schema import RefUpdateConfig
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.ref_refresh import ReferenceRefresh


class RecordingReference:
    """Stands in for the reference worker group: records what it was asked to load."""

    def __init__(self):
        self.loaded = []

    def load_reference(self, directory):
        self.loaded.append(directory)


def refresh(mode="soft", interval=2, ref=None) -> ReferenceRefresh:
    return ReferenceRefresh(RefUpdateConfig(mode=mode, interval=interval, alpha=0.5), actor=None, ref=ref, senders=1)


def test_due_every_interval_and_the_mix():
    r = refresh(interval=3)
    assert [s for s in range(1, 10) if r.due(s)] == [3, 6, 9] and r.mix == 0.5
    assert refresh(mode="hard").mix == 1.0
    assert not any(refresh(mode="none").due(s) for s in range(1, 10))


def test_a_checkpoint_with_a_reference_restores_it_and_its_version(tmp_path):
    (tmp_path / REFERENCE_DIR).mkdir()
    ref = RecordingReference()
    r = refresh(ref=ref)
    r.restore(tmp_path, {"step": 4, "reference_version": 4})
    assert ref.loaded == [str(tmp_path)] and r.version == 4 and r.state() == {"reference_version": 4}


def test_a_checkpoint_without_one_keeps_the_initial_reference_unless_it_may_have_refreshed(tmp_path):
    ref = RecordingReference()
    r = refresh(ref=ref)
    r.restore(tmp_path, {"step": 4, "reference_version": 0})  # its run never refreshed: the initial reference
    r.restore(tmp_path, {"step": 1})  # written before its first refresh was due
    assert ref.loaded == [] and r.version == 0
    with pytest.raises(ConfigError, match="does not record its reference .* start over"):
        r.restore(tmp_path, {"step": 4})  # written before checkpoints kept the reference: it may have refreshed


def test_a_refreshed_reference_is_not_loaded_into_a_run_that_does_not_refresh(tmp_path, caplog):
    (tmp_path / REFERENCE_DIR).mkdir()
    ref = RecordingReference()
    with caplog.at_level(logging.WARNING):
        refresh(mode="none", ref=ref).restore(tmp_path, {"step": 4, "reference_version": 4})
    assert ref.loaded == [] and "refreshed 4 times" in caplog.text
