"""Metrics: one line per step on the console (with ETA), a progress bar on a terminal, metrics.jsonl,
timing.jsonl, TensorBoard when enabled, and a PNG of reward and loss curves at the end.

``metrics.jsonl`` holds only what a seed determines (rewards, losses, log-probs, ...), so
two runs with one seed on CPU write identical files; wall-clock measurements
(``timing/*``, ``throughput/*``) go to ``timing.jsonl`` beside it.
"""

from __future__ import annotations

import json
import math
import logging
import sys
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

TIMING_PREFIXES = ("timing/", "throughput/")
CONSOLE_KEYS = ("objective/scores", "loss", "rewards/accuracies", "rewards/margins", "objective/kl",
                "val/contain_eos_token", "response_length/mean")


def split_timing(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    timing = {k: v for k, v in metrics.items() if k.startswith(TIMING_PREFIXES)}
    return {k: v for k, v in metrics.items() if k not in timing}, timing


class MetricsTracker:
    """Writes every step's metrics; prints on rank 0 (the driver)."""

    def __init__(self, output_dir: str | Path, total_steps: int, *, log_interval: int = 1,
                 tensorboard: bool = False, progress: bool = True, label: str = "training") -> None:
        """``label`` names the stage on the progress bar."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.log_interval = total_steps, max(1, log_interval)
        # Opened on the first row: a fresh run starts the files, a resumed one keeps their early rows.
        self.metrics_file = self.timing_file = None
        self.history: list[dict[str, float]] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # deferred: only training.tensorboard needs it

            self.writer = SummaryWriter(str(self.dir / "tensorboard"))
        self.bar = None
        self.start = time.perf_counter()
        if progress and sys.stderr.isatty():
            from tqdm import tqdm  # deferred: only an interactive terminal needs it

            self.bar = tqdm(total=total_steps, desc=label, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def resume_from(self, step: int) -> None:
        """Keep the rows of steps <= ``step`` (a resumed run continues after them)."""
        for name in ("metrics.jsonl", "timing.jsonl"):
            path = self.dir / name
            kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                    if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
        self.metrics_file = (self.dir / "metrics.jsonl").open("a")
        self.timing_file = (self.dir / "timing.jsonl").open("a")
        self.history = [{"step": json.loads(line)["step"], **json.loads(line)}
                        for line in (self.dir / "metrics.jsonl").read_text().splitlines()]
        if self.bar is not None:
            self.bar.update(step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.metrics_file is None:
            self.metrics_file = (self.dir / "metrics.jsonl").open("w")
            self.timing_file = (self.dir / "timing.jsonl").open("w")
        values, timing = split_timing(metrics)
        record = {"step": step, **{k: _round(v) for k, v in sorted(values.items())}}
        self.metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self.metrics_file.flush()
        self.timing_file.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in sorted(timing.items())}}) + "\n")
        self.timing_file.flush()
        self.history.append({"step": step, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(score=f"{metrics.get('objective/scores', 0.0):.2f}",
                                 loss=f"{metrics.get('loss', 0.0):.3f}", refresh=False)
        if step % self.log_interval == 0 or step == self.total_steps:
            self.print(self.format_line(step, metrics))

    def format_line(self, step: int, metrics: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k}={metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics]
        parts += [f"{k}={metrics[k]:.4g}" for k in sorted(metrics) if k.startswith("eval/")]
        if "timing/step" in metrics:
            parts.append(f"step_s={metrics['timing/step']:.3f}")
        elapsed = time.perf_counter() - self.start
        parts.append(f"eta={_clock(elapsed / step * (self.total_steps - step))}")
        return " ".join(parts)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    def plot(self, name: str = "curves.png",
             keys: tuple[str, ...] = ("objective/scores", "loss", "rewards/margins")) -> Optional[Path]:
        """Curves of ``keys`` over steps (by default online DPO's reward, loss and margin)."""
        if not self.history:
            return None
        import matplotlib  # deferred: only plotting needs it (slow to import)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: only plotting needs it (slow to import)

        steps = [h["step"] for h in self.history]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot(steps, [float("nan") if h.get(key) is None else h[key] for h in self.history], lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for handle in (self.metrics_file, self.timing_file):
            if handle is not None:
                handle.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _round(value: float) -> Optional[float]:
    """8 significant digits; NaN/inf become ``null`` (metrics.jsonl stays valid JSON)."""
    return float(f"{value:.8g}") if math.isfinite(value) else None
