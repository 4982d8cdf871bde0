"""The CLI's thread policy (mae.threads): what it fills in, from what, and that it leaves set values alone."""

from __future__ import annotations

import subprocess
import sys

from mae import threads


def test_configure_fills_in_only_what_the_user_did_not_set(monkeypatch):
    """Unset: OMP_NUM_THREADS = usable CPUs / processes per node, and OMP_WAIT_POLICY=PASSIVE only when other
    processes keep half a CPU or more busy; values the user set stay."""
    monkeypatch.setattr(threads, "usable_cpus", lambda: 16)
    assert threads.configure({}, busy=0.2) == {"OMP_NUM_THREADS": "16"}
    assert threads.configure({}, busy=1.0) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "16"}
    assert threads.configure({"LOCAL_WORLD_SIZE": "4"}, busy=0)["OMP_NUM_THREADS"] == "4"
    assert threads.configure({"LOCAL_WORLD_SIZE": "32"}, busy=0)["OMP_NUM_THREADS"] == "1"
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    assert threads.configure(mine, busy=2.0) == {} and mine == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}


def test_busy_cpus_sees_a_spinning_neighbour():
    """busy_cpus reads the CPU time other processes use: a process spinning on one core counts about one CPU."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        assert threads.busy_cpus(window=0.3) >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_usable_cpus_follows_the_affinity_and_a_cgroup_quota(monkeypatch, tmp_path):
    """The CPU count is the affinity mask's, capped by a cgroup v2 quota (cpu.max '250000 100000' = 2.5 -> 3)."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.usable_cpus() == 8
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 3)
    assert threads.usable_cpus() == 3


def test_default_workers_leave_a_cpu_for_training_and_stay_at_most_eight(monkeypatch):
    """Loader workers per process: the process's share of the CPUs less one, between 0 and 8."""
    for cpus, local, want in ((1, 1, 0), (2, 1, 1), (16, 1, 8), (16, 4, 3), (8, 8, 0)):
        monkeypatch.setattr(threads, "usable_cpus", lambda cpus=cpus: cpus)
        assert threads.default_workers({"LOCAL_WORLD_SIZE": str(local)}) == want, (cpus, local)


def test_the_cli_sets_the_policy_before_torch_starts():
    """A process that calls `configure` (as the CLI does) before importing torch runs torch with the chosen wait
    policy and thread count."""
    code = ("import os, sys; [os.environ.pop(k, None) for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS')]; "
            "from mae.threads import configure; configure(busy=1.0); import torch; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "PASSIVE" and out[1] == out[2] == str(threads.usable_cpus())
