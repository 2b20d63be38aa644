"""``python -m optkern.bench --device cuda``: optkern's CUDA kernels against a device-to-device copy and torch.

Rows (float32; medians of CUDA-event timings after a warm-up, optkern and torch timed in the same run: in
alternating blocks, except the L-BFGS case, which times each in one block):

* copy: the faster of ``cudaMemcpyAsync`` device-to-device and CuPy's ``copyto`` at 2^28 elements, 8 B per element
  (read + write): the bandwidth every "% of copy" below is measured against;
* Adam at 2^28 elements (one tensor), ~200 transformer-like tensors (GPT-2-like, 16 layers) and 1000 x 4096, against
  ``torch.optim.Adam(fused=True)``; 28 B per element (param, exp_avg, exp_avg_sq read and written, grad read);
* global_norm over the transformer list's grads against torch's foreach norm as ``clip_grad_norm_`` computes it
  (``torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))``); 4 B per element;
* the L-BFGS direction, m = 10, n = 2^24, against the per-vector torch two-loop (:mod:`optkern.bench.lbfgs`);
* batch norm forward + backward in training, (32, 64, 56, 56) NCHW and channels-last, against torch (cuDNN);
* host time per step (:mod:`optkern.bench.host_cost`): 10 to 10^4 tensors of 16 elements, optkern.torch.Adam and
  the functional adam_step on CuPy arrays, torch fused as the reference.

GB/s come from the minimal bytes as the issue counts them (``bytes``).  Each row also has ``bound_bytes``: every
tensor it touches counted once (what must cross DRAM at least, whatever the caches hold); a row whose
bound_bytes / time exceeds ``PHYSICAL_BOUND_PCT`` of the copy is above what the memory can do, so its verdicts
read "noisy, rerun" rather than "met".  The pure parts (shapes, byte counts, verdicts, the table) are tested on
the CPU in tests/test_bench_cuda.py.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import optkern

from .runner import _median, cupy_event_times, torch_event_times
from .verdicts import PHYSICAL_BOUND_PCT, target, verdict  # noqa: F401 (verdict: part of this module's API)

F32 = 4
ADAM_ACCESSES = 7  # param r+w, exp_avg r+w, exp_avg_sq r+w, grad r
ADAM_COPY_TARGET = 90.0  # % of the copy at 2^28
TRANSFORMER_TARGET = 1.1  # x torch fused, ~200 transformer-like tensors
MANY_TARGET = 1.5  # x torch fused, 1000 x 4096
LBFGS_TARGET = 3.0  # x the torch two-loop
BN_TARGET = 1.0  # x torch (cuDNN)
NORM_TOL = 1e-6  # global_norm against the float64 norm (relative; float32 grads are summed in float32 lanes)
LBFGS_TOL = 1e-3  # the float32 direction against the torch two-loop's (relative, in the 2-norm)
BIG_N = 1 << 28
QUICK_BIG_N = 1 << 24
LBFGS_N, LBFGS_M = 1 << 24, 10
BN_SHAPE = (32, 64, 56, 56)
QUICK_BN_SHAPE = (8, 64, 28, 28)


# ---------------------------------------------------------------------------------------------- pure parts
def transformer_shapes(layers: int = 16, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list:
    """A GPT-2-like parameter list: embeddings, then per layer 2 layer norms, attention (qkv, proj) and MLP with
    their biases, then the final layer norm: 2 + 12 * layers + 2 tensors (196 for 16 layers)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def many_shapes(count: int = 1000, size: int = 4096) -> list:
    return [(size,)] * count


def numel(shapes) -> int:
    return int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))


def adam_bytes(n: int, itemsize: int = F32) -> int:
    """Minimal traffic of one Adam step over n elements (also its bound: each array is touched once)."""
    return ADAM_ACCESSES * itemsize * n


def copy_bytes(n: int, itemsize: int = F32) -> int:
    return 2 * itemsize * n


def norm_bytes(n: int, itemsize: int = F32) -> int:
    return itemsize * n


def lbfgs_bytes(n: int, m: int, itemsize: int = F32) -> tuple:
    """(the issue's count: 2m + 1 vectors read in each of the two passes and d written, the bound: each of the
    2m + 1 vectors read once and d written once)."""
    return (4 * m + 3) * n * itemsize, (2 * m + 2) * n * itemsize


