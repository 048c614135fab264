// CUDA kernels of the pnp_kernels extension (registered for the CUDA dispatch key;
// the schemas are defined in pnp_cpu.cpp, the row functions written out in
// pnp_common.h). The PNP path is the algorithm of the Triton row kernel:
//
// one block of kThreads threads per query row p; positives in chunks of kChunk, or
// of kChunk / 2 when at most that many are left (4 per class: no half-empty chunk).
// Thread t owns the columns k = t, t + kThreads, ... of the row, for both the
// loads of S and every store to G, so G needs no atomics and no inter-thread
// ordering: read-modify-write of G across chunks is thread-local.
//
//   pass 1: R_j = sum_{k neg} sigma_jk            (per-thread partials, block reduce)
//           Smooth-AP also pos_j = 1 + sum_{k in P, k != j} sigma_jk
//           -> the row term and the gradient weights of every positive j of the
//              chunk (every thread, same values)
//   pass 2: G_k += sum_j W_jk                      (owner thread of column k)
//           sigma' sums over the negatives (and the other positives)   (block reduce)
//           G_j += -sum_k W_jk                     (owner thread of column j)
//
// with z = (S_pj - S_pk) log2(e)/tau, e = 2^-|z| (never overflows),
// sigma = (z >= 0 ? e : 1)/(1 + e), sigma' = e/(1 + e)^2: exact in both tails,
// never NaN or inf for finite S. Reductions are warp butterflies then a fixed-order
// sum over warps: deterministic. A row with a non-empty segment that does not fit in
// [0, n) gets a NaN loss and a NaN gradient row instead of an out-of-bounds access
// (checking it on the host would synchronise).
//
// Recall@k (recall_rows_kernel) has the same layout (chunks of kChunk lanes in float,
// kChunk / 2 in double); its lanes are the positives other than the own column o, and every
// column but o is ranked. Its coefficients need all lanes of the row (recall_row_terms,
// pnp_common.h), so it runs in two phases:
//
//   phase A, per chunk: r_t = 1 + sum_{k != j_t, o} sigma_tk   (block reduce); thread i < |K|
//           adds the chunk's share of s_k (recall_k_sums_add); the ranks go to shared memory
//   then:   thread 0 turns s_k into the row loss and the weights w_k (recall_k_weights);
//           thread t computes c_t of lanes t, t + kThreads, ... (recall_lane_coef)
//   phase B, per chunk (gradient): G_k += sum_t c_t sigma'_tk / tau  (owner thread of k),
//           sigma' sums (block reduce), G_j -= c_j sum_k sigma'_jk / tau  (owner of j)
//
// A row with more than kLaneCap lanes does not keep its ranks: phase B recomputes the
// chunk's r_t (one more sweep) and its c_t. The k values and temperatures (at most kMaxKs)
// travel by value in the kernel parameters and are copied to shared memory once per block.
// An own column out of [-1, n) gives a NaN row, as a bad segment does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "pnp_common.h"

namespace pnp_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;
constexpr int kMaxKs = 64;      // Recall@k: k values per call (kernel parameters, by value)
constexpr int kLaneCap = 1024;  // Recall@k: lanes whose ranks and coefficients stay in shared memory

// Recall@k's k values and 1 / tau2_k, passed by value (2 kMaxKs doubles: 1 KiB of parameters).
struct KParams {
  double k[kMaxKs];
  double inv_t2[kMaxKs];
};

__device__ __forceinline__ float exp2_t(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_t(double x) { return exp2(x); }
// 1 / (1 + e) for e in [0, 1]: the float version is the MUFU reciprocal (2 ulp, as
// Triton's fp32 division), not the ~10-instruction IEEE division.
__device__ __forceinline__ float inv_1p(float e) { return __fdividef(1.0f, 1.0f + e); }
__device__ __forceinline__ double inv_1p(double e) { return 1.0 / (1.0 + e); }

// Sum each of v[0..CH) over the block; every thread gets the totals.
template <typename T, int CH>
__device__ __forceinline__ void block_sum(T (&v)[CH], T* smem /* kWarps * CH */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < CH; ++j) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < CH; ++j) smem[warp * CH + j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    T acc = T(0);
    for (int w = 0; w < kWarps; ++w) acc += smem[w * CH + j];
    v[j] = acc;
  }
  __syncthreads();  // smem is reused by the next call
}

