"""A transformers ``TrainerCallback`` recording each optimizer step's wall time (for the TRL comparisons)."""

from __future__ import annotations

import time


def step_timer(step_times: list[float]):
    """A callback appending every step's seconds (``on_step_begin`` -> ``on_step_end``) to ``step_times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

    return StepTimer()
