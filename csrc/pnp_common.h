// Shared declarations of the pnp_kernels extension: the per-row math of every loss kind,
// as inline functions that the dense row kernels and the memory-efficient kernels (CPU and
// CUDA) all call.
//
// Ops (namespace pnp_kernels_ext, registered with TORCH_LIBRARY in pnp_cpu.cpp and
// pnp_pipeline.cpp):
//
//   row_losses_and_dS(Tensor S, Tensor lo, Tensor hi, Tensor own, int kind, int variant,
//                     float anneal, float alpha, float b, float[] ks, float[] k_temperatures,
//                     bool compute_grad) -> (Tensor loss, Tensor G)
//       S: (Q, M) float32/float64, row stride arbitrary, unit column stride;
//       lo/hi: int32 (Q,), the positives of row p are the columns [lo_p, hi_p), every
//       other column is a negative. own: int32 (Q,), row p's own column, -1 if none.
//       kind: kLoss_pnp, kLoss_smooth_ap or kLoss_recall_at_k (pnp_variants.h);
//       variant/alpha/b select f for PNP and are ignored by the others; ks/k_temperatures
//       are Recall@k's k values and tau2_k (same length >= 1; ignored by the others);
//       anneal is tau (tau1 for Recall@k). PNP and Smooth-AP ignore own (the own copy
//       counts as a positive); Recall@k excludes column own_p from the positives and from
//       the ranked set, wherever it lies.
//       loss[p] = the row function of the kind, 0 for a dropped row: an empty segment
//       (hi - lo < 1), or for Recall@k no positive besides the own column;
//       G[p, :] = d loss[p] / d S[p, :] when compute_grad (0 on the own column for
//       Recall@k, and on a dropped row), else a (0,) tensor.
//       A non-empty segment out of [0, M), or (Recall@k) an own column out of [-1, M): an
//       error on CPU; on CUDA (where a check would synchronise) that row's loss and G row
//       are NaN.
//
//   symmetrize(Tensor G, Tensor g) -> Tensor    H = diag(g) G + (diag(g) G)^T
//
//   loss_forward / loss_backward: the whole square (batch against itself) pipeline
//       around those two, one op each way, for CPU and CUDA tensors (pnp_pipeline.cpp);
//       there own_p = p.
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
//
//   Recall@k:  P excludes the own column o and n = |P|; every column but o is ranked:
//              r_j = 1 + sum_{k != j, o} sigma(z_jk),  s_k = sum_{j in P} sigma((k - r_j)/tau2_k),
//              loss = 1 - (1/|K|) sum_k min(s_k, k) / min(k, n); the gradient is Smooth-AP's
//              structure with one weight c_j = d loss / d r_j on every ranked column
//              (recall_row_terms below).
//
// The per-row functions below run once per (row, positive) pair or once per row, in double,
// never in an inner loop.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

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

// ---- Recall@k: the per-row math, shared by the dense row kernels and the memory-efficient ones ----
//
// A row's active lanes t = 0 .. n-1 (its positives other than its own column) carry the soft
// ranks r_t = 1 + sum_{ranked m != j_t} sigma((S_pm - S_pj_t) / tau1) (ranked: every column
// but the own one). With K the k values and tau2_k their temperatures (nk of them, any order):
//
//   s_k  = sum_t sigma((k - r_t) / tau2_k)
//   loss = 1 - (1/|K|) sum_k min(s_k, k) / min(k, n)
//   w_k  = [s_k < k] / (|K| tau2_k min(k, n))                      (0 where s_k is clipped)
//   c_t  = d loss / d r_t = sum_k w_k sigma'((k - r_t) / tau2_k)  (d s_k / d r_t = -sigma'/tau2_k)
//
// and the row's gradient is that of Smooth-AP's structure with a_t = b_t = c_t:
// W_tm = c_t sigma'((S_pm - S_pj_t)/tau1) / tau1 on every ranked m != j_t, and
// dS_m = sum_t W_tm - [m = j_t] sum_m' W_tm'.
//
// Three steps, so that a kernel that holds the lanes of a row in pieces (chunks of lanes,
// several threads) can split them: (1) recall_k_sums_add once per lane (additive: partial
// sums of disjoint lane sets add up to s_k), (2) recall_k_weights once per row on the
// complete s_k, (3) recall_lane_coef once per lane. recall_row_terms does all three for a row
// whose n ranks are in one array. A is the arithmetic type (double on the CPU and in the CUDA
// kernels; float works too); ks / inv_t2 point to the nk k values and the reciprocals
// 1 / tau2_k (made once by the caller, so that no step divides by tau2_k), readable by the
// caller (host memory on the CPU; registers, shared or global memory on a GPU). sigma and
// sigma' are exact in both tails: e = exp(-|u|) never overflows, sigma' = e / (1 + e)^2.
// On a GPU the reciprocals are a hardware estimate refined by Newton steps (recip), so
// that none of these functions calls the division's out-of-line slow path (a call would
// cost the calling kernel spilled registers).

// 1 / x for 1 <= x < 2^100 (and NaN for NaN). Host: a division. CUDA: the hardware float
// reciprocal estimate (relative error ~2^-22) refined by two Newton steps (error e -> e^2
// each) to double precision; no call, no slow path.
PNP_HD double recip(double x) {
#if defined(__CUDA_ARCH__)
  double y = static_cast<double>(__fdividef(1.0f, static_cast<float>(x)));  // MUFU.RCP: ~2^-22
  y = fma(y, fma(-x, y, 1.0), y);
  y = fma(y, fma(-x, y, 1.0), y);
  return y;
#else
  return 1.0 / x;
#endif
}