// sigma and sigma' of one pair from z = (S_pj - S_pk) log2(e) / tau.
template <typename T>
__device__ __forceinline__ T sigma_of(T z) {
  const T e = exp2_t(-fabs(z));
  return (z >= T(0) ? e : T(1)) * inv_1p(e);
}
template <typename T>
__device__ __forceinline__ T dsigma_of(T z) {
  const T e = exp2_t(-fabs(z));
  const T inv = inv_1p(e);
  return e * inv * inv;
}

// The positives [c0, min(c0 + CH, hi)) of one row: pass 1 (sums, row terms, weights)
// and, when GRAD, pass 2 (G). Returns the chunk's sum of row terms.
template <typename T, int KIND, bool GRAD, int CH>
__device__ __forceinline__ T rows_chunk(const T* __restrict__ s, T* __restrict__ g, int64_t c0, int64_t lo,
                                        int64_t hi, int64_t n, int variant, T scale, T inv_tau, T alpha, T b,
                                        T inv_cnt, T* smem) {
  constexpr bool kSap = KIND == kLoss_smooth_ap;
  const int tid = threadIdx.x;
  T sj[CH];
  bool pm[CH];
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    pm[jj] = c0 + jj < hi;
    sj[jj] = pm[jj] ? s[c0 + jj] : T(0);
  }
  // pass 1: R_j over the negatives; Smooth-AP: the other positives' sum too
  T R[CH], P[CH];
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) R[jj] = P[jj] = T(0);
  for (int64_t k = tid; k < n; k += kThreads) {
    const bool is_pos = k >= lo && k < hi;
    if (!kSap && is_pos) continue;  // PNP: positives are not ranked against each other
    const T sk = s[k];
    if (!is_pos) {
#pragma unroll
      for (int jj = 0; jj < CH; ++jj) R[jj] += sigma_of<T>((sj[jj] - sk) * scale);
    } else {
#pragma unroll
      for (int jj = 0; jj < CH; ++jj) {
        const T sig = sigma_of<T>((sj[jj] - sk) * scale);
        P[jj] += (c0 + jj != k) ? sig : T(0);
      }
    }
  }
  block_sum<T, CH>(R, smem);
  if (kSap) block_sum<T, CH>(P, smem);
  // Gradient weights: wn on sigma' of a negative, wp on sigma' of another positive.
  T wn[CH], wp[CH];
  T loss_acc = T(0);
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    T term;
    if (!kSap) {
      T df;
      variant_f_df<T>(variant, R[jj], alpha, b, term, df);
      wn[jj] = df * inv_cnt;
      wp[jj] = T(0);
    } else {
      double t, a, bt;
      smooth_ap_terms(1.0 + static_cast<double>(P[jj]), static_cast<double>(R[jj]),
                      static_cast<double>(inv_cnt), t, a, bt);
      term = static_cast<T>(t);
      wn[jj] = static_cast<T>(a);
      wp[jj] = static_cast<T>(-bt);
    }
    loss_acc += pm[jj] ? term : T(0);
    if (!pm[jj]) wn[jj] = wp[jj] = T(0);
  }
  if (GRAD) {
    // pass 2: G over the row (owner threads); sigma' sums Tn (negatives), Tp (other positives)
    T Tn[CH], Tp[CH];
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) Tn[jj] = Tp[jj] = T(0);
    for (int64_t k = tid; k < n; k += kThreads) {
      const bool is_pos = k >= lo && k < hi;
      T acc = T(0);
      if (!is_pos) {
        const T sk = s[k];
#pragma unroll
        for (int jj = 0; jj < CH; ++jj) {
          const T d = dsigma_of<T>((sj[jj] - sk) * scale);
          Tn[jj] += d;
          acc += wn[jj] * d;
        }
      } else if (kSap) {
        const T sk = s[k];
#pragma unroll
        for (int jj = 0; jj < CH; ++jj) {
          const T d = (c0 + jj != k) ? dsigma_of<T>((sj[jj] - sk) * scale) : T(0);
          Tp[jj] += d;
          acc += wp[jj] * d;
        }
      }
      const T prev = (c0 == lo) ? T(0) : g[k];
      g[k] = prev + acc * inv_tau;
    }
    block_sum<T, CH>(Tn, smem);
    if (kSap) block_sum<T, CH>(Tp, smem);
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      const int64_t j = c0 + jj;
      // -sum_k W_jk: PNP has no positive-positive weights, so G_j holds nothing else yet
      if (pm[jj] && (j % kThreads) == tid) {
        if (!kSap)
          g[j] = -wn[jj] * Tn[jj] * inv_tau;
        else
          g[j] -= (wn[jj] * Tn[jj] + wp[jj] * Tp[jj]) * inv_tau;
      }
    }
  }
  return loss_acc;
}

