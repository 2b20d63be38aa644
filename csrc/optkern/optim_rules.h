// Per-element update rules of every optimizer: the one place the math is written.
//
// Each rule is a struct with
//   - kStates: how many state buffers it reads and writes besides (param, grad);
//   - Coef<T>: the per-step scalars, made by optim_coefs.h (on the host, or on the device from device step
//     counters) and converted to T;
//   - apply(): the update of one element, a __host__ __device__ function.
// The CPU executor (cpu/optim_cpu_kernels.cpp, compiled once per instruction set) and the CUDA executor
// (cuda/optim_cuda.cu) both call apply(), so the CPU tests check the exact formula the GPU runs.
// Both are compiled without FMA contraction, so every path rounds identically.
//
// Conventions shared by all rules:
//   g_in is the raw gradient element; gscale = grad_scale * (maximize ? -1 : 1) folds a global-norm clip
//   (or an AMP unscale) and torch's `maximize` into the same pass.  "wd" is L2 weight decay added to the
//   gradient (g += wd * p); "decay" is decoupled weight decay (p *= 1 - lr * wd), 1 when unused.
//   Hyperparameter branches are written as selects so that the loop stays branch-free and vectorizes.
//   A rule with kStates <= 3 takes three state references (unused ones are dummies); a rule with more (OGR)
//   takes kMaxStates.  The executors call apply_rule() below, which passes kMaxStates and picks the form.
#pragma once

#include "common.h"

namespace optkern {

// ------------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD; seeds' Algorithm 8.1).  States: none, or the momentum buffer.
//   g <- g + wd p
//   buf <- g on the first step, else momentum buf + (1 - dampening) g
//   d <- g + momentum buf (nesterov) or buf
//   p <- p - lr d
template <class T>
struct SgdCoef {
  T gscale, wd, neg_lr, momentum, one_minus_dampening;
  bool nesterov, first_step;
  SgdCoef() = default;
  template <class U>
  OK_HD explicit SgdCoef(const SgdCoef<U>& c)
      : gscale(T(c.gscale)), wd(T(c.wd)), neg_lr(T(c.neg_lr)), momentum(T(c.momentum)),
        one_minus_dampening(T(c.one_minus_dampening)), nesterov(c.nesterov), first_step(c.first_step) {}
};

template <int kMomentum>
struct SgdRule {
  static constexpr int kStates = kMomentum ? 1 : 0;
  template <class T>
  using Coef = SgdCoef<T>;
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& buf, T&, T&) {
    T g = g_in * c.gscale + c.wd * p;  // gradient with clip/maximize folded in, plus L2 weight decay
    T d = g;
    if (kMomentum) {
      T b = c.first_step ? g : c.momentum * buf + c.one_minus_dampening * g;  // momentum buffer
      buf = b;
      d = c.nesterov ? g + c.momentum * b : b;  // Nesterov looks one momentum step ahead
    }
    p = p + c.neg_lr * d;  // apply update
  }
};

// ------------------------------------------------------------------------------------------------
// SGD with momentum in velocity form (seeds' Algorithms 8.2 and 8.3).  State: the velocity v.
//   v' <- alpha v - eps g
//   8.2: theta <- theta + v'
//   8.3 (nesterov): the array holds the interim point theta~ = theta + alpha v, where the caller evaluates the
//        gradient, so theta~' = theta' + alpha v' = theta~ + (1 + alpha) v' - alpha v.
struct SgdVelocityRule {
  static constexpr int kStates = 1;
  template <class T>
  struct Coef {
    T gscale, wd, neg_lr, momentum, one_plus_momentum;
    bool nesterov;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), wd(T(c.wd)), neg_lr(T(c.neg_lr)), momentum(T(c.momentum)),
          one_plus_momentum(T(c.one_plus_momentum)), nesterov(c.nesterov) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& v, T&, T&) {
    T g = g_in * c.gscale + c.wd * p;
    T v_new = c.momentum * v + c.neg_lr * g;  // velocity update
    p = c.nesterov ? p + (c.one_plus_momentum * v_new - c.momentum * v) : p + v_new;  // apply update
    v = v_new;
  }
};

