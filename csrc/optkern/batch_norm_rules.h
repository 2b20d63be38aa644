// Batch norm's math, written once: the per-channel scalars (computed in double) and the per-element rules,
// compiled into the CPU executor (three instruction sets) and the CUDA executor alike.
//
// Seed 000: y = beta_k + gamma_k (h_kn - mu_k) / sqrt(eps + sigma_k^2).  Per channel, over its M values:
//   forward:  xhat = (x - mu) invstd, invstd = 1 / sqrt(var + eps), var = M2 / M (biased), y = gamma xhat + beta
//   running:  rm = (1 - f) rm + f mu;  rv = (1 - f) rv + f M2 / (M - 1)   (unbiased, as torch)
//   backward (training): dbeta = sum dy, dgamma = invstd sum dy (x - mu),
//             dx = gamma invstd (dy - dbeta / M - xhat dgamma / M)
//   backward (eval, statistics are constants): dx = gamma invstd dy, same dgamma and dbeta
//
// Exactness at large offsets (data at 1e4 with unit variance, float32): the centring x - mu uses mu split into
// a float "hi" part and the remainder "lo" (x - hi is exact for x near mu, by Sterbenz's lemma), so y keeps
// float32 precision relative to sigma, not to |mu|.  Statistics: each block of values (1024 of a run, or a block of
// rows of one column) is swept twice while in cache, first for a rough mean K, then for the shifted sums of x - K
// and (x - K)^2 in T lanes; the blocks' partials are combined in double (BnAcc; row blocks first into row groups,
// bn_group_add), so neither the data's offset nor its order costs precision.
#pragma once

#include "common.h"