template <typename T, int KIND, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ S, int64_t ss, const int32_t* __restrict__ lo_p,
                const int32_t* __restrict__ hi_p, T* __restrict__ loss, T* __restrict__ G, int64_t sg, int64_t n,
                int variant, T scale, T inv_tau, T alpha, T b) {
  __shared__ T smem[kWarps * kChunk];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t lo = lo_p[row];
  const int64_t hi = hi_p[row];
  const int64_t cnt = hi - lo;
  const T* s = S + row * ss;
  T* g = GRAD ? G + row * sg : nullptr;

  if (cnt >= 1 && (lo < 0 || hi > n)) {  // invalid segment: NaN, never an out-of-bounds access
    const T nan = static_cast<T>(NAN);
    if (tid == 0) loss[row] = nan;
    if (GRAD)
      for (int64_t k = tid; k < n; k += kThreads) g[k] = nan;
    return;
  }
  if (cnt < 1) {  // empty segment, dropped query: loss 0, zero gradient row
    if (tid == 0) loss[row] = T(0);
    if (GRAD)
      for (int64_t k = tid; k < n; k += kThreads) g[k] = T(0);
    return;
  }
  const T inv_cnt = T(1) / static_cast<T>(cnt);
  T loss_acc = T(0);
  // The chunk width is uniform over the block (it depends on the row only): no divergence.
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    if (hi - c0 <= kChunk / 2)
      loss_acc += rows_chunk<T, KIND, GRAD, kChunk / 2>(s, g, c0, lo, hi, n, variant, scale, inv_tau, alpha, b,
                                                         inv_cnt, smem);
    else
      loss_acc += rows_chunk<T, KIND, GRAD, kChunk>(s, g, c0, lo, hi, n, variant, scale, inv_tau, alpha, b,
                                                     inv_cnt, smem);
  }
  if (tid == 0) loss[row] = loss_acc * inv_cnt;
}

// Recall@k, phase A for the lanes of one chunk (columns j[jj]): every thread gets
// r[jj] = 1 + sum_{k != j[jj], o} sigma_jk.
template <typename T, int CH>
__device__ __forceinline__ void recall_ranks(const T* __restrict__ s, int64_t n, int64_t o,
                                             const int32_t (&j)[CH], const T (&sj)[CH], T scale, T (&r)[CH],
                                             T* smem) {
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) r[jj] = T(0);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    if (k == o) continue;  // the own column is not ranked
    const T sk = s[k];
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      const T sig = sigma_of<T>((sj[jj] - sk) * scale);
      r[jj] += (k != j[jj]) ? sig : T(0);
    }
  }
  block_sum<T, CH>(r, smem);
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) r[jj] += T(1);  // the positive itself is rank 1
}

