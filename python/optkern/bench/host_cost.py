"""``python -m optkern.bench.host_cost``: host time per Adam step against the tensor count (10 to 10^4 tensors).

Tensors of 16 float32 elements, so the memory traffic is negligible and the time is what the host spends on the
call: argument handling, validation, plans, launches.  Per tensor count, one step of

* ``optkern.torch.Adam`` (grads in ``p.grad``; on CUDA with ``capturable=True``);
* optkern's functional ``adam_step`` on NumPy arrays (CPU) or CuPy arrays (CUDA), state preallocated;
* ``torch.optim.Adam(fused=True)``, the reference.

Timing: the wall time of one call (``time.perf_counter``), medians over repetitions after a warm-up, the
implementations in alternating blocks.  On CUDA the device is synchronized *before* each call and not after it, so
the figure is the host's time to issue the step, not the device's time to run it.  On the CPU the host also does
the arithmetic (16 elements per tensor: small next to the per-tensor overhead).  "us per tensor" is the slope
between the smallest and the largest count.  Target (CUDA only, optkern.torch.Adam, whose step plans are cached):
host time per step independent of the tensor count, read as time at the largest count <= ``FLAT_TARGET`` x the
time at the smallest.

    python -m optkern.bench.host_cost [--quick] [--reps 15] [--threads 2] [--out bench/results]

writes ``<out>/cpu_<tag>_<threads>threads_host_cost.md`` and ``.json`` (CPU; ``--device cuda`` is run by
``python -m optkern.bench --device cuda`` as part of its table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import optkern

from .runner import _median, cpu_model

SIZE = 16
COUNTS = (10, 100, 1000, 10000)
QUICK_COUNTS = (10, 100)
FLAT_TARGET = 2.0  # host time at the largest count / at the smallest
OK_CLASS = "optkern.torch.Adam"
TORCH_FUSED = "torch.optim.Adam(fused=True)"


def host_times(fns: dict, reps: int, warmup: int, sync=None, rounds: int = 3) -> dict:
    """name -> [seconds per call]: each call timed alone, ``sync()`` (if given) called before each, never inside
    the timed interval; every round runs a warm-up and a block of repetitions of each fn in turn."""
    out = {k: [] for k in fns}
    for r in range(rounds):
        n_r = reps // rounds + (1 if r < reps % rounds else 0)
        for k, fn in fns.items():
            for _ in range(warmup if r == 0 else 1):
                fn()
            for _ in range(n_r):
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                fn()
                out[k].append(time.perf_counter() - t0)
    if sync is not None:
        sync()
    return out


def _data(count: int, seed: int):
    """count params and grads of SIZE float32 elements, NumPy."""
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(SIZE, dtype=np.float32) for _ in range(count)]
    gs = [(rng.standard_normal(SIZE, dtype=np.float32) * np.float32(1e-2)) for _ in range(count)]
    return ps, gs


def _torch_params(torch, ps, gs, device):
    out = []
    for p, g in zip(ps, gs):
        t = torch.nn.Parameter(torch.as_tensor(p, device=device).clone())
        t.grad = torch.as_tensor(g, device=device).clone()
        out.append(t)
    return out


def _functional(xp, ps, gs):
    """One functional Adam step per call on xp arrays (NumPy or CuPy), the step counter increasing."""
    p, g = [xp.asarray(x).copy() for x in ps], [xp.asarray(x) for x in gs]
    m, v = [xp.zeros_like(x) for x in p], [xp.zeros_like(x) for x in p]
    t = [0]

    def step():
        t[0] += 1
        optkern.adam_step(p, g, m, v, step=t[0], lr=1e-3)

    return step


def cases(torch, xp, count: int, device: str, xp_name: str) -> dict:
    """name -> step fn for one tensor count (torch None: the functional path only)."""
    ps, gs = _data(count, count)
    fns = {}
    if torch is not None:
        import optkern.torch as okt

        kw = dict(capturable=True) if device == "cuda" else {}
        fns[OK_CLASS] = okt.Adam(_torch_params(torch, ps, gs, device), lr=1e-3, **kw).step
    fns[f"optkern.adam_step ({xp_name})"] = _functional(xp, ps, gs)
    if torch is not None:
        fns[TORCH_FUSED] = torch.optim.Adam(_torch_params(torch, ps, gs, device), lr=1e-3, fused=True).step
    return fns


def summarize(device: str, counts, medians: dict, raw: dict | None = None) -> dict:
    """medians: impl -> {count: seconds}.  -> the host-cost record: medians, us per tensor (slope between the
    smallest and largest count), growth (largest / smallest) and, on CUDA, the flatness target of OK_CLASS."""
    counts = sorted(counts)
    lo, hi = counts[0], counts[-1]
    rec = {"device": device, "size": SIZE, "counts": counts, "median_s": medians, "per_tensor_us": {},
           "growth": {}, "targets": [], "raw_s": raw or {}}
    for impl, by in medians.items():
        if hi > lo:
            rec["per_tensor_us"][impl] = (by[hi] - by[lo]) / (hi - lo) * 1e6
            rec["growth"][impl] = by[hi] / by[lo]
    if device == "cuda" and OK_CLASS in rec["growth"]:
        from .cuda import target

        rec["targets"].append(target(f"{OK_CLASS}: host time at {hi:,} tensors <= {FLAT_TARGET:g}x at {lo:,}",
                                     rec["growth"][OK_CLASS], FLAT_TARGET, higher=False))
    return rec


def _fmt(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def markdown_table(rec: dict) -> list:
    """Lines: one row per implementation, a column per tensor count, then us per tensor and growth."""
    counts = rec["counts"]
    lines = ["| implementation | " + " | ".join(f"{c:,} tensors" for c in counts) + " | us per tensor | growth |",
             "|---" * (len(counts) + 3) + "|"]
    ref = rec["median_s"].get(TORCH_FUSED)
    for impl, by in rec["median_s"].items():
        cells = []
        for c in counts:
            cell = _fmt(by[c])
            if ref is not None and impl != TORCH_FUSED:
                cell += f" ({ref[c] / by[c]:.1f}x)"
            cells.append(cell)
        slope = rec["per_tensor_us"].get(impl)
        growth = rec["growth"].get(impl)
        lines.append(f"| {impl} | " + " | ".join(cells) + f" | {'-' if slope is None else f'{slope:.3f}'} | "
                     f"{'-' if growth is None else f'{growth:.1f}x'} |")
    if ref is not None:
        lines += ["", f"(Nx) = {TORCH_FUSED} time / this time at the same count; growth = time at the largest count "
                      "/ time at the smallest."]
    for t in rec["targets"]:
        lines.append(f"Target: {t['what']}: **{t['status']}** ({t['value']:.1f}x).")
    return lines


def run_on(torch, xp, device: str, counts, reps: int, warmup: int, sync=None) -> dict:
    """The host-cost record for xp arrays (NumPy on "cpu", CuPy on "cuda") and torch tensors on device (torch
    None: the functional path only); sync, if given, runs before each timed call."""
    medians, raw = {}, {}
    for c in counts:
        fns = cases(torch, xp, c, device, "CuPy" if device == "cuda" else "NumPy")
        r = host_times(fns, reps, warmup, sync=sync)
        raw[c] = r
        for k, v in r.items():
            medians.setdefault(k, {})[c] = _median(v)
        del fns
    return summarize(device, counts, medians, raw)


def run_cpu(torch, quick: bool = False, reps: int = 15, counts=None) -> dict:
    counts = counts or (QUICK_COUNTS if quick else COUNTS)
    return run_on(torch, np, "cpu", counts, 3 if quick else reps, 1 if quick else 3)


def markdown(meta: dict, rec: dict) -> str:
    lines = [f"# Host time per Adam step against the tensor count ({meta['cpu_model']}, {meta['threads']} threads)", "",
             f"`{meta['command']}`; optkern {meta['optkern_version']} (CPU path {meta['optkern_cpu_isa']}), torch "
             f"{meta['torch_version']}, {meta['date']}. Tensors of {rec['size']} float32 elements; the wall time of "
             f"one step() / adam_step call, medians of {meta['reps']} repetitions per implementation and count, in "
             "alternating blocks. On the CPU the host also does the (tiny) arithmetic.", ""]
    lines += markdown_table(rec)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optkern.bench.host_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 tensors, 3 reps (smoke run)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--counts", default=None, help="comma-separated tensor counts (default 10,100,1000,10000)")
    ap.add_argument("--out", default="bench/results", help="folder for the .md and .json (default bench/results)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: the functional path only", file=sys.stderr)
    optkern.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    counts = [int(float(c)) for c in args.counts.split(",")] if args.counts else None
    rec = run_cpu(torch, quick=args.quick, reps=args.reps, counts=counts)
    import datetime as _dt

    from .torch_nn import cpu_tag

    meta = {"cpu_model": cpu_model(), "threads": args.threads, "reps": 3 if args.quick else args.reps,
            "optkern_version": optkern.__version__, "optkern_cpu_isa": optkern.cpu_isa(),
            "torch_version": getattr(torch, "__version__", None),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m optkern.bench.host_cost " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = markdown(meta, rec)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu_{cpu_tag()}_{args.threads}threads_host_cost"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **rec}, indent=1, default=float))
    print(f"wrote {out / stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
