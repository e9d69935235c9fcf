"""The offline stages (``dpo``, ``reward``, ``sft``): data, worker groups, training, export.

Each is a :class:`~dpo_rl.trainer.stages.Stage` registered below; they share one set-up
(:func:`run_offline`) and one loop (:class:`~dpo_rl.trainer.offline.OfflineTrainer`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from dpo_rl.config.resolution import (
    ResolvedConfig,
    check_loss,
    check_offline,
    needs_reference,
)
from dpo_rl.data.indexed import TokenizedDataset
from dpo_rl.data.tokenizers import same_directory, tokenizer_dirs_difference
from dpo_rl.errors import ConfigError
from dpo_rl.run_report import write_report
from dpo_rl.runtime.groups import GroupFactory
from dpo_rl.runtime.resource_pool import RolePool
from dpo_rl.trainer import ref_cache
from dpo_rl.trainer.common import (
    export_model,
    load_tokenizer,
    metrics_tracker,
    prepare_output,
    special_ids,
    tokenizer_key,
)
from dpo_rl.trainer.offline import (
    OfflineObjective,
    OfflineTrainer,
    PreferenceObjective,
    RewardObjective,
    SFTObjective,
    make_splits,
)
from dpo_rl.trainer.stages import Stage, register_stage
from dpo_rl.workers.policy import ActorWorker, PolicyWorker
from dpo_rl.workers.reward import RewardTrainerWorker

logger = logging.getLogger("dpo_rl")


def offline_worker_specs(stage: "OfflineStage", c: ResolvedConfig, eos_ids: tuple[int, ...],
                         pad_id: int) -> dict[str, tuple[type, dict]]:
    """Group name (``trained``, ``ref``) -> (worker class, constructor kwargs)."""
    role = c.trained_role
    common = dict(model_config=c.models[role], parallel=c.parallel(role), role=c.roles[role], seed=c.training.seed,
                  total_iters=c.training.train_iters)
    specs = {"trained": stage.trained_worker(c, common, eos_ids, pad_id)}
    if "ref" in c.roles:
        specs["ref"] = (PolicyWorker, dict(model_config=c.models["ref"], parallel=c.parallel("ref"),
                                           role=c.roles["ref"], seed=c.training.seed, eos_token_ids=eos_ids,
                                           pad_token_id=pad_id))
    return specs


def offline_pools(c: ResolvedConfig) -> dict:
    def pool(role):
        return RolePool(role, list(getattr(c.resource_pool, role)), c.ray.device_resource, c.ray.cpus_per_worker)

    pools = {"trained": pool(c.trained_role)}
    if "ref" in c.roles:
        pools["ref"] = pool("ref")
    return pools


def load_datasets(c: ResolvedConfig) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """The preprocessed datasets, checked against the models' vocabularies before any worker starts."""
    train = TokenizedDataset(c.data.train_path)
    eval_dataset = TokenizedDataset(c.data.eval_path) if c.data.eval_path else None
    vocab = min(c.models[role].vocab_size for role in c.roles)
    for key, dataset in (("data.train_path", train), ("data.eval_path", eval_dataset)):
        if dataset is None:
            continue
        largest = dataset.max_token_id()
        if largest >= vocab:
            raise ConfigError([f"{key}={dataset.prefix!r} holds token id {largest}, but the model's vocabulary has "
                               f"{vocab} entries; preprocess it with the model's tokenizer"])
        if len(dataset) == 0:
            raise ConfigError([f"{key}={dataset.prefix!r} holds no examples"])
        recorded, used = dataset.meta.get("tokenizer"), c.roles[c.trained_role].tokenizer_name_or_path
        if recorded and used:
            warning = recorded_tokenizer_warning(f"{key}={dataset.prefix}", recorded, tokenizer_key(c.trained_role), used)
            if warning:
                logger.warning("%s", warning)
    return train, eval_dataset


