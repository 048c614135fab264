"""The autograd glue shared by every backend: one forward, one backward.

Forward, in label-sorted order so that each query's positives are one segment:

    prep = prepare(E, labels)        sort, segments [lo, hi), Xs = normalise(E[perm])
    S = Xs Xs^T                      GEMM, float32 (float64 for float64 input)
    per_row, G = rows_forward(S, lo, hi, ...)       G[p, :] = d per_row[p] / d S[p, :]
    out = finalize(per_row)          "mean" scalar or "none" vector

Backward, with g_p = d out / d per_row[p] times the upstream gradient:

    H = diag(g) G + (diag(g) G)^T    (S = Xs Xs^T is symmetric in Xs)
    dXs = H Xs;  dE = unprepare(dXs) back through the normalisation and the sort

G is computed inside the forward kernel when a gradient is needed (one more pass
over the negatives there instead of two in a separate backward), and S is freed
before the forward returns, so at most two B x B buffers live at once. Each
stage is the backend's own when it has one (the Triton backend fuses them into
single kernels), else the PyTorch version in ``pipeline.py``; a backend with
``loss_forward``/``loss_backward`` (ext: the pipeline in C++) does a whole direction
in one call. Autocast is off
inside: similarities are accumulated and kept in full precision.

Two wrappers call the same ``forward_impl``/``backward_impl``:
- ``PNPFunction`` (torch.autograd.Function) in eager mode: the lowest overhead;
- the torch.library custom ops ``pnp_kernels::pnp_loss_fwd`` / ``pnp_loss_bwd``
  while torch.compile traces, so a compiled graph holds one opaque op each way and
  needs no graph break (the torch backend plans its chunks on the host).
"""
from __future__ import annotations

import contextlib
from typing import List

import torch

from . import pipeline
from .backends import get_backend
from .variants import Variant, variant_by_code

__all__ = ["PNPFunction", "forward_impl", "backward_impl", "pnp_apply", "is_compiling"]


