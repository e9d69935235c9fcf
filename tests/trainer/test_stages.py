"""The stage registry: a new stage is one class registered through the public API, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dpo_rl.batch import Batch
from dpo_rl.data.prompts import load_prompt_source, prompt_batch
from dpo_rl.errors import ConfigError
from dpo_rl.runtime.groups import GroupFactory
from dpo_rl.runtime.resource_pool import RolePool
from dpo_rl.trainer.common import load_tokenizer, special_ids
from dpo_rl.trainer.run import resolve, run
from dpo_rl.trainer.stages import STAGES, Stage, register_stage, unregister_stage
from dpo_rl.workers.reward import RewardWorker
from tests.trainer.conftest import small_config


class ScorePromptsStage(Stage):
    """A toy stage: score the training prompts with the reward model, train nothing."""

    name = "score_prompts"

    def roles(self, training, algorithm) -> tuple[str, ...]:
        return ("reward",)

    def check(self, c, check_paths: bool) -> list[str]:
        return [] if c.data.train_path.endswith(".jsonl") else [f"data.train_path={c.data.train_path!r}: a JSONL file"]

    def run(self, cfg, c, *, use_ray: bool) -> dict[str, Any]:
        role = c.roles["reward"]
        tokenizer = load_tokenizer(role.tokenizer_name_or_path)
        _, pad = special_ids(tokenizer)
        prompts = load_prompt_source(c.data.train_path, tokenizer, prompt_key=c.data.prompt_key, max_prompt_length=64)
        rows = prompt_batch(prompts, list(range(len(prompts.texts))), 1, pad)
        samples = Batch({"sequences": rows["prompt_ids"], "attention_mask": rows["prompt_mask"],
                         "response_mask": torch.zeros_like(rows["prompt_mask"])})
        pools = {"reward": RolePool("reward", list(c.resource_pool.reward), c.ray.device_resource,
                                    c.ray.cpus_per_worker)}
        with GroupFactory(c, pools, use_ray=use_ray) as factory:
            group = factory.create("reward", RewardWorker, dict(
                model_config=c.models["reward"], parallel=c.parallel("reward"), role=role, seed=c.training.seed,
                pad_token_id=pad, actor_tokenizer=role.tokenizer_name_or_path))
            scores = group.score(samples)["scores"]
            if use_ray:  # the rank's niceness now (lower_cpu_priority(0) adds nothing)
                import ray

                niceness = ray.get(group.actors[0].lower_cpu_priority.remote(0))
            else:
                niceness = group.worker.lower_cpu_priority(0)
        return {"scores": scores.tolist(), "placed": sorted(factory.pools), "niceness": niceness}


@pytest.fixture
def toy_stage():
    stage = register_stage(ScorePromptsStage())
    yield stage
    unregister_stage(stage.name)


def test_a_registered_toy_stage_resolves_and_runs_in_process(world_dir, tmp_path, toy_stage):
    cfg = small_config(world_dir, tmp_path, "training.stage=score_prompts")
    c = resolve(cfg)
    assert list(c.roles) == ["reward"] and c.trained_role == "reward"  # the stage said which roles it places
    # the actor and reference sections are reported as unused, not silently read
    assert any("actor_rollout_ref.actor_rollout is not used by stage 'score_prompts'" in m for m in c.unused)
    summary = run(cfg, use_ray=False)
    assert summary["placed"] == ["reward"]
    assert len(summary["scores"]) == 40 and all(isinstance(s, float) for s in summary["scores"])
    assert len(set(summary["scores"])) > 1  # real scores of different prompts
    # the stage's own rule is checked before anything runs
    with pytest.raises(ConfigError, match="data.train_path=.*: a JSONL file"):
        resolve(small_config(world_dir, tmp_path, "training.stage=score_prompts", "data.train_path=prompts.txt"),
                check_paths=False)


def test_a_roles_cpu_niceness_lowers_its_ray_workers_priority_only(world_dir, tmp_path, toy_stage):
    import os

    local = run(small_config(world_dir, tmp_path / "local", "training.stage=score_prompts", "reward.cpu_niceness=2"),
                use_ray=False)
    assert local["niceness"] == os.nice(0)  # in-process: the driver's own process is left alone
    on_ray = run(small_config(world_dir, tmp_path / "ray", "training.stage=score_prompts", "reward.cpu_niceness=2"))
    ray_workers = int(os.environ.get("RAY_worker_niceness", "15"))  # where Ray starts its workers
    assert on_ray["niceness"] == min(ray_workers + 2, 19)
    assert on_ray["scores"] == local["scores"]
    with pytest.raises(ConfigError, match=r"reward.cpu_niceness=20 must be in 0..19"):
        resolve(small_config(world_dir, tmp_path, "training.stage=score_prompts", "reward.cpu_niceness=20"),
                check_paths=False)


def test_an_unregistered_stage_is_a_config_error(world_dir, tmp_path):
    assert "score_prompts" not in STAGES
    with pytest.raises(ConfigError, match=r"training.stage='score_prompts' is unknown; use one of \('dpo', "
                                          r"'ray_online_dpo', 'reward', 'sft'\)"):
        resolve(small_config(world_dir, tmp_path, "training.stage=score_prompts"))
    with pytest.raises(ValueError, match="a stage named 'dpo' is registered already"):
        register_stage(type("OtherDPO", (ScorePromptsStage,), {"name": "dpo"})())
