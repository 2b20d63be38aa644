"""optkern.torch.nn (batch norm modules with autograd) against torch.nn's modules in torch 2.13.

Error measure: ``rel_err(a, ref) = max|a - ref| / max|ref|`` over the whole tensor (tests/reference.py).
Tolerances against torch in the tensor's own dtype: float64 1e-12, float32 1e-5.  Measured on torch's module_db
samples (5 seeds, every output, gradient and running statistic): at most 4e-15 in float64 and 5e-7 in float32
(torch rounds its float32 statistics differently from optkern's float64-combined ones).  A semantic difference
(biased vs unbiased variance, the momentum convention, the eval-mode gradient) is > 1e-2.  Where optkern falls
back to torch (other dtypes) the results must be bitwise torch's.
"""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch", reason="torch (pip install torch==2.13.0) is needed for optkern.torch.nn")

import optkern
import optkern.torch.nn as onn
from reference import rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
PAIRS = {"BatchNorm1d": (torch.nn.BatchNorm1d, onn.BatchNorm1d), "BatchNorm2d": (torch.nn.BatchNorm2d, onn.BatchNorm2d),
         "BatchNorm3d": (torch.nn.BatchNorm3d, onn.BatchNorm3d)}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def err(a, b):
    return rel_err(a.detach().double().numpy(), b.detach().double().numpy())


def randn(rng, *shape, dtype=torch.float64, scale=2.0, offset=0.5):
    return torch.from_numpy(rng.standard_normal(shape) * scale + offset).to(dtype)


def randomize(m: torch.nn.Module, rng, batches: int = 3) -> None:
    """Random (never default) weights, bias and running statistics; num_batches_tracked = batches."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, m.num_features) * rng.choice([-1, 1], m.num_features)))
        if m.bias is not None:
            m.bias.copy_(torch.from_numpy(rng.standard_normal(m.num_features)))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.from_numpy(rng.standard_normal(m.num_features)))
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, m.num_features)))
            m.num_batches_tracked.fill_(batches)


def twin(torch_cls, ours_cls, rng, *args, dtype=torch.float64, **kwargs):
    """A torch module and optkern's with the same constructor arguments and the same random state."""
    ref = torch_cls(*args, dtype=dtype, **kwargs)
    randomize(ref, rng)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_both(ref, ours, x, dy=None, rng=None):
    """Forward + backward of both modules on clones of x; -> (y_ref, y, x_ref, x) with .grad set."""
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    xo = x.detach().clone().requires_grad_(x.requires_grad)
    yr, yo = ref(xr), ours(xo)
    if dy is None:
        dy = torch.from_numpy(rng.standard_normal(tuple(yr.shape))).to(yr.dtype)
    if yr.requires_grad:
        yr.backward(dy)
        yo.backward(dy)
    return yr, yo, xr, xo


def assert_same_state(ref, ours, tol, what=""):
    for name, p in ref.named_parameters():
        q = getattr(ours, name)
        assert (p.grad is None) == (q.grad is None), f"{what}{name}.grad: None on one side only"
        if p.grad is not None:
            assert err(q.grad, p.grad) <= tol, f"{what}{name}.grad: {err(q.grad, p.grad):.3g} > {tol}"
    for name, b in ref.named_buffers():
        c = getattr(ours, name)
        if name == "num_batches_tracked":
            assert int(c) == int(b), f"{what}num_batches_tracked {int(c)} != torch's {int(b)}"
        else:
            assert err(c, b) <= tol, f"{what}{name}: {err(c, b):.3g} > {tol}"