def bn_bytes(n: int, itemsize: int = F32) -> tuple:
    """(forward training 3 passes + backward training 5, as the CPU suite counts them; the bound: x, y, dy and dx
    once each)."""
    return 8 * itemsize * n, 4 * itemsize * n


def gbs(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def pct_of(value_gbs: float, copy_gbs: float) -> float:
    return 100.0 * value_gbs / copy_gbs


def device_slug(name: str) -> str:
    """File-name tag of a GPU: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100_80gb_hbm3"."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla")]
    return "_".join(words) or "gpu"


def make_row(case: str, *, tensors: int, n: int, nbytes: int, bound_bytes: int, optkern_s: float, copy_gbs: float,
             ref_s: float | None = None, ref_name: str | None = None, ratio_target: float | None = None,
             pct_target: float | None = None, raw_s: dict | None = None, **extra) -> dict:
    """A CUDA row: GB/s from nbytes, % of the copy, ratio ref_s / optkern_s, the targets, the physical-bound check
    (bound_bytes of optkern, and of the reference, against the copy)."""
    row = {"kind": "cuda", "case": case, "tensors": tensors, "n": n, "bytes": nbytes, "bound_bytes": bound_bytes,
           "optkern_s": optkern_s, "optkern_gbs": gbs(nbytes, optkern_s), "copy_gbs": copy_gbs,
           "raw_s": raw_s or {}, "targets": [], **extra}
    row["optkern_pct_copy"] = pct_of(row["optkern_gbs"], copy_gbs)
    bound_pct = [pct_of(gbs(bound_bytes, optkern_s), copy_gbs)]
    if ref_s is not None:
        row.update(ref_name=ref_name, ref_s=ref_s, ref_gbs=gbs(nbytes, ref_s), ratio=ref_s / optkern_s)
        row["ref_pct_copy"] = pct_of(row["ref_gbs"], copy_gbs)
        bound_pct.append(pct_of(gbs(bound_bytes, ref_s), copy_gbs))
    row["bound_pct_copy"] = max(bound_pct)
    noisy = row["bound_pct_copy"] > PHYSICAL_BOUND_PCT
    row["noisy"] = noisy
    if pct_target is not None:
        row["targets"].append(target(f">= {pct_target:g}% of copy", row["optkern_pct_copy"], pct_target, noisy=noisy))
    if ratio_target is not None and ref_s is not None:
        row["targets"].append(target(f">= {ratio_target:g}x {ref_name}", row["ratio"], ratio_target, noisy=noisy))
    return row


def to_float(v) -> float:
    """global_norm's result as a float: a Python number, or a one-element (device) array."""
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "get"):  # CuPy
        v = v.get()
    elif hasattr(v, "detach"):  # torch
        v = v.detach().cpu().numpy()
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size != 1:
        raise ValueError(f"expected one value, got {a.size}")
    return float(a[0])