// Recall@k, phase B for the lanes of one chunk with coefficients c[jj] (0 on invalid lanes):
// G_k += sum_jj c_jj sigma'_jk / tau on the ranked columns k != j_jj (the first chunk of the
// row initialises G, the own column included), then G_j -= c_j sum_k sigma'_jk / tau.
template <typename T, int CH>
__device__ __forceinline__ void recall_grad_chunk(const T* __restrict__ s, T* __restrict__ g, int64_t n, int64_t o,
                                                  const int32_t (&j)[CH], const bool (&pm)[CH], const T (&sj)[CH],
                                                  const T (&c)[CH], T scale, T inv_tau, bool first, T* smem) {
  const int tid = threadIdx.x;
  T Tn[CH];
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) Tn[jj] = T(0);
  for (int64_t k = tid; k < n; k += kThreads) {
    T acc = T(0);
    if (k != o) {
      const T sk = s[k];
#pragma unroll
      for (int jj = 0; jj < CH; ++jj) {
        const T d = (k != j[jj]) ? dsigma_of<T>((sj[jj] - sk) * scale) : T(0);
        Tn[jj] += d;
        acc += c[jj] * d;
      }
    }
    const T prev = first ? T(0) : g[k];
    g[k] = prev + acc * inv_tau;
  }
  block_sum<T, CH>(Tn, smem);
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    if (pm[jj] && (j[jj] % kThreads) == tid) g[j[jj]] -= c[jj] * Tn[jj] * inv_tau;
  }
}

// The lanes [t0, t0 + CH) of a Recall@k row: their columns (lane t is column lo + t, shifted past
// the own column when it lies in the segment; -1 past the last lane), validity and similarities.
template <typename T, int CH>
__device__ __forceinline__ void recall_lanes(const T* __restrict__ s, int64_t t0, int64_t n_act, int64_t lo,
                                             int64_t o, bool own_in, int32_t (&j)[CH], bool (&pm)[CH],
                                             T (&sj)[CH]) {
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    const int64_t t = t0 + jj;
    pm[jj] = t < n_act;
    j[jj] = pm[jj] ? static_cast<int32_t>(lo + t + ((own_in && lo + t >= o) ? 1 : 0)) : -1;
    sj[jj] = pm[jj] ? s[j[jj]] : T(0);
  }
}

// Phase A of one chunk: the ranks, kept in lane_buf (when the row fits) and added to s_k.
template <typename T, int CH>
__device__ __forceinline__ void recall_phase_a(const T* __restrict__ s, int64_t t0, int64_t n_act, int64_t n,
                                               int64_t lo, int64_t o, bool own_in, T scale, const double* ks,
                                               const double* inv_t2, int nk, double* s_k, double* lane_buf,
                                               bool cached, T* smem) {
  int32_t j[CH];  // columns < 2^31: they lie in segments of int32 bounds
  bool pm[CH];
  T sj[CH], r[CH];
  recall_lanes<T, CH>(s, t0, n_act, lo, o, own_in, j, pm, sj);
  recall_ranks<T, CH>(s, n, o, j, sj, scale, r, smem);
  const int tid = threadIdx.x;
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {  // static indices: r stays in registers
    if (cached && pm[jj] && tid == jj) lane_buf[t0 + jj] = static_cast<double>(r[jj]);
  }
  if (tid < nk) {  // thread i owns s_k[i]: a fixed order over the lanes, no atomics
    double acc = s_k[tid];
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      if (pm[jj]) recall_k_sums_add<double>(static_cast<double>(r[jj]), ks + tid, inv_t2 + tid, 1, &acc);
    }
    s_k[tid] = acc;
  }
}

// Phase B of one chunk: the coefficients (from lane_buf, or from the ranks swept again), then G.
template <typename T, int CH>
__device__ __forceinline__ void recall_phase_b(const T* __restrict__ s, T* __restrict__ g, int64_t t0,
                                               int64_t n_act, int64_t n, int64_t lo, int64_t o, bool own_in, T scale,
                                               T inv_tau, const double* ks, const double* inv_t2, int nk,
                                               const double* w_k, const double* lane_buf, bool cached, T* smem) {
  int32_t j[CH];  // columns < 2^31: they lie in segments of int32 bounds
  bool pm[CH];
  T sj[CH], c[CH];
  recall_lanes<T, CH>(s, t0, n_act, lo, o, own_in, j, pm, sj);
  if (cached) {
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) c[jj] = pm[jj] ? static_cast<T>(lane_buf[t0 + jj]) : T(0);
  } else {
    T r[CH];
    recall_ranks<T, CH>(s, n, o, j, sj, scale, r, smem);
#pragma unroll
    for (int jj = 0; jj < CH; ++jj)
      c[jj] = pm[jj] ? static_cast<T>(recall_lane_coef<double>(static_cast<double>(r[jj]), ks, inv_t2, w_k, nk))
                     : T(0);
  }
  recall_grad_chunk<T, CH>(s, g, n, o, j, pm, sj, c, scale, inv_tau, t0 == 0, smem);
}

