"""What every stage's loop shares: the fit skeleton (resume, evaluation cadence, checkpoints),
step timing, and the mini-batch layout of an update.

A stage's loop subclasses :class:`TrainingLoop` and fills in its hooks; :meth:`TrainingLoop.fit`
reads as the steps every stage takes:

    before_training()                     # e.g. sample the evaluation baseline
    first = restore() + 1                 # training.resume
    start_evaluation()                    # only when starting fresh
    for step in first .. train_iters:
        metrics = train_step(step)
        + evaluate() every eval_interval steps
        tracker.log(step, metrics); save(step) every save_interval steps
    return finish()                       # final evaluation -> the run's summary
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.training import (
    latest_step,
    restore_group_checkpoint,
    save_group_checkpoint,
)
from dpo_rl.config.resolution import ROLE_SECTIONS, ResolvedConfig
from dpo_rl.errors import Interrupted, TrainingStopped, WorkerFailed
from dpo_rl.runtime.worker_group import wait_for

logger = logging.getLogger(__name__)


class TrainingLoop:
    """The skeleton of one stage's training: subclasses implement :meth:`train_step` and the hooks."""

    #: Key of the trainer state that records how far the data sampler got.
    consumed_key = "consumed_samples"

    def __init__(self, config: ResolvedConfig, trained, *, tracker, sampler) -> None:
        """``trained``: the worker group whose weights the checkpoints hold; ``sampler``: the data
        sampler whose position they record."""
        self.c, self.trained, self.tracker, self.sampler = config, trained, tracker, sampler
        self.trained_role = config.trained_role
        self.summary: dict[str, Any] = {}
        self.nonfinite_steps = 0  # steps with a non-finite gradient or metric (training.on_nonfinite)

    # -- the skeleton -----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.c.training
        self.before_training()
        first = self.restore() + 1
        if first == 1:  # a resumed run reported its start already
            self.start_evaluation()
        for step in range(first, t.train_iters + 1):
            try:
                self.run_step(step)
            except FloatingPointError as err:  # a worker met non-finite numbers it cannot go on with
                raise self.stopped(f"step {step}: {str(err).splitlines()[-1].strip()}", self.nonfinite_advice()
                                   ) from None
            except WorkerFailed as err:
                raise self.stopped(f"step {step}: {err}") from None
            except KeyboardInterrupt:
                raise self.stopped(f"interrupted (Ctrl-C) during step {step}", kind=Interrupted) from None
        return self.finish()

    def run_step(self, step: int) -> None:
        """One step: train, check, evaluate when due, log, save when due."""
        t = self.c.training
        metrics = self.train_step(step)
        self.check_finite(step, metrics)
        if self.evaluates and t.eval_interval and step % t.eval_interval == 0 and step < t.train_iters:
            metrics.update(self.evaluate())
        self.tracker.log(step, metrics)
        if t.save_interval and step % t.save_interval == 0:
            self.save(step)

    def check_finite(self, step: int, metrics: dict[str, float]) -> None:
        """A step with a non-finite gradient (never applied by the workers) or metric: stop or skip it.

        ``training.on_nonfinite: stop`` logs the step (NaN as null) and raises :class:`TrainingStopped`
        naming the step, the metrics and the last checkpoint; ``skip`` counts it
        (``train/nonfinite_steps``, cumulative) and goes on.
        """
        bad = nonfinite_keys(metrics)
        if not bad:
            return
        self.nonfinite_steps += 1
        metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
        shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:4])
        withheld = any(k.endswith("/nonfinite_steps") for k in bad)
        update = ("its non-finite update was not applied" if withheld
                  else "its gradients were finite and the update was applied")
        if self.c.training.on_nonfinite == "skip":
            logger.warning("step %d: non-finite %s; %s; going on (%d such steps so far)", step, shown, update,
                           self.nonfinite_steps)
            return
        self.tracker.log(step, metrics)
        raise self.stopped(f"step {step}: non-finite {shown}; {update}; the run stopped",
                           f"{self.nonfinite_advice()}, or set training.on_nonfinite: skip")

    def stopped(self, what: str, advice: str = "", kind: type[TrainingStopped] = TrainingStopped) -> TrainingStopped:
        """The run's stop at ``what`` (a ``kind``): with the last checkpoint (or that there is none) and ``advice``."""
        last = latest_step(self.save_dir)
        if last:
            hint = f"the last checkpoint is step {last} in {self.save_dir} (training.resume=auto restarts from it)"
        else:
            hint = "no checkpoint was written (training.save_interval is 0 or none was due yet)"
        return kind(f"{what}; {hint}" + (f". {advice}" if advice else ""), resumable=bool(last))

    def nonfinite_advice(self) -> str:
        section = ROLE_SECTIONS[self.trained_role]
        return f"Lower {section}.lr or {section}.clip_grad"

    # -- hooks --------------------------------------------------------------------------------
    @property
    def evaluates(self) -> bool:
        """Whether there is held-out data to evaluate on."""
        return False

    def before_training(self) -> None:
        """Runs before any checkpoint is restored (the trained group holds its initial weights)."""

    def start_evaluation(self) -> None:
        """Runs before the first step of a fresh (not resumed) run."""

    def train_step(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def finish(self) -> dict[str, Any]:
        return self.summary

    def after_restore(self, directory: Path, state: dict[str, Any]) -> None:
        """Runs after the checkpoint ``directory`` was loaded into the trained group and the data sampler set to
        its position; ``state``: what :meth:`trainer_state` recorded in it (absent keys in an older checkpoint)."""

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint records of the loop beyond its step and the data sampler's position."""
        return {}

    def save_extra(self, directory: Path) -> None:
        """Write what a checkpoint holds beyond the trained group's state into ``directory`` (being staged)."""

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def save_dir(self) -> str:
        return self.c.training.save_dir or f"{self.c.training.output_dir}/checkpoints"

    def save(self, step: int) -> None:
        """Every rank of the trained group writes its state into a staging directory; then it is committed."""
        role = self.c.roles[self.trained_role]
        state = {"step": step, self.consumed_key: step * self.c.training.global_batch_size} | self.trainer_state()
        save_group_checkpoint(self.trained, self.save_dir, step, state, self.c.models[self.trained_role],
                              role.tensor_model_parallel_size, role.pipeline_model_parallel_size,
                              self.c.training.keep_last_k, reward=self.trained_role == "reward",
                              lora=lora_record(role), extra=self.save_extra)
        logger.info("saved checkpoint of step %d to %s", step, self.save_dir)

    def restore(self) -> int:
        """Load the checkpoint ``training.resume`` names; returns its step (0 when starting fresh)."""
        restored = restore_group_checkpoint(self.trained, self.c.training.resume, self.save_dir)
        if restored is None:
            return 0
        path, state = restored
        self.sampler.consumed = state[self.consumed_key]
        self.after_restore(path, state)
        self.tracker.resume_from(state["step"])
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]