# ---- 1. torch's own sample inputs (module_db), train and eval, float32 and float64 --------------------------------
@functools.cache
def _module_info(name):
    from torch.testing._internal.common_modules import module_db  # slow import (~5 s): only when these tests run

    return next(mi for mi in module_db if mi.module_cls.__name__ == name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_module_db_samples_match_torch(rng, name, training, dtype):
    """Every BatchNorm sample of torch's module_db: output, input/weight/bias grads, running stats and
    num_batches_tracked after forward + backward, with the same constructor arguments and random state."""
    pytest.importorskip("expecttest", reason="torch.testing._internal.common_modules needs expecttest")
    torch_cls, ours_cls = PAIRS[name]
    mi = _module_info(name)
    torch.manual_seed(int(rng.integers(1 << 31)))
    samples = mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=training)
    assert len(samples) >= 7
    for s in samples:
        what = f"{name} {s.desc or 'default'} {tuple(s.forward_input.args[0].shape)}: "
        args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
        ref, ours = twin(torch_cls, ours_cls, rng, *args, dtype=dtype, **kwargs)
        ref.train(training)
        ours.train(training)
        x = s.forward_input.args[0]
        yr, yo, xr, xo = run_both(ref, ours, x, rng=rng)
        assert yo.shape == yr.shape and yo.dtype == yr.dtype and yo.stride() == yr.stride(), what
        assert err(yo, yr) <= TOL[dtype], f"{what}y: {err(yo, yr):.3g}"
        assert xo.grad.shape == xr.grad.shape and err(xo.grad, xr.grad) <= TOL[dtype], f"{what}dx"
        assert_same_state(ref, ours, TOL[dtype], what)


