// CPU kernels of the pnp_kernels extension and the op registrations (the row
// functions are written out in pnp_common.h).
//
// row_losses_and_dS: one query row at a time (rows in parallel with at::parallel_for).
// For a chunk of up to kChunk positives j of row p, one sweep over the negatives
// k (the columns outside [lo_p, hi_p): two contiguous ranges, so the inner loop
// has no masks) evaluates, with z = (S_pj - S_pk) log2(e) / tau and
// e = 2^-|z| (never overflows):
//
//   sigma_jk  = sigmoid((S_pk - S_pj)/tau) = (z >= 0 ? e : 1) / (1 + e)
//   sigma'_jk = sigma (1 - sigma)          = e / (1 + e)^2      (exact in both tails)
//
// giving R_j = sum_k sigma_jk and T_j = sum_k sigma'_jk. Smooth-AP sweeps the other
// positives too ([lo, j) and (j, hi): again no masks) for pos_j and its sigma' sum.
// sigma'_jk is kept in a per-thread scratch row, so that the gradient needs no
// second exp: row j of W (pnp_common.h) is a per-range weight times the scratch
// row, added to G_p by one axpy per contiguous range, and the diagonal term
// -sum_k W_jk is added to G_pj from the sigma' sums.
//
// Recall@k ranks every column but the own one o against each positive j (lane t): the sweep
// runs over [0, n) minus {j, o}, three contiguous ranges (again no masks), for r_t and its
// sigma' sum. Its coefficients need every lane of the row first (recall_row_terms,
// pnp_common.h), so the ranks r_t are kept per thread for the whole row. When sigma' of all
// the row's lanes fits a per-thread scratch of kRecallKeep elements, the rank sweep also keeps
// it and the gradient follows at once; otherwise the lanes are swept twice: ranks first, then
// chunk by chunk sigma' again for the gradient (the same arithmetic, so the same values).
//
// float: 2^w by a branch-free polynomial that the compiler vectorises; sums
// in float blocks of kBlock terms added into double. double: std::exp2.
// Everything is in a fixed order: results are bitwise reproducible.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "pnp_common.h"

