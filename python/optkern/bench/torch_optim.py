"""Benchmark of the PyTorch front end: ``optkern.torch`` optimizers against ``torch.optim`` in the same run.

    python -m optkern.bench.torch_optim --reps 15 [--threads 2] [--out bench/results]

Cases (float32, CPU, ``torch.set_num_threads`` = ``optkern.set_num_threads`` = --threads):

* a ResNet-50-like parameter list (161 tensors, 25.6M elements: 53 convolutions, 53 batch norms' weight and bias,
  the classifier) and a GPT-2-small-like list (148 tensors, 124M elements);
* per-step time of ``opt.step()`` (grads already in ``p.grad``) against torch's fused kernel where torch has one
  (Adam, AdamW, SGD with momentum, Adagrad: ``fused=True``) and its foreach path otherwise; target >= 1.0x fused,
  >= 3x foreach;
* host overhead: the whole AdamW step on 161 one-element tensors, the ResNet list's tensor count (the host work
  per step grows with the tensor count, not their sizes); target <= 30 us.
* effective GB/s from the minimal bytes (every param, grad and state element read once, params and state written
  once) and % of an in-place add (``a += b``, the faster of torch's and NumPy's) over the same element count,
  measured in the same run.

Medians of interleaved blocks (``optkern.bench.runner.time_interleaved``).  Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import optkern

from .runner import _median, cpu_model, time_interleaved
from .torch_nn import cpu_tag

# state tensors per param (the minimal traffic: param r+w, grad r, each state r+w)
_STATES = {"SGD": 1, "Adam": 2, "AdamW": 2, "Adagrad": 1, "RMSprop": 1, "Adamax": 2, "NAdam": 2, "Adadelta": 2,
           "Rprop": 2}
_FUSED = ("Adam", "AdamW", "SGD", "Adagrad")
_KW = {"SGD": dict(lr=0.01, momentum=0.9), "Adagrad": dict(lr=0.01)}


def resnet50_shapes() -> list:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 elements)."""
    shapes = []

    def conv_bn(cin, cout, k):
        shapes.append((cout, cin, k, k))
        shapes.extend([(cout,), (cout,)])

    conv_bn(3, 64, 7)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            conv_bn(cin, width, 1)
            conv_bn(width, width, 3)
            conv_bn(width, width * 4, 1)
            if b == 0:
                conv_bn(cin, width * 4, 1)  # the downsampling shortcut
            cin = width * 4
    shapes.extend([(1000, 2048), (1000,)])
    return shapes


