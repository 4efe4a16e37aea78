"""Shared fixtures: the demo assets, built once per test session (no network)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """Directory with ``model/`` and ``data/`` built by :func:`orchestrator.demo.prepare_demo`."""
    from orchestrator.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo-assets"))
