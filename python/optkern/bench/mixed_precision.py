"""``python -m optkern.bench.mixed_precision``: Adam in every 16-bit storage mode against the in-place-add roofline
and against torch's fused CPU Adam, in one run.

Rows (one param of n elements, grads of the param dtype unless said; functional ``optkern.adam_step`` on NumPy /
ml_dtypes arrays, state preallocated, the step counter increasing):

=====================  ===============================================================  ==========================
mode                   arrays (bytes per element: r = read, w = written)                minimal bytes per element
=====================  ===============================================================  ==========================
float32                param 4 r+w, grad 4 r, m 4 r+w, v 4 r+w                          4*2 + 4 + 4*2*2 = 28
bf16, state f32        param 2 r+w, grad 2 r, m 4 r+w, v 4 r+w                          2*2 + 2 + 4*2*2 = 22
bf16, state bf16       param 2 r+w, grad 2 r, m 2 r+w, v 2 r+w (torch fused's layout)   2*2 + 2 + 2*2*2 = 14
bf16 "fp32" master     master 4 r+w, param 2 w (written from the master), grad 2, m, v  4*2 + 2 + 2 + 16 = 28
bf16 "split"           param 2 r+w, int16 residual 2 r+w, grad 2 r, m, v                2*2 + 2*2 + 2 + 16 = 26
bf16 stochastic        as bf16 state f32 (the rounding is arithmetic, no extra bytes)   22
fp16, state f32        as bf16 state f32                                                22
offload                float32 param 4 r+w, bf16 grad 2 r, m, v, bf16 copy 2 w          4*2 + 2 + 16 + 2 = 28
=====================  ===============================================================  ==========================

Competitors, timed in the same interleaved blocks as the optkern row they are compared with (ratio = torch time /
optkern time):

* ``bf16, state bf16``  vs ``torch.optim.Adam(fused=True)`` on a bf16 param (torch keeps its state in bf16);
* ``bf16 "fp32" master`` vs torch's two-pass equivalent: fused float32 Adam on a float32 master, then
  ``bf16_param.copy_(master)``;
* ``offload`` vs fused float32 Adam on the float32 param, then ``bf16_copy.copy_(param)``.
* ``float32`` vs fused float32 Adam (context only: the optimizer suite, ``python -m optkern.bench``, has its target).

torch's fused Adam needs grads of the param's dtype, so the two float32 competitors get float32 grads, 2 more
bytes per element than optkern reads, and no conversion pass is charged to them (in training their bf16 grads would
first have to be widened).  Effective GB/s = the row's minimal bytes (the table above) / time, for optkern and for its
competitor alike (the same job); % of roofline against the faster in-place add (NumPy ``np.add(a, b, out=a)``,
torch ``a.add_(b)``, float32, 12 B per element) timed round-robin in the row's own blocks
(:func:`optkern.bench.runner.roofline_fns`, :func:`~optkern.bench.runner.time_interleaved`; medians).

Targets (issue 14): every mode >= 90% of the roofline; bf16 state bf16 >= 1.0x torch fused bf16; "fp32" >= 1.5x the
two-pass; offload >= 1.4x fused + ``copy_``.

    python -m optkern.bench.mixed_precision [--sizes 2^24,2^26] [--reps 11] [--threads 2] [--out bench/results]

writes ``<out>/cpu_<tag>_<threads>threads_mixed_precision.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import optkern

from .runner import ROOFLINE_TARGET, _fmt_time, _median, _parse_sizes, _pow2, metadata, roofline_fns, time_interleaved
from .torch_nn import cpu_tag

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
SEED = 1234
RATIO_TARGETS = {"bf16_state_bf16": 1.0, "bf16_fp32": 1.5, "offload": 1.4}

# key -> (label, minimal bytes per element, formula, competitor label or None)
MODES = {
    "float32": ("float32", 28, "4*2 + 4 + 4*2*2", "torch fused float32 Adam"),
    "bf16_none": ("bf16, master None, state float32", 22, "2*2 + 2 + 4*2*2", None),
    "bf16_state_bf16": ("bf16, master None, state bf16", 14, "2*2 + 2 + 2*2*2", "torch fused bf16 Adam"),
    "bf16_fp32": ('bf16, "fp32" master', 28, "4*2 + 2 + 2 + 4*2*2", "torch fused float32 Adam + copy_ to bf16"),
    "bf16_split": ('bf16, "split"', 26, "2*2 + 2*2 + 2 + 4*2*2", None),
    "bf16_sr": ("bf16, stochastic rounding", 22, "2*2 + 2 + 4*2*2", None),
    "fp16_none": ("fp16, master None, state float32", 22, "2*2 + 2 + 4*2*2", None),
    "offload": ("offload: float32 param, bf16 grad, bf16 copy", 28, "4*2 + 2 + 4*2*2 + 2",
                "torch fused float32 Adam + copy_ to bf16"),
}


# ---------------------------------------------------------------------------------------------- arrays
def _bf16_numpy(torch, t):
    """A NumPy (ml_dtypes.bfloat16) array sharing a torch bf16 tensor's memory."""
    import ml_dtypes

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _half(torch, base: np.ndarray, dtype: str):
    """A NumPy 16-bit copy of a float32 array (bf16 through torch's conversion: fast at 2^26, and the same
    round-to-nearest-even)."""
    t = torch.from_numpy(base).to(getattr(torch, dtype))
    return _bf16_numpy(torch, t) if dtype == "bfloat16" else t.numpy()