# ---- 2. gradcheck (float64) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(rng, training, affine, layout):
    """Analytical input/weight/bias gradients against finite differences, train and eval, NCHW and channels_last."""
    m = onn.BatchNorm2d(3, affine=affine, dtype=torch.float64)
    randomize(m, rng)
    m.train(training)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(rng, 2, 3, 3, 4).contiguous(memory_format=fmt).requires_grad_(True)
    assert x.is_contiguous(memory_format=fmt)
    if affine:
        w = m.weight.detach().clone().requires_grad_(True)
        b = m.bias.detach().clone().requires_grad_(True)

        def f(x, w, b):  # w and b in place of the module's parameters
            return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

        assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)
    else:
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---- 3. module semantics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch(rng, training):
    """N == 0: an empty output, running statistics untouched, num_batches_tracked bumped in training (torch)."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 5)
    ref.train(training)
    ours.train(training)
    rm0, rv0 = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.empty(0, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    _, yo, _, xo = run_both(ref, ours, x, dy=torch.empty(0, 5, 3, 3, dtype=torch.float64))
    assert yo.shape == (0, 5, 3, 3) and xo.grad.shape == (0, 5, 3, 3)
    assert torch.equal(ours.running_mean, rm0) and torch.equal(ours.running_var, rv0)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3 + training
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    assert torch.all(ours.weight.grad == 0)


def test_cumulative_average_momentum_none(rng):
    """momentum=None: the running statistics are the cumulative average over batches (1 / num_batches_tracked)."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 4, momentum=None)
    for k in range(4):
        run_both(ref, ours, randn(rng, 3, 4, 5, 2, offset=k), rng=rng)
        assert_same_state(ref, ours, TOL[torch.float64], f"batch {k}: ")
    assert int(ours.num_batches_tracked) == 3 + 4
    ref.eval()
    ours.eval()
    yr, yo, _, _ = run_both(ref, ours, randn(rng, 3, 4, 5, 2).requires_grad_(), rng=rng)
    assert err(yo, yr) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_no_running_stats_uses_batch_stats_in_eval(rng, dtype):
    """track_running_stats=False: no buffers, batch statistics in train and eval alike."""
    ref, ours = twin(torch.nn.BatchNorm1d, onn.BatchNorm1d, rng, 6, track_running_stats=False, dtype=dtype)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        x = randn(rng, 7, 6, 3, dtype=dtype).requires_grad_()
        yr, yo, xr, xo = run_both(ref, ours, x, rng=rng)
        assert err(yo, yr) <= TOL[dtype] and err(xo.grad, xr.grad) <= TOL[dtype]
        assert_same_state(ref, ours, TOL[dtype])
        ref.zero_grad()
        ours.zero_grad()
    # buffers present but tracking switched off afterwards: training uses batch stats and does not update them,
    # eval normalizes with the buffers (torch's rule)
    ref, ours = twin(torch.nn.BatchNorm1d, onn.BatchNorm1d, rng, 6, dtype=dtype)
    ref.track_running_stats = ours.track_running_stats = False
    rm0 = ours.running_mean.clone()
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        yr, yo, xr, xo = run_both(ref, ours, randn(rng, 7, 6, dtype=dtype).requires_grad_(), rng=rng)
        assert err(yo, yr) <= TOL[dtype] and err(xo.grad, xr.grad) <= TOL[dtype]
        assert_same_state(ref, ours, TOL[dtype])
    assert torch.equal(ours.running_mean, rm0)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"bias": False}, {"momentum": 0.7, "eps": 1e-3}],
                         ids=["affine_false", "bias_false", "momentum_eps"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_constructor_variants(rng, kwargs, training):
    ref, ours = twin(torch.nn.BatchNorm3d, onn.BatchNorm3d, rng, 3, **kwargs)
    ref.train(training)
    ours.train(training)
    yr, yo, xr, xo = run_both(ref, ours, randn(rng, 2, 3, 2, 3, 4).requires_grad_(), rng=rng)
    assert err(yo, yr) <= TOL[torch.float64] and err(xo.grad, xr.grad) <= TOL[torch.float64]
    assert_same_state(ref, ours, TOL[torch.float64])
    assert ours.extra_repr() == ref.extra_repr()


def test_bias_without_weight(rng):
    """weight None with a bias (F.batch_norm allows it): dbias = sum dy, dx with gamma = 1."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 3)
    ref.weight = None
    ours.weight = None
    yr, yo, xr, xo = run_both(ref, ours, randn(rng, 2, 3, 4, 4).requires_grad_(), rng=rng)
    assert err(yo, yr) <= TOL[torch.float64] and err(xo.grad, xr.grad) <= TOL[torch.float64]
    assert err(ours.bias.grad, ref.bias.grad) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_read_in_place(rng, monkeypatch, training, dtype):
    """channels_last (NCHW) and channels_last_3d inputs: no copy of x, output and grads in torch's layout."""
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(1) or real(self, *a, **k))
    real_like = onn._like

    def spy_like(dy, x):  # the output gradient is laid out like x for the kernel: no copy expected here
        r = real_like(dy, x)
        if r is not dy:
            copies.append(1)
        return r

    monkeypatch.setattr(onn, "_like", spy_like)
    for torch_cls, ours_cls, shape, fmt in ((torch.nn.BatchNorm2d, onn.BatchNorm2d, (4, 6, 5, 3), torch.channels_last),
                                            (torch.nn.BatchNorm3d, onn.BatchNorm3d, (2, 6, 3, 2, 4),
                                             torch.channels_last_3d)):
        ref, ours = twin(torch_cls, ours_cls, rng, 6, dtype=dtype)
        ref.train(training)
        ours.train(training)
        x = real(randn(rng, *shape, dtype=dtype), memory_format=fmt)
        dy = real(randn(rng, *shape, dtype=dtype), memory_format=fmt)
        copies.clear()
        xo = x.clone().requires_grad_()
        yo = ours(xo)
        yo.backward(dy)
        assert not copies, "optkern copied a channels_last input or output gradient"
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        assert yo.is_contiguous(memory_format=fmt) and yo.stride() == yr.stride()
        assert xo.grad.stride() == xr.grad.stride()
        assert err(yo, yr) <= TOL[dtype] and err(xo.grad, xr.grad) <= TOL[dtype]
        assert_same_state(ref, ours, TOL[dtype])


