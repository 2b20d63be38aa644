"""optkern against literal NumPy transcriptions of the seeds' algorithm boxes.

Each ``box_*`` function below is a float64 transcription of one box, written line by line with the box's own
variable names (seed 001: Algorithms 8.1-8.7; seed 002: Adadelta, AdaMax, Nadam, AMSGrad; seed 004: Rprop).
The problem is f(x) = 0.5 x^T A x with a random SPD diagonal A, plus fresh random gradient noise each step; the
gradient is taken where the box says (at the interim point theta + alpha v for the Nesterov boxes 8.3 and 8.6),
and optkern is given the gradient at its own param array.  float64 must agree to ~1e-12 relative; float32 (which
sees float32-rounded gradients at its own float32 point) to a looser 2e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import optkern
from optkern import optim as ok

N = 257  # not a multiple of any vector width
STEPS = 25
RTOL = {np.float64: 1e-11, np.float32: 2e-5}


class Problem:
    """f(x) = 0.5 x^T A x, A = diag(a) SPD, plus per-step noise: grad_k(x) = a * x + noise[k]."""

    def __init__(self, rng, n=N, steps=STEPS, noise=0.3):
        self.a = rng.uniform(0.2, 2.0, n)
        self.noise = noise * rng.standard_normal((steps, n))
        self.theta0 = rng.standard_normal(n)

    def grad(self, k, x):
        return self.a * x + self.noise[k]


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check(name, got, want, dtype):
    err = rel_err(got, want)
    assert err <= RTOL[dtype], f"{name}: rel err {err:.3g} > {RTOL[dtype]}"


# ---------------------------------------------------------------------------------------------------------------
# The boxes (float64, literal)
# ---------------------------------------------------------------------------------------------------------------
def box_8_1(P, epsilon_k, steps=STEPS):
    """Algorithm 8.1, SGD: theta <- theta - eps_k g_hat (eps_k may vary with k)."""
    theta = P.theta0.copy()
    for k in range(steps):
        g_hat = P.grad(k, theta)
        theta = theta - epsilon_k(k) * g_hat
    return theta


def box_8_2(P, epsilon, alpha, v, steps=STEPS):
    """Algorithm 8.2, SGD with momentum: v <- alpha v - eps g; theta <- theta + v."""
    theta = P.theta0.copy()
    v = v.copy()
    for k in range(steps):
        g = P.grad(k, theta)
        v = alpha * v - epsilon * g
        theta = theta + v
    return theta, v


def box_8_3(P, epsilon, alpha, v, steps=STEPS):
    """Algorithm 8.3, SGD with Nesterov momentum (gradient at the interim point theta~ = theta + alpha v)."""
    theta = P.theta0.copy()
    v = v.copy()
    for k in range(steps):
        theta_tilde = theta + alpha * v
        g = P.grad(k, theta_tilde)
        v = alpha * v - epsilon * g
        theta = theta + v
    return theta, v


def box_8_4(P, epsilon, delta, steps=STEPS):
    """Algorithm 8.4, AdaGrad: r <- r + g.g; dtheta <- -eps / (delta + sqrt(r)) . g."""
    theta = P.theta0.copy()
    r = np.zeros_like(theta)
    for k in range(steps):
        g = P.grad(k, theta)
        r = r + g * g
        delta_theta = -epsilon / (delta + np.sqrt(r)) * g
        theta = theta + delta_theta
    return theta, r


def box_8_5(P, epsilon, rho, delta, steps=STEPS):
    """Algorithm 8.5, RMSProp: r <- rho r + (1 - rho) g.g; dtheta = -eps / sqrt(delta + r) . g."""
    theta = P.theta0.copy()
    r = np.zeros_like(theta)
    for k in range(steps):
        g = P.grad(k, theta)
        r = rho * r + (1 - rho) * g * g
        delta_theta = -epsilon / np.sqrt(delta + r) * g
        theta = theta + delta_theta
    return theta, r


def box_8_6(P, epsilon, rho, alpha, v, steps=STEPS):
    """Algorithm 8.6, RMSProp with Nesterov momentum (no delta in this box)."""
    theta = P.theta0.copy()
    v = v.copy()
    r = np.zeros_like(theta)
    for k in range(steps):
        theta_tilde = theta + alpha * v
        g = P.grad(k, theta_tilde)
        r = rho * r + (1 - rho) * g * g
        v = alpha * v - epsilon / np.sqrt(r) * g
        theta = theta + v
    return theta, v, r


def box_8_7(P, epsilon, rho1, rho2, delta, steps=STEPS):
    """Algorithm 8.7, Adam, with delta inside the square root: dtheta = -eps s_hat / sqrt(r_hat + delta)."""
    theta = P.theta0.copy()
    s = np.zeros_like(theta)
    r = np.zeros_like(theta)
    t = 0
    for k in range(steps):
        g = P.grad(k, theta)
        t = t + 1
        s = rho1 * s + (1 - rho1) * g
        r = rho2 * r + (1 - rho2) * g * g
        s_hat = s / (1 - rho1 ** t)
        r_hat = r / (1 - rho2 ** t)
        delta_theta = -epsilon * s_hat / np.sqrt(r_hat + delta)
        theta = theta + delta_theta
    return theta, s, r


def box_adadelta(P, gamma, epsilon, steps=STEPS):
    """Seed 002, Adadelta:  theta^{t+1} = theta^t - sqrt(Delta^t + eps) / sqrt(G^t + eps) g^t,
    G^t = gamma G^{t-1} + (1 - gamma) (g^t)^2,  Delta^t = gamma Delta^{t-1} + (1 - gamma) (theta^t - theta^{t-1})^2
    (Delta^t only knows the updates up to theta^t, so it is refreshed after each update; Delta^1 = 0)."""
    theta = P.theta0.copy()
    G = np.zeros_like(theta)
    Delta = np.zeros_like(theta)
    for t in range(steps):
        g = P.grad(t, theta)
        G = gamma * G + (1 - gamma) * g ** 2
        theta_next = theta - np.sqrt(Delta + epsilon) / np.sqrt(G + epsilon) * g
        Delta = gamma * Delta + (1 - gamma) * (theta_next - theta) ** 2
        theta = theta_next
    return theta, G, Delta


def box_adamax(P, eta, beta1, beta2, steps=STEPS):
    """Seed 002, AdaMax: m^t = b1 m + (1 - b1) g; u^t = max(b2 u^{t-1}, |g^t|);
    theta^{t+1} = theta^t - eta / u^t * m^t / (1 - b1^t)."""
    theta = P.theta0.copy()
    m = np.zeros_like(theta)
    u = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = P.grad(t - 1, theta)
        m = beta1 * m + (1 - beta1) * g
        u = np.maximum(beta2 * u, np.abs(g))
        theta = theta - eta / u * m / (1 - beta1 ** t)
    return theta, m, u


def box_nadam(P, eta, beta1, beta2, epsilon, steps=STEPS):
    """Seed 002, Nadam: theta^{t+1} = theta^t - eta / (sqrt(v_hat) + eps) (b1 m^t + (1 - b1) g^t) / (1 - b1^t).

    The seed prints sqrt(v^t (1 - b2^t)) under the root; we read it as v^t / (1 - b2^t), the bias-corrected v
    exactly as in the seed's own Adam line just above it (a multiplication there would un-correct the bias and is a
    transcription slip of the slide)."""
    theta = P.theta0.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = P.grad(t - 1, theta)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        v_hat = v / (1 - beta2 ** t)
        theta = theta - eta / (np.sqrt(v_hat) + epsilon) * ((beta1 * m + (1 - beta1) * g) / (1 - beta1 ** t))
    return theta, m, v


def box_amsgrad(P, eta, beta1, beta2, epsilon, steps=STEPS):
    """Seed 002, AMSGrad (no bias correction): v_hat^t = max(v_hat^{t-1}, v^t);
    theta^{t+1} = theta^t - eta / (sqrt(v_hat^t) + eps) m^t."""
    theta = P.theta0.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    v_hat = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = P.grad(t - 1, theta)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        v_hat = np.maximum(v_hat, v)
        theta = theta - eta / (np.sqrt(v_hat) + epsilon) * m
    return theta, m, v, v_hat


def box_rprop(P, lr, etaminus, etaplus, step_size_min, step_size_max, steps=STEPS):
    """Seed 004, Rprop (per component: same sign -> increase the step, different sign -> decrease it), in torch's
    form: after a sign change the gradient is taken as 0 (no move, and no change of step size next time)."""
    theta = P.theta0.copy()
    prev = np.zeros_like(theta)
    step_size = np.full_like(theta, lr)
    for k in range(steps):
        g = P.grad(k, theta)
        s = g * prev
        step_size = np.where(s > 0, np.minimum(step_size * etaplus, step_size_max), step_size)
        step_size = np.where(s < 0, np.maximum(step_size * etaminus, step_size_min), step_size)
        g = np.where(s < 0, 0.0, g)
        theta = theta - np.sign(g) * step_size
        prev = g
    return theta, prev, step_size


# ---------------------------------------------------------------------------------------------------------------
# Running optkern on the same problem
# ---------------------------------------------------------------------------------------------------------------
def run_class(opt_factory, P, dtype, steps=STEPS, interim=None):
    """Step an optkern optimizer built by ``opt_factory([param])`` on P; returns (param, state).

    interim(param, state) -> the point where the gradient is taken (default: the param array itself)."""
    p = P.theta0.astype(dtype)
    opt = opt_factory([p])
    for k in range(steps):
        x = p.astype(np.float64)
        g = P.grad(k, x).astype(dtype)
        opt.step([g])
    return p, opt.state[0], opt


DTYPES = [np.float64, np.float32]
IDS = ["f64", "f32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_1_sgd(dtype, rng):
    P = Problem(rng)
    eps = rng.uniform(0.05, 0.3)
    want = box_8_1(P, lambda k: eps)
    p, st, _ = run_class(lambda ps: ok.SGD(ps, lr=eps), P, dtype)
    check("theta", p, want, dtype)
    assert st["step"] == STEPS


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_2_momentum(dtype, rng):
    P = Problem(rng)
    eps, alpha = rng.uniform(0.02, 0.1), rng.uniform(0.5, 0.9)
    theta, v = box_8_2(P, eps, alpha, np.zeros(N))
    p, st, _ = run_class(lambda ps: ok.SGD(ps, lr=eps, momentum=alpha, velocity=True), P, dtype)
    check("theta", p, theta, dtype)
    check("v", st["momentum_buffer"], v, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_2_functional_random_initial_velocity(dtype, rng):
    """The box starts from any initial velocity v: the functional layer takes it as the momentum buffer."""
    P = Problem(rng)
    eps, alpha = rng.uniform(0.02, 0.1), rng.uniform(0.5, 0.9)
    v0 = 0.5 * rng.standard_normal(N)
    theta, v = box_8_2(P, eps, alpha, v0)
    p, buf = P.theta0.astype(dtype), v0.astype(dtype)
    for k in range(STEPS):
        g = P.grad(k, p.astype(np.float64)).astype(dtype)
        optkern.sgd_step(p, g, buf, step=k + 1, lr=eps, momentum=alpha, velocity=True)
    check("theta", p, theta, dtype)
    check("v", buf, v, dtype)


def _nesterov_sgd(dtype, P, eps, alpha, v0, functional):
    """optkern's Algorithm 8.3: the param array holds theta~ = theta + alpha v and the gradient is taken there."""
    p = (P.theta0 + alpha * v0).astype(dtype)  # interim point for the initial (theta, v)
    buf = v0.astype(dtype)
    if functional:
        for k in range(STEPS):
            g = P.grad(k, p.astype(np.float64)).astype(dtype)
            optkern.sgd_step(p, g, buf, step=k + 1, lr=eps, momentum=alpha, nesterov=True, velocity=True)
        return p, buf
    opt = ok.SGD([p], lr=eps, momentum=alpha, nesterov=True, velocity=True)
    for k in range(STEPS):
        g = P.grad(k, p.astype(np.float64)).astype(dtype)
        opt.step([g])
    return p, opt.state[0]["momentum_buffer"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("functional", [False, True], ids=["class", "functional"])
def test_box_8_3_nesterov(dtype, functional, rng):
    P = Problem(rng)
    eps, alpha = rng.uniform(0.02, 0.1), rng.uniform(0.5, 0.9)
    v0 = np.zeros(N) if not functional else 0.5 * rng.standard_normal(N)
    theta, v = box_8_3(P, eps, alpha, v0)
    p, buf = _nesterov_sgd(dtype, P, eps, alpha, v0, functional)
    check("v", buf, v, dtype)
    check("theta (param - alpha v)", p.astype(np.float64) - alpha * buf.astype(np.float64), theta, dtype)
    check("interim point theta + alpha v", p, theta + alpha * v, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_4_adagrad(dtype, rng):
    P = Problem(rng)
    eps, delta = rng.uniform(0.05, 0.3), rng.uniform(0.1, 1.0)  # a large delta tells delta + sqrt(r) apart
    theta, r = box_8_4(P, eps, delta)
    p, st, _ = run_class(lambda ps: ok.Adagrad(ps, lr=eps, eps=delta), P, dtype)
    check("theta", p, theta, dtype)
    check("r", st["sum"], r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_5_rmsprop(dtype, rng):
    P = Problem(rng)
    eps, rho, delta = rng.uniform(0.01, 0.05), rng.uniform(0.8, 0.95), rng.uniform(0.1, 1.0)
    theta, r = box_8_5(P, eps, rho, delta)
    p, st, _ = run_class(lambda ps: ok.RMSprop(ps, lr=eps, alpha=rho, eps=delta, eps_inside_sqrt=True), P, dtype)
    check("theta", p, theta, dtype)
    check("r", st["square_avg"], r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("v0_random", [False, True], ids=["v0", "vrand"])
def test_box_8_6_rmsprop_nesterov_functional(dtype, v0_random, rng):
    P = Problem(rng)
    eps, rho, alpha = rng.uniform(0.005, 0.02), rng.uniform(0.8, 0.95), rng.uniform(0.5, 0.9)
    v0 = 0.05 * rng.standard_normal(N) if v0_random else np.zeros(N)
    theta, v, r = box_8_6(P, eps, rho, alpha, v0)
    p = (P.theta0 + alpha * v0).astype(dtype)
    sq, buf = np.zeros(N, dtype), v0.astype(dtype)
    for k in range(STEPS):
        g = P.grad(k, p.astype(np.float64)).astype(dtype)
        optkern.rmsprop_step(p, g, sq, momentum_buffers=buf, step=k + 1, lr=eps, alpha=rho, eps=0.0, momentum=alpha,
                             nesterov=True, eps_inside_sqrt=True)
    check("r", sq, r, dtype)
    check("v", buf, v, dtype)
    check("theta (param - alpha v)", p.astype(np.float64) - alpha * buf.astype(np.float64), theta, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_6_rmsprop_nesterov_class(dtype, rng):
    P = Problem(rng)
    eps, rho, alpha = rng.uniform(0.005, 0.02), rng.uniform(0.8, 0.95), rng.uniform(0.5, 0.9)
    theta, v, r = box_8_6(P, eps, rho, alpha, np.zeros(N))
    p = P.theta0.astype(dtype)
    opt = ok.RMSprop([p], lr=eps, alpha=rho, momentum=alpha, nesterov=True, eps_inside_sqrt=True, eps=0.0)
    for k in range(STEPS):
        opt.step([P.grad(k, p.astype(np.float64)).astype(dtype)])
    st = opt.state[0]
    check("r", st["square_avg"], r, dtype)
    check("v", st["momentum_buffer"], v, dtype)
    check("theta (param - alpha v)", p.astype(np.float64) - alpha * st["momentum_buffer"], theta, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_8_7_adam(dtype, rng):
    P = Problem(rng)
    eps, rho1, rho2 = rng.uniform(0.01, 0.05), rng.uniform(0.8, 0.95), rng.uniform(0.9, 0.999)
    delta = rng.uniform(0.05, 0.5)  # large enough that sqrt(r_hat + delta) != sqrt(r_hat) + delta
    theta, s, r = box_8_7(P, eps, rho1, rho2, delta)
    p, st, _ = run_class(lambda ps: ok.Adam(ps, lr=eps, betas=(rho1, rho2), eps=delta, eps_inside_sqrt=True), P,
                         dtype)
    check("theta", p, theta, dtype)
    check("s", st["exp_avg"], s, dtype)
    check("r", st["exp_avg_sq"], r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_adadelta(dtype, rng):
    P = Problem(rng)
    gamma, epsilon = rng.uniform(0.8, 0.95), rng.uniform(1e-3, 1e-2)
    theta, G, Delta = box_adadelta(P, gamma, epsilon)
    p, st, _ = run_class(lambda ps: ok.Adadelta(ps, lr=1.0, rho=gamma, eps=epsilon), P, dtype)
    check("theta", p, theta, dtype)
    check("G", st["square_avg"], G, dtype)
    check("Delta", st["acc_delta"], Delta, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_adamax(dtype, rng):
    P = Problem(rng)
    eta, beta1, beta2 = rng.uniform(0.01, 0.05), rng.uniform(0.8, 0.95), rng.uniform(0.9, 0.999)
    theta, m, u = box_adamax(P, eta, beta1, beta2)
    p, st, _ = run_class(lambda ps: ok.Adamax(ps, lr=eta, betas=(beta1, beta2), eps=0.0), P, dtype)
    check("theta", p, theta, dtype)
    check("m", st["exp_avg"], m, dtype)
    check("u", st["exp_inf"], u, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_nadam(dtype, rng):
    P = Problem(rng)
    eta, beta1, beta2 = rng.uniform(0.01, 0.05), rng.uniform(0.8, 0.95), rng.uniform(0.9, 0.999)
    epsilon = rng.uniform(0.01, 0.1)  # large enough to tell sqrt(v_hat) + eps from other placements
    theta, m, v = box_nadam(P, eta, beta1, beta2, epsilon)
    p, st, _ = run_class(lambda ps: ok.NAdam(ps, lr=eta, betas=(beta1, beta2), eps=epsilon, momentum_schedule=False),
                         P, dtype)
    check("theta", p, theta, dtype)
    check("m", st["exp_avg"], m, dtype)
    check("v", st["exp_avg_sq"], v, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_box_amsgrad(dtype, rng):
    P = Problem(rng)
    eta, beta1, beta2 = rng.uniform(0.005, 0.02), rng.uniform(0.8, 0.95), rng.uniform(0.9, 0.99)
    epsilon = rng.uniform(0.01, 0.1)
    theta, m, v, v_hat = box_amsgrad(P, eta, beta1, beta2, epsilon)
    p, st, _ = run_class(lambda ps: ok.Adam(ps, lr=eta, betas=(beta1, beta2), eps=epsilon, amsgrad=True,
                                            bias_correction=False), P, dtype)
    check("theta", p, theta, dtype)
    check("m", st["exp_avg"], m, dtype)
    check("v", st["exp_avg_sq"], v, dtype)
    check("v_hat", st["max_exp_avg_sq"], v_hat, dtype)
    assert np.any(v_hat > v), "the max must have been active somewhere (else AMSGrad == Adam here)"


def test_box_rprop(rng):
    """float64 only: Rprop branches on signs, and a float32 run on a feedback problem may flip a near-zero sign."""
    dtype = np.float64
    P = Problem(rng)
    lr = rng.uniform(0.01, 0.05)
    etaminus, etaplus = rng.uniform(0.3, 0.7), rng.uniform(1.1, 1.5)
    smin, smax = rng.uniform(1e-4, 1e-3), rng.uniform(0.05, 0.2)
    theta, prev, step_size = box_rprop(P, lr, etaminus, etaplus, smin, smax)
    p, st, _ = run_class(lambda ps: ok.Rprop(ps, lr=lr, etas=(etaminus, etaplus), step_sizes=(smin, smax)), P, dtype)
    check("theta", p, theta, dtype)
    check("prev", st["prev"], prev, dtype)
    check("step_size", st["step_size"], step_size, dtype)
    assert np.any(step_size > lr) and np.any(step_size < lr), "both branches of the box must have been taken"


def test_box_rprop_float32_fixed_gradients(rng):
    """float32 on a gradient sequence that does not depend on the param (signs cannot flip between the runs)."""
    steps = STEPS
    G = rng.standard_normal((steps, N)) + 0.3  # a bias so that both "same sign" and "sign change" happen
    P = Problem(rng)
    P.a = np.zeros(N)
    P.noise = G.astype(np.float32).astype(np.float64)
    lr, etaminus, etaplus = 0.02, 0.5, 1.2
    theta, prev, step_size = box_rprop(P, lr, etaminus, etaplus, 1e-6, 50.0)
    p, st, _ = run_class(lambda ps: ok.Rprop(ps, lr=lr, etas=(etaminus, etaplus)), P, np.float32)
    check("theta", p, theta, np.float32)
    check("step_size", st["step_size"], step_size, np.float32)
    check("prev", st["prev"], prev, np.float32)


def test_box_8_1_with_schedule_is_sensitive_to_k(rng):
    """Algorithm 8.1 with a learning rate schedule eps_k: k counts the steps already taken (0 on the first)."""
    P = Problem(rng)
    sched = optkern.schedules.inverse_time(0.3)
    want = box_8_1(P, sched)
    p, _, _ = run_class(lambda ps: ok.SGD(ps, lr=sched), P, np.float64)
    check("theta", p, want, np.float64)
    shifted = box_8_1(P, lambda k: sched(k + 1))  # an off-by-one schedule must be caught
    assert rel_err(p, shifted) > 1e-6
