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


# ---- malformed array interfaces: refused, named, before any CUDA call, nothing written --------------------------
# Stand-ins expose an interface with a fake device pointer: if anything reached a kernel it would fault, and in a
# CUDA build on a machine without a GPU any CUDA call raises RuntimeError, so the exact TypeError/ValueError below
# also shows that the array was refused before one was made.
_FAKE_PTR = 1 << 20  # aligned, never dereferenced


class _Dev:  # CuPy's Device (.id) / torch's device (.index)
    def __init__(self, id=None, index=None):
        if id is not None:
            self.id = id
        if index is not None:
            self.index = index


class _CAI:
    """An object with a __cuda_array_interface__ (counted on each read) and, optionally, a .device."""

    def __init__(self, cai, device=None):
        self._cai, self.reads = cai, 0
        if device is not None:
            self.device = device

    @property
    def __cuda_array_interface__(self):
        self.reads += 1
        return self._cai


_DROP = object()


def _cai(**changes):
    d = {"shape": (5,), "typestr": "<f4", "data": (_FAKE_PTR, False), "version": 3}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not _DROP}


# (changes to a valid interface, exception, message after "<name>: ")
_C = "__cuda_array_interface__ "
_BAD_CAI = {
    "huge-shape": (dict(shape=(2**62, 2**62)), ValueError, r"shape \(4611686018427387904, 4611686018427387904\) is "
                                                           r"too large: its size in bytes does not fit in 64 bits"),
    "bytes-overflow": (dict(shape=(2**61, 2)), ValueError, r"shape .* is too large"),  # 2**62 elements, 2**64 bytes
    "zero-hides-huge": (dict(shape=(0, 2**62, 2**62), data=(0, False)), ValueError, r"shape .* is too large"),
    "extent-past-int64": (dict(shape=(2**70,)), ValueError, _C + r"'shape' holds "
                                                           r"1180591620717411303424, which does not fit in 64 bits"),
    "negative-extent": (dict(shape=(3, -1)), ValueError, r"shape \(3, -1\) has a negative extent"),
    "float-extent": (dict(shape=(5.0,)), TypeError, _C + r"'shape' must hold ints, got 5\.0"),
    "shape-not-tuple": (dict(shape=5), TypeError, _C + r"'shape' must be a tuple of ints"),
    "17-dims": (dict(shape=(1,) * 17), ValueError, r"arrays of more than 16 dimensions are not supported"),
    "no-shape": (dict(shape=_DROP), TypeError, _C + r"has no 'shape'"),
    "no-data": (dict(data=_DROP), TypeError, _C + r"has no 'data'"),
    "no-typestr": (dict(typestr=_DROP), TypeError, _C + r"has no 'typestr'"),
    "no-version": (dict(version=_DROP), TypeError, _C + r"has no 'version'"),
    "typestr-not-str": (dict(typestr=4), TypeError, _C + r"'typestr' must be a str, got 4"),
    "unknown-version": (dict(version=4), ValueError, _C + r"version 4 is not supported"),
    "version-not-int": (dict(version="3"), TypeError, _C + r"'version' must be an int"),
    "data-one-item": (dict(data=(_FAKE_PTR,)), TypeError, _C + r"'data' must be a \(pointer: "
                                                          r"int, read-only: bool\) pair"),
    "data-flag-not-bool": (dict(data=(_FAKE_PTR, 0)), TypeError, _C + r"'data' must be a \(pointer: int, read-only"),
    "data-negative": (dict(data=(-8, False)), ValueError, _C + r"data pointer -8 is not an "
                                                          r"address"),
    "data-null": (dict(data=(0, False)), ValueError, _C + r"data pointer is 0 \(null\) for an "
                                                     r"array of 5 elements"),
    "strides-too-short": (dict(shape=(5, 1), strides=(4,)), ValueError, _C + r"'strides' has 1 "
                                                                        r"entries for a 2-dimensional shape"),
    "strides-too-long": (dict(strides=(4, 4)), ValueError, _C + r"'strides' has 2 entries for a 1-dimensional shape"),
    "strides-not-ints": (dict(strides=("4",)), TypeError, _C + r"'strides' must hold ints"),
    "strides-not-tuple": (dict(strides=4), TypeError, _C + r"'strides' must be None or a tuple of ints"),
    "mask": (dict(mask=(1,)), ValueError, _C + r"has a 'mask'; masked arrays are not supported"),
    "stream-0": (dict(stream=0), ValueError, _C + r"'stream' is 0, not a stream \(the "
                                             r"interface disallows 0"),
    "stream-negative": (dict(stream=-5), ValueError, _C + r"'stream' is -5, not a stream"),
    "stream-not-int": (dict(stream="1"), TypeError, _C + r"'stream' must be None or an int"),
}


