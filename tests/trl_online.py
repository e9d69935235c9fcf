"""Our online-DPO step and TRL 1.16's ``OnlineDPOTrainer`` on the same fixed responses, step by step.

Shared by ``tests/test_trl_online_alignment.py`` (a few steps, asserted) and
``benchmarks/trl_online_alignment.py`` (more steps, plotted to ``docs/images/online_trl_alignment.png``).

What both sides get (:func:`build_world`): the tiny tokenizer, ``prompts`` prompts of the tiny world (every
step answers each of them once: global batch = the prompt set), a seeded random-init tiny Llama as the
policy, another seed as the reference (so the implicit rewards are not 0 at step 1) and a tiny reward model,
all HF directories that TRL loads with ``from_pretrained`` and we load through ``load``/``reward.load``.

Sampling is replaced on both sides by :class:`FixedResponses`: for step ``s`` and prompt ``p`` two fixed
completions, one ending with EOS and one cut at ``max_new_tokens`` without it; which of the two slots holds
the EOS one is drawn per (step, prompt). Ours: the Megatron decode loop
(``dpo_rl.workers.policy.generate``) is swapped, so the worker still builds its usual ``Batch``. TRL: the
trainer's ``_generate`` is swapped, returning the ids it would (left-padded prompts, right-padded
completions masked up to their EOS); its tokenization of the prompt text is bypassed, so both sides see the
same prompt ids (our chat-templated ``encode_prompt``).

Pairing: both sides score with the same reward model and subtract the same missing-EOS penalty, larger
than any score gap between a prompt's two completions here, so the completion with EOS is chosen on both
sides whatever each side feeds its reward model (TRL decodes the completion without special tokens and
re-tokenizes prompt text + completion; we score the token ids). :func:`run_ours` and :func:`run_trl`
record which slot each side chose, so a test can assert they agree.

Matched settings: sigmoid loss, ``beta``; one optimizer step per step over every pair (one mini-batch,
one micro-batch, no gradient accumulation); torch AdamW (megatron-core falls back to ``torch.optim.AdamW``
without Apex/TE; TRL ``optim="adamw_torch"``, not the fused kernel) with the same lr, betas, eps, no weight
decay, constant LR without warm-up; fp32; gradient clipping at a norm no step reaches (so both sides compute
and log the gradient norm, and neither clips); no dropout.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

#: The per-step values compared, under TRL's names (ours: the update's metrics; ``grad_norm`` is our
#: ``actor/grad_norm``). TRL's ``loss`` is the value its training_step returns (its log rounds it to 4 digits).
#: Not compared: TRL's ``objective/kl`` sums the log-ratio over the completion block's padding positions too
#: (``(logprobs - ref_logprobs).sum(1)``, unmasked), ours over response tokens only; ``objective/entropy`` is TRL's
#: negative summed log-prob, ours the mean token entropy; the ``objective/scores*`` come from reward models fed
#: different inputs (see the module docstring).
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm")
#: Per-step agreement, relative to each value's size (rewards and margins: to the log-probs they cancel,
#: :func:`tests.trl_online.scales`). One forward agrees to ~1e-6 of each summed log-prob
#: (test_trl_parity.RTOL_LOGPS: the fused LM head, softmax and sums round differently); the step's
#: gradients are computed from those and go through the same torch AdamW on both sides. Parameters that
#: differ by rounding feed the next step, so the gap could grow with the steps; measured, it does not
#: (benchmarks/trl_online_alignment.py, 20 steps at lr 1e-3: every value within 1e-6 of its scale at every
#: step, the last steps no further apart than the first). 1e-5 is 10x that, for other hardware's reductions
#: and longer runs, and still 100x below what one setting changed (beta, the learning rate) moves: the
#: negative controls of tests/test_trl_online_alignment.py.
RTOL = 1e-5
#: Clipping threshold both sides use: far above any gradient norm here, so it never binds, but it makes both
#: compute the norm (megatron-core and HF Trainer compute it only when clipping is on).
CLIP_NEVER_BINDING = 1e6


@dataclass(frozen=True)
class Setup:
    """One comparison: the world's size, the fixed responses and the shared training settings."""

    steps: int = 6
    prompts: int = 4
    """Prompts in the world; every step answers each of them with two completions."""
    max_new_tokens: int = 12
    """The cap the completion without EOS is cut at."""
    beta: float = 0.1
    lr: float = 1e-3
    missing_eos_penalty: float = 10.0
    seed: int = 7


@dataclass(frozen=True)
class World:
    root: Path
    tokenizer: Any
    prompts: list[str]

    @property
    def prompts_file(self) -> Path:
        return self.root / "prompts.jsonl"

    def model(self, name: str) -> Path:
        return self.root / name