def _autocast_off(device_type: str):
    """A context with autocast off; free when autocast is already off (entering
    ``torch.autocast`` costs tens of microseconds of Python, at every step)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        on = True
    return torch.autocast(device_type=device_type, enabled=False) if on else contextlib.nullcontext()


def _stage(impl, name):
    return getattr(impl, name, None) or getattr(pipeline, name)


def forward_impl(E, labels, variant: Variant, anneal, alpha, b, cosine: bool, mean: bool, backend: str,
                 compute_grad: bool):
    """Returns (output, prep, n_valid, G); prep/n_valid/G are what backward needs."""
    impl = get_backend(backend)
    with _autocast_off(E.device.type):
        fused = getattr(impl, "loss_forward", None)
        if fused is not None:  # the whole pipeline in one backend call
            return fused(E, labels, variant, anneal, alpha, b, cosine, mean, compute_grad)
        compute_dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
        prep = _stage(impl, "prepare")(E, labels, cosine, compute_dtype)
        S = torch.mm(prep.Xs, prep.Xs.t())
        per_row, G = impl.rows_forward(S, prep.lo, prep.hi, variant, anneal, alpha, b, compute_grad)
        del S
        out, n_valid = _stage(impl, "finalize")(per_row, prep, mean)
    return out, prep, n_valid, G


def backward_impl(grad_out, prep, n_valid, G, cosine: bool, mean: bool, out_dtype, backend: str):
    """dL/dE from the upstream gradient of the output."""
    impl = get_backend(backend)
    with _autocast_off(G.device.type):
        fused = getattr(impl, "loss_backward", None)
        if fused is not None:
            return fused(grad_out, prep, n_valid, G, cosine, mean, out_dtype)
        H = _stage(impl, "symmetric_grad_from")(impl, G, grad_out, prep, n_valid, mean)
        dXs = torch.mm(H, prep.Xs)
        del H
        return _stage(impl, "unprepare")(dXs, prep, cosine, out_dtype)


_NO_GRAD_MSG = ("pnp_loss: backward through a forward that was computed without gradient; "
                "call pnp_loss with grad enabled and embeddings that require grad")


class PNPFunction(torch.autograd.Function):
    """The PNP loss of embeddings E (any float dtype) given int64 labels."""

    @staticmethod
    def forward(ctx, E, labels, variant: Variant, anneal, alpha, b, cosine, mean, backend, compute_grad):
        out, prep, n_valid, G = forward_impl(E, labels, variant, anneal, alpha, b, cosine, mean, backend,
                                             compute_grad)
        ctx.meta = (cosine, mean, E.dtype, backend, compute_grad)
        if compute_grad:
            ctx.save_for_backward(*prep, n_valid, G)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cosine, mean, out_dtype, backend, compute_grad = ctx.meta
        if not compute_grad:
            raise RuntimeError(_NO_GRAD_MSG)
        *prep, n_valid, G = ctx.saved_tensors
        dE = backward_impl(grad_out, pipeline.Prep(*prep), n_valid, G, cosine, mean, out_dtype, backend)
        return dE, None, None, None, None, None, None, None, None, None


def is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


# ---- torch.library custom ops: the same computation, opaque to torch.compile ----

@torch.library.custom_op("pnp_kernels::pnp_loss_fwd", mutates_args=())
def _fwd_op(E: torch.Tensor, labels: torch.Tensor, variant_code: int, anneal: float, alpha: float, b: float,
            cosine: bool, mean: bool, backend: str, compute_grad: bool) -> List[torch.Tensor]:
    out, prep, n_valid, G = forward_impl(E, labels, variant_by_code(variant_code), anneal, alpha, b, cosine, mean,
                                         backend, compute_grad)
    return [out, *prep, n_valid, G if G is not None else prep.Xs.new_empty(0)]


@_fwd_op.register_fake
def _fwd_fake(E, labels, variant_code, anneal, alpha, b, cosine, mean, backend, compute_grad):
    n = E.shape[0]
    dt = torch.float64 if E.dtype == torch.float64 else torch.float32
    new = lambda *shape, dtype=dt: E.new_empty(shape, dtype=dtype)  # noqa: E731
    return [new() if mean else new(n), new(*E.shape), new(n, dtype=torch.int64), new(n, dtype=torch.int32),
            new(n, dtype=torch.int32), new(n) if cosine else new(0), new(), new(n, n) if compute_grad else new(0)]


@torch.library.custom_op("pnp_kernels::pnp_loss_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, Xs: torch.Tensor, perm: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            denom: torch.Tensor, n_valid: torch.Tensor, G: torch.Tensor, cosine: bool, mean: bool,
            out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    prep = pipeline.Prep(Xs, perm, lo, hi, denom)
    return backward_impl(grad_out, prep, n_valid, G, cosine, mean, out_dtype, backend)


@_bwd_op.register_fake
def _bwd_fake(grad_out, Xs, perm, lo, hi, denom, n_valid, G, cosine, mean, out_dtype, backend):
    return Xs.new_empty(Xs.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    E, labels, variant_code, anneal, alpha, b, cosine, mean, backend, compute_grad = inputs
    ctx.meta = (cosine, mean, E.dtype, backend, compute_grad)
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grads):
    cosine, mean, out_dtype, backend, compute_grad = ctx.meta
    if not compute_grad:
        raise RuntimeError(_NO_GRAD_MSG)
    dE = _bwd_op(grads[0].contiguous(), *ctx.saved_tensors, cosine, mean, out_dtype, backend)
    return dE, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def pnp_apply(E, labels, variant: Variant, anneal, alpha, b, cosine: bool, mean: bool, backend: str,
              compute_grad: bool):
    """The loss, through the custom op when compiling, else the autograd.Function."""
    if is_compiling():
        return _fwd_op(E, labels, variant.code, anneal, alpha, b, cosine, mean, backend, compute_grad)[0]
    return PNPFunction.apply(E, labels, variant, anneal, alpha, b, cosine, mean, backend, compute_grad)
