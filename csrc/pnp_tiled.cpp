// Memory-efficient ops of the pnp_kernels extension: the row losses of S = Xq Xr^T, and the
// gradients through them, without ever holding a Q x M buffer (S or G = d loss / d S).
//
//   tiled_rows(Tensor Xq, Tensor Xr, Tensor lo, Tensor hi, Tensor own, Tensor? r_rows, int kind,
//              int variant, float anneal, float alpha, float b, float[] ks, float[] k_temperatures,
//              bool compute_grad, int block_rows) -> (Tensor loss, Tensor grad)
//       loss: (Q,), as row_losses_and_dS on S = Xq Xr^T. grad, when compute_grad: the
//       gradient with unit row weights, (Q + M, D) = [G Xr ; G^T Xq] (rows 0 .. Q-1: d/dXq,
//       rows Q .. Q+M-1: d/dXr), or with r_rows (int64 (r,), distinct rows of Xr) (Q + r, D) =
//       [G Xr ; (G^T Xq)[r_rows]], only those columns of G entering the product; else a (0,)
//       tensor. A loss whose row weights g are all equal (reduction "mean") has dXq = g grad[:Q]
//       and dXr = g grad[Q:], so its backward needs no second pass over S.
//
//   tiled_grads(Tensor Xq, Tensor Xr, Tensor lo, Tensor hi, Tensor own, Tensor g, Tensor? r_rows,
//               int kind, int variant, float anneal, float alpha, float b, float[] ks,
//               float[] k_temperatures, bool need_q, bool need_r, int block_rows)
//       -> (Tensor dXq, Tensor dXr)
//       dXq = diag(g) G Xr (Q, D) if need_q, dXr = G^T diag(g) Xq (M, D) if need_r (else (0,)
//       tensors), for any row weights g (Q,). r_rows (int64 (r,), optional): the distinct
//       reference rows whose dXr is needed; only those columns of G enter the dXr products
//       (the other rows of dXr are 0), on the CPU and on CUDA alike.
//
//   Xq (Q, D) and Xr (M, D): float32 or float64, same dtype and device; lo, hi, own: int32
//   (Q,), as in row_losses_and_dS (pnp_common.h); block_rows: rows per strip, 0 = automatic.
//
// Algorithm. The queries are taken in strips of m consecutive rows. For each strip:
//
//   S_blk = Xq_blk Xr^T                     (m x M, a GEMM into one reused buffer)
//   loss_blk, G_blk = row_losses_and_dS(S_blk, lo_blk, hi_blk, own_blk)
//   dXq_blk  = g_blk * (G_blk Xr)           (GEMM)
//   dXr     += G_blk^T (g_blk * Xq_blk)     (GEMM, accumulated strip after strip)
//
// The row stage is the dense path's row kernel itself (called through the dispatcher: the
// CPU kernel of pnp_cpu.cpp or the CUDA kernel of pnp_cuda.cu, both built on the per-row
// math of pnp_common.h), so the two paths share every line of per-row math; a strip row
// holds all M columns, so the kernel sees the same row as on the dense path.
//
// The strip height m is the largest that keeps one strip under kStripElems elements
// (2^22 on the CPU: 16 MiB in float32; 2^26 on CUDA), at least kMinRows rows (so that
// the GEMMs stay efficient against a very long reference set), and at most ceil(Q / 16)
// rows, so that no buffer is ever more than a sixteenth of Q x M (for Q >= 16).
//
// CPU: the strips are split into W = min(threads, strips) contiguous runs, one per thread,
// in one parallel region (sweep below). Memory: per run, S_blk and G_blk (2 m M elements);
// W - 1 accumulators of dXr (M x D); the outputs, O((Q + M) D). CUDA: the strips in order
// on the current stream, each op using the whole device; memory 2 m M elements.
//
// Work: a forward with compute_grad does one pass over S (GEMM, row kernel with sigma',
// two gradient GEMMs): 3 GEMMs of Q M D multiply-adds and one row pass, against the dense
// path's 2 GEMMs, one row pass and the symmetrisation of two Q x M buffers. tiled_grads
// (unequal row weights: reduction "none") recomputes the strips: one more GEMM and row
// pass (the forward then skips sigma' and the gradient GEMMs).
//
// Deterministic: strips in a fixed order, each a fixed sequence of ATen ops (GEMMs of
// fixed shapes and the deterministic row kernel), dXr summed in a fixed order; no atomics.
// On the CPU the result is bitwise the same from run to run for a given number of threads
// (W sets the order of the dXr sum). Sync-free on CUDA: nothing reads a device value on the
// host (the loop bounds are shapes). The segment checks (an error on the CPU) are done on
// the host for CPU tensors only; on CUDA the row kernel gives a bad row a NaN loss and
// gradient.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "pnp_common.h"