def test_strided_input_and_expanded_grad(rng):
    """A non-dense input (a slice with steps) is made contiguous first; an expanded (stride 0) output gradient,
    such as y.sum()'s, is laid out like x for the kernel."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 3)
    base = randn(rng, 4, 3, 8, 6)
    br, bo = base.clone().requires_grad_(), base.clone().requires_grad_()
    xr, xo = br[:, :, ::2, 1:], bo[:, :, ::2, 1:]
    assert not xo.is_contiguous() and not xo.is_contiguous(memory_format=torch.channels_last)
    yr, yo = ref(xr), ours(xo)
    assert yo.is_contiguous() and err(yo, yr) <= TOL[torch.float64]
    dy = randn(rng, *yr.shape)
    yr.backward(dy)
    yo.backward(dy)
    assert err(bo.grad, br.grad) <= TOL[torch.float64]
    assert_same_state(ref, ours, TOL[torch.float64])
    # y.sum(): dy = 1 everywhere with stride 0; then dx and dweight are 0 in exact arithmetic, so their errors
    # are measured against the size of the formula's terms (gamma * invstd, about 1; M = 100 values per channel)
    ref.zero_grad()
    ours.zero_grad()
    x = randn(rng, 4, 3, 5, 5)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    yr.sum().backward()
    yo.sum().backward()
    assert rel_err(xo.grad.numpy(), xr.grad.numpy(), floor=1.0) <= 1e-12
    assert rel_err(ours.weight.grad.numpy(), ref.weight.grad.numpy(), floor=100.0) <= 1e-12
    assert torch.equal(ours.bias.grad, torch.full((3,), 100.0, dtype=torch.float64))


@pytest.mark.parametrize("needs", ["input_only", "weights_only"])
def test_needs_input_grad(rng, needs):
    """Only the gradients autograd asks for are returned; the others stay None (frozen weights / plain input)."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 3)
    x = randn(rng, 3, 3, 4, 4)
    if needs == "input_only":
        for m in (ref, ours):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
        x.requires_grad_(True)
    _, _, xr, xo = run_both(ref, ours, x, rng=rng)
    if needs == "input_only":
        assert ours.weight.grad is None and ours.bias.grad is None
        assert err(xo.grad, xr.grad) <= TOL[torch.float64]
    else:
        assert xo.grad is None
        assert_same_state(ref, ours, TOL[torch.float64])


