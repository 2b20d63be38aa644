"""``python -m optkern.bench.ogr``: OGR (seed 002's online gradient regression) against SGD with momentum and Adam.

Three problems, every optimizer through optkern's own kernels (``optkern.optim.SGD(momentum=0.9)``,
``optkern.optim.Adam`` with torch's defaults, ``optkern.optim.OGR`` with its defaults: alpha = lr = 0.5, beta = 0.9,
warmup = 5, trust = 2, eps = 1e-6):

1. the 2-D saddle f = x^2 - y^2 + y^4 / 4 from (1, 1e-4), near the saddle at 0: the steps until |y| > 1 (the minima
   are at y = +-sqrt(2)), and whether the run ends within 1e-3 of a minimum;
2. a noisy ill-conditioned quadratic f = x^T A x / 2 in 100 dimensions, eigenvalues log-spaced in [1e-2, 1]
   (condition 100), gradient noise N(0, 0.01^2) per coordinate: the distance to the minimum after 100, 300 and 1000
   steps (median of 3 seeds), once with A diagonal (the axes OGR's per-coordinate fit sees) and once rotated by a
   random orthogonal matrix (coupled coordinates, which the diagonal form cannot see);
3. the demo's 64-64-10 MLP on scikit-learn's digits (:mod:`optkern.demo`'s data, model and gradients), batch 64,
   30 epochs, the same initial weights and minibatch order for all: full-train loss and test accuracy per epoch.

Learning rates: one grid, the same for every method and problem (``--grid``, default 1e-3 ... 1 in factors of about
3); the swept value is SGD's and Adam's ``lr`` and OGR's ``sgd_lr`` (its SGD step in the warm-up and under the
guards), OGR's step factor alpha staying at its default 0.5.  Each method's best grid value is reported (saddle:
fewest steps to leave; quadratic: smallest final distance; MLP: smallest final train loss), and the tables give
every value's result too.  Also timed: one OGR step on 2^24 float32 params against an in-place add in the same run,
with GB/s from the minimal bytes (params read and written, grad read, five states read and written: 52 bytes per
element; the add: 12).

    python -m optkern.bench.ogr [--out bench/results] [--epochs 30] [--threads 2]

writes ``<out>/ogr.md`` (the tables and the command) and ``<out>/ogr.png`` (the curves).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import optkern
from optkern import optim as ok

from .. import demo

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
METHODS = ("SGD-momentum", "Adam", "OGR")


def make(method: str, params, lr: float):
    if method == "SGD-momentum":
        return ok.SGD(params, lr=lr, momentum=0.9)
    if method == "Adam":
        return ok.Adam(params, lr=lr)
    if method == "OGR":
        return ok.OGR(params, sgd_lr=lr)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


# ---- 1. the saddle ----------------------------------------------------------------------------------------------
def saddle_run(method: str, lr: float, steps: int = 500):
    xy = np.array([1.0, 1e-4])
    opt = make(method, [xy], lr)
    ys, left = [abs(xy[1])], None
    for k in range(1, steps + 1):
        x, y = xy
        opt.step([np.array([2 * x, -2 * y + y**3])])
        if not np.all(np.isfinite(xy)):
            break
        ys.append(abs(xy[1]))
        if left is None and abs(xy[1]) > 1.0:
            left = k
    at_min = bool(np.all(np.isfinite(xy)) and abs(xy[0]) < 1e-3 and abs(abs(xy[1]) - np.sqrt(2)) < 1e-3)
    return {"left": left, "at_min": at_min, "curve": ys}


# ---- 2. the noisy quadratic -------------------------------------------------------------------------------------
def quadratic_run(method: str, lr: float, rotated: bool, seed: int, steps: int = 1000, n: int = 100):
    rng = np.random.default_rng(seed)
    eig = np.logspace(-2, 0, n)
    if rotated:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        a = (q * eig) @ q.T
    else:
        a = np.diag(eig)
    x = rng.standard_normal(n)
    opt = make(method, [x], lr)
    dist = [float(np.linalg.norm(x))]
    for _ in range(steps):
        opt.step([a @ x + 0.01 * rng.standard_normal(n)])
        d = float(np.linalg.norm(x))
        dist.append(d if np.isfinite(d) else np.inf)
        if not np.isfinite(d):
            dist += [np.inf] * (steps + 1 - len(dist))
            break
    return dist


# ---- 3. the digits MLP ------------------------------------------------------------------------------------------
def mlp_run(method: str, lr: float, data, epochs: int, batch: int = 64, seed: int = 0):
    x_tr, y_tr, x_te, y_te = data
    params = demo.init_params(np.random.default_rng(seed))
    opt = make(method, params, lr)
    order = np.random.default_rng(seed + 1)
    loss, acc = [demo.eval_loss(params, x_tr, y_tr)], [demo.accuracy(params, x_te, y_te)]
    for _ in range(epochs):
        perm = order.permutation(x_tr.shape[0])
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            _, grads = demo.loss_and_grads(params, x_tr[idx], y_tr[idx])
            opt.step(grads)
        l_ = demo.eval_loss(params, x_tr, y_tr)
        loss.append(l_ if np.isfinite(l_) else np.inf)
        acc.append(demo.accuracy(params, x_te, y_te))
        if not np.isfinite(l_):
            break
    loss += [np.inf] * (epochs + 1 - len(loss))
    acc += [acc[-1]] * (epochs + 1 - len(acc))
    return {"loss": loss, "acc": acc}


# ---- speed --------------------------------------------------------------------------------------------------
def time_step(threads: int, n: int = 1 << 24, reps: int = 7):
    optkern.set_num_threads(threads)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    st = [np.zeros(n, np.float32) for _ in range(5)]
    a, b = p.copy(), g.copy()
    t_ogr, t_add = [], []
    for r in range(reps):  # interleaved, medians
        t0 = time.perf_counter()
        optkern.ogr_step([p], [g], *[[s] for s in st], step=r + 1, sgd_lr=1e-6, warmup=0)
        t_ogr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.add(a, b, out=a)
        t_add.append(time.perf_counter() - t0)
    to, ta = float(np.median(t_ogr[1:])), float(np.median(t_add[1:]))
    return {"threads": threads, "ogr_ms": to * 1e3, "add_ms": ta * 1e3, "ogr_gbs": 52 * n / to / 1e9,
            "add_gbs": 12 * n / ta / 1e9}


def grid_table(md, title, what, grid, cell):
    """One markdown table (rows: the lr grid, columns: METHODS) of ``cell(method, lr) -> (text, score, payload)``;
    returns each method's best {method: (score, lr, payload)}, the lowest score (the first of equal ones)."""
    md += [title, "", what, "", "| lr | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    best = {}
    for lr in grid:
        row = []
        for m in METHODS:
            text, score, payload = cell(m, lr)
            row.append(text)
            if m not in best or score < best[m][0]:
                best[m] = (score, lr, payload)
        md.append(f"| {lr:g} | " + " | ".join(row) + " |")
    md.append("")
    return best


def _fmt(x, spec=".3g"):
    return "diverged" if not np.isfinite(x) else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optkern.set_num_threads(1)  # the problems are tiny: one thread (the timing sets its own)
    grid = args.grid
    md = ["# OGR against SGD-momentum and Adam", "",
          f"`python -m optkern.bench.ogr {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
          f"(optkern {optkern.__version__}, CPU path {optkern.cpu_isa()}).  Learning-rate grid, the same for every "
          f"method: {', '.join(f'{v:g}' for v in grid)} (SGD's and Adam's `lr`, OGR's `sgd_lr`; OGR's alpha = 0.5, "
          "beta = 0.9, warmup = 5, trust = 2, eps = 1e-6; SGD momentum 0.9; Adam betas (0.9, 0.999)).", ""]
    curves = {}

    print("saddle ...", file=sys.stderr)

    def saddle_cell(m, lr):
        r = saddle_run(m, lr)
        cell = ("-" if r["left"] is None else str(r["left"])) + ("*" if r["at_min"] else "")
        # best: the fewest steps among runs that end at a minimum (a run that leaves and diverges does not count)
        return cell, (r["left"] if r["left"] is not None and r["at_min"] else 10**9), r["curve"]

    best = grid_table(md, "## 1. Saddle f = x^2 - y^2 + y^4/4 from (1, 1e-4)",
                      "Steps until |y| > 1 (-: not within 500 steps); `*`: ended within 1e-3 of a minimum "
                      "(0, +-sqrt 2); the best per method counts starred runs only.", grid, saddle_cell)
    md += ["Best per method: " + "; ".join(
        f"{m} {('-' if b[0] == 10**9 else b[0])} steps (lr {b[1]:g})" for m, b in best.items()), ""]
    curves["saddle"] = {m: (b[1], b[2]) for m, b in best.items()}

    for rotated in (False, True):
        label = "rotated" if rotated else "diagonal"
        print(f"quadratic {label} ...", file=sys.stderr)

        def quad_cell(m, lr):
            med = np.median(np.array([quadratic_run(m, lr, rotated, s) for s in range(3)]), axis=0)
            return " / ".join(_fmt(med[k]) for k in (100, 300, 1000)), med[-1], med

        best = grid_table(md, f"## 2{'b' if rotated else 'a'}. Noisy quadratic, 100-d, condition 100, {label}",
                          "Distance to the minimum after 100 / 300 / 1000 steps (median of 3 seeds; start at "
                          "distance ~10).", grid, quad_cell)
        md += ["Best per method (final distance): " + "; ".join(
            f"{m} {_fmt(b[0])} (lr {b[1]:g})" for m, b in best.items()), ""]
        curves[f"quad_{label}"] = {m: (b[1], b[2]) for m, b in best.items()}

    print("digits MLP ...", file=sys.stderr)
    data = demo.digits_data(0)

    def mlp_cell(m, lr):
        r = mlp_run(m, lr, data, args.epochs)
        return f"{_fmt(r['loss'][-1], '.3g')} / {r['acc'][-1]:.3f}", r["loss"][-1], r

    best = grid_table(md, f"## 3. Digits MLP 64-64-10 (the demo's), batch 64, {args.epochs} epochs",
                      "Final full-train loss / test accuracy.", grid, mlp_cell)
    md += ["Best per method (final train loss): " + "; ".join(
        f"{m} {_fmt(b[0], '.3g')}, test acc {b[2]['acc'][-1]:.3f} (lr {b[1]:g})" for m, b in best.items()), ""]
    curves["mlp"] = {m: (b[1], b[2]) for m, b in best.items()}

    print("timing ...", file=sys.stderr)
    md += ["## Speed: one OGR step, 2^24 float32 params", "",
           "Medians of 6 interleaved repetitions (after one warm-up), NumPy's in-place add (one thread) in the same "
           "run. GB/s from the minimal bytes: OGR 52 per element (param rw, grad r, 5 states rw), add 12.", "",
           "| optkern threads | OGR ms | OGR GB/s | add ms | add GB/s | OGR / add GB/s |", "|---|---|---|---|---|---|"]
    for th in sorted({1, args.threads}):
        t = time_step(th)
        md.append(f"| {th} | {t['ogr_ms']:.1f} | {t['ogr_gbs']:.1f} | {t['add_ms']:.1f} | {t['add_gbs']:.1f} | "
                  f"{t['ogr_gbs'] / t['add_gbs']:.2f} |")
    md.append("")
    (out / "ogr.md").write_text("\n".join(md) + "\n")
    plot(curves, out / "ogr.png")
    print("\n".join(md))
    return 0


def plot(curves, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.5))
    for m, (lr, ys) in curves["saddle"].items():
        axes[0].semilogy(ys, label=f"{m} (lr {lr:g})")
    axes[0].set(title="saddle: |y| (leaves at |y| > 1)", xlabel="step", xlim=(0, 200))
    for ax, key, title in ((axes[1], "quad_diagonal", "quadratic, diagonal"),
                           (axes[2], "quad_rotated", "quadratic, rotated")):
        for m, (lr, d) in curves[key].items():
            ax.semilogy(d, label=f"{m} (lr {lr:g})")
        ax.set(title=f"{title}: distance to min (median of 3)", xlabel="step")
    for m, (lr, r) in curves["mlp"].items():
        axes[3].semilogy(r["loss"], label=f"{m} (lr {lr:g})")
        axes[4].plot(r["acc"], label=f"{m} (lr {lr:g})")
    axes[3].set(title="digits MLP: full-train loss", xlabel="epoch")
    axes[4].set(title="digits MLP: test accuracy", xlabel="epoch", ylim=(0.8, 1.0))
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("OGR vs SGD-momentum and Adam (each at its best value of the same lr grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
