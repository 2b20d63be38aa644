"""optkern.torch on CUDA tensors (run by bench/gpu_check.sh on a GPU machine; skipped elsewhere).

The optimizers against torch.optim on the same CUDA tensors (float32 and float64, 30 steps, sizes hitting the
kernel's 16-byte packs and tails), on a non-default stream (the step must be ordered on
torch.cuda.current_stream()), with GradScaler("cuda") against torch's fused Adam/AdamW, and the batch-norm
modules against torch.nn on CUDA.
"""

import os

import pytest

import optkern

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")

if not (torch.cuda.is_available() and optkern.cuda_available()):
    pytest.skip("no CUDA device (or optkern built without CUDA kernels) on this machine", allow_module_level=True)

import optkern.torch as okt  # noqa: E402

NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop"]
KW = {"SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "Adam": dict(amsgrad=True, weight_decay=0.1),
      "RMSprop": dict(centered=True, momentum=0.5), "NAdam": dict(decoupled_weight_decay=True, weight_decay=0.1)}
SHAPES = [(1,), (7,), (33, 17), (4099,), (8, 3, 3, 3)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """CUDA kernels do not depend on the CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def _pair(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = [torch.randn(s, dtype=dtype, device="cuda", generator=g).requires_grad_() for s in SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    return a, b


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_on_a_side_stream(name, dtype):
    a, b = _pair(dtype)
    oa = getattr(okt, name)(a, **KW.get(name, {}))
    ob = getattr(torch.optim, name)(b, foreach=False, **KW.get(name, {}))
    side = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(30):
        for p, q in zip(a, b):
            q.grad = torch.randn(q.shape, dtype=dtype, device="cuda", generator=g)
            p.grad = q.grad.clone()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # optkern's kernel must run on the current (side) stream
            oa.step()
        torch.cuda.current_stream().wait_stream(side)
        ob.step()
    torch.cuda.synchronize()
    for p, q in zip(a, b):
        assert _rel(p.detach(), q.detach()) <= TOL[dtype]
    for p, q in zip(a, b):
        for k, v in ob.state[q].items():
            mine = oa.state[p][k]
            if k == "step":
                assert float(mine) == float(v)
            else:
                assert mine.device == v.device and _rel(mine.double(), v.double()) <= TOL[dtype] * 10, k


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_grad_scaler_against_torch_fused(name):
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    model_b = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    model_b.load_state_dict(model_a.state_dict())
    oa = getattr(okt, name)(model_a.parameters(), lr=1e-2)
    ob = getattr(torch.optim, name)(model_b.parameters(), lr=1e-2, fused=True)
    sa, sb = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    x, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda")
    for it in range(12):
        for m, o, s in ((model_a, oa, sa), (model_b, ob, sb)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            s.scale(loss).backward()
            if it == 5:  # an overflowing step: skipped by both, the scale backs off
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert sa.get_scale() == sb.get_scale()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert _rel(p.detach(), q.detach()) <= 2e-5
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == 11


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_module_on_cuda(channels_last):
    import optkern.torch.nn as oknn

    torch.manual_seed(0)
    a, b = oknn.BatchNorm2d(8).cuda(), torch.nn.BatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 5, 7, device="cuda") * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.cuda.synchronize()
    assert _rel(ya.detach(), yb.detach()) <= 1e-5
    assert _rel(xa.grad, xb.grad) <= 1e-4
    assert _rel(a.weight.grad, b.weight.grad) <= 1e-4
    assert _rel(a.running_var, b.running_var) <= 1e-5
