"""The job lease (orchestrator/store/lease.py): compare-and-set takes, expiry, fencing, identity.

Clocks are injected: expiry is tested in simulated time, never by sleeping.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from orchestrator.store.lease import (
    Lease,
    LeaseBusy,
    LeaseLost,
    Owner,
    newest_generation,
    read_lease,
    supervisor_health,
)


class Wall:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def other_host(token: str = "t-other") -> Owner:
    return Owner(host="another-host", pid=4242, start_time=1.0, token=token)


def test_first_acquire_gets_generation_one_and_a_second_is_told_who_holds_it(tmp_path):
    lease = Lease.acquire(tmp_path, duration_s=10)
    assert lease.gen == 1 and read_lease(tmp_path).owner == lease.record.owner
    with pytest.raises(LeaseBusy) as busy:
        Lease.acquire(tmp_path, owner=other_host(), duration_s=10)
    assert busy.value.holder.owner.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(busy.value)


def test_an_expired_lease_of_another_host_is_taken_and_the_old_holder_is_fenced(tmp_path):
    wall = Wall()
    old = Lease.acquire(tmp_path, owner=other_host("a"), duration_s=10, wall=wall)
    wall.t += 5
    with pytest.raises(LeaseBusy):
        Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, wall=wall)   # renewed 5 s ago: held
    wall.t += 6
    new = Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, wall=wall)  # 11 s: expired
    assert new.gen == old.gen + 1
    with pytest.raises(LeaseLost, match="taken over"):
        old.check()
    with pytest.raises(LeaseLost):
        old.renew()
    new.check()


def test_a_dead_holder_on_this_host_frees_the_lease_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    import socket

    dead = Owner(host=socket.gethostname(), pid=child.pid, start_time=123.0, token="dead")
    Lease.acquire(tmp_path, owner=dead, duration_s=3600)
    assert not read_lease(tmp_path).alive()          # PID gone (or reused: its start time differs)
    assert Lease.acquire(tmp_path, duration_s=10).gen == 2


def test_the_holders_token_hands_a_live_lease_over(tmp_path):
    first = Lease.acquire(tmp_path, duration_s=60)
    second = Lease.acquire(tmp_path, owner=other_host(), handoff_token=first.token, duration_s=60)
    assert second.gen == 2 and first.superseded().owner.host == "another-host"
    with pytest.raises(LeaseBusy):
        Lease.acquire(tmp_path, owner=other_host("x"), handoff_token="not-the-token", duration_s=60)


def test_of_many_concurrent_takers_exactly_one_wins(tmp_path):
    results, barrier = [], threading.Barrier(8)

    def take(i):
        barrier.wait()
        try:
            results.append(("won", Lease.acquire(tmp_path, owner=other_host(f"t{i}"), duration_s=60).gen))
        except LeaseBusy as busy:
            results.append(("busy", busy.holder.gen))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [r for r in results if r[0] == "won"] == [("won", 1)]
    assert newest_generation(tmp_path) == 1


def test_renewal_keeps_it_and_a_late_renewal_gives_it_up(tmp_path):
    wall, mono = Wall(), Wall(0.0)
    lease = Lease.acquire(tmp_path, duration_s=10, wall=wall, clock=mono)
    wall.t += 4
    mono.t += 4
    lease.renew()
    assert read_lease(tmp_path).renewed == wall.t
    mono.t += 9   # more than 3/4 of the lease without renewing (a frozen process): others may take it
    with pytest.raises(LeaseLost, match="not renewed"):
        lease.renew()
    with pytest.raises(LeaseLost):
        lease.check()


def test_release_frees_it_for_the_next_and_health_says_so(tmp_path):
    lease = Lease.acquire(tmp_path, duration_s=60)
    health = supervisor_health(tmp_path)
    assert health.alive and health.pid == os.getpid() and health.heartbeat_age_s < 5
    lease.release()
    assert not supervisor_health(tmp_path).alive
    assert supervisor_health(tmp_path).missing(created=0.0)
    assert Lease.acquire(tmp_path, duration_s=60).gen == 2


def test_a_job_without_any_lease_is_missing_only_after_a_grace(tmp_path):
    health = supervisor_health(tmp_path)
    assert not health.alive and health.pid is None
    assert not health.missing(created=100.0, now=110.0)
    assert health.missing(created=100.0, now=1000.0)


def test_keep_alive_renews_from_its_own_thread(tmp_path):
    lease = Lease.acquire(tmp_path, duration_s=1.0).keep_alive(interval_s=0.05)
    first = read_lease(tmp_path).renewed
    done = threading.Event()
    for _ in range(100):
        if read_lease(tmp_path) and read_lease(tmp_path).renewed > first:
            done.set()
            break
        done.wait(0.02)
    lease.release()
    assert done.is_set()