// ------------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam, AdamW; seeds' Algorithm 8.7 and AMSGrad).  States: m, v (, v_max).
//   p <- p decay;  g <- g + wd p
//   m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2;  v_max <- max(v_max, v) (AMSGrad)
//   denom <- sqrt(v / bc2_in + eps_in) / bc2_sqrt_out + eps_out
//       torch:          bc2_in = 1, eps_in = 0,   bc2_sqrt_out = sqrt(1 - beta2^t), eps_out = eps
//       Algorithm 8.7:  bc2_in = 1 - beta2^t, eps_in = delta, bc2_sqrt_out = 1, eps_out = 0
//   p <- p - (lr / bc1) m / denom
template <class T>
struct AdamCoef {
  T gscale, decay, wd, beta1_w, beta2, one_minus_beta2, bc2_in, eps_in, bc2_sqrt_out, eps_out, neg_step_size;
  AdamCoef() = default;
  template <class U>
  OK_HD explicit AdamCoef(const AdamCoef<U>& c)
      : gscale(T(c.gscale)), decay(T(c.decay)), wd(T(c.wd)), beta1_w(T(c.beta1_w)), beta2(T(c.beta2)),
        one_minus_beta2(T(c.one_minus_beta2)), bc2_in(T(c.bc2_in)), eps_in(T(c.eps_in)),
        bc2_sqrt_out(T(c.bc2_sqrt_out)), eps_out(T(c.eps_out)), neg_step_size(T(c.neg_step_size)) {}
};

// kEpsInside: the form of the denominator, fixed at compile time so that neither form divides by 1 (Adam is bound
// by its divides on the CPU): kEpsInside = 0 is torch's sqrt(v) / bc2_sqrt_out + eps_out, 1 is Algorithm 8.7's
// sqrt(v / bc2_in + eps_in).  Each equals the general expression above bit for bit (x / 1 and x + 0 are exact).
template <int kAmsgrad, int kEpsInside = 0>
struct AdamRule {
  static constexpr int kStates = kAmsgrad ? 3 : 2;
  template <class T>
  using Coef = AdamCoef<T>;
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& m, T& v, T& v_max) {
    T g = g_in * c.gscale;
    T pd = p * c.decay;                                          // decoupled weight decay (AdamW)
    g = g + c.wd * pd;                                           // L2 weight decay (Adam)
    T m_new = m + c.beta1_w * (g - m);                           // update biased first moment
    T v_new = v * c.beta2 + c.one_minus_beta2 * g * g;           // update biased second moment
    T v_use = v_new;
    if (kAmsgrad) {
      v_use = ok_max(v_max, v_new);                              // AMSGrad: running max of the second moment
      v_max = v_use;
    }
    T denom = kEpsInside ? OK_SQRT(v_use / c.bc2_in + c.eps_in)                   // bias-corrected RMS
                         : OK_SQRT(v_use) / c.bc2_sqrt_out + c.eps_out;
    p = pd + c.neg_step_size * m_new / denom;                    // apply update
    m = m_new;
    v = v_new;
  }
};

// ------------------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad; seeds' Algorithm 8.4).  State: the sum of squares r.
//   g <- g + wd p;  r <- r + g^2;  p <- p - clr g / (sqrt(r) + eps),  clr = lr / (1 + (t - 1) lr_decay)
struct AdagradRule {
  static constexpr int kStates = 1;
  template <class T>
  struct Coef {
    T gscale, wd, eps, neg_clr;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c) : gscale(T(c.gscale)), wd(T(c.wd)), eps(T(c.eps)), neg_clr(T(c.neg_clr)) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& sum, T&, T&) {
    T g = g_in * c.gscale + c.wd * p;
    T s = sum + g * g;                         // accumulate squared gradient
    T std_ = OK_SQRT(s) + c.eps;
    p = p + c.neg_clr * g / std_;              // apply update
    sum = s;
  }
};

