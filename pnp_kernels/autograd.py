"""The autograd glue shared by every backend and both loss kinds.

``SquareLoss`` ranks a batch against itself; ``ReferenceLoss`` ranks queries against
a reference set. Each calls its backend's whole forward (``loss_forward`` /
``reference_forward``) and whole backward; both return ``(output, n_valid)``, the
second a non-differentiable count of valid queries (the distributed mode needs it).
Autocast is off inside: similarities are accumulated and kept in full precision.

Two wrappers call the same backend methods:
- the torch.autograd.Functions, in eager mode: the lowest overhead;
- the torch.library custom ops ``pnp_kernels::square_loss_fwd/bwd`` and
  ``pnp_kernels::reference_loss_fwd/bwd`` while torch.compile traces, so a compiled
  graph holds one opaque op each way and needs no graph break. The ``LossSpec`` is
  flattened to scalars at this boundary only.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from .backends import get_backend
from .spec import LossSpec, ReferencePrep, SquarePrep

__all__ = ["SquareLoss", "ReferenceLoss", "apply_square", "apply_reference", "is_compiling"]

Tensor = torch.Tensor

_NO_GRAD_MSG = (
    "pnp_kernels: backward through a forward that was computed without gradient; "
    "call the loss with grad enabled and embeddings that require grad"
)


def _autocast_off(device_type: str):
    """A context with autocast off; free when autocast is already off (entering
    ``torch.autocast`` costs tens of microseconds of Python, at every step)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        on = True
    return torch.autocast(device_type=device_type, enabled=False) if on else contextlib.nullcontext()


def is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


# ---- eager: torch.autograd.Function ----------------------------------------------------


class SquareLoss(torch.autograd.Function):
    """The loss of embeddings E (any float dtype) ranked against themselves, int64 labels."""

    @staticmethod
    def forward(ctx, E, labels, spec: LossSpec, backend: str, compute_grad: bool):  # type: ignore[override]
        impl = get_backend(backend)
        with _autocast_off(E.device.type):
            out, n_valid, prep, G = impl.loss_forward(E, labels, spec, compute_grad)
        ctx.meta = (spec, backend, E.dtype, compute_grad)
        ctx.mark_non_differentiable(n_valid)
        if compute_grad:
            ctx.save_for_backward(*prep, n_valid, G)
        return out, n_valid

    @staticmethod
    def backward(ctx, grad_out, _grad_n_valid):  # type: ignore[override]
        spec, backend, out_dtype, compute_grad = ctx.meta
        if not compute_grad:
            raise RuntimeError(_NO_GRAD_MSG)
        *prep, n_valid, G = ctx.saved_tensors
        with _autocast_off(G.device.type):
            dE = get_backend(backend).loss_backward(grad_out, SquarePrep(*prep), n_valid, G, spec, out_dtype)
        return dE, None, None, None, None


class ReferenceLoss(torch.autograd.Function):
    """The loss of queries Eq ranked against a reference set Er (``query_ref_index``: the
    query's own copy in Er, -1 for none; None for no copies at all)."""

    @staticmethod
    def forward(
        ctx,
        Eq,
        yq,
        Er,
        yr,
        query_ref_index,
        spec: LossSpec,
        backend: str,
        need_q: bool,  # type: ignore[override]
        need_r: bool,
        r_live: int = -1,
    ):
        impl = get_backend(backend)
        compute_grad = need_q or need_r
        with _autocast_off(Eq.device.type):
            # the reference rows that need a gradient: none without need_r (r_live 0)
            out, n_valid, prep, G = impl.reference_forward(
                Eq, yq, Er, yr, query_ref_index, spec, compute_grad, r_live if need_r else 0
            )
        ctx.meta = (spec, backend, Eq.dtype, Er.dtype, need_q, need_r, r_live)
        ctx.mark_non_differentiable(n_valid)
        if compute_grad:
            ctx.save_for_backward(*prep, n_valid, G)
        return out, n_valid

    @staticmethod
    def backward(ctx, grad_out, _grad_n_valid):  # type: ignore[override]
        spec, backend, q_dtype, r_dtype, need_q, need_r, r_live = ctx.meta
        if not (need_q or need_r):
            raise RuntimeError(_NO_GRAD_MSG)
        *prep, n_valid, G = ctx.saved_tensors
        with _autocast_off(G.device.type):
            dEq, dEr = get_backend(backend).reference_backward(
                grad_out,
                ReferencePrep(*prep),
                n_valid,
                G,
                spec,
                q_dtype,
                r_dtype,
                need_q and ctx.needs_input_grad[0],
                need_r and ctx.needs_input_grad[2],
                r_live,
            )
        return dEq, None, dEr, None, None, None, None, None, None, None


