"""Real faults for bench/chaos.py beyond kill -9: a second host, another clock, pauses, NFS and a torn marker write.

* :func:`on_host` runs the CLI as a second login node would: its own host name and process table
  (``unshare --uts --pid --fork --mount-proc``: a PID namespace of its own), the same files; with
  ``clock_offset_s`` also its own wall and monotonic clocks (libfaketime, ``apt install faketime``).
* :func:`pause` is SIGSTOP then SIGCONT of real processes.
* :func:`marker_kill_preload` builds a tiny ``LD_PRELOAD`` library that SIGKILLs the process that renames
  a checkpoint's completion marker into place, i.e. between the marker's temporary file and its rename:
  a kill during the marker write (first attempt only, named checkpoint only).
* ``ORCHESTRATE_LEASE_FAULT=eexist_after_link`` (read by the lease itself) makes every exclusive create of a
  lease generation report EEXIST although its link succeeded, as a retransmitted NFS LINK does.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                 "/usr/local/lib/faketime/libfaketime.so.1")
HOST_B = "login-b"


def faketime_lib() -> str | None:
    return next((p for p in FAKETIME_LIBS if Path(p).is_file()), None)


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


def host_argv(argv: list[str], hostname: str = HOST_B) -> list[str]:
    """``argv`` run on a second host: its own host name and PID namespace (the filesystem is shared)."""
    sh = ('hostname "$0" && h=$(mktemp) && cat /etc/hosts > "$h" && echo "127.0.0.1 $0" >> "$h" && '
          'mount --bind "$h" /etc/hosts && exec "$@"')   # its name resolves there, as a real login node's does
    return ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", sh, hostname, *argv]


def host_env(env: dict, clock_offset_s: float | None = None) -> dict:
    """The environment of the second host's processes; with a clock offset, libfaketime shifts its clocks."""
    env = dict(env)
    if clock_offset_s:
        lib = faketime_lib()
        if lib is None:
            raise RuntimeError("a clock offset needs libfaketime (apt install faketime)")
        env.update(LD_PRELOAD=lib, FAKETIME=f"{clock_offset_s:+.0f}s", FAKETIME_NO_CACHE="1",
                   DONT_FAKE_MONOTONIC="0")
    return env


def on_host(env: dict, *args: str, cwd: str | None = None, timeout: float = 600, clock_offset_s: float | None = None,
            hostname: str = HOST_B) -> subprocess.CompletedProcess:
    """``orchestrate ARGS`` on the second host, to its end."""
    argv = host_argv([sys.executable, "-m", "orchestrator.cli", *args], hostname)
    return subprocess.run(argv, env=host_env(env, clock_offset_s), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def start_on_host(env: dict, *args: str, log: Path, cwd: str | None = None, hostname: str = HOST_B) -> subprocess.Popen:
    """``orchestrate ARGS`` on the second host in the background (a foreground supervisor there: its PID namespace
    lives as long as it does)."""
    argv = host_argv([sys.executable, "-m", "orchestrator.cli", *args], hostname)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=host_env(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def pause(pids: list[int], seconds: float) -> None:
    """SIGSTOP the processes, wait, SIGCONT them."""
    signal_all(pids, signal.SIGSTOP)
    time.sleep(seconds)
    signal_all(pids, signal.SIGCONT)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


_MARKER_KILL_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* SIGKILL this process when it renames a file onto a path containing $CHAOS_KILL_ON_RENAME (a checkpoint's
   completion marker), in the first attempt only: the marker's temporary file is written, the rename never
   happens. Everything else passes through to libc. */
static int hit(const char *newpath) {
    const char *want = getenv("CHAOS_KILL_ON_RENAME");
    const char *attempt = getenv("ORCHESTRATE_ATTEMPT");
    return want && *want && newpath && attempt && strcmp(attempt, "1") == 0 && strstr(newpath, want) != NULL;
}
int rename(const char *o, const char *n) {
    if (hit(n)) kill(getpid(), SIGKILL);
    int (*real)(const char *, const char *) = dlsym(RTLD_NEXT, "rename");
    return real(o, n);
}
int renameat(int a, const char *o, int b, const char *n) {
    if (hit(n)) kill(getpid(), SIGKILL);
    int (*real)(int, const char *, int, const char *) = dlsym(RTLD_NEXT, "renameat");
    return real(a, o, b, n);
}
int renameat2(int a, const char *o, int b, const char *n, unsigned int flags) {
    if (hit(n)) kill(getpid(), SIGKILL);
    int (*real)(int, const char *, int, const char *, unsigned int) = dlsym(RTLD_NEXT, "renameat2");
    return real(a, o, b, n, flags);
}
"""


def marker_kill_preload(folder: Path) -> Path:
    """Build (once) the LD_PRELOAD library described in the module docstring; its path."""
    lib = folder / "marker_kill.so"
    if lib.is_file():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a kill during the marker write needs a C compiler (cc) for its LD_PRELOAD library")
    src = folder / "marker_kill.c"
    src.write_text(_MARKER_KILL_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True,
                   capture_output=True)
    return lib
