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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "pnp_common.h"

namespace pnp_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;

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
void launch_rows_kind(int64_t kind, const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi,
                      at::Tensor& loss, at::Tensor& G, bool compute_grad, int variant, double anneal, double alpha,
                      double b, cudaStream_t stream) {
  if (kind == kLoss_pnp)
    launch_rows<T, kLoss_pnp>(S, lo, hi, loss, G, compute_grad, variant, anneal, alpha, b, stream);
  else
    launch_rows<T, kLoss_smooth_ap>(S, lo, hi, loss, G, compute_grad, variant, anneal, alpha, b, stream);
}

std::tuple<at::Tensor, at::Tensor> row_losses_and_dS_cuda(const at::Tensor& S, const at::Tensor& lo,
                                                     const at::Tensor& hi, int64_t kind, int64_t variant,
                                                     double anneal, double alpha, double b,
                                                     bool compute_grad) {
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
  TORCH_CHECK(kind >= 0 && kind < kLossKindCount, "pnp_kernels_ext.row_losses_and_dS: loss kind must be 0..",
              kLossKindCount - 1, ", got ", kind);
  TORCH_CHECK(variant >= 0 && variant < kVariantCount, "pnp_kernels_ext.row_losses_and_dS: variant code must be 0..",
              kVariantCount - 1, ", got ", variant);
  TORCH_CHECK(anneal > 0, "pnp_kernels_ext.row_losses_and_dS: anneal must be > 0, got ", anneal);
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t Q = S.size(0);
  at::Tensor loss = at::empty({Q}, S.options());
  at::Tensor G = compute_grad ? at::empty({Q, S.size(1)}, S.options()) : at::empty({0}, S.options());
  if (Q == 0) return {loss, G};
  TORCH_CHECK(Q <= 2147483647LL, "pnp_kernels_ext.row_losses_and_dS: too many rows");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int v = static_cast<int>(variant);
  if (S.scalar_type() == at::kFloat)
    launch_rows_kind<float>(kind, S, lo, hi, loss, G, compute_grad, v, anneal, alpha, b, stream);
  else
    launch_rows_kind<double>(kind, S, lo, hi, loss, G, compute_grad, v, anneal, alpha, b, stream);
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
