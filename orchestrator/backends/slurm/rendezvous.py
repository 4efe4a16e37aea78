"""The c10d store's port of one job step: reserved on the first node, published to the others.

A port computed from the job id alone can collide: two jobs whose ids and attempts hash alike
(``7 x job + attempt`` modulo the span), started on the same first node, would both bind it and one
would fail its rendezvous. So the first node's launcher *reserves* a port: starting from the
job's own port (:func:`orchestrator.plan.slurm.rendezvous_port`, so a job usually keeps it), it
takes the first one that no other orchestrate step on this machine holds (an ``flock`` on a file
of a machine-wide folder, held while its torchrun runs) and that nothing else has bound, and
writes it into ``nodes/0/rendezvous.json``; the other nodes wait for that file (the run directory
is on the shared filesystem).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from ...plan import slurm as slurm_plan
from ...worker import channel

LOCK_DIR = Path(os.environ.get("ORCHESTRATE_PORT_LOCKS", "/tmp/orchestrate-rdzv-ports"))
RECORD = "rendezvous.json"
WAIT_S = 600.0     # the other nodes wait this long for the first node (it may start later than they do)


class Reservation:
    """A port held for this process's lifetime (close to give it back)."""

    def __init__(self, port: int, fd: int):
        self.port, self._fd = port, fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _lock_dir() -> Path:
    """The machine-wide folder of port locks: sticky and world-writable like /tmp (users of one node share
    its ports); a lock file is readable by all, so that any user's launcher can flock it."""
    try:
        LOCK_DIR.mkdir(mode=0o1777, exist_ok=True)
        if LOCK_DIR.stat().st_uid == os.geteuid():
            os.chmod(LOCK_DIR, 0o1777)
    except OSError:
        pass
    return LOCK_DIR


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def reserve(start: int, base: int = slurm_plan.RDZV_PORT_BASE, span: int = slurm_plan.RDZV_PORT_SPAN) -> Reservation:
    """The first port from ``start`` (wrapping within ``[base, base + span)``) that no other step of this
    machine holds and that can be bound; raise RuntimeError if none is."""
    folder = _lock_dir()
    for i in range(span):
        port = base + (start - base + i) % span
        try:   # readable by all (whatever the umask): every user's launcher can flock it
            fd = os.open(folder / f"{port}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                continue
            raise
        if _bindable(port):
            return Reservation(port, fd)
        os.close(fd)
    raise RuntimeError(f"no free rendezvous port in {base}-{base + span - 1}")


def publish(plan, attempt: int, endpoint: str) -> None:
    """The first node says where the store listens (``nodes/0/rendezvous.json``)."""
    channel.write_json_atomic(slurm_plan.node_dir(plan, attempt, 0) / RECORD, {"endpoint": endpoint,
                                                                                "time": time.time()})


def published(plan, attempt: int, wait_s: float = WAIT_S, poll_s: float = 0.2) -> str:
    """The endpoint the first node published for this attempt (waits for it; RuntimeError after ``wait_s``)."""
    path = slurm_plan.node_dir(plan, attempt, 0) / RECORD
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        record = channel.read_json(path)
        if record and record.get("endpoint"):
            return str(record["endpoint"])
        time.sleep(poll_s)
    raise RuntimeError(f"the first node of attempt {attempt} published no rendezvous endpoint within "
                       f"{wait_s:.0f} s ({path})")
