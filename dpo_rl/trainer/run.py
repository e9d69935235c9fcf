"""``run(cfg)``: validate, start Ray, place the roles, train, evaluate, write the run directory."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo_rl.config.errors import ConfigError
from dpo_rl.config.trainer import ResolvedConfig, resolve
from dpo_rl.data.prompts import load_prompt_source
from dpo_rl.tracking import MetricsTracker
from dpo_rl.trainer.online_dpo import OnlineDPOTrainer, RoleGroups

logger = logging.getLogger("dpo_rl")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def special_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of the actor's tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(["the actor tokenizer has no eos_token; generation could never stop"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (int(eos),), int(pad)


def worker_specs(c: ResolvedConfig, eos_ids: tuple[int, ...], pad_id: int) -> dict[str, tuple[type, dict[str, Any]]]:
    """Role -> (worker class, constructor kwargs); the role -> worker map as data."""
    from dpo_rl.workers.policy import ActorWorker, PolicyWorker
    from dpo_rl.workers.reward import RewardWorker

    seed = c.training.seed
    actor = c.roles["actor_rollout"]
    max_pairs = c.training.global_batch_size * (
        1 if c.algorithm.pairing_strategy == "best_vs_worst" else math.comb(c.algorithm.num_responses_per_prompt, 2))
    total_steps = c.training.train_iters * actor.ppo_epochs * math.ceil(max_pairs / actor.ppo_mini_batch_size)
    policy = {"eos_token_ids": eos_ids, "pad_token_id": pad_id}
    specs = {
        "actor": (ActorWorker, dict(model_config=c.models["actor_rollout"], parallel=c.parallel("actor_rollout"),
                                    role=actor, seed=seed, loss_spec=c.algorithm.loss_spec(), total_steps=total_steps,
                                    **policy)),
        "ref": (PolicyWorker, dict(model_config=c.models["ref"], parallel=c.parallel("ref"), role=c.roles["ref"],
                                   seed=seed, **policy)),
        "reward": (RewardWorker, dict(model_config=c.models["reward"], parallel=c.parallel("reward"),
                                      role=c.roles["reward"], seed=seed, pad_token_id=pad_id,
                                      actor_tokenizer=actor.tokenizer_name_or_path)),
    }
    if not c.colocated:
        specs["rollout"] = (PolicyWorker, dict(model_config=c.models["actor_rollout"], parallel=c.rollout_parallel(),
                                               role=actor, seed=seed, **policy))
    return specs


def role_pools(c: ResolvedConfig):
    """RolePools for each group; the actor's pool is split into train and rollout ranks."""
    from dpo_rl.workers.resource_pool import RolePool

    def pool(role, counts):
        return RolePool(role, list(counts), c.ray.device_resource, c.ray.cpus_per_worker)

    actor = c.roles["actor_rollout"]
    train_counts, infer_counts, need = [], [], actor.num_gpus_for_train
    for n in c.resource_pool.actor_rollout:
        take = min(n, need)
        train_counts.append(take)
        infer_counts.append(n - take)
        need -= take
    pools = {"actor": pool("actor", train_counts), "ref": pool("ref", c.resource_pool.ref),
             "reward": pool("reward", c.resource_pool.reward)}
    if not c.colocated:
        pools["rollout"] = pool("rollout", infer_counts)
    return pools


def build_groups_ray(c: ResolvedConfig, specs) -> tuple[RoleGroups, list]:
    from dpo_rl.ray_runtime import start_ray
    from dpo_rl.workers.resource_pool import create_pools, total_demand
    from dpo_rl.workers.worker_group import RayWorkerGroup

    pools = role_pools(c)
    demand = total_demand(list(pools.values()))
    start_ray(address=c.ray.address, num_cpus=c.ray.num_cpus or math.ceil(demand.get("CPU", 1)),
              include_dashboard=c.ray.include_dashboard, dashboard_host=c.ray.dashboard_host, home_dir=c.ray.home_dir)
    create_pools(list(pools.values()), c.ray.resource_timeout_s)
    groups = {name: RayWorkerGroup(cls, pools[name], kwargs, num_threads=kwargs["role"].num_threads)
              for name, (cls, kwargs) in specs.items()}
    return RoleGroups(**groups), list(pools.values())


