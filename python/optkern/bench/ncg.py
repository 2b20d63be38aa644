"""NCG benchmark (``python -m optkern.bench.ncg``): writes bench/results/ncg_cpu.md and ncg_cpu.json.

1. The problems ``lbfgs_minimize`` is tested on (PROBLEMS of tests/test_lbfgs.py, loaded from the source tree:
   run from the repository root): ``ncg_minimize`` (PR+, strong Wolfe) vs ``lbfgs_minimize`` (m = 10) vs
   ``scipy.optimize.minimize(method="CG")``, all to ||g||_inf <= 1e-6 (ftol 0 for optkern): iterations,
   evaluations, wall time per iteration (median of 3 runs, fun_and_grad included).
2. The direction kernel at n = 2^22, float32 and float64: ``_C.ncg_direction`` (v = beta v - g in place, v.g
   returned: 3 n elements of traffic) against the DRAM in-place add ``x += y`` (3 n elements), NumPy's and torch's,
   both over rotating array sets >= 256 MB (bench.lbfgs's roofline), timed interleaved in the same run (medians).
   Target: the direction's GB/s >= 80% of the faster add's.  Also the line search's slope pass with beta's dots
   (dots of [v, g_prev, g] with g: 3 n elements read), against the same add, for information.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

import optkern
from optkern import _C
from optkern import lbfgs as L

from .lbfgs import ROOFLINE_TARGET, _add_pairs, _rotating
from .runner import _median, time_interleaved

N = 1 << 22


def _problems():
    here = os.path.join(os.getcwd(), "tests")
    if not os.path.exists(os.path.join(here, "test_lbfgs.py")):
        raise SystemExit("run from the repository root: the problems are tests/test_lbfgs.py's PROBLEMS")
    sys.path.insert(0, here)
    import test_lbfgs  # noqa: E402

    return test_lbfgs.PROBLEMS


def _timed(fn, runs=3):
    ts, res = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t0)
    return res, _median(ts)


def bench_problems():
    import scipy.optimize as so

    rows = []
    for name, (fg, x0) in _problems().items():
        row = {"problem": name, "n": int(x0.size)}
        for key, fn in (
                ("ncg", lambda: optkern.ncg_minimize(fg, x0.copy(), gtol=1e-6, ftol=0.0, max_iter=200000)),
                ("lbfgs", lambda: optkern.lbfgs_minimize(fg, x0.copy(), gtol=1e-6, ftol=0.0, max_iter=20000)),
                ("scipy_cg", lambda: so.minimize(fg, x0.copy(), jac=True, method="CG",
                                                 options={"gtol": 1e-6, "maxiter": 200000}))):
            r, t = _timed(fn)
            row[key] = {"nit": int(r.nit), "nfev": int(r.nfev), "success": bool(r.success), "s": t,
                        "us_per_it": 1e6 * t / max(1, int(r.nit))}
        rows.append(row)
    return rows


def bench_direction(torch, dtype, reps=30, warmup=3):
    item = np.dtype(dtype).itemsize
    pairs = _add_pairs(np, N, dtype)  # (x = ones, y = 1e-7): x plays v, y plays g
    turn = {"i": 0}
    fns = {"ncg_direction": _rotating([lambda v=x, g=y: _C.ncg_direction(g, v, 0.5) for x, y in pairs], turn),
           "slope_and_beta_dots": _rotating([lambda v=x, g=y, g2=pairs[(i + 1) % len(pairs)][1]:
                                             L._dots([v, g2, g], [g]) for i, (x, y) in enumerate(pairs)], turn),
           "dram_numpy_add": _rotating([lambda x=x, y=y: np.add(x, y, out=x) for x, y in pairs], turn)}
    if torch is not None:
        tp = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in pairs]
        fns["dram_torch_add_"] = _rotating([lambda x=x, y=y: x.add_(y) for x, y in tp], turn)
    raw = time_interleaved(fns, reps, warmup)
    med = {k: _median(v) for k, v in raw.items()}
    gbs = {k: 3 * item * N / t / 1e9 for k, t in med.items()}
    roof = max(v for k, v in gbs.items() if k.startswith("dram_"))
    return {"dtype": np.dtype(dtype).name, "n": N, "median_s": med, "gbs": gbs, "roof_gbs": roof,
            "pct": {k: 100.0 * gbs[k] / roof for k in ("ncg_direction", "slope_and_beta_dots")}}


def markdown(probs, dirs, meta):
    out = ["# NCG on the CPU", "", f"{meta['machine']}; optkern {meta['isa']}, {meta['threads']} threads; "
           f"`python -m optkern.bench.ncg`.", "",
           "## Iterations, evaluations and time per iteration (to ||g||_inf <= 1e-6)", "",
           "NCG: `ncg_minimize` (PR+, strong Wolfe c2 = 0.4, restart every n); L-BFGS: `lbfgs_minimize` (m = 10); "
           "scipy CG: `scipy.optimize.minimize(method='CG')`.  Time: wall time of the whole run / iterations "
           "(fun_and_grad included; median of 3 runs).", "",
           "| problem | n | NCG nit | NCG nfev | NCG us/it | L-BFGS nit | L-BFGS nfev | L-BFGS us/it | scipy CG nit | "
           "scipy CG nfev | scipy CG us/it | NCG nit / scipy |", "|" + "---|" * 12]
    for r in probs:
        a, b, c = r["ncg"], r["lbfgs"], r["scipy_cg"]
        out.append(f"| {r['problem']} | {r['n']} | {a['nit']} | {a['nfev']} | {a['us_per_it']:.0f} | {b['nit']} | "
                   f"{b['nfev']} | {b['us_per_it']:.0f} | {c['nit']} | {c['nfev']} | {c['us_per_it']:.0f} | "
                   f"{a['nit'] / c['nit']:.2f} |")
    out += ["", f"## The direction kernel at n = 2^22 against the DRAM in-place add (target >= {ROOFLINE_TARGET:.0f}%)",
            "", "GB/s from the minimal traffic, 3 n elements for each row (direction: read g, v, write v; slope pass: "
            "read v, g_prev, g; add: read x, y, write x); arrays rotate over >= 256 MB so every call streams from "
            "DRAM; interleaved in one run, medians.", "",
            "| dtype | direction ms | GB/s | % add | slope+beta dots ms | GB/s | % add | NumPy add GB/s | "
            "torch add_ GB/s | target met |", "|" + "---|" * 10]
    for d in dirs:
        m, g = d["median_s"], d["gbs"]
        out.append(f"| {d['dtype']} | {1e3 * m['ncg_direction']:.2f} | {g['ncg_direction']:.1f} | "
                   f"{d['pct']['ncg_direction']:.0f}% | {1e3 * m['slope_and_beta_dots']:.2f} | "
                   f"{g['slope_and_beta_dots']:.1f} | {d['pct']['slope_and_beta_dots']:.0f}% | "
                   f"{g['dram_numpy_add']:.1f} | {g.get('dram_torch_add_', float('nan')):.1f} | "
                   f"{'met' if d['pct']['ncg_direction'] >= ROOFLINE_TARGET else 'NOT met'} |")
    out += ["", "Passes per NCG iteration (besides fun_and_grad and x + t v): each line-search trial's slope pass "
            "also gives beta's dots (3 n read instead of L-BFGS's 2 n); the direction is one fused pass (3 n), "
            "returning the next slope.  See `optkern/ncg.py`.", ""]
    return "\n".join(out)


def main():
    try:
        import torch
    except ImportError:
        torch = None
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "isa": optkern.cpu_isa(), "threads": optkern.get_num_threads()}
    probs = bench_problems()
    dirs = [bench_direction(torch, dt) for dt in (np.float32, np.float64)]
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/ncg_cpu.json", "w") as f:
        json.dump({"meta": meta, "problems": probs, "direction": dirs}, f, indent=1)
    md = markdown(probs, dirs, meta)
    with open("bench/results/ncg_cpu.md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