def lora_record(role) -> Optional[dict[str, Any]]:
    """What a checkpoint records of a role's LoRA settings (``None``: the role trains every weight)."""
    return asdict(role.lora) if role.lora.enabled else None


def nonfinite_keys(metrics: dict[str, float]) -> list[str]:
    """Metrics that are NaN/inf, and the workers' counts of non-finite gradients that are not 0."""
    bad = []
    for key, value in sorted(metrics.items()):
        if key.startswith("timing/") or key == "train/nonfinite_steps" or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (key.endswith("/nonfinite_steps") and value > 0):
            bad.append(key)
    return bad


def minibatch_layout(
    num_pairs: int, *, mini_batch_size: int, dp_size: int, micro_batch_size: int, epochs: int,
    shuffle: bool, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row order, mini-batch id and weight of every row the actor's DP ranks receive.

    Each epoch's pairs (shuffled with ``seed`` if asked) are cut into mini-batches of
    ``mini_batch_size``; a mini-batch is padded to a multiple of ``dp_size x
    micro_batch_size`` with weight-0 rows and dealt to DP ranks in equal contiguous slices.
    The rows are ordered rank by rank, so splitting the result into ``dp_size`` equal
    chunks gives each rank its slice of every mini-batch, in order. Real rows weigh
    ``1 / real rows in their mini-batch``.
    """
    per_rank: list[list[tuple[int, int, float]]] = [[] for _ in range(dp_size)]
    generator = torch.Generator().manual_seed(seed)
    quantum = dp_size * micro_batch_size
    minibatch = 0
    for _ in range(epochs):
        order = torch.randperm(num_pairs, generator=generator) if shuffle else torch.arange(num_pairs)
        for start in range(0, num_pairs, mini_batch_size):
            real = order[start : start + mini_batch_size].tolist()
            padded = real + [real[0]] * ((-len(real)) % quantum)
            weights = [1.0 / len(real)] * len(real) + [0.0] * (len(padded) - len(real))
            share = len(padded) // dp_size
            for d in range(dp_size):
                per_rank[d].extend(
                    (padded[i], minibatch, weights[i]) for i in range(d * share, (d + 1) * share)
                )
            minibatch += 1
    rows = [r for rank_rows in per_rank for r in rank_rows]
    index = torch.tensor([r[0] for r in rows], dtype=torch.long)
    ids = torch.tensor([r[1] for r in rows], dtype=torch.long)
    weight = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    return index, ids, weight


def _compute_seconds(result: Any) -> Optional[float]:
    if isinstance(result, Batch):
        return result.meta.get("compute_s")
    if isinstance(result, dict):
        return result.get("compute_s")
    return None


@dataclass
class StepTimer:
    """Wall time of each phase as seen by the driver, and the workers' own compute time.

    ``critical`` holds the compute on the step's critical path: a phase that runs beside it
    (collected with ``critical=False``) is timed but not counted.
    """

    wall: dict[str, float] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    critical: float = 0.0

    def run(self, phase: str, fn, *args, **kwargs):
        """Run one phase; its result's ``compute_s`` is the worker's own time."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.wall[phase] = time.perf_counter() - start
        compute = _compute_seconds(result)
        self.compute[phase] = float(compute) if compute is not None else self.wall[phase]
        self.critical += self.compute[phase]
        return result

    def collect(self, phase: str, pending: list, *, critical: bool = True) -> Any:
        """Wait for started calls of one phase; Batches are concatenated, compute times summed. A phase that
        ran alongside the critical path (``critical=False``) is timed but not added to it."""
        start = time.perf_counter()
        results = [wait_for(p) for p in pending]
        self.wall[phase] = time.perf_counter() - start
        computes = [_compute_seconds(r) for r in results]
        self.compute[phase] = sum(c for c in computes if c is not None) if any(
            c is not None for c in computes) else self.wall[phase]
        if critical:
            self.critical += self.compute[phase]
        if isinstance(results[0], Batch):
            merged = Batch.concat(results)
            merged.meta["compute_s"] = self.compute[phase]
            return merged
        return results[0]
