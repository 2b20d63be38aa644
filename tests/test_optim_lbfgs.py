"""optkern.optim.LBFGS against torch.optim.LBFGS (torch 2.13): the same closure, the same start, several step()
calls; float64 params and the per-call counters (state n_iter / func_evals).

Tolerances: with fixed steps (line_search_fn=None) the iteration is torch's up to rounding: the direction is the
compact two-pass form instead of torch's two-loop (they differ by ~1e-15 relative in float64) and the step is
applied by optkern's kernel, so the params must agree to 1e-10 relative over 4 calls of 10 iterations on a
well-conditioned logistic regression (measured 6e-16).  With the strong Wolfe search the line search is
optkern's own, not a transcription of torch's: on the logistic regression the iterates still agree to 1e-10
(measured 4e-16); on the 10-d Rosenbrock function, run to gtol 1e-9, the minimizers must agree to 1e-8 absolute
and the iteration count be within 1.1x of torch's (measured: 9e-13, 106 iterations and 119 evaluations each).

The tests run once, under the best CPU path (the kernels they use are checked per path in test_lbfgs*.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AVAILABLE_ISAS

import optkern

torch = pytest.importorskip("torch", reason="torch==2.13.0 is needed for the torch.optim.LBFGS comparisons")


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path")


def _logreg(rng, n=200, p=30, lam=0.05):
    A = rng.standard_normal((n, p))
    b = (rng.uniform(size=n) < 1 / (1 + np.exp(-A @ rng.standard_normal(p)))).astype(np.float64)

    def np_fg(w, c):
        z = A @ w + c[0]
        loss = np.mean(np.logaddexp(0, z) - b * z) + lam * (w @ w)
        r = 1 / (1 + np.exp(-z)) - b
        return loss, [A.T @ r / n + 2 * lam * w, np.array([r.mean()])]

    tA, tb = torch.tensor(A), torch.tensor(b)

    def torch_loss(w, c):
        z = tA @ w + c
        return torch.mean(torch.nn.functional.softplus(z) - tb * z) + lam * (w @ w)

    return np_fg, torch_loss, p


def _rosenbrock_np(x):
    a, b = x[:-1], x[1:]
    f = np.sum(100 * (b - a * a) ** 2 + (1 - a) ** 2)
    g = np.zeros_like(x)
    g[:-1] = -400 * a * (b - a * a) - 2 * (1 - a)
    g[1:] += 200 * (b - a * a)
    return f, g


def _pair(rng, opts, problem="logreg"):
    """optkern and torch optimizers on the same start: (ok_opt, ok_closure, ok_params, t_opt, t_closure, t_params)."""
    if problem == "logreg":
        np_fg, torch_loss, p = _logreg(rng)
        w, c = 0.1 * rng.standard_normal(p), np.zeros(1)

        def ok_closure():
            return np_fg(w, c)
        ok_params = [w, c]
    else:
        x = np.tile([-1.2, 1.0], 5)

        def ok_closure():
            f, g = _rosenbrock_np(x)
            return f, [g]
        ok_params = [x]

        def torch_loss(x):
            return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    t_params = [torch.tensor(a.copy(), requires_grad=True) for a in ok_params]
    t_opt = torch.optim.LBFGS(t_params, **opts)

    def t_closure():
        t_opt.zero_grad()
        loss = torch_loss(*t_params)
        loss.backward()
        return loss
    return optkern.optim.LBFGS(ok_params, **opts), ok_closure, ok_params, t_opt, t_closure, t_params


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("history_size", [1, 5, 100])
def test_fixed_step_matches_torch(rng, history_size):
    opts = dict(lr=1, max_iter=10, history_size=history_size)
    ok, ok_cl, ok_p, t, t_cl, t_p = _pair(rng, opts)
    for call in range(4):
        l_ok, l_t = ok.step(ok_cl), t.step(t_cl)
        assert abs(float(l_ok) - float(l_t.detach())) <= 1e-12 * abs(float(l_t.detach())), call
        for a, b in zip(ok_p, t_p):
            assert _rel(a, b.detach().numpy()) <= 1e-10, call
        st = t.state[t_p[0]]
        assert (ok.state["n_iter"], ok.state["func_evals"]) == (st["n_iter"], st["func_evals"]), call


def test_fixed_step_small_lr_and_max_eval(rng):
    # lr < 1, max_eval below max_iter: the evaluation budget ends each call, as in torch.
    opts = dict(lr=0.3, max_iter=12, max_eval=7, history_size=4)
    ok, ok_cl, ok_p, t, t_cl, t_p = _pair(rng, opts)
    for call in range(3):
        ok.step(ok_cl)
        t.step(t_cl)
        assert _rel(ok_p[0], t_p[0].detach().numpy()) <= 1e-10, call
        st = t.state[t_p[0]]
        assert (ok.state["n_iter"], ok.state["func_evals"]) == (st["n_iter"], st["func_evals"]), call


def test_strong_wolfe_logreg_iterates_match_torch(rng):
    # On this smooth convex problem both line searches accept the same trial steps, so the iterates agree.
    opts = dict(lr=1, max_iter=10, history_size=5, line_search_fn="strong_wolfe")
    ok, ok_cl, ok_p, t, t_cl, t_p = _pair(rng, opts)
    for call in range(3):
        ok.step(ok_cl)
        t.step(t_cl)
        assert _rel(ok_p[0], t_p[0].detach().numpy()) <= 1e-10, call


def test_strong_wolfe_rosenbrock_converges_like_torch(rng):
    opts = dict(lr=1, max_iter=300, history_size=10, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                tolerance_change=0.0)
    ok, ok_cl, ok_p, t, t_cl, t_p = _pair(rng, opts, problem="rosenbrock")
    ok.step(ok_cl)
    t.step(t_cl)
    np.testing.assert_allclose(ok_p[0], np.ones(10), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ok_p[0], t_p[0].detach().numpy(), rtol=0, atol=1e-8)
    n_ok, n_t = ok.state["n_iter"], t.state[t_p[0]]["n_iter"]
    assert n_ok <= 1.1 * n_t, (n_ok, n_t)
    assert float(np.max(np.abs(_rosenbrock_np(ok_p[0])[1]))) <= 1e-9


def test_torch_tensor_params_in_place(rng):
    # torch params: closure returns the loss, gradients come from p.grad; the tensors are updated in place.
    np_fg, torch_loss, p = _logreg(rng)
    w0 = 0.1 * rng.standard_normal(p)
    tw, tc = torch.tensor(w0.copy(), requires_grad=True), torch.zeros(1, dtype=torch.float64, requires_grad=True)
    ptr = tw.data_ptr()
    opt = optkern.optim.LBFGS([tw, tc], history_size=5)

    def closure():
        for q in (tw, tc):
            q.grad = None
        loss = torch_loss(tw, tc)
        loss.backward()
        return loss
    ref_w, ref_c = w0.copy(), np.zeros(1)
    ref = optkern.optim.LBFGS([ref_w, ref_c], history_size=5)
    for _ in range(2):
        opt.step(closure)
        ref.step(lambda: np_fg(ref_w, ref_c))
    assert tw.data_ptr() == ptr
    assert _rel(tw.detach().numpy(), ref_w) <= 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_converge(dtype):
    x = np.tile([-1.2, 1.0], 3).astype(dtype)

    def closure():
        f, g = _rosenbrock_np(x.astype(np.float64))
        return f, [g.astype(dtype)]
    opt = optkern.optim.LBFGS([x], max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-4,
                              tolerance_change=0.0)
    opt.step(closure)
    assert x.dtype == dtype
    np.testing.assert_allclose(x, 1.0, atol=1e-3 if dtype == np.float32 else 1e-6)


def test_already_optimal_returns_without_iterating():
    x = np.ones(4)
    opt = optkern.optim.LBFGS([x])
    loss = opt.step(lambda: (0.0, [np.zeros(4)]))
    assert loss == 0.0 and opt.state == {"func_evals": 1, "n_iter": 0}
    np.testing.assert_array_equal(x, 1.0)


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=-1.0), "lr: expected"), (dict(lr=float("nan")), "lr: expected"), (dict(max_iter=0), "max_iter"),
    (dict(max_eval=0), "max_eval"), (dict(history_size=0), "history_size"), (dict(tolerance_grad=-1.0),
                                                                             "tolerance_grad"),
    (dict(line_search_fn="armijo"), "line_search_fn")])
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        optkern.optim.LBFGS([np.ones(3)], **kw)


def test_bad_params():
    with pytest.raises(TypeError, match=r"params\[1\]: expected float64 like params\[0\]"):
        optkern.optim.LBFGS([np.ones(3), np.ones(3, np.float32)])
    with pytest.raises(TypeError, match=r"params\[0\]: expected float32 or float64"):
        optkern.optim.LBFGS([np.ones(3, np.int64)])
    with pytest.raises(ValueError, match=r"params\[0\]: expected a C-contiguous"):
        optkern.optim.LBFGS([np.ones((4, 4))[:, ::2]])
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]: is read-only"):
        optkern.optim.LBFGS([ro])
    with pytest.raises(ValueError, match="one param group"):
        optkern.optim.LBFGS([{"params": [np.ones(2)]}, {"params": [np.ones(2)]}])
    with pytest.raises(ValueError, match="empty parameter list"):
        optkern.optim.LBFGS([])
    with pytest.raises(TypeError, match="params: expected an iterable of arrays"):
        optkern.optim.LBFGS(np.ones((3, 2)))  # a bare array, as torch refuses a bare tensor
    with pytest.raises(TypeError, match=r"params\[1\]: expected a numpy array like params\[0\]"):
        optkern.optim.LBFGS([np.ones(2), torch.ones(2, dtype=torch.float64)])
    buf = np.ones(10)
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        optkern.optim.LBFGS([buf[:6], buf[4:]])
    with pytest.raises(TypeError, match="unexpected param group keys"):
        optkern.optim.LBFGS([{"params": [np.ones(2)], "momentum": 0.9}])


def test_param_group_dict_and_generator():
    # One group dict overrides the defaults (as torch); its params may be any iterable.
    x = np.ones(3)
    opt = optkern.optim.LBFGS([{"params": (a for a in [x]), "lr": 0.5, "history_size": 3}], max_iter=4)
    g = opt.param_groups[0]
    assert (g["lr"], g["history_size"], g["max_iter"], g["max_eval"]) == (0.5, 3, 4, 5)
    assert g["params"][0] is x
    opt.step(lambda: (float(x @ x), [2 * x]))
    assert float(np.abs(x).max()) < 1.0


def test_torch_closure_with_zero_grad_under_no_grad(rng):
    # torch's usual closure (opt.zero_grad(); loss.backward()), with step() called under torch.no_grad().
    _, torch_loss, p = _logreg(rng)
    w = torch.tensor(0.1 * rng.standard_normal(p), requires_grad=True)
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optkern.optim.LBFGS([w, c], history_size=4, max_iter=5)
    ref = torch.optim.LBFGS([wr := w.detach().clone().requires_grad_(), cr := c.detach().clone().requires_grad_()],
                            history_size=4, max_iter=5)

    def closure():
        opt.zero_grad()
        loss = torch_loss(w, c)
        loss.backward()
        return loss

    def ref_closure():
        ref.zero_grad()
        loss = torch_loss(wr, cr)
        loss.backward()
        return loss
    with torch.no_grad():
        opt.step(closure)
        ref.step(ref_closure)
    assert _rel(w.detach().numpy(), wr.detach().numpy()) <= 1e-10


def test_state_dict_round_trip_continues_bitwise(rng):
    opts = dict(lr=1, max_iter=6, history_size=4, line_search_fn="strong_wolfe")
    np_fg, _, p = _logreg(rng)
    w, c = 0.1 * rng.standard_normal(p), np.zeros(1)
    opt = optkern.optim.LBFGS([w, c], **opts)
    for _ in range(2):
        opt.step(lambda: np_fg(w, c))
    sd = opt.state_dict()
    w2, c2 = w.copy(), c.copy()
    opt2 = optkern.optim.LBFGS([w2, c2], lr=0.1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["history_size"] == 4 and opt2.param_groups[0]["lr"] == 1
    opt.step(lambda: np_fg(w, c))
    opt2.step(lambda: np_fg(w2, c2))
    np.testing.assert_array_equal(w2, w)
    assert opt2.state == opt.state
    with pytest.raises(ValueError, match="as many params"):
        optkern.optim.LBFGS([np.ones(2)]).load_state_dict(sd)
    # the flat vectors and the history rows start on 64-byte boundaries, also after a restore (8 restores: NumPy's
    # own 16-byte alignment would pass by chance with probability 4^-16)
    restored = [optkern.optim.LBFGS([w.copy(), c.copy()]) for _ in range(8)]
    for o in restored:
        o.load_state_dict(sd)
        assert all(v.ctypes.data % 64 == 0 for v in (o._d, o._g_prev))
    for o in (opt, opt2):
        vecs = [o._g, o._d, o._g_prev, o._x0] + [v for pair in o._pairs() for v in pair]
        assert all(v.ctypes.data % 64 == 0 for v in vecs if v is not None) and opt._x0 is not None


def test_history_size_change_keeps_newest_pairs(rng):
    np_fg, _, p = _logreg(rng)
    w, c = 0.1 * rng.standard_normal(p), np.zeros(1)
    opt = optkern.optim.LBFGS([w, c], max_iter=8, history_size=5)
    opt.step(lambda: np_fg(w, c))
    newest = [s.copy() for s, _ in opt._pairs()][-3:]
    assert len(opt._pairs()) == 5
    opt.param_groups[0]["history_size"] = 3
    opt.step(lambda: np_fg(w, c))
    assert opt._hist.history_size == 3 and len(opt._pairs()) == 3
    # the 3 newest pairs were carried over, then the new call pushed more, evicting them in order
    opt2 = optkern.optim.LBFGS([np.zeros(p), np.zeros(1)], history_size=5)
    opt2._hist = opt2._make_history(3, [(s, s) for s in newest])
    np.testing.assert_array_equal(opt2._pairs()[0][0], newest[0])


def test_failed_line_search_stops_early():
    # The closure's gradient has the wrong sign: no step decreases f.  The search gives up once its bracket is
    # narrower than tolerance_change / max|d| (as torch's does), well before max_eval, and x does not move.
    x = np.array([1.75])
    opt = optkern.optim.LBFGS([x], line_search_fn="strong_wolfe")
    opt.step(lambda: (float(x[0] ** 2), [-2 * x]))
    assert x[0] == 1.75
    assert opt.state["func_evals"] <= 12, opt.state


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda: (1.0, [np.ones(3)]), ValueError, "expected 2 gradients"),
    (lambda: (1.0, [np.ones(3), np.ones(5)]), ValueError, r"grads\[1\]: expected shape \(4,\)"),
    (lambda: 1.0, TypeError, r"return \(loss, grads\)")])
def test_bad_closure_touches_nothing(bad, exc, msg):
    a, b = np.arange(3.0) + 1, np.arange(4.0) + 1
    a0, b0 = a.copy(), b.copy()
    opt = optkern.optim.LBFGS([a, b])
    with pytest.raises(exc, match=msg):
        opt.step(bad)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
