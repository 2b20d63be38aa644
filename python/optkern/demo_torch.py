"""The PyTorch part of ``python -m optkern.demo``: the same small CNN on scikit-learn's digits, trained twice from the
same initial weights on the same batches, once with ``optkern.torch`` (``optkern.torch.AdamW`` and
``optkern.torch.nn.BatchNorm2d``) and once with plain torch (``torch.optim.AdamW`` and ``torch.nn.BatchNorm2d``).

* Model: conv 1->16 3x3 -> BatchNorm2d -> ReLU -> max-pool 2 -> conv 16->32 3x3 -> BatchNorm2d -> ReLU -> Linear
  512->10 on the 8x8 images (1 channel; pixels standardized with the mean and standard deviation of all training
  pixels).  Run (a) is
  ``optkern.torch.nn.convert_batchnorm`` of a copy of run (b)'s initial model (weights kept).
* Mixed precision as on a CPU training job: ``torch.autocast("cpu", dtype=torch.bfloat16)`` for the forward and
  ``torch.amp.GradScaler("cpu")`` for backward and step (``scaler.step(opt)``: optkern folds the unscale into its
  fused step, torch unscales in a separate pass).  The convolutions run in bfloat16; each batch norm gets its input
  cast to float32 (in both runs: under autocast a bfloat16 input would send optkern's module to torch's own forward,
  see :mod:`optkern.torch.nn`).  Learning rate: ``torch.optim.lr_scheduler.OneCycleLR``, stepped per batch.
* Measured in the same process: the median ``opt.step()`` time (optimizer step pre/post hooks, so inside
  ``scaler.step``) and of the whole ``scaler.step(opt); scaler.update()``; the median forward+backward time of the
  two batch-norm layers alone (``y = bn(x); y.backward(dy)`` on the float32 shapes the model feeds them).

Prints a markdown table (final train loss, test accuracy, step and batch-norm times, wall time), whether the two
runs agree, and writes the per-epoch train-loss and test-accuracy curves of both runs to a PNG.  Needs torch
(``pip install torch==2.13.0``), scikit-learn, and matplotlib for the PNG.  ``python -m optkern.demo`` calls
:func:`run`; on its own:

    python -c "import optkern.demo_torch as d; d.run('optkern_demo_torch.png')"
"""

from __future__ import annotations

import copy
import time

import numpy as np

DEMO_HINT = 'pip install ".[demo]"   (or: pip install scikit-learn matplotlib tqdm)'
TORCH_HINT = "pip install torch==2.13.0"
BATCH = 64
MAX_LR = 1e-2
# Agreement: bf16 convolutions and the kernels' different (float32-exact but differently ordered) rounding make
# the two runs drift apart by a few ulps per step, so the final losses are not equal, only close.  What should
# agree is what training achieves: test accuracy within 2 points (~9 of the 450 test images) and final train
# losses within a factor of 1.5 of each other (both end near 1e-3, where small absolute differences are large
# relative ones; measured: factors 1.01-1.09).
ACC_TOL = 0.02
LOSS_RATIO_TOL = 1.5


def _model(torch, nn):
    class Float32(nn.Module):
        """Casts the (bfloat16 under autocast) activation to float32 for the batch norm after it."""

        def forward(self, x):
            return x.float()

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), Float32(), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), Float32(), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def _evaluate(torch, model, x, y):
    """(mean cross-entropy, accuracy) in eval mode (running statistics), bf16 autocast as in training."""
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).float()
    model.train()
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