PNP_HD float recip(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, x);  // 2 ulp, as the float kernels' other reciprocals
#else
  return 1.0f / x;
#endif
}

template <typename A>
PNP_HD void recall_sigma_dsigma(A u, A& sig, A& dsig) {
#if !defined(__CUDA_ARCH__)
  using std::exp;
  using std::fabs;
#endif
  const A e = exp(-fabs(u));
  const A inv = recip(A(1) + e);
  sig = (u >= A(0) ? A(1) : e) * inv;
  dsig = e * inv * inv;
}

// (1) s[i] += sigma((ks[i] - r) / tau2_i) for i < nk: one lane's share of the sums s_k.
template <typename A>
PNP_HD void recall_k_sums_add(A r, const double* ks, const double* inv_t2, int nk, A* s) {
  for (int i = 0; i < nk; ++i) {
    A sig, dsig;
    recall_sigma_dsigma<A>((static_cast<A>(ks[i]) - r) * static_cast<A>(inv_t2[i]), sig, dsig);
    s[i] += sig;
  }
}

// (2) The row loss from the complete sums s[0 .. nk) of a row with n >= 1 active lanes, and
// the per-k weights w[i] = [s_i < k_i] / (nk tau2_i min(k_i, n)) (w may alias s: each w[i]
// is written after s[i] is read). A row with n < 1 is dropped by the caller (loss 0), not here.
template <typename A>
PNP_HD A recall_k_weights(const A* s, A n, const double* ks, const double* inv_t2, int nk, A* w) {
  const A inv_nk = recip(static_cast<A>(nk));
  A total = A(0);
  for (int i = 0; i < nk; ++i) {
    const A k = static_cast<A>(ks[i]);
    const A inv_norm = recip(k < n ? k : n);  // 1 / min(k, n), min(k, n) >= 1: k >= 1 and n >= 1
    const A si = s[i];
    // written so that a NaN s_k (NaN similarities) stays NaN in the loss and the weight
    total += (si >= k ? k : si) * inv_norm;
    w[i] = si >= k ? A(0) : inv_nk * static_cast<A>(inv_t2[i]) * inv_norm;
  }
  return A(1) - total * inv_nk;
}

// (3) c = d loss / d r of one lane: sum_i w[i] sigma'((ks[i] - r) / tau2_i).
template <typename A>
PNP_HD A recall_lane_coef(A r, const double* ks, const double* inv_t2, const A* w, int nk) {
  A c = A(0);
  for (int i = 0; i < nk; ++i) {  // a clipped k has w = 0 (kept in the sum: NaN ranks stay NaN)
    A sig, dsig;
    recall_sigma_dsigma<A>((static_cast<A>(ks[i]) - r) * static_cast<A>(inv_t2[i]), sig, dsig);
    c += w[i] * dsig;
  }
  return c;
}

// All three steps for a row whose n >= 1 active lanes have their ranks in r[0 .. n): returns
// the row loss and, when c is not null, writes c[t] = d loss / d r_t. sw is caller workspace
// of nk entries (s_k, then w_k). The caller drops a row with n = 0 (loss 0, no gradient).
template <typename A>
PNP_HD A recall_row_terms(const A* r, int64_t n, const double* ks, const double* inv_t2, int nk, A* sw, A* c) {
  for (int i = 0; i < nk; ++i) sw[i] = A(0);
  for (int64_t t = 0; t < n; ++t) recall_k_sums_add<A>(r[t], ks, inv_t2, nk, sw);
  const A loss = recall_k_weights<A>(sw, static_cast<A>(n), ks, inv_t2, nk, sw);
  if (c != nullptr)
    for (int64_t t = 0; t < n; ++t) c[t] = recall_lane_coef<A>(r[t], ks, inv_t2, sw, nk);
  return loss;
}

// 1 / tau2_k for each k temperature, as the functions above take them.
inline std::vector<double> recall_inv_temperatures(const std::vector<double>& k_temperatures) {
  std::vector<double> inv(k_temperatures.size());
  for (size_t i = 0; i < inv.size(); ++i) inv[i] = 1.0 / k_temperatures[i];
  return inv;
}

// Host-side check of Recall@k's k values and temperatures (ignored by the other kinds): at
// least one k, one tau2_k per k, every k >= 1 and every tau2_k > 0 (finite). op names the op
// in the message.
inline void check_recall_params(const char* op, int64_t kind, const std::vector<double>& ks,
                                const std::vector<double>& k_temperatures) {
  if (kind != kLoss_recall_at_k) return;
  TORCH_CHECK(!ks.empty(), op, ": ks must hold at least one k for Recall@k");
  TORCH_CHECK(k_temperatures.size() == ks.size(), op, ": k_temperatures must have one entry per k (", ks.size(),
              "), got ", k_temperatures.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK(ks[i] >= 1.0 && std::isfinite(ks[i]), op, ": every k in ks must be >= 1, got ", ks[i]);
    TORCH_CHECK(k_temperatures[i] > 0.0 && std::isfinite(k_temperatures[i]), op,
                ": every k_temperatures entry must be > 0, got ", k_temperatures[i]);
  }
}

}  // namespace pnp_ext
