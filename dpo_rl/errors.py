"""The project's own errors: bad configuration (every problem found, not just the first) and a deliberate stop."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """A run stopped on purpose mid-training (e.g. a non-finite step); the message says why and what to do."""


class ConfigError(ValueError):
    """Raised once with all configuration problems; each names key, value, rule and fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")