// ------------------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop; seeds' Algorithms 8.5 and 8.6).  States: r (, grad average) (, momentum).
//   g <- g + wd p;  r <- alpha r + (1 - alpha) g^2
//   centered: ga <- lerp(ga, g, 1 - alpha); r_c <- r - ga^2, else r_c <- r
//   denom <- sqrt(r_c + eps_in) + eps_out     (torch: eps outside; Algorithms 8.5/8.6: delta inside)
//   no momentum:    p <- p - lr g / denom
//   torch momentum: buf <- momentum buf + g / denom;  p <- p - lr buf
//   nesterov (8.6): the array holds theta~;  v' <- alpha v - lr g / denom;  theta~ <- theta~ + (1+alpha) v' - alpha v
template <class T>
struct RmspropCoef {
  T gscale, wd, alpha, one_minus_alpha, eps_in, eps_out, neg_lr, momentum, buf_gain, one_plus_momentum;
  bool nesterov;
  RmspropCoef() = default;
  template <class U>
  OK_HD explicit RmspropCoef(const RmspropCoef<U>& c)
      : gscale(T(c.gscale)), wd(T(c.wd)), alpha(T(c.alpha)), one_minus_alpha(T(c.one_minus_alpha)),
        eps_in(T(c.eps_in)), eps_out(T(c.eps_out)), neg_lr(T(c.neg_lr)), momentum(T(c.momentum)),
        buf_gain(T(c.buf_gain)), one_plus_momentum(T(c.one_plus_momentum)), nesterov(c.nesterov) {}
};

template <int kCentered, int kMomentum>
struct RmspropRule {
  static constexpr int kStates = 1 + kCentered + kMomentum;
  template <class T>
  using Coef = RmspropCoef<T>;
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& sq, T& s1, T& s2) {
    T g = g_in * c.gscale + c.wd * p;
    T r = sq * c.alpha + c.one_minus_alpha * g * g;  // accumulate squared gradient
    sq = r;
    T rc = r;
    if (kCentered) {
      T ga = s1 + c.one_minus_alpha * (g - s1);       // running mean of the gradient
      s1 = ga;
      rc = r - ga * ga;                               // variance estimate
    }
    T denom = OK_SQRT(rc + c.eps_in) + c.eps_out;
    if (kMomentum) {
      T& buf = kCentered ? s2 : s1;
      // buf_gain is 1 for torch's buffer (p <- p - lr buf) and -lr for the velocity form of Algorithm 8.6.
      T b = c.momentum * buf + c.buf_gain * g / denom;
      p = c.nesterov ? p + (c.one_plus_momentum * b - c.momentum * buf) : p + c.neg_lr * b;
      buf = b;
    } else {
      p = p + c.neg_lr * g / denom;                   // apply update
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Adamax (torch.optim.Adamax; AdaMax in seed 002).  States: m, u.
//   g <- g + wd p;  m <- lerp(m, g, 1 - beta1);  u <- max(beta2 u, |g| + eps);  p <- p - (lr / bc1) m / u
struct AdamaxRule {
  static constexpr int kStates = 2;
  template <class T>
  struct Coef {
    T gscale, wd, beta1_w, beta2, eps, neg_clr;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), wd(T(c.wd)), beta1_w(T(c.beta1_w)), beta2(T(c.beta2)), eps(T(c.eps)),
          neg_clr(T(c.neg_clr)) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& m, T& u, T&) {
    T g = g_in * c.gscale + c.wd * p;
    T m_new = m + c.beta1_w * (g - m);                 // first moment
    T u_new = ok_max(u * c.beta2, ok_abs(g) + c.eps);  // exponentially weighted infinity norm
    p = p + c.neg_clr * m_new / u_new;                 // apply update
    m = m_new;
    u = u_new;
  }
};

// ------------------------------------------------------------------------------------------------
// NAdam (torch.optim.NAdam; Nadam in seed 002).  States: m, v.
//   p <- p decay;  g <- g + wd p;  m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
//   denom <- sqrt(v / bc2) + eps;  p <- p + coef_g g / denom + coef_m m / denom
//   torch:   coef_g = -lr (1 - mu_t) / (1 - prod mu),  coef_m = -lr mu_{t+1} / (1 - prod mu * mu_{t+1})
//   seed 002 (no momentum schedule): coef_g = -lr (1 - beta1) / bc1, coef_m = -lr beta1 / bc1
struct NadamRule {
  static constexpr int kStates = 2;
  template <class T>
  struct Coef {
    T gscale, decay, wd, beta1_w, beta2, one_minus_beta2, bc2, eps, coef_g, coef_m;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), decay(T(c.decay)), wd(T(c.wd)), beta1_w(T(c.beta1_w)), beta2(T(c.beta2)),
          one_minus_beta2(T(c.one_minus_beta2)), bc2(T(c.bc2)), eps(T(c.eps)), coef_g(T(c.coef_g)),
          coef_m(T(c.coef_m)) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& m, T& v, T&) {
    T g = g_in * c.gscale;
    T pd = p * c.decay;
    g = g + c.wd * pd;
    T m_new = m + c.beta1_w * (g - m);
    T v_new = v * c.beta2 + c.one_minus_beta2 * g * g;
    T denom = OK_SQRT(v_new / c.bc2) + c.eps;
    T p1 = pd + c.coef_g * g / denom;  // Nesterov part: the current gradient
    p = p1 + c.coef_m * m_new / denom;  // momentum part, one step ahead
    m = m_new;
    v = v_new;
  }
};

