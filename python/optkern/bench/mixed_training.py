"""``python -m optkern.bench.mixed_training``: the digits MLP trained with Adam in each 16-bit storage mode.

The demo's 64-64-10 MLP (:mod:`optkern.demo`: ReLU, softmax cross-entropy, forward and backward in NumPy float32)
on scikit-learn's digits, trained with ``optkern.adam_step`` in five modes from the same initial weights (He
initialization rounded to bfloat16, so every mode starts from identical values), the same minibatch order (seed),
the same constant learning rate and the same number of steps:

* ``float32``: float32 params and state (the reference curve);
* ``bf16 plain``: bfloat16 params, float32 state, ``master_weights=None`` (each step's float32 result rounded to
  nearest-even into the bf16 param: an update smaller than half a bf16 ulp of the weight is lost);
* ``bf16 stochastic rounding``: the same with ``stochastic_rounding=True`` (unbiased rounding, ``seed=``);
* ``bf16 "split"``: bf16 params + an int16 residual (the float32 master's low half);
* ``bf16 "fp32" master``: bf16 params + a float32 master copy.

Between steps the weights are stored in bfloat16 in the four bf16 modes: the forward and backward read them widened
to float32 (the 16-bit model as a bf16 training run sees it), and the grads are rounded to bf16 (the param dtype)
before the step.  The small learning rate (default 1e-4: an Adam update of ~lr per element is below half a bf16 ulp
of most weights, |w| > 2^-6 ~ 0.016) makes stale weights visible.  Reported per mode: final full-train loss
(cross-entropy on the stored weights), train and test accuracy, and the share of stored param elements a step
leaves unchanged (mean over the last epoch; with a master copy an unchanged bf16 param is only deferred: the master
keeps the update).

    python -m optkern.bench.mixed_training [--epochs 80] [--lr 1e-4] [--out bench/results]

writes ``<out>/mixed_training.md`` (the table, with the command) and ``<out>/mixed_training.png`` (loss curves).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import optkern

from .. import demo

MODES = ("float32", "bf16 plain", "bf16 stochastic rounding", 'bf16 "split"', 'bf16 "fp32" master')
SR_SEED = 2024


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def initial_weights(seed: int) -> list[np.ndarray]:
    """The demo MLP's He initialization, rounded to bfloat16 and held in float32 (exact in both)."""
    return [p.astype(_bf16()).astype(np.float32) for p in demo.init_params(np.random.default_rng(seed))]


