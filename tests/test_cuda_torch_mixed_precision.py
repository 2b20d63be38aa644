"""optkern.torch with bfloat16/float16 params on a CUDA device (issue 14): the same modes as
tests/test_torch_mixed_precision.py, against the CPU path (bitwise: both run the float32 rules between the same
precision.h roundings) and torch's fused CUDA Adam.  Skipped without a CUDA device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import optkern
import optkern.torch as okt

if not (torch.cuda.is_available() and optkern.cuda_available()):
    pytest.skip("no CUDA device (or optkern built without CUDA): the 16-bit torch CUDA paths need one",
                allow_module_level=True)

SIZES = (1, 7, 33, 1000, 4099, 65537)
MODES = {"param": dict(state_dtype="param"), "f32": {}, "fp32": dict(master_weights="fp32"),
         "split": dict(master_weights="split"), "sr": dict(stochastic_rounding=True, seed=11)}


@pytest.fixture
def gen(rng):
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def _bits(t):
    return t.detach().cpu().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _run(name, device, ps0, grads, kw, copies=False):
    ps = [torch.nn.Parameter(p.detach().clone().to(device)) for p in ps0]
    opt = getattr(okt, name)(ps, lr=1e-2, **kw)
    cps = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps] if copies else None
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(device)
        opt.step(param_copies=cps and [cps])
    torch.cuda.synchronize()
    return ps, opt, cps


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "NAdam"])
def test_cuda_equals_cpu_bitwise(name, mode, gen):
    ps0 = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES]
    grads = [[torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES] for _ in range(5)]
    pc, oc, _ = _run(name, "cpu", ps0, grads, MODES[mode])
    pg, og, _ = _run(name, "cuda", ps0, grads, MODES[mode])
    for i, (a, b) in enumerate(zip(pc, pg)):
        assert torch.equal(_bits(a), _bits(b)), f"{name} {mode} param {i}"
        for k, v in oc.state[a].items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert torch.equal(_bits(v), _bits(og.state[b][k])), f"{name} {mode} {k}[{i}]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_adam_param_state_vs_torch_fused(dtype, gen):
    """torch's fused CUDA Adam keeps state in the param dtype; measured against it within 1 ulp of the 16-bit
    type (its CUDA kernel may contract multiply-adds differently from the CPU's)."""
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype).cuda()) for n in SIZES]
    pt = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ok = okt.Adam(ps, lr=1e-2, state_dtype="param")
    tt = torch.optim.Adam(pt, lr=1e-2, fused=True)
    mant = 7 if dtype == torch.bfloat16 else 10
    for _ in range(10):
        for p, q in zip(ps, pt):
            g = torch.randn(p.shape, generator=gen).to(dtype).cuda()
            p.grad, q.grad = g, g.clone()
        before = [q.detach().clone() for q in pt]
        ok.step()
        tt.step()
        for p, q, b in zip(ps, pt, before):
            ref = torch.maximum(q.detach().double().abs(), b.double().abs())
            ulp = torch.pow(2.0, torch.floor(torch.log2(torch.clamp(ref, min=2.0 ** -24))) - mant)
            assert bool(((p.detach().double() - q.detach().double()).abs() <= ulp).all())
        with torch.no_grad():  # resync: per-step error
            for p, q in zip(ps, pt):
                p.copy_(q)
                for k in ("exp_avg", "exp_avg_sq"):
                    ok.state[p][k].copy_(tt.state[q][k])


def test_cuda_offload_copies_and_found_inf(gen):
    ps0 = [torch.randn(n, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(3)]
    pg, og, cps = _run("Adam", "cuda", ps0, grads, {}, copies=True)
    for p, c in zip(pg, cps):
        assert torch.equal(_bits(c), _bits(p.detach().to(torch.bfloat16)))
    before = [p.detach().clone() for p in pg]
    for p in pg:
        p.grad = torch.randn(p.shape, device="cuda")
    og.grad_scale, og.found_inf = torch.tensor(2.0, device="cuda"), torch.tensor(1.0, device="cuda")
    og.step(param_copies=[cps])
    for p, b in zip(pg, before):
        assert torch.equal(p.detach(), b)


def test_stochastic_rounding_refused_under_graph_capture():
    """A captured step would freeze the rounding's step key (every replay the same random numbers): refused before
    anything is enqueued, and the eager step still works."""
    p = torch.randn(1000, device="cuda").to(torch.bfloat16)
    g = torch.randn(1000, device="cuda").to(torch.bfloat16)
    m, v = torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda")
    optkern.adam_step([p], [g], [m], [v], step=1, stochastic_rounding=True, seed=3)  # warm-up: the plan exists
    before = p.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="stochastic_rounding"), torch.cuda.graph(graph):
        optkern.adam_step([p], [g], [m], [v], step=2, stochastic_rounding=True, seed=3)
    torch.cuda.synchronize()
    assert torch.equal(p, before)
