"""``bench/gpu_acceptance.sh --cpu-smoke`` (issue 18.4): the GPU acceptance run's steps on CPU with tiny sizes,
so that the script is ready, and still right, when the first GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
CHECKS = {
    "throughput: seed": "PASS", "throughput: orchestrate": "PASS", "throughput: orchestrate / seed": "PASS",
    "memory: plan estimate vs measured peak": "n/a", "bf16 job COMPLETED, final model verified": "PASS",
    "kill -9 of rank 1, then resume": "PASS", "CUDA out of memory: OOM, not retried, plan's advice": "PASS",
    "varlen flash path used (not fallen back)": "PASS",
}


def test_the_gpu_acceptance_run_passes_its_steps_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    r = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--cpu-smoke", "--dir", str(tmp_path), "--python",
                        sys.executable], cwd=REPO, env=env, capture_output=True, text=True, timeout=1000)
    assert "| check | verdict | figure | detail |" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]   # the table
    rows = json.loads((tmp_path / "acceptance.json").read_text())
    kill = next(row for row in rows if row["check"].startswith("kill -9"))
    assert "KILLED -> COMPLETED" in kill["detail"] and "handed to a spare attempt" in kill["detail"], kill
    assert {row["check"]: row["verdict"] for row in rows} == CHECKS and r.returncode == 0, rows
