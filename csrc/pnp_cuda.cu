// CUDA kernels of the pnp_kernels extension (registered for the CUDA dispatch key;
// the schemas are defined in pnp_cpu.cpp). Same algorithm as the Triton kernel
// _pnp_fwd_kernel in pnp_kernels/backends/triton.py:
//
// one block of kThreads threads per query row p; positives in chunks of kChunk, or
// of kChunk / 2 when at most that many are left (4 per class: no half-empty chunk).
// Thread t owns the columns k = t, t + kThreads, ... of the row, for both the
// loads of S and every store to G, so G needs no atomics and no inter-thread
// ordering: read-modify-write of G across chunks is thread-local.
//
//   pass 1: R_j = sum_{k neg} sigma_jk           (per-thread partials, block reduce)
//           -> f(R_j), c_j = f'(R_j) / |P_p|      (every thread, same values)
//   pass 2: G_k += (1/tau) sum_j c_j sigma'_jk    (k negative, owner thread)
//           T_j = sum_k sigma'_jk                  (block reduce)
//           G_j  = -(1/tau) c_j T_j                (owner thread of column j)
//
// with z = (S_pj - S_pk) log2(e)/tau, e = 2^-|z| (never overflows),
// sigma = (z >= 0 ? e : 1)/(1 + e), sigma' = e/(1 + e)^2: exact in both tails,
// never NaN or inf for finite S. Reductions are warp butterflies then a fixed-order
// sum over warps: deterministic. A row whose segment does not fit in [0, n) gets a
// NaN loss and a NaN gradient row instead of an out-of-bounds access (checking it
// on the host would synchronise).
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

// The positives [c0, min(c0 + CH, hi)) of one row: pass 1 (R_j, f, c_j) and, when GRAD,
// pass 2 (G over the negatives, T_j, G_j). Returns the chunk's sum of f.
template <typename T, bool GRAD, int CH>
__device__ __forceinline__ T rows_chunk(const T* __restrict__ s, T* __restrict__ g, int64_t c0, int64_t lo,
                                        int64_t hi, int64_t n, int variant, T scale, T inv_tau, T alpha, T b,
                                        T inv_cnt, T* smem) {
  const int tid = threadIdx.x;
  T sj[CH];
  bool pm[CH];
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    pm[jj] = c0 + jj < hi;
    sj[jj] = pm[jj] ? s[c0 + jj] : T(0);
  }
  // pass 1: R_j
  T R[CH];
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) R[jj] = T(0);
  for (int64_t k = tid; k < n; k += kThreads) {
    if (k >= lo && k < hi) continue;  // positives are not negatives
    const T sk = s[k];
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      const T z = (sj[jj] - sk) * scale;
      const T e = exp2_t(-fabs(z));
      R[jj] += (z >= T(0) ? e : T(1)) * inv_1p(e);
    }
  }
  block_sum<T, CH>(R, smem);
  T coef[CH];
  T loss_acc = T(0);
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    T f, df;
    variant_f_df<T>(variant, R[jj], alpha, b, f, df);
    loss_acc += pm[jj] ? f : T(0);
    coef[jj] = pm[jj] ? df * inv_cnt : T(0);
  }
  if (GRAD) {
    // pass 2: G over the negatives (owner threads), T_j partials
    T Tp[CH];
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) Tp[jj] = T(0);
    for (int64_t k = tid; k < n; k += kThreads) {
      T acc = T(0);
      if (k < lo || k >= hi) {
        const T sk = s[k];
#pragma unroll
        for (int jj = 0; jj < CH; ++jj) {
          const T z = (sj[jj] - sk) * scale;
          const T e = exp2_t(-fabs(z));
          const T inv = inv_1p(e);
          const T d = e * inv * inv;
          Tp[jj] += d;
          acc += coef[jj] * d;
        }
      }
      const T prev = (c0 == lo) ? T(0) : g[k];
      g[k] = prev + acc * inv_tau;
    }
    block_sum<T, CH>(Tp, smem);
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      const int64_t j = c0 + jj;
      if (pm[jj] && (j % kThreads) == tid) g[j] = -coef[jj] * Tp[jj] * inv_tau;
    }
  }
  return loss_acc;
}

template <typename T, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    pnp_rows_kernel(const T* __restrict__ S, int64_t ss, const int32_t* __restrict__ lo_p,
                    const int32_t* __restrict__ hi_p, T* __restrict__ loss, T* __restrict__ G, int64_t sg,
                    int64_t n, int variant, T scale, T inv_tau, T alpha, T b) {
  __shared__ T smem[kWarps * kChunk];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t lo = lo_p[row];
  const int64_t hi = hi_p[row];
  const int64_t cnt = hi - lo;
  const T* s = S + row * ss;
  T* g = GRAD ? G + row * sg : nullptr;

  if (cnt >= 2 && (lo < 0 || hi > n)) {  // invalid segment: NaN, never an out-of-bounds access
    const T nan = static_cast<T>(NAN);
    if (tid == 0) loss[row] = nan;
    if (GRAD)
      for (int64_t k = tid; k < n; k += kThreads) g[k] = nan;
    return;
  }
  if (cnt < 2) {  // dropped query: loss 0, zero gradient row
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
      loss_acc += rows_chunk<T, GRAD, kChunk / 2>(s, g, c0, lo, hi, n, variant, scale, inv_tau, alpha, b,
                                                   inv_cnt, smem);
    else
      loss_acc += rows_chunk<T, GRAD, kChunk>(s, g, c0, lo, hi, n, variant, scale, inv_tau, alpha, b, inv_cnt,
                                               smem);
  }
  if (tid == 0) loss[row] = loss_acc * inv_cnt;
}