def time_rounds(entries: dict, reps: int, warmup: int, rounds: int = 3) -> dict:
    """entries: name -> (fn, timer(fn, reps, warmup) -> [seconds]).  Each round times every entry in turn (a block
    of reps / rounds calls after its warm-up), so slow drift of clocks or load hits all alike.  -> name ->
    [seconds per call]."""
    out = {k: [] for k in entries}
    for r in range(rounds):
        n_r = reps // rounds + (1 if r < reps % rounds else 0)
        if n_r == 0:
            continue
        for k, (fn, timer) in entries.items():
            out[k].extend(timer(fn, n_r, warmup))
    return out


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def _fmt_n(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else f"{n:,}"


def markdown(results: dict) -> str:
    """The CUDA table: one line per row, every target with its figure and verdict, then host cost and errors."""
    meta, c = results["meta"], results.get("cuda", {})
    lines = [f"# optkern CUDA benchmark: {c.get('device_name', '?')}", "",
             f"optkern {meta.get('optkern_version')}, torch {meta.get('torch_version')} (CUDA "
             f"{c.get('torch_cuda_version')}, cuDNN {c.get('cudnn_version')}), CuPy {c.get('cupy_version')}, driver "
             f"{c.get('driver_version')}, runtime {c.get('runtime_version')}; {meta.get('date')}; medians of "
             f"{c.get('reps')} CUDA-event timings after {c.get('warmup')} warm-up calls, optkern and the reference "
             f"in the same run. Targets marked \"check:\" are agreement checks, not speed targets.", ""]
    if c.get("copy_gbs"):
        lines.append(f"Device-to-device copy at {_fmt_n(c['copy_n'])} float32: {c['copy_gbs']:.0f} GB/s counting read + "
                     f"write (" + ", ".join(f"{k} {v:.0f}" for k, v in c.get("copy_each_gbs", {}).items()) +
                     "; the faster is the reference).  GB/s from the minimal bytes; % copy = GB/s / the copy's; ratio "
                     "= reference time / optkern time; a row whose bytes touched once run above "
                     f"{PHYSICAL_BOUND_PCT:.0f}% of the copy is marked \"noisy, rerun\".")
        lines.append("")
    lines += ["| case | tensors | elements | optkern | GB/s | % copy | reference | ref GB/s | ratio | targets |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("rows", []):
        if r.get("kind") != "cuda":
            continue
        ref = f"{_fmt_s(r.get('ref_s'))} ({r.get('ref_name')})" if r.get("ref_s") is not None else "-"
        ref_gbs = f"{r['ref_gbs']:.0f}" if r.get("ref_gbs") is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        tg = "; ".join(f"{t['what']}: **{t['status']}** ({t['value']:.3g})" for t in r.get("targets", [])) or "-"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['case']}{note} | {r['tensors']} | {_fmt_n(r['n'])} | {_fmt_s(r['optkern_s'])} | "
                     f"{r['optkern_gbs']:.0f} | {r['optkern_pct_copy']:.0f}% | {ref} | {ref_gbs} | {ratio} | {tg} |")
    hc = results.get("host_cost")
    if hc:
        from .host_cost import markdown_table

        lines += ["", "Host time per step (the call's wall time, no synchronization: what the host spends; the "
                      "device runs behind), tensors of 16 float32 elements:", ""]
        lines += markdown_table(hc)
    errors = results.get("errors") or []
    if errors:
        lines += ["", "Sections that failed (see the log for the traceback):", ""]
        lines += [f"- {e['section']}: {e['error']}" for e in errors]
    all_t = [t for r in results.get("rows", []) for t in r.get("targets", [])] + (hc or {}).get("targets", [])
    lines += ["", f"targets: {sum(t['status'] == 'met' for t in all_t)} met, "
                  f"{sum(t['status'] == 'NOT met' for t in all_t)} NOT met, "
                  f"{sum(t['status'] == 'noisy, rerun' for t in all_t)} noisy (of {len(all_t)})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- sections
SIZES = {"big_n": BIG_N, "transformer": {"layers": 16}, "many": (1000, 4096), "lbfgs_n": LBFGS_N, "bn_shape": BN_SHAPE,
         "host_counts": (10, 100, 1000, 10000)}
QUICK_SIZES = {"big_n": QUICK_BIG_N, "transformer": {"layers": 2}, "many": (1000, 4096), "lbfgs_n": 1 << 20,
               "bn_shape": QUICK_BN_SHAPE, "host_counts": (10, 100)}


def wall_times(fn, reps, warmup) -> list:
    """Seconds per call by the host clock (the CPU stand-in for the CUDA-event timers)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class Ctx:
    """What every section needs: the array module xp (CuPy; NumPy for the CPU tests of this code), torch (None:
    no torch on that device), its device string, the timers (CUDA events on "cuda", the host clock on "cpu"),
    reps, sizes and, once the copy section ran, the copy's GB/s."""

    def __init__(self, xp, torch, *, device: str = "cuda", quick: bool = False, sizes: dict | None = None,
                 reps: int | None = None):
        self.xp, self.torch, self.device, self.quick = xp, torch, device, quick
        self.reps, self.warmup = (6, 2) if quick else (21, 3)
        if reps is not None:
            self.reps = reps
        self.sizes = {**(QUICK_SIZES if quick else SIZES), **(sizes or {})}
        self.copy_gbs, self.copy_info = None, {}

    def xp_timer(self, fn, reps, warmup):
        return cupy_event_times(self.xp, fn, reps, warmup) if self.device == "cuda" else wall_times(fn, reps, warmup)

    def torch_timer(self, fn, reps, warmup):
        if self.device == "cuda":
            return torch_event_times(self.torch, fn, reps, warmup)
        return wall_times(fn, reps, warmup)

    def randn(self, shapes, seed: int, scale: float = 1.0) -> list:
        """Standard normal float32 arrays of the given shapes (fresh data, never zeros), times scale, on xp's
        device; one generator for the whole list (creating a cuRAND generator per tensor costs milliseconds)."""
        if self.device == "cuda":
            rs = self.xp.random.RandomState(seed)
            out = [rs.standard_normal(s, dtype=self.xp.float32) for s in shapes]
        else:
            rng = np.random.default_rng(seed)
            out = [self.xp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
        return [a * self.xp.float32(scale) for a in out] if scale != 1.0 else out

    def memcpy(self, dst, src):
        """A plain device-to-device copy (cudaMemcpyAsync on the current stream)."""
        if self.device == "cuda":
            dst.data.copy_from_device_async(src.data, src.nbytes)
        else:
            np.copyto(dst, src)

    def sync(self):
        if self.device == "cuda":
            self.xp.cuda.Device().synchronize()
            if self.torch is not None:
                self.torch.cuda.synchronize()

    def free(self):
        if self.device == "cuda":
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()


def _torch_params(ctx, ps, gs):
    """torch copies (on ctx.device) of xp params, with grads."""
    out = []
    for p, g in zip(ps, gs):
        t = ctx.torch.as_tensor(p, device=ctx.device).clone()
        t.grad = ctx.torch.as_tensor(g, device=ctx.device).clone()
        out.append(t)
    return out


def _adam_row(ctx, case, shapes, *, pct_target=None, ratio_target=None, seed=0):
    xp = ctx.xp
    ps, gs = ctx.randn(shapes, seed), ctx.randn(shapes, seed + 1, 1e-2)
    ms, vs = [xp.zeros_like(x) for x in ps], [xp.zeros_like(x) for x in ps]
    t = [0]

    def ok():
        t[0] += 1
        optkern.adam_step(ps, gs, ms, vs, step=t[0], lr=1e-3)

    entries = {"optkern": (ok, ctx.xp_timer)}
    if ctx.torch is not None:
        topt = ctx.torch.optim.Adam(_torch_params(ctx, ps, gs), lr=1e-3, fused=True)
        entries["torch"] = (topt.step, ctx.torch_timer)
    raw = time_rounds(entries, ctx.reps, ctx.warmup)
    n = numel(shapes)
    row = make_row(case, tensors=len(shapes), n=n, nbytes=adam_bytes(n), bound_bytes=adam_bytes(n),
                   optkern_s=_median(raw["optkern"]), copy_gbs=ctx.copy_gbs,
                   ref_s=_median(raw["torch"]) if "torch" in raw else None, ref_name="torch fused",
                   ratio_target=ratio_target, pct_target=pct_target, raw_s=raw)
    return row


def section_copy_and_big_adam(ctx) -> list:
    """The copy's bandwidth (the reference of every "% copy"), then Adam on one tensor of the same size."""
    xp = ctx.xp
    n = ctx.sizes["big_n"]
    (src,) = ctx.randn([n], 1)
    dst = xp.empty_like(src)
    entries = {"cudaMemcpyAsync": (lambda: ctx.memcpy(dst, src), ctx.xp_timer),
               "copyto": (lambda: xp.copyto(dst, src), ctx.xp_timer)}
    raw = time_rounds(entries, ctx.reps, ctx.warmup)
    if not bool((dst == src).all()):
        raise RuntimeError("the device-to-device copy did not copy")
    each = {k: gbs(copy_bytes(n), _median(v)) for k, v in raw.items()}
    ctx.copy_gbs = max(each.values())
    ctx.copy_info = {"copy_n": n, "copy_gbs": ctx.copy_gbs, "copy_each_gbs": each}
    return [_adam_row(ctx, "Adam, one tensor", [(n,)], pct_target=ADAM_COPY_TARGET)]


def section_adam_lists(ctx) -> list:
    shapes, (count, size) = transformer_shapes(**ctx.sizes["transformer"]), ctx.sizes["many"]
    return [_adam_row(ctx, f"Adam, transformer-like ({len(shapes)} tensors)", shapes,
                      ratio_target=TRANSFORMER_TARGET, seed=10),
            _adam_row(ctx, f"Adam, {count} x {size}", many_shapes(count, size), ratio_target=MANY_TARGET, seed=20)]


def section_global_norm(ctx) -> list:
    xp, torch = ctx.xp, ctx.torch
    shapes = transformer_shapes(**ctx.sizes["transformer"])
    gs = ctx.randn(shapes, 30, 1e-2)
    entries = {"optkern": (lambda: optkern.global_norm(gs), ctx.xp_timer)}
    ref = None
    if torch is not None:
        tgs = [torch.as_tensor(g, device=ctx.device) for g in gs]

        def tnorm():  # clip_grad_norm_'s foreach path (torch.nn.utils.get_total_norm)
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tgs, 2.0)), 2.0)

        entries["torch"] = (tnorm, ctx.torch_timer)
        ref = float(tnorm().item())
    got = to_float(optkern.global_norm(gs))  # a float, or (after the device-result change) a one-element array
    exact = float(np.sqrt(sum(float((g.astype(xp.float64) ** 2).sum()) for g in gs)))
    raw = time_rounds(entries, ctx.reps, ctx.warmup)
    n = numel(shapes)
    row = make_row("global_norm, transformer-like grads", tensors=len(shapes), n=n, nbytes=norm_bytes(n),
                   bound_bytes=norm_bytes(n), optkern_s=_median(raw["optkern"]), copy_gbs=ctx.copy_gbs,
                   ref_s=_median(raw["torch"]) if "torch" in raw else None, ref_name="torch foreach norm",
                   raw_s=raw, norm=got, norm_float64=exact, norm_torch=ref, rel_diff=abs(got - exact) / exact)
    # a check, not a speed target: the norm accumulates in float64, so it matches the float64 norm closely
    row["targets"].append(target(f"check: rel. error vs float64 norm <= {NORM_TOL:g}", row["rel_diff"], NORM_TOL,
                                 higher=False))
    return [row]