// ------------------------------------------------------------------------------------------------
// Adadelta (torch.optim.Adadelta; seed 002).  States: E[g^2], E[dx^2].
//   g <- g + wd p;  sq <- rho sq + (1 - rho) g^2;  dx <- sqrt(acc + eps) / sqrt(sq + eps) g
//   acc <- rho acc + (1 - rho) dx^2;  p <- p - lr dx
struct AdadeltaRule {
  static constexpr int kStates = 2;
  template <class T>
  struct Coef {
    T gscale, wd, rho, one_minus_rho, eps, neg_lr;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), wd(T(c.wd)), rho(T(c.rho)), one_minus_rho(T(c.one_minus_rho)), eps(T(c.eps)),
          neg_lr(T(c.neg_lr)) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& sq, T& acc, T&) {
    T g = g_in * c.gscale + c.wd * p;
    T s = sq * c.rho + c.one_minus_rho * g * g;                  // accumulate squared gradient
    T delta = OK_SQRT(acc + c.eps) / OK_SQRT(s + c.eps) * g;     // unit-corrected step
    acc = acc * c.rho + c.one_minus_rho * delta * delta;         // accumulate squared updates
    sq = s;
    p = p + c.neg_lr * delta;                                    // apply update
  }
};

// ------------------------------------------------------------------------------------------------
// Rprop (torch.optim.Rprop; seed 004).  States: previous gradient, per-element step size.
//   s <- g prev;  step <- clamp(step * (etaplus if s > 0, etaminus if s < 0, else 1), min, max)
//   g <- 0 where s < 0;  p <- p - sign(g) step;  prev <- g
struct RpropRule {
  static constexpr int kStates = 2;
  template <class T>
  struct Coef {
    T gscale, etaminus, etaplus, step_min, step_max;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), etaminus(T(c.etaminus)), etaplus(T(c.etaplus)), step_min(T(c.step_min)),
          step_max(T(c.step_max)) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& prev, T& step, T&) {
    T g = g_in * c.gscale;
    T s = g * prev;                                                        // sign agreement with last step
    T factor = s > T(0) ? c.etaplus : (s < T(0) ? c.etaminus : T(1));
    T st = ok_min(ok_max(step * factor, c.step_min), c.step_max);         // adapt the step size
    T g_kept = s < T(0) ? T(0) : g;                                        // no move after a sign change
    p = p + (-ok_sign(g_kept)) * st;                                       // apply update
    step = st;
    prev = g_kept;
  }
};

