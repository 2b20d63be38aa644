"""Batch-norm cases of ``python -m optkern.bench``: optkern vs torch's CPU kernels vs the in-place-add roofline.

Shapes (float32): (1024, 512), NCHW (32, 64, 56, 56), and the same in channels-last (optkern: an NHWC array with
``axis=-1``; torch: the NCHW tensor in ``torch.channels_last`` memory format, its native channels-last kernel).
Ops: forward in training (statistics + running-stat update + y), forward in eval, backward in training.

* torch forward: ``torch.nn.functional.batch_norm`` on tensors that do not require grad; torch backward:
  ``torch.ops.aten.native_batch_norm_backward``, the kernel autograd calls, without autograd's bookkeeping.
* Minimal bytes, as the issue counts them: forward training reads x twice and writes y (3 passes), eval reads x
  once and writes y (2), backward training reads x and dy twice each and writes dx (5).  GB/s = bytes / time.
* Roofline: the faster of NumPy's and torch's in-place add at the same element count (12 B per element), timed
  round-robin with each case so that both see the same background load.
"""

from __future__ import annotations

import gc

import numpy as np

import optkern

from .runner import F32, _median, add_probe, bracketed, roofline_fns, time_interleaved

ROOFLINE_TARGET = 80.0
RATIO_TARGET = 1.0  # faster than torch

SHAPES = [
    ("(1024, 512)", (1024, 512), "rows"),
    ("NCHW (32, 64, 56, 56)", (32, 64, 56, 56), "nchw"),
    ("NHWC (32, 56, 56, 64)", (32, 64, 56, 56), "nhwc"),
]
QUICK_SHAPES = [
    ("(256, 512)", (256, 512), "rows"),
    ("NCHW (8, 64, 28, 28)", (8, 64, 28, 28), "nchw"),
    ("NHWC (8, 28, 28, 64)", (8, 64, 28, 28), "nhwc"),
]
PASSES = {"forward train": 3, "forward eval": 2, "backward train": 5}


def _case_arrays(shape, layout, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x_nchw = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy_nchw = rng.standard_normal(shape, dtype=np.float32)
    if layout == "nhwc":
        x = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy_nchw, 1, -1))
        axis = -1
    else:
        x, dy, axis = x_nchw, dy_nchw, 1
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, dy, w, b, axis


def bench_case(torch, label, shape, layout, op, reps, warmup):
    x, dy, w, b, axis = _case_arrays(shape, layout)
    C, n = shape[1], x.size
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = np.empty_like(x)
    _, sm, si = optkern.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), axis=axis)
    dx = np.empty_like(x)
    if op == "forward train":
        fn = lambda: optkern.batch_norm_forward(x, w, b, rm, rv, momentum=0.1, axis=axis, out=y)
    elif op == "forward eval":
        fn = lambda: optkern.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis, out=y)
    else:
        fn = lambda: optkern.batch_norm_backward(dy, x, w, sm, si, axis=axis, out=dx)
    fns = {"optkern": fn}
    if torch is not None:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        tx = torch.from_numpy(np.moveaxis(x, -1, 1) if layout == "nhwc" else x)  # a view: NCHW shape, NHWC memory
        tdy = torch.from_numpy(np.moveaxis(dy, -1, 1) if layout == "nhwc" else dy)
        assert tx.is_contiguous(memory_format=fmt)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.zeros(C), torch.ones(C)
        F = torch.nn.functional
        if op == "forward train":
            fns["torch"] = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=1e-5)
        elif op == "forward eval":
            fns["torch"] = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=False, eps=1e-5)
        else:
            _, tsm, tsi = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
            bw = torch.ops.aten.native_batch_norm_backward
            fns["torch"] = lambda: bw(tdy, tx, tw, trm, trv, tsm, tsi, True, 1e-5, [True, True, True])
    for k, f in roofline_fns(torch, n).items():
        fns["roof_" + k] = f
    raw = time_interleaved(fns, reps, warmup)
    roof = max(12 * n / _median(v) / 1e9 for k, v in raw.items() if k.startswith("roof_"))
    t_ok = _median(raw["optkern"])
    nbytes = PASSES[op] * F32 * n
    row = {"kind": "batch_norm", "case": f"batch norm {op}, {label}" + (" [torch channels_last]" if layout == "nhwc" else ""),
           "op": op, "shape": list(shape), "layout": layout, "n": n, "bytes": nbytes, "raw_s": raw,
           "optkern_s": t_ok, "optkern_gbs": nbytes / t_ok / 1e9, "roofline_gbs": roof,
           "optkern_pct_roofline": 100.0 * nbytes / t_ok / 1e9 / roof, "torch_path": "aten" if torch else None}
    row["targets"] = [{"what": f">= {ROOFLINE_TARGET:.0f}% of roofline ({PASSES[op]} passes)",
                       "value": row["optkern_pct_roofline"], "met": row["optkern_pct_roofline"] >= ROOFLINE_TARGET}]
    if "torch" in raw:
        t_t = _median(raw["torch"])
        row.update(torch_s=t_t, ratio=t_t / t_ok, torch_gbs=nbytes / t_t / 1e9)
        row["targets"].append({"what": "faster than torch", "value": row["ratio"], "met": row["ratio"] > RATIO_TARGET})
    del fns
    gc.collect()
    return row


