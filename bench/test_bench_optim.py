"""pytest-benchmark suite: optkern's fused steps vs torch's best CPU path.

    PYTHONPATH=python pytest bench/ --benchmark-only [--benchmark-group-by=param:case]

Not part of tests/ (no correctness checks here; see tests/test_vs_torch.py for those).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")
optkern = pytest.importorskip("optkern")

from optkern.bench.runner import optkern_stepper, torch_optimizer  # noqa: E402

N = 1 << 20
THREADS = 2


@pytest.fixture(autouse=True)
def _threads():
    old_t, old_o = torch.get_num_threads(), optkern.get_num_threads()
    torch.set_num_threads(THREADS)
    optkern.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old_t)
    optkern.set_num_threads(old_o)


def _arrays(n, count=1):
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(n, dtype=np.float32) for _ in range(count)]
    gs = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2) for _ in range(count)]
    return ps, gs


def _torch_params(ps, gs):
    out = []
    for p, g in zip(ps, gs):
        t = torch.from_numpy(p.copy())
        t.grad = torch.from_numpy(g.copy())
        out.append(t)
    return out


@pytest.mark.parametrize("impl", ["optkern", "torch"])
@pytest.mark.parametrize("algo", ["Adam", "SGD", "RMSprop"])
def test_step_2e20(benchmark, algo, impl):
    benchmark.group = f"{algo} n=2^20"
    ps, gs = _arrays(N)
    if impl == "optkern":
        fn = optkern_stepper(algo, ps, gs)
    else:
        opt, path = torch_optimizer(torch, algo, _torch_params(ps, gs))
        benchmark.extra_info["torch_path"] = path
        fn = opt.step
    benchmark.extra_info["bytes"] = {"Adam": 7, "SGD": 5, "RMSprop": 5}[algo] * 4 * N
    benchmark.pedantic(fn, warmup_rounds=2, rounds=20, iterations=1)


@pytest.mark.parametrize("impl", ["optkern", "torch"])
def test_adam_1000x1024(benchmark, impl):
    benchmark.group = "Adam 1000 x 1024"
    ps, gs = _arrays(1024, 1000)
    if impl == "optkern":
        fn = optkern_stepper("Adam", ps, gs)
    else:
        fn = torch_optimizer(torch, "Adam", _torch_params(ps, gs))[0].step
    benchmark.pedantic(fn, warmup_rounds=2, rounds=30, iterations=5)


@pytest.mark.parametrize("impl", ["optkern_class", "optkern_functional", "torch"])
def test_adam_small_step(benchmark, impl):
    benchmark.group = "one Adam step, 1024 elements"
    ps, gs = _arrays(1024)
    if impl == "optkern_class":
        opt = optkern.optim.Adam(ps, lr=1e-3)
        fn = lambda: opt.step(gs)  # noqa: E731
    elif impl == "optkern_functional":
        fn = optkern_stepper("Adam", ps, gs)
    else:
        fn = torch_optimizer(torch, "Adam", _torch_params(ps, gs))[0].step
    benchmark(fn)