def _adam_arrays(rng):
    p = [rng.standard_normal(n).astype(np.float32) for n in (5, 5)]
    g = [rng.standard_normal(n).astype(np.float32) for n in (5, 5)]
    m = [rng.standard_normal(n).astype(np.float32) for n in (5, 5)]
    v = [rng.uniform(0.1, 1.0, n).astype(np.float32) for n in (5, 5)]
    return p, g, m, v


@pytest.mark.parametrize("case", list(_BAD_CAI))
def test_malformed_cuda_array_interface_is_refused_and_nothing_written(rng, case):
    changes, exc, msg = _BAD_CAI[case]
    p, g, m, v = _adam_arrays(rng)
    before = [a.copy() for a in p + m + v]
    bad = _CAI(_cai(**changes), device=_Dev(id=0))
    with pytest.raises(exc, match=r"^grads\[1\]: " + msg):
        optkern.adam_step(p, [g[0], bad], m, v, step=1, lr=0.1)
    assert bad.reads == 1
    assert all(_bits_equal(a, b) for a, b in zip(p + m + v, before))
    # the same reader behind the norms (collect_read)
    with pytest.raises(exc, match=r"^grads\[1\]: " + msg):
        optkern.global_norm([g[0], bad])


def test_cuda_array_interface_that_is_not_a_dict():
    p, g, m, v = _adam_arrays(np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"^grads\[0\]: __cuda_array_interface__ is not a dict \(got list\)$"):
        optkern.adam_step(p[:1], [_CAI([1, 2])], m[:1], v[:1], step=1)


def test_cuda_array_interface_errors_propagate_as_raised():
    """An error inside the producer's property (other than AttributeError, which means 'no interface') is the
    caller's error: it is neither swallowed nor replaced by a guess at another interface."""
    class Broken:
        @property
        def __cuda_array_interface__(self):
            raise KeyboardInterrupt

    p, g, m, v = _adam_arrays(np.random.default_rng(0))
    with pytest.raises(KeyboardInterrupt):
        optkern.adam_step(p[:1], [Broken()], m[:1], v[:1], step=1)


@pytest.mark.parametrize("where", ["params", "grads", "state"])
def test_cuda_array_interface_read_once_per_array(rng, where):
    """One read of the interface per array per call (torch's is Python code): the device check that refuses the
    mixed call below comes after the one read."""
    p, g, m, v = _adam_arrays(rng)
    fake = _CAI(_cai(), device=_Dev(id=0))
    args = {"params": ([fake, p[1]], g, m, v), "grads": (p, [g[0], fake], m, v), "state": (p, g, m, [v[0], fake])}
    with pytest.raises(ValueError, match=r"on cpu like params\[0\]|like params\[0\], got cpu"):
        optkern.adam_step(*args[where], step=1)
    assert fake.reads == 1


@pytest.mark.parametrize("dev,expect", [(_Dev(id=3), "cuda:3"), (_Dev(index=2), "cuda:2"), (_Dev(id=0), "cuda:0")])
def test_zero_size_cuda_array_device_is_read_not_assumed(rng, dev, expect):
    """A zero-size CAI array has pointer 0; its device comes from the producer (CuPy's .device.id, torch's
    .device.index), never an assumed 0."""
    p, g, m, v = _adam_arrays(rng)
    empty = _CAI(_cai(shape=(0,), data=(0, False)), device=dev)
    p0 = np.zeros((0,), np.float32)
    with pytest.raises(ValueError, match=rf"^grads\[1\]: expected an array on cpu like params\[0\], got {expect}$"):
        optkern.adam_step([p[0], p0], [g[0], empty], [m[0], p0.copy()], [v[0], p0.copy()], step=1)


def test_zero_size_cuda_array_of_unknown_device_is_refused(rng):
    p, g, m, v = _adam_arrays(rng)
    before = [a.copy() for a in p + m + v]
    for obj in (_CAI(_cai(shape=(0,), data=(0, False))), _CAI(_cai(shape=(3, 0), data=(0, False)), device="cuda")):
        with pytest.raises(ValueError, match=r"^grads\[1\]: a zero-size CUDA array \(data pointer 0\) whose device "
                                             r"is unknown"):
            optkern.adam_step(p, [g[0], obj], m, v, step=1)
    assert all(_bits_equal(a, b) for a, b in zip(p + m + v, before))


