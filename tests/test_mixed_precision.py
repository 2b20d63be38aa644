"""16-bit training through the functional layer (issue 14): bfloat16/float16 params, grads and states, float32
masters ("fp32"), split masters ("split"), stochastic rounding, the offload step (float32 params, 16-bit grads,
16-bit param copies), the 16-bit conversions themselves, the global norm of 16-bit grads, bad input, and torch
CPU tensors through DLPack.

Every step is checked against tests/mixed_reference.py: the float32 result against the float64 rule within
F32_ULPS (4) float32 roundings, and every stored 16-bit value bit for bit against the documented rounding of that
float32 result (see that module's docstring).  conftest.py runs each test on every CPU instruction-set path; the
tests that compare the paths (or thread counts) with each other run once and force each path themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import optkern
from conftest import AVAILABLE_ISAS
from mixed_reference import (
    BF16, CASES, F16, F32, HALF, MODES, NP_DTYPE, U32, Mode, TorchArrays, assert_bits_equal, bits, check_steps,
    neighbours, rne, split_halves, split_master, sr_round, sr_words,
)
from optkern import _C

# ---- every optimizer in every mode -------------------------------------------------------------------------------
SIZES = [5, 1030]  # two tensors (stochastic rounding keys on the tensor's index), one past two tiles of 512


@pytest.mark.parametrize("mode", MODES, ids=[m.id for m in MODES])
@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_reference(name, mode, rng):
    check_steps(CASES[name], mode, rng, SIZES, steps=3)


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "rprop"])
@pytest.mark.parametrize("mode", [Mode("bfloat16", "bfloat16", "bfloat16"), Mode("float16", "float16", sr=True),
                                  Mode("bfloat16", "bfloat16", master="split"),
                                  Mode("float32", "bfloat16", copies="bfloat16")], ids=lambda m: m.id)
def test_grad_multiplier_folded_into_16bit_step(name, mode, rng):
    """A clip coefficient (or AMP unscale) multiplies the widened gradient inside the float32 math."""
    check_steps(CASES[name], mode, rng, SIZES, steps=2, gm=0.37)


def test_nadam_and_sgd_at_later_steps(rng):
    """Step counts past the first (bias corrections, SGD's first-step buffer, NAdam's product) at t = 40."""
    for name in ("nadam", "sgd_momentum", "adam"):
        check_steps(CASES[name], Mode("bfloat16", "bfloat16", "bfloat16"), rng, SIZES, steps=2, first_step=40)


# ---- "split" masters are the "fp32" masters, bit for bit -------------------------------------------------------
@pytest.mark.parametrize("state", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "rmsprop_centered"])
def test_split_master_equals_fp32_master_over_50_steps(name, state, rng):
    case = CASES[name]
    sizes = [3, 1029]
    p0 = [rng.standard_normal(n).astype(BF16) for n in sizes]
    st0 = [[] for _ in range(case.nstates)]
    for n in sizes:
        for k, s in enumerate(case.init(rng, n)):
            st0[k].append(s.astype(NP_DTYPE[state]))
    p_f, p_s = [p.copy() for p in p0], [p.copy() for p in p0]
    s_f, s_s = [[a.copy() for a in lst] for lst in st0], [[a.copy() for a in lst] for lst in st0]
    m_f = optkern.init_masters(p_f, "fp32")
    m_s = optkern.init_masters(p_s, "split")
    for m, p in zip(m_f, p0):
        assert m.dtype == F32 and np.array_equal(bits(m), bits(p.astype(F32)))
    for r in m_s:
        assert r.dtype == np.int16 and not r.any()  # a bfloat16 value is its own master: low half 0
    moved = 0
    for t in range(1, 51):
        grads = [rng.standard_normal(n).astype(BF16) for n in sizes]
        case.call(p_f, grads, s_f, t, master_weights="fp32", masters=m_f)
        case.call(p_s, grads, s_s, t, master_weights="split", masters=m_s)
        for i in range(len(sizes)):
            assert_bits_equal(optkern.master_values(p_s[i], m_s[i], "split"), m_f[i], f"step {t} master[{i}]")
            assert_bits_equal(p_f[i], rne(m_f[i], "bfloat16"), f"step {t} fp32 param[{i}] = rne(master)")
            hi, lo = split_halves(m_f[i])
            assert_bits_equal(p_s[i], hi, f"step {t} split param[{i}] = high half")
            assert_bits_equal(m_s[i], lo, f"step {t} residual[{i}] = low half")
        for k in range(case.nstates):
            for a, b in zip(s_f[k], s_s[k]):
                assert_bits_equal(a, b, f"step {t} state {k}")
    for i in range(len(sizes)):
        moved += int(np.count_nonzero(bits(m_f[i]) != bits(p0[i].astype(F32))))
        # the split param truncates where the fp32 param rounds: they differ somewhere after 50 steps
        assert np.any(bits(p_f[i]) != bits(p_s[i])) or sizes[i] < 10
    assert moved > 0


# ---- stochastic rounding -----------------------------------------------------------------------------------------
@pytest.fixture
def once(cpu_isa):
    """Tests that force every CPU path (or thread count) themselves run under one fixture value."""
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip(f"compares every CPU path itself: runs once (under {AVAILABLE_ISAS[-1]})")


@pytest.fixture
def restore_cpu():
    isa, nt = optkern.cpu_isa(), optkern.get_num_threads()
    yield
    optkern.set_cpu_isa(isa)
    optkern.set_num_threads(nt)


def _isas():
    order = ("scalar", "avx2", "avx512")
    best = optkern.cpu_best_isa()
    return [i for i in order if order.index(i) <= order.index(best)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["adam", "rprop"])
def test_stochastic_rounding_reproducible_across_isas_threads_runs(name, dtype, once, restore_cpu):
    """> 2**16 elements, so that two threads split the work; each configuration is also checked against the
    reference (check_steps), and all end bitwise equal."""
    sizes = [70001, 2**17 + 13, 3]
    mode = Mode(dtype, dtype, sr=True)
    results = {}
    for isa in _isas():
        for nt in (1, 2):
            for run in ((0, 1) if (isa, nt) == ("scalar", 1) else (0,)):
                optkern.set_cpu_isa(isa)
                optkern.set_num_threads(nt)
                assert (optkern.cpu_isa(), optkern.get_num_threads()) == (isa, nt)
                out = check_steps(CASES[name], mode, np.random.default_rng(7), sizes, steps=1, seed=2**63 + 5)
                results[(isa, nt, run)] = out[0]
    first_key = next(iter(results))
    for key, ps in results.items():
        for i, (a, b) in enumerate(zip(ps, results[first_key])):
            assert_bits_equal(a, b, f"{key} vs {first_key}: params[{i}]")


def test_stochastic_rounding_depends_on_seed_step_and_tensor(rng):
    """Same float32 values, different keys: different roundings (and each one is the keyed reference's)."""
    x = (1.0 + rng.uniform(0.2, 0.8, 4096) * 2.0**-7).astype(F32)  # never a bfloat16: always a coin toss
    outs = {}
    for key in [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 1, 1), (2**64 - 1, 2**32 - 1, 7)]:
        out = np.zeros(x.size, np.uint16)
        _C._convert_half(x, out, "bfloat16", 2, *key, 0)
        assert_bits_equal(out, sr_round(x, "bfloat16", sr_words(*key, np.arange(x.size))), f"key {key}")
        outs[key] = out
    keys = list(outs)
    for a in keys:
        for b in keys:
            if a < b:
                assert np.count_nonzero(outs[a] != outs[b]) > 1000, (a, b)  # ~half of 4096 differ