// ------------------------------------------------------------------------------------------------
// OGR, online gradient linear regression (seed 002, the end of the lecture notes; issue 16 part 2), diagonal form.
// Per coordinate, the noisy gradients g^t seen at theta^t are fitted by exponentially weighted least squares with
// the line g = lambda (theta - p), i.e. the parabola f = lambda (theta - p)^2 / 2:
//   lambda = cov(g, theta) / var(theta),  p = mean(theta) - mean(g) / lambda,
// and the step goes a fraction alpha (= lr) of the way to the vertex p when lambda > 0 (attract) and as far away
// from it when lambda < 0 (repel, to leave saddles):  theta <- theta + alpha sign(lambda) (p - theta).
// Written with the fitted gradient at theta, g^ = mean(g) + lambda (theta - mean(theta)), that step is
// -alpha g^ / |lambda| = -alpha (mean(g) var + cov (theta - mean(theta))) / |cov|: one division, no lambda.
// States (in this order): mean(theta), mean(g), var(theta), cov(g, theta) and the length of the last step.
//   The means and the centered moments are updated Welford-style (West 1979 / Finch 2009, weighted form) from the
//   deviations from the previous means, never as mean(theta^2) - mean(theta)^2, which cancels in float32 when
//   theta barely moves:  d = theta - m_theta, e = g - m_g;  m_theta += (1 - beta) d;  m_g += (1 - beta) e;
//   var = beta (var + (1 - beta) d^2);  cov = beta (cov + (1 - beta) d e).
//   On the first step the means are set to the sample and var = cov = 0, so the first sample carries the weight
//   beta^(t-1) and the weights sum to one at every step: no bias correction is needed.
// Guards (each falls back to the plain SGD step d_sgd = -sgd_lr g):
//   warm-up: the steps t <= warmup (coefficient `fit` false);
//   var(theta) near zero: var <= (eps (1 + |m_theta|))^2 (theta's spread below eps relative, eps absolute);
//   lambda near zero: |lambda| sgd_lr <= eps, tested as |cov| sgd_lr <= eps var (no division).
// Trust radius: the regression step is clipped to |d| <= trust * max(last, |d_sgd|), last = the previous step's
//   length of this coordinate; the floor |d_sgd| lets the radius grow from the SGD warm-up (by up to trust per step).
//   g <- g_in gscale + wd theta (L2 weight decay, clip / maximize folded in as in every rule).
struct OgrRule {
  static constexpr int kStates = 5;
  template <class T>
  struct Coef {
    T gscale, wd, beta, one_minus_beta, neg_alpha, neg_sgd_lr, sgd_lr, trust, eps;
    bool first_step, fit;
    Coef() = default;
    template <class U>
    OK_HD explicit Coef(const Coef<U>& c)
        : gscale(T(c.gscale)), wd(T(c.wd)), beta(T(c.beta)), one_minus_beta(T(c.one_minus_beta)),
          neg_alpha(T(c.neg_alpha)), neg_sgd_lr(T(c.neg_sgd_lr)), sgd_lr(T(c.sgd_lr)), trust(T(c.trust)),
          eps(T(c.eps)), first_step(c.first_step), fit(c.fit) {}
  };
  template <class T>
  OK_HD static void apply(const Coef<T>& c, T& p, T g_in, T& m_theta, T& m_g, T& var, T& cov, T& last) {
    T g = g_in * c.gscale + c.wd * p;
    T d = c.first_step ? T(0) : p - m_theta;                       // deviations from the previous means
    T e = c.first_step ? T(0) : g - m_g;
    T mt = c.first_step ? p : m_theta + c.one_minus_beta * d;      // EMA of theta
    T mg = c.first_step ? g : m_g + c.one_minus_beta * e;          // EMA of g
    T v = c.first_step ? T(0) : c.beta * (var + c.one_minus_beta * d * d);   // EMA variance of theta
    T cv = c.first_step ? T(0) : c.beta * (cov + c.one_minus_beta * d * e);  // EMA covariance of g and theta
    T acov = ok_abs(cv);
    T thr = c.eps * (T(1) + ok_abs(mt));
    // the guards, combined with & (not &&): no short-circuit branch, so the loop if-converts and vectorizes
    const bool use = c.fit & (v > thr * thr) & (acov * c.sgd_lr > c.eps * v);
    T d_sgd = c.neg_sgd_lr * g;                                         // fallback: plain SGD
    T num = mg * v + cv * (p - mt);                                     // fitted gradient at theta, times var
    T d_fit = c.neg_alpha * num / (use ? acov : T(1));                  // -alpha g^ / |lambda|
    T limit = c.trust * ok_max(last, ok_abs(d_sgd));                    // trust radius
    d_fit = ok_min(ok_max(d_fit, -limit), limit);
    T step = use ? d_fit : d_sgd;
    p = p + step;                                                       // apply update
    m_theta = mt;
    m_g = mg;
    var = v;
    cov = cv;
    last = ok_abs(step);
  }
};

// The executors' one call: kMaxStates state references, passed on as the rule takes them.
template <class Rule, class T>
OK_HD void apply_rule(const typename Rule::template Coef<T>& c, T& p, T g, T& s0, T& s1, T& s2, T& s3, T& s4) {
  if constexpr (Rule::kStates > 3) {
    Rule::apply(c, p, g, s0, s1, s2, s3, s4);
  } else {
    (void)s3;
    (void)s4;
    Rule::apply(c, p, g, s0, s1, s2);
  }
}

}  // namespace optkern