class _Run:
    """One training run: model, AdamW, OneCycleLR, GradScaler, and what it measures; ``epoch(batches)`` trains one."""

    def __init__(self, torch, model, opt_cls, data, total_steps):
        self.torch, self.model, self.data = torch, model, data
        self.opt = opt_cls(model.parameters(), lr=MAX_LR, weight_decay=1e-2)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=MAX_LR, total_steps=total_steps)
        self.scaler = torch.amp.GradScaler("cpu")
        self.step_s, self.amp_s, self.curve, self.accs, self.wall_s = [], [], [], [], 0.0
        t_pre = [0.0]
        self.opt.register_step_pre_hook(lambda *a: t_pre.__setitem__(0, time.perf_counter()))
        self.opt.register_step_post_hook(lambda *a: self.step_s.append(time.perf_counter() - t_pre[0]))

    def epoch(self, batches):
        torch, (x_tr, y_tr, x_te, y_te) = self.torch, self.data
        t0 = time.perf_counter()
        losses = []
        for idx in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.model(x_tr[idx])
            loss = torch.nn.functional.cross_entropy(logits.float(), y_tr[idx])
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            t = time.perf_counter()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.amp_s.append(time.perf_counter() - t)
            self.sched.step()
            losses.append(loss.item())
        self.curve.append(float(np.mean(losses)))
        self.accs.append(_evaluate(torch, self.model, x_te, y_te)[1])
        self.wall_s += time.perf_counter() - t0

    def figures(self):
        train_loss, _ = _evaluate(self.torch, self.model, self.data[0], self.data[1])
        return {"curve": self.curve, "test_acc_curve": self.accs, "train_loss": train_loss, "test_acc": self.accs[-1],
                "step_us": 1e6 * float(np.median(self.step_s)), "amp_step_us": 1e6 * float(np.median(self.amp_s)),
                "wall_s": self.wall_s}


def _bn_times_us(torch, bn_classes, shapes, reps):
    """Median forward+backward time of fresh training-mode batch norms of each class on float32 inputs of
    ``shapes``, summed over the shapes; the classes take turns, so a busy moment of the machine hits both."""
    g = torch.Generator().manual_seed(0)
    total = {label: 0.0 for label in bn_classes}
    for shape in shapes:
        x = torch.randn(shape, generator=g).requires_grad_()
        dy = torch.randn(shape, generator=g)
        bns = {label: cls(shape[1]) for label, cls in bn_classes.items()}
        times = {label: [] for label in bn_classes}
        for _ in range(reps + 5):  # 5 warm-up calls
            for label, bn in bns.items():
                t = time.perf_counter()
                bn(x).backward(dy)
                times[label].append(time.perf_counter() - t)
        for label in bn_classes:
            total[label] += 1e6 * float(np.median(times[label][5:]))
    return total


