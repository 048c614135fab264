"""The one ``torch.autograd.Function`` that every backend plugs into.

Forward (in label-sorted order, so that each query's positives are one segment):

    Xs = X[perm];  S = Xs Xs^T (GEMM, float32 or float64 accumulate and output)
    per_row, G = backend.rows_forward(S, lo, hi, ...)      G = d per_row / dS, row-wise

Backward, with g the incoming gradient of the per-query losses:

    H = diag(g) G + (diag(g) G)^T          (S = Xs Xs^T is symmetric in Xs)
    dXs = H Xs;   dX = dXs[inv_perm]

G is computed inside the forward kernel when a gradient is needed (it costs one
more pass over the negatives there instead of two in a separate backward), and S
is freed before the forward returns, so at most two B x B buffers live at once.
Autocast is switched off inside: similarities are always accumulated and kept
in full precision.
"""
from __future__ import annotations

import torch

from .backends import get_backend
from .variants import Variant

__all__ = ["PNPFunction"]


class PNPFunction(torch.autograd.Function):
    """Per-query PNP losses (original order) of float32/float64 embeddings X."""

    @staticmethod
    def forward(ctx, X, perm, inv_perm, lo, hi, variant: Variant, anneal, alpha, b, backend: str, compute_grad: bool):
        impl = get_backend(backend)
        with torch.autocast(device_type=X.device.type, enabled=False):
            Xs = X.index_select(0, perm)
            S = torch.mm(Xs, Xs.t())
            per_row, G = impl.rows_forward(S, lo, hi, variant, anneal, alpha, b, compute_grad)
            del S
        ctx.backend = backend
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(Xs, G, perm, inv_perm)
        return per_row.index_select(0, inv_perm)

    @staticmethod
    def backward(ctx, grad_rows):
        if not ctx.compute_grad:
            raise RuntimeError(
                "pnp_loss: backward through a forward that was computed without gradient; "
                "call pnp_loss with grad enabled and embeddings that require grad"
            )
        Xs, G, perm, inv_perm = ctx.saved_tensors
        impl = get_backend(ctx.backend)
        with torch.autocast(device_type=Xs.device.type, enabled=False):
            g_sorted = grad_rows.to(G.dtype).index_select(0, perm)
            H = impl.symmetric_grad(G, g_sorted)
            dXs = torch.mm(H, Xs)
            dX = dXs.index_select(0, inv_perm)
        return dX, None, None, None, None, None, None, None, None, None, None