# ---- torch.compile: torch.library custom ops -------------------------------------------


def _empty_like_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _fresh(t: Tensor, inputs) -> Tensor:
    """A custom op's output may not alias an input ("dot" float32 rows are the input itself)."""
    return t.clone() if any(t is x for x in inputs) else t


@torch.library.custom_op("pnp_kernels::square_loss_fwd", mutates_args=())
def _square_fwd(
    E: Tensor,
    labels: Tensor,
    kind: int,
    variant: int,
    anneal: float,
    alpha: float,
    b: float,
    cosine: bool,
    mean: bool,
    ks: List[float],
    k_temperatures: List[float],
    memory_efficient: bool,
    backend: str,
    compute_grad: bool,
) -> List[Tensor]:
    spec = LossSpec.from_flat(kind, variant, anneal, alpha, b, cosine, mean, ks, k_temperatures, memory_efficient)
    with _autocast_off(E.device.type):
        out, n_valid, prep, G = get_backend(backend).loss_forward(E, labels, spec, compute_grad)
    return [out, n_valid, *[_fresh(t, (E, labels)) for t in prep], _empty_like_none(G, out)]


@_square_fwd.register_fake
def _square_fwd_fake(E, labels, kind, variant, anneal, alpha, b, cosine, mean, *rest):
    *_, backend, compute_grad = rest
    n, d = E.shape
    dt = LossSpec.compute_dtype_of(E.dtype)
    new = lambda *shape, dtype=dt: E.new_empty(shape, dtype=dtype)  # noqa: E731
    return [
        new() if mean else new(n),
        new(),
        new(n, d, dtype=get_backend(backend).rows_dtype(E.dtype)),  # Xs: half rows where the backend keeps them
        new(n, dtype=torch.int64),
        new(n, dtype=torch.int32),
        new(n, dtype=torch.int32),
        new(n) if cosine else new(0),
        new(n, n) if compute_grad else new(0),
    ]