template <typename T, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    recall_rows_kernel(const T* __restrict__ S, int64_t ss, const int32_t* __restrict__ lo_p,
                       const int32_t* __restrict__ hi_p, const int32_t* __restrict__ own_p, T* __restrict__ loss,
                       T* __restrict__ G, int64_t sg, int64_t n, T scale, T inv_tau, const KParams kp, int nk) {
  // lanes per chunk: kChunk in float, half of it in double (twice the registers per value)
  constexpr int CH = sizeof(T) == 8 ? kChunk / 2 : kChunk;
  __shared__ T smem[kWarps * kChunk];
  __shared__ double kbuf[2 * kMaxKs];    // k values, then 1 / tau2_k
  __shared__ double sw[kMaxKs];          // s_k, then w_k
  __shared__ double lane_buf[kLaneCap];  // r_t, then c_t
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t lo = lo_p[row];
  const int64_t hi = hi_p[row];
  const int64_t o = own_p[row];
  const int64_t cnt = hi - lo;
  const T* s = S + row * ss;
  T* g = GRAD ? G + row * sg : nullptr;

  if ((cnt >= 1 && (lo < 0 || hi > n)) || o < -1 || o >= n) {  // invalid segment or own column: NaN row
    const T nan = static_cast<T>(NAN);
    if (tid == 0) loss[row] = nan;
    if (GRAD)
      for (int64_t k = tid; k < n; k += kThreads) g[k] = nan;
    return;
  }
  const bool own_in = o >= lo && o < hi;
  const int64_t n_act = cnt - (own_in ? 1 : 0);
  if (cnt < 1 || n_act < 1) {  // no positive besides the own column: dropped, loss 0, zero gradient row
    if (tid == 0) loss[row] = T(0);
    if (GRAD)
      for (int64_t k = tid; k < n; k += kThreads) g[k] = T(0);
    return;
  }
  if (tid == 0) {  // static indices into the parameters: no local-memory copy of kp
#pragma unroll
    for (int i = 0; i < kMaxKs; ++i) {
      if (i < nk) {
        kbuf[i] = kp.k[i];
        kbuf[kMaxKs + i] = kp.inv_t2[i];
      }
    }
  }
  if (tid < nk) sw[tid] = 0.0;
  __syncthreads();
  const double* ks = kbuf;
  const double* inv_t2 = kbuf + kMaxKs;
  const bool cached = n_act <= kLaneCap;
  // The chunk width is uniform over the block (it depends on the row only): no divergence.
  for (int64_t t0 = 0; t0 < n_act; t0 += CH) {
    if (n_act - t0 <= CH / 2)
      recall_phase_a<T, CH / 2>(s, t0, n_act, n, lo, o, own_in, scale, ks, inv_t2, nk, sw, lane_buf, cached, smem);
    else
      recall_phase_a<T, CH>(s, t0, n_act, n, lo, o, own_in, scale, ks, inv_t2, nk, sw, lane_buf, cached, smem);
  }
  __syncthreads();  // s_k and the ranks are complete
  if (tid == 0) {
    const double l = recall_k_weights<double>(sw, static_cast<double>(n_act), ks, inv_t2, nk, sw);
    loss[row] = static_cast<T>(l);
  }
  if (!GRAD) return;
  __syncthreads();  // w_k
  if (cached) {
    for (int64_t t = tid; t < n_act; t += kThreads)
      lane_buf[t] = recall_lane_coef<double>(lane_buf[t], ks, inv_t2, sw, nk);
    __syncthreads();
  }
  for (int64_t t0 = 0; t0 < n_act; t0 += CH) {
    if (n_act - t0 <= CH / 2)
      recall_phase_b<T, CH / 2>(s, g, t0, n_act, n, lo, o, own_in, scale, inv_tau, ks, inv_t2, nk, sw, lane_buf,
                                cached, smem);
    else
      recall_phase_b<T, CH>(s, g, t0, n_act, n, lo, o, own_in, scale, inv_tau, ks, inv_t2, nk, sw, lane_buf, cached,
                            smem);
  }
}

