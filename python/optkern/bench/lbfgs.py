"""L-BFGS cases of ``python -m optkern.bench``: the direction d = -H g for n = 2^22 and m = 10 pairs.

* optkern fast path: ``LBFGSHistory.direction`` (one pass computing all 2m dot products with g, float64 solves on
  the host, one pass forming d as a linear combination of the 2m + 1 vectors);
* optkern two-loop: ``LBFGSHistory.direction_two_loop`` (the classic recursion as a kernel sequence, the reference);
* torch two-loop: the recursion written with per-vector torch ops, as ``torch.optim.LBFGS`` does it.

Minimal bytes for the two passes: (4m + 3) n elements (2m + 1 vectors read in each pass, d written once); the
per-vector two-loop moves about 10 m n.  Roofline: the faster in-place add (NumPy or torch) at the same n,
12 B per float32 element (24 B per float64), timed round-robin with the directions.
"""

from __future__ import annotations

import numpy as np

import optkern

from .runner import _median, time_interleaved

ROOFLINE_TARGET = 80.0
RATIO_TARGET = 2.0  # against the torch two-loop


def _history(n, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    pairs = []
    for _ in range(m):
        s = rng.standard_normal(n).astype(dtype)
        y = (s * rng.uniform(0.5, 2.0, n) + 0.01 * rng.standard_normal(n)).astype(dtype)  # s.y > 0
        h.push(s, y)
        pairs.append((s, y))
    g = rng.standard_normal(n).astype(dtype)
    return h, pairs, g


def _torch_two_loop(torch, S, Y, g):
    """torch.optim.LBFGS's recursion (per-vector ops, newest pair last in S/Y)."""
    ro = [1.0 / float(y.dot(s)) for s, y in zip(S, Y)]
    H_diag = float(S[-1].dot(Y[-1])) / float(Y[-1].dot(Y[-1]))

    def direction():
        q = g.neg()
        al = [0.0] * len(S)
        for i in range(len(S) - 1, -1, -1):
            al[i] = q.dot(S[i]) * ro[i]
            q.add_(Y[i], alpha=-al[i])
        d = torch.mul(q, H_diag)
        for i in range(len(S)):
            be_i = d.dot(Y[i]) * ro[i]
            d.add_(S[i], alpha=al[i] - be_i)
        return d

    return direction


def bench_direction(torch, n, m, dtype, reps, warmup):
    h, pairs, g = _history(n, m, dtype)
    item = np.dtype(dtype).itemsize
    out = np.empty(n, dtype)
    h.direction(g, out=out)  # commits the pushes' pending Gram entries
    fns = {"optkern": lambda: h.direction(g, out=out), "optkern_two_loop": lambda: h.direction_two_loop(g)}
    if torch is not None:
        S = [torch.from_numpy(s) for s, _ in pairs]
        Y = [torch.from_numpy(y) for _, y in pairs]
        fns["torch"] = _torch_two_loop(torch, S, Y, torch.from_numpy(g))
    a, b = np.ones(n, dtype), np.full(n, 1e-7, dtype)
    fns["roof_numpy_add"] = lambda: np.add(a, b, out=a)
    if torch is not None:
        ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b)
        fns["roof_torch_add_"] = lambda: ta.add_(tb)
    raw = time_interleaved(fns, reps, warmup)
    roof = max(3 * item * n / _median(v) / 1e9 for k, v in raw.items() if k.startswith("roof_"))
    t_ok = _median(raw["optkern"])
    nbytes = (4 * m + 3) * n * item
    row = {"kind": "lbfgs", "case": f"L-BFGS direction, n={n:,}, m={m}, {np.dtype(dtype).name}", "n": n, "m": m,
           "bytes": nbytes, "raw_s": raw, "optkern_s": t_ok, "optkern_gbs": nbytes / t_ok / 1e9, "roofline_gbs": roof,
           "optkern_pct_roofline": 100.0 * nbytes / t_ok / 1e9 / roof,
           "two_loop_s": _median(raw["optkern_two_loop"]), "torch_path": "per-vector two-loop" if torch else None}
    row["targets"] = [{"what": f">= {ROOFLINE_TARGET:.0f}% of roofline ((4m+3)n elements)",
                       "value": row["optkern_pct_roofline"], "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET}]
    if "torch" in raw:
        t_t = _median(raw["torch"])
        row.update(torch_s=t_t, ratio=t_t / t_ok)
        row["targets"].append({"what": f">= {RATIO_TARGET:g}x torch two-loop", "value": row["ratio"],
                               "met": row["ratio"] >= RATIO_TARGET})
    return row


def run_cpu(torch, quick: bool, reps: int, warmup: int, bar=None) -> list:
    n = (1 << 18) if quick else (1 << 22)
    rows = []
    for dtype in (np.float32, np.float64):
        if bar is not None:
            bar.set(f"L-BFGS direction {np.dtype(dtype).name}")
        rows.append(bench_direction(torch, n, 10, dtype, reps, warmup))
        if bar is not None:
            bar.update()
    return rows


def num_cases(quick: bool) -> int:
    return 2
