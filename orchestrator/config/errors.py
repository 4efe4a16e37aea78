"""The error every bad input ends in: the CLI prints it and exits 2 before anything starts."""
from __future__ import annotations


class ConfigError(Exception):
    """The config has problems; ``problems`` lists each one with its key path."""

    def __init__(self, source: str, problems: list[str], notices: list[str] | None = None):
        self.source = source
        self.problems = problems
        self.notices = notices or []
        super().__init__(f"{source}: {len(problems)} problem(s)")

    def render(self) -> str:
        lines = [f"error: {self.source} has {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
