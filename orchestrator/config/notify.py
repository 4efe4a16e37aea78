"""``launch.notify``: who hears when a job ends (issue 19).

```yaml
launch:
  notify:
    command: [notify-send, "training ended"]   # an argv list (never a shell string); the job's
                                               #   status JSON (orchestrate status JOB --json) on stdin
    webhook: https://hooks.slack.com/services/...   # a JSON POST {"text": "<one line>"} (Slack, Mattermost)
    when: [FAILED, COMPLETED]                  # which ends (the default); CANCELLED too if you like
```

Either or both. Delivery runs in a process of its own after the job's end is recorded,
retried a few times (the webhook) with a time limit, and never changes the job's state.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

ENDS = ("COMPLETED", "FAILED", "CANCELLED")
DEFAULT_ON = ("FAILED", "COMPLETED")
KEYS = ("command", "webhook", "when", "timeout_s", "retries")
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3


def parse_notify(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """The validated section as plain data (``{}`` when unset; it goes into the frozen plan as is)."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [f"launch.notify: expected a mapping with command and/or webhook, got {type(raw).__name__}"]
    from .schema import closest

    # `on:` is what people write (GitHub Actions), and YAML 1.1 reads that key as true: take it as `when`.
    raw = {("when" if k is True or k == "on" else k): v for k, v in raw.items()}
    problems = []
    for key in raw:
        if key not in KEYS:
            hint = closest(str(key), KEYS)
            problems.append(f"launch.notify.{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else
                                                                   f"; valid: {list(KEYS)}"))
    out: dict[str, Any] = {}
    command = raw.get("command")
    if command is not None:
        if isinstance(command, str):
            problems.append(f"launch.notify.command: expected an argv list such as [notify-send, done], got the "
                            f"string {command!r} (a shell string is never run)")
        elif not isinstance(command, list) or not command or not all(isinstance(a, (str, int, float))
                                                                     and not isinstance(a, bool) for a in command):
            problems.append(f"launch.notify.command: expected a non-empty list of strings, got {command!r}")
        else:
            out["command"] = [str(a) for a in command]
    webhook = raw.get("webhook")
    if webhook is not None:
        url = urlparse(webhook) if isinstance(webhook, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.netloc:
            problems.append(f"launch.notify.webhook: expected an http(s):// URL, got {webhook!r}")
        else:
            out["webhook"] = webhook
    if command is None and webhook is None:
        problems.append("launch.notify: set command (an argv list) and/or webhook (a URL)")
    when = raw.get("when", list(DEFAULT_ON))
    if isinstance(when, str):
        when = [when]
    if not isinstance(when, list) or not when or any(not isinstance(s, str) or s.upper() not in ENDS for s in when):
        problems.append(f"launch.notify.when: expected a list of {list(ENDS)}, got {when!r}")
    else:
        out["when"] = sorted({s.upper() for s in when})
    for key, default, lo in (("timeout_s", DEFAULT_TIMEOUT_S, 1), ("retries", DEFAULT_RETRIES, 0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
            problems.append(f"launch.notify.{key}: expected a number >= {lo}, got {value!r}")
        else:
            out[key] = int(value) if key == "retries" else float(value)
    return (out if not problems else {}), problems