namespace pnp_ext {
namespace {

constexpr int64_t kChunk = 16;   // positives per sweep (scratch: kChunk x n)
constexpr int64_t kBlock = 256;  // terms per float partial sum
// Recall@k: a row keeps sigma' of all its lanes (one sweep) up to this many elements per thread
// (4 MiB in float), and sweeps twice (ranks, then sigma' per chunk) beyond
constexpr int64_t kRecallKeep = int64_t(1) << 20;

template <typename T>
struct Exp2NonPos;

// 2^w for w <= 0, clamped below at 2^-125 (so that the result and sigma, sigma'
// stay normal floats: denormal arithmetic is ~100x slower on x86): Cephes'
// exp2f polynomial on [-0.5, 0.5] (relative error ~2e-7) times 2^n built from
// the exponent bits. No branches, no calls: vectorisable with plain -O3.
// The clamp changes sigma and sigma' only where they are below 3e-38; NaN in, NaN out.
template <>
struct Exp2NonPos<float> {
  static inline float eval(float w) {
    const float wc = w > -125.0f ? w : -125.0f;         // NaN -> -125: a defined integer part
    const int32_t n = static_cast<int32_t>(wc - 0.5f);  // nearest integer (w <= 0)
    // in [-0.5, 0.5]; a NaN w stays NaN here, so NaN inputs give a NaN result (and loss)
    const float x = (w != w ? w : wc) - static_cast<float>(n);
    float p = 1.535336188319500e-4f;
    p = p * x + 1.339887440266574e-3f;
    p = p * x + 9.618437357674640e-3f;
    p = p * x + 5.550332471162809e-2f;
    p = p * x + 2.402264791363012e-1f;
    p = p * x + 6.931472028550421e-1f;
    p = p * x + 1.0f;
    const int32_t bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  }
};

template <>
struct Exp2NonPos<double> {
  static inline double eval(double w) { return std::exp2(w); }
};

// One sweep of positive value sj over the contiguous negative columns [k0, k1):
// R += sum sigma, and when GRAD, T += sum sigma' with sigma' stored in sp[k].
template <typename T, bool GRAD>
inline void sweep(const T* __restrict s, int64_t k0, int64_t k1, T sj, T scale,
                  T* __restrict sp, double& R, double& Tsum) {
  for (int64_t kb = k0; kb < k1; kb += kBlock) {
    const int64_t ke = std::min(kb + kBlock, k1);
    T r = 0, t = 0;
#pragma omp simd reduction(+ : r, t)
    for (int64_t k = kb; k < ke; ++k) {
      const T z = (sj - s[k]) * scale;
      const T a = z < T(0) ? -z : z;
      const T e = Exp2NonPos<T>::eval(-a);
      const T inv = T(1) / (T(1) + e);
      r += (z >= T(0) ? e : T(1)) * inv;
      if (GRAD) {
        const T d = e * inv * inv;
        sp[k] = d;
        t += d;
      }
    }
    R += static_cast<double>(r);
    if (GRAD) Tsum += static_cast<double>(t);
  }
}

#if defined(__GNUC__) || defined(__clang__)
#define PNP_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define PNP_NOINLINE __declspec(noinline)
#else
#define PNP_NOINLINE
#endif

// The same sums over the few columns of a positive segment [k0, k1) (Smooth-AP): a plain
// scalar loop, kept out of line. Inlined, it made GCC 12 stop vectorising the long sweeps
// of the same row loop: the Smooth-AP row op ran 9x slower than PNP's at B = 384, P = 4;
// out of line it costs 1.1x (no gradient) to 1.2x (gradient) PNP's.
template <typename T, bool GRAD>
PNP_NOINLINE void short_sweep(const T* __restrict s, int64_t k0, int64_t k1, T sj, T scale, T* __restrict sp, double& R,
                        double& Tsum) {
  for (int64_t k = k0; k < k1; ++k) {
    const T z = (sj - s[k]) * scale;
    const T e = Exp2NonPos<T>::eval(-(z < T(0) ? -z : z));
    const T inv = T(1) / (T(1) + e);
    R += static_cast<double>((z >= T(0) ? e : T(1)) * inv);
    if (GRAD) {
      const T d = e * inv * inv;
      sp[k] = d;
      Tsum += static_cast<double>(d);
    }
  }
}

// G[k] += w * sp[k] over [k0, k1)
template <typename T>
inline void axpy(T* __restrict g, const T* __restrict sp, int64_t k0, int64_t k1, T w) {
#pragma omp simd
  for (int64_t k = k0; k < k1; ++k) g[k] += w * sp[k];
}

// Recall@k's ranked columns for the positive j of a row with own column o (-1: none; never
// j): [0, n) minus {j, o}, as two or three contiguous sweeps.
template <typename T, bool GRAD>
inline void ranked_sweep(const T* __restrict s, int64_t n, int64_t j, int64_t o, T scale, T* __restrict sp,
                         double& R, double& Tsum) {
  if (o < 0) {
    sweep<T, GRAD>(s, 0, j, s[j], scale, sp, R, Tsum);
    sweep<T, GRAD>(s, j + 1, n, s[j], scale, sp, R, Tsum);
    return;
  }
  const int64_t a = std::min(j, o), b = std::max(j, o);
  sweep<T, GRAD>(s, 0, a, s[j], scale, sp, R, Tsum);
  sweep<T, GRAD>(s, a + 1, b, s[j], scale, sp, R, Tsum);
  sweep<T, GRAD>(s, b + 1, n, s[j], scale, sp, R, Tsum);
}

// G[k] += w * sp[k] over the same ranked columns.
template <typename T>
inline void ranked_axpy(T* __restrict g, const T* __restrict sp, int64_t n, int64_t j, int64_t o, T w) {
  if (o < 0) {
    axpy<T>(g, sp, 0, j, w);
    axpy<T>(g, sp, j + 1, n, w);
    return;
  }
  const int64_t a = std::min(j, o), b = std::max(j, o);
  axpy<T>(g, sp, 0, a, w);
  axpy<T>(g, sp, a + 1, b, w);
  axpy<T>(g, sp, b + 1, n, w);
}

// Per-thread buffers of the Recall@k rows: sigma' rows of the lanes (all of them, or one
// chunk when they would exceed kRecallKeep elements), and per lane the rank r_t,
// its sigma' sum T_t and its coefficient c_t; sw holds s_k, then w_k.
template <typename T>
struct RecallScratch {
  std::vector<T> sp;
  std::vector<double> r, tsum, c, sw;
};

// One Recall@k row (s, g: row p of S and G, already zeroed when GRAD); returns its loss.
// Lane t is the column lo + t, shifted past the own column o when o lies in [lo, hi).
template <typename T, bool GRAD>
double recall_row(const T* s, T* g, int64_t n, int64_t lo, int64_t hi, int64_t o, T scale, double inv_tau,
                  const double* ks, const double* inv_t2, int nk, RecallScratch<T>& buf) {
  const bool own_in = o >= lo && o < hi;
  const int64_t n_act = hi - lo - (own_in ? 1 : 0);
  if (n_act < 1) return 0.0;  // no positive besides the own column: dropped
  auto col = [&](int64_t t) { return lo + t + (own_in && lo + t >= o ? 1 : 0); };
  // sigma' of every lane fits the scratch: the rank sweep keeps it, no second sweep
  const bool keep = GRAD && (n_act <= kChunk || n_act * n <= kRecallKeep);
  const int64_t rows_sp = GRAD ? (keep ? n_act : kChunk) : 0;
  if (static_cast<int64_t>(buf.sp.size()) < rows_sp * n) buf.sp.resize(rows_sp * n);
  if (static_cast<int64_t>(buf.r.size()) < n_act) {
    buf.r.resize(n_act);
    buf.tsum.resize(n_act);
    buf.c.resize(n_act);
  }
  if (static_cast<int>(buf.sw.size()) < nk) buf.sw.resize(nk);
  for (int64_t t = 0; t < n_act; ++t) {
    double R = 1.0, Tn = 0.0;  // the positive itself is rank 1
    if (keep)
      ranked_sweep<T, true>(s, n, col(t), o, scale, buf.sp.data() + t * n, R, Tn);
    else
      ranked_sweep<T, false>(s, n, col(t), o, scale, nullptr, R, Tn);
    buf.r[t] = R;
    buf.tsum[t] = Tn;
  }
  const double loss =
      recall_row_terms<double>(buf.r.data(), n_act, ks, inv_t2, nk, buf.sw.data(), GRAD ? buf.c.data() : nullptr);
  if (GRAD) {
    for (int64_t t0 = 0; t0 < n_act; t0 += kChunk) {
      const int64_t t1 = std::min(t0 + kChunk, n_act);
      if (!keep) {
        for (int64_t t = t0; t < t1; ++t) {
          double R = 1.0, Tn = 0.0;
          ranked_sweep<T, true>(s, n, col(t), o, scale, buf.sp.data() + (t - t0) * n, R, Tn);
          buf.tsum[t] = Tn;
        }
      }
      const T* sp0 = buf.sp.data() + (keep ? t0 * n : 0);
      for (int64_t t = t0; t < t1; ++t)
        ranked_axpy<T>(g, sp0 + (t - t0) * n, n, col(t), o, static_cast<T>(buf.c[t] * inv_tau));
      for (int64_t t = t0; t < t1; ++t) g[col(t)] += static_cast<T>(-buf.c[t] * buf.tsum[t] * inv_tau);
    }
  }
  return loss;
}

template <typename T, int KIND, bool GRAD>
void rows_kernel(const T* S, int64_t ss, const int32_t* lo_p, const int32_t* hi_p, const int32_t* own_p, T* loss,
                 T* G, int64_t sg, int64_t Q, int64_t n, int variant, double anneal, double alpha, double b,
                 const double* ks, const double* inv_t2, int nk) {
  const T scale = static_cast<T>(kLog2e / anneal);
  const double inv_tau = 1.0 / anneal;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  at::parallel_for(0, Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch;
    RecallScratch<T> rbuf;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = lo_p[p], hi = hi_p[p], cnt = hi - lo;
      const T* s = S + p * ss;
      T* g = GRAD ? G + p * sg : nullptr;
      if (GRAD) std::fill(g, g + n, T(0));
      if (cnt < 1) {  // empty segment: the query is dropped
        loss[p] = T(0);
        continue;
      }
      if (KIND == kLoss_recall_at_k) {
        loss[p] = static_cast<T>(
            recall_row<T, GRAD>(s, g, n, lo, hi, own_p[p], scale, inv_tau, ks, inv_t2, nk, rbuf));
        continue;
      }
      const double inv_cnt = 1.0 / static_cast<double>(cnt);
      const int64_t pb = std::min(cnt, kChunk);
      if (GRAD && static_cast<int64_t>(scratch.size()) < pb * n) scratch.resize(pb * n);
      double loss_acc = 0.0;
      for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
        const int64_t c1 = std::min(c0 + kChunk, hi);
        double wneg[kChunk];  // weight of sigma'/tau on the negatives
        double wpos[kChunk];  // weight of sigma'/tau on the other positives (Smooth-AP)
        double diag[kChunk];  // -sum_k W_jk
        for (int64_t j = c0; j < c1; ++j) {
          T* sp = GRAD ? scratch.data() + (j - c0) * n : nullptr;
          double R = 0.0, Tn = 0.0;
          sweep<T, GRAD>(s, 0, lo, s[j], scale, sp, R, Tn);
          sweep<T, GRAD>(s, hi, n, s[j], scale, sp, R, Tn);
          if (KIND == kLoss_pnp) {
            double f, df;
            variant_f_df<double>(variant, R, alpha, b, f, df);
            loss_acc += f;
            const double c = df * inv_cnt;
            wneg[j - c0] = c * inv_tau;
            wpos[j - c0] = 0.0;
            diag[j - c0] = -c * Tn * inv_tau;
          } else {
            double P = 1.0, Tp = 0.0;  // the positive itself counts as rank 1
            short_sweep<T, GRAD>(s, lo, j, s[j], scale, sp, P, Tp);
            short_sweep<T, GRAD>(s, j + 1, hi, s[j], scale, sp, P, Tp);
            if (GRAD) sp[j] = T(0);  // W_jj = 0
            double term, a, bt;
            smooth_ap_terms(P, R, inv_cnt, term, a, bt);
            loss_acc += term;
            wneg[j - c0] = a * inv_tau;
            wpos[j - c0] = -bt * inv_tau;
            diag[j - c0] = -(a * Tn - bt * Tp) * inv_tau;
          }
        }
        if (GRAD) {
          for (int64_t j = c0; j < c1; ++j) {
            const T* sp = scratch.data() + (j - c0) * n;
            const T w = static_cast<T>(wneg[j - c0]);
            axpy<T>(g, sp, 0, lo, w);
            axpy<T>(g, sp, hi, n, w);
            if (KIND == kLoss_smooth_ap) axpy<T>(g, sp, lo, hi, static_cast<T>(wpos[j - c0]));
          }
          for (int64_t j = c0; j < c1; ++j) g[j] += static_cast<T>(diag[j - c0]);
        }
      }
      loss[p] = static_cast<T>(loss_acc * inv_cnt);
    }
  });
}

