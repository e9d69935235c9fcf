"""Build the embedded demo's tiny world, deterministically, in about 1.5 minutes on 2 CPU cores.

Writes ``examples/tiny_world/artifacts/``:

* ``tokenizer/``  a byte-level BPE tokenizer (1k tokens) trained on the synthetic corpus,
  with a chat template ``<s>{prompt}\\n``;
* ``sft/``        the tiny actor (configs/rlxf/model/tiny.yaml) after a short SFT on a 70/30
  plain/descriptive mix (HF Llama safetensors);
* ``rm/``         the tiny reward model (tiny-rm.yaml) trained with a Bradley-Terry loss on
  pairs where the more descriptive answer wins (HF LlamaForSequenceClassification);
* ``prompts_train.jsonl`` / ``prompts_eval.jsonl`` (held-out prompts never trained on);
* ``build_info.json`` with the losses and the RM's held-out pair accuracy.

Both models are Megatron-core GPTModels trained in this process (gloo world of one).

    python examples/tiny_world/build.py [--force]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dpo_rl.config.model import ParallelConfig, shipped_model_config  # noqa: E402
from examples.tiny_world import world  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BUILD_VERSION = 1
SEED = 1234
CHAT_TEMPLATE = "{{ bos_token }}{{ messages[0]['content'] }}\n"


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(SEED)
    train_prompts, eval_prompts = world.split_prompts(SEED)
    corpus = []
    for prompt in train_prompts + eval_prompts:
        corpus.append(prompt)
        for details in range(0, 5):
            place, time_ = world.parse_prompt(prompt)
            corpus.append(world.plain(rng) if details == 0 else world.descriptive(place, time_, details, rng))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return hf


def encode_pair_text(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt (chat template) + response + EOS, and the prompt length."""
    from dpo_rl.data.prompts import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id], len(prompt_ids)


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def cosine_optimizer(model, lr: float, steps: int):
    from dpo_rl.optim import lr_factor

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=20, total=steps, style="cosine", min_ratio=0.05))
    return optimizer, schedule


def train_sft(tokenizer, prompts: list[str], steps: int, batch: int, out: Path) -> dict:
    from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches
    from dpo_rl.workers.megatron.hf_interop import export_from_current_rank, save_hf_checkpoint
    from dpo_rl.workers.megatron.logprobs import sequence_logprobs
    from dpo_rl.workers.megatron.model_factory import build_gpt_model

    config = shipped_model_config("tiny")
    torch.manual_seed(SEED)
    model = build_gpt_model(config, ParallelConfig())
    optimizer, schedule = cosine_optimizer(model, 3e-3, steps)
    rng = random.Random(SEED + 1)

    def loss_fn(logits, micro):
        lp = sequence_logprobs(logits, micro.input_ids, micro.extras["response_mask"])
        return -lp.summed.sum() / lp.num_tokens.sum(), {"loss": (-lp.summed.sum() / lp.num_tokens.sum()).detach()}

    model.train()
    losses = []
    for step in range(steps):
        rows, prompt_lens = zip(*(encode_pair_text(tokenizer, p, world.sft_example(p, rng))
                                  for p in rng.choices(prompts, k=batch)))
        ids, mask = right_padded(list(rows), tokenizer.pad_token_id)
        response = mask.clone()
        for i, n in enumerate(prompt_lens):
            response[i, :n] = 0
        out_ = run_microbatches(model, [Microbatch(ids, mask, {"response_mask": response})], loss_fn, forward_only=False)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out_[0]["loss"]))
        if step % 100 == 0 or step == steps - 1:
            print(f"  sft step {step:4d} loss {losses[-1]:.3f}", flush=True)
    save_hf_checkpoint(out, export_from_current_rank(model, config), config,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return {"sft_final_loss": sum(losses[-20:]) / 20}


def rm_batch(tokenizer, prompts: list[str], count: int, rng: random.Random):
    chosen, rejected = [], []
    for prompt in rng.choices(prompts, k=count):
        good, bad = world.preference_pair(prompt, rng)
        chosen.append(encode_pair_text(tokenizer, prompt, good)[0])
        rejected.append(encode_pair_text(tokenizer, prompt, bad)[0])
    return right_padded(chosen + rejected, tokenizer.pad_token_id)


def train_rm(tokenizer, train_prompts: list[str], eval_prompts: list[str], steps: int, batch: int, out: Path) -> dict:
    from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches
    from dpo_rl.workers.megatron.hf_interop import export_from_current_rank, save_hf_checkpoint
    from dpo_rl.workers.megatron.model_factory import build_reward_model
    from dpo_rl.workers.reward import last_token_index

    config = shipped_model_config("tiny-rm")
    torch.manual_seed(SEED + 2)
    model = build_reward_model(config, ParallelConfig())
    optimizer, schedule = cosine_optimizer(model, 2e-3, steps)
    rng = random.Random(SEED + 3)

    def scores_of(values, mask):
        return values[..., 0].gather(1, last_token_index(mask)[:, None])[:, 0]

    def loss_fn(values, micro):
        scores = scores_of(values, micro.attention_mask)
        half = scores.shape[0] // 2
        margin = scores[:half] - scores[half:]
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        return loss, {"loss": loss.detach(), "accuracy": (margin > 0).float().mean()}

    model.train()
    for step in range(steps):
        ids, mask = rm_batch(tokenizer, train_prompts, batch, rng)
        out_ = run_microbatches(model, [Microbatch(ids, mask)], loss_fn, forward_only=False)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"  rm step {step:4d} loss {float(out_[0]['loss']):.3f} acc {float(out_[0]['accuracy']):.2f}", flush=True)
    model.eval()
    ids, mask = rm_batch(tokenizer, eval_prompts, 512, random.Random(SEED + 4))
    with torch.no_grad():
        out_ = run_microbatches(model, [Microbatch(ids, mask)], loss_fn, forward_only=True)
    save_hf_checkpoint(out, export_from_current_rank(model, config, reward=True), config, reward=True,
                       pad_token_id=tokenizer.pad_token_id)
    return {"rm_heldout_pair_accuracy": float(out_[0]["accuracy"])}


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def build(force: bool = False, sft_steps: int = 400, rm_steps: int = 400) -> dict:
    info_path = ARTIFACTS / "build_info.json"
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        if info.get("version") == BUILD_VERSION:
            print(f"tiny world already built in {ARTIFACTS} (use --force to rebuild)")
            return info
    from dpo_rl.workers.megatron.parallel_state import destroy_distributed, free_port, init_distributed

    torch.set_num_threads(2)
    start = time.perf_counter()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = world.split_prompts(SEED)
    write_prompts(ARTIFACTS / "prompts_train.jsonl", train_prompts)
    write_prompts(ARTIFACTS / "prompts_eval.jsonl", eval_prompts)
    tokenizer = build_tokenizer(ARTIFACTS / "tokenizer")
    print(f"tokenizer: {len(tokenizer)} tokens; {len(train_prompts)} train / {len(eval_prompts)} held-out prompts")
    init_distributed(ParallelConfig(), 0, 1, master_port=free_port())
    try:
        info = {"version": BUILD_VERSION, "seed": SEED}
        print("SFT of the tiny actor:")
        info.update(train_sft(tokenizer, train_prompts, sft_steps, 64, ARTIFACTS / "sft"))
        print("Bradley-Terry training of the tiny reward model:")
        info.update(train_rm(tokenizer, train_prompts, eval_prompts, rm_steps, 32, ARTIFACTS / "rm"))
    finally:
        destroy_distributed()
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"built in {info['build_seconds']} s: {info}")
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if artifacts exist")
    build(force=parser.parse_args().force)