def build_groups_local(c: ResolvedConfig, specs) -> RoleGroups:
    """Every role in this process (world size 1 each); for tests and debugging without Ray."""
    from dpo_rl.workers.worker_group import LocalWorkerGroup

    for name, (_, kwargs) in specs.items():
        p = kwargs["parallel"]
        if p.tensor_model_parallel_size * p.pipeline_model_parallel_size != 1:
            raise ConfigError([f"running {name} in-process needs TP = PP = 1; use Ray for parallel roles"])
    if not c.colocated:
        raise ConfigError(["running in-process needs a colocated actor (num_gpus_for_infer: 0)"])
    return RoleGroups(**{name: LocalWorkerGroup(cls, kwargs) for name, (cls, kwargs) in specs.items()})


def run(cfg: DictConfig, *, use_ray: bool = True) -> dict[str, Any]:
    """Validate ``cfg`` and run online DPO; returns the final summary (also in summary.json)."""
    c = resolve(cfg)
    for message in c.unused:
        logger.warning("unused config key: %s", message)
    actor = c.roles["actor_rollout"]
    tokenizer = load_tokenizer(actor.tokenizer_name_or_path)
    eos_ids, pad_id = special_ids(tokenizer)
    prompts = load_prompt_source(c.data.train_path, tokenizer, prompt_key=c.data.prompt_key,
                                 max_prompt_length=actor.max_prompt_length)
    eval_prompts = (load_prompt_source(c.data.eval_path, tokenizer, prompt_key=c.data.prompt_key,
                                       max_prompt_length=actor.max_prompt_length) if c.data.eval_path else None)
    out = Path(c.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))

    specs = worker_specs(c, eos_ids, pad_id)
    tracker = MetricsTracker(out, c.training.train_iters, log_interval=c.training.log_interval,
                             tensorboard=c.training.tensorboard)
    groups, pools = None, []
    try:
        if use_ray:
            groups, pools = build_groups_ray(c, specs)
        else:
            groups = build_groups_local(c, specs)
        trainer = OnlineDPOTrainer(c, groups, prompts, pad_token_id=pad_id, tracker=tracker,
                                   eval_prompts=eval_prompts, decode=tokenizer.decode)
        summary = trainer.fit()
        if c.training.export_hf:
            summary["hf_actor"] = str(export_actor(c, groups, out / "hf_actor"))
    finally:
        tracker.close()
        if use_ray:
            from dpo_rl.ray_runtime import stop_ray
            from dpo_rl.workers.resource_pool import remove_pools

            for group in groups.all() if groups is not None else []:
                group.shutdown()
            remove_pools(pools)
            stop_ray()
    if c.training.plot:
        summary["plot"] = str(tracker.plot())
    tracker.write_json("summary.json", summary)
    report(summary, tracker)
    return summary


def export_actor(c: ResolvedConfig, groups: RoleGroups, directory: Path) -> Path:
    """The trained actor as an HF checkpoint (safetensors, config.json, tokenizer files)."""
    import shutil

    from dpo_rl.checkpoint.convert import TOKENIZER_FILES
    from dpo_rl.workers.megatron.hf_interop import save_hf_checkpoint

    actor = c.roles["actor_rollout"]
    save_hf_checkpoint(directory, groups.actor.export_weights(), c.models["actor_rollout"])
    tokenizer_dir = Path(actor.tokenizer_name_or_path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


def report(summary: dict[str, Any], tracker: MetricsTracker) -> None:
    if "eval/win_rate" in summary:
        tracker.print(f"final evaluation: win rate of the trained actor over the initial one "
                      f"{summary['eval/win_rate']:.1%} (mean RM score {summary['eval/initial_scores']:.3f} -> "
                      f"{summary['eval/scores']:.3f})")
    for row in summary.get("samples", []):
        tracker.print(f"  prompt: {row['prompt']}\n    before ({row['before_score']:+.2f}): {row['before']}\n"
                      f"    after  ({row['after_score']:+.2f}): {row['after']}")