namespace pnp_ext {
namespace {

constexpr int64_t kStripElemsCpu = int64_t(1) << 22;
constexpr int64_t kStripElemsCuda = int64_t(1) << 26;
constexpr int64_t kMinRows = 32;

using RowsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, int64_t, double, double, double,
                                                  at::ArrayRef<double>, at::ArrayRef<double>, bool);

// The options of the row stage, passed through to row_losses_and_dS.
struct RowSpec {
  int64_t kind, variant;
  double anneal, alpha, b;
  at::ArrayRef<double> ks, k_temperatures;
};

std::tuple<at::Tensor, at::Tensor> call_rows(const at::Tensor& S, const at::Tensor& lo, const at::Tensor& hi,
                                             const at::Tensor& own, const RowSpec& s, bool compute_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pnp_kernels_ext::row_losses_and_dS", "").typed<RowsFn>();
  return op.call(S, lo, hi, own, s.kind, s.variant, s.anneal, s.alpha, s.b, s.ks, s.k_temperatures, compute_grad);
}

int64_t strip_rows(int64_t Q, int64_t M, int64_t requested, bool cuda) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, Q));
  const int64_t budget = cuda ? kStripElemsCuda : kStripElemsCpu;
  const int64_t m = std::max(kMinRows, budget / std::max<int64_t>(M, 1));
  return std::max<int64_t>(1, std::min(m, (Q + 15) / 16));
}

void check_inputs(const char* op, const at::Tensor& Xq, const at::Tensor& Xr, const at::Tensor& lo,
                  const at::Tensor& hi, const at::Tensor& own, const RowSpec& s, int64_t block_rows) {
  TORCH_CHECK(Xq.dim() == 2 && Xr.dim() == 2, op, ": Xq and Xr must be 2-D, got ", Xq.dim(), "-D and ", Xr.dim(),
              "-D");
  TORCH_CHECK(Xq.scalar_type() == at::kFloat || Xq.scalar_type() == at::kDouble, op,
              ": Xq must be float32 or float64, got ", Xq.scalar_type());
  TORCH_CHECK(Xr.scalar_type() == Xq.scalar_type(), op, ": Xr must have Xq's dtype ", Xq.scalar_type(), ", got ",
              Xr.scalar_type());
  TORCH_CHECK(Xr.device() == Xq.device(), op, ": Xr must be on Xq's device");
  TORCH_CHECK(Xr.size(1) == Xq.size(1), op, ": Xq and Xr must have the same number of columns, got ", Xq.size(1),
              " and ", Xr.size(1));
  const int64_t Q = Xq.size(0);
  auto check_index = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == Q && t.is_contiguous(), op, ": ", name,
                " must be a contiguous int32 vector with one entry per row of Xq");
    TORCH_CHECK(t.device() == Xq.device(), op, ": ", name, " must be on Xq's device");
  };
  check_index(lo, "lo");
  check_index(hi, "hi");
  check_index(own, "own");
  TORCH_CHECK(s.kind >= 0 && s.kind < kLossKindCount, op, ": loss kind must be 0..", kLossKindCount - 1, ", got ",
              s.kind);
  TORCH_CHECK(s.variant >= 0 && s.variant < kVariantCount, op, ": variant code must be 0..", kVariantCount - 1,
              ", got ", s.variant);
  TORCH_CHECK(s.anneal > 0, op, ": anneal must be > 0, got ", s.anneal);
  TORCH_CHECK(block_rows >= 0, op, ": block_rows must be >= 0 (0: automatic), got ", block_rows);
  check_recall_params(op, s.kind, std::vector<double>(s.ks.begin(), s.ks.end()),
                      std::vector<double>(s.k_temperatures.begin(), s.k_temperatures.end()));
  if (!Xq.is_cpu()) return;  // on CUDA a bad row gets NaN from the row kernel (a host check would synchronise)
  const int64_t M = Xr.size(0);
  const int32_t* lo_p = lo.data_ptr<int32_t>();
  const int32_t* hi_p = hi.data_ptr<int32_t>();
  const int32_t* own_p = own.data_ptr<int32_t>();
  for (int64_t p = 0; p < Q; ++p) {
    TORCH_CHECK(hi_p[p] - lo_p[p] < 1 || (lo_p[p] >= 0 && hi_p[p] <= M), op, ": the positive segment [", lo_p[p],
                ", ", hi_p[p], ") of row ", p, " is out of range for ", M, " reference rows");
    TORCH_CHECK(s.kind != kLoss_recall_at_k || (own_p[p] >= -1 && own_p[p] < M), op, ": own column ", own_p[p],
                " of row ", p, " is out of range for ", M, " reference rows (-1: none)");
  }
}