def test_state_dict_round_trip(rng):
    """state_dict keys and values move between torch.nn and optkern modules both ways (strict)."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 4)
    run_both(ref, ours, randn(rng, 3, 4, 2, 2).requires_grad_(), rng=rng)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    again = onn.BatchNorm2d(4, dtype=torch.float64)
    again.load_state_dict(back.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert isinstance(again, torch.nn.BatchNorm2d)
    # SyncBatchNorm: torch's common base, not torch.nn.SyncBatchNorm (which DDP refuses in CPU modules)
    sync = onn.SyncBatchNorm(4, dtype=torch.float64)
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(sync, torch.nn.SyncBatchNorm)
    sync.load_state_dict(torch.nn.SyncBatchNorm(4).state_dict(), strict=True)
    assert list(sync.state_dict()) == list(ref.state_dict()) and sync.process_group is None
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.ones(3, dtype=torch.float64))
    again.reset_parameters()
    assert torch.equal(again.weight, torch.ones(4, dtype=torch.float64)) and int(again.num_batches_tracked) == 0


# ---- 4. errors, validation before mutation ----------------------------------------------------------------------
def test_one_value_per_channel(rng):
    """torch's ValueError for a training batch of one value per channel; buffers and counter untouched."""
    ours = onn.BatchNorm1d(4, dtype=torch.float64)
    randomize(ours, rng)
    state = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(randn(rng, 1, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm1d(4)(torch.randn(1, 4))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k
    ours.eval()
    assert ours(randn(rng, 1, 4)).shape == (1, 4)


def test_mixed_dtype_and_shape_errors(rng):
    """A float32 input to a float64 module, or the wrong channel count: an error naming the argument, nothing
    written (torch raises a RuntimeError here)."""
    ours = onn.BatchNorm2d(3, dtype=torch.float64)
    randomize(ours, rng)
    state = copy.deepcopy(ours.state_dict())
    with pytest.raises(TypeError, match=r"^weight: expected torch.float32 like the input"):
        ours(randn(rng, 2, 3, 2, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"^weight: expected shape \(5,\)"):
        ours(randn(rng, 2, 5, 2, 2))
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(randn(rng, 2, 3, 2))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_double_backward_raises(rng):
    m = onn.BatchNorm1d(3, dtype=torch.float64)
    x = randn(rng, 5, 3).requires_grad_()
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gx.sum().backward()


def test_raw_functions_refuse_tensors_requiring_grad(rng):
    """optkern.batch_norm_forward/backward on a tensor that requires grad (grad mode on) would cut the graph: a
    TypeError pointing at optkern.torch.nn, nothing written; under no_grad or detached they work as before."""
    x = randn(rng, 4, 3, 5).requires_grad_()
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^x: .*optkern\.torch\.nn"):
        optkern.batch_norm_forward(x, None, None, rm, rv)
    with pytest.raises(TypeError, match=r"^weight: .*optkern\.torch\.nn"):
        optkern.batch_norm_forward(x.detach(), w, None, rm, rv)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64))
    with torch.no_grad():
        y, mean, invstd = optkern.batch_norm_forward(x, w, None, rm, rv)
    assert not torch.equal(rm, torch.zeros(3, dtype=torch.float64))
    ref = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
    assert err(y, ref) <= 1e-12 and not y.requires_grad
    dy = randn(rng, 4, 3, 5)
    with pytest.raises(TypeError, match=r"^x: .*optkern\.torch\.nn"):
        optkern.batch_norm_backward(dy, x, None, mean, invstd)
    with pytest.raises(TypeError, match=r"^dy: .*optkern\.torch\.nn"):
        optkern.batch_norm_backward(dy.requires_grad_(), x.detach(), None, mean, invstd)
    dx, _, _ = optkern.batch_norm_backward(dy.detach(), x.detach(), None, mean, invstd)
    assert dx.shape == x.shape
    with pytest.raises(TypeError, match=r"^x: .*optkern\.torch\.nn"):
        optkern.batch_norm_stats(x)


# ---- 5. autograd integration, version counters ------------------------------------------------------------------
def test_layer_below_gets_gradients(rng):
    """Conv -> BatchNorm2d -> ReLU -> loss: the conv's gradients equal those with torch's BatchNorm2d."""
    torch.manual_seed(int(rng.integers(1 << 31)))
    conv = torch.nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64)
    ref = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, dtype=torch.float64), torch.nn.ReLU())
    randomize(ref[1], rng)
    ours = copy.deepcopy(ref)
    ours[1] = onn.BatchNorm2d(4, dtype=torch.float64)
    ours[1].load_state_dict(ref[1].state_dict())
    x = randn(rng, 3, 2, 5, 5)
    ref(x).square().mean().backward()
    ours(x).square().mean().backward()
    assert ours[0].weight.grad is not None
    scale = float(ref[0].weight.grad.abs().max())
    assert err(ours[0].weight.grad, ref[0].weight.grad) <= 1e-11
    # the conv bias is cancelled by the batch mean: its gradient is 0 in exact arithmetic, measured on the scale
    # of the weight gradient
    assert rel_err(ours[0].bias.grad.numpy(), ref[0].bias.grad.numpy(), floor=scale) <= 1e-11
    assert_same_state(ref[1], ours[1], 1e-11)


