"""Training checkpoints: resume equals uninterrupted, a crash mid-save keeps the previous one, HF export."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.checkpoint import training as ckpt
from dpo_rl.errors import TrainingStopped
from dpo_rl.trainer.run import run
from tests.trainer.conftest import small_config

COMMON = ("training.eval_interval=0", "+training.export_hf=true")


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def count_steps(monkeypatch) -> list[int]:
    """Record the steps the trainer really runs."""
    from dpo_rl.trainer.online_dpo import OnlineDPOTrainer

    steps, real = [], OnlineDPOTrainer.train_step

    def counted(self, step):
        steps.append(step)
        return real(self, step)

    monkeypatch.setattr(OnlineDPOTrainer, "train_step", counted)
    return steps


def test_resume_gives_the_uninterrupted_run(world_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run(small_config(world_dir, straight, "training.train_iters=4", *COMMON), use_ray=False)
    resumed = tmp_path / "resumed"
    run(small_config(world_dir, resumed, "training.train_iters=2", "+training.save_interval=2", *COMMON),
        use_ray=False)
    assert ckpt.latest_step(resumed / "checkpoints") == 2
    from dpo_rl.checkpoint.convert import (
        megatron_to_hf,  # a training checkpoint converts like any other
    )

    megatron_to_hf(str(resumed / "checkpoints"), str(tmp_path / "step2_hf"))
    assert (tmp_path / "step2_hf" / "model.safetensors").is_file()
    steps = count_steps(monkeypatch)
    run(small_config(world_dir, resumed, "training.train_iters=4", *COMMON), use_ray=False)  # resume: auto
    assert steps == [3, 4]
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    a, b = weights(straight / "hf_actor"), weights(resumed / "hf_actor")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    first = weights(tmp_path / "resumed" / "hf_actor")  # sanity: training changed the weights
    from safetensors.torch import load_file
    sft = load_file(str(world_dir / "sft" / "model.safetensors"))
    assert any(not torch.equal(first[k], sft[k]) for k in first)


def test_crash_during_save_keeps_the_previous_checkpoint(world_dir, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real_commit = ckpt.commit

    def commit_then_die(save_dir, step, *args, **kwargs):
        if step == 3:  # the rank files of step 3 are written; the commit never happens
            raise KeyboardInterrupt("killed during save")
        return real_commit(save_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "commit", commit_then_die)
    with pytest.raises(TrainingStopped, match=r"interrupted \(Ctrl-C\) during step 3; the last checkpoint is step 2"):
        run(small_config(world_dir, out, "training.train_iters=3", "+training.save_interval=1",
                         "+training.keep_last_k=1", *COMMON), use_ray=False)
    monkeypatch.setattr(ckpt, "commit", real_commit)
    save_dir = out / "checkpoints"
    assert ckpt.latest_step(save_dir) == 2
    assert ckpt.staging_dir(save_dir, 3).is_dir() and not ckpt.iteration_dir(save_dir, 1).exists()  # keep_last_k=1
    steps = count_steps(monkeypatch)
    run(small_config(world_dir, out, "training.train_iters=3", *COMMON), use_ray=False)  # auto resumes from 2
    assert steps == [3]
    straight = tmp_path / "straight"
    run(small_config(world_dir, straight, "training.train_iters=3", *COMMON), use_ray=False)
    assert (out / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_exported_actor_loads_in_transformers_and_generates(world_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(small_config(world_dir, tmp_path, "training.train_iters=1", *COMMON), use_ray=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_actor")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf_actor")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Describe the harbor at dawn."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=False)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_resume_setting_is_validated(world_dir, tmp_path):
    from dpo_rl.errors import ConfigError
    from dpo_rl.trainer.run import resolve

    with pytest.raises(ConfigError, match="training.resume='/nowhere' is not auto, none, or a checkpoint directory"):
        resolve(small_config(world_dir, tmp_path, "+training.resume=/nowhere"))


def test_resume_of_a_run_that_refreshes_its_reference_gives_the_uninterrupted_run(world_dir, tmp_path, monkeypatch):
    """TR-DPO soft, every step: the checkpoint holds the mixed reference (and its version), so the resumed steps
    score against the reference the uninterrupted run had. Not restoring it (negative control) the resumed run
    trains against the initial reference and its metrics differ."""
    from dpo_rl.trainer.ref_refresh import ReferenceRefresh

    refresh = ("+algorithm.ref_update.mode=soft", "+algorithm.ref_update.interval=1", "+algorithm.ref_update.alpha=0.5",
               *COMMON)
    straight = tmp_path / "straight"
    run(small_config(world_dir, straight, "training.train_iters=4", *refresh), use_ray=False)
    for name in ("resumed", "without_reference"):
        run(small_config(world_dir, tmp_path / name, "training.train_iters=2", "+training.save_interval=2", *refresh),
            use_ray=False)
    checkpoint = ckpt.iteration_dir(tmp_path / "resumed" / "checkpoints", 2)
    assert ckpt.read_trainer_state(checkpoint)["reference_version"] == 2
    assert (checkpoint / ckpt.REFERENCE_DIR).is_dir() and not ckpt.checkpoint_problems(checkpoint)
    run(small_config(world_dir, tmp_path / "resumed", "training.train_iters=4", *refresh), use_ray=False)
    monkeypatch.setattr(ReferenceRefresh, "restore", lambda self, directory, state: None)
    run(small_config(world_dir, tmp_path / "without_reference", "training.train_iters=4", *refresh), use_ray=False)
    expected = (straight / "metrics.jsonl").read_text()
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == expected
    assert (tmp_path / "without_reference" / "metrics.jsonl").read_text() != expected


def test_resume_with_another_batch_size_than_the_sampling_in_flight_is_refused(world_dir, tmp_path):
    from dpo_rl.errors import ConfigError

    out = tmp_path / "run"
    run(small_config(world_dir, out, "training.train_iters=2", "+training.save_interval=2", *COMMON), use_ray=False)
    assert ckpt.read_trainer_state(ckpt.iteration_dir(out / "checkpoints", 2))["in_flight_prompts"] == []  # last step
    run(small_config(world_dir, out, "training.train_iters=4", "+training.save_interval=3", *COMMON), use_ray=False)
    state = ckpt.read_trainer_state(ckpt.iteration_dir(out / "checkpoints", 3))
    assert [len(p) for p in state["in_flight_prompts"]] == [4]  # step 4's, queued behind step 3's update
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["policy_version"] == sum(r["pairs/count"] > 0 for r in rows[:3])  # the updates applied
    with pytest.raises(ConfigError, match="global_batch_size=8, but the checkpoint .* was sampling batches of 4 "
                                          "prompts; resume with training.global_batch_size=4"):
        run(small_config(world_dir, out, "training.train_iters=6", "training.global_batch_size=8",
                         "actor_rollout_ref.actor_rollout.num_samples_per_step=8",
                         "actor_rollout_ref.actor_rollout.ppo_mini_batch_size=8",
                         "+training.resume=" + str(ckpt.iteration_dir(out / "checkpoints", 3)), *COMMON), use_ray=False)