def _plot(results, epochs, out_png) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"\nmatplotlib is not installed: skipping the PyTorch PNG ({DEMO_HINT})")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ep = np.arange(1, epochs + 1)
    for (label, r), style in zip(results.items(), ["-", "--"]):
        ax1.plot(ep, r["curve"], style, lw=2, label=f"{label} (final {r['train_loss']:.4f})")
        ax2.plot(ep, 100 * np.asarray(r["test_acc_curve"]), style, lw=2, label=f"{label} ({100 * r['test_acc']:.1f}%)")
    ax1.set_yscale("log")
    ax1.set_ylabel("mean train loss over the epoch (cross-entropy)")
    ax2.set_ylabel("test accuracy (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    fig.suptitle("CNN on scikit-learn digits, bf16 autocast + GradScaler, AdamW + OneCycleLR: optkern.torch vs torch",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def run(out_png: str, epochs: int = 15, quick: bool = False, seed: int = 0) -> dict | None:
    """Train both runs, print the table and the agreement line, write ``out_png``; return the figures (None and
    a one-line message when torch is not installed).  ``quick=True``: 2 epochs, fewer timing repeats (tests)."""
    try:
        import torch
    except ImportError:
        print(f"torch is not installed: skipping the PyTorch part ({TORCH_HINT})")
        return None
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import optkern
    import optkern.torch
    import optkern.torch.nn

    t_start = time.perf_counter()
    if quick:
        epochs = 2
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                              stratify=digits.target)
    mu, sd = x_tr.mean(), x_tr.std()  # one scale for all pixels: keeps the image's spatial structure
    data = (torch.from_numpy((x_tr - mu) / sd).reshape(-1, 1, 8, 8), torch.from_numpy(y_tr).long(),
            torch.from_numpy((x_te - mu) / sd).reshape(-1, 1, 8, 8), torch.from_numpy(y_te).long())
    rng = np.random.default_rng(seed)
    n_batches = len(y_tr) // BATCH  # full batches only (the few left over change each epoch)
    orders = [rng.permutation(len(y_tr))[:n_batches * BATCH].reshape(n_batches, BATCH) for _ in range(epochs)]

    torch.manual_seed(seed)
    base = _model(torch, torch.nn)
    models = {"optkern.torch": optkern.torch.nn.convert_batchnorm(copy.deepcopy(base)), "torch": base}
    opts = {"optkern.torch": optkern.torch.AdamW, "torch": torch.optim.AdamW}
    bns = {"optkern.torch": optkern.torch.nn.BatchNorm2d, "torch": torch.nn.BatchNorm2d}
    print(f"\nPyTorch {torch.__version__}: CNN on digits ({len(y_tr)} train / {len(y_te)} test), batch {BATCH}, "
          f"{epochs} epochs, bf16 autocast + GradScaler, AdamW (weight decay 1e-2) + OneCycleLR (max lr {MAX_LR:g}), "
          f"{torch.get_num_threads()} torch threads, optkern {optkern.cpu_isa()}")
    # warm-up (thread pools, oneDNN kernels) on throwaway copies, so that neither run pays it
    for label, model in models.items():
        _Run(torch, copy.deepcopy(model), opts[label], data, 3).epoch(orders[0][:3])

    # the two runs take turns, an epoch each, so that the machine's load varies alike for both
    runs = {label: _Run(torch, model, opts[label], data, epochs * len(orders[0])) for label, model in models.items()}
    for batches in orders:
        for r in runs.values():
            r.epoch(batches)
    results = {label: r.figures() for label, r in runs.items()}
    shapes = [(BATCH, 16, 8, 8), (BATCH, 32, 4, 4)]
    for label, us in _bn_times_us(torch, bns, shapes, reps=20 if quick else 300).items():
        results[label]["bn_us"] = us

    w = max(len(k) for k in results)
    print(f"\n| {'library':<{w}} | final train loss | test accuracy | optimizer step (median) | "
          f"scaler.step + update (median) | batch-norm fwd+bwd (median) | wall time |")
    print(f"|{'-' * (w + 2)}|-----------------:|--------------:|------------------------:|"
          f"------------------------------:|----------------------------:|----------:|")
    for label, r in results.items():
        print(f"| {label:<{w}} | {r['train_loss']:16.4f} | {100 * r['test_acc']:12.1f}% | {r['step_us']:20.1f} us | "
              f"{r['amp_step_us']:26.1f} us | {r['bn_us']:24.1f} us | {r['wall_s']:7.2f} s |")
    a, b = results["optkern.torch"], results["torch"]
    ratio = max(a["train_loss"], b["train_loss"]) / min(a["train_loss"], b["train_loss"])
    agree = abs(a["test_acc"] - b["test_acc"]) <= ACC_TOL and ratio <= LOSS_RATIO_TOL
    print(f"\nThe two runs {'agree' if agree else 'DO NOT agree'}: test accuracies differ by "
          f"{100 * abs(a['test_acc'] - b['test_acc']):.1f} points (tolerance {100 * ACC_TOL:.0f}), final train losses "
          f"by a factor {ratio:.2f} (tolerance {LOSS_RATIO_TOL}); bf16 convolutions and differently rounded kernels "
          f"make them drift apart, so they are close, not equal.")
    print(f"(final train loss: eval mode on the whole train split; optimizer step: opt.step() alone, inside "
          f"scaler.step; batch norm: the model's two layers, {shapes[0]} and {shapes[1]} float32, training mode; "
          f"wall time: the run's epochs with their test evaluations)")
    png = out_png if _plot(results, epochs, out_png) else None
    if png:
        print(f"wrote {png}")
    print(f"PyTorch part: {time.perf_counter() - t_start:.1f} s in all")
    return {"epochs": epochs, "agree": agree, "png": png, "runs": results}
