"""LoRA on megatron-core's linear layers (:mod:`dpo_rl.workers.megatron.lora`).

* step 0 (B = 0) computes the base model exactly; with adapters off, too;
* the merged export (HF) and the PEFT export loaded with ``peft`` onto the HF base give the adapter model's logits;
* TP=2 gives TP=1's logits and adapter gradients; the base receives no gradient;
* an actor with LoRA: the optimizer holds the adapters alone, and training moves only them.
"""

from __future__ import annotations

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.config.schema import LoRASettings
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.lora import adapters_disabled, merged_weights
from tests.tolerance import assert_close
from tests.workers.megatron import lora_cases
from tests.workers.megatron.common import random_batch, run_distributed

TP1 = ParallelConfig()
TP2 = ParallelConfig(tensor_model_parallel_size=2)


def megatron_logits(model, ids, attention):
    from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches

    def compute(output, micro):
        return output.sum() * 0, {"logits": output.detach()}

    model.eval()
    with torch.no_grad():
        out = run_microbatches(model, [Microbatch(ids, attention, {})], compute, forward_only=True)
    return out[0]["logits"]


def assert_within_1e5(actual, expected, what):
    """fp32: within 1e-5 absolute and relative to the largest logit."""
    assert_close(actual, expected, rtol=1e-5, what=what)
    assert float((actual - expected).abs().max()) < 1e-5, what


def hf_logits(hf_model, ids, attention):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=attention).logits


def real(logits, attention):
    """The logits at real (not padding) positions, where HF and megatron agree."""
    return logits[attention.bool()]


@pytest.fixture(scope="module")
def batch():
    ids, attention, _ = random_batch(3, 20, seed=4)
    return ids, attention


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_step0_is_the_base_model_and_adapters_off_is_the_base(megatron_single_rank, batch, family):
    ids, attention = batch
    _, _, model = lora_cases.lora_model(family, TP1, random_b=False)
    assert torch.equal(megatron_logits(model, ids, attention), megatron_logits(_plain(family), ids, attention))
    _, _, trained = lora_cases.lora_model(family, TP1, random_b=True)
    with adapters_disabled(trained):
        off = megatron_logits(trained, ids, attention)
    assert torch.equal(off, megatron_logits(_plain(family), ids, attention))
    assert (megatron_logits(trained, ids, attention) - off).abs().max() > 1e-2  # the adapters do act when on


def _plain(family):
    """The same HF weights without adapters."""
    from dpo_rl.workers.megatron.model_factory import build_gpt_model
    from tests.workers.megatron.common import tiny_config, tiny_hf_model

    config = tiny_config(family)
    model = build_gpt_model(config, TP1)
    hf_interop.load_into_current_rank(model, tiny_hf_model(config, seed=7).state_dict(), config)
    return model


def test_merged_and_peft_exports_give_the_adapter_models_logits(megatron_single_rank, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_rl.checkpoint.hf_files import save_hf_checkpoint
    from dpo_rl.checkpoint.hf_weights import local_mcore_state
    from dpo_rl.checkpoint.peft_adapters import merge_peft_adapter, save_peft_adapter
    from dpo_rl.workers.megatron.lora import gathered_adapters

    ids, attention = batch
    config, hf_model, model = lora_cases.lora_model("llama", TP1)
    ours = megatron_logits(model, ids, attention)
    merged = hf_interop.export_from_current_rank(model, config, tensors=merged_weights(model, local_mcore_state(model)))
    save_hf_checkpoint(tmp_path / "merged", merged, config)
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).float().eval()
    assert_within_1e5(real(hf_logits(merged_hf, ids, attention), attention), real(ours, attention), "merged export vs adapter model")

    adapters = {m: (a, b) for m, a, b in gathered_adapters(model, config, tp_group=None, tp_rank=0, tp_size=1)}
    assert len(adapters) == 7 * config.num_layers  # q k v o gate up down
    save_peft_adapter(tmp_path / "adapter", adapters, lora_cases.SETTINGS, reward=False, base_model=None)
    hf_model.save_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True).float(), tmp_path / "adapter"
    ).eval()
    assert_within_1e5(real(hf_logits(peft_model, ids, attention), attention), real(ours, attention), "PEFT adapter on the HF base")
    assert (real(hf_logits(hf_model, ids, attention) - ours, attention)).abs().max() > 1e-2  # the base alone differs

    merge_peft_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged_by_tool")
    by_tool = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_by_tool", local_files_only=True).float().eval()
    assert_within_1e5(real(hf_logits(by_tool, ids, attention), attention), real(ours, attention), "convert_ckpt's merge")


@pytest.fixture(scope="module")
def tp1_reference(megatron_single_rank):
    return lora_cases.forward_backward_case("qwen2", TP1)


