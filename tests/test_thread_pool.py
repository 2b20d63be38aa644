"""The CPU thread pool under stress: fork safety and concurrent steps from several Python threads."""

import os
import sys
import threading

import numpy as np
import pytest

import optkern

N = 1 << 17  # above the parallel threshold


def _adam(p, g, m, v, t):
    optkern.adam_step(p, g, m, v, step=t, lr=1e-3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
# Once the JAX tests ran in this process, JAX warns on every fork that its own threads may deadlock the child; the
# child here runs only optkern code and leaves by os._exit, and the fork safety under test is optkern's pool's.
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_parallel_step_in_forked_child(rng):
    p, g = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    _adam(p, g, m, v, 1)  # the parent's pool now has live workers
    pid = os.fork()
    if pid == 0:  # child: the parent's worker threads do not exist here; a parallel step must still finish
        try:
            q, mm, vv = p.copy(), m.copy(), v.copy()
            _adam(q, g, mm, vv, 2)
            r = q.copy()
            q2, m2, v2 = p.copy(), m.copy(), v.copy()
            optkern.set_num_threads(1)
            _adam(q2, g, m2, v2, 2)
            os._exit(0 if np.array_equal(r, q2) else 3)
        except BaseException:
            os._exit(4)
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("a parallel step in a forked child hung")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_concurrent_steps_from_python_threads(rng):
    """Steps release the GIL; several threads stepping large arrays at once (while the thread count changes)
    must each get exactly the single-threaded result."""
    base = [rng.standard_normal(N).astype(np.float64) for _ in range(4)]
    grads = [rng.standard_normal(N).astype(np.float64) for _ in range(4)]
    ref = []
    optkern.set_num_threads(1)
    for b, g in zip(base, grads):
        p, m, v = b.copy(), np.zeros_like(b), np.zeros_like(b)
        for t in range(1, 6):
            _adam(p, g, m, v, t)
        ref.append(p)
    out = [None] * 4
    errors = []

    def work(i):
        try:
            p, m, v = base[i].copy(), np.zeros_like(base[i]), np.zeros_like(base[i])
            for t in range(1, 6):
                _adam(p, grads[i], m, v, t)
            out[i] = p
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    try:
        optkern.set_num_threads(2)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        optkern.set_num_threads(3)  # resizes the pool while others may be stepping
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a step hung"
    finally:
        optkern.set_num_threads(os.cpu_count() or 1)
    assert not errors, errors
    for r, o in zip(ref, out):
        assert np.array_equal(r, o)


def test_many_parallel_jobs_in_a_row(rng):
    """Back-to-back parallel jobs with varying thread counts: every element updated exactly once each step."""
    p = np.zeros(N, np.float64)
    g = np.ones(N, np.float64)
    try:
        for k in range(200):
            optkern.set_num_threads(1 + k % 3)
            optkern.sgd_step(p, g, step=1, lr=1.0)  # p -= 1 exactly, once per element per step
    finally:
        optkern.set_num_threads(os.cpu_count() or 1)
    assert np.all(p == -200.0), (p.min(), p.max())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_parts_claimed_by_any_thread_give_identical_results(rng):
    """The caller runs any part a worker has not claimed yet (a worker slow to wake, its core busy elsewhere).
    Under a competing busy thread, 2-thread steps must stay bitwise equal to 1-thread steps."""
    p0, g = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    stop = threading.Event()

    def busy():  # keeps a core occupied, as another library's spinning threads would
        a = np.ones(1 << 12)
        while not stop.is_set():
            a *= 1.0000001

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    try:
        for threads in (1, 2):
            optkern.set_num_threads(threads)
            p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
            for step in range(1, 41):
                _adam(p, g, m, v, step)
            if threads == 1:
                ref = (p.copy(), m.copy(), v.copy())
        assert all(np.array_equal(a, b) for a, b in zip((p, m, v), ref))
    finally:
        stop.set()
        t.join()
        optkern.set_num_threads(os.cpu_count() or 1)