// The strips [b0, b1) (in units of m rows) in order: loss, dXq rows and the dXr accumulator
// acc as in sweep; S: this worker's m x M buffer.
void strips(const at::Tensor& Xq, const at::Tensor& Xr, const at::Tensor& lo, const at::Tensor& hi,
            const at::Tensor& own, const RowSpec& s, const at::Tensor& g, const at::Tensor& cols, const at::Tensor& loss,
            const at::Tensor& dXq, const at::Tensor& acc, int64_t m, int64_t b0, int64_t b1, at::Tensor& S) {
  const int64_t Q = Xq.size(0);
  const bool grad = dXq.defined() || acc.defined();
  const at::Tensor XrT = Xr.t();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * m, n = std::min(m, Q - r0);
    at::Tensor Sb = S.narrow(0, 0, n);
    const at::Tensor xb = Xq.narrow(0, r0, n);
    at::mm_out(Sb, xb, XrT);
    auto [lb, Gb] = call_rows(Sb, lo.narrow(0, r0, n), hi.narrow(0, r0, n), own.narrow(0, r0, n), s, grad);
    if (loss.defined()) loss.narrow(0, r0, n).copy_(lb);
    if (!grad) continue;
    const at::Tensor gb = g.defined() ? g.narrow(0, r0, n).unsqueeze(1) : at::Tensor();
    if (dXq.defined()) {
      at::Tensor out = dXq.narrow(0, r0, n);
      at::mm_out(out, Gb, Xr);
      if (gb.defined()) out.mul_(gb);  // the product is scaled, never G itself
    }
    if (acc.defined()) {
      const at::Tensor xw = gb.defined() ? xb.mul(gb) : xb;
      acc.addmm_((cols.defined() ? Gb.index_select(1, cols) : Gb).t(), xw);
    }
  }
}

