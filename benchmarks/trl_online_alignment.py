"""Our online-DPO steps against TRL 1.16's OnlineDPOTrainer on the same fixed responses; plots the curves.

Runs the comparison of ``tests/test_trl_online_alignment.py`` (the shared logic is ``tests/trl_online.py``: what
is fed and which settings match) for more steps and prompts: a random-init tiny policy, a reference of another
seed and a tiny reward model, in this process on CPU (our roles in-process, no Ray), each step's sampling
replaced by two fixed completions per prompt on both sides. Prints the largest per-step difference of every
compared value, relative to its size (rewards and margins: to the log-probs they cancel), against the test's
tolerance, and writes a PNG: the loss and the reward margins of both per step, and those differences.

    python benchmarks/trl_online_alignment.py [--steps 20] [--prompts 8] [--out docs/images/online_trl_alignment.png]

About 25 seconds on one core (``OMP_NUM_THREADS=1``), most of it imports and model set-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Where a difference of exactly 0 is drawn on the log axis.
FLOOR = 1e-10
PLOTTED = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (two completions each)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/online_trl_alignment.png")
    return parser.parse_args()


def plot(result: dict, differences: dict[str, list[float]], setup, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from tests.trl_online import RTOL

    ours, trl = result["ours"]["steps"], result["trl"]["steps"]
    steps = list(range(1, len(trl) + 1))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key in zip(axes[:2], ("loss", "rewards/margins")):
        ax.plot(steps, [s[key] for s in trl], "-", color="tab:orange", lw=2.5, label="TRL OnlineDPOTrainer")
        ax.plot(steps, [s[key] for s in ours], "o", color="tab:blue", ms=4, label="ours (Megatron-core)")
        ax.set(title=f"{key} per step", xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    for key in PLOTTED:
        ax.semilogy(steps, [max(d, FLOOR) for d in differences[key]], "o-", ms=3, lw=1, label=key)
    ax.axhline(RTOL, color="black", ls="--", lw=1, label=f"test tolerance {RTOL:g}")
    ax.set(xlabel="step", ylim=(FLOOR / 2, 1e-3))
    ax.set_title(f"|ours - TRL| / (|TRL| + scale)\nmargins' scale: beta x their log-probs; 0 drawn at {FLOOR:g}",
                 fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Online DPO on fixed responses: ours vs TRL 1.16 ({setup.prompts} prompts x 2 completions, "
                 f"beta {setup.beta}, AdamW lr {setup.lr:g}, fp32, CPU)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main() -> None:
    args = parse_args()
    from tests.trl_online import COMPARED, RTOL, Setup, build_world, compare, normalised_differences

    setup = Setup(steps=args.steps, prompts=args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", setup)
        result = compare(world, setup, Path(tmp))
    ours, trl = result["ours"]["steps"], result["trl"]["steps"]
    if result["ours"]["chosen"] != result["trl"]["chosen"]:
        raise SystemExit("the two sides chose different completions: the comparison is void")
    differences = normalised_differences(ours, trl, setup.beta)
    print(f"\n{setup.steps} steps, {setup.prompts} prompts x 2 fixed completions; both sides chose the same completion "
          f"of every pair\n\n| value | max per-step difference | at step | / tolerance {RTOL:g} |\n|---|---|---|---|")
    for key in COMPARED:
        worst = max(range(len(trl)), key=lambda i: differences[key][i])
        print(f"| {key} | {differences[key][worst]:.2g} | {worst + 1} | {differences[key][worst] / RTOL:.3f} |")
    print(f"\nloss: TRL {trl[0]['loss']:.4f} -> {trl[-1]['loss']:.4f}, ours {ours[0]['loss']:.4f} -> "
          f"{ours[-1]['loss']:.4f}")
    plot(result, differences, setup, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
