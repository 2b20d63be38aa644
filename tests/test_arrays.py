"""Arrays: zero-copy in-place updates, odd sizes and offsets, layouts, torch tensors through DLPack, multi-tensor
lists, threads and CPU paths all give the same bits."""

import tracemalloc

import numpy as np
import pytest

import optkern

torch = pytest.importorskip("torch")


# Each step: (number of state arrays, function(params, grads, states, step)).  Two steps are run so that the
# state written by the first is read by the second.
def _adam(p, g, s, t):
    optkern.adam_step(p, g, s[0], s[1], s[2], step=t, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                      amsgrad=True)


def _rmsprop(p, g, s, t):
    optkern.rmsprop_step(p, g, s[0], s[1], s[2], step=t, lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.05,
                         momentum=0.8, centered=True)


def _sgd(p, g, s, t):
    optkern.sgd_step(p, g, s[0], step=t, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)


def _rprop(p, g, s, t):
    optkern.rprop_step(p, g, s[0], s[1], step=t, lr=1e-2, etas=(0.4, 1.3), step_size_limits=(1e-4, 1.0))


STEPS = {"adam": (3, _adam), "rmsprop": (3, _rmsprop), "sgd": (1, _sgd), "rprop": (2, _rprop)}


def _data(rng, shape, nstates, dtype):
    p = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    # states: accumulators positive; rprop's prev a signed gradient, step sizes positive
    s = [rng.uniform(0.01, 1.0, shape).astype(dtype) for _ in range(nstates)]
    return p, g, s


def _two_steps(fn, p, g, s, g2):
    fn(p, g, s, 1)
    fn(p, g2, s, 2)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _ptr(a):
    return a.__array_interface__["data"][0]


