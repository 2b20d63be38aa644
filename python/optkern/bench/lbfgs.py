"""L-BFGS cases of ``python -m optkern.bench``: the direction d = -H g for m = 10 pairs.

* optkern fast path: ``LBFGSHistory.direction`` (one pass computing all 2m dot products with g, float64 solves on
  the host, one pass forming d as a linear combination of the 2m + 1 vectors); its two passes are also timed
  alone (``_dots`` and ``_lincomb`` on the same vectors);
* optkern two-loop: ``LBFGSHistory.direction_two_loop`` (the classic recursion as a kernel sequence, the reference);
* torch two-loop: the recursion written with per-vector torch ops, as ``torch.optim.LBFGS`` does it.

``--device cuda`` (:mod:`optkern.bench.cuda`) runs n = 2^24 in float32 with the history in CuPy arrays (the CUDA
kernels) against the torch two-loop on CUDA tensors, CUDA events, and a device in-place add as the roofline
(``bench_direction_device``; the tests run that code with NumPy and CPU torch).

Minimal bytes for the two passes: (4m + 3) n elements (2m + 1 vectors read in each pass, d written once).

The direction is also timed right after a push as ``lbfgs_minimize`` calls it in every iteration
(``direction_and_slope``): pass 1 then also computes the new pair's Gram column (queries g and y_new) and g.g (g as
one more stored vector, from cache), still one pass over the stored vectors.

Two rooflines, both in-place adds (``a += b``, 3 n elements of traffic) timed round-robin with the directions:

* "DRAM": the add over a rotating set of array pairs too large for the caches together (>= 256 MB), so each add
  streams from memory, as the direction's 2m + 1 vectors (21 x 16 MB at n = 2^22 in float32) must.  The targets
  are measured against this one;
* "cached": the add on one pair at the same n, repeated (the optimizer suite's definition).  At n = 2^22 the pair
  (32 MB in float32) largely stays in this machine's 32 MB L3, so it measures cache, not memory, bandwidth:
  reported for comparison with earlier tables.

Pass 1 only reads, and on some machines a read-only stream runs well below an in-place add in GB/s
(this VM: about 0.75x).  The fastest of ``torch.sum`` (one array), ``torch.dot`` and NumPy's BLAS dot (a pair)
over the rotating arrays is reported next to pass 1 as that read-only reference.

The same caches favour the per-vector torch two-loop: its running vector q (one n-vector) stays in L3 between its
4m steps, so from memory it moves about 4m n elements, not the 10 m n its steps touch.  The n = 2^24 float32 row
(64 MB vectors, larger than L3) shows the ratio where that reuse is gone.
"""

from __future__ import annotations

import numpy as np

import optkern
from optkern.lbfgs import _dots, _lincomb

from .runner import _median, add_probe, bracketed, time_interleaved

ROOFLINE_TARGET = 80.0  # % of the DRAM in-place-add roofline
RATIO_TARGET = 2.0  # against the torch two-loop
DRAM_ROOF_BYTES = 256 << 20  # the rotating add pairs together