def section_lbfgs(ctx) -> list:
    from . import lbfgs as lbfgs_bench

    n = ctx.sizes["lbfgs_n"]
    r = lbfgs_bench.bench_direction_device(ctx.xp, ctx.torch, ctx.device, n, LBFGS_M, np.float32, ctx.reps,
                                           ctx.warmup, ctx.xp_timer, ctx.torch_timer, torch_only_ratio=True,
                                           ratio_target=LBFGS_TARGET)
    ctx.free()
    nbytes, bound = lbfgs_bytes(n, LBFGS_M)
    rel = r.get("rel_diff_vs_torch")
    row = make_row(f"L-BFGS direction, m={LBFGS_M}", tensors=2 * LBFGS_M + 1, n=n, nbytes=nbytes, bound_bytes=bound,
                   optkern_s=r["optkern_s"], copy_gbs=ctx.copy_gbs, ref_s=r.get("torch_s"),
                   ref_name="torch two-loop", ratio_target=LBFGS_TARGET, raw_s=r["raw_s"],
                   after_push_s=r["after_push_s"], rel_diff_vs_torch=rel,
                   note=f"after a push {_fmt_s(r['after_push_s'])}")
    if rel is not None:  # a check: both compute the same direction (float32 sums over 2^24 elements)
        row["targets"].append(target(f"check: norm(d - d_torch) / norm(d_torch) <= {LBFGS_TOL:g}", rel, LBFGS_TOL,
                                     higher=False))
    return [row]