def test_philox_known_answers():
    """The reference's Philox4x32-10 against Random123's known-answer vectors (kat_vectors)."""
    from mixed_reference import philox4x32_10

    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        assert tuple(int(w) for w in philox4x32_10(*ctr, *key)) == want


SR_VALUES = {  # (dtype, class) -> float32 values that are not 16-bit values
    ("bfloat16", "normal"): [1.0 + 0.3 * 2.0**-7, -3.7e5, 2.5e-30],
    ("bfloat16", "subnormal"): [1.0e-39, -3.3e-40, 1.3 * 2.0**-126],
    ("float16", "normal"): [1.0 + 0.7 * 2.0**-10, -1234.567, 6.5e-5],
    ("float16", "subnormal"): [3.3e-6, -4.1e-7, 0.25 * 2.0**-24],
}


@pytest.mark.parametrize("vary", ["index", "seed"])
@pytest.mark.parametrize("dtype,cls", list(SR_VALUES))
def test_stochastic_rounding_unbiased(dtype, cls, vary):
    """The mean of 10**4 roundings of one float32 value is within 4 standard errors of it (the roundings differ
    by element index, or by seed), and each is one of its two 16-bit neighbours."""
    n = 10_000
    for v in SR_VALUES[(dtype, cls)]:
        x = np.float32(v)
        tz, aw = (float(a[0]) for a in neighbours(np.array([x]), dtype))
        assert tz != aw, f"{v} is a {dtype} value: nothing to round"
        if vary == "index":
            out = np.zeros(n, np.uint16)
            _C._convert_half(np.full(n, x, F32), out, dtype, 2, 99, 3, 0, 0)
        else:
            out = np.zeros(n, np.uint16)
            one = np.array([x], F32)
            for s in range(n):
                _C._convert_half(one, out[s:s + 1], dtype, 2, s, 3, 0, 12345)
        vals = out.view(HALF[dtype]).astype(np.float64)
        assert np.all((vals == tz) | (vals == aw)), f"{v}: a rounding that is not a neighbour"
        p = (float(x) - tz) / (aw - tz)
        se = abs(aw - tz) * math.sqrt(p * (1 - p) / n)
        assert abs(vals.mean() - float(x)) <= 4 * se, f"{dtype} {v}: mean {vals.mean()!r}, se {se:.3g}"