def recorded_tokenizer_warning(dataset: str, recorded: str, used_key: str, used: str) -> Optional[str]:
    """Why ``dataset`` (``key=prefix``, for the message), tokenized with the tokenizer at ``recorded``, may not fit
    the trained model's tokenizer (setting ``used_key``, the directory ``used``); ``None`` when it is the same
    tokenizer: the same directory, or the same vocabulary and special ids."""
    if same_directory(recorded, used):
        return None
    if not Path(recorded).is_dir():
        return (f"{dataset} was tokenized with {recorded}, which is not a directory here, so it cannot be compared "
                f"with {used_key}={used}; make sure they are the same tokenizer")
    try:
        differs = tokenizer_dirs_difference(used, used_key, recorded, "the dataset's recorded tokenizer",
                                            ("the model's", "the dataset's"))
    except ConfigError as err:
        return (f"{dataset} was tokenized with {recorded}, which could not be loaded to compare with "
                f"{used_key}={used} ({'; '.join(err.problems)}); make sure they are the same tokenizer")
    if differs is None:
        return None
    return (f"{dataset} was tokenized with {recorded}, not with the trained model's tokenizer {used_key}={used} "
            f"(model vs dataset: {differs}); preprocess it again with --tokenizer-name-or-path {used}")


def run_offline(stage: "OfflineStage", cfg: DictConfig, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
    tokenizer = load_tokenizer(c.roles[c.trained_role].tokenizer_name_or_path, tokenizer_key(c.trained_role))
    eos_ids, pad_id = special_ids(tokenizer, require_eos=False)
    train_dataset, eval_dataset = load_datasets(c)
    try:
        train, eval_split = make_splits(train_dataset, eval_dataset, eval_fraction=c.data.eval_fraction,
                                        eval_samples=c.training.eval_samples, seed=c.training.seed)
    except ValueError as err:
        raise ConfigError([str(err)]) from err
    logger.info("stage %s: %d training examples, %s", c.stage, len(train),
                f"{len(eval_split)} held-out examples for evaluation" if eval_split else "no evaluation split")
    out = prepare_output(cfg, c)
    specs = offline_worker_specs(stage, c, eos_ids, pad_id)
    tracker = metrics_tracker(cfg, c, out, stage.key_metrics)
    chunk = max(c.training.global_batch_size, 1)
    try:
        precomputed = c.algorithm.reference == "precomputed" and ("ref" in c.roles or c.reference_is_actor_base)
        datasets = [train_dataset, eval_dataset]
        with GroupFactory(c, offline_pools(c), use_ray=use_ray, coexisting=not precomputed) as factory:
            cached = None
            if precomputed and "ref" in c.roles:
                cached = precompute_reference(c, factory, specs["ref"], datasets, pad_id, chunk, out)
            trained = factory.create("trained", *specs["trained"])
            if precomputed and c.reference_is_actor_base:  # the LoRA actor's base scores the data, adapters off
                cached = reference_cache(c, datasets, out, pad_id, chunk, lambda: (trained, "reference_logprobs"))
            ref = factory.create("ref", *specs["ref"]) if "ref" in c.roles and cached is None else None
            trainer = OfflineTrainer(c, trained, train, eval_split, objective=stage.objective(c), pad_token_id=pad_id,
                                     tracker=tracker, ref=ref, ref_cache=cached)
            summary = trainer.fit()
            if c.training.export_hf:
                exported = export_model(c, trained, out / stage.export_dir, c.trained_role, tokenizer)
                summary["hf_model"] = exported.pop(stage.export_dir)
                if exported:  # LoRA: the adapters in PEFT's format
                    summary["hf_model_adapter"] = exported[f"{stage.export_dir}_adapter"]
    finally:
        tracker.close()
    if c.training.plot:
        summary["plot"] = str(tracker.plot(keys=stage.plot_keys))
        summary["report"] = str(write_report(out, c.stage, summary, extra_keys=stage.plot_keys))
    tracker.write_json("summary.json", summary)
    return summary


def precompute_reference(c: ResolvedConfig, factory: GroupFactory, ref_spec, datasets, pad_id: int, chunk: int,
                         out: Path) -> dict:
    """Reference log-probs of every dataset row, from the cache or computed once; the ref group is then released."""
    created = []

    def group():
        created.append(factory.create("ref", *ref_spec))
        return created[0], "sequence_logprobs"

    try:
        return reference_cache(c, datasets, out, pad_id, chunk, group)
    finally:
        if created:
            factory.release("ref")


def reference_cache(c: ResolvedConfig, datasets, out: Path, pad_id: int, chunk: int, group) -> dict:
    """Dataset prefix -> its rows' reference log-probs, from the cache where its key matches; ``group()`` gives the
    (worker group, method) that computes the rest, called only when something is missing."""
    cache_dir = Path(c.data.ref_logps_cache_dir or out / "ref_logps_cache")
    role = "actor_rollout" if c.reference_is_actor_base else "ref"  # the reference's weights are the actor's load
    wanted = {}
    for dataset in datasets:
        if dataset is not None:
            key = ref_cache.cache_key(dataset, c.roles[role], c.models[role], c.training.seed, c.algorithm.ld_alpha)
            wanted[dataset.prefix] = (dataset, ref_cache.cache_path(cache_dir, dataset, key))
    scorer, method = group() if not all(path.is_file() for _, path in wanted.values()) else (None, "")
    return {prefix: ref_cache.load_or_compute(scorer, dataset, path, pad_token_id=pad_id, chunk=chunk, method=method,
                                              ld_alpha=c.algorithm.ld_alpha)
            for prefix, (dataset, path) in wanted.items()}


class OfflineStage(Stage):
    """An offline stage: one trained role on a preprocessed dataset of ``data_kinds``."""

    data_kinds: tuple[str, ...] = ()
    """The preprocessed dataset kinds (``preprocess_data.py`` handler kinds) it trains on."""
    plot_keys: tuple[str, ...] = ("loss",)
    """The metrics ``curves.png`` shows (``report.html`` charts them too, with the common curves)."""
    export_dir: str = "hf_actor"
    """Where ``training.export_hf`` writes the trained model, under the run directory."""
    reads_reference_logps: bool = False
    """Its objective can use reference log-probs (so ``algorithm.reference: precomputed`` means something)."""

    def trained_worker(self, c: ResolvedConfig, common: dict, eos_ids: tuple[int, ...], pad_id: int) -> tuple[type, dict]:
        """The trained group's worker class and its constructor arguments (``common`` holds the shared ones)."""
        raise NotImplementedError

    def objective(self, c: ResolvedConfig) -> OfflineObjective:
        raise NotImplementedError

    def check(self, c: ResolvedConfig, check_paths: bool) -> list[str]:
        problems = check_offline(c, check_paths, self.data_kinds)
        if c.algorithm.reference == "precomputed" and not self.reads_reference_logps:
            problems.append(f"algorithm.reference=precomputed has no meaning for stage {self.name!r}; it is for "
                            "offline DPO")
        return problems

    def run(self, cfg: DictConfig, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
        return run_offline(self, cfg, c, use_ray=use_ray)


class OfflineDPOStage(OfflineStage):
    """``dpo``: the preference loss on fixed pairs; the reference is placed only when the loss reads one."""

    name = "dpo"
    data_kinds = ("pairwise", "reward")
    reads_reference_logps = True
    plot_keys = ("loss", "rewards/margins", "rewards/accuracies")
    key_metrics = ("loss", "rewards/accuracies")

    def roles(self, training, algorithm) -> tuple[str, ...]:
        return ("actor_rollout", "ref") if needs_reference(algorithm) else ("actor_rollout",)

    def trained_worker(self, c, common, eos_ids, pad_id):
        return ActorWorker, dict(common, objective="preference", loss_spec=c.algorithm.loss_spec(),
                                 eos_token_ids=eos_ids, pad_token_id=pad_id)

    def objective(self, c):
        return PreferenceObjective(c.algorithm.loss_spec())

    def check(self, c: ResolvedConfig, check_paths: bool) -> list[str]:
        return check_loss(c) + super().check(c, check_paths)


class RewardStage(OfflineStage):
    """``reward``: a Bradley-Terry reward model on preference pairs."""

    name = "reward"
    data_kinds = ("reward", "pairwise")
    plot_keys = ("loss", "accuracy", "margin")
    key_metrics = ("loss", "accuracy")
    export_dir = "hf_reward"

    def roles(self, training, algorithm) -> tuple[str, ...]:
        return ("reward",)

    def trained_worker(self, c, common, eos_ids, pad_id):
        return RewardTrainerWorker, dict(common, pad_token_id=pad_id)

    def objective(self, c):
        return RewardObjective()


class SFTStage(OfflineStage):
    """``sft``: supervised fine-tuning of the actor on instruction data."""

    name = "sft"
    data_kinds = ("sft",)

    def roles(self, training, algorithm) -> tuple[str, ...]:
        return ("actor_rollout",)

    def trained_worker(self, c, common, eos_ids, pad_id):
        return ActorWorker, dict(common, objective="sft", loss_spec=None, eos_token_ids=eos_ids, pad_token_id=pad_id)

    def objective(self, c):
        return SFTObjective()


for _stage in (OfflineDPOStage(), RewardStage(), SFTStage()):
    register_stage(_stage)
