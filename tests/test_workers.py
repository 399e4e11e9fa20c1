"""The worker pools: reuse, growth, retirement, and jobs never confined to one CPU."""

from __future__ import annotations

import os
import threading

import pytest

from labd.workers import AffineWorkerPool, WorkerPool

POOLS = pytest.mark.parametrize("pool_class", [WorkerPool, AffineWorkerPool])

WAIT_S = 10.0


@POOLS
def test_jobs_reuse_idle_threads_and_the_pool_grows_when_all_are_busy(pool_class: type) -> None:
    pool = pool_class(name="t-pool")
    try:
        idents: list[int] = []
        for _ in range(20):
            done = threading.Event()
            pool.submit(lambda d=done: (idents.append(threading.get_ident()), d.set()))  # type: ignore[misc]
            assert done.wait(WAIT_S)
        assert len(set(idents)) <= 2  # sequential jobs run on the same one or two threads

        release, started = threading.Event(), []
        gate = threading.Semaphore(0)
        for _ in range(5):
            pool.submit(lambda: (started.append(1), gate.release(), release.wait(WAIT_S)))
        for _ in range(5):
            assert gate.acquire(timeout=WAIT_S), "a job waited behind a busy thread"
        release.set()
    finally:
        assert pool.close(timeout=WAIT_S) == []


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no per-thread CPU affinity here")
def test_a_job_may_use_every_cpu_even_when_woken_on_the_submitters() -> None:
    pool = AffineWorkerPool(name="t-affinity")
    try:
        allowed = os.sched_getaffinity(0)
        seen: list[set[int]] = []
        for _ in range(5):  # the first job starts a thread, the later ones wake an idle one
            done = threading.Event()
            pool.submit(lambda d=done: (seen.append(os.sched_getaffinity(0)), d.set()))  # type: ignore[misc]
            assert done.wait(WAIT_S)
        assert all(cpus == allowed for cpus in seen), seen
    finally:
        pool.close(timeout=WAIT_S)


@POOLS
def test_idle_threads_retire_after_the_idle_timeout(pool_class: type) -> None:
    pool = pool_class(name="t-retire", idle_timeout=0.05)
    done = threading.Event()
    pool.submit(done.set)
    assert done.wait(WAIT_S)
    threads = [t for t in threading.enumerate() if t.name.startswith("t-retire")]
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "an idle worker outlived its idle timeout"
    pool.submit(done.set)  # and the pool still works afterwards
    pool.close(timeout=WAIT_S)


@POOLS
def test_a_closed_pool_refuses_jobs(pool_class: type) -> None:
    pool = pool_class(name="t-closed")
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(lambda: None)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no per-thread CPU affinity here")
def test_jobs_still_run_after_the_process_cpu_set_changes() -> None:
    """The pool remembers the CPU set it started with; shrinking it later (taskset, a
    container's cpuset) must not lose a hand-off: setting an affinity outside the new set
    fails (EINVAL) or is trimmed, and every job still runs, on an allowed CPU."""
    before = os.sched_getaffinity(0)
    pool = AffineWorkerPool(name="t-cpuset")
    try:
        done = threading.Event()
        pool.submit(done.set)  # a worker exists and is idle
        assert done.wait(WAIT_S)
        for cpus in ({min(before)}, {max(before)}, before):
            os.sched_setaffinity(0, cpus)
            seen: list[set[int]] = []
            for _ in range(20):
                done = threading.Event()
                pool.submit(lambda d=done, s=seen: (s.append(os.sched_getaffinity(0)), d.set()))  # type: ignore[misc]
                assert done.wait(WAIT_S), f"a job was lost after the CPU set became {cpus}"
            assert all(s <= before for s in seen)
    finally:
        os.sched_setaffinity(0, before)
        assert pool.close(timeout=WAIT_S) == []


@POOLS
def test_a_job_submitted_as_an_idle_timeout_fires_runs_and_the_pool_keeps_working(
    pool_class: type,
) -> None:
    """A submit can take an idle worker just as its idle timeout fires. The worker then runs
    the job it was given; the wake-up it was sent must not break a later submit (it once
    raised RuntimeError('release unlocked lock'), which execute_task reported as a closed
    daemon). Stressed with a 1 ms idle timeout and a thread switch after every bytecode."""
    import random
    import sys
    import time

    jitter = random.Random(7)
    pool = pool_class(name="t-timeout-race", max_idle=1, idle_timeout=0.001)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for index in range(3_000):
            done = threading.Event()
            pool.submit(done.set)
            assert done.wait(WAIT_S), f"job {index} never ran"
            # Spin (a sleep's wake-up is too coarse) until about when the idle timeout fires.
            until = time.perf_counter() + jitter.uniform(0.0008, 0.0013)
            while time.perf_counter() < until:
                pass
    finally:
        sys.setswitchinterval(interval)
        assert pool.close(timeout=WAIT_S) == []
