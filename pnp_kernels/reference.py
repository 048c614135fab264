"""Brute-force formulations of the losses: plain autograd programs, the test oracles.

``pnp_loss_reference`` mirrors pytorch-metric-learning's ``PNPLoss`` and the
authors' code (difference tensor ``[i, j, k] = S_ik - S_ij``, their clamped
sigmoid, masks) and ``smooth_ap_loss_reference`` the Smooth-AP definition, both
generalised to a reference set and to arbitrary labels with the package's rule for
queries that have no positive besides their own copy: they are dropped from the
mean instead of producing 0/0 (docs/semantics.md). ``row_losses_reference`` is the
per-row function every backend's row kernel computes, on a given similarity block.

They run in the dtype they are given, so float64 inputs give a float64 oracle, and
they share no formula with the kernels. Memory grows as Q x M x M: tests and small
benchmarks only. This is the only module where such a tensor may appear.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, resolve_variant

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

__all__ = [
    "pnp_loss_reference",
    "smooth_ap_loss_reference",
    "recall_at_k_loss_reference",
    "row_losses_reference",
    "reference_sigmoid",
]


def reference_sigmoid(x: torch.Tensor, temp: float) -> torch.Tensor:
    """The references' temperature sigmoid: 1 / (1 + exp(clamp(-x/temp, -50, 50)))."""
    exponent = torch.clamp(-x / temp, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def _similarity(x: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "cosine":
        return F.normalize(x, p=2, dim=1)
    if similarity == "dot":
        return x
    raise ValueError(f"similarity: unknown value {similarity!r}; valid values are cosine, dot")


def _setup(embeddings, labels, ref_emb, ref_labels, query_ref_index, similarity, reduction):
    """(S, same, valid): similarities, positive mask and the valid-query mask."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: unknown value {reduction!r}; valid values are mean, none")
    labels = labels.to(embeddings.device)
    xq = _similarity(embeddings, similarity)
    if ref_emb is None:
        xr, ref_labels = xq, labels
        query_ref_index = torch.arange(embeddings.shape[0], device=embeddings.device)
    else:
        xr = _similarity(ref_emb, similarity)
        ref_labels = labels if ref_labels is None else ref_labels.to(embeddings.device)
    sim = xq @ xr.t()
    same = labels[:, None] == ref_labels[None, :]  # positives (the query's own copy included)
    n_pos = same.sum(dim=1)
    if query_ref_index is None:
        has_self = torch.zeros_like(n_pos, dtype=torch.bool)
    else:
        qri = query_ref_index.to(embeddings.device).long()
        own = qri >= 0
        has_self = own & same.gather(1, qri.clamp(min=0)[:, None])[:, 0]
    valid = (n_pos - has_self.long()) >= 1
    return sim, same, valid


def _reduce(per_query: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    zero = torch.zeros_like(per_query)
    if reduction == "none":
        return torch.where(valid, per_query, zero)
    n_valid = valid.sum()
    mean = torch.where(valid, per_query, zero).sum() / n_valid.clamp(min=1)
    return torch.where(n_valid > 0, mean, mean * 0)


def pnp_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_ref_index: Optional[torch.Tensor] = None,
    variant="O",
    anneal: float = 0.01,
    alpha: float = 1.0,
    b: float = 2.0,
    similarity: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """PNP loss by the Q x M x M formulation, differentiable by autograd.

    Args mirror :func:`pnp_kernels.pnp_loss`. Computation happens in
    ``embeddings.dtype`` (no upcast), so the reference can also be run in half
    precision to measure what precision alone costs.
    """
    v = resolve_variant(variant)
    sim, same, valid = _setup(embeddings, labels, ref_emb, ref_labels, query_ref_index, similarity, reduction)
    neg = (~same).to(sim.dtype)
    pos = same.to(sim.dtype)
    diff = sim[:, None, :] - sim[:, :, None]  # [i, j, k] = S_ik - S_ij
    ranked_above = reference_sigmoid(diff, anneal) * neg[:, None, :]
    R = ranked_above.sum(dim=-1)  # [i, j]
    fR = _REFERENCE_F[v.name](R, alpha, b)
    n_pos = pos.sum(dim=1)
    per_query = (fR * pos).sum(dim=1) / n_pos.clamp(min=1)
    if v.name == "Dq":
        per_query = 1.0 - per_query
    return _reduce(per_query, valid, reduction)


def smooth_ap_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_ref_index: Optional[torch.Tensor] = None,
    temperature: float = 0.01,
    similarity: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """Smooth-AP loss (1 - mean AP) by the Q x M x M formulation, for any labels.

    For query q and each positive j: all_qj = 1 + sum_{k != j} sigmoid((S_qk - S_qj)/T)
    over every reference row k, pos_qj = 1 + the same sum over the positives k;
    AP_q = mean_j pos_qj / all_qj.
    """
    sim, same, valid = _setup(embeddings, labels, ref_emb, ref_labels, query_ref_index, similarity, reduction)
    M = sim.shape[1]
    pos = same.to(sim.dtype)
    not_self = 1.0 - torch.eye(M, dtype=sim.dtype, device=sim.device)  # [j, k]: k != j
    diff = sim[:, None, :] - sim[:, :, None]  # [i, j, k] = S_ik - S_ij
    sig = reference_sigmoid(diff, temperature) * not_self[None]
    all_rank = 1.0 + sig.sum(dim=-1)  # [i, j]
    pos_rank = 1.0 + (sig * pos[:, None, :]).sum(dim=-1)
    n_pos = pos.sum(dim=1)
    ap = (pos_rank / all_rank * pos).sum(dim=1) / n_pos.clamp(min=1)
    return _reduce(1.0 - ap, valid, reduction)


def _k_values(k, k_temperature) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(k values, tau2_k) as the oracle reads them: tau2_k = k when k_temperature is None."""
    ks = (k,) if isinstance(k, (int, float)) else tuple(k)
    if k_temperature is None:
        temps: Tuple[float, ...] = tuple(float(v) for v in ks)
    elif isinstance(k_temperature, (int, float)):
        temps = (float(k_temperature),) * len(ks)
    else:
        temps = tuple(float(t) for t in k_temperature)
    return tuple(float(v) for v in ks), temps


def _recall_rows(sim, positive, ranked, k, k_temperature, temperature):
    """Per-row Recall@k surrogate loss, with n = |P_q|, from the brute-force rank of every positive.

    ``positive[q, j]``: j in P_q; ``ranked[q, z]``: z in Omega_q (the rows that are ranked).
    r_qj = 1 + sum_{z ranked, z != j} sigma((S_qz - S_qj)/tau1); R_k = min(sum_{j in P}
    sigma((k - r_qj)/tau2_k), k) / min(k, n); loss = 1 - mean_k R_k."""
    M = sim.shape[1]
    not_self = 1.0 - torch.eye(M, dtype=sim.dtype, device=sim.device)
    diff = sim[:, None, :] - sim[:, :, None]  # [q, j, z] = S_qz - S_qj
    sig = reference_sigmoid(diff, temperature) * not_self[None] * ranked.to(sim.dtype)[:, None, :]
    r = 1.0 + sig.sum(dim=-1)  # [q, j]
    pos = positive.to(sim.dtype)
    n = pos.sum(dim=1)
    ks, temps = _k_values(k, k_temperature)
    total = torch.zeros_like(n)
    for kv, t2 in zip(ks, temps):
        soft = (reference_sigmoid(kv - r, t2) * pos).sum(dim=1)
        total = total + torch.minimum(soft, torch.full_like(soft, kv)) / torch.clamp(n, max=kv).clamp(min=1)
    return 1.0 - total / len(ks), n


def recall_at_k_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_ref_index: Optional[torch.Tensor] = None,
    k: Union[int, Sequence[int]] = (1, 2, 4, 8, 16),
    temperature: float = 0.01,
    k_temperature: Union[None, float, Sequence[float]] = None,
    similarity: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """Recall@k surrogate loss (Patel et al., CVPR 2022) by the Q x M x M formulation.

    Omega_q is the reference set without q's own copy (the query itself in the square
    case, ``query_ref_index[q]`` with a reference set); P_q its rows of q's class; q is
    valid iff |P_q| >= 1. For j in P_q, r_qj = 1 + sum_{z in Omega_q, z != j}
    sigma((S_qz - S_qj)/temperature) and, per k with tau2_k (``k_temperature``; k itself
    when None), R_k = min(sum_j sigma((k - r_qj)/tau2_k), k) / min(k, |P_q|);
    l_q = 1 - mean_k R_k.
    """
    sim, same, valid = _setup(embeddings, labels, ref_emb, ref_labels, query_ref_index, similarity, reduction)
    Q, M = sim.shape
    own = torch.zeros(Q, M, dtype=torch.bool, device=sim.device)
    if ref_emb is None:
        own = torch.eye(Q, dtype=torch.bool, device=sim.device)
    elif query_ref_index is not None:
        qri = query_ref_index.to(sim.device).long()
        rows = torch.nonzero(qri >= 0)[:, 0]
        own[rows, qri[rows]] = True
    ranked = ~own
    per_query, _ = _recall_rows(sim, same & ranked, ranked, k, k_temperature, temperature)
    return _reduce(per_query, valid, reduction)


def row_losses_reference(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor] = None,
    *,
    kind: int = LOSS_PNP,
    variant="O",
    anneal: float = 0.01,
    alpha: float = 1.0,
    b: float = 2.0,
    ks: Sequence[float] = (),
    k_temperatures: Sequence[float] = (),
) -> torch.Tensor:
    """The per-row loss every backend's row kernel computes on a similarity block.

    Row p of S (Q x M) has the positives [lo_p, hi_p) and every other column as a
    negative; a row with an empty segment is dropped (0). PNP: mean_j f(R_pj), the
    Dq value being 1 - (1+R)^-alpha per pair; Smooth-AP: mean_j neg_j / (pos_j + neg_j);
    Recall@k: the column ``own[p]`` (-1: none) is neither a positive nor ranked.
    The gradient dS of a kernel is checked against autograd through this function.
    """
    cols = torch.arange(S.shape[1], device=S.device)
    lo = lo.to(S.device).long()
    hi = hi.to(S.device).long()
    pos = ((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])).to(S.dtype)  # [p, k]
    neg = 1.0 - pos
    n = pos.sum(dim=1)
    sig = reference_sigmoid(S[:, None, :] - S[:, :, None], anneal)  # [p, j, k]
    R = (sig * neg[:, None, :]).sum(dim=-1)  # [p, j]
    if kind == LOSS_PNP:
        v = resolve_variant(variant)
        fR = _REFERENCE_F[v.name](R, alpha, b)
        if v.name == "Dq":
            fR = 1.0 - fR
        per_pair = fR
    elif kind == LOSS_SMOOTH_AP:
        not_self = 1.0 - torch.eye(S.shape[1], dtype=S.dtype, device=S.device)
        pos_rank = 1.0 + (sig * (pos[:, None, :] * not_self[None])).sum(dim=-1)
        per_pair = R / (pos_rank + R)
    elif kind == LOSS_RECALL_AT_K:
        own_mask = torch.zeros_like(pos, dtype=torch.bool)
        if own is not None:
            own = own.to(S.device).long()
            rows = torch.nonzero(own >= 0)[:, 0]
            own_mask[rows, own[rows]] = True
        ranked = ~own_mask
        positive = pos.bool() & ranked
        per_row, n_rec = _recall_rows(S, positive, ranked, tuple(ks), tuple(k_temperatures), anneal)
        valid = (n_rec >= 1) & (n >= 1)
        return torch.where(valid, per_row, torch.zeros_like(per_row))
    else:
        raise ValueError(f"kind: unknown loss kind {kind}")
    per_row = (per_pair * pos).sum(dim=1) / n.clamp(min=1)
    return torch.where(n >= 1, per_row, torch.zeros_like(per_row))
