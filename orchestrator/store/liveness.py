"""Is somebody still there? Judged on this host's own clock, never on another host's clock or PIDs.

Two things say a job is alive: its supervisor's lease (renewed every few seconds) and its
ranks' beat (rank 0's ``heartbeat.json``, rewritten every ``HEARTBEAT_S``). Both are files
that another host writes with *its* clock, so their time stamps are never compared with
ours. Instead this host remembers when it first saw each file's current content, on its
own monotonic clock (``CLOCK_BOOTTIME``: it goes on counting while the machine sleeps), and
judges "no change seen for D seconds" (:class:`Sightings`). A change seen is proof of life,
whatever the writer's clock says; a clock 20 s off changes nothing.

A process table is only trusted for processes of this host and PID namespace
(:func:`namespace_id`): a host never declares another host's processes dead from its own.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

SIGHTINGS_FILE = "{host}.seen.json"   # under <home>/index/: this host's memory of what it saw change
KEEP_SIGHTINGS_S = 7 * 86400.0


def boottime() -> float:
    """Seconds on this machine's monotonic clock that includes suspend (CLOCK_BOOTTIME where there is one)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def boot_id() -> str:
    """This kernel's boot id: monotonic readings compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def namespace_id() -> str:
    """Which process table this process sees: the boot and the PID namespace.

    Two processes may compare PIDs only when these agree (a container or ``unshare --pid`` on the
    same machine sees other PIDs, even under the same host name).
    """
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{boot_id()}/{pidns}"


def same_process_table(host: str | None, ns: str | None) -> bool:
    """Whether a process recorded as (``host``, ``ns``) lives in this host's process table.

    A record without a namespace (written by an older version) counts by host name alone.
    """
    if not host or host != socket.gethostname():
        return False
    return not ns or ns == namespace_id()


class Sighting(tuple):
    """What this host knows of a watched value: ``age``, seconds since it first saw the value as it is now,
    and ``changed_s``, seconds since it last saw the value before it (``None``: the value was there at its
    first look, its history unknown). The value changed somewhere in between."""

    def __new__(cls, age: float, changed_s: float | None):
        return super().__new__(cls, (age, changed_s))

    @property
    def age(self) -> float:
        return self[0]

    @property
    def changed_s(self) -> float | None:
        return self[1]

    def verdict(self, window_s: float) -> bool | None:
        """``False``: no change seen for ``window_s``; ``True``: a change seen within it; ``None``: not yet known.

        The change happened after this host last saw the old value, and no later than it first saw the new
        one: alive only if the former is within the window, expired once the latter is past it.
        """
        if self.age >= window_s:
            return False
        if self.changed_s is not None and self.changed_s < window_s:
            return True
        return None


class Sightings:
    """When this host saw each watched value change, on its own monotonic clock.

    :meth:`sight` says how long a value has been seen unchanged and when the value before it was last
    seen. With ``path`` the memory is kept in a file, so that one short-lived command after another
    (``status``, ``resume``) builds on what earlier ones saw; readings of another boot are dropped.
    Concurrent writers and stale files can only make a change look older and a value look younger
    than they are (a later first sighting, an earlier last sighting of the old value): the verdict
    errs towards "not yet known", never towards a premature "alive" or "expired".
    """

    def __init__(self, path: str | os.PathLike | None = None, clock: Callable[[], float] = boottime):
        self.path = Path(path) if path else None
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, list] = {}     # key -> [value, first seen, old value last seen or None, last seen]
        self._loaded = False

    def sight(self, key: str, value: str) -> Sighting:
        """Look at ``key``'s current ``value``: since when it is so, as far as this host saw."""
        now = self.clock()
        with self._lock:
            self._load()
            entry = self._seen.get(key)
            if entry is not None and entry[0] == value:
                entry[3] = now
                return Sighting(max(0.0, now - float(entry[1])),
                                None if entry[2] is None else max(0.0, now - float(entry[2])))
            before = None if entry is None else float(entry[3])
            self._seen[key] = [value, now, before, now]
            self._save(now)
            return Sighting(0.0, None if before is None else max(0.0, now - before))

    def forget(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def _load(self) -> None:
        if self._loaded or self.path is None:
            self._loaded = True
            return
        self._loaded = True
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("boot") == boot_id() and isinstance(data.get("seen"), dict):
            self._seen.update({k: v for k, v in data["seen"].items() if isinstance(v, list) and len(v) == 4})

    def _save(self, now: float) -> None:
        if self.path is None:
            return
        self._seen = {k: v for k, v in self._seen.items() if now - float(v[3]) < KEEP_SIGHTINGS_S}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"boot": boot_id(), "seen": self._seen}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass   # a memory of sightings is an optimisation: without it, a command just watches longer


_DEFAULT: dict[str, Sightings] = {}


def sightings_for(run_dir: str | os.PathLike) -> Sightings:
    """This host's sightings for jobs under ``<home>/runs/``: kept in ``<home>/index/<host>.seen.json``."""
    run_dir = Path(run_dir)
    home = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    path = home / "index" / SIGHTINGS_FILE.format(host=socket.gethostname()) if home is not None else None
    key = str(path)
    if key not in _DEFAULT:
        _DEFAULT[key] = Sightings(path)
    return _DEFAULT[key]


def watch(read: Callable[[], str | None], key: str, window_s: float, sightings: Sightings, *,
          wait_s: float = 0.0, fresh: bool = False, poll_s: float = 0.2, sleep: Callable[[float], None] = time.sleep
          ) -> tuple[bool | None, float]:
    """Watch a value for at most ``wait_s`` until this host knows whether it still changes.

    Returns ``(alive, unchanged_s)``: ``True`` once a change was seen within ``window_s``, ``False``
    once no change was seen for ``window_s`` (or there is no value at all: ``read`` returned
    ``None``), ``None`` when watching ended before either was known. ``fresh``: only a change seen
    during this call counts as alive (one seen a little earlier may have been the last one: a command
    about to act watches until it sees another, or none for the window).
    """
    deadline = sightings.clock() + wait_s
    first = None
    while True:
        value = read()
        if value is None:
            return False, 0.0
        seen = sightings.sight(key, value)
        verdict = seen.verdict(window_s)
        if fresh and verdict is True and (first is None or value == first):
            verdict = None
        first = value if first is None else first
        if verdict is not None or sightings.clock() >= deadline:
            return verdict, seen.age
        sleep(min(poll_s, max(0.0, deadline - sightings.clock())))