void check_rows_inputs(const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& own,
                       int64_t kind, int64_t variant, double anneal, const std::vector<double>& ks,
                       const std::vector<double>& k_temperatures) {
  TORCH_CHECK(S.dim() == 2, "pnp_kernels_ext.row_losses_and_dS: S must be 2-D, got ", S.dim(), "-D");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble,
              "pnp_kernels_ext.row_losses_and_dS: S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(S.size(1) == 0 || S.stride(1) == 1, "pnp_kernels_ext.row_losses_and_dS: S columns must be contiguous");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt,
              "pnp_kernels_ext.row_losses_and_dS: lo/hi must be int32");
  TORCH_CHECK(lo.dim() == 1 && hi.dim() == 1 && lo.size(0) == S.size(0) && hi.size(0) == S.size(0),
              "pnp_kernels_ext.row_losses_and_dS: lo/hi must be 1-D with one entry per row of S");
  TORCH_CHECK(lo.is_contiguous() && hi.is_contiguous(), "pnp_kernels_ext.row_losses_and_dS: lo/hi must be contiguous");
  TORCH_CHECK(lo.device() == S.device() && hi.device() == S.device(),
              "pnp_kernels_ext.row_losses_and_dS: lo/hi must be on the device of S");
  TORCH_CHECK(own.scalar_type() == at::kInt && own.dim() == 1 && own.size(0) == S.size(0) && own.is_contiguous(),
              "pnp_kernels_ext.row_losses_and_dS: own must be a contiguous int32 vector with one entry per row of S");
  TORCH_CHECK(own.device() == S.device(), "pnp_kernels_ext.row_losses_and_dS: own must be on the device of S");
  TORCH_CHECK(kind >= 0 && kind < kLossKindCount, "pnp_kernels_ext.row_losses_and_dS: loss kind must be 0..",
              kLossKindCount - 1, ", got ", kind);
  TORCH_CHECK(variant >= 0 && variant < kVariantCount, "pnp_kernels_ext.row_losses_and_dS: variant code must be 0..",
              kVariantCount - 1, ", got ", variant);
  TORCH_CHECK(anneal > 0, "pnp_kernels_ext.row_losses_and_dS: anneal must be > 0, got ", anneal);
  check_recall_params("pnp_kernels_ext.row_losses_and_dS", kind, ks, k_temperatures);
}

