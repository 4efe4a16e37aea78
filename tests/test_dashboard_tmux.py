"""End to end: ``orchestrate status`` in a real terminal (tmux) while a demo job runs (issue 5).

What a person would see, read back with ``tmux capture-pane``: the job appears, its step
advances while it is RUNNING, and it turns COMPLETED at 40/40; ``status JOB`` shows the
detail and returns to the prompt by itself once the job has ended.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys

import pytest
from orch_helpers import REPO, Tmux, env_for, orch, wait_for, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the live-terminal test needs it (apt-get install tmux)")
    t = Tmux()
    yield t
    t.kill()


def status_command(home, *args: str) -> str:
    env = env_for(home, TERM="xterm-256color")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(("ORCHESTRATE_", "PATH", "HOME",
                                                                                           "PYTHON", "TERM")))
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "orchestrator.cli", "status", *args))
    # -u: tmux started without a terminal may put COLUMNS=80/LINES=24 into the pane's environment,
    # which would override the real pane size for rich (and for shutil.get_terminal_size).
    return f"cd {shlex.quote(str(REPO))} && env -u COLUMNS -u LINES {exports} {argv}"


def job_line(screen: str, job_id: str) -> str | None:
    return next((line for line in screen.splitlines() if line.startswith(job_id)), None)


def test_status_in_a_real_terminal_follows_a_demo_job_to_completed(tmp_path, demo_assets, tmux):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, name="dash", launch={"name": "dash"})
    sub = orch(home, "submit", "--detach", str(cfg), cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    try:
        tmux.start("all", status_command(home, "--interval", "0.5"))
        tmux.start("one", status_command(home, job_id[:8], "--interval", "0.5"))

        seen: list[int] = []

        def progressed():
            line = job_line(tmux.screen("all"), job_id)
            if line is None:
                return None
            m = re.search(r"\b(\d+)/40\b", line)
            if m and "RUNNING" in line and (not seen or int(m.group(1)) != seen[-1]):
                seen.append(int(m.group(1)))
            return "COMPLETED" in line and line

        final = wait_for(progressed, 600, "the job to turn COMPLETED in the live status view", interval=0.2)
        assert "40/40" in final, final
        running = [s for s in seen if 0 < s < 40]
        assert len(running) >= 2 and running == sorted(running), f"step values seen while RUNNING: {seen}"
        screen = tmux.screen("all")
        assert screen.splitlines()[0].startswith("orchestrate") and "Ctrl-C leaves this view" in screen
        assert "\x1b" not in screen

        wait_for(lambda: tmux.dead("one"), 30, "`status JOB` to return once the job ended")
        detail = tmux.screen("one")
        assert f"{job_id} (dash, local)" in detail and "COMPLETED" in detail and "40/40 (100%)" in detail
        assert "loss" in detail and "┤" in detail and "attempts" in detail
        assert tmux.alive() and not tmux.dead("all")   # the all-jobs view keeps going until Ctrl-C
        tmux("send-keys", "-t", "t:all", "C-c")
        wait_for(lambda: tmux.dead("all"), 15, "Ctrl-C to leave the live view")
    finally:
        if orch(home, "status", job_id, "--json").stdout.find('"state": "RUNNING"') >= 0:
            orch(home, "cancel", job_id)
