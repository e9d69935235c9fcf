"""Build the embedded demo's tiny world, deterministically, in about 2 minutes on 2 CPU cores.

Writes ``examples/tiny_world/artifacts/``:

* ``tokenizer/``  a byte-level BPE tokenizer (1k tokens) trained on the synthetic corpus,
  with a chat template ``<s>{prompt}\\n{answer}</s>``;
* ``raw/``        the world's datasets as JSONL in LLaMA-Factory's alpaca columns: SFT examples
  (``instruction``, ``output``; a 70/30 plain/descriptive mix) and preference pairs
  (``instruction``, ``chosen``, ``rejected``; the more descriptive answer wins), train and held-out;
* ``data/``       the same, tokenized by ``preprocess_data.py``'s pipeline (Megatron indexed datasets);
* ``sft/``        the tiny actor (configs/rlxf/model/tiny.yaml) after ``stage: sft``
  (``configs/rlxf/sft_trainer_tiny.yaml``), exported as HF Llama safetensors;
* ``rm/``         the tiny reward model (tiny-rm.yaml) after ``stage: reward``
  (``configs/rlxf/rm_trainer_tiny.yaml``, Bradley-Terry), as HF LlamaForSequenceClassification;
* ``runs/``       the two stages' run directories (metrics.jsonl, summary.json);
* ``prompts_train.jsonl`` / ``prompts_eval.jsonl`` (held-out prompts never trained on);
* ``build_info.json`` with the stages' losses and the RM's held-out pair accuracy.

Both models are trained by the project's own stages (``dpo_rl.trainer.run``) on Ray, as
``python ray_gpt.py --config-name sft_trainer_tiny`` would.

    python examples/tiny_world/build.py [--force]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples.tiny_world import world  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BUILD_VERSION = 3
SEED = 1234
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
SFT_EXAMPLES = 8000
PAIR_EXAMPLES = 6000
HELD_OUT_PAIRS = 512


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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_datasets(root: Path, train_prompts: list[str], eval_prompts: list[str], *, sft_examples: int,
                   pair_examples: int, held_out_pairs: int) -> dict[str, Path]:
    """Raw JSONL of the world's SFT examples and preference pairs (seeded); returns name -> path."""
    rng = random.Random(SEED + 1)
    sft = [{"instruction": p, "output": world.sft_example(p, rng)} for p in rng.choices(train_prompts, k=sft_examples)]
    sft_eval = [{"instruction": p, "output": world.sft_example(p, rng)} for p in rng.choices(eval_prompts, k=256)]

    def pairs(prompts, count, seed):
        pair_rng = random.Random(seed)
        rows = []
        for p in pair_rng.choices(prompts, k=count):
            chosen, rejected = world.preference_pair(p, pair_rng)
            rows.append({"instruction": p, "chosen": chosen, "rejected": rejected})
        return rows

    files = {"sft_train": sft, "sft_eval": sft_eval, "pairs_train": pairs(train_prompts, pair_examples, SEED + 3),
             "pairs_eval": pairs(eval_prompts, held_out_pairs, SEED + 4)}
    for name, rows in files.items():
        write_jsonl(root / f"{name}.jsonl", rows)
    return {name: root / f"{name}.jsonl" for name in files}


def preprocess_datasets(raw: dict[str, Path], tokenizer_dir: Path, out: Path) -> dict[str, int]:
    """Tokenize the raw files with the chat template (``--prompt-type auto``); returns examples per dataset."""
    from dpo_rl.data.preprocess import PreprocessOptions, preprocess

    counts = {}
    for name, path in raw.items():
        handler = "AlpacaStyleInstructionHandler" if name.startswith("sft") else "AlpacaStylePairwiseHandler"
        summary = preprocess(PreprocessOptions(input=str(path), tokenizer_name_or_path=str(tokenizer_dir),
                                               output_prefix=str(out / name), handler_name=handler,
                                               prompt_type="auto", log_interval=0), progress=False)
        counts[name] = summary.written
    return counts


def run_stage(config_name: str, *overrides: str) -> dict:
    """Run one training stage through the project's driver (Ray), as ray_gpt.py does."""
    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    return run(compose(config_name, list(overrides)))


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def build(force: bool = False, sft_steps: int = 400, rm_steps: int = 400) -> dict:
    info_path = ARTIFACTS / "build_info.json"
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        if info.get("version") == BUILD_VERSION:
            print(f"tiny world already built in {ARTIFACTS} (use --force to rebuild)")
            return info
    start = time.perf_counter()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = world.split_prompts(SEED)
    write_prompts(ARTIFACTS / "prompts_train.jsonl", train_prompts)
    write_prompts(ARTIFACTS / "prompts_eval.jsonl", eval_prompts)
    tokenizer = build_tokenizer(ARTIFACTS / "tokenizer")
    print(f"tokenizer: {len(tokenizer)} tokens; {len(train_prompts)} train / {len(eval_prompts)} held-out prompts")
    raw = write_datasets(ARTIFACTS / "raw", train_prompts, eval_prompts, sft_examples=SFT_EXAMPLES,
                         pair_examples=PAIR_EXAMPLES, held_out_pairs=HELD_OUT_PAIRS)
    counts = preprocess_datasets(raw, ARTIFACTS / "tokenizer", ARTIFACTS / "data")
    print(f"datasets: {counts}")
    info = {"version": BUILD_VERSION, "seed": SEED, "examples": counts}
    root = str(ARTIFACTS)
    # the build owns its stages' run directories: a rebuild (or one after a failed build) starts them over
    common = [f"training.tokenizer_name_or_path={root}/tokenizer", "training.overwrite_output_dir=true"]
    print("stage sft (configs/rlxf/sft_trainer_tiny.yaml):")
    sft = run_stage("sft_trainer_tiny", *common, f"training.train_iters={sft_steps}",
                    f"training.output_dir={root}/runs/sft", f"data.train_path={root}/data/sft_train",
                    f"data.eval_path={root}/data/sft_eval")
    print("stage reward (configs/rlxf/rm_trainer_tiny.yaml):")
    rm = run_stage("rm_trainer_tiny", *common, f"training.train_iters={rm_steps}",
                   f"training.output_dir={root}/runs/rm", f"data.train_path={root}/data/pairs_train",
                   f"data.eval_path={root}/data/pairs_eval")
    for name, summary in (("sft", sft), ("rm", rm)):
        shutil.rmtree(ARTIFACTS / name, ignore_errors=True)
        shutil.copytree(summary["hf_model"], ARTIFACTS / name)
    info.update({"sft_eval_loss": sft["eval/loss"], "rm_heldout_pair_accuracy": rm["eval/accuracy"],
                 "rm_heldout_pair_accuracy_initial": rm["eval/accuracy_initial"]})
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"built in {info['build_seconds']} s: {info}")
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if artifacts exist")
    force = parser.parse_args().force
    from dpo_rl.errors import ConfigError, RunFailed

    try:
        build(force=force)
    except (ConfigError, RunFailed) as err:  # one message, as ray_gpt.py prints it
        print(f"build.py: {err}", file=sys.stderr)
        sys.exit(2)