def test_stream_field_is_read_from_version_3_only(rng):
    """'stream' is a v3 field: a v2 interface's is not read (so not refused), a v3 interface's 0 is."""
    p, g, m, v = _adam_arrays(rng)
    v2 = _CAI(_cai(version=2, stream=0), device=_Dev(id=0))
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected an array on cpu like params\[0\], got cuda:0$"):
        optkern.adam_step(p, [g[0], v2], m, v, step=1)
    v3 = _CAI(_cai(version=3, stream=0), device=_Dev(id=0))
    with pytest.raises(ValueError, match=r"^grads\[1\]: __cuda_array_interface__ 'stream' is 0"):
        optkern.adam_step(p, [g[0], v3], m, v, step=1)


@pytest.mark.parametrize("good", [dict(stream=None), dict(stream=1), dict(stream=2), dict(stream=0x7F00_0000),
                                  dict(strides=None), dict(strides=(4,)), dict(version=0), dict(version=2),
                                  dict(shape=[5], data=[_FAKE_PTR, True]), dict(typestr="<f8")])
def test_well_formed_interfaces_reach_the_device_check(rng, good):
    """Valid variants (lists for tuples, no stream, both special streams) pass the reader; the CPU params then
    refuse the CUDA array by device, before any stream ordering or kernel."""
    p, g, m, v = _adam_arrays(rng)
    ok = _CAI(_cai(**good), device=_Dev(id=1))
    if good.get("typestr") == "<f8":  # read as float64: the dtype check comes first
        exc, msg = TypeError, r"^grads\[1\]: expected float32 like params\[1\], got float64$"
    else:
        exc, msg = ValueError, r"^grads\[1\]: expected an array on cpu like params\[0\], got cuda:1$"
    with pytest.raises(exc, match=msg):
        optkern.adam_step(p, [g[0], ok], m, v, step=1)
    assert ok.reads == 1


# DLPack stand-ins: a DLManagedTensor built with ctypes, handed out in a "dltensor" capsule.
import ctypes  # noqa: E402


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_CAPSULE_NAME = b"dltensor"  # a capsule keeps a pointer to its name: this bytes object outlives every capsule
# A private prototype: ctypes.pythonapi.PyCapsule_New is process-wide, and others set its argtypes (jax.ffi.pycapsule)
_PyCapsule_New = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))


class _FakeDLPack:
    """A CPU float32 DLPack producer with the shape and strides given (the memory behind it is 64 floats)."""

    def __init__(self, shape, strides=None, ndim=None, null_data=False):
        self.buf = (ctypes.c_float * 64)()
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        t = _DLTensor(None if null_data else ctypes.addressof(self.buf), _DLDevice(1, 0),
                      len(shape) if ndim is None else ndim, _DLDataType(2, 32, 1), self.shape, self.strides, 0)
        self.managed = _DLManagedTensor(t, None, None)  # no deleter: the memory is this object's

    def __dlpack__(self, stream=None, max_version=None):
        return _PyCapsule_New(ctypes.addressof(self.managed), _CAPSULE_NAME, None)

    def __dlpack_device__(self):
        return (1, 0)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(shape=(2**62, 2**62)), ValueError, r"shape \(4611686018427387904, 4611686018427387904\) is too large"),
    (dict(shape=(2**31, 2**31)), ValueError, r"shape .* is too large"),  # 2**62 floats: 2**64 bytes
    (dict(shape=(5, -2)), ValueError, r"shape \(5, -2\) has a negative extent"),
    (dict(shape=(5,), ndim=-1), ValueError, r"a negative number of dimensions \(-1\)"),
    (dict(shape=(5,), ndim=17), ValueError, r"arrays of more than 16 dimensions are not supported"),
    (dict(shape=(5,), strides=(2**62,)), ValueError, r"its DLPack strides do not fit in 64 bits"),
    (dict(shape=(5,), null_data=True), ValueError, r"its DLPack data pointer is null for an array of 5 elements"),
])
def test_malformed_dlpack_is_refused_and_nothing_written(rng, kw, exc, msg):
    p, g, m, v = _adam_arrays(rng)
    before = [a.copy() for a in p + m + v]
    bad = _FakeDLPack(**kw)
    with pytest.raises(exc, match=r"^grads\[1\]: " + msg):
        optkern.adam_step(p, [g[0], bad], m, v, step=1, lr=0.1)
    assert all(_bits_equal(a, b) for a, b in zip(p + m + v, before))
    with pytest.raises(exc, match=r"^grads\[1\]: " + msg):
        optkern.global_norm([g[0], bad])