// H[a, c] = g_a G[a, c] + g_c G[c, a]; 32 x 32 tiles, the transposed tile via shared memory.
template <typename T>
__global__ void symmetric_grad_kernel(const T* __restrict__ G, int64_t sg, const T* __restrict__ gv,
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

std::tuple<at::Tensor, at::Tensor> rows_forward_cuda(const at::Tensor& S, const at::Tensor& lo,
                                                     const at::Tensor& hi, int64_t variant,
                                                     double anneal, double alpha, double b,
                                                     bool compute_grad) {
  TORCH_CHECK(S.dim() == 2, "pnp_kernels_ext.rows_forward: S must be 2-D");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble,
              "pnp_kernels_ext.rows_forward: S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(S.size(1) == 0 || S.stride(1) == 1, "pnp_kernels_ext.rows_forward: S columns must be contiguous");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt && lo.is_contiguous() &&
                  hi.is_contiguous() && lo.dim() == 1 && hi.dim() == 1 && lo.size(0) == S.size(0) &&
                  hi.size(0) == S.size(0),
              "pnp_kernels_ext.rows_forward: lo/hi must be contiguous int32 vectors, one entry per row");
  TORCH_CHECK(lo.device() == S.device() && hi.device() == S.device(),
              "pnp_kernels_ext.rows_forward: lo/hi must be on the device of S");
  TORCH_CHECK(variant >= 0 && variant <= 4, "pnp_kernels_ext.rows_forward: variant code must be 0..4");
  TORCH_CHECK(anneal > 0, "pnp_kernels_ext.rows_forward: anneal must be > 0");
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t Q = S.size(0), n = S.size(1);
  at::Tensor loss = at::empty({Q}, S.options());
  at::Tensor G = compute_grad ? at::empty({Q, n}, S.options()) : at::empty({0}, S.options());
  if (Q == 0) return {loss, G};
  TORCH_CHECK(Q <= 2147483647LL, "pnp_kernels_ext.rows_forward: too many rows");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(Q));
  const int v = static_cast<int>(variant);
  if (S.scalar_type() == at::kFloat) {
    const float sc = static_cast<float>(kLog2e / anneal), it = static_cast<float>(1.0 / anneal);
    const float al = static_cast<float>(alpha), bb = static_cast<float>(b);
    if (compute_grad)
      pnp_rows_kernel<float, true><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<float>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
          loss.data_ptr<float>(), G.data_ptr<float>(), G.stride(0), n, v, sc, it, al, bb);
    else
      pnp_rows_kernel<float, false><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<float>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
          loss.data_ptr<float>(), nullptr, 0, n, v, sc, it, al, bb);
  } else {
    const double sc = kLog2e / anneal, it = 1.0 / anneal;
    if (compute_grad)
      pnp_rows_kernel<double, true><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<double>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
          loss.data_ptr<double>(), G.data_ptr<double>(), G.stride(0), n, v, sc, it, alpha, b);
    else
      pnp_rows_kernel<double, false><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<double>(), S.stride(0), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
          loss.data_ptr<double>(), nullptr, 0, n, v, sc, it, alpha, b);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, G};
}

at::Tensor symmetric_grad_cuda(const at::Tensor& G, const at::Tensor& g) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "pnp_kernels_ext.symmetric_grad: G must be square");
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "pnp_kernels_ext.symmetric_grad: G must be float32 or float64");
  TORCH_CHECK(G.size(1) == 0 || G.stride(1) == 1, "pnp_kernels_ext.symmetric_grad: G columns must be contiguous");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == G.size(0) && g.scalar_type() == G.scalar_type() && g.is_contiguous() &&
                  g.device() == G.device(),
              "pnp_kernels_ext.symmetric_grad: g must be a contiguous vector of G's dtype, length and device");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t n = G.size(0);
  at::Tensor H = at::empty({n, n}, G.options());
  if (n == 0) return H;
  const int64_t tiles = (n + 31) / 32;
  TORCH_CHECK(tiles <= 65535, "pnp_kernels_ext.symmetric_grad: n too large (", n, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const dim3 block(32, 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (G.scalar_type() == at::kFloat)
    symmetric_grad_kernel<float><<<grid, block, 0, stream>>>(G.data_ptr<float>(), G.stride(0),
                                                             g.data_ptr<float>(), H.data_ptr<float>(), n);
  else
    symmetric_grad_kernel<double><<<grid, block, 0, stream>>>(G.data_ptr<double>(), G.stride(0),
                                                              g.data_ptr<double>(), H.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return H;
}

}  // namespace
}  // namespace pnp_ext

TORCH_LIBRARY_IMPL(pnp_kernels_ext, CUDA, m) {
  m.impl("rows_forward", &pnp_ext::rows_forward_cuda);
  m.impl("symmetric_grad", &pnp_ext::symmetric_grad_cuda);
}
