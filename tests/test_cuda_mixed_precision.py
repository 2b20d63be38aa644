"""16-bit training on CUDA (issue 14; run by bench/gpu_check.sh on a GPU machine, skipped elsewhere): the core of
test_mixed_precision.py on torch CUDA tensors (bfloat16 and float16) and CuPy arrays (float16 only: CuPy has no
bfloat16), with the same references (tests/mixed_reference.py: the float32 result against the float64 rule, the
stored 16-bit values bit for bit against the documented roundings of the CPU's float32 run), and the CUDA results
bit for bit equal to the CPU's: round to nearest even, "fp32" and "split" masters, stochastic rounding (same
Philox key: seed, step, tensor index, element index), the offload step with its copies; sizes that hit the
kernel's 8/16-byte packs, their tails and its 16384-element chunks, at aligned and odd offsets; the global norm of
16-bit grads; stochastic rounding with device step counters refused with nothing touched.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import optkern
from mixed_reference import (
    BF16, CASES, F32, HALF, MODES, CupyArrays, Mode, TorchArrays, assert_bits_equal, bits, check_steps,
)

if not optkern.cuda_available():
    pytest.skip("no CUDA device (or this optkern build has no CUDA kernels): CUDA mixed-precision checks skipped",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """The CPU side is checked on every path by test_mixed_precision.py: run the GPU checks under one value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def _device(lib: str, offset: int = 0):
    if lib == "torch":
        torch = pytest.importorskip("torch", reason="torch is needed for the torch CUDA bfloat16/float16 checks")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA device here (a CPU-only torch build?)")
        return TorchArrays("cuda", offset)
    cupy = pytest.importorskip("cupy", reason="CuPy is needed for the CuPy float16 checks")
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no driver, no device
        n = 0
    if n < 1:
        pytest.skip("CuPy sees no CUDA device")
    return CupyArrays(offset)


def _no_bf16(m: Mode) -> bool:
    return "bfloat16" not in (m.param, m.grad, m.state, m.copies)


TORCH_MODES = [Mode("bfloat16", "bfloat16"), Mode("float16", "float16", "float16"),
               Mode("bfloat16", "bfloat16", "bfloat16", master="fp32"), Mode("float16", "float16", master="fp32"),
               Mode("bfloat16", "bfloat16", master="split"), Mode("bfloat16", "bfloat16", sr=True),
               Mode("float16", "float16", "float16", sr=True), Mode("float32", "bfloat16", copies="bfloat16")]
CUPY_MODES = [m for m in MODES if _no_bf16(m)]
PAIRS = [("torch", m) for m in TORCH_MODES] + [("cupy", m) for m in CUPY_MODES]
SIZES = [3, 17, 16391]  # a pack tail, a short tensor, one past a 16384-element chunk


def _flat(out):
    """check_steps' (params, states, masters, copies) as one list of NumPy arrays."""
    params, states, masters, copies = out
    return list(params) + [a for lst in states for a in lst] + list(masters or []) + list(copies or [])


def _same(got, want, what):
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"{what}: CUDA vs CPU, array {k}")


def _run_both(name, mode, lib, sizes, offset=0, steps=3, seed=777):
    dev = _device(lib, offset)
    got = check_steps(CASES[name], mode, np.random.default_rng(seed), sizes, steps=steps, dev=dev)
    want = check_steps(CASES[name], mode, np.random.default_rng(seed), sizes, steps=steps)
    _same(got, want, f"{name} {mode.id}")


@pytest.mark.parametrize("lib,mode", PAIRS, ids=[f"{lib}-{m.id}" for lib, m in PAIRS])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_step_matches_reference_and_cpu(name, lib, mode):
    _run_both(name, mode, lib, SIZES)


TAIL_SIZES = [1, 7, 8, 9, 15, 16, 17, 1000, 16385, 40001]
TAIL_PAIRS = [("torch", "adam", Mode("bfloat16", "bfloat16", "bfloat16")),
              ("torch", "rmsprop_centered", Mode("bfloat16", "bfloat16", master="split")),
              ("torch", "adamw", Mode("bfloat16", "bfloat16", sr=True)),
              ("torch", "nadam", Mode("float32", "float16", copies="bfloat16")),
              ("cupy", "sgd_momentum", Mode("float16", "float16", "float16", master="fp32")),
              ("cupy", "rprop", Mode("float16", "float16", sr=True))]


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("lib,name,mode", TAIL_PAIRS, ids=[f"{lib}-{n}-{m.id}" for lib, n, m in TAIL_PAIRS])
def test_cuda_tails_and_odd_offsets(lib, name, mode, offset):
    """Sizes around the 8- and 16-byte packs and the chunks, views starting off the packs' alignment."""
    _run_both(name, mode, lib, TAIL_SIZES, offset=offset, steps=2)