def run_cpu(torch, quick: bool, reps: int, warmup: int, bar=None) -> list:
    rows = []
    for label, shape, layout in (QUICK_SHAPES if quick else SHAPES):
        n = int(np.prod(shape))
        probe = add_probe(roofline_fns(torch, n), 12 * n)
        for op in PASSES:
            if bar is not None:
                bar.set(f"batch norm {op} {label}")
            rows.append(bracketed(probe, lambda: bench_case(torch, label, shape, layout, op, reps, warmup)))
            if bar is not None:
                bar.update()
    return rows


def num_cases(quick: bool) -> int:
    return len(QUICK_SHAPES if quick else SHAPES) * len(PASSES)


def device_case(cp, torch, label, shape, layout, reps, warmup, cp_time, torch_time, device="cuda") -> dict:
    """Forward + backward in training with optkern on cp's arrays (CuPy; NumPy in the CPU tests of this code)
    against torch on ``device`` (None: optkern only), timed by cp_time / torch_time(fn, reps, warmup)."""
    xh, dyh, wh, bh, axis = _case_arrays(shape, layout)
    x, dy, w, b = (cp.asarray(a) for a in (xh, dyh, wh, bh))
    C = shape[1]
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    y, dx = cp.empty_like(x), cp.empty_like(x)

    def ok():
        _, sm, si = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis, out=y)
        optkern.batch_norm_backward(dy, x, w, sm, si, axis=axis, out=dx)

    n = xh.size
    nbytes = 8 * F32 * n  # forward 3 passes + backward 5
    fns = {"optkern": (ok, cp_time)}
    if torch is not None:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        tx = torch.as_tensor(np.moveaxis(xh, -1, 1) if layout == "nhwc" else xh, device=device)
        tx = tx.contiguous(memory_format=fmt).requires_grad_(True)
        tdy = torch.as_tensor(np.moveaxis(dyh, -1, 1) if layout == "nhwc" else dyh, device=device)
        tdy = tdy.contiguous(memory_format=fmt)
        tw = torch.as_tensor(wh, device=device).requires_grad_(True)
        tb = torch.as_tensor(bh, device=device).requires_grad_(True)
        trm, trv = torch.zeros(C, device=device), torch.ones(C, device=device)

        def tt():
            out = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True)
            torch.autograd.grad(out, (tx, tw, tb), tdy)

        fns["torch"] = (tt, torch_time)
    raw = {k: [] for k in fns}
    for r in range(3):  # alternating blocks of optkern and torch
        for k, (fn, timer) in fns.items():
            raw[k].extend(timer(fn, reps // 3 + (1 if r < reps % 3 else 0), warmup))
    t_ok = _median(raw["optkern"])
    row = {"kind": "cuda", "case": f"{device.upper()} batch norm fwd+bwd train, {label}", "n": n, "bytes": nbytes,
           "raw_s": raw, "optkern_s": t_ok, "optkern_gbs": nbytes / t_ok / 1e9}
    if torch is not None:
        t_t = _median(raw["torch"])
        row.update(torch_s=t_t, torch_path="cuDNN/aten", ratio=t_t / t_ok)
        row["targets"] = [{"what": ">= 1x torch (CUDA)", "value": row["ratio"], "met": row["ratio"] >= 1.0}]
    return row
