"""The stages around the row kernel, in plain PyTorch; a backend may fuse any of them.

    prepare      labels -> stable sort -> per-row positive segment [lo, hi);
                 embeddings -> gathered into sorted order, L2-normalised ("cosine"),
                 in the compute dtype (float32, or float64 for float64 input)
    finalize     per-row losses (sorted order) -> "mean" scalar or "none" vector
    symmetric_grad_from
                 upstream gradient -> per-row weights g -> H = diag(g) G + (diag(g) G)^T
    unprepare    dL/dXs -> back through the normalisation and the permutation -> dL/dE
                 (in E's dtype; float16 saturated to +-HALF_MAX instead of overflowing)

Every stage is built from fixed-shape device ops (sort, searchsorted, index_copy),
so nothing here synchronises the host with the GPU. The normalisation matches
``F.normalize(x, dim=1, eps=1e-12)``: x / max(||x||, eps), whose gradient is
(g - y (y . g)) / ||x|| when ||x|| > eps and g / eps otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Prep", "NORM_EPS", "HALF_MAX", "prepare", "finalize", "symmetric_grad_from", "unprepare"]

NORM_EPS = 1e-12
# Largest float16. A gradient is written in float16 saturated to +-HALF_MAX: the one
# finite-input case that overflows is a zero-norm row under "cosine", whose gradient
# is dXs / eps (~1e12, as F.normalize's), far outside float16's range.
HALF_MAX = 65504.0


class Prep(NamedTuple):
    Xs: torch.Tensor      # (B, D) embeddings in label-sorted order, normalised for "cosine"
    perm: torch.Tensor    # (B,) int64: sorted position -> original row
    lo: torch.Tensor      # (B,) int32: first sorted position of the row's class
    hi: torch.Tensor      # (B,) int32: one past its last
    denom: torch.Tensor   # (B,) max(||e||, eps) for "cosine"; empty for "dot"


def prepare(E: torch.Tensor, labels: torch.Tensor, cosine: bool, compute_dtype: torch.dtype) -> Prep:
    """Sort by label, find each row's class segment, gather and normalise the embeddings."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
    X = E.index_select(0, perm).to(compute_dtype)
    if cosine:
        denom = torch.linalg.vector_norm(X, dim=1).clamp_min(NORM_EPS)
        X = X / denom[:, None]
    else:
        denom = X.new_empty(0)
    return Prep(X, perm, lo, hi, denom)


def finalize(per_row: torch.Tensor, prep: Prep, mean: bool):
    """Reduce per-row losses (sorted order). Returns (output, n_valid as a 0-d float tensor)."""
    valid = (prep.hi - prep.lo) >= 2
    val = torch.where(valid, per_row, torch.zeros_like(per_row))
    n_valid = valid.sum().to(per_row.dtype)
    if mean:
        return val.sum() / n_valid.clamp(min=1), n_valid
    out = torch.empty_like(val).index_copy_(0, prep.perm, val)
    return out, n_valid


def row_weights(grad_out: torch.Tensor, prep: Prep, n_valid: torch.Tensor, mean: bool):
    """d output / d per_row[p] times the upstream gradient, as a (B,) vector in sorted order."""
    n = prep.perm.shape[0]
    if mean:
        return (grad_out / n_valid.clamp(min=1)).expand(n)
    return grad_out.index_select(0, prep.perm)


def symmetric_grad_from(impl, G, grad_out, prep: Prep, n_valid, mean: bool):
    """H = diag(g) G + (diag(g) G)^T with g from the upstream gradient (backend's symmetric_grad)."""
    g = row_weights(grad_out.to(G.dtype), prep, n_valid, mean)
    return impl.symmetric_grad(G, g)


def unprepare(dXs: torch.Tensor, prep: Prep, cosine: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """dL/dE from dL/dXs: through the normalisation, back to the original row order."""
    if cosine:
        X, denom = prep.Xs, prep.denom[:, None]
        radial = (X * dXs).sum(dim=1, keepdim=True)
        dXs = torch.where(denom > NORM_EPS, (dXs - X * radial) / denom, dXs / denom)
    dE = torch.empty_like(dXs).index_copy_(0, prep.perm, dXs)
    if out_dtype == torch.float16:  # saturate: the cast must not make inf (clamp keeps NaN)
        dE = dE.clamp_(-HALF_MAX, HALF_MAX)
    return dE.to(out_dtype)
