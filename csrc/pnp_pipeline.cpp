// Whole-loss ops of the pnp_kernels extension: the square pipeline (a batch ranked
// against itself: sort by label, segments, gather + normalise, S = Xs Xs^T,
// row_losses_and_dS, reduction; and back: row weights, symmetrize, H Xs, through the
// normalisation and the sort) as one op each way.
//
// Why: at small batches an eager step is host time, and from Python each of the ~40
// tensor ops of the pipeline costs a Python call plus a dispatch. Called from C++ the
// same ATen ops cost only the dispatch, and Python makes 2 calls per step.
//
// Device-agnostic: ATen ops plus the two kernels through the dispatcher, so the same
// code serves CPU tensors (pnp_cpu.cpp) and CUDA tensors (pnp_cuda.cu). Nothing reads
// a device value on the host (no synchronisation): the segments come from
// searchsorted on the sorted labels, so they are valid by construction.
//
//   loss_forward(E, labels, kind, variant, anneal, alpha, b, ks, k_temperatures, cosine, mean,
//                compute_grad) -> (out, n_valid, Xs, perm, lo, hi, denom, G)   (Xs .. denom: spec.SquarePrep)
//   loss_backward(grad_out, n_valid, Xs, perm, lo, hi, denom, G, cosine, mean, out_dtype) -> dE
//
// Segments: row p of the sorted batch has the positives [lo_p, hi_p) = its class,
// its own copy included. A query whose class has no other member has no positive to
// rank (its only positive would be itself), so it gets the empty segment hi = lo,
// which row_losses_and_dS drops (loss 0, zero gradient row); n_valid = #{p : hi_p > lo_p}.
// Row p's own column is p itself (own = arange): Recall@k leaves it out, so a class of two
// or more always leaves each of its rows at least one positive, and n_valid is the same count.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "pnp_common.h"

namespace pnp_ext {
namespace {

constexpr double kNormEps = 1e-12;   // F.normalize's eps (pipeline.NORM_EPS)
constexpr double kHalfMax = 65504.0;  // largest float16 (pipeline.HALF_MAX)

using RowsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, int64_t, double, double, double,
                                                  at::ArrayRef<double>, at::ArrayRef<double>, bool);
using SymFn = at::Tensor(const at::Tensor&, const at::Tensor&);

std::tuple<at::Tensor, at::Tensor> call_row_losses_and_dS(const at::Tensor& S, const at::Tensor& lo,
                                                          const at::Tensor& hi, const at::Tensor& own, int64_t kind,
                                                          int64_t variant, double anneal, double alpha, double b,
                                                          at::ArrayRef<double> ks,
                                                          at::ArrayRef<double> k_temperatures, bool compute_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pnp_kernels_ext::row_losses_and_dS", "").typed<RowsFn>();
  return op.call(S, lo, hi, own, kind, variant, anneal, alpha, b, ks, k_temperatures, compute_grad);
}

at::Tensor call_symmetrize(const at::Tensor& G, const at::Tensor& g) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pnp_kernels_ext::symmetrize", "").typed<SymFn>();
  return op.call(G, g);
}

using ForwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut loss_forward(const at::Tensor& E, const at::Tensor& labels, int64_t kind, int64_t variant,
                        double anneal, double alpha, double b, at::ArrayRef<double> ks,
                        at::ArrayRef<double> k_temperatures, bool cosine, bool mean, bool compute_grad) {
  TORCH_CHECK(E.dim() == 2, "pnp_kernels_ext.loss_forward: embeddings must be 2-D");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == E.size(0) && labels.scalar_type() == at::kLong,
              "pnp_kernels_ext.loss_forward: labels must be an int64 vector with one entry per embedding");
  TORCH_CHECK(labels.device() == E.device(), "pnp_kernels_ext.loss_forward: labels must be on the embeddings' device");
  check_recall_params("pnp_kernels_ext.loss_forward", kind, std::vector<double>(ks.begin(), ks.end()),
                      std::vector<double>(k_temperatures.begin(), k_temperatures.end()));
  const at::ScalarType cdt = E.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  // Stable sort by label: each row's class is the segment [lo, hi) of the sorted order.
  auto [sorted_labels, perm] = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor lo = at::searchsorted(sorted_labels, sorted_labels, /*out_int32=*/true, /*right=*/false);
  at::Tensor hi = at::searchsorted(sorted_labels, sorted_labels, /*out_int32=*/true, /*right=*/true);
  hi = at::where(hi.sub(lo).ge(2), hi, lo);  // a class of one: empty segment (dropped query)

  at::Tensor Xs = E.index_select(0, perm).to(cdt);
  at::Tensor denom;
  if (cosine) {  // x / max(||x||, eps), as F.normalize
    denom = at::linalg_vector_norm(Xs, 2, at::IntArrayRef{1}).clamp_min_(kNormEps);
    Xs.div_(denom.unsqueeze(1));
  } else {
    denom = at::empty({0}, Xs.options());
  }

  at::Tensor per_row, G;
  {
    at::Tensor S = at::mm(Xs, Xs.t());
    const at::Tensor own = at::arange(E.size(0), lo.options());
    std::tie(per_row, G) = call_row_losses_and_dS(S, lo, hi, own, kind, variant, anneal, alpha, b, ks,
                                                  k_temperatures, compute_grad);
  }  // S freed here: at most two B x B buffers alive at once

  // row_losses_and_dS writes 0 for dropped queries (empty segments), so the reduction
  // needs no mask; n_valid counts the kept ones.
  at::Tensor n_valid = at::sum(hi.gt(lo), cdt);
  at::Tensor out = mean ? per_row.sum().div_(n_valid.clamp_min(1))
                        : at::empty_like(per_row).index_copy_(0, perm, per_row);
  return {out, n_valid, Xs, perm, lo, hi, denom, G};
}

at::Tensor loss_backward(const at::Tensor& grad_out, const at::Tensor& n_valid, const at::Tensor& Xs,
                         const at::Tensor& perm, const at::Tensor& lo, const at::Tensor& hi,
                         const at::Tensor& denom, const at::Tensor& G, bool cosine, bool mean,
                         at::ScalarType out_dtype) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == Xs.size(0),
              "pnp_kernels_ext.loss_backward: G must be the (B, B) gradient saved by loss_forward");
  const int64_t n = Xs.size(0);
  // g_p = d out / d per_row[p] times the upstream gradient, in sorted order.
  at::Tensor go = grad_out.to(G.scalar_type());
  at::Tensor g = mean ? go.div(n_valid.clamp_min(1)).expand({n}).contiguous() : go.index_select(0, perm);
  at::Tensor dXs;
  {
    at::Tensor H = call_symmetrize(G, g);  // diag(g) G + (diag(g) G)^T
    dXs = at::mm(H, Xs);
  }
  if (cosine) {
    // Through x / max(||x||, eps): (dXs - y (y . dXs)) / ||x|| where ||x|| > eps, else dXs / eps.
    at::Tensor radial = Xs.mul(dXs).sum(1, /*keepdim=*/true);
    at::Tensor d = denom.unsqueeze(1);
    radial.mul_(d.gt(kNormEps));
    dXs.sub_(Xs.mul(radial)).div_(d);
  }
  at::Tensor dE = at::empty_like(dXs).index_copy_(0, perm, dXs);
  // float16: saturate instead of overflowing to inf in the cast (clamp keeps NaN), as pipeline.unprepare.
  if (out_dtype == at::kHalf) dE.clamp_(-kHalfMax, kHalfMax);
  return dE.to(out_dtype);
}

}  // namespace
}  // namespace pnp_ext

TORCH_LIBRARY_FRAGMENT(pnp_kernels_ext, m) {
  m.def(
      "loss_forward(Tensor E, Tensor labels, int kind, int variant, float anneal, float alpha, float b, "
      "float[] ks, float[] k_temperatures, bool cosine, bool mean, bool compute_grad) -> (Tensor out, "
      "Tensor n_valid, Tensor Xs, Tensor perm, "
      "Tensor lo, Tensor hi, Tensor denom, Tensor G)");
  m.def(
      "loss_backward(Tensor grad_out, Tensor n_valid, Tensor Xs, Tensor perm, Tensor lo, Tensor hi, "
      "Tensor denom, Tensor G, bool cosine, bool mean, ScalarType out_dtype) -> Tensor");
}

// CompositeExplicitAutograd: one implementation for every device (the kernels inside
// dispatch on the device); no autograd formula, the Python autograd.Function owns it.
TORCH_LIBRARY_IMPL(pnp_kernels_ext, CompositeExplicitAutograd, m) {
  m.impl("loss_forward", &pnp_ext::loss_forward);
  m.impl("loss_backward", &pnp_ext::loss_backward);
}