def test_tp2_lora_matches_tp1_outputs_and_adapter_gradients(tp1_reference):
    results = run_distributed(lora_cases.forward_backward_case, 2, TP2, "qwen2", TP2)
    ours = next(r for r in results if r["ranks"].tp_rank == 0)
    assert_close(ours["logits"], tp1_reference["logits"], rtol=1e-5, what="logits")
    assert set(ours["grads"]) == set(tp1_reference["grads"]) and ours["grads"]
    for module, (ga, gb) in tp1_reference["grads"].items():
        assert ga.abs().max() > 0 and gb.abs().max() > 0, f"{module} got no gradient"
        assert_close(ours["grads"][module][0], ga, rtol=1e-4, what=f"grad A of {module}")
        assert_close(ours["grads"][module][1], gb, rtol=1e-4, what=f"grad B of {module}")
    assert all(r["base_grads"] == [] for r in results) and tp1_reference["base_grads"] == []


def test_lora_actor_optimizes_only_the_adapters(megatron_single_rank):
    from tests.workers.megatron.test_optimizer import sft_actor, sft_rows

    lora = LoRASettings(enabled=True, rank=4, alpha=8.0, target_modules=["linear_qkv", "linear_fc2"])
    worker = sft_actor(TP1, lora=lora, lr=1e-2)
    counts = worker.trainable_parameters()
    config = worker.model_config
    qkv_out = (config.num_attention_heads + 2 * config.num_query_groups) * config.head_dim
    per_layer = 4 * (config.hidden_size + qkv_out) + 4 * (config.ffn_hidden_size + config.hidden_size)
    assert counts["trainable"] == counts["optimized"] == per_layer * config.num_layers
    assert counts["total"] > 50 * counts["trainable"]
    before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
    worker.update(sft_rows())
    worker.update(sft_rows(seed=2))
    after = dict(worker.model.named_parameters())
    moved = sorted(n for n in before if not torch.equal(before[n], after[n].detach()))
    assert moved and all(".adapter." in n for n in moved)
    assert {n.rsplit(".", 3)[-3] for n in moved} == {"linear_qkv", "linear_fc2"}
    assert all(p.grad is None and getattr(p, "main_grad", None) is None for n, p in after.items() if n not in moved)


def test_reference_with_adapters_off_equals_a_separate_frozen_reference(megatron_single_rank):
    from dpo_rl.batch import Batch
    from dpo_rl.config.schema import RoleConfig
    from dpo_rl.workers.policy import PolicyWorker
    from tests.workers.megatron.common import tiny_hf_model
    from tests.workers.megatron.test_optimizer import sft_actor, sft_rows

    actor = sft_actor(TP1, lora=LoRASettings(enabled=True, rank=4, alpha=8.0), lr=1e-2)
    ref = PolicyWorker(rank=0, world_size=1, model_config=actor.model_config, parallel=TP1,
                       role=RoleConfig(model="tiny", micro_batch_size=1), seed=0, eos_token_ids=(1,), pad_token_id=0)
    ref.init_distributed("127.0.0.1", 0)
    hf_interop.load_into_current_rank(ref.model, tiny_hf_model(actor.model_config, seed=11).state_dict(),
                                      actor.model_config)  # the actor's base weights (sft_actor loads seed 11)
    ids, attention, response = random_batch(4, 24, seed=9)
    samples = Batch({"sequences": ids, "attention_mask": attention, "response_mask": response})
    expected = ref.sequence_logprobs(samples)["sequence_logps"]
    assert torch.equal(actor.reference_logprobs(samples)["sequence_logps"], expected)  # step 0
    for step in range(3):
        actor.update(sft_rows(seed=5 + step))
    assert torch.equal(actor.reference_logprobs(samples)["sequence_logps"], expected)
    trained = actor.sequence_logprobs(samples)["sequence_logps"]
    assert (trained - expected).abs().max() > 1e-3  # the adapters trained; only the reference call turns them off


def test_lora_with_full_activation_recomputation_trains_the_adapters_alike(megatron_single_rank):
    """The embedding is frozen, so nothing before the first recomputed layer needs a gradient: without the
    embedding hook the checkpointed layers would return outputs without a graph and the adapters get none."""
    from tests.workers.megatron.test_optimizer import sft_actor, sft_rows

    lora = LoRASettings(enabled=True, rank=4, alpha=8.0)
    plain = sft_actor(TP1, lora=lora, lr=1e-2)
    again = sft_actor(TP1, lora=lora, lr=1e-2, recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    first, second = plain.update(sft_rows()), again.update(sft_rows())
    assert first["actor/grad_norm"] > 0
    assert_close(second["actor/grad_norm"], first["actor/grad_norm"], rtol=1e-6, scale=0.0, what="grad norm")
    for (name, a), b in zip(plain.model.named_parameters(), again.model.parameters()):
        assert_close(b.detach(), a.detach(), rtol=1e-6, what=name)
