"""``python -m optkern.bench.torch_nn``: optkern.torch.nn.BatchNorm2d against torch.nn.BatchNorm2d, as modules.

One training step of the layer, with autograd's overhead included: ``y = m(x); y.backward(dy)`` on
(32, 64, 56, 56) float32, in NCHW and in torch's channels_last, 2 threads for both libraries.  The gradients are
cleared (set to None) before each call for both, so neither times an accumulation into an old ``.grad``.  For
reference the same step through optkern's raw kernels (``batch_norm_forward`` + ``batch_norm_backward`` under
``torch.no_grad()``, no autograd) is timed in the same rounds.  Repetitions of the three are interleaved in
blocks (:func:`optkern.bench.runner.time_interleaved`); medians.  Target: torch / optkern >= 2.5x.

Writes ``<out>/cpu_<tag>_<threads>threads_torch_nn.md`` and ``.json`` (default out: bench/results; the tag is
derived from the CPU model, ``--tag`` overrides it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

import optkern

from .runner import _fmt_time, _median, cpu_model, metadata, time_interleaved

SHAPE = (32, 64, 56, 56)
QUICK_SHAPE = (8, 64, 28, 28)
TARGET = 2.5  # torch time / optkern time


def cpu_tag() -> str:
    """A short file-name tag for this CPU: the model's first word after the vendor ("epyc", "xeon"), with AMD's
    Zen generation where /proc/cpuinfo's family and model tell it (the name of bench/results' other files)."""
    words = [w for w in re.split(r"[^a-z0-9-]+", cpu_model().lower())
             if w and w not in ("amd", "intel", "r", "tm", "cpu", "processor", "genuine", "core")]
    tag = words[0] if words else "cpu"
    fam = mod = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu family"):
                    fam = int(line.split(":")[1])
                elif line.startswith("model") and not line.startswith("model name"):
                    mod = int(line.split(":")[1])
                if fam is not None and mod is not None:
                    break
    except (OSError, ValueError):
        pass
    if "amd" in cpu_model().lower() and fam == 25 and mod is not None:
        tag += "_zen4" if 0x10 <= mod <= 0x1F or 0x60 <= mod <= 0x7F or 0xA0 <= mod <= 0xAF else "_zen3"
    return tag


def bench_layout(torch, layout: str, shape, reps: int, warmup: int) -> dict:
    import optkern.torch.nn as onn

    C = shape[1]
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    ref = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=gen)
        ref.bias.normal_(generator=gen)
    ours = onn.BatchNorm2d(C)
    ours.load_state_dict(ref.state_dict())

    def step(m):
        def fn():
            x.grad = None
            m.weight.grad = m.bias.grad = None
            y = m(x)
            y.backward(dy)
        return fn

    w, b = ours.weight.detach(), ours.bias.detach()
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()

    def raw():
        with torch.no_grad():
            _, sm, si = optkern.batch_norm_forward(x, w, b, rm, rv)
            optkern.batch_norm_backward(dy, x, w, sm, si)

    # the module timed is the module that is right: one step each, compared before timing
    step(ref)()
    g_ref = (x.grad.clone(), ref.weight.grad.clone())
    step(ours)()
    g_ours = (x.grad.clone(), ours.weight.grad.clone())
    for a, r in zip(g_ours, g_ref):
        e = float((a - r).abs().max() / r.abs().max())
        if not e <= 1e-4:
            raise AssertionError(f"{layout}: optkern's gradient differs from torch's by {e:.3g}")
    if x.grad.stride() != x.stride():
        raise AssertionError(f"{layout}: dx not in x's layout")

    t = time_interleaved({"optkern": step(ours), "torch": step(ref), "optkern_raw": raw}, reps, warmup)
    t_ok, t_t, t_raw = _median(t["optkern"]), _median(t["torch"]), _median(t["optkern_raw"])
    ratio = t_t / t_ok
    return {"case": f"BatchNorm2d fwd+bwd train, {'NCHW' if layout == 'nchw' else 'channels_last'} {tuple(shape)}",
            "layout": layout, "shape": list(shape), "n": int(np.prod(shape)), "raw_s": t, "optkern_s": t_ok,
            "torch_s": t_t, "optkern_raw_s": t_raw, "ratio": ratio, "autograd_overhead_s": t_ok - t_raw,
            "targets": [{"what": f"torch/optkern >= {TARGET}x", "value": ratio, "met": ratio >= TARGET}]}


def markdown(results: dict) -> str:
    meta = results["meta"]
    title = (f"optkern {meta['optkern_version']} ({meta['optkern_cpu_isa']}) vs torch {meta['torch_version']}, "
             f"{meta['cpu_model']}, {meta['threads']} threads, float32, training, medians of {meta['reps']} "
             "interleaved reps")
    how = (f"`{meta['command']}`: one step of the layer as a module, `y = m(x); y.backward(dy)` (autograd "
           "included, grads set to None before each call); \"optkern raw\" is the same step through "
           "`optkern.batch_norm_forward` + `batch_norm_backward` without autograd, in the same rounds.")
    load = ""
    if meta.get("loadavg_start") and meta.get("loadavg_end"):
        load = (f" Load average (1 min): {meta['loadavg_start'][0]:.2f} before the run, {meta['loadavg_end'][0]:.2f} "
                f"at its end (this run included), on {meta['cpu_count']} CPUs.")
    lines = [title, "", how + load, "",
             "| case | optkern.torch.nn | torch.nn | torch/optkern | optkern raw kernels | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        t = r["targets"][0]
        lines.append(f"| {r['case']} | {_fmt_time(r['optkern_s'])} | {_fmt_time(r['torch_s'])} | "
                     f"{r['ratio']:.2f}x | {_fmt_time(r['optkern_raw_s'])} | {t['what']} | "
                     f"{'met' if t['met'] else '**NOT met**'} |")
    met = sum(r["targets"][0]["met"] for r in results["rows"])
    lines += ["", f"targets met: {met} / {len(results['rows'])}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m optkern.bench.torch_nn", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per case (default 15)")
    ap.add_argument("--threads", type=int, default=2, help="threads for optkern and torch (default 2)")
    ap.add_argument("--quick", action="store_true", help=f"a small shape {QUICK_SHAPE}, smoke run")
    ap.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    ap.add_argument("--tag", default=None, help="CPU tag in the file name (default: from the CPU model)")
    return ap


def run(args) -> dict:
    import torch

    if args.reps < 1 or args.threads < 1:
        raise SystemExit("--reps and --threads: expected integers >= 1")
    optkern.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    args.device = "cpu"
    meta = metadata(args, torch)
    meta["command"] = "python -m optkern.bench.torch_nn " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python -m optkern.bench.torch_nn"
    t0 = time.perf_counter()
    shape = QUICK_SHAPE if args.quick else SHAPE
    rows = [bench_layout(torch, layout, shape, args.reps, 1 if args.quick else 2) for layout in ("nchw", "channels_last")]
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"meta": meta, "rows": rows}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    md = markdown(results)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu_{args.tag or cpu_tag()}_{args.threads}threads_torch_nn" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text(md + "\n")
    with open(out / f"{stem}.json", "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"\nwrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
