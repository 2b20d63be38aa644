"""L-BFGS: a limited-memory history with a two-pass direction, and a minimizer with Wolfe line searches.

    h = optkern.LBFGSHistory(n, history_size=10, like=x)   # ring buffer of (s, y) pairs on x's device
    h.push(s, y)                  # False (and h.num_skipped += 1) for a pair with s.y <= eps * y.y: not stored
    d = h.direction(g)            # d = -H g, H the L-BFGS inverse-Hessian approximation, H0 = (s.y / y.y) I
    res = optkern.lbfgs_minimize(fun_and_grad, x0)          # res.x, res.fun, res.grad, res.nit, res.nfev, ...

The direction is the compact form of Byrd, Nocedal & Schnabel (1994) in two passes over memory (design note
``lbfgs-two-pass.md``), with S = [s_0 .. s_{k-1}], Y = [y_0 .. y_{k-1}] oldest first:

- pass 1, ONE ``_dots`` call: a = S^T g and b = Y^T g, plus, for each pair pushed since the last pass, its y's
  dot products with every stored vector, taken in the same read: the new column of the upper triangle of
  SY = S^T Y (the only part R uses) and the new row and column of YY = Y^T Y.  The design note also dots s_new,
  for SY's lower triangle, which nothing reads: skipping it makes pass 1 after a push 2 queries, not 3;
- on the host, in float64 (NumPy): R = triu(SY), D = diag(SY), gamma = s.y / y.y of the newest pair,
  ``R u = a``, ``R^T c = (D + gamma YY) u - gamma b``;
- pass 2, ONE ``_lincomb`` call: d = -(gamma g + S c - gamma Y u).

``direction_and_slope(g)`` also returns g.d, which a line search needs, without a pass of its own: g joins
pass 1's stored vectors (its chunks are already in cache as the query's), and g.d = -gamma g.g - c.a + gamma u.b
on the host.  ``lbfgs_minimize`` uses it.

``direction(g, allreduce=fn)`` serves vectors sharded across processes: every process holds its shard of the
same history; ``fn`` receives pass 1's float64 partial dot products (a flat NumPy array) and must return their
sum over the shards (e.g. an MPI/NCCL all-reduce); every process then runs the same small solves and its own
pass 2.  ``push(s, y, allreduce=fn)`` needs the same ``fn`` (the curvature test uses the global s.y and y.y).

``direction_two_loop`` is the classic recursion (Nocedal & Wright, Alg. 7.4) built from the same kernels
(dot = a one-query ``_dots`` call, axpy = a two-vector ``_lincomb``): 4k + 2 passes, kept as the reference.

Vectors are 1-D, C-contiguous, of the history's dtype (float32 or float64) in NumPy or CuPy; dot products are
returned in float64 and all the small-matrix work is float64 on the host, even for float32 vectors.
"""

from __future__ import annotations

import math

import numpy as np

from . import _C
from ._arrays import _library, current_stream

__all__ = ["LBFGSHistory", "LBFGSResult", "OptimizeResult", "lbfgs_minimize"]

_MAX_VECS = 64  # the kernels take at most 64 vectors per batch (kLbMaxVecs in csrc/optkern/lbfgs_rules.h)
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------------------------------------------
# The two kernels.  Everything below calls them only through these two functions.

def _xp(a):
    if _library(a) == "cupy":
        import cupy

        return cupy
    return np


def _dots_impl(stored, queries):
    if hasattr(_C, "lbfgs_dots"):
        return np.asarray(_C.lbfgs_dots(stored, queries, current_stream(stored[0])), dtype=np.float64)
    # Fallback while the compiled kernel is absent: the same dot products with the array library (float64
    # accumulation, several passes over memory).  Used automatically only when _C lacks lbfgs_dots.
    xp = _xp(stored[0])
    out = xp.stack(queries).astype(xp.float64) @ xp.stack(stored).astype(xp.float64).T
    return out.get() if xp is not np else out


def _lincomb_impl(vecs, coefs, out):
    if hasattr(_C, "lbfgs_lincomb"):
        _C.lbfgs_lincomb(vecs, coefs, out, current_stream(out))
        return
    # Fallback while the compiled kernel is absent: the kernel's arithmetic (coefficients cast to the vectors'
    # dtype, terms added in order in that dtype) with the array library, one pass per term.
    dt = out.dtype.type
    acc = dt(coefs[0]) * vecs[0]
    for c, v in zip(coefs[1:], vecs[1:]):
        acc += dt(c) * v
    out[...] = acc