def _pairs(n, m, dtype, seed=0):
    """m random (s, y) pairs with s.y > 0 and a gradient g, NumPy arrays."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(m):
        s = rng.standard_normal(n).astype(dtype)
        y = (s * rng.uniform(0.5, 2.0, n) + 0.01 * rng.standard_normal(n)).astype(dtype)  # s.y > 0
        pairs.append((s, y))
    return pairs, rng.standard_normal(n).astype(dtype)


def _history(n, m, dtype, seed=0):
    pairs, g = _pairs(n, m, dtype, seed)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    for s, y in pairs:
        h.push(s, y)
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


def _add_pairs(xp, n, dtype):
    """Array pairs of xp (NumPy or CuPy) for the DRAM add, >= DRAM_ROOF_BYTES together."""
    npairs = max(2, -(-DRAM_ROOF_BYTES // (2 * n * np.dtype(dtype).itemsize)))
    return [(xp.ones(n, dtype), xp.full(n, 1e-7, dtype)) for _ in range(npairs)]


def _rotating(fns, turn=None):
    """One function that calls the next of fns each time (round robin).  Functions given the same ``turn`` dict
    share one counter, so called one after another they work on different pairs (none reads what the previous
    one just wrote, from cache)."""
    turn = {"i": 0} if turn is None else turn

    def fn():
        i = turn["i"] = (turn["i"] + 1) % len(fns)
        fns[i]()
    return fn


def _roofline_fns(torch, n, dtype):
    """The cached add (one pair, repeated) and the DRAM add (rotating pairs): name -> fn."""
    fns = {}
    a, b = np.ones(n, dtype), np.full(n, 1e-7, dtype)
    fns["roof_cached_numpy_add"] = lambda: np.add(a, b, out=a)
    pairs = _add_pairs(np, n, dtype)
    turn = {"i": 0}  # one counter for all the rotating functions
    fns["roof_dram_numpy_add"] = _rotating([lambda x=x, y=y: np.add(x, y, out=x) for x, y in pairs], turn)
    if torch is not None:
        ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b)
        fns["roof_cached_torch_add_"] = lambda: ta.add_(tb)
        tpairs = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in pairs]
        fns["roof_dram_torch_add_"] = _rotating([lambda x=x, y=y: x.add_(y) for x, y in tpairs], turn)
        # Read-only references over the rotating arrays: torch.sum of one (n elements), torch.dot of a pair (2n).
        fns["read1_dram_torch_sum"] = _rotating([lambda x=x: x.sum() for x, _ in tpairs], turn)
        fns["read2_dram_torch_dot"] = _rotating([lambda x=x, y=y: x.dot(y) for x, y in tpairs], turn)
    fns["read2_dram_numpy_dot"] = _rotating([lambda x=x, y=y: x @ y for x, y in pairs], turn)  # BLAS (2n elements)
    return fns


def dram_probe(torch, n, dtype):
    """The DRAM roofline now (the in-place add over rotating pairs >= 256 MB, NumPy's and torch's), for the
    measurement just before and just after a row."""
    fns = {k: f for k, f in _roofline_fns(torch, n, dtype).items() if k.startswith("roof_dram")}
    return add_probe(fns, 3 * np.dtype(dtype).itemsize * n)


def after_push(h, g, out):
    """The direction and slope right after a push, as every lbfgs_minimize iteration calls them: pass 1 also fills
    the new pair's Gram column (queries g and y_new) and takes g as one more stored vector (for g.g).  Re-marking
    the newest pair pending recomputes the same entries."""
    h._pending.append(h._order[-1])
    return h.direction_and_slope(g, out=out)


def bench_direction(torch, n, m, dtype, reps, warmup, torch_only_ratio=False):
    h, pairs, g = _history(n, m, dtype)
    item = np.dtype(dtype).itemsize
    out = np.empty(n, dtype)
    h.direction(g, out=out)  # commits the pushes' pending Gram entries
    order = h._order
    stored = [h._S[i] for i in order] + [h._Y[i] for i in order]
    coefs = [0.5] + [0.1] * len(stored)
    fns = {"optkern": lambda: h.direction(g, out=out)}
    if not torch_only_ratio:
        fns.update({"optkern_pass1": lambda: _dots(stored, [g]),
                    "optkern_pass2": lambda: _lincomb([g] + stored, coefs, out),
                    "optkern_two_loop": lambda: h.direction_two_loop(g),
                    "optkern_after_push": lambda: after_push(h, g, out)})
    if torch is not None:
        S = [torch.from_numpy(s) for s, _ in pairs]
        Y = [torch.from_numpy(y) for _, y in pairs]
        fns["torch"] = _torch_two_loop(torch, S, Y, torch.from_numpy(g))
    fns.update(_roofline_fns(torch, n, dtype))
    raw = time_interleaved(fns, reps, warmup)
    med = {k: _median(v) for k, v in raw.items()}
    add_gbs = {k: 3 * item * n / t / 1e9 for k, t in med.items() if k.startswith("roof_")}
    roof_dram = max(v for k, v in add_gbs.items() if k.startswith("roof_dram"))
    roof_cached = max(v for k, v in add_gbs.items() if k.startswith("roof_cached"))
    t_ok = med["optkern"]
    nbytes = (4 * m + 3) * n * item
    gbs = nbytes / t_ok / 1e9
    row = {"kind": "lbfgs", "case": f"L-BFGS direction, n={n:,}, m={m}, {np.dtype(dtype).name}", "n": n, "m": m,
           "dtype": np.dtype(dtype).name, "bytes": nbytes, "raw_s": raw, "median_s": med, "add_gbs": add_gbs,
           "optkern_s": t_ok, "optkern_gbs": gbs, "roofline_gbs": roof_dram, "roofline_cached_gbs": roof_cached,
           "optkern_pct_roofline": 100.0 * gbs / roof_dram, "optkern_pct_roofline_cached": 100.0 * gbs / roof_cached,
           "torch_path": "per-vector two-loop" if torch else None}
    if not torch_only_ratio:
        p1 = (2 * m + 1) * n * item
        row.update(pass1_s=med["optkern_pass1"], pass1_gbs=p1 / med["optkern_pass1"] / 1e9,
                   pass2_s=med["optkern_pass2"], pass2_gbs=(p1 + n * item) / med["optkern_pass2"] / 1e9,
                   two_loop_s=med["optkern_two_loop"], after_push_s=med["optkern_after_push"])
        row["read_gbs"] = {k: int(k[4]) * n * item / t / 1e9 for k, t in med.items() if k.startswith("read")}
        row["read_best_gbs"] = max(row["read_gbs"].values())
        row["pass1_pct_read"] = 100.0 * row["pass1_gbs"] / row["read_best_gbs"]
        row["direction_pct_read"] = 100.0 * gbs / row["read_best_gbs"]  # both passes are all reads but d's write
    row["targets"] = []
    if not torch_only_ratio:
        row["targets"].append({"what": f">= {ROOFLINE_TARGET:.0f}% of DRAM roofline ((4m+3)n elements)",
                               "value": row["optkern_pct_roofline"],
                               "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET})
    if "torch" in raw:
        t_t = med["torch"]
        row.update(torch_s=t_t, ratio=t_t / t_ok)
        row["targets"].append({"what": f">= {RATIO_TARGET:g}x torch two-loop", "value": row["ratio"],
                               "met": row["ratio"] >= RATIO_TARGET})
    return row


GPU_RATIO_TARGET = 3.0  # against the torch two-loop on the GPU (its 4m+ launches and syncs are the other half)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def bench_direction_device(xp, torch, device, n, m, dtype, reps, warmup, xp_time, torch_time,
                           torch_only_ratio=False, ratio_target=GPU_RATIO_TARGET):
    """The direction with the history on xp's device (CuPy: the CUDA kernels), against the per-vector torch
    two-loop on torch's ``device``, timed by ``xp_time`` / ``torch_time(fn, reps, warmup)`` -> seconds per call
    (CUDA events on the GPU).  The roofline is an in-place add ``x += y`` over rotating xp pairs (>= 256 MB).
    The row also records |d - d_torch| / |d_torch|, a check that both computed the same direction.  The tests run
    this same code with NumPy and torch on the CPU."""
    pairs, g_host = _pairs(n, m, dtype)
    g = xp.asarray(g_host)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype, like=g)
    for s, y in pairs:
        h.push(xp.asarray(s), xp.asarray(y))
    out = xp.empty_like(g)
    d_ok = _host(h.direction(g, out=out)).astype(np.float64)  # also commits the pushes' pending Gram entries
    raw = {"optkern": xp_time(lambda: h.direction(g, out=out), reps, warmup),
           "optkern_after_push": xp_time(lambda: after_push(h, g, out), reps, warmup)}
    add_pairs = _add_pairs(xp, n, dtype)
    raw["roof_dram_add"] = xp_time(_rotating([lambda x=x, y=y: xp.add(x, y, out=x) for x, y in add_pairs]),
                                   reps, warmup)
    del add_pairs
    rel = None
    if torch is not None:
        S = [torch.as_tensor(s, device=device) for s, _ in pairs]
        Y = [torch.as_tensor(y, device=device) for _, y in pairs]
        two_loop = _torch_two_loop(torch, S, Y, torch.as_tensor(g_host, device=device))
        d_t = two_loop().cpu().numpy().astype(np.float64)
        rel = float(np.linalg.norm(d_ok - d_t) / np.linalg.norm(d_t))
        raw["torch"] = torch_time(two_loop, reps, warmup)
    med = {k: _median(v) for k, v in raw.items()}
    item = np.dtype(dtype).itemsize
    nbytes = (4 * m + 3) * n * item
    add_gbs = 3 * item * n / med["roof_dram_add"] / 1e9
    gbs = nbytes / med["optkern"] / 1e9
    row = {"kind": "lbfgs_device", "device": device, "n": n, "m": m, "dtype": np.dtype(dtype).name,
           "case": f"L-BFGS direction ({device}), n={n:,}, m={m}, {np.dtype(dtype).name}", "bytes": nbytes,
           "raw_s": raw, "median_s": med, "optkern_s": med["optkern"], "optkern_gbs": gbs,
           "after_push_s": med["optkern_after_push"], "roofline_gbs": add_gbs,
           "optkern_pct_roofline": 100.0 * gbs / add_gbs, "rel_diff_vs_torch": rel,
           "torch_path": "per-vector two-loop" if torch is not None else None, "targets": []}
    if not torch_only_ratio:
        row["targets"].append({"what": f">= {ROOFLINE_TARGET:.0f}% of {device} DRAM add ((4m+3)n elements)",
                               "value": row["optkern_pct_roofline"],
                               "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET})
    if torch is not None:
        row.update(torch_s=med["torch"], ratio=med["torch"] / med["optkern"])
        row["targets"].append({"what": f">= {ratio_target:g}x torch two-loop ({device})", "value": row["ratio"],
                               "met": row["ratio"] >= ratio_target})
    return row


def _cases(quick: bool):
    if quick:
        return [(1 << 18, np.float32, False), (1 << 18, np.float64, False)]
    return [(1 << 22, np.float32, False), (1 << 22, np.float64, False), (1 << 24, np.float32, True)]


def run_cpu(torch, quick: bool, reps: int, warmup: int, bar=None) -> list:
    rows = []
    for n, dtype, extra in _cases(quick):
        if bar is not None:
            bar.set(f"L-BFGS direction {np.dtype(dtype).name} n={n}")
        rows.append(bracketed(dram_probe(torch, n, dtype),
                              lambda: bench_direction(torch, n, 10, dtype, reps, warmup, torch_only_ratio=extra)))
        if bar is not None:
            bar.update()
    return rows


def num_cases(quick: bool) -> int:
    return len(_cases(quick))


def markdown_details(rows: list) -> list:
    """Lines of the L-BFGS detail tables (CPU: the passes alone, the kernel two-loop, both rooflines; GPU: the
    direction after a push and the agreement with torch's)."""
    lines = []
    dev = [r for r in rows if r.get("kind") == "lbfgs_device"]
    if dev:
        caption = ("L-BFGS direction on the device (after a push = direction_and_slope right after a push, as "
                   "every lbfgs_minimize iteration calls it; DRAM add = x += y over rotating pairs >= 256 MB; "
                   "diff vs torch = norm(d - d_torch) / norm(d_torch), optkern's direction against the torch "
                   "two-loop's):")
        header = "| case | direction | after a push | torch two-loop | DRAM add | % DRAM | diff vs torch |"
        lines += ["", caption, "", header, "|---" * 7 + "|"]
        for r in dev:
            torch_t = f"{r['torch_s'] * 1e3:.3f} ms" if r.get("torch_s") else "-"
            rel = f"{r['rel_diff_vs_torch']:.1e}" if r.get("rel_diff_vs_torch") is not None else "-"
            lines.append(f"| {r['case']} | {r['optkern_s'] * 1e3:.3f} ms, {r['optkern_gbs']:.0f} GB/s | "
                         f"{r['after_push_s'] * 1e3:.3f} ms | {torch_t} | {r['roofline_gbs']:.0f} GB/s | "
                         f"{r['optkern_pct_roofline']:.0f}% | {rel} |")
    rows = [r for r in rows if r.get("kind") == "lbfgs"]
    if not rows:
        return lines
    def ms(t):
        return f"{t * 1e3:.2f} ms" if t is not None else "-"

    title = ("L-BFGS direction details (pass 1 = the 2m + 1 dot products in one pass; pass 2 = the linear "
             "combination; after a push = direction_and_slope right after a push, as every lbfgs_minimize iteration "
             "calls it: pass 1 with the queries g and y_new and g as one more stored vector; rooflines: in-place "
             "add, DRAM = rotating pairs >= 256 MB, cached = one pair repeated; DRAM read = the fastest of "
             "torch.sum, torch.dot and NumPy's BLAS dot over the rotating arrays, read-only traffic like pass 1's; "
             "the direction reads (4m + 2) of its (4m + 3) n values, so on a read-bound machine its % of the add "
             "is capped near the read reference's):")
    header = ("| case | direction | after a push | pass 1 | pass 2 | optkern two-loop | torch two-loop | DRAM add | "
              "% DRAM | cached add | % cached | DRAM read | pass 1 % of read | direction % of read |")
    lines += ["", title, "", header, "|---" * 14 + "|"]
    for r in rows:
        p1 = f"{ms(r['pass1_s'])}, {r['pass1_gbs']:.1f} GB/s" if r.get("pass1_s") else "-"
        p2 = f"{ms(r['pass2_s'])}, {r['pass2_gbs']:.1f} GB/s" if r.get("pass2_s") else "-"
        ap = "-"
        if r.get("after_push_s"):
            ap = f"{ms(r['after_push_s'])}, {r['bytes'] / r['after_push_s'] / 1e9:.1f} GB/s"
        rd = (f"{r['read_best_gbs']:.1f} GB/s | {r['pass1_pct_read']:.0f}% | {r['direction_pct_read']:.0f}%"
              if r.get("read_best_gbs") else "- | - | -")
        lines.append(f"| {r['case']} | {ms(r['optkern_s'])}, {r['optkern_gbs']:.1f} GB/s | {ap} | {p1} | {p2} | "
                     f"{ms(r.get('two_loop_s'))} | {ms(r.get('torch_s'))} | {r['roofline_gbs']:.1f} GB/s | "
                     f"{r['optkern_pct_roofline']:.0f}% | {r['roofline_cached_gbs']:.1f} GB/s | "
                     f"{r['optkern_pct_roofline_cached']:.0f}% | {rd} |")
    return lines
