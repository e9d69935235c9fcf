"""The one error type for bad configuration: it carries every problem found, not just the first."""

from __future__ import annotations


class ConfigError(ValueError):
    """Raised once with all configuration problems; each names key, value, rule and fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")
