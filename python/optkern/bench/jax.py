"""Benchmark of optkern.jax: a jitted training step's optimizer update against optax in the same run.

    python -m optkern.bench.jax [--reps 15] [--threads 2] [--log2n 24] [--out bench/results]

Cases (float32, CPU; optkern.set_num_threads(--threads); XLA's CPU client uses its own thread pool over the
machine's cores):

* Adam and SGD with momentum over 2^24 params as one array and as 200 arrays of the same total;
* every variant runs --steps-per-call steps in one jitted ``lax.fori_loop`` (params and state donated), timed
  per step, so that jax's per-call dispatch (milliseconds for 800 arguments) does not hide the update's cost;
* ``optkern fused``: ``optkern.jax.apply(tx, g, s, p)`` -- one custom call, params and state updated in place;
* ``optax``: ``jax.jit(lambda p, s, g: (optax.apply_updates(p, u), s) for u, s = tx.update(g, s, p))``, params
  and state donated too (XLA fuses optax's element-wise graph per leaf);
* ``optkern optax-API``: the same optax-style step with ``tx = optkern.jax.adam(...)``: update() returns
  new - p (XLA copies params for the aliased call, then two more passes);
* effective GB/s from the minimal traffic (param r+w, grad r, each state r+w: Adam 28 B, SGD-momentum 20 B per
  element) and % of an in-place add (the fastest of NumPy's ``np.add(a, b, out=a)``, a donated jitted ``a + b``
  -- both one thread here -- and, when torch is installed, torch's ``a.add_(b)`` on --threads threads: 12 B per
  element) timed in the same interleaved blocks; ratio = optax time / optkern time.

Medians of interleaved blocks (``optkern.bench.runner.time_interleaved``).  Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import optkern

try:
    import torch
except ImportError:  # the roofline is then NumPy's and XLA's one-thread adds only
    torch = None

from .runner import _median, cpu_model, time_interleaved

BYTES = {"Adam": 28, "SGD-momentum": 20}


def _sizes(total: int, count: int) -> list:
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def _looped(step, k: int):
    """k steps in one jitted call (lax.fori_loop), params and state donated: the update's cost without jax's
    per-call dispatch (a few ms for hundreds of arguments on this machine, the same for every variant)."""
    import jax

    def run(p, s, g):
        return jax.lax.fori_loop(0, k, lambda i, c: step(c[0], c[1], g), (p, s))

    return jax.jit(run, donate_argnums=(0, 1))


def _stepper(fn, p, s, g):
    """A closure running the donated jitted step, carrying (params, state) from call to call."""
    import jax

    box = {"p": p, "s": s}

    def run():
        box["p"], box["s"] = fn(box["p"], box["s"], g)
        jax.block_until_ready(box["p"])

    return run


def bench_case(algo: str, sizes: list, reps: int, warmup: int, k: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import optkern.jax as okj

    rng = np.random.default_rng(0)
    make = {"Adam": (lambda m: m.adam(1e-3)), "SGD-momentum": (lambda m: m.sgd(1e-3, momentum=0.9))}[algo]

    def tree(scale):
        return [jnp.asarray(scale * rng.standard_normal(n, dtype=np.float32)) for n in sizes]

    g = tree(1e-3)
    fns = {}
    tx_ok, tx_optax = make(okj), make(optax)

    def optax_style(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        return _looped(step, k)

    fused = _looped(lambda p, s, g: okj.apply(tx_ok, g, s, p), k)
    p = tree(1.0)
    fns["optkern fused"] = _stepper(fused, p, tx_ok.init(p), g)
    p = tree(1.0)
    fns["optax"] = _stepper(optax_style(tx_optax), p, tx_optax.init(p), g)
    p = tree(1.0)
    fns["optkern optax-API"] = _stepper(optax_style(tx_ok), p, tx_ok.init(p), g)
    # the roofline: in-place adds over the same element count
    n = sum(sizes)
    a, b = np.ones(n, np.float32), np.full(n, 1e-7, np.float32)
    fns["roof numpy add"] = lambda: np.add(a, b, out=a)
    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    xa = {"a": jnp.ones(n, jnp.float32)}
    xb = jnp.full(n, 1e-7, jnp.float32)

    def xla_add():
        xa["a"] = add(xa["a"], xb)
        xa["a"].block_until_ready()

    fns["roof xla add"] = xla_add
    if torch is not None:  # torch's add_ runs on --threads threads (NumPy's and, here, XLA's add on one)
        ta, tb = torch.ones(n), torch.full((n,), 1e-7)
        fns["roof torch add_"] = lambda: ta.add_(tb)
    raw = time_interleaved(fns, reps, warmup)
    med = {name: _median(v) / (1 if name.startswith("roof") else k) for name, v in raw.items()}
    roof_gbs = max(12 * n / med[k] / 1e9 for k in med if k.startswith("roof"))
    rows = {}
    for name in ("optkern fused", "optax", "optkern optax-API"):
        gbs = BYTES[algo] * n / med[name] / 1e9
        rows[name] = {"median_s": med[name], "gbs": gbs, "pct_roofline": 100 * gbs / roof_gbs,
                      "ratio_vs_optax": med["optax"] / med[name]}
    return {"algo": algo, "arrays": len(sizes), "n": n, "bytes_per_element": BYTES[algo], "rows": rows,
            "roofline_gbs": roof_gbs, "median_s": med, "raw_s": raw}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--algos", default="Adam,SGD-momentum")
    ap.add_argument("--steps-per-call", type=int, default=8, help="steps per jitted call (lax.fori_loop)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    optkern.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    import jax

    total = 1 << args.log2n
    results = []
    for algo in args.algos.split(","):
        for count in (1, 200):
            r = bench_case(algo, _sizes(total, count), args.reps, args.warmup, args.steps_per_call)
            results.append(r)
            for k, row in r["rows"].items():
                print(f"{algo:13s} {count:4d} arrays  {k:18s} {row['median_s'] * 1e3:8.2f} ms  {row['gbs']:6.2f} GB/s "
                      f"{row['pct_roofline']:5.1f}% roof  {row['ratio_vs_optax']:5.2f}x optax", file=sys.stderr)
    cmd = "python -m optkern.bench.jax " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (f"{cpu_model()}, {__import__('os').cpu_count()} CPUs, optkern threads {args.threads} "
               f"(cpu path {optkern.cpu_isa()}), jax {jax.__version__}, optax {__import__('optax').__version__}")
    lines = [
        "# optkern.jax vs optax: a jitted step's optimizer update (CPU, float32)", "",
        f"Command: `{cmd.strip()}`", "", f"Machine: {machine}", "",
        f"2^{args.log2n} params, medians of {args.reps} interleaved repetitions of {args.steps_per_call} steps in "
        "one jitted `lax.fori_loop` (per-step times: jax's per-call dispatch, a few ms for hundreds of arguments, "
        "left out alike for every variant); params and state donated in every variant.  GB/s from the minimal bytes per element; roofline = the fastest in-place add "
        "(NumPy `np.add(a, b, out=a)`, a donated jitted `a + b`, or torch's `a.add_(b)` on the same threads: "
        "12 B/element) in the same run; ratio = optax time / "
        "this time.", "",
        "| algorithm | arrays | variant | B/elem | ms/step | GB/s | % of add roofline | ratio vs optax |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for k, row in r["rows"].items():
            lines.append(f"| {r['algo']} | {r['arrays']} | {k} | {r['bytes_per_element']} | "
                         f"{row['median_s'] * 1e3:.2f} | {row['gbs']:.2f} | {row['pct_roofline']:.1f} | "
                         f"{row['ratio_vs_optax']:.2f}x |")
    lines += ["", "Roofline (in-place add) per case: " + ", ".join(
        f"{r['algo']}/{r['arrays']}: {r['roofline_gbs']:.2f} GB/s" for r in results), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "jax_cpu.md").write_text("\n".join(lines))
    (out / "jax_cpu.json").write_text(json.dumps({"machine": machine, "command": cmd, "results": results}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