# ---- the conversions themselves (op 0 = widen, 1 = round to nearest even, 2 = stochastic) ----------------------
def _op(x, dtype, op, seed=0, step=0, tensor=0, index0=0):
    if op == 0:
        out = np.zeros(x.size, F32)
    else:
        out = np.zeros(x.size, np.uint16)
    _C._convert_half(np.ascontiguousarray(x), out, dtype, op, seed, step, tensor, index0)
    return out if op == 0 else out.view(HALF[dtype])


def _finite_f32(rng, n):
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(F32)
    return x[np.isfinite(x)]


def _ties(rng, dtype, n=100_000):
    """float32 values exactly halfway between two adjacent finite 16-bit values (subnormals included)."""
    h = rng.integers(0, 0x7F7F if dtype == "bfloat16" else 0x7BFF, n).astype(np.uint16)
    h[:64] = np.arange(64)  # the smallest (subnormal) values
    lo = h.view(HALF[dtype]).astype(np.float64)
    hi = (h + 1).astype(np.uint16).view(HALF[dtype]).astype(np.float64)
    mid = ((lo + hi) / 2).astype(F32)
    assert np.all(mid.astype(np.float64) == (lo + hi) / 2)  # exact in float32
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(F32)
    return mid * sign


def _f16_subnormal_range(rng, n=100_000):
    mag = 2.0 ** rng.uniform(-27, -14, n)
    x = (mag * np.where(rng.random(n) < 0.5, -1, 1)).astype(F32)
    edges = np.array([2.0**-25, np.nextafter(np.float32(2.0**-25), np.float32(1)), 2.0**-24, 1.5 * 2.0**-24,
                      2.0**-14 - 2.0**-25, 2.0**-14], F32)
    return np.concatenate([x, edges, -edges])


def _f32_subnormals(rng, n=100_000):
    u = rng.integers(1, 0x800000, n).astype(np.uint32) | np.where(rng.random(n) < 0.5, 0x80000000, 0).astype(np.uint32)
    return u.view(F32)


