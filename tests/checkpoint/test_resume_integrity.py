"""Resuming from a damaged training checkpoint: the driver checks the checkpoint before any worker loads it.

An explicit ``training.resume`` directory that is damaged is one ConfigError naming the file and offering the
previous intact step; ``resume: auto`` falls back to the newest intact step with a warning; a worker that still
meets a damaged file raises a ConfigError naming it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dpo_rl.checkpoint import training as ckpt
from dpo_rl.config.model import shipped_model_config
from dpo_rl.errors import ConfigError


def cut_in_half(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def rank_file(save_dir, step):
    return ckpt.rank_file(ckpt.iteration_dir(save_dir, step), 0, 0, 1)


def write_step(save_dir, step: int, *, distributed_optimizer: bool = False) -> None:
    """One committed checkpoint of a TP=PP=1 run, written the way the workers and the driver write it."""
    torch.manual_seed(step)
    model = torch.nn.Linear(64, 64)
    staging = ckpt.staging_dir(save_dir, step)
    ckpt.save_training_state(ckpt.rank_file(staging, 0, 0, 1), model, {"state": {}, "step": step},
                             {"last_epoch": step})
    if distributed_optimizer:
        ckpt.save_optimizer_shard(ckpt.optimizer_shard_file(staging, 0, 0, 1, 0), [torch.randn(64, 64)])
    ckpt.commit(save_dir, step, {"step": step, "consumed_prompts": 4 * step}, shipped_model_config("tiny"),
                tp=1, pp=1, keep_last_k=0)


@pytest.fixture
def save_dir(tmp_path):
    for step in (2, 4, 6):
        write_step(tmp_path, step)
    return tmp_path


def test_an_intact_checkpoint_resumes_as_before(save_dir):
    assert ckpt.resolve_resume("auto", save_dir) == ckpt.iteration_dir(save_dir, 6)
    assert ckpt.resolve_resume(str(ckpt.iteration_dir(save_dir, 4)), save_dir) == ckpt.iteration_dir(save_dir, 4)
    assert ckpt.resolve_resume("none", save_dir) is None
    assert ckpt.resolve_resume("auto", save_dir / "fresh") is None


def test_a_named_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_intact_step(save_dir):
    cut_in_half(rank_file(save_dir, 6))
    cut_in_half(rank_file(save_dir, 4))
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(ckpt.iteration_dir(save_dir, 6)), save_dir)
    (problem,) = err.value.problems
    assert str(rank_file(save_dir, 6)) in problem and "truncated or corrupted" in problem
    assert f"training.resume={ckpt.iteration_dir(save_dir, 2)}" in problem  # step 4 is damaged too: skipped
    cut_in_half(rank_file(save_dir, 2))
    with pytest.raises(ConfigError, match="no earlier intact checkpoint") as err:
        ckpt.resolve_resume(str(ckpt.iteration_dir(save_dir, 4)), save_dir)
    assert str(rank_file(save_dir, 4)) in str(err.value)


def test_auto_falls_back_to_the_newest_intact_step_with_a_warning(save_dir, caplog):
    cut_in_half(rank_file(save_dir, 6))
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", save_dir) == ckpt.iteration_dir(save_dir, 4)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(rank_file(save_dir, 6)) in warning and "step 4" in warning


def test_auto_with_no_intact_checkpoint_is_an_error_saying_so(save_dir):
    for step in (2, 4, 6):
        cut_in_half(rank_file(save_dir, step))
    with pytest.raises(ConfigError, match="no intact checkpoint") as err:
        ckpt.resolve_resume("auto", save_dir)
    assert all(str(rank_file(save_dir, step)) in str(err.value) for step in (2, 4, 6))


def test_a_file_whose_size_changed_since_the_commit_is_caught_though_it_opens(tmp_path):
    """Bytes appended by a bad copy leave the zip readable; the manifest's sizes catch it."""
    write_step(tmp_path, 2)
    write_step(tmp_path, 4, distributed_optimizer=True)
    shard = ckpt.optimizer_shard_file(ckpt.iteration_dir(tmp_path, 4), 0, 0, 1, 0)
    with open(shard, "ab") as f:
        f.write(b"\0" * 100)
    torch.load(shard, weights_only=True, mmap=True)  # still opens
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(ckpt.iteration_dir(tmp_path, 4)), tmp_path)
    assert str(shard) in str(err.value) and "bytes" in str(err.value)


def test_a_deleted_file_is_caught(save_dir):
    rank_file(save_dir, 6).unlink()
    with pytest.raises(ConfigError, match="missing") as err:
        ckpt.resolve_resume(str(ckpt.iteration_dir(save_dir, 6)), save_dir)
    assert str(rank_file(save_dir, 6)) in str(err.value)


def test_checkpoints_from_before_the_manifest_still_resume_and_are_open_checked(save_dir):
    for step in (2, 4, 6):
        for path in ckpt.iteration_dir(save_dir, step).iterdir():
            if path.is_file() and path.name != "trainer_state.json":
                path.unlink()  # what an older dpo_rl committed: trainer_state.json and the rank directories
    assert ckpt.resolve_resume("auto", save_dir) == ckpt.iteration_dir(save_dir, 6)
    cut_in_half(rank_file(save_dir, 6))
    assert ckpt.resolve_resume("auto", save_dir) == ckpt.iteration_dir(save_dir, 4)


def test_a_damaged_trainer_state_is_caught(save_dir):
    (ckpt.iteration_dir(save_dir, 6) / "trainer_state.json").write_text('{"step": ')
    assert ckpt.resolve_resume("auto", save_dir) == ckpt.iteration_dir(save_dir, 4)


def test_a_worker_loading_a_damaged_rank_file_raises_a_config_error_naming_it(save_dir):
    path = rank_file(save_dir, 6)
    cut_in_half(path)
    with pytest.raises(ConfigError) as err:
        ckpt.load_training_state(path, torch.nn.Linear(64, 64))
    assert str(path) in str(err.value) and "truncated or corrupted" in str(err.value)
    shard = save_dir / "distrib_optim_dp000.pt"
    shard.write_bytes(b"")  # an empty file: what a full disk leaves
    with pytest.raises(ConfigError, match="distrib_optim_dp000.pt is truncated or corrupted"):
        ckpt.load_optimizer_shard(shard)


def test_the_manifest_lists_every_committed_file_with_its_size(tmp_path):
    write_step(tmp_path, 2, distributed_optimizer=True)
    directory = ckpt.iteration_dir(tmp_path, 2)
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*")
             if p.is_file() and p.name != ckpt.MANIFEST_FILE}
    assert manifest["files"] == files
    assert set(files) == {"trainer_state.json", "mp_rank_00/model_optim_rng.pt", "mp_rank_00/distrib_optim_dp000.pt"}
