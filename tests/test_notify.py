"""Issue 19, fast: ``launch.notify`` validated, the one-line text, the webhook POST against a real HTTP
server on 127.0.0.1 (retries on 5xx and connection errors, none on 4xx), the command with the status
JSON on stdin, and which ends send anything. End to end with real jobs: ``test_sweep_integration.py``."""
from __future__ import annotations

import http.server
import json
import socket
import sys
import threading

import pytest
from helpers import job_config, model_of

from orchestrator.cli.notify import one_line, post, send
from orchestrator.config.launch import parse_launch
from orchestrator.config.notify import parse_notify
from orchestrator.plan import make_plan
from orchestrator.plan.launch_plan import LaunchPlan
from orchestrator.plan.topology import Topology
from orchestrator.states import JobState
from orchestrator.supervise.notify import notify_end, wanted


class Hook:
    """A webhook on 127.0.0.1 that answers with the next of ``codes`` (then 200) and keeps every body."""

    def __init__(self, codes=()):
        self.codes, self.bodies = list(codes), []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                hook.bodies.append((self.headers.get("Content-Type"),
                                    json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(hook.codes.pop(0) if hook.codes else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/x"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    made = []

    def make(codes=()):
        made.append(Hook(codes))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_the_section_is_validated_with_every_problem():
    out, problems = parse_notify({"command": ["notify-send", "done"], "webhook": "https://hooks.example/x"})
    assert not problems and out == {"command": ["notify-send", "done"], "webhook": "https://hooks.example/x",
                                    "when": ["COMPLETED", "FAILED"], "timeout_s": 30.0, "retries": 3}
    _, problems = parse_notify({"command": "notify-send done", "webhook": "ftp://x", "when": ["DONE"], "retry": 1})
    assert len(problems) == 4
    assert any("a shell string is never run" in p for p in problems)
    assert any("launch.notify.retry: unknown key (did you mean 'retries'?)" == p for p in problems)
    _, problems = parse_notify({"when": ["FAILED"]})
    assert problems == ["launch.notify: set command (an argv list) and/or webhook (a URL)"]
    # `on:` is what people write, and YAML 1.1 reads that key as true
    out, problems = parse_notify({True: ["cancelled"], "webhook": "http://h/x"})
    assert not problems and out["when"] == ["CANCELLED"]
    settings, problems = parse_launch({"notify": {"webhook": "http://h/x"}})
    assert not problems and settings.notify["when"] == ["COMPLETED", "FAILED"]


def test_the_plan_carries_it_and_only_the_asked_for_ends_send():
    cfg = job_config(notify=parse_notify({"webhook": "http://h/x"})[0])
    plan = make_plan(cfg, Topology(0, 2), job_id="j", home=__import__("pathlib").Path("/h"), python="p",
                     worker_script="w", workdir="/w", model=model_of(cfg))
    again = LaunchPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.notify == plan.notify and again.notify["webhook"] == "http://h/x"
    assert wanted(plan.notify, JobState.FAILED) and wanted(plan.notify, JobState.COMPLETED)
    assert not wanted(plan.notify, JobState.CANCELLED) and not wanted({}, JobState.FAILED)
    said = []
    notify_end(plan, JobState.CANCELLED, said.append)      # not asked for: nothing starts
    assert said == []


def test_a_failed_job_says_why_first_in_one_line():
    status = {"id": "demo-0101-aaaaaa", "name": "demo", "state": "FAILED", "step": 12, "max_steps": 40,
              "loss": 2.5, "elapsed_s": 3723.0, "message": "out of memory: retrying unchanged would fail\nmore",
              "attempts": [{"failure": "CRASHED"}, {"failure": "OOM"}]}
    text = one_line(status, host="gpu7")
    assert text == ("orchestrate: demo-0101-aaaaaa (demo) FAILED at step 12/40, loss 2.5000, 1:02:03 on gpu7; "
                    "OOM: out of memory: retrying unchanged would fail")
    done = one_line({**status, "state": "COMPLETED", "final_model": "/out", "message": "completed"}, host="h")
    assert done.endswith("on h; model: /out") and "\n" not in done


def test_the_webhook_gets_a_json_text_and_a_5xx_is_retried(hook):
    h = hook([500, 503])
    log, waits = [], []
    assert post(h.url, "job ended", retries=3, timeout_s=5, log=log.append, sleep=waits.append) is True
    assert h.bodies == [("application/json", {"text": "job ended"})] * 3
    assert log == ["webhook: HTTP 500 (try 1)", "webhook: HTTP 503 (try 2)", "webhook: HTTP 200 (try 3)"]
    assert waits == [1.0, 2.0]


def test_a_4xx_is_not_retried_and_an_unreachable_hook_gives_up(hook):
    h = hook([404])
    log: list[str] = []
    assert post(h.url, "x", retries=3, timeout_s=5, log=log.append, sleep=lambda s: None) is False
    assert len(h.bodies) == 1
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log.clear()
    assert post(f"http://127.0.0.1:{port}/x", "x", retries=2, timeout_s=2, log=log.append,
                sleep=lambda s: None) is False
    assert len(log) == 3 and all("try" in line for line in log)


def test_the_command_gets_the_status_json_on_stdin_and_no_job_tag(tmp_path, hook, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_JOB_ID", "not-for-the-command")
    out = tmp_path / "got.json"
    script = ("import json, os, sys; d = json.load(sys.stdin); "
              f"open({str(out)!r}, 'w').write(json.dumps([d, os.environ.get('ORCHESTRATE_JOB_ID'), "
              "os.environ['ORCHESTRATE_NOTIFY_STATE']]))")
    h = hook()
    status = {"id": "j", "name": "n", "state": "COMPLETED", "step": 3, "max_steps": 3}
    log: list[str] = []
    assert send(status, {"command": [sys.executable, "-c", script], "webhook": h.url, "retries": 1}, log.append)
    got, tag, state = json.loads(out.read_text())
    assert got == status and tag is None and state == "COMPLETED"
    assert h.bodies[0][1]["text"].startswith("orchestrate: j (n) COMPLETED at step 3/3")
    log.clear()
    assert not send(status, {"command": [sys.executable, "-c", "raise SystemExit(3)"]}, log.append)
    assert log == ["command " + sys.executable + ": exit 3"]
    assert not send(status, {"command": [str(tmp_path / "missing")]}, log.append)


def test_a_failed_job_is_announced_by_its_supervisor_without_waiting_for_it(tmp_path, monkeypatch, hook):
    """The supervisor records FAILED, then starts the real sender: its command and webhook both hear of it."""
    import time
    from pathlib import Path

    from orchestrator.backends.base import AttemptHandle
    from orchestrator.store.lease import Lease
    from orchestrator.store.ledger import Ledger
    from orchestrator.supervise.supervisor import Supervisor
    from orchestrator.worker import channel

    class FailingBackend:   # one attempt that fails before its first step (USER_ERROR: never retried)
        name = "local"

        def start(self, plan, attempt, resume_from):
            adir = plan.paths.attempt_dir(attempt)
            adir.mkdir(parents=True)
            channel.write_json_atomic(adir / "error-rank0.json", {"rank": 0, "time": 1.0, "type": "ValueError",
                                                                 "message": "no 'messages' in row 3",
                                                                 "phase": "setup"})
            channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, {"exit_code": 1, "failures": {}})
            return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=1, attempt_dir=str(adir))

        def poll(self, handle):
            return 1

        def kill(self, handle, grace_s=10.0):
            return []

    h = hook()
    got = tmp_path / "got.json"
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path))
    write = f"import os, sys; open({str(got)!r} + '.tmp', 'w').write(sys.stdin.read()); " \
            f"os.replace({str(got)!r} + '.tmp', {str(got)!r})"
    notify = parse_notify({"webhook": h.url, "command": [sys.executable, "-c", write]})[0]
    cfg = job_config(notify=notify)
    plan = make_plan(cfg, Topology(0, 2), job_id="j-1", home=tmp_path, python=sys.executable, worker_script="w.py",
                     workdir=str(tmp_path), model=model_of(cfg))
    plan.paths.run_dir.mkdir(parents=True)
    channel.write_json_atomic(plan.paths.plan, plan.to_dict())
    ledger = Ledger.for_home(tmp_path)
    ledger.create_job(job_id="j-1", name="t", backend="local", run_dir=plan.run_dir, config_path="c",
                      output_dir=plan.output_dir)
    events: list[str] = []
    lease = Lease.acquire(plan.run_dir)
    start = time.monotonic()
    assert Supervisor(plan, ledger, FailingBackend(), lease, on_event=events.append).run() is JobState.FAILED
    assert time.monotonic() - start < 5          # the sender runs on its own: the supervisor never waits for it
    assert any(e.startswith("notifying (command and webhook) in the background") for e in events)
    deadline = time.monotonic() + 60
    while (not h.bodies or not got.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    status = json.loads(got.read_text())
    assert status["id"] == "j-1" and status["state"] == "FAILED"
    assert h.bodies[0][1]["text"].startswith("orchestrate: j-1 (t) FAILED at step 0/")
    assert "USER_ERROR" in h.bodies[0][1]["text"]
    lines = Path(plan.run_dir, "notify.log").read_text().splitlines()
    assert any("webhook: HTTP 200" in line for line in lines)