def test_version_counters(rng):
    """Buffers' autograd versions move as torch's do (running stats: no bump; num_batches_tracked: add_), and an
    in-place change of a saved input after forward is caught at backward."""
    ref, ours = twin(torch.nn.BatchNorm2d, onn.BatchNorm2d, rng, 3)
    v0 = {k: (b._version, ours.get_buffer(k)._version) for k, b in ref.named_buffers()}
    x = randn(rng, 2, 3, 3, 3).requires_grad_()
    ref(x)
    ours(x)
    for k, b in ref.named_buffers():
        assert b._version - v0[k][0] == ours.get_buffer(k)._version - v0[k][1], k
    h = randn(rng, 2, 3, 3, 3).requires_grad_()
    z = h * 1.0
    y = ours(z)
    z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- 6. dtypes and autocast -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_other_dtypes_fall_back_to_torch(rng, dtype):
    """A module of dtype bfloat16/float16 runs torch's own batch norm (bitwise torch's).  (16-bit input to a float32
    module, torch's mixed batch norm, runs optkern's 16-bit kernels: tests/test_batch_norm_half.py.)"""
    for module_dtype, pair in ((dtype, PAIRS["BatchNorm2d"]),):
        ref, ours = twin(*pair, rng, 3, dtype=module_dtype)
        yr, yo, xr, xo = run_both(ref, ours, randn(rng, 2, 3, 4, 4, dtype=dtype).requires_grad_(), rng=rng)
        assert yo.dtype == yr.dtype == dtype
        assert torch.equal(yo, yr) and torch.equal(xo.grad, xr.grad)
        assert_same_state(ref, ours, 0.0)


def test_autocast(rng):
    """Under torch.autocast('cpu', bfloat16): a float32 input stays float32 on optkern's kernels, and a conv's
    bfloat16 output goes through optkern's 16-bit kernels (bfloat16 output, as torch.nn.BatchNorm2d's; compared
    with torch's in tests/test_batch_norm_half.py, within one bfloat16 ulp)."""
    torch.manual_seed(int(rng.integers(1 << 31)))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    randomize(ref[1], rng)
    ours = onn.convert_batchnorm(copy.deepcopy(ref))
    x, h = randn(rng, 2, 3, 6, 6, dtype=torch.float32), randn(rng, 2, 4, 3, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr, yo = ref[1](h), ours[1](h)
        assert yo.dtype == yr.dtype == torch.float32
        assert err(yo, yr) <= TOL[torch.float32]
        zr, zo = ref(x), ours(x)
    assert zo.dtype == zr.dtype == torch.bfloat16
    zod, zrd = zo.detach().float(), zr.detach().float()
    assert float((zod - zrd).abs().max()) <= 2 ** -7 * float(zrd.abs().max())  # 1 bf16 ulp
    zr.float().sum().backward()
    zo.float().sum().backward()
    assert ours[0].weight.grad is not None
    for name in ("running_mean", "running_var"):
        assert err(getattr(ours[1], name), getattr(ref[1], name)) <= TOL[torch.float32], name


# ---- 7. convert_batchnorm ---------------------------------------------------------------------------------------
def _small_model(rng, dtype=torch.float64):
    torch.manual_seed(int(rng.integers(1 << 31)))
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, dtype=dtype), torch.nn.BatchNorm2d(4, dtype=dtype),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5, dtype=dtype),
                            torch.nn.Sequential(torch.nn.BatchNorm1d(5, momentum=None, dtype=dtype)))
    randomize(m[1], rng)
    randomize(m[5][0], rng)
    return m


