"""References for the 16-bit storage modes (issue 14), shared by test_mixed_precision.py (CPU) and
test_cuda_mixed_precision.py (CuPy and torch CUDA).

What a 16-bit step is defined to do (``python/optkern/precision.py``, ``csrc/optkern/precision.h``): widen every
16-bit input exactly to float32, run the rule of ``csrc/optkern/optim_rules.h`` in float32, and store each result
with its documented rounding: params and 16-bit states to nearest-even (``master_weights=None``), stochastically
(``stochastic_rounding=True``), as a float32 master and its rounding (``"fp32"``), or as the master's two halves
(``"split"``: the bfloat16 param is the high half, i.e. rounded toward zero, the int16 residual the low half).
The offload step (float32 params, 16-bit grads) keeps float32 params and writes ``rne`` of them into the copies.

So every step is checked in two parts (``check_steps``):
  1. the float32 result: the same step run by optkern on float32 arrays holding the widened 16-bit inputs,
     against the float64 transcription of the rule below (``Case.ref``), element by element within
     ``F32_ULPS`` float32 roundings of the element's scale (see ``assert_f32_close``);
  2. the storage layer, bit for bit: each stored 16-bit value is the documented rounding of that float32 result
     (``rne`` = ml_dtypes/NumPy ``astype``, IEEE round to nearest even; ``sr_round`` = an independent
     transcription of the stochastic rounding's definition, with Philox4x32-10 checked against the Random123
     known-answer vectors), float32 results (masters, float32 states, offload params) bit for bit.

The float64 rules of Adam/AdamW/AMSGrad, SGD and RMSprop are test_properties.py's (torch's single-tensor
formulas); the others (Adagrad, Adamax, NAdam, Adadelta, Rprop) are transcribed here from the same torch formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np

import optkern
from test_properties import ref_adam, ref_rmsprop, ref_sgd

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
HALF = {"bfloat16": BF16, "float16": F16}
NP_DTYPE = {"bfloat16": BF16, "float16": F16, "float32": F32, "int16": np.dtype(np.int16)}

U32 = 2.0**-24  #: float32's unit roundoff
#: float32 result vs the float64 rule: |f32 - f64| <= F32_ULPS * U32 * (|f64| + |input| + max over the tensor of
#: |f64 - input|): a few float32 roundings of the element and of the tensor's update (measured worst over every
#: case and mode: 1.7).
F32_ULPS = 4


# ---- bits and roundings ---------------------------------------------------------------------------------------
def bits(a) -> np.ndarray:
    """The bit patterns of an array (uint16 for 2-byte items, uint32 for 4-byte ones), for bitwise comparisons."""
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(got, want, what: str) -> None:
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    bad = np.flatnonzero(g.ravel() != w.ravel())
    if bad.size:
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.size} of {g.size} elements differ bitwise; first at {i}: "
                             f"got {np.asarray(got).ravel()[i]!r} (0x{int(g.ravel()[i]):x}), "
                             f"want {np.asarray(want).ravel()[i]!r} (0x{int(w.ravel()[i]):x})")


def rne(x32, dtype: str) -> np.ndarray:
    """float32 -> bfloat16/float16, round to nearest, ties to even (ml_dtypes / NumPy astype: IEEE 754)."""
    with np.errstate(over="ignore"):  # overflow to inf is the defined result
        return np.asarray(x32, F32).astype(HALF[dtype])


def split_master(param, residual) -> np.ndarray:
    """The float32 master a "split" pair holds: (bfloat16 param bits << 16) | residual bits."""
    hi = bits(np.asarray(param, BF16)).astype(np.uint32)
    lo = np.asarray(residual, np.int16).view(np.uint16).astype(np.uint32)
    return ((hi << np.uint32(16)) | lo).view(F32)


def split_halves(master32):
    """(bfloat16 high half: the master rounded toward zero, int16 low half) of a float32 master."""
    u = bits(np.asarray(master32, F32))
    return (u >> np.uint32(16)).astype(np.uint16).view(BF16), (u & np.uint32(0xFFFF)).astype(np.uint16).view(np.int16)


# ---- stochastic rounding ---------------------------------------------------------------------------------------
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on arrays of counters: the four 32-bit output words."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, np.uint64) & _M32 for c in (c0, c1, c2, c3)))
    k0, k1 = np.uint64(k0) & _M32, np.uint64(k1) & _M32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0  # < 2**64: exact
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def sr_words(seed: int, step: int, tensor: int, index) -> np.ndarray:
    """The 32 random bits of element ``index`` of tensor ``tensor`` at step ``step`` (the documented key: word
    index % 4 of the Philox block with counter (index / 4 low and high words, step, tensor) and key = seed)."""
    index = np.asarray(index, np.uint64)
    block = index >> np.uint64(2)
    w = philox4x32_10(block & _M32, block >> np.uint64(32), np.uint64(step) & _M32, np.uint64(tensor),
                      seed & 0xFFFFFFFF, seed >> 32)
    return np.choose((index & np.uint64(3)).astype(np.intp), w).astype(np.uint32)


def neighbours(x32, dtype: str):
    """(toward zero, away from zero): the two 16-bit values around each finite float32 (equal when x is exact).
    Away from the largest finite value is inf; float16 values of |x| >= 2**16 have no neighbours (inf)."""
    x32 = np.asarray(x32, F32)
    y = rne(x32, dtype)
    yb = bits(y).astype(np.int32)
    xw = y.astype(np.float64)
    ax, ay = np.abs(x32.astype(np.float64)), np.abs(xw)
    exact = xw == x32.astype(np.float64)
    tz = np.where(exact | (ay < ax), yb, yb - 1)  # magnitude bits: -1 is one step toward zero
    aw = np.where(exact, yb, np.where(ay < ax, yb + 1, yb))  # past the largest finite value: rne(x) = inf = away
    return (tz.astype(np.uint16).view(HALF[dtype]), aw.astype(np.uint16).view(HALF[dtype]))


def sr_round(x32, dtype: str, r) -> np.ndarray:
    """Stochastic rounding from its definition: round away from zero iff r's top k bits >= 2**k - D, where D/2**k
    is the fraction of the way from the value toward zero to the next 16-bit value (k: the dropped bits, at most
    16 for bfloat16, 13 for float16 normals, up to 31 for float16 subnormals).  inf/NaN round to nearest; float16
    |x| >= 2**16 is inf."""
    x32 = np.asarray(x32, F32)
    r = np.asarray(r, np.uint32).astype(np.uint64)
    tz, aw = neighbours(x32, dtype)
    a = np.abs(x32.astype(np.float64))
    lo = np.abs(tz.astype(np.float64))
    finite = np.isfinite(x32)
    e = (np.frexp(np.where(finite & (a > 0), a, 1.0))[1] - 1).astype(np.float64)  # |x| in [2**e, 2**(e+1))
    with np.errstate(invalid="ignore"):
        if dtype == "bfloat16":
            k = np.full(x32.shape, 16, np.int64)
            ulp16 = np.where(a >= 2.0**-126, 2.0 ** (e - 7), 2.0**-133)  # bfloat16 spacing at |x|
        else:
            ulp16 = np.where(a >= 2.0**-14, 2.0 ** (e - 10), 2.0**-24)
            ulp32 = np.where(a >= 2.0**-126, 2.0 ** (e - 23), 2.0**-149)
            k = np.minimum(np.round(np.log2(ulp16 / ulp32)).astype(np.int64), 31)
            k = np.where(a >= 2.0**-14, 13, k)
        frac_k = np.floor((a - lo) / ulp16 * 2.0 ** k.astype(np.float64))  # D: exact (powers of two)
    frac_k = np.where(finite, frac_k, 0).astype(np.uint64)
    k = k.astype(np.uint64)
    top = r >> (np.uint64(32) - k)
    up = (top + frac_k) >= (np.uint64(1) << k)
    out = np.where(up, bits(aw), bits(tz)).astype(np.uint16).view(HALF[dtype])
    out = np.where(finite, out, rne(x32, dtype))
    if dtype == "float16":
        out = np.where(finite & (a >= 2.0**16), np.copysign(np.float16(np.inf), x32).astype(F16), out)
    return np.asarray(out, HALF[dtype])


# ---- float64 rules (torch's formulas) not in test_properties.py ---------------------------------------------------
def ref_adagrad(p, g, s, *, step, lr, lr_decay, weight_decay, eps, gm=1.0):
    g = g * gm + weight_decay * p
    s = s + g * g
    clr = lr / (1 + (step - 1) * lr_decay)
    return p - clr * g / (np.sqrt(s) + eps), s


def ref_adamax(p, g, m, u, *, step, lr, betas, eps, weight_decay, gm=1.0):
    b1, b2 = betas
    g = g * gm + weight_decay * p
    m = m + (1 - b1) * (g - m)
    u = np.maximum(b2 * u, np.abs(g) + eps)
    return p - lr / (1 - b1**step) * m / u, m, u


def nadam_mu(t, beta1, momentum_decay):
    return beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))


def nadam_product(t, beta1, momentum_decay) -> float:
    """mu_1 ... mu_{t-1} (1.0 before step 1): what the caller passes as ``mu_product`` at step t."""
    return math.prod(nadam_mu(i, beta1, momentum_decay) for i in range(1, t))


def ref_nadam(p, g, m, v, *, step, lr, betas, eps, weight_decay, momentum_decay, gm=1.0):
    b1, b2 = betas
    g = g * gm + weight_decay * p
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    mu, mu_next = nadam_mu(step, b1, momentum_decay), nadam_mu(step + 1, b1, momentum_decay)
    prod = nadam_product(step, b1, momentum_decay) * mu
    denom = np.sqrt(v / (1 - b2**step)) + eps
    return p - lr * (1 - mu) / (1 - prod) * g / denom - lr * mu_next / (1 - prod * mu_next) * m / denom, m, v


def ref_adadelta(p, g, sq, acc, *, lr, rho, eps, weight_decay, gm=1.0):
    g = g * gm + weight_decay * p
    sq = rho * sq + (1 - rho) * g * g
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
    acc = rho * acc + (1 - rho) * delta * delta
    return p - lr * delta, sq, acc


def ref_rprop(p, g, prev, step_size, *, etas, step_size_limits, gm=1.0):
    g = g * gm
    s = g * prev
    factor = np.where(s > 0, etas[1], np.where(s < 0, etas[0], 1.0))
    step_size = np.clip(step_size * factor, *step_size_limits)
    g = np.where(s < 0, 0.0, g)
    return p - np.sign(g) * step_size, g, step_size


# ---- OGR (seed 002's online gradient linear regression), float64 -------------------------------------------------
OGR_HYPER = dict(lr=0.5, sgd_lr=0.05, beta=0.9, warmup=0, trust=2.0, eps=1e-6, weight_decay=0.01)


def _ogr_move(theta, g, lam, p_vertex, last, use, *, lr, sgd_lr, trust):
    """The seed's step theta <- theta + alpha sign(lambda) (p - theta) where the fit is used, clipped to the trust
    radius trust * max(last, |sgd step|); the plain SGD step -sgd_lr g elsewhere.  Returns (theta, |step|)."""
    d_sgd = -sgd_lr * g
    with np.errstate(divide="ignore", invalid="ignore"):
        d_fit = lr * np.sign(lam) * (p_vertex - theta)
    limit = trust * np.maximum(last, np.abs(d_sgd))
    d = np.where(use, np.clip(np.where(use, d_fit, 0.0), -limit, limit), d_sgd)
    return theta + d, np.abs(d)


def _ogr_fit(mt, mg, var, cov, *, sgd_lr, eps):
    """lambda = cov(g, theta) / var(theta), p = mean(theta) - mean(g) / lambda, and whether the guards let them be
    used: var(theta) > (eps (1 + |mean(theta)|))^2 and |lambda| sgd_lr > eps."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = cov / var
        p_vertex = mt - mg / lam
    use = (var > (eps * (1 + np.abs(mt))) ** 2) & (np.abs(cov) * sgd_lr > eps * var)
    return lam, p_vertex, use


