"""The B x B x B formulation of the PNP loss: plain autograd, the test oracle.

This mirrors pytorch-metric-learning's ``PNPLoss`` and the authors' code
(difference tensor ``[i, j, k] = S_ik - S_ij``, their clamped sigmoid, masks) but
with DESIGN.md's handling of queries that have no positive besides themselves:
they are dropped from the mean instead of producing 0/0. It runs in the dtype it
is given, so float64 inputs give a float64 oracle. Memory grows as B^3: use it
for tests and small benchmarks only. It is the only module where a B^3 tensor
may appear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .variants import resolve_variant

# The references' own formulas (pytorch-metric-learning / the authors' code), kept
# apart from the kernels' accurate forms in variants.py so the oracle shares no code
# with what it checks. Dq's "1 - mean" is applied below, as they do.
_REFERENCE_F = {
    "O": lambda R, a, b: R,
    "Ds": lambda R, a, b: torch.log(1 + R),
    "Dq": lambda R, a, b: 1 / (1 + R) ** a,
    "Iu": lambda R, a, b: (1 + R) * torch.log(1 + R),
    "Ib": lambda R, a, b: 1 / b**2 * (b * R - torch.log(1 + b * R)),
}

__all__ = ["pnp_loss_reference", "reference_sigmoid"]


def reference_sigmoid(x: torch.Tensor, temp: float) -> torch.Tensor:
    """The references' temperature sigmoid: 1 / (1 + exp(clamp(-x/temp, -50, 50)))."""
    exponent = torch.clamp(-x / temp, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def pnp_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    variant="O",
    anneal: float = 0.01,
    alpha: float = 1.0,
    b: float = 2.0,
    similarity: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """PNP loss by the B^3 formulation, differentiable by autograd.

    Args mirror :func:`pnp_kernels.pnp_loss`. Computation happens in
    ``embeddings.dtype`` (no upcast), so the reference can also be run in half
    precision to measure what precision alone costs.
    """
    v = resolve_variant(variant)
    if similarity == "cosine":
        x = F.normalize(embeddings, p=2, dim=1)
    elif similarity == "dot":
        x = embeddings
    else:
        raise ValueError(f"similarity: unknown value {similarity!r}; valid values are cosine, dot")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: unknown value {reduction!r}; valid values are mean, none")
    labels = labels.to(embeddings.device)
    sim = x @ x.t()
    same = labels[:, None] == labels[None, :]  # positives, self included
    neg = (~same).to(sim.dtype)
    pos = same.to(sim.dtype)
    diff = sim[:, None, :] - sim[:, :, None]  # [i, j, k] = S_ik - S_ij
    ranked_above = reference_sigmoid(diff, anneal) * neg[:, None, :]
    R = ranked_above.sum(dim=-1)  # [i, j]
    fR = _REFERENCE_F[v.name](R, alpha, b)
    n_pos = pos.sum(dim=1)
    per_query = (fR * pos).sum(dim=1) / n_pos
    valid = n_pos >= 2
    zero = torch.zeros_like(per_query)
    if v.name == "Dq":
        per_query = 1.0 - per_query
    if reduction == "none":
        return torch.where(valid, per_query, zero)
    n_valid = valid.sum()
    mean = torch.where(valid, per_query, zero).sum() / n_valid.clamp(min=1)
    return torch.where(n_valid > 0, mean, mean * 0)
