"""``python -m optkern.demo``: train a small NumPy MLP on scikit-learn's digits with every optkern optimizer, then
fit an L2-regularized logistic regression with ``optkern.lbfgs_minimize`` next to first-order optimizers, then train
a small CNN with the PyTorch front end.

1. A 64-64-10 MLP (ReLU, softmax cross-entropy; forward and backward written out in NumPy, float32) on the 8x8
   digits that ship with scikit-learn (no download), once per optimizer, plus one run with global-norm clipping
   folded into Adam's step, one with a learning-rate schedule, and runs with a batch-norm layer after the hidden
   layer (``optkern.batch_norm_forward``/``batch_norm_backward``; eval mode with the running statistics for
   accuracy) next to the same optimizers without it.  Prints a table (final train loss, test accuracy, median
   ``opt.step`` time) and writes a PNG of the loss curves (``--out``).
2. Multinomial (10-class softmax) logistic regression with an L2 penalty on the weights,
   f(W, b) = mean cross-entropy + lambda/2 ||W||^2 (lambda = 1e-3, W 64x10, b 10; float64, vectorized NumPy
   objective and gradient) on the same standardized train split, minimized by ``optkern.lbfgs_minimize``
   (strong Wolfe and Armijo line searches), by full-batch first-order optkern optimizers (Adam, SGD momentum,
   SGD Nesterov; a fixed number of steps) and, when SciPy is installed, by ``scipy.optimize.minimize(method=
   "L-BFGS-B")`` with the same history size.  Prints a table (iterations, function evaluations, final objective,
   ||grad||_inf, test accuracy, time) and writes a second PNG, the ``--out`` stem with a ``_logreg`` suffix
   (objective and objective - best vs function evaluations).
3. 16-bit storage (:mod:`optkern.bench.mixed_training`): the same MLP with Adam at a small learning rate, weights
   stored in float32 or bfloat16 (plain, stochastic rounding, "split" and "fp32" masters); a table and a PNG with
   a ``_mixed`` suffix.
4. The PyTorch part (:mod:`optkern.demo_torch`; skipped with a message when torch is absent): a small CNN on the
   same digits trained with ``optkern.torch.AdamW`` + ``optkern.torch.nn.BatchNorm2d`` + a torch scheduler + bf16
   autocast with GradScaler, beside the same model on ``torch.optim`` / ``torch.nn``.  Prints a table (final
   loss, test accuracy, optimizer step time, batch-norm time) and writes a fourth PNG with a ``_torch`` suffix.

    pip install ".[demo]"          # scikit-learn, matplotlib, tqdm (SciPy comes with scikit-learn)
    python -m optkern.demo [--epochs N] [--logreg-steps N] [--out optkern_demo.png]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

import optkern
from optkern import schedules

DEMO_HINT = 'pip install ".[demo]"   (or: pip install scikit-learn matplotlib tqdm)'


# ---------------------------------------------------------------------------------------------- the data
def digits_data(seed: int = 0):
    """scikit-learn's 8x8 digits (bundled, no download): (x_train, y_train, x_test, y_test), a stratified 75/25
    split by ``seed``, pixels standardized with the training statistics, float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-3
    return ((x_tr - mu) / sd).astype(np.float32), y_tr, ((x_te - mu) / sd).astype(np.float32), y_te