@pytest.mark.parametrize("sync", [False, True], ids=["plain", "sync"])
def test_convert_batchnorm(rng, sync):
    """Every BatchNorm swapped (nested ones too), the same Parameter and buffer objects kept, requires_grad and
    training flags kept, outputs and gradients equal to the original model's."""
    ref = _small_model(rng)
    ref[5][0].weight.requires_grad_(False)
    ref[5].eval()
    model = copy.deepcopy(ref)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    out = onn.convert_batchnorm(model, sync=sync)
    assert out is model
    want = (onn.SyncBatchNorm, onn.SyncBatchNorm) if sync else (onn.BatchNorm2d, onn.BatchNorm1d)
    assert type(out[1]) is want[0] and type(out[5][0]) is want[1]
    assert not out[5][0].training and out[1].training and out[5][0].momentum is None
    for k, v in out.state_dict(keep_vars=True).items():
        assert v is tensors[k], f"{k}: not the original tensor"
    assert not out[5][0].weight.requires_grad and out[1].weight.requires_grad
    x = randn(rng, 3, 2, 5, 5)
    ref(x).sum().backward()
    out(x).sum().backward()
    for (k, p), q in zip(ref.named_parameters(), out.parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            assert rel_err(q.grad.numpy(), p.grad.numpy(), floor=1e-3) <= 1e-11, k
    for (k, b), c in zip(ref.named_buffers(), out.buffers()):
        assert err(c, b) <= 1e-12, k
    # a bare batch norm comes back as a new module; float32 and the dtype/device kept
    bn = torch.nn.BatchNorm3d(2, affine=False, track_running_stats=False, dtype=torch.float32)
    new = onn.convert_batchnorm(bn)
    assert type(new) is onn.BatchNorm3d and new.weight is None and new.running_mean is None
    bn32 = torch.nn.BatchNorm1d(3, dtype=torch.float32)
    new32 = onn.convert_batchnorm(bn32)
    assert new32.weight is bn32.weight and new32.weight.dtype == torch.float32
    assert all(t.device.type == "cpu" for t in new32.state_dict().values()) and len(new32.state_dict()) == 5


def test_convert_batchnorm_sync_and_errors(rng):
    ts = torch.nn.SyncBatchNorm(3, process_group=None)
    assert type(onn.convert_batchnorm(ts)) is onn.SyncBatchNorm
    assert type(onn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))) is onn.SyncBatchNorm
    ours = onn.BatchNorm2d(3)
    assert onn.convert_batchnorm(ours) is ours
    with pytest.raises(TypeError, match="^model"):
        onn.convert_batchnorm([torch.nn.BatchNorm2d(3)])
    with pytest.raises(ValueError, match="^process_group"):
        onn.convert_batchnorm(torch.nn.BatchNorm2d(3), process_group=object())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_without_distributed_is_batchnorm(rng, training):
    """No process group initialized: SyncBatchNorm is BatchNorm (as torch's, which then runs F.batch_norm)."""
    assert not torch.distributed.is_initialized()
    ref, ours = twin(torch.nn.SyncBatchNorm, onn.SyncBatchNorm, rng, 3)
    ref.train(training)
    ours.train(training)
    yr, yo, xr, xo = run_both(ref, ours, randn(rng, 4, 3, 2, 5).requires_grad_(), rng=rng)
    assert err(yo, yr) <= TOL[torch.float64] and err(xo.grad, xr.grad) <= TOL[torch.float64]
    assert_same_state(ref, ours, TOL[torch.float64])
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        onn.SyncBatchNorm(0)(torch.empty(2, 0, 3))


# ---- 8. the benchmark's code path -------------------------------------------------------------------------------
def test_bench_torch_nn_smoke():
    """python -m optkern.bench.torch_nn's case on a tiny shape: it checks the gradients before timing, times the
    three steps and reports the target."""
    from optkern.bench import torch_nn as bench

    rows = [bench.bench_layout(torch, layout, (2, 4, 5, 5), reps=1, warmup=1) for layout in ("nchw", "channels_last")]
    for r in rows:
        assert set(r["raw_s"]) == {"optkern", "torch", "optkern_raw"} and r["ratio"] > 0
        assert r["targets"][0]["met"] == (r["ratio"] >= bench.TARGET)
    meta = {"optkern_version": optkern.__version__, "optkern_cpu_isa": optkern.cpu_isa(), "torch_version": "x",
            "cpu_model": "m", "threads": 2, "reps": 1, "command": "python -m optkern.bench.torch_nn"}
    md = bench.markdown({"meta": meta, "rows": rows})
    assert md.count("| BatchNorm2d fwd+bwd train") == 2 and "targets met:" in md
    assert bench.cpu_tag() and "/" not in bench.cpu_tag()