# ---- zero copy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", list(STEPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_same_objects_same_pointers(rng, algo, dtype):
    nstates, fn = STEPS[algo]
    p, g, s = _data(rng, (33,), nstates, dtype)
    objs = [p, g, *s]
    ptrs = [_ptr(a) for a in objs]
    p0, s0 = p.copy(), [a.copy() for a in s]
    plist, glist, slist = [p], [g], [[a] for a in s]
    fn(plist, glist, slist, 1)
    assert plist == [p] and plist[0] is p and glist[0] is g
    assert all(x[0] is a for x, a in zip(slist, s))
    assert [_ptr(a) for a in objs] == ptrs
    assert not np.array_equal(p, p0)
    # every state buffer was written
    assert any(not np.array_equal(a, b) for a, b in zip(s, s0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_allocates_no_param_sized_temporary(dtype):
    n = 1 << 20
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    optkern.adam_step(p, g, m, v, vmax, step=1, amsgrad=True)  # warm up (thread pool, caches)
    before = p.copy()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        optkern.adam_step(p, g, m, v, vmax, step=2, amsgrad=True)
        optkern.sgd_step([p], [g], [m], step=2, lr=0.1, momentum=0.9)
        optkern.rmsprop_step(p, g, v, step=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not np.array_equal(p, before)
    assert peak < p.nbytes / 100, f"a step traced {peak} bytes for a {p.nbytes}-byte param"


def test_tracemalloc_sees_numpy_temporaries():
    """Control for the test above: a param-sized NumPy temporary does show up in tracemalloc's peak."""
    p = np.ones(1 << 20, np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        q = p * 2
        del q
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= p.nbytes


# ---- sizes and offsets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", list(STEPS))
@pytest.mark.parametrize("n", [0, 1, 15, 17, 1023, 4097])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_offsets_match_aligned_copies(rng, algo, n, dtype):
    nstates, fn = STEPS[algo]
    p, g, s = _data(rng, (n,), nstates, dtype)
    g2 = rng.standard_normal(n).astype(dtype)
    # the same values in views at different odd element offsets of larger buffers
    views = []
    for k, a in enumerate([p, g, g2, *s]):
        off = 2 * k + 1
        base = np.full(n + off + 5, 7.0, dtype)
        v = base[off:off + n]
        v[...] = a
        views.append((base, v, off))
    vp, vg, vg2, *vs = [v for _, v, _ in views]
    ref_p, ref_s = p.copy(), [a.copy() for a in s]
    _two_steps(fn, ref_p, g.copy(), ref_s, g2.copy())
    _two_steps(fn, vp, vg, vs, vg2)
    assert _bits_equal(vp, ref_p)
    for a, b in zip(vs, ref_s):
        assert _bits_equal(a, b)
    assert _bits_equal(vg, g) and _bits_equal(vg2, g2)
    for base, _, off in views:  # nothing outside the views was touched
        assert np.all(base[:off] == 7.0) and np.all(base[off + n:] == 7.0)
    if n:
        assert not np.array_equal(ref_p, p)


@pytest.mark.parametrize("algo", list(STEPS))
def test_tail_view_of_base(rng, algo):
    nstates, fn = STEPS[algo]
    n = 1000
    bases = [_data(rng, (n + 3,), nstates, np.float32)]
    p, g, s = bases[0]
    g2 = rng.standard_normal(n + 3).astype(np.float32)
    cp, cg, cs, cg2 = p[3:].copy(), g[3:].copy(), [a[3:].copy() for a in s], g2[3:].copy()
    head = p[:3].copy()
    _two_steps(fn, p[3:], g[3:], [a[3:] for a in s], g2[3:])
    _two_steps(fn, cp, cg, cs, cg2)
    assert _bits_equal(p[3:], cp)
    assert _bits_equal(p[:3], head)
    for a, b in zip(s, cs):
        assert _bits_equal(a[3:], b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fortran_order_2d(rng, dtype):
    nstates, fn = STEPS["adam"]
    p, g, s = _data(rng, (37, 29), nstates, dtype)
    g2 = rng.standard_normal((37, 29)).astype(dtype)
    fp, fg, fg2 = np.asfortranarray(p), np.asfortranarray(g), np.asfortranarray(g2)
    fs = [np.asfortranarray(a) for a in s]
    assert fp.flags.f_contiguous and not fp.flags.c_contiguous
    ptr = _ptr(fp)
    _two_steps(fn, fp, fg, fs, fg2)
    _two_steps(fn, p, g, s, g2)
    assert _ptr(fp) == ptr and fp.flags.f_contiguous
    assert _bits_equal(fp, p)
    for a, b in zip(fs, s):
        assert _bits_equal(a, b)


def test_transposed_layout_shared_by_all_arrays(rng):
    """A permuted-axes layout is dense too; all arrays of the tensor share it."""
    nstates, fn = STEPS["rmsprop"]
    p, g, s = _data(rng, (4, 5, 6), nstates, np.float32)
    g2 = rng.standard_normal((4, 5, 6)).astype(np.float32)
    tp, tg, tg2 = [np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0) for a in (p, g, g2)]
    ts = [np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0) for a in s]
    _two_steps(fn, tp, tg, ts, tg2)
    _two_steps(fn, p, g, s, g2)
    assert _bits_equal(tp, p)


# ---- torch tensors via DLPack ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", list(STEPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_cpu_tensors_in_place(rng, algo, dtype):
    nstates, fn = STEPS[algo]
    p, g, s = _data(rng, (3, 41), nstates, dtype)
    g2 = rng.standard_normal((3, 41)).astype(dtype)
    tp, tg, tg2 = torch.tensor(p), torch.tensor(g), torch.tensor(g2)
    ts = [torch.tensor(a) for a in s]
    ptrs = [t.data_ptr() for t in [tp, tg, tg2, *ts]]
    _two_steps(fn, tp, tg, ts, tg2)
    ref_p = p.copy()
    _two_steps(fn, ref_p, g, s, g2)
    assert [t.data_ptr() for t in [tp, tg, tg2, *ts]] == ptrs
    assert _bits_equal(tp.numpy(), ref_p)
    for a, b in zip(ts, s):
        assert _bits_equal(a.numpy(), b)
    assert not np.array_equal(ref_p, p)


def test_torch_param_requiring_grad(rng):
    p = rng.standard_normal(50).astype(np.float32)
    g = rng.standard_normal(50).astype(np.float32)
    tp = torch.tensor(p, requires_grad=True)
    tm, tv = torch.zeros(50), torch.zeros(50)
    ptr = tp.data_ptr()
    optkern.adam_step(tp, torch.tensor(g), tm, tv, step=1, lr=0.1)
    m, v = np.zeros(50, np.float32), np.zeros(50, np.float32)
    optkern.adam_step(p, g, m, v, step=1, lr=0.1)
    assert tp.requires_grad and tp.data_ptr() == ptr
    assert _bits_equal(tp.detach().numpy(), p)
    assert _bits_equal(tm.numpy(), m)


def test_torch_class_optimizer_with_p_grad(rng):
    p = rng.standard_normal(20).astype(np.float32)
    g = rng.standard_normal(20).astype(np.float32)
    tp = torch.tensor(p, requires_grad=True)
    tp.grad = torch.tensor(g)
    opt = optkern.optim.Adam([tp], lr=0.05)
    opt.step()
    ref = p.copy()
    optkern.adam_step(ref, g, np.zeros_like(ref), np.zeros_like(ref), step=1, lr=0.05)
    assert _bits_equal(tp.detach().numpy(), ref)
    assert isinstance(opt.state[0]["exp_avg"], torch.Tensor)


def test_torch_mixed_with_numpy_state(rng):
    """NumPy and torch CPU arrays may be mixed in one call (both CPU memory)."""
    p = rng.standard_normal(30).astype(np.float32)
    g = rng.standard_normal(30).astype(np.float32)
    tp = torch.tensor(p)
    m, v = np.zeros(30, np.float32), np.zeros(30, np.float32)
    optkern.adam_step(tp, g, m, v, step=1, lr=0.1)
    optkern.adam_step(p, g, np.zeros_like(p), np.zeros_like(p), step=1, lr=0.1)
    assert _bits_equal(tp.numpy(), p)


def test_torch_non_contiguous_rejected(rng):
    t = torch.randn(8, 8)
    g = torch.randn(8, 8)[:, ::2]
    tc = t[:, ::2]
    before = t.clone()
    with pytest.raises(ValueError, match=r"^params\[0\]"):
        optkern.sgd_step(tc, g, step=1, lr=0.1)
    assert torch.equal(t, before)


# ---- multi-tensor, threads, CPU paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("algo", list(STEPS))
def test_list_of_1000_tiny_tensors_equals_separate_calls(rng, algo):
    nstates, fn = STEPS[algo]
    sizes = rng.integers(0, 12, 1000)
    data = [_data(rng, (int(n),), nstates, np.float32) for n in sizes]
    g2s = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]
    ps = [d[0].copy() for d in data]
    gs = [d[1] for d in data]
    ss = [[d[2][k].copy() for d in data] for k in range(nstates)]
    _two_steps(fn, ps, gs, ss, g2s)
    for i, (p, g, s) in enumerate(data):
        rp, rs = p.copy(), [a.copy() for a in s]
        _two_steps(fn, rp, g, rs, g2s[i])
        assert _bits_equal(ps[i], rp), i
        for k in range(nstates):
            assert _bits_equal(ss[k][i], rs[k]), (i, k)


@pytest.fixture
def restore_threads():
    n = optkern.get_num_threads()
    yield
    optkern.set_num_threads(n)


@pytest.mark.parametrize("algo", list(STEPS))
def test_threads_give_identical_bits(rng, algo, restore_threads):
    nstates, fn = STEPS[algo]
    sizes = [(1 << 17) + 13, 5, 70001]
    data = [_data(rng, (n,), nstates, np.float32) for n in sizes]
    g2s = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    results = []
    for nt in (1, 2, 3):
        optkern.set_num_threads(nt)
        assert optkern.get_num_threads() == nt
        ps = [d[0].copy() for d in data]
        ss = [[d[2][k].copy() for d in data] for k in range(nstates)]
        _two_steps(fn, ps, [d[1] for d in data], ss, g2s)
        results.append((ps, ss))
    for ps, ss in results[1:]:
        for a, b in zip(ps, results[0][0]):
            assert _bits_equal(a, b)
        for k in range(nstates):
            for a, b in zip(ss[k], results[0][1][k]):
                assert _bits_equal(a, b)
    assert not np.array_equal(results[0][0][0], data[0][0])


def _available_isas():
    out = []
    orig = optkern.cpu_isa()
    for isa in ("scalar", "avx2", "avx512"):
        try:
            optkern.set_cpu_isa(isa)
            out.append(isa)
        except ValueError:
            pass
    optkern.set_cpu_isa(orig)
    return out


@pytest.mark.parametrize("algo", ["adam", "rmsprop", "sgd", "rprop", "adagrad", "adamax", "nadam", "adadelta"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_paths_give_identical_bits(rng, algo, dtype):
    extra = {
        "adagrad": (1, lambda p, g, s, t: optkern.adagrad_step(p, g, s[0], step=t, lr=0.1, lr_decay=0.01,
                                                                 weight_decay=0.1)),
        "adamax": (2, lambda p, g, s, t: optkern.adamax_step(p, g, s[0], s[1], step=t, weight_decay=0.1)),
        "nadam": (2, lambda p, g, s, t: optkern.nadam_step(p, g, s[0], s[1], step=t, weight_decay=0.1)),
        "adadelta": (2, lambda p, g, s, t: optkern.adadelta_step(p, g, s[0], s[1], step=t, weight_decay=0.1)),
    }
    nstates, fn = STEPS.get(algo) or extra[algo]
    sizes = [1, 7, 16, 33, 1000, 4099]
    data = [_data(rng, (n,), nstates, dtype) for n in sizes]
    g2s = [rng.standard_normal(n).astype(dtype) for n in sizes]
    orig = optkern.cpu_isa()
    isas = _available_isas()
    results = {}
    try:
        for isa in isas:
            optkern.set_cpu_isa(isa)
            assert optkern.cpu_isa() == isa
            ps = [d[0].copy() for d in data]
            ss = [[d[2][k].copy() for d in data] for k in range(nstates)]
            _two_steps(fn, ps, [d[1] for d in data], ss, g2s)
            results[isa] = (ps, ss)
    finally:
        optkern.set_cpu_isa(orig)
    assert optkern.cpu_isa() == orig
    first = results[isas[0]]
    for isa in isas[1:]:
        ps, ss = results[isa]
        for i, (a, b) in enumerate(zip(ps, first[0])):
            assert _bits_equal(a, b), (isa, i)
        for k in range(nstates):
            for a, b in zip(ss[k], first[1][k]):
                assert _bits_equal(a, b), (isa, k)
    assert not np.array_equal(first[0][-1], data[-1][0])
