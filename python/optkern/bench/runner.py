"""``python -m optkern.bench``: optkern's fused steps vs torch's best CPU path vs an in-place-add roofline.

For every algorithm and size, in one process and one run:

* optkern: the functional step on one float32 array with preallocated state, the step counter increasing;
* torch: ``torch.optim.<Algo>`` with ``fused=True`` where torch has a fused CPU kernel (Adam, AdamW, SGD, Adagrad),
  else ``foreach=True``; ``p.grad`` set, ``opt.step()`` timed.  optkern and torch repetitions are interleaved, so
  a drift in background load hits both alike;
* effective GB/s from the minimal traffic (arrays read + arrays written) * 4 B * n;
* the roofline: the faster of NumPy's ``np.add(a, b, out=a)`` (one thread) and torch's ``a.add_(b)`` (``--threads``
  threads) at the same n, 12 B per element, timed round-robin with each algorithm's steps (same background load).

All timings are medians over repetitions after a warm-up; the raw per-repetition times go into the JSON.
``--device cuda`` runs the CUDA suite instead (:mod:`optkern.bench.cuda`, run by ``bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import optkern

from .verdicts import DRIFT_LIMIT, PHYSICAL_BOUND_PCT, judge, summary

F32 = 4

# name -> (accesses per element = arrays read + arrays written, torch class, torch kwargs, torch fused on CPU?)
ALGOS = {
    "SGD": (5, "SGD", dict(lr=1e-3, momentum=0.9), True),
    "Adam": (7, "Adam", dict(lr=1e-3), True),
    "AdamW": (7, "AdamW", dict(lr=1e-3, weight_decay=1e-2), True),
    "Adagrad": (5, "Adagrad", dict(lr=1e-2), True),
    "RMSprop": (5, "RMSprop", dict(lr=1e-2, alpha=0.99), False),
    "Adamax": (7, "Adamax", dict(lr=2e-3), False),
    "NAdam": (7, "NAdam", dict(lr=2e-3), False),
    "Adadelta": (7, "Adadelta", dict(lr=1.0), False),
    "Rprop": (7, "Rprop", dict(lr=1e-2), False),
}
FUSED_TARGET = 0.95  # torch_time / optkern_time against torch fused
FOREACH_TARGET = 4.0  # ... against torch foreach
ROOFLINE_TARGET = 90.0  # % of the in-place add bandwidth
MANY_SMALL_TARGET = 5.0
CLIP_TARGET = 1.4
SMALL_STEP_TARGET_US = 5.0


# ---------------------------------------------------------------------------------------------- progress bar
class _Bar:
    """tqdm when installed, else one line per task on stderr."""

    def __init__(self, total: int, disable: bool = False):
        self.total, self.i, self.disable = total, 0, disable
        self._t0 = time.perf_counter()
        try:
            from tqdm import tqdm

            self._tq = tqdm(total=total, disable=disable, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self._tq = None

    def set(self, label: str) -> None:
        if self._tq is not None:
            self._tq.set_description(label)
        elif not self.disable:
            print(f"[{self.i + 1}/{self.total}] {label} ({time.perf_counter() - self._t0:.0f}s)", file=sys.stderr,
                  flush=True)

    def update(self) -> None:
        self.i += 1
        if self._tq is not None:
            self._tq.update(1)

    def close(self) -> None:
        if self._tq is not None:
            self._tq.close()


# ---------------------------------------------------------------------------------------------- timing
def _median(xs):
    return float(statistics.median(xs))


def _calibrate(fn, target_s: float, cap: int = 100000) -> int:
    """Calls per repetition so that one repetition takes about target_s (for microsecond-scale calls)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    k = 1
    while dt < target_s / 4 and k < cap:
        k *= 4
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        dt = time.perf_counter() - t0
    return int(max(1, min(cap, round(k * target_s / max(dt, 1e-9)))))