@pytest.mark.parametrize("cls", ["random_bits", "ties", "overflow", "subnormals", "inf"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_to_nearest_even_matches_ml_dtypes_numpy(dtype, cls, rng):
    if cls == "random_bits":
        x = _finite_f32(rng, 1 << 20)
    elif cls == "ties":
        x = _ties(rng, dtype)
    elif cls == "overflow":
        if dtype == "float16":
            x = np.array([65504.0, np.nextafter(np.float32(65520), np.float32(0)), 65520.0,
                          np.nextafter(np.float32(65520), np.float32(np.inf)), 65536.0, 1e5, 3.4e38], F32)
            want = np.array([0x7BFF, 0x7BFF, 0x7C00, 0x7C00, 0x7C00, 0x7C00, 0x7C00], np.uint16)
        else:
            x = np.array([0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F7E8000], np.uint32).view(F32)
            want = np.array([0x7F7F, 0x7F7F, 0x7F80, 0x7F80, 0x7F7E], np.uint16)  # last: a tie to even, down
        x = np.concatenate([x, -x])
        want = np.concatenate([want, want | 0x8000])
        assert_bits_equal(_op(x, dtype, 1), want.view(HALF[dtype]), "the overflow boundary (IEEE)")
    elif cls == "subnormals":
        x = np.concatenate([_f32_subnormals(rng)] + ([_f16_subnormal_range(rng)] if dtype == "float16" else []))
    else:
        x = np.array([np.inf, -np.inf, 0.0, -0.0], F32)
    assert_bits_equal(_op(x, dtype, 1), rne(x, dtype), f"{dtype} {cls}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nan_stays_nan(dtype, rng):
    """Round to nearest and stochastic rounding keep a NaN a NaN, of the same sign (any payload)."""
    payload = rng.integers(1, 0x800000, 10_000).astype(np.uint32)
    payload[:3] = [1, 0x400000, 0x7FFFFF]  # the smallest signalling payload, the canonical quiet NaN, the largest
    u = np.concatenate([0x7F800000 | payload, 0xFF800000 | payload]).astype(np.uint32)
    x = u.view(F32)
    for op in (1, 2):
        out = _op(x, dtype, op, seed=5)
        assert np.all(np.isnan(out.astype(F32))), f"op {op}: a NaN lost"
        assert np.array_equal(bits(out) >> 15, (u >> 31).astype(np.uint16)), f"op {op}: a NaN's sign"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_widening_is_exact_for_all_65536_patterns(dtype):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = _op(h, dtype, 0)
    gb = bits(got)
    if dtype == "bfloat16":  # exactly the bits shifted (NaN payloads included)
        assert_bits_equal(got, (h.astype(np.uint32) << 16).view(F32), "bfloat16 -> float32")
    nan = np.isnan(h.view(HALF[dtype]).astype(F32))
    assert_bits_equal(got[~nan], h[~nan].view(HALF[dtype]).astype(F32), f"{dtype} -> float32")
    assert np.all(np.isnan(got[nan])) and np.array_equal(gb[nan] >> 31, (h[nan] >> 15).astype(np.uint32))
    if dtype == "float16":  # NaN made quiet (as F16C's VCVTPH2PS)
        assert np.all(gb[nan] & 0x400000)
    # and back: every finite 16-bit value rounds to itself
    fin = ~nan
    assert_bits_equal(_op(got[fin], dtype, 1), h[fin].view(HALF[dtype]), "round trip")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_matches_its_definition(dtype, rng):
    """op 2 on every float32 class (random bits, f16/f32 subnormals, ties, values beyond float16's range) against
    the reference's definition (mixed_reference.sr_round), with a key of every field large."""
    x = np.concatenate([_finite_f32(rng, 1 << 18), _f32_subnormals(rng, 20000), _ties(rng, dtype, 20000),
                        _f16_subnormal_range(rng, 20000), np.array([65504, 65519, 65535.9, 65536, 1e6], F32)])
    key = (0xDEADBEEF12345678, 0xFFFFFFFE, 11, 2**40 + 3)
    got = _op(x, dtype, 2, *key)
    assert_bits_equal(got, sr_round(x, dtype, sr_words(*key[:3], key[3] + np.arange(x.size, dtype=np.uint64))),
                      f"{dtype} stochastic rounding")
    fin = np.isfinite(got.astype(F32))
    tz, aw = neighbours(x[fin], dtype)
    g = bits(got[fin])
    assert np.all((g == bits(tz)) | (g == bits(aw)))


def test_conversions_identical_on_every_isa(once, restore_cpu, rng):
    u = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    u[:6] = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001, 0x80000000]
    x = np.concatenate([u.view(F32), _f32_subnormals(rng, 5000), _f16_subnormal_range(rng, 5000)])
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    for dtype in ("bfloat16", "float16"):
        res = {}
        for isa in _isas():
            optkern.set_cpu_isa(isa)
            res[isa] = [_op(h, dtype, 0), _op(x, dtype, 1), _op(x, dtype, 2, 3, 4, 5, 6), _op(x[1:], dtype, 2, 3, 4)]
        for isa, outs in res.items():
            for k, (a, b) in enumerate(zip(outs, res["scalar"])):
                assert_bits_equal(a, b, f"{dtype} op #{k}: {isa} vs scalar")


# ---- sizes and offsets that hit the SIMD and tile tails, on every CPU path ----------------------------------------
TAIL_SIZES = [0, 1, 7, 15, 17, 63, 513, 1025, 4097]
TAIL_MODES = {
    "adam-bf16-state-bf16": ("adam", Mode("bfloat16", "bfloat16", "bfloat16")),
    "sgd_momentum-f16-state-f16": ("sgd_momentum", Mode("float16", "float16", "float16")),
    "adamw-f16-fp32": ("adamw", Mode("float16", "float16", master="fp32")),
    "rmsprop_centered-split": ("rmsprop_centered", Mode("bfloat16", "bfloat16", master="split")),
    "adam-bf16-sr": ("adam", Mode("bfloat16", "bfloat16", sr=True)),
    "rprop-f16-sr": ("rprop", Mode("float16", "float16", "float16", sr=True)),
    "nadam-offload-copies": ("nadam", Mode("float32", "bfloat16", copies="float16")),
    "adagrad-offload": ("adagrad", Mode("float32", "float16")),
}


class Placer:
    """Puts each array at element offset ``off`` of a larger buffer whose other elements are a sentinel pattern
    (checked afterwards: nothing is written outside the array)."""

    def __init__(self, off: int):
        self.off, self.bufs = off, []

    def __call__(self, a):
        a = np.asarray(a)
        buf = np.empty(a.size + self.off + 9, a.dtype)
        bits(buf)[...] = 0x7FC1 if a.dtype.itemsize == 2 else 0x7FC00001
        view = buf[self.off:self.off + a.size]
        view[...] = a
        self.bufs.append((buf, view, bits(buf).copy()))
        return view

    def check(self):
        for buf, view, before in self.bufs:
            mask = np.ones(buf.size, bool)
            mask[self.off:self.off + view.size] = False
            assert np.array_equal(bits(buf)[mask], before[mask]), "written outside the array"


@pytest.mark.parametrize("off", [0, 1, 3])
@pytest.mark.parametrize("key", list(TAIL_MODES))
def test_tails_and_odd_offsets(key, off, rng):
    name, mode = TAIL_MODES[key]
    place = Placer(off)
    check_steps(CASES[name], mode, rng, TAIL_SIZES, steps=2, place=place)
    if off % 2:  # the 16-bit arrays really start off their 4-byte (and SIMD) alignment
        assert any(v.ctypes.data % 4 == 2 for _, v, _ in place.bufs if v.dtype.itemsize == 2 and v.size)
    place.check()


# ---- the global norm of 16-bit grads (float32 lanes of <= 16 values, joined in float64) ---------------------------
#: |norm - exact| <= GN_ULPS * U32 * exact: 16 float32 roundings per lane sum (squares and adds) halved by the sqrt
GN_ULPS = 9
GN_SIZES = [0, 1, 17, 4097, 70001, 1025, 3]


def _grads16(rng, dtype, sizes=GN_SIZES, scale=1.0):
    return [(scale * rng.standard_normal(n)).astype(HALF[dtype]) for n in sizes]


@pytest.mark.parametrize("scale", [1.0, 1e-3, 30.0, 5000.0])  # 5000: squares far beyond float16
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_global_norm_of_16bit_grads(dtype, scale, rng):
    gs = _grads16(rng, dtype, scale=scale)
    flat = np.concatenate([g.astype(np.float64) for g in gs])
    want = float(np.sqrt(np.sum(flat * flat)))
    got = optkern.global_norm(gs)
    assert abs(got - want) <= GN_ULPS * U32 * want, f"{got!r} vs {want!r}: {abs(got - want) / want / U32:.2f} u"
    assert optkern.global_norm(gs, math.inf) == float(np.max(np.abs(flat)))
    r = optkern.clip_grad_norm(gs, max_norm=0.5 * want)
    assert r.total_norm == got and r.found_inf is False
    assert r.grad_multiplier == min(1.0, 0.5 * want / (got + 1e-6))
    assert abs(r.grad_multiplier - 0.5 * want / (want + 1e-6)) <= GN_ULPS * U32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_global_norm_nonfinite_16bit(dtype, rng):
    gs = _grads16(rng, dtype)
    gs[3][100] = np.inf
    assert optkern.global_norm(gs) == math.inf and optkern.clip_grad_norm(gs, 1.0).found_inf is True
    gs[4][7] = np.nan
    assert math.isnan(optkern.global_norm(gs))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_global_norm_identical_on_every_isa_and_thread_count(dtype, once, restore_cpu, rng):
    gs = _grads16(rng, dtype, sizes=GN_SIZES + [2**17 + 5])
    res = {}
    for isa in _isas():
        for nt in (1, 2):
            optkern.set_cpu_isa(isa)
            optkern.set_num_threads(nt)
            res[(isa, nt)] = (optkern.global_norm(gs), optkern.global_norm(gs, math.inf))
    assert len(set(res.values())) == 1, res


# ---- bad input: a clear error naming the argument, nothing touched -------------------------------------------------
def _adam_args(rng, p="bfloat16", g=None, s="float32", sizes=(6, 9)):
    ps = [rng.standard_normal(n).astype(NP_DTYPE.get(p, p)) for n in sizes]
    gs = [rng.standard_normal(n).astype(NP_DTYPE.get(g or p, g or p)) for n in sizes]
    ms = [rng.standard_normal(n).astype(NP_DTYPE[s]) for n in sizes]
    vs = [np.abs(rng.standard_normal(n)).astype(NP_DTYPE[s]) for n in sizes]
    return ps, gs, ms, vs


def _bad_grad16_f64(rng):
    ps, gs, ms, vs = _adam_args(rng, p=np.float64)
    gs[1] = gs[1].astype(BF16)
    return (ps, gs, ms, vs), {}


def _bad_bf16_grads_f16_params(rng):
    ps, gs, ms, vs = _adam_args(rng, p="float16", g="bfloat16")
    return (ps, gs, ms, vs), {}


def _bad_split_f16(rng):
    ps, gs, ms, vs = _adam_args(rng, p="float16")
    return (ps, gs, ms, vs), dict(master_weights="split", masters=[np.zeros(p.shape, np.int16) for p in ps])


def _bad_residual(dtype):
    def make(rng):
        a = _adam_args(rng)
        masters = [np.zeros(a[0][0].shape, np.int16), np.zeros(a[0][1].shape, dtype)]
        return a, dict(master_weights="split", masters=masters)
    return make


def _bad_fp32_master_dtype(rng):
    a = _adam_args(rng)
    return a, dict(master_weights="fp32", masters=[p.astype(F32) for p in a[0][:1]] + [a[0][1].copy()])


def _bad_master_shape(rng):
    a = _adam_args(rng)
    return a, dict(master_weights="fp32", masters=[a[0][0].astype(F32), np.zeros(5, F32)])


def _bad_sr_with_master(rng):
    a = _adam_args(rng)
    return a, dict(master_weights="fp32", masters=[p.astype(F32) for p in a[0]], stochastic_rounding=True)


def _bad_masters_without_mode(rng):
    a = _adam_args(rng)
    return a, dict(masters=[p.astype(F32) for p in a[0]])


def _bad_mode_without_masters(rng):
    return _adam_args(rng), dict(master_weights="fp32")


def _bad_copies_for_16bit(rng):
    a = _adam_args(rng)
    return a, dict(param_copies=[np.zeros(p.shape, BF16) for p in a[0]])


def _bad_copies_length(rng):
    a = _adam_args(rng, p="float32", g="bfloat16")
    return a, dict(param_copies=[np.zeros(a[0][0].shape, BF16)])


def _bad_copies_dtype(rng):
    a = _adam_args(rng, p="float32", g="bfloat16")
    return a, dict(param_copies=[np.zeros(a[0][0].shape, BF16), np.zeros(a[0][1].shape, F32)])


def _bad_state_mix(rng):
    ps, gs, ms, vs = _adam_args(rng, s="bfloat16")
    vs = [v.astype(F32) for v in vs]
    return (ps, gs, ms, vs), {}


def _bad_state_f16_for_bf16(rng):
    ps, gs, ms, vs = _adam_args(rng, s="float16")
    return (ps, gs, ms, vs), {}


def _bad_state_16bit_for_f32(rng):
    return _adam_args(rng, p="float32", g="bfloat16", s="bfloat16"), {}


def _bad_offload_mixed_grads(rng):
    ps, gs, ms, vs = _adam_args(rng, p="float32", g="bfloat16")
    gs[1] = gs[1].astype(F16)
    return (ps, gs, ms, vs), {}


def _bad_int32(rng):
    _, gs, ms, vs = _adam_args(rng, p="float32")
    return ([np.arange(6, dtype=np.int32), np.arange(9, dtype=np.int32)], [g.astype(np.int32) for g in gs], ms,
            vs), {}


def _bad_sr_f32(rng):
    return _adam_args(rng, p="float32", g="bfloat16"), dict(stochastic_rounding=True)


def _bad_master_f32(rng):
    a = _adam_args(rng, p="float32", g="bfloat16")
    return a, dict(master_weights="fp32", masters=[p.copy() for p in a[0]])


def _bad_seed(seed):
    return lambda rng: (_adam_args(rng), dict(stochastic_rounding=True, seed=seed))


BAD = {
    "grad16_for_float64_param": (_bad_grad16_f64, TypeError, r"grads\[1\].*float64.*bfloat16"),
    "bf16_grads_for_fp16_params": (_bad_bf16_grads_f16_params, TypeError, r"grads\[0\].*float16.*bfloat16"),
    "split_for_fp16_params": (_bad_split_f16, ValueError, r"master_weights.*split.*float16"),
    "residual_uint16": (_bad_residual(np.uint16), TypeError, r"masters\[1\].*int16.*uint16"),
    "residual_float32": (_bad_residual(np.float32), TypeError, r"masters\[1\].*int16.*float32"),
    "fp32_master_of_bf16": (_bad_fp32_master_dtype, TypeError, r"masters\[1\].*float32.*bfloat16"),
    "master_shape": (_bad_master_shape, ValueError, r"masters\[1\].*shape"),
    "stochastic_rounding_with_master": (_bad_sr_with_master, ValueError, r"stochastic_rounding.*fp32"),
    "masters_without_master_weights": (_bad_masters_without_mode, ValueError, r"masters.*master_weights"),
    "master_weights_without_masters": (_bad_mode_without_masters, ValueError, r"masters"),
    "param_copies_for_16bit_params": (_bad_copies_for_16bit, ValueError, r"param_copies.*float32.*bfloat16"),
    "param_copies_wrong_length": (_bad_copies_length, ValueError, r"param_copies.*2.*1"),
    "param_copies_float32": (_bad_copies_dtype, TypeError, r"param_copies\[1\].*float32"),
    "state_dtype_mix": (_bad_state_mix, TypeError, r"exp_avg_sqs\[0\].*bfloat16.*float32"),
    "float16_state_for_bf16": (_bad_state_f16_for_bf16, TypeError, r"exp_avgs\[0\].*float16"),
    "bf16_state_for_float32": (_bad_state_16bit_for_f32, TypeError, r"exp_avgs\[0\].*float32.*bfloat16"),
    "offload_grads_mixed": (_bad_offload_mixed_grads, TypeError, r"grads\[1\].*bfloat16.*float16"),
    "int32_params": (_bad_int32, TypeError, r"params\[0\].*int32"),
    "stochastic_rounding_float32": (_bad_sr_f32, ValueError, r"stochastic_rounding.*float32"),
    "master_for_float32_params": (_bad_master_f32, ValueError, r"master_weights.*16-bit"),
    "seed_2**64": (_bad_seed(2**64), ValueError, r"seed.*2\*\*64"),
    "seed_negative": (_bad_seed(-1), ValueError, r"seed.*-1"),
    "seed_float": (_bad_seed(1.0), TypeError, r"seed"),
    "seed_bool": (_bad_seed(True), TypeError, r"seed"),
}


@pytest.mark.parametrize("skip", [False, True], ids=["step", "found_inf"])
@pytest.mark.parametrize("key", list(BAD))
def test_bad_input_named_and_nothing_touched(key, skip, rng):
    make, exc, match = BAD[key]
    (ps, gs, ms, vs), kw = make(rng)
    counter = np.array([4.0], F32)  # a step count in memory: must not advance either
    arrays = ps + gs + ms + vs + [counter] + list(kw.get("masters") or []) + list(kw.get("param_copies") or [])
    before = [bits(a).copy() for a in arrays]
    with pytest.raises(exc, match=match):
        optkern.adam_step(ps, gs, ms, vs, step=counter, lr=0.1, found_inf=True if skip else None, **kw)
    for i, (a, b) in enumerate(zip(arrays, before)):
        assert np.array_equal(bits(a), b), f"array {i} changed"


# ---- torch CPU tensors (DLPack) ----------------------------------------------------------------------------------
TORCH_MODES = [Mode("bfloat16", "bfloat16", "bfloat16"), Mode("float16", "float16"),
               Mode("bfloat16", "bfloat16", master="fp32"), Mode("bfloat16", "bfloat16", master="split"),
               Mode("float16", "float16", "bfloat16", sr=True), Mode("float32", "bfloat16", copies="float16")]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("mode", TORCH_MODES, ids=[m.id for m in TORCH_MODES])
@pytest.mark.parametrize("name", ["adam", "sgd_nesterov", "adadelta"])
def test_torch_cpu_tensors_through_dlpack(name, mode, offset):
    """torch CPU tensors (bfloat16 and float16 through DLPack; views at an odd offset too): the same checks, and
    the same bits as the NumPy (ml_dtypes / np.float16) run."""
    pytest.importorskip("torch", reason="torch is needed for the DLPack bfloat16/float16 checks")
    sizes = [5, 1030]
    got = check_steps(CASES[name], mode, np.random.default_rng(3), sizes, steps=2, dev=TorchArrays("cpu", offset))
    want = check_steps(CASES[name], mode, np.random.default_rng(3), sizes, steps=2)
    for k, (a_list, b_list) in enumerate(zip(got, want)):
        for a, b in zip(a_list or [], b_list or []):
            if isinstance(a, list):
                for x, y in zip(a, b):
                    assert_bits_equal(x, y, f"torch vs NumPy, output {k}")
            else:
                assert_bits_equal(a, b, f"torch vs NumPy, output {k}")


def test_torch_bfloat16_init_masters_and_values(rng):
    torch = pytest.importorskip("torch", reason="torch is needed for the DLPack bfloat16/float16 checks")
    p = torch.randn(1000, dtype=torch.bfloat16)
    m = optkern.init_masters([p], "split")[0]
    assert m.dtype == torch.int16 and not m.any()
    g = torch.randn(1000, dtype=torch.bfloat16)
    ms, vs = torch.zeros(1000), torch.zeros(1000)
    master = p.float()
    optkern.adam_step([p], [g], [ms], [vs], step=1, lr=0.01, master_weights="split", masters=[m])
    ref_m, ref_v = torch.zeros(1000).numpy(), torch.zeros(1000).numpy()
    ref_p = master.numpy().copy()
    optkern.adam_step([ref_p], [g.float().numpy()], [ref_m], [ref_v], step=1, lr=0.01)
    assert_bits_equal(optkern.master_values(p, m, "split").numpy(), ref_p, "split master (torch)")
    assert_bits_equal(split_master(p.view(torch.int16).numpy().view(BF16), m.numpy()), ref_p, "split halves")