// The kernel's arguments besides the row pointers.
struct RowArgs {
  int variant;
  double anneal, alpha, b;
  const double* ks;
  const double* inv_t2;  // 1 / tau2_k
  int nk;
};

template <typename T, int KIND>
void rows_dispatch_grad(const at::Tensor& S, const int32_t* lo_p, const int32_t* hi_p, const int32_t* own_p,
                        at::Tensor& loss, at::Tensor& G, bool compute_grad, const RowArgs& a) {
  const int64_t Q = S.size(0), n = S.size(1);
  if (compute_grad)
    rows_kernel<T, KIND, true>(S.data_ptr<T>(), S.stride(0), lo_p, hi_p, own_p, loss.data_ptr<T>(), G.data_ptr<T>(),
                               n, Q, n, a.variant, a.anneal, a.alpha, a.b, a.ks, a.inv_t2, a.nk);
  else
    rows_kernel<T, KIND, false>(S.data_ptr<T>(), S.stride(0), lo_p, hi_p, own_p, loss.data_ptr<T>(), nullptr, 0, Q,
                                n, a.variant, a.anneal, a.alpha, a.b, a.ks, a.inv_t2, a.nk);
}

template <typename T>
void rows_dispatch(int64_t kind, const at::Tensor& S, const int32_t* lo_p, const int32_t* hi_p,
                   const int32_t* own_p, at::Tensor& loss, at::Tensor& G, bool compute_grad, const RowArgs& a) {
  if (kind == kLoss_pnp)
    rows_dispatch_grad<T, kLoss_pnp>(S, lo_p, hi_p, own_p, loss, G, compute_grad, a);
  else if (kind == kLoss_smooth_ap)
    rows_dispatch_grad<T, kLoss_smooth_ap>(S, lo_p, hi_p, own_p, loss, G, compute_grad, a);
  else
    rows_dispatch_grad<T, kLoss_recall_at_k>(S, lo_p, hi_p, own_p, loss, G, compute_grad, a);
}

