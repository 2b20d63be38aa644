"""optkern.torch.NCG: the same iterates as optkern.optim.NCG on NumPy (one engine), torch's closure protocol,
state_dict round trip and pickling, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import AVAILABLE_ISAS

torch = pytest.importorskip("torch", reason="the PyTorch front end needs torch")
import optkern  # noqa: E402
import optkern.torch  # noqa: E402,F401


def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("API test: ISA-independent, run once")


def _problem():
    r = np.random.default_rng(11)
    return r.standard_normal((40, 12)), r.standard_normal(40)


@pytest.mark.parametrize("kw", [{}, {"beta": "fr"}, {"beta": "pr", "powell": 0.2}, {"line_search_fn": None, "lr": 0.01}])
def test_torch_ncg_matches_numpy_engine(cpu_isa, kw):
    _once(cpu_isa)
    A, b = _problem()
    x = np.zeros(12)
    opt = optkern.optim.NCG([x], max_iter=8, **kw)

    def cl_np():
        r = A @ x - b
        return float(r @ r), [2 * A.T @ r]

    w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    topt = optkern.torch.NCG([w], max_iter=8, **kw)
    assert isinstance(topt, torch.optim.Optimizer)

    def cl_t():
        topt.zero_grad()
        loss = ((At @ w - bt) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(cl_np)
        topt.step(cl_t)
    # the gradients round differently (autograd vs NumPy): iterates agree to ~1e-13 after 24 iterations
    np.testing.assert_allclose(w.detach().numpy(), x, rtol=1e-9, atol=1e-11)
    assert topt.state[w]["n_iter"] == opt.state["n_iter"] > 0


def test_torch_ncg_state_dict_and_pickle(cpu_isa):
    _once(cpu_isa)
    A, b = map(torch.from_numpy, _problem())

    def make(w):
        opt = optkern.torch.NCG([w], max_iter=3)

        def cl():
            opt.zero_grad()
            loss = ((A @ w - b) ** 2).sum()
            loss.backward()
            return loss
        return opt, cl

    w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    opt, cl = make(w)
    opt.step(cl)
    w2 = w.detach().clone().requires_grad_()
    o2, cl2 = make(w2)
    o2.load_state_dict(opt.state_dict())
    opt.step(cl)
    o2.step(cl2)
    assert torch.equal(w, w2)
    o3 = pickle.loads(pickle.dumps(opt))
    assert o3.state[o3.param_groups[0]["params"][0]]["n_iter"] == opt.state[w]["n_iter"]


def test_torch_ncg_bad_input(cpu_isa):
    _once(cpu_isa)
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="beta"):
        optkern.torch.NCG([w], beta="hs")
    with pytest.raises(ValueError, match="one param group"):
        optkern.torch.NCG([{"params": [w]}, {"params": [torch.zeros(2, requires_grad=True)]}])
    with pytest.raises(RuntimeError, match="closure"):
        optkern.torch.NCG([w]).step(None)