def _dots(stored, queries):
    """(len(queries), len(stored)) float64 NumPy array: out[q, i] = dot(queries[q], stored[i])."""
    if len(stored) <= _MAX_VECS and len(queries) <= _MAX_VECS:
        return _dots_impl(stored, queries)
    # More vectors than one kernel call takes (history_size > 31): one pass per block of 64.
    return np.block([[_dots_impl(stored[i:i + _MAX_VECS], queries[q:q + _MAX_VECS])
                      for i in range(0, len(stored), _MAX_VECS)] for q in range(0, len(queries), _MAX_VECS)])


def _lincomb(vecs, coefs, out):
    """out = sum_i coefs[i] * vecs[i] (out must not overlap any of vecs)."""
    coefs = [float(c) for c in coefs]
    if len(vecs) <= _MAX_VECS:
        _lincomb_impl(vecs, coefs, out)
        return out
    # More than 64 vectors: accumulate block by block, alternating between out and a scratch vector so that the
    # output never overlaps an input.
    scratch = _xp(out).empty_like(out)
    first = _MAX_VECS
    # Start in the buffer that makes the last block land in out.
    nblocks = 1 + -(-(len(vecs) - first) // (_MAX_VECS - 1))
    cur, other = (out, scratch) if nblocks % 2 == 1 else (scratch, out)
    _lincomb_impl(vecs[:first], coefs[:first], cur)
    i = first
    while i < len(vecs):
        j = min(len(vecs), i + _MAX_VECS - 1)
        _lincomb_impl([cur] + list(vecs[i:j]), [1.0] + coefs[i:j], other)
        cur, other = other, cur
        i = j
    return out


# ----------------------------------------------------------------------------------------------------------------

def _solve_upper(R, b):
    x = np.empty_like(b)
    for i in range(len(b) - 1, -1, -1):
        x[i] = (b[i] - R[i, i + 1:] @ x[i + 1:]) / R[i, i]
    return x


def _solve_lower(L, b):
    x = np.empty_like(b)
    for i in range(len(b)):
        x[i] = (b[i] - L[i, :i] @ x[:i]) / L[i, i]
    return x


_ALIGN = 64  # bytes: the CPU kernels' 16-lane loads, one cache line (float32) or two (float64)


def _aligned_rows(xp, rows, n, dtype):
    """An uninitialized (rows, n) array of the array library xp, each row starting on a 64-byte boundary (a view of
    a padded buffer).  NumPy aligns large arrays to 16 bytes only; unaligned rows split every vector load across
    two cache lines, which costs pass 1 with several queries 10-25% and the linear combination ~10% (measured on
    2 Zen 3 cores, n = 2^22).  CuPy's pool already aligns to 256 bytes."""
    item = np.dtype(dtype).itemsize
    stride = -(-n * item // _ALIGN) * _ALIGN // item
    buf = xp.empty(rows * stride + _ALIGN // item, dtype)
    ptr = buf.ctypes.data if xp is np else buf.data.ptr
    off = (-ptr % _ALIGN) // item
    return buf[off:off + rows * stride].reshape(rows, stride)[:, :n]


def _aligned_like(x):
    """An uninitialized 1-D array like x (library, device, dtype, size), 64-byte aligned: NumPy through
    _aligned_rows, CuPy by empty_like (its pool aligns) on x's device (empty_like alone takes the current one)."""
    if _xp(x) is not np:
        with _xp(x).cuda.Device(x.device.id):
            return _xp(x).empty_like(x.reshape(-1))
    return _aligned_rows(np, 1, x.size, x.dtype)[0]


def _byte_range(a):
    """[start, end) of a contiguous array's bytes (host or device addresses)."""
    p = a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
    return p, p + a.nbytes


def _check_vector(v, name, owner, what):
    """v checked to be a vector like ``owner``'s (its array library, n, dtype, contiguity, device); ``what`` names
    the owner in the messages ("the history", "the state")."""
    ok = isinstance(v, np.ndarray) if owner._xp is np else _library(v) == "cupy"
    if not ok:
        raise TypeError(f"{name}: expected a {owner._xp.__name__} array like {what}, got {type(v).__name__}")
    if tuple(v.shape) != (owner.n,):
        raise ValueError(f"{name}: expected shape ({owner.n},), got {tuple(v.shape)}")
    if v.dtype != owner.dtype:
        raise TypeError(f"{name}: expected {owner.dtype} like {what}, got {v.dtype}")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous vector")
    if owner._device is not None and v.device.id != owner._device:
        raise ValueError(f"{name}: on device {v.device.id}, {what} on device {owner._device}")
    return v


def _aligned_copy(a):
    """A 64-byte aligned 1-D copy of a (same library and dtype)."""
    out = _aligned_like(a)
    out[...] = a.reshape(-1)
    return out


def _max_abs(v):
    """max |v| from max and min: two reads, no |v| temporary (half the time of abs(v).max() on large vectors); NaN
    if v has one."""
    hi, lo = float(v.max()), float(v.min())
    return max(hi, -lo) if not (math.isnan(hi) or math.isnan(lo)) else math.nan


def _reduce(values, allreduce):
    if allreduce is None:
        return values
    flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
    total = np.asarray(allreduce(flat), dtype=np.float64)
    if total.size != flat.size:
        raise ValueError(f"allreduce: expected {flat.size} summed values back, got {total.size}")
    return total.reshape(values.shape)


class LBFGSHistory:
    """The last ``history_size`` curvature pairs (s, y) in a ring buffer on the device of ``like``.

    ``n``: elements per vector; ``dtype``: float32 or float64 (default: like's dtype, else float64);
    ``like``: a NumPy or CuPy array whose library and device hold the history (default: NumPy);
    ``curvature_eps``: push skips a pair with s.y <= curvature_eps * y.y (default: the dtype's machine epsilon);
    ``min_sy``: push also skips a pair with s.y <= min_sy (default 0; torch.optim.LBFGS's rule is s.y > 1e-10).

    Memory: 2 (history_size + 1) vectors (one spare pair receives a push before its curvature test, so a rejected
    pair never evicts a stored one), and two (history_size + 1)^2 float64 Gram matrices on the host.
    """

    def __init__(self, n, history_size=10, dtype=None, like=None, *, curvature_eps=None, min_sy=0.0):
        if isinstance(history_size, bool) or not isinstance(history_size, (int, np.integer)) or history_size < 1:
            raise ValueError(f"history_size: expected an integer >= 1, got {history_size!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        if like is not None and _library(like) not in ("numpy", "cupy") and not isinstance(like, np.ndarray):
            raise TypeError(f"like: expected a NumPy or CuPy array, got {type(like).__name__}")
        if dtype is None:
            dtype = like.dtype if like is not None else np.float64
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        eps = float(np.finfo(dtype).eps) if curvature_eps is None else float(curvature_eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"curvature_eps: expected a finite number >= 0, got {curvature_eps!r}")
        if not (math.isfinite(float(min_sy)) and float(min_sy) >= 0):
            raise ValueError(f"min_sy: expected a finite number >= 0, got {min_sy!r}")
        self.n, self.history_size, self.dtype, self.curvature_eps = int(n), int(history_size), dtype, eps
        self.min_sy = float(min_sy)
        self._xp = np if like is None else _xp(like)
        self._device = None if self._xp is np else like.device.id
        if self._xp is np:
            self._S = _aligned_rows(np, self.history_size + 1, self.n, dtype)
            self._Y = _aligned_rows(np, self.history_size + 1, self.n, dtype)
        else:
            with self._xp.cuda.Device(like.device.id):
                self._S = _aligned_rows(self._xp, self.history_size + 1, self.n, dtype)
                self._Y = _aligned_rows(self._xp, self.history_size + 1, self.n, dtype)
        self._work = None
        self.num_skipped = 0  #: pushes rejected by the curvature test
        self.reset()

    def reset(self):
        """Forget every stored pair (the next direction is -g)."""
        m1 = self.history_size + 1
        self._order = []  # slots of the stored pairs, oldest first
        self._free = 0  # the spare slot a push writes into
        self._pending = []  # stored slots whose Gram columns (SY) and rows/columns (YY) the next pass 1 fills
        self._SY = np.zeros((m1, m1))  # SY[i, j] = s_i . y_j by slot, kept for i pushed no later than j only
        self._YY = np.zeros((m1, m1))
        self._sy = np.zeros(m1)  # s.y and y.y of each slot at push time (for the two-loop reference)
        self._yy = np.zeros(m1)

    def __len__(self):
        return len(self._order)

    # -- push --------------------------------------------------------------------------------------------------

    def _check(self, v, name):
        return _check_vector(v, name, self, "the history")

    def _staged(self):
        """The spare slot's (s, y) vectors, to be written in place and then given to _commit."""
        return self._S[self._free], self._Y[self._free]

    def _commit(self, allreduce=None):
        p = self._free
        s, y = self._S[p], self._Y[p]
        sy, yy = _reduce(_dots([y], [s, y]), allreduce)[:, 0]
        if not (math.isfinite(sy) and math.isfinite(yy) and sy > self.curvature_eps * yy and sy > self.min_sy):
            self.num_skipped += 1
            return False
        self._sy[p], self._yy[p] = sy, yy
        if len(self._order) == self.history_size:
            old = self._order.pop(0)
            if old in self._pending:
                self._pending.remove(old)
            self._free = old
        else:
            self._free = len(self._order) + 1
        self._order.append(p)
        self._pending.append(p)
        return True

    def push(self, s, y, allreduce=None):
        """Store the pair (s, y) = (x_new - x, g_new - g), evicting the oldest when full.

        Returns False, stores nothing and counts ``num_skipped`` when the curvature condition fails
        (s.y <= curvature_eps * y.y, s.y <= min_sy, or non-finite).  s and y are copied.  With sharded vectors
        pass the ``allreduce`` given to ``direction``.
        """
        self._check(s, "s")
        self._check(y, "y")
        ss, ys = self._staged()
        ss[...] = s
        ys[...] = y
        return self._commit(allreduce)

    # -- the two-pass direction ----------------------------------------------------------------------------------

    def _out(self, g, out):
        if out is None:
            return _aligned_like(g)
        self._check(out, "out")
        if self._xp is np and not out.flags.writeable:
            raise ValueError("out: is read-only")
        (o0, o1), (g0, g1) = _byte_range(out), _byte_range(g)
        if o0 < g1 and g0 < o1:  # raw addresses: also two arrays wrapping the same memory (DLPack views)
            raise ValueError("out: overlaps g (the direction cannot be written over its input)")
        return out

    def direction(self, g, out=None, allreduce=None):
        """d = -H g in two passes over memory (see the module docstring); returns out (a new vector by default)."""
        return self._direction(g, out, allreduce, False)[0]

    def direction_and_slope(self, g, out=None, allreduce=None):
        """(d, g.d): the direction of ``direction`` and its slope g.d, which a line search needs, without a pass
        of its own: pass 1 also takes g.g (g as one more stored vector, read from cache), and g.d is the
        coefficients' combination of pass 1's products, in float64 on the host.  With ``allreduce`` the slope is
        the sharded total (it is part of the same message).  Computed from the coefficients, it differs from
        dot(d, g) by the rounding of d (relative ~1e-16 in float64, ~1e-7 in float32, more where d's terms
        cancel).  Exceptions: with an empty history g.g is one read of g; with 2k = 64 stored vectors exactly
        (history_size 32, full) g spills into a second, short kernel call that reads g and the queries again."""
        return self._direction(g, out, allreduce, True)

    def _direction(self, g, out, allreduce, slope):
        self._check(g, "g")
        out = self._out(g, out)
        k = len(self._order)
        if k == 0:
            gtd = -float(_reduce(_dots([g], [g]), allreduce)[0, 0]) if slope else None
            return _lincomb([g], [-1.0], out), gtd
        order = self._order
        S = [self._S[i] for i in order]
        Y = [self._Y[i] for i in order]
        pend = list(self._pending)
        # A pending pair's y is the only extra query: its products with S fill column p of SY (s_i . y_p, which
        # covers every upper-triangle entry R needs, as each pair's column is filled when it is new) and with Y
        # the row and column p of YY.  s_p . y_j for older j is the lower triangle, which R never reads.
        queries = [g] + [self._Y[p] for p in pend]
        P = _reduce(_dots(S + Y + ([g] if slope else []), queries), allreduce)  # pass 1
        for j, p in enumerate(pend):
            ry = P[1 + j]
            self._SY[order, p] = ry[:k]  # s_i . y_p
            self._YY[p, order] = ry[k:2 * k]
            self._YY[order, p] = ry[k:2 * k]
        self._pending = []
        a, b = P[0, :k], P[0, k:2 * k]
        ix = np.ix_(order, order)
        SY, YY = self._SY[ix], self._YY[ix]
        newest = order[-1]
        gamma = self._SY[newest, newest] / self._YY[newest, newest]
        R = np.triu(SY)
        u = _solve_upper(R, a)
        c = _solve_lower(R.T, np.diag(SY) * u + gamma * (YY @ u) - gamma * b)
        coefs = [-gamma] + list(-c) + list(gamma * u)
        # g.d = -gamma g.g - c.(S g) + gamma u.(Y g)
        gtd = float(-gamma * P[0, 2 * k] - c @ a + gamma * (u @ b)) if slope else None
        return _lincomb([g] + S + Y, coefs, out), gtd  # pass 2

    # -- the two-loop reference ----------------------------------------------------------------------------------

    def direction_two_loop(self, g, out=None, allreduce=None):
        """d = -H g by the two-loop recursion (Nocedal & Wright Alg. 7.4), one kernel call per dot or axpy."""
        self._check(g, "g")
        out = self._out(g, out)
        k = len(self._order)
        if k == 0:
            return _lincomb([g], [-1.0], out)
        if self._work is None:
            self._work = (_aligned_like(g), _aligned_like(g))
        q, q2 = self._work

        def dot(a, b):
            return float(_reduce(_dots([a], [b]), allreduce)[0, 0])

        order = self._order
        rho = [1.0 / self._sy[i] for i in order]
        alpha = [0.0] * k
        _lincomb([g], [1.0], q)
        for j in range(k - 1, -1, -1):
            i = order[j]
            alpha[j] = rho[j] * dot(self._S[i], q)
            _lincomb([q, self._Y[i]], [1.0, -alpha[j]], q2)
            q, q2 = q2, q
        newest = order[-1]
        gamma = self._sy[newest] / self._yy[newest]
        _lincomb([q], [gamma], q2)  # r = H0 q
        q, q2 = q2, q
        for j in range(k):
            i = order[j]
            beta = rho[j] * dot(self._Y[i], q)
            if j == k - 1:
                _lincomb([q, self._S[i]], [-1.0, -(alpha[j] - beta)], out)  # d = -r
            else:
                _lincomb([q, self._S[i]], [1.0, alpha[j] - beta], q2)
                q, q2 = q2, q
        return out


# ----------------------------------------------------------------------------------------------------------------
# The minimizer

class OptimizeResult(dict):
    """scipy.optimize.OptimizeResult-like: a dict with attribute access, returned by ``lbfgs_minimize`` and
    ``ncg_minimize`` (``LBFGSResult`` is the same class under its first name).

    x, fun, grad (x's shape, x0's library), nit (iterations = accepted line-search steps), nfev (calls of
    fun_and_grad), success, status (0 converged, 1 max_iter, 2 failure), message; L-BFGS adds nskipped (pairs
    rejected by the curvature test), NCG nrestarts (steepest-descent restarts by reason: "every", "powell",
    "descent").
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    __setattr__ = dict.__setitem__

    def __repr__(self):
        keys = ("success", "status", "message", "fun", "nit", "nfev", "nskipped", "nrestarts")
        return "OptimizeResult(" + ", ".join(f"{k}={self[k]!r}" for k in keys if k in self) + ")"


LBFGSResult = OptimizeResult


class _NonFinite(Exception):
    pass


def _cubic_min(t1, f1, g1, t2, f2, g2, lo, hi):
    """Minimizer of the cubic through (t1, f1, g1), (t2, f2, g2), clamped to [lo, hi]; the midpoint if none."""
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    disc = d1 * d1 - g1 * g2
    if disc >= 0 and math.isfinite(disc):
        d2 = math.sqrt(disc)
        if t1 <= t2:
            den = g2 - g1 + 2 * d2
            t = t2 - (t2 - t1) * ((g2 + d2 - d1) / den) if den != 0 else math.nan
        else:
            den = g1 - g2 + 2 * d2
            t = t1 - (t1 - t2) * ((g1 + d2 - d1) / den) if den != 0 else math.nan
        if math.isfinite(t):
            return min(max(t, lo), hi)
    return 0.5 * (lo + hi)


def _strong_wolfe(ev, f0, gtd0, t, c1, c2, max_ls, xtol, width_tol=0.0, rounding=float):
    """Nocedal & Wright Alg. 3.5 (bracketing) and 3.6 (zoom), trial steps by safeguarded cubic interpolation.

    ``ev(t)`` evaluates x + t d and returns (f, g.d, point).  Returns ((t, f, g.d, point), satisfied): the point
    meeting both strong Wolfe conditions, or, when the search gives up after ``max_ls`` evaluations or an interval
    narrower than ``xtol`` (relative) or ``width_tol`` (absolute), the lowest point with sufficient decrease (the
    start, point None, if none).  ``rounding`` is applied to the sufficient-decrease bound f0 + c1 t g.d: with
    ``numpy.float32`` a float32 objective is asked for no decrease below its own resolution (as torch's float32
    arithmetic asks; near a float32 minimum f0 + c1 t g.d rounds to f0, and an equal f passes).
    """
    start = (0.0, f0, gtd0, None)
    prev = start
    cur = (t,) + ev(t)
    nls = 1
    while True:
        tc, fc, gc, _ = cur
        if fc > rounding(f0 + c1 * tc * gtd0) or (nls > 1 and fc >= prev[1]):
            lo, hi = prev, cur
            break
        if abs(gc) <= -c2 * gtd0:
            return cur, True
        if gc >= 0:
            lo, hi = cur, prev
            break
        if nls >= max_ls:
            return cur, False
        # Extrapolate: a cubic step in [t + 0.01 (t - t_prev), 10 t].
        tn = _cubic_min(prev[0], prev[1], prev[2], tc, fc, gc, tc + 0.01 * (tc - prev[0]), 10 * tc)
        prev = cur
        cur = (tn,) + ev(tn)
        nls += 1
    # Zoom (Alg. 3.6): lo is the lowest point with sufficient decrease so far, and [lo, hi] holds a Wolfe point.
    insuf = False
    while nls < max_ls:
        tmin, tmax = min(lo[0], hi[0]), max(lo[0], hi[0])
        if (tmax - tmin) <= xtol * tmax or (tmax - tmin) < width_tol:
            break
        tn = _cubic_min(lo[0], lo[1], lo[2], hi[0], hi[1], hi[2], tmin, tmax)
        eps = 0.1 * (tmax - tmin)
        if min(tmax - tn, tn - tmin) < eps:  # too close to an end: move into the interval (torch's safeguard)
            if insuf or tn >= tmax or tn <= tmin:
                tn = tmax - eps if abs(tn - tmax) < abs(tn - tmin) else tmin + eps
                insuf = False
            else:
                insuf = True
        else:
            insuf = False
        cur = (tn,) + ev(tn)
        nls += 1
        tc, fc, gc, _ = cur
        if fc > rounding(f0 + c1 * tc * gtd0) or fc >= lo[1]:
            hi = cur
        else:
            if abs(gc) <= -c2 * gtd0:
                return cur, True
            if gc * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = cur
    return lo, False


def _armijo(ev, f0, gtd0, t, c1, max_ls):
    """Backtracking with sufficient decrease, each step from a safeguarded quadratic fit (in [0.1 t, 0.5 t])."""
    for _ in range(max_ls):
        cur = (t,) + ev(t)
        ft = cur[1]
        if ft <= f0 + c1 * t * gtd0:
            return cur, True
        denom = 2 * (ft - f0 - gtd0 * t)
        tq = -gtd0 * t * t / denom if denom > 0 else 0.5 * t
        t = min(max(tq, 0.1 * t), 0.5 * t)
    return (0.0, f0, gtd0, None), False


def _check_gradient(g, x0):
    """fun_and_grad's gradient must be an array of x0's library, device and shape, of a real dtype (an integer or
    other float dtype is converted to x0's, as scipy converts to float64); anything else raises, naming it."""
    lib = "numpy" if _xp(x0) is np else "cupy"
    ok = isinstance(g, (np.ndarray, np.generic)) if lib == "numpy" else _library(g) == "cupy"
    if not ok:
        raise TypeError(f"fun_and_grad: expected the gradient as a {lib} array like x0, got {type(g).__name__}")
    if tuple(g.shape) != tuple(x0.shape):
        raise ValueError(f"fun_and_grad: expected a gradient of shape {tuple(x0.shape)} like x0, got "
                         f"{tuple(g.shape)}")
    if g.dtype.kind not in "fiu":
        raise TypeError(f"fun_and_grad: expected a real gradient (x0 is {x0.dtype}), got {g.dtype}")
    if lib == "cupy" and g.device.id != x0.device.id:
        raise ValueError(f"fun_and_grad: the gradient is on device {g.device.id}, x0 on device {x0.device.id}")


def lbfgs_minimize(fun_and_grad, x0, *, history_size=10, max_iter=1000, gtol=1e-6, ftol=2.220446049250313e-09,
                   line_search="strong_wolfe", callback=None, c1=1e-4, c2=0.9, max_ls=20):
    """Minimize f with L-BFGS; ``fun_and_grad(x) -> (f, g)`` with g an array like x (NumPy or CuPy).

    g must have x0's library, device and shape (else TypeError/ValueError naming fun_and_grad); a real dtype
    other than x0's (an integer, or the other float) is converted to x0's, as scipy converts to float64.  For a
    CuPy x0 every work array is allocated on x0's device, whichever device is current.

    Stops with success when ||g||_inf <= gtol (checked at x0 too), or when the relative reduction
    (f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol (scipy L-BFGS-B's two tests; ftol's default is scipy's
    factr=1e7 times the float64 epsilon); without success after ``max_iter`` iterations, when the line search
    finds no acceptable step even from steepest descent, or when fun_and_grad returns a non-finite value
    (then x, fun and grad are the last finite iterate).

    ``line_search``: "strong_wolfe" (Nocedal & Wright Alg. 3.5/3.6, c1, c2) or "armijo" (backtracking, c1); at
    most ``max_ls`` evaluations each.  The first trial step is 1, except min(1, 1/||g||_2) on a steepest-descent
    direction (the first iteration, and after a reset).  ``callback(x)`` runs after each iteration; returning
    True stops (success).  ``x`` passed to fun_and_grad and callback is a fresh array the caller may keep.

    A fun_and_grad that calls a multithreaded BLAS (OpenBLAS busy-waits after each call) competes with the
    kernels for the cores on small machines: one BLAS thread can make iterations 1.3-1.5x faster (README).
    """
    _check_minimize_args(x0, line_search, max_iter, gtol, ftol, c1, c2, max_ls)
    hist = LBFGSHistory(int(np.prod(x0.shape)), history_size, x0.dtype, like=x0)  # validates history_size
    return _descent(fun_and_grad, x0, _LBFGSMethod(hist), max_iter, gtol, ftol, line_search, callback, c1, c2,
                    max_ls)


def _check_minimize_args(x0, line_search, max_iter, gtol, ftol, c1, c2, max_ls):
    """The argument checks shared by lbfgs_minimize and ncg_minimize (ValueError/TypeError naming the argument)."""
    if _library(x0) not in ("numpy", "cupy") and not isinstance(x0, np.ndarray):
        raise TypeError(f"x0: expected a NumPy or CuPy array, got {type(x0).__name__}")
    if x0.dtype not in _DTYPES:
        raise TypeError(f"x0: expected float32 or float64, got {x0.dtype}")
    if line_search not in ("strong_wolfe", "armijo"):
        raise ValueError(f"line_search: expected 'strong_wolfe' or 'armijo', got {line_search!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter: expected an integer >= 0, got {max_iter!r}")
    for name, v in (("gtol", gtol), ("ftol", ftol)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"c1: expected 0 < c1 < c2 < 1, got c1={c1!r}, c2={c2!r}")
    if isinstance(max_ls, bool) or not isinstance(max_ls, (int, np.integer)) or max_ls < 1:
        raise ValueError(f"max_ls: expected an integer >= 1, got {max_ls!r}")
    if int(np.prod(x0.shape)) < 1:
        raise ValueError("x0: expected at least one element")


class _LBFGSMethod:
    """lbfgs_minimize's part of the shared loop (_descent): the two-pass direction and the pair push."""

    def __init__(self, hist):
        self.hist = hist
        self.d = None

    def direction(self, g):
        """(d, g.d, steepest)."""
        if self.d is None:
            self.d = _aligned_like(g)
        # g.d from pass 1's products: -g.H g up to rounding, so a non-descent sign flags a history that lost
        # positive definiteness, not rounding in d (if it ever misleads, the search finds no decrease and the
        # history is reset).
        gtd = self.hist.direction_and_slope(g, out=self.d)[1]
        return self.d, gtd, len(self.hist) == 0

    def first_step(self, gtd, steepest, f, f_old):
        return min(1.0, 1.0 / math.sqrt(-gtd)) if steepest else 1.0  # -gtd = ||g||^2 on steepest descent

    def trial_slope(self, d, g, gt):
        return float(_dots([d], [gt])[0, 0]), None

    def reset(self):
        self.hist.reset()

    def accept(self, x, g, x_new, g_new, extra):
        """Push the pair; returns the buffers no longer referenced (g: y is formed)."""
        s, y = self.hist._staged()
        _lincomb([x_new, x], [1.0, -1.0], s)
        _lincomb([g_new, g], [1.0, -1.0], y)
        self.hist._commit()
        return [g]

    def info(self):
        return {"nskipped": self.hist.num_skipped}


def _descent(fun_and_grad, x0, method, max_iter, gtol, ftol, line_search, callback, c1, c2, max_ls):
    """The line-search descent loop of lbfgs_minimize and ncg_minimize, after their argument checks; ``method``
    makes the directions (_LBFGSMethod, ncg._NCGMethod).  For CuPy, runs with x0's device current (CuPy runs its
    operations, and fun_and_grad and callback, on the current device)."""
    if _xp(x0) is not np:
        with _xp(x0).cuda.Device(x0.device.id):
            return _descent_loop(fun_and_grad, x0, method, max_iter, gtol, ftol, line_search, callback, c1, c2,
                                 max_ls)
    return _descent_loop(fun_and_grad, x0, method, max_iter, gtol, ftol, line_search, callback, c1, c2, max_ls)


def _descent_loop(fun_and_grad, x0, method, max_iter, gtol, ftol, line_search, callback, c1, c2, max_ls):
    xp = _xp(x0)
    shape, dtype = tuple(x0.shape), x0.dtype
    gtol, ftol = float(gtol), float(ftol)
    state = {"nfev": 0}
    # Gradient copies no longer referenced, reused by the next evaluations instead of fresh (page-faulting)
    # allocations.  Only these internal copies are recycled: the x given to fun_and_grad and callback is always new.
    spare = []
    keep_spare = 2

    def evaluate(x):
        f, g = fun_and_grad(x.reshape(shape))
        state["nfev"] += 1
        f = float(f)
        _check_gradient(g, x0)
        # A copy (in x0's dtype): fun_and_grad may return the same buffer every call (refilled in place), and the
        # previous gradient must survive the next evaluation (y = g_new - g, NCG's g_prev).
        gc = spare.pop() if spare else _aligned_like(x)
        gc[...] = g.reshape(-1)
        g = gc
        gmax = _max_abs(g)
        if not (math.isfinite(f) and math.isfinite(gmax)):
            raise _NonFinite(f"fun_and_grad returned a non-finite {'value' if not math.isfinite(f) else 'gradient'}")
        return f, g, gmax

    def result(x, f, g, nit, status, message):
        return OptimizeResult(x=x.reshape(shape), fun=f, grad=g.reshape(shape), nit=nit, nfev=state["nfev"],
                              success=status == 0, status=status, message=message, **method.info())

    x = _aligned_copy(x0)
    try:
        f, g, gmax = evaluate(x)
    except _NonFinite as e:
        return result(x, math.nan, xp.full_like(x, math.nan), 0, 2, f"{e} at x0")
    if gmax <= gtol:
        return result(x, f, g, 0, 0, "CONVERGENCE: NORM OF GRADIENT <= GTOL")
    nit = 0
    f_old = None
    while True:
        if nit >= max_iter:
            return result(x, f, g, nit, 1, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT")
        for _ in range(2):
            d, gtd, steepest = method.direction(g)
            if steepest and not (gtd < 0 and math.isfinite(gtd)):
                return result(x, f, g, nit, 2, f"ABNORMAL: THE SQUARED GRADIENT NORM IS {-gtd} (OVERFLOW)")
            if not (gtd < 0 and math.isfinite(gtd)) and not steepest:
                method.reset()  # not a descent direction: restart from steepest descent
                continue
            t0 = method.first_step(gtd, steepest, f, f_old)

            trials = []

            def ev(t, x=x, d=d, g=g, trials=trials):
                xt = _aligned_like(x)
                _lincomb([x, d], [1.0, t], xt)
                ft, gt, gm = evaluate(xt)
                trials.append(gt)
                gtd_t, extra = method.trial_slope(d, g, gt)
                return ft, gtd_t, (xt, gt, gm, extra)

            try:
                if line_search == "strong_wolfe":
                    (_, ft, _, pt), _ = _strong_wolfe(ev, f, gtd, t0, c1, c2, max_ls,
                                                      1e-9 if dtype == _DTYPES[1] else 1e-5)
                else:
                    (_, ft, _, pt), _ = _armijo(ev, f, gtd, t0, c1, max_ls)
            except _NonFinite as e:
                return result(x, f, g, nit, 2, f"{e} in the line search of iteration {nit + 1}")
            accepted = pt is not None and ft < f
            spare.extend(b for b in trials if not (accepted and b is pt[1]))
            del spare[keep_spare:]
            if accepted:
                break  # progress (with or without the Wolfe conditions: the curvature guard protects the history)
            if steepest:
                return result(x, f, g, nit, 2, "ABNORMAL: THE LINE SEARCH FOUND NO DECREASE")
            method.reset()  # scipy's remedy: drop the history and retry once from steepest descent
        else:
            return result(x, f, g, nit, 2, "ABNORMAL: NO DESCENT DIRECTION")
        x_new, g_new, gmax, extra = pt
        for b in method.accept(x, g, x_new, g_new, extra):
            if len(spare) < keep_spare:
                spare.append(b)
        f_old, x, f, g = f, x_new, ft, g_new
        nit += 1
        if callback is not None and callback(x.reshape(shape)) is True:
            return result(x, f, g, nit, 0, "STOP: CALLBACK REQUESTED STOP")
        if gmax <= gtol:
            return result(x, f, g, nit, 0, "CONVERGENCE: NORM OF GRADIENT <= GTOL")
        if (f_old - f) <= ftol * max(abs(f_old), abs(f), 1.0):
            return result(x, f, g, nit, 0, "CONVERGENCE: REL_REDUCTION_OF_F <= FTOL")