def gpt2_small_shapes() -> list:
    """The 148 parameter shapes of GPT-2 small (124,439,808 elements; the LM head is tied to wte)."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _params(torch, shapes, seed, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.05)
        if channels_last and len(s) == 4:  # conv weights as a channels_last model holds them
            p = torch.nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last))
        gr = torch.randn(p.shape, generator=g) * 1e-3
        p.grad = gr.contiguous(memory_format=torch.channels_last) if channels_last and len(s) == 4 else gr
        ps.append(p)
    return ps


def _pair(torch, okt, name, shapes, torch_impl):
    """(optkern step, torch step, elements) on independent copies of the same params and grads."""
    kw = _KW.get(name, {})
    a, b = _params(torch, shapes, 1), _params(torch, shapes, 1)
    oa = getattr(okt, name)(a, **kw)
    ob = getattr(torch.optim, name)(b, **kw, **{torch_impl: True})
    oa.step()
    ob.step()
    return oa.step, ob.step, sum(p.numel() for p in a), oa


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="ResNet list only, AdamW and SGD, 3 reps")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="", help="comma-separated model/algo filters, e.g. gpt2_small,resnet50/Adam")
    args = ap.parse_args(argv)
    import torch

    import optkern.torch as okt

    torch.set_num_threads(args.threads)
    optkern.set_num_threads(args.threads)
    reps = 3 if args.quick else args.reps
    names = ["AdamW", "SGD"] if args.quick else ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adamax", "NAdam",
                                                   "Adadelta", "Rprop"]
    rows, raw = [], {}
    resnet, gpt2 = resnet50_shapes(), gpt2_small_shapes()
    cases = [("resnet50", resnet, n) for n in names]
    if not args.quick:
        cases.append(("gpt2_small", gpt2, "AdamW"))
    if args.only:
        keep = args.only.split(",")
        cases = [c for c in cases if c[0] in keep or f"{c[0]}/{c[2]}" in keep]
    for model, shapes, name in cases:
        impl = "fused" if name in _FUSED else "foreach"
        ok, tt, numel, oa = _pair(torch, okt, name, shapes, impl)
        # the in-place add over the same element count, in the same run
        xa, xb = torch.ones(numel), torch.full((numel,), 1e-7)
        na, nb = np.ones(numel, np.float32), np.full(numel, 1e-7, np.float32)
        t = time_interleaved({"optkern": ok, "torch": tt, "torch_add": lambda: xa.add_(xb),
                              "numpy_add": lambda: np.add(na, nb, out=na)}, reps, 2)
        med = {k: _median(v) for k, v in t.items()}
        nbytes = 4 * numel * (3 + 2 * _STATES[name])
        add_gbs = 12 * numel / min(med["torch_add"], med["numpy_add"]) / 1e9  # the faster in-place add
        gbs = nbytes / med["optkern"] / 1e9
        ratio = med["torch"] / med["optkern"]
        target = 1.0 if impl == "fused" else 3.0
        row = dict(model=model, algo=name, tensors=len(shapes), elements=numel, optkern_s=med["optkern"],
                   torch_s=med["torch"], torch_impl=impl, ratio=ratio, target=target, met=ratio >= target,
                   gbs=gbs, add_gbs=add_gbs, pct_add=100 * gbs / add_gbs)
        rows.append(row)
        raw[f"{model}/{name}"] = t
        print(f"{model:10s} {name:8s} optkern {med['optkern'] * 1e3:8.2f} ms  torch {impl:7s} "
              f"{med['torch'] * 1e3:8.2f} ms  {ratio:5.2f}x (target {target:.0f}x) {100 * gbs / add_gbs:4.0f}% of add"
              , flush=True)
        del ok, tt, oa, xa, xb, na, nb
    # the whole step on 161 one-element tensors (host work only)
    tiny = [(1,)] * 161
    ok, tt, _, _ = _pair(torch, okt, "AdamW", tiny, "fused")
    t = time_interleaved({"optkern": ok, "torch": tt}, max(reps, 5) * 20, 20)
    tiny_row = {k: _median(v) for k, v in t.items()}
    print(f"161 one-element tensors, AdamW: optkern {tiny_row['optkern'] * 1e6:.1f} us, torch fused "
          f"{tiny_row['torch'] * 1e6:.1f} us")
    meta = dict(cpu_model=cpu_model(), threads=args.threads, reps=reps, optkern_cpu_isa=optkern.cpu_isa(),
                torch_version=torch.__version__, command="python -m optkern.bench.torch_optim " + " ".join(
                    argv if argv is not None else sys.argv[1:]))
    md = markdown(meta, rows, tiny_row)
    print(md)
    out = Path(args.out)
    if out.is_dir():
        stem = f"cpu_{cpu_tag()}_{args.threads}threads_torch_optim"
        (out / f"{stem}.md").write_text(md)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows, tiny=tiny_row, raw_s=raw), indent=1))
        print(f"wrote {out / stem}.md/.json")
    return 0


def markdown(meta, rows, tiny) -> str:
    lines = [f"# optkern.torch optimizers vs torch.optim ({meta['cpu_model']}, {meta['threads']} threads, float32)", "",
             f"`{meta['command']}`; torch {meta['torch_version']}, optkern CPU path {meta['optkern_cpu_isa']}, "
             f"medians of {meta['reps']} interleaved repetitions. Ratio = torch time / optkern time. "
             "% of add: effective GB/s (params and state read and written once, grads read once) against an in-place "
             "add over the same element count in the same run.", "",
             "| model | algorithm | tensors | elements | optkern | torch | ratio | target | % of add |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['algo']} | {r['tensors']} | {r['elements'] / 1e6:.1f}M | "
                     f"{r['optkern_s'] * 1e3:.2f} ms | {r['torch_s'] * 1e3:.2f} ms ({r['torch_impl']}) | "
                     f"{r['ratio']:.2f}x | >= {r['target']:.0f}x: {'met' if r['met'] else 'not met'} | "
                     f"{r['pct_add']:.0f}% |")
    met = "met" if tiny["optkern"] <= 30e-6 else "not met"
    lines += ["", f"Host overhead: one AdamW step over 161 one-element tensors (the ResNet-50 list's tensor count, so "
                  f"the same per-tensor host work with almost no memory traffic): optkern {tiny['optkern'] * 1e6:.1f} "
                  f"us (target <= 30 us: {met}), torch fused {tiny['torch'] * 1e6:.1f} us "
                  f"({tiny['torch'] / tiny['optkern']:.1f}x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