// One sweep over the strips. loss (Q,), dXq (Q, D) and dXr (M, D, or (|cols|, D) when cols
// is given: the rows cols of dXr) are written when defined; g (Q,) weights the rows (undefined:
// all 1). dXq's rows are overwritten, dXr accumulates onto what it holds.
//
// CPU: the strips are split into W contiguous runs, W = min(threads, strips), one per task
// of a single at::parallel_for (the GEMMs and the row kernel inside run single-threaded
// there: one parallel region for the whole sweep). Run 0 accumulates into dXr, run w > 0
// into its own M x D buffer, and the buffers are added to dXr in the order w = 1 .. W-1:
// the result is bitwise the same from run to run (for a given number of threads).
// CUDA: the strips in order on the current stream, each op using the whole device.
void sweep(const at::Tensor& Xq, const at::Tensor& Xr, const at::Tensor& lo, const at::Tensor& hi,
           const at::Tensor& own, const RowSpec& s, const at::Tensor& g, const at::Tensor& cols, const at::Tensor& loss,
           const at::Tensor& dXq, const at::Tensor& dXr, int64_t block_rows) {
  const int64_t Q = Xq.size(0), M = Xr.size(0);
  if (Q == 0) return;
  const bool cuda = !Xq.is_cpu();
  const int64_t m = strip_rows(Q, M, block_rows, cuda);
  const int64_t n_strips = (Q + m - 1) / m;
  const int64_t W = cuda ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_strips));
  if (W == 1) {
    at::Tensor S = at::empty({std::min(m, Q), M}, Xq.options());
    strips(Xq, Xr, lo, hi, own, s, g, cols, loss, dXq, dXr, m, 0, n_strips, S);
    return;
  }
  std::vector<at::Tensor> acc(W);
  std::vector<at::Tensor> S(W);
  for (int64_t w = 0; w < W; ++w) {  // the buffers of every run, allocated up front
    S[w] = at::empty({m, M}, Xq.options());
    if (dXr.defined()) acc[w] = w == 0 ? dXr : at::zeros_like(dXr);
  }
  at::parallel_for(0, W, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      strips(Xq, Xr, lo, hi, own, s, g, cols, loss, dXq, acc[w], m, w * n_strips / W, (w + 1) * n_strips / W, S[w]);
  });
  for (int64_t w = 1; w < W && dXr.defined(); ++w) dXr.add_(acc[w]);
}

// The reference rows r_rows (optional) whose dXr is needed, as the columns of G that enter the
// dXr product (their count is a shape: selecting them needs no sync); undefined: every row.
at::Tensor checked_cols(const char* op, const std::optional<at::Tensor>& r_rows, const at::Tensor& Xq, int64_t M) {
  if (!r_rows.has_value() || !r_rows->defined()) return at::Tensor();
  at::Tensor cols = *r_rows;
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong && cols.device() == Xq.device(), op,
              ": r_rows must be an int64 vector of distinct row indices of Xr on Xq's device");
  if (!cols.is_cpu()) return cols;  // on CUDA the check below would synchronise
  cols = cols.contiguous();
  const int64_t* c = cols.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(M), false);
  for (int64_t i = 0; i < cols.numel(); ++i) {
    TORCH_CHECK(c[i] >= 0 && c[i] < M, op, ": r_rows must hold row indices of Xr in 0..", M - 1, ", got ", c[i]);
    TORCH_CHECK(!seen[c[i]], op, ": r_rows must hold distinct row indices, ", c[i], " repeats");
    seen[c[i]] = true;
  }
  return cols;
}

RowSpec make_spec(int64_t kind, int64_t variant, double anneal, double alpha, double b, at::ArrayRef<double> ks,
                  at::ArrayRef<double> k_temperatures) {
  return RowSpec{kind, variant, anneal, alpha, b, ks, k_temperatures};
}

