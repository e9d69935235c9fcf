"""What a run may do with its output directory: never overwrite a finished run, say when there is nothing to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_rl.config.compose import compose
from dpo_rl.errors import ConfigError, NothingToDo
from dpo_rl.trainer.run import resolve
from dpo_rl.trainer.run_directory import RunPlan, clear_previous_run, plan_run_directory, writable_problem


def config(out: Path, *extra: str):
    cfg = compose("online_dpo_trainer_tiny", [f"training.output_dir={out}", "training.train_iters=4", *extra])
    return resolve(cfg, check_paths=False)


def fake_checkpoint(out: Path, step: int) -> None:
    """A committed checkpoint of ``step`` as the loop leaves it (no rank files: only its bookkeeping is read)."""
    save_dir = out / "checkpoints"
    (save_dir / f"iter_{step:07d}").mkdir(parents=True)
    (save_dir / f"iter_{step:07d}" / "trainer_state.json").write_text(json.dumps({"step": step, "consumed_samples": 0}))
    (save_dir / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")


def finished_run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.yaml", "summary.json"):
        (out / name).write_text("{}\n")


def test_an_empty_or_failed_directory_starts_afresh(tmp_path):
    assert plan_run_directory(config(tmp_path / "new")) == RunPlan(resume_step=None, clear_previous=False)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text("{}\n")  # a run that died before its first checkpoint
    assert plan_run_directory(config(failed)) == RunPlan(resume_step=None, clear_previous=False)


def test_a_finished_run_is_never_overwritten_unasked(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    with pytest.raises(ConfigError, match=r"holds a finished run \(summary.json\).*training.overwrite_output_dir=true"):
        plan_run_directory(config(out))
    assert plan_run_directory(config(out, "training.overwrite_output_dir=true")).clear_previous
    (out / "config.yaml").write_text("training:\n  seed: 1\n")  # the same command repeated: nothing to do
    with pytest.raises(NothingToDo, match=r"holds this run \(the same config.yaml\), finished"):
        plan_run_directory(config(out), "training:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"holds a finished run"):  # another config: refused
        plan_run_directory(config(out), "training:\n  seed: 2\n")


def test_checkpoints_are_resumed_up_to_the_end_and_then_there_is_nothing_to_do(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    assert plan_run_directory(config(out)).resume_step == 2
    fake_checkpoint_dir = out / "checkpoints"
    (fake_checkpoint_dir / "latest_checkpointed_iteration.txt").unlink()
    fake_checkpoint(out, 4)
    assert plan_run_directory(config(out)).resume_step == 4  # killed after its last save: finishes without training
    finished_run(out)
    with pytest.raises(NothingToDo, match=r"finished at step 4 \(training.train_iters=4, summary.json written\): "
                                          r"nothing to do. Raise training.train_iters"):
        plan_run_directory(config(out))
    assert plan_run_directory(config(out, "training.train_iters=6")).resume_step == 4  # train further
    with pytest.raises(ConfigError, match=r"the checkpoint of step 4 .* past training.train_iters=3"):
        plan_run_directory(config(out, "training.train_iters=3"))


def test_starting_afresh_over_checkpoints_is_refused_and_overwrite_deletes_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    finished_run(out)
    (out / "tensorboard").mkdir()
    (out / "wandb" / "offline-run-x").mkdir(parents=True)
    (out / "hf_actor").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoints up to step 2 in .*resume them with training.resume=auto"):
        plan_run_directory(config(out, "training.resume=none"))
    c = config(out, "training.resume=none", "training.overwrite_output_dir=true")
    assert plan_run_directory(c) == RunPlan(resume_step=None, clear_previous=True)
    clear_previous_run(c)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "hf_actor"]  # the export is rewritten at the end
    assert list((out / "checkpoints").iterdir()) == []
    assert plan_run_directory(config(out)) == RunPlan(resume_step=None, clear_previous=False)


def test_an_unwritable_output_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in writable_problem("training.output_dir", tmp_path / "file" / "run")
    assert writable_problem("training.output_dir", tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()  # checking creates nothing
    with pytest.raises(ConfigError, match=r"training.output_dir='.*/file/run' cannot be created"):
        plan_run_directory(config(tmp_path / "file" / "run"))