def ref_ogr(p, g, mt, mg, var, cov, last, *, step, lr, sgd_lr, beta, warmup, trust, eps, weight_decay, gm=1.0):
    """One OGR step from the stored state (mean(theta), mean(g), var(theta), cov(g, theta), |last step|): the
    exponentially weighted moments updated from the deviations (step 1: the sample itself, var = cov = 0)."""
    g = g * gm + weight_decay * p
    if step == 1:
        mt, mg, var, cov = p.copy(), g.copy(), np.zeros_like(p), np.zeros_like(p)
    else:
        d, e = p - mt, g - mg
        mt, mg = mt + (1 - beta) * d, mg + (1 - beta) * e
        var, cov = beta * (var + (1 - beta) * d * d), beta * (cov + (1 - beta) * d * e)
    lam, p_vertex, use = _ogr_fit(mt, mg, var, cov, sgd_lr=sgd_lr, eps=eps)
    use = use & (step > warmup)
    new_p, last = _ogr_move(p, g, lam, p_vertex, last, use, lr=lr, sgd_lr=sgd_lr, trust=trust)
    return new_p, mt, mg, var, cov, last


def seed_ogr_trajectory(theta0, grad, steps, *, lr, sgd_lr, beta, warmup, trust, eps, weight_decay):
    """The seed's formulas literally: exponential moving averages of theta, g, theta^2 and g theta (weights
    beta^(t-1) on the first sample, (1 - beta) beta^(t-k) on sample k, so they sum to one), then
    lambda = (<g theta> - <g><theta>) / (<theta^2> - <theta>^2), p = (lambda <theta> - <g>) / lambda and
    theta <- theta + alpha sign(lambda) (p - theta), with OGR's guards and trust radius.  ``grad(k, theta)`` is
    step k's gradient.  Returns the iterates theta_1..theta_steps+1 and the last moments (float64)."""
    theta = np.array(theta0, np.float64)
    out = [theta.copy()]
    last = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = grad(t - 1, theta) + weight_decay * theta
        if t == 1:
            m_t, m_g, m_tt, m_gt = theta.copy(), g.copy(), theta * theta, g * theta
        else:
            m_t = beta * m_t + (1 - beta) * theta
            m_g = beta * m_g + (1 - beta) * g
            m_tt = beta * m_tt + (1 - beta) * theta * theta
            m_gt = beta * m_gt + (1 - beta) * g * theta
        var, cov = m_tt - m_t * m_t, m_gt - m_g * m_t
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = cov / var
            p_vertex = (lam * m_t - m_g) / lam
        use = (var > (eps * (1 + np.abs(m_t))) ** 2) & (np.abs(cov) * sgd_lr > eps * var) & (t > warmup)
        theta, last = _ogr_move(theta, g, lam, p_vertex, last, use, lr=lr, sgd_lr=sgd_lr, trust=trust)
        out.append(theta.copy())
    return out, (m_t, m_g, var, cov, last)