# ---------------------------------------------------------------------------------------------- the model
def init_params(rng: np.random.Generator, sizes=(64, 64, 10), bn: bool = False) -> list[np.ndarray]:
    """[W1, b1, W2, b2] (or with batch norm [W1, gamma, beta, W2, b2]: the BN shift replaces b1), He-initialised,
    float32, C-contiguous."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append((rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        params.append(np.zeros(fan_out, np.float32))
    if bn:
        w1, _, w2, b2 = params
        params = [w1, np.ones(sizes[1], np.float32), np.zeros(sizes[1], np.float32), w2, b2]
    return params


class BatchNormState:
    """Running statistics of the hidden batch-norm layer (updated in place by batch_norm_forward)."""

    def __init__(self, n: int):
        self.running_mean = np.zeros(n, np.float32)
        self.running_var = np.ones(n, np.float32)


def forward(params, x, bn: BatchNormState | None = None, training: bool = False):
    if bn is None:
        w1, b1, w2, b2 = params
        h_pre = x @ w1 + b1
        saved = None
    else:
        w1, gamma, beta, w2, b2 = params
        a = x @ w1
        h_pre, save_mean, save_invstd = optkern.batch_norm_forward(
            a, gamma, beta, bn.running_mean, bn.running_var, training=training, momentum=0.1)
        saved = (a, save_mean, save_invstd)
    h = np.maximum(h_pre, 0.0)
    logits = h @ w2 + b2
    return logits, (x, h_pre, h, saved)


def loss_and_grads(params, x, y, bn: BatchNormState | None = None):
    """Mean softmax cross-entropy and its gradients, one per param (training mode)."""
    logits, (x, h_pre, h, saved) = forward(params, x, bn, training=True)
    w2 = params[-2]
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), y]))
    d_logits = e / s
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    dw2 = h.T @ d_logits
    db2 = d_logits.sum(axis=0)
    dh = d_logits @ w2.T
    dh[h_pre <= 0] = 0.0
    if bn is None:
        grads = (x.T @ dh, dh.sum(axis=0), dw2, db2)
    else:
        a, save_mean, save_invstd = saved
        da, dgamma, dbeta = optkern.batch_norm_backward(np.ascontiguousarray(dh), a, params[1], save_mean,
                                                        save_invstd)
        grads = (x.T @ da, dgamma, dbeta, dw2, db2)
    return loss, [np.ascontiguousarray(g, dtype=np.float32) for g in grads]


def eval_loss(params, x, y, bn=None) -> float:
    logits, _ = forward(params, x, bn, training=False)
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(x.shape[0]), y]))


def accuracy(params, x, y, bn=None) -> float:
    logits, _ = forward(params, x, bn, training=False)
    return float(np.mean(logits.argmax(axis=1) == y))


# ---------------------------------------------------------------------------------------------- the runs
def configs(steps_total: int):
    """(label, optimizer factory, batch mode, clip max_norm or None, batch norm?)."""
    o = optkern.optim
    return [
        ("SGD momentum", lambda p: o.SGD(p, lr=0.05, momentum=0.9), "mini", None),
        ("SGD momentum + batch norm", lambda p: o.SGD(p, lr=0.05, momentum=0.9), "mini", None, True),
        ("Adam", lambda p: o.Adam(p, lr=3e-3), "mini", None),
        ("Adam + batch norm", lambda p: o.Adam(p, lr=3e-3), "mini", None, True),
        ("AdamW", lambda p: o.AdamW(p, lr=3e-3, weight_decay=1e-2), "mini", None),
        ("Adagrad", lambda p: o.Adagrad(p, lr=0.05), "mini", None),
        ("RMSprop", lambda p: o.RMSprop(p, lr=1e-3), "mini", None),
        ("Adamax", lambda p: o.Adamax(p, lr=4e-3), "mini", None),
        ("NAdam", lambda p: o.NAdam(p, lr=3e-3), "mini", None),
        ("Adadelta", lambda p: o.Adadelta(p, lr=1.0), "mini", None),
        ("Rprop (full batch)", lambda p: o.Rprop(p, lr=1e-3), "full", None),
        ("Adam + clip_grad_norm(1.0)", lambda p: o.Adam(p, lr=3e-3), "mini", 1.0),
        ("SGD momentum + warmup/linear decay",
         lambda p: o.SGD(p, lr=schedules.linear_warmup(50, schedules.linear_decay(0.1, 0.002, steps_total)),
                         momentum=0.9), "mini", None),
    ]


def train_one(make_opt, mode, clip, data, epochs, batch, seed, tick, use_bn=False):
    x_tr, y_tr, x_te, y_te = data
    rng = np.random.default_rng(seed)
    params = init_params(rng, bn=use_bn)
    bn = BatchNormState(params[1].shape[0]) if use_bn else None
    opt = make_opt(params)
    n = x_tr.shape[0]
    steps_per_epoch = (n + batch - 1) // batch
    curve, step_times = [], []
    for _ in range(epochs):
        losses = []
        if mode == "full":
            # Rprop uses only the gradient's sign: full-batch gradients, as many steps per epoch as minibatch runs
            batches = [np.arange(n)] * steps_per_epoch
        else:
            perm = rng.permutation(n)
            batches = [perm[i:i + batch] for i in range(0, n, batch)]
        for idx in batches:
            loss, grads = loss_and_grads(params, x_tr[idx], y_tr[idx], bn)
            losses.append(loss)
            t0 = time.perf_counter()
            if clip is not None:
                r = optkern.clip_grad_norm(grads, clip)
                opt.step(grads, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)
            else:
                opt.step(grads)
            step_times.append(time.perf_counter() - t0)
        curve.append(float(np.mean(losses)))
        tick()
    return {"curve": curve, "train_loss": eval_loss(params, x_tr, y_tr, bn), "test_acc": accuracy(params, x_te, y_te, bn),
            "train_acc": accuracy(params, x_tr, y_tr, bn), "step_us": float(np.median(step_times)) * 1e6,
            "steps": len(step_times), "batch_norm": use_bn, "nparams": int(sum(p.size for p in params))}


class _Progress:
    def __init__(self, total):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
            print("(tqdm not installed: plain progress; " + DEMO_HINT + ")", file=sys.stderr)
        self.total, self.done = total, 0

    def label(self, s):
        if self.bar is not None:
            self.bar.set_description(s)
        else:
            print(f"[{self.done}/{self.total}] {s}", file=sys.stderr, flush=True)

    def tick(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plot(results, path, epochs) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed: skipping the loss-curve PNG ({DEMO_HINT})")
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ep = np.arange(1, epochs + 1)
    styles = ["-", "-.", ":"]
    colors = {}
    for i, (label, r) in enumerate(results):
        base = label.replace(" + batch norm", "")
        if r["batch_norm"] and base in colors:  # with batch norm: its plain run's colour, dashed
            color, style = colors[base], "--"
        else:
            color, style = f"C{len(colors) % 10}", styles[len(colors) // 10 % 3]
            colors[base] = color
        ax.plot(ep, r["curve"], style, color=color, lw=1.6, label=f"{label} ({100 * r['test_acc']:.1f}%)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean train loss over the epoch (cross-entropy)")
    ax.set_title("optkern: 64-64-10 MLP on scikit-learn digits (dashed: with batch norm; test accuracy in legend)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- logistic regression
LOGREG_LAMBDA = 1e-3


class LogReg:
    """f(x) = mean softmax cross-entropy of X W + b + lambda/2 ||W||^2 and its gradient, x = [W.ravel(), b] (float64).

    Every call is counted and its objective recorded (``fs``), so each method's curve is f per function evaluation.
    """

    def __init__(self, x, y, n_classes=10, lam=LOGREG_LAMBDA):
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y, self.k, self.lam = y, n_classes, lam
        self.d = self.x.shape[1]
        self.n_params = self.d * self.k + self.k
        self.fs: list[float] = []

    def unpack(self, p):
        return p[:self.d * self.k].reshape(self.d, self.k), p[self.d * self.k:]

    def __call__(self, p):
        w, b = self.unpack(p)
        n = self.x.shape[0]
        z = self.x @ w + b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        f = float(np.mean(np.log(s[:, 0]) - z[rows, self.y])) + 0.5 * self.lam * float(np.vdot(w, w))
        dz = e / s
        dz[rows, self.y] -= 1.0
        dz /= n
        g = np.empty_like(p)
        g[:self.d * self.k] = (self.x.T @ dz + self.lam * w).ravel()
        g[self.d * self.k:] = dz.sum(axis=0)
        self.fs.append(f)
        return f, g

    def accuracy(self, p, x, y) -> float:
        w, b = self.unpack(p)
        return float(np.mean((x @ w + b).argmax(axis=1) == y))


def _fit_lbfgs(line_search):
    def fit(obj, x0, steps):
        r = optkern.lbfgs_minimize(obj, x0, history_size=10, max_iter=1000, line_search=line_search)
        return r.x, r.nit, r.message
    return fit


def _fit_scipy(obj, x0, steps):
    from scipy.optimize import minimize

    r = minimize(obj, x0, jac=True, method="L-BFGS-B", options={"maxcor": 10, "maxiter": 1000, "gtol": 1e-6})
    return r.x, int(r.nit), str(r.message)


def _fit_first_order(make_opt):
    def fit(obj, x0, steps):
        x = x0.copy()
        opt = make_opt([x])
        for _ in range(steps):
            _, g = obj(x)
            opt.step([g])
        return x, steps, f"{steps} full-batch steps"
    return fit


def logreg_configs():
    """(label, fit(obj, x0, steps) -> (x, iterations, message)); None for fit when the method is unavailable."""
    o = optkern.optim
    try:
        import scipy.optimize  # noqa: F401

        scipy_fit = _fit_scipy
    except ImportError:
        scipy_fit = None
    return [
        ("optkern L-BFGS (strong Wolfe)", _fit_lbfgs("strong_wolfe")),
        ("optkern L-BFGS (Armijo)", _fit_lbfgs("armijo")),
        ("scipy L-BFGS-B (maxcor=10)", scipy_fit),
        ("Adam (lr 0.05)", _fit_first_order(lambda p: o.Adam(p, lr=0.05))),
        ("SGD momentum 0.9 (lr 0.2)", _fit_first_order(lambda p: o.SGD(p, lr=0.2, momentum=0.9))),
        ("SGD Nesterov 0.9 (lr 0.2)", _fit_first_order(lambda p: o.SGD(p, lr=0.2, momentum=0.9, nesterov=True))),
    ]


def _single_threaded_blas():
    """One BLAS thread for the logistic-regression fits (tiny matrices: NumPy's and SciPy's separate OpenBLAS
    thread pools otherwise spin against each other and SciPy's L-BFGS-B can run ~20x slower on few cores).
    threadpoolctl ships with scikit-learn; without it, a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_logreg(data, steps, repeats=3, budget_s=0.1):
    """Fit every method from x0 = 0; time = the fastest of up to ``repeats`` fits (fewer once they have taken
    ``budget_s``; the curve and counts are the first fit's)."""
    x_tr, y_tr, x_te, y_te = (np.asarray(a, np.float64) if a.dtype.kind == "f" else a for a in data)
    results, skipped = [], []
    for label, fit in logreg_configs():
        if fit is None:
            skipped.append(label)
            continue
        times = []
        for rep in range(repeats):
            if sum(times) > budget_s:
                break
            obj = LogReg(x_tr, y_tr)
            x0 = np.zeros(obj.n_params)
            t0 = time.perf_counter()
            x, nit, msg = fit(obj, x0, steps)
            times.append(time.perf_counter() - t0)
            if rep == 0:
                curve, nfev = list(obj.fs), len(obj.fs)
                f, g = obj(x)  # the reported objective and gradient at the returned point (not counted in nfev)
                res = {"nit": nit, "nfev": nfev, "fun": f, "gmax": float(np.abs(g).max()), "curve": curve,
                       "test_acc": obj.accuracy(x, x_te, y_te), "train_acc": obj.accuracy(x, x_tr, y_tr),
                       "message": msg}
        res["ms"] = 1e3 * min(times)
        results.append((label, res))
    return results, skipped


def print_logreg(results, skipped, steps):
    w = max(len(lbl) for lbl, _ in results)
    print(f"| {'method':<{w}} | iterations | function evaluations | final objective | ||grad||_inf | test acc | "
          f"time (ms) |")
    print(f"|{'-' * (w + 2)}|-----------:|---------------------:|----------------:|-------------:|---------:|"
          f"----------:|")
    for label, r in results:
        print(f"| {label:<{w}} | {r['nit']:10d} | {r['nfev']:20d} | {r['fun']:15.8f} | {r['gmax']:12.2e} | "
              f"{100 * r['test_acc']:7.1f}% | {r['ms']:9.1f} |")
    for label in skipped:
        print(f"| {label:<{w}} | {'-':>10} | {'-':>20} | {'-':>15} | {'-':>12} | {'-':>8} | {'-':>9} |")
    print()
    for label, r in results:
        if "L-BFGS" in label:
            print(f"{label}: {r['message']}")
    if skipped:
        print(f"scipy is not installed: skipped {', '.join(skipped)} (pip install scipy)")
    print(f"(first-order rows: {steps} full-batch steps, one function evaluation each; time: fastest of up to "
          f"3 fits from x = 0, function evaluations included, one BLAS thread)")


def plot_logreg(results, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed: skipping the logistic-regression PNG ({DEMO_HINT})")
        return False
    best = min(min(r["curve"]) for _, r in results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (label, r) in enumerate(results):
        ev = np.arange(1, len(r["curve"]) + 1)
        f = np.asarray(r["curve"])
        # the L-BFGS runs often take the same unit steps and overlap: thick solid, dotted and dash-dot on top
        style, lw = {"strong Wolfe": ("-", 3.0), "Armijo": (":", 2.0), "scipy": ("-.", 1.4)}.get(
            next((k for k in ("strong Wolfe", "Armijo", "scipy") if k in label), ""), ("--", 1.6))
        ax1.plot(ev, f, style, color=f"C{i}", lw=lw, label=f"{label} ({100 * r['test_acc']:.1f}%)")
        ax2.plot(ev, np.maximum(f - best, 1e-13), style, color=f"C{i}", lw=lw, label=label)
    ax1.set_ylabel("objective f (mean cross-entropy + L2)")
    ax2.set_ylabel("f - best f found (floored at 1e-13)")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("function evaluations (log)")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    fig.suptitle(f"optkern: L2-regularized (lambda = {LOGREG_LAMBDA:g}) softmax logistic regression on scikit-learn "
                 "digits (dashed: first-order; test accuracy in legend)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sibling_png(out: str, suffix: str) -> str:
    """The PNG next to ``out`` with ``suffix`` added to its stem (``demo.png``, "_logreg" -> ``demo_logreg.png``)."""
    p = Path(out)
    return str(p.with_name(p.stem + suffix + (p.suffix or ".png")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optkern.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="epochs per optimizer (default 30)")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size (default 64)")
    ap.add_argument("--logreg-steps", type=int, default=500,
                    help="full-batch steps of the first-order optimizers on the logistic regression (default 500)")
    ap.add_argument("--out", default="optkern_demo.png",
                    help="MLP loss-curve PNG (default optkern_demo.png); the logistic-regression curves go next to "
                         "it with a _logreg suffix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs: expected >= 1")
    if args.logreg_steps < 1:
        ap.error("--logreg-steps: expected >= 1")

    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(f"optkern.demo needs scikit-learn (for its bundled digits dataset): {DEMO_HINT}", file=sys.stderr)
        return 1

    data = digits_data(args.seed)
    x_tr, _, x_te, _ = data
    steps_total = args.epochs * ((x_tr.shape[0] + args.batch - 1) // args.batch)

    print(f"digits: {x_tr.shape[0]} train / {x_te.shape[0]} test, MLP 64-64-10, batch {args.batch}, "
          f"{args.epochs} epochs, optkern {optkern.__version__} ({optkern.cpu_isa()})")
    cfgs = configs(steps_total)
    prog = _Progress(len(cfgs) * args.epochs)
    results = []
    t0 = time.perf_counter()
    try:
        for label, make, mode, clip, *bn in cfgs:
            prog.label(label)
            results.append((label, train_one(make, mode, clip, data, args.epochs, args.batch, args.seed, prog.tick,
                                             use_bn=bool(bn and bn[0]))))
    finally:
        prog.close()
    wall = time.perf_counter() - t0

    w = max(len(lbl) for lbl, _ in results)
    print()
    print(f"| {'optimizer':<{w}} | final train loss | train acc | test acc | median step (us) |")
    print(f"|{'-' * (w + 2)}|-----------------:|----------:|---------:|-----------------:|")
    for label, r in results:
        print(f"| {label:<{w}} | {r['train_loss']:16.4f} | {100 * r['train_acc']:8.1f}% | {100 * r['test_acc']:7.1f}% | "
              f"{r['step_us']:16.1f} |")
    print(f"\n{len(results)} runs in {wall:.1f} s (step time: opt.step on 4 arrays, 4810 parameters; with batch norm "
          f"5 arrays, 4874; final loss in eval mode)")
    if plot(results, args.out, args.epochs):
        print(f"wrote {args.out}")

    print(f"\nL2-regularized softmax logistic regression (lambda = {LOGREG_LAMBDA:g}, {x_tr.shape[1]}x10 weights + 10 "
          f"biases, float64, full batch) on the same {x_tr.shape[0]}-example train split:\n")
    with _single_threaded_blas():
        lr_results, skipped = run_logreg(data, args.logreg_steps)
    print_logreg(lr_results, skipped, args.logreg_steps)
    lr_png = sibling_png(args.out, "_logreg")
    if plot_logreg(lr_results, lr_png):
        print(f"wrote {lr_png}")

    # 16-bit storage: the same MLP with Adam in each bf16 mode (python -m optkern.bench.mixed_training, ~5 s)
    from .bench import mixed_training

    mt_results, mt_meta = mixed_training.run(seed=args.seed)
    print(f"\nThe same MLP, Adam lr {mt_meta['lr']:g} for {mt_meta['steps']} steps, weights stored in float32 or "
          f"bfloat16 (same init and batches; {mt_meta['wall_s']:.1f} s):\n")
    print("\n".join(mixed_training.table_lines(mt_results)))
    mt_png = sibling_png(args.out, "_mixed")
    if mixed_training.plot(mt_results, mt_meta, mt_png):
        print(f"wrote {mt_png}")

    # The PyTorch part: the same digits with a small CNN, optkern.torch against torch.optim / torch.nn.
    from . import demo_torch

    print()
    demo_torch.run(sibling_png(args.out, "_torch"), seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
