"""Reading a job's logs: every rank's stdout/stderr, followed like ``tail -f``, and the first error.

Layout (see ``store/paths.py`` and ``plan/slurm.py``): torchrun's ``--log-dir`` is
``attempts/<n>/ranks/``, holding ``<run-id>/attempt_<k>/<local rank>/{stdout,stderr}.log``;
under SLURM each node has its own ``ranks/node<k>/``. The *first* error of an attempt
comes from the structured records, never from parsing logs: the earliest
``error-rank<R>.json`` by ``time`` (the root cause, not the echoes on other ranks), or a
rank that ``agent.json`` says died from a signal. Logs are only searched to point at
where the traceback is printed. Import-light: no torch, no rich.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..worker import channel

TRACEBACK_START = "Traceback (most recent call last):"
_NODE_DIR = re.compile(r"^node(\d+)$")


@dataclass(frozen=True)
class RankLog:
    """One log file of one rank (``rank`` is the global rank when the node is known)."""

    rank: int
    stream: str          # "stdout" or "stderr"
    path: Path

    @property
    def prefix(self) -> str:
        """What each of its lines is printed after: ``[rank R]``."""
        return f"[rank {self.rank}]"


@dataclass(frozen=True)
class FirstError:
    """The root-cause error of an attempt, from its structured records."""

    rank: int | None
    summary: str                 # one line: "RuntimeError: boom" or "killed by SIGKILL"
    time: float | None = None
    step: int | None = None
    traceback: str | None = None
    source: str | None = None    # the record it came from

    def line(self) -> str:
        """``rank R: summary`` (what the dashboard shows)."""
        where = f"rank {self.rank}" if self.rank is not None else "agent"
        at = f" (step {self.step})" if self.step else ""
        return f"{where}{at}: {self.summary}"


def rank_logs(attempt_dir: Path, nproc_per_node: int | None = None) -> list[RankLog]:
    """Every rank log of an attempt, ordered by rank then stream (stdout before stderr).

    Under SLURM (``ranks/node<k>/``) the global rank is ``k * nproc_per_node + local rank``;
    without ``nproc_per_node`` it is taken as the number of local ranks seen.
    """
    base = Path(attempt_dir) / "ranks"
    found = []
    for path in base.glob("**/std*.log"):
        if path.stem not in ("stdout", "stderr") or not path.parent.name.isdigit():
            continue
        node = 0
        for part in path.relative_to(base).parts:
            m = _NODE_DIR.match(part)
            node = int(m.group(1)) if m else node
        found.append((node, int(path.parent.name), path))
    per_node = nproc_per_node or max((local + 1 for _, local, _ in found), default=1)
    out = [RankLog(node * per_node + local, path.stem, path) for node, local, path in found]
    return sorted(out, key=lambda r: (r.rank, r.stream != "stdout", str(r.path)))


def _error_records(attempt_dir: Path) -> list[tuple[dict, Path]]:
    d = Path(attempt_dir)
    paths = list(d.glob(f"{channel.ERROR_FILE_PREFIX}*.json")) + list(d.glob(f"nodes/*/{channel.ERROR_FILE_PREFIX}*.json"))
    recs = [(channel.read_json(p), p) for p in paths]
    return [(r, p) for r, p in recs if isinstance(r, dict)]


def earliest_error_record(attempt_dir: Path) -> tuple[dict, Path] | None:
    """The earliest ``error-rank<R>.json`` of an attempt: the root cause, not the echoes on other ranks.

    The supervisor classifies the attempt from it; the dashboard shows it.
    """
    recs = _error_records(attempt_dir)
    if not recs:
        return None
    return min(recs, key=lambda rp: (rp[0].get("time") or 0, str(rp[0].get("rank") or 0)))


def first_error(attempt_dir: Path) -> FirstError | None:
    """The root cause of a failed attempt: a rank killed by a signal (kill -9, the OOM killer: the other
    ranks' errors, "Connection reset by peer", are its echoes), else the earliest error record, else
    the torchrun agent's own signal, else ``None``."""
    agent_path = Path(attempt_dir) / channel.AGENT_RECORD_FILE
    agent = channel.read_json(agent_path) or {}
    failures = agent.get("failures") or {}
    for rank, f in sorted(failures.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if f.get("signal") and f["signal"] != "SIGTERM":  # SIGTERM: torchrun ending the survivors
            return FirstError(rank=int(rank) if str(rank).isdigit() else None,
                              summary=f"killed by {f['signal']} (exit {f.get('exitcode')})", source=str(agent_path))
    found = earliest_error_record(attempt_dir)
    if found:
        rec, path = found
        message = str(rec.get("message") or "").strip().splitlines()
        summary = f"{rec.get('type', 'Error')}: {message[0] if message else ''}".rstrip(": ")
        return FirstError(rank=rec.get("rank"), summary=summary[:300], time=rec.get("time"),
                          step=rec.get("step"), traceback=rec.get("traceback"), source=str(path))
    if agent.get("outcome") == "signalled":
        return FirstError(rank=None, summary=f"torchrun agent got {agent.get('signal')}", source=str(agent_path))
    return None


def find_traceback(path: Path, max_lines: int = 200) -> tuple[int, list[str]] | None:
    """``(line number, lines)`` of the first Python traceback printed in a log, or ``None``.

    The block runs from ``Traceback (most recent call last):`` to the exception line
    (the first line after it that is not indented).
    """
    try:
        f = open(path, errors="replace")
    except OSError:
        return None
    with f:
        start, block = None, []
        for n, raw in enumerate(f, 1):
            line = _visible(raw.rstrip("\n"))
            if start is None:
                if TRACEBACK_START in line:
                    start, block = n, [line]
                continue
            block.append(line)
            body = line.split("]:", 1)[-1] if line.startswith("[rank") else line  # torchrun --tee prefixes
            if (body and not body[0].isspace() and not body.startswith("During handling")
                    and not body.startswith(TRACEBACK_START)) or len(block) >= max_lines:
                return start, block
        return (start, block) if start is not None else None


def locate_traceback(logs: list[RankLog], rank: int | None) -> tuple[RankLog, int, list[str]] | None:
    """The first traceback in the logs of ``rank`` (stderr first), else of any rank."""
    ordered = sorted(logs, key=lambda r: (r.rank != rank, r.stream != "stderr", r.rank))
    for log in ordered:
        found = find_traceback(log.path)
        if found:
            return log, found[0], found[1]
    return None


def _visible(line: str) -> str:
    """What a terminal shows of a line with carriage returns (progress bars redraw with ``\\r``)."""
    if "\r" in line:
        parts = [p for p in line.split("\r") if p]
        return parts[-1] if parts else ""
    return line


def tail_lines(path: Path, n: int, block: int = 65536) -> tuple[list[str], int]:
    """The last ``n`` complete lines of a file and the byte offset just after them."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError:
        return [], 0
    with f:
        chunks, newlines, pos = [], 0, size
        while pos > 0 and newlines <= n:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
            pos = start
        data = b"".join(reversed(chunks))
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode(errors="replace").split("\n")[:-1]   # not splitlines(): it splits at \r
        if pos > 0:
            lines = lines[1:]  # the first one may be cut
        return [_visible(x) for x in lines[-n:]] if n else [], pos + len(complete)


class LogFollower:
    """Follows many log files at once, returning new complete lines with their file."""

    def __init__(self, logs: list[RankLog] | None = None, max_bytes: int = 4 << 20):
        self.offsets: dict[Path, int] = {}
        self.logs: list[RankLog] = []
        self.max_bytes = max_bytes
        for log in logs or []:
            self.add(log, 0)

    def add(self, log: RankLog, offset: int = 0) -> None:
        """Start following ``log`` from ``offset`` (no-op if it is followed already)."""
        if log.path not in self.offsets:
            self.logs.append(log)
            self.offsets[log.path] = offset

    def poll(self) -> list[tuple[RankLog, str]]:
        """New complete lines of every file since the last call (at most ``max_bytes`` of each)."""
        out = []
        for log in self.logs:
            offset = self.offsets[log.path]
            try:
                if os.path.getsize(log.path) <= offset:
                    continue
                with open(log.path, "rb") as f:
                    f.seek(offset)
                    data = f.read(self.max_bytes)
            except OSError:
                continue
            cut = data.rfind(b"\n") + 1
            if not cut:
                if len(data) < self.max_bytes:
                    continue
                cut = len(data)   # one enormous line: pass it on in pieces
                data += b"\n"
            self.offsets[log.path] = offset + cut
            out.extend((log, _visible(line)) for line in data[:cut].decode(errors="replace").split("\n")[:-1])
        return out