std::tuple<at::Tensor, at::Tensor> row_losses_and_dS_cpu(const at::Tensor& S, const at::Tensor& lo,
                                                         const at::Tensor& hi, const at::Tensor& own, int64_t kind,
                                                         int64_t variant, double anneal, double alpha, double b,
                                                         at::ArrayRef<double> ks, at::ArrayRef<double> k_temperatures,
                                                         bool compute_grad) {
  const std::vector<double> kv(ks.begin(), ks.end()), tv(k_temperatures.begin(), k_temperatures.end());
  check_rows_inputs(S, lo, hi, own, kind, variant, anneal, kv, tv);
  const int64_t Q = S.size(0), n = S.size(1);
  const int32_t* lo_p = lo.data_ptr<int32_t>();
  const int32_t* hi_p = hi.data_ptr<int32_t>();
  const int32_t* own_p = own.data_ptr<int32_t>();
  // Validate before anything is allocated; nothing may throw inside the parallel region.
  int64_t bad = -1;
  for (int64_t p = 0; p < Q && bad < 0; ++p) {
    if (hi_p[p] - lo_p[p] >= 1 && (lo_p[p] < 0 || hi_p[p] > n)) bad = p;
  }
  TORCH_CHECK(bad < 0, "pnp_kernels_ext.row_losses_and_dS: the positive segment [", bad < 0 ? 0 : lo_p[bad], ", ",
              bad < 0 ? 0 : hi_p[bad], ") of row ", bad, " is out of range for ", n, " columns");
  if (kind == kLoss_recall_at_k) {
    for (int64_t p = 0; p < Q && bad < 0; ++p) {
      if (own_p[p] < -1 || own_p[p] >= n) bad = p;
    }
    TORCH_CHECK(bad < 0, "pnp_kernels_ext.row_losses_and_dS: own column ", bad < 0 ? 0 : own_p[bad], " of row ", bad,
                " is out of range for ", n, " columns (-1: none)");
  }
  at::Tensor loss = at::empty({Q}, S.options());
  at::Tensor G = compute_grad ? at::empty({Q, n}, S.options()) : at::empty({0}, S.options());
  if (Q == 0) return {loss, G};
  const std::vector<double> inv_t2 = recall_inv_temperatures(tv);
  const RowArgs a{static_cast<int>(variant), anneal, alpha, b, kv.data(), inv_t2.data(), static_cast<int>(kv.size())};
  if (S.scalar_type() == at::kFloat)
    rows_dispatch<float>(kind, S, lo_p, hi_p, own_p, loss, G, compute_grad, a);
  else
    rows_dispatch<double>(kind, S, lo_p, hi_p, own_p, loss, G, compute_grad, a);
  return {loss, G};
}

