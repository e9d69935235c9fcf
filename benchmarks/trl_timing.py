"""Timing TRL's trainers for the comparisons: each optimizer step's wall time, and its phases."""

from __future__ import annotations

import time
from typing import Any, Optional


def step_timer(step_times: list[float], phases: Optional["PhaseTimes"] = None):
    """A callback appending every step's seconds (``on_step_begin`` -> ``on_step_end``) to ``step_times``; with
    ``phases``, also closing that step's phase record."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            if phases is not None:
                phases.current = {}

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            step_times.append(seconds)
            if phases is not None:
                phases.close_step(seconds)

    return StepTimer()


class PhaseTimes:
    """Seconds per phase of each step: :meth:`wrap` makes a model's method add its time to a phase; what the step
    spent outside every wrapped call is its ``update`` (the policy's forward, backward and optimizer step, and the
    trainer's own bookkeeping)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner: Any, method: str, phase: str) -> None:
        """Time every call of ``owner.method`` (an instance attribute shadows the class's method) as ``phase``."""
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed)

    def close_step(self, seconds: float) -> None:
        self.steps.append({**self.current, "update": seconds - sum(self.current.values()), "step": seconds})
        self.current = {}
