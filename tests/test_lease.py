"""The job lease (orchestrator/store/lease.py): compare-and-set takes, expiry on the reader's clock, fencing.

Clocks are injected: expiry is tested in simulated time, never by sleeping. The holder's wall clock is
set hours off on purpose: nothing may depend on it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from orchestrator.store.lease import (
    ENV_LEASE_FAULT,
    Lease,
    LeaseBusy,
    LeaseLost,
    Owner,
    judge_holder,
    newest_generation,
    read_lease,
    supervisor_health,
)
from orchestrator.store.liveness import Sightings, namespace_id
from orchestrator.worker import channel, fence


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def other_host(token: str = "t-other") -> Owner:
    return Owner(host="another-host", pid=4242, start_time=1.0, token=token, ns="boot/pid:[1]")


def test_first_acquire_gets_generation_one_and_a_second_is_told_who_holds_it(tmp_path):
    lease = Lease.acquire(tmp_path, duration_s=10)
    assert lease.gen == 1 and read_lease(tmp_path).owner == lease.record.owner
    assert read_lease(tmp_path).owner.ns == namespace_id()
    with pytest.raises(LeaseBusy) as busy:
        Lease.acquire(tmp_path, owner=other_host(), duration_s=10)
    assert busy.value.holder.owner.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(busy.value)


@pytest.mark.parametrize("holder_clock_offset", [-7200.0, 0.0, 7200.0])
def test_another_hosts_lease_expires_only_after_no_renewal_is_seen_for_its_duration(tmp_path, holder_clock_offset):
    """The holder writes its own (hours off) wall clock; the reader judges by what it saw change, on its clock."""
    mine = Clock(50.0)
    seen = Sightings(clock=mine)
    old = Lease.acquire(tmp_path, owner=other_host("a"), duration_s=10, wall=Clock(1e9 + holder_clock_offset),
                        clock=Clock(0.0))
    with pytest.raises(LeaseBusy):   # first look: not known yet, so held
        Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, sightings=seen)
    mine.t += 9
    with pytest.raises(LeaseBusy):   # 9 s without a renewal seen: still held
        Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, sightings=seen)
    mine.t += 2
    new = Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, sightings=seen)   # 11 s: expired
    assert new.gen == old.gen + 1
    with pytest.raises(LeaseLost, match="taken over"):
        old.check()


def test_a_renewal_seen_keeps_the_lease_held_whatever_its_time_stamp_says(tmp_path):
    mine = Clock(0.0)
    seen = Sightings(clock=mine)
    holder_clock = Clock(0.0)
    old = Lease.acquire(tmp_path, owner=other_host("a"), duration_s=10, wall=Clock(5.0), clock=holder_clock)
    assert judge_holder(tmp_path, sightings=seen)[1] is None          # never watched: unknown
    for _ in range(5):                                               # renewed every 4 s, stamped 1970 + 5 s
        mine.t += 4
        holder_clock.t += 4
        old.renew()
        assert judge_holder(tmp_path, sightings=seen)[1] is True     # a change seen: held
    mine.t += 10.5
    assert judge_holder(tmp_path, sightings=seen)[1] is False        # none seen for the lease: gone


def test_watching_an_unknown_holder_ends_as_soon_as_a_renewal_is_seen(tmp_path):
    mine = Clock(0.0)
    seen = Sightings(clock=mine)
    holder = Lease.acquire(tmp_path, owner=other_host("a"), duration_s=10)
    renewals = []

    def sleep(s):   # the holder renews while the reader watches
        mine.t += s
        if mine.t >= 1.0 and not renewals:
            holder.renew()
            renewals.append(mine.t)

    with pytest.raises(LeaseBusy):
        Lease.acquire(tmp_path, owner=other_host("b"), duration_s=10, wait_s=30, sightings=seen, sleep=sleep)
    assert renewals and mine.t < 2.0, "it stopped watching at the first renewal it saw"


def test_a_dead_holder_of_this_process_table_frees_the_lease_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = Owner(host=socket.gethostname(), pid=child.pid, start_time=123.0, token="dead", ns=namespace_id())
    Lease.acquire(tmp_path, owner=dead, duration_s=3600)
    assert judge_holder(tmp_path)[1] is False       # PID gone (or reused: its start time differs)
    assert Lease.acquire(tmp_path, duration_s=10).gen == 2


def test_a_pid_of_another_pid_namespace_is_never_judged_from_this_process_table(tmp_path):
    """Same host name, another PID namespace (a container, `unshare --pid`): its PID 1 means nothing here."""
    foreign = Owner(host=socket.gethostname(), pid=999999, start_time=1.0, token="ns", ns="boot/pid:[123]")
    assert not foreign.is_local()
    Lease.acquire(tmp_path, owner=foreign, duration_s=3600)
    with pytest.raises(LeaseBusy):
        Lease.acquire(tmp_path, duration_s=10)


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


def test_eexist_after_a_successful_link_is_still_a_win(tmp_path, monkeypatch):
    """NFS retransmits a LINK whose reply was lost; the retransmission says EEXIST though the link was made."""
    monkeypatch.setenv(ENV_LEASE_FAULT, "eexist_after_link")
    lease = Lease.acquire(tmp_path, duration_s=60)
    assert lease.gen == 1 and read_lease(tmp_path).owner.token == lease.token
    lease.check()
    with pytest.raises(LeaseBusy):   # and somebody else's file is still somebody else's
        Lease.acquire(tmp_path, owner=other_host(), duration_s=60)
    assert newest_generation(tmp_path) == 1


def test_the_fence_fails_once_the_holders_own_renewal_is_older_than_half_the_lease(tmp_path):
    mono = Clock(0.0)
    lease = Lease.acquire(tmp_path, duration_s=10, clock=mono)
    mono.t += 4
    lease.check()
    lease.renew()
    mono.t += 5.1   # a SIGSTOP, a frozen VM: nobody took it yet, but others may judge it expired soon
    with pytest.raises(LeaseLost, match="older than half|more than half"):
        lease.check()
    with pytest.raises(LeaseLost):
        lease.renew()
    assert newest_generation(tmp_path) == 1


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
    first = read_lease(tmp_path).beat
    done = threading.Event()
    for _ in range(100):
        if read_lease(tmp_path) and read_lease(tmp_path).beat > first:
            done.set()
            break
        done.wait(0.02)
    lease.release()
    assert done.is_set()


def test_sightings_outlive_the_command_that_made_them_but_not_a_reboot(tmp_path):
    path = tmp_path / "seen.json"
    mono = Clock(10.0)
    Sightings(path, clock=mono).sight("k", "v1")
    mono.t += 30
    again = Sightings(path, clock=mono).sight("k", "v1")
    assert again.age == 30 and again.verdict(20) is False and again.changed_s is None
    changed = Sightings(path, clock=mono).sight("k", "v2")
    assert changed.changed_s == 30 and changed.verdict(20) is None, \
        "the old value was last seen 30 s ago: the change may be that old, so nothing is known yet"
    watching = Sightings(path, clock=mono)
    watching.sight("k", "v2")
    mono.t += 1
    assert watching.sight("k", "v3").verdict(20) is True      # seen changing within a second
    data = json.loads(path.read_text())
    data["boot"] = "another-boot"
    path.write_text(json.dumps(data))
    assert Sightings(path, clock=mono).sight("k", "v3").age == 0     # another boot's clock: forgotten


def test_the_worker_is_fenced_by_a_newer_generation_unless_it_continues_the_attempt(tmp_path):
    env = {channel.ENV_LEASE_GEN: "1"}
    first = Lease.acquire(tmp_path, duration_s=60)
    assert fence.fenced(tmp_path, 3, env) is None
    second = Lease.acquire(tmp_path, owner=other_host(), handoff_token=first.token, continues=(3,), duration_s=60)
    assert fence.fenced(tmp_path, 3, env) is None                      # adopted: its ranks go on
    assert "generation 2" in fence.fenced(tmp_path, 2, env)           # not adopted: fenced
    Lease.acquire(tmp_path, owner=other_host("c"), handoff_token=second.token, duration_s=60)
    assert "generation 3" in fence.fenced(tmp_path, 3, env)           # the next holder did not continue it
    assert fence.fenced(tmp_path, 3, {}) is None                       # run by hand: no fence


def test_a_stop_request_covers_every_attempt_up_to_its_number(tmp_path):
    from orchestrator.supervise import elsewhere

    elsewhere.request_stop(tmp_path, 4, "cancelled from host-b")
    elsewhere.request_stop(tmp_path, 2, "an older one")      # never lowers the bar
    assert fence.stop_requested(tmp_path, 3) and fence.stop_requested(tmp_path, 4)
    assert fence.stop_requested(tmp_path, 5) is None