def optkern_case(torch, key: str, pbase: np.ndarray, gbase: np.ndarray):
    """(step closure, the arrays it updates) for one mode: fresh copies of the base data, state preallocated."""
    f32 = np.float32
    ctr = [0]

    def nxt():
        ctr[0] += 1
        return ctr[0]

    kw = {"lr": LR, "betas": BETAS, "eps": EPS}
    if key == "float32":
        p, g = pbase.copy(), gbase.copy()
        m, v, extra = np.zeros_like(p), np.zeros_like(p), {}
    elif key == "offload":
        p, g = pbase.copy(), _half(torch, gbase, "bfloat16")
        m, v = np.zeros_like(p), np.zeros_like(p)
        extra = {"param_copies": [_half(torch, pbase, "bfloat16")]}
    else:
        dt = "float16" if key.startswith("fp16") else "bfloat16"
        p, g = _half(torch, pbase, dt), _half(torch, gbase, dt)
        if key == "bf16_state_bf16":
            m, v = _half(torch, np.zeros_like(pbase), dt), _half(torch, np.zeros_like(pbase), dt)
        else:
            m, v = np.zeros(p.shape, f32), np.zeros(p.shape, f32)
        extra = {}
        if key in ("bf16_fp32", "bf16_split"):
            mode = "fp32" if key == "bf16_fp32" else "split"
            extra = {"masters": optkern.init_masters([p], mode), "master_weights": mode}
        elif key == "bf16_sr":
            extra = {"stochastic_rounding": True, "seed": SEED}

    def step():
        optkern.adam_step([p], [g], [m], [v], step=nxt(), **kw, **extra)

    arrays = {"param": p, "grad": g, "exp_avg": m, "exp_avg_sq": v}
    arrays.update({f"{k}[0]": a[0] for k, a in extra.items() if isinstance(a, list)})
    return step, arrays


def torch_case(torch, key: str, pbase: np.ndarray, gbase: np.ndarray):
    """(step closure, its tensors) of the competitor of ``key``, or (None, {})."""
    if MODES[key][3] is None:
        return None, {}
    kw = {"lr": LR, "betas": BETAS, "eps": EPS, "fused": True}
    if key == "bf16_state_bf16":
        tp = torch.from_numpy(pbase).to(torch.bfloat16)
        tp.grad = torch.from_numpy(gbase).to(torch.bfloat16)
        return torch.optim.Adam([tp], **kw).step, {"param": tp}
    tm = torch.from_numpy(pbase.copy())  # float32 master (or the offload step's float32 param)
    tm.grad = torch.from_numpy(gbase.copy())
    opt = torch.optim.Adam([tm], **kw)
    if key == "float32":
        return opt.step, {"param": tm}
    tb = tm.detach().to(torch.bfloat16)

    def two_pass():
        opt.step()
        tb.copy_(tm)

    return two_pass, {"param": tm, "copy": tb}


