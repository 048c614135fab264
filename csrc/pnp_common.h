// Shared declarations of the pnp_kernels C++/CUDA extension (see csrc/pnp_cpu.cpp).
//
// Ops (namespace pnp_kernels_ext, registered with TORCH_LIBRARY):
//
//   rows_forward(Tensor S, Tensor lo, Tensor hi, int variant, float anneal,
//                float alpha, float b, bool compute_grad) -> (Tensor loss, Tensor G)
//       S: (Q, n) float32/float64, row stride arbitrary, unit column stride;
//       lo/hi: int32 (Q,), the positives of row p are the columns [lo_p, hi_p).
//       loss[p] = mean_{j in [lo,hi)} f(R_pj) (0 when hi - lo < 2);
//       G[p, :] = d loss[p] / d S[p, :] when compute_grad, else a (0,) tensor.
//       A segment out of [0, n) (hi - lo >= 2): an error on CPU; on CUDA (where a check
//       would synchronise) that row's loss and G row are NaN.
//
//   symmetric_grad(Tensor G, Tensor g) -> Tensor    H = diag(g) G + (diag(g) G)^T
//
//   loss_forward / loss_backward: the whole pipeline around those two, one op each
//       way, for CPU and CUDA tensors alike (csrc/pnp_pipeline.cpp).
//
// Variant codes follow pnp_kernels/variants.py: 0 O, 1 Ds, 2 Dq, 3 Iu, 4 Ib.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PNP_HD __host__ __device__ __forceinline__
#else
#define PNP_HD inline
#endif

namespace pnp_ext {

constexpr double kLog2e = 1.4426950408889634;

// f(R) and df/dR of the variant table in pnp_kernels/variants.py, in the same
// accurate forms: Dq is f = 1 - (1+R)^-alpha = -expm1(-alpha log1p(R)) (the papers'
// "1 - mean" folded into f), and x - log1p(x) is summed as its series below 0.5.
// Evaluated once per (query, positive), never in an inner loop, in double.
PNP_HD double x_minus_log1p(double x) {
#if !defined(__CUDA_ARCH__)
  using std::log1p;
#endif
  if (x < 0.5) {
    double acc = 0.0;
    for (int n = 25; n >= 2; --n) acc = 1.0 / n - x * acc;  // x^2 (1/2 - x (1/3 - ...))
    return x * x * acc;
  }
  return x - log1p(x);
}

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
    case 0:  // O
      f = R;
      df = 1.0;
      break;
    case 1:  // Ds
      f = log1p(R);
      df = 1.0 / (1.0 + R);
      break;
    case 2: {  // Dq: 1 - (1+R)^-alpha
      const double lg = log1p(R);
      f = -expm1(-alpha * lg);
      df = alpha * exp(-(alpha + 1.0) * lg);
      break;
    }
    case 3: {  // Iu
      const double lg = log1p(R);
      f = (1.0 + R) * lg;
      df = lg + 1.0;
      break;
    }
    default: {  // Ib
      const double x = b * R;
      f = x_minus_log1p(x) / (b * b);
      df = R / (1.0 + x);
      break;
    }
  }
  f_out = static_cast<T>(f);
  df_out = static_cast<T>(df);
}

}  // namespace pnp_ext
