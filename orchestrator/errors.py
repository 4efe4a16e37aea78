"""Errors about jobs that every layer may raise; kept import-light so every verb can catch them.

(A bad config is :class:`orchestrator.config.ConfigError`.)
"""
from __future__ import annotations


class JobError(Exception):
    """A request about a job that cannot be honoured (exit code 2 at the CLI)."""
