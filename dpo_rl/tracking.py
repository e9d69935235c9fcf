"""Metrics: a progress line every ``log_interval`` steps (stage, step, ETA, the stage's key metrics), a progress
bar on a terminal, metrics.jsonl, timing.jsonl, the trackers ``training.report_to`` lists (TensorBoard, W&B), and
a PNG of the curves at the end.

``metrics.jsonl`` holds only what a seed determines (rewards, losses, log-probs, ...), so
two runs with one seed on CPU write identical files; wall-clock measurements
(``timing/*``, ``throughput/*``) go to ``timing.jsonl`` beside it. Both are always written (resume and the run
report read them); TensorBoard and W&B get every key of both under the same names.

W&B follows its own environment variables (``WANDB_MODE``, ``WANDB_ENTITY``, ``WANDB_RUN_ID``, ...), as under TRL:
online unless ``WANDB_MODE=offline`` (or ``disabled``). Offline, the run is written to
``output_dir/wandb/offline-run-*`` (``wandb sync`` uploads it later) and ``WANDB_ERROR_REPORTING`` defaults to
``false``, so wandb-core's crash telemetry is not sent either: an offline run connects to nothing beyond this
machine (tests/test_tracking.py traces it).
"""

from __future__ import annotations

import json
import math
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from dpo_rl.errors import ConfigError

logger = logging.getLogger(__name__)

TIMING_PREFIXES = ("timing/", "throughput/")
#: The names ``training.report_to`` accepts (``none`` too: no tracker beside the jsonl files).
REPORT_TO = ("jsonl", "tensorboard", "wandb")
#: Trackers that need a package of their own (installed by the extra of the same name).
PACKAGED_TRACKERS = ("tensorboard", "wandb")
#: Where W&B's files go under the run directory (``wandb.init(dir=...)`` adds the ``wandb`` level).
WANDB_DIR = "wandb"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_WANDB_PROJECT = "dpo_rl"