@torch.library.custom_op("pnp_kernels::square_loss_bwd", mutates_args=())
def _square_bwd(
    grad_out: Tensor,
    n_valid: Tensor,
    Xs: Tensor,
    perm: Tensor,
    lo: Tensor,
    hi: Tensor,
    denom: Tensor,
    G: Tensor,
    kind: int,
    variant: int,
    anneal: float,
    alpha: float,
    b: float,
    cosine: bool,
    mean: bool,
    ks: List[float],
    k_temperatures: List[float],
    memory_efficient: bool,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    spec = LossSpec.from_flat(kind, variant, anneal, alpha, b, cosine, mean, ks, k_temperatures, memory_efficient)
    with _autocast_off(G.device.type):
        return get_backend(backend).loss_backward(
            grad_out, SquarePrep(Xs, perm, lo, hi, denom), n_valid, G, spec, out_dtype
        )


@_square_bwd.register_fake
def _square_bwd_fake(
    grad_out,
    n_valid,
    Xs,
    perm,
    lo,
    hi,
    denom,
    G,
    kind,
    variant,
    anneal,
    alpha,
    b,
    cosine,
    mean,
    ks,
    k_temperatures,
    memory_efficient,
    out_dtype,
    backend,
):
    return Xs.new_empty(Xs.shape, dtype=out_dtype)


def _no_grads(flat):
    """The backward's None for each flattened spec input, in the structure torch.library
    expects: None for a scalar or a non-empty list of floats (such as ``ks``), and an empty
    list for an empty one (which it reads as a list of tensors)."""
    return [[] if isinstance(v, (list, tuple)) and not v else None for v in flat]


def _square_setup(ctx, inputs, output):
    E, labels, *flat, backend, compute_grad = inputs
    ctx.meta = (tuple(flat), E.dtype, backend, compute_grad)
    ctx.save_for_backward(*output[1:])


def _square_backward(ctx, grads):
    flat, out_dtype, backend, compute_grad = ctx.meta
    if not compute_grad:
        raise RuntimeError(_NO_GRAD_MSG)
    dE = _square_bwd(grads[0].contiguous(), *ctx.saved_tensors, *flat, out_dtype, backend)
    return (dE, None, *_no_grads(flat), None, None)


_square_fwd.register_autograd(_square_backward, setup_context=_square_setup)


@torch.library.custom_op("pnp_kernels::reference_loss_fwd", mutates_args=())
def _reference_fwd(
    Eq: Tensor,
    yq: Tensor,
    Er: Tensor,
    yr: Tensor,
    query_ref_index: Optional[Tensor],
    kind: int,
    variant: int,
    anneal: float,
    alpha: float,
    b: float,
    cosine: bool,
    mean: bool,
    ks: List[float],
    k_temperatures: List[float],
    memory_efficient: bool,
    backend: str,
    compute_grad: bool,
    r_live: int,
) -> List[Tensor]:
    spec = LossSpec.from_flat(kind, variant, anneal, alpha, b, cosine, mean, ks, k_temperatures, memory_efficient)
    with _autocast_off(Eq.device.type):
        out, n_valid, prep, G = get_backend(backend).reference_forward(
            Eq, yq, Er, yr, query_ref_index, spec, compute_grad, r_live
        )
    inputs = (Eq, yq, Er, yr, query_ref_index)
    return [out, n_valid, *[_fresh(t, inputs) for t in prep], _empty_like_none(G, out)]


@_reference_fwd.register_fake
def _reference_fwd_fake(
    Eq,
    yq,
    Er,
    yr,
    query_ref_index,
    kind,
    variant,
    anneal,
    alpha,
    b,
    cosine,
    mean,
    ks,
    k_temperatures,
    memory_efficient,
    backend,
    compute_grad,
    r_live,
):
    q, d = Eq.shape
    m = Er.shape[0]
    dt = LossSpec.compute_dtype_of(Eq.dtype)
    rows_dt = get_backend(backend).rows_dtype(Eq.dtype, Er.dtype)  # Xq, Xr: half where the backend keeps them
    new = lambda *shape, dtype=dt: Eq.new_empty(shape, dtype=dtype)  # noqa: E731
    return [
        new() if mean else new(q),
        new(),
        new(q, d, dtype=rows_dt),
        new(q) if cosine else new(0),
        new(m, d, dtype=rows_dt),
        new(m, dtype=torch.int64),
        new(m) if cosine else new(0),
        new(q, dtype=torch.int32),
        new(q, dtype=torch.int32),
        new(q, dtype=torch.int32),
        new(q, m) if compute_grad else new(0),
    ]


@torch.library.custom_op("pnp_kernels::reference_loss_bwd", mutates_args=())
def _reference_bwd(
    grad_out: Tensor,
    n_valid: Tensor,
    Xq: Tensor,
    denom_q: Tensor,
    Xr: Tensor,
    perm_r: Tensor,
    denom_r: Tensor,
    lo: Tensor,
    hi: Tensor,
    own: Tensor,
    G: Tensor,
    kind: int,
    variant: int,
    anneal: float,
    alpha: float,
    b: float,
    cosine: bool,
    mean: bool,
    ks: List[float],
    k_temperatures: List[float],
    memory_efficient: bool,
    q_dtype: torch.dtype,
    r_dtype: torch.dtype,
    backend: str,
    need_q: bool,
    need_r: bool,
    r_live: int,
) -> List[Tensor]:
    spec = LossSpec.from_flat(kind, variant, anneal, alpha, b, cosine, mean, ks, k_temperatures, memory_efficient)
    prep = ReferencePrep(Xq, denom_q, Xr, perm_r, denom_r, lo, hi, own)
    with _autocast_off(G.device.type):
        dEq, dEr = get_backend(backend).reference_backward(
            grad_out, prep, n_valid, G, spec, q_dtype, r_dtype, need_q, need_r, r_live
        )
    return [_empty_like_none(dEq, Xq), _empty_like_none(dEr, Xr)]


@_reference_bwd.register_fake
def _reference_bwd_fake(
    grad_out,
    n_valid,
    Xq,
    denom_q,
    Xr,
    perm_r,
    denom_r,
    lo,
    hi,
    own,
    G,
    kind,
    variant,
    anneal,
    alpha,
    b,
    cosine,
    mean,
    ks,
    k_temperatures,
    memory_efficient,
    q_dtype,
    r_dtype,
    backend,
    need_q,
    need_r,
    r_live,
):
    return [
        Xq.new_empty(Xq.shape if need_q else (0,), dtype=q_dtype),
        Xr.new_empty(Xr.shape if need_r else (0,), dtype=r_dtype),
    ]


def _reference_setup(ctx, inputs, output):
    Eq, yq, Er, yr, qri, *flat, backend, compute_grad, r_live = inputs
    ctx.meta = (tuple(flat), Eq.dtype, Er.dtype, backend, compute_grad, r_live)
    ctx.save_for_backward(*output[1:])


def _reference_backward(ctx, grads):
    flat, q_dtype, r_dtype, backend, compute_grad, r_live = ctx.meta
    if not compute_grad:
        raise RuntimeError(_NO_GRAD_MSG)
    need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dEq, dEr = _reference_bwd(
        grads[0].contiguous(), *ctx.saved_tensors, *flat, q_dtype, r_dtype, backend, need_q, need_r, r_live
    )
    return (dEq if need_q else None, None, dEr if need_r else None, None, None, *_no_grads(flat), None, None, None)


_reference_fwd.register_autograd(_reference_backward, setup_context=_reference_setup)


# ---- entry points -------------------------------------------------------------------------


@torch.compiler.disable
def _square_eager(E, labels, spec, backend, compute_grad):
    return SquareLoss.apply(E, labels, spec, backend, compute_grad)


@torch.compiler.disable
def _reference_eager(Eq, yq, Er, yr, query_ref_index, spec, backend, need_q, need_r, r_live):
    return ReferenceLoss.apply(Eq, yq, Er, yr, query_ref_index, spec, backend, need_q, need_r, r_live)


def apply_square(E: Tensor, labels: Tensor, spec: LossSpec, backend: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """(output, n_valid), through the custom op when compiling, else the autograd.Function.

    ``memory_efficient=None`` is decided here, from the problem size. The memory-efficient
    path keeps data-dependent state (per positive lane), so a compiled graph calls it
    eagerly (a graph break) instead of through the custom op."""
    spec = spec.resolved(E.shape[0], E.shape[0])
    if is_compiling():
        if spec.memory_efficient:
            return _square_eager(E, labels, spec, backend, compute_grad)
        res = _square_fwd(E, labels, *spec.flat(), backend, compute_grad)
        return res[0], res[1]
    return SquareLoss.apply(E, labels, spec, backend, compute_grad)


def apply_reference(
    Eq: Tensor,
    yq: Tensor,
    Er: Tensor,
    yr: Tensor,
    query_ref_index: Optional[Tensor],
    spec: LossSpec,
    backend: str,
    need_q: bool,
    need_r: bool,
    r_live: int = -1,
) -> Tuple[Tensor, Tensor]:
    """(output, n_valid) of queries ranked against a reference set (see :func:`apply_square`).

    ``r_live`` >= 0: only the first ``r_live`` rows of Er need a gradient (a live batch
    ahead of a detached memory); the backward computes dEr for those rows only."""
    spec = spec.resolved(Eq.shape[0], Er.shape[0])
    if is_compiling():
        if spec.memory_efficient:
            return _reference_eager(Eq, yq, Er, yr, query_ref_index, spec, backend, need_q, need_r, r_live)
        res = _reference_fwd(Eq, yq, Er, yr, query_ref_index, *spec.flat(), backend, need_q or need_r, r_live)
        return res[0], res[1]
    return ReferenceLoss.apply(Eq, yq, Er, yr, query_ref_index, spec, backend, need_q, need_r, r_live)