// H[a, c] = g_a G[a, c] + g_c G[c, a]; 32 x 32 tiles, the transposed tile via shared memory.
template <typename T>
__global__ void symmetrize_kernel(const T* __restrict__ G, int64_t sg, const T* __restrict__ gv,
                                      T* __restrict__ H, int64_t n) {
  __shared__ T tile[32][33];
  const int64_t a0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int tx = threadIdx.x;
  for (int ty = threadIdx.y; ty < 32; ty += blockDim.y) {
    const int64_t r = c0 + ty, col = a0 + tx;  // tile[ty][tx] = G[c0 + ty, a0 + tx]
    tile[ty][tx] = (r < n && col < n) ? G[r * sg + col] : T(0);
  }
  __syncthreads();
  for (int ty = threadIdx.y; ty < 32; ty += blockDim.y) {
    const int64_t a = a0 + ty, c = c0 + tx;
    if (a < n && c < n) H[a * n + c] = gv[a] * G[a * sg + c] + gv[c] * tile[tx][ty];
  }
}

template <typename T, int KIND>
void launch_rows(const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi, at::Tensor& loss, at::Tensor& G,
                 bool compute_grad, int variant, double anneal, double alpha, double b, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(S.size(0)));
  const T sc = static_cast<T>(kLog2e / anneal), it = static_cast<T>(1.0 / anneal);
  const T al = static_cast<T>(alpha), bb = static_cast<T>(b);
  if (compute_grad)
    rows_kernel<T, KIND, true><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), loss.data_ptr<T>(),
        G.data_ptr<T>(), G.stride(0), S.size(1), variant, sc, it, al, bb);
  else
    rows_kernel<T, KIND, false><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), loss.data_ptr<T>(), nullptr,
        0, S.size(1), variant, sc, it, al, bb);
}

template <typename T>
void launch_recall_rows(const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& own,
                        at::Tensor& loss, at::Tensor& G, bool compute_grad, double anneal, const KParams& kp, int nk,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(S.size(0)));
  const T sc = static_cast<T>(kLog2e / anneal), it = static_cast<T>(1.0 / anneal);
  if (compute_grad)
    recall_rows_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), own.data_ptr<int32_t>(),
        loss.data_ptr<T>(), G.data_ptr<T>(), G.stride(0), S.size(1), sc, it, kp, nk);
  else
    recall_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), own.data_ptr<int32_t>(),
        loss.data_ptr<T>(), nullptr, 0, S.size(1), sc, it, kp, nk);
}

template <typename T>
void launch_rows_kind(int64_t kind, const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi,
                      const at::Tensor& own, at::Tensor& loss, at::Tensor& G, bool compute_grad, int variant,
                      double anneal, double alpha, double b, const KParams& kp, int nk, cudaStream_t stream) {
  if (kind == kLoss_pnp)
    launch_rows<T, kLoss_pnp>(S, lo, hi, loss, G, compute_grad, variant, anneal, alpha, b, stream);
  else if (kind == kLoss_smooth_ap)
    launch_rows<T, kLoss_smooth_ap>(S, lo, hi, loss, G, compute_grad, variant, anneal, alpha, b, stream);
  else
    launch_recall_rows<T>(S, lo, hi, own, loss, G, compute_grad, anneal, kp, nk, stream);
}