def section_batch_norm(ctx) -> list:
    from . import batch_norm as bn_bench

    shape = ctx.sizes["bn_shape"]
    rows = []
    for label, layout in ((f"NCHW {shape}", "nchw"), ("channels-last", "nhwc")):
        r = bn_bench.device_case(ctx.xp, ctx.torch, label, shape, layout, ctx.reps, ctx.warmup, ctx.xp_timer,
                                 ctx.torch_timer, device=ctx.device)
        ctx.free()
        nbytes, bound = bn_bytes(r["n"])
        rows.append(make_row(f"batch norm fwd+bwd train, {label}", tensors=1, n=r["n"], nbytes=nbytes,
                             bound_bytes=bound, optkern_s=r["optkern_s"], copy_gbs=ctx.copy_gbs,
                             ref_s=r.get("torch_s"), ref_name="torch (cuDNN)" if ctx.device == "cuda" else "torch",
                             ratio_target=BN_TARGET, raw_s=r["raw_s"]))
    return rows


def section_host_cost(ctx) -> dict:
    from . import host_cost

    return host_cost.run_on(ctx.torch, ctx.xp, ctx.device, ctx.sizes["host_counts"], ctx.reps, ctx.warmup,
                            ctx.sync if ctx.device == "cuda" else None)


# in order of value: what the targets are about first, so a run cut off loses the least
SECTIONS = {"copy + Adam 2^28": section_copy_and_big_adam, "Adam lists": section_adam_lists,
            "global_norm": section_global_norm, "host cost": section_host_cost,
            "L-BFGS direction": section_lbfgs, "batch norm": section_batch_norm}
