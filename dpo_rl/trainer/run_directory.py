"""What a run may do with its output directory, decided before anything is written there.

A finished run's files are never overwritten without being asked:

==========================================  =====================================================
the directory holds                          this run
==========================================  =====================================================
nothing of a run (or a failed one's logs)   starts
checkpoints, ``resume`` finds one < N       resumes from it (N = ``train_iters``)
a checkpoint of step N, no summary.json     finishes (final evaluation, export) without training
a checkpoint of step N and summary.json     :class:`~dpo_rl.errors.NothingToDo`: reported, exit 0
a checkpoint past step N                    refused: raise ``train_iters`` or start elsewhere
summary.json, no checkpoint, the same       :class:`~dpo_rl.errors.NothingToDo` (the command was repeated)
config.yaml
summary.json or checkpoints, nothing        refused, unless ``training.overwrite_output_dir``
to resume (``resume: none`` or no ckpt)     (which deletes that run's files first)
==========================================  =====================================================

The directory must also be writable (probed with a temporary file in its nearest existing ancestor).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpo_rl.checkpoint.convert import META_FILE, TRACKER_FILE
from dpo_rl.checkpoint.training import latest_step, read_trainer_state, resolve_resume
from dpo_rl.config.resolution import ResolvedConfig
from dpo_rl.errors import ConfigError, NothingToDo
from dpo_rl.tracking import TENSORBOARD_DIR, WANDB_DIR

logger = logging.getLogger(__name__)

#: The files a run writes into its output directory (removed by ``overwrite_output_dir``).
RUN_FILES = ("metrics.jsonl", "timing.jsonl", "summary.json", "curves.png", "config.yaml")
RUN_DIRS = (TENSORBOARD_DIR, WANDB_DIR)


@dataclass(frozen=True)
class RunPlan:
    """What the run will do with its directories."""

    resume_step: Optional[int]
    """The checkpoint step it resumes from (``None``: it starts afresh)."""
    clear_previous: bool
    """Delete an earlier run's files and checkpoints first (``overwrite_output_dir``)."""


def save_dir_of(c: ResolvedConfig) -> Path:
    return Path(c.training.save_dir or f"{c.training.output_dir}/checkpoints")


def plan_run_directory(c: ResolvedConfig, config_yaml: Optional[str] = None) -> RunPlan:
    """Check the output and checkpoint directories against the table above; raises :class:`ConfigError`
    (naming the key and what to do) or :class:`NothingToDo`. ``config_yaml``: this run's resolved config as
    the run writes it to ``config.yaml`` (a finished run with the same one is this run, repeated)."""
    t = c.training
    out, save_dir = Path(t.output_dir), save_dir_of(c)
    places = [("training.output_dir", out)] + ([("training.save_dir", save_dir)] if t.save_dir else [])
    problems = [p for key, path in places for p in [writable_problem(key, path)] if p]
    if problems:
        raise ConfigError(problems)
    finished = (out / "summary.json").is_file()
    previous = latest_step(save_dir) if save_dir.is_dir() else None
    resumed = resolve_resume(t.resume, save_dir) if (t.resume != "auto" or previous is not None) else None
    step = _step_of(resumed) if resumed is not None else None
    if step is not None and not t.overwrite_output_dir:
        if step > t.train_iters:
            raise ConfigError([f"training.resume={t.resume!r} finds the checkpoint of step {step} ({resumed}), past "
                               f"training.train_iters={t.train_iters}; raise training.train_iters to train further, or start "
                               "afresh elsewhere (another training.output_dir)"])
        if step == t.train_iters and finished:
            raise NothingToDo(f"{out} holds this run, finished at step {step} (training.train_iters={t.train_iters}, "
                              "summary.json written): nothing to do. Raise training.train_iters to train further, or "
                              "choose another training.output_dir (training.overwrite_output_dir=true starts over in "
                              "this one)")
        return RunPlan(resume_step=step, clear_previous=False)
    if finished and previous is None and not t.overwrite_output_dir and config_yaml is not None and \
            (out / "config.yaml").is_file() and (out / "config.yaml").read_text() == config_yaml:
        raise NothingToDo(f"{out} holds this run (the same config.yaml), finished (summary.json written): nothing to "
                          "do. Choose another training.output_dir to run it again, or set "
                          "training.overwrite_output_dir=true to start over in this one")
    if (finished or previous is not None) and not t.overwrite_output_dir:
        held = [what for what, present in (("a finished run (summary.json)", finished),
                                           (f"checkpoints up to step {previous} in {save_dir}", previous is not None))
                if present]
        how = ("resume them with training.resume=auto, " if previous is not None and t.resume == "none" else "")
        raise ConfigError([f"training.output_dir={str(out)!r} holds {' and '.join(held)}, which this run (starting "
                           f"afresh) would overwrite; {how}choose another training.output_dir, or set "
                           "training.overwrite_output_dir=true to delete that run's files and start over"])
    return RunPlan(resume_step=None, clear_previous=bool(t.overwrite_output_dir and (finished or previous is not None)))


def _step_of(checkpoint: Path) -> int:
    return int(read_trainer_state(checkpoint)["step"])


def writable_problem(key: str, path: Path) -> Optional[str]:
    """Why ``path`` (to be created if missing) cannot hold the run's files, or ``None``."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={str(path)!r} cannot be created: {existing} is a file, not a directory; choose another path"
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpo_rl-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return (f"{key}={str(path)!r} is not writable ({existing}: {err.strerror or err}); choose a directory you can "
                "write, or fix its permissions")
    return None


def clear_previous_run(c: ResolvedConfig) -> None:
    """``overwrite_output_dir``: delete an earlier run's files and checkpoints (logged)."""
    out, save_dir = Path(c.training.output_dir), save_dir_of(c)
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed.append(name)
    if save_dir.is_dir():
        for entry in save_dir.iterdir():
            if entry.name.startswith("iter_") or entry.name in (TRACKER_FILE, META_FILE):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(f"{save_dir.name}/{entry.name}")
    logger.warning("training.overwrite_output_dir: deleted the earlier run's %s in %s", ", ".join(removed) or "nothing",
                   out)