# ---- the cases: every optimizer and variant ---------------------------------------------------------------------
@dataclass
class Case:
    """One optimizer variant: its functional call, its states' starting values and its float64 rule."""

    name: str
    nstates: int
    call: Callable  # call(params, grads, states (one list per state), step, gm, **storage) -> None
    init: Callable  # init(rng, n) -> list of float64 state arrays (valid: v >= 0, step sizes > 0, ...)
    ref: Callable  # ref(p, g, states, step, gm) -> (p, states), float64
    hyper: dict = field(default_factory=dict)
    ulps: float = F32_ULPS  # the float32 run's allowance against the float64 rule (assert_f32_close)


def _n(rng, n, s=1.0):
    return s * rng.standard_normal(n)


def _pos(rng, n, s=1.0, lo=0.0):
    return lo + s * np.abs(rng.standard_normal(n))


def _sgd(name, **hy):
    hy = dict(dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), **hy)
    k = 1 if hy["momentum"] else 0

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.sgd_step(ps, gs, st[0] if k else None, step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, buf = ref_sgd(p, g, st[0] if k else None, step=t, maximize=False, grad_multiplier=gm, **hy)
        return p, [buf] if k else []

    return Case(name, k, call, lambda rng, n: [_n(rng, n, 0.5)][:k], ref, hy)


def _adam(name, fn, **hy):
    decoupled = fn == "adamw"
    hy = dict(dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False), **hy)
    k = 3 if hy["amsgrad"] else 2
    step_fn = getattr(optkern, f"{fn}_step")

    def call(ps, gs, st, t, gm=1.0, **kw):
        step_fn(ps, gs, st[0], st[1], st[2] if k == 3 else None, step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, m, v, vmax = ref_adam(p, g, st[0], st[1], st[2] if k == 3 else None, step=t, maximize=False,
                                 decoupled=decoupled, grad_multiplier=gm, **hy)
        return p, [m, v, vmax][:k]

    def init(rng, n):
        v = _pos(rng, n, 0.01, 1e-4)
        return [_n(rng, n, 0.1), v, v + _pos(rng, n, 0.005)][:k]

    return Case(name, k, call, init, ref, hy)


def _rmsprop(name, **hy):
    hy = dict(dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False), **hy)
    cen, mom = hy["centered"], hy["momentum"] > 0
    k = 1 + cen + mom

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.rmsprop_step(ps, gs, st[0], st[1] if cen else None, st[k - 1] if mom else None, step=t,
                             grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        ga = st[1] if cen else None
        buf = st[k - 1] if mom else None
        p, sq, ga, buf = ref_rmsprop(p, g, st[0], ga, buf, maximize=False, grad_multiplier=gm, **hy)
        return p, [sq] + ([ga] if cen else []) + ([buf] if mom else [])

    def init(rng, n):
        ga = _n(rng, n, 0.1)
        sq = ga * ga + rng.uniform(0.05, 0.5, n)  # r >= ga^2 with a margin: no cancellation in r - ga^2
        return [sq] + ([ga] if cen else []) + ([_n(rng, n, 0.1)] if mom else [])

    return Case(name, k, call, init, ref, hy)


def _case_adagrad():
    hy = dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, eps=1e-10)

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.adagrad_step(ps, gs, st[0], step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, s = ref_adagrad(p, g, st[0], step=t, gm=gm, **hy)
        return p, [s]

    return Case("adagrad", 1, call, lambda rng, n: [_pos(rng, n, 1.0, 0.1)], ref, hy)


def _case_adamax():
    hy = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.adamax_step(ps, gs, st[0], st[1], step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, m, u = ref_adamax(p, g, st[0], st[1], step=t, gm=gm, **hy)
        return p, [m, u]

    return Case("adamax", 2, call, lambda rng, n: [_n(rng, n, 0.1), _pos(rng, n, 0.5, 0.01)], ref, hy)


def _case_nadam():
    hy = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, momentum_decay=4e-3)

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.nadam_step(ps, gs, st[0], st[1], step=t, grad_multiplier=gm,
                           mu_product=nadam_product(t, hy["betas"][0], hy["momentum_decay"]), **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, m, v = ref_nadam(p, g, st[0], st[1], step=t, gm=gm, **hy)
        return p, [m, v]

    return Case("nadam", 2, call, lambda rng, n: [_n(rng, n, 0.1), _pos(rng, n, 0.01, 1e-4)], ref, hy)


def _case_adadelta():
    hy = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01)

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.adadelta_step(ps, gs, st[0], st[1], step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, sq, acc = ref_adadelta(p, g, st[0], st[1], gm=gm, **hy)
        return p, [sq, acc]

    return Case("adadelta", 2, call, lambda rng, n: [_pos(rng, n, 0.1, 1e-3), _pos(rng, n, 0.01, 1e-4)], ref, hy)


def _case_rprop():
    hy = dict(lr=0.01, etas=(0.5, 1.2), step_size_limits=(1e-6, 50.0))

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.rprop_step(ps, gs, st[0], st[1], step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, prev, ss = ref_rprop(p, g, st[0], st[1], etas=hy["etas"], step_size_limits=hy["step_size_limits"], gm=gm)
        return p, [prev, ss]

    def init(rng, n):
        prev = _n(rng, n)
        prev[::5] = 0.0  # the "no sign information" branch too
        return [prev, rng.uniform(0.002, 0.03, n)]

    return Case("rprop", 2, call, init, ref, hy)


def _case_ogr():
    hy = dict(OGR_HYPER)

    def call(ps, gs, st, t, gm=1.0, **kw):
        optkern.ogr_step(ps, gs, *st, step=t, grad_multiplier=gm, **hy, **kw)

    def ref(p, g, st, t, gm=1.0):
        p, *states = ref_ogr(p, g, *st, step=t, gm=gm, **hy)
        return p, states

    def init(rng, n):  # a state some steps in: means near the param's scale, var > 0, cov of either sign
        return [_n(rng, n), _n(rng, n), _pos(rng, n, 0.1, 0.01), _n(rng, n, 0.1), _pos(rng, n, 0.05, 0.01)]

    # ulps: the step is -alpha (mean(g) var + cov (theta - mean(theta))) / |cov|, a difference of two terms that can
    # each be tens of times the step on these random states (the vertex p = mean(theta) - mean(g) / lambda is a
    # difference too), so the last step's length (state 4, whose scale is the step alone) carries float32 rounding
    # of the terms: up to ~40 units measured.  tests/test_ogr.py bounds it by the terms instead.
    return Case("ogr", 5, call, init, ref, hy, ulps=64)


CASES = {c.name: c for c in [
    _sgd("sgd"),
    _sgd("sgd_momentum", momentum=0.9, dampening=0.1, weight_decay=0.01),
    _sgd("sgd_nesterov", momentum=0.9, nesterov=True, weight_decay=0.01),
    _adam("adam", "adam", weight_decay=0.01),
    _adam("adamw", "adamw", weight_decay=0.1),
    _adam("amsgrad", "adam", amsgrad=True),
    _case_adagrad(),
    _rmsprop("rmsprop"),
    _rmsprop("rmsprop_centered", centered=True, weight_decay=0.01),
    _rmsprop("rmsprop_momentum", momentum=0.9),
    _rmsprop("rmsprop_centered_momentum", centered=True, momentum=0.5),
    _case_adamax(),
    _case_nadam(),
    _case_adadelta(),
    _case_rprop(),
    _case_ogr(),
]}


# ---- a step in every storage mode, checked against the references ----------------------------------------------
@dataclass(frozen=True)
class Mode:
    """A storage mode: param/grad/state dtypes, the master kind, param copies' dtype, stochastic rounding."""

    param: str  # bfloat16, float16 or float32 (offload)
    grad: str
    state: str = "float32"
    master: str | None = None  # None, "fp32", "split"
    copies: str | None = None  # offload: dtype of param_copies
    sr: bool = False

    @property
    def id(self) -> str:
        s = f"p{self.param}-g{self.grad}-s{self.state}"
        if self.master:
            s += f"-{self.master}"
        if self.copies:
            s += f"-copies{self.copies}"
        if self.sr:
            s += "-sr"
        return s


#: every storage mode the functional layer offers, for each 16-bit dtype
MODES = [
    # master_weights=None: state float32 (default), bfloat16, or the param dtype
    Mode("bfloat16", "bfloat16"), Mode("bfloat16", "bfloat16", "bfloat16"),
    Mode("float16", "float16"), Mode("float16", "float16", "bfloat16"), Mode("float16", "float16", "float16"),
    # float32 masters
    Mode("bfloat16", "bfloat16", master="fp32"), Mode("bfloat16", "bfloat16", "bfloat16", master="fp32"),
    Mode("float16", "float16", master="fp32"), Mode("float16", "float16", "float16", master="fp32"),
    # split masters (bfloat16 only)
    Mode("bfloat16", "bfloat16", master="split"), Mode("bfloat16", "bfloat16", "bfloat16", master="split"),
    # stochastic rounding
    Mode("bfloat16", "bfloat16", sr=True), Mode("bfloat16", "bfloat16", "bfloat16", sr=True),
    Mode("float16", "float16", sr=True), Mode("float16", "float16", "float16", sr=True),
    # the offload step: float32 params and state, 16-bit grads, with and without 16-bit param copies
    Mode("float32", "bfloat16"), Mode("float32", "float16"),
    Mode("float32", "bfloat16", copies="bfloat16"), Mode("float32", "float16", copies="float16"),
    Mode("float32", "bfloat16", copies="float16"), Mode("float32", "float16", copies="bfloat16"),
]


class Host:
    """Arrays where the step runs: NumPy (the identity).  The CUDA test file has CuPy and torch adapters."""

    def put(self, a):
        return a

    def get(self, a):
        return a


class TorchArrays(Host):
    """NumPy arrays <-> torch tensors of the same bits on ``device`` (bfloat16 through an int16 view); with
    ``offset`` > 0 each tensor starts at that element offset of a larger one (off the vector packs' alignment)."""

    def __init__(self, device: str = "cpu", offset: int = 0):
        import torch

        self.torch, self.device, self.offset = torch, device, offset

    def put(self, a):
        torch = self.torch
        a = np.asarray(a)
        t = torch.from_numpy((a.view(np.int16) if a.dtype == BF16 else a).copy())
        if a.dtype == BF16:
            t = t.view(torch.bfloat16)
        t = t.to(self.device)
        if not self.offset:
            return t
        buf = torch.zeros(a.size + self.offset, dtype=t.dtype, device=self.device)
        buf[self.offset:] = t
        return buf[self.offset:]

    def get(self, t):
        t = t.detach().cpu()
        if t.dtype == self.torch.bfloat16:
            return t.view(self.torch.int16).numpy().view(BF16)
        return t.numpy()


class CupyArrays(Host):
    """NumPy arrays <-> CuPy arrays (float16, float32, int16: CuPy has no bfloat16), optionally at an offset."""

    def __init__(self, offset: int = 0):
        import cupy

        self.cp, self.offset = cupy, offset

    def put(self, a):
        a = np.asarray(a)
        assert a.dtype != BF16, "CuPy has no bfloat16"
        if not self.offset:
            return self.cp.asarray(a)
        buf = self.cp.zeros(a.size + self.offset, a.dtype)
        buf[self.offset:] = self.cp.asarray(a)
        return buf[self.offset:]

    def get(self, a):
        return self.cp.asnumpy(a)


def assert_f32_close(what, got32, want64, before64, ulps=F32_ULPS) -> float:
    """|got - want| <= F32_ULPS * U32 * (|want| + |before| + max|want - before|) elementwise; returns the worst
    error in units of U32 times that scale (for reporting)."""
    got = np.asarray(got32, np.float64)
    upd = float(np.max(np.abs(want64 - before64))) if want64.size else 0.0
    scale = np.abs(want64) + np.abs(before64) + upd + 1e-30
    err = np.abs(got - want64) / (U32 * scale)
    worst = float(np.max(err)) if err.size else 0.0
    assert worst <= ulps, f"{what}: float32 result off the float64 rule by {worst:.2f} > {ulps} units"
    return worst


def make_arrays(case: Case, mode: Mode, rng, sizes, seed_scale: float = 1.0):
    """Params, states (and masters) for ``mode``: float64 draws rounded to the mode's dtypes."""
    pd = NP_DTYPE[mode.param]
    p64 = [seed_scale * rng.standard_normal(n) for n in sizes]
    params = [p.astype(pd) for p in p64]
    states = [[] for _ in range(case.nstates)]
    for n in sizes:
        for k, s in enumerate(case.init(rng, n)):
            states[k].append(s.astype(NP_DTYPE[mode.state]))
    masters = None
    if mode.master == "fp32":  # a master off the param's rounding, as after some steps
        masters = [(p + 2.0**-10 * rng.standard_normal(p.shape) * np.abs(p)).astype(F32) for p in p64]
        params = [rne(m, mode.param) for m in masters]
    elif mode.master == "split":
        m32 = [p.astype(F32) for p in p64]
        pairs = [split_halves(m) for m in m32]
        params, masters = [h for h, _ in pairs], [lo for _, lo in pairs]
    copies = None
    if mode.copies:
        copies = [np.zeros(n, NP_DTYPE[mode.copies]) for n in sizes]
    return params, states, masters, copies


def master32(mode: Mode, p, m) -> np.ndarray:
    """The float32 value the step updates (a new array)."""
    if mode.master == "fp32":
        return np.array(m, F32)
    if mode.master == "split":
        return split_master(p, m).copy()
    return np.asarray(p).astype(F32)


def check_steps(case: Case, mode: Mode, rng, sizes, *, steps=3, seed=12345, gm=1.0, dev: Host | None = None,
                place=None, first_step=1):
    """Run ``steps`` steps of ``case`` in ``mode`` (on ``dev``'s arrays; ``place(a)`` may put each NumPy array at an
    offset inside a larger buffer) and check each against the float32 run and the float64 rule (module docstring).
    Returns the final (params, states, masters, copies) as NumPy arrays."""
    dev = dev or Host()
    place = place or (lambda a: a)
    params, states, masters, copies = make_arrays(case, mode, rng, sizes)
    params = [place(a) for a in params]
    states = [[place(a) for a in lst] for lst in states]
    masters = None if masters is None else [place(a) for a in masters]
    copies = None if copies is None else [place(a) for a in copies]
    d_p = [dev.put(a) for a in params]
    d_s = [[dev.put(a) for a in lst] for lst in states]
    d_m = None if masters is None else [dev.put(a) for a in masters]
    d_c = None if copies is None else [dev.put(a) for a in copies]
    storage = {}
    if mode.master:
        storage.update(master_weights=mode.master, masters=d_m)
    if mode.copies:
        storage["param_copies"] = d_c
    if mode.sr:
        storage.update(stochastic_rounding=True, seed=seed)
    changed = 0
    for t in range(first_step, first_step + steps):
        grads = [place(rng.standard_normal(n).astype(NP_DTYPE[mode.grad])) for n in sizes]
        g_before = [np.array(g) for g in grads]
        # 1. the float32 run on the widened inputs, and the float64 rule from the same inputs
        p32 = [master32(mode, p, m) for p, m in zip(params, masters or [None] * len(params))]
        g32 = [g.astype(F32) for g in grads]
        s32 = [[s.astype(F32) for s in lst] for lst in states]
        p_in, s_in = [p.copy() for p in p32], [[s.copy() for s in lst] for lst in s32]
        case.call(p32, g32, s32, t, gm)
        for i in range(len(sizes)):
            want_p, want_s = case.ref(p_in[i].astype(np.float64), g32[i].astype(np.float64),
                                      [lst[i].astype(np.float64) for lst in s_in], t, gm)
            assert_f32_close(f"{case.name} step {t} params[{i}]", p32[i], want_p, p_in[i].astype(np.float64),
                             case.ulps)
            for k in range(case.nstates):
                assert_f32_close(f"{case.name} step {t} state {k} [{i}]", s32[k][i], want_s[k],
                                 s_in[k][i].astype(np.float64), case.ulps)
        # 2. the 16-bit step; its stored values are the documented roundings of the float32 results
        p_before = [bits(p).copy() for p in params]
        case.call(d_p, [dev.put(g) for g in grads], d_s, t, gm, **storage)
        new_p = [np.asarray(dev.get(a)) for a in d_p]
        new_s = [[np.asarray(dev.get(a)) for a in lst] for lst in d_s]
        for i, n in enumerate(sizes):
            what = f"{case.name} {mode.id} step {t} params[{i}]"
            if mode.param == "float32":
                assert_bits_equal(new_p[i], p32[i], what)
            elif mode.master == "split":
                hi, lo = split_halves(p32[i])
                assert_bits_equal(new_p[i], hi, what)
                assert_bits_equal(dev.get(d_m[i]), lo, f"{what}: residual")
            elif mode.sr:
                want = sr_round(p32[i], mode.param, sr_words(seed, t, i, np.arange(n)))
                assert_bits_equal(new_p[i], want, what + " (stochastic rounding)")
                tz, aw = neighbours(p32[i], mode.param)
                assert np.all((bits(new_p[i]) == bits(tz)) | (bits(new_p[i]) == bits(aw))), what
            else:
                assert_bits_equal(new_p[i], rne(p32[i], mode.param), what)
            if mode.master == "fp32":
                assert_bits_equal(dev.get(d_m[i]), p32[i], f"{what}: master")
            if mode.copies:
                assert_bits_equal(dev.get(d_c[i]), rne(p32[i], mode.copies), f"{what}: param_copies")
            for k in range(case.nstates):
                want = s32[k][i] if mode.state == "float32" else rne(s32[k][i], mode.state)
                assert_bits_equal(new_s[k][i], want, f"{case.name} {mode.id} step {t} state {k} [{i}]")
            changed += int(np.count_nonzero(bits(new_p[i]) != p_before[i]))
        for g, g0 in zip(grads, g_before):
            assert_bits_equal(g, g0, "grads are read only")
        params = new_p
        states = new_s
        if masters is not None:
            masters = [np.asarray(dev.get(a)) for a in d_m]
    assert changed > 0, f"{case.name} {mode.id}: no param changed in {steps} steps"
    return params, states, masters, None if d_c is None else [np.asarray(dev.get(a)) for a in d_c]
