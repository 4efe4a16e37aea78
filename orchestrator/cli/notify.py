"""The sender of ``launch.notify`` (issue 19): ``python -m orchestrator.cli.notify HOME JOB STATE``.

Started by the supervisor when it records the job's end (:mod:`orchestrator.supervise.notify`), in a
process of its own. It builds the job's status JSON (what ``orchestrate status JOB --json`` prints),
runs ``command`` (an argv list) with that JSON on stdin, and POSTs ``{"text": "<one line>"}`` to
``webhook`` (what Slack and Mattermost incoming webhooks take), retrying a failed POST with growing
waits. Every try is a line in ``<run dir>/notify.log``; the exit status says whether all went out.
"""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

USER_AGENT = "orchestrate-notify/1"


def one_line(status: dict[str, Any], host: str | None = None) -> str:
    """``orchestrate: demo-lr-1e-5-0612-ab12cd (demo-lr-1e-5) COMPLETED at step 40/40, loss 1.2345, 0:12:03
    on gpu7; model: /out/lr-1e-5``: the job's end in one line, its reason's key words first when it failed."""
    state = status.get("state")
    text = f"orchestrate: {status.get('id')} ({status.get('name')}) {state} at step {status.get('step')}/" \
           f"{status.get('max_steps') or '?'}"
    if isinstance(status.get("loss"), (int, float)):
        text += f", loss {status['loss']:.4f}"
    elapsed = status.get("elapsed_s")
    if isinstance(elapsed, (int, float)):
        h, rem = divmod(int(elapsed), 3600)
        text += f", {h}:{rem // 60:02d}:{rem % 60:02d}"
    text += f" on {host or socket.gethostname()}"
    if state == "COMPLETED" and status.get("final_model"):
        text += f"; model: {status['final_model']}"
    elif state != "COMPLETED":
        failure = next((a.get("failure") for a in reversed(status.get("attempts") or []) if a.get("failure")), None)
        reason = (status.get("message") or "").splitlines()[0] if status.get("message") else ""
        if failure and failure not in (state, "COMPLETED") and not reason.startswith(failure):
            reason = f"{failure}: {reason}" if reason else failure
        text += f"; {reason[:300]}" if reason else ""
    return " ".join(text.split())   # one line, whatever the message held


def post(url: str, text: str, *, retries: int, timeout_s: float, log: Callable[[str], None],
         sleep: Callable[[float], None] = time.sleep) -> bool:
    """POST ``{"text": text}`` as JSON; retry (1 s, 2 s, 4 s ... apart) on a network error, 429 or 5xx."""
    body = json.dumps({"text": text}).encode()
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                log(f"webhook: HTTP {resp.status} (try {attempt + 1})")
                return True
        except urllib.error.HTTPError as exc:
            log(f"webhook: HTTP {exc.code} (try {attempt + 1})")
            if exc.code != 429 and exc.code < 500:
                return False   # the URL or the payload is wrong: trying again will not help
        except (urllib.error.URLError, OSError) as exc:
            log(f"webhook: {getattr(exc, 'reason', exc)} (try {attempt + 1})")
        if attempt < retries:
            sleep(2.0 ** attempt)
    return False


def send(status: dict[str, Any], notify: dict[str, Any], log: Callable[[str], None]) -> bool:
    """Run the command and post the webhook that ``notify`` (the plan's ``launch.notify``) names."""
    from ..backends.processes import run_command

    ok = True
    timeout = float(notify.get("timeout_s", 30.0))
    if notify.get("command"):
        env = {"ORCHESTRATE_NOTIFY_JOB": str(status.get("id")), "ORCHESTRATE_NOTIFY_STATE": str(status.get("state"))}
        rc, out = run_command(list(notify["command"]), json.dumps(status, sort_keys=True), timeout, env=env)
        log(f"command {notify['command'][0]}: exit {rc}" + (f": {out}" if out and rc else ""))
        ok = rc == 0
    if notify.get("webhook"):
        ok = post(notify["webhook"], one_line(status), retries=int(notify.get("retries", 3)), timeout_s=timeout,
                  log=log) and ok
    return ok


def main(argv: list[str] | None = None) -> int:
    from ..dashboard.render import snapshot_json
    from ..dashboard.snapshots import SnapshotSource
    from ..store.jobs import open_ledger
    from ..supervise.jobs import load_plan

    home, job_id, state = (sys.argv[1:] if argv is None else argv)[:3]
    ledger = open_ledger(Path(home))
    job = ledger.get(job_id)
    path = Path(job.run_dir) / "notify.log"

    def log(message: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {job_id} {state}: {message}\n")

    status = snapshot_json(SnapshotSource(ledger).snapshot(job, detail=True), detail=True)
    return 0 if send(status, dict(load_plan(job).notify), log) else 1


if __name__ == "__main__":
    sys.exit(main())
