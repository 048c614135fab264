"""The autograd glue shared by every backend: one forward, one backward.

Forward (in label-sorted order, so that each query's positives are one segment):

    Xs = X[perm];  S = Xs Xs^T (GEMM, float32 or float64 accumulate and output)
    per_row, G = backend.rows_forward(S, lo, hi, ...)      G = d per_row / dS, row-wise

Backward, with g the incoming gradient of the per-query losses:

    H = diag(g) G + (diag(g) G)^T          (S = Xs Xs^T is symmetric in Xs)
    dXs = H Xs;   dX = dXs[inv_perm]

G is computed inside the forward kernel when a gradient is needed (one more pass
over the negatives there, instead of two in a separate backward), and S is freed
before the forward returns, so at most two B x B buffers live at once. Autocast
is switched off inside: similarities are accumulated and kept in full precision.

Two wrappers call the same ``forward_impl``/``backward_impl``:
- ``PNPFunction`` (torch.autograd.Function) in eager mode: the lowest overhead;
- the torch.library custom ops ``pnp_kernels::pnp_rows`` / ``pnp_rows_backward``
  while torch.compile traces, so that compiled graphs hold one opaque op each and
  need no graph break (the torch backend plans its chunks on the host).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .backends import get_backend
from .variants import Variant, variant_by_code

__all__ = ["PNPFunction", "forward_impl", "backward_impl", "pnp_rows", "is_compiling"]


def forward_impl(X, perm, inv_perm, lo, hi, variant: Variant, anneal, alpha, b, backend: str, compute_grad: bool):
    """Per-query losses (original order), and what backward needs: Xs = X[perm] and G."""
    impl = get_backend(backend)
    with torch.autocast(device_type=X.device.type, enabled=False):
        Xs = X.index_select(0, perm)
        S = torch.mm(Xs, Xs.t())
        per_row, G = impl.rows_forward(S, lo, hi, variant, anneal, alpha, b, compute_grad)
        del S
        return per_row.index_select(0, inv_perm), Xs, G


def backward_impl(grad_rows, Xs, G, perm, inv_perm, backend: str):
    """dL/dX from the per-query upstream gradient."""
    impl = get_backend(backend)
    with torch.autocast(device_type=Xs.device.type, enabled=False):
        g_sorted = grad_rows.to(G.dtype).index_select(0, perm)
        H = impl.symmetric_grad(G, g_sorted)
        return torch.mm(H, Xs).index_select(0, inv_perm)


class PNPFunction(torch.autograd.Function):
    """Per-query PNP losses (original order) of float32/float64 embeddings X."""

    @staticmethod
    def forward(ctx, X, perm, inv_perm, lo, hi, variant: Variant, anneal, alpha, b, backend: str, compute_grad: bool):
        per_query, Xs, G = forward_impl(X, perm, inv_perm, lo, hi, variant, anneal, alpha, b, backend, compute_grad)
        ctx.backend = backend
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(Xs, G, perm, inv_perm)
        return per_query

    @staticmethod
    def backward(ctx, grad_rows):
        if not ctx.compute_grad:
            raise RuntimeError(
                "pnp_loss: backward through a forward that was computed without gradient; "
                "call pnp_loss with grad enabled and embeddings that require grad"
            )
        Xs, G, perm, inv_perm = ctx.saved_tensors
        dX = backward_impl(grad_rows, Xs, G, perm, inv_perm, ctx.backend)
        return dX, None, None, None, None, None, None, None, None, None, None


def is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


# ---- torch.library custom ops: the same computation, opaque to torch.compile ----

@torch.library.custom_op("pnp_kernels::pnp_rows", mutates_args=())
def _pnp_rows_op(
    X: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    variant_code: int, anneal: float, alpha: float, b: float, backend: str, compute_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_query, Xs, G = forward_impl(X, perm, inv_perm, lo, hi, variant_by_code(variant_code),
                                    anneal, alpha, b, backend, compute_grad)
    return per_query, Xs, (G if G is not None else X.new_empty(0))


@_pnp_rows_op.register_fake
def _pnp_rows_fake(X, perm, inv_perm, lo, hi, variant_code, anneal, alpha, b, backend, compute_grad):
    n = X.shape[0]
    G = X.new_empty(n, n) if compute_grad else X.new_empty(0)
    return X.new_empty(n), X.new_empty(X.shape), G


@torch.library.custom_op("pnp_kernels::pnp_rows_backward", mutates_args=())
def _pnp_rows_backward_op(
    grad_rows: torch.Tensor, Xs: torch.Tensor, G: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return backward_impl(grad_rows, Xs, G, perm, inv_perm, backend)


@_pnp_rows_backward_op.register_fake
def _pnp_rows_backward_fake(grad_rows, Xs, G, perm, inv_perm, backend):
    return Xs.new_empty(Xs.shape)


def _setup_context(ctx, inputs, output):
    X, perm, inv_perm, lo, hi, variant_code, anneal, alpha, b, backend, compute_grad = inputs
    _, Xs, G = output
    ctx.backend = backend
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(Xs, G, perm, inv_perm)


def _backward(ctx, grad_rows, grad_Xs, grad_G):
    if not ctx.compute_grad:
        raise RuntimeError("pnp_loss: backward through a forward that was computed without gradient")
    Xs, G, perm, inv_perm = ctx.saved_tensors
    dX = _pnp_rows_backward_op(grad_rows.contiguous(), Xs, G, perm, inv_perm, ctx.backend)
    return dX, None, None, None, None, None, None, None, None, None, None


_pnp_rows_op.register_autograd(_backward, setup_context=_setup_context)


def pnp_rows(X, perm, inv_perm, lo, hi, variant: Variant, anneal, alpha, b, backend: str, compute_grad: bool):
    """Per-query losses of X, through the custom op when compiling, else the autograd.Function."""
    if is_compiling():
        return _pnp_rows_op(X, perm, inv_perm, lo, hi, variant.code, anneal, alpha, b, backend, compute_grad)[0]
    return PNPFunction.apply(X, perm, inv_perm, lo, hi, variant, anneal, alpha, b, backend, compute_grad)