def test_cuda_split_equals_fp32_over_50_steps():
    """The two master modes on the device keep the same float32 master for 50 steps (torch bfloat16)."""
    torch = pytest.importorskip("torch", reason="torch is needed for the torch CUDA bfloat16 checks")
    _device("torch")
    gen = torch.Generator(device="cuda").manual_seed(5)
    p0 = torch.randn(20011, device="cuda", generator=gen).to(torch.bfloat16)
    p_f, p_s = p0.clone(), p0.clone()
    m_f, m_s = optkern.init_masters([p_f], "fp32"), optkern.init_masters([p_s], "split")
    st_f = [torch.zeros(20011, device="cuda") for _ in range(2)]
    st_s = [torch.zeros(20011, device="cuda") for _ in range(2)]
    for t in range(1, 51):
        g = torch.randn(20011, device="cuda", generator=gen).to(torch.bfloat16)
        optkern.adam_step([p_f], [g], [st_f[0]], [st_f[1]], step=t, lr=1e-3, master_weights="fp32", masters=m_f)
        optkern.adam_step([p_s], [g], [st_s[0]], [st_s[1]], step=t, lr=1e-3, master_weights="split", masters=m_s)
    mv = optkern.master_values(p_s, m_s[0], "split")
    assert torch.equal(mv.view(torch.int32), m_f[0].view(torch.int32))
    assert torch.equal(p_f.view(torch.int16), m_f[0].to(torch.bfloat16).view(torch.int16))  # rne(master)
    assert not torch.equal(m_f[0], p0.float())


def test_cuda_stochastic_rounding_with_device_counter_refused():
    torch = pytest.importorskip("torch", reason="torch is needed for the torch CUDA bfloat16 checks")
    _device("torch")
    p = torch.randn(100, device="cuda").to(torch.bfloat16)
    g = torch.randn(100, device="cuda").to(torch.bfloat16)
    m, v = torch.zeros(100, device="cuda"), torch.zeros(100, device="cuda")
    count = torch.zeros(1, device="cuda")
    before = [x.clone() for x in (p, g, m, v, count)]
    with pytest.raises(ValueError, match="stochastic_rounding"):
        optkern.adam_step([p], [g], [m], [v], step=count, stochastic_rounding=True, seed=3)
    for a, b in zip((p, g, m, v, count), before):
        assert torch.equal(a, b)


def _number(dev, x) -> float:
    """A one-element device result (what CUDA grads give) as a float."""
    return float(x) if isinstance(x, (bool, int, float)) else float(np.asarray(dev.get(x)).reshape(-1)[0])


@pytest.mark.parametrize("lib,dtype", [("torch", "bfloat16"), ("torch", "float16"), ("cupy", "float16")])
def test_cuda_global_norm_of_16bit_grads_equals_cpu(lib, dtype):
    dev = _device(lib)
    rng = np.random.default_rng(11)
    sizes = [1, 17, 4097, 70001, 1025, 3]
    gs = [(3.0 * rng.standard_normal(n)).astype(HALF[dtype]) for n in sizes]
    d_gs = [dev.put(g) for g in gs]
    for norm_type in (2.0, math.inf):
        cpu = optkern.global_norm(gs, norm_type)
        got = _number(dev, optkern.global_norm(d_gs, norm_type))
        assert got == cpu, (norm_type, got, cpu)  # same order of operations on both (global_norm_api.h)
    r_cpu = optkern.clip_grad_norm(gs, max_norm=1.0)
    r_dev = optkern.clip_grad_norm(d_gs, max_norm=1.0)
    assert _number(dev, r_dev.total_norm) == r_cpu.total_norm
    assert _number(dev, r_dev.grad_multiplier) == np.float32(r_cpu.grad_multiplier)
    assert _number(dev, r_dev.found_inf) == 0.0


def test_cuda_bfloat16_grad_multiplier_from_device_clip():
    """The device clip coefficient (a float32 device array) folded into a bfloat16 step equals the CPU step with
    the same coefficient as a number."""
    dev = _device("torch")
    rng = np.random.default_rng(12)
    sizes = [5, 16391]
    ps = [rng.standard_normal(n).astype(BF16) for n in sizes]
    gs = [rng.standard_normal(n).astype(BF16) for n in sizes]
    ms = [np.zeros(n, F32) for n in sizes]
    vs = [np.zeros(n, F32) for n in sizes]
    d = [[dev.put(a) for a in lst] for lst in (ps, gs, ms, vs)]
    r = optkern.clip_grad_norm(d[1], max_norm=0.5)
    gm = _number(dev, r.grad_multiplier)
    assert gm < 1.0
    optkern.adam_step(*d, step=1, lr=0.01, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)
    optkern.adam_step(ps, gs, ms, vs, step=1, lr=0.01, grad_multiplier=gm)
    for lst, dlst in zip((ps, ms, vs), (d[0], d[2], d[3])):
        for a, b in zip(lst, dlst):
            assert_bits_equal(dev.get(b), a, "device clip vs host multiplier")
    assert bits(ps[0]).any()
