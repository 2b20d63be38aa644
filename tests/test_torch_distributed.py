"""Multi-process tests with torch.distributed (gloo, 2 processes on this machine, 127.0.0.1 only).

(a) optkern.torch.nn.SyncBatchNorm against the definition: torch.nn.BatchNorm2d in one process on the
    concatenation of the ranks' batches (torch's own SyncBatchNorm refuses CPU tensors in a distributed run; the
    test records its error).  Outputs and input gradients (each rank's slice), the sum over ranks of the local
    weight/bias gradients, running statistics and num_batches_tracked on every rank, eval outputs afterwards.
(b) A small CNN (conv, SyncBatchNorm, relu, max-pool, linear) in DistributedDataParallel, 20 AdamW steps, against
    the same model with torch.nn.BatchNorm2d trained in one process on the full batch (the same thing: DDP averages
    the ranks' gradients of their local mean losses, which is the gradient of the full batch's mean loss).
(c) L-BFGS on vectors split across the ranks (optkern.LBFGSHistory with allreduce=torch.distributed.all_reduce of
    pass 1's partial dot products) against one history over the full vectors.

Errors are ``max|a - ref| / max|ref|`` (tests/reference.py).  Tolerances, with the largest error measured:
(a) float64 1e-12 (8e-16), float32 1e-5 (2e-7); (b) float64 after 20 steps, losses and parameters/buffers 1e-12
(2e-16 and 5e-16, with optkern.torch.AdamW on the ranks and torch.optim.AdamW in the reference); (c) the direction
and its slope, float64 1e-12 (4e-16), float32 1e-6 (1e-7).

Each test spawns 2 workers with ``torch.multiprocessing.spawn`` and fails (killing them) if they are not done in
SPAWN_TIMEOUT_S; the workers are top-level functions (spawn pickles them by name) and write their results to a
file that the test compares.  These tests run once, on the best CPU path only, not per ISA as conftest would
repeat them: the kernels' per-ISA results are checked bitwise in tests/test_batch_norm.py.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (pip install torch==2.13.0) is needed for torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch was built without torch.distributed / gloo", allow_module_level=True)

import torch.distributed as dist
import torch.multiprocessing as mp

import optkern
import optkern.torch
import optkern.torch.nn as onn
from reference import rel_err

WORLD = 2
SPAWN_TIMEOUT_S = 60
# the ISA the last conftest parametrization runs (OPTKERN_CPU_ISA restricts the run to that one)
RUN_ISA = os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def once(cpu_isa):
    if cpu_isa != RUN_ISA:
        pytest.skip(f"multi-process test: run once, on the {RUN_ISA} path only (not once per CPU path)")


def err(a, b):
    return rel_err(a.detach().double().numpy(), b.detach().double().numpy())


# ---- process harness --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, timeout_s=SPAWN_TIMEOUT_S):
    """Run worker(rank, port, folder) in WORLD processes; -> the per-rank results they saved."""
    port = _free_port()
    ctx = mp.spawn(worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a worker raised
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{worker.__name__}: the {WORLD} workers did not finish within {timeout_s} s (killed)")
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _init(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # 2 processes on 2 cores
    optkern.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))


def _shard(n_per_rank, rank):
    start = sum(n_per_rank[:rank])
    return slice(start, start + n_per_rank[rank])


# ---- (a) SyncBatchNorm against BatchNorm on the concatenated batch ----------------------------------------------
SCENARIOS = [
    # name, dtype, per-rank batch sizes, channels_last, affine, momentum, explicit process group, input needs grad
    ("f64", torch.float64, (3, 5), False, True, 0.1, False, True),
    ("f64_channels_last_cumulative_group", torch.float64, (4, 2), True, True, None, True, True),
    ("f32", torch.float32, (3, 3), False, True, 0.3, False, True),
    ("f64_rank1_empty", torch.float64, (5, 0), False, True, 0.1, False, True),
    ("f64_not_affine", torch.float64, (2, 3), True, False, 0.1, False, True),
    ("f64_frozen_input", torch.float64, (3, 4), False, True, 0.1, False, False),
]
C, H, W, STEPS = 4, 3, 5, 2


def _scenario_data(rng, dtype, n_per_rank, affine, momentum):
    n = sum(n_per_rank)
    x = torch.from_numpy(rng.standard_normal((STEPS, n, C, H, W)) * 2 + 0.7).to(dtype)
    dy = torch.from_numpy(rng.standard_normal((STEPS, n, C, H, W))).to(dtype)
    ref = torch.nn.BatchNorm2d(C, affine=affine, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        if affine:
            ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)))
            ref.bias.copy_(torch.from_numpy(rng.standard_normal(C)))
        ref.running_mean.copy_(torch.from_numpy(rng.standard_normal(C)))
        ref.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, C)))
        ref.num_batches_tracked.fill_(2)
    return x, dy, ref


def sync_batch_norm_worker(rank, port, folder):
    _init(rank, port)
    try:
        data = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        out = {}
        # torch's own SyncBatchNorm in this run (CPU tensors, gloo): record what it does
        try:
            torch.nn.SyncBatchNorm(C)(torch.randn(4, C, 2, 2))
            out["torch_sync_error"] = None
        except ValueError as e:
            out["torch_sync_error"] = str(e)
        group = dist.new_group(list(range(WORLD)))  # every rank creates every group
        for name, dtype, n_per_rank, channels_last, affine, momentum, use_group, needs_grad in SCENARIOS:
            x_all, dy_all, state = data[name]
            m = onn.SyncBatchNorm(C, affine=affine, momentum=momentum, dtype=dtype,
                                  process_group=group if use_group else None)
            m.load_state_dict(state)
            sl = _shard(n_per_rank, rank)
            res = {"steps": []}
            for s in range(STEPS):
                x, dy = x_all[s, sl].clone(), dy_all[s, sl].clone()
                if channels_last:
                    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
                x.requires_grad_(needs_grad)
                m.zero_grad()
                y = m(x)
                y.backward(dy)
                res["steps"].append({"y": y.detach(), "dx": None if x.grad is None else x.grad,
                                     "dw": None if m.weight is None else m.weight.grad.clone(),
                                     "db": None if m.bias is None else m.bias.grad.clone(),
                                     "y_channels_last": y.is_contiguous(memory_format=torch.channels_last)})
            res["buffers"] = {k: v.clone() for k, v in m.named_buffers()}
            m.eval()  # eval: local, with the running statistics (no collective)
            with torch.no_grad():
                res["y_eval"] = m(x_all[0, sl])
            out[name] = res
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_matches_batch_norm_on_concatenated_batch(tmp_path):
    rng = np.random.default_rng(12)
    data, refs = {}, {}
    for name, dtype, n_per_rank, _, affine, momentum, _, _ in SCENARIOS:
        x, dy, ref = _scenario_data(rng, dtype, n_per_rank, affine, momentum)
        data[name] = (x, dy, ref.state_dict())
        refs[name] = ref
    torch.save(data, tmp_path / "inputs.pt")
    ranks = _spawn(sync_batch_norm_worker, tmp_path)
    assert "expected input tensor to be on GPU" in (ranks[0]["torch_sync_error"] or ""), \
        "torch's SyncBatchNorm now runs on CPU tensors: compare against it directly"
    for name, dtype, n_per_rank, channels_last, affine, _, _, needs_grad in SCENARIOS:
        x_all, dy_all, _ = data[name]
        ref, tol = refs[name], TOL[dtype]
        for s in range(STEPS):
            ref.zero_grad()
            x = x_all[s].clone().requires_grad_(needs_grad)
            y = ref(x)
            y.backward(dy_all[s])
            got = [r[name]["steps"][s] for r in ranks]
            what = f"{name} step {s}"
            assert err(torch.cat([g["y"] for g in got]), y) <= tol, f"{what}: y"
            if needs_grad:
                assert err(torch.cat([g["dx"] for g in got]), x.grad) <= tol, f"{what}: dx"
            else:
                assert all(g["dx"] is None for g in got)
            if affine:
                assert err(sum(g["dw"] for g in got), ref.weight.grad) <= tol, f"{what}: sum of weight grads"
                assert err(sum(g["db"] for g in got), ref.bias.grad) <= tol, f"{what}: sum of bias grads"
            else:
                assert all(g["dw"] is None and g["db"] is None for g in got)
            if channels_last:
                assert all(g["y_channels_last"] for g, n in zip(got, n_per_rank) if n), f"{what}: layout"
        ref.eval()
        for rank, r in enumerate(ranks):
            for k, b in ref.named_buffers():
                if k == "num_batches_tracked":
                    assert int(r[name]["buffers"][k]) == int(b) == 2 + STEPS, f"{name} rank {rank}: {k}"
                else:
                    assert err(r[name]["buffers"][k], b) <= tol, f"{name} rank {rank}: {k}"
            with torch.no_grad():
                y_eval = ref(x_all[0, _shard(n_per_rank, rank)])
            assert err(r[name]["y_eval"], y_eval) <= tol, f"{name} rank {rank}: eval output"


# ---- (b) DDP training of a small CNN ----------------------------------------------------------------------------
DDP_STEPS, DDP_BATCH, CLASSES, LR, WD = 20, 8, 5, 1e-2, 1e-2


def _cnn(dtype=torch.float64):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False, dtype=dtype),
        torch.nn.BatchNorm2d(6, dtype=dtype),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, CLASSES, dtype=dtype),
    )


def _adamw(params):
    # optimizer: optkern.torch.AdamW (issue 12) where optkern.torch has it, else torch.optim.AdamW
    cls = optkern.torch.AdamW if hasattr(optkern.torch, "AdamW") else torch.optim.AdamW
    return cls(params, lr=LR, weight_decay=WD)


def ddp_worker(rank, port, folder):
    _init(rank, port)
    try:
        data = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        model = onn.convert_batchnorm(_cnn(), sync=True)
        model.load_state_dict(data["state"])
        assert type(model[1]) is onn.SyncBatchNorm
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _adamw(ddp.parameters())
        half = slice(rank * DDP_BATCH // WORLD, (rank + 1) * DDP_BATCH // WORLD)
        losses = []
        for s in range(DDP_STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(data["x"][s, half]), data["t"][s, half])
            loss.backward()
            opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / WORLD)
        torch.save({"losses": losses, "state": model.state_dict(), "optimizer": type(opt).__module__},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_cnn_training_matches_single_process(tmp_path):
    torch.manual_seed(3)
    ref = _cnn()
    x = torch.randn(DDP_STEPS, DDP_BATCH, 3, 8, 8, dtype=torch.float64) * 1.5 + 0.3
    t = torch.randint(0, CLASSES, (DDP_STEPS, DDP_BATCH))
    torch.save({"state": ref.state_dict(), "x": x, "t": t}, tmp_path / "inputs.pt")
    ranks = _spawn(ddp_worker, tmp_path)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for s in range(DDP_STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(x[s]), t[s])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it trains
    for rank, r in enumerate(ranks):
        assert rel_err(r["losses"], losses) <= 1e-12, f"rank {rank}: losses {r['losses']} vs {losses}"
        for k, v in ref.state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert int(r["state"][k]) == int(v) == DDP_STEPS, k
            else:
                assert err(r["state"][k], v) <= 1e-12, f"rank {rank}: {k}"


# ---- (c) L-BFGS with vectors split across the ranks -------------------------------------------------------------
LB_N, LB_M, LB_PUSHES = 1001, 5, 8


def _lbfgs_problem(dtype):
    """Pairs (s, y = A s) of an SPD diagonal-plus-low-rank A, and gradients g, fixed by a seed."""
    rng = np.random.default_rng(21)
    d = rng.uniform(0.5, 4.0, LB_N)
    u = rng.standard_normal((LB_N, 3)) / np.sqrt(LB_N)
    pairs = []
    for _ in range(LB_PUSHES):
        s = rng.standard_normal(LB_N)
        pairs.append((s.astype(dtype), (d * s + u @ (u.T @ s)).astype(dtype)))
    gs = [rng.standard_normal(LB_N).astype(dtype) for _ in range(LB_PUSHES)]
    return pairs, gs


def _split(n, rank):
    edges = [0, n // 2, n]  # 500 and 501 elements
    return slice(edges[rank], edges[rank + 1])


def _torch_allreduce(flat):
    t = torch.from_numpy(np.array(flat, dtype=np.float64))
    dist.all_reduce(t)
    return t.numpy()


def lbfgs_worker(rank, port, folder):
    _init(rank, port)
    try:
        out = {}
        for dtype in (np.float64, np.float32):
            pairs, gs = _lbfgs_problem(dtype)
            sl = _split(LB_N, rank)
            n_local = sl.stop - sl.start
            h = optkern.LBFGSHistory(n_local, history_size=LB_M, dtype=dtype)
            dirs = []
            for (s, y), g in zip(pairs, gs):
                assert h.push(np.ascontiguousarray(s[sl]), np.ascontiguousarray(y[sl]), allreduce=_torch_allreduce)
                gl = np.ascontiguousarray(g[sl])
                d, gtd = h.direction_and_slope(gl, allreduce=_torch_allreduce)
                dirs.append((h.direction(gl, allreduce=_torch_allreduce), d, gtd))
            out[np.dtype(dtype).name] = dirs
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lbfgs_sharded_direction_matches_full(tmp_path):
    ranks = _spawn(lbfgs_worker, tmp_path)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        pairs, gs = _lbfgs_problem(dtype)
        h = optkern.LBFGSHistory(LB_N, history_size=LB_M, dtype=dtype)
        for k, ((s, y), g) in enumerate(zip(pairs, gs)):
            assert h.push(s, y)
            d_full, gtd_full = h.direction_and_slope(g)
            for rank, r in enumerate(ranks):
                d_plain, d, gtd = r[np.dtype(dtype).name][k]
                part = d_full[_split(LB_N, rank)]
                assert rel_err(d_plain, part) <= tol, f"{dtype.__name__} push {k} rank {rank}: direction"
                assert rel_err(d, part) <= tol, f"{dtype.__name__} push {k} rank {rank}: direction_and_slope"
                assert abs(gtd - gtd_full) <= tol * abs(gtd_full), f"{dtype.__name__} push {k}: slope"
        assert len(h) == LB_M  # the ring wrapped