std::tuple<at::Tensor, at::Tensor> row_losses_and_dS_cuda(const at::Tensor& S, const at::Tensor& lo,
                                                          const at::Tensor& hi, const at::Tensor& own, int64_t kind,
                                                          int64_t variant, double anneal, double alpha, double b,
                                                          at::ArrayRef<double> ks,
                                                          at::ArrayRef<double> k_temperatures, bool compute_grad) {
  TORCH_CHECK(S.dim() == 2, "pnp_kernels_ext.row_losses_and_dS: S must be 2-D");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble,
              "pnp_kernels_ext.row_losses_and_dS: S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(S.size(1) == 0 || S.stride(1) == 1, "pnp_kernels_ext.row_losses_and_dS: S columns must be contiguous");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt && lo.is_contiguous() &&
                  hi.is_contiguous() && lo.dim() == 1 && hi.dim() == 1 && lo.size(0) == S.size(0) &&
                  hi.size(0) == S.size(0),
              "pnp_kernels_ext.row_losses_and_dS: lo/hi must be contiguous int32 vectors, one entry per row");
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
  const std::vector<double> kv(ks.begin(), ks.end()), tv(k_temperatures.begin(), k_temperatures.end());
  check_recall_params("pnp_kernels_ext.row_losses_and_dS", kind, kv, tv);
  KParams kp{};
  int nk = 0;
  if (kind == kLoss_recall_at_k) {
    TORCH_CHECK(kv.size() <= static_cast<size_t>(kMaxKs), "pnp_kernels_ext.row_losses_and_dS: ks: the CUDA kernels "
                "take at most ", kMaxKs, " k values, got ", kv.size());
    nk = static_cast<int>(kv.size());
    for (int i = 0; i < nk; ++i) {
      kp.k[i] = kv[i];
      kp.inv_t2[i] = 1.0 / tv[i];
    }
  }
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t Q = S.size(0);
  at::Tensor loss = at::empty({Q}, S.options());
  at::Tensor G = compute_grad ? at::empty({Q, S.size(1)}, S.options()) : at::empty({0}, S.options());
  if (Q == 0) return {loss, G};
  TORCH_CHECK(Q <= 2147483647LL, "pnp_kernels_ext.row_losses_and_dS: too many rows");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int v = static_cast<int>(variant);
  if (S.scalar_type() == at::kFloat)
    launch_rows_kind<float>(kind, S, lo, hi, own, loss, G, compute_grad, v, anneal, alpha, b, kp, nk, stream);
  else
    launch_rows_kind<double>(kind, S, lo, hi, own, loss, G, compute_grad, v, anneal, alpha, b, kp, nk, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, G};
}

at::Tensor symmetrize_cuda(const at::Tensor& G, const at::Tensor& g) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "pnp_kernels_ext.symmetrize: G must be square");
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "pnp_kernels_ext.symmetrize: G must be float32 or float64");
  TORCH_CHECK(G.size(1) == 0 || G.stride(1) == 1, "pnp_kernels_ext.symmetrize: G columns must be contiguous");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == G.size(0) && g.scalar_type() == G.scalar_type() && g.is_contiguous() &&
                  g.device() == G.device(),
              "pnp_kernels_ext.symmetrize: g must be a contiguous vector of G's dtype, length and device");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t n = G.size(0);
  at::Tensor H = at::empty({n, n}, G.options());
  if (n == 0) return H;
  const int64_t tiles = (n + 31) / 32;
  TORCH_CHECK(tiles <= 65535, "pnp_kernels_ext.symmetrize: n too large (", n, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const dim3 block(32, 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (G.scalar_type() == at::kFloat)
    symmetrize_kernel<float><<<grid, block, 0, stream>>>(G.data_ptr<float>(), G.stride(0),
                                                             g.data_ptr<float>(), H.data_ptr<float>(), n);
  else
    symmetrize_kernel<double><<<grid, block, 0, stream>>>(G.data_ptr<double>(), G.stride(0),
                                                              g.data_ptr<double>(), H.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return H;
}

}  // namespace
}  // namespace pnp_ext

TORCH_LIBRARY_IMPL(pnp_kernels_ext, CUDA, m) {
  m.impl("row_losses_and_dS", &pnp_ext::row_losses_and_dS_cuda);
  m.impl("symmetrize", &pnp_ext::symmetrize_cuda);
}