def train_mode(mode: str, data, epochs: int, batch: int, lr: float, seed: int) -> dict:
    """One run: per-epoch mean minibatch loss, final metrics, the share of stored elements each step left unchanged."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    x_tr, y_tr, x_te, y_te = data
    w0 = initial_weights(seed)
    bf16 = mode != "float32"
    params = [w.astype(_bf16()) for w in w0] if bf16 else [w.copy() for w in w0]
    m = [np.zeros(w.shape, np.float32) for w in w0]
    v = [np.zeros(w.shape, np.float32) for w in w0]
    kw = {}
    if mode == "bf16 stochastic rounding":
        kw = {"stochastic_rounding": True, "seed": SR_SEED}
    elif mode in ('bf16 "split"', 'bf16 "fp32" master'):
        mw = "split" if "split" in mode else "fp32"
        kw = {"masters": optkern.init_masters(params, mw), "master_weights": mw}
    rng = np.random.default_rng(seed + 1)  # the minibatch order: the same for every mode
    n = x_tr.shape[0]
    nelem = sum(p.size for p in params)
    curve, unchanged, t = [], [], 0
    for _ in range(epochs):
        losses, stale = [], []
        perm = rng.permutation(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            wide = [p.astype(np.float32) for p in params]
            loss, grads = demo.loss_and_grads(wide, x_tr[idx], y_tr[idx])
            if bf16:
                grads = [g.astype(_bf16()) for g in grads]
            before = [p.copy() for p in params]
            t += 1
            optkern.adam_step(params, grads, m, v, step=t, lr=lr, **kw)
            stale.append(sum(int(np.count_nonzero(p == b)) for p, b in zip(params, before)) / nelem)
            losses.append(loss)
        curve.append(float(np.mean(losses)))
        unchanged.append(float(np.mean(stale)))
    wide = [p.astype(np.float32) for p in params]
    return {"mode": mode, "curve": curve, "unchanged": unchanged, "steps": t,
            "train_loss": demo.eval_loss(wide, x_tr, y_tr), "train_acc": demo.accuracy(wide, x_tr, y_tr),
            "test_acc": demo.accuracy(wide, x_te, y_te)}


def markdown(results: list, meta: dict) -> str:
    lines = [f"# Digits MLP, Adam in each 16-bit storage mode ({meta['steps']} steps)", "",
             f"`{meta['command']}` ({meta['wall_s']:.1f} s; optkern {optkern.__version__}, CPU path "
             f"{optkern.cpu_isa()}). 64-64-10 MLP on scikit-learn digits ({meta['n_train']} train / {meta['n_test']} "
             f"test), batch {meta['batch']}, {meta['epochs']} epochs, Adam lr {meta['lr']:g} (constant), betas "
             "(0.9, 0.999), eps 1e-8; seed " f"{meta['seed']}: the same initial weights (rounded to bf16) and "
             "minibatch order in every mode. bf16 modes: weights stored in bf16 between steps, forward/backward in "
             "float32 on them widened, grads rounded to bf16. Final loss: cross-entropy over the whole train split "
             "on the stored weights. Unchanged: share of stored param elements a step left bit-identical (mean over "
             "the last epoch; with a master copy the update is kept in the master).", ""]
    return "\n".join(lines + table_lines(results)) + "\n"


def table_lines(results: list) -> list[str]:
    lines = ["| mode | final train loss | train acc | test acc | unchanged per step (last epoch) |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['train_loss']:.4f} | {100 * r['train_acc']:.1f}% | "
                     f"{100 * r['test_acc']:.1f}% | {100 * r['unchanged'][-1]:.1f}% |")
    return lines


def plot(results: list, meta: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot ({demo.DEMO_HINT})", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"float32": ("k", "-", 3.0), "bf16 plain": ("tab:red", "-", 2.0),
              "bf16 stochastic rounding": ("tab:blue", "--", 2.0), 'bf16 "split"': ("tab:green", "-", 1.5),
              'bf16 "fp32" master': ("tab:orange", ":", 2.5)}
    for r in results:
        c, ls, lw = styles[r["mode"]]
        ep = np.arange(1, len(r["curve"]) + 1)
        ax1.plot(ep, r["curve"], ls, color=c, lw=lw,
                 label=f"{r['mode']} (loss {r['train_loss']:.3f}, test {100 * r['test_acc']:.1f}%)")
        ax2.plot(ep, 100 * np.asarray(r["unchanged"]), ls, color=c, lw=lw, label=r["mode"])
    ax1.set_yscale("log")
    ax1.set_ylabel("mean minibatch train loss over the epoch (cross-entropy)")
    ax2.set_ylabel("stored param elements left unchanged by a step (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=9, loc="center right")
    ax2.legend(fontsize=9)
    fig.suptitle(f"optkern Adam (lr {meta['lr']:g}, {meta['steps']} steps), digits MLP: float32 vs bf16 storage modes "
                 "(same seed, init and batches)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(epochs: int = 80, batch: int = 64, lr: float = 1e-4, seed: int = 0, modes=MODES) -> tuple[list, dict]:
    data = demo.digits_data(seed)
    t0 = time.perf_counter()
    results = [train_mode(mode, data, epochs, batch, lr, seed) for mode in modes]
    meta = {"epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "steps": results[0]["steps"],
            "n_train": data[0].shape[0], "n_test": data[2].shape[0], "wall_s": time.perf_counter() - t0}
    return results, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optkern.bench.mixed_training", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs: expected >= 1")
    results, meta = run(args.epochs, args.batch, args.lr, args.seed)
    meta["command"] = "python -m optkern.bench.mixed_training " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(results, meta)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_training.md").write_text(md)
    wrote = [str(out / "mixed_training.md")]
    if plot(results, meta, out / "mixed_training.png"):
        wrote.append(str(out / "mixed_training.png"))
    print("wrote " + ", ".join(wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
