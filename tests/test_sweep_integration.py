"""Issue 19 end to end: a sweep of real jobs (torchrun, 2 CPU ranks, the demo model) queueing for this
machine's CPU ranks one at a time, notifications of their ends to a command and to a webhook on
127.0.0.1, and a whole group cancelled (the running job and the one still waiting)."""
from __future__ import annotations

import http.server
import json
import re
import sys
import threading
from pathlib import Path

import pytest
from orch_helpers import job_processes, orch, status, wait_for, write_config

from orchestrator.store.jobfiles import read_job

pytestmark = pytest.mark.integration


class Hook:
    """A webhook on 127.0.0.1 whose first answer is HTTP 500 (the sender must try again)."""

    def __init__(self):
        self.bodies: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(500 if len(hook.bodies) == 1 else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/sweep"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _group(home: Path, group_id: str) -> dict:
    r = orch(home, "status", "--group", group_id, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_sweep_queues_for_the_cpu_ranks_notifies_and_is_cancelled_as_a_group(tmp_path, demo_assets):
    hook = Hook()
    home, out = tmp_path / "home", tmp_path / "out"
    script = ("import json, sys; d = json.load(sys.stdin); "
              f"open({str(tmp_path)!r} + '/notified-' + d['id'] + '.json', 'w').write(json.dumps(d))")
    cfg = write_config(tmp_path, demo_assets, name="sweep", max_steps=3, save_steps=100, logging_steps=1,
                       launch={"retry": {"backoff_s": 0.5},
                               "notify": {"webhook": hook.url, "command": [sys.executable, "-c", script],
                                          "timeout_s": 20}})
    r = orch(home, "submit", "--detach", str(cfg), "--sweep", "learning_rate=0.001,0.003,0.01", "--max-parallel",
             "1", f"output_dir={out}", "seed=7", cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert r.stdout == "".join(f"{i}\n" for i in ids) and len(ids) == 3      # one id a line, nothing else
    assert [i.rsplit("-", 2)[0] for i in ids] == ["demo-lr-0.001", "demo-lr-0.003", "demo-lr-0.01"]
    group_id = re.search(r"group (\S+): 3 job\(s\)", r.stderr).group(1)

    # The queue: one job at a time (2 ranks on 2 cores); the next starts only once the one before ended.
    # Watched in the job files themselves (a CLI call every half second would slow the jobs down).
    def second_running():
        states = {i: read_job(home / "runs" / i, with_attempts=False).state.value for i in ids}
        busy = [i for i, state in states.items() if state not in ("QUEUED", "COMPLETED", "CANCELLED")]
        assert len(busy) <= 1 and states[ids[2]] == "QUEUED", states
        return states[ids[1]] == "RUNNING"

    assert [row["state"] for row in _group(home, group_id)["jobs"]][1:] == ["QUEUED", "QUEUED"]
    wait_for(second_running, 300, "the second point to start", interval=0.2)
    first, second = status(home, ids[0]), status(home, ids[1])
    assert first["state"] == "COMPLETED" and first["step"] == 3
    assert second["attempts"][0]["started"] >= first["attempts"][-1]["ended"]
    assert (out / "lr-0.001" / "model.safetensors").is_file()          # each point's own output_dir
    assert first["overrides"] == ["seed=7", "learning_rate=0.001", f"output_dir={out / 'lr-0.001'}"]
    assert first["group_id"] == group_id

    # The whole group cancelled: the running job and the one still waiting (which never starts).
    r = orch(home, "cancel", "--group", group_id[:12], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    third = status(home, ids[2])
    assert status(home, ids[1])["state"] == "CANCELLED" and third["state"] == "CANCELLED"
    assert third["attempts"] == [] and "while queued" in third["message"]
    assert job_processes(ids[1]) == []
    table = _group(home, group_id)
    assert table["counts"] == {"COMPLETED": 1, "CANCELLED": 2} and table["keys"] == ["learning_rate"]
    assert table["jobs"][0]["keys"] == {"learning_rate": 0.001} and table["jobs"][0]["loss"] is not None
    r = orch(home, "list", "--group", group_id, "--json", timeout=60)
    assert sorted(j["id"] for j in json.loads(r.stdout)) == sorted(ids)

    # Notified of the COMPLETED end only (the default: FAILED and COMPLETED), the webhook after one retry.
    note = Path(wait_for(lambda: next(tmp_path.glob("notified-*.json"), None), 60, "the command to run"))
    assert note.name == f"notified-{ids[0]}.json" and json.loads(note.read_text())["state"] == "COMPLETED"
    wait_for(lambda: len(hook.bodies) >= 2, 60, "the webhook's retry")
    assert hook.bodies[0] == hook.bodies[1] and len(hook.bodies) == 2
    assert hook.bodies[0]["text"].startswith(f"orchestrate: {ids[0]} (demo-lr-0.001) COMPLETED at step 3/3")
    assert [p.name for p in tmp_path.glob("notified-*.json")] == [note.name]
    hook.server.shutdown()