namespace optkern {

// ---- per-channel statistics (double) ----------------------------------------------------------------------

// Shifted sums (s1 = sum (x - K), s2 = sum (x - K)^2 over n values) -> mean and M2 = sum (x - mean)^2.
OK_HD void bn_shifted_to_moments(double n, double shift, double s1, double s2, double* mean, double* m2) {
  double d = s1 / n;
  *mean = shift + d;
  double v = s2 - s1 * d;
  *m2 = v > 0.0 ? v : 0.0;
}

// Chan et al.'s pairwise combine: (n, mean, m2) += (nb, meanb, m2b).  Serves threads, CUDA blocks and shards.
OK_HD void bn_chan_combine(double* n, double* mean, double* m2, double nb, double meanb, double m2b) {
  if (nb <= 0.0) return;
  double na = *n, nn = na + nb;
  double delta = meanb - *mean;
  *mean = *mean + delta * (nb / nn);
  *m2 = *m2 + m2b + delta * delta * (na * nb / nn);
  *n = nn;
}

// A reduction's running value over partials taken in a fixed order (lane blocks, units, row blocks, columns).
// Sums (kMoments false): (n, a, b) added.  Moments (kMoments true): partials (n_k, mean_k, m2_k) accumulated in
// double as shifted sums around K, the first partial's mean: a = sum n_k (mean_k - K),
// b = sum (m2_k + n_k (mean_k - K)^2); then mean = K + a / n and m2 = b - a^2 / n.  No division per partial; the
// final cancellation costs at most eps64 (K - mean)^2 / var, far below float32 resolution even when the first
// partial sits many standard deviations from the mean.
struct BnAcc {
  double n = 0.0, a = 0.0, b = 0.0, K = 0.0;
  OK_HD double mean() const { return n > 0.0 ? K + a / n : 0.0; }
  OK_HD double m2() const {
    double v = n > 0.0 ? b - a * (a / n) : 0.0;
    return v > 0.0 ? v : 0.0;
  }
  template <bool kMoments>
  OK_HD void add(double pn, double pa, double pb) {
    if (kMoments) {
      if (n == 0.0) K = pa;
      const double d = pa - K;
      n += pn;
      a += pn * d;
      b += pb + pn * d * d;
    } else {
      n += pn;
      a += pa;
      b += pb;
    }
  }
};

// ---- rows layout: row blocks folded into row groups --------------------------------------------------------
// A row block's partial for one column of nb values: its shift K = T(sum of x) * T(1 / nb) (a rough mean from
// sweep 1, in T) and the shifted sums s1 = sum (x - K), s2 = sum (x - K)^2 (sweep 2), widened to double.  Each
// sum over the block is taken in T over its 4 slices of 16 rows (each in row order; an empty slice is 0) and
// the slices added as bn_slices_sum.  A row group folds its blocks in block order as shifted sums around G, the
// first block's K, with no division per block (exact algebra: sum (x - G) = s1 + nb (K - G), sum (x - G)^2 =
// s2 + 2 (K - G) s1 + nb (K - G)^2), and ends as (mean, m2); the groups' (n, mean, m2) are then folded per
// channel by BnAcc.
template <class T>
OK_HD T bn_slices_sum(T s0, T s1, T s2, T s3) {
  return (s0 + s1) + (s2 + s3);
}

template <class T>
OK_HD T bn_block_shift(T sum, double nb) {
  return sum * static_cast<T>(1.0 / nb);
}

OK_HD void bn_group_add(double nb, double K, double s1, double s2, double G, double* a, double* b) {
  const double e = K - G;
  *a = *a + (s1 + nb * e);
  *b = *b + (s2 + (2.0 * e) * s1 + (nb * e) * e);
}

OK_HD void bn_group_moments(double n, double G, double a, double b, double* mean, double* m2) {
  *mean = G + a / n;
  const double v = b - a * (a / n);
  *m2 = v > 0.0 ? v : 0.0;
}

// An empty batch (count 0: numel 0 with C >= 1, which torch accepts) has no statistics: mean 0, invstd 0, and the
// running statistics are left as they are (as torch leaves them).
OK_HD double bn_invstd(double m2, double count, double eps) {
  return count > 0.0 ? 1.0 / OK_SQRT(m2 / count + eps) : 0.0;
}

// Running statistics update with factor f (momentum, or 1/num_batches for the cumulative average).
template <class T>
OK_HD void bn_update_running(T* rm, T* rv, double mean, double m2, double count, double f) {
  if (count <= 0.0) return;  // an empty batch: nothing to learn from
  double unbiased = m2 / (count - 1.0);
  *rm = static_cast<T>((1.0 - f) * static_cast<double>(*rm) + f * mean);
  *rv = static_cast<T>((1.0 - f) * static_cast<double>(*rv) + f * unbiased);
}

// ---- elementwise forward ------------------------------------------------------------------------------------

// The coefficient structs are aligned to their size (rounded up to a power of two), so that a CUDA thread loads
// one with one 16-byte load (float; two for double and for BnGradCoef<float>), not four or five scalar loads.
template <class T>
struct alignas(4 * sizeof(T)) BnNormCoef {
  T mean_hi, mean_lo;  // mean = mean_hi + mean_lo (exactly, to double precision)
  T scale, shift;      // gamma invstd, beta
};

template <class T>
OK_HD BnNormCoef<T> bn_norm_coef(double mean, double invstd, double gamma, double beta) {
  BnNormCoef<T> c;
  c.mean_hi = static_cast<T>(mean);
  c.mean_lo = static_cast<T>(mean - static_cast<double>(c.mean_hi));
  c.scale = static_cast<T>(gamma * invstd);
  c.shift = static_cast<T>(beta);
  return c;
}

template <class T>
OK_HD T bn_center(T x, T mean_hi, T mean_lo) {
  return (x - mean_hi) - mean_lo;
}

template <class T>
OK_HD T bn_normalize(const BnNormCoef<T>& c, T x) {
  return bn_center(x, c.mean_hi, c.mean_lo) * c.scale + c.shift;
}

// ---- elementwise backward -----------------------------------------------------------------------------------

template <class T>
struct alignas(8 * sizeof(T)) BnGradCoef {
  T mean_hi, mean_lo;
  T a, b, c;  // dx = a dy + b (x - mean) + c
};

// Training: the statistics depend on x.  count is the global number of values per channel (all shards).
template <class T>
OK_HD BnGradCoef<T> bn_grad_coef_train(double count, double mean, double invstd, double gamma, double sum_dy,
                                       double sum_dy_xmu) {
  BnGradCoef<T> k;
  k.mean_hi = static_cast<T>(mean);
  k.mean_lo = static_cast<T>(mean - static_cast<double>(k.mean_hi));
  double gi = gamma * invstd;
  k.a = static_cast<T>(gi);
  k.b = static_cast<T>(-gi * invstd * invstd * sum_dy_xmu / count);
  k.c = static_cast<T>(-gi * sum_dy / count);
  return k;
}

// Eval: the statistics are constants, dx = gamma invstd dy.
template <class T>
OK_HD BnGradCoef<T> bn_grad_coef_eval(double mean, double invstd, double gamma) {
  BnGradCoef<T> k;
  k.mean_hi = static_cast<T>(mean);
  k.mean_lo = static_cast<T>(mean - static_cast<double>(k.mean_hi));
  k.a = static_cast<T>(gamma * invstd);
  k.b = T(0);
  k.c = T(0);
  return k;
}

template <class T>
OK_HD T bn_grad_input(const BnGradCoef<T>& k, T dy, T x) {
  return k.a * dy + k.b * bn_center(x, k.mean_hi, k.mean_lo) + k.c;
}

// dgamma = invstd * sum dy (x - mean); dbeta = sum dy.
OK_HD double bn_grad_weight(double invstd, double sum_dy_xmu) { return invstd * sum_dy_xmu; }

}  // namespace optkern