def build_world(root: Path, setup: Setup) -> World:
    """The tiny tokenizer, ``setup.prompts`` prompts and three seeded random-init HF models under ``root``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from dpo_rl.checkpoint import hf_files
    from dpo_rl.config.model import shipped_model_config
    from examples.tiny_world import build, world

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build.build_tokenizer(root / "tokenizer")
    prompts = world.split_prompts(build.SEED)[0][: setup.prompts]
    build.write_prompts(root / "prompts.jsonl", prompts)
    policy_config = hf_files.hf_transformers_config(shipped_model_config("tiny"))
    for name, seed in (("policy", setup.seed), ("reference", setup.seed + 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(policy_config).save_pretrained(root / name)
    torch.manual_seed(setup.seed + 2)
    rm_config = hf_files.hf_transformers_config(shipped_model_config("tiny-rm"), reward=True,
                                                pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(root / "rm")
    return World(root, tokenizer, prompts)


class FixedResponses:
    """Two fixed completions per (step, prompt), keyed by the prompt's token ids.

    ``completions[s][prompt_ids]`` is ``(first, second)``: token id lists, one ending with the EOS id, the
    other ``max_new_tokens`` long without it, cut from tiny-world answers; ``eos_slot[s][prompt_ids]`` says
    which (0 or 1) ends with EOS.
    """

    def __init__(self, world: World, setup: Setup) -> None:
        from dpo_rl.data.prompts import encode_prompt
        from examples.tiny_world import world as tiny

        tok = world.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.prompt_ids = {text: tuple(encode_prompt(tok, text)) for text in world.prompts}
        rng = random.Random(setup.seed)
        self.completions: list[dict[tuple, tuple[list[int], list[int]]]] = []
        self.eos_slot: list[dict[tuple, int]] = []
        n = setup.max_new_tokens
        for _ in range(setup.steps):
            step, slots = {}, {}
            for text, ids in self.prompt_ids.items():
                place, time = tiny.parse_prompt(text)
                short = tiny.plain(rng) if rng.random() < 0.5 else tiny.descriptive(place, time, 1, rng)
                ended = tok.encode(short, add_special_tokens=False)[: n - 1] + [self.eos]
                capped = tok.encode(tiny.descriptive(place, time, 4, rng), add_special_tokens=False)
                if len(capped) < n:
                    raise ValueError(f"a 4-detail answer has {len(capped)} tokens; max_new_tokens must be <= that")
                slot = rng.randrange(2)
                step[ids] = (ended, capped[:n]) if slot == 0 else (capped[:n], ended)
                slots[ids] = slot
            self.completions.append(step)
            self.eos_slot.append(slots)

    def for_step(self, step: int, prompts: list[tuple]) -> list[list[int]]:
        """The completions of rows ``prompts`` (prompt id tuples, each prompt twice): its first, then second."""
        seen: dict[tuple, int] = {}
        out = []
        for ids in prompts:
            slot = seen.get(ids, 0)
            seen[ids] = slot + 1
            out.append(self.completions[step][ids][slot])
        if any(count != 2 for count in seen.values()):
            raise RuntimeError(f"step {step}: every prompt must be asked twice, got {seen}")
        return out

    def slot_of(self, step: int, prompt: tuple, completion: list[int]) -> int:
        pair = self.completions[step][prompt]
        if completion not in pair:
            raise RuntimeError(f"step {step}: a completion nobody was fed: {completion}")
        return pair.index(completion)


def right_pad(responses: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded ids [b, R] and mask [b, R] (1 on real tokens, EOS included)."""
    ids = torch.full((len(responses), max(len(r) for r in responses)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, response in enumerate(responses):
        ids[row, : len(response)], mask[row, : len(response)] = torch.tensor(response), 1
    return ids, mask


# ------------------------------------------------------------------------------------------------- ours
def our_config(world: World, setup: Setup, out: Path, *overrides: str):
    """The tiny online recipe on ``world`` with the settings :mod:`this module <tests.trl_online>` matches."""
    from dpo_rl.config.compose import compose

    a, b = "actor_rollout_ref.actor_rollout", setup.prompts
    return compose("online_dpo_trainer_tiny", [
        f"training.tokenizer_name_or_path={world.root / 'tokenizer'}",
        f"{a}.load={world.model('policy')}", f"actor_rollout_ref.ref.load={world.model('reference')}",
        f"reward.load={world.model('rm')}", f"data.train_path={world.prompts_file}", "data.eval_path=null",
        f"training.output_dir={out}", f"training.train_iters={setup.steps}", f"training.global_batch_size={b}",
        "training.log_interval=1", "training.eval_interval=0", "training.plot=false", "training.num_threads=1",
        f"training.lr={setup.lr}", "training.lr_decay_style=constant", "training.lr_warmup_iters=0",
        "training.weight_decay=0.0", "training.adam_beta1=0.9", "training.adam_beta2=0.999",
        "training.adam_eps=1e-8", f"training.clip_grad={CLIP_NEVER_BINDING}", "training.params_dtype=fp32",
        f"algorithm.beta={setup.beta}", "algorithm.loss_type=sigmoid", "algorithm.num_responses_per_prompt=2",
        "algorithm.pairing_strategy=best_vs_worst", f"{a}.missing_eos_penalty={setup.missing_eos_penalty}",
        f"{a}.max_new_tokens={setup.max_new_tokens}", f"{a}.num_samples_per_step={b}",
        f"{a}.ppo_mini_batch_size={b}", f"{a}.micro_batch_size={b}", f"{a}.ppo_epochs=1",
        f"actor_rollout_ref.ref.micro_batch_size={2 * b}", f"reward.micro_batch_size={2 * b}",
        *overrides,
    ])


def run_ours(world: World, setup: Setup, fixed: FixedResponses, out: Path, *overrides: str) -> dict[str, Any]:
    """Our online run in this process (no Ray) on the fixed responses.

    Returns ``{"steps": [per-step metrics under TRL's names], "chosen": [per-step {prompt: chosen slot}]}``.
    """
    from dpo_rl.batch import left_pad
    from dpo_rl.trainer.online_dpo import OnlineDPOTrainer
    from dpo_rl.trainer.run import run
    from dpo_rl.workers.megatron.generation import GenerationOutput

    calls, steps, chosen = [0], [], []

    def fixed_generate(model, prompts, params, *, device="cpu", **_):
        """Stands in for the decode loop: the output it would give had it sampled ``fixed``'s completions."""
        step = calls[0]
        calls[0] += 1
        keys = [tuple(p) for p in prompts]
        responses = fixed.for_step(step, keys)
        prompt_ids, prompt_mask = left_pad(prompts, params.pad_token_id)
        ids, mask = right_pad(responses, params.pad_token_id)
        return GenerationOutput(
            sequences=torch.cat([prompt_ids, ids], 1), attention_mask=torch.cat([prompt_mask, mask], 1),
            response_mask=torch.cat([torch.zeros_like(prompt_mask), mask], 1),
            rollout_logprobs=torch.zeros(ids.shape),  # not compared (only the rollout log-prob gap reads them)
            ended_with_eos=torch.tensor([r[-1] in params.eos_token_ids for r in responses]),
            prompt_length=prompt_ids.shape[1])

    real_metrics, real_step = OnlineDPOTrainer.sample_metrics, OnlineDPOTrainer.train_step

    def recording_metrics(self, samples, raw_scores, scores, pairs):
        step = len(chosen)
        record = {}
        for row in pairs.chosen.tolist():
            real = samples["attention_mask"][row].bool()
            response = samples["sequences"][row][samples["response_mask"][row].bool()].tolist()
            prompt = tuple(samples["sequences"][row][real & ~samples["response_mask"][row].bool()].tolist())
            record[prompt] = fixed.slot_of(step, prompt, response)
        chosen.append(record)
        return real_metrics(self, samples, raw_scores, scores, pairs)

    def recording_step(self, step):
        metrics = real_step(self, step)
        steps.append({**{k: metrics[k] for k in COMPARED if k != "grad_norm"},
                      "grad_norm": metrics["actor/grad_norm"], "pairs": metrics["pairs/count"]})
        return metrics

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("dpo_rl.workers.policy.generate", fixed_generate))
        stack.enter_context(mock.patch.object(OnlineDPOTrainer, "sample_metrics", recording_metrics))
        stack.enter_context(mock.patch.object(OnlineDPOTrainer, "train_step", recording_step))
        run(our_config(world, setup, out, *overrides), use_ray=False)
    return {"steps": steps, "chosen": chosen}


# ------------------------------------------------------------------------------------------------- TRL
def run_trl(world: World, setup: Setup, fixed: FixedResponses, out: Path) -> dict[str, Any]:
    """TRL's OnlineDPOTrainer in this process on the fixed responses.

    Returns what :func:`run_ours` does.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpo_rl.batch import left_pad

    tok = world.tokenizer
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(world.model("policy"), **load)
    reference = AutoModelForCausalLM.from_pretrained(world.model("reference"), **load)
    rm = AutoModelForSequenceClassification.from_pretrained(world.model("rm"), **load)
    args = OnlineDPOConfig(
        output_dir=str(out), use_cpu=True, per_device_train_batch_size=setup.prompts, gradient_accumulation_steps=1,
        max_steps=setup.steps, learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=CLIP_NEVER_BINDING, beta=[setup.beta], loss_type="sigmoid",
        missing_eos_penalty=setup.missing_eos_penalty, max_new_tokens=setup.max_new_tokens,
        bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
        seed=setup.seed, dataloader_num_workers=0, disable_tqdm=True)
    steps, chosen, logged = [], [], []

    class GradNorm(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                logged.append(float(logs["grad_norm"]))

    trainer = OnlineDPOTrainer(model=policy, ref_model=reference, reward_funcs=rm, args=args,
                               train_dataset=Dataset.from_dict({"prompt": world.prompts}), processing_class=tok,
                               reward_processing_classes=tok, callbacks=[GradNorm()])
    calls, fed, rewards = [0], [], []

    def fixed_generate(model, prompts, images=None):
        """What TRL's ``_generate`` returns had it sampled ``fixed``'s completions: prompts repeated twice
        (first completions, then second), completions right-padded and masked up to their EOS."""
        keys = [fixed.prompt_ids[p] for p in prompts]
        step = calls[0]
        calls[0] += 1
        completions = [fixed.completions[step][k][0] for k in keys] + [fixed.completions[step][k][1] for k in keys]
        fed.append(keys)
        prompt_ids, prompt_mask = left_pad([list(k) for k in keys] * 2, fixed.pad)
        return (prompt_ids, prompt_mask, *right_pad(completions, fixed.pad), None)

    real_rewards = trainer._calculate_rewards_from_functions

    def recording_rewards(*args, **kwargs):
        value = real_rewards(*args, **kwargs)
        rewards.append(value)  # TRL subtracts the missing-EOS penalty from this tensor in place afterwards
        return value

    real_step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        loss = real_step(model, inputs, num_items_in_batch)
        stats = trainer.stats
        steps.append({"loss": float(loss), **{k: stats[k][-1] for k in COMPARED if k not in ("loss", "grad_norm")}})
        keys, scores = fed[-1], rewards[-1]
        b = len(keys)
        chosen.append({k: 0 if scores[i] >= scores[i + b] else 1 for i, k in enumerate(keys)})  # TRL's rule
        return loss

    trainer._generate = fixed_generate
    trainer._calculate_rewards_from_functions = recording_rewards
    trainer.training_step = recording_step
    trainer.train()
    if len(logged) != len(steps):
        raise RuntimeError(f"TRL logged {len(logged)} gradient norms for {len(steps)} steps (logging_steps=1)")
    for step, norm in zip(steps, logged):
        step["grad_norm"] = norm
    return {"steps": steps, "chosen": chosen}


# ------------------------------------------------------------------------------------------------- both
def compare(world: World, setup: Setup, out: Path) -> dict[str, Any]:
    """Both runs on one world: ``{"ours": ..., "trl": ..., "fixed": FixedResponses}``."""
    fixed = FixedResponses(world, setup)
    trl = run_trl(world, setup, fixed, out / "trl")  # first: TRL's Trainer warns inside our gloo world of one
    ours = run_ours(world, setup, fixed, out / "ours")
    return {"ours": ours, "trl": trl, "fixed": fixed}


def scales(step: dict[str, float], beta: float) -> dict[str, float]:
    """Per compared key, the ``scale`` of :mod:`tests.tolerance` for one step's values (TRL's).

    An implicit reward is ``beta`` x (policy - reference) summed log-probs, a margin the difference of two: they
    sit near 0 while the log-probs they cancel are ~50-100 nats, so they are judged against ``beta`` x the size of
    those log-probs. The reference's are recovered from the rewards (``logps - rewards / beta``); every summed
    log-prob is negative, so the batch mean of their sizes is the size of their batch mean. The other values are
    judged against their own size (0).
    """
    chosen, rejected = abs(step["logps/chosen"]), abs(step["logps/rejected"])
    ref_chosen = abs(step["logps/chosen"] - step["rewards/chosen"] / beta)
    ref_rejected = abs(step["logps/rejected"] - step["rewards/rejected"] / beta)
    out = dict.fromkeys(COMPARED, 0.0)
    out.update({"rewards/chosen": beta * (chosen + ref_chosen), "rewards/rejected": beta * (rejected + ref_rejected),
                "rewards/margins": beta * (chosen + ref_chosen + rejected + ref_rejected)})
    return out


def normalised_differences(ours: list[dict], trl: list[dict], beta: float) -> dict[str, list[float]]:
    """Per compared key, per step: ``|ours - TRL| / (|TRL| + scale)`` (:func:`scales`), what a tolerance's
    ``rtol`` bounds."""
    out = {k: [] for k in COMPARED}
    for o, t in zip(ours, trl):
        for key, scale in scales(t, beta).items():
            out[key].append(abs(o[key] - t[key]) / (abs(t[key]) + scale))
    return out