# ---------------------------------------------------------------------------------------------- one row
def bench_mode(torch, key: str, n: int, pbase, gbase, reps: int, warmup: int, roof_fns: dict) -> dict:
    label, bpe, formula, comp = MODES[key]
    fns = {"optkern": optkern_case(torch, key, pbase, gbase)[0]}
    tstep, _ = torch_case(torch, key, pbase, gbase)
    if tstep is not None:
        fns["torch"] = tstep
    for k, f in roof_fns.items():
        fns["roof_" + k] = f
    raw = time_interleaved(fns, reps, warmup)
    del fns, tstep
    gc.collect()
    roof = {k[5:]: 12 * n / _median(v) / 1e9 for k, v in raw.items() if k.startswith("roof_")}
    roof_gbs = max(roof.values())
    nbytes = bpe * n
    t_ok = _median(raw["optkern"])
    row = {"mode": key, "label": label, "n": n, "bytes_per_element": bpe, "bytes_formula": formula, "bytes": nbytes,
           "raw_s": raw, "optkern_s": t_ok, "optkern_gbs": nbytes / t_ok / 1e9, "roofline_gbs": roof_gbs,
           "row_roofline_gbs": roof, "optkern_pct_roofline": 100.0 * nbytes / t_ok / 1e9 / roof_gbs,
           "competitor": comp}
    row["targets"] = [{"what": f">= {ROOFLINE_TARGET:.0f}% of roofline", "value": row["optkern_pct_roofline"],
                       "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET}]
    if "torch" in raw:
        t_t = _median(raw["torch"])
        row.update(torch_s=t_t, torch_gbs=nbytes / t_t / 1e9, torch_pct_roofline=100.0 * nbytes / t_t / 1e9 / roof_gbs,
                   ratio=t_t / t_ok)
        if key in RATIO_TARGETS:
            tgt = RATIO_TARGETS[key]
            row["targets"].append({"what": f">= {tgt:g}x {comp}", "value": row["ratio"], "met": row["ratio"] >= tgt})
    return row


# ---------------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Mixed-precision Adam: every storage mode vs the in-place-add roofline and torch fused "
             f"({meta['cpu_model']}, {meta['threads']} threads)", "",
             f"`{meta['command']}`; optkern {meta['optkern_version']} (CPU path {meta['optkern_cpu_isa']}), torch "
             f"{meta['torch_version']}, medians of {meta['reps']} repetitions in interleaved blocks, {meta['date']}, "
             f"{meta['wall_s']:.0f} s.", "",
             "Minimal bytes per element: every array read once, and written once where the step writes it (param and "
             "state r+w, grad r; the \"fp32\" mode writes the bf16 param from the master without reading it; the "
             "offload step writes the bf16 copy). GB/s = those bytes / time, for optkern and its competitor alike "
             "(the same job). % roofline: against the faster float32 in-place add (NumPy or torch, 12 B per element) "
             "timed in the same blocks as the row. Ratio = competitor time / optkern time. torch's fused Adam needs "
             "grads of the param dtype: its float32 competitors read float32 grads (2 B more per element than "
             "optkern's bf16 grads) and are charged no conversion pass.", "",
             "| mode | n | bytes/elem (formula) | optkern | GB/s | % roofline | competitor | competitor time | ratio | "
             "targets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        comp = r["competitor"] or "-"
        ct = _fmt_time(r["torch_s"]) + f" ({r['torch_pct_roofline']:.0f}%)" if "torch_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        tg = "; ".join(f"{t['what']}: {'met' if t['met'] else '**NOT met**'}" for t in r["targets"])
        lines.append(f"| {r['label']} | {_pow2(r['n'])} | {r['bytes_per_element']} ({r['bytes_formula']}) | "
                     f"{_fmt_time(r['optkern_s'])} | {r['optkern_gbs']:.1f} | {r['optkern_pct_roofline']:.0f}% | "
                     f"{comp} | {ct} | {ratio} | {tg} |")
    lines.append("")
    for n in meta["sizes"]:
        rs = [r["roofline_gbs"] for r in results["rows"] if r["n"] == n]
        if rs:
            lines.append(f"- roofline at n = {_pow2(n)}: {min(rs):.1f}-{max(rs):.1f} GB/s over the rows (each row's "
                         f"faster add)")
    all_t = [t for r in results["rows"] for t in r["targets"]]
    lines.append(f"- targets met: {sum(t['met'] for t in all_t)} / {len(all_t)}; load average "
                 f"{meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m optkern.bench.mixed_precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2^24,2^26", help="comma-separated sizes (default 2^24,2^26)")
    ap.add_argument("--reps", type=int, default=11, help="timed repetitions per case (default 11)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per block (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for optkern and torch (default 2)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    return ap


def run(args, argv=None) -> dict:
    import torch

    optkern.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    args.quick, args.device = False, "cpu"  # the fields runner.metadata reads
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    sizes = _parse_sizes(args.sizes)
    meta = metadata(args, torch)
    meta.update(sizes=sizes, modes=modes, command="python -m optkern.bench.mixed_precision " + " ".join(
        sys.argv[1:] if argv is None else argv))
    results = {"meta": meta, "rows": []}
    t0 = time.perf_counter()
    for n in sizes:
        rng = np.random.default_rng(1)
        pbase = rng.standard_normal(n, dtype=np.float32)
        gbase = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
        roof = roofline_fns(torch, n)
        for key in modes:
            print(f"{key} n={_pow2(n)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            results["rows"].append(bench_mode(torch, key, n, pbase, gbase, args.reps, args.warmup, roof))
            gc.collect()
        del pbase, gbase, roof
        gc.collect()
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args, argv)
    md = markdown(results)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu_{cpu_tag()}_{args.threads}threads_mixed_precision"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
