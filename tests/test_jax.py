"""optkern.jax: the XLA FFI custom calls (liboptkern_jax over the C interface) and the optax-compatible layer.

- each optax-compatible transformation against optax itself under jit (float32, a tree of odd-sized arrays, 40
  steps): the fused path and update() + optax.apply_updates, max normwise relative error <= 2e-5;
- the low-level step of each of the 8 algorithms against optkern's NumPy front end (the same core through _C):
  bit for bit;
- in place with donation (unsafe_buffer_pointer unchanged), originals unchanged without donation, one custom
  call per step for the whole tree;
- refusals: what optax computes and the core does not, and bad inputs (tree structures, dtypes, shapes, lr);
- global_norm / clip_by_global_norm against optax; batch_norm values and grads against jax.numpy (NCHW and
  channels-last, float32 and float64); one core per process (thread count shared with the C library).
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed")
import jax.numpy as jnp  # noqa: E402

try:
    import optkern.jax as okj  # noqa: E402
except ImportError as e:  # liboptkern_jax not built (jax absent at build time, or OPTKERN_JAX=OFF)
    pytest.skip(f"optkern.jax unavailable: {e}", allow_module_level=True)
optax = pytest.importorskip("optax", reason="optax is not installed")
import optkern  # noqa: E402

STEPS = 40
TOL = 2e-5


def _tree(seed, dtype=np.float32, scale=1.0):
    r = np.random.default_rng(seed)
    return {"w": jnp.asarray(scale * r.standard_normal((7, 13)), dtype),
            "b": jnp.asarray(scale * r.standard_normal(33), dtype),
            "s": [jnp.asarray(scale * r.standard_normal((3, 5, 7)), dtype),
                  jnp.asarray(scale * r.standard_normal(()), dtype)]}


# Gradients independent of the params (so the comparison measures the step, not a chaotic trajectory), of two
# scales (every third step 10x larger) so that the adaptive denominators move.
GRADS = [jax.tree.map(lambda x, t=t: x * (1.0 if t % 3 == 0 else 0.1), _tree(100 + t)) for t in range(STEPS)]


def _rel_err(a, b):
    """max over leaves of max|a - b| / max|b| (normwise relative error per leaf)."""
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


def _run(tx, mode, steps=STEPS):
    p = _tree(0)
    s = tx.init(p)

    @jax.jit
    def step(p, s, g):
        if mode == "fused":
            return okj.apply(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for t in range(steps):
        p, s = step(p, s, GRADS[t])
    return p


_SCHED = optax.exponential_decay(3e-2, 10, 0.5)
OPTAX_CASES = {
    "sgd": (lambda m: m.sgd(0.05)),
    "sgd_momentum_schedule": (lambda m: m.sgd(_SCHED, momentum=0.9)),
    "sgd_nesterov": (lambda m: m.sgd(0.05, momentum=0.9, nesterov=True)),
    "adam_schedule": (lambda m: m.adam(_SCHED)),
    "adam_eps_root": (lambda m: m.adam(1e-2, eps=0.0, eps_root=1e-8)),
    "adamw": (lambda m: m.adamw(_SCHED, weight_decay=0.1)),
    "nadam": (lambda m: m.nadam(1e-2)),
    "nadamw": (lambda m: m.nadamw(_SCHED, weight_decay=0.1)),
    "adagrad_eps0": (lambda m: m.adagrad(0.1, eps=0.0)),
    "rmsprop": (lambda m: m.rmsprop(1e-2)),
    "rmsprop_centered_momentum": (lambda m: m.rmsprop(1e-2, centered=True, momentum=0.9, initial_scale=0.1)),
    "rmsprop_nesterov_schedule": (lambda m: m.rmsprop(_SCHED, momentum=0.9, nesterov=True, eps_in_sqrt=False)),
    "adamax": (lambda m: m.adamax(_SCHED)),
    "adadelta": (lambda m: m.adadelta(1.0, weight_decay=0.01)),
    "clip_adam": (lambda m: m.chain(m.clip_by_global_norm(1.0), m.adam(1e-2))),
}


@functools.lru_cache(maxsize=None)
def _optax_ref(case):
    return _run(OPTAX_CASES[case](optax), "update")


@pytest.mark.parametrize("mode", ["fused", "update"])
@pytest.mark.parametrize("case", sorted(OPTAX_CASES))
def test_matches_optax(case, mode):
    ref = _optax_ref(case)
    ours = _run(OPTAX_CASES[case](okj), mode)
    err = _rel_err(ours, ref)
    print(f"optax {case} {mode}: max relative error {err:.2e}")
    assert err <= TOL, f"{case} ({mode}): max relative error {err:.2e} > {TOL}"


def test_clip_fused_into_step():
    tx = okj.chain(okj.clip_by_global_norm(1.0), okj.adam(1e-2))
    assert tx.spec.max_norm == 1.0 and tx.spec.algorithm == "adam"
    big = jax.tree.map(lambda g: 10 * g, GRADS[0])
    p = _tree(0)
    ours, _ = jax.jit(lambda g, s, p: okj.apply(tx, g, s, p))(big, tx.init(p), p)
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    u, _ = ref_tx.update(big, ref_tx.init(p), p)
    assert _rel_err(ours, optax.apply_updates(p, u)) <= TOL


def _torch_rprop_ref(p, grads, lr, etas=(0.5, 1.2), limits=(1e-6, 50.0)):
    prev = jax.tree.map(jnp.zeros_like, p)
    step = jax.tree.map(lambda x: jnp.full_like(x, lr), p)
    for g in grads:
        def one(p, g, prev, st):
            s = g * prev
            st = jnp.clip(st * jnp.where(s > 0, etas[1], jnp.where(s < 0, etas[0], 1.0)), *limits)
            g = jnp.where(s < 0, 0.0, g)
            return p - jnp.sign(g) * st, g, st
        out = jax.tree.map(one, p, g, prev, step)
        p = jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))
        prev = jax.tree.map(lambda o: o[1], out, is_leaf=lambda x: isinstance(x, tuple))
        step = jax.tree.map(lambda o: o[2], out, is_leaf=lambda x: isinstance(x, tuple))
    return p


def test_rprop_torch_and_refusal():
    with pytest.raises(NotImplementedError, match="lags one step"):
        okj.rprop(0.01)
    ours = _run(okj.rprop_torch(0.01), "fused")
    err = _rel_err(ours, _torch_rprop_ref(_tree(0), GRADS, 0.01))
    print(f"rprop_torch vs a jax.numpy torch.optim.Rprop: max relative error {err:.2e}")
    assert err <= TOL


def test_adagrad_torch_and_refusal():
    with pytest.raises(NotImplementedError, match="sqrt"):
        okj.adagrad(0.1)  # optax's default eps=1e-7 sits inside the square root
    ours = _run(okj.adagrad_torch(0.1, initial_accumulator_value=0.1, eps=1e-7), "fused")
    p, s = _tree(0), jax.tree.map(lambda x: jnp.full_like(x, 0.1), _tree(0))
    for g in GRADS:
        s = jax.tree.map(lambda s, g: s + g * g, s, g)
        p = jax.tree.map(lambda p, g, s: p - 0.1 * g / (jnp.sqrt(s) + 1e-7), p, g, s)
    assert _rel_err(ours, p) <= TOL


@pytest.mark.parametrize("make,match", [
    (lambda: okj.adam(1e-3, eps_root=1e-8), "eps_root"),
    (lambda: okj.adam(1e-3, mu_dtype=jnp.bfloat16), "mu_dtype"),
    (lambda: okj.adamw(1e-3, mask=lambda p: p), "mask"),
    (lambda: okj.rmsprop(1e-3, bias_correction=True), "bias_correction"),
    (lambda: okj.rmsprop(_SCHED, momentum=0.9), "schedule"),
    (lambda: okj.adadelta(), "learning_rate"),
    (lambda: okj.nadam(1e-3, eps_root=1e-8), "eps_root"),
])
def test_refuses_what_the_core_does_not_compute(make, match):
    with pytest.raises(NotImplementedError, match=match):
        make()


# ---- the low-level step against optkern's NumPy front end: the same core, bit for bit ------------------------
# (jax hyperparameters, numpy functional keyword arguments, state initial values); lr = 2^-4 is exact in float32.
LOW_LEVEL = {
    "sgd": ({"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, {"momentum": 0.9, "nesterov": True,
                                                                          "weight_decay": 0.01}, (0.0,)),
    "adam": ({"amsgrad": True, "weight_decay": 0.01}, {"amsgrad": True, "weight_decay": 0.01}, (0.0, 0.0, 0.0)),
    "adagrad": ({"lr_decay": 0.01}, {"lr_decay": 0.01}, (0.0,)),
    "rmsprop": ({"centered": True, "momentum": 0.5}, {"centered": True, "momentum": 0.5}, (0.0, 0.0, 0.0)),
    "adamax": ({"beta1": 0.8}, {"betas": (0.8, 0.999)}, (0.0, 0.0)),
    # (the momentum schedule's product is float32 here and float64 in the NumPy front end: compared without it;
    # the optax nadam cases above run the schedule)
    "nadam": ({"weight_decay": 0.01, "decoupled_weight_decay": True, "momentum_schedule": False},
              {"weight_decay": 0.01, "decoupled_weight_decay": True, "momentum_schedule": False}, (0.0, 0.0)),
    "adadelta": ({"rho": 0.8}, {"rho": 0.8}, (0.0, 0.0)),
    "rprop": ({"etaplus": 1.1}, {"etas": (0.5, 1.1)}, (0.0, 0.0625)),
}


@pytest.mark.parametrize("algo", sorted(LOW_LEVEL))
def test_low_level_step_bitwise_vs_numpy(algo):
    hyper, np_kw, init = LOW_LEVEL[algo]
    lr = 0.0625
    p = _tree(0)
    states = tuple(jax.tree.map(lambda x, v=v: jnp.full_like(x, v), p) for v in init)
    assert len(states) == okj.num_states(algo, hyper)
    np_p = [np.array(x) for x in jax.tree.leaves(p)]
    np_s = [[np.array(x) for x in jax.tree.leaves(s)] for s in states]
    mu = jnp.float32(1.0)
    np_mu = 1.0

    @jax.jit
    def f(p, s, g, t, mu):
        return okj.step(algo, p, g, s, lr=lr, step=t, mu_product=mu if algo == "nadam" else None, **hyper)

    fn = getattr(optkern, f"{algo}_step")
    for t in range(1, 6):
        g = GRADS[t]
        out = f(p, states, g, t, mu)
        p, states = out[0], out[1]
        if algo == "nadam":
            mu = out[2]
        np_g = [np.array(x) for x in jax.tree.leaves(g)]
        fn(np_p, np_g, *np_s, step=t, lr=lr, **np_kw, **({"mu_product": np_mu} if algo == "nadam" else {}))
    for a, b in zip(jax.tree.leaves(p), np_p):
        np.testing.assert_array_equal(np.asarray(a), b)
    for s, ns in zip(states, np_s):
        for a, b in zip(jax.tree.leaves(s), ns):
            np.testing.assert_array_equal(np.asarray(a), b)


# ---- in place, copies, one call per step -----------------------------------------------------------------------

def _ptrs(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def test_donated_params_and_state_updated_in_place():
    tx = okj.adam(1e-2)
    p = _tree(0)
    s = tx.init(p)
    # params before state, as in the outputs: jax pairs donated buffers with outputs of the same shape in order
    f = jax.jit(lambda p, s, g: okj.apply(tx, g, s, p), donate_argnums=(0, 1))
    before_p, before_s = _ptrs(p), _ptrs(s.states)
    new_p, new_s = f(p, s, GRADS[0])
    assert _ptrs(new_p) == before_p
    assert _ptrs(new_s.states) == before_s
    assert all(x.is_deleted() for x in jax.tree.leaves(p))


def test_without_donation_the_originals_are_unchanged():
    tx = okj.adam(1e-2)
    p = _tree(0)
    s = tx.init(p)
    keep_p = [np.array(x) for x in jax.tree.leaves(p)]
    keep_s = [np.array(x) for x in jax.tree.leaves(s)]
    new_p, new_s = jax.jit(lambda g, s, p: okj.apply(tx, g, s, p))(GRADS[0], s, p)
    for x, k in zip(jax.tree.leaves(p), keep_p):
        np.testing.assert_array_equal(np.asarray(x), k)
    for x, k in zip(jax.tree.leaves(s), keep_s):
        np.testing.assert_array_equal(np.asarray(x), k)
    assert not np.array_equal(np.asarray(new_p["w"]), keep_p[1 if jax.tree.leaves(p)[0].shape == (33,) else 0])
    assert _ptrs(new_p) != _ptrs(p)


def test_one_custom_call_per_step():
    tx = okj.adam(1e-2)
    p = _tree(0)
    hlo = jax.jit(lambda g, s, p: okj.apply(tx, g, s, p)).lower(GRADS[0], tx.init(p), p).as_text()
    assert hlo.count('custom_call_target = "optkern_step"') + hlo.count("@optkern_step") == 1, hlo


def test_update_is_new_minus_old():
    tx = okj.sgd(0.5, momentum=0.9)
    p = _tree(0)
    u, _ = jax.jit(tx.update)(GRADS[0], tx.init(p), p)
    new_p, _ = jax.jit(lambda g, s, p: okj.apply(tx, g, s, p))(GRADS[0], tx.init(p), p)
    for a, b, c in zip(jax.tree.leaves(u), jax.tree.leaves(new_p), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b) - np.asarray(c))


# ---- bad input: clear errors naming the argument -----------------------------------------------------------

def _adam_states(p):
    z = jax.tree.map(jnp.zeros_like, p)
    return (z, z)


def test_mismatched_tree_structure():
    p = _tree(0)
    g = dict(GRADS[0])
    del g["b"]
    with pytest.raises(ValueError, match="grads: its tree structure"):
        okj.step("adam", p, g, _adam_states(p), lr=1e-3, step=1)
    tx = okj.adam(1e-3)
    with pytest.raises(ValueError, match="grads"):
        okj.apply(tx, g, tx.init(p), p)
    with pytest.raises(ValueError, match=r"states\[1\]"):
        okj.step("adam", p, p, (p, {"w": p["w"]}), lr=1e-3, step=1)


def test_wrong_dtypes_and_shapes():
    p = _tree(0)
    g16 = jax.tree.map(lambda x: x.astype(jnp.float16), GRADS[0])
    with pytest.raises(TypeError, match=r"grads\['b'\]: dtype float16"):
        okj.step("adam", p, g16, _adam_states(p), lr=1e-3, step=1)
    pi = jax.tree.map(lambda x: x.astype(jnp.int32), p)
    with pytest.raises(TypeError, match=r"params\['b'\]: dtype int32"):
        okj.step("sgd", pi, pi, (), lr=1e-3, step=1)
    g = dict(GRADS[0], b=jnp.zeros(34, jnp.float32))
    with pytest.raises(ValueError, match=r"grads\['b'\]: shape \(34,\)"):
        okj.step("sgd", p, g, (), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="states: adam with these hyperparameters takes 3"):
        okj.step("adam", p, GRADS[0], _adam_states(p), lr=1e-3, step=1, amsgrad=True)
    with pytest.raises(TypeError, match="unknown hyperparameter 'betas'"):
        okj.step("adam", p, GRADS[0], _adam_states(p), lr=1e-3, step=1, betas=(0.9, 0.99))


def test_negative_lr():
    p = _tree(0)
    with pytest.raises(ValueError, match="lr: the learning rate must be finite and >= 0"):
        okj.adam(-1e-3)
    with pytest.raises(ValueError, match="lr"):
        okj.step("adam", p, GRADS[0], _adam_states(p), lr=-1.0, step=1)
    # traced: refused by the handler when it runs (nothing written), surfacing as a runtime exception
    tx = okj.adam(lambda count: -1e-3 + 0.0 * count)
    with pytest.raises(Exception, match="hyper.lr"):
        out = jax.jit(lambda g, s, p: okj.apply(tx, g, s, p))(GRADS[0], tx.init(p), p)
        jax.block_until_ready(out)


def test_core_hyperparameter_error_surfaces():
    p = _tree(0)
    with pytest.raises(Exception, match="beta1"):
        out = jax.jit(lambda p, g, s: okj.step("adam", p, g, s, lr=1e-3, step=1, beta1=1.5))(
            p, GRADS[0], _adam_states(p))
        jax.block_until_ready(out)


# ---- global norm -----------------------------------------------------------------------------------------------

def test_global_norm_and_clip():
    g = GRADS[0]
    ref = optax.tree.norm(g)
    got = jax.jit(okj.global_norm)(g)
    assert got.dtype == jnp.float32
    assert abs(float(got) - float(ref)) <= 1e-6 * float(ref)
    inf = okj.global_norm(g, float("inf"))
    assert float(inf) == max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g))
    for max_norm in (0.5, 1e3):
        tx, rtx = okj.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        u, _ = jax.jit(tx.update)(g, tx.init(g))
        r, _ = rtx.update(g, rtx.init(g))
        assert _rel_err(u, r) <= 1e-6


# ---- batch norm ----------------------------------------------------------------------------------------------

def _bn_ref(x, w, b, rm, rv, training, momentum, eps, axis):
    axis %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if training:
        mean = jnp.mean(x, axis=red)
        var = jnp.var(x, axis=red)
        n = x.size // x.shape[axis]
        nrm = (1 - momentum) * rm + momentum * jax.lax.stop_gradient(mean)
        nrv = (1 - momentum) * rv + momentum * jax.lax.stop_gradient(var) * n / (n - 1)
    else:
        mean, var, nrm, nrv = rm, rv, rm, rv
    y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape)
    return y, nrm, nrv


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("axis,shape", [(1, (4, 3, 5, 7)), (-1, (4, 5, 7, 3)), (1, (9, 6))])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(dtype, rtol, axis, shape, training):
    ctx = jax.enable_x64(True) if dtype == np.float64 else jax.enable_x64(jax.config.jax_enable_x64)
    with ctx:
        r = np.random.default_rng(1)
        c = shape[axis]
        x = jnp.asarray(r.standard_normal(shape) * 2 + 0.5, dtype)
        w, b = jnp.asarray(r.standard_normal(c), dtype), jnp.asarray(r.standard_normal(c), dtype)
        rm, rv = jnp.asarray(r.standard_normal(c), dtype), jnp.asarray(r.uniform(0.5, 2, c), dtype)
        dy = jnp.asarray(r.standard_normal(shape), dtype)
        kw = dict(training=training, momentum=0.1, eps=1e-5, axis=axis)
        ours = jax.jit(lambda *a: okj.batch_norm(*a, **kw))(x, w, b, rm, rv)
        ref = _bn_ref(x, w, b, rm, rv, **kw)
        for a, e in zip(ours, ref):
            assert a.dtype == dtype
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol)

        def loss(f):
            return lambda x, w, b: jnp.sum(f(x, w, b, rm, rv, **kw)[0] * dy)

        g_ours = jax.jit(jax.grad(loss(okj.batch_norm), argnums=(0, 1, 2)))(x, w, b)
        g_ref = jax.grad(loss(_bn_ref), argnums=(0, 1, 2))(x, w, b)
        for a, e in zip(g_ours, g_ref):
            scale = float(jnp.max(jnp.abs(e)))
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol * scale)


def test_batch_norm_bad_input():
    x = jnp.zeros((4, 3, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"weight: shape \(4,\)"):
        okj.batch_norm(x, jnp.ones(4), None, training=True)
    with pytest.raises(TypeError, match="bias: dtype"):
        okj.batch_norm(x, None, jnp.ones(3, jnp.int32), training=True)
    with pytest.raises(ValueError, match="running_mean"):
        okj.batch_norm(x, training=False)


# ---- packaging: imports, one core per process ------------------------------------------------------------------

def test_import_optkern_does_not_import_jax():
    code = "import sys, optkern; assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_one_core_per_process():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(optkern.__file__), "lib", "liboptkern.so"))
    before = optkern.get_num_threads()
    try:
        optkern.set_num_threads(3)
        assert lib.optkern_get_num_threads() == 3  # the C library (what the JAX handlers call) sees _C's setting
        p = _tree(0)
        out = okj.step("sgd", p, GRADS[0], (), lr=0.5, step=1)[0]
        np.testing.assert_allclose(np.asarray(out["b"]), np.asarray(p["b"] - 0.5 * GRADS[0]["b"]), rtol=1e-6)
    finally:
        optkern.set_num_threads(before)
