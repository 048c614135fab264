// Shared declarations of the pnp_kernels C++/CUDA extension.
//
// Ops (namespace pnp_kernels_ext, registered with TORCH_LIBRARY in pnp_cpu.cpp and
// pnp_pipeline.cpp):
//
//   row_losses_and_dS(Tensor S, Tensor lo, Tensor hi, int kind, int variant, float anneal,
//                float alpha, float b, bool compute_grad) -> (Tensor loss, Tensor G)
//       S: (Q, M) float32/float64, row stride arbitrary, unit column stride;
//       lo/hi: int32 (Q,), the positives of row p are the columns [lo_p, hi_p), every
//       other column is a negative. kind: kLoss_pnp or kLoss_smooth_ap (pnp_variants.h);
//       variant/alpha/b select f for PNP and are ignored by Smooth-AP.
//       loss[p] = the row function of the kind (0 when the segment is empty: hi - lo < 1);
//       G[p, :] = d loss[p] / d S[p, :] when compute_grad, else a (0,) tensor.
//       A non-empty segment out of [0, M): an error on CPU; on CUDA (where a check
//       would synchronise) that row's loss and G row are NaN.
//
//   symmetrize(Tensor G, Tensor g) -> Tensor    H = diag(g) G + (diag(g) G)^T
//
//   loss_forward / loss_backward: the whole square (batch against itself) pipeline
//       around those two, one op each way, for CPU and CUDA tensors (pnp_pipeline.cpp).
//
// The row functions, with z_jk = (S_pk - S_pj) / tau, sigma(x) = 1 / (1 + e^-x),
// sigma' = sigma (1 - sigma), P = [lo, hi), n = |P|:
//
//   PNP:       R_j = sum_{k not in P} sigma(z_jk),  loss = (1/n) sum_{j in P} f(R_j)
//              dS_k =  (1/tau) sum_j c_j sigma'(z_jk)   (k negative)
//              dS_j = -(1/tau) c_j sum_{k neg} sigma'(z_jk),   c_j = f'(R_j) / n
//
//   Smooth-AP: neg_j = sum_{k not in P} sigma(z_jk),  pos_j = 1 + sum_{k in P, k != j} sigma(z_jk)
//              loss = (1/n) sum_j neg_j / (pos_j + neg_j)      (= 1 - smoothed AP)
//              With all_j = pos_j + neg_j, d(neg/all) = (pos d neg - neg d pos) / all^2, so
//              dloss/dsigma_jk = alpha_j = pos_j / (n all_j^2) for a negative k and
//              -beta_j = -neg_j / (n all_j^2) for a positive k != j. With
//              W_jk = that weight * sigma'(z_jk) / tau (W_jj = 0), since z_jk grows with
//              S_pk and falls with S_pj:
//              dS_m = sum_{j in P} W_jm - [m in P] sum_k W_mk.
//              neg_j is summed directly (not as all - pos): it is the numerator, and the
//              difference of two nearly equal sums would lose it when it is tiny.
#pragma once

#include <cmath>

#include "pnp_variants.h"

#if defined(__CUDACC__)
#define PNP_HD __host__ __device__ __forceinline__
#else
#define PNP_HD inline
#endif

namespace pnp_ext {

constexpr double kLog2e = 1.4426950408889634;

// x - log(1+x) without cancellation: below kSeriesMax its alternating series
// x^2 (1/2 - x (1/3 - x (1/4 - ...))), summed by Horner from the last kept term.
PNP_HD double x_minus_log1p(double x) {
#if !defined(__CUDA_ARCH__)
  using std::log1p;
#endif
  if (x < kSeriesMax) {
    double acc = 0.0;
    for (int n = kXlogSeriesTerms + 1; n >= 2; --n) acc = 1.0 / n - x * acc;
    return x * x * acc;
  }
  return x - log1p(x);
}

// f(R) and df/dR of the PNP variant table (pnp_kernels/variants.py), in its accurate
// forms: Dq is f = 1 - (1+R)^-alpha = -expm1(-alpha log1p(R)) (full relative precision
// when R is tiny), Ib uses x_minus_log1p. Evaluated once per (query, positive), never
// in an inner loop, in double.
template <typename T>
PNP_HD void variant_f_df(int variant, T R_, T alpha_, T b_, T& f_out, T& df_out) {
#if !defined(__CUDA_ARCH__)
  using std::exp;
  using std::expm1;
  using std::log1p;
#endif
  const double R = static_cast<double>(R_), alpha = static_cast<double>(alpha_), b = static_cast<double>(b_);
  double f, df;
  switch (variant) {
    case kVariant_O:
      f = R;
      df = 1.0;
      break;
    case kVariant_Ds:
      f = log1p(R);
      df = 1.0 / (1.0 + R);
      break;
    case kVariant_Dq: {
      const double lg = log1p(R);
      f = -expm1(-alpha * lg);
      df = alpha * exp(-(alpha + 1.0) * lg);
      break;
    }
    case kVariant_Iu: {
      const double lg = log1p(R);
      f = (1.0 + R) * lg;
      df = lg + 1.0;
      break;
    }
    default: {  // kVariant_Ib
      const double x = b * R;
      f = x_minus_log1p(x) / (b * b);
      df = R / (1.0 + x);
      break;
    }
  }
  f_out = static_cast<T>(f);
  df_out = static_cast<T>(df);
}

// Smooth-AP's per-positive term neg / (pos + neg) and the gradient weights
// alpha = pos / (n all^2) (on sigma of a negative) and beta = neg / (n all^2) (minus,
// on sigma of another positive); pos >= 1, so all >= 1 and nothing divides by 0.
PNP_HD void smooth_ap_terms(double pos, double neg, double inv_n, double& term, double& a, double& b) {
  const double all = pos + neg;
  const double inv_all = 1.0 / all;
  const double w = inv_n * inv_all * inv_all;
  term = neg * inv_all;
  a = pos * w;
  b = neg * w;
}

}  // namespace pnp_ext
