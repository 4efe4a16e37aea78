"""Only the owner steers: the home and every run directory are the user's alone.

A job is steered through files: ``requests/`` cancels it, ``lease/`` says who supervises it,
``plan.json`` names the Python and the environment (``LD_PRELOAD``) its ranks run with, and on
SLURM a pickle is unpickled by the requeued batch step. Whoever can write there can act as the
job's owner. So directories are created 0700 and files 0600 (the processes orchestrate starts
run with umask 077), and a home or run directory that another user owns, or that others may
write, is refused before anything is read from it, executed or unpickled. Values of environment
variables that look like secrets (``HF_TOKEN``, ``WANDB_API_KEY``, ...) are masked wherever a
plan is shown.
"""
from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

from ..errors import JobError

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077
# Names of environment variables whose values are secrets (matched anywhere in the name, any case).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|PASSPHRASE|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH|COOKIE|"
                         r"SESSION_?KEY|SIGNING_?KEY|_PAT$|^PAT_", re.IGNORECASE)
MASK = "<hidden>"


class NotPrivate(JobError):
    """A home, run directory or file that others could write (or that another user owns)."""


def private_umask() -> int:
    """From now on this process (and what it starts) creates files 0600 and folders 0700; the old umask."""
    return os.umask(UMASK)


def problem(path: str | os.PathLike, what: str) -> str | None:
    """Why ``path`` is not the user's own (another owner, or group/other-writable), or ``None``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    me = os.geteuid()
    if st.st_uid != me:
        return f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {me})"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP), ("everybody", stat.S_IWOTH)) if writable & bit)
        return (f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): anybody who can write "
                f"there can steer your jobs; run: chmod go-w {path}")
    return None


def check_private(path: str | os.PathLike, what: str) -> None:
    """Refuse ``path`` (:class:`NotPrivate`) unless it is the user's own and nobody else may write it."""
    why = problem(path, what)
    if why:
        raise NotPrivate(why)


def check_private_tree(file: str | os.PathLike, root: str | os.PathLike, what: str) -> None:
    """``file`` and every folder from its own up to ``root`` (the run directory): the user's own."""
    file, root = Path(file).absolute(), Path(root).absolute()
    check_private(file, what)
    for folder in file.parents:
        check_private(folder, "folder")
        if folder == root or root not in folder.parents:
            break


def ensure_private_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and missing parents) 0700, or check an existing one; return it."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir(mode=DIR_MODE)
            os.chmod(p, DIR_MODE)   # mkdir's mode passes through the umask; 0700 whatever it is
        except FileExistsError:
            pass
    check_private(path, what)
    return path


def write_private(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` readable and writable by the user alone (created or replaced 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def is_secret(name: str) -> bool:
    """An environment variable whose value must never be shown (a token, key or password)."""
    return bool(SECRET_NAME.search(name))


def mask_env(env: dict) -> dict:
    """``env`` with the value of every secret-looking variable replaced by ``<hidden>``."""
    return {k: (MASK if is_secret(str(k)) and v else v) for k, v in env.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.store.private DIR...``: exit 2 naming the problem unless every DIR (and each
    file directly in it) is the user's own; what a SLURM batch step runs before submitit unpickles anything."""
    argv = sys.argv[1:] if argv is None else argv
    problems = []
    for d in argv:
        problems += [p for p in [problem(d, "folder")] if p]
        try:
            entries = list(os.scandir(d))
        except OSError:
            entries = []
        problems += [p for e in entries if e.is_file(follow_symlinks=False) and (p := problem(e.path, "file"))]
    for p in problems:
        print(f"orchestrate: refusing to run: {p}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
