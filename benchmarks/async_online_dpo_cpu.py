"""Synchronous vs asynchronous online DPO on CPU: a split actor at ``algorithm.max_staleness`` 0 and 1.

Both run the embedded tiny world's demo recipe (16 prompts x 2 responses per step, built if missing) on Ray
with a split actor: one training rank and one rollout rank (``resource_pool.actor_rollout=[2]``,
``num_gpus_for_infer=1``), the reference and the reward model, four single-thread worker processes that the OS
schedules on this machine's cores (``ray.num_cpus=4``: one Ray CPU slot each; on 2 cores the training and the
rollout rank can each have one while the reference and reward model, which compute beside the update's forward,
take their turns). Each setting runs ``--steps`` steps in alternating rounds (sync, async, sync, async, ...) and
reports the median step time after ``--warmup`` steps, the phases' medians, the mean staleness and the
RM-judged win rate over the initial actor on 48 held-out prompts after the same number of steps.

    python benchmarks/async_online_dpo_cpu.py [--steps 80] [--warmup 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLIT = ("resource_pool.actor_rollout=[2]", "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1", "ray.num_cpus=4")
SETTINGS = {"sync (max_staleness 0)": 0, "async (max_staleness 1)": 1}


def run_setting(max_staleness: int, steps: int, out: Path) -> tuple[list[dict], list[dict], float]:
    """(metrics rows, timing rows, final win rate) of one run of the demo recipe with a split actor."""
    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    art = ROOT / "examples/tiny_world/artifacts"
    summary = run(compose("online_dpo_trainer_tiny", [
        f"training.train_iters={steps}", f"training.output_dir={out}", "training.eval_interval=0",
        "training.eval_samples=48", "training.log_interval=1000", "+training.plot=false",
        f"training.tokenizer_name_or_path={art / 'tokenizer'}", f"actor_rollout_ref.actor_rollout.load={art / 'sft'}",
        f"actor_rollout_ref.ref.load={art / 'sft'}", f"reward.load={art / 'rm'}",
        f"data.train_path={art / 'prompts_train.jsonl'}", f"data.eval_path={art / 'prompts_eval.jsonl'}",
        *SPLIT, f"+algorithm.max_staleness={max_staleness}",
    ]))

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    return rows("metrics.jsonl"), rows("timing.jsonl"), summary["eval/win_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two settings")
    args = parser.parse_args()
    from examples.tiny_world.build import build

    build()
    timing = {name: [] for name in SETTINGS}
    metrics = {name: [] for name in SETTINGS}
    win_rates = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):  # alternating, so a machine that gets busier slows both alike
        for name, staleness in SETTINGS.items():
            with tempfile.TemporaryDirectory() as out:
                rows, times, win_rate = run_setting(staleness, args.steps, Path(out))
            metrics[name] += rows[args.warmup:]
            timing[name] += times[args.warmup:]
            win_rates[name].append(win_rate)

    def median(name, key):
        values = [t[key] for t in timing[name] if key in t]
        return statistics.median(values) if values else None

    print(f"\nonline DPO with a split actor on CPU (tiny world, 16 prompts x 2 per step, {args.steps} steps, medians of "
          f"{args.rounds} alternating rounds x {args.steps - args.warmup} steps after {args.warmup} warm-up)")
    print("cores: 1 training rank, 1 rollout rank, reference and reward model: 4 single-thread processes on "
          "this machine's cores, OS-scheduled\n")
    names = list(SETTINGS)
    print("| median s | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for phase in ("generate", "sync", "reward", "reference", "update", "orchestration", "step"):
        cells = [median(n, f"timing/{phase}") for n in names]
        print(f"| {phase} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    for label, key in (("mean staleness", "async/staleness_mean"), ("mean objective/scores", "objective/scores")):
        cells = [statistics.mean(r[key] for r in metrics[n]) for n in names]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    print("| win rate after the run | " + " | ".join(", ".join(f"{w:.3f}" for w in win_rates[n]) for n in names) + " |")
    sync, ahead = (median(n, "timing/step") for n in names)
    print(f"\nasync / sync step time: {ahead / sync:.2f}")


if __name__ == "__main__":
    main()