def time_interleaved(fns: dict, reps: int, warmup: int, inner: int | dict = 1, rounds: int = 3) -> dict:
    """Time every fn in alternating blocks; -> {name: [seconds per call, ...]}.

    Each round runs, for every fn in turn, a warm-up and then a block of repetitions of that fn alone.
    Blocks (rather than strict round-robin) matter on a 2-core machine: torch's OpenMP workers keep spinning
    for a long while after each torch call, so a call timed right after one competes with them for a core;
    the warm-up at the start of each block absorbs that tail for both libraries alike.  Several rounds still
    spread slow background load over all fns.
    """
    inners = inner if isinstance(inner, dict) else {k: inner for k in fns}
    out = {k: [] for k in fns}
    per_round = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]
    for n_r in per_round:
        for k, fn in fns.items():
            m = inners[k]
            for _ in range(max(1, warmup)):
                for _ in range(m):
                    fn()
            for _ in range(n_r):
                t0 = time.perf_counter()
                for _ in range(m):
                    fn()
                out[k].append((time.perf_counter() - t0) / m)
    return out


# ---------------------------------------------------------------------------------------------- optkern steps
def optkern_stepper(name: str, ps: list, gs: list):
    """Preallocated state and a closure doing one functional step (step counter increasing)."""
    z = [np.zeros_like(p) for p in ps]
    z2 = [np.zeros_like(p) for p in ps]
    ctr = {"t": 0, "mu": 1.0}

    def nxt():
        ctr["t"] += 1
        return ctr["t"]

    if name == "SGD":
        return lambda: optkern.sgd_step(ps, gs, z, step=nxt(), lr=1e-3, momentum=0.9)
    if name == "Adam":
        return lambda: optkern.adam_step(ps, gs, z, z2, step=nxt(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    if name == "AdamW":
        return lambda: optkern.adamw_step(ps, gs, z, z2, step=nxt(), lr=1e-3, weight_decay=1e-2)
    if name == "Adagrad":
        return lambda: optkern.adagrad_step(ps, gs, z, step=nxt(), lr=1e-2)
    if name == "RMSprop":
        return lambda: optkern.rmsprop_step(ps, gs, z, step=nxt(), lr=1e-2, alpha=0.99)
    if name == "Adamax":
        return lambda: optkern.adamax_step(ps, gs, z, z2, step=nxt(), lr=2e-3)
    if name == "NAdam":
        def f():
            ctr["mu"] = optkern.nadam_step(ps, gs, z, z2, step=nxt(), mu_product=ctr["mu"], lr=2e-3)
        return f
    if name == "Adadelta":
        return lambda: optkern.adadelta_step(ps, gs, z, z2, step=nxt(), lr=1.0)
    if name == "Rprop":
        for s in z2:
            s.fill(1e-2)
        return lambda: optkern.rprop_step(ps, gs, z, z2, step=nxt(), lr=1e-2)
    raise KeyError(name)


def torch_optimizer(torch, name: str, tps: list):
    """torch's best CPU path: fused=True where supported (checked by a real step), else foreach=True."""
    _, cls, kw, fused = ALGOS[name]
    Cls = getattr(torch.optim, cls)
    if fused:
        try:
            opt = Cls(tps, fused=True, **kw)
            return opt, "fused"
        except (RuntimeError, TypeError, ValueError):
            pass
    return Cls(tps, foreach=True, **kw), "foreach"


# ---------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(args, torch) -> dict:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": args.threads,
        "optkern_version": optkern.__version__,
        "optkern_cpu_isa": optkern.cpu_isa(),
        "optkern_cpu_best_isa": optkern.cpu_best_isa(),
        "optkern_num_threads": optkern.get_num_threads(),
        "torch_version": getattr(torch, "__version__", None),
        "torch_num_threads": torch.get_num_threads() if torch else None,
        "numpy_version": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
        "reps": args.reps,
        "device": args.device,
    }


# ---------------------------------------------------------------------------------------------- CPU cases
def _rand(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n, dtype=np.float32)
    if scale != 1.0:
        a *= np.float32(scale)
    return a


def roofline_fns(torch, n: int) -> dict:
    a, b = np.ones(n, np.float32), np.full(n, 1e-7, np.float32)
    fns = {"numpy_add": lambda: np.add(a, b, out=a)}
    if torch is not None:
        ta, tb = torch.ones(n), torch.full((n,), 1e-7)
        fns["torch_add_"] = lambda: ta.add_(tb)
    return fns


def roofline(torch, n: int, reps: int, warmup: int, fns=None) -> dict:
    fns = fns or roofline_fns(torch, n)
    raw = time_interleaved(fns, reps, warmup)
    med = {k: _median(v) for k, v in raw.items()}
    gbs = {k: 12 * n / t / 1e9 for k, t in med.items()}
    best = max(gbs, key=gbs.get)
    return {"n": n, "raw_s": raw, "median_s": med, "gbs": gbs, "best": best, "roofline_gbs": gbs[best]}


def add_probe(fns: dict, nbytes: int, reps: int = 5, warmup: int = 1):
    """A function measuring the roofline now: the fastest of the in-place adds ``fns`` (each moving nbytes per
    call), medians of ``reps`` calls (several calls per timing at small sizes) -> GB/s."""
    inner = max(1, min(1000, (1 << 22) // max(1, nbytes)))

    def probe() -> float:
        raw = time_interleaved(fns, reps, warmup, inner=inner, rounds=1)
        return max(nbytes / _median(v) / 1e9 for v in raw.values())
    return probe


def bracketed(probe, make) -> dict:
    """make() -> a row, with the roofline measured by probe() just before and just after it
    (``roof_before_gbs``, ``roof_after_gbs``), then judged: clean rows keep their verdicts, noisy ones get
    "noisy, rerun" (:mod:`optkern.bench.verdicts`)."""
    before = probe()
    row = make()
    after = probe()
    row["roof_before_gbs"], row["roof_after_gbs"] = before, after
    return judge(row)


def bench_algo(torch, name: str, n: int, pbase, gbase, reps: int, warmup: int, roof_gbs: float,
               roof_fns: dict | None = None) -> dict:
    """roof_fns: the roofline adds, timed round-robin with the steps so that this row's roofline is measured under
    the same background load; the row's roofline is then the faster add of this round-robin (the size's separate
    roofline measurement is only the fallback)."""
    acc = ALGOS[name][0]
    p, g = pbase.copy(), gbase.copy()
    fns = {"optkern": optkern_stepper(name, [p], [g])}
    path = None
    if torch is not None:
        tp = torch.from_numpy(pbase.copy())
        tp.grad = torch.from_numpy(gbase.copy())
        opt, path = torch_optimizer(torch, name, [tp])
        fns["torch"] = opt.step
    for k, f in (roof_fns or {}).items():
        fns["roof_" + k] = f
    raw = time_interleaved(fns, reps, warmup)
    del fns
    gc.collect()
    row_roof = {k[5:]: 12 * n / _median(v) / 1e9 for k, v in raw.items() if k.startswith("roof_")}
    if row_roof:
        roof_gbs = max(row_roof.values())
    t_ok = _median(raw["optkern"])
    nbytes = acc * F32 * n
    row = {
        "kind": "algo", "case": name, "n": n, "accesses": acc, "bytes": nbytes, "raw_s": raw,
        "optkern_s": t_ok, "optkern_gbs": nbytes / t_ok / 1e9, "roofline_gbs": roof_gbs,
        "optkern_pct_roofline": 100.0 * nbytes / t_ok / 1e9 / roof_gbs, "torch_path": path,
        "row_roofline_gbs": row_roof,
    }
    if "torch" in raw:
        t_t = _median(raw["torch"])
        row.update(torch_s=t_t, torch_gbs=nbytes / t_t / 1e9, torch_pct_roofline=100.0 * nbytes / t_t / 1e9 / roof_gbs,
                   ratio=t_t / t_ok)
    fused_target = ALGOS[name][3]
    row["targets"] = [
        {"what": f">= {ROOFLINE_TARGET:.0f}% of roofline", "value": row["optkern_pct_roofline"],
         "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET},
    ]
    if "ratio" in row:
        tgt = FUSED_TARGET if fused_target else FOREACH_TARGET
        row["targets"].append({"what": f">= {tgt:g}x torch {'fused' if fused_target else 'foreach'}",
                               "value": row["ratio"], "met": row["ratio"] >= tgt})
    return row


def bench_isa(n: int, pbase, gbase, reps: int, warmup: int, roof_gbs: float) -> dict:
    best = optkern.cpu_best_isa()
    isas = [i for i in ("avx512", "avx2", "scalar")]
    steppers = {}
    p, g = pbase.copy(), gbase.copy()
    step = optkern_stepper("Adam", [p], [g])
    available = []
    for isa in isas:
        try:
            optkern.set_cpu_isa(isa)
            available.append(isa)
        except ValueError:
            continue
    optkern.set_cpu_isa(best)

    def with_isa(isa):
        def f():
            optkern.set_cpu_isa(isa)
            step()
        return f

    try:
        steppers = {isa: with_isa(isa) for isa in available}
        raw = time_interleaved(steppers, reps, warmup)
    finally:
        optkern.set_cpu_isa(best)
    med = {k: _median(v) for k, v in raw.items()}
    nbytes = 7 * F32 * n
    return {
        "kind": "isa", "case": "Adam ISA", "n": n, "best_isa": best, "raw_s": raw, "median_s": med,
        "gbs": {k: nbytes / t / 1e9 for k, t in med.items()},
        "pct_roofline": {k: 100.0 * nbytes / t / 1e9 / roof_gbs for k, t in med.items()},
        "slowdown_vs_best": {k: t / med[best] for k, t in med.items()},
        "isa_after": optkern.cpu_isa(),
    }


def bench_many_small(torch, count: int, size: int, reps: int, warmup: int) -> dict:
    ps = [_rand(size, 100 + i) for i in range(count)]
    gs = [_rand(size, 5000 + i, 1e-2) for i in range(count)]
    fns = {"optkern": optkern_stepper("Adam", [p.copy() for p in ps], gs)}
    if torch is not None:
        tps = []
        for p, g in zip(ps, gs):
            t = torch.from_numpy(p.copy())
            t.grad = torch.from_numpy(g.copy())
            tps.append(t)
        opt, path = torch_optimizer(torch, "Adam", tps)
        fns["torch"] = opt.step
    inner = {k: _calibrate(f, 0.02, cap=1000) for k, f in fns.items()}
    raw = time_interleaved(fns, reps, warmup=1, inner=inner)
    row = {"kind": "scenario", "case": f"Adam {count} x {size}", "n": count * size, "raw_s": raw, "inner": inner,
           "optkern_s": _median(raw["optkern"]), "torch_path": path if torch is not None else None}
    nbytes = 7 * F32 * count * size
    row["optkern_gbs"] = nbytes / row["optkern_s"] / 1e9
    if "torch" in raw:
        row["torch_s"] = _median(raw["torch"])
        row["ratio"] = row["torch_s"] / row["optkern_s"]
        row["targets"] = [{"what": f">= {MANY_SMALL_TARGET:g}x torch fused", "value": row["ratio"],
                           "met": row["ratio"] >= MANY_SMALL_TARGET}]
    return row


def bench_clip(torch, n: int, pbase, gbase, reps: int, warmup: int) -> dict:
    max_norm = 1.0
    p, g = pbase.copy(), gbase.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    ctr = [0]

    def ok():
        ctr[0] += 1
        r = optkern.clip_grad_norm([g], max_norm)
        optkern.adam_step([p], [g], [m], [v], step=ctr[0], lr=1e-3, grad_multiplier=r.grad_multiplier,
                          found_inf=r.found_inf)

    fns = {"optkern": ok}
    path = None
    if torch is not None:
        tp = torch.from_numpy(pbase.copy())
        tp.grad = torch.from_numpy(gbase.copy())
        opt, path = torch_optimizer(torch, "Adam", [tp])

        def tt():
            torch.nn.utils.clip_grad_norm_([tp], max_norm)
            opt.step()

        fns["torch"] = tt
    raw = time_interleaved(fns, reps, warmup)
    row = {"kind": "scenario", "case": "clip_grad_norm + Adam", "n": n, "raw_s": raw, "torch_path": path,
           "optkern_s": _median(raw["optkern"])}
    # minimal traffic: the norm reads g (1 access), the step 7
    row["bytes"] = 8 * F32 * n
    row["optkern_gbs"] = row["bytes"] / row["optkern_s"] / 1e9
    if "torch" in raw:
        row["torch_s"] = _median(raw["torch"])
        row["ratio"] = row["torch_s"] / row["optkern_s"]
        row["targets"] = [{"what": f">= {CLIP_TARGET:g}x torch clip_grad_norm_ + fused", "value": row["ratio"],
                           "met": row["ratio"] >= CLIP_TARGET}]
    return row


def bench_small_step(torch, size: int, reps: int) -> dict:
    p, g = _rand(size, 7), _rand(size, 8, 1e-2)
    opt = optkern.optim.Adam([p], lr=1e-3)
    gl = [g]
    fns = {"optkern_class": lambda: opt.step(gl),
           "optkern_functional": optkern_stepper("Adam", [p.copy()], [g])}
    if torch is not None:
        tp = torch.from_numpy(p.copy())
        tp.grad = torch.from_numpy(g.copy())
        topt, path = torch_optimizer(torch, "Adam", [tp])
        fns["torch"] = topt.step
    inner = {k: _calibrate(f, 0.02) for k, f in fns.items()}
    raw = time_interleaved(fns, reps, warmup=1, inner=inner)
    med = {k: _median(v) for k, v in raw.items()}
    row = {"kind": "scenario", "case": f"one Adam step, {size} elements", "n": size, "raw_s": raw, "inner": inner,
           "median_s": med, "optkern_s": med["optkern_class"], "optkern_functional_s": med["optkern_functional"],
           "torch_path": path if torch is not None else None}
    if "torch" in med:
        row["torch_s"] = med["torch"]
        row["ratio"] = med["torch"] / med["optkern_class"]
    us = med["optkern_class"] * 1e6
    row["targets"] = [{"what": f"class step <= {SMALL_STEP_TARGET_US:g} us", "value": us,
                       "met": us <= SMALL_STEP_TARGET_US}]
    return row


# ---------------------------------------------------------------------------------------------- CUDA
def cupy_event_times(cp, fn, reps, warmup) -> list:
    """Seconds per call of fn, from CUDA events on CuPy's current stream (after warmup calls)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(reps):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s, e) / 1e3)
    return ts


def torch_event_times(torch, fn, reps, warmup) -> list:
    """Seconds per call of fn, from CUDA events on torch's current stream (after warmup calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return ts


# ---------------------------------------------------------------------------------------------- report
def _fmt_time(s: float) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.2f} us"
    return f"{s * 1e3:.2f} ms"


def _pow2(n: int) -> str:
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}"


def markdown(results: dict) -> str:
    lines = []
    meta = results["meta"]
    lines.append(f"optkern {meta['optkern_version']} ({meta['optkern_cpu_isa']}) vs torch {meta['torch_version']}, "
                 f"{meta['cpu_model']}, {meta['threads']} threads, float32, medians of {meta['reps']} reps")
    lines.append("")
    for r in results["roofline"]:
        gb = ", ".join(f"{k} {v:.1f} GB/s" for k, v in r["gbs"].items())
        lines.append(f"roofline at n={_pow2(r['n'])}: {gb} -> {r['roofline_gbs']:.1f} GB/s (each algorithm row also "
                     f"re-times both adds round-robin with its steps and uses its own, faster add)")
    lines.append("")
    lines.append("Each row's roofline (the in-place add at its size; DRAM add for L-BFGS) is re-measured just before and "
                 "just after it; a row whose roofline moved by more than "
                 f"{100 * DRIFT_LIMIT:.0f}%, or with a figure above {PHYSICAL_BOUND_PCT:.0f}% of its bound, is "
                 "\"noisy, rerun\" and gets no verdict.")
    lines.append("")
    lines.append("| case | n | optkern | torch (path) | torch/optkern | optkern GB/s | % roofline | roofline before / "
                 "after | target | met |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if r["kind"] == "isa":
            continue
        torch_cell = f"{_fmt_time(r.get('torch_s'))} ({r.get('torch_path') or '-'})" if r.get("torch_s") else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        gbs = f"{r['optkern_gbs']:.1f}" if r.get("optkern_gbs") is not None else "-"
        pct = f"{r['optkern_pct_roofline']:.0f}%" if r.get("optkern_pct_roofline") is not None else "-"
        ok_cell = _fmt_time(r["optkern_s"])
        if r.get("optkern_functional_s") is not None:
            ok_cell += f" (functional {_fmt_time(r['optkern_functional_s'])})"
        targets = r.get("targets") or [{"what": "-", "met": None}]
        what = "; ".join(t["what"] for t in targets)
        met = "; ".join(_status_cell(r, t) for t in targets)
        bracket = "-"
        if r.get("roof_before_gbs") is not None:
            bracket = f"{r['roof_before_gbs']:.1f} / {r['roof_after_gbs']:.1f} GB/s"
        lines.append(f"| {r['case']} | {_pow2(r['n'])} | {ok_cell} | {torch_cell} | {ratio} | {gbs} | {pct} | "
                     f"{bracket} | {what} | {met} |")
    from .lbfgs import markdown_details

    lines.extend(markdown_details(results["rows"]))
    for r in results["rows"]:
        if r["kind"] != "isa":
            continue
        lines.append("")
        lines.append(f"vector vs scalar, Adam at n={_pow2(r['n'])} (best ISA {r['best_isa']}, restored: "
                     f"{r['isa_after']}):")
        lines.append("")
        lines.append("| ISA | time | GB/s | % roofline | time / best |")
        lines.append("|---|---|---|---|---|")
        for k in r["median_s"]:
            lines.append(f"| {k} | {_fmt_time(r['median_s'][k])} | {r['gbs'][k]:.1f} | {r['pct_roofline'][k]:.0f}% | "
                         f"{r['slowdown_vs_best'][k]:.2f}x |")
    noisy = [r for r in results["rows"] if r.get("noisy")]
    if noisy:
        lines += ["", "Noisy rows (no verdict; rerun):", ""]
        lines += [f"- {r['case']} ({_pow2(r['n'])}): " + "; ".join(r["noisy_why"]) for r in noisy]
    lines.append("")
    lines.append(summary(results["rows"]))
    return "\n".join(lines)


def _status_cell(row: dict, t: dict) -> str:
    if row.get("noisy"):
        return "noisy, rerun"
    if t.get("met") is None:
        return "-"
    return "met" if t["met"] else "**NOT met**"


def _plot_panels(results: dict) -> list:
    """The PNG's panels, one per suite (and per optimizer size): (title, y label, reference lines, bars), each bar
    (label, optkern value, torch value or None, noisy).  Every suite in the rows gets a panel."""
    rows = results["rows"]
    panels = []
    for n in sorted({r["n"] for r in rows if r["kind"] == "algo"}):
        rs = [r for r in rows if r["kind"] == "algo" and r["n"] == n]
        panels.append((f"optimizer steps, n = {_pow2(n)} float32", "% of in-place add bandwidth",
                       [(ROOFLINE_TARGET, f"{ROOFLINE_TARGET:.0f}% target")],
                       [(f"{r['case']}\n(torch {r.get('torch_path') or '-'})", r["optkern_pct_roofline"],
                         r.get("torch_pct_roofline"), r.get("noisy", False)) for r in rs]))
    rs = [r for r in rows if r["kind"] == "batch_norm"]
    if rs:
        from .batch_norm import ROOFLINE_TARGET as BN_TARGET

        panels.append(("batch norm (torch: aten)", "% of in-place add bandwidth",
                       [(BN_TARGET, f"{BN_TARGET:.0f}% target")],
                       [(_bn_label(r), r["optkern_pct_roofline"],
                         100.0 * r["torch_gbs"] / r["roofline_gbs"] if r.get("torch_gbs") else None,
                         r.get("noisy", False)) for r in rs]))
    rs = [r for r in rows if r["kind"] == "lbfgs"]
    if rs:
        from .lbfgs import ROOFLINE_TARGET as LB_TARGET

        panels.append(("L-BFGS direction, m = 10 (torch: per-vector two-loop)", "% of DRAM in-place add bandwidth",
                       [(LB_TARGET, f"{LB_TARGET:.0f}% target")],
                       [(f"{_pow2(r['n'])} {r['dtype']}", r["optkern_pct_roofline"],
                         100.0 * r["bytes"] / r["torch_s"] / 1e9 / r["roofline_gbs"] if r.get("torch_s") else None,
                         r.get("noisy", False)) for r in rs]))
    rs = [r for r in rows if r["kind"] == "scenario" and r.get("ratio") is not None]
    if rs:
        panels.append(("scenarios: speed-up over torch", "torch time / optkern time", [(1.0, "torch")],
                       [(r["case"].replace(", ", "\n", 1), r["ratio"], None, r.get("noisy", False)) for r in rs]))
    return panels


def _bn_label(r: dict) -> str:
    layout = {"rows": "rows", "nchw": "NCHW", "nhwc": "NHWC"}[r["layout"]]
    return f"{r['op']}\n{layout} {'x'.join(str(d) for d in r['shape'])}"


def plot(results: dict, path: Path) -> bool:
    """Every suite in one PNG: % of the roofline (or the speed-up, for the scenarios), optkern and torch side by
    side, noisy rows hatched."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return False
    panels = _plot_panels(results)
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.8 * cols, 5.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, ylabel, refs, bars) in zip(axes.flat, panels):
        x = np.arange(len(bars))
        has_torch = any(b[2] is not None for b in bars)
        w = 0.4 if has_torch else 0.6
        for xi, (label, ok, tt, noisy) in zip(x, bars):
            hatch = "//" if noisy else None
            ax.bar(xi - (0.2 if has_torch else 0), ok, w, color="tab:blue", hatch=hatch, edgecolor="k" if noisy else None)
            if tt is not None:
                ax.bar(xi + 0.2, tt, w, color="tab:orange", hatch=hatch, edgecolor="k" if noisy else None)
        for y, lab in refs:
            ax.axhline(y, color="k", ls="--", lw=1)
            ax.text(-0.5, y, " " + lab, va="bottom", ha="left", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([b[0] + ("\n(noisy)" if b[3] else "") for b in bars], rotation=40, ha="right",
                           fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue")]
        names = ["optkern"]
        if has_torch:
            handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:orange"))
            names.append("torch")
        ax.legend(handles, names, loc="upper right", fontsize=7, framealpha=0.95)
    meta = results["meta"]
    fig.suptitle(f"optkern {meta['optkern_version']} vs torch {meta['torch_version']} — {meta['cpu_model']}, "
                 f"{meta['threads']} threads (hatched: noisy, rerun)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- driver
def _parse_sizes(s: str) -> list[int]:
    out = []
    for tok in s.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.startswith("2^"):
            out.append(1 << int(tok[2:]))
        else:
            out.append(int(float(tok)))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m optkern.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few reps (smoke run, < 1 min)")
    ap.add_argument("--out", default="bench/out", help="output folder (default bench/out)")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes, e.g. 2^24,2^26 (default 2^24,2^26; "
                                                  "--quick: 2^20,2^22)")
    ap.add_argument("--threads", type=int, default=2, help="threads for optkern and torch (default 2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 9; --quick 3)")
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    ap.add_argument("--suite", choices=("all", "optim", "batch_norm", "lbfgs"), default="all",
                    help="which cases: optimizer steps, batch norm, the L-BFGS direction, or all (default)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                    help="print per-row ratios of two earlier runs (A/B work on a noisy machine) and exit")
    return ap


def run(args) -> dict:
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: timing optkern only", file=sys.stderr)
    optkern.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    if args.reps is None:
        args.reps = 3 if args.quick else 9
    warmup = 1 if args.quick else 2
    sizes = _parse_sizes(args.sizes) if args.sizes else ([1 << 20, 1 << 22] if args.quick else [1 << 24, 1 << 26])
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    for a in algos:
        if a not in ALGOS:
            raise SystemExit(f"--algos: unknown algorithm {a!r} (choose from {', '.join(ALGOS)})")
    results = {"meta": metadata(args, torch), "roofline": [], "rows": []}
    results["meta"]["sizes"] = sizes
    t_start = time.perf_counter()

    results["meta"]["suite"] = args.suite
    from . import batch_norm as bn_bench
    from . import lbfgs as lbfgs_bench

    isa_n = (1 << 24) if (1 << 24) in sizes else min(sizes)
    do_optim = args.suite in ("all", "optim")
    do_bn = args.suite in ("all", "batch_norm")
    do_lbfgs = args.suite in ("all", "lbfgs")
    total = ((len(sizes) * (1 + len(algos)) + 1 + 3 if do_optim else 0) + (bn_bench.num_cases(args.quick) if do_bn else 0)
             + (lbfgs_bench.num_cases(args.quick) if do_lbfgs else 0))
    bar = _Bar(total, disable=args.no_progress)
    try:
        if do_bn:
            results["rows"].extend(bn_bench.run_cpu(torch, args.quick, args.reps, warmup, bar))
        if do_lbfgs:
            results["rows"].extend(lbfgs_bench.run_cpu(torch, args.quick, args.reps, warmup, bar))
        for n in (sizes if do_optim else []):
            bar.set(f"roofline n={_pow2(n)}")
            roof_fns = roofline_fns(torch, n)
            roof = roofline(torch, n, max(args.reps, 11 if not args.quick else 3), warmup, roof_fns)
            results["roofline"].append(roof)
            bar.update()
            pbase, gbase = _rand(n, 1), _rand(n, 2, 1e-2)
            probe = add_probe(roof_fns, 12 * n)
            for name in algos:
                bar.set(f"{name} n={_pow2(n)}")
                results["rows"].append(bracketed(probe, lambda: bench_algo(
                    torch, name, n, pbase, gbase, args.reps, warmup, roof["roofline_gbs"], roof_fns)))
                gc.collect()
                bar.update()
            if n == isa_n:
                bar.set(f"Adam ISA n={_pow2(n)}")
                results["rows"].append(bracketed(probe, lambda: bench_isa(
                    n, pbase, gbase, args.reps, warmup, roof["roofline_gbs"])))
                bar.update()
                bar.set(f"clip + Adam n={_pow2(n)}")
                results["rows"].append(bracketed(probe, lambda: bench_clip(torch, n, pbase, gbase, args.reps, warmup)))
                bar.update()
            del pbase, gbase, roof_fns, probe
            gc.collect()
        if do_optim:
            bar.set("Adam 1000 x 1024")
            results["rows"].append(bracketed(add_probe(roofline_fns(torch, 1000 * 1024), 12 * 1000 * 1024),
                                             lambda: bench_many_small(torch, 1000, 1024, max(args.reps, 5), warmup)))
            bar.update()
            bar.set("one small Adam step")
            results["rows"].append(bracketed(add_probe(roofline_fns(torch, 1024), 12 * 1024),
                                             lambda: bench_small_step(torch, 1024, max(args.reps, 7))))
            bar.update()
    finally:
        bar.close()
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    results["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def main_cuda(args) -> int:
    """--device cuda: the CUDA suite of :mod:`optkern.bench.cuda` (its own table; exit status 1 when a section
    failed, 2 when nothing could be measured)."""
    from . import cuda

    try:
        import torch
    except ImportError:
        torch = None
    if args.reps is None:
        args.reps = 6 if args.quick else 21
    results = {"meta": metadata(args, torch), "rows": []}
    results["meta"]["suite"] = args.suite
    return cuda.run(args, results)


def compare(old: dict, new: dict) -> str:
    """Per-row ratios of two runs' JSON (rows matched by case and size): optkern's time new / old (< 1: faster
    now), the speed-up over torch in each, and whether either row was noisy; then the geometric mean of the time
    ratio over the rows clean in both."""
    def key(r):
        return (r.get("case"), r.get("n"))

    olds = {key(r): r for r in old.get("rows", []) if r.get("optkern_s")}
    lines = [f"old: {old['meta'].get('date')} ({old['meta'].get('cpu_model')}), new: {new['meta'].get('date')} "
             f"({new['meta'].get('cpu_model')})", "",
             "| case | n | optkern old | optkern new | new / old | vs torch old | vs torch new | noisy |",
             "|---|---|---|---|---|---|---|---|"]
    logs, unmatched = [], []
    for r in new.get("rows", []):
        o = olds.pop(key(r), None)
        if not r.get("optkern_s"):
            continue
        if o is None:
            unmatched.append(f"new only: {r['case']} ({_pow2(r['n'])})")
            continue
        q = r["optkern_s"] / o["optkern_s"]
        noisy = ", ".join(w for w, x in (("old", o), ("new", r)) if x.get("noisy")) or "-"
        if noisy == "-":
            logs.append(np.log(q))

        def vs(x):
            return f"{x['ratio']:.2f}x" if x.get("ratio") is not None else "-"

        lines.append(f"| {r['case']} | {_pow2(r['n'])} | {_fmt_time(o['optkern_s'])} | {_fmt_time(r['optkern_s'])} | "
                     f"{q:.3f} | {vs(o)} | {vs(r)} | {noisy} |")
    unmatched += [f"old only: {c} ({_pow2(n)})" for c, n in olds]
    lines.append("")
    if logs:
        lines.append(f"geometric mean of optkern's time new / old over {len(logs)} rows clean in both: "
                     f"{float(np.exp(np.mean(logs))):.3f}")
    else:
        lines.append("no row is clean in both runs")
    lines += unmatched
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        runs = []
        for path in args.compare:
            with open(path) as f:
                runs.append(json.load(f))
        print(compare(*runs))
        return 0
    if args.device == "cuda":
        return main_cuda(args)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_cpu"
    jpath = out / f"{stem}.json"
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1, default=float)
    table = markdown(results)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print()
    print(f"wrote {jpath}, {out / f'{stem}.md'}", end="")
    ppath = out / f"{stem}.png"
    if plot(results, ppath):
        print(f", {ppath}", end="")
    print(f"  ({results['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