def test_dlpack_stand_in_is_read_when_well_formed(rng):
    """The ctypes producer above is a working array when its fields are sane (so the refusals are the checks')."""
    good = _FakeDLPack(shape=(5,))
    ref = rng.standard_normal(5).astype(np.float32)
    ctypes.memmove(good.buf, ref.ctypes.data, ref.nbytes)
    # the same number as the NumPy array's norm through optkern (float32 lanes: global_norm_api.h's order)
    assert optkern.global_norm([good]) == optkern.global_norm([ref])
    assert optkern.global_norm([good]) == pytest.approx(float(np.linalg.norm(ref.astype(np.float64))), rel=8 * 2**-24)


# ---- the stream a step is ordered on (optkern._arrays) ----------------------------------------------------------
class _FakeCupy:
    """Stand-in for the parts of CuPy _arrays uses: a current device, one current stream per device, allocation on
    the current device."""

    def __init__(self, ndev=2):
        import types

        state = self.state = {"current": 0, "switches": 0}
        streams = {d: types.SimpleNamespace(ptr=0x1000 * (d + 1)) for d in range(ndev)}

        class Device:
            def __init__(self, id):
                self.id = id

            def __enter__(self):
                self.prev = state["current"]
                if self.id != self.prev:
                    state["switches"] += 1
                state["current"] = self.id
                return self

            def __exit__(self, *exc):
                state["current"] = self.prev

        def made_on_current(kind):
            return lambda *a, **k: (kind, state["current"])

        self.module = types.ModuleType("cupy")
        self.module.cuda = types.SimpleNamespace(
            Device=Device, get_current_stream=lambda: streams[state["current"]],
            runtime=types.SimpleNamespace(getDevice=lambda: state["current"]))
        for name in ("full_like", "empty_like", "empty", "array", "asarray"):
            setattr(self.module, name, made_on_current(name))
        self.module.float64 = np.float64
        self.Device = Device

    def array(self, device):
        state = self.state
        cls = type("ndarray", (), {"__module__": "cupy._core.core", "device": self.Device(device),
                                   "copy": lambda self: ("copy", state["current"])})
        return cls()


@pytest.fixture
def fake_cupy(monkeypatch):
    import sys

    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    return fake


@pytest.mark.parametrize("current", [0, 1])
@pytest.mark.parametrize("device", [0, 1])
def test_cupy_step_stream_is_the_arrays_device_current_stream(fake_cupy, current, device):
    from optkern import _arrays

    fake_cupy.state["current"] = current
    a = fake_cupy.array(device)
    assert _arrays.current_stream(a) == 0x1000 * (device + 1)
    assert fake_cupy.state["current"] == current  # the caller's device is restored
    assert fake_cupy.state["switches"] == (1 if device != current else 0)  # no device switch when already current


@pytest.mark.parametrize("fn", ["full_like", "zeros_like", "empty_like", "copy_array", "empty_vector",
                                "to_library_like", "as_float64_vector"])
def test_cupy_state_is_allocated_on_the_arrays_device(fake_cupy, fn):
    """CuPy allocates on the current device: state for a param on device 1 while device 0 is current must still be
    made on device 1 (a step would otherwise refuse the mixed devices)."""
    from optkern import _arrays

    a = fake_cupy.array(1)
    call = {"full_like": lambda: _arrays.full_like(a, 0.5), "zeros_like": lambda: _arrays.zeros_like(a),
            "empty_like": lambda: _arrays.empty_like(a), "copy_array": lambda: _arrays.copy_array(a),
            "empty_vector": lambda: _arrays.empty_vector(a, 3),
            "to_library_like": lambda: _arrays.to_library_like(np.ones(3), type("L", (), {
                "__module__": "cupy", "device": a.device, "dtype": np.float32})()),
            "as_float64_vector": lambda: _arrays.as_float64_vector(np.ones(3), a)}[fn]
    kind, made_on = call()
    assert made_on == 1 and fake_cupy.state["current"] == 0


@pytest.mark.parametrize("obj", ["numpy", "torch-cpu", "other-cai"])
def test_step_stream_off_cupy_and_torch_cuda_is_the_default(obj):
    from optkern import _arrays

    a = {"numpy": np.ones(3), "torch-cpu": torch.ones(3), "other-cai": _CAI(_cai(), device=_Dev(id=1))}[obj]
    assert _arrays.current_stream(a) == 0