def split_timing(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    timing = {k: v for k, v in metrics.items() if k.startswith(TIMING_PREFIXES)}
    return {k: v for k, v in metrics.items() if k not in timing}, timing


class Tracker(Protocol):
    """An experiment tracker: gets every step's metrics (both jsonl files' keys)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None:
        """End the tracker's run; ``failed``: the stage is ending with an error."""


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard``. A resumed run purges the events after its checkpoint's step, so the
    steps it trains again are not shown twice."""

    def __init__(self, directory: Path, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: only report_to: [tensorboard] needs it

        self.writer = SummaryWriter(str(directory / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run>/wandb`` holding the resolved config; mode, entity, run id etc. from W&B's environment
    variables. A resumed run is a new W&B run unless ``WANDB_RUN_ID`` and ``WANDB_RESUME=allow`` say otherwise."""

    def __init__(self, directory: Path, *, name: Optional[str], default_name: str, project: Optional[str],
                 config: Optional[dict]) -> None:
        """``name``/``project``: the config's (``None``: ``$WANDB_NAME``/``$WANDB_PROJECT``, else ``default_name``/
        :data:`DEFAULT_WANDB_PROJECT`); ``config``: the resolved config, shown as the run's config."""
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
            # wandb-core sends its own errors to W&B's server unless told not to; offline means nothing leaves
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb  # deferred: only report_to: [wandb] needs it (slow to import)

        try:
            self.run = wandb.init(dir=str(directory), config=config,
                                  name=name or os.environ.get("WANDB_NAME") or default_name,
                                  project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT)
        except wandb.Error as err:
            raise ConfigError([f"training.report_to includes wandb but wandb.init failed: {err}; log in (wandb login "
                               "or WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in "
                               f"{directory / WANDB_DIR} (wandb sync uploads it later)"]) from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a failed stage's run as failed, not finished


class MetricsTracker:
    """Writes every step's metrics to the jsonl files and the trackers; prints on rank 0 (the driver)."""

    def __init__(self, output_dir: str | Path, total_steps: int, *, log_interval: int = 1,
                 report_to: Sequence[str] = ("jsonl",), key_metrics: Sequence[str] = ("loss",),
                 run_config: Optional[dict[str, Any]] = None, wandb_project: Optional[str] = None,
                 run_name: Optional[str] = None, progress: bool = True, label: str = "training",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """``label`` names the stage on the progress line and bar; ``key_metrics`` are the stage's metrics the line
        shows (``eval/*`` ones follow at evaluation steps); ``run_config``, ``wandb_project`` and ``run_name`` are
        for W&B (:class:`WandbTracker`); ``clock`` times the line's elapsed time and ETA (seconds)."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.log_interval = total_steps, max(1, log_interval)
        self.label, self.key_metrics = label, tuple(key_metrics)
        # Opened on the first row: a fresh run starts the files, a resumed one keeps their early rows.
        self.metrics_file = self.timing_file = None
        self.history: list[dict[str, float]] = []
        self.report_to = tuple(report_to)
        self.trackers: list[Tracker] = []
        if "wandb" in self.report_to:  # at once: a failed login is reported before any model is loaded
            self.trackers.append(WandbTracker(self.dir, name=run_name, default_name=f"{label}-{self.dir.resolve().name}",
                                              project=wandb_project, config=run_config))
        self.tensorboard_pending = "tensorboard" in self.report_to  # opened with the first row (resume purges)
        self.bar = None
        self.clock = clock
        self.start = clock()
        self.first_logged: Optional[tuple[int, float]] = None  # (step, time) of this process's first row: the pace
        if progress and sys.stderr.isatty():
            from tqdm import tqdm  # deferred: only an interactive terminal needs it

            self.bar = tqdm(total=total_steps, desc=label, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def _open_tensorboard(self, purge_step: Optional[int] = None) -> None:
        if self.tensorboard_pending:
            self.tensorboard_pending = False
            self.trackers.append(TensorBoardTracker(self.dir, purge_step))

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
        self._open_tensorboard(purge_step=step + 1)
        if self.bar is not None:
            self.bar.update(step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.metrics_file is None:
            self.metrics_file = (self.dir / "metrics.jsonl").open("w")
            self.timing_file = (self.dir / "timing.jsonl").open("w")
        self._open_tensorboard()
        values, timing = split_timing(metrics)
        record = {"step": step, **{k: _round(v) for k, v in sorted(values.items())}}
        self.metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self.metrics_file.flush()
        self.timing_file.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in sorted(timing.items())}}) + "\n")
        self.timing_file.flush()
        self.history.append({"step": step, **metrics})
        for tracker in self.trackers:
            tracker.log(step, metrics)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.key_metrics if k in metrics}, refresh=False)
        now = self.clock()
        if self.first_logged is None:
            self.first_logged = (step, now)
        if step % self.log_interval == 0 or step == self.total_steps:
            self.print(self.format_line(step, metrics, now))

    def format_line(self, step: int, metrics: dict[str, float], now: Optional[float] = None) -> str:
        """``<stage> step 5/20 (25%) <key metrics> [eval/*] [elapsed<eta, s/step]``, e.g.
        ``dpo step 5/20 (25%) loss=0.6931 rewards/accuracies=0.75 [0:12<0:36, 2.41s/step]``."""
        parts = [f"{self.label} step {step}/{self.total_steps} ({step / max(self.total_steps, 1):.0%})"]
        parts += [f"{k}={metrics[k]:.4g}" for k in self.key_metrics if k in metrics]
        parts += [f"{k}={metrics[k]:.4g}" for k in sorted(metrics) if k.startswith("eval/")]
        now = self.clock() if now is None else now
        pace = self._seconds_per_step(step, metrics, now)
        eta = _clock(pace * (self.total_steps - step)) if pace is not None else "?"
        parts.append(f"[{_clock(now - self.start)}<{eta}" + (f", {pace:.3g}s/step]" if pace is not None else "]"))
        return " ".join(parts)

    def _seconds_per_step(self, step: int, metrics: dict[str, float], now: float) -> Optional[float]:
        """Wall time per step since this process's first row (evaluation and saving included); before a second
        row, the step's own ``timing/step``."""
        if self.first_logged is not None and step > self.first_logged[0]:
            return (now - self.first_logged[1]) / (step - self.first_logged[0])
        return metrics.get("timing/step")

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
        """Close the files and the trackers; called from the stage's ``finally``, where an exception on its way
        out marks the trackers' runs failed."""
        failed = sys.exc_info()[0] is not None
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close(failed)
        for handle in (self.metrics_file, self.timing_file):
            if handle is not None:
                handle.close()


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _round(value: float) -> Optional[float]:
    """8 significant digits; NaN/inf become ``null`` (metrics.jsonl stays valid JSON)."""
    return float(f"{value:.8g}") if math.isfinite(value) else None