SUITES = {"all": tuple(SECTIONS), "optim": ("copy + Adam 2^28", "Adam lists", "global_norm", "host cost"),
          "batch_norm": ("copy + Adam 2^28", "batch norm"), "lbfgs": ("copy + Adam 2^28", "L-BFGS direction")}


def write(results: dict, out: Path) -> Path:
    """bench_cuda.json / .md and gpu_<device>.md under out (rewritten after every section: a run cut off keeps
    what it measured).  -> the gpu_<device>.md path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cuda.json").write_text(json.dumps(results, indent=1, default=float))
    md = markdown(results)
    (out / "bench_cuda.md").write_text(md)
    path = out / f"gpu_{device_slug(results.get('cuda', {}).get('device_name', 'gpu'))}.md"
    path.write_text(md)
    return path


def run_sections(ctx, results: dict, out: Path, suite: str = "all", log=sys.stderr) -> Path:
    """The sections of ``suite`` in order into results (rows, host_cost, errors), results written after each.  A
    section that raises is recorded in results["errors"] with its traceback printed, and the next one runs."""
    results.setdefault("rows", [])
    results.setdefault("errors", [])
    results.setdefault("cuda", {})
    path = write(results, out)
    for name in SUITES[suite]:
        t0 = time.perf_counter()
        print(f"[cuda bench] {name} ...", file=log, flush=True)
        try:
            if ctx.copy_gbs is None and name != "copy + Adam 2^28" and name != "host cost":
                raise RuntimeError("no copy bandwidth to compare with (the copy section failed)")
            got = SECTIONS[name](ctx)
            if name == "host cost":
                results["host_cost"] = got
            else:
                results["rows"].extend(got)
            if name == "copy + Adam 2^28":
                results["cuda"].update(ctx.copy_info)
        except Exception as e:  # noqa: BLE001 - recorded, printed and turned into the exit status
            traceback.print_exc(file=log)
            results["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"})
        ctx.free()  # the section's arrays are gone: hand their memory back before the next one
        print(f"[cuda bench] {name}: {time.perf_counter() - t0:.1f} s", file=log, flush=True)
        path = write(results, out)
    return path


def _versions(cp, torch) -> dict:
    v = {"cupy_version": cp.__version__,
         "runtime_version": cp.cuda.runtime.runtimeGetVersion(), "driver_version": cp.cuda.runtime.driverGetVersion(),
         "device_name": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(errors="replace")}
    if torch is not None:
        v.update(torch_cuda_version=torch.version.cuda, cudnn_version=torch.backends.cudnn.version(),
                 cudnn_enabled=bool(torch.backends.cudnn.enabled))
    return v


def run(args, results: dict) -> int:
    """The CUDA suite (CuPy arrays, torch CUDA tensors) written to args.out.  -> exit status: 0, 1 when a section
    failed, 2 when there is no CUDA device, CuPy or CUDA build (nothing measured)."""
    if not optkern.cuda_available():
        print("--device cuda: optkern was built without CUDA kernels or no CUDA device is present", file=sys.stderr)
        return 2
    try:
        import cupy as cp
    except ImportError as e:
        print(f"--device cuda: CuPy is not importable ({e})", file=sys.stderr)
        return 2
    try:
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: torch has no CUDA: optkern rows only, no ratios", file=sys.stderr)
            torch = None
    except ImportError:
        torch = None
    ctx = Ctx(cp, torch, device="cuda", quick=args.quick, reps=args.reps)
    results["cuda"] = {**_versions(cp, torch), "reps": ctx.reps, "warmup": ctx.warmup, "torch_cuda": torch is not None}
    out = Path(args.out)
    path = run_sections(ctx, results, out, getattr(args, "suite", "all"))
    print(markdown(results))
    print(f"wrote {out / 'bench_cuda.json'}, {out / 'bench_cuda.md'}, {path}")
    return 1 if results["errors"] else 0
