"""``pnp_loss``: input validation, label grouping, backend choice and reduction.

Validation only looks at shapes, dtypes and Python scalars, so it never
synchronises with the GPU, and every error is raised before any kernel runs.
"""
from __future__ import annotations

import math
import numbers

import torch

from .autograd import pnp_apply
from .backends import BACKEND_NAMES, resolve_backend
from .variants import resolve_variant

__all__ = ["pnp_loss", "SIMILARITIES", "REDUCTIONS"]

SIMILARITIES = ("cosine", "dot")
REDUCTIONS = ("mean", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name}: expected a positive real number, got {type(value).__name__}")
    # Comparisons only (no math.isfinite), so symbolic floats under torch.compile(dynamic=True) pass.
    if not (value > 0) or value == math.inf:  # `not (x > 0)` also rejects NaN
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")
    return float(value)


def check_options(similarity, reduction, backend) -> None:
    """Raise ValueError naming the option when similarity/reduction/backend is unknown."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: unknown value {similarity!r}; valid values are {', '.join(SIMILARITIES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown value {reduction!r}; valid values are {', '.join(REDUCTIONS)}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown value {backend!r}; valid values are auto, {', '.join(BACKEND_NAMES)}")


def _validate(embeddings, labels, similarity, reduction, backend):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings: expected a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings: expected a 2-D (batch, dim) tensor, got shape {tuple(embeddings.shape)}")
    if embeddings.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"embeddings: expected a floating point dtype (float16, bfloat16, float32, float64), got {embeddings.dtype}"
        )
    if labels.dim() != 1:
        raise ValueError(f"labels: expected a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels: expected an integer dtype (int8..int64, uint8), got {labels.dtype}")
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"labels: length {labels.shape[0]} does not match the batch size of embeddings ({embeddings.shape[0]})"
        )
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings: empty batch (batch size 0)")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings: embedding dimension is 0")
    check_options(similarity, reduction, backend)


def pnp_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    variant: str = "O",
    anneal: float = 0.01,
    alpha: float = 1.0,
    b: float = 2.0,
    similarity: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """PNP loss (Li et al., AAAI 2022) of a batch of embeddings, exact and in O(B^2) memory.

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64 tensor, any device.
        labels: (B,) integer class ids (any integer dtype, any values, any order).
            Moved to the embeddings' device if needed.
        variant: "O", "Ds", "Dq", "Iu", "Ib" or the authors' "PNP-O", "PNP-D_s",
            "PNP-D_q", "PNP-I_u", "PNP-I_b".
        anneal: sigmoid temperature tau > 0.
        alpha: exponent of "Dq" (> 0).
        b: slope of "Ib" (> 0).
        similarity: "cosine" (rows L2-normalised, as pytorch-metric-learning) or
            "dot" (raw inner products, as the authors' code).
        reduction: "mean" over queries that have a positive besides themselves
            (0 when there are none), or "none": a (B,) vector with each query's
            loss and 0 for dropped queries.
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch" or "ext".

    Returns:
        A float32 scalar (float64 for float64 embeddings), or a (B,) vector for
        ``reduction="none"``. Gradients flow back to ``embeddings`` in its dtype.

    Each query i counts itself among its positives P_i. With
    R_ij = sum_{k: y_k != y_i} sigmoid((S_ik - S_ij) / anneal), the query's loss
    is mean_{j in P_i} f(R_ij) (1 - that for "Dq"); queries with |P_i| < 2 are dropped.
    """
    v = resolve_variant(variant)
    anneal = _check_positive("anneal", anneal)
    alpha = _check_positive("alpha", alpha)
    b = _check_positive("b", b)
    _validate(embeddings, labels, similarity, reduction, backend)

    name = resolve_backend(backend, embeddings.device, embeddings.dtype)
    if name == "triton" and embeddings.dtype == torch.float64:
        raise TypeError("embeddings: backend='triton' computes in float32; use backend='torch' for float64")
    if labels.device != embeddings.device:
        labels = labels.to(embeddings.device)
    if labels.dtype != torch.int64:
        labels = labels.to(torch.int64)
    compute_grad = torch.is_grad_enabled() and embeddings.requires_grad
    return pnp_apply(embeddings, labels, v, anneal, alpha, b, similarity == "cosine", reduction == "mean", name,
                     compute_grad)
