"""``run(cfg)``: validate, start Ray, place the roles, train, evaluate, write the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo_rl.errors import ConfigError
from dpo_rl.config.resolution import ResolvedConfig, resolve
from dpo_rl.runtime.groups import GroupFactory
from dpo_rl.data.prompts import load_prompt_source
from dpo_rl.tracking import MetricsTracker
from dpo_rl.trainer.online_dpo import OnlineDPOTrainer, RoleGroups

logger = logging.getLogger("dpo_rl")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def special_ids(tokenizer, *, require_eos: bool = True) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a tokenizer; pad falls back to EOS, then 0.

    Generation needs EOS (``require_eos``); the offline stages only pad.
    """
    eos = tokenizer.eos_token_id
    if eos is None and require_eos:
        raise ConfigError(["the actor tokenizer has no eos_token; generation could never stop"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return ((int(eos),) if eos is not None else ()), int(pad)


def worker_specs(c: ResolvedConfig, eos_ids: tuple[int, ...], pad_id: int) -> dict[str, tuple[type, dict[str, Any]]]:
    """Role -> (worker class, constructor kwargs); the role -> worker map as data."""
    from dpo_rl.workers.policy import ActorWorker, PolicyWorker
    from dpo_rl.workers.reward import RewardWorker

    seed = c.training.seed
    actor = c.roles["actor_rollout"]
    policy = {"eos_token_ids": eos_ids, "pad_token_id": pad_id}
    specs = {
        "actor": (ActorWorker, dict(model_config=c.models["actor_rollout"], parallel=c.parallel("actor_rollout"),
                                    role=actor, seed=seed, loss_spec=c.algorithm.loss_spec(), total_iters=c.training.train_iters,
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
    from dpo_rl.runtime.resource_pool import RolePool

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


def prepare_output(cfg: DictConfig, c: ResolvedConfig) -> Path:
    out = Path(c.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    return out


def run(cfg: DictConfig, *, use_ray: bool = True) -> dict[str, Any]:
    """Validate ``cfg`` and run its stage; returns the final summary (also in summary.json)."""
    c = resolve(cfg)
    for message in c.unused:
        logger.warning("unused config key: %s", message)
    if c.offline:
        from dpo_rl.trainer.run_offline import run_offline

        return run_offline(cfg, c, use_ray=use_ray)
    return run_online(cfg, c, use_ray=use_ray)


def run_online(cfg: DictConfig, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
    actor = c.roles["actor_rollout"]
    tokenizer = load_tokenizer(actor.tokenizer_name_or_path)
    eos_ids, pad_id = special_ids(tokenizer)
    prompts = load_prompt_source(c.data.train_path, tokenizer, prompt_key=c.data.prompt_key,
                                 max_prompt_length=actor.max_prompt_length)
    eval_prompts = (load_prompt_source(c.data.eval_path, tokenizer, prompt_key=c.data.prompt_key,
                                       max_prompt_length=actor.max_prompt_length) if c.data.eval_path else None)
    if not use_ray and not c.colocated:
        raise ConfigError(["running in-process needs a colocated actor (num_gpus_for_infer: 0)"])
    out = prepare_output(cfg, c)
    specs = worker_specs(c, eos_ids, pad_id)
    tracker = MetricsTracker(out, c.training.train_iters, log_interval=c.training.log_interval,
                             tensorboard=c.training.tensorboard)
    try:
        with GroupFactory(c, role_pools(c), use_ray=use_ray) as factory:
            groups = RoleGroups(**{name: factory.create(name, cls, kwargs) for name, (cls, kwargs) in specs.items()})
            trainer = OnlineDPOTrainer(c, groups, prompts, pad_token_id=pad_id, tracker=tracker,
                                       eval_prompts=eval_prompts, decode=tokenizer.decode)
            summary = trainer.fit()
            if c.training.export_hf:
                summary["hf_actor"] = str(export_model(c, groups.actor, out / "hf_actor", "actor_rollout", tokenizer))
    finally:
        tracker.close()
    if c.training.plot:
        summary["plot"] = str(tracker.plot())
    tracker.write_json("summary.json", summary)
    report(summary, tracker)
    return summary


def export_model(c: ResolvedConfig, group, directory: Path, role: str, tokenizer) -> Path:
    """A trained role's model as an HF checkpoint (safetensors, config.json, tokenizer files)."""
    import shutil

    from dpo_rl.checkpoint.convert import TOKENIZER_FILES
    from dpo_rl.checkpoint.hf_files import save_hf_checkpoint

    reward = role == "reward"
    save_hf_checkpoint(directory, group.export_weights(), c.models[role], reward=reward,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    tokenizer_dir = Path(c.roles[role].tokenizer_name_or_path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


def report(summary: dict[str, Any], tracker: MetricsTracker) -> None:
    if "eval/win_rate" in summary:
        tracker.print(f"final evaluation: win rate of the trained actor over {summary['eval/baseline']} "
                      f"{summary['eval/win_rate']:.1%} (mean RM score {summary['eval/initial_scores']:.3f} -> "
                      f"{summary['eval/scores']:.3f})")
    for row in summary.get("samples", []):
        tracker.print(f"  prompt: {row['prompt']}\n    before ({row['before_score']:+.2f}): {row['before']}\n"
                      f"    after  ({row['after_score']:+.2f}): {row['after']}")
