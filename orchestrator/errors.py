"""Errors the CLI turns into exit code 2: kept import-light so every verb can catch them."""
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


class JobError(Exception):
    """A request about a job that cannot be honoured (exit code 2 at the CLI)."""