// H[a, c] = g_a G[a, c] + g_c G[c, a], in 32 x 32 tiles (rows of tiles in parallel). The
// transposed tile is first copied into a small local buffer, so that the inner loop reads
// everything with unit stride and vectorises (a strided read of G would be a gather).
template <typename T>
void symmetric_kernel(const T* G, int64_t sg, const T* gv, T* H, int64_t n) {
  constexpr int64_t tb = 32;
  const int64_t n_tiles = (n + tb - 1) / tb;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    T gt[tb][tb];  // gt[a - a0][c - c0] = G[c, a]
    for (int64_t ta = t0; ta < t1; ++ta) {
      const int64_t a0 = ta * tb, a1 = std::min(a0 + tb, n);
      for (int64_t c0 = 0; c0 < n; c0 += tb) {
        const int64_t c1 = std::min(c0 + tb, n);
        for (int64_t c = c0; c < c1; ++c) {
          const T* Gc = G + c * sg;
          for (int64_t a = a0; a < a1; ++a) gt[a - a0][c - c0] = Gc[a];
        }
        for (int64_t a = a0; a < a1; ++a) {
          const T ga = gv[a];
          const T* Ga = G + a * sg;
          const T* ta_row = gt[a - a0];
          T* Ha = H + a * n;
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) Ha[c] = ga * Ga[c] + gv[c] * ta_row[c - c0];
        }
      }
    }
  });
}

at::Tensor symmetrize_cpu(const at::Tensor& G, const at::Tensor& g) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "pnp_kernels_ext.symmetrize: G must be square");
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "pnp_kernels_ext.symmetrize: G must be float32 or float64");
  TORCH_CHECK(G.size(1) == 0 || G.stride(1) == 1, "pnp_kernels_ext.symmetrize: G columns must be contiguous");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == G.size(0) && g.scalar_type() == G.scalar_type() && g.is_contiguous(),
              "pnp_kernels_ext.symmetrize: g must be a contiguous vector of G's dtype and length");
  const int64_t n = G.size(0);
  at::Tensor H = at::empty({n, n}, G.options());
  if (n == 0) return H;
  if (G.scalar_type() == at::kFloat)
    symmetric_kernel<float>(G.data_ptr<float>(), G.stride(0), g.data_ptr<float>(), H.data_ptr<float>(), n);
  else
    symmetric_kernel<double>(G.data_ptr<double>(), G.stride(0), g.data_ptr<double>(), H.data_ptr<double>(), n);
  return H;
}

}  // namespace
}  // namespace pnp_ext

TORCH_LIBRARY(pnp_kernels_ext, m) {
  m.def(
      "row_losses_and_dS(Tensor S, Tensor lo, Tensor hi, Tensor own, int kind, int variant, float anneal, "
      "float alpha, float b, float[] ks, float[] k_temperatures, bool compute_grad) -> (Tensor loss, Tensor G)");
  m.def("symmetrize(Tensor G, Tensor g) -> Tensor");
}

TORCH_LIBRARY_IMPL(pnp_kernels_ext, CPU, m) {
  m.impl("row_losses_and_dS", &pnp_ext::row_losses_and_dS_cpu);
  m.impl("symmetrize", &pnp_ext::symmetrize_cpu);
}
