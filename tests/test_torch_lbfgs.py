"""optkern.torch.LBFGS against torch.optim.LBFGS 2.13: every CPU configuration of torch's optim_db for LBFGS,
state-dict interop both ways, pickling, schedulers.

The problem is a smooth, well-conditioned one (L2-regularised logistic regression on fresh random data, over a
weight matrix, a bias and a param without a gradient), where both libraries' line searches accept the same steps;
``optkern.optim.LBFGS``'s docstring lists where optkern's strong Wolfe search differs from torch's on hard searches.
Tolerances: relative error of the params after 3 ``step(closure)`` calls (up to 60 iterations) <= 1e-11 in
float64 with equal iteration and evaluation counts; in float32, against torch's float64 run, no further than 2e-5
or twice torch's own float32 run (see the test).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest

import optkern

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")
pytest.importorskip("expecttest", reason="torch.testing._internal (optim_db) needs expecttest: pip install expecttest")

import optkern.torch as okt  # noqa: E402
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
CONFIGS = [(i.desc, i.kwargs) for info in optim_db if info.optim_cls is torch.optim.LBFGS
           for i in info.optim_inputs_func(device="cpu", dtype=torch.float32)]


@pytest.fixture(autouse=True)
def _kernels_per_isa(cpu_isa):
    """The parity test runs on every CPU path; the API tests once."""
    return cpu_isa


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64).to(dtype)
    y = (torch.rand(200, generator=g, dtype=torch.float64) < 0.5).to(dtype)
    w0 = (0.1 * torch.randn(12, 3, generator=g, dtype=torch.float64)).to(dtype)
    b0 = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).to(dtype)
    return x, y, w0, b0


def _params(w0, b0):
    return [w0.clone().requires_grad_(), b0.clone().requires_grad_(), torch.zeros(4, dtype=w0.dtype, requires_grad=True)]


def _closure(opt, params, x, y):
    w, b, _unused = params  # the third param never gets a gradient (its .grad stays None)

    def f():
        opt.zero_grad()
        z = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y) + 1e-2 * (w ** 2).sum()
        loss = loss + 1e-2 * (z[:, 1:] ** 2).mean()
        loss.backward()
        return loss

    return f


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("desc,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_optim_db_configs_match_torch(desc, kwargs, dtype):
    x, y, w0, b0 = _problem(dtype)
    pa, pb = _params(w0, b0), _params(w0, b0)
    oa, ob = okt.LBFGS(pa, **kwargs), torch.optim.LBFGS(pb, **kwargs)
    for _ in range(3):
        la = oa.step(_closure(oa, pa, x, y))
        lb = ob.step(_closure(ob, pb, x, y))
        assert abs(float(la.detach()) - float(lb.detach())) <= TOL[dtype] * max(1.0, abs(float(lb.detach())))
    if dtype == torch.float64:
        for a, b in zip(pa[:2], pb[:2]):
            assert _rel(a.detach(), b.detach()) <= TOL[dtype], desc
    else:
        # float32: 60 L-BFGS iterations near the minimum leave each library's float32 params up to ~6e-5 (relative)
        # from the exact iterates (measured on the bias with strong Wolfe: torch 6.3e-5, optkern 1.1e-5), so the
        # two are compared with the float64 run of torch: optkern's float32 params may be no further from it than
        # 2e-5 or twice torch's own float32 distance, and within 1e-4 of torch's float32 params unless it is torch's
        # float32 run that is off: on an Intel AVX-512 VM (torch's reductions there round differently) torch's float32
        # strong-Wolfe bias ends 8.1e-3 from the float64 iterates where optkern's ends 2.6e-6, so there optkern must be
        # at least ten times closer to the float64 run than torch is.
        x64, y64, w64, b64 = _problem(torch.float64)
        pr = _params(w64, b64)
        orf = torch.optim.LBFGS(pr, **kwargs)
        for _ in range(3):
            orf.step(_closure(orf, pr, x64, y64))
        for a, b, r in zip(pa[:2], pb[:2], pr[:2]):
            a, b, r = a.detach().double(), b.detach().double(), r.detach()
            assert _rel(a, r) <= max(TOL[dtype], 2 * _rel(b, r)), desc
            assert _rel(a, b) <= 1e-4 or 10 * _rel(a, r) <= _rel(b, r), desc
    assert torch.equal(pa[2], pb[2])  # no gradient: untouched by both
    sa, sb = oa.state[pa[0]], ob.state[pb[0]]
    if dtype == torch.float64:
        assert (sa["func_evals"], sa["n_iter"]) == (sb["func_evals"], sb["n_iter"])
    else:  # float32: the two direction formulas round differently, which moves the stopping tests by an iteration;
        # the counts are those of torch's float32 run or of its float64 run (on the Intel VM above, torch's float32
        # strong-Wolfe searches take 39 evaluations where its float64 run takes 22 and optkern's float32 run 22)
        def near(s):
            return abs(sa["n_iter"] - s["n_iter"]) <= 3 and abs(sa["func_evals"] - s["func_evals"]) <= 3

        counts = [(s["n_iter"], s["func_evals"]) for s in (sa, sb, orf.state[pr[0]])]
        assert near(sb) or near(orf.state[pr[0]]), f"(n_iter, func_evals) optkern, torch f32, torch f64: {counts}"


def _run_api_once(cpu_isa):
    if cpu_isa != optkern.cpu_best_isa():
        pytest.skip("API test: ISA-independent, run once")


def test_drop_in_and_state_dict_interop(cpu_isa):
    _run_api_once(cpu_isa)
    dtype = torch.float64
    x, y, w0, b0 = _problem(dtype, seed=1)
    pa, pb = _params(w0, b0), _params(w0, b0)
    oa, ob = okt.LBFGS(pa, history_size=5, max_iter=6), torch.optim.LBFGS(pb, history_size=5, max_iter=6)
    assert isinstance(oa, torch.optim.LBFGS) and isinstance(oa, torch.optim.Optimizer)
    for _ in range(2):
        oa.step(_closure(oa, pa, x, y))
        ob.step(_closure(ob, pb, x, y))
    sa, sb = oa.state_dict(), ob.state_dict()
    keys = set(sb["state"][0]) - {"al"}  # torch's scratch of the two-loop
    assert keys <= set(sa["state"][0])
    for k in ("d", "prev_flat_grad"):
        assert _rel(sa["state"][0][k], sb["state"][0][k]) <= 1e-11
    assert len(sa["state"][0]["old_dirs"]) == len(sb["state"][0]["old_dirs"])
    # torch's state into optkern, optkern's into torch: both continue as torch would
    buf = io.BytesIO()
    torch.save(sa, buf)
    buf.seek(0)
    sa_loaded = torch.load(buf, weights_only=True)
    pc, pd, pe = (_params(pb[0].detach(), pb[1].detach()) for _ in range(3))
    oc, od = okt.LBFGS(pc, history_size=5, max_iter=6), torch.optim.LBFGS(pd, history_size=5, max_iter=6)
    oe = torch.optim.LBFGS(pe, history_size=5, max_iter=6)
    oc.load_state_dict(sb)
    od.load_state_dict(sb)
    oe.load_state_dict(sa_loaded)
    for o, p in ((oc, pc), (od, pd), (oe, pe)):
        o.step(_closure(o, p, x, y))
    assert _rel(pc[0].detach(), pd[0].detach()) <= 1e-11
    assert _rel(pe[0].detach(), pd[0].detach()) <= 1e-11


def test_pickle_deepcopy_and_scheduler(cpu_isa):
    _run_api_once(cpu_isa)
    x, y, w0, b0 = _problem(torch.float64, seed=2)
    pa = _params(w0, b0)
    oa = okt.LBFGS(pa, lr=0.5, max_iter=4)
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.5)
    oa.step(_closure(oa, pa, x, y))
    sched.step()
    assert oa.param_groups[0]["lr"] == 0.25
    ob = copy.deepcopy(oa)
    pb = ob.param_groups[0]["params"]
    oc = pickle.loads(pickle.dumps(oa))
    pc = oc.param_groups[0]["params"]
    for o, p in ((oa, pa), (ob, pb), (oc, pc)):
        o.step(_closure(o, p, x, y))
    assert torch.equal(pa[0], pb[0]) and torch.equal(pa[0], pc[0])