std::tuple<at::Tensor, at::Tensor> tiled_rows(const at::Tensor& Xq_, const at::Tensor& Xr_, const at::Tensor& lo,
                                              const at::Tensor& hi, const at::Tensor& own,
                                              const std::optional<at::Tensor>& r_rows, int64_t kind,
                                              int64_t variant, double anneal, double alpha, double b,
                                              at::ArrayRef<double> ks, at::ArrayRef<double> k_temperatures,
                                              bool compute_grad, int64_t block_rows) {
  const char* op = "pnp_kernels_ext.tiled_rows";
  const RowSpec s = make_spec(kind, variant, anneal, alpha, b, ks, k_temperatures);
  check_inputs(op, Xq_, Xr_, lo, hi, own, s, block_rows);
  const at::Tensor Xq = Xq_.contiguous(), Xr = Xr_.contiguous();
  const int64_t Q = Xq.size(0), M = Xr.size(0), D = Xq.size(1);
  const at::Tensor cols = compute_grad ? checked_cols(op, r_rows, Xq, M) : at::Tensor();
  const int64_t n_r = cols.defined() ? cols.size(0) : M;
  at::Tensor loss = at::empty({Q}, Xq.options());
  at::Tensor grad = at::empty({compute_grad ? Q + n_r : 0, D}, Xq.options());
  at::Tensor dXq, dXr;
  if (compute_grad) {
    dXq = grad.narrow(0, 0, Q);
    dXr = grad.narrow(0, Q, n_r).zero_();
  } else {
    grad = at::empty({0}, Xq.options());
  }
  sweep(Xq, Xr, lo, hi, own, s, at::Tensor(), cols, loss, dXq, dXr, block_rows);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> tiled_grads(const at::Tensor& Xq_, const at::Tensor& Xr_, const at::Tensor& lo,
                                               const at::Tensor& hi, const at::Tensor& own, const at::Tensor& g,
                                               const std::optional<at::Tensor>& r_rows, int64_t kind,
                                               int64_t variant, double anneal, double alpha, double b,
                                               at::ArrayRef<double> ks, at::ArrayRef<double> k_temperatures,
                                               bool need_q, bool need_r, int64_t block_rows) {
  const char* op = "pnp_kernels_ext.tiled_grads";
  const RowSpec s = make_spec(kind, variant, anneal, alpha, b, ks, k_temperatures);
  check_inputs(op, Xq_, Xr_, lo, hi, own, s, block_rows);
  const at::Tensor Xq = Xq_.contiguous(), Xr = Xr_.contiguous();
  const int64_t Q = Xq.size(0), M = Xr.size(0), D = Xq.size(1);
  TORCH_CHECK(g.dim() == 1 && g.size(0) == Q && g.scalar_type() == Xq.scalar_type() && g.device() == Xq.device(), op,
              ": g must be a vector of Xq's dtype and device with one entry per row of Xq");
  const at::Tensor empty = at::empty({0}, Xq.options());
  at::Tensor dXq = need_q ? at::empty({Q, D}, Xq.options()) : empty;
  at::Tensor dXr = need_r ? at::zeros({M, D}, Xq.options()) : empty;
  if (!need_q && !need_r) return {dXq, dXr};
  const at::Tensor cols = need_r ? checked_cols(op, r_rows, Xq, M) : at::Tensor();
  const at::Tensor acc = !need_r ? at::Tensor() : cols.defined() ? at::zeros({cols.size(0), D}, Xq.options()) : dXr;
  sweep(Xq, Xr, lo, hi, own, s, g.contiguous(), cols, at::Tensor(), need_q ? dXq : at::Tensor(), acc, block_rows);
  if (cols.defined()) dXr.index_copy_(0, cols, acc);
  return {dXq, dXr};
}

}  // namespace
}  // namespace pnp_ext

TORCH_LIBRARY_FRAGMENT(pnp_kernels_ext, m) {
  m.def(
      "tiled_rows(Tensor Xq, Tensor Xr, Tensor lo, Tensor hi, Tensor own, Tensor? r_rows, int kind, int variant, "
      "float anneal, float alpha, float b, float[] ks, float[] k_temperatures, bool compute_grad, int block_rows) "
      "-> (Tensor loss, Tensor grad)");
  m.def(
      "tiled_grads(Tensor Xq, Tensor Xr, Tensor lo, Tensor hi, Tensor own, Tensor g, Tensor? r_rows, int kind, "
      "int variant, float anneal, float alpha, float b, float[] ks, float[] k_temperatures, bool need_q, "
      "bool need_r, int block_rows) -> (Tensor dXq, Tensor dXr)");
}

// CompositeExplicitAutograd: one implementation for CPU and CUDA tensors (the GEMMs and the
// row kernel inside dispatch on the device); the Python side owns the autograd formula.
TORCH_LIBRARY_IMPL(pnp_kernels_ext, CompositeExplicitAutograd, m) {
  m.impl("tiled_rows", &pnp_ext::tiled_rows);
  m.impl("tiled_grads", &pnp_ext::tiled_grads);
}
